"""PPO for language models from human preferences.

Papers:
- PPO: Schulman, Wolski, Dhariwal, Radford, Klimov, "Proximal Policy Optimization Algorithms" (2017, arXiv 1707.06347).
- GAE: Schulman, Moritz, Levine, Jordan, Abbeel, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (2016, arXiv 1506.02438).
- Ziegler, Stiennon, Wu, Brown, Radford, Amodei, Christiano, Irving, "Fine-Tuning Language Models from Human
  Preferences" (2019, arXiv 1909.08593): PPO on a reward penalised by the KL divergence to the initial policy.
- Stiennon et al., "Learning to Summarize from Human Feedback" (2020, arXiv 2009.01325): the same reward for TL;DR.
- InstructGPT: Ouyang et al., "Training Language Models to Follow Instructions with Human Feedback" (2022, arXiv
  2203.02155): PPO-ptx, a pretraining term mixed into the objective.
- PPO-max: Zheng et al., "Secrets of RLHF in Large Language Models Part I: PPO" (2023, arXiv 2307.04964).

The algorithm. A prompt x, a response y = (y_1 .. y_T) sampled from π_θ; each token y_t is an action taken in the
state s_t = (x, y_<t). π_ref = π_init is the frozen SFT policy, π_old the policy that sampled the rollout, V the
value model, r(x, y) the reward model's score of the whole response.

- Reward with a KL penalty (Ziegler et al., Section 2; Stiennon et al., the KL-penalised reward): the policy is
  trained on R(x, y) = r(x, y) − β log(π(y|x) / π_ref(y|x)). The log-ratio of a sequence is the sum of its tokens',
  so the per-token reward is r_t = −β (log π_old(y_t|s_t) − log π_ref(y_t|s_t)), plus the score r(x, y) on the last
  token y_T.
- The per-token KL estimate (`--kl-estimator`; Schulman, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html): with r = log π_ref(y_t|s_t) − log π_old(y_t|s_t) on the sampled token,
  k1 = −r (the papers' penalty above, the default), k2 = ½ r², k3 = (e^r − 1) − r; all three are logged.
  `--kl-in-loss` moves the penalty out of the reward into the loss, as GRPO does (Shao et al. 2024, DeepSeekMath,
  arXiv 2402.03300): the reward is the score alone, and the loss adds β · mean_t k(π_θ, π_ref) over the rollout's
  response tokens, with the current π_θ (its gradient flows; k3 or k2, as k1's gradient is 0 in expectation on
  the policy's own samples). β is then the weight of a mean per token, not of a sum per response; it still adapts
  on the rollout's KL measured by k1.
- β adapts toward a target KL (Ziegler et al., Section 2.2): e = clip(KL / KL_target − 1, −0.2, 0.2),
  β ← β (1 + e · n / horizon), n the responses of the batch; or β stays fixed.
- Advantages by GAE, truncated at the end of the response (PPO eq. (11) and (12); the GAE paper's GAE(γ, λ)):
  δ_t = r_t + γ V(s_{t+1}) − V(s_t), Â_t = δ_t + γλ Â_{t+1}, with V = 0 after y_T; returns R_t = Â_t + V(s_t).
- The clipped surrogate objective (PPO eq. (7)), with ratio ρ_t = π_θ(y_t|s_t) / π_old(y_t|s_t):
  L^CLIP = E_t[min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε) Â_t)], maximised (the loss is its negative).
- The value loss, clipped around V_old as in the released code (not in the PPO paper; trlX's modeling_ppo.py,
  https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/models/modeling_ppo.py#L189):
  ½ E_t[max((V − R_t)², (V_old + clip(V − V_old, −ε_v, ε_v) − R_t)²)].
- Loss = −L^CLIP + c_v · value loss − c_e · entropy (PPO eq. (9), with the value model as its own network), plus
  γ_ptx times the language-model loss on pretraining text (InstructGPT eq. (2), PPO-ptx).
- An iteration (PPO Algorithm 1): roll out π_old on a batch of prompts, compute advantages, then optimise the loss
  for K epochs over mini-batches of the rollout; β adapts after it.
- PPO-max (`--preset ppo-max`): the tricks Zheng et al. keep (Section 5.3.1 score reparameterization: reward scaling
  by a running std; Section 5.3.2 policy constraints: a token-level KL penalty, fixed; Section 5.3.3 pretrained
  initialization: the critic from the reward model; Section 5.4, the PPO-max setup) with their released values.

Where this differs from the released code (trlX, at 3340c2f):
- Advantages are whitened once over the response tokens of the whole rollout batch on all ranks; trlX whitens each
  mini-batch, padding included: https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/trainer/accelerate_ppo_trainer.py#L145
- β adapts once an iteration, from the rollout's KL; trlX adapts it after every backward pass:
  https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/trainer/accelerate_ppo_trainer.py#L227
- Reward scaling divides by the population std of all scores seen; MOSS-RLHF uses the sample std:
  https://github.com/OpenLMLab/MOSS-RLHF/blob/4865d826fc6705dfdf1894aede00b4c81dabb24b/utils.py#L122

Commands:
    python ppo.py                                              # the built-in task, one CPU process
    python ppo.py --preset ppo-max                             # PPO-max's values on the built-in task
    torchrun --nproc_per_node 2 ppo.py --zero-stage 2          # two processes (CPU or GPUs)
    deepspeed --num_gpus 8 ppo.py --model-name-or-path ... --reward-model ... --dataset ... --zero-stage 3
    python ppo.py --preset hh-1b --ref-device cuda:1 --value-device cuda:2 --reward-device cuda:3  # HH, 4 GPUs
    ./launch.sh paper ppo-hh --size 1b                         # the same, the GPU layout chosen by launch.sh

Sampling is set by `Args` alone (temperature, top-k, top-p): the sampling fields of a checkpoint's
generation_config.json are dropped when the policy is loaded. The log-probs of the loss (and of the KL to π_ref)
are those of softmax(logits / temperature) over the whole vocabulary. With top-k or top-p set, responses come from
the truncated distribution and are scored as samples of the untruncated one, as the released trlX and MOSS-RLHF code
did; keep top-k 0 and top-p 1 (the defaults) for exactly on-policy samples.
"""

import dataclasses
import functools
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from transformers import GenerationConfig, LogitsProcessorList

import common
from common import masked_mean, whiten_masked


# The math: PPO's clipped losses, GAE, the KL estimates and controller, the running score moments;
# functions of tensors, each unit-tested.
def compute_gae(*, rewards, values, response_mask, gamma, gae_lambda):
    """Advantages and returns by GAE, for [batch, response_len] tensors (PPO eq. (11) and (12), the truncated form of
    the GAE paper's GAE(γ, λ)); V after the last response token is 0. Returns (advantages, returns), both 0 on
    padding; returns = A + V (before any whitening of A)."""
    rewards = rewards * response_mask
    values = values * response_mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # PPO eq. (12): δ_t = r_t + γV(s_{t+1}) − V(s_t)
        last_gae = delta + gamma * gae_lambda * last_gae  # PPO eq. (11), as a recursion: Â_t = δ_t + γλÂ_{t+1}
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, (advantages + values) * response_mask


def kl_estimate(*, logprobs, ref_logprobs, response_mask, estimator):
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of the sampled tokens (Schulman, "Approximating KL
    Divergence"), with r = log π_ref − log π: k1 = −r (unbiased, the papers' penalty), k2 = ½ r² (biased, low
    variance), k3 = (e^r − 1) − r (unbiased, never negative). All tensors [batch, response_len]; 0 on padding."""
    log_ratio = (ref_logprobs - logprobs) * response_mask  # r, 0 on padding, where every estimate is then 0
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1: e^r − 1 without cancellation for small r
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


class PPOLoss(NamedTuple):
    """The terms of the PPO loss of one mini-batch. `loss`, `policy_loss` and `value_loss` carry gradients (the
    policy and the value model each run their own backward pass); the statistics do not."""

    loss: torch.Tensor  # policy_loss + vf_coef · value_loss
    policy_loss: torch.Tensor  # −L^CLIP, plus kl_coef · kl_loss when the KL is in the loss
    value_loss: torch.Tensor  # the clipped value loss
    approx_kl: torch.Tensor  # E_t[(ρ_t − 1) − log ρ_t], an estimate of KL(π_old ‖ π_θ)
    clipfrac: torch.Tensor  # fraction of tokens where the policy clip binds
    value_clipfrac: torch.Tensor  # fraction of tokens where the value clip binds
    kl_loss: torch.Tensor | None = None  # masked mean of the KL estimate between π_θ and π_ref (with --kl-in-loss)


def ppo_loss(
    *,
    logprobs,
    old_logprobs,
    values,
    old_values,
    advantages,
    returns,
    response_mask,
    cliprange,
    cliprange_value,
    vf_coef,
    ref_logprobs=None,
    kl_coef=0.0,
    kl_estimator="k3",
) -> PPOLoss:
    """The clipped surrogate objective (PPO eq. (7)) as a loss, and the clipped value loss of the released code
    (trlX's modeling_ppo.py; the PPO paper has no value clipping). All tensors [batch, response_len];
    `response_mask` 1 on response tokens; advantages already whitened. Means are over response tokens. With
    `ref_logprobs` (--kl-in-loss, as GRPO), the policy loss adds kl_coef · the masked mean of `kl_estimator`
    between the current π_θ (`logprobs`, with its gradient) and π_ref."""
    ratio = torch.exp(logprobs - old_logprobs)  # ρ_t = π_θ / π_old
    policy_losses = -advantages * ratio
    policy_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(policy_losses, policy_losses_clipped), response_mask)  # PPO eq. (7)
    kl_loss = None
    if ref_logprobs is not None:  # the KL penalty in the loss instead of the reward
        kl_per_token = kl_estimate(
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            response_mask=response_mask,
            estimator=kl_estimator,
        )
        kl_loss = masked_mean(kl_per_token, response_mask)
        policy_loss = policy_loss + kl_coef * kl_loss

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_losses = (values - returns) ** 2
    value_losses_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(value_losses, value_losses_clipped), response_mask)

    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        approx_kl = masked_mean(ratio - 1 - log_ratio, response_mask)
        clipfrac = masked_mean((policy_losses_clipped > policy_losses).float(), response_mask)
        value_clipfrac = masked_mean((value_losses_clipped > value_losses).float(), response_mask)
    return PPOLoss(
        loss=policy_loss + vf_coef * value_loss,
        policy_loss=policy_loss,
        value_loss=value_loss,
        approx_kl=approx_kl,
        clipfrac=clipfrac,
        value_clipfrac=value_clipfrac,
        kl_loss=kl_loss,
    )


def update_kl_coef(*, kl_coef, current_kl, target_kl, horizon, n_steps):
    """The adaptive KL controller (Ziegler et al. 2019, Section 2.2): e = clip(KL / target − 1, ±0.2),
    β ← β(1 + e · n_steps / horizon)."""
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)  # Ziegler Section 2.2: β_{t+1} = β_t (1 + K_β e_t)


class RunningMoments:
    """Running mean / std of every score seen so far on all ranks (Chan et al.'s parallel update), for reward
    scaling (PPO-max, Zheng et al. Section 5.3.1)."""

    def __init__(self):
        self.mean = 0.0
        self.var = 1.0
        self.count = 1e-8

    def update(self, x: torch.Tensor):
        x = x.detach().double().cpu()  # float64 before the sums: E[x²] − E[x]² cancels badly in float32
        stats = torch.stack([x.sum(), (x**2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
        common.all_reduce_cpu(stats)  # over all ranks (through the GPU under NCCL)
        n = stats[2].item()
        mean = stats[0].item() / n
        var = max(stats[1].item() / n - mean**2, 0.0)
        delta = mean - self.mean
        total = self.count + n
        self.var = (self.var * self.count + var * n + delta**2 * self.count * n / total) / total
        self.mean = self.mean + delta * n / total
        self.count = total

    @property
    def std(self):
        return math.sqrt(self.var)


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    cliprange: float = 0.2
    """ε of the clipped policy loss"""
    cliprange_value: float = 0.2
    """ε_v of the clipped value loss"""
    vf_coef: float = 1.0
    """weight c_v of the value loss"""
    gamma: float = 1.0
    """discount γ of GAE"""
    gae_lambda: float = 0.95
    """λ of GAE"""
    update_epochs: int = 2
    """passes over each rollout batch"""
    init_kl_coef: float = 0.05
    """β: weight of the per-token KL penalty in the reward, −β(log π_old − log π_ref) with k1 (or in the loss)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """the per-token KL estimate penalised, with r = log π_ref − log π: k1 = −r (the papers'), k2 = ½r², k3 = e^r−1−r"""
    kl_in_loss: bool = False
    """penalise the KL in the loss, not the reward: + β · mean over tokens of the estimate at the current π_θ (GRPO)"""
    adaptive_kl: bool = True
    """adapt β toward `target_kl` (Ziegler et al. 2019); off = fixed β"""
    target_kl: float = 6.0
    """target KL to π_ref per response (nats), for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in responses"""
    whiten_advantages: bool = True
    """whiten advantages over the response tokens of the whole rollout batch, all ranks"""
    entropy_coef: float = 0.0
    """weight c_e of an entropy bonus in the policy loss"""
    ptx_coef: float = 0.0
    """weight γ_ptx of the pretraining language-model loss mixed into the policy loss (PPO-ptx), 0 = off"""
    reward_scaling: Literal["none", "running", "running_mean_std"] = "none"
    """divide scores by their running std (`running`), after subtracting the running mean (`running_mean_std`)"""
    reward_clip: float | None = None
    """clip the (scaled) score to ±this value"""
    missing_eos_penalty: float | None = None
    """if set, the score of a response that never emitted EOS is replaced by this value (e.g. -1)"""
    total_episodes: int = 8192
    """total number of sampled responses over all ranks"""
    rollout_batch_size: int = 64
    """responses sampled per rank per iteration"""
    value_learning_rate: float = 1e-4
    """value-model learning rate (AdamW)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2) (released HH: 0.9, 0.95; TL;DR: 0.9, 0.999)"""
    weight_decay: float = 0.0
    """AdamW weight decay (released: 1e-6, PPO TL;DR 0.01)"""
    lr_warmup_steps: int = 0
    """optimiser steps of linear learning-rate warm-up from lr/N to lr (released PPO-max: 100)"""
    lr_schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "constant"
    """the learning rate after warm-up: constant, linear or cosine decay to 0 at the last step, or inverse_sqrt
    (sqrt(warm-up / step), PPO-max); each trained model counts its own optimiser steps"""
    unfrozen_layers: int = -1
    """train only the top N transformer blocks of the policy and value model, and what follows; -1 = all (HH: 2)"""
    temperature: float = 1.0
    """sampling temperature (also applied to the log-probs, so they are those of the sampling distribution)"""
    top_k: int = 0
    """top-k sampling, 0 = off (the same default sampling setting in ppo.py, apa.py and awr.py)"""
    top_p: float = 1.0
    """nucleus sampling, 1 = off"""
    repetition_penalty: float = 1.0
    """divide the logit of every token the response already holds by this (×, if negative), 1 = off (PPO-max: 1.1);
    the log-probs of the loss carry the same penalty, so they are those of the distribution sampled"""

    # Models and data
    model_name_or_path: str = "builtin"
    """the SFT policy, which is also the frozen reference π_ref: a hub name, a local folder, or `builtin`"""
    value_model: str = "reward"
    """initialise the value model from `reward` (the reward model, as PPO-max does), `policy`, or a name/folder"""
    train_split: str = "train"
    """the split sampled for rollouts"""
    ptx_dataset: str = "builtin"
    """plain-text dataset for PPO-ptx (column `ptx_field`); `builtin` = grammar text"""
    ptx_field: str = "text"
    """the text column of `ptx_dataset`"""

    # Devices and precision
    lora_r: int = 0
    """rank r of the LoRA adapters trained in place of the policy's and the value model's weights (0: no adapter,
    the weights train; the value head trains in full). π_ref is then the policy with its adapter switched off"""
    ref_device: str = "policy"
    """where π_ref lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""
    value_device: str = "policy"
    """where the value model lives: `policy` (its own DeepSpeed engine) or `cpu` / `cuda:N` (plain AdamW)"""

    # Logging and checkpoints
    exp_name: str = "ppo"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many iterations (0: only when stopped by
    SIGTERM / Ctrl-C); the final policy and value model are HF folders"""


# HH (as in the APA paper's experiments, trlX's examples/hh/ppo_hh.py): Dahoas' Pythia SFT policies, prompts
# "Human: … Assistant:" from Dahoas/rm-static, 128 new tokens, cut at the next turn, the first 280 test prompts, the
# top 2 blocks trained, AdamW (0.9, 0.95) with weight decay 1e-6, the GPT-J reward model of trlX's HH example.
HH = dict(
    dataset="Dahoas/rm-static",
    eval_split="test",
    eval_prompts=280,
    max_prompt_length=896,  # released seq_length 1024 − 128 new tokens (trlX cuts prompts to their difference)
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    unfrozen_layers=2,
    adam_betas=(0.9, 0.95),
    weight_decay=1e-6,
    bf16=True,
    reward_model=["Dahoas/gptj-rm-static"],
    value_model="policy",
    mini_batch_size=8,
    update_epochs=2,
    gamma=1.0,
    gae_lambda=0.95,
    vf_coef=1.0,
    init_kl_coef=0.05,
    adaptive_kl=True,
    target_kl=6.0,
    cliprange=0.2,
    cliprange_value=0.2,
    reward_scaling="running",
    reward_clip=10.0,
)
HH_POLICIES = {
    "125m": "Dahoas/pythia-125M-static-sft",
    "1b": "Dahoas/pythia-1B-static-sft",
    "6b": "Dahoas/pythia-6B-static-sft",
}

# TL;DR (Stiennon et al.'s task, trlX's examples/summarize_rlhf): the GPT-J 6B SFT policy and reward model of trlX.
TLDR = dict(
    model_name_or_path="CarperAI/openai_summarize_tldr_sft",
    reward_model=["CarperAI/openai_summarize_tldr_rm_checkpoint"],
    dataset="CarperAI/openai_summarize_tldr",
    eval_split="test",
    eval_prompts=280,
    max_prompt_length=500,  # released seq_length 550 − 50 new tokens
    max_new_tokens=50,
    unfrozen_layers=8,
    bf16=True,
    value_model="policy",
    rollout_batch_size=128,
    mini_batch_size=8,
    update_epochs=2,
    gamma=1.0,
    gae_lambda=0.95,
    learning_rate=1e-6,
    adam_betas=(0.9, 0.999),
    weight_decay=0.01,
    vf_coef=0.2,
    init_kl_coef=0.1,
    adaptive_kl=True,
    target_kl=6.0,
    cliprange=0.2,
    cliprange_value=0.2,
    reward_scaling="none",
    reward_clip=10.0,
)

# PPO-max (Zheng et al. 2023): the values of the released MOSS-RLHF script, train_ppo_en.sh and config_ppo.py
# (https://github.com/OpenLMLab/MOSS-RLHF/blob/4865d826fc6705dfdf1894aede00b4c81dabb24b/train_ppo_en.sh#L17-L33).
MOSS_RLHF = dict(
    reward_scaling="running",  # use_reward_scaling: divide by the running std; use_reward_norm (the mean) off
    reward_clip=None,  # reward_clip 0 and use_reward_clip off
    adaptive_kl=False,  # a fixed per-token KL penalty...
    init_kl_coef=0.01,  # ...of kl_penalty_weight 0.01
    cliprange=0.2,  # use_policy_loss_clip, pg_clip 0.2
    cliprange_value=0.2,  # use_critic_loss_clip, value_clip 0.2
    whiten_advantages=False,  # use_advantage_norm off
    value_model="reward",  # the critic starts from the reward model
    max_grad_norm=1.0,
    adam_eps=1e-6,  # config_ppo.py L24: the policy's eps (ppo_trainer.py L204-L205: the critic's 1e-8; one ε here)
    learning_rate=5e-7,
    value_learning_rate=1.5e-6,
    lr_warmup_steps=100,
    lr_schedule="inverse_sqrt",
    temperature=0.8,
    top_p=0.9,
    repetition_penalty=1.1,
)

# --preset NAME: the values of PRESETS[NAME] become the defaults; flags given on the command line win over them.
PRESETS = {
    "hh-125m": dict(HH, model_name_or_path=HH_POLICIES["125m"], rollout_batch_size=128, learning_rate=8e-6),
    "hh-1b": dict(HH, model_name_or_path=HH_POLICIES["1b"], rollout_batch_size=64, learning_rate=1e-6),  # released
    "hh-6b": dict(HH, model_name_or_path=HH_POLICIES["6b"], rollout_batch_size=64, learning_rate=8e-6),
    "tldr": TLDR,
    "ppo-max": MOSS_RLHF,
}


@torch.no_grad()
def generate(policy, *, query_ids, query_mask, generation_config, zero3, repetition_penalty=1.0):
    """Sample responses with the KV cache. Under ZeRO-3 the policy's shards are gathered once for the whole
    rollout, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
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


# The steps the loop calls, as functions of what they read: the rollout (step 1) and the values (step 2)
class Models(NamedTuple):
    """The models of a run: the policy π_θ and the value model V train; π_ref and the rewards are frozen."""

    policy: object  # π_θ, a DeepSpeed engine (or common.TorchEngine); the rollout samples it as π_old
    ref_policy: object  # π_ref = π_init; with LoRA the policy itself, read with its adapter off
    value_model: object  # V, a value head on every token
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
    """Run π_old on a batch of prompts (PPO Algorithm 1): sample, cut at EOS, score, and forward π_old and π_ref over
    the result. `prompts`: the same prompts as the dataset gave them, for reward models and functions that read
    text."""
    tokenizer = sampling.tokenizer
    device = sampling.device
    query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
    models.policy.eval()  # sampling and scoring in eval mode; the update switches to train mode
    models.value_model.eval()
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
    # Scoring without gradients, --forward-batch-size rows at a time: the rewards, then π_old and π_ref.
    rows = (query_ids, query_mask, response_ids, response_mask)
    chunk = sampling.forward_batch_size
    scores = common.in_chunks(functools.partial(score_rows, models), (*rows, prompts), chunk).to(device)
    penalties = dict(temperature=sampling.temperature, repetition_penalty=sampling.repetition_penalty)
    old_logprobs_of = functools.partial(common.forward_logprobs, models.policy, **penalties)
    ref_logprobs_of = functools.partial(common.forward_logprobs, models.ref_policy, **penalties)
    with torch.no_grad():
        old_logprobs = common.in_chunks(old_logprobs_of, rows, chunk)
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


@torch.no_grad()
def all_values(value_model, batch, *, forward_batch_size, device):
    """V(s_t) over every row of `batch` (a common.Batch), no gradient, --forward-batch-size rows at a time."""
    values_of = functools.partial(common.forward_values, value_model)
    return common.in_chunks(values_of, batch, forward_batch_size).to(device)


def mini_batch_step(
    models: Models,
    batch,
    idx,
    *,
    old_logprobs,
    old_values,
    advantages,
    returns,
    ref_logprobs,
    kl_coef,
    ptx,
    args: Args,
) -> dict:
    """One optimiser step of the policy and one of the value model on the rows `idx` of the rollout `batch`: the
    clipped loss, the entropy bonus, β · KL with `ref_logprobs` (--kl-in-loss) and PPO-ptx on `ptx` (the input ids
    and mask of len(idx) pretraining rows, or None). The gradients accumulate over micro-batches of
    --micro-batch-size rows, each term weighted by its micro-batch's share of the mini-batch's tokens (every term is
    a mean over tokens), so that they are the mini-batch's; so are the statistics returned, the sums of the weighted
    micro-batch values."""
    policy = models.policy
    value_model = models.value_model
    mini_mask = batch.response_mask[idx]
    stats = {}
    for rows in common.micro_batches(torch.arange(len(idx)), args.micro_batch_size):  # positions in the mini-batch
        micro = idx[rows]
        share = common.token_share(batch.response_mask[micro], mini_mask)
        micro_batch = batch.rows(micro)
        logprobs, entropy = common.forward_logprobs(
            policy,
            *micro_batch,
            temperature=args.temperature,
            repetition_penalty=args.repetition_penalty,
            with_entropy=True,
            entropy_grad=args.entropy_coef != 0,
        )
        values = common.forward_values(value_model, *micro_batch).to(logprobs.device)
        terms = ppo_loss(
            logprobs=logprobs,
            old_logprobs=old_logprobs[micro],
            values=values,
            old_values=old_values[micro],
            advantages=advantages[micro],
            returns=returns[micro],
            response_mask=micro_batch.response_mask,
            cliprange=args.cliprange,
            cliprange_value=args.cliprange_value,
            vf_coef=args.vf_coef,
            ref_logprobs=None if ref_logprobs is None else ref_logprobs[micro],
            kl_coef=kl_coef,
            kl_estimator=args.kl_estimator,
        )
        entropy_mean = masked_mean(entropy, micro_batch.response_mask)
        policy_loss = terms.policy_loss - args.entropy_coef * entropy_mean  # PPO eq. (9): the S bonus
        micro_stats = {
            "policy/loss": terms.policy_loss,
            "value/loss": terms.value_loss,
            "policy/approx_kl": terms.approx_kl,
            "policy/clipfrac": terms.clipfrac,
            "value/clipfrac": terms.value_clipfrac,
            "policy/entropy": entropy_mean,
        }
        if terms.kl_loss is not None:
            micro_stats["policy/kl_loss"] = terms.kl_loss  # the estimate's mean per token, before β
        for key, value in micro_stats.items():
            stats[key] = stats.get(key, 0.0) + share * value.item()
        policy_loss = share * policy_loss
        if ptx is not None:  # PPO-ptx: the language-model loss on pretraining text
            ptx_input, ptx_mask = ptx
            ptx_labels = ptx_input.masked_fill(ptx_mask == 0, -100)
            ptx_share = common.token_share(ptx_mask[rows, 1:], ptx_mask[:, 1:])  # of the tokens predicted
            ptx_loss = policy(
                input_ids=ptx_input[rows],
                attention_mask=ptx_mask[rows],
                labels=ptx_labels[rows],
                position_ids=(ptx_mask[rows].cumsum(1) - 1).clamp(min=0),
            ).loss
            ptx_term = args.ptx_coef * ptx_loss  # InstructGPT eq. (2): the γ E[log π(x)] term, as a loss
            policy_loss = policy_loss + ptx_share * ptx_term
            stats["policy/ptx_loss"] = stats.get("policy/ptx_loss", 0.0) + ptx_share * ptx_loss.item()
        policy.backward(policy_loss, scale_wrt_gas=False)
        value_model.backward(share * args.vf_coef * terms.value_loss, scale_wrt_gas=False)
        policy.step()
        value_model.step()
    return stats


if __name__ == "__main__":
    # Arguments: the command line over the defaults, or over a preset's values with --preset.
    args = common.parse_args(Args, PRESETS)

    # Validate what needs no process group, then start the run (checks, process group, run name and folder).
    if args.rollout_batch_size % args.mini_batch_size:
        common.fail(
            f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --mini-batch-size "
            f"{args.mini_batch_size}; pick a mini-batch size that divides it"
        )
    if args.kl_in_loss and args.kl_estimator == "k1":
        common.fail(
            "--kl-in-loss with --kl-estimator k1 pulls nothing toward π_ref: the gradient of log π_θ − log π_ref is 0 "
            "in expectation over the policy's own samples; pass --kl-estimator k3 (GRPO's) or k2"
        )
    run = common.start_run(args, "ppo.py")
    device = run.device
    per_iteration = args.rollout_batch_size * run.world_size  # episodes per iteration, all ranks together
    if args.total_episodes % per_iteration or not args.total_episodes:
        common.fail(
            f"--total-episodes {args.total_episodes} is not a positive multiple of --rollout-batch-size "
            f"{args.rollout_batch_size} × {run.world_size} rank(s) = {per_iteration}; pass --total-episodes "
            f"{max(args.total_episodes // per_iteration, 1) * per_iteration}"
        )
    zero3 = args.zero_stage == 3
    # The data first: a bad file fails before any model is loaded. An --eval-split that slices the training split
    # ('train[-5%:]') is left out of it.
    held_out = (args.dataset, args.eval_split)
    train_texts = common.load_prompts(args.dataset, args.train_split, args.prompt_field, held_out=held_out)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)

    # Seed: models are loaded under one seed, so that randomly initialised heads agree across ranks; sampling then
    # uses seed + rank, so that every rank draws its own prompts and responses.
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Load: what each model starts from and where it goes (`policy`: this rank's device, as DeepSpeed engines and, under
    # ZeRO-3, loaded shard by shard; `cpu`; `cuda:N`). One Placement holds the settings they share.
    place = common.Placement.of(args)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy")
    if not args.lora_r:  # with LoRA, π_ref is the policy with its adapter switched off (common.adapter_off)
        ref_policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at=args.ref_device)
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [place.reward(name, tokenizer, at=args.reward_device) for name in args.reward_model]
    value_start = common.value_model_start(args.value_model, reward_fns[0], rank=run.rank)
    value_sources = {
        "reward": common.resolve(args.reward_model[0], "reward"),
        "policy": common.resolve(args.model_name_or_path, "sft"),
    }
    value_model = place.load(
        value_sources.get(value_start, value_start),
        kind="score",
        flag="--value-model",
        at=args.value_device,
        dtype=None if args.value_device == "policy" else "float32",  # DeepSpeed keeps float32 master weights
        pad_token_id=tokenizer.pad_token_id,
    )
    context = policy.config.max_position_embeddings  # GPT-2's n_positions is mapped to it
    # args.json records the value model really used
    log = common.make_logger(dataclasses.replace(args, value_model=value_start), run.name, run.rank)

    # Place: the policy and (by default) the value model are DeepSpeed engines on this rank's device; π_ref and the
    # reward model are frozen, on `policy` (sharded like the policy under ZeRO-3), `cpu` or `cuda:N`.
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    for model in (policy, value_model):  # released HH: only the top 2 blocks (and the heads) train
        common.freeze_lower_layers(model, args.unfrozen_layers)
        common.gradient_checkpointing(model, args.gradient_checkpointing)
    lora = dict(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        quantized=args.load_in_4bit,
    )
    policy = common.add_lora(policy, "causal", **lora)
    value_model = common.add_lora(value_model, "score", **lora)
    # The learning-rate schedule counts optimiser steps; the decay ends at the policy's last one.
    steps_per_iteration = args.update_epochs * (args.rollout_batch_size // args.mini_batch_size)
    total_steps = args.total_episodes // per_iteration * steps_per_iteration
    schedule = common.lr_schedule(args.lr_warmup_steps, total_steps, args.lr_schedule)
    policy = place.trainable(policy, at="policy", lr=args.learning_rate, schedule=schedule)
    value_model = place.trainable(value_model, at=args.value_device, lr=args.value_learning_rate, schedule=schedule)
    ref_policy = policy if args.lora_r else place.frozen(ref_policy, at=args.ref_device)  # LoRA: common.adapter_off
    policy.eval()  # eval mode (sampling, scoring); the update switches to train mode and back
    value_model.eval()
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
    if args.ptx_coef > 0:
        ptx_texts = common.load_prompts(
            name=common.resolve(args.ptx_dataset, "data/pretrain"),
            split="train",
            prompt_field=args.ptx_field,
            flag="--ptx-dataset",
        )
        ptx_ids, _ = common.encode_prompts(
            tokenizer,
            ptx_texts,
            max_prompt_length=context,
            max_new_tokens=0,
            context=context,
        )
    random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed + run.rank)
    sampler = torch.Generator().manual_seed(args.seed + run.rank)
    forward_batch_size = args.forward_batch_size or args.micro_batch_size or args.mini_batch_size
    models = Models(
        policy=policy,
        ref_policy=ref_policy,
        value_model=value_model,
        rewards=reward_fns,
        reward_weights=reward_weights,
    )
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
    # Evaluate: the held-out prompts, sampled as in training under a fixed seed (common.evaluate_held_out).
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
    kl_coef = args.init_kl_coef
    score_moments = RunningMoments()
    # Resume: `resume/` holds all a run needs to go on as if never stopped (the engines with their optimizers, the
    # KL controller, the running score moments, each rank's RNG and prompt-sampler states).
    engines = {"policy": policy, "value": value_model}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    start = 1
    if args.resume:
        state = common.load_resume(args.resume, engines, run.rank)
        start = state["step"] + 1
        kl_coef = state["kl_coef"]
        eval_history = state["eval_history"]
        vars(score_moments).update(state["score_moments"])
        sampler.set_state(state["sampler"])
    else:
        eval_history = [(0, evaluate(0))]
        log(0, eval_history[-1][1])
    if run.rank == 0:
        before = ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items())
        print(
            f"{run.name}: {num_iterations} iterations × {args.rollout_batch_size} × {run.world_size} rank(s); "
            f"before training: {before}"
        )
    start_time = time.time()
    for iteration in common.progress(range(start, num_iterations + 1), desc="iterations", enabled=args.progress):
        # ALGO LOGIC
        # 1. Roll out π_old on a batch of prompts: sample, cut at EOS, π_old and π_ref log-probs (PPO Algorithm 1).
        t0 = time.time()
        batch_index = torch.randint(len(train_prompts), (args.rollout_batch_size,), generator=sampler)
        sampled = rollout(
            models,
            sampling,
            prompt_rows=[train_prompts[i] for i in batch_index],
            prompts=[train_texts[i] for i in batch_index],
        )
        batch = sampled.batch
        response_mask = batch.response_mask
        old_logprobs = sampled.old_logprobs
        t_rollout = time.time() - t0
        with torch.no_grad():
            # 2. Values V_old(s_t) of the rollout.
            old_values = all_values(value_model, batch, forward_batch_size=forward_batch_size, device=device)

            # 3. Score the responses: the reward model's r(x, y); a fixed score for a response without EOS, then
            # scaling by running moments and clipping (PPO-max, Zheng et al. Section 5.3.1).
            scores = sampled.scores
            if args.missing_eos_penalty is not None:
                scores = torch.where(sampled.ended, scores, torch.full_like(scores, args.missing_eos_penalty))
            if args.reward_scaling != "none":
                score_moments.update(scores)
                if args.reward_scaling == "running_mean_std":
                    scores = scores - score_moments.mean
                scores = scores / (score_moments.std + 1e-8)
            if args.reward_clip is not None:
                scores = scores.clamp(-args.reward_clip, args.reward_clip)

            # 4. Per-token rewards: every token pays the KL penalty −β · k of --kl-estimator (k1 = log π_old −
            # log π_ref by default), unless --kl-in-loss puts it in the loss; the score goes on the last response
            # token. All three estimates are kept for the log.
            kl = {
                name: kl_estimate(
                    logprobs=old_logprobs,
                    ref_logprobs=sampled.ref_logprobs,
                    response_mask=response_mask,
                    estimator=name,
                )
                for name in ("k1", "k2", "k3")
            }
            penalty = torch.zeros_like(response_mask) if args.kl_in_loss else kl[args.kl_estimator]
            rewards = -kl_coef * penalty  # Ziegler Section 2: R(x, y) = r(x, y) − β log(π(y|x) / π_ref(y|x)), per token
            last = response_mask.sum(1).long() - 1
            rewards[torch.arange(len(rewards)), last] += scores

            # 5. Advantages and returns by GAE; advantages whitened over the whole rollout batch of all ranks.
            advantages, returns = compute_gae(
                rewards=rewards,
                values=old_values,
                response_mask=response_mask,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
            )
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, response_mask, across_ranks=True)

        # 6. Optimise the clipped objective for `update_epochs` passes over shuffled mini-batches (PPO Algorithm 1);
        # the policy and the value model each take their own step.
        t1 = time.time()
        step_stats = []
        policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
        value_model.train()
        for _epoch in range(args.update_epochs):
            for idx in torch.randperm(args.rollout_batch_size, generator=sampler).split(args.mini_batch_size):
                ptx = None
                if args.ptx_coef > 0:  # PPO-ptx: the mini-batch's pretraining rows, padded together
                    ptx_draw = torch.randint(len(ptx_ids), (len(idx),), generator=sampler)
                    ptx = common.pad_left([ptx_ids[i] for i in ptx_draw], tokenizer.pad_token_id, device)
                stats = mini_batch_step(
                    models,
                    batch,
                    idx,
                    old_logprobs=old_logprobs,
                    old_values=old_values,
                    advantages=advantages,
                    returns=returns,
                    ref_logprobs=sampled.ref_logprobs if args.kl_in_loss else None,  # --kl-in-loss: β · KL
                    kl_coef=kl_coef,
                    ptx=ptx,
                    args=args,
                )
                step_stats.append(stats)
        t_update = time.time() - t1

        # 7. Adapt β toward target_kl from the KL per response of the whole (all-rank) batch (Ziegler Section 2.2),
        # measured by k1 whatever the estimator penalised and wherever the penalty is.
        kl_k1 = kl["k1"]
        kl_per_response = masked_mean(kl_k1.sum(1), torch.ones_like(kl_k1[:, 0]), across_ranks=True).item()
        kl_coef_used = kl_coef
        if args.adaptive_kl:
            kl_coef = update_kl_coef(
                kl_coef=kl_coef,
                current_kl=kl_per_response,
                target_kl=args.target_kl,
                horizon=args.kl_horizon,
                n_steps=per_iteration,
            )

        # 8. Log: the mean of each step's statistics, and the rollout's over the whole batch of all ranks (equal rows
        # per rank, so rank means average); an evaluation on the held-out prompts every --eval-every iterations.
        metrics = {key: sum(stats[key] for stats in step_stats) / len(step_stats) for key in step_stats[0]}
        metrics.update(common.rollout_metrics(sampled, kl, tokenizer=tokenizer, gold_score=gold_score))
        raw_scores = sampled.scores
        ones = torch.ones_like(raw_scores)
        score_mean = masked_mean(raw_scores, ones, across_ranks=True)
        score_std = masked_mean((raw_scores - score_mean) ** 2, ones, across_ranks=True).sqrt()
        metrics["rollout/score_std"] = score_std.item()
        metrics["rollout/kl_to_ref"] = kl_per_response
        metrics["rollout/kl_coef"] = kl_coef_used
        metrics["rollout/advantage_mean"] = masked_mean(advantages, response_mask, across_ranks=True).item()
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
            shown=f" β {kl_coef_used:.4f}",
        )

        # 9. A resumable checkpoint every --save-every iterations, or now if the run was signalled.
        state = dict(
            step=iteration,
            kl_coef=kl_coef,
            eval_history=eval_history,
            score_moments=vars(score_moments),
            sampler=sampler.get_state(),
        )
        common.checkpoint_if_due(run, args, step=iteration, engines=engines, state=state, signum=stop_requested())

    # Save the policy and the value model as HF folders.
    common.save_hf(policy, tokenizer, path=os.path.join(run.dir, "policy"), rank=run.rank)
    common.save_hf(value_model, tokenizer, path=os.path.join(run.dir, "value"), rank=run.rank)
    if run.rank == 0:
        first = eval_history[0][1]
        final = eval_history[-1][1]
        changes = ", ".join(f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first)
        print(
            f"done in {time.time() - start_time:.0f} s; held-out before → after: {changes}; policy saved to "
            f"{run.dir}/policy"
        )
    common.exit_cleanly()
