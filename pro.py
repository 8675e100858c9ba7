"""PRO: Preference Ranking Optimization, offline, on rankings of n candidate responses per prompt.

Paper: Song, Yu, Li, Yu, Huang, Li, Wang, "Preference Ranking Optimization for Human Alignment", AAAI 2024, arXiv
2306.17492. Released code: https://github.com/AlibabaResearch/DAMO-ConvAI/tree/main/PRO. A baseline of the A-LoL paper
(Baheti et al. 2024, arXiv 2305.14718), whose released code has its own PRO script (abaheti95/LoL-RL).

The algorithm, in the paper's notation. A prompt x comes with n candidate responses, ranked best first by a reward
model r_φ: y¹ ≻ y² ≻ … ≻ yⁿ. No reference model: the policy π_θ scores each candidate by its length-normalised
log-likelihood r_θ(x, y) = (1/|y|) Σ_t log π_θ(y_t | x, y_<t), and learns to rank them as r_φ does.
- The ranking loss L_PRO: the best candidate should win the softmax over all n, then the second best over the n − 1
  left, and so on down the ranking:
      L_PRO = − Σ_{k=1}^{n−1} log [ exp(r_θ(x, yᵏ) / Tᵏ_k) / Σ_{i=k}^{n} exp(r_θ(x, yⁱ) / Tᵏ_i) ].
- Dynamic temperatures from the reward gaps: 1/Tᵏ_i = r_φ(x, yᵏ) − r_φ(x, yⁱ) for i > k (a candidate far below yᵏ
  is pushed down harder), and 1/Tᵏ_k = max_{i>k} 1/Tᵏ_i (Tᵏ_k = min_{i>k} Tᵏ_i).
- The SFT term keeps the policy on the best candidate: L = L_PRO + β · L_SFT, L_SFT = −log π_θ(y¹ | x).
Training is offline: the rankings are fixed (read from the dataset, or scored once by --reward-model and cached:
those of the rankings a run reads), never sampled from π_θ. The paper names these losses; this file names them too
(their equation numbers were not checked).

As in the released training loss (PRO/train/utils/process_manager.py at commit 483554e, "released" below):
- r_θ: the sum of the response's token log-probs over its length:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/utils/process_manager.py#L80-L89
- the temperatures as reward differences multiplying r_θ, the positive's the largest difference, one loss per rank k
  averaged over the batch and summed over k:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/utils/process_manager.py#L91-L102
- the SFT term: the best candidate's NLL SUMMED over its tokens (not length-normalised), weighted by
  sft_weight · (n − 1)², the paper's β (where the code and the paper's text differ, the code is followed):
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/utils/process_manager.py#L104-L108
- ties: a candidate tied with yᵏ gets the temperature difference 0, so it adds the constant exp(0) to yᵏ's softmax
  and is neither pushed nor pulled by it; a rank whose lower candidates all tie with it gives a constant (no gradient)
- the ranking: the candidates sorted by the reward model's raw logits, best first; the SFT candidate the best one;
  HH's rankings of length 2 (hh-rlhf's two replies re-ranked by the reward model), sft_weight 0.05:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/hh_preprocess_data/step_2_gen_train_data.py#L34-L46
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/hh_preprocess_data/step_2_gen_train_data.py#L104-L105
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/README.md?plain=1#L57
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/train_hh.sh#L19
- --ranking-len N keeps each ranking's N best candidates, as the released collator keeps the first N of a sorted row:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/utils/data_manager.py#L61
Where this file differs from the released code:
- the softmax is a logsumexp; released, log(1e-10 + Σ exp(·)), whose sum underflows to the 1e-10 in float32 when
  r_θ times a large reward gap is very negative:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/utils/process_manager.py#L98
- rankings of different lengths share a mini-batch (absent candidates are masked out) and the SFT weight uses each
  ranking's own n; released, every ranking of a run has the same length
- the loss of a mini-batch is the mean over its prompts of (Σ_k L_PRO,k + SFT term); released, the mean over the
  batch of each rank's term, summed over k: the same number when all rankings have one length
- the presets follow the A-LoL work's PRO script (LoRA adapter, lr 2e-4 constant, 16 rankings a step, 9000 steps,
  gradient clip 0.3, AdamW β2 0.999 and ε 1e-6, prompts cut to 640 tokens and replies to 128):
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/pro_qlora_llama_hh.py#L44-L79
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/pro_qlora_llama_hh.py#L227-L230
  PRO's own HH run trains all of LLaMA-7B with lr 5e-6:
  https://github.com/AlibabaResearch/DAMO-ConvAI/blob/483554eae102996f5ec1f4feab4e78ef29c2a394/PRO/train/train_hh.sh#L23

    python pro.py                                           # PRO on the built-in rankings of 4 scored SFT samples
    python pro.py --ranking-len 2                           # each ranking's two best candidates only
    torchrun --nproc_per_node 2 pro.py --zero-stage 3       # two processes (CPU or GPUs)
    python pro.py --preset hh-1b --reward-device cuda:1     # the A-LoL work's PRO setting on Pythia 1B (GPUs)
"""

import functools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from transformers import GenerationConfig

import common
from common import Batch

CACHE_VERSION = 3  # raise when what the cache holds, or how it is computed, changes


# The math: PRO's ranking loss with its temperatures and SFT term, the ranking cut;
# functions of tensors, each unit-tested.
class PROLoss(NamedTuple):
    loss: torch.Tensor  # the mean over prompts of Σ_k L_PRO,k + the SFT term (with grad)
    stats: dict  # detached scalars, keyed by their log names


def pro_loss(logprobs, mask, rewards, sft_weight) -> PROLoss:
    """PRO's loss on rankings of n candidates: `logprobs` and `mask` [batch, n, len] per-token log-probs (with grad)
    and response masks, `rewards` [batch, n] (higher is better). Candidates come in any order; the rewards rank them
    (a stable sort: tied candidates keep their order). A candidate whose mask is all zero is absent, so rankings of
    different lengths share a batch. Per prompt with m present candidates ranked y¹ … yᵐ:
        Σ_{k<m} [ logsumexp({r_θ(yᵏ)·Δᵏ_max} ∪ {r_θ(yⁱ)·Δᵏ_i : i > k}) − r_θ(yᵏ)·Δᵏ_max ]
        + sft_weight · (m − 1)² · (−Σ_t log π_θ(y¹_t)),
    with r_θ the length-normalised log-likelihood, Δᵏ_i = r_φ(yᵏ) − r_φ(yⁱ) (= 1/Tᵏ_i) and Δᵏ_max = max_{i>k} Δᵏ_i;
    `loss` is its mean over prompts. Padding may hold anything, even inf."""
    real = mask.bool()
    present = real.any(-1)  # [batch, n]
    if not present.sum(-1).ge(1).all():
        raise ValueError("every prompt needs at least one candidate")
    lp = torch.where(real, logprobs, torch.zeros_like(logprobs))
    sums = lp.sum(-1)  # log π_θ(y|x), [batch, n]
    lengths = real.sum(-1).clamp(min=1)
    scores = sums / lengths  # PRO: r_θ(x, y), the length-normalised log-likelihood
    # Rank the candidates: best first, absent ones last (a stable sort keeps tied candidates in their order)
    key = torch.where(present, rewards, torch.full_like(rewards, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    present = present.gather(1, order)
    scores = scores.gather(1, order)
    sums = sums.gather(1, order)
    ranked = torch.where(present, rewards.gather(1, order), torch.zeros_like(rewards))
    n = present.shape[1]
    below = torch.ones(n, n, dtype=torch.bool, device=present.device).triu(1)  # [k, i]: i ranked below k
    lower = below & present[:, None, :] & present[:, :, None]  # [batch, k, i]: present yⁱ below present yᵏ
    gaps = (ranked[:, :, None] - ranked[:, None, :]).to(scores.dtype)  # PRO: 1/Tᵏ_i = r_φ(yᵏ) − r_φ(yⁱ)
    gaps = torch.where(lower, gaps, torch.zeros_like(gaps))
    top_gap = gaps.amax(-1)  # PRO: 1/Tᵏ_k = max_{i>k} 1/Tᵏ_i, the dynamic temperature of yᵏ
    others = torch.where(lower, scores[:, None, :] * gaps, torch.full_like(gaps, float("-inf")))
    logits = torch.cat([(scores * top_gap)[:, :, None], others], dim=-1)  # [batch, k, 1 + n]
    per_rank = logits.logsumexp(-1) - scores * top_gap  # PRO: L_PRO's term k, −log softmax of yᵏ over {yᵏ … yⁿ}
    ranks = lower.any(-1)  # a rank k counts when a present candidate lies below it
    ranking_loss = torch.where(ranks, per_rank, torch.zeros_like(per_rank)).sum(-1)  # PRO: L_PRO = Σ_k term k
    m = present.sum(-1).to(scores.dtype)
    sft_nll = -sums[:, 0]  # −log π_θ(y¹|x), summed over tokens
    sft = sft_weight * (m - 1) ** 2 * sft_nll  # PRO: β · L_SFT, β = sft_weight · (n − 1)²
    loss = (ranking_loss + sft).mean()  # PRO: L = L_PRO + β · L_SFT, the mean over prompts
    with torch.no_grad():
        wins = (scores[:, :, None] > scores[:, None, :]) & lower & (gaps > 0)  # r_θ orders a pair as r_φ does
        stats = {
            "policy/ranking_loss": ranking_loss.mean().detach(),
            "policy/sft_loss": sft.mean().detach(),
            "policy/sft_nll": sft_nll.mean().detach(),
            "policy/ranking_accuracy": wins.sum() / (lower & (gaps > 0)).sum().clamp(min=1),
            "policy/best_score": scores[:, 0].mean().detach(),
            "policy/candidates": m.mean(),
        }
    return PROLoss(loss=loss, stats=stats)


def rank_and_cut(candidates, rewards, ranking_len):
    """Each ranking sorted best first by its rewards (stable: ties keep the dataset's order), cut to its
    `ranking_len` best candidates (0: all)."""
    ranked_candidates = []
    ranked_rewards = []
    for row_candidates, row_rewards in zip(candidates, rewards):
        order = sorted(range(len(row_rewards)), key=lambda i: -row_rewards[i])
        if ranking_len:
            order = order[:ranking_len]
        ranked_candidates.append([row_candidates[i] for i in order])
        ranked_rewards.append([row_rewards[i] for i in order])
    return ranked_candidates, ranked_rewards


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    sft_weight: float = 0.05
    """β / (n − 1)²: the SFT term is sft_weight · (n − 1)² · (−log π_θ(y¹|x)), n the ranking's length (released 0.05)"""
    ranking_len: int = 0
    """train on each ranking's N best candidates (0: all of them; at least 2)"""
    score_candidates: bool = False
    """rank the candidates by --reward-model's raw scores instead of the dataset's rewards (PRO's HH data: hh-rlhf's
    two replies re-ranked by the reward model)"""
    total_steps: int = 30
    """optimiser steps"""
    mini_batch_size: int = 8
    """rankings (prompts, each with all its candidates) per rank per optimiser step"""
    micro_batch_size: int = 0
    """rankings per rank per forward/backward pass, a divisor of --mini-batch-size (0: the whole mini-batch in one):
    the step's gradient accumulates over them, each pass's loss weighted by its share of the rankings"""
    learning_rate: float = 2e-5
    """policy learning rate (AdamW)"""
    adam_eps: float = 1e-8
    """AdamW's ε, added to √v̂ in the update's denominator (released A-LoL PRO HH: 1e-6)"""
    reward_transform: Literal["sigmoid", "none"] = "sigmoid"
    """applied to each reward model's raw score in evaluation: sigmoid(logit), as PRO's and A-LoL's HH evaluations;
    the rankings' rewards stay raw (the temperatures are their differences)"""

    # Models and data
    reward_model: list[str] = field(default_factory=lambda: ["builtin"])
    """reward(s), summed: 1-output classifiers (hub name, folder, `builtin`), `module:function` callables and/or URLs;
    they score the evaluation's responses (and the candidates with --score-candidates)"""
    offline_dataset: str = "builtin"
    """rankings: {prompt, responses, rewards}, PRO's {prefix, suffix, reward}, or preference rows (rankings of 2);
    hub, path, builtin"""
    offline_split: str = "train"
    """the split of --offline-dataset trained on"""
    dataset: str = "builtin"
    """prompts for evaluation: a hub name, a save_to_disk folder, a .jsonl/.json file, builtin"""
    forward_batch_size: int | None = None
    """rows per no-grad pass / generate call (scoring candidates, evaluation); default --micro-batch-size, or 64"""
    cache_dir: str | None = None
    """where --score-candidates' scores are cached, per candidate: a run scores those of the rankings its
    --total-steps read that the cache lacks (default $ONEFILE_RLHF_CACHE/pro or ~/.cache/onefile-rlhf/pro)"""
    no_cache: bool = False
    """rescore the candidates this run reads even when cached (the entry is overwritten with them)"""

    # Logging and checkpoints
    exp_name: str = "pro"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (the order in which the rankings are visited)"""
    eval_every: int = 10
    """evaluate on held-out prompts (and print a progress line) every this many steps, and before and after"""


# The A-LoL work's PRO setting on HH (released pro_qlora_llama_hh.py, lines linked above and below): PRO's HH data
# (hh-rlhf's chosen and rejected replies, re-ranked by the OpenAssistant reward model's raw logits: rankings of 2),
# sft_weight 0.05 (L113), 2 rankings × 8 accumulation steps a step (L57-L58), 9000 steps (L76), lr 2e-4 (L49),
# constant (L54, L373: transformers' get_scheduler("constant") takes no warm-up, so the 300 warm-up steps of L55 and
# L372 never act), bitsandbytes' paged AdamW (L44, L369-L371) with betas (0.9, 0.999) and ε 1e-6 (L45-L47) and its
# own weight decay 0.01 (the script's weight_decay, L48, never reaches the optimiser; see dpo.py's HH preset for the
# library lines), gradient clip 0.3 (L52), prompts cut to 768 − 128 tokens and replies to 128 (L227-L230), evaluated
# every 900 steps (L79) by greedy decoding on 280 test prompts, sigmoid of the same reward model. The released run
# goes on training the SFT adapter it loads (timdettmers/qlora-hh-rlhf-7b on 4-bit LLaMA-7B, L42, L304); its
# lora_r / lora_alpha / lora_dropout fields (L65-L69) are never read. Here a fresh adapter (r 64, α 16, dropout 0.05:
# the values of those unread fields) on Dahoas' Pythia SFT policies, 16-bit base weights (add --load-in-4bit on a GPU
# for QLoRA). https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/pro_qlora_llama_hh.py
# Devices (--reward-device) are chosen by launch.sh.
HH = dict(
    offline_dataset="Anthropic/hh-rlhf",  # HH transcripts: rankings of 2, re-ranked by the reward model below
    score_candidates=True,
    ranking_len=2,
    sft_weight=0.05,
    dataset="Anthropic/hh-rlhf",
    eval_split="test",
    eval_prompts=280,
    max_prompt_length=640,  # released: prompts cut to 768 − 128 tokens, replies to 128
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    bf16=True,
    lora_r=64,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_target_modules=["all-linear"],
    reward_model=["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"],  # PRO's and A-LoL's HH reward model
    reward_transform="sigmoid",
    mini_batch_size=16,  # released: 2 rankings a pass × 8 accumulation steps
    total_steps=9000,
    learning_rate=2e-4,
    adam_betas=(0.9, 0.999),
    adam_eps=1e-6,
    weight_decay=0.01,
    max_grad_norm=0.3,
    eval_every=900,
)
PRESETS = {
    f"hh-{size}": dict(HH, model_name_or_path=f"Dahoas/pythia-{name}-static-sft")
    for size, name in [("125m", "125M"), ("1b", "1B"), ("6b", "6B")]
}


@torch.no_grad()
def generate(policy, *, query_ids, query_mask, generation_config, zero3):
    """Decode responses with the KV cache. Under ZeRO-3 the policy's shards are gathered once for the whole call,
    and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    model = getattr(policy, "module", policy)  # the HF model inside a DeepSpeed engine
    with common.gathered_for_generation(policy, zero3):
        out = model.generate(
            input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config, synced_gpus=zero3
        )
    return out[:, query_ids.shape[1] :]


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    return [
        tokenizer.decode(row[: int(n)], skip_special_tokens=False)
        for row, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())
    ]


def encode_rankings(tokenizer, prompts, rankings, *, encode: dict, device) -> Batch:
    """Rankings (lists of candidate texts, padded to one length n with None for absent candidates) as one Batch of
    len(prompts) × n rows, prompt-major; an absent candidate's response mask is all zero. `encode`: the keyword
    arguments of common.encode_offline_rows (prompt and response lengths, context, chat template)."""
    rows = [(prompt, text) for prompt, ranking in zip(prompts, rankings) for text in ranking]
    batch = common.encode_offline_rows(
        tokenizer,
        [prompt for prompt, _ in rows],
        [text if text is not None else "" for _, text in rows],
        device=device,
        **encode,
    )
    absent = torch.tensor([text is None for _, text in rows], device=device)
    return batch._replace(response_mask=batch.response_mask.masked_fill(absent[:, None], 0.0))


class ProxyReward(NamedTuple):
    """The reward Σ_i w_i · transform(r_i), r_i from the i-th --reward-model: it ranks the candidates (raw, no
    transform) and scores the evaluation's responses."""

    fns: list  # a model or module:function per --reward-model
    weights: list  # w_i, one per reward function
    transform: str  # "sigmoid": sigmoid(r_i), as in A-LoL HH; "none": r_i


def score(reward: ProxyReward, batch: Batch, prompts) -> torch.Tensor:
    """The reward of each row, [rows]: each reward function reads the token ids and the `prompts` as given."""
    total = torch.zeros(len(batch.query_ids))
    for weight, reward_fn in zip(reward.weights, reward.fns):
        raw = reward_fn(*batch._replace(response_mask=batch.response_mask.long()), prompts=prompts)
        total += weight * (torch.sigmoid(raw) if reward.transform == "sigmoid" else raw)
    return total


@torch.no_grad()
def score_candidates(positions, *, rows, tokenizer, encode: dict, reward: ProxyReward, args: Args, run: common.Run):
    """r_φ of the candidates `rows[positions]`, each row a (prompt, candidate text): {"scores": [n]}, the weighted
    raw scores (no --reward-transform). Each rank scores a share of them; every rank then gets them all."""
    if run.rank == 0:
        print(f"scoring {len(positions)} candidates ({len(rows) - len(positions)} cached)", flush=True)
    wanted = [rows[k] for k in positions.tolist()]
    shared = list(range(len(wanted)))[run.rank :: run.world_size]  # this rank's share, as positions in `wanted`
    mine = []
    for start in common.progress(
        range(0, len(shared), args.forward_batch_size), desc="scoring candidates", enabled=args.progress
    ):
        chunk = shared[start : start + args.forward_batch_size]
        prompts = [wanted[k][0] for k in chunk]
        batch = encode_rankings(tokenizer, prompts, [[wanted[k][1]] for k in chunk], encode=encode, device=run.device)
        mine += zip(chunk, score(reward._replace(transform="none"), batch, prompts).tolist())
    gathered = [None] * run.world_size
    dist.all_gather_object(gathered, mine)
    scores = torch.zeros(len(wanted))
    for part in gathered:
        for k, value in part:
            scores[k] = value
    return {"scores": scores}


class EvalData(NamedTuple):
    """What an evaluation reads besides the policy: this rank's share of the held-out prompts."""

    prompts: list  # token ids of each held-out prompt
    texts: list  # each prompt as the dataset gave it: the reward models read them
    gold_score: object  # the built-in task's gold score of response texts, or None


@torch.no_grad()
def evaluate(step: int, *, policy, tokenizer, data: EvalData, reward: ProxyReward, greedy, args: Args, run, log):
    """Greedy responses to held-out prompts, cut after EOS and at the stop strings: proxy reward, gold score,
    distinct-1/2, length. Means over all ranks."""
    stats = []
    texts = []
    samples = []  # rank 0's first --log-samples responses, for log.samples
    policy.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
    for start in common.progress(
        range(0, len(data.prompts), args.forward_batch_size), desc="evaluate", enabled=args.progress
    ):
        prompts = data.texts[start : start + args.forward_batch_size]
        query_ids, query_mask = common.pad_left(
            data.prompts[start : start + args.forward_batch_size], tokenizer.pad_token_id, run.device
        )
        response_ids = generate(
            policy, query_ids=query_ids, query_mask=query_mask, generation_config=greedy, zero3=args.zero_stage == 3
        )
        response_ids, response_mask, _ = common.truncate_after_eos(
            response_ids,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            tokenizer=tokenizer,
            stop_strings=args.stop_strings,
        )
        batch = Batch(query_ids, query_mask, response_ids, response_mask)
        kept = decode_responses(tokenizer, batch.response_ids, batch.response_mask)
        gold = torch.tensor(data.gold_score(kept) if data.gold_score else [0.0] * len(kept))
        lengths = batch.response_mask.sum(1).float().cpu()
        scores = score(reward, batch, prompts)
        stats.append(torch.stack([scores, lengths, gold], 1))
        samples += common.sample_rows(
            args.log_samples - len(samples),
            prompt=prompts,
            rendered_prompt=common.rendered_prompts(tokenizer, query_ids, query_mask),
            response=kept,
            score=scores,
            gold_score=gold if data.gold_score else None,
        )
        texts += [text.replace(tokenizer.eos_token, " ") if tokenizer.eos_token else text for text in kept]
    names = ["eval/reward", "eval/response_length", "eval/gold_score"]
    metrics = dict(zip(names, torch.cat(stats).mean(0).tolist()))
    if data.gold_score is None:
        metrics.pop("eval/gold_score")
    gathered = [None] * run.world_size  # distinct-n over every rank's responses, not a mean of per-rank ratios
    dist.all_gather_object(gathered, texts)
    texts = [text for part in gathered for text in part]
    policy.train()
    log.samples(step, samples)
    return {
        **common.mean_across_ranks(metrics),
        "eval/distinct_1": common.distinct_n(texts, 1),
        "eval/distinct_2": common.distinct_n(texts, 2),
    }


def ordered_pairs(rankings, rewards) -> int:
    """The pairs of present candidates (not None) of `rankings` whose `rewards` [batch, n] differ, counted over all
    rankings: the pairs pro_loss's ranking accuracy is the fraction of."""
    present = torch.tensor([[text is not None for text in ranking] for ranking in rankings])
    both = present[:, :, None] & present[:, None, :]
    return int(((rewards[:, :, None] > rewards[:, None, :]) & both).sum())


class PROStep(NamedTuple):
    terms: PROLoss  # the mini-batch's loss and statistics, without gradient
    tokens: int  # response tokens of the mini-batch's candidates


def update(policy, tokenizer, *, prompts, candidates, rewards, idx, encode: dict, args: Args, device) -> PROStep:
    """One optimiser step on the rankings `idx` (steps 3-5 of the training loop; `prompts`, `candidates` and
    `rewards` of every ranking, the candidates padded with None to one length n). PRO's loss (ranking terms and SFT
    term) and its statistics are means over the rankings of per-ranking terms, so the mini-batch is taken in
    micro-batches of --micro-batch-size rankings, each one's loss weighted by its share of the rankings: the
    accumulated gradient is the whole mini-batch's. The ranking accuracy, a fraction of the ordered pairs, is
    weighted by the micro-batch's share of those pairs."""
    n = len(candidates[0])
    mini_pairs = ordered_pairs([candidates[i] for i in idx], rewards[idx])
    total = None
    tokens = 0
    for micro in common.micro_batches(idx, args.micro_batch_size):
        rankings = [candidates[i] for i in micro]
        batch = encode_rankings(tokenizer, [prompts[i] for i in micro], rankings, encode=encode, device=device)
        # 3. π_θ's per-token log-probs of every candidate, as [prompts, candidates, response_len]
        logprobs = common.forward_logprobs(policy, *batch)
        shape = (len(micro), n, -1)
        # 4. PRO's ranking loss with the reward-gap temperatures, plus the SFT term on the best candidate
        loss, stats = pro_loss(
            logprobs=logprobs.reshape(shape),
            mask=batch.response_mask.reshape(shape),
            rewards=rewards[micro].to(device),
            sft_weight=args.sft_weight,
        )
        # 5. The micro-batch's part of the gradient; the engine steps the optimiser after the mini-batch's last
        share = len(micro) / len(idx)
        policy.backward(loss * share, scale_wrt_gas=False)
        policy.step()
        pair_share = ordered_pairs(rankings, rewards[micro]) / mini_pairs if mini_pairs else share
        shares = {name: pair_share if name == "policy/ranking_accuracy" else share for name in stats}
        weighted = PROLoss(
            loss=loss.detach() * share, stats={name: value * shares[name] for name, value in stats.items()}
        )
        if total is not None:
            weighted = PROLoss(
                loss=total.loss + weighted.loss,
                stats={name: total.stats[name] + weighted.stats[name] for name in stats},
            )
        total = weighted
        tokens += int(batch.response_mask.sum().item())
    return PROStep(terms=total, tokens=tokens)


if __name__ == "__main__":
    # Parse the command line (--preset NAME: a paper setting as the defaults)
    args = common.parse_args(Args, PRESETS)
    # no-grad passes bounded as the training passes are (--micro-batch-size), else by 64 rows
    args = replace(args, forward_batch_size=args.forward_batch_size or args.micro_batch_size or 64)

    # Validate the ranking length, then start the run (reward weights, LoRA flags, the process group, --resume)
    if args.ranking_len == 1 or args.ranking_len < 0:
        common.fail(f"--ranking-len {args.ranking_len}: a ranking needs at least 2 candidates (0 keeps them all)")
    run = common.start_run(args, "pro.py")
    rank = run.rank
    world_size = run.world_size
    device = run.device
    zero3 = args.zero_stage == 3
    weights = torch.tensor(args.reward_weights or [1.0] * len(args.reward_model))

    # Read the rankings and check them before any model is loaded
    train_texts, candidates, rewards = common.load_rankings(
        args.offline_dataset, args.offline_split, held_out=(args.dataset, args.eval_split)
    )
    train_texts = [prompt if isinstance(prompt, list) else str(prompt) for prompt in train_texts]  # text / chat

    # Seed: one seed while loading (the same weights on every rank) and for the order of the rankings
    torch.manual_seed(args.seed)

    # Load the policy, the tokenizer and the reward models
    place = common.Placement.of(args)  # the settings every model is loaded and placed with
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy")
    reward_fns = [place.reward(name, tokenizer, at=args.reward_device) for name in args.reward_model]
    log = common.make_logger(args, run.name, rank)

    # Place the policy: frozen lower blocks, LoRA, the DeepSpeed engine with its optimizer and schedule
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    common.freeze_lower_layers(policy, args.unfrozen_layers)
    common.gradient_checkpointing(policy, args.gradient_checkpointing)
    policy = common.add_lora(
        policy,
        kind="causal",
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        quantized=args.load_in_4bit,
    )
    schedule = common.lr_schedule(args.lr_warmup_steps, args.total_steps, args.lr_schedule)
    policy = place.trainable(policy, at="policy", lr=args.learning_rate, schedule=schedule)
    policy.eval()  # eval mode while decoding; the training loop switches to train mode
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    # Data: each mini-batch of rankings is encoded when it is used, as one Batch of prompts × candidates rows; the
    # prompts evaluated
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=policy.module.config.max_position_embeddings,  # GPT-2's n_positions is mapped to it
        chat_template=args.chat_template,
    )
    kept = common.fitting_prompts(tokenizer, train_texts, what="rankings", **encode)
    train_texts, candidates, rewards = common.rows_at(kept, train_texts, candidates, rewards)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    kept = common.fitting_prompts(tokenizer, eval_texts, what="evaluation prompts", **encode)
    eval_texts = [eval_texts[i] for i in kept]
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size  # equal per rank: lockstep
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    if n_eval == 0:
        common.fail(
            f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another "
            f"--eval-split or raise --eval-prompts"
        )
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    reward = ProxyReward(fns=reward_fns, weights=weights.tolist(), transform=args.reward_transform)

    per_step = args.mini_batch_size * world_size
    if len(candidates) < per_step:
        common.fail(
            f"{len(candidates)} rankings are fewer than --mini-batch-size {args.mini_batch_size} × {world_size} "
            f"rank(s); lower --mini-batch-size"
        )
    # The order of the rankings: epochs of one shuffle per epoch, the same on every rank; rank r takes every
    # world_size-th ranking of a step's share
    epochs = -(-args.total_steps * per_step // len(candidates))
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(candidates), generator=generator) for _ in range(epochs)])
    read = order[: args.total_steps * per_step].unique()  # the rankings this run trains on

    # ALGO LOGIC, step 1 (once per run, before training): r_φ of each candidate (read from the dataset, or scored by
    # --reward-model: those of the rankings this run reads only, not of the whole file), and each ranking sorted best
    # first, y¹ ≻ y² ≻ … ≻ yⁿ, cut to its --ranking-len best
    t0 = time.time()
    n_scored = 0
    if args.score_candidates:
        pairs = [(i, j) for i in read.tolist() for j in range(len(candidates[i]))]  # (ranking, candidate)
        rows = [(train_texts[i], candidates[i][j]) for i, j in pairs]
        # The scores depend on the reward models, their weights and precision, and each row as encoded (the
        # policy's tokenizer and prompt settings); cached per candidate under a key of all of them, since scoring is
        # the slow part here
        key = dict(
            version=CACHE_VERSION,
            reward_models=[common.fingerprint(name, "reward") for name in args.reward_model],
            reward_weights=weights.tolist(),
            reward_dtype=args.reward_dtype,
            bf16=args.bf16,
            policy=common.fingerprint(args.model_name_or_path, "sft"),
            max_prompt_length=args.max_prompt_length,
            max_new_tokens=args.max_new_tokens,
            chat_template=tokenizer.chat_template if args.chat_template else None,
        )
        digests = [common.json_digest([prompt, text]) for prompt, text in rows]
        cache_dir = common.cache_folder(args.cache_dir, "pro")
        compute = functools.partial(
            score_candidates, rows=rows, tokenizer=tokenizer, encode=encode, reward=reward, args=args, run=run
        )
        cache, n_scored = common.cached_rows(key, digests, compute, cache_dir, use_cache=not args.no_cache, rank=rank)
        for (i, j), value in zip(pairs, cache["scores"].tolist()):
            rewards[i][j] = value
    candidates, rewards = rank_and_cut(candidates, rewards, args.ranking_len)
    known = read.tolist() if args.score_candidates else range(len(candidates))  # the rankings whose rewards are known
    tied = sum(rewards[i][0] == rewards[i][-1] for i in known)  # every candidate of the ranking has the same reward
    if tied == len(known):
        common.fail(
            f"every ranking of '{args.offline_dataset}' ties (all its candidates have one reward): PRO has nothing to "
            f"rank; give rewards that differ, or --score-candidates"
        )
    n_max = max(len(row) for row in candidates)
    lengths = [len(candidates[i]) for i in known]
    gaps = [rewards[i][0] - rewards[i][-1] for i in known]  # best − worst reward of each ranking
    reward_sum = sum(sum(rewards[i]) for i in known)
    candidates = [row + [None] * (n_max - len(row)) for row in candidates]
    rewards = torch.tensor([row + [0.0] * (n_max - len(row)) for row in rewards])
    data_stats = {
        "data/rankings": len(candidates),
        "data/candidates_mean": sum(lengths) / len(lengths),
        "data/tied_rankings": tied,
        "data/reward_mean": reward_sum / sum(lengths),
        "data/reward_gap_mean": sum(gaps) / len(gaps),
    }
    scored = ""
    if args.score_candidates:
        scored = (
            f"; scored the {len(pairs)} candidates of the {len(known)} rankings read ({n_scored} computed, "
            f"{len(pairs) - n_scored} cached)"
        )
    if rank == 0:
        print(
            f"{run.name}: {world_size} rank(s), PRO on {len(candidates)} rankings of {min(lengths)}-{max(lengths)} "
            f"candidates ({tied} all tied: SFT term only){scored} "
            f"({time.time() - t0:.0f} s); {args.total_steps} steps",
            flush=True,
        )

    # Evaluate: greedy responses to held-out prompts
    eval_data = EvalData(prompts=eval_prompts, texts=eval_texts, gold_score=gold_score)
    evaluation = dict(
        policy=policy, tokenizer=tokenizer, data=eval_data, reward=reward, greedy=greedy, args=args, run=run, log=log
    )

    # Resume: `resume/` holds the policy engine with its optimizer, the step (the order above is fixed by the seed)
    # and each rank's RNG states
    engines = {"policy": policy}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    state = common.load_resume(args.resume, engines, rank) if args.resume else {}
    if args.resume:
        eval_history = state["eval_history"]
    else:
        eval_history = [(0, evaluate(0, **evaluation))]
        log(0, {**data_stats, **eval_history[0][1]})
    if rank == 0:
        print("before training: " + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items()), flush=True)

    # ALGO LOGIC, steps 2-5: the rankings are fixed above (step 1); each step trains on one mini-batch of them
    start_time = time.time()
    window = []
    policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for step in common.progress(
        range(state.get("step", 0) + 1, args.total_steps + 1), desc="steps", enabled=args.progress
    ):
        t_step = time.time()
        # 2. The step's rankings: this rank's share of the next mini-batch of the shuffled order
        idx = order[(step - 1) * per_step : step * per_step][rank::world_size]
        # 3-5. π_θ's log-probs of every candidate, PRO's loss and one optimiser step on the mini-batch
        done = update(
            policy,
            tokenizer,
            prompts=train_texts,
            candidates=candidates,
            rewards=rewards,
            idx=idx,
            encode=encode,
            args=args,
            device=device,
        )
        loss, stats = done.terms

        # Statistics, evaluation, logging, and a resumable checkpoint when due
        metrics = {"policy/loss": loss.item(), **{k: v.item() for k, v in stats.items()}}
        window.append([time.time() - t_step, done.tokens * world_size])
        metrics = common.mean_across_ranks(metrics)
        metrics["time/update"] = window[-1][0]  # seconds: this step's passes, backward and optimiser step
        common.check_finite(metrics, step, run.resume_path)  # before evaluating (decoding) from NaN weights
        if step % args.eval_every == 0 or step == args.total_steps:
            seconds, tokens = torch.tensor(window).sum(0).tolist()
            t_eval = time.time()
            eval_history.append((step, evaluate(step, **evaluation)))
            metrics.update(eval_history[-1][1])
            metrics["time/eval"] = time.time() - t_eval
            metrics["time/steps_per_s"] = len(window) / seconds
            metrics["time/tokens_per_s"] = tokens / seconds
            window = []
        metrics["time/iteration"] = time.time() - t_step  # seconds: the whole step, an evaluation included
        metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
        log(step, metrics)
        if rank == 0 and "eval/reward" in metrics:
            gold = f" gold {metrics['eval/gold_score']:+.3f}" if gold_score else ""
            print(
                f"step {step:5d}/{args.total_steps} loss {metrics['policy/loss']:.4f} ranking "
                f"{metrics['policy/ranking_loss']:.4f} accuracy {metrics['policy/ranking_accuracy']:.2f} eval reward "
                f"{metrics['eval/reward']:.3f}{gold} distinct-2 {metrics['eval/distinct_2']:.3f} steps/s "
                f"{metrics['time/steps_per_s']:.3g} ({1 / metrics['time/steps_per_s']:.2f} s/step) tokens/s "
                f"{metrics['time/tokens_per_s']:.0f}",
                flush=True,
            )
        common.checkpoint_if_due(
            run,
            args,
            step=step,
            engines=engines,
            state=dict(step=step, eval_history=eval_history),
            signum=stop_requested(),
        )

    # Save the trained policy as an HF folder
    common.save_hf(policy, tokenizer, os.path.join(run.dir, "policy"), rank)
    if rank == 0:
        first = eval_history[0][1]
        final = eval_history[-1][1]
        changes = ", ".join(f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first)
        print(
            f"done in {time.time() - start_time:.0f} s; held-out before → after: {changes}; policy saved to "
            f"{run.dir}/policy",
            flush=True,
        )
    common.exit_cleanly()
