"""Hand-computed checks of the RL pieces (rl/ is pure torch)."""

import math

import pytest
import torch

from conftest import rollout_batch
from tokenwise.rl.advantages import grpo
from tokenwise.rl.algorithm import Algorithm
from tokenwise.rl.errors import RewardError
from tokenwise.rl.losses import k3, ppo_clip, token_mean
from tokenwise.rl.rewards import compute_rewards, exact_answer, extract_answer, format_reward, load_function
from tokenwise.rl.types import TrainBatch
from tokenwise.trainer.config import config_from_dict

S3 = 1 / math.sqrt(3)  # 0.5773503


def test_grpo_advantage_hand_computed():
    # group 1: rewards 1,0,0 -> mean 1/3, unbiased std sqrt(1/3) -> A = 2/sqrt(3), -1/sqrt(3), -1/sqrt(3)
    # group 2: rewards .5,1,0 -> mean .5, unbiased std .5 -> A = 0, 1, -1
    adv = grpo(torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 0.0]), 3, eps=1e-6)
    expected = torch.tensor([2 * S3, -S3, -S3, 0.0, 1.0, -1.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_grpo_equal_rewards_give_zero_and_group_of_one_gives_reward():
    assert torch.equal(grpo(torch.tensor([0.7, 0.7, 0.7]), 3), torch.zeros(3))
    assert torch.equal(grpo(torch.tensor([0.3, -2.0]), 1), torch.tensor([0.3, -2.0]))


def _reference_advantages(name: str, r: list[float], lengths: list[float]) -> list[float]:
    """The estimators written out in Python floats (float64), one group."""
    G, mean = len(r), sum(r) / len(r)
    if name == "grpo":
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (G - 1))
        return [(x - mean) / (std + 1e-6) for x in r]
    if name == "dr_grpo":
        return [x - mean for x in r]
    if name == "rloo":
        return [x - (sum(r) - x) / (G - 1) for x in r]
    n = sum(lengths)  # hapo: every token carries its response's reward
    mu = sum(x * w for x, w in zip(r, lengths)) / n
    sigma = math.sqrt(sum((x - mu) ** 2 * w for x, w in zip(r, lengths)) / n)
    return [(x - mu) / (sigma + 1e-6) for x in r]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "hapo"])
@pytest.mark.parametrize("G", [2, 4, 8, 16])
def test_all_equal_groups_get_exactly_zero_advantage_in_float32(name, G):
    """Exact group statistics (ALGORITHMS.md §11): a float32 batch mixing all-equal groups (the quick start's reward
    values 1.0·exact + 0.1·format, and k/100) with unequal ones. All-equal groups get A == 0 exactly (float32
    rounding of the mean used to leave e.g. -0.0074 or ±0.1), the others match a float64 reference."""
    from tokenwise.rl.advantages import ADVANTAGES, informative_groups
    g = torch.Generator().manual_seed(G)
    equal = [0.0, 0.1, 1.0, 1.1, 1.2] + [k / 100 for k in range(1, 300, 7)]
    groups = [[v] * G for v in equal]
    for _ in range(20):
        groups.append([[0.0, 0.1, 1.0, 1.1][int(i)] for i in torch.randint(0, 4, (G,), generator=g)])
        groups.append([int(k) / 100 for k in torch.randint(0, 300, (G,), generator=g)])
    rewards = torch.tensor([x for grp in groups for x in grp], dtype=torch.float32)
    lengths = torch.randint(1, 9, (len(rewards),), generator=g).float()
    kwargs = {"lengths_B": lengths} if name == "hapo" else {}
    adv = ADVANTAGES.get(name)(rewards, G, **kwargs)
    assert adv.dtype == torch.float32
    live = informative_groups(rewards, G)
    for i, grp in enumerate(groups):
        a = adv[i * G:(i + 1) * G]
        r32 = rewards[i * G:(i + 1) * G].double().tolist()  # the float32 rewards, read exactly
        if len(set(r32)) == 1:
            assert not live[i] and torch.equal(a, torch.zeros(G)), (grp, a)
        else:
            assert live[i]
            ref = _reference_advantages(name, r32, lengths[i * G:(i + 1) * G].tolist())
            if name == "hapo" and max(map(abs, ref)) >= 5.0:  # hapo's fallback to GRPO
                ref = _reference_advantages("grpo", r32, [])
            torch.testing.assert_close(a.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def _pass_at_k_brute_force(correct: list[bool], k: int) -> float:
    """The probability that a random k-subset of the samples holds a correct one, by enumerating every subset."""
    import itertools
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_and_hand_values():
    from tokenwise.trainer.evaluate import pass_at_k, pass_ks
    # hand values: n=4, c=1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-15)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 4) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    g = torch.Generator().manual_seed(0)
    for n in range(1, 11):
        for _ in range(3):
            correct = (torch.rand(n, generator=g) < 0.4).tolist()
            for k in range(1, n + 1):
                assert pass_at_k(n, sum(correct), k) == pytest.approx(_pass_at_k_brute_force(correct, k), abs=1e-12)
    assert pass_ks(8) == [2, 4, 8] and pass_ks(6) == [2, 4, 6] and pass_ks(1) == [1]
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_sampled_metrics_average_the_estimator_over_prompts():
    """mean@k and pass@j from an engine whose samples are given: two prompts, k = 4, correct 1 of 4 and 4 of 4."""
    from types import SimpleNamespace
    from tokenwise.trainer.evaluate import sampled_metrics
    responses = ["5", "7", "8", "9", "3", "3", "3", "3"]

    class Engine:
        def generate(self, rows, *, n, seed, temperature):
            assert n == 4 and seed == 11 and temperature == 0.7
            return SimpleNamespace(prompts=["a"] * 8, responses=responses, answers=["5"] * 4 + ["3"] * 4,
                                   truncated=[False] * 8)
    m = sampled_metrics(Engine(), [{}, {}], k=4, temperature=0.7, seed=11)
    assert m == {"eval/mean@4": pytest.approx(5 / 8), "eval/pass@2": pytest.approx((0.5 + 1) / 2),
                 "eval/pass@4": pytest.approx(1.0)}


def test_ppo_clip_hand_computed():
    ratio = torch.tensor([[1.5, 0.5, 1.0, 5.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, stats = ppo_clip(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.2)
    # max(-A r, -A clip(r)): max(-1.5,-1.2)=-1.2; max(.5,.8)=.8; -2; max(5, 1.2)=5
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -2.0, 5.0]]), atol=1e-6, rtol=0)
    assert stats["actor/clipfrac_high"].item() == 1  # r=1.5 with A>0
    assert stats["actor/clipfrac_low"].item() == 1   # r=0.5 with A<0
    dual, _ = ppo_clip(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    torch.testing.assert_close(dual, torch.tensor([[-1.2, 0.8, -2.0, 3.0]]), atol=1e-6, rtol=0)


def test_k3_hand_computed_and_nonnegative():
    d = torch.tensor([math.log(2.0), 0.0, -math.log(2.0)])
    # exp(-d) - 1 + d: 0.5 - 1 + ln2 = 0.19315; 0; 2 - 1 - ln2 = 0.30685
    torch.testing.assert_close(k3(d, torch.zeros(3)), torch.tensor([0.1931472, 0.0, 0.3068528]), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 5
    assert (k3(x, torch.zeros(1000)) >= 0).all()


def test_token_mean_uses_given_count():
    loss = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert token_mean(loss, mask, num_tokens=3).item() == pytest.approx(2.0)
    assert token_mean(loss, mask, num_tokens=6).item() == pytest.approx(1.0)


def test_dr_grpo_and_rloo_hand_computed():
    from tokenwise.rl.advantages import dr_grpo, rloo
    r = torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 0.0])
    # Dr. GRPO: minus the group mean (1/3 and 1/2), no std
    torch.testing.assert_close(dr_grpo(r, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.5, -0.5]))
    # RLOO: minus the mean of the OTHER two rewards
    torch.testing.assert_close(rloo(r, 3), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.75, -0.75]))
    # RLOO = G/(G-1) x Dr. GRPO on random rewards; a group of one keeps R
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo(x, 8), dr_grpo(x, 8) * 8 / 7, atol=1e-6, rtol=0)
    assert torch.equal(rloo(r, 1), r) and torch.equal(dr_grpo(r, 1), r)


def test_kl_estimators_hand_computed_and_k3_plus_has_k2_gradient():
    from tokenwise.rl.losses import k1, k2, k3_plus
    d = torch.tensor([math.log(2.0), 0.0, -math.log(2.0)])
    ref = torch.zeros(3)
    torch.testing.assert_close(k1(d, ref), torch.tensor([0.6931472, 0.0, -0.6931472]))
    torch.testing.assert_close(k2(d, ref), torch.tensor([0.2402265, 0.0, 0.2402265]))
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(500, generator=g) * 3).requires_grad_(True)
    ref = torch.randn(500, generator=g) * 3
    plus = k3_plus(logp, ref)
    torch.testing.assert_close(plus.detach(), k3(logp.detach(), ref))  # value of k3 ...
    (grad_plus,) = torch.autograd.grad(plus.sum(), logp)
    (grad_k2,) = torch.autograd.grad(k2(logp, ref).sum(), logp)
    torch.testing.assert_close(grad_plus, grad_k2)                      # ... gradient of k2
    assert (plus >= 0).all()


def test_aggregations_hand_computed():
    from tokenwise.rl.losses import AGGREGATIONS
    loss = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    agg = {name: AGGREGATIONS.get(name) for name in AGGREGATIONS.names()}
    counts = {"num_tokens": 3, "num_seqs": 2, "max_len": 4}
    assert agg["token-mean"](loss, mask, **counts).item() == pytest.approx(2.0)            # (1+2+3)/3
    assert agg["seq-mean-token-mean"](loss, mask, **counts).item() == pytest.approx(2.25)  # (1.5+3)/2
    assert agg["seq-mean-token-sum"](loss, mask, **counts).item() == pytest.approx(3.0)    # (3+3)/2
    assert agg["seq-mean-token-sum-norm"](loss, mask, **counts).item() == pytest.approx(0.75)  # 6/(4*2)
    # the counts are the mini-batch's: the same rows inside a 4-response mini-batch contribute half
    assert agg["seq-mean-token-mean"](loss, mask, num_tokens=6, num_seqs=4).item() == pytest.approx(1.125)
    with pytest.raises(ValueError, match="max_len"):
        agg["seq-mean-token-sum-norm"](loss, mask, num_tokens=3, num_seqs=2)


def test_grpo_step_loss_and_gradient_on_2x3_batch():
    """2 prompts x 3 samples, rewards [1,0,0 | .5,1,0], lengths [1,2,3 | 2,1,3], ratio 1, no KL.
    token-mean loss = -sum_i A_i len_i / 12 = -(2/sqrt3 - 2/sqrt3 - 3/sqrt3 + 0 + 1 - 3) / 12 = 0.3110042,
    and d loss / d logp_(i,t) = -A_i / 12 on valid tokens."""
    algo = Algorithm(config_from_dict({}).algorithm)
    rollouts = rollout_batch([1, 2, 3, 2, 1, 3], group_size=3)
    batch = algo.make_batch(rollouts, torch.tensor([1.0, 0.0, 0.0, 0.5, 1.0, 0.0]))
    logp = torch.full((6, 3), -0.7, requires_grad=True)
    batch.old_logprobs = logp.detach().clone()
    loss, stats = algo.loss(logp, torch.zeros(6, 3), batch, num_tokens=12)
    assert loss.item() == pytest.approx(0.3110042, abs=1e-6)
    loss.backward()
    adv = torch.tensor([2 * S3, -S3, -S3, 0.0, 1.0, -1.0])
    torch.testing.assert_close(logp.grad, -adv[:, None] / 12 * rollouts.response_mask, atol=1e-6, rtol=0)
    assert stats["actor/ratio_mean"].item() == pytest.approx(12.0)


def test_kl_term_joins_the_loss_with_its_coefficient():
    algo = Algorithm(config_from_dict({"algorithm": {"kl": {"coef": 0.5}}}).algorithm)
    batch = algo.make_batch(rollout_batch([1, 1], group_size=2), torch.tensor([1.0, 1.0]))  # A = 0
    batch.old_logprobs = torch.zeros(2, 1)
    batch.ref_logprobs = torch.full((2, 1), -math.log(2.0))  # d = ln 2 -> k3 = 0.1931472
    loss, stats = algo.loss(torch.zeros(2, 1), torch.zeros(2, 1), batch, num_tokens=2)
    assert loss.item() == pytest.approx(0.5 * 0.1931472, abs=1e-6)
    assert stats["actor/kl"].item() == pytest.approx(2 * 0.1931472, abs=1e-6)


@pytest.mark.parametrize("text, answer", [
    ("46", "46"), ("The answer is 1,234.", "1234"), ("so #### 42\nmore", "42"), ("\\boxed{-7} done", "-7"),
    ("x = 3.0", "3"), ("no number here", None), ("#### ", None), ("-12", "-12"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_exact_and_format_rewards():
    assert exact_answer(prompt="1+1=", response="2", answer="2", truncated=False) == 1.0
    assert exact_answer(prompt="1+1=", response="3", answer="2", truncated=False) == 0.0
    assert exact_answer(prompt="q", response="#### 1,000", answer="1000", truncated=True) == 1.0
    assert format_reward(prompt="q", response="12", answer="1", truncated=False) == 1.0
    assert format_reward(prompt="q", response="12", answer="1", truncated=True) == 0.0
    assert format_reward(prompt="q", response="abc", answer="1", truncated=False) == 0.0


@pytest.mark.parametrize("response, answer, math, exact", [
    ("The answer is $\\frac{1}{2}$.", "0.5", 1.0, 0.0),                  # LaTeX fraction vs decimal
    ("so \\boxed{\\frac{3}{4}}", "3/4", 1.0, 0.0),                          # boxed fraction vs plain fraction
    ("\\boxed{\\dfrac{6}{8}}", "\\frac{3}{4}", 1.0, 0.0),                   # unreduced, \\dfrac
    ("We get $x = 2\\sqrt{2}$", "\\sqrt{8}", 1.0, 0.0),                      # equivalent expressions
    ("\\boxed{50\\%}", "0.5", 1.0, 0.0),                                     # percent
    ("\\boxed{5\\text{ cm}}", "5", 1.0, 1.0),                                # units dropped
    ("\\boxed{10^{\\circ}}", "10", 1.0, 1.0),                                # degrees (exact: the last number)
    ("#### 1,000", "1000", 1.0, 1.0),                                        # both read this
    ("\\boxed{3}", "4", 0.0, 0.0),                                          # wrong
    ("$\\frac{1}{3}$", "0.33", 0.0, 0.0),                                   # not equal, only close
    ("I don't know", "3", 0.0, 0.0),                                         # no answer
])
def test_math_verify_reward_against_exact_answer(response, answer, math, exact):
    """math_verify (Hugging Face's verifier) accepts mathematically equal answers that exact_answer's string match
    rejects, and still rejects wrong or merely close ones."""
    from tokenwise.rl.rewards import REWARDS
    item = dict(prompt="q", response=response, answer=answer, truncated=False)
    assert REWARDS.get("math_verify")(**item) == math
    assert exact_answer(**item) == exact


def test_math_verify_reward_works_off_the_main_thread():
    """math-verify times its parser with SIGALRM, which only the main thread may set: elsewhere (a reward thread)
    the reward runs without that timeout instead of raising."""
    import threading
    from tokenwise.rl.rewards import REWARDS
    out = []
    t = threading.Thread(target=lambda: out.append(REWARDS.get("math_verify")(
        prompt="q", response="\\boxed{\\frac{1}{2}}", answer="0.5", truncated=False)))
    t.start()
    t.join()
    assert out == [1.0]


def test_compute_rewards_weights_and_means():
    specs = [("exact_answer", 1.0, exact_answer), ("format", 0.1, format_reward)]
    total, means = compute_rewards(specs, prompts=["a", "b"], responses=["2", "x"], answers=["2", "3"],
                                   truncated=[False, False])
    torch.testing.assert_close(total, torch.tensor([1.1, 0.0]))
    assert means == {"reward/exact_answer": 0.5, "reward/format": 0.5}


def test_a_raising_reward_names_itself_and_the_prompt():
    def broken(*, prompt, response, answer, truncated):
        return 1 / 0

    with pytest.raises(RewardError) as e:
        compute_rewards([("broken", 1.0, broken)], prompts=["7+8="], responses=["15\nx"], answers=["15"],
                        truncated=[False])
    msg = str(e.value)
    assert "reward 'broken'" in msg and "ZeroDivisionError" in msg and "'7+8='" in msg and "\n" not in msg


def test_load_function_from_file_and_module(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def fn(*, prompt, response, answer, truncated):\n    return float(len(response))\n")
    fn = load_function(f"{f}:fn", what="rewards[0].function")
    assert fn(prompt="", response="abc", answer="", truncated=False) == 3.0
    assert load_function("tokenwise.rl.rewards:exact_answer", what="x") is exact_answer
    with pytest.raises(RewardError, match=r"rewards\[0\].function: cannot load"):
        load_function(f"{tmp_path}/missing.py:fn", what="rewards[0].function")
    with pytest.raises(RewardError, match="AttributeError"):
        load_function(f"{f}:nope", what="rewards[0].function")


def test_gspo_hand_computed_loss_and_gradient():
    from tokenwise.rl.losses import gspo
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.3, 9.0], [0.1, 0.3, 9.0]], requires_grad=True)  # third token is padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0], [-1.0]]) * mask
    loss, stats = gspo(logp, old, adv, mask, clip_low=3e-4, clip_high=4e-4)
    s = math.exp(0.2)  # exp(mean(0.1, 0.3)) = 1.2214
    # A>0: max(-s, -1.0004) = -1.0004 (clipped, no gradient); A<0: max(s, 1.0004) = s (gradient s/2 per token)
    torch.testing.assert_close(loss[:, 0], torch.tensor([-1.0004, s]))
    assert torch.equal(loss[:, 0], loss[:, 1])  # one value per response, broadcast
    (loss[:, :1].sum()).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s / 2, s / 2, 0.0]]))
    assert stats["actor/clipfrac_high"].item() == 2  # both tokens of the clipped A>0 response


def test_gspo_token_with_uniform_token_ratios_equals_ppo_clip():
    from tokenwise.rl.losses import gspo_token
    g = torch.Generator().manual_seed(3)
    old = torch.randn(4, 5, generator=g)
    c = torch.tensor([[0.3], [-0.2], [1e-4], [-1e-4]])  # the same log-ratio on every token of a response
    adv = torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5)
    lp1 = (old + c).requires_grad_(True)
    lp2 = (old + c).requires_grad_(True)
    l1, _ = gspo_token(lp1, old, adv, mask, clip_low=0.2, clip_high=0.2)
    l2, _ = ppo_clip(lp2, old, adv, mask, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(l1, l2)
    l1.sum().backward()
    l2.sum().backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)


def test_overlong_penalty_hand_computed():
    from tokenwise.rl.shaping import overlong_penalty
    lengths = torch.tensor([3, 4, 5, 8, 8])
    truncated = torch.tensor([False, False, False, False, True])
    # L = 8, Lc = 4: free up to 4 tokens, then (4 - |y|)/4, truncated -> -1
    torch.testing.assert_close(overlong_penalty(lengths, truncated, max_len=8, buffer=4, factor=1.0),
                               torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0]))


def _scored(entropies, lengths):
    batch = TrainBatch.from_rollouts(rollout_batch(lengths, group_size=len(lengths)))
    ent = torch.zeros(batch.response_mask.shape)
    ent[batch.response_mask > 0] = torch.tensor(entropies)
    batch.old_entropy = ent
    return batch


def test_forking_tokens_keep_the_top_rho_fraction():
    from tokenwise.rl.shaping import forking_tokens
    batch = _scored([0.5, 2.0, 1.0, 2.0, 0.1], [2, 3])  # row 0: 0.5 2.0 | row 1: 1.0 2.0 0.1
    out, stats = forking_tokens(batch, rho=0.4)       # ceil(0.4 * 5) = 2: the two 2.0 tokens
    assert out.pg_mask.tolist() == [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]
    out, stats = forking_tokens(batch, rho=0.5)       # ceil(2.5) = 3: add the 1.0
    assert out.pg_mask.tolist() == [[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    assert stats["shaping/forking_kept_frac"] == pytest.approx(0.6) and stats["shaping/forking_entropy_threshold"] == 1.0
    g = torch.Generator().manual_seed(0)
    for rho in (0.05, 0.2, 0.33, 1.0):
        lengths = torch.randint(1, 9, (16,), generator=g).tolist()
        b = _scored(torch.rand(sum(lengths), generator=g).tolist(), lengths)
        kept = forking_tokens(b, rho=rho)[0].pg_mask
        assert int(kept.sum()) == math.ceil(rho * sum(lengths)) and not (kept * (1 - b.response_mask)).any()


def test_pg_mask_and_entropy_bonus_in_the_loss():
    """Masked tokens lose their policy-gradient term but still count in the denominator; the entropy bonus subtracts
    coef x aggregated entropy."""
    algo = Algorithm(config_from_dict({"algorithm": {"entropy_coef": 0.1}}).algorithm)
    batch = algo.make_batch(rollout_batch([2, 2], group_size=2), torch.tensor([1.0, 0.0]))  # A = +-1/sqrt2
    logp = torch.zeros(2, 2, requires_grad=True)
    batch.old_logprobs = torch.zeros(2, 2)
    batch.pg_mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    ent = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss, stats = algo.loss(logp, ent, batch, num_tokens=4)
    a = 1 / math.sqrt(2) / (1 + 1e-6 * math.sqrt(2))  # (1 - 0.5) / (std 0.7071 + 1e-6)
    assert loss.item() == pytest.approx(-a / 4 - 0.1 * 10 / 4, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-a / 4, 0.0], [0.0, 0.0]]))
    assert stats["actor/pg_token_frac"].item() == 1.0


def test_kl_in_reward_reshapes_advantages_and_leaves_the_loss():
    algo = Algorithm(config_from_dict({"algorithm": {"kl": {"coef": 0.5, "placement": "reward"}}}).algorithm)
    batch = algo.make_batch(rollout_batch([1, 2], group_size=2), torch.tensor([1.0, 1.0]))  # equal rewards: A = 0
    assert not batch.advantages.any()
    batch.old_logprobs = torch.zeros(2, 2)
    batch.ref_logprobs = torch.full((2, 2), -math.log(2.0))  # k3 = 0.1931472 per token
    shaped, stats = algo.shape(batch)
    # rewards 1 - 0.5 x (1 or 2 tokens x 0.1931472) -> the shorter response now wins: A = +-1/sqrt2 (GRPO)
    torch.testing.assert_close(shaped.rewards, torch.tensor([1 - 0.0965736, 1 - 0.1931472]))
    torch.testing.assert_close(shaped.advantages, torch.tensor([[0.7071, 0.0], [-0.7071, -0.7071]]), atol=1e-4, rtol=0)
    assert stats["actor/kl_in_reward"] == pytest.approx(0.1448604, abs=1e-6)
    loss, loss_stats = algo.loss(torch.zeros(2, 2), torch.zeros(2, 2), shaped, num_tokens=3)
    assert "actor/kl" not in loss_stats  # no KL term in the loss


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_quantile_equals_torch_quantile(n):
    from tokenwise.rl.stats import quantile
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    if n > 10:
        x[:n // 5] = x[0]  # ties
    qs = [0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 1.0]
    assert torch.allclose(quantile(x, qs), torch.quantile(x, torch.tensor(qs, dtype=torch.float64)), rtol=0, atol=1e-12)
    assert float(quantile(x, 0.8)) == pytest.approx(float(torch.quantile(x, 0.8)), abs=1e-12)
    with pytest.raises(ValueError):
        quantile(x, 1.5)


def test_quantile_beyond_torch_quantile_size_limit():
    from tokenwise.rl.stats import quantile
    n = 2 ** 24 + 3
    x = torch.arange(n, dtype=torch.float32).flip(0)  # n-1 … 0
    with pytest.raises(RuntimeError):
        torch.quantile(x, 0.5)  # what the step-wide entropy percentiles hit before
    assert float(quantile(x, 0.5)) == (n - 1) / 2 and float(quantile(x, 0.9)) == pytest.approx(0.9 * (n - 1), rel=1e-6)
