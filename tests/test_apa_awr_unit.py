"""Unit tests of the APA and AWR losses (the APA paper's L^APA and L^AWR), the value loss and the GAE copies of
apa.py and awr.py: hand-computed values and plain Python loops over ragged right-padded masks; and the paper presets.
CPU, offline, fast."""

import math

import pytest
import torch

import apa
import awr
import ppo

GARBAGE = 1e6  # padding entries: large values that must not reach the loss or its gradient


def ragged(rows, width, fill=GARBAGE, dtype=torch.float64):
    """[len(rows), width] tensor from ragged rows, right-padded with `fill`; and the matching 0/1 mask."""
    x = torch.full((len(rows), width), fill, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = 1
    return x, mask


# three rows of lengths 4, 1, 2 (width 4): log-probs, π_init log-probs, advantages
LP = [[-0.5, -1.25, -2.0, -0.75], [-3.0], [-0.125, -1.5]]
REF = [[-0.75, -1.0, -1.5, -1.0], [-2.5], [-0.25, -2.0]]
ADV = [[0.3, -0.2, 1.1, 0.0], [-1.7], [0.6, 2.4]]
N_REAL = 7


# ------------------------------------------------------------------------------------------------------------
# APA loss: masked mean of (lp − ref − A/λ)²
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.1, 2.0])
def test_apa_loss_matches_python_loop(lam):
    expected, n = 0.0, 0
    for lp_row, ref_row, a_row in zip(LP, REF, ADV):
        for lp, ref, a in zip(lp_row, ref_row, a_row):
            expected += (lp - ref - a / lam) ** 2
            n += 1
    expected /= n
    (lp, mask), (ref, _), (adv, _) = ragged(LP, 4), ragged(REF, 4, -GARBAGE), ragged(ADV, 4, GARBAGE)
    assert apa.apa_loss(
        logprobs=lp, ref_logprobs=ref, advantages=adv, response_mask=mask, lam=lam
    ).item() == pytest.approx(expected, rel=1e-12)


def test_apa_loss_hand_value():
    # one row, two real tokens then padding; λ = 0.5. Token 1: lp -1, ref -2, A 0.5 → -1 + 2 - 1 = 0.
    # Token 2: lp -2, ref -1, A -1 → -2 + 1 + 2 = 1. Loss (0² + 1²) / 2 = 0.5.
    lp, mask = ragged([[-1.0, -2.0]], 3)
    ref, _ = ragged([[-2.0, -1.0]], 3, -7.0)
    adv, _ = ragged([[0.5, -1.0]], 3, 9.0)
    assert apa.apa_loss(logprobs=lp, ref_logprobs=ref, advantages=adv, response_mask=mask, lam=0.5).item() == 0.5


def test_apa_loss_zero_at_target_and_gradient():
    lam = 0.5  # dyadic values throughout, so that lp − ref − A/λ is exactly 0 in floating point
    ref_rows = [[-1.5, -0.25, -2.0], [-0.5], [-3.0, -1.0]]
    adv_rows = [[0.25, -0.5, 0.125], [1.0], [-0.75, 0.0]]
    target_rows = [[r + a / lam for r, a in zip(rr, ar)] for rr, ar in zip(ref_rows, adv_rows)]
    ref, mask = ragged(ref_rows, 3, 123.0)
    adv, _ = ragged(adv_rows, 3, -456.0)
    lp, _ = ragged(target_rows, 3, GARBAGE)
    lp.requires_grad_(True)
    loss = apa.apa_loss(logprobs=lp, ref_logprobs=ref, advantages=adv, response_mask=mask, lam=lam)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))

    # away from the target: d loss / d lp = 2 (lp − ref − A/λ) / n_real on real tokens, 0 on padding
    shifts = [[0.5, 0.0, -1.0], [0.25], [0.0, 2.0]]
    off_rows = [[t + s for t, s in zip(tr, sr)] for tr, sr in zip(target_rows, shifts)]
    lp, _ = ragged(off_rows, 3, GARBAGE)
    lp.requires_grad_(True)
    loss = apa.apa_loss(logprobs=lp, ref_logprobs=ref, advantages=adv, response_mask=mask, lam=lam)
    loss.backward()
    n = sum(len(r) for r in off_rows)
    assert loss.item() == pytest.approx(sum(s * s for sr in shifts for s in sr) / n, rel=1e-12)
    for i, row in enumerate(off_rows):
        for t in range(3):
            if t < len(row):
                expected = 2 * (row[t] - ref_rows[i][t] - adv_rows[i][t] / lam) / n
                assert lp.grad[i, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
            else:
                assert lp.grad[i, t].item() == 0.0
    assert lp.grad.abs().sum().item() > 0


# ------------------------------------------------------------------------------------------------------------
# AWR loss: masked mean of −min(exp(A/λ), max_weight).detach() · lp
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam, max_weight", [(1.0, 20.0), (0.5, 3.0), (2.0, 1e9)])
def test_awr_loss_matches_python_loop(lam, max_weight):
    expected, n = 0.0, 0
    for lp_row, a_row in zip(LP, ADV):
        for lp, a in zip(lp_row, a_row):
            expected += -min(math.exp(a / lam), max_weight) * lp
            n += 1
    expected /= n
    (lp, mask), (adv, _) = ragged(LP, 4, -GARBAGE), ragged(ADV, 4, GARBAGE)
    assert awr.awr_loss(
        logprobs=lp, advantages=adv, response_mask=mask, lam=lam, max_weight=max_weight
    ).item() == pytest.approx(expected, rel=1e-12)


def test_awr_loss_hand_value_and_clamp():
    # A = 0 → weight 1; A = ln 2 → weight 2; A = 5 → e^5 ≈ 148.4, clamped to 20. λ = 1.
    lp, mask = ragged([[-1.0, -0.5], [-2.0]], 2, GARBAGE)
    adv, _ = ragged([[0.0, math.log(2.0)], [5.0]], 2, GARBAGE)
    # (1·1 + 2·0.5 + 20·2) / 3 = 42 / 3 = 14
    assert awr.awr_loss(
        logprobs=lp, advantages=adv, response_mask=mask, lam=1.0, max_weight=20.0
    ).item() == pytest.approx(14.0, rel=1e-12)
    # the clamp binds only above max_weight: without it the last term is e^5 · 2
    assert awr.awr_loss(
        logprobs=lp, advantages=adv, response_mask=mask, lam=1.0, max_weight=1e6
    ).item() == pytest.approx((2.0 + 2 * math.exp(5.0)) / 3, rel=1e-12)
    # λ = 2 with A = 5: e^2.5 ≈ 12.18 < 20, no clamp
    expected = (1.0 + math.sqrt(2.0) * 0.5 + math.exp(2.5) * 2.0) / 3
    assert awr.awr_loss(
        logprobs=lp, advantages=adv, response_mask=mask, lam=2.0, max_weight=20.0
    ).item() == pytest.approx(expected, rel=1e-12)
    # a single token with A = 5, λ = 1, max_weight 20: weight exactly 20, not e^5
    one_lp, one_mask = ragged([[-1.0]], 1)
    one_adv = torch.tensor([[5.0]], dtype=torch.float64)
    assert (
        awr.awr_loss(logprobs=one_lp, advantages=one_adv, response_mask=one_mask, lam=1.0, max_weight=20.0).item()
        == 20.0
    )


def test_awr_weight_carries_no_gradient():
    lam, max_weight = 1.0, 20.0
    lp, mask = ragged(LP, 4, GARBAGE)
    adv_rows = [row[:] for row in ADV]
    adv_rows[0][2] = 5.0  # one clamped weight (e^5 > 20)
    adv, _ = ragged(adv_rows, 4, GARBAGE)
    lp.requires_grad_(True)
    adv.requires_grad_(True)
    awr.awr_loss(logprobs=lp, advantages=adv, response_mask=mask, lam=lam, max_weight=max_weight).backward()
    assert adv.grad is None or torch.equal(adv.grad, torch.zeros_like(adv))
    for i, row in enumerate(adv_rows):
        for t in range(4):
            if t < len(row):
                expected = -min(math.exp(row[t] / lam), max_weight) / N_REAL
                assert lp.grad[i, t].item() == pytest.approx(expected, rel=1e-12)
            else:
                assert lp.grad[i, t].item() == 0.0
    assert lp.grad[0, 2].item() == pytest.approx(-20.0 / N_REAL, rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# value loss and GAE
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [apa, awr])
def test_value_loss_matches_python_loop(module):
    values_rows = [[0.5, -1.0, 2.0], [3.0], [0.0, -0.25]]
    returns_rows = [[1.0, -1.5, 0.0], [-1.0], [0.125, 0.75]]
    expected, n = 0.0, 0
    for v_row, r_row in zip(values_rows, returns_rows):
        for v, r in zip(v_row, r_row):
            expected += (v - r) ** 2
            n += 1
    expected = 0.5 * expected / n
    (values, mask), (returns, _) = ragged(values_rows, 3, GARBAGE), ragged(returns_rows, 3, -GARBAGE)
    assert module.value_loss(values, returns, mask).item() == pytest.approx(expected, rel=1e-12)


def loop_gae(rewards, values, lengths, gamma, lam, width):
    """Plain Python GAE per row over its real tokens; V after the last real token is 0."""
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        a, gae, next_v = [0.0] * width, 0.0, 0.0
        for t in reversed(range(n)):
            gae = r[t] + gamma * next_v - v[t] + gamma * lam * gae
            a[t] = gae
            next_v = v[t]
        advantages.append(a)
        returns.append([a[t] + v[t] if t < n else 0.0 for t in range(width)])
    return advantages, returns


@pytest.mark.parametrize("seed, gamma, lam", [(0, 1.0, 0.95), (1, 0.9, 0.8), (2, 0.99, 0.0), (3, 1.0, 1.0)])
def test_gae_copies_agree(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    lengths, width = [6, 2, 1, 4, 0, 6], 6
    rewards = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).to(torch.float64)
    results = [
        module.compute_gae(rewards=rewards, values=values, response_mask=mask, gamma=gamma, gae_lambda=lam)
        for module in (apa, awr, ppo)
    ]
    for advantages, returns in results[1:]:  # the three scripts' copies compute the same
        assert torch.equal(advantages, results[0][0]) and torch.equal(returns, results[0][1])


@pytest.mark.parametrize("module", [apa, awr])
def test_gae_matches_python_loop(module):
    gamma, lam = 0.9, 0.8
    g = torch.Generator().manual_seed(7)
    lengths, width = [5, 3, 1], 5
    rewards = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    values = torch.randn(len(lengths), width, generator=g, dtype=torch.float64)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).to(torch.float64)
    exp_adv, exp_ret = loop_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam, width)
    rewards_g = torch.where(mask.bool(), rewards, torch.full_like(rewards, GARBAGE))  # padding must not leak
    values_g = torch.where(mask.bool(), values, torch.full_like(values, -GARBAGE))
    advantages, returns = module.compute_gae(
        rewards=rewards_g, values=values_g, response_mask=mask, gamma=gamma, gae_lambda=lam
    )
    for i in range(len(lengths)):
        assert advantages[i].tolist() == pytest.approx(exp_adv[i], abs=1e-10)
        assert returns[i].tolist() == pytest.approx(exp_ret[i], abs=1e-10)


# ------------------------------------------------------------------------------------------------------------
# the paper presets
# ------------------------------------------------------------------------------------------------------------
# What `launch.sh paper apa-hh --size 1b` passed before the presets moved beside Args (less the GPU layout), with the
# released prompt length (seq_length 1000 − 128 new tokens; TL;DR 550 − 50) in place of its 896 (TL;DR 512)
LAUNCH_APA_HH_1B = dict(
    model_name_or_path="Dahoas/pythia-1B-static-sft",
    dataset="Dahoas/rm-static",
    eval_split="test",
    eval_prompts=280,
    max_prompt_length=872,
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    unfrozen_layers=2,
    adam_betas=(0.9, 0.95),
    weight_decay=1e-6,
    bf16=True,
    reward_model=["Dahoas/gptj-rm-static"],
    value_model="policy",
    rollout_batch_size=64,
    mini_batch_size=8,
    update_epochs=2,
    gamma=1.0,
    gae_lambda=0.95,
    vf_coef=1.0,
    lam=0.1,
    learning_rate=1e-6,
    reward_scaling="running",
    reward_clip=100.0,
)


def test_presets_equal_what_launch_sh_passed():
    assert apa.PRESETS["hh-1b"] == LAUNCH_APA_HH_1B
    # awr-hh: λ = 2 (the released adv_coeff_log = 1/λ = 0.5); the 125M run samples 128 responses a step
    assert awr.PRESETS["hh-125m"] == {
        **LAUNCH_APA_HH_1B,
        "model_name_or_path": "Dahoas/pythia-125M-static-sft",
        "rollout_batch_size": 128,
        "lam": 2.0,
    }
    # offline: the online HH arguments, rm-static's rows, lr 1e-6; λ 0.1 for APA, AWR's default λ = 1
    offline = {k: v for k, v in LAUNCH_APA_HH_1B.items() if k not in ("lam", "reward_scaling", "reward_clip")}
    offline = {**offline, "model_name_or_path": "Dahoas/pythia-6B-static-sft", "offline_dataset": "Dahoas/rm-static"}
    assert apa.PRESETS["offline-hh-6b"] == {**offline, "lam": 0.1}
    assert awr.PRESETS["offline-hh-6b"] == offline
    assert apa.PRESETS["tldr"] == dict(
        model_name_or_path="CarperAI/openai_summarize_tldr_sft",
        reward_model=["CarperAI/openai_summarize_tldr_rm_checkpoint"],
        dataset="CarperAI/openai_summarize_tldr",
        eval_split="test",
        eval_prompts=280,
        max_prompt_length=500,
        max_new_tokens=50,
        unfrozen_layers=8,
        bf16=True,
        value_model="policy",
        rollout_batch_size=128,
        mini_batch_size=8,
        update_epochs=2,
        gamma=1.0,
        gae_lambda=0.95,
        lam=0.1,
        learning_rate=1e-6,
        adam_betas=(0.9, 0.999),
        weight_decay=1e-6,
        vf_coef=1.0,
        reward_scaling="running",
        reward_clip=100.0,
    )
