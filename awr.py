"""AWR: Advantage-Weighted Regression, for language models as the APA paper runs it.

Papers: Peng, Kumar, Zhang, Levine (2019), "Advantage-Weighted Regression: Simple and Scalable Off-Policy
Reinforcement Learning", arXiv 1910.00177; its loss for language models as the baseline of Zhu, Sharma, Frujeri,
Dong, Zhu, Jordan, Jiao (2023), "Fine-Tuning Language Models with Advantage-Induced Policy Alignment", arXiv
2306.02231. Online, in the APA paper's Algorithm 1 with the AWR loss in place of the APA loss (sampling from the
policy), or offline with `--offline-dataset` (scored responses instead of rollouts).

The algorithm, in the APA paper's notation. A state s is a prompt with the response so far, an action a the next
token. π_init is the SFT policy, frozen; the code calls it π_ref (`ref_policy`): π_ref = π_init. AWR moves the policy
toward its own samples, each weighted by exp(A(s,a) / λ): a weighted maximum likelihood (the AWR loss L^AWR),

    L^AWR(θ) = mean over (s, a) of − exp(A(s,a) / λ) · log π_θ(a|s),

the weight carrying no gradient and clamped here to --max-weight. Unlike APA nothing in the loss holds the policy
near π_init; the KL to π_init is only logged. The advantage is GAE (Schulman et al. 2016) on a value model V fitted to
the returns, backwards over the response:

    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = δ_t + γ λ_GAE A_{t+1},   R_t = A_t + V(s_t),   V after the end = 0,

with the sequence's score as the reward r_t of its last token and 0 elsewhere, no KL term. Online, the KL to π_init
is logged by three per-token estimates (Schulman, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html), with r = log π_init(a|s) − log π_old(a|s) on the sampled token: k1 = −r (the
papers' KL, also logged as rollout/kl_to_ref), k2 = ½ r², k3 = (e^r − 1) − r. PPO's --kl-estimator and --kl-in-loss
have no place here: the reward has no KL term to estimate, and a KL term in L^AWR would make it another algorithm
than the baseline the APA paper ran.

The loop follows Algorithm 1 of the APA paper:

    lines 2-4  π_θ and π_ref start from π_init; V from π_init too (here also from the reward model, --value-model)
    line 5     for each iteration:
    line 6       roll out π_θ on a batch of prompts and score the responses with the reward model
                 GAE on V; then --update-epochs passes of L^AWR + vf_coef · ½ (V − R)² over shuffled mini-batches

Offline (beside the paper's algorithm): rows (prompt, response, score) from a dataset take the place of rollouts;
the scores are z-scored over the dataset; V is first fitted to the returns, then the advantages are recomputed from
the current V before every epoch.

Where this differs from the released code (the APA authors' trlX fork, microsoft/RLHF-APA):
- the weight exp(A/λ) is clamped to --max-weight; the released loss had no clamp:
  https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/models/modeling_sppo.py#L220
- one sampling setting for APA, AWR and PPO (top-k 0, top-p 1); the released APA / AWR script sampled with the
  default top-k 50, its PPO script with top-k 0: https://github.com/microsoft/RLHF-APA/blob/cfe7da2/examples/apa_hh.py#L75-L78
- the loss mask covers the response tokens; the released one was shifted by one token (it covered the first padding
  position): https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/trainer/accelerate_sppo_trainer.py#L195-L201
- advantages are whitened over the response tokens of the whole rollout; the released code whitened each
  mini-batch, padding included: https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/models/modeling_sppo.py#L172
- the released loss logs a variable that does not exist, which stops the first update:
  https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/models/modeling_sppo.py#L232
- offline, the released code took the advantages once from an untrained value head and never refreshed them:
  https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/trainer/accelerate_sqloff_trainer.py#L311-L338
As in the released code: the reward has no KL term
(https://github.com/microsoft/RLHF-APA/blob/cfe7da2/trlx/trainer/accelerate_sppo_trainer.py#L473).

    python awr.py                                          # online, the built-in task, one CPU process
    python awr.py --offline-dataset builtin                # offline, from the built-in scored SFT responses
    torchrun --nproc_per_node 2 awr.py --zero-stage 3      # two processes (CPU or GPUs)
    deepspeed --num_gpus 2 awr.py --zero-stage 2           # the DeepSpeed launcher
    python awr.py --preset hh-1b                           # the APA paper's HH setting (see PRESETS)

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
from transformers import GenerationConfig

import common
from common import masked_mean, whiten_masked


# The math: AWR's loss, GAE, the value loss, the KL estimates, the running score moments;
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


def awr_loss(*, logprobs, advantages, response_mask, lam, max_weight):
    """The APA paper's AWR loss L^AWR: masked mean over response tokens of −w · log π_θ with the weight
    w = min(exp(A/λ), max_weight), detached (no gradient flows into the advantages). No anchor to π_init. All tensors
    [batch, response_len]; `logprobs` carries the gradient."""
    weights = torch.exp(advantages / lam).clamp(max=max_weight).detach()
    return masked_mean(-weights * logprobs, response_mask)  # the APA paper's L^AWR: weighted log-likelihood


def kl_estimate(*, logprobs, ref_logprobs, response_mask, estimator):
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of the sampled tokens (Schulman, "Approximating KL
    Divergence"), with r = log π_ref − log π: k1 = −r (unbiased, the papers' KL), k2 = ½ r² (biased, low variance),
    k3 = (e^r − 1) − r (unbiased, never negative). Logged only. All tensors [batch, response_len]; 0 on padding."""
    log_ratio = (ref_logprobs - logprobs) * response_mask  # r, 0 on padding, where every estimate is then 0
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # expm1: e^r − 1 without cancellation for small r
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def value_loss(values, returns, response_mask):
    """½ · masked mean of (V − R)², unclipped (the released APA code's value loss)."""
    return 0.5 * masked_mean((values - returns) ** 2, response_mask)


# Helpers
class RunningMoments:
    """Running mean / std of every score seen so far on all ranks (Chan et al.'s parallel update), for reward
    scaling."""

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
    lam: float = 1.0
    """AWR's temperature λ: the weights are exp(A/λ) (released adv_coeff_log = 1/λ: 0.5 for HH, 1 for TL;DR and
    offline)"""
    max_weight: float = 20.0
    """clamp of the weight exp(A/λ), so that one large advantage cannot dominate a step"""
    update_epochs: int = 2
    """passes over each rollout batch"""
    rollout_batch_size: int = 64
    """responses sampled per rank per iteration"""
    total_episodes: int = 8192
    """online: total number of sampled responses over all ranks"""
    learning_rate: float = 3.5e-5
    """policy learning rate (AdamW); nothing in AWR's loss holds the policy near π_ref, so a larger rate drifts
    further from it"""
    value_learning_rate: float = 1e-4
    """value-model learning rate (AdamW)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2) (released HH: 0.9, 0.95; TL;DR: 0.9, 0.999)"""
    weight_decay: float = 0.0
    """AdamW weight decay (released: 1e-6)"""
    unfrozen_layers: int = -1
    """train only the top N transformer blocks of the policy and value model, and what follows; -1 = all (HH: 2)"""
    gamma: float = 1.0
    """discount γ of GAE"""
    gae_lambda: float = 0.95
    """λ of GAE"""
    whiten_advantages: bool = True
    """whiten advantages over the response tokens of the whole batch, all ranks"""
    vf_coef: float = 1.0
    """weight of the value loss"""
    reward_scaling: Literal["none", "running"] = "none"
    """divide scores by their running std over all rollouts so far (`running`, the released HH setting)"""
    reward_clip: float | None = None
    """clip the (scaled) score to ±this value (released: 100)"""
    missing_eos_penalty: float | None = None
    """if set, the score of a response that never emitted EOS is replaced by this value (e.g. -1)"""
    temperature: float = 1.0
    """sampling temperature (also applied to the log-probs, so they are those of the sampling distribution)"""
    top_k: int = 0
    """top-k sampling, 0 = off (the same sampling setting for PPO, APA and AWR keeps them comparable)"""
    top_p: float = 1.0
    """nucleus sampling, 1 = off"""
    offline_epochs: int = 4
    """offline: passes over the dataset; advantages are recomputed from the current value model before each"""
    value_warmup_epochs: int = 1
    """offline: passes fitting the value model to the returns before the first policy update"""

    # Models and data
    model_name_or_path: str = "builtin"
    """the SFT policy, which is also the frozen π_ref = π_init: a hub name, a local folder, or `builtin`"""
    value_model: str = "reward"
    """initialise the value model from `reward` (the reward model), `policy`, or a hub name / folder"""
    prompt_field: str = "prompt"
    """the column holding the prompt text (of --dataset, and of --offline-dataset rows)"""
    train_split: str = "train"
    """the split sampled for rollouts"""
    eval_split: str = "test"
    """the held-out split evaluated (offline too: samples of the policy); 'train[-5%:]' holds out training rows"""
    offline_dataset: str | None = None
    """train offline on {prompt, response, reward} or preference rows, not rollouts; `builtin` = scored SFT responses"""
    response_field: str = "response"
    """the column of --offline-dataset rows holding the response text"""
    reward_field: str = "reward"
    """the column of --offline-dataset rows holding the scalar score"""

    # Devices and precision
    lora_r: int = 0
    """rank r of the LoRA adapters trained in place of the policy's and the value model's weights (0: no adapter,
    the weights train; the value head trains in full). π_ref is then the policy with its adapter switched off"""
    ref_device: str = "policy"
    """where π_ref lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""
    value_device: str = "policy"
    """where the value model lives: `policy` (its own DeepSpeed engine) or `cpu` / `cuda:N` (plain AdamW)"""

    # Logging and checkpoints
    exp_name: str = "awr"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations (offline: every epoch), and before and after"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many iterations (offline: epochs); 0: only when
    stopped by SIGTERM / Ctrl-C. The final policy and value model are HF folders"""


# The APA paper's AWR settings as released (microsoft/RLHF-APA examples/apa_hh.py and apa_off_hh.py with the loss
# "log"). The GPU layout (--ref-device, --value-device, --reward-device) is chosen by `launch.sh paper`.
HH = dict(  # Anthropic HH as the APA paper ran it: Dahoas' Pythia SFT policies and GPT-J reward model
    dataset="Dahoas/rm-static",
    eval_split="test",
    eval_prompts=280,  # the first 280 test prompts
    max_prompt_length=872,  # released seq_length 1000 − 128 new tokens (trlX cuts prompts to their difference)
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    unfrozen_layers=2,  # trlX trained the top 2 blocks
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
)
HH_SIZES = {"125m": "125M", "1b": "1B", "6b": "6B"}


def hh_model(size: str) -> dict:
    """The policy of one HH size, and its rollout batch (the released 125M run sampled 128 a step, the others 64)."""
    return dict(
        model_name_or_path=f"Dahoas/pythia-{HH_SIZES[size]}-static-sft",
        rollout_batch_size=128 if size == "125m" else 64,
    )


HH_AWR = dict(lam=2.0, learning_rate=1e-6, reward_scaling="running", reward_clip=100.0)  # adv_coeff_log = 1/λ = 0.5
TLDR = dict(  # TL;DR summarisation: CarperAI's GPT-J SFT policy and reward model
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
    lam=0.1,
    learning_rate=1e-6,
    adam_betas=(0.9, 0.999),
    weight_decay=1e-6,
    vf_coef=1.0,
    reward_scaling="running",
    reward_clip=100.0,
)
OFFLINE_HH = dict(offline_dataset="Dahoas/rm-static", learning_rate=1e-6)  # λ = 1: adv_coeff_log = 1
PRESETS = {
    **{f"hh-{size}": {**HH, **hh_model(size), **HH_AWR} for size in HH_SIZES},
    **{f"offline-hh-{size}": {**HH, **hh_model(size), **OFFLINE_HH} for size in HH_SIZES},
}


@torch.no_grad()
def generate(policy, *, query_ids, query_mask, generation_config, zero3):
    """Sample responses with the KV cache. Under ZeRO-3 the policy's shards are gathered once for the whole
    rollout, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    model = getattr(policy, "module", policy)  # the HF model inside a DeepSpeed engine
    with common.gathered_for_generation(policy, zero3):
        out = model.generate(
            input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config, synced_gpus=zero3
        )
    return out[:, query_ids.shape[1] :]


def last_token_rewards(scores, response_mask):
    """Per-token rewards [batch, response_len]: each sequence's score on its last response token, 0 elsewhere."""
    rewards = torch.zeros_like(response_mask)
    rewards[torch.arange(len(response_mask)), response_mask.sum(1).long() - 1] = scores
    return rewards


def mean_of_dicts(dicts: list) -> dict:
    """The mean of each key over a list of dicts with the same keys."""
    return {key: sum(d[key] for d in dicts) / len(dicts) for key in dicts[0]}


# ALGO LOGIC: the steps the loops call, as functions of what they read: the rollout, the values, an update pass
class Models(NamedTuple):
    """The models of a run: the policy π_θ and the value model V train; π_ref and the rewards are frozen."""

    policy: object  # π_θ, a DeepSpeed engine (or common.TorchEngine); the rollout samples it as π_old
    ref_policy: object  # π_ref = π_init; with LoRA the policy itself, read with its adapter off
    value_model: object  # V, a value head on every token
    rewards: list  # the reward functions (common.load_reward)
    reward_weights: list  # the weight of each reward in the score


class Sampling(NamedTuple):
    """How a rollout samples and scores its responses, fixed for the run."""

    tokenizer: object
    generation_config: GenerationConfig  # temperature, top-k, top-p, max_new_tokens, EOS and padding
    temperature: float  # the log-probs are those of softmax(logits / temperature)
    stop_strings: list  # text that ends a response, besides EOS
    zero3: bool  # under ZeRO-3 generation gathers the policy's shards
    forward_batch_size: int  # rows per no-grad forward pass
    device: torch.device


def score_rows(models: Models, *rows):
    """The weighted sum of the rewards of rows (query_ids, query_mask, response_ids, response_mask, prompts)."""
    return sum(weight * reward(*rows) for weight, reward in zip(models.reward_weights, models.rewards))


@torch.no_grad()
def rollout(models: Models, sampling: Sampling, prompt_rows, prompts) -> common.Rollout:
    """Roll out π_θ on a batch of prompts (APA Algorithm 1, line 6): sample, cut at EOS, score, and forward π_old and
    π_ref over the result, --forward-batch-size rows at a time. `prompts`: the same prompts as the dataset gave
    them, for reward models and functions that read text."""
    tokenizer = sampling.tokenizer
    device = sampling.device
    query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
    response_ids = generate(
        models.policy,
        query_ids=query_ids,
        query_mask=query_mask,
        generation_config=sampling.generation_config,
        zero3=sampling.zero3,
    )
    response_ids, response_mask, ended = common.truncate_after_eos(
        response_ids,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
        stop_strings=sampling.stop_strings,
    )
    batch = common.Batch(query_ids, query_mask, response_ids, response_mask)
    chunk = sampling.forward_batch_size
    scores = common.in_chunks(functools.partial(score_rows, models), (*batch, prompts), chunk).to(device)
    old_logprobs_of = functools.partial(common.forward_logprobs, models.policy, temperature=sampling.temperature)
    ref_logprobs_of = functools.partial(common.forward_logprobs, models.ref_policy, temperature=sampling.temperature)
    old_logprobs = common.in_chunks(old_logprobs_of, batch, chunk)
    with common.adapter_off(models.ref_policy):
        ref_logprobs = common.in_chunks(ref_logprobs_of, batch, chunk).to(device)
    return common.Rollout(
        batch=batch._replace(response_mask=response_mask.to(old_logprobs.dtype)),
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


def accumulation_passes(idx: torch.Tensor, args: Args) -> list[tuple[torch.Tensor, bool]]:
    """The micro-batches of --micro-batch-size rows of the mini-batch `idx` (common.micro_batches), each with whether
    its rows count. The engines step the optimiser at every (mini / micro)-th pass, so a short mini-batch (the last
    of the offline rows, when --mini-batch-size does not divide them) is split into as many passes as a full one; a
    pass it has no row for runs its first row at weight 0."""
    if len(idx) == args.mini_batch_size:
        return [(micro, True) for micro in common.micro_batches(idx, args.micro_batch_size)]
    passes = args.mini_batch_size // (args.micro_batch_size or args.mini_batch_size)
    return [(micro, True) if len(micro) else (idx[:1], False) for micro in idx.tensor_split(passes)]


def update(models: Models, batch, *, advantages, returns, ref_logprobs, sampler, args: Args, device) -> dict:
    """One pass over `batch` (a common.Batch) in mini-batches shuffled by `sampler`: for each, a step of the policy
    on L^AWR and a step of V on its value loss, loss = L^AWR + vf_coef · value loss. Returns the mean of each logged
    loss."""
    policy = models.policy
    value_model = models.value_model
    keys = ["policy/loss", "value/loss", "policy/log_ratio_to_ref", "policy/clamped_weight_fraction"]
    step_stats = []
    policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    value_model.train()
    for idx in torch.randperm(len(advantages), generator=sampler).split(args.mini_batch_size):
        stats = [0.0] * len(keys)
        # Both losses are means over response tokens: each micro-batch's weighted by its share of the mini-batch's,
        # so the accumulated gradients and the logged values (sums of the weighted ones) are the mini-batch's
        for micro, counts in accumulation_passes(idx, args):
            share = common.token_share(batch.response_mask[micro], batch.response_mask[idx]) if counts else 0.0
            micro_batch = batch.rows(micro)
            logprobs = common.forward_logprobs(policy, *micro_batch, temperature=args.temperature)
            values = common.forward_values(value_model, *micro_batch).to(device)
            policy_loss = awr_loss(
                logprobs=logprobs,
                advantages=advantages[micro],
                response_mask=micro_batch.response_mask,
                lam=args.lam,
                max_weight=args.max_weight,
            )
            vf_loss = value_loss(values, returns[micro], micro_batch.response_mask)
            # loss = L^AWR + vf_coef · value loss; each engine runs its own backward
            policy.backward(share * policy_loss, scale_wrt_gas=False)
            value_model.backward(share * args.vf_coef * vf_loss, scale_wrt_gas=False)
            policy.step()
            value_model.step()
            log_ratio = (logprobs - ref_logprobs[micro]).detach()  # π_ref is only watched, not in the loss
            clamped = (advantages[micro] / args.lam > math.log(args.max_weight)).to(log_ratio.dtype)
            micro_stats = [
                policy_loss,
                vf_loss,
                masked_mean(log_ratio, micro_batch.response_mask),
                masked_mean(clamped, micro_batch.response_mask),
            ]
            stats = [total + share * value.item() for total, value in zip(stats, micro_stats)]
        step_stats.append(stats)
    policy.eval()  # sampling and scoring in eval mode
    value_model.eval()
    means = torch.tensor(step_stats).mean(0).tolist()
    return dict(zip(keys, means))


if __name__ == "__main__":
    # Parse the command line (a --preset supplies the defaults)
    args = common.parse_args(Args, PRESETS)

    # Validate what needs no model, then start the run (process group, run folder, the --resume checkpoint's script)
    if args.rollout_batch_size % args.mini_batch_size:
        common.fail(
            f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --mini-batch-size "
            f"{args.mini_batch_size}; pick a mini-batch size that divides it"
        )
    script = "awr.py --offline-dataset" if args.offline_dataset else "awr.py"  # the two modes do not resume each other
    run = common.start_run(args, script)
    device = run.device
    per_iteration = args.rollout_batch_size * run.world_size  # episodes per iteration, all ranks together
    if not args.offline_dataset and (args.total_episodes % per_iteration or not args.total_episodes):
        common.fail(
            f"--total-episodes {args.total_episodes} is not a positive multiple of --rollout-batch-size "
            f"{args.rollout_batch_size} × {run.world_size} rank(s) = {per_iteration}; pass --total-episodes "
            f"{max(args.total_episodes // per_iteration, 1) * per_iteration}"
        )
    zero3 = args.zero_stage == 3
    chunk = args.forward_batch_size or args.micro_batch_size or args.mini_batch_size  # rows per no-grad pass

    # The data first: a file that cannot train fails before any model is loaded
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    if args.offline_dataset is None:
        held_out = (args.dataset, args.eval_split)  # a slice of the training split: left out of it
        train_texts = common.load_prompts(args.dataset, args.train_split, args.prompt_field, held_out=held_out)
    else:
        fields = dict(prompt=args.prompt_field, response=args.response_field, reward=args.reward_field)
        prompts, responses, dataset_scores = common.load_offline_rows(
            args.offline_dataset, fields=fields, held_out=(args.dataset, args.eval_split)
        )
        n_rows = len(prompts) // run.world_size * run.world_size
        if n_rows < args.mini_batch_size * run.world_size:
            common.fail(
                f"the offline dataset has {len(prompts)} rows, fewer than one mini-batch of {args.mini_batch_size} "
                f"on each of the {run.world_size} rank(s); lower --mini-batch-size"
            )

    # Seed: models load under one seed, so that randomly initialised heads agree across ranks
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Load: what each model starts from and where it goes (`policy`: this rank's device, as DeepSpeed engines and, under
    # ZeRO-3, loaded shard by shard; `cpu`; `cuda:N`). One Placement holds the settings they share.
    place = common.Placement.of(args)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(  # APA Algorithm 1, line 2
        args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy"
    )
    if not args.lora_r:  # with LoRA, π_ref is the policy with its adapter switched off (common.adapter_off)
        ref_policy = place.load(  # APA Algorithm 1, line 3
            args.model_name_or_path, kind="causal", flag="--model-name-or-path", at=args.ref_device
        )
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [place.reward(name, tokenizer, at=args.reward_device) for name in args.reward_model]
    value_start = common.value_model_start(args.value_model, reward_fns[0], rank=run.rank)
    value_sources = {
        "reward": common.resolve(args.reward_model[0], "reward"),
        "policy": common.resolve(args.model_name_or_path, "sft"),
    }
    value_model = place.load(  # APA Algorithm 1, line 4 (from π_init with --value-model policy)
        value_sources.get(value_start, value_start),
        kind="score",
        flag="--value-model",
        at=args.value_device,
        dtype=None if args.value_device == "policy" else "float32",  # DeepSpeed: float32 master weights under bf16
        pad_token_id=tokenizer.pad_token_id,
    )
    context = policy.config.max_position_embeddings  # GPT-2's n_positions is mapped to it
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=context,
        chat_template=args.chat_template,
    )
    if args.offline_dataset is not None:  # rows whose chat prompt cannot fit go before the schedule counts rows
        need = args.mini_batch_size * run.world_size
        kept = common.fitting_prompts(tokenizer, prompts, what="offline rows", need=need, **encode)
        prompts, responses, dataset_scores = common.rows_at(kept, prompts, responses, dataset_scores)
        n_rows = len(prompts) // run.world_size * run.world_size
    # args.json records the value model really used
    log = common.make_logger(dataclasses.replace(args, value_model=value_start), run.name, run.rank)

    # Place: π_θ and (by default) V are DeepSpeed engines on this rank's device; π_ref and the reward model are
    # frozen, on `policy` (sharded like the policy under ZeRO-3), `cpu` or `cuda:N`
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
    # The learning-rate schedule counts optimiser steps; the decay ends at the policy's last one
    if args.offline_dataset is not None:
        total_steps = args.offline_epochs * math.ceil(n_rows // run.world_size / args.mini_batch_size)
    else:
        steps_per_rollout = args.update_epochs * (args.rollout_batch_size // args.mini_batch_size)
        total_steps = args.total_episodes // per_iteration * steps_per_rollout
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

    # Data: the held-out prompts dealt out over the ranks; each rank then samples with seed + rank
    held_out = common.held_out_prompts(tokenizer, eval_texts, run=run, args=args, **encode)
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed + run.rank)
    sampler = torch.Generator().manual_seed(args.seed + run.rank)
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
        stop_strings=args.stop_strings,
        zero3=zero3,
        forward_batch_size=chunk,
        device=device,
    )
    # Evaluate: the held-out prompts, sampled as in training under a fixed seed (common.evaluate_held_out); offline
    # too, where it shows what the policy samples
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

    # Resume: the engines with their optimizers, the score moments, each rank's RNG and sampler states, the step
    engines = {"policy": policy, "value": value_model}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    state = common.load_resume(args.resume, engines, run.rank) if args.resume else {}
    if args.resume:
        eval_history = state["eval_history"]
        sampler.set_state(state["sampler"])
    else:
        eval_history = [(0, evaluate(0))]
        log(0, eval_history[-1][1])
    if run.rank == 0:
        before = ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items())
        print(f"{run.name}: {run.world_size} rank(s); before training: {before}")
    start_time = time.time()

    if args.offline_dataset is None:
        # ALGO LOGIC: online AWR, the APA paper's Algorithm 1
        kept = common.fitting_prompts(tokenizer, train_texts, what="training prompts", **encode)
        train_texts = [train_texts[i] for i in kept]
        train_prompts, n_truncated = common.encode_prompts(tokenizer, train_texts, **encode)
        if n_truncated:
            cut = "lost their oldest turns" if args.chat_template else "were left-truncated"
            common.note(f"{n_truncated} training prompts {cut} to fit the prompt budget")
        num_iterations = args.total_episodes // per_iteration
        score_moments = RunningMoments()
        vars(score_moments).update(state.get("score_moments", {}))
        for iteration in common.progress(  # APA Algorithm 1, line 5
            range(state.get("step", 0) + 1, num_iterations + 1), desc="iterations", enabled=args.progress
        ):
            t0 = time.time()
            # 1. Roll out π_θ on a batch of prompts: responses, their scores, π_old and π_ref log-probs
            index = torch.randint(len(train_prompts), (args.rollout_batch_size,), generator=sampler)
            sampled = rollout(  # APA Algorithm 1, line 6
                models,
                sampling,
                prompt_rows=[train_prompts[i] for i in index],
                prompts=[train_texts[i] for i in index],
            )
            batch = sampled.batch
            response_mask = batch.response_mask
            t_rollout = time.time() - t0
            # 2. The score of each response: the EOS penalty, running scaling and clipping (options)
            scores = sampled.scores
            if args.missing_eos_penalty is not None:
                scores = torch.where(sampled.ended, scores, torch.full_like(scores, args.missing_eos_penalty))
            if args.reward_scaling == "running":
                score_moments.update(scores)
                scores = scores / (score_moments.std + 1e-8)
            if args.reward_clip is not None:
                scores = scores.clamp(-args.reward_clip, args.reward_clip)
            # 3. Per-token rewards: the score on the last response token, no KL term (the KL to π_ref is only logged)
            rewards = last_token_rewards(scores, response_mask)
            # 4. Advantages and returns: GAE on V, the advantages whitened over the whole rollout
            advantages, returns = compute_gae(
                rewards=rewards,
                values=all_values(value_model, batch, forward_batch_size=chunk, device=device),
                response_mask=response_mask,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
            )
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, response_mask, across_ranks=True)
            # 5. --update-epochs passes of L^AWR + vf_coef · value loss over shuffled mini-batches
            t1 = time.time()
            epoch_stats = [
                update(
                    models,
                    batch,
                    advantages=advantages,
                    returns=returns,
                    ref_logprobs=sampled.ref_logprobs,
                    sampler=sampler,
                    args=args,
                    device=device,
                )
                for _ in range(args.update_epochs)
            ]
            t_update = time.time() - t1
            # 6. Log: the losses, the rollout's statistics over all ranks (the KL to π_ref by three estimates), and
            # an evaluation on the held-out prompts every --eval-every iterations
            metrics = mean_of_dicts(epoch_stats)
            kl = {
                name: kl_estimate(
                    logprobs=sampled.old_logprobs,
                    ref_logprobs=sampled.ref_logprobs,
                    response_mask=response_mask,
                    estimator=name,
                )
                for name in ("k1", "k2", "k3")
            }
            metrics.update(common.rollout_metrics(sampled, kl, tokenizer=tokenizer, gold_score=gold_score))
            kl_to_ref = ((sampled.old_logprobs - sampled.ref_logprobs) * response_mask).sum(1)
            metrics["rollout/kl_to_ref"] = kl_to_ref.mean().item()
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
            # 7. A resumable checkpoint every --save-every iterations, or now if the run was signalled
            state = dict(
                step=iteration,
                eval_history=eval_history,
                sampler=sampler.get_state(),
                score_moments=vars(score_moments),
            )
            common.checkpoint_if_due(run, args, step=iteration, engines=engines, state=state, signum=stop_requested())
    else:
        # ALGO LOGIC: offline AWR, dataset rows in place of rollouts
        # 1. This rank's rows as a Batch, each score z-scored over the dataset on its last response token
        scores = torch.tensor(dataset_scores[:n_rows], dtype=torch.float32)
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
        mine = list(range(run.rank, n_rows, run.world_size))
        batch = common.encode_offline_rows(
            tokenizer,
            [prompts[i] for i in mine],
            [responses[i] for i in mine],
            **encode,
            device=device,
        )
        response_mask = batch.response_mask
        rewards = last_token_rewards(scores[mine].to(device), response_mask)
        # 2. π_ref's log-probs, once
        ref_logprobs_of = functools.partial(common.forward_logprobs, ref_policy, temperature=args.temperature)
        with torch.no_grad(), common.adapter_off(ref_policy):
            ref_logprobs = common.in_chunks(ref_logprobs_of, batch, chunk).to(device)
        # 3. Fit V to the Monte-Carlo returns first (GAE with λ = 1 and V = 0), unless resumed with a fitted V
        _, mc_returns = compute_gae(
            rewards=rewards,
            values=torch.zeros_like(response_mask),
            response_mask=response_mask,
            gamma=args.gamma,
            gae_lambda=1.0,
        )
        value_model.train()
        for _ in common.progress(
            range(0 if args.resume else args.value_warmup_epochs), desc="value warm-up", enabled=args.progress
        ):
            for idx in torch.randperm(len(response_mask), generator=sampler).split(args.mini_batch_size):
                for micro, counts in accumulation_passes(idx, args):  # a token mean: weighted by its token share
                    share = common.token_share(response_mask[micro], response_mask[idx]) if counts else 0.0
                    values = common.forward_values(value_model, *batch.rows(micro)).to(device)
                    vf_loss = value_loss(values, mc_returns[micro], response_mask[micro])
                    value_model.backward(share * vf_loss, scale_wrt_gas=False)
                    value_model.step()
        value_model.eval()
        previous = state.get("previous")
        for epoch in common.progress(
            range(state.get("step", 0) + 1, args.offline_epochs + 1), desc="epochs", enabled=args.progress
        ):
            t0 = time.time()
            # 4. Advantages from the current V, before every epoch
            advantages, returns = compute_gae(
                rewards=rewards,
                values=all_values(value_model, batch, forward_batch_size=chunk, device=device),
                response_mask=response_mask,
                gamma=args.gamma,
                gae_lambda=args.gae_lambda,
            )
            if previous is None:
                change = 0.0
            else:  # |A_epoch − A_epoch−1|, over all ranks
                change = masked_mean((advantages - previous).abs(), response_mask, across_ranks=True).item()
            previous = advantages
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, response_mask, across_ranks=True)
            # 5. One pass of L^AWR + vf_coef · value loss over shuffled mini-batches
            t1 = time.time()
            metrics = update(
                models,
                batch,
                advantages=advantages,
                returns=returns,
                ref_logprobs=ref_logprobs,
                sampler=sampler,
                args=args,
                device=device,
            )
            metrics["time/update"] = time.time() - t1  # seconds: the epoch's pass over the rows
            metrics["offline/advantage_change"] = change
            metrics = common.mean_across_ranks(metrics)
            # 6. Log, and evaluate after every epoch
            common.check_finite(metrics, epoch, run.resume_path)  # before evaluating (sampling) from NaN weights
            t_eval = time.time()
            eval_history.append((epoch, evaluate(epoch)))
            metrics.update(eval_history[-1][1])
            metrics["time/eval"] = time.time() - t_eval
            metrics["time/iteration"] = time.time() - t0  # seconds: the whole epoch, its evaluation included
            metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
            log(epoch, metrics)
            if run.rank == 0:
                print(
                    f"epoch {epoch}/{args.offline_epochs} loss {metrics['policy/loss']:.4f} value loss "
                    f"{metrics['value/loss']:.4f} advantage change {change:.4f} eval reward "
                    f"{metrics['eval/reward']:+.3f} KL {metrics['eval/kl_to_ref']:.2f}, "
                    f"{metrics['time/iteration']:.2f} s/epoch",
                    flush=True,
                )
            # 7. A resumable checkpoint every --save-every epochs, or now if the run was signalled
            state = dict(step=epoch, eval_history=eval_history, sampler=sampler.get_state(), previous=previous)
            common.checkpoint_if_due(run, args, step=epoch, engines=engines, state=state, signum=stop_requested())

    # Save the policy and the value model as HF folders
    common.save_hf(policy, tokenizer, os.path.join(run.dir, "policy"), run.rank)
    common.save_hf(value_model, tokenizer, os.path.join(run.dir, "value"), run.rank)
    if run.rank == 0:
        first = eval_history[0][1]
        final = eval_history[-1][1]
        change = ", ".join(f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first)
        print(
            f"done in {time.time() - start_time:.0f} s; held-out before → after: {change}; policy saved to "
            f"{run.dir}/policy"
        )
    common.exit_cleanly()
