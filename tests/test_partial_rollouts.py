"""Partial rollouts (grpo.partial_rollouts): the learners' new weights reach the engine between two decoding steps of
a generation in flight. The engine-level test checks exactly what was sampled by which weights (the KV cache of the
tokens before the switch stays, as vLLM's pause with requests kept leaves it); the loop tests check the stamps, the
bound and that a switch really happens mid-response. vLLM: tests/test_vllm.py."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tokenwise.trainer.cli import main
from tests.conftest import perturbed_model, read_metrics, switched_logprobs

DUMP = "dump"


def _engine(tmp_path):
    from tokenwise.models.builtin import save_builtin
    from tokenwise.trainer.config import RolloutConfig
    from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
    from tokenwise.trainer.rollout import build_rollout
    d = save_builtin(tmp_path / "m", seed=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=64)
    tok = load_tokenizer(d)
    engine = build_rollout(RolloutConfig(max_new_tokens=12), model_dir=d, tokenizer=tok,
                           formatter=PromptFormatter(tok, system_prompt=None, use_chat_template=True),
                           dtype=torch.float32, device=torch.device("cpu"))
    return d, engine


def test_weights_posted_mid_generation_sample_the_tokens_after_the_switch(tmp_path):
    """Weights posted while the engine decodes (here: right after its 3rd forward, from a hook, so the switch point
    is exact) are loaded before the next forward: tokens 0..2 are stamped version 0 and their recorded log-probs are
    the old model's; tokens 3.. are stamped 1 and their log-probs are the new model's, reading the old model's KV
    cache of the tokens before token 2 (float64-free reference: the two models run by hand, tolerance 1e-5)."""
    d, engine = _engine(tmp_path)
    old = AutoModelForCausalLM.from_pretrained(d).eval()
    new = perturbed_model(d, 0.5)
    engine.open_mailbox()
    forwards = []

    def post_after_third(module, args, output):
        forwards.append(1)
        if len(forwards) == 3:
            engine.post_weights({k: v.clone() for k, v in new.state_dict().items()}, 1)
    hook = engine.model.register_forward_hook(post_after_third)
    try:
        batch = engine.generate([{"prompt": "12+34=", "answer": "46"}], n=1, seed=0)
    finally:
        hook.remove()
    L = int(batch.response_mask[0].sum())
    assert L >= 6, "the random model ended too early for this check"
    assert engine.version == 1 and batch.policy_version == 0
    assert batch.token_versions[0, :L].tolist() == [0, 0, 0] + [1] * (L - 3)
    prompt, resp = batch.prompt_ids[0][batch.prompt_mask[0] > 0], batch.response_ids[0, :L]
    want = switched_logprobs(old, new, prompt, resp, first_new=3)
    torch.testing.assert_close(batch.rollout_logprobs[0, :L], want, atol=1e-5, rtol=0)
    with torch.no_grad():  # sanity: the old KV cache did matter
        plain = new(torch.cat([prompt, resp])[None]).logits[0].log_softmax(-1)
    P = prompt.numel()
    assert not torch.allclose(want[3:], torch.stack([plain[P - 1 + j, resp[j]] for j in range(3, L)]), atol=1e-3)


def test_catch_up_waits_for_posted_weights_and_times_out_clearly(tmp_path):
    """A generation queued after a weight sync starts from those weights: catch_up waits for the post (another
    thread), loads it; a post that never comes is a TimeoutError naming the version, not a hang."""
    import threading
    _, engine = _engine(tmp_path)
    engine.open_mailbox()
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    threading.Timer(0.2, engine.post_weights, args=(state, 3)).start()
    t0 = time.monotonic()
    engine.catch_up(3, timeout_s=10)
    assert engine.version == 3 and time.monotonic() - t0 >= 0.15
    engine.post_weights(state, 2)  # older than what was posted: ignored
    assert not engine.take_posted() and engine.version == 3
    with pytest.raises(TimeoutError, match="version 5"):
        engine.catch_up(5, timeout_s=0.2)


def _slow_decoding(monkeypatch, seconds: float) -> None:
    from tokenwise.trainer.rollout import hf
    original = hf.PartialRollouts.__call__

    def slowed(self, input_ids, scores):
        time.sleep(seconds)
        return original(self, input_ids, scores)
    monkeypatch.setattr(hf.PartialRollouts, "__call__", slowed)


def test_partial_rollouts_switch_policy_mid_response_within_the_bound(tiny_recipe, tmp_path, monkeypatch):
    """max_staleness 1 with partial rollouts in debug mode, decoding slowed so the learner finishes a step while the
    next generation is in flight: some responses change policy mid-way (stamps rise along them, never fall), no
    trained token is older than the bound, and the run completes every step."""
    _slow_decoding(monkeypatch, 0.03)
    recipe = tiny_recipe(stages=["grpo"], grpo={"steps": 5, "max_staleness": 1, "partial_rollouts": True},
                         rollout={"dump_dir": DUMP, "max_new_tokens": 16}, eval={"num_prompts": 8, "k": 0})
    run = tmp_path / "run"
    assert main(["train", str(recipe), f"output_dir={run}"]) == 0
    steps = [r for r in read_metrics(run, "grpo") if "actor/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    mixed = 0
    for r in steps:
        s = r["step"]
        stamps = load_file(str(run / DUMP / f"step_{s:06d}.safetensors"))["token_versions"]
        for row in stamps:
            v = row[row >= 0]
            assert v.numel() and bool((v[1:] >= v[:-1]).all())  # a response only moves to newer policies
            assert s - 1 - int(v.min()) <= 1 and int(v.max()) <= s - 1
            mixed += int(v.max() > v.min())
        assert r["async/staleness_max"] <= 1
    assert mixed > 0 and sum(r["async/mixed_frac"] for r in steps) > 0


def test_partial_rollouts_need_asynchronous_generation(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe(stages=["grpo"], grpo={"partial_rollouts": True})
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'run'}"]) != 0
    assert "grpo.partial_rollouts needs asynchronous generation" in capsys.readouterr().err
