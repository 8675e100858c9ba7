"""Unit tests of alol.py: the eight losses against plain Python loops and hand-computed values on
ragged right-padded masks, the clamps, gradients with the ratios held constant, the good_priority sampler, the
attention-pooled value head and its fit, the rows' advantages against a loop over single rows, the presets (the keyed
cache and distinct-n: test_common.py). CPU, offline, fast."""

import dataclasses
import math

import pytest
import torch
from test_apa_awr_unit import GARBAGE, ragged  # ragged rows right-padded with garbage, and their 0/1 mask

import alol
import common

ALGORITHMS = ["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]


# Three responses of lengths 4, 1, 2. With ε = 0.9 (clamp [0.1, 1.9]) the sequence ratios π_θ/π_ref are
# exp(0.25) = 1.28 (inside), exp(-2.5) = 0.082 (clamped up to 0.1) and exp(0.875) = 2.40 (clamped down to 1.9);
# the per-token ratios of row 0 include exp(0.75) = 2.12 (clamped to 1.9) and row 1's exp(-2.5) (clamped to 0.1).
LP = [[-0.5, -1.25, -2.0, -0.25], [-3.0], [-0.125, -1.5]]
REF = [[-0.75, -1.0, -1.5, -1.0], [-0.5], [-0.5, -2.0]]
R = [0.8, 0.3, 0.6]
A = [0.25, -0.5, 0.75]  # row 1 has a negative advantage: A⁺ = 0
WIDTH = 4


def loop_loss(algorithm, lp_rows, ref_rows, scores, advantages, cliprange, kl_coef, u):
    """Each variant's per-sequence loss, one sequence at a time, over the real tokens only."""
    total = 0.0
    for lp, ref, r, a in zip(lp_rows, ref_rows, scores, advantages):
        s = -sum(lp)
        s_ref = -sum(ref)
        a_plus = max(a, 0.0)
        w = min(max(math.exp(s_ref - s), 1 - cliprange), 1 + cliprange)
        per_seq = {
            "nll": s,
            "wbc": s * r,
            "r_gold": sum(-x * max(math.exp(x), u) for x in lp) * r,
            "r_lol": s * w * r,
            "a_lol": s * w * a_plus,
            "a_lol_ref_free": s * a_plus,
            "a_lol_seq": sum(-x * min(max(math.exp(x - y), 1 - cliprange), 1 + cliprange) for x, y in zip(lp, ref))
            * a_plus,
            "a_lol_kl": s * a_plus + kl_coef * (s_ref - s),
        }[algorithm]
        total += per_seq
    return total / len(lp_rows)


def terms(algorithm, lp_rows=LP, ref_rows=REF, scores=R, advantages=A, cliprange=0.9, kl_coef=0.1, u=0.1, grad=False):
    lp, response_mask = ragged(lp_rows, WIDTH, GARBAGE)
    ref, _ = ragged(ref_rows, WIDTH, -GARBAGE)
    lp.requires_grad_(grad)
    result = alol.alol_loss(
        algorithm=algorithm,
        logprobs=lp,
        ref_logprobs=ref,
        response_mask=response_mask,
        scores=torch.tensor(scores, dtype=torch.float64),
        advantages=torch.tensor(advantages, dtype=torch.float64),
        cliprange=cliprange,
        kl_coef=kl_coef,
        gold_floor=u,
    )
    return result, lp


def call(algorithm, **kwargs):
    """(the loss, the log-prob leaf tensor)"""
    result, lp = terms(algorithm, **kwargs)
    return result.loss, lp


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("cliprange, kl_coef, u", [(0.9, 0.1, 0.1), (0.2, 0.5, 0.4), (0.05, 0.0, 0.0)])
def test_loss_matches_python_loop(algorithm, cliprange, kl_coef, u):
    expected = loop_loss(algorithm, LP, REF, R, A, cliprange, kl_coef, u)
    loss = call(algorithm, cliprange=cliprange, kl_coef=kl_coef, u=u)[0]
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_padding_may_hold_inf_and_nan():
    lp, response_mask = ragged(LP, WIDTH, float("inf"))
    ref, _ = ragged(REF, WIDTH, float("nan"))
    for algorithm in ALGORITHMS:
        result = alol.alol_loss(
            algorithm=algorithm,
            logprobs=lp,
            ref_logprobs=ref,
            response_mask=response_mask,
            scores=torch.tensor(R, dtype=torch.float64),
            advantages=torch.tensor(A, dtype=torch.float64),
            cliprange=0.9,
            kl_coef=0.1,
            gold_floor=0.1,
        )
        assert result.loss.item() == pytest.approx(loop_loss(algorithm, LP, REF, R, A, 0.9, 0.1, 0.1), rel=1e-12)
        assert torch.isfinite(result.log_ratio_to_ref) and torch.isfinite(result.clipfrac)


def test_log_ratio_and_clipfrac_terms():
    # sequence log-ratios log π_θ(y|x) − log π_ref(y|x): 0.25, −2.5, 0.875; weights 1.28, 0.082, 2.40
    for algorithm in ALGORITHMS:
        result = terms(algorithm)[0]
        assert result.log_ratio_to_ref.item() == pytest.approx((0.25 - 2.5 + 0.875) / 3, rel=1e-12)
        assert result.clipfrac.item() == pytest.approx(2 / 3)  # ε = 0.9: rows 1 and 2 outside [0.1, 1.9]
        assert not result.log_ratio_to_ref.requires_grad and not result.clipfrac.requires_grad
    assert terms("a_lol", cliprange=0.2)[0].clipfrac.item() == pytest.approx(1.0)  # 1.28 > 1.2 too
    assert terms("a_lol", cliprange=1.5)[0].clipfrac.item() == 0.0


def test_hand_values():
    # S = 4.0, 3.0, 1.625; Sref = 4.25, 0.5, 2.5; A⁺ = 0.25, 0, 0.75; ε = 0.9.
    assert call("nll")[0].item() == pytest.approx((4.0 + 3.0 + 1.625) / 3, rel=1e-12)
    assert call("wbc")[0].item() == pytest.approx((4.0 * 0.8 + 3.0 * 0.3 + 1.625 * 0.6) / 3, rel=1e-12)
    # ratios: exp(0.25) inside; exp(-2.5) = 0.082 → 0.1; exp(0.875) = 2.40 → 1.9 (both sides of the clamp bind)
    r_lol = (4.0 * math.exp(0.25) * 0.8 + 3.0 * 0.1 * 0.3 + 1.625 * 1.9 * 0.6) / 3
    assert call("r_lol")[0].item() == pytest.approx(r_lol, rel=1e-12)
    assert call("a_lol")[0].item() == pytest.approx((4.0 * math.exp(0.25) * 0.25 + 1.625 * 1.9 * 0.75) / 3, rel=1e-12)
    assert call("a_lol_ref_free")[0].item() == pytest.approx((4.0 * 0.25 + 1.625 * 0.75) / 3, rel=1e-12)
    # a_lol_kl: S·A⁺ + β(Sref − S) per row, β = 0.1: (1 + 0.025) + (0 − 0.25) + (1.21875 + 0.0875)
    assert call("a_lol_kl")[0].item() == pytest.approx((1.025 - 0.25 + 1.30625) / 3, rel=1e-12)
    # a_lol_seq, row 0 token ratios exp(0.25), exp(-0.25), exp(-0.5), exp(0.75) → 1.9; row 2: exp(0.375), exp(0.5)
    row0 = 0.5 * math.exp(0.25) + 1.25 * math.exp(-0.25) + 2.0 * math.exp(-0.5) + 0.25 * 1.9
    row2 = 0.125 * math.exp(0.375) + 1.5 * math.exp(0.5)
    assert call("a_lol_seq")[0].item() == pytest.approx((row0 * 0.25 + row2 * 0.75) / 3, rel=1e-12)

    # r_gold, u = 0.1: weights max(π(y_t), 0.1); exp(-3) = 0.0498 → 0.1
    def gold(xs):
        return sum(-x * max(math.exp(x), 0.1) for x in xs)

    expected = (gold(LP[0]) * 0.8 + 3.0 * 0.1 * 0.3 + gold(LP[2]) * 0.6) / 3
    assert call("r_gold")[0].item() == pytest.approx(expected, rel=1e-12)


def test_clamp_binds_on_both_sides():
    # one-token rows with A⁺ = R = 1: ratio exp(+2) = 7.4 → 1 + ε (S = 1) and exp(-3) = 0.05 → 1 − ε (S = 4)
    lp_rows, ref_rows = [[-1.0], [-4.0]], [[-3.0], [-1.0]]
    for cliprange in (0.9, 0.5):
        for algorithm in ("a_lol", "a_lol_seq", "r_lol"):
            both = dict(lp_rows=lp_rows, ref_rows=ref_rows, scores=[1.0, 1.0], advantages=[1.0, 1.0])
            loss = call(algorithm, **both, cliprange=cliprange)[0].item()
            assert loss == pytest.approx((1 * (1 + cliprange) + 4 * (1 - cliprange)) / 2, rel=1e-12)
            one = dict(lp_rows=lp_rows[:1], ref_rows=ref_rows[:1], scores=[1.0], advantages=[1.0])
            lone = call(algorithm, **one, cliprange=cliprange)[0].item()
            assert lone == pytest.approx(1 + cliprange, rel=1e-12)


def analytic_grad(algorithm, lp, ref, r, a, cliprange=0.9, kl_coef=0.1, u=0.1):
    """d loss / d lp[b][t] with every ratio and weight held constant (as if detached)."""
    a_plus = max(a, 0.0)
    w = min(max(math.exp(sum(lp) - sum(ref)), 1 - cliprange), 1 + cliprange)
    per_token = {
        "nll": lambda x, y: -1.0,
        "wbc": lambda x, y: -r,
        "r_gold": lambda x, y: -max(math.exp(x), u) * r,
        "r_lol": lambda x, y: -w * r,
        "a_lol": lambda x, y: -w * a_plus,
        "a_lol_ref_free": lambda x, y: -a_plus,
        "a_lol_seq": lambda x, y: -min(max(math.exp(x - y), 1 - cliprange), 1 + cliprange) * a_plus,
        "a_lol_kl": lambda x, y: -a_plus + kl_coef,  # d/dlp of β(Sref − S) = +β
    }[algorithm]
    return [per_token(x, y) for x, y in zip(lp, ref)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ratios_carry_no_gradient(algorithm):
    """The autograd gradient equals the one with weights treated as constants: no gradient flows through the
    (clamped) importance ratios, the r_gold weights or A⁺; padding gets exactly 0."""
    loss, lp = call(algorithm, grad=True)
    loss.backward()
    for b, (lp_row, ref_row, r, a) in enumerate(zip(LP, REF, R, A)):
        expected = analytic_grad(algorithm, lp_row, ref_row, r, a)
        for t in range(WIDTH):
            if t < len(lp_row):
                assert lp.grad[b, t].item() == pytest.approx(expected[t] / len(LP), rel=1e-12, abs=1e-15), (b, t)
            else:
                assert lp.grad[b, t].item() == 0.0
    assert lp.grad.abs().sum().item() > 0


def test_a_lol_kl_term():
    """a_lol_kl − a_lol_ref_free = β · mean(log π_θ(y|x) − log π_ref(y|x)), linear in β (--kl-coef)."""
    log_ratio = sum(sum(lp) - sum(ref) for lp, ref in zip(LP, REF)) / len(LP)  # (0.25 − 2.5 + 0.875) / 3
    base = call("a_lol_ref_free")[0].item()
    for beta in (0.0, 0.1, 2.0):
        assert call("a_lol_kl", kl_coef=beta)[0].item() - base == pytest.approx(beta * log_ratio, rel=1e-9, abs=1e-12)


def test_unknown_algorithm_raises():
    with pytest.raises(ValueError, match="unknown"):
        call("ppo")


# ------------------------------------------------------------------------------------------------------------
# good_priority sampler
# ------------------------------------------------------------------------------------------------------------
def test_priority_sampler_frequencies():
    weights = torch.tensor([2.0, 0.0, -1.0, 1.0, 5.0, 0.5, -0.25, 1.5])
    n = 20000
    draws = alol.priority_sampler(weights, n, torch.Generator().manual_seed(0))
    assert draws.shape == (n,)
    counts = torch.bincount(draws, minlength=len(weights)).double()
    expected = weights.clamp(min=0).double() / weights.clamp(min=0).sum()
    for i, p in enumerate(expected.tolist()):
        if p == 0:
            assert counts[i] == 0, f"row {i} with weight {weights[i]} was drawn"
        else:  # within 4.5 binomial standard deviations
            assert abs(counts[i] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), (i, counts[i] / n, p)


def test_priority_sampler_is_seeded_and_rejects_no_positive_row():
    w = torch.tensor([0.3, 0.7, 1.0])
    a = alol.priority_sampler(w, 50, torch.Generator().manual_seed(3))
    b = alol.priority_sampler(w, 50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        alol.priority_sampler(torch.tensor([0.0, -1.0]), 10, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------------------
# V_ref: the attention-pooled value head and its fit
# ------------------------------------------------------------------------------------------------------------
def test_value_head_ignores_padding():
    torch.manual_seed(0)
    head = alol.ValueHead(8, lo=0.0, hi=2.0).eval()
    torch.nn.init.normal_(head.query)  # a non-uniform attention
    real = torch.randn(3, 8)
    outputs = []
    for pad, fill in [(0, 0.0), (2, 0.0), (2, 1e6), (5, float("nan")), (5, -3.0)]:
        hidden = torch.cat([torch.full((pad, 8), fill), real])[None]  # left padding, as the prompts are padded
        mask = torch.tensor([[0] * pad + [1] * 3])
        outputs.append(head(hidden, mask).item())
    assert all(o == pytest.approx(outputs[0], abs=1e-6) for o in outputs), outputs
    assert 0.0 < outputs[0] < 2.0  # sigmoid · (hi − lo) + lo


def test_value_head_attention_pools_with_the_learned_query():
    head = alol.ValueHead(2, lo=0.0, hi=1.0, dropout=0.0).eval()
    with torch.no_grad():
        head.query.copy_(torch.tensor([10.0, 0.0]))  # attends to the position with the largest first coordinate
        head.out.weight.copy_(torch.tensor([[0.0, 1.0]]))
        head.out.bias.zero_()
    hidden = torch.tensor([[[5.0, 3.0], [-5.0, -3.0]]])
    out = head(hidden, torch.ones(1, 2)).item()
    assert out == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-6)  # pooled ≈ the first position


def test_fit_value_head_keeps_the_best_held_out_epoch_in_eval_mode():
    g = torch.Generator().manual_seed(0)
    n, length, width = 200, 5, 16
    hidden = torch.randn(n, length, width, generator=g)
    mask = (torch.arange(length)[None] >= torch.randint(0, 3, (n, 1), generator=g)).long()  # left padding
    targets = torch.sigmoid(hidden[:, -1, :4].sum(-1))  # learnable from the last (always real) position
    fit = dict(lo=0.0, hi=1.0, epochs=6, lr=3e-2, batch_size=16, seed=1)
    head, history = alol.fit_value_head(hidden, mask, targets, **fit)
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    assert len(history) == 6
    first = head(hidden, mask)
    assert torch.equal(first, head(hidden, mask))  # no dropout when scoring
    held_out = ((first[180:] - targets[180:]) ** 2).mean().item()
    assert held_out == pytest.approx(min(history), rel=1e-5)  # the kept epoch is the held-out best
    assert min(history) < ((targets[180:] - targets[:180].mean()) ** 2).mean().item()  # better than the mean
    again, history_again = alol.fit_value_head(hidden, mask, targets, **fit)
    assert history_again == history and torch.equal(again(hidden, mask), first)  # seeded: ranks agree


# ------------------------------------------------------------------------------------------------------------
# step 3: R, V_πref(x) and A_πref = R − V_πref(x) of every row
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_row_advantages_match_a_loop_over_single_unpadded_rows(batch_size):
    """R = Σ w_i · sigmoid(r_i) with r_0 a data column and r_1 a scorer's (the response length), V_πref(x) of
    each prompt alone and unpadded, A = R − V: the same in chunks of any size, padding never read."""
    from test_common import ragged_batch, tiny_causal_lm

    model = tiny_causal_lm(seed=2)
    prompts, responses, *columns = ragged_batch(seed=4)
    rows = common.Batch(*columns)
    torch.manual_seed(0)
    head = alol.ValueHead(model.config.n_embd, lo=-1.0, hi=2.0).eval()
    torch.nn.init.normal_(head.query)  # a non-uniform attention over the prompt
    data_column = torch.tensor([0.5, -1.0, 2.0, 0.0])
    raw_data = torch.stack([data_column, torch.full((4,), float("nan"))], 1)  # field 1: scored by its scorer
    seen = []

    def length(query_ids, query_mask, response_ids, response_mask, prompts):
        seen.extend(prompts)
        return response_mask.sum(1).float()

    reward = alol.Reward(
        scorer_names=["data", "length"],
        scorers={"length": length},
        weights=torch.tensor([1.0, -0.5]),
        transform="sigmoid",
        tokenizer=None,
    )
    texts = ["p0", "p1", "p2", "p3"]
    args = alol.Args(forward_batch_size=batch_size, progress=False)
    out = alol.row_advantages(model, head, rows, raw_data, texts, reward=reward, args=args, device="cpu")
    assert seen == texts  # the scorer reads each row's prompt as the dataset gave it, in order
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            score = torch.sigmoid(data_column[i]) - 0.5 * torch.sigmoid(torch.tensor(float(len(r))))
            hidden = model.transformer(input_ids=torch.tensor([p])).last_hidden_state
            value = head(hidden, torch.ones(1, len(p)))[0]
            assert out["scores"][i].item() == pytest.approx(score.item(), abs=1e-6)
            assert out["values"][i].item() == pytest.approx(value.item(), abs=1e-5)
    assert torch.equal(out["advantages"], out["scores"] - out["values"])
    assert not torch.equal(out["values"], out["values"][:1].expand(4))  # the prompts' values differ


# ------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------
def test_hh_1b_preset_is_what_launch_sh_passed():
    """The values `launch.sh paper alol-hh --size 1b` passed to alol.py, but the device (--reward-device cuda:1) and
    the released prompt length (768 − 128 tokens, not 896)."""
    args = dataclasses.replace(alol.Args(), **alol.PRESETS["hh-1b"])
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
        mini_batch_size=16,
        total_steps=9000,
        learning_rate=2e-4,
        max_grad_norm=0.3,
    )
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.reward_device == "policy"  # the device layout stays in launch.sh
    assert alol.PRESETS["hh-125m"]["model_name_or_path"] == "Dahoas/pythia-125M-static-sft"
    assert alol.PRESETS["hh-6b"]["model_name_or_path"] == "Dahoas/pythia-6B-static-sft"
