"""Unit tests of pro.py: PRO's loss against a plain Python loop on ragged rankings (candidates of different lengths,
rankings of different lengths in one batch, candidates in any order, garbage in the padding), against the released
batched formula on rankings of one length, ties, gradients; the ranking cut; the presets. CPU, offline, fast."""

import math

import torch
from test_apa_awr_unit import GARBAGE  # padding entries: large values that must not reach the loss or its gradient

import common
import pro

WIDTH = 4
# Three prompts, at most 4 candidates each: per candidate its token log-probs and its reward, in no particular order.
# Prompt 0 has 4 candidates, prompt 1 has 2, prompt 2 has 3 with a tie between two of them.
RANKINGS = [
    [([-0.5, -1.0], 0.2), ([-2.0, -0.25, -1.5, -0.5], 1.5), ([-0.75], -0.4), ([-1.25, -0.5, -1.0], 0.9)],
    [([-3.0, -0.5, -0.25], -1.0), ([-0.125], 0.5)],
    [([-1.0, -2.0], 0.3), ([-0.5, -0.5, -0.5], 0.3), ([-1.5], 1.1)],
]


def tensors(rankings, n=4, width=WIDTH, fill=GARBAGE):
    """[batch, n, width] log-probs (padding and absent candidates = fill) and masks, [batch, n] rewards (absent:
    fill too)."""
    logprobs = torch.full((len(rankings), n, width), fill, dtype=torch.float64)
    mask = torch.zeros(len(rankings), n, width, dtype=torch.float64)
    rewards = torch.full((len(rankings), n), fill, dtype=torch.float64)
    for b, ranking in enumerate(rankings):
        for j, (lp, reward) in enumerate(ranking):
            logprobs[b, j, : len(lp)] = torch.tensor(lp, dtype=torch.float64)
            mask[b, j, : len(lp)] = 1
            rewards[b, j] = reward
    return logprobs, mask, rewards


def loop_loss(rankings, sft_weight):
    """PRO's loss one prompt at a time, from its definition: candidates sorted by reward (stable), r_θ the mean token
    log-prob, term k = log(exp(r_θ(yᵏ)·max_i Δ) + Σ_{i>k} exp(r_θ(yⁱ)·Δᵏ_i)) − r_θ(yᵏ)·max_i Δ with
    Δᵏ_i = r_φ(yᵏ) − r_φ(yⁱ); plus sft_weight · (m − 1)² · the best candidate's summed NLL; the mean over prompts."""
    total = 0.0
    for ranking in rankings:
        ranked = sorted(ranking, key=lambda c: -c[1])  # sorted() is stable: ties keep their order
        scores = [sum(lp) / len(lp) for lp, _ in ranked]
        rewards = [r for _, r in ranked]
        m = len(ranked)
        per_prompt = 0.0
        for k in range(m - 1):
            gaps = [rewards[k] - rewards[i] for i in range(k + 1, m)]
            top = max(gaps)
            denominator = math.exp(scores[k] * top) + sum(
                math.exp(scores[i] * gap) for i, gap in zip(range(k + 1, m), gaps)
            )
            per_prompt += math.log(denominator) - scores[k] * top
        per_prompt += sft_weight * (m - 1) ** 2 * -sum(ranked[0][0])
        total += per_prompt
    return total / len(rankings)


def test_loss_equals_the_loop_on_ragged_rankings():
    logprobs, mask, rewards = tensors(RANKINGS)
    for sft_weight in (0.0, 0.05, 1.0):
        loss, stats = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=sft_weight)
        assert math.isclose(loss.item(), loop_loss(RANKINGS, sft_weight), rel_tol=1e-12)
    assert stats["policy/candidates"].item() == 3.0


def test_candidate_order_does_not_matter():
    logprobs, mask, rewards = tensors(RANKINGS)
    loss, _ = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=0.05)
    permutation = torch.tensor([2, 0, 3, 1])
    permuted, _ = pro.pro_loss(
        logprobs=logprobs[:, permutation], mask=mask[:, permutation], rewards=rewards[:, permutation], sft_weight=0.05
    )
    # prompt 2's tie: both orders of the tied pair give the same terms (a tie adds exp(0) whatever its place)
    assert math.isclose(loss.item(), permuted.item(), rel_tol=1e-12)


def test_padding_and_absent_candidates_get_no_gradient():
    logprobs, mask, rewards = tensors(RANKINGS)
    logprobs.requires_grad_(True)
    loss, _ = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=0.05)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert (logprobs.grad[mask == 0] == 0).all()
    assert (logprobs.grad[mask == 1] != 0).any()


def test_released_formula_on_rankings_of_one_length():
    """The released batched loss (process_manager.py compute_loss: one term per rank k, each the batch mean, summed;
    sorted candidates; SFT on candidate 0, summed log-probs, × sft_weight · (n − 1)²), up to its eps = 1e-10."""
    torch.manual_seed(0)
    batch, n, width = 5, 3, 6
    logprobs = -torch.rand(batch, n, width, dtype=torch.float64) * 3
    lengths = torch.randint(1, width + 1, (batch, n))
    mask = (torch.arange(width)[None, None, :] < lengths[..., None]).double()
    rewards = torch.randn(batch, n, dtype=torch.float64).sort(dim=1, descending=True).values
    sum_scores = (logprobs * mask).sum(-1)
    scores = sum_scores / mask.sum(-1)
    released = 0.0
    for k in range(n - 1):
        neg_temperatures = rewards[:, k].view(-1, 1) - rewards[:, k + 1 :]
        pos_temperature = neg_temperatures.max(dim=1).values
        term = (
            torch.log(
                1e-10
                + torch.exp(scores[:, k] * pos_temperature)
                + torch.exp(scores[:, k + 1 :] * neg_temperatures).sum(1)
            )
            - scores[:, k] * pos_temperature
        )
        released += term.mean()
    released += 0.05 * (n - 1) ** 2 * (-sum_scores[:, 0]).mean()
    loss, _ = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=0.05)
    assert math.isclose(loss.item(), released.item(), rel_tol=1e-8)
    flipped, _ = pro.pro_loss(  # the same rankings given worst first: the rewards rank them
        logprobs=logprobs.flip(1), mask=mask.flip(1), rewards=rewards.flip(1), sft_weight=0.05
    )
    assert math.isclose(flipped.item(), released.item(), rel_tol=1e-8)


def test_a_fully_tied_ranking_is_a_constant_and_trains_only_the_sft_term():
    """Two tied candidates: the temperatures are 0, the ranking term is log 2 whatever π_θ does."""
    rankings = [[([-0.5, -1.0], 0.7), ([-2.0], 0.7)]]
    logprobs, mask, rewards = tensors(rankings, n=2, width=2)
    logprobs.requires_grad_(True)
    loss, stats = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=0.0)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    loss.backward()
    assert (logprobs.grad == 0).all()
    assert stats["policy/ranking_accuracy"].item() == 0.0  # no strictly ordered pair to count


def test_hand_computed_pair():
    """A ranking of 2 with reward gap 2: −log σ(2·(r_θ(y¹) − r_θ(y²))) plus sft_weight · 1 · NLL(y¹)."""
    rankings = [[([-1.0, -3.0], 0.0), ([-0.5], 2.0)]]  # the second candidate is the better one
    logprobs, mask, rewards = tensors(rankings, n=2, width=2)
    loss, stats = pro.pro_loss(logprobs=logprobs, mask=mask, rewards=rewards, sft_weight=0.1)
    best, worst = -0.5, -2.0  # mean log-probs
    expected = -math.log(1 / (1 + math.exp(-2 * (best - worst)))) + 0.1 * 0.5
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    assert stats["policy/ranking_accuracy"].item() == 1.0
    assert math.isclose(stats["policy/sft_nll"].item(), 0.5)


def test_rank_and_cut_sorts_stably_and_keeps_the_best():
    candidates = [["a", "b", "c", "d"], ["e", "f"]]
    rewards = [[0.1, 0.9, 0.1, 0.5], [1.0, 2.0]]
    ranked, ranked_rewards = pro.rank_and_cut(candidates, rewards, ranking_len=0)
    assert ranked == [["b", "d", "a", "c"], ["f", "e"]]
    assert ranked_rewards == [[0.9, 0.5, 0.1, 0.1], [2.0, 1.0]]
    ranked, ranked_rewards = pro.rank_and_cut(candidates, rewards, ranking_len=2)
    assert ranked == [["b", "d"], ["f", "e"]]
    assert ranked_rewards == [[0.9, 0.5], [2.0, 1.0]]


# presets


def test_hh_1b_preset_is_the_released_pro_setting():
    """The A-LoL work's PRO script (pro_qlora_llama_hh.py) and PRO's HH data, on Pythia 1B; a flag still wins."""
    args = common.parse_args(pro.Args, pro.PRESETS, argv=["--preset", "hh-1b", "--learning-rate", "1e-5"])
    expected = dict(
        preset="hh-1b",
        model_name_or_path="Dahoas/pythia-1B-static-sft",
        offline_dataset="Anthropic/hh-rlhf",
        score_candidates=True,
        ranking_len=2,
        sft_weight=0.05,
        dataset="Anthropic/hh-rlhf",
        eval_prompts=280,
        max_prompt_length=640,
        max_new_tokens=128,
        stop_strings=["Human:", "Assistant:"],
        bf16=True,
        lora_r=64,
        lora_alpha=16.0,
        lora_dropout=0.05,
        reward_model=["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"],
        mini_batch_size=16,
        total_steps=9000,
        learning_rate=1e-5,
        lr_warmup_steps=0,
        adam_betas=(0.9, 0.999),
        adam_eps=1e-6,
        weight_decay=0.01,
        eval_every=900,
        max_grad_norm=0.3,
    )
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.reward_device == "policy"  # the device layout stays in launch.sh
    assert pro.PRESETS["hh-125m"]["model_name_or_path"] == "Dahoas/pythia-125M-static-sft"
    assert pro.PRESETS["hh-6b"]["model_name_or_path"] == "Dahoas/pythia-6B-static-sft"
