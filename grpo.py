"""GRPO and its critic-free relatives for language models: Dr. GRPO, DAPO's clip-higher and token-mean, RLOO, GSPO.

Papers:
- GRPO: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (2024,
  arXiv 2402.03300), Section 4.1: the objective eq. (3), the KL estimator eq. (4); the settings, Section 4.2.
- Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective" (2025, arXiv 2503.20783).
- DAPO: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (2025, arXiv 2503.14476).
- RLOO: Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
  LLMs" (2024, arXiv 2402.14740).
- GSPO: Zheng et al., "Group Sequence Policy Optimization" (2025, arXiv 2507.18071).
- PPO: Schulman et al., "Proximal Policy Optimization Algorithms" (2017, arXiv 1707.06347): the clipped surrogate.

The algorithm. A prompt x, G responses y_1 .. y_G sampled from π_old (the policy that samples the rollout), each
scored r_i = r(x, y_i) by the reward; π_ref = π_init the frozen SFT policy. No value model: the baseline of a
response is taken from the other responses of its group.

- Advantages, one per response, the same on each of its tokens (`--advantage-estimator`):
  `grpo` (GRPO's outcome supervision, DeepSeekMath Section 4.1.2): Â_i = (r_i − mean(r)) / (std(r) + ε), the std the
  unbiased one over the group (as the released implementations compute it);
  `dr_grpo` (Dr. GRPO): Â_i = r_i − mean(r), no division by the std;
  `rloo` (RLOO): Â_i = r_i − 1/(G − 1) Σ_{j≠i} r_j, the mean of the other G − 1 samples.
- The clipped objective per token (PPO's clipped surrogate with the ratio ρ_{i,t} = π_θ(y_{i,t}|x, y_{i,<t}) /
  π_old(y_{i,t}|x, y_{i,<t})), −min(ρ Â, clip(ρ, 1 − ε_low, 1 + ε_high) Â) as a loss; DAPO's clip-higher lets
  ε_high exceed ε_low (`--cliprange-low`, `--cliprange-high`).
- Aggregation of the per-token losses (`--loss-aggregation`): `sequence_mean` (GRPO's objective: the mean over each
  response's tokens, then over responses), `token_mean` (DAPO's token-level loss: every response token of the
  mini-batch weighs the same), `constant` (Dr. GRPO: the sum over tokens divided by responses × --max-new-tokens).
- `--importance sequence` (GSPO): one ratio per response, s_i = exp(mean_t log ρ_{i,t}) = (π_θ(y_i|x) /
  π_old(y_i|x))^(1/|y_i|), clipped per response; the loss is the mean over responses of −min(s_i Â_i, clip(s_i,
  1 − ε_low, 1 + ε_high) Â_i).
- The KL to π_ref (`--kl-coef` β): in the loss, as GRPO does, β times the k3 estimate per token
  k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 at the current π_θ, aggregated like the policy loss (DeepSeekMath's unbiased
  estimator of KL(π_θ ‖ π_ref), its eq. (4)); or, with `--kl-in-reward`, in the score, as RLOO does:
  r_i − β Σ_t (log π_old − log π_ref). β = 0 (and no --kl-in-reward) leaves π_ref out: it is not loaded.
- An iteration: sample G responses for each of rollout-batch-size / G prompts, score them, compute the advantages
  within each group, then minimise the loss for --update-epochs passes over mini-batches of the rollout (π_old the
  sampling policy: with one epoch and one mini-batch the ratio is 1 and the clip never binds).
- `--dynamic-sampling` (DAPO's dynamic sampling, Section 3.2): a group whose G scores are all equal has every
  advantage 0 and no policy gradient; such groups are dropped, and further rounds of rollout-batch-size / G prompts
  are sampled until the batch holds rollout-batch-size / G groups with a signal, or --max-sampling-rounds rounds have
  run. The test is on the rewards' score, before the KL of --kl-in-reward and the overlong penalty (DAPO's on the
  answer's accuracy). Logged: rollout/sampling_rounds, rollout/dropped_groups, rollout/filled_groups.

Where this differs from the released code:
- `token_mean` and `constant` aggregate over each mini-batch of one rank (a DeepSpeed step's batch), as TRL and verl
  do per micro-batch, not over the whole rollout of all ranks.
- DAPO's dynamic sampling: when --max-sampling-rounds run out before the batch is full, the batch is filled with
  dropped groups (advantage 0: they add only the KL term and weigh in the aggregation's denominators), as every
  group is kept without the flag; DAPO's released code stops the run there with an error. Each round samples one
  rollout batch's prompts (DAPO's released run samples 3 × its training batch's). The responses of dropped groups
  are forwarded through π_old and π_ref too (the released code scores before those passes). --total-episodes and
  the throughput printed count the responses trained on, not those sampled and dropped.
- DAPO's overlong reward shaping (`--overlong-buffer`): 0 up to max-new-tokens − buffer tokens, then falling
  linearly to −1.
- With β = 0 and no --kl-in-reward, π_ref is not loaded, and no KL to it is logged (no rollout/kl_*,
  eval/kl_to_ref).

Commands:
    python grpo.py                                             # the built-in task, one CPU process
    python grpo.py --preset dr-grpo                            # Dr. GRPO's choices on the built-in task
    torchrun --nproc_per_node 2 grpo.py --zero-stage 2         # two processes (CPU or GPUs)

Sampling is set by `Args` alone (temperature, top-k, top-p), as in ppo.py; the log-probs are those of
softmax(logits / temperature) over the whole vocabulary.
"""

import functools
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from transformers import GenerationConfig, LogitsProcessorList

import common
from common import masked_mean


# The math: the group advantages and the clipped, aggregated policy loss; functions of tensors, each unit-tested.
def group_advantages(*, scores, group_size, estimator, eps=1e-6):
    """One advantage per response from its group: `scores` [batch], the `group_size` samples of a prompt in
    consecutive rows; `estimator` `grpo`, `dr_grpo` or `rloo`. Returns [batch]."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size} ≥ 2")
    groups = scores.view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    if estimator == "grpo":
        std = groups.std(1, keepdim=True)  # unbiased (n − 1), as TRL's and verl's torch.std
        advantages = (groups - mean) / (std + eps)  # GRPO (DeepSeekMath Section 4.1.2): (r − mean(r)) / std(r)
    elif estimator == "dr_grpo":
        advantages = groups - mean  # Dr. GRPO: r − mean(r), without the std
    elif estimator == "rloo":
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        advantages = groups - others  # RLOO: r_i − 1/(G−1) Σ_{j≠i} r_j
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; use grpo, dr_grpo or rloo")
    # A group whose scores are all equal carries no signal: its advantages are exactly 0 (the float mean of G equal
    # scores can miss them by an ulp, which the division by std + ε would blow up to a sizeable advantage).
    advantages = torch.where(signal_groups(scores, group_size)[:, None], advantages, 0.0)
    return advantages.reshape(-1)


def signal_groups(scores, group_size):
    """[groups] bool: True where a group's `group_size` scores (consecutive rows of `scores` [batch]) are not all
    equal, the groups that carry a signal (DAPO's dynamic sampling keeps only these)."""
    groups = scores.view(-1, group_size)
    return groups.amax(1) > groups.amin(1)  # DAPO's dynamic sampling (Section 3.2): 0 < |{o_i | o_i correct}| < G


def aggregate(per_token, response_mask, *, aggregation, max_tokens=None):
    """A [batch, response_len] per-token loss reduced to a scalar: `sequence_mean` (the mean over each response's
    tokens, then over responses), `token_mean` (over all response tokens), `constant` (the sum over tokens divided by
    responses × `max_tokens`)."""
    masked = per_token * response_mask
    if aggregation == "sequence_mean":
        lengths = response_mask.sum(1).clamp(min=1)
        return (masked.sum(1) / lengths).mean()  # GRPO's 1/G Σ_i 1/|o_i| Σ_t (DeepSeekMath eq. (3))
    if aggregation == "token_mean":
        return masked.sum() / response_mask.sum().clamp(min=1)  # DAPO's 1/Σ_i|o_i| Σ_i Σ_t
    if aggregation == "constant":
        if max_tokens is None:
            raise ValueError("aggregation 'constant' needs max_tokens")
        return masked.sum() / (per_token.shape[0] * max_tokens)  # Dr. GRPO: Σ_i Σ_t / (G · max tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; use sequence_mean, token_mean or constant")


def overlong_penalty(*, lengths, max_tokens, buffer):
    """DAPO's soft overlong punishment, added to the score: 0 for a response of at most max_tokens − buffer tokens, then
    falling linearly to −1 at max_tokens, −1 beyond. `lengths` [batch] (response tokens). Returns [batch]."""
    start = max_tokens - buffer
    return ((start - lengths) / buffer).clamp(min=-1.0, max=0.0)  # DAPO's R_length(y), soft overlong punishment


class GRPOLoss(NamedTuple):
    """The terms of the loss of one mini-batch. `loss` carries the gradient; the statistics do not."""

    loss: torch.Tensor  # policy_loss + kl_coef · kl_loss
    policy_loss: torch.Tensor  # the clipped surrogate, aggregated, as a loss
    kl_loss: torch.Tensor | None  # the aggregated k3 estimate of KL(π_θ ‖ π_ref), before kl_coef (with ref_logprobs)
    approx_kl: torch.Tensor  # E_t[(ρ_t − 1) − log ρ_t], an estimate of KL(π_old ‖ π_θ)
    clipfrac: torch.Tensor  # fraction of tokens (of responses, for `sequence`) where the clip binds
    clipfrac_low: torch.Tensor  # ... where it binds below, ρ < 1 − ε_low with Â < 0
    clipfrac_high: torch.Tensor  # ... where it binds above, ρ > 1 + ε_high with Â > 0


def grpo_loss(
    *,
    logprobs,
    old_logprobs,
    advantages,
    response_mask,
    cliprange_low,
    cliprange_high,
    aggregation,
    importance="token",
    max_tokens=None,
    ref_logprobs=None,
    kl_coef=0.0,
) -> GRPOLoss:
    """The clipped policy loss of GRPO and its variants. `logprobs` (with gradient), `old_logprobs`, `ref_logprobs`,
    `response_mask` [batch, response_len]; `advantages` [batch], one per response. Per token −min(ρ Â, clip(ρ,
    1 − ε_low, 1 + ε_high) Â), reduced by `aggregation` (see `aggregate`); with `importance="sequence"` (GSPO) one
    ratio per response and the mean over responses. With `ref_logprobs`, kl_coef times k3 per token, aggregated the
    same way, is added."""
    log_ratio = (logprobs - old_logprobs) * response_mask
    if importance == "token":
        ratio = torch.exp(log_ratio)  # ρ_t = π_θ / π_old
        adv = advantages[:, None]
        losses = -adv * ratio
        losses_clipped = -adv * torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
        per_token = torch.max(losses, losses_clipped)  # GRPO objective (DeepSeekMath eq. (3)), clip-higher (DAPO)
        policy_loss = aggregate(per_token, response_mask, aggregation=aggregation, max_tokens=max_tokens)
        weights = response_mask
    elif importance == "sequence":
        lengths = response_mask.sum(1).clamp(min=1)
        ratio = torch.exp(log_ratio.sum(1) / lengths)  # GSPO: s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|)
        adv = advantages
        losses = -adv * ratio
        losses_clipped = -adv * torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
        policy_loss = torch.max(losses, losses_clipped).mean()  # GSPO objective: the mean over responses
        weights = torch.ones_like(ratio)
    else:
        raise ValueError(f"unknown importance {importance!r}; use token or sequence")
    kl_loss = None
    loss = policy_loss
    if ref_logprobs is not None:
        ref_log_ratio = (ref_logprobs - logprobs) * response_mask  # log π_ref − log π_θ, 0 on padding
        k3 = torch.expm1(ref_log_ratio) - ref_log_ratio  # DeepSeekMath's KL estimator, eq. (4): π_ref/π_θ − log(·) − 1
        kl_loss = aggregate(k3, response_mask, aggregation=aggregation, max_tokens=max_tokens)
        loss = policy_loss + kl_coef * kl_loss
    with torch.no_grad():
        token_log_ratio = (logprobs - old_logprobs) * response_mask
        approx_kl = masked_mean(torch.exp(token_log_ratio) - 1 - token_log_ratio, response_mask)
        low = ((ratio < 1.0 - cliprange_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + cliprange_high) & (adv > 0)).float()
        clipfrac_low = masked_mean(low, weights)
        clipfrac_high = masked_mean(high, weights)
    return GRPOLoss(
        loss=loss,
        policy_loss=policy_loss,
        kl_loss=kl_loss,
        approx_kl=approx_kl,
        clipfrac=clipfrac_low + clipfrac_high,
        clipfrac_low=clipfrac_low,
        clipfrac_high=clipfrac_high,
    )


class MicroShares(NamedTuple):
    """A micro-batch's share of its mini-batch for each mean the loss and the log take (see micro_shares)."""

    policy: float  # of the policy loss
    kl: float  # of the k3 term
    tokens: float  # of a mean over response tokens (approx_kl)
    clip: float  # of the clip fractions (over tokens, or over responses for `sequence`)


def micro_shares(micro_mask, mini_mask, *, args) -> MicroShares:
    """The weights that make the losses of the micro-batches of --micro-batch-size rows sum to the mini-batch's:
    `token_mean` divides by the mini-batch's response tokens (the micro-batch's token share); `sequence_mean` is a
    mean over responses, and `constant` divides by the mini-batch's responses × --max-new-tokens (both the
    micro-batch's row share), as is GSPO's mean over responses."""
    tokens = common.token_share(micro_mask, mini_mask)
    rows = len(micro_mask) / len(mini_mask)
    aggregated = tokens if args.loss_aggregation == "token_mean" else rows
    return MicroShares(
        policy=rows if args.importance == "sequence" else aggregated,
        kl=aggregated,
        tokens=tokens,
        clip=rows if args.importance == "sequence" else tokens,
    )


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    group_size: int = 4
    """G: responses sampled per prompt; a prompt's G responses are its group, the baseline of each of them"""
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """the advantage from the group: `grpo` (r − mean) / (std + ε), `dr_grpo` r − mean, `rloo` r − mean of the others"""
    loss_aggregation: Literal["sequence_mean", "token_mean", "constant"] = "sequence_mean"
    """per-token losses to a scalar: mean per response then over responses (GRPO), over all tokens (DAPO), or the sum
    over responses × --max-new-tokens (Dr. GRPO)"""
    importance: Literal["token", "sequence"] = "token"
    """the importance ratio: per token (GRPO), or per response, the geometric mean of the token ratios (GSPO)"""
    cliprange_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low"""
    cliprange_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher: above ε_low)"""
    kl_coef: float = 0.04
    """β: the weight of the KL to π_ref (DeepSeekMath: 0.04); 0 with no --kl-in-reward does not load π_ref"""
    overlong_buffer: int = 0
    """DAPO's overlong reward shaping: the last this many of --max-new-tokens cost up to 1 in the score, linearly;
    0 = off"""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop the groups whose scores are all equal and sample more prompts' groups, up to
    --max-sampling-rounds rounds, until the rollout batch is full of groups with a signal"""
    max_sampling_rounds: int = 10
    """with --dynamic-sampling, the most rounds of rollout-batch-size / G prompts an iteration samples; then the batch
    is filled with dropped groups (advantage 0)"""
    kl_in_reward: bool = False
    """put the KL in the score, r − β Σ_t (log π_old − log π_ref) (RLOO), not k3 in the loss (GRPO)"""
    update_epochs: int = 1
    """passes over each rollout batch"""
    total_episodes: int = 8192
    """total number of sampled responses over all ranks"""
    rollout_batch_size: int = 64
    """responses sampled per rank per iteration (a multiple of --group-size: rollout-batch-size / G prompts)"""
    temperature: float = 1.0
    """sampling temperature (also applied to the log-probs, so they are those of the sampling distribution)"""
    top_k: int = 0
    """top-k sampling, 0 = off"""
    top_p: float = 1.0
    """nucleus sampling, 1 = off"""
    repetition_penalty: float = 1.0
    """divide the logit of every token the response already holds by this (×, if negative), 1 = off"""

    # Models and data
    train_split: str = "train"
    """the split sampled for rollouts"""

    # Devices
    ref_device: str = "policy"
    """where π_ref lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""

    # Logging and checkpoints
    exp_name: str = "grpo"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""


# --preset NAME: the values of PRESETS[NAME] become the defaults; flags given on the command line win over them.
# Each preset holds its paper's published settings (or its released run's), each cited at its line. A setting that
# is a property of scale (thousands of responses an iteration, responses thousands of tokens long) is marked SCALE:
# the preset keeps a value that runs on the built-in task, in the published proportion where there is one (updates
# per rollout batch, the overlong buffer's share of the response budget). The published learning rates (1e-6, for
# 1.5B-32B models) barely move the built-in task's tiny policy: pass --learning-rate 1e-4 there.
DAPO_RUN = (  # the DAPO authors' released run, in verl
    "https://github.com/volcengine/verl/blob/246cac4ca6b0e3ce1009bc48aaa798689e0600af/recipe/dapo/"
    "run_dapo_qwen2.5_32b.sh"
)
DR_GRPO_RUN = (  # the Dr. GRPO authors' released run, in oat
    "https://github.com/sail-sg/understand-r1-zero/blob/dfca49dd460ee7cc8e4a5a162c876a7fd6993b87/examples/"
    "qwen2.5-math-1.5b.sh"
)
PRESETS = {
    # GRPO: DeepSeekMath (Shao et al. 2024), Section 4.2, "Training and Evaluating DeepSeekMath-RL"
    "grpo": dict(
        advantage_estimator="grpo",  # Section 4.1.2, outcome supervision: (r − mean(r)) / std(r)
        loss_aggregation="sequence_mean",  # eq. (3): 1/G Σ_i 1/|o_i| Σ_t
        kl_coef=0.04,  # Section 4.2: "The KL coefficient is 0.04"; β · eq. (4) in the loss, eq. (3)
        group_size=64,  # Section 4.2: "For each question, we sample 64 outputs"
        learning_rate=1e-6,  # Section 4.2: "The learning rate of the policy model is 1e-6"
        update_epochs=1,  # Section 4.2: "The policy model only has a single update following each exploration stage"
        rollout_batch_size=128,  # SCALE: "the training batch size is 1024" (Section 4.2); here 2 prompts × 64
        mini_batch_size=128,  # the single update: one step on the whole rollout batch (Section 4.2)
    ),  # not set: "The max length is set to 1024" (SCALE: the task's 32 new tokens); ε (not given)
    # Dr. GRPO (Liu et al. 2025): the authors' released run, DR_GRPO_RUN (oat's train_zero_math.py)
    "dr-grpo": dict(
        advantage_estimator="dr_grpo",  # DR_GRPO_RUN#L20 --critic_type drgrpo: r − mean(r), train_zero_math.py#L294
        loss_aggregation="constant",  # DR_GRPO_RUN#L20: masked_sum / generate_max_length, train_zero_math.py#L286
        kl_coef=0.0,  # DR_GRPO_RUN#L33 --beta 0
        group_size=8,  # DR_GRPO_RUN#L16, #L47 --num_samples 8
        learning_rate=1e-6,  # DR_GRPO_RUN#L30
        lr_schedule="constant",  # DR_GRPO_RUN#L31
        update_epochs=1,  # DR_GRPO_RUN#L32 --num_ppo_epochs 1
        temperature=1.0,  # DR_GRPO_RUN#L48
        top_p=1.0,  # DR_GRPO_RUN#L49
        rollout_batch_size=64,  # SCALE: 128 prompts × 8 (DR_GRPO_RUN#L54); here 8 prompts × 8
        mini_batch_size=8,  # 8 steps per rollout batch as released: 1024 responses / --train_batch_size 128 (#L52)
    ),  # not set: --generate_max_length 3000 (#L50, SCALE: the task's 32 new tokens, the `constant` divisor)
    # DAPO (Yu et al. 2025): the authors' released run, DAPO_RUN (verl's recipe/dapo)
    "dapo": dict(
        advantage_estimator="grpo",  # DAPO_RUN#L7 adv_estimator=grpo
        kl_coef=0.0,  # DAPO_RUN#L9-L12: no KL in the reward, no KL loss
        cliprange_low=0.2,  # DAPO_RUN#L14 clip_ratio_low
        cliprange_high=0.28,  # DAPO_RUN#L15 clip_ratio_high: clip-higher
        overlong_buffer=6,  # SCALE: 4096 of 20480 new tokens (DAPO_RUN#L18, #L20); here a fifth of the task's 32
        loss_aggregation="token_mean",  # DAPO_RUN#L23 loss_agg_mode="token-mean"
        dynamic_sampling=True,  # DAPO_RUN#L25 enable_filter_groups=True
        max_sampling_rounds=10,  # DAPO_RUN#L27 max_num_gen_batches=10
        group_size=16,  # DAPO_RUN#L30 n_resp_per_prompt=16
        rollout_batch_size=128,  # SCALE: 512 prompts × 16 (DAPO_RUN#L28); here 8 prompts × 16
        mini_batch_size=8,  # 16 steps per rollout batch as released: 512 prompts / 32 a mini-batch (DAPO_RUN#L31)
        temperature=1.0,  # DAPO_RUN#L46
        top_p=1.0,  # DAPO_RUN#L47
        learning_rate=1e-6,  # DAPO_RUN#L91
        lr_warmup_steps=10,  # DAPO_RUN#L92
        weight_decay=0.1,  # DAPO_RUN#L93
        max_grad_norm=1.0,  # DAPO_RUN#L98
    ),  # not set: a sampling round of 3 × 512 prompts (#L29; here a round is one rollout batch's prompts)
    # RLOO (Ahmadian et al. 2024, "Back to Basics")
    "rloo": dict(
        advantage_estimator="rloo",  # the leave-one-out baseline: r_i − 1/(k − 1) Σ_{j≠i} r_j
        kl_in_reward=True,  # the KL penalty in the sequence reward, r(x, y) − β log(π(y|x) / π_ref(y|x))
        group_size=4,  # RLOO with k = 4 samples per prompt (the paper runs k = 2 and k = 4)
    ),
    # GSPO (Zheng et al. 2025), Section 5.1
    "gspo": dict(
        advantage_estimator="grpo",  # the group-normalised advantage of GRPO
        importance="sequence",  # eq. (5): the sequence ratio s_i, clipped per response
        cliprange_low=3e-4,  # Section 5.1: "the clipping ranges in Equation (5) to 3e-4 and 4e-4"
        cliprange_high=4e-4,  # Section 5.1
        kl_coef=0.0,  # eq. (5) holds no KL term
    ),
}


@torch.no_grad()
def generate(policy, *, query_ids, query_mask, generation_config, zero3, repetition_penalty=1.0):
    """Sample responses with the KV cache (as ppo.py). Under ZeRO-3 the policy's shards are gathered once for the
    whole rollout, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    model = getattr(policy, "module", policy)  # the HF model inside a DeepSpeed engine
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:  # applied before temperature, top-k and top-p, as forward_logprobs does
        processors.append(common.ResponseRepetitionPenalty(repetition_penalty, query_ids.shape[1]))
    with common.gathered_for_generation(policy, zero3):
        out = model.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            generation_config=generation_config,
            logits_processor=processors,
            synced_gpus=zero3,
        )
    return out[:, query_ids.shape[1] :]


# The step the loop calls, as a function of what it reads: the rollout (step 1)
class Models(NamedTuple):
    """The models of a run: the policy π_θ trains; π_ref and the rewards are frozen."""

    policy: object  # π_θ, a DeepSpeed engine (or common.TorchEngine); the rollout samples it as π_old
    ref_policy: (
        object | None
    )  # π_ref = π_init; with LoRA the policy itself, read with its adapter off; None: not loaded
    rewards: list  # the reward functions r(x, y) (common.load_reward)
    reward_weights: list  # the weight of each reward in the score


class Sampling(NamedTuple):
    """How a rollout samples and scores its responses, fixed for the run."""

    tokenizer: object
    generation_config: GenerationConfig  # temperature, top-k, top-p, max_new_tokens, EOS and padding
    temperature: float  # the log-probs are those of softmax(logits / temperature)
    repetition_penalty: float  # on the sampled logits and on the log-probs alike
    stop_strings: list  # text that ends a response, besides EOS
    zero3: bool  # under ZeRO-3 generation gathers the policy's shards
    forward_batch_size: int  # rows per no-grad forward pass
    device: torch.device


def score_rows(models: Models, *rows):
    """The weighted sum of the rewards of rows (query_ids, query_mask, response_ids, response_mask, prompts)."""
    return sum(weight * reward(*rows) for weight, reward in zip(models.reward_weights, models.rewards))


def rollout(models: Models, sampling: Sampling, prompt_rows, prompts) -> common.Rollout:
    """Run π_old on a batch of prompt rows (each prompt's G copies in consecutive rows): sample, cut at EOS, score,
    and forward π_old and π_ref over the result. Without π_ref, its log-probs are π_old's (a KL of 0)."""
    tokenizer = sampling.tokenizer
    device = sampling.device
    query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
    models.policy.eval()  # sampling and scoring in eval mode; the update switches to train mode
    response_ids = generate(
        models.policy,
        query_ids=query_ids,
        query_mask=query_mask,
        generation_config=sampling.generation_config,
        zero3=sampling.zero3,
        repetition_penalty=sampling.repetition_penalty,
    )
    response_ids, response_mask, ended = common.truncate_after_eos(
        response_ids,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
        stop_strings=sampling.stop_strings,
    )
    rows = (query_ids, query_mask, response_ids, response_mask)
    chunk = sampling.forward_batch_size
    scores = common.in_chunks(functools.partial(score_rows, models), (*rows, prompts), chunk).to(device)
    penalties = dict(temperature=sampling.temperature, repetition_penalty=sampling.repetition_penalty)
    old_logprobs_of = functools.partial(common.forward_logprobs, models.policy, **penalties)
    with torch.no_grad():
        old_logprobs = common.in_chunks(old_logprobs_of, rows, chunk)
        ref_logprobs = None  # no π_ref loaded (β = 0, no KL in the reward): no KL to it either
        if models.ref_policy is not None:
            ref_logprobs_of = functools.partial(common.forward_logprobs, models.ref_policy, **penalties)
            with common.adapter_off(models.ref_policy):
                ref_logprobs = common.in_chunks(ref_logprobs_of, rows, chunk).to(device)
    batch = common.Batch(query_ids, query_mask, response_ids, response_mask.to(old_logprobs.dtype))
    return common.Rollout(
        batch=batch,
        scores=scores,
        ended=ended,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


def rollout_rows(sampled: common.Rollout, index) -> common.Rollout:
    """The rows of a rollout at `index` (a tensor of row numbers)."""
    ref = sampled.ref_logprobs
    return common.Rollout(
        batch=sampled.batch.rows(index),
        scores=sampled.scores[index],
        ended=sampled.ended[index],
        old_logprobs=sampled.old_logprobs[index],
        ref_logprobs=None if ref is None else ref[index],
    )


def join_rollouts(parts: list, pad_id: int) -> common.Rollout:
    """Rollouts of several sampling rounds as one: prompts left-padded, responses and their log-probs right-padded to
    the widest round (padding is masked everywhere it is read)."""
    prompt_width = max(part.batch.query_ids.shape[1] for part in parts)
    response_width = max(part.batch.response_ids.shape[1] for part in parts)

    def left(x, value):
        return torch.nn.functional.pad(x, (prompt_width - x.shape[1], 0), value=value)

    def right(x, value):
        return torch.nn.functional.pad(x, (0, response_width - x.shape[1]), value=value)

    batch = common.Batch(
        query_ids=torch.cat([left(part.batch.query_ids, pad_id) for part in parts]),
        query_mask=torch.cat([left(part.batch.query_mask, 0) for part in parts]),
        response_ids=torch.cat([right(part.batch.response_ids, pad_id) for part in parts]),
        response_mask=torch.cat([right(part.batch.response_mask, 0) for part in parts]),
    )
    with_ref = parts[0].ref_logprobs is not None
    return common.Rollout(
        batch=batch,
        scores=torch.cat([part.scores for part in parts]),
        ended=torch.cat([part.ended for part in parts]),
        old_logprobs=torch.cat([right(part.old_logprobs, 0.0) for part in parts]),
        ref_logprobs=torch.cat([right(part.ref_logprobs, 0.0) for part in parts]) if with_ref else None,
    )


class Groups(NamedTuple):
    """The rollout an iteration trains on, and how it was sampled."""

    rollout: common.Rollout  # num_prompts groups of group_size consecutive rows
    rounds: int  # sampling rounds run (1 without dynamic sampling)
    dropped: int  # groups sampled whose scores were all equal, left out of the batch
    filled: int  # of those, put back to fill the batch when the rounds ran out


def sample_groups(
    sample, *, prompt_rows, prompts, sampler, num_prompts, group_size, dynamic, max_rounds, pad_id
) -> Groups:
    """Step 1 of an iteration: draw `num_prompts` prompts (with `sampler`) and sample `group_size` responses for each
    by `sample(prompt_rows=..., prompts=...)` (the rollout), each prompt's group in consecutive rows. With `dynamic`
    (DAPO's dynamic sampling), a group whose scores are all equal is dropped and another round of `num_prompts`
    prompts is drawn, until `num_prompts` groups with a signal are kept or `max_rounds` rounds have run; then the
    batch is filled with dropped groups (in the order sampled). Under torchrun every rank runs the same number of
    rounds (generation and the forward passes are collective under ZeRO-3): a rank whose batch is full samples on
    until every rank's is."""
    rounds = 0
    dropped = 0
    kept = []
    spare = []
    n_kept = 0
    while True:
        rounds += 1
        prompt_index = torch.randint(len(prompt_rows), (num_prompts,), generator=sampler)
        batch_index = prompt_index.repeat_interleave(group_size).tolist()
        sampled = sample(prompt_rows=[prompt_rows[i] for i in batch_index], prompts=[prompts[i] for i in batch_index])
        if not dynamic:
            return Groups(rollout=sampled, rounds=1, dropped=0, filled=0)
        signal = signal_groups(sampled.scores, group_size)
        dropped += int((~signal).sum())
        # the first groups with a signal, up to a full batch (the released code keeps them all, then cuts the batch)
        wanted = signal.nonzero().flatten()[: num_prompts - n_kept]
        n_kept += len(wanted)
        offsets = torch.arange(group_size)
        kept.append(rollout_rows(sampled, (wanted[:, None] * group_size + offsets).flatten()))
        spare.append(rollout_rows(sampled, ((~signal).nonzero() * group_size + offsets).flatten()))
        short = common.all_reduce_cpu(torch.tensor([float(n_kept < num_prompts)]), torch.distributed.ReduceOp.MAX)
        if not short.item() or rounds == max_rounds:
            break
    filled = num_prompts - n_kept  # DAPO: too few groups with a signal after max_rounds; its released code stops
    if filled:
        spare = join_rollouts(spare, pad_id)
        kept.append(rollout_rows(spare, torch.arange(filled * group_size)))
    return Groups(rollout=join_rollouts(kept, pad_id), rounds=rounds, dropped=dropped, filled=filled)


if __name__ == "__main__":
    # Arguments: the command line over the defaults, or over a preset's values with --preset.
    args = common.parse_args(Args, PRESETS)

    # Validate what needs no process group, then start the run (checks, process group, run name and folder).
    if args.group_size < 2:
        common.fail(
            f"--group-size {args.group_size}: a group needs at least 2 responses for a baseline; pass --group-size 2 "
            "or more"
        )
    if args.rollout_batch_size % args.group_size:
        common.fail(
            f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --group-size {args.group_size}; pass "
            f"--rollout-batch-size {max(args.rollout_batch_size // args.group_size, 1) * args.group_size}"
        )
    if args.rollout_batch_size % args.mini_batch_size:
        common.fail(
            f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --mini-batch-size "
            f"{args.mini_batch_size}; pick a mini-batch size that divides it"
        )
    if args.max_sampling_rounds < 1:
        common.fail(
            f"--max-sampling-rounds {args.max_sampling_rounds}: dynamic sampling needs at least 1 round; pass "
            "--max-sampling-rounds 10 (DAPO's)"
        )
    if not 0 <= args.overlong_buffer < args.max_new_tokens:
        common.fail(
            f"--overlong-buffer {args.overlong_buffer} must lie in [0, --max-new-tokens {args.max_new_tokens}); pass a "
            "smaller buffer, e.g. a quarter of --max-new-tokens"
        )
    run = common.start_run(args, "grpo.py")
    device = run.device
    per_iteration = args.rollout_batch_size * run.world_size  # episodes per iteration, all ranks together
    if args.total_episodes % per_iteration or not args.total_episodes:
        common.fail(
            f"--total-episodes {args.total_episodes} is not a positive multiple of --rollout-batch-size "
            f"{args.rollout_batch_size} × {run.world_size} rank(s) = {per_iteration}; pass --total-episodes "
            f"{max(args.total_episodes // per_iteration, 1) * per_iteration}"
        )
    zero3 = args.zero_stage == 3
    with_ref = args.kl_coef != 0 or args.kl_in_reward  # β = 0 and no KL in the reward: π_ref is not loaded
    # The data first: a bad file fails before any model is loaded.
    held_out = (args.dataset, args.eval_split)
    train_texts = common.load_prompts(args.dataset, args.train_split, args.prompt_field, held_out=held_out)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)

    # Seed: models are loaded under one seed; sampling then uses seed + rank.
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Load: what each model starts from and where it goes (`policy`: this rank's device, as a DeepSpeed engine;
    # `cpu`; `cuda:N`). One Placement holds the settings they share.
    place = common.Placement.of(args)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy")
    if with_ref and not args.lora_r:  # with LoRA, π_ref is the policy with its adapter switched off
        ref_policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at=args.ref_device)
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [place.reward(name, tokenizer, at=args.reward_device) for name in args.reward_model]
    context = policy.config.max_position_embeddings
    log = common.make_logger(args, run.name, run.rank)

    # Place: the policy is a DeepSpeed engine on this rank's device; π_ref (if loaded) and the rewards are frozen.
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    common.freeze_lower_layers(policy, args.unfrozen_layers)
    common.gradient_checkpointing(policy, args.gradient_checkpointing)
    lora = dict(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        quantized=args.load_in_4bit,
    )
    policy = common.add_lora(policy, "causal", **lora)
    steps_per_iteration = args.update_epochs * (args.rollout_batch_size // args.mini_batch_size)
    total_steps = args.total_episodes // per_iteration * steps_per_iteration
    schedule = common.lr_schedule(args.lr_warmup_steps, total_steps, args.lr_schedule)
    policy = place.trainable(policy, at="policy", lr=args.learning_rate, schedule=schedule)
    if not with_ref:
        ref_policy = None
        common.note("--kl-coef 0 without --kl-in-reward: π_ref is not loaded, and no KL to it is logged")
    elif args.lora_r:
        ref_policy = policy  # common.adapter_off reads it as π_ref
    else:
        ref_policy = place.frozen(ref_policy, at=args.ref_device)
    policy.eval()  # eval mode (sampling, scoring); the update switches to train mode and back
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    # Data: each rank draws its own prompts (seed + rank) from the whole training split; the held-out prompts are
    # dealt out over the ranks.
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=context,
        chat_template=args.chat_template,
    )
    kept = common.fitting_prompts(tokenizer, train_texts, what="training prompts", **encode)
    train_texts = [train_texts[i] for i in kept]
    held_out = common.held_out_prompts(tokenizer, eval_texts, run=run, args=args, **encode)
    train_prompts, n_truncated = common.encode_prompts(tokenizer, train_texts, **encode)
    if n_truncated:
        cut = "lost their oldest turns" if args.chat_template else "were left-truncated"
        common.note(f"{n_truncated} training prompts {cut} to fit the prompt budget")
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed + run.rank)
    sampler = torch.Generator().manual_seed(args.seed + run.rank)
    forward_batch_size = args.forward_batch_size or args.micro_batch_size or args.mini_batch_size
    models = Models(policy=policy, ref_policy=ref_policy, rewards=reward_fns, reward_weights=reward_weights)
    sampling = Sampling(
        tokenizer=tokenizer,
        generation_config=generation_config,
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop_strings,
        zero3=zero3,
        forward_batch_size=forward_batch_size,
        device=device,
    )
    # Evaluate: the held-out prompts, one response each, sampled as in training under a fixed seed.
    evaluate = functools.partial(
        common.evaluate_held_out,
        sample=functools.partial(rollout, models, sampling),
        held_out=held_out,
        tokenizer=tokenizer,
        gold_score=gold_score,
        batch_size=args.rollout_batch_size,
        run=run,
        args=args,
        log=log,
    )

    num_iterations = args.total_episodes // per_iteration
    prompts_per_iteration = args.rollout_batch_size // args.group_size
    # Resume: `resume/` holds all a run needs to go on as if never stopped (the engine with its optimizer, each
    # rank's RNG and prompt-sampler states).
    engines = {"policy": policy}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    start = 1
    if args.resume:
        state = common.load_resume(args.resume, engines, run.rank)
        start = state["step"] + 1
        eval_history = state["eval_history"]
        sampler.set_state(state["sampler"])
    else:
        eval_history = [(0, evaluate(0))]
        log(0, eval_history[-1][1])
    if run.rank == 0:
        before = ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items())
        print(
            f"{run.name}: {num_iterations} iterations × {prompts_per_iteration} prompts × {args.group_size} "
            f"responses × {run.world_size} rank(s); before training: {before}"
        )
    start_time = time.time()
    for iteration in common.progress(range(start, num_iterations + 1), desc="iterations", enabled=args.progress):
        # ALGO LOGIC
        # 1. Roll out π_old: rollout-batch-size / G prompts, each G times in consecutive rows (its group); sample, cut
        # at EOS, score, π_old and π_ref log-probs.
        # With --dynamic-sampling (DAPO), groups whose scores are all equal are dropped and more prompts sampled.
        t0 = time.time()
        groups = sample_groups(
            functools.partial(rollout, models, sampling),
            prompt_rows=train_prompts,
            prompts=train_texts,
            sampler=sampler,
            num_prompts=prompts_per_iteration,
            group_size=args.group_size,
            dynamic=args.dynamic_sampling,
            max_rounds=args.max_sampling_rounds,
            pad_id=tokenizer.pad_token_id,
        )
        sampled = groups.rollout
        batch = sampled.batch
        response_mask = batch.response_mask
        old_logprobs = sampled.old_logprobs
        t_rollout = time.time() - t0
        with torch.no_grad():
            # 2. The KL to π_ref per token (log π_old − log π_ref, k1, and k2, k3, for the log); with --kl-in-reward
            # the score pays β times its sum over the response (RLOO); with --overlong-buffer, DAPO's length penalty.
            kl = {}  # without π_ref (β = 0, no --kl-in-reward) there is no KL to it to log
            if sampled.ref_logprobs is not None:
                log_ratio = (sampled.ref_logprobs - old_logprobs) * response_mask  # r = log π_ref − log π_old
                kl = {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(log_ratio) - log_ratio}
            scores = sampled.scores
            if args.kl_in_reward:
                scores = scores - args.kl_coef * kl["k1"].sum(1)  # RLOO: r(x, y) − β log(π(y|x) / π_ref(y|x))
            length_penalty = torch.zeros_like(scores)
            if args.overlong_buffer:  # DAPO: the score of a response in the last --overlong-buffer tokens falls
                length_penalty = overlong_penalty(
                    lengths=response_mask.sum(1),
                    max_tokens=args.max_new_tokens,
                    buffer=args.overlong_buffer,
                )
            scores = scores + length_penalty

            # 3. One advantage per response from its group (--advantage-estimator), on every token of it.
            advantages = group_advantages(scores=scores, group_size=args.group_size, estimator=args.advantage_estimator)

        # 4. Minimise the clipped loss for `update_epochs` passes over shuffled mini-batches of the rollout.
        t1 = time.time()
        step_stats = []
        policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
        for _epoch in range(args.update_epochs):
            for idx in torch.randperm(args.rollout_batch_size, generator=sampler).split(args.mini_batch_size):
                stats = {}
                # Each term of each micro-batch weighted by its share of the mini-batch's (micro_shares): the
                # accumulated gradient and the logged statistics (sums of the weighted values) are the mini-batch's.
                for micro in common.micro_batches(idx, args.micro_batch_size):
                    shares = micro_shares(response_mask[micro], response_mask[idx], args=args)
                    micro_batch = batch.rows(micro)
                    logprobs = common.forward_logprobs(
                        policy,
                        *micro_batch,
                        temperature=args.temperature,
                        repetition_penalty=args.repetition_penalty,
                    )
                    kl_in_loss = with_ref and not args.kl_in_reward
                    terms = grpo_loss(
                        logprobs=logprobs,
                        old_logprobs=old_logprobs[micro],
                        advantages=advantages[micro],
                        response_mask=micro_batch.response_mask,
                        cliprange_low=args.cliprange_low,
                        cliprange_high=args.cliprange_high,
                        aggregation=args.loss_aggregation,
                        importance=args.importance,
                        max_tokens=args.max_new_tokens,
                        ref_logprobs=sampled.ref_logprobs[micro] if kl_in_loss else None,  # GRPO: β · k3 in the loss
                        kl_coef=args.kl_coef,
                    )
                    loss = shares.policy * terms.policy_loss
                    micro_stats = {
                        "policy/policy_loss": shares.policy * terms.policy_loss.item(),
                        "policy/approx_kl": shares.tokens * terms.approx_kl.item(),
                        "policy/clipfrac": shares.clip * terms.clipfrac.item(),
                        "policy/clipfrac_low": shares.clip * terms.clipfrac_low.item(),
                        "policy/clipfrac_high": shares.clip * terms.clipfrac_high.item(),
                    }
                    if terms.kl_loss is not None:
                        loss = loss + args.kl_coef * (shares.kl * terms.kl_loss)
                        micro_stats["policy/kl_loss"] = shares.kl * terms.kl_loss.item()  # the aggregated k3, before β
                    micro_stats = {"policy/loss": loss.item(), **micro_stats}
                    for key, value in micro_stats.items():
                        stats[key] = stats.get(key, 0.0) + value
                    policy.backward(loss, scale_wrt_gas=False)
                    policy.step()
                step_stats.append(stats)
        t_update = time.time() - t1

        # 5. Log: the mean of each step's statistics, and the rollout's over the whole batch of all ranks; an
        # evaluation on the held-out prompts every --eval-every iterations.
        metrics = {key: sum(stats[key] for stats in step_stats) / len(step_stats) for key in step_stats[0]}
        metrics.update(common.rollout_metrics(sampled, kl, tokenizer=tokenizer, gold_score=gold_score))
        if kl:
            kl_k1 = kl["k1"]
            ones = torch.ones_like(kl_k1[:, 0])
            metrics["rollout/kl_to_ref"] = masked_mean(kl_k1.sum(1), ones, across_ranks=True).item()
        metrics["rollout/score_std_in_group"] = sampled.scores.view(-1, args.group_size).std(1).mean().item()
        no_signal = ~signal_groups(sampled.scores, args.group_size)
        metrics["rollout/zero_std_groups"] = no_signal.float().mean().item()  # groups whose scores are all equal
        if args.dynamic_sampling:  # DAPO's dynamic sampling: this rank's rounds, and the groups it left out
            metrics["rollout/sampling_rounds"] = groups.rounds
            metrics["rollout/dropped_groups"] = groups.dropped
            metrics["rollout/filled_groups"] = groups.filled
        metrics["rollout/advantage_abs_mean"] = advantages.abs().mean().item()
        if args.overlong_buffer:
            metrics["rollout/overlong_penalty"] = length_penalty.mean().item()  # DAPO's length term, mean per response
        common.log_iteration(
            metrics,
            iteration=iteration,
            num_iterations=num_iterations,
            per_iteration=per_iteration,
            update_epochs=args.update_epochs,
            times=common.IterationTimes(start=t0, rollout=t_rollout, update=t_update),
            evaluate=evaluate,
            eval_history=eval_history,
            policy=policy,
            run=run,
            args=args,
            log=log,
        )

        # 6. A resumable checkpoint every --save-every iterations, or now if the run was signalled.
        state = dict(step=iteration, eval_history=eval_history, sampler=sampler.get_state())
        common.checkpoint_if_due(run, args, step=iteration, engines=engines, state=state, signum=stop_requested())

    # Save the policy as an HF folder.
    common.save_hf(policy, tokenizer, path=os.path.join(run.dir, "policy"), rank=run.rank)
    if run.rank == 0:
        first = eval_history[0][1]
        final = eval_history[-1][1]
        changes = ", ".join(f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first)
        print(
            f"done in {time.time() - start_time:.0f} s; held-out before → after: {changes}; policy saved to "
            f"{run.dir}/policy"
        )
    common.exit_cleanly()
