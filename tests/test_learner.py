"""The learner and the rollout engine on a tiny real model."""

import dataclasses

import pytest
import torch

from conftest import builtin_model_dir
from tokenwise.rl.algorithm import Algorithm
from tokenwise.rl.data import arithmetic_task
from tokenwise.rl.rewards import compute_rewards
from tokenwise.trainer.config import config_from_dict
from tokenwise.trainer.learner import Learner, local_pool, token_logprobs_entropy
from tokenwise.trainer.schedule import warmup_cosine
from tokenwise.trainer.loading import PromptFormatter, load_tokenizer
from tokenwise.trainer.rollout import build_rollout

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return builtin_model_dir(tmp_path_factory, "tiny")


def _setup(tiny_dir, *, micro_batch_size=64, max_tokens=0, **cfg_sections):
    cfg = config_from_dict(cfg_sections)
    tok = load_tokenizer(tiny_dir)
    algo = Algorithm(cfg.algorithm, max_response_len=cfg.rollout.max_new_tokens)
    learner = local_pool(Learner(tiny_dir, tok, optim=cfg.grpo.optim, total_updates=100, device=CPU,
                                 dtype=torch.float32, temperature=cfg.rollout.temperature, algorithm=algo,
                                 reference_dir=tiny_dir if algo.needs_reference else None,
                                 logprobs=cfg.trainer.logprobs, packing=cfg.trainer.packing),
                         micro_batch_size=micro_batch_size, max_tokens_per_micro_batch=max_tokens)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    engine = build_rollout(cfg.rollout, model_dir=tiny_dir, tokenizer=tok, formatter=fmt, dtype=torch.float32,
                           device=CPU)
    return cfg, algo, learner, engine


def _rows(n, seed=0):
    return arithmetic_task(num_train=n, num_heldout=4, min_digits=1, max_digits=2, ops=["+"], seed=seed)["train"].to_list()


def test_token_logprobs_entropy_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 3
    labels = torch.randint(0, 17, (3, 5), generator=g)
    logp, ent = token_logprobs_entropy(logits, labels)
    ref = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(logp.double(), ref.gather(-1, labels[..., None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5, rtol=0)


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 14, 0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_rollout_batch_shapes_masks_and_logprobs(tiny_dir):
    torch.manual_seed(0)
    cfg, algo, learner, engine = _setup(tiny_dir, rollout={"max_new_tokens": 6, "batch_size": 8})
    rows = _rows(5)
    out = engine.generate(rows, n=3)  # 15 sequences over two generate calls of 8 and 7
    assert out.response_ids.shape[0] == 15 and out.prompt_ids.shape[0] == 15
    assert out.prompts == [r["prompt"] for r in rows for _ in range(3)]
    eos = learner.learner.tokenizer.eos_token_id
    for ids, mask, trunc in zip(out.response_ids, out.response_mask, out.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # a prefix
        assert (ids[n - 1] == eos) != bool(trunc)       # ends in EOS unless truncated
        assert not (ids[:n - 1] == eos).any()
    # the learner's recomputed log-probs equal the sampler's (same weights, temperature 1, no top-p/k)
    batch = learner.score(algo.make_batch(out, torch.zeros(15)))
    torch.testing.assert_close(batch.old_logprobs, out.rollout_logprobs, atol=2e-5, rtol=0)
    assert (batch.old_entropy[out.response_mask == 0] == 0).all()


def test_temperature_is_applied_to_learner_logprobs(tiny_dir):
    torch.manual_seed(1)
    cfg, algo, learner, engine = _setup(tiny_dir, rollout={"temperature": 0.7, "max_new_tokens": 4})
    out = engine.generate(_rows(4), n=2)
    batch = learner.score(algo.make_batch(out, torch.zeros(8)))
    torch.testing.assert_close(batch.old_logprobs, out.rollout_logprobs, atol=2e-5, rtol=0)


ALGOS = {agg: {"aggregation": agg} for agg in ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                                "seq-mean-token-sum-norm"]}
ALGOS.update({
    "gspo": {"aggregation": "seq-mean-token-mean", "policy_loss": {"type": "gspo", "clip_low": 0.01, "clip_high": 0.01}},
    "gspo_token": {"policy_loss": {"type": "gspo_token"}, "kl": {"estimator": "k3+", "coef": 0.1}},
    "forking+entropy": {"token_shapers": [{"type": "forking", "rho": 0.3}], "entropy_coef": 0.01,
                        "advantage": {"type": "rloo"}, "kl": {"estimator": "k2", "coef": 0.1}},
    "kl_in_reward": {"kl": {"estimator": "k3", "coef": 0.5, "placement": "reward"}, "advantage": {"type": "dr_grpo"}},
    "hapo": {"advantage": {"type": "hapo"}, "policy_loss": {"type": "hapo"}, "token_shapers": [{"type": "hapo_entropy"}]},
    "d3s": {"sample_filters": [{"type": "d3s", "n_init": 0.5}], "token_shapers": [{"type": "d3s_token", "k_init": 0.3}],
            "kl": {"estimator": "k1", "coef": 0.1}},
    "d3s_valid_denominator": {"token_shapers": [{"type": "d3s_token", "k_init": 0.3, "denominator": "valid"}]},
    "thr": {"token_shapers": [{"type": "thr", "p": 0.5, "mode": "mask"}]},
    "d3s_batch_scope": {"sample_filters": [{"type": "d3s", "n_init": 0.5, "scope": "batch"}],
                        "aggregation": "seq-mean-token-sum"},
})


@pytest.mark.parametrize("algorithm", list(ALGOS))
@pytest.mark.parametrize("micro, max_tokens, packing", [(4, 0, "groups"), (2, 0, "rows"), (1, 30, "groups"),
                                                         (2, 30, "none")])
def test_micro_batching_gives_the_same_update(tiny_dir, micro, max_tokens, packing, algorithm):
    """Every aggregation divides by the whole mini-batch's counts and shapers see the whole step, so 1, 2, 4 or
    token-budgeted micro-batches update identically, for every loss, aggregation, KL estimator and shaper, padded
    or packed."""
    torch.manual_seed(0)
    spec = {"kl": {"coef": 0.1}, **ALGOS[algorithm]}
    _, algo, full, engine = _setup(tiny_dir, micro_batch_size=8, algorithm=spec, trainer={"packing": packing})
    out = engine.generate(_rows(2), n=4)
    rewards = torch.arange(8, dtype=torch.float32) % 3
    batch, _ = algo.filter(algo.make_batch(out, rewards), progress=0.5)
    batch, _ = algo.shape(full.score(batch), progress=0.5)
    _, _, split, _ = _setup(tiny_dir, micro_batch_size=8 // micro, max_tokens=max_tokens, algorithm=spec,
                            trainer={"packing": packing})
    grads = {}
    for name, pool in (("full", full), ("split", split)):  # the accumulated gradient each optimizer step sees
        step = pool.learner.opt.step
        def record(step=step, name=name, model=pool.learner.model):
            grads[name] = [p.grad.clone() for p in model.parameters()]
            return step()
        pool.learner.opt.step = record
    m_full, _ = full.train_step(batch, ppo_epochs=1, mini_batches=1)
    m_split, _ = split.train_step(batch, ppo_epochs=1, mini_batches=1)
    # the gradient within 1e-6; the weights after AdamW within 2e-6 (Adam maps an element whose gradient is ~0 to
    # about ±lr whatever its last bits, so the weights are the looser check)
    for (name, _), ga, gb in zip(full.learner.model.named_parameters(), grads["full"], grads["split"]):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(full.learner.model.named_parameters(), split.learner.model.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=name)
    assert m_full["actor/loss"] == pytest.approx(m_split["actor/loss"], abs=1e-6)


# one-update steps skip the old-policy pass unless a token shaper or KL-in-reward reads it first (sample filters
# act on rewards before scoring)
ONE_UPDATE = [a for a in ALGOS if "token_shapers" not in ALGOS[a] and ALGOS[a].get("kl", {}).get("placement") != "reward"]


def test_which_steps_skip_the_old_policy_pass(tiny_dir):
    for name, spec in ALGOS.items():
        algo = Algorithm(config_from_dict({"algorithm": spec}).algorithm, max_response_len=8)
        assert algo.needs_old_pass(ppo_epochs=1, mini_batches=1) == (name not in ONE_UPDATE), name
        assert algo.needs_old_pass(ppo_epochs=1, mini_batches=2) and algo.needs_old_pass(ppo_epochs=2, mini_batches=1)
    algo = Algorithm(config_from_dict({"algorithm": {"adaptive_temperature": {"tau": 0.3}}}).algorithm,
                     max_response_len=8)
    assert algo.needs_old_pass(ppo_epochs=1, mini_batches=1)  # the next step samples with this step's entropies


@pytest.mark.parametrize("algorithm", [*ONE_UPDATE, "token-mean/sequence-mask-correction"])
def test_one_update_step_takes_old_logprobs_from_its_training_forward(tiny_dir, algorithm):
    """One on-policy update: without the scoring pass the loss, gradients (1e-6) and weights are today's, rollout
    correction (token level by default) included, and the old-policy log-probs / entropies the step reports come
    from the training forward (1e-6 of the scoring pass's)."""
    spec = ({"kl": {"coef": 0.1}, **ALGOS[algorithm]} if algorithm in ALGOS else
            {"kl": {"coef": 0.1}, "rollout_correction": {"level": "sequence", "mode": "mask", "cap": 1.01}})
    runs = {}
    for mode in ("scored", "shortcut"):
        _, algo, pool, engine = _setup(tiny_dir, micro_batch_size=3, algorithm=spec)
        torch.manual_seed(0)
        out = engine.generate(_rows(3), n=4, seed=11)
        batch = algo.make_batch(out, torch.arange(12, dtype=torch.float32) % 3)
        # an engine that disagrees with the learner (as vLLM in bf16 would), so correction weights are not all 1
        noise = 0.05 * torch.randn(batch.rollout_logprobs.shape, generator=torch.Generator().manual_seed(1))
        batch = dataclasses.replace(batch, rollout_logprobs=batch.rollout_logprobs + noise * batch.response_mask)
        assert not algo.needs_old_pass(ppo_epochs=1, mini_batches=1)
        scored = pool.score(batch, old=mode == "scored")
        assert (scored.old_logprobs is None) == (mode == "shortcut")
        assert scored.ref_logprobs is not None  # the reference pass stays
        if mode == "scored":  # as the controller does: correction weights from the scoring pass
            scored, _ = algo.shape(scored)
        grads = []
        step = pool.learner.opt.step
        pool.learner.opt.step = lambda: grads.append([p.grad.clone() for p in pool.learner.model.parameters()]) or step()
        metrics, after = pool.train_step(scored, ppo_epochs=1, mini_batches=1)
        runs[mode] = (metrics, after, grads[0], [p.detach().clone() for p in pool.learner.model.parameters()])
    (ma, a, ga, wa), (mb, b, gb, wb) = runs["scored"], runs["shortcut"]
    assert mb["actor/loss"] == pytest.approx(ma["actor/loss"], abs=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    for x, y in zip(wa, wb):  # Adam moves a ~0-gradient element by up to lr whatever its last bits: 5% of a step
        torch.testing.assert_close(x, y, atol=5e-5, rtol=0)
    torch.testing.assert_close(b.old_logprobs, a.old_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.old_entropy, a.old_entropy, atol=1e-6, rtol=0)
    if algorithm not in ALGOS:  # the sequence-level mask did drop responses, in both modes alike
        assert algo.shape(b)[1]["rollout/tis_clipped_frac"] > 0
    with pytest.raises(ValueError, match="one update only"):
        pool.train_step(pool.score(batch, old=False), ppo_epochs=1, mini_batches=2)


def test_load_weights_changes_rollout_outputs(tiny_dir):
    _, algo, learner, engine = _setup(tiny_dir)
    rows = _rows(4)
    before = engine.generate(rows, n=1, greedy=True).responses
    with torch.no_grad():
        for p in learner.learner.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.load_weights(dict(learner.learner.full_parameters()), version=7)
    after = engine.generate(rows, n=1, greedy=True)
    assert after.policy_version == 7 and after.responses != before
    ref = learner.learner.model.generate(**learner.learner.tokenizer([engine.format(r["prompt"]) for r in rows[:1]],
                                                     return_tensors="pt", add_special_tokens=False),
                                 do_sample=False, max_new_tokens=engine.max_new_tokens,
                                 eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)
    assert learner.learner.tokenizer.decode(ref[0], skip_special_tokens=True).endswith(after.responses[0])


def test_grpo_raises_the_reward_it_is_given(tiny_dir):
    """From a random init, GRPO must learn what the reward asks: responses that start with the digit 7."""
    torch.manual_seed(0)
    cfg, algo, learner, engine = _setup(tiny_dir, grpo={"optim": {"lr": 1e-2}}, rollout={"max_new_tokens": 3})

    def starts_with_7(*, prompt, response, answer, truncated):
        return float(response.startswith("7"))

    rows = _rows(8)
    curve = []
    for _ in range(30):
        out = engine.generate(rows, n=8)
        rewards, _ = compute_rewards([("seven", 1.0, starts_with_7)], prompts=out.prompts, responses=out.responses,
                                     answers=out.answers, truncated=out.truncated.tolist())
        learner.train_step(learner.score(algo.make_batch(out, rewards)), ppo_epochs=1, mini_batches=2)
        engine.load_weights(dict(learner.learner.full_parameters()), version=learner.version)
        curve.append(rewards.mean().item())
    assert sum(curve[:3]) / 3 < 0.1 and sum(curve[-3:]) / 3 > 0.8, curve


def test_top_p_mismatch_is_visible_in_rollout_logprobs(tiny_dir):
    """With top-p the sampler renormalises over the nucleus, so its log-probs sit at or above the learner's
    full-distribution log-probs; the algorithm logs the gap as rollout/logprob_abs_diff."""
    torch.manual_seed(2)
    cfg, algo, learner, engine = _setup(tiny_dir, rollout={"top_p": 0.5, "max_new_tokens": 4})
    out = engine.generate(_rows(4), n=4)
    batch = learner.score(algo.make_batch(out, torch.zeros(16)))
    valid = out.response_mask > 0
    assert (out.rollout_logprobs[valid] >= batch.old_logprobs[valid] - 1e-5).all()
    assert (out.rollout_logprobs[valid] - batch.old_logprobs[valid]).max() > 0.01


def _features_batch(algo, learner, engine):
    out = engine.generate(_rows(3), n=4)
    rewards = (torch.arange(12) % 3 == 0).float()
    return algo.filter(algo.make_batch(out, rewards))[0]


def test_thr_scoring_returns_hidden_states_and_group_vocabulary_probabilities(tiny_dir):
    """Only a THR recipe pays for the features; they equal a direct forward pass (last hidden state after the final
    norm, softmax at the sampling temperature gathered at the group's ids) and do not depend on micro-batching."""
    torch.manual_seed(0)
    spec = {"token_shapers": [{"type": "thr"}]}
    _, algo, full, engine = _setup(tiny_dir, micro_batch_size=12, algorithm=spec, rollout={"temperature": 0.7})
    batch = _features_batch(algo, full, engine)
    assert batch.group_vocab is not None and batch.group_vocab.shape[0] == 12
    scored = full.score(batch)
    split = _setup(tiny_dir, micro_batch_size=5, max_tokens=40, algorithm=spec, rollout={"temperature": 0.7})[2]
    again = split.score(batch)
    torch.testing.assert_close(scored.old_hidden, again.old_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.old_vocab_probs, again.old_vocab_probs, atol=1e-6, rtol=0)
    model, T = full.learner.model, batch.response_ids.shape[1]
    for i in (0, 7):
        ids = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i] > 0], batch.response_ids[i]])[None]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][0, -(T + 1):-1]
        probs = torch.softmax(out.logits[0, -(T + 1):-1].double() / 0.7, -1)
        vocab = batch.group_vocab[i]
        n = int(batch.response_mask[i].sum())
        torch.testing.assert_close(scored.old_hidden[i, :n], hidden[:n], atol=1e-4, rtol=0)
        expect = probs[:n][:, vocab.clamp(min=0)] * (vocab >= 0)
        torch.testing.assert_close(scored.old_vocab_probs[i, :n].double(), expect, atol=1e-5, rtol=0)
        assert scored.old_hidden[i, n:].abs().sum() == 0
    shaped, stats = algo.shape(scored)
    assert shaped.old_hidden is None and "thr/selected_frac" in stats
    plain_algo, plain, plain_engine = _setup(tiny_dir)[1:]
    plain_batch = plain.score(_features_batch(plain_algo, plain, plain_engine))
    assert plain_batch.group_vocab is None and plain_batch.old_hidden is None and plain_batch.old_vocab_probs is None


def test_adaptive_temperature_samples_and_scores_each_token_at_its_temperature(tiny_dir):
    """The engine's per-token temperatures are T (1 + tau h) of its own logits under the given statistics; the
    learner's log-probs at those temperatures equal the engine's sampling log-probs; greedy stays greedy."""
    torch.manual_seed(0)
    from tokenwise.rl.hapo import sampling_temperatures
    spec = {"adaptive_temperature": {"tau": 0.4}}
    _, algo, learner, engine = _setup(tiny_dir, algorithm=spec, rollout={"temperature": 0.9})
    assert algo.sampling() is None  # first step: no statistics yet, fixed temperature
    first = engine.generate(_rows(4), n=4, seed=1, adaptive=algo.sampling())
    assert first.temperatures is None
    batch, _ = algo.shape(learner.score(algo.make_batch(first, torch.zeros(16))))
    adaptive = algo.sampling()
    assert adaptive["tau"] == 0.4 and set(adaptive["stats"]) == {"pivot", "rms", "pos_max", "neg_min"}
    out = engine.generate(_rows(4), n=4, seed=2, adaptive=adaptive)
    valid = out.response_mask > 0
    temps = out.temperatures[valid]
    assert temps.min() >= 0.9 * 0.6 - 1e-6 and temps.max() <= 0.9 * 1.4 + 1e-6 and temps.std() > 0.01
    scored = learner.score(algo.make_batch(out, torch.zeros(16)))
    torch.testing.assert_close(scored.old_logprobs[valid], out.rollout_logprobs[valid], atol=2e-5, rtol=0)
    model = learner.learner.model
    for i in (0, 9):  # the recorded temperatures follow from the logits the engine saw
        ids = torch.cat([out.prompt_ids[i][out.prompt_mask[i] > 0], out.response_ids[i]])[None]
        T = out.response_ids.shape[1]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -(T + 1):-1]
        expect = sampling_temperatures(logits, temperature=0.9, tau=0.4, stats=adaptive["stats"])
        n = int(out.response_mask[i].sum())
        # KV-cached decoding vs one full forward differ by ~1e-6 in the logits, which log-entropy amplifies
        torch.testing.assert_close(out.temperatures[i, :n], expect[:n].float(), atol=1e-4, rtol=0)
    greedy = engine.generate(_rows(4), n=1, greedy=True, adaptive=adaptive)
    assert greedy.temperatures is None
    assert greedy.responses == engine.generate(_rows(4), n=1, greedy=True).responses
    state = algo.state_dict()
    fresh = _setup(tiny_dir, algorithm=spec)[1]
    fresh.load_state_dict(state)
    assert fresh.sampling() == adaptive


@pytest.mark.parametrize("algorithm", ["token-mean", "hapo"])
def test_fused_logprobs_give_the_naive_paths_scores_loss_and_update(tiny_dir, algorithm):
    """kernels/logprob_entropy (from the last hidden states and the head, chunked here) against the model's logits:
    the same old/reference log-probs and entropies, loss and weights after an update, per-token temperatures too."""
    torch.manual_seed(0)
    spec = {"kl": {"coef": 0.1}, **ALGOS[algorithm], "adaptive_temperature": {"tau": 0.3}}
    runs = {}
    for impl in ("fused", "naive"):
        _, algo, pool, engine = _setup(tiny_dir, micro_batch_size=3, algorithm=spec, trainer={"logprobs": impl},
                                       rollout={"temperature": 0.8})
        assert pool.learner.fused == (impl == "fused")
        algo.entropy_stats = {"pivot": 0.5, "rms": 0.4, "pos_max": 1.2, "neg_min": -2.0}
        out = engine.generate(_rows(3), n=4, seed=3, adaptive=algo.sampling())
        assert out.temperatures is not None
        batch, _ = algo.shape(pool.score(algo.make_batch(out, torch.arange(12.0) % 3)))
        metrics, _ = pool.train_step(batch, ppo_epochs=1, mini_batches=2)
        runs[impl] = (batch, metrics, [p.detach().clone() for p in pool.learner.model.parameters()])
    (a, ma, wa), (b, mb, wb) = runs["fused"], runs["naive"]
    for name in ("old_logprobs", "old_entropy", "ref_logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0, msg=name)
    assert ma["actor/loss"] == pytest.approx(mb["actor/loss"], abs=1e-5)
    assert ma["actor/entropy"] == pytest.approx(mb["actor/entropy"], abs=1e-5)
    assert ma["actor/grad_norm"] == pytest.approx(mb["actor/grad_norm"], rel=1e-5)
    # Adam moves an element whose gradient is ~0 by up to lr whatever its sign's last bits: allow 5% of one step
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, atol=5e-5, rtol=0)



def _sft_learner(tiny_dir, dtype, lr):
    from tokenwise.trainer.config import OptimConfig
    tok = load_tokenizer(tiny_dir)
    learner = Learner(tiny_dir, tok, optim=OptimConfig(lr=lr, grad_clip=0.0), total_updates=100, device=CPU,
                      dtype=dtype, logprobs="naive")
    return local_pool(learner, micro_batch_size=4), tok


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_debug_mode_trains_fp32_master_weights_like_fp32_training(tiny_dir, seed):
    """One GPU trains a bf16 model (model.dtype: auto). At lr 1e-5 most updates are below half a bf16 step of their
    weight, so AdamW on the bf16 weights themselves would drop them; the fp32 masters keep them and move like fp32
    training does (to what bf16's forward pass changes in the gradients), and the model holds their rounding."""
    from tokenwise.trainer.loading import PromptFormatter
    from tokenwise.trainer.sft import sft_batch
    lr, steps = 1e-5, 3
    deltas = {}
    for dtype in (torch.float32, torch.bfloat16):
        pool, tok = _sft_learner(tiny_dir, dtype, lr)
        start = [p.detach().float().clone() for p in pool.learner.model.parameters()]
        fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
        for step in range(steps):  # 8 rows in micro-batches of 4: gradients accumulate over two backward passes
            pool.sft_step(sft_batch(_rows(8, seed=100 * seed + step), tok, fmt))
        opt = pool.learner.opt
        trained = opt.master if dtype == torch.bfloat16 else list(pool.learner.model.parameters())
        deltas[dtype] = torch.cat([(w.detach().float() - s).flatten() for w, s in zip(trained, start)])
        if dtype == torch.bfloat16:
            assert all(m.dtype == torch.float32 for m in opt.master)
            for p, m in zip(pool.learner.model.parameters(), opt.master):
                assert p.dtype == torch.bfloat16 and torch.equal(p, m.detach().to(torch.bfloat16))
            weights = torch.cat([s.flatten() for s in start])
            half_ulp = weights.abs().clamp_min(1e-30) * 2.0 ** -9  # bf16: 8 bits of mantissa (7 stored)
            assert float((deltas[torch.float32].abs() / steps < half_ulp).float().mean()) > 0.8
    d32, d16 = deltas[torch.float32], deltas[torch.bfloat16]
    assert float(torch.nn.functional.cosine_similarity(d32, d16, dim=0)) > 0.95
    assert 0.9 < float(d16.norm() / d32.norm()) < 1.1


def test_bf16_checkpoint_keeps_the_fp32_masters_for_an_exact_resume(tiny_dir, tmp_path):
    """The model directory holds the masters' bf16 rounding; master_weights.pt holds them whole, so a resumed run
    continues from the same fp32 weights (bitwise) instead of from their rounding."""
    from tokenwise.trainer.loading import PromptFormatter
    from tokenwise.trainer.sft import sft_batch
    straight, tok = _sft_learner(tiny_dir, torch.bfloat16, 1e-4)
    fmt = PromptFormatter(tok, system_prompt=None, use_chat_template=True)
    batches = [sft_batch(_rows(8, seed=step), tok, fmt) for step in range(3)]
    for batch in batches[:2]:
        straight.sft_step(batch)
    (tmp_path / "model").mkdir()
    straight.save(tmp_path)
    assert (tmp_path / "master_weights.pt").exists()
    straight.sft_step(batches[2])
    resumed, _ = _sft_learner(tiny_dir, torch.bfloat16, 1e-4)
    resumed.load(tmp_path)
    resumed.sft_step(batches[2])
    for a, b in zip(straight.learner.opt.master, resumed.learner.opt.master):
        assert torch.equal(a, b)
    rounded = [m.detach().to(torch.bfloat16).float() for m in straight.learner.opt.master]
    assert any(not torch.equal(m.detach(), r) for m, r in zip(straight.learner.opt.master, rounded))


@pytest.mark.parametrize("seed", [0, 1])
def test_rollout_logprobs_are_those_of_the_sampling_distribution_without_storing_scores(tiny_dir, seed):
    """The transformers engine records each sampled token's log-prob under the distribution it was drawn from
    (temperature, top-k, top-p applied) one step at a time, never generate's [B, T, V] output_scores: equal to a
    full forward pass over the sampled sequences put through the same warpers."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(seed)
    cfg, algo, learner, engine = _setup(tiny_dir, rollout={"max_new_tokens": 6, "temperature": 0.7, "top_k": 8,
                                                           "top_p": 0.9})
    calls = []
    real_generate = engine.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs["generation_config"])
        out = real_generate(*args, **kwargs)
        assert getattr(out, "scores", None) is None
        return out
    engine.model.generate = spy
    out = engine.generate(_rows(4, seed=seed), n=3)
    assert calls and not any(g.output_scores for g in calls)
    seqs = torch.cat([out.prompt_ids, out.response_ids], dim=1)
    attention = torch.cat([out.prompt_mask, out.response_mask.long()], dim=1)
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = engine.model(input_ids=seqs, attention_mask=attention, position_ids=position_ids).logits.float()
    P, T = out.prompt_ids.shape[1], out.response_ids.shape[1]
    scores = logits[:, P - 1:P - 1 + T].reshape(-1, logits.shape[-1])
    for warp in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(8), TopPLogitsWarper(0.9)):
        scores = warp(None, scores)
    ref = scores.log_softmax(-1).gather(-1, out.response_ids.reshape(-1, 1)).reshape(out.response_ids.shape)
    valid = out.response_mask > 0
    torch.testing.assert_close(out.rollout_logprobs[valid], ref[valid], atol=1e-4, rtol=0)
    assert (out.rollout_logprobs[~valid] == 0).all()
