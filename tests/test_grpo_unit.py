"""grpo.py's group advantages and clipped loss against loop-computed values on ragged masks, for every variant."""

import math

import pytest
import torch

import grpo

LENGTHS = [3, 1, 5, 2, 4, 5]  # ragged responses; 6 rows = 3 groups of 2 or 2 groups of 3


def ragged_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(LENGTHS)
    width = max(LENGTHS)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in LENGTHS])
    old = -torch.rand(batch, width, generator=g) * 2
    logprobs = old + 0.4 * torch.randn(batch, width, generator=g)  # ratios well outside [0.8, 1.2] for some tokens
    ref = old + 0.3 * torch.randn(batch, width, generator=g)
    advantages = torch.randn(batch, generator=g)
    return logprobs * mask, old * mask, ref * mask, advantages, mask


# ---------------------------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("group_size", [2, 3])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_match_a_loop_over_groups(estimator, group_size):
    scores = torch.tensor([0.5, -1.0, 2.0, 2.0, 0.25, -3.0])
    got = grpo.group_advantages(scores=scores, group_size=group_size, estimator=estimator)
    values = scores.tolist()
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))  # unbiased
        for i, r in enumerate(group):
            if estimator == "grpo":
                want = (r - mean) / (std + 1e-6)
            elif estimator == "dr_grpo":
                want = r - mean
            else:
                others = [x for j, x in enumerate(group) if j != i]
                want = r - sum(others) / len(others)
            assert got[start + i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0])
    # group 1: mean 2, unbiased std √2; group 2: all equal, every advantage 0
    grpo_adv = grpo.group_advantages(scores=scores, group_size=2, estimator="grpo")
    assert grpo_adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0], rel=1e-5)
    # RLOO with G = 2: r_i − r_j = 2 (r_i − mean), twice Dr. GRPO's
    rloo = grpo.group_advantages(scores=scores, group_size=2, estimator="rloo")
    assert rloo.tolist() == pytest.approx([-2.0, 2.0, 0.0, 0.0])
    # RLOO is (G / (G − 1)) × Dr. GRPO's advantage for every G
    scores = torch.tensor([1.0, 4.0, -2.0, 0.5, 0.0, 3.0])
    dr = grpo.group_advantages(scores=scores, group_size=3, estimator="dr_grpo")
    rloo = grpo.group_advantages(scores=scores, group_size=3, estimator="rloo")
    torch.testing.assert_close(rloo, dr * 3 / 2)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=4, estimator="grpo")
    with pytest.raises(ValueError, match="groups of 1"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=1, estimator="grpo")
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        grpo.group_advantages(scores=torch.zeros(6), group_size=2, estimator="gae")


# ---------------------------------------------------------------------------------------------- grpo_loss
def loop_loss(logprobs, old, ref, advantages, mask, *, low, high, aggregation, importance, max_tokens, kl_coef):
    """The loss, its KL term and its clip fractions, by Python loops over responses and tokens."""
    batch = len(LENGTHS)
    per_response = []
    all_tokens = []
    all_kl = []
    clipped = []
    for i in range(batch):
        n = LENGTHS[i]
        a = advantages[i].item()
        tokens = []
        kls = []
        log_ratios = []
        for t in range(n):
            log_ratio = logprobs[i, t].item() - old[i, t].item()
            log_ratios.append(log_ratio)
            rho = math.exp(log_ratio)
            tokens.append(-min(rho * a, min(max(rho, 1 - low), 1 + high) * a))
            clipped.append((rho < 1 - low and a < 0) or (rho > 1 + high and a > 0))
            d = ref[i, t].item() - logprobs[i, t].item()
            kls.append(math.exp(d) - d - 1)
        if importance == "sequence":
            s = math.exp(sum(log_ratios) / n)
            per_response.append(-min(s * a, min(max(s, 1 - low), 1 + high) * a))
        all_tokens.append(tokens)
        all_kl.append(kls)

    def reduce(rows):
        if aggregation == "sequence_mean":
            return sum(sum(r) / len(r) for r in rows) / batch
        if aggregation == "token_mean":
            return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / (batch * max_tokens)

    if importance == "sequence":
        policy = sum(per_response) / batch
        s_values = [
            math.exp(sum(logprobs[i, : LENGTHS[i]] - old[i, : LENGTHS[i]]).item() / LENGTHS[i]) for i in range(batch)
        ]
        a = advantages.tolist()
        clipped = [(s < 1 - low and x < 0) or (s > 1 + high and x > 0) for s, x in zip(s_values, a)]
    else:
        policy = reduce(all_tokens)
    kl = reduce(all_kl)
    return policy, kl, sum(clipped) / len(clipped)


VARIANTS = [
    dict(aggregation="sequence_mean", importance="token", low=0.2, high=0.2, kl_coef=0.04),
    dict(aggregation="token_mean", importance="token", low=0.2, high=0.28, kl_coef=0.0),
    dict(aggregation="constant", importance="token", low=0.1, high=0.3, kl_coef=0.1),
    dict(aggregation="sequence_mean", importance="sequence", low=0.05, high=0.05, kl_coef=0.04),
    dict(aggregation="token_mean", importance="sequence", low=0.02, high=0.04, kl_coef=0.0),
    dict(aggregation="constant", importance="sequence", low=0.05, high=0.1, kl_coef=0.2),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['aggregation']}-{v['importance']}-kl{v['kl_coef']}")
def test_grpo_loss_matches_loops_on_ragged_masks(variant):
    logprobs, old, ref, advantages, mask = ragged_inputs()
    max_tokens = 7
    with_ref = variant["kl_coef"] > 0
    terms = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        response_mask=mask,
        cliprange_low=variant["low"],
        cliprange_high=variant["high"],
        aggregation=variant["aggregation"],
        importance=variant["importance"],
        max_tokens=max_tokens,
        ref_logprobs=ref if with_ref else None,
        kl_coef=variant["kl_coef"],
    )
    policy, kl, clipfrac = loop_loss(logprobs, old, ref, advantages, mask, max_tokens=max_tokens, **variant)
    assert terms.policy_loss.item() == pytest.approx(policy, rel=1e-5, abs=1e-6)
    assert terms.clipfrac.item() == pytest.approx(clipfrac, abs=1e-6)
    assert terms.clipfrac.item() == pytest.approx(terms.clipfrac_low.item() + terms.clipfrac_high.item())
    if with_ref:
        assert terms.kl_loss.item() == pytest.approx(kl, rel=1e-5)
        assert terms.loss.item() == pytest.approx(policy + variant["kl_coef"] * kl, rel=1e-5, abs=1e-6)
    else:
        assert terms.kl_loss is None
        assert terms.loss.item() == pytest.approx(policy, rel=1e-5, abs=1e-6)
    assert 0 < terms.clipfrac.item() < 1 or variant["importance"] == "sequence"  # the clip binds somewhere


def test_padding_does_not_change_the_loss():
    logprobs, old, ref, advantages, mask = ragged_inputs()
    noise = torch.randn_like(logprobs) * (1 - mask) * 5
    for importance in ("token", "sequence"):
        for aggregation in ("sequence_mean", "token_mean", "constant"):
            kwargs = dict(
                old_logprobs=old,
                advantages=advantages,
                response_mask=mask,
                cliprange_low=0.2,
                cliprange_high=0.28,
                aggregation=aggregation,
                importance=importance,
                max_tokens=5,
                ref_logprobs=ref,
                kl_coef=0.1,
            )
            clean = grpo.grpo_loss(logprobs=logprobs, **kwargs)
            padded = grpo.grpo_loss(logprobs=logprobs + noise, **kwargs)
            torch.testing.assert_close(clean.loss, padded.loss)


def test_on_policy_gradient_is_the_advantage_weighted_score_function():
    """With π_θ = π_old (one epoch, one step) the ratio is 1, the clip never binds, and the gradient of the token-level
    loss with `sequence_mean` is −1/B Σ_i Â_i / |y_i| Σ_t ∇ log π(y_t)."""
    _, old, _, advantages, mask = ragged_inputs()
    logprobs = old.clone().requires_grad_(True)
    terms = grpo.grpo_loss(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        response_mask=mask,
        cliprange_low=0.2,
        cliprange_high=0.2,
        aggregation="sequence_mean",
    )
    terms.loss.backward()
    lengths = mask.sum(1, keepdim=True)
    want = -advantages[:, None] / lengths / len(LENGTHS) * mask
    torch.testing.assert_close(logprobs.grad, want)
    assert terms.clipfrac.item() == 0
    assert terms.approx_kl.item() == 0


def test_grpo_loss_rejects_unknown_names():
    logprobs, old, _, advantages, mask = ragged_inputs()
    kwargs = dict(logprobs=logprobs, old_logprobs=old, advantages=advantages, response_mask=mask)
    with pytest.raises(ValueError, match="unknown aggregation"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="sum")
    with pytest.raises(ValueError, match="unknown importance"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="token_mean", importance="x")
    with pytest.raises(ValueError, match="needs max_tokens"):
        grpo.grpo_loss(**kwargs, cliprange_low=0.2, cliprange_high=0.2, aggregation="constant")


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment with L_max = 12, L_cache = 4: 0 up to 8 tokens, then −1/4 per token, −1 at 12
    and beyond."""
    lengths = torch.tensor([1.0, 8.0, 9.0, 10.0, 12.0, 14.0])
    got = grpo.overlong_penalty(lengths=lengths, max_tokens=12, buffer=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
