"""Multi-turn episodes (rollout.env, trainer/rollout/multiturn.py): a trajectory is exactly the token ids each engine
call sampled plus the environment's ids, turn by turn; the learner reads the environment's tokens as context and
trains on the sampled ones only; GRPO runs episodes in debug and cluster mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, _merge, read_metrics
from tokenwise.rl.types import EPISODE_STATS, RolloutBatch

CPU = torch.device("cpu")
VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

# Three turns: after turns 1 and 2 a tool message that depends on what the model wrote (so a wrong split of the
# sampled text shows), then the episode ends; the environment rewards an answer made of digits.
ECHO_ENV = '''
from tokenwise.rl.environments import Environment, StepResult


def observation(text, turn):  # a sorting prompt again, the SFT model answers it and ends its turn
    return "sort " + " ".join(text[:3] + str(turn))


class Echo(Environment):
    def reset(self, row):
        self.turn = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        self.turn += 1
        if self.turn == 3:
            return StepResult([], float(text.strip().isdigit()), True)
        return StepResult([{"role": "user", "content": observation(text, self.turn)}], 0.0, False,
                          {"tool_calls": 1.0, "tool_errors": float(self.turn == 2)})


def make(row):
    return Echo()
'''
SFT = {  # a short SFT on sorting: the model ends its turns with its end-of-turn token
    "name": "mt-sft", "seed": 0, "stages": ["sft"],
    "model": {"type": "builtin", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 128, "max_position_embeddings": 128},
    "data": {"type": "sort", "min_length": 3, "max_length": 5},
    "rollout": {"max_new_tokens": 8},
    "sft": {"steps": 80, "batch_size": 32, "micro_batch_size": 32, "optim": {"lr": 3.0e-3, "warmup_steps": 10}},
    "eval": {"num_prompts": 8, "k": 0},
    "logging": {"progress": False, "plot": False},
}


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    from tokenwise.trainer.cli import main
    root = tmp_path_factory.mktemp("multiturn")
    (root / "sft.yaml").write_text(yaml.safe_dump(SFT))
    assert main(["train", str(root / "sft.yaml"), f"output_dir={root / 'run'}"]) == 0
    return root / "run" / "sft" / "final"


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("env") / "echo_env.py"
    path.write_text(ECHO_ENV)
    return path


def _observation(env_file: Path):
    from tokenwise.rl.importing import import_function
    return import_function(f"{env_file}:observation")


def _rows(n: int) -> list[dict]:
    from tokenwise.rl.data import sort_task
    return list(sort_task(num_train=n, num_heldout=1, min_length=3, max_length=5, seed=7)["train"])


def _episode_engine(sft_model: Path, env_file: Path, engine: str, **env):
    from tokenwise.trainer.config import EnvConfig, RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    tok = load_tokenizer(sft_model)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    cfg = RolloutConfig(engine=engine, max_new_tokens=10,
                        env=EnvConfig(type="python", function=f"{env_file}:make", **{"max_turns": 3, **env}))
    return build_rollout(cfg, model_dir=sft_model, tokenizer=tok, formatter=fmt, dtype=torch.float32, device=CPU), \
        tok, fmt


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=[VLLM, pytest.mark.vllm, pytest.mark.slow])])
def test_an_episode_is_the_engines_sampled_ids_plus_the_environments_ids(sft_model, env_file, engine):
    """Each turn the engine is fed the prompt plus the trajectory so far as ids (never re-tokenized); the episode's
    response is, turn by turn, the ids that engine call sampled (response_mask 1, their log-probs) then the ids of
    the environment's answer rendered by the chat template after an end-of-turn token (context_mask 1, log-prob 0)."""
    episodes, tok, fmt = _episode_engine(sft_model, env_file, engine, max_tokens=120)
    calls = []
    inner, generate = episodes.engine, episodes.engine.generate

    def spy(rows, **kw):
        out = generate(rows, **kw)
        calls.append((kw["prompt_ids"], out))
        return out
    inner.generate = spy
    rows = _rows(4)
    batch = episodes.generate(rows, n=2, seed=5)
    observation = _observation(env_file)
    eos = tok.decode([tok.eos_token_id])
    assert len(batch) == 8 and batch.group_size == 2 and len(calls) == 3
    turns = batch.episode_stats[:, EPISODE_STATS.index("turns")]
    assert (turns == 3).sum() >= 4  # the SFT model ends most turns with its end-of-turn token
    for k in range(len(batch)):
        row = rows[k // 2]
        prompt = batch.prompt_ids[k][batch.prompt_mask[k] > 0].tolist()
        assert prompt == tok(fmt.episode([{"role": "user", "content": row["prompt"]}], row=row),
                             add_special_tokens=False)["input_ids"]
        ids, mask, logp = [], [], []
        for t in range(int(turns[k])):
            fed, out = calls[t]
            b = int((turns[:k] > t).sum())  # the episodes still going, in order
            assert fed[b] == prompt + ids, f"episode {k} turn {t}: the engine was not fed the trajectory so far"
            L = int(out.response_mask[b].sum())
            ids += out.response_ids[b, :L].tolist()
            mask += [1.0] * L
            logp += out.rollout_logprobs[b, :L].tolist()
            if t < int(turns[k]) - 1:
                assert out.response_ids[b, L - 1] == tok.eos_token_id
                env_ids = tok(fmt.continuation([{"role": "user", "content": observation(out.responses[b], t + 1)}],
                                               eos_texts=[eos]), add_special_tokens=False)["input_ids"]
                ids += env_ids
                mask += [0.0] * len(env_ids)
                logp += [0.0] * len(env_ids)
        n = len(ids)
        assert batch.present_mask[k].sum() == n and batch.response_ids[k, :n].tolist() == ids
        assert batch.response_mask[k, :n].tolist() == mask and batch.context_mask[k, :n].tolist() == [1 - m for m in mask]
        assert torch.equal(batch.rollout_logprobs[k, :n], torch.tensor(logp))
        assert batch.response_mask[k, n:].sum() == 0 and batch.context_mask[k, n:].sum() == 0
    # the text between turns is the template's own rendering of a tool message after an assistant turn
    assert fmt.continuation([{"role": "tool", "content": "x"}], eos_texts=[eos]) == "<|tool|>x<|end|><|assistant|>"


def test_episodes_respect_the_turn_and_token_budgets(sft_model, env_file):
    """max_tokens bounds sampled + environment tokens; an episode that runs out of turns or tokens is cut (truncated)
    and its last turn is what the rewards read."""
    episodes, tok, _ = _episode_engine(sft_model, env_file, "hf", max_turns=2, max_tokens=40)
    batch = episodes.generate(_rows(3), n=2, seed=1)
    stats = batch.episode_stats
    assert (batch.present_mask.sum(1) <= 40).all()
    assert (stats[:, EPISODE_STATS.index("turns")] <= 2).all()
    cut = stats[:, EPISODE_STATS.index("cut")] > 0
    assert cut.all() and batch.truncated.all()  # Echo wants 3 turns: 2 are never enough
    for k in range(len(batch)):
        L = int(batch.present_mask[k].sum())
        last = (batch.context_mask[k, :L] > 0).nonzero()
        start = int(last.max()) + 1 if len(last) else 0
        tail = batch.response_ids[k, start:L].tolist()
        assert batch.responses[k] == tok.decode([t for t in tail if t != tok.eos_token_id], skip_special_tokens=True)


def _multiturn_batch(seed: int, B: int = 4, P: int = 6, T: int = 16, vocab: int = 90) -> RolloutBatch:
    """Random ids: a left-padded prompt, then per row a sampled segment, environment tokens, a sampled segment."""
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    mask, context = torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        prompt_mask[b, P - int(torch.randint(2, P + 1, (1,), generator=g)):] = 1
        a, c, d = (int(x) for x in torch.randint(1, 5, (3,), generator=g))
        mask[b, :a] = 1
        context[b, a:a + c] = 1
        mask[b, a + c:a + c + d] = 1
    present = mask + context
    return RolloutBatch(torch.randint(3, vocab, (B, P), generator=g) * prompt_mask, prompt_mask,
                        torch.randint(3, vocab, (B, T), generator=g) * present.long(), mask, torch.zeros(B, T),
                        torch.zeros(B, dtype=torch.bool), [""] * B, [""] * B, [""] * B, 2, 0,
                        temperatures=0.5 + torch.rand(B, T, generator=g), context_mask=context,
                        episode_stats=torch.zeros(B, len(EPISODE_STATS)))


@pytest.mark.parametrize("packing", ["none", "rows", "groups"])
def test_the_learner_reads_environment_tokens_as_context_and_scores_sampled_ones(tmp_path_factory, packing):
    """A float64 model: the learner's log-probs of the sampled tokens (its log-softmax runs in float32) equal a plain
    forward over each row's prompt and whole response (environment tokens included) to 1e-5, whatever the packing."""
    from conftest import builtin_model_dir
    from tokenwise.models.builtin import build_tokenizer
    from tokenwise.trainer.config import OptimConfig
    from tokenwise.trainer.learner import Learner, trim
    model_dir = builtin_model_dir(tmp_path_factory, "mt-learner")
    learner = Learner(model_dir, build_tokenizer(), optim=OptimConfig(), total_updates=1, device=CPU,
                      dtype=torch.float64, logprobs="naive", packing=packing)
    batch = trim(_multiturn_batch(0))
    with torch.no_grad():
        logp, _, _ = learner._forward(learner.model, batch)
        for b in range(len(batch)):
            prompt = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
            n = int(batch.present_mask[b].sum())
            ids = torch.cat([prompt, batch.response_ids[b, :n]])[None]
            logits = learner.model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
            want = torch.log_softmax(logits / batch.temperatures[b, :n, None].double(), -1).gather(
                -1, batch.response_ids[b, :n, None]).squeeze(-1)
            sampled = batch.response_mask[b, :n] > 0
            torch.testing.assert_close(logp[b, :n][sampled].double(), want[sampled], rtol=1e-5, atol=1e-5)


def _grpo_recipe(root: Path, sft_model: Path, env_file: Path, mode: str, engine: str = "hf") -> Path:
    recipe = _merge({k: v for k, v in TINY.items() if k not in ("model", "data")}, {
        "name": f"mt-{mode}-{engine}", "stages": ["grpo"],
        "model": {"type": "pretrained", "path": str(sft_model)},
        "data": {"type": "sort", "min_length": 3, "max_length": 5, "num_train": 64, "num_heldout": 8},
        "rollout": {"engine": engine, "max_new_tokens": 10, "dump_dir": "rollouts",
                    "env": {"type": "python", "function": f"{env_file}:make", "max_turns": 3, "max_tokens": 96}},
        "rewards": [{"type": "format", "weight": 0.0}],
        "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "micro_batch_size": 8},
        "trainer": {"mode": mode, "ray": {"num_learners": 1, "num_rollout_workers": 1, "cpus_per_learner": 0.5,
                                          "cpus_per_rollout": 0.5}},
    })
    path = root / f"{mode}-{engine}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _check_dumped_episodes(run: Path, env_file: Path, tok) -> int:
    """Every dumped episode (what the learner trained on) splits into sampled turns and, between them, exactly the
    ids of the environment's answer to the turn before; returns the number of 3-turn episodes."""
    from tokenwise.trainer.dump import load_rollouts
    from tokenwise.trainer.loading import PromptFormatter
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    observation, eos = _observation(env_file), tok.decode([tok.eos_token_id])
    full = 0
    for step in (1, 2):
        batch, _, _ = load_rollouts(run / "rollouts", step)
        for k in range(len(batch)):
            n = int(batch.present_mask[k].sum())
            ids, sampled = batch.response_ids[k, :n].tolist(), batch.response_mask[k, :n].tolist()
            segments, start = [], 0
            for i in range(1, n + 1):
                if i == n or sampled[i] != sampled[start]:
                    segments.append((sampled[start], ids[start:i]))
                    start = i
            turns = [s for kind, s in segments if kind == 1.0]
            for t, (kind, seg) in enumerate(segments):
                if kind == 0.0:
                    text = tok.decode(segments[t - 1][1][:-1], skip_special_tokens=True)
                    turn = sum(1 for kd, _ in segments[:t] if kd == 1.0)
                    want = tok(fmt.continuation([{"role": "user", "content": observation(text, turn)}],
                                                eos_texts=[eos]), add_special_tokens=False)["input_ids"]
                    assert seg == want, (step, k, t)
            assert (batch.rollout_logprobs[k, :n] != 0).tolist() == [s == 1.0 for s in sampled]
            full += len(turns) == 3
    return full


def test_grpo_with_episodes_in_debug_mode(sft_model, env_file, tmp_path, capsys):
    from tokenwise.trainer.cli import main
    from tokenwise.trainer.loading import load_tokenizer
    run = tmp_path / "run"
    assert main(["train", str(_grpo_recipe(tmp_path, sft_model, env_file, "local")), f"output_dir={run}"]) == 0
    assert _check_dumped_episodes(run, env_file, load_tokenizer(sft_model)) >= 8
    steps = [r for r in read_metrics(run, "grpo") if "actor/loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert 2.0 <= r["env/turns_mean"] <= 3.0 and r["env/tool_calls_mean"] > 1.0
        assert 0.3 < r["env/tool_error_frac"] < 0.7  # Echo counts its second call as an error
        assert r["env/context_tokens_mean"] > 10
        assert r["reward/mean"] == pytest.approx(r["env/reward_mean"])  # the only reward (format weighs 0)
    capsys.readouterr()
    assert main(["eval", str(run), "--num-prompts", "4"]) == 0
    assert "eval/turns_mean" in capsys.readouterr().out  # evaluation runs episodes too ...
    assert main(["eval", str(run), "--num-prompts", "4", "--no-env"]) == 0
    assert "eval/turns_mean" not in capsys.readouterr().out  # ... unless told to answer in one turn


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=[VLLM, pytest.mark.vllm, pytest.mark.slow])])
def test_grpo_with_episodes_in_cluster_mode(sft_model, env_file, tmp_path, engine):
    """A rollout actor runs the episodes, a DeepSpeed learner actor trains on them."""
    import ray
    from tokenwise.trainer.cli import main
    from tokenwise.trainer.cluster import start_local_ray
    from tokenwise.trainer.loading import load_tokenizer
    start_local_ray(num_cpus=2, object_store_mb=256)
    try:
        run = tmp_path / "run"
        assert main(["train", str(_grpo_recipe(tmp_path, sft_model, env_file, "ray", engine)),
                     f"output_dir={run}"]) == 0
    finally:
        ray.shutdown()
    assert _check_dumped_episodes(run, env_file, load_tokenizer(sft_model)) >= 8
    steps = [r for r in read_metrics(run, "grpo") if "actor/loss" in r]
    assert len(steps) == 2 and all(2.0 <= r["env/turns_mean"] <= 3.0 for r in steps)


def test_the_continuation_starts_right_after_the_sampled_end_of_turn_token():
    """A ChatML template puts a newline after each <|im_end|>, which the model never samples: the environment's text
    starts with it. A template that renders earlier turns differently once more follow is refused."""
    from tokenwise.models.builtin import build_tokenizer
    from tokenwise.trainer.loading import PromptFormatter
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = PromptFormatter(tok, system_prompt="be brief", use_chat_template=True)
    assert fmt.continuation([{"role": "tool", "content": "42"}], eos_texts=["<|im_end|>"]) == \
        "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.episode([{"role": "user", "content": "hi"}], row={}) == \
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
                         "{% endif %}<|im_end|>{% endfor %}")
    from tokenwise.rl.errors import ConfigError
    with pytest.raises(ConfigError, match="cannot be continued"):
        fmt.continuation([{"role": "tool", "content": "42"}], eos_texts=["<|im_end|>"])


class _Scripted:
    """An engine that 'samples' fixed assistant turns (by row prompt), with the engine interface episodes use."""

    def __init__(self, tok, script: dict[str, list[str]]) -> None:
        self.tok, self.script = tok, script
        self.turn_start = tok.convert_tokens_to_ids("<|assistant|>")  # one per assistant turn begun
        self.eos_ids, self.pad_id, self.version, self.max_new_tokens = [tok.eos_token_id], tok.pad_token_id, 0, 200

    def generate(self, rows, *, n, greedy=False, seed=None, adaptive=None, temperature=None, prompt_ids=None,
                 max_new_tokens=None):
        eos = self.tok.eos_token_id
        turns = [self.tok(self.script[r["prompt"]][p.count(self.turn_start) - 1], add_special_tokens=False)[
            "input_ids"] + [eos] for r, p in zip(rows, prompt_ids)]
        T = max(map(len, turns))
        ids = torch.tensor([t + [self.pad_id] * (T - len(t)) for t in turns])
        mask = torch.tensor([[1.0] * len(t) + [0.0] * (T - len(t)) for t in turns])
        B = len(rows)
        return RolloutBatch(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long), ids, mask,
                            -mask, torch.zeros(B, dtype=torch.bool), [r["prompt"] for r in rows],
                            [r["answer"] for r in rows], [self.tok.decode(t[:-1]) for t in turns], 1, 0)


SYSTEM_TOOL_ENV = """
from tokenwise.rl.environments import ToolEnvironment, calculator

def make(row):
    return ToolEnvironment([calculator], score=lambda row, text: 0.0, system="Call tools when unsure.")
"""


@pytest.mark.parametrize("kind", ["tools", "python"])
def test_tool_demonstrations_are_laid_out_like_the_episodes_they_teach(kind, tmp_path):
    """The calculator task: an SFT demonstration (call, result, answer) is token for token the episode the calculator
    environment makes when the model writes the demonstration's turns, its loss mask the episode's sampled tokens;
    the calculator's answer is the demonstration's tool message, and the episode's reward input is the answer. Also
    for a user's environment (`type: python`) that opens with a system message of its own."""
    from tokenwise.models.builtin import build_tokenizer
    from tokenwise.rl.data import arithmetic_task
    from tokenwise.trainer.config import EnvConfig
    from tokenwise.trainer.loading import PromptFormatter
    from tokenwise.trainer.rollout.multiturn import MultiTurnRollout, episode_opening
    from tokenwise.trainer.sft import sft_batch
    tok = build_tokenizer()
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    rows = arithmetic_task(num_train=40, num_heldout=4, min_digits=3, max_digits=4, ops=["*"], seed=3,
                           teacher_error=0.5, tool_demos=True)["train"].to_list()
    direct = [r for r in rows if len(r["sft_messages"]) == 1]
    tooled = [r for r in rows if len(r["sft_messages"]) == 3]
    assert direct and tooled and all(r["sft_messages"][0]["content"] != r["answer"] for r in direct)
    for r in direct:  # the guess restates the problem, then is copied into the answer line, like the tool's result
        guess = r["sft_messages"][0]["content"].rsplit(" ", 1)[1]
        assert r["sft_messages"][0]["content"] == (f"No need for the calculator: {r['prompt'].rstrip('=')} = {guess}"
                                                   f"\nAnswer: {guess}") and guess != r["answer"]
    assert all(r["sft_messages"][2]["content"] == f"Answer: {r['answer']}" for r in tooled)
    script = {r["prompt"]: [m["content"] for m in r["sft_messages"] if m["role"] == "assistant"] for r in rows}
    cfg = EnvConfig(type="tools", tools=["calculator"], max_turns=3, max_tokens=400)
    if kind == "python":
        (tmp_path / "sys_env.py").write_text(SYSTEM_TOOL_ENV)
        cfg = EnvConfig(type="python", function=f"{tmp_path / 'sys_env.py'}:make", max_turns=3, max_tokens=400)
    episodes = MultiTurnRollout(_Scripted(tok, script), tokenizer=tok, formatter=fmt, cfg=cfg)
    batch = episodes.generate(rows, n=1)
    sft = sft_batch(rows, tok, fmt, opening=episode_opening(cfg), eos_texts=episodes.eos_texts)
    for k, row in enumerate(rows):
        P, n = int(batch.prompt_mask[k].sum()), int(batch.present_mask[k].sum())
        ids = batch.prompt_ids[k, -P:].tolist() + batch.response_ids[k, :n].tolist()
        L = int(sft.attention_mask[k].sum())
        assert sft.input_ids[k, :L].tolist() == ids
        assert ("Call tools when unsure." in tok.decode(ids[:P])) == (kind == "python")
        assert sft.loss_mask[k, :L].tolist() == [0.0] * P + batch.response_mask[k, :n].tolist()
        assert batch.responses[k] == script[row["prompt"]][-1]
        tools = batch.episode_stats[k, EPISODE_STATS.index("tool_calls")]
        assert tools == (1.0 if row in tooled else 0.0)
        if row in tooled:  # the calculator answered with the product: the environment tokens end with it
            context = batch.response_ids[k, :n][batch.context_mask[k, :n] > 0].tolist()
            assert tok.decode(context).endswith(f"{row['answer']}<|end|><|assistant|>")
    assert batch.episode_stats[:, EPISODE_STATS.index("tool_errors")].sum() == 0


def test_trimming_keeps_per_episode_fields_whole():
    """trim() drops response columns past the longest trajectory (environment tokens count as present) but never
    the per-episode statistics, even when the response width equals their number of columns."""
    from tokenwise.trainer.learner import trim
    T = len(EPISODE_STATS)
    batch = _multiturn_batch(1, T=T)
    batch.response_mask[:, 3:] = 0
    batch.context_mask[:, 3:] = 0
    batch.context_mask[0, 2] = 1.0  # a row whose last present token is the environment's: still inside the width
    batch.response_mask[0, 2] = 0.0
    batch.episode_stats = torch.arange(len(batch) * T, dtype=torch.float32).view(len(batch), T)
    out = trim(batch)
    assert out.response_ids.shape[1] == 3 and out.context_mask.shape[1] == 3
    assert torch.equal(out.episode_stats, batch.episode_stats)


@pytest.mark.parametrize("body, words", [
    ("def make(row):\n    return Bad()\nclass Bad:\n    def reset(self, row):\n        return [{'role': 'user', 'content': "
     "row['prompt']}]\n    def step(self, text):\n        raise ValueError('no such move')\n",
     ["Bad.step raised ValueError: no such move", "on prompt 'sort"]),
    ("def make(row):\n    return Bad()\nclass Bad:\n    def reset(self, row):\n        return 'hello'\n"
     "    def step(self, text):\n        return None\n", ["Bad.reset returned str", "list of"]),
    ("def make(row):\n    return object()\n", ["returned object, not an Environment"]),
])
def test_a_broken_environment_is_a_one_line_error(sft_model, tmp_path, capsys, body, words):
    from tokenwise.trainer.cli import main
    env = tmp_path / "bad_env.py"
    env.write_text(body)
    code = main(["train", str(_grpo_recipe(tmp_path, sft_model, env, "local")), f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in ["rollout.env", str(env), *words]), err
