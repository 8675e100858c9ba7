"""Unit tests of dpo.py: the DPO loss (sigmoid, reference-free, conservative, IPO averaged and summed) against
plain Python loops over sequence log-probs on ragged right-padded masks, its gradient and statistics, the order of
the pairs, the presets and their parsing (the per-row cache: test_common.py). CPU, offline, fast."""

import dataclasses
import math

import pytest
import torch
from test_apa_awr_unit import GARBAGE, ragged  # ragged rows right-padded with garbage, and their 0/1 mask

import dpo

# Two pairs; chosen responses of lengths 3 and 1, rejected of lengths 2 and 4 (width 4), as per-token log-probs.
CHOSEN = [[-0.5, -1.25, -2.0], [-0.75]]
REJECTED = [[-1.0, -0.5], [-0.25, -3.0, -1.5, -0.125]]
REF_CHOSEN = [[-0.75, -1.0, -1.5], [-2.0]]
REF_REJECTED = [[-0.5, -0.75], [-0.5, -2.0, -1.0, -0.25]]
WIDTH = 4


def log_sigmoid(z):
    return -math.log1p(math.exp(-z))


def loop_loss(beta, reference_free=False, loss_type="sigmoid", label_smoothing=0.0):
    """(mean loss, chosen rewards, rejected rewards, margins, accuracy), one pair at a time over the real tokens."""
    losses = []
    chosen_rewards = []
    rejected_rewards = []
    for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
        ref_c = 0.0 if reference_free else sum(rc)
        ref_r = 0.0 if reference_free else sum(rr)
        h = (sum(c) - ref_c) - (sum(r) - ref_r)
        if loss_type == "sigmoid":
            losses.append(-(1 - label_smoothing) * log_sigmoid(beta * h) - label_smoothing * log_sigmoid(-beta * h))
        elif loss_type == "ipo":  # each log-ratio averaged over its own response's tokens
            h_mean = (sum(c) - ref_c) / len(c) - (sum(r) - ref_r) / len(r)
            losses.append((h_mean - 1 / (2 * beta)) ** 2)
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        chosen_rewards.append(beta * (sum(c) - ref_c))
        rejected_rewards.append(beta * (sum(r) - ref_r))
    margins = [a - b for a, b in zip(chosen_rewards, rejected_rewards)]
    n = len(losses)
    return (
        sum(losses) / n,
        sum(chosen_rewards) / n,
        sum(rejected_rewards) / n,
        sum(margins) / n,
        sum(m > 0 for m in margins) / n,
    )


def sequences(rows, fill=GARBAGE, grad=False):
    logprobs, mask = ragged(rows, WIDTH, fill)
    logprobs.requires_grad_(grad)
    return logprobs, dpo.sequence_logps(logprobs, mask)


def lengths(rows):
    """The response tokens of each ragged row, counted from its mask, [batch]."""
    return ragged(rows, WIDTH, GARBAGE)[1].sum(1)


def terms(beta=0.5, reference_free=False, loss_type="sigmoid", label_smoothing=0.0, grad=False):
    chosen_tokens, chosen = sequences(CHOSEN, grad=grad)
    rejected_tokens, rejected = sequences(REJECTED, fill=-GARBAGE, grad=grad)
    _, ref_chosen = sequences(REF_CHOSEN, fill=float("inf"))
    _, ref_rejected = sequences(REF_REJECTED, fill=float("nan"))
    result = dpo.dpo_loss(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=None if reference_free else ref_chosen,
        ref_rejected_logps=None if reference_free else ref_rejected,
        beta=beta,
        reference_free=reference_free,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=lengths(CHOSEN),
        rejected_lengths=lengths(REJECTED),
    )
    return result, chosen_tokens, rejected_tokens


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("ipo_sum", 0.0)]
)
def test_loss_and_stats_match_python_loop(beta, reference_free, loss_type, label_smoothing):
    result, _, _ = terms(beta, reference_free, loss_type, label_smoothing)
    expected = loop_loss(beta, reference_free, loss_type, label_smoothing)
    got = (result.loss, *result.stats)
    for value, want in zip(got, expected):
        assert value.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert not any(s.requires_grad for s in result.stats)


def test_hand_values():
    """Pair 0: log π_θ(y_w) = −3.75, log π_ref(y_w) = −3.25, log π_θ(y_l) = −1.5, log π_ref(y_l) = −1.25: h = −0.25.
    Pair 1: −0.75 vs −2, −4.875 vs −3.75: h = 1.25 + 1.125 = 2.375. β = 0.5."""
    result, _, _ = terms(beta=0.5)
    expected = (-log_sigmoid(-0.125) - log_sigmoid(1.1875)) / 2
    assert result.loss.item() == pytest.approx(expected, rel=1e-12)
    assert result.stats.chosen_rewards.item() == pytest.approx((0.5 * -0.5 + 0.5 * 1.25) / 2)
    assert result.stats.rejected_rewards.item() == pytest.approx((0.5 * -0.25 + 0.5 * -1.125) / 2)
    assert result.stats.margins.item() == pytest.approx((-0.125 + 1.1875) / 2)
    assert result.stats.accuracy.item() == 0.5  # pair 0's margin is negative
    ipo_sum, _, _ = terms(beta=0.5, loss_type="ipo_sum")
    assert ipo_sum.loss.item() == pytest.approx(((-0.25 - 1) ** 2 + (2.375 - 1) ** 2) / 2)
    # IPO averaged per token: pair 0's log-ratios −0.5 over 3 tokens and −0.25 over 2, h̄ = −1/6 + 1/8 = −1/24;
    # pair 1's 1.25 over 1 token and −1.125 over 4, h̄ = 1.25 + 0.28125 = 1.53125; 1/(2β) = 1
    ipo, _, _ = terms(beta=0.5, loss_type="ipo")
    assert ipo.loss.item() == pytest.approx(((-1 / 24 - 1) ** 2 + (1.53125 - 1) ** 2) / 2, rel=1e-12)
    assert ipo.stats.margins.item() == result.stats.margins.item()  # the implicit rewards stay the summed ones
    free, _, _ = terms(beta=0.5, reference_free=True)  # h = (−3.75 + 1.5), (−0.75 + 4.875)
    assert free.loss.item() == pytest.approx((-log_sigmoid(-1.125) - log_sigmoid(2.0625)) / 2)
    assert free.stats.chosen_rewards.item() == pytest.approx(0.5 * (-3.75 - 0.75) / 2)  # β log π_θ(y_w)


def test_gradient_reaches_real_tokens_only():
    """dL/d log π_θ(y_t) is −β σ(−βh) / batch on each real chosen token and +β σ(−βh) / batch on each rejected one;
    padding gets none (and its garbage never enters the loss)."""
    beta = 0.5
    result, chosen_tokens, rejected_tokens = terms(beta=beta, grad=True)
    result.loss.backward()
    for i, h in enumerate([-0.25, 2.375]):
        g = beta * (1 / (1 + math.exp(beta * h))) / 2
        for t in range(WIDTH):
            want_c = -g if t < len(CHOSEN[i]) else 0.0
            want_r = g if t < len(REJECTED[i]) else 0.0
            assert chosen_tokens.grad[i, t].item() == pytest.approx(want_c, rel=1e-12, abs=1e-15)
            assert rejected_tokens.grad[i, t].item() == pytest.approx(want_r, rel=1e-12, abs=1e-15)


def test_ipo_gradient_is_spread_over_each_response_by_its_length():
    """dL/d log π_θ(y_t) of IPO's averaged loss is 2 (h̄ − 1/(2β)) / (n · batch) on each of the n real chosen tokens,
    and minus that on each of the n real rejected ones: a long response's tokens each get less. None to padding."""
    beta = 0.5
    result, chosen_tokens, rejected_tokens = terms(beta=beta, loss_type="ipo", grad=True)
    result.loss.backward()
    for i, h_mean in enumerate([-1 / 24, 1.53125]):
        g = 2 * (h_mean - 1 / (2 * beta)) / 2
        for t in range(WIDTH):
            want_c = g / len(CHOSEN[i]) if t < len(CHOSEN[i]) else 0.0
            want_r = -g / len(REJECTED[i]) if t < len(REJECTED[i]) else 0.0
            assert chosen_tokens.grad[i, t].item() == pytest.approx(want_c, rel=1e-12, abs=1e-15)
            assert rejected_tokens.grad[i, t].item() == pytest.approx(want_r, rel=1e-12, abs=1e-15)


def test_ipo_needs_the_token_counts():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        dpo.dpo_loss(
            chosen_logps=x, rejected_logps=x, ref_chosen_logps=x, ref_rejected_logps=x, beta=0.1, loss_type="ipo"
        )


def test_equal_policies_give_log_2_and_zero_margins():
    """At the start (π_θ = π_ref) every DPO loss is log 2 and no pair counts as correct."""
    logps = torch.tensor([-3.0, -7.5, -1.25], dtype=torch.float64)
    result = dpo.dpo_loss(
        chosen_logps=logps, rejected_logps=logps - 1, ref_chosen_logps=logps, ref_rejected_logps=logps - 1, beta=0.1
    )
    assert result.loss.item() == pytest.approx(math.log(2))
    assert result.stats.margins.item() == 0 and result.stats.accuracy.item() == 0
    smoothed = dpo.dpo_loss(
        chosen_logps=logps,
        rejected_logps=logps - 1,
        ref_chosen_logps=logps,
        ref_rejected_logps=logps - 1,
        beta=0.1,
        label_smoothing=0.3,
    )
    assert smoothed.loss.item() == pytest.approx(math.log(2))  # σ(0) = 1/2 whatever ε


def test_label_smoothing_flips_the_preference():
    """ε = 1 would train on the flipped pairs: the same as swapping chosen and rejected."""
    c = torch.tensor([-2.0, -1.0], dtype=torch.float64)
    r = torch.tensor([-1.5, -4.0], dtype=torch.float64)
    ref_c = torch.tensor([-2.5, -1.5], dtype=torch.float64)
    ref_r = torch.tensor([-1.0, -3.0], dtype=torch.float64)
    flipped = dpo.dpo_loss(
        chosen_logps=c,
        rejected_logps=r,
        ref_chosen_logps=ref_c,
        ref_rejected_logps=ref_r,
        beta=0.3,
        label_smoothing=1.0,
    ).loss
    swapped = dpo.dpo_loss(
        chosen_logps=r, rejected_logps=c, ref_chosen_logps=ref_r, ref_rejected_logps=ref_c, beta=0.3
    ).loss
    assert flipped.item() == pytest.approx(swapped.item(), rel=1e-12)


def test_unknown_loss_type_raises():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo.dpo_loss(
            chosen_logps=x, rejected_logps=x, ref_chosen_logps=x, ref_rejected_logps=x, beta=0.1, loss_type="hinge"
        )


def test_sequence_logps_ignores_padding():
    logprobs, mask = ragged([[-1.0, -2.0], [-0.5], [-0.25, -0.25, -0.5]], 3, float("-inf"))
    assert dpo.sequence_logps(logprobs, mask).tolist() == [-3.0, -0.5, -1.0]


def test_pair_order_passes_over_every_pair_once_per_pass():
    order = dpo.pair_order(5, 13, torch.Generator().manual_seed(0))
    assert len(order) == 13
    assert sorted(order[:5].tolist()) == list(range(5)) and sorted(order[5:10].tolist()) == list(range(5))
    again = dpo.pair_order(5, 13, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


# ------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------
def test_hh_1b_preset_is_the_released_dpo_setting():
    """The released dpo_qlora_llama_hh.py (LoL-RL, commit 9f8d816): β 0.1, lr 2e-4 constant (no warm-up: its
    constant schedule takes none), 2 × 8 pairs a step, 9000 steps, AdamW (0.9, 0.999), ε 1e-6, weight decay 0.01,
    clip 0.3, an adapter of r 64 α 16 dropout 0.05, prompts 768 − 128 tokens, 128 new tokens, evaluation every 900
    steps; the models and data of alol.py's HH presets."""
    args = dataclasses.replace(dpo.Args(), **dpo.PRESETS["hh-1b"])
    expected = dict(
        model_name_or_path="Dahoas/pythia-1B-static-sft",
        offline_dataset="Anthropic/hh-rlhf",
        dataset="Anthropic/hh-rlhf",
        eval_split="test",
        eval_prompts=280,
        max_prompt_length=640,
        max_new_tokens=128,
        stop_strings=["Human:", "Assistant:"],
        bf16=True,
        lora_r=64,
        lora_alpha=16.0,
        lora_dropout=0.05,
        lora_target_modules=["all-linear"],
        reward_model=["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"],
        reward_transform="sigmoid",
        beta=0.1,
        reference_free=False,
        mini_batch_size=16,
        total_steps=9000,
        learning_rate=2e-4,
        lr_warmup_steps=0,
        lr_schedule="constant",
        adam_betas=(0.9, 0.999),
        adam_eps=1e-6,
        weight_decay=0.01,
        max_grad_norm=0.3,
        eval_every=900,
    )
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.reward_device == "policy"  # the device layout stays in launch.sh
    assert dpo.PRESETS["hh-125m"]["model_name_or_path"] == "Dahoas/pythia-125M-static-sft"
    assert dpo.PRESETS["hh-6b"]["model_name_or_path"] == "Dahoas/pythia-6B-static-sft"
