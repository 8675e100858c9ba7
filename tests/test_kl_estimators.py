"""The per-token KL estimators k1, k2, k3 (Schulman, "Approximating KL Divergence") of ppo.py, apa.py and awr.py:
each script's kl_estimate against the formulas token by token on a ragged mask, k1 and k3 unbiased on samples of
two small categorical distributions, the three scripts' functions equal; PPO's --kl-in-loss term against a hand
computation; and tiny end-to-end runs that log rollout/kl_k1..k3."""

import math

import pytest
import torch
from conftest import TINY_ONLINE, error_line, read_run, run_pairs

import apa
import awr
import ppo

MODULES = [ppo, apa, awr]
ESTIMATORS = ["k1", "k2", "k3"]
LENGTHS = [5, 2, 0, 4]  # a ragged batch, one response empty
WIDTH = 5


def ragged_case(seed=0):
    """(logprobs, ref_logprobs, mask) of a ragged batch in float64; padding holds values far from 0, so an estimate
    that read it would show."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(len(LENGTHS), WIDTH, generator=g, dtype=torch.float64) * 3
    ref_logprobs = -torch.rand(len(LENGTHS), WIDTH, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logprobs = torch.where(mask.bool(), logprobs, torch.full_like(logprobs, -40.0))
    ref_logprobs = torch.where(mask.bool(), ref_logprobs, torch.full_like(ref_logprobs, 5.0))
    return logprobs, ref_logprobs, mask


def by_hand(logprob, ref_logprob, estimator):
    """One token's estimate, from the note's formulas with r = log π_ref − log π."""
    r = ref_logprob - logprob
    return {"k1": -r, "k2": 0.5 * r * r, "k3": (math.exp(r) - 1) - r}[estimator]


def estimate(module, logprobs, ref_logprobs, mask, estimator):
    return module.kl_estimate(logprobs=logprobs, ref_logprobs=ref_logprobs, response_mask=mask, estimator=estimator)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_estimate_matches_the_formulas_token_by_token(module, estimator):
    logprobs, ref_logprobs, mask = ragged_case()
    got = estimate(module, logprobs, ref_logprobs, mask, estimator)
    assert got.shape == logprobs.shape
    for i, n in enumerate(LENGTHS):
        for t in range(WIDTH):
            expected = by_hand(logprobs[i, t].item(), ref_logprobs[i, t].item(), estimator) if t < n else 0.0
            assert got[i, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (i, t)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_k2_and_k3_are_never_negative_and_k1_is_minus_the_log_ratio(module):
    g = torch.Generator().manual_seed(1)
    logprobs = torch.randn(64, 16, generator=g, dtype=torch.float64) * 4
    ref_logprobs = torch.randn(64, 16, generator=g, dtype=torch.float64) * 4
    mask = torch.ones_like(logprobs)
    assert (estimate(module, logprobs, ref_logprobs, mask, "k2") >= 0).all()
    assert (estimate(module, logprobs, ref_logprobs, mask, "k3") >= 0).all()
    assert torch.equal(estimate(module, logprobs, ref_logprobs, mask, "k1"), logprobs - ref_logprobs)
    assert (estimate(module, logprobs, logprobs, mask, "k3") == 0).all()  # π = π_ref: every estimate is 0


def test_the_three_scripts_compute_the_same_estimates():
    logprobs, ref_logprobs, mask = ragged_case(seed=2)
    for estimator in ESTIMATORS:
        first = estimate(ppo, logprobs, ref_logprobs, mask, estimator)
        for module in (apa, awr):
            assert torch.equal(estimate(module, logprobs, ref_logprobs, mask, estimator), first), module.__name__


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_unknown_estimator_is_refused(module):
    logprobs, ref_logprobs, mask = ragged_case()
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        estimate(module, logprobs, ref_logprobs, mask, "k4")


def test_k1_and_k3_are_unbiased_and_k3_varies_less_on_close_distributions():
    """Tokens sampled from π (one categorical distribution), scored under π and π_ref (another, close to it): the
    means of k1 and k3 approach the exact KL(π ‖ π_ref) within a few standard errors of the mean; k2's stays at or
    above 0; k3's spread is below k1's (Schulman's point for close distributions)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    policy = torch.log_softmax(logits, 0)
    reference = torch.log_softmax(logits + 0.3 * torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (policy.exp() * (policy - reference)).sum().item()
    tokens = torch.multinomial(policy.exp(), 200_000, replacement=True, generator=g)
    logprobs = policy[tokens][None]
    ref_logprobs = reference[tokens][None]
    mask = torch.ones_like(logprobs)
    spread = {}
    for estimator in ("k1", "k3"):
        samples = ppo.kl_estimate(
            logprobs=logprobs, ref_logprobs=ref_logprobs, response_mask=mask, estimator=estimator
        ).flatten()
        standard_error = samples.std().item() / math.sqrt(samples.numel())
        assert abs(samples.mean().item() - exact) < 5 * standard_error, (estimator, samples.mean().item(), exact)
        spread[estimator] = samples.std().item()
    assert spread["k3"] < spread["k1"]
    k2 = ppo.kl_estimate(logprobs=logprobs, ref_logprobs=ref_logprobs, response_mask=mask, estimator="k2")
    assert k2.mean().item() >= 0


# ------------------------------------------------------------------------------------------------------------
# PPO: the KL term in the loss (--kl-in-loss)
# ------------------------------------------------------------------------------------------------------------
def ppo_terms(logprobs, old_logprobs, mask, **kl_in_loss):
    zeros = torch.zeros_like(old_logprobs)
    return ppo.ppo_loss(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        values=zeros,
        old_values=zeros,
        advantages=torch.ones_like(old_logprobs),
        returns=zeros,
        response_mask=mask,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.5,
        **kl_in_loss,
    )


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_ppo_kl_in_loss_adds_beta_times_the_mean_estimate_at_the_current_policy(estimator):
    old_logprobs, ref_logprobs, mask = ragged_case(seed=4)
    shift = 0.05 * torch.randn(old_logprobs.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logprobs = (old_logprobs + shift * mask).requires_grad_(True)  # π_θ, a step away from π_old
    beta = 0.3
    plain = ppo_terms(logprobs, old_logprobs, mask)
    assert plain.kl_loss is None  # without ref_logprobs the loss is PPO's alone, as before
    terms = ppo_terms(logprobs, old_logprobs, mask, ref_logprobs=ref_logprobs, kl_coef=beta, kl_estimator=estimator)

    # by hand: the mean over response tokens of the estimate between π_θ (not π_old) and π_ref, and its gradient
    total, n = 0.0, 0
    gradient = torch.zeros_like(old_logprobs)
    for i, length in enumerate(LENGTHS):
        for t in range(length):
            lp, ref = logprobs[i, t].item(), ref_logprobs[i, t].item()
            total += by_hand(lp, ref, estimator)
            n += 1
            r = ref - lp  # d/d log π of k2 = ½ r² is −r; of k3 = e^r − 1 − r it is 1 − e^r
            gradient[i, t] = -r if estimator == "k2" else 1 - math.exp(r)
    gradient = beta * gradient / n
    assert terms.kl_loss.item() == pytest.approx(total / n, rel=1e-12)
    assert terms.policy_loss.item() == pytest.approx(plain.policy_loss.item() + beta * total / n, rel=1e-12)
    assert terms.loss.item() == pytest.approx(terms.policy_loss.item() + 0.5 * terms.value_loss.item(), rel=1e-12)
    assert terms.value_loss.item() == plain.value_loss.item()

    (kl_gradient,) = torch.autograd.grad(terms.policy_loss - plain.policy_loss, logprobs)
    assert torch.allclose(kl_gradient, gradient, rtol=1e-10, atol=1e-14)
    assert (kl_gradient[~mask.bool()] == 0).all()  # padding gets no gradient


# ------------------------------------------------------------------------------------------------------------
# End to end: tiny online runs log the three estimates
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(builtin_path, tmp_path_factory):
    """ppo.py with k3 in the reward and with k3 in the loss, apa.py online, and the refused k1 in the loss, two at a
    time: name -> (CompletedProcess, output folder)."""
    tmp = tmp_path_factory.mktemp("kl")
    flags = {
        "ppo_k3": ("ppo.py", ["--kl-estimator", "k3"]),
        "ppo_in_loss": ("ppo.py", ["--kl-in-loss", "--kl-estimator", "k3"]),
        "apa": ("apa.py", []),
        "ppo_in_loss_k1": ("ppo.py", ["--kl-in-loss"]),
    }
    jobs = {
        name: (script, [*TINY_ONLINE, *extra, "--output-dir", str(tmp / name)], {})
        for name, (script, extra) in flags.items()
    }
    return {name: (proc, tmp / name) for name, proc in run_pairs(jobs).items()}


def rollout_records(runs, name):
    proc, folder = runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    _, records = read_run(folder)
    rollouts = [r for r in records if "rollout/kl_to_ref" in r]
    assert [r["step"] for r in rollouts] == [1, 2]
    for r in rollouts:
        values = [r[f"rollout/kl_{name}"] for name in ESTIMATORS]
        assert all(math.isfinite(v) for v in values), r
        assert r["rollout/kl_k1"] == pytest.approx(r["rollout/kl_to_ref"], rel=1e-5, abs=1e-6)
        assert r["rollout/kl_k2"] >= 0 and r["rollout/kl_k3"] >= 0
    return rollouts


@pytest.mark.parametrize("name", ["ppo_k3", "ppo_in_loss", "apa"])
def test_online_runs_log_the_three_estimates(runs, name):
    rollouts = rollout_records(runs, name)
    if name == "ppo_in_loss":  # the term of the loss is logged before β
        assert all(math.isfinite(r["policy/kl_loss"]) and r["policy/kl_loss"] >= 0 for r in rollouts)
    else:
        assert all("policy/kl_loss" not in r for r in rollouts)


def test_ppo_refuses_k1_in_the_loss(runs):
    line = error_line(runs["ppo_in_loss_k1"][0])
    assert "--kl-in-loss with --kl-estimator k1" in line and "pass --kl-estimator k3" in line
