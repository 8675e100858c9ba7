"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), with the PPO-max recipe of Zheng et al.,
"Secrets of RLHF Part I" (2023) as options. The math, equation by equation: ../shared/ALGORITHMS.md §1-§3.

    python ppo.py                                              # the built-in task, one CPU process
    torchrun --nproc_per_node 2 ppo.py --zero-stage 2          # two processes (CPU or GPUs)
    deepspeed --num_gpus 8 ppo.py --model-name-or-path ... --reward-model ... --dataset ... --zero-stage 3

Sampling is set by `Args` alone (temperature, top-k, top-p): the sampling fields of a checkpoint's
generation_config.json are dropped when the policy is loaded. The log-probs of the loss (and of the KL to π_ref)
are those of softmax(logits / temperature) over the whole vocabulary. With top-k or top-p set, responses come from
the truncated distribution and are scored as samples of the untruncated one, as the released trlX and MOSS-RLHF code
did; keep top-k 0 and top-p 1 (the defaults) for exactly on-policy samples.
"""
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import torch
import tyro
from transformers import GenerationConfig, LogitsProcessorList

import common
from common import masked_mean, whiten_masked


@dataclass
class Args:
    exp_name: str = "ppo"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (rank r samples with seed + r)"""
    output_dir: str = "runs"
    """folder for TensorBoard logs, metrics.jsonl and checkpoints"""
    model_name_or_path: str = "builtin"
    """the SFT policy, which is also the frozen reference π_ref: a hub name, a local folder, or `builtin`"""
    reward_model: List[str] = field(default_factory=lambda: ["builtin"])
    """reward(s), summed: 1-output classifiers (hub name, folder, `builtin`) and/or `module:function` callables"""
    reward_weights: List[float] = field(default_factory=list)
    """weight of each --reward-model in the sum (default 1 each)"""
    value_model: str = "reward"
    """initialise the value model from `reward` (the reward model, as PPO-max does), `policy`, or a name/folder"""
    dataset: str = "builtin"
    """prompts: a hub name, a folder saved with `save_to_disk`, a .jsonl/.json/.parquet file, or `builtin`"""
    prompt_field: str = "prompt"
    """the dataset column holding the prompt text"""
    chat_template: bool = False
    """render each prompt with the policy tokenizer's chat template, the assistant turn opened: HH dialogues become
    user / assistant messages, a `messages` column is read as it is; without it prompts stay raw text"""
    train_split: str = "train"
    """the split sampled for rollouts"""
    eval_split: str = "test"
    """the held-out split used for evaluation"""
    trust_remote_code: bool = False
    """allow model repositories to run their own code (off unless you trust them)"""
    total_episodes: int = 8192
    """total number of sampled responses over all ranks"""
    rollout_batch_size: int = 64
    """responses sampled per rank per iteration"""
    mini_batch_size: int = 16
    """responses per rank per optimisation step"""
    forward_batch_size: Optional[int] = None
    """rows per no-grad forward pass (reward models, π_old, π_ref, V) over a rollout or the offline rows; default
    --mini-batch-size, so that scoring holds no more than an update step does"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""
    learning_rate: float = 3e-5
    """policy learning rate (AdamW)"""
    value_learning_rate: float = 1e-4
    """value-model learning rate (AdamW)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip, policy and value model each"""
    adam_betas: Tuple[float, float] = (0.9, 0.95)
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
    max_prompt_length: int = 16
    """prompts are left-truncated to this many tokens (and to what the context leaves after the response)"""
    max_new_tokens: int = 32
    """the longest response sampled"""
    stop_strings: List[str] = field(default_factory=list)
    """cut a response before the first of these strings in its text (HH: "Human:" "Assistant:")"""
    temperature: float = 1.0
    """sampling temperature (also applied to the log-probs, so they are those of the sampling distribution)"""
    top_k: int = 0
    """top-k sampling, 0 = off (ALGORITHMS.md §1: one sampling setting for PPO, APA and AWR)"""
    top_p: float = 1.0
    """nucleus sampling, 1 = off"""
    repetition_penalty: float = 1.0
    """divide the logit of every token the response already holds by this (×, if negative), 1 = off (PPO-max: 1.1);
    the log-probs of the loss carry the same penalty, so they are those of the distribution sampled"""
    missing_eos_penalty: Optional[float] = None
    """if set, the score of a response that never emitted EOS is replaced by this value (e.g. -1)"""
    reward_scaling: Literal["none", "running", "running_mean_std"] = "none"
    """divide scores by their running std (`running`), after subtracting the running mean (`running_mean_std`)"""
    reward_clip: Optional[float] = None
    """clip the (scaled) score to ±this value"""
    init_kl_coef: float = 0.05
    """β: weight of the per-token KL penalty −β(log π_old − log π_ref) in the reward"""
    adaptive_kl: bool = True
    """adapt β toward `target_kl` (Ziegler et al. 2019); off = fixed β"""
    target_kl: float = 6.0
    """target KL to π_ref per response (nats), for the adaptive controller"""
    kl_horizon: int = 10000
    """horizon of the adaptive KL controller, in responses"""
    gamma: float = 1.0
    """discount γ of GAE"""
    gae_lambda: float = 0.95
    """λ of GAE"""
    whiten_advantages: bool = True
    """whiten advantages over the response tokens of the whole rollout batch, all ranks"""
    cliprange: float = 0.2
    """ε of the clipped policy loss"""
    cliprange_value: float = 0.2
    """ε_v of the clipped value loss"""
    vf_coef: float = 1.0
    """weight of the value loss"""
    entropy_coef: float = 0.0
    """weight of an entropy bonus in the policy loss (PPO-max option)"""
    ptx_coef: float = 0.0
    """weight of a pretraining NLL term mixed into the policy loss (PPO-ptx), 0 = off"""
    ptx_dataset: str = "builtin"
    """plain-text dataset for PPO-ptx (column `ptx_field`); `builtin` = grammar text"""
    ptx_field: str = "text"
    """the text column of `ptx_dataset`"""
    ppo_max: bool = False
    """PPO-max (Zheng et al. 2023): the released recipe's values (PPO_MAX below: reward scaling, fixed KL 0.01,
    learning rates with warm-up, sampling ...) for every field not given on the command line"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 also runs without DeepSpeed installed)"""
    bf16: bool = False
    """train in bfloat16 (DeepSpeed) and hold frozen models in bfloat16"""
    offload: bool = False
    """offload optimizer states (and ZeRO-3 parameters) to CPU"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass instead of keeping them: less memory for about a
    third more compute, in the update's forward passes only"""
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = None
    """the attention kernel of every model loaded (default: transformers' choice, sdpa where the model has it)"""
    lora_r: int = 0
    """rank r of the LoRA adapters trained in place of the policy's and the value model's weights (0: no adapter,
    the weights train; the value head trains in full). π_ref is then the policy with its adapter switched off"""
    lora_alpha: float = 16.0
    """LoRA's scale α: an adapted layer computes W x + (α / r) · B A x"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input, in the update's forward passes"""
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """the layers that get an adapter, by name (e.g. q_proj v_proj); all-linear: every linear layer but the output
    head (as QLoRA and the A-LoL paper did)"""
    load_in_4bit: bool = False
    """hold the frozen base weights in 4-bit NF4 (QLoRA): needs --lora-r, a CUDA GPU, bitsandbytes, --zero-stage 0"""
    ref_device: str = "policy"
    """where π_ref lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""
    reward_device: str = "policy"
    """where the reward model lives: `policy`, `cpu`, or `cuda:N`"""
    reward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the reward model's weights: auto = bfloat16 with --bf16, else float32; float16 for a reward model trained in
    fp16 (GPU)"""
    value_device: str = "policy"
    """where the value model lives: `policy` (its own DeepSpeed engine) or `cpu` / `cuda:N` (plain AdamW)"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations (and before and after training)"""
    eval_prompts: int = 128
    """number of held-out prompts per evaluation, over all ranks"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many iterations (0: only when stopped by
    SIGTERM / Ctrl-C); the final policy and value model are HF folders"""
    resume: Optional[str] = None
    """continue a stopped run from its checkpoint folder (runs/RUN_NAME/resume), with the same arguments"""
    local_rank: int = 0
    """set by the `deepspeed` launcher; the rank is read from the environment"""


# PPO-max (Zheng et al. 2023, "Secrets of RLHF Part I"): the values of the released MOSS-RLHF script
# (train_ppo_en.sh and config_ppo.py), which `--ppo-max` sets unless the same flag is given on the command line.
PPO_MAX = dict(
    reward_scaling="running",  # use_reward_scaling: divide by the running std; use_reward_norm (the mean) off
    reward_clip=None,  # reward_clip 0 and use_reward_clip off
    adaptive_kl=False,  # a fixed per-token KL penalty...
    init_kl_coef=0.01,  # ...of kl_penalty_weight 0.01
    cliprange=0.2,  # use_policy_loss_clip, pg_clip 0.2
    cliprange_value=0.2,  # use_critic_loss_clip, value_clip 0.2
    whiten_advantages=False,  # use_advantage_norm off
    value_model="reward",  # the critic starts from the reward model
    max_grad_norm=1.0,
    learning_rate=5e-7,
    value_learning_rate=1.5e-6,
    lr_warmup_steps=100,
    lr_schedule="inverse_sqrt",
    temperature=0.8,
    top_p=0.9,
    repetition_penalty=1.1,
)


# ALGO LOGIC: GAE, ALGORITHMS.md §2 (Schulman et al. 2016, eq. 11-16)
def compute_gae(rewards, values, mask, gamma, lam):
    """Advantages and returns for [batch, response_len] tensors; V after the last real token is 0.
    Returns (advantages, returns), both 0 on padding (returns = A + V before whitening)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t = r_t + γV_{t+1} − V_t
        last_gae = delta + gamma * lam * last_gae                    # A_t = δ_t + γλA_{t+1}
        advantages[:, t] = last_gae
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


# ALGO LOGIC: the clipped PPO objective, ALGORITHMS.md §3 (Schulman et al. 2017, eq. 7; value clipping as in
# Stiennon et al. 2020)
def ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask, cliprange, cliprange_value,
             vf_coef):
    """All tensors [batch, response_len]; `mask` 1 on response tokens; advantages already whitened.
    Returns (loss, stats) with loss = pg_loss + vf_coef · vf_loss. stats["pg_loss"] and stats["vf_loss"] keep their
    graphs so the policy and value engines can each run their own backward; the other stats are detached."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_losses, vf_losses_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)

    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {"policy/approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
                 "policy/clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
                 "value/clipfrac": masked_mean((vf_losses_clipped > vf_losses).float(), mask)}
    return pg_loss + vf_coef * vf_loss, {"pg_loss": pg_loss, "vf_loss": vf_loss, **stats}


class RunningMoments:
    """Running mean / std of every score seen so far on all ranks (Chan et al.'s parallel update), for reward
    scaling (PPO-max)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor):
        x = x.detach().double().cpu()  # float64 before the sums: E[x²] − E[x]² cancels badly in float32
        stats = torch.stack([x.sum(), (x ** 2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
        common.all_reduce_cpu(stats)  # over all ranks (through the GPU under NCCL)
        n, mean = stats[2].item(), stats[0].item() / stats[2].item()
        var, delta, total = max(stats[1].item() / n - mean ** 2, 0.0), mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self):
        return math.sqrt(self.var)


def update_kl_coef(kl_coef, current_kl, target_kl, horizon, n_steps):
    """The adaptive KL controller of Ziegler et al. 2019 (§2.2): e = clip(KL/target − 1, ±0.2),
    β ← β(1 + e · n_steps / horizon)."""
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


@torch.no_grad()
def generate(policy, query_ids, query_mask, generation_config, zero3, repetition_penalty=1.0):
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
    return out[:, query_ids.shape[1]:]


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    return [tokenizer.decode(r[: int(n)], skip_special_tokens=False)
            for r, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())]


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.reward_weights and len(args.reward_weights) != len(args.reward_model):
        common.fail(f"--reward-weights has {len(args.reward_weights)} values for {len(args.reward_model)} "
                    f"--reward-model entries; give one weight per reward model")
    if args.ppo_max:
        # An explicit flag wins over the recipe: `--ppo-max --init-kl-coef 0.05` keeps β = 0.05.
        given = common.flags_given()
        args = dataclasses.replace(args, **{name: value for name, value in PPO_MAX.items() if name not in given})
    if args.rollout_batch_size % args.mini_batch_size:
        common.fail(f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --mini-batch-size "
                    f"{args.mini_batch_size}; pick a mini-batch size that divides it")
    common.check_lora(args)
    rank, world_size, device = common.init_distributed(args.zero_stage)
    per_iteration = args.rollout_batch_size * world_size  # episodes per iteration, all ranks together
    if args.total_episodes % per_iteration or not args.total_episodes:
        common.fail(f"--total-episodes {args.total_episodes} is not a positive multiple of --rollout-batch-size "
                    f"{args.rollout_batch_size} × {world_size} rank(s) = {per_iteration}; pass --total-episodes "
                    f"{max(args.total_episodes // per_iteration, 1) * per_iteration}")
    if args.resume:
        common.check_resume(args.resume, "ppo.py")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    zero3 = args.zero_stage == 3
    train_texts = common.load_prompts(args.dataset, args.train_split, args.prompt_field)  # a bad file fails before
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)  # any model is loaded

    # Seeding: models are loaded under one seed, so that randomly initialised heads agree across ranks; sampling then
    # uses seed + rank, so that every rank draws its own prompts and responses.
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dtype = "bfloat16" if args.bf16 else "float32"
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    load = dict(trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation,
                load_in_4bit=args.load_in_4bit)
    # Under ZeRO-3 every model on `policy` is loaded shard by shard: no rank ever holds a whole copy
    sharded = lambda placement: common.zero3_config(placement, args.zero_stage, args.mini_batch_size, args.bf16,
                                                    args.offload)
    policy = common.load_model(args.model_name_or_path, "causal", "--model-name-or-path", dtype, **load,
                               sharded=sharded("policy"))
    if not args.lora_r:  # with LoRA, π_ref is the policy with its adapter switched off (common.adapter_off)
        ref_policy = common.load_model(args.model_name_or_path, "causal", "--model-name-or-path", dtype, **load,
                                       sharded=sharded(args.ref_device))
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [common.load_reward(name, tokenizer, args.reward_device, args.zero_stage, args.mini_batch_size,
                                     args.bf16, args.trust_remote_code, args.reward_dtype)
                  for name in args.reward_model]
    if args.value_model == "reward" and not getattr(reward_fns[0], "same_vocabulary", False):
        args.value_model = "policy"  # the value model reads the policy's token ids: it needs its vocabulary
        if rank == 0:
            print("note: the first --reward-model is not a model with the policy's tokenizer; the value model is "
                  "initialised from the policy (--value-model policy)")
    value_source = {"reward": common.resolve(args.reward_model[0], "reward"),
                    "policy": common.resolve(args.model_name_or_path, "sft")}.get(args.value_model, args.value_model)
    value_model = common.load_model(
        value_source,
        "score",
        "--value-model",
        dtype if args.value_device == "policy" else "float32",  # DeepSpeed keeps float32 master weights under bf16
        **load,
        pad_token_id=tokenizer.pad_token_id,
        sharded=sharded(args.value_device),
    )
    context = policy.config.max_position_embeddings  # GPT-2's n_positions is mapped to it
    log = common.make_logger(args, run_name, rank)  # after loading: args.json records what was really used

    # Placement: the policy and (by default) the value model are DeepSpeed engines on this rank's device; π_ref
    # and the reward model are frozen, on `policy` (sharded like the policy under ZeRO-3), `cpu` or `cuda:N`.
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    for model in (policy, value_model):  # released HH: only the top 2 blocks (and the heads) train
        common.freeze_lower_layers(model, args.unfrozen_layers)
        common.gradient_checkpointing(model, args.gradient_checkpointing)
    lora = dict(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                target_modules=args.lora_target_modules, quantized=args.load_in_4bit)
    policy = common.add_lora(policy, "causal", **lora)
    value_model = common.add_lora(value_model, "score", **lora)
    # The learning-rate schedule counts optimiser steps; the decay ends at the policy's last one.
    total_steps = args.total_episodes // per_iteration * args.ppo_epochs * (args.rollout_batch_size // args.mini_batch_size)
    schedule = common.lr_schedule(args.lr_warmup_steps, total_steps, args.lr_schedule)
    policy = common.prepare_trainable(policy, "policy", args.zero_stage, args.mini_batch_size, args.learning_rate,
                                      args.bf16, args.offload, args.max_grad_norm,
                                      args.adam_betas, args.weight_decay, schedule=schedule)
    value_model = common.prepare_trainable(value_model, args.value_device, args.zero_stage, args.mini_batch_size,
                                           args.value_learning_rate, args.bf16, args.offload, args.max_grad_norm,
                                           args.adam_betas, args.weight_decay, schedule=schedule)
    if args.lora_r:
        ref_policy = policy  # read through common.adapter_off: the base weights
    else:
        ref_policy = common.prepare_frozen(ref_policy, args.ref_device, args.zero_stage, args.mini_batch_size,
                                           args.bf16)
    policy.eval()  # eval mode (sampling, scoring); the update switches to train mode and back
    value_model.eval()
    generation_config = GenerationConfig(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                                         top_p=args.top_p, max_new_tokens=args.max_new_tokens, use_cache=True,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    # Data: each rank draws its own prompts (seed + rank) from the whole training split.
    encode = dict(max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens, context=context,
                  chat_template=args.chat_template)
    train_prompts, n_truncated = common.encode_prompts(tokenizer, train_texts, **encode)
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size  # equal per rank: lockstep
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    if n_eval == 0:
        common.fail(f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another "
                    f"--eval-split or raise --eval-prompts")
    if n_truncated and rank == 0:
        print(f"note: {n_truncated} training prompts were left-truncated to fit the prompt budget")
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    if args.ptx_coef > 0:
        ptx_texts = common.load_prompts(common.resolve(args.ptx_dataset, "data/pretrain"), "train", args.ptx_field,
                                        "--ptx-dataset")
        ptx_ids, _ = common.encode_prompts(tokenizer, ptx_texts, context, 0, context)
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    sampler = torch.Generator().manual_seed(args.seed + rank)

    def rollout(prompt_rows, prompts):
        """Sample, cut at EOS, score, and forward π_old, π_ref and V over the result. `prompts`:
        the same prompts as the dataset gave them, for reward models and functions that read text."""
        query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
        policy.eval()  # sampling and scoring in eval mode; the update switches to train mode
        value_model.eval()
        response_ids = generate(policy, query_ids, query_mask, generation_config, zero3, args.repetition_penalty)
        response_ids, response_mask, ended = common.truncate_after_eos(response_ids, tokenizer.eos_token_id,
                                                                       tokenizer.pad_token_id, tokenizer,
                                                                       args.stop_strings)
        # Scoring without gradients, --forward-batch-size rows at a time: the rewards (several: a weighted sum), then
        # the log-probs of π_old and π_ref
        fwd = (query_ids, query_mask, response_ids, response_mask)
        chunk = args.forward_batch_size or args.mini_batch_size
        score = lambda *rows: sum(w * reward(*rows) for w, reward in zip(reward_weights, reward_fns))
        scores = common.in_chunks(score, (*fwd, prompts), chunk).to(device)
        with torch.no_grad():
            sampling = dict(temperature=args.temperature, repetition_penalty=args.repetition_penalty)
            logprobs = common.in_chunks(lambda *rows: common.forward_logprobs(policy, *rows, **sampling), fwd, chunk)
            with common.adapter_off(ref_policy):
                ref_logprobs = common.in_chunks(lambda *rows: common.forward_logprobs(ref_policy, *rows, **sampling),
                                                fwd, chunk).to(device)
        return query_ids, query_mask, response_ids, response_mask.to(logprobs.dtype), ended, scores, logprobs, \
            ref_logprobs

    def evaluate():
        """Held-out prompts, same sampling setting, a fixed seed: proxy reward, gold score, KL to π_ref, length."""
        rows = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(10**6 + rank)
            for i in range(0, len(eval_prompts), args.rollout_batch_size):
                _, _, response_ids, mask, ended, scores, logprobs, ref_logprobs = \
                    rollout(eval_prompts[i:i + args.rollout_batch_size], eval_texts[i:i + args.rollout_batch_size])
                texts = decode_responses(tokenizer, response_ids, mask)
                rows.append(torch.stack([scores.cpu(), ((logprobs - ref_logprobs) * mask).sum(1).cpu(),
                                         mask.sum(1).cpu(), (~ended).float().cpu(),
                                         torch.tensor(gold_score(texts) if gold_score else [0.0] * len(texts))], 1))
        means = torch.cat(rows).mean(0).tolist()
        metrics = dict(zip(["eval/reward", "eval/kl_to_ref", "eval/response_length", "eval/no_eos_fraction",
                            "eval/gold_score"], means))
        if gold_score is None:
            metrics.pop("eval/gold_score")
        return common.mean_across_ranks(metrics)

    num_iterations = args.total_episodes // (args.rollout_batch_size * world_size)
    kl_coef, score_moments = args.init_kl_coef, RunningMoments()
    # Checkpoints: `resume/` holds all a run needs to go on as if never stopped (the engines with their optimizers,
    # the KL controller, the running score moments, each rank's RNG and prompt-sampler states).
    engines, resume_path, stop_requested, start = {"policy": policy, "value": value_model}, \
        os.path.join(run_dir, "resume"), common.stop_signals(), 1
    if args.resume:
        state = common.load_resume(args.resume, engines, rank)
        start, kl_coef, eval_history = state["step"] + 1, state["kl_coef"], state["eval_history"]
        vars(score_moments).update(state["score_moments"])
        sampler.set_state(state["sampler"])
    else:
        eval_history = [(0, evaluate())]
        log(0, eval_history[-1][1])
    if rank == 0:
        print(f"{run_name}: {num_iterations} iterations × {args.rollout_batch_size} × {world_size} rank(s); "
              f"before training: " + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items()))
    start_time = time.time()
    for iteration in range(start, num_iterations + 1):
        t0 = time.time()
        batch_index = torch.randint(len(train_prompts), (args.rollout_batch_size,), generator=sampler)
        query_ids, query_mask, response_ids, mask, ended, scores, old_logprobs, ref_logprobs = \
            rollout([train_prompts[i] for i in batch_index], [train_texts[i] for i in batch_index])
        t_rollout = time.time() - t0
        with torch.no_grad():
            old_values = common.in_chunks(lambda *rows: common.forward_values(value_model, *rows),
                                          (query_ids, query_mask, response_ids, mask),
                                          args.forward_batch_size or args.mini_batch_size).to(device)

            # ALGO LOGIC: per-token rewards, ALGORITHMS.md §1. The score (scaled, clipped) goes on the last response
            # token; every token pays the k1 KL penalty −β(log π_old − log π_ref).
            raw_scores = scores.clone()
            if args.missing_eos_penalty is not None:
                scores = torch.where(ended, scores, torch.full_like(scores, args.missing_eos_penalty))
            if args.reward_scaling != "none":
                score_moments.update(scores)
                if args.reward_scaling == "running_mean_std":
                    scores = scores - score_moments.mean
                scores = scores / (score_moments.std + 1e-8)
            if args.reward_clip is not None:
                scores = scores.clamp(-args.reward_clip, args.reward_clip)
            kl = (old_logprobs - ref_logprobs) * mask
            rewards = -kl_coef * kl
            last = mask.sum(1).long() - 1
            rewards[torch.arange(len(rewards)), last] += scores

            # ALGO LOGIC: GAE and masked whitening over the whole rollout batch of all ranks (ALGORITHMS.md §2)
            advantages, returns = compute_gae(rewards, old_values, mask, args.gamma, args.gae_lambda)
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, mask, across_ranks=True)

        # ALGO LOGIC: `ppo_epochs` passes of clipped-PPO updates over shuffled mini-batches (ALGORITHMS.md §3)
        t1, step_stats = time.time(), []
        policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
        value_model.train()
        for epoch in range(args.ppo_epochs):
            for idx in torch.randperm(args.rollout_batch_size, generator=sampler).split(args.mini_batch_size):
                fwd = (query_ids[idx], query_mask[idx], response_ids[idx], mask[idx])
                logprobs, entropy = common.forward_logprobs(policy, *fwd, temperature=args.temperature,
                                                            repetition_penalty=args.repetition_penalty,
                                                            with_entropy=True, entropy_grad=args.entropy_coef != 0)
                values = common.forward_values(value_model, *fwd).to(device)
                _, stats = ppo_loss(logprobs, old_logprobs[idx], values, old_values[idx], advantages[idx],
                                    returns[idx], mask[idx], args.cliprange, args.cliprange_value, args.vf_coef)
                entropy_mean = masked_mean(entropy, mask[idx])
                policy_loss = stats["pg_loss"] - args.entropy_coef * entropy_mean
                if args.ptx_coef > 0:  # PPO-ptx: NLL of plain pretraining text (Ouyang et al. 2022, eq. 2)
                    ptx_rows = [ptx_ids[i] for i in torch.randint(len(ptx_ids), (len(idx),), generator=sampler)]
                    ptx_input, ptx_mask = common.pad_left(ptx_rows, tokenizer.pad_token_id, device)
                    ptx_labels = ptx_input.masked_fill(ptx_mask == 0, -100)
                    ptx_loss = policy(input_ids=ptx_input, attention_mask=ptx_mask, labels=ptx_labels,
                                      position_ids=(ptx_mask.cumsum(1) - 1).clamp(min=0)).loss
                    policy_loss = policy_loss + args.ptx_coef * ptx_loss
                    stats["policy/ptx_loss"] = ptx_loss.detach()
                policy.backward(policy_loss)
                value_model.backward(args.vf_coef * stats["vf_loss"])
                policy.step()
                value_model.step()
                stats["policy/entropy"] = entropy_mean.detach()
                step_stats.append({k: v.item() for k, v in stats.items()})
        t_update = time.time() - t1

        # Adaptive KL: β moves toward target_kl, per response of the whole (all-rank) batch.
        kl_per_response = masked_mean(kl.sum(1), torch.ones_like(kl[:, 0]), across_ranks=True).item()
        kl_coef_used = kl_coef
        if args.adaptive_kl:
            kl_coef = update_kl_coef(kl_coef, kl_per_response, args.target_kl, args.kl_horizon,
                                     args.rollout_batch_size * world_size)
        ones = torch.ones_like(raw_scores)
        metrics = {k.replace("pg_loss", "policy/loss").replace("vf_loss", "value/loss"):
                   sum(s[k] for s in step_stats) / len(step_stats) for k in step_stats[0]}
        metrics.update({
            # rollout statistics over the whole batch of all ranks (equal rows per rank, so rank means average)
            "rollout/score": raw_scores.mean().item(),
            "rollout/score_std": masked_mean((raw_scores - masked_mean(raw_scores, ones, True)) ** 2, ones,
                                             across_ranks=True).sqrt().item(),
            "rollout/kl_to_ref": kl_per_response, "rollout/kl_coef": kl_coef_used,
            "rollout/response_length": mask.sum(1).mean().item(),
            "rollout/no_eos_fraction": (~ended).float().mean().item(),
            # "pattern collapse" watch (Zheng et al.): perplexity of the policy on its own samples
            "rollout/perplexity": torch.exp(-masked_mean(old_logprobs, mask, across_ranks=True)).item(),
            "rollout/advantage_mean": masked_mean(advantages, mask, across_ranks=True).item()})
        if gold_score:
            metrics["rollout/gold_score"] = sum(g := gold_score(decode_responses(tokenizer, response_ids,
                                                                                 mask))) / len(g)
        metrics = common.mean_across_ranks(metrics)
        common.check_finite(metrics, iteration, resume_path)  # before evaluating (sampling) from NaN weights
        n_tokens = metrics["rollout/response_length"] * args.rollout_batch_size * world_size  # all ranks
        metrics.update({"time/rollout_tokens_per_s": n_tokens / t_rollout,
                        "time/update_tokens_per_s": n_tokens * args.ppo_epochs / t_update,
                        "time/episodes_per_s": args.rollout_batch_size * world_size / (time.time() - t0)})
        if iteration % args.eval_every == 0 or iteration == num_iterations:
            eval_history.append((iteration, evaluate()))
            metrics.update(eval_history[-1][1])
        metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
        log(iteration, metrics)
        if rank == 0:
            gold = f" gold {metrics['rollout/gold_score']:+.3f}" if gold_score else ""
            print(f"iter {iteration:4d}/{num_iterations} score {metrics['rollout/score']:+.3f}{gold} "
                  f"kl {metrics['rollout/kl_to_ref']:.2f} β {kl_coef_used:.4f} len "
                  f"{metrics['rollout/response_length']:.1f} tokens/s {metrics['time/rollout_tokens_per_s']:.0f} "
                  f"(rollout) {metrics['time/update_tokens_per_s']:.0f} (update) "
                  f"episodes/s {metrics['time/episodes_per_s']:.1f}", flush=True)
        if (signum := stop_requested()) or (args.save_every and iteration % args.save_every == 0):
            common.save_resume(resume_path, "ppo.py", iteration, engines, dict(
                step=iteration, kl_coef=kl_coef, eval_history=eval_history, score_moments=vars(score_moments),
                sampler=sampler.get_state()), args, run_dir, rank)
        if signum:
            common.exit_after_signal(signum, resume_path, "ppo.py", rank)

    common.save_hf(policy, tokenizer, os.path.join(run_dir, "policy"), rank)
    common.save_hf(value_model, tokenizer, os.path.join(run_dir, "value"), rank)
    if rank == 0:
        first, final = eval_history[0][1], eval_history[-1][1]
        print(f"done in {time.time() - start_time:.0f} s; held-out before → after: " + ", ".join(
            f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first) + f"; policy saved to {run_dir}/policy")
    common.exit_cleanly()
