"""Unit tests of alol.py (ALGORITHMS.md §8): the eight losses against plain Python loops and hand-computed values on
ragged right-padded masks, the clamps, gradients with the ratios held constant, the good_priority sampler, the keyed
cache, the attention-pooled value head and its fit, distinct-n. CPU, offline, fast."""
import json
import math

import pytest
import torch

import alol
from test_apa_awr_unit import GARBAGE, ragged  # ragged rows right-padded with garbage, and their 0/1 mask

ALGORITHMS = ["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]


# Three responses of lengths 4, 1, 2. With ε = 0.9 (clamp [0.1, 1.9]) the sequence ratios π_θ/π_ref are
# exp(0.25) = 1.28 (inside), exp(-2.5) = 0.082 (clamped up to 0.1) and exp(0.875) = 2.40 (clamped down to 1.9);
# the per-token ratios of row 0 include exp(0.75) = 2.12 (clamped to 1.9) and row 1's exp(-2.5) (clamped to 0.1).
LP = [[-0.5, -1.25, -2.0, -0.25], [-3.0], [-0.125, -1.5]]
REF = [[-0.75, -1.0, -1.5, -1.0], [-0.5], [-0.5, -2.0]]
R = [0.8, 0.3, 0.6]
A = [0.25, -0.5, 0.75]  # row 1 has a negative advantage: A⁺ = 0
WIDTH = 4


def loop_loss(algorithm, lp_rows, ref_rows, rewards, advantages, clip, kl_beta, u):
    """ALGORITHMS.md §8's table, one sequence at a time, over the real tokens only."""
    total = 0.0
    for lp, ref, r, a in zip(lp_rows, ref_rows, rewards, advantages):
        s, s_ref, a_plus = -sum(lp), -sum(ref), max(a, 0.0)
        w = min(max(math.exp(s_ref - s), 1 - clip), 1 + clip)
        per_seq = {
            "nll": s,
            "wbc": s * r,
            "r_gold": sum(-x * max(math.exp(x), u) for x in lp) * r,
            "r_lol": s * w * r,
            "a_lol": s * w * a_plus,
            "a_lol_ref_free": s * a_plus,
            "a_lol_seq": sum(-x * min(max(math.exp(x - y), 1 - clip), 1 + clip) for x, y in zip(lp, ref)) * a_plus,
            "a_lol_kl": s * a_plus + kl_beta * (s_ref - s),
        }[algorithm]
        total += per_seq
    return total / len(lp_rows)


def call(algorithm, lp_rows=LP, ref_rows=REF, rewards=R, advantages=A, clip=0.9, kl_beta=0.1, u=0.1, grad=False):
    lp, mask = ragged(lp_rows, WIDTH, GARBAGE)
    ref, _ = ragged(ref_rows, WIDTH, -GARBAGE)
    lp.requires_grad_(grad)
    loss = alol.alol_loss(algorithm, lp, ref, mask, torch.tensor(rewards, dtype=torch.float64),
                          torch.tensor(advantages, dtype=torch.float64), clip, kl_beta, u)
    return loss, lp


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("clip, kl_beta, u", [(0.9, 0.1, 0.1), (0.2, 0.5, 0.4), (0.05, 0.0, 0.0)])
def test_loss_matches_python_loop(algorithm, clip, kl_beta, u):
    expected = loop_loss(algorithm, LP, REF, R, A, clip, kl_beta, u)
    assert call(algorithm, clip=clip, kl_beta=kl_beta, u=u)[0].item() == pytest.approx(expected, rel=1e-12)


def test_padding_may_hold_inf_and_nan():
    lp, mask = ragged(LP, WIDTH, float("inf"))
    ref, _ = ragged(REF, WIDTH, float("nan"))
    for algorithm in ALGORITHMS:
        loss = alol.alol_loss(algorithm, lp, ref, mask, torch.tensor(R, dtype=torch.float64),
                              torch.tensor(A, dtype=torch.float64), clip=0.9, kl_beta=0.1, gold_floor=0.1)
        assert loss.item() == pytest.approx(loop_loss(algorithm, LP, REF, R, A, 0.9, 0.1, 0.1), rel=1e-12)


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
    gold = lambda xs: sum(-x * max(math.exp(x), 0.1) for x in xs)
    expected = (gold(LP[0]) * 0.8 + 3.0 * 0.1 * 0.3 + gold(LP[2]) * 0.6) / 3
    assert call("r_gold")[0].item() == pytest.approx(expected, rel=1e-12)


def test_clamp_binds_on_both_sides():
    # one-token rows with A⁺ = R = 1: ratio exp(+2) = 7.4 → 1 + ε (S = 1) and exp(-3) = 0.05 → 1 − ε (S = 4)
    lp_rows, ref_rows = [[-1.0], [-4.0]], [[-3.0], [-1.0]]
    for clip in (0.9, 0.5):
        for algorithm in ("a_lol", "a_lol_seq", "r_lol"):
            loss = call(algorithm, lp_rows, ref_rows, [1.0, 1.0], [1.0, 1.0], clip=clip)[0].item()
            assert loss == pytest.approx((1 * (1 + clip) + 4 * (1 - clip)) / 2, rel=1e-12)
            lone = call(algorithm, lp_rows[:1], ref_rows[:1], [1.0], [1.0], clip=clip)[0].item()
            assert lone == pytest.approx(1 + clip, rel=1e-12)


def analytic_grad(algorithm, lp, ref, r, a, clip=0.9, kl_beta=0.1, u=0.1):
    """d loss / d lp[b][t] with every ratio and weight held constant (as if detached)."""
    n, a_plus = len(lp), max(a, 0.0)
    w = min(max(math.exp(sum(lp) - sum(ref)), 1 - clip), 1 + clip)
    per_token = {
        "nll": lambda x, y: -1.0, "wbc": lambda x, y: -r, "r_gold": lambda x, y: -max(math.exp(x), u) * r,
        "r_lol": lambda x, y: -w * r, "a_lol": lambda x, y: -w * a_plus, "a_lol_ref_free": lambda x, y: -a_plus,
        "a_lol_seq": lambda x, y: -min(max(math.exp(x - y), 1 - clip), 1 + clip) * a_plus,
        "a_lol_kl": lambda x, y: -a_plus + kl_beta,  # d/dlp of β(Sref − S) = +β
    }[algorithm]
    return [per_token(x, y) for x, y in zip(lp, ref)], n


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ratios_carry_no_gradient(algorithm):
    """The autograd gradient equals the one with weights treated as constants: no gradient flows through the
    (clamped) importance ratios, the r_gold weights or A⁺; padding gets exactly 0."""
    loss, lp = call(algorithm, grad=True)
    loss.backward()
    for b, (lp_row, ref_row, r, a) in enumerate(zip(LP, REF, R, A)):
        expected, _ = analytic_grad(algorithm, lp_row, ref_row, r, a)
        for t in range(WIDTH):
            if t < len(lp_row):
                assert lp.grad[b, t].item() == pytest.approx(expected[t] / len(LP), rel=1e-12, abs=1e-15), (b, t)
            else:
                assert lp.grad[b, t].item() == 0.0
    assert lp.grad.abs().sum().item() > 0


def test_a_lol_kl_term():
    """a_lol_kl − a_lol_ref_free = β_kl · mean(log π_θ(y|x) − log π_ref(y|x)), linear in β_kl."""
    log_ratio = sum(sum(lp) - sum(ref) for lp, ref in zip(LP, REF)) / len(LP)  # (0.25 − 2.5 + 0.875) / 3
    base = call("a_lol_ref_free")[0].item()
    for beta in (0.0, 0.1, 2.0):
        assert call("a_lol_kl", kl_beta=beta)[0].item() - base == pytest.approx(beta * log_ratio, rel=1e-9, abs=1e-12)


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
# the keyed cache
# ------------------------------------------------------------------------------------------------------------
def test_cache_recomputes_when_its_key_changes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"advantages": torch.arange(4.0) * len(calls), "ref_logprobs": torch.ones(2, 3)}, {"epoch": len(calls)}

    key = {"model": "m", "data": "d1", "seed": 1}
    tensors, info, hit = alol.cached(key, compute, str(tmp_path))
    assert (len(calls), hit, info) == (1, False, {"epoch": 1})
    tensors2, info2, hit2 = alol.cached(dict(key), compute, str(tmp_path))  # same key: reused, not recomputed
    assert (len(calls), hit2, info2) == (1, True, {"epoch": 1})
    assert torch.equal(tensors2["advantages"], tensors["advantages"])
    assert torch.equal(tensors2["ref_logprobs"], torch.ones(2, 3))
    _, info3, hit3 = alol.cached({**key, "data": "d2"}, compute, str(tmp_path))  # data changed: recomputed
    assert (len(calls), hit3, info3) == (2, False, {"epoch": 2})
    _, _, hit4 = alol.cached({**key, "seed": 2}, compute, str(tmp_path))  # any setting changed: recomputed
    assert (len(calls), hit4) == (3, False)
    _, _, hit5 = alol.cached(key, compute, str(tmp_path), use_cache=False)  # --no-cache: recomputed, overwritten
    assert (len(calls), hit5) == (4, False)
    tensors6, _, hit6 = alol.cached(key, compute, str(tmp_path))
    assert (len(calls), hit6) == (4, True) and torch.equal(tensors6["advantages"], torch.arange(4.0) * 4)
    assert len(list(tmp_path.glob("*.json"))) == 3 and not list(tmp_path.glob("*.tmp"))


def test_cache_checks_the_stored_key(tmp_path):
    """An entry whose stored key differs from the one asked for (a hash collision, a hand-edited file) is not used."""
    calls = []
    compute = lambda: (calls.append(1), ({"x": torch.zeros(1)}, {}))[1]
    alol.cached({"a": 1}, compute, str(tmp_path))
    (entry,) = tmp_path.glob("*.json")
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stored, "key": {"a": 2}}))
    _, _, hit = alol.cached({"a": 1}, compute, str(tmp_path))
    assert not hit and len(calls) == 2


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
    head, history = alol.fit_value_head(hidden, mask, targets, 0.0, 1.0, epochs=6, lr=3e-2, batch_size=16, seed=1)
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    assert len(history) == 6
    first = head(hidden, mask)
    assert torch.equal(first, head(hidden, mask))  # no dropout when scoring
    held_out = ((first[180:] - targets[180:]) ** 2).mean().item()
    assert held_out == pytest.approx(min(history), rel=1e-5)  # the kept epoch is the held-out best
    assert min(history) < ((targets[180:] - targets[:180].mean()) ** 2).mean().item()  # better than the mean
    again, history_again = alol.fit_value_head(hidden, mask, targets, 0.0, 1.0, 6, 3e-2, 16, seed=1)
    assert history_again == history and torch.equal(again(hidden, mask), first)  # seeded: ranks agree


def test_distinct_n():
    assert alol.distinct_n(["a b a b"], 1) == 0.5
    assert alol.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert alol.distinct_n(["a b", "a b"], 2) == 0.5  # over all texts together, not per text
    assert alol.distinct_n([""], 2) == 0.0
