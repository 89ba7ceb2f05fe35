import subprocess
import sys
from pathlib import Path

import pytest

from tokenwise.rl.errors import ConfigError
from tokenwise.trainer.config import RunConfig, config_from_dict, load_config, schema_lines, to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, RunConfig)
    assert load_config_roundtrip(cfg) == cfg


def load_config_roundtrip(cfg: RunConfig) -> RunConfig:
    import yaml
    return config_from_dict(yaml.safe_load(to_yaml(cfg)))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def _error(tmp_path, text: str, overrides=None) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_unknown_key_names_file_key_and_closest(tmp_path):
    msg = _error(tmp_path, "grpo:\n  stepz: 3\n")
    assert "unknown key 'grpo.stepz'" in msg and "did you mean 'grpo.steps'" in msg


def test_unknown_top_level_key_lists_valid_keys(tmp_path):
    msg = _error(tmp_path, "zzzzqqq: 1\n")
    assert "zzzzqqq" in msg and "valid keys here:" in msg and "grpo" in msg


def test_wrong_type_names_field_and_expected(tmp_path):
    msg = _error(tmp_path, "grpo:\n  steps: many\n")
    assert "grpo.steps" in msg and "expected int" in msg and "'many'" in msg


def test_out_of_range_names_bound(tmp_path):
    msg = _error(tmp_path, "rollout:\n  top_p: 1.5\n")
    assert "rollout.top_p" in msg and "<= 1" in msg


def test_literal_lists_allowed_values(tmp_path):
    msg = _error(tmp_path, "trainer:\n  device: tpu\n")
    assert "trainer.device" in msg and "auto" in msg and "cuda" in msg


def test_unknown_variant_type_lists_types(tmp_path):
    msg = _error(tmp_path, "data:\n  type: countdown\n")
    assert "data.type" in msg and "arithmetic" in msg and "local" in msg


def test_list_item_without_type_names_the_allowed_types(tmp_path):
    msg = _error(tmp_path, "rewards:\n  - {weight: 2.0}\n")
    assert "rewards[0]: needs a 'type' key" in msg and "exact_answer" in msg and "python" in msg


def test_variant_keys_are_checked_per_type(tmp_path):
    msg = _error(tmp_path, "data:\n  type: local\n  train_files: [a.jsonl]\n  max_digits: 3\n")
    assert "unknown key 'data.max_digits'" in msg


def test_cross_field_check_names_fields(tmp_path):
    msg = _error(tmp_path, "grpo:\n  prompts_per_step: 10\n  mini_batches: 3\n")
    assert "grpo.mini_batches" in msg and "grpo.prompts_per_step" in msg


def test_yaml_syntax_error_names_line(tmp_path):
    msg = _error(tmp_path, "grpo:\n  steps: [1, 2\nsft: {}\n")
    assert "not valid YAML" in msg and "line" in msg


def test_list_element_choices(tmp_path):
    msg = _error(tmp_path, "data:\n  ops: ['+', '/']\n")
    assert "'/'" in msg and "allowed values" in msg


def test_overrides_apply_and_parse_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("grpo:\n  steps: 3\n")
    cfg = load_config(path, ["grpo.steps=7", "grpo.optim.lr=1e-5", "stages=[grpo]", "rewards.1.weight=0.5",
                             "data.type=sort", "data.max_length=4"])
    assert cfg.grpo.steps == 7
    assert cfg.grpo.optim.lr == pytest.approx(1e-5)
    assert cfg.stages == ["grpo"]
    assert cfg.rewards[1].weight == 0.5
    assert cfg.data.type == "sort" and cfg.data.max_length == 4


def test_bad_override_is_one_line_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(path, ["grpo.steps"])
    with pytest.raises(ConfigError, match="with overrides grpo.steps=-1.*>= 1"):
        load_config(path, ["grpo.steps=-1"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_of_nested_sections_differ_per_stage():
    cfg = config_from_dict({})
    assert cfg.sft.optim.lr != cfg.grpo.optim.lr


def test_every_field_is_documented():
    lines = schema_lines()
    assert len(lines) > 50
    undocumented = [line for line in lines if line.rstrip().endswith("—")]
    assert not undocumented, undocumented


def test_docs_config_md_is_current():
    text = (ROOT / "docs" / "config.md").read_text()
    assert "\n".join(schema_lines()) in text, "regenerate: tokenwise schema --markdown > docs/config.md"


def test_schema_module_imports_no_torch():
    code = "import sys, trainer.config, trainer.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_config_names_match_registries():
    import typing

    import tokenwise.rl.algorithm  # noqa: F401  (imports every module that registers pieces, as a run does)
    from tokenwise.rl.advantages import ADVANTAGES
    from tokenwise.rl.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from tokenwise.rl.rewards import REWARDS
    from tokenwise.trainer import config as c

    def types_of(union):
        members = typing.get_args(union) or (union,)  # a Union of one type is that type
        return sorted(t.__dataclass_fields__["type"].default for t in members)

    assert types_of(c.AdvantageConfig) == ADVANTAGES.names()
    assert types_of(c.PolicyLossConfig) == POLICY_LOSSES.names()
    from tokenwise.rl.shaping import TOKEN_SHAPERS
    assert types_of(c.TokenShaperConfig) == TOKEN_SHAPERS.names()
    from tokenwise.rl.shaping import SAMPLE_FILTERS
    assert types_of(c.SampleFilterConfig) == SAMPLE_FILTERS.names()
    assert sorted(typing.get_args(typing.get_type_hints(c.AlgorithmConfig)["aggregation"])) == AGGREGATIONS.names()
    assert sorted(typing.get_args(typing.get_type_hints(c.KLConfig)["estimator"])) == KL_ESTIMATORS.names()
    # python and code_tests run processes: trainer/reward_process.py builds them, rl/ registers the rest
    assert sorted(set(types_of(c.RewardConfig)) - {"python", "code_tests"}) == REWARDS.names()


def test_ray_section_is_validated():
    cfg = config_from_dict({"trainer": {"mode": "ray", "ray": {"num_learners": 2, "zero_stage": 3}}})
    assert cfg.trainer.ray.num_learners == 2 and cfg.trainer.ray.zero_stage == 3
    with pytest.raises(ConfigError, match="zero_stage: 4 is not allowed; allowed values: 1, 2, 3"):
        config_from_dict({"trainer": {"ray": {"zero_stage": 4}}})
    with pytest.raises(ConfigError, match="num_rollout_workers .3. must be <= num_learners .2."):
        config_from_dict({"trainer": {"ray": {"colocate": True, "num_learners": 2, "num_rollout_workers": 3}}})
    with pytest.raises(ConfigError, match="trainer.mode"):
        config_from_dict({"trainer": {"mode": "slurm"}})


@pytest.mark.parametrize("text, words", [
    ("algorithm:\n  policy_loss: {type: hapo}\n", ["hapo_entropy"]),
    ("algorithm:\n  kl: {coef: 0.1, placement: reward}\n  sample_filters: [{type: d3s}]\n", ["placement", "loss"]),
    ("algorithm:\n  sample_filters: [{type: d3s, scope: batch}]\n  token_shapers: [{type: thr}]\n",
     ["thr", "scope 'group'"]),
])
def test_algorithm_combinations_that_cannot_work_are_refused(tmp_path, text, words):
    msg = _error(tmp_path, text)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("overrides, words", [
    (["rollout.env.type=python"], ["rollout.env.function", "package.module:function"]),
    (["rollout.env.type=tools", "rollout.env.tools=[]"], ["rollout.env.tools", "calculator, python"]),
    (["rollout.env.type=tools", "rollout.env.tools=[shell]"], ["rollout.env.tools", "calculator", "python"]),
    (["rollout.env.type=tools", "algorithm.routing_replay=true"], ["algorithm.routing_replay", "rollout.env"]),
    (["rollout.env.type=tools", "rollout.env.max_turns=0"], ["rollout.env.max_turns", ">= 1"]),
])
def test_environment_settings_are_checked(tmp_path, overrides, words):
    message = _error(tmp_path, "stages: [grpo]\nrewards: [{type: exact_answer}]\n", overrides)
    assert all(w in message for w in words), message


def test_an_environment_of_its_own_may_be_the_only_reward(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("stages: [grpo]\nrewards: []\nrollout: {env: {type: python, function: 'my_env.py:make'}}\n")
    assert load_config(path).rollout.env.function == "my_env.py:make"
    assert "rewards is empty" in _error(tmp_path, "stages: [grpo]\nrewards: []\n")
