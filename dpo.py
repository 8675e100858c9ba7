"""DPO: Direct Preference Optimization, offline, on preference pairs {prompt, chosen, rejected}.

Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", NeurIPS 2023, arXiv 2305.18290. A baseline of the A-LoL paper (Baheti et al., ICLR 2024,
arXiv 2305.14718), whose released HH script this file follows: https://github.com/abaheti95/LoL-RL

The algorithm, in the paper's notation. A dataset D of prompts x with a preferred response y_w and a dispreferred one
y_l. π_ref is the starting (SFT) policy, frozen (π_ref = π_init); π_θ starts as a copy of it. No reward model and no
sampling: the policy is trained directly on the pairs.
- The sequence log-likelihood log π(y|x) = Σ_t log π(y_t | x, y_<t), summed over the response tokens.
- The implicit reward of a response is β · (log π_θ(y|x) − log π_ref(y|x)) (up to a term of x alone), and the policy
  is fitted to the pairs by the Bradley-Terry likelihood of those rewards, DPO eq. (7):
      L_DPO(π_θ; π_ref) = −E_{(x, y_w, y_l)~D}[log σ(β log π_θ(y_w|x)/π_ref(y_w|x) − β log π_θ(y_l|x)/π_ref(y_l|x))].
  β (--beta) sets how far π_θ may move from π_ref.
- Reference-free DPO (the A-LoL README's `--reference_free`): π_ref left out, −log σ(β (log π_θ(y_w|x) −
  log π_θ(y_l|x))); no π_ref is loaded.
- log π_ref(y|x) of the pairs a run reads (those its --total-steps draw, and the held-out ones) is computed once,
  before training, and cached per pair under a key of what it depends on: a longer run computes only the pairs added.
- Variants (--loss-type, --label-smoothing): IPO (Azar et al., "A General Theoretical Paradigm to Understand
  Learning from Human Preferences", AISTATS 2024, arXiv 2310.12036) regresses the log-ratio difference onto
  1/(2β): (h̄ − 1/(2β))², with h̄ the difference of the two log-ratios each averaged over its response's tokens, as
  the IPO authors' reported runs did (`ipo`; `ipo_sum` takes the summed sequence log-probs of the paper's equation);
  conservative DPO (Mitchell, "A note on DPO with noisy preferences", 2023) reads each label as flipped with
  probability ε: −(1 − ε) log σ(βh) − ε log σ(−βh).
Logged: the implicit rewards of chosen and rejected responses, their margin and the fraction of pairs whose margin
is positive (accuracy), on the training batches and on pairs held out of training.

Where this file differs from the released HH script (dpo_qlora_llama_hh.py at commit 9f8d816, "released" below):
- π_ref's log-probs are computed once and cached; released, π_ref (a second 4-bit copy) runs on every batch:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L473-L482
- The loss is the mean over the --mini-batch-size pairs of a step; released, 8 micro-batches of 2 pairs each add
  their mean loss's gradient (not divided by 8) before the norm is clipped to 0.3:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L505-L511
- The policy saved is the last one; released, the one with the best validation reward (every 900 steps):
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L531-L538
- Prompts are the dataset's HH text; released, a "A chat between ..." system line and " ### Human:" markers:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L432
As in the released code (same commit):
- the loss and the detached implicit rewards (reference-free: π_ref's log-probs taken as 0):
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L216-L228
- sequence log-probs summed over the response tokens, each response ending in EOS:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L433-L467
- pairs drawn in a fresh random order each pass over the data:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py#L417-L425

    python dpo.py                                              # DPO on the built-in preference pairs
    python dpo.py --reference-free                             # no π_ref
    python dpo.py --loss-type ipo --beta 0.5                   # IPO
    torchrun --nproc_per_node 2 dpo.py --zero-stage 3          # two processes (CPU or GPUs)
    python dpo.py --preset hh-1b                               # the A-LoL paper's DPO HH setting on Pythia 1B (GPUs)
"""

import functools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import GenerationConfig

import common
from common import Batch

CACHE_VERSION = 3  # raise when what the cache holds, or how it is computed, changes


# The math: DPO's loss (and IPO's, conservative DPO's), sequence log-probs, the order pairs are read in;
# functions of tensors, each unit-tested.
class DPOStats(NamedTuple):
    """Batch means, without gradient, of DPO's implicit rewards r̂(x, y) = β (log π_θ(y|x) − log π_ref(y|x))."""

    chosen_rewards: torch.Tensor  # r̂(x, y_w)
    rejected_rewards: torch.Tensor  # r̂(x, y_l)
    margins: torch.Tensor  # r̂(x, y_w) − r̂(x, y_l)
    accuracy: torch.Tensor  # the fraction of pairs whose margin is positive


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # the batch mean of the per-pair loss (with grad)
    stats: DPOStats


def dpo_loss(
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    reference_free: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> DPOLoss:
    """The DPO loss of DPO eq. (7) and its statistics. Each log-prob argument is [batch] sequence log-probs summed
    over the response tokens: log π_θ(y_w|x), log π_θ(y_l|x) (with grad), log π_ref(y_w|x), log π_ref(y_l|x). With
    `reference_free` the π_ref terms are 0 (they may be None), as in the released code. `loss_type` "ipo" is IPO's
    squared loss on log-ratios averaged over each response's tokens, whose counts it needs: `chosen_lengths` and
    `rejected_lengths`, [batch]; "ipo_sum" the same on the sums; `label_smoothing` ε > 0 is conservative DPO
    (sigmoid only). The statistics are the implicit rewards of the summed log-ratios, whatever the loss."""
    if reference_free:
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    chosen_ratio = chosen_logps - ref_chosen_logps  # log π_θ(y_w|x) − log π_ref(y_w|x)
    rejected_ratio = rejected_logps - ref_rejected_logps  # log π_θ(y_l|x) − log π_ref(y_l|x)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)  # DPO eq. (7)
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)  # conservative DPO (ε)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs chosen_lengths and rejected_lengths (response tokens of each pair)")
        # The IPO authors' reported runs average each log-ratio over the response's tokens before the squared loss
        # (as TRL does, confirmed with them): https://github.com/huggingface/trl/blob/f2cd57710ae345ea6428ae95363267fcf38a3dc8/trl/trainer/dpo_trainer.py#L1441-L1451
        h_mean = chosen_ratio / chosen_lengths - rejected_ratio / rejected_lengths
        losses = (h_mean - 1 / (2 * beta)) ** 2  # IPO's loss: h̄ regressed onto 1/(2τ), τ = β
    elif loss_type == "ipo_sum":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO's loss on summed log-ratios: h regressed onto 1/(2τ), τ = β
    else:
        raise ValueError(f"unknown DPO loss type '{loss_type}'")
    chosen_rewards = beta * chosen_ratio.detach()  # DPO's implicit reward of y_w
    rejected_rewards = beta * rejected_ratio.detach()
    margins = chosen_rewards - rejected_rewards
    stats = DPOStats(
        chosen_rewards=chosen_rewards.mean(),
        rejected_rewards=rejected_rewards.mean(),
        margins=margins.mean(),
        accuracy=(margins > 0).float().mean(),
    )
    return DPOLoss(loss=losses.mean(), stats=stats)


def sequence_logps(logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the response tokens: [batch, response_len] per-token log-probs and
    their response mask -> [batch]. Padding may hold anything, even inf."""
    return torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs)).sum(1)


def pair_order(n_pairs: int, num_draws: int, generator: torch.Generator) -> torch.Tensor:
    """`num_draws` pair indices: passes over all `n_pairs`, each in a fresh random order, as the released loop
    reshuffles the data when it runs out."""
    passes = -(-num_draws // n_pairs)
    return torch.cat([torch.randperm(n_pairs, generator=generator) for _ in range(passes)])[:num_draws]


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    beta: float = 0.1
    """β of the loss, how far π_θ may move from π_ref. sigmoid: the scale of the implicit reward β·log(π_θ/π_ref).
    ipo / ipo_sum: IPO's τ, the loss pulls the chosen response's log-ratio above the rejected one's by 1/(2β), per
    token with ipo (β 0.1: 5 nats a token), per sequence with ipo_sum"""
    reference_free: bool = False
    """leave π_ref out of the loss (reference-free DPO): −log σ(β (log π_θ(y_w|x) − log π_θ(y_l|x))); no π_ref"""
    loss_type: Literal["sigmoid", "ipo", "ipo_sum"] = "sigmoid"
    """sigmoid: DPO's −log σ(βh), h the difference of the two sequence log-ratios log(π_θ/π_ref); ipo: IPO's
    (h̄ − 1/(2β))², h̄ the same difference with each log-ratio averaged over its response's tokens (the IPO authors'
    runs); ipo_sum: (h − 1/(2β))² on the summed log-ratios (IPO's equation as printed; long responses dominate)"""
    label_smoothing: float = 0.0
    """ε of conservative DPO (sigmoid only): each preference is read as flipped with probability ε, in [0, 0.5)"""
    total_steps: int = 30
    """optimisation steps"""
    mini_batch_size: int = 16
    """preference pairs per rank per optimiser step (two sequences each)"""
    micro_batch_size: int = 0
    """preference pairs per rank per forward/backward pass, a divisor of --mini-batch-size (0: the whole mini-batch in
    one): the step's gradient accumulates over them, each pass's loss weighted by its share of the pairs"""
    learning_rate: float = 1e-4
    """policy learning rate (AdamW)"""
    max_grad_norm: float = 0.3
    """global gradient-norm clip (released: 0.3)"""
    adam_eps: float = 1e-8
    """AdamW's ε, added to √v̂ in the update's denominator (released A-LoL DPO HH: 1e-6)"""
    reward_transform: Literal["sigmoid", "none"] = "sigmoid"
    """applied to each reward model's raw score at evaluation: sigmoid(logit), as in A-LoL HH"""

    # Models and data
    model_name_or_path: str = "builtin"
    """the starting policy, which is also the frozen π_ref: a hub name, a local folder, or `builtin`"""
    reward_model: list[str] = field(default_factory=lambda: ["builtin"])
    """scorers of the evaluation's proxy reward (not trained on): a 1-output classifier, module:function, URL, `gold`"""
    reward_weights: list[float] = field(default_factory=list)
    """weight of each --reward-model in the proxy reward Σ w_i · transform(r_i) (empty = all 1)"""
    offline_dataset: str = "builtin"
    """preference pairs: {prompt, chosen, rejected} rows, rm-static, HH transcripts, chat preference rows; hub, path,
    or builtin"""
    offline_split: str = "train"
    """the split of --offline-dataset trained on"""
    heldout_pairs: int = 64
    """the last N pairs of --offline-split are held out of training: each evaluation reports the implicit reward's
    accuracy and margin on them (0: train on every pair)"""
    dataset: str = "builtin"
    """prompts for evaluation: a hub name, a save_to_disk folder, a .jsonl/.json file, or builtin"""
    forward_batch_size: int | None = None
    """rows per no-grad pass / generate call (π_ref's log-probs, evaluation); default --micro-batch-size, or 64"""
    cache_dir: str | None = None
    """where π_ref's log-probs are cached, per pair: a run computes those of the pairs it reads (its --total-steps'
    draws and the held-out pairs) that the cache lacks (default $ONEFILE_RLHF_CACHE/dpo or ~/.cache/onefile-rlhf/dpo)"""
    no_cache: bool = False
    """recompute π_ref's log-probs of the pairs this run reads even when cached (the entry is overwritten with them)"""

    # Devices and precision
    lora_r: int = 0
    """rank r of a LoRA adapter trained in place of the policy's weights (0: no adapter, the weights train).
    π_ref is then the policy with its adapter switched off: no second copy of the model"""
    ref_device: str = "policy"
    """where π_ref lives while its log-probs are computed: `policy` (sharded with ZeRO-3), `cpu` or `cuda:N`"""

    # Logging and checkpoints
    exp_name: str = "dpo"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (one order of the pairs for all ranks, each rank taking its share of every step)"""
    eval_every: int = 15
    """evaluate on held-out prompts and pairs (and print a progress line) every this many steps, and before and
    after"""


# The A-LoL paper's DPO HH setting (released dpo_qlora_llama_hh.py at commit 9f8d816, "released"): β 0.1 (L108);
# 16 pairs a step (2 per device × 8 accumulation steps, L55-L56); 9000 steps (L73); lr 2e-4 (L47), constant (L52,
# L395: transformers' get_scheduler("constant") takes no warm-up, so the 300 warm-up steps of L53 and L394 never act);
# bitsandbytes' paged AdamW (L42, L390-L393) with betas (0.9, 0.999) and ε 1e-6 (L43-L45) and its own weight decay
# 0.01 (the script's weight_decay, L46, never reaches the optimiser); gradient clip 0.3 (L50); prompts of up to
# 768 − 128 tokens, 128 response tokens (L443-L447); evaluated every 900 steps (L77) by greedy decoding, with
# R = sigmoid(OpenAssistant RM logit). The released run goes on training the SFT adapter it loads
# (timdettmers/qlora-hh-rlhf-7b on 4-bit LLaMA-7B, L40, L290), and π_ref is that same adapter loaded frozen (L319-L320):
# the script's lora_r / lora_alpha / lora_dropout fields (L65-L67) are never read. Dahoas' Pythia SFT policies have
# no SFT adapter, so here a fresh adapter (r 64, α 16, dropout 0.05: the values of those unread fields) trains on
# 16-bit base weights and π_ref is the policy with it switched off, π_init in both runs (add --load-in-4bit on a GPU
# for QLoRA). https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/dpo_qlora_llama_hh.py
# The optimiser as the pinned transformers 4.32.1 and bitsandbytes 0.41.1 build it:
# https://github.com/huggingface/transformers/blob/v4.32.1/src/transformers/trainer.py#L1021-L1026
# https://github.com/huggingface/transformers/blob/v4.32.1/src/transformers/optimization.py#L358-L359
# https://github.com/bitsandbytes-foundation/bitsandbytes/blob/18e827d666fa2b70a12d539ccedc17aa51b2c97c/bitsandbytes/optim/adamw.py#L9-L12
# Devices (--reward-device) are chosen by launch.sh.
HH = dict(
    offline_dataset="Anthropic/hh-rlhf",  # HH transcripts: chosen / rejected replies to one dialogue
    dataset="Anthropic/hh-rlhf",
    eval_split="test",
    eval_prompts=280,  # the A-LoL paper's test prompts for HH
    max_prompt_length=640,
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    bf16=True,
    lora_r=64,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_target_modules=["all-linear"],
    reward_model=["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"],  # the A-LoL paper's train / validation RM
    reward_transform="sigmoid",
    beta=0.1,
    mini_batch_size=16,
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


def trim(batch: Batch) -> Batch:
    """Drop the columns that are padding in every row (left of the prompts, right of the responses)."""
    start = int(batch.query_mask.any(0).long().argmax())
    end = int(batch.response_mask.sum(1).max())
    return Batch(
        query_ids=batch.query_ids[:, start:],
        query_mask=batch.query_mask[:, start:],
        response_ids=batch.response_ids[:, :end],
        response_mask=batch.response_mask[:, :end],
    )


def to_device(batch: Batch, device) -> Batch:
    return Batch(*(tensor.to(device) for tensor in batch))


def token_lists(ids, mask):
    """The rows' token ids without their padding, as lists."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def chunks(size: int, *tensors):
    """`size` rows of each of `tensors` at a time, as a list (a progress bar reads its length)."""
    return [[t[i : i + size] for t in tensors] for i in range(0, len(tensors[0]), size)]


def pair_logps(model, rows: Batch, idx: torch.Tensor, device):
    """log π(y_w|x) and log π(y_l|x) of the pairs `idx` in one forward pass, ([len(idx)], [len(idx)]). `rows` holds
    every pair as two rows: chosen (rows 0..n-1), then rejected (rows n..2n-1)."""
    n_pairs = len(rows.query_ids) // 2
    batch = to_device(trim(rows.rows(torch.cat([idx, idx + n_pairs]))), device)
    logps = sequence_logps(common.forward_logprobs(model, *batch), batch.response_mask)
    return logps[: len(idx)], logps[len(idx) :]


@torch.no_grad()
def compute_ref_logps(positions, *, used, rows: Batch, policy, args: Args, place: common.Placement, run: common.Run):
    """π_ref's sequence log-probs of the pairs `used[positions]`: {"ref_chosen_logps": [n], "ref_rejected_logps":
    [n]}. π_ref is loaded here only (a cache hit needs no π_ref) and freed on return: with LoRA it is `policy`, read
    with its adapter off (the caller's common.adapter_off); else a frozen copy of --model-name-or-path on
    --ref-device, placed as the policy was (`place`)."""
    if run.rank == 0:
        print(f"π_ref's log-probs of {len(positions)} pairs ({len(used) - len(positions)} from the cache)", flush=True)
    if args.lora_r:  # the untrained policy, read with its adapter off (the caller's common.adapter_off)
        ref_policy = policy
    else:
        ref_model = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at=args.ref_device)
        ref_policy = place.frozen(ref_model, at=args.ref_device)
    ref_chosen = []
    ref_rejected = []
    for (idx,) in common.progress(
        chunks(args.forward_batch_size, used[positions]), desc="π_ref log-probs", enabled=args.progress
    ):
        chosen_logps, rejected_logps = pair_logps(ref_policy, rows, idx, run.device)
        ref_chosen.append(chosen_logps.float().cpu())
        ref_rejected.append(rejected_logps.float().cpu())
    return {"ref_chosen_logps": torch.cat(ref_chosen), "ref_rejected_logps": torch.cat(ref_rejected)}


class ProxyReward(NamedTuple):
    """The evaluation's proxy reward Σ_i w_i · transform(r_i), r_i from the i-th --reward-model."""

    names: list  # --reward-model: `gold` is the built-in task's gold score
    weights: list  # w_i, one per name
    scorers: dict  # a model or module:function per distinct name but `gold`
    transform: str  # "sigmoid": sigmoid(r_i), as in A-LoL HH; "none": r_i


def score(reward: ProxyReward, tokenizer, batch: Batch, prompts) -> torch.Tensor:
    """The proxy reward of each row, [n]: each scorer reads the token ids and the `prompts` as the dataset gave
    them."""
    total = torch.zeros(len(batch.query_ids))
    for weight, name in zip(reward.weights, reward.names):
        if name == "gold":
            texts = decode_responses(tokenizer, batch.response_ids, batch.response_mask)
            raw = torch.tensor(common.builtin_gold_score(texts))
        else:
            raw = reward.scorers[name](*batch, prompts=prompts).float().cpu()
        total += weight * (torch.sigmoid(raw) if reward.transform == "sigmoid" else raw)
    return total


class EvalData(NamedTuple):
    """What an evaluation reads besides the policy: this rank's share of the held-out prompts and pairs."""

    prompts: list  # token ids of each held-out prompt
    texts: list  # each prompt as the dataset gave it: the reward models read them
    gold_score: object  # the built-in task's gold score of response texts, or None
    rows: Batch  # every pair as two rows: chosen (rows 0..n-1), then rejected (rows n..2n-1)
    heldout: torch.Tensor  # the held-out pairs
    ref_chosen_logps: torch.Tensor | None  # [n_pairs] log π_ref(y_w|x) (None: reference-free)
    ref_rejected_logps: torch.Tensor | None  # [n_pairs] log π_ref(y_l|x)


@torch.no_grad()
def evaluate(step: int, *, policy, tokenizer, data: EvalData, reward: ProxyReward, greedy, args: Args, run, log):
    """Greedy responses to held-out prompts: proxy reward, gold score, distinct-1/2, length; on the held-out pairs:
    the implicit reward's accuracy and margin. Means over all ranks."""
    stats = []
    texts = []
    samples = []  # rank 0's first --log-samples responses, for log.samples
    policy.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
    for prompt_rows, prompts in common.progress(
        chunks(args.forward_batch_size, data.prompts, data.texts), desc="evaluate", enabled=args.progress
    ):
        query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, run.device)
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
        scores = score(reward, tokenizer, batch, prompts)
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
    if len(data.heldout):
        logps = [
            pair_logps(policy, data.rows, idx, run.device) for (idx,) in chunks(args.forward_batch_size, data.heldout)
        ]
        if args.reference_free:
            ref = (None, None)
        else:
            ref = (data.ref_chosen_logps[data.heldout], data.ref_rejected_logps[data.heldout])
        terms = dpo_loss(
            chosen_logps=torch.cat([chosen_logps for chosen_logps, _ in logps]).cpu(),
            rejected_logps=torch.cat([rejected_logps for _, rejected_logps in logps]).cpu(),
            ref_chosen_logps=ref[0],
            ref_rejected_logps=ref[1],
            beta=args.beta,
            reference_free=args.reference_free,
        )
        metrics["eval/preference_accuracy"] = terms.stats.accuracy.item()
        metrics["eval/reward_margin"] = terms.stats.margins.item()
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


def update(
    policy, *, rows: Batch, idx, ref_chosen_logps, ref_rejected_logps, response_lengths, args: Args, device
) -> DPOLoss:
    """One optimiser step on the pairs `idx` (steps 3-5 of the training loop; `rows` holds every pair as two rows,
    chosen then rejected, and `response_lengths` their response tokens). The loss of every --loss-type, and its
    statistics, is a mean over the pairs of per-pair terms (IPO's token averages are each response's own), so the
    mini-batch is taken in micro-batches of --micro-batch-size pairs, each one's loss weighted by its share of the
    pairs: the accumulated gradient is the whole mini-batch's. Returns the mini-batch's loss and statistics, without
    gradient."""
    n_pairs = len(rows.query_ids) // 2
    total = None
    for micro in common.micro_batches(idx, args.micro_batch_size):
        # 3. log π_θ(y_w|x) and log π_θ(y_l|x) in one forward pass
        chosen_logps, rejected_logps = pair_logps(policy, rows, micro, device)
        # 4. The loss of eq. (7) against π_ref's log-probs of step 1 (or a variant: --loss-type, --label-smoothing)
        if args.reference_free:
            ref = (None, None)
        else:
            ref = (ref_chosen_logps[micro].to(device), ref_rejected_logps[micro].to(device))
        terms = dpo_loss(
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            ref_chosen_logps=ref[0],
            ref_rejected_logps=ref[1],
            beta=args.beta,
            reference_free=args.reference_free,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            chosen_lengths=response_lengths[micro].to(device),
            rejected_lengths=response_lengths[micro + n_pairs].to(device),
        )
        # 5. The micro-batch's part of the gradient; the engine steps the optimiser after the mini-batch's last
        share = len(micro) / len(idx)
        policy.backward(terms.loss * share, scale_wrt_gas=False)
        policy.step()
        weighted = DPOLoss(
            loss=terms.loss.detach() * share, stats=DPOStats(*(stat.detach() * share for stat in terms.stats))
        )
        if total is not None:
            weighted = DPOLoss(
                loss=total.loss + weighted.loss, stats=DPOStats(*(a + b for a, b in zip(total.stats, weighted.stats)))
            )
        total = weighted
    return total


if __name__ == "__main__":
    # Parse the command line (--preset NAME: a paper setting as the defaults)
    args = common.parse_args(Args, PRESETS)
    # no-grad passes bounded as the training passes are (--micro-batch-size), else by 64 rows
    args = replace(args, forward_batch_size=args.forward_batch_size or args.micro_batch_size or 64)

    # Validate: the loss's hyper-parameters
    if args.beta <= 0:
        common.fail(f"--beta must be positive (it scales the implicit reward), got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        common.fail(f"--label-smoothing is a flip probability in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type != "sigmoid":
        common.fail("--label-smoothing applies to --loss-type sigmoid only; drop one of them")
    if args.heldout_pairs < 0:
        common.fail(f"--heldout-pairs must be 0 or more, got {args.heldout_pairs}")
    run = common.start_run(args, "dpo.py")
    rank = run.rank
    world_size = run.world_size
    device = run.device
    zero3 = args.zero_stage == 3
    weights = args.reward_weights or [1.0] * len(args.reward_model)

    # Read the pairs and check them before any model is loaded: the last --heldout-pairs are not trained on
    train_texts, chosen, rejected = common.load_preference_pairs(
        args.offline_dataset, args.offline_split, held_out=(args.dataset, args.eval_split)
    )
    train_texts = [prompt if isinstance(prompt, list) else str(prompt) for prompt in train_texts]  # text / chat
    n_pairs = len(train_texts)
    n_train = n_pairs - args.heldout_pairs
    if n_train < 1:
        common.fail(
            f"--heldout-pairs {args.heldout_pairs} leaves none of the {n_pairs} pairs of '{args.offline_dataset}' to "
            f"train on; lower --heldout-pairs"
        )

    # Seed: one seed while loading and computing π_ref's log-probs, and for the order of the pairs (every rank)
    torch.manual_seed(args.seed)

    # Load the policy (π_θ, and π_ref until it trains), the tokenizer and the reward models of the evaluation
    place = common.Placement.of(args)  # the settings every model is loaded and placed with
    dtype = place.dtype  # the policy's (cache keys name it)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy")
    scorers = {  # a model or module:function per distinct --reward-model entry
        name: place.reward(name, tokenizer, at=args.reward_device)
        for name in dict.fromkeys(name for name in args.reward_model if name != "gold")
    }
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
    policy.eval()  # eval mode (π_ref's passes, decoding); the training loop switches to train mode
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    # Data: every pair as two rows, chosen (rows 0..n-1) then rejected (rows n..2n-1), on every rank; the prompts
    # evaluated, and this rank's share of the held-out pairs
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=policy.module.config.max_position_embeddings,  # GPT-2's n_positions is mapped to it
        chat_template=args.chat_template,
    )
    need = args.heldout_pairs + 1
    kept = common.fitting_prompts(tokenizer, train_texts, what="preference pairs", need=need, **encode)
    train_texts, chosen, rejected = common.rows_at(kept, train_texts, chosen, rejected)
    n_pairs = len(train_texts)
    n_train = n_pairs - args.heldout_pairs
    rows = common.encode_offline_rows(tokenizer, train_texts * 2, chosen + rejected, **encode)
    response_lengths = rows.response_mask.sum(1)  # response tokens of each row, EOS included (IPO's averages)
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
    n_heldout = args.heldout_pairs // world_size * world_size  # equal per rank: lockstep
    heldout = torch.arange(n_train, n_train + n_heldout)[rank::world_size]
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    reward = ProxyReward(names=args.reward_model, weights=weights, scorers=scorers, transform=args.reward_transform)

    # The order of the pairs: passes over the training pairs, each shuffled; every step takes mini_batch_size ×
    # world_size of them, rank r the r-th share (the same order on every rank, from the seed)
    draws = pair_order(
        n_train, args.total_steps * args.mini_batch_size * world_size, torch.Generator().manual_seed(args.seed)
    )

    # ALGO LOGIC, step 1 (once per run, before training): log π_ref(y|x) of the chosen and rejected responses of the
    # pairs this run reads (those its --total-steps draw, and the held-out ones), not of the whole file
    t0 = time.time()
    if args.reference_free:  # no π_ref at all
        ref_chosen_logps = None
        ref_rejected_logps = None
        source = "no π_ref (reference-free)"
    else:  # π_ref's log-probs of each pair used, cached under a key of what they depend on and the pair's tokens
        used = torch.cat([draws, torch.arange(n_train, n_train + n_heldout)]).unique()  # every rank's pairs
        queries = token_lists(rows.query_ids, rows.query_mask)
        responses = token_lists(rows.response_ids, rows.response_mask)
        digests = [
            common.json_digest([queries[i], responses[i], queries[i + n_pairs], responses[i + n_pairs]])
            for i in used.tolist()
        ]
        key = dict(
            version=CACHE_VERSION,
            model=common.fingerprint(args.model_name_or_path, "sft"),
            dtype=dtype,
            chat_template=tokenizer.chat_template if args.chat_template else None,
            load_in_4bit=args.load_in_4bit,
        )
        cache_dir = common.cache_folder(args.cache_dir, "dpo")
        compute = functools.partial(
            compute_ref_logps, used=used, rows=rows, policy=policy, args=args, place=place, run=run
        )
        with common.adapter_off(policy):  # with LoRA, the policy is π_ref until it trains
            cache, n_scored = common.cached_rows(
                key, digests, compute, cache_dir, use_cache=not args.no_cache, rank=rank
            )
        ref_chosen_logps = torch.full((n_pairs,), float("nan"))  # NaN: a pair this run never reads
        ref_rejected_logps = torch.full((n_pairs,), float("nan"))
        ref_chosen_logps[used] = cache["ref_chosen_logps"]
        ref_rejected_logps[used] = cache["ref_rejected_logps"]
        source = (
            f"π_ref's log-probs of {len(used)} of {n_pairs} pairs: {n_scored} computed, {len(used) - n_scored} from "
            f"the cache ({time.time() - t0:.0f} s)"
        )

    torch.manual_seed(args.seed + rank)
    data_stats = {"data/pairs": n_train, "data/heldout_pairs": n_heldout}
    if rank == 0:
        print(
            f"{run.name}: {world_size} rank(s), DPO ({args.loss_type}, β {args.beta}); {source}; {n_train} pairs "
            f"trained on, {n_heldout} held out; {args.total_steps} steps",
            flush=True,
        )

    # Evaluate: greedy responses to held-out prompts, and the implicit reward on held-out pairs
    eval_data = EvalData(
        prompts=eval_prompts,
        texts=eval_texts,
        gold_score=gold_score,
        rows=rows,
        heldout=heldout,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    evaluation = dict(
        policy=policy, tokenizer=tokenizer, data=eval_data, reward=reward, greedy=greedy, args=args, run=run, log=log
    )

    # Resume: `resume/` holds all a run needs to go on as if never stopped: the policy engine with its optimizer,
    # the step (the order of the pairs is fixed by the seed) and each rank's RNG states. π_ref's log-probs come back
    # from the cache.
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

    # ALGO LOGIC, steps 2-5: π_ref's log-probs are fixed above (step 1); each step trains on one mini-batch of pairs
    start_time = time.time()
    window = []
    policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for step in common.progress(
        range(state.get("step", 0) + 1, args.total_steps + 1), desc="steps", enabled=args.progress
    ):
        t_step = time.time()
        # 2. This rank's share of the step's pairs, in the shuffled order
        start = ((step - 1) * world_size + rank) * args.mini_batch_size
        idx = draws[start : start + args.mini_batch_size]
        # 3-5. log π_θ of the pairs, the loss of eq. (7) (or a variant) and one optimiser step on the mini-batch
        terms = update(
            policy,
            rows=rows,
            idx=idx,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            response_lengths=response_lengths,
            args=args,
            device=device,
        )

        # Statistics, evaluation, logging, and a resumable checkpoint when due
        metrics = {
            "policy/loss": terms.loss.item(),
            "policy/chosen_rewards": terms.stats.chosen_rewards.item(),
            "policy/rejected_rewards": terms.stats.rejected_rewards.item(),
            "policy/reward_margin": terms.stats.margins.item(),
            "policy/reward_accuracy": terms.stats.accuracy.item(),
        }
        if not args.reference_free:  # log π_θ(y|x) − log π_ref(y|x), over chosen and rejected responses
            log_ratio = (terms.stats.chosen_rewards + terms.stats.rejected_rewards) / (2 * args.beta)
            metrics["policy/log_ratio_to_ref"] = log_ratio.item()
        window.append([time.time() - t_step, len(idx) * 2 * world_size])
        metrics = common.mean_across_ranks(metrics)
        metrics["time/update"] = window[-1][0]  # seconds: this step's passes, backward and optimiser step
        common.check_finite(metrics, step, run.resume_path)  # before evaluating (decoding) from NaN weights
        if step % args.eval_every == 0 or step == args.total_steps:
            seconds, sequences = torch.tensor(window).sum(0).tolist()
            t_eval = time.time()
            eval_history.append((step, evaluate(step, **evaluation)))
            metrics.update(eval_history[-1][1])
            metrics["time/eval"] = time.time() - t_eval
            metrics["time/steps_per_s"] = len(window) / seconds
            metrics["time/sequences_per_s"] = sequences / seconds
            window = []
        metrics["time/iteration"] = time.time() - t_step  # seconds: the whole step, an evaluation included
        metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
        log(step, metrics)
        if rank == 0 and "eval/reward" in metrics:
            gold = f" gold {metrics['eval/gold_score']:+.3f}" if gold_score else ""
            print(
                f"step {step:5d}/{args.total_steps} loss {metrics['policy/loss']:.4f} margin "
                f"{metrics['policy/reward_margin']:+.3f} accuracy {metrics['policy/reward_accuracy']:.2f} eval reward "
                f"{metrics['eval/reward']:.3f}{gold} distinct-2 {metrics['eval/distinct_2']:.3f} steps/s "
                f"{metrics['time/steps_per_s']:.3g} ({1 / metrics['time/steps_per_s']:.2f} s/step)",
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
