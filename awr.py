"""AWR: Advantage-Weighted Regression (Peng, Kumar, Zhang, Levine 2019; arXiv 1910.00177) for language models, the
baseline of the APA paper, online (sampling from the policy) or offline (`--offline-dataset`).
Math: ../shared/ALGORITHMS.md §1, §2, §5, §6.

AWR regresses the policy onto its own samples weighted by exp(A(s,a)/λ): a weighted maximum likelihood,
loss = E[−exp(A(s,a)/λ) · log π_θ(a|s)], the weight detached and clamped to `max_weight` (ALGORITHMS.md §5). Unlike
APA nothing in the loss anchors the policy to π_init; the KL to π_init is only logged.

    python awr.py                                          # online, the built-in task, one CPU process
    python awr.py --offline-dataset builtin                # offline, from the built-in scored SFT responses
    torchrun --nproc_per_node 2 awr.py --zero-stage 3      # two processes (CPU or GPUs)

Sampling is set by `Args` alone (temperature, top-k, top-p): the sampling fields of a checkpoint's
generation_config.json are dropped when the policy is loaded. The log-probs of the loss (and of the KL to π_ref)
are those of softmax(logits / temperature) over the whole vocabulary. With top-k or top-p set, responses come from
the truncated distribution and are scored as samples of the untruncated one, as the released trlX and MOSS-RLHF code
did; keep top-k 0 and top-p 1 (the defaults) for exactly on-policy samples.
"""
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import torch
import tyro
from transformers import GenerationConfig

import common
from common import masked_mean, whiten_masked


@dataclass
class Args:
    exp_name: str = "awr"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (rank r samples with seed + r)"""
    output_dir: str = "runs"
    """folder for TensorBoard logs, metrics.jsonl and checkpoints"""
    model_name_or_path: str = "builtin"
    """the SFT policy, which is also the frozen anchor π_init: a hub name, a local folder, or `builtin`"""
    reward_model: List[str] = field(default_factory=lambda: ["builtin"])
    """reward(s), summed: 1-output classifiers (hub name, folder, `builtin`) and/or `module:function` callables"""
    reward_weights: List[float] = field(default_factory=list)
    """weight of each --reward-model in the sum (default 1 each)"""
    value_model: str = "reward"
    """initialise the value model from `reward` (the reward model), `policy`, or a hub name / folder"""
    dataset: str = "builtin"
    """prompts: a hub name, a folder saved with `save_to_disk`, a .jsonl/.json/.parquet file, or `builtin`"""
    prompt_field: str = "prompt"
    """the column holding the prompt text (of --dataset, and of --offline-dataset rows)"""
    chat_template: bool = False
    """render each prompt with the policy tokenizer's chat template, the assistant turn opened: HH dialogues become
    user / assistant messages, a `messages` column is read as it is; without it prompts stay raw text"""
    response_field: str = "response"
    """the column of --offline-dataset rows holding the response text"""
    reward_field: str = "reward"
    """the column of --offline-dataset rows holding the scalar reward"""
    train_split: str = "train"
    """the split sampled for rollouts"""
    eval_split: str = "test"
    """the held-out split used for evaluation (also in offline mode: evaluation samples from the policy)"""
    offline_dataset: Optional[str] = None
    """train offline on {prompt, response, reward} or preference rows, not rollouts; `builtin` = scored SFT responses"""
    offline_epochs: int = 4
    """offline: passes over the dataset; advantages are recomputed from the current value model before each"""
    value_warmup_epochs: int = 1
    """offline: passes fitting the value model to the returns before the first policy update"""
    trust_remote_code: bool = False
    """allow model repositories to run their own code (off unless you trust them)"""
    lam: float = 1.0
    """AWR temperature λ: weights exp(A/λ) (released adv_coeff_log = 1/λ: 0.5 for HH, 1 for TL;DR and offline)"""
    max_weight: float = 20.0
    """clamp of the weight exp(A/λ) (the released code had none; unclamped weights can explode)"""
    total_episodes: int = 8192
    """online: total number of sampled responses over all ranks"""
    rollout_batch_size: int = 64
    """responses sampled per rank per iteration"""
    mini_batch_size: int = 16
    """responses per rank per optimisation step"""
    forward_batch_size: Optional[int] = None
    """rows per no-grad forward pass (reward models, π_old, π_ref, V) over a rollout or the offline rows; default
    --mini-batch-size, so that scoring holds no more than an update step does"""
    ppo_epochs: int = 2
    """passes over each rollout batch"""
    learning_rate: float = 3.5e-5
    """policy learning rate (AdamW); AWR has no anchor to π_init: on the built-in task 5e-5 drifted to KL ≈ 30"""
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
    """the longest response sampled (offline: responses are cut to this many tokens, EOS included)"""
    stop_strings: List[str] = field(default_factory=list)
    """cut a response before the first of these strings in its text (HH: "Human:" "Assistant:")"""
    temperature: float = 1.0
    """sampling temperature (also applied to the log-probs, so they are those of the sampling distribution)"""
    top_k: int = 0
    """top-k sampling, 0 = off (ALGORITHMS.md §1: one sampling setting for PPO, APA and AWR)"""
    top_p: float = 1.0
    """nucleus sampling, 1 = off"""
    missing_eos_penalty: Optional[float] = None
    """if set, the score of a response that never emitted EOS is replaced by this value (e.g. -1)"""
    reward_scaling: Literal["none", "running"] = "none"
    """divide scores by their running std over all rollouts so far (`running`, the released HH setting)"""
    reward_clip: Optional[float] = None
    """clip the (scaled) score to ±this value (released: 100)"""
    gamma: float = 1.0
    """discount γ of GAE"""
    gae_lambda: float = 0.95
    """λ of GAE"""
    whiten_advantages: bool = True
    """whiten advantages over the response tokens of the whole batch, all ranks"""
    vf_coef: float = 1.0
    """weight of the value loss"""
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
    """where π_init lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""
    reward_device: str = "policy"
    """where the reward model lives: `policy`, `cpu`, or `cuda:N`"""
    reward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the reward model's weights: auto = bfloat16 with --bf16, else float32; float16 for a reward model trained in
    fp16 (GPU)"""
    value_device: str = "policy"
    """where the value model lives: `policy` (its own DeepSpeed engine) or `cpu` / `cuda:N` (plain AdamW)"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations (offline: every epoch), and before and after"""
    eval_prompts: int = 128
    """number of held-out prompts per evaluation, over all ranks"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many iterations (offline: epochs); 0: only when
    stopped by SIGTERM / Ctrl-C. The final policy and value model are HF folders"""
    resume: Optional[str] = None
    """continue a stopped run from its checkpoint folder (runs/RUN_NAME/resume), with the same arguments"""
    local_rank: int = 0
    """set by the `deepspeed` launcher; the rank is read from the environment"""


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


# ALGO LOGIC: the AWR loss, ALGORITHMS.md §5: advantage-weighted log-likelihood, no anchor to π_init
def awr_loss(logprobs, advantages, mask, lam, max_weight):
    """masked mean over response tokens of −w · log π_θ with the weight w = min(exp(A/λ), max_weight) detached
    (no gradient flows into the advantages); all tensors [batch, response_len]."""
    weights = torch.exp(advantages / lam).clamp(max=max_weight).detach()
    return masked_mean(-weights * logprobs, mask)


def value_loss(values, returns, mask):
    """0.5 · masked mean of (V − R)², unclipped (ALGORITHMS.md §4)."""
    return 0.5 * masked_mean((values - returns) ** 2, mask)


class RunningMoments:
    """Running mean / std of every score seen so far on all ranks (Chan et al.'s parallel update), for reward
    scaling."""

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


@torch.no_grad()
def generate(policy, query_ids, query_mask, generation_config, zero3):
    """Sample responses with the KV cache. Under ZeRO-3 the policy's shards are gathered once for the whole
    rollout, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    model = getattr(policy, "module", policy)  # the HF model inside a DeepSpeed engine
    with common.gathered_for_generation(policy, zero3):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config,
                             synced_gpus=zero3)
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
    if args.rollout_batch_size % args.mini_batch_size:
        common.fail(f"--rollout-batch-size {args.rollout_batch_size} is not a multiple of --mini-batch-size "
                    f"{args.mini_batch_size}; pick a mini-batch size that divides it")
    common.check_lora(args)
    rank, world_size, device = common.init_distributed(args.zero_stage)
    per_iteration = args.rollout_batch_size * world_size  # episodes per iteration, all ranks together
    if not args.offline_dataset and (args.total_episodes % per_iteration or not args.total_episodes):
        common.fail(f"--total-episodes {args.total_episodes} is not a positive multiple of --rollout-batch-size "
                    f"{args.rollout_batch_size} × {world_size} rank(s) = {per_iteration}; pass --total-episodes "
                    f"{max(args.total_episodes // per_iteration, 1) * per_iteration}")
    script = "awr.py --offline-dataset" if args.offline_dataset else "awr.py"  # the two modes do not resume each other
    if args.resume:
        common.check_resume(args.resume, script)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    zero3 = args.zero_stage == 3
    # The data first: a file that cannot train fails before any model is loaded.
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    train_texts = None if args.offline_dataset else common.load_prompts(args.dataset, args.train_split,
                                                                        args.prompt_field)
    if args.offline_dataset is not None:
        prompts, responses, rewards = common.load_offline_rows(
            args.offline_dataset, fields=dict(prompt=args.prompt_field, response=args.response_field,
                                              reward=args.reward_field))
        n_rows = len(prompts) // world_size * world_size
        if n_rows < args.mini_batch_size * world_size:
            common.fail(f"the offline dataset has {len(prompts)} rows, fewer than one mini-batch of "
                        f"{args.mini_batch_size} on each of the {world_size} rank(s); lower --mini-batch-size")

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

    # Placement: the policy and (by default) the value model are DeepSpeed engines on this rank's device; π_init
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
    if args.offline_dataset is not None:
        total_steps = args.offline_epochs * math.ceil(n_rows // world_size / args.mini_batch_size)
    else:
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
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size  # equal per rank: lockstep
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    if n_eval == 0:
        common.fail(f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another "
                    f"--eval-split or raise --eval-prompts")
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    sampler = torch.Generator().manual_seed(args.seed + rank)

    def rollout(prompt_rows, prompts):
        """Sample, cut at EOS, score, and forward π_old and π_init over the result.
        `prompts`: the same prompts as the dataset gave them, for reward models and functions that read text."""
        query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
        response_ids = generate(policy, query_ids, query_mask, generation_config, zero3)
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
            sampling = dict(temperature=args.temperature)
            logprobs = common.in_chunks(lambda *rows: common.forward_logprobs(policy, *rows, **sampling), fwd, chunk)
            with common.adapter_off(ref_policy):
                ref_logprobs = common.in_chunks(lambda *rows: common.forward_logprobs(ref_policy, *rows, **sampling),
                                                fwd, chunk).to(device)
        return query_ids, query_mask, response_ids, response_mask.to(logprobs.dtype), ended, scores, logprobs, \
            ref_logprobs

    def evaluate():
        """Held-out prompts, same sampling setting, a fixed seed: proxy reward, gold score, KL to π_init, length."""
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

    def update(batch, advantages, returns, ref_logprobs):
        """One pass of AWR + value updates over shuffled mini-batches of `batch` = (query ids, query mask,
        response ids, response mask). Returns the mean of each logged loss."""
        step_stats = []
        policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
        value_model.train()
        for idx in torch.randperm(len(advantages), generator=sampler).split(args.mini_batch_size):
            fwd = [t[idx] for t in batch]
            logprobs = common.forward_logprobs(policy, *fwd, temperature=args.temperature)
            values = common.forward_values(value_model, *fwd).to(device)
            # ALGO LOGIC: loss = awr_loss + vf_coef · vf_loss (ALGORITHMS.md §5); each engine runs its own backward
            pg_loss = awr_loss(logprobs, advantages[idx], fwd[3], args.lam, args.max_weight)
            vf_loss = value_loss(values, returns[idx], fwd[3])
            policy.backward(pg_loss)
            value_model.backward(args.vf_coef * vf_loss)
            policy.step()
            value_model.step()
            log_ratio = (logprobs - ref_logprobs[idx]).detach()  # π_init is only watched, not in the loss
            clamped = (advantages[idx] / args.lam > math.log(args.max_weight)).to(log_ratio.dtype)
            step_stats.append([pg_loss.item(), vf_loss.item(), masked_mean(log_ratio, fwd[3]).item(),
                               masked_mean(clamped, fwd[3]).item()])
        policy.eval()  # sampling and scoring in eval mode
        value_model.eval()
        means = torch.tensor(step_stats).mean(0).tolist()
        return dict(zip(["policy/loss", "value/loss", "policy/log_ratio_to_ref", "policy/clamped_weight_fraction"],
                        means))

    def all_values(batch):
        with torch.no_grad():
            return common.in_chunks(lambda *rows: common.forward_values(value_model, *rows), batch,
                                    args.forward_batch_size or args.mini_batch_size).to(device)

    # Checkpoints: `resume/` holds all a run needs to go on as if never stopped (the engines with their optimizers,
    # the running score moments, each rank's RNG and sampler states, the epoch or iteration).
    engines, resume_path, stop_requested = {"policy": policy, "value": value_model}, \
        os.path.join(run_dir, "resume"), common.stop_signals()
    state = common.load_resume(args.resume, engines, rank) if args.resume else {}
    if args.resume:
        eval_history = state["eval_history"]
        sampler.set_state(state["sampler"])
    else:
        eval_history = [(0, evaluate())]
        log(0, eval_history[-1][1])

    def save_resume(step, signum, **script_state):
        """Every --save-every steps, and when stopped by a signal (then exit): see common.save_resume."""
        if signum or (args.save_every and step % args.save_every == 0):
            common.save_resume(resume_path, script, step, engines, dict(
                step=step, eval_history=eval_history, sampler=sampler.get_state(), **script_state), args, run_dir,
                rank)
        if signum:
            common.exit_after_signal(signum, resume_path, script.split()[0], rank)

    if rank == 0:
        print(f"{run_name}: {world_size} rank(s); before training: "
              + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items()))
    start_time = time.time()

    if args.offline_dataset is not None:
        # ---- Offline AWR, ALGORITHMS.md §6: scored responses instead of rollouts -------------------------------
        rewards = torch.tensor(rewards[:n_rows], dtype=torch.float32)
        rewards = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # z-scored over the whole dataset
        mine = list(range(rank, n_rows, world_size))
        query_rows, _ = common.encode_prompts(tokenizer, [prompts[i] for i in mine], **encode)
        eos = tokenizer.eos_token
        texts = [responses[i].replace(eos, "").rstrip() if eos else responses[i] for i in mine]
        response_rows = [ids[: args.max_new_tokens - 1] + [tokenizer.eos_token_id]  # EOS appended to every response
                         for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        query_ids, query_mask = common.pad_left(query_rows, tokenizer.pad_token_id, device)
        width = max(len(r) for r in response_rows)
        response_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in response_rows],
                                    device=device)
        mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in response_rows], device=device)
        batch = (query_ids, query_mask, response_ids, mask)
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(len(mask)), mask.sum(1).long() - 1] = rewards[mine].to(device)  # on the last token
        with torch.no_grad(), common.adapter_off(ref_policy):  # π_init's log-probs, once
            ref_logprobs = common.in_chunks(lambda *rows: common.forward_logprobs(ref_policy, *rows,
                                                                                  temperature=args.temperature),
                                            batch, args.forward_batch_size or args.mini_batch_size).to(device)

        # Fix over the released code (advantages from a random value head, never refreshed): fit V to the returns
        # first, then recompute the advantages from the current value model before every epoch.
        mc_returns = compute_gae(token_rewards, torch.zeros_like(mask), mask, args.gamma, 1.0)[1]
        value_model.train()
        for _ in range(0 if args.resume else args.value_warmup_epochs):  # a resumed run has its fitted V
            for idx in torch.randperm(len(mask), generator=sampler).split(args.mini_batch_size):
                vf_loss = value_loss(common.forward_values(value_model, *[t[idx] for t in batch]).to(device),
                                     mc_returns[idx], mask[idx])
                value_model.backward(vf_loss)
                value_model.step()
        value_model.eval()
        previous = state.get("previous")
        for epoch in range(state.get("step", 0) + 1, args.offline_epochs + 1):
            advantages, returns = compute_gae(token_rewards, all_values(batch), mask, args.gamma, args.gae_lambda)
            change = 0.0 if previous is None else masked_mean((advantages - previous).abs(), mask, True).item()
            previous = advantages
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, mask, across_ranks=True)
            metrics = common.mean_across_ranks({**update(batch, advantages, returns, ref_logprobs),
                                                "offline/advantage_change": change})  # |A_epoch − A_epoch−1|
            common.check_finite(metrics, epoch, resume_path)  # before evaluating (sampling) from NaN weights
            eval_history.append((epoch, evaluate()))
            metrics.update(eval_history[-1][1])
            metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
            log(epoch, metrics)
            if rank == 0:
                print(f"epoch {epoch}/{args.offline_epochs} loss {metrics['policy/loss']:.4f} value loss "
                      f"{metrics['value/loss']:.4f} advantage change {change:.4f} eval reward "
                      f"{metrics['eval/reward']:+.3f} KL {metrics['eval/kl_to_ref']:.2f}", flush=True)
            save_resume(epoch, stop_requested(), previous=previous)
    else:
        # ---- Online AWR: sample, score, GAE, AWR updates ----------------------------------------------------
        train_prompts, n_truncated = common.encode_prompts(tokenizer, train_texts, **encode)
        if n_truncated and rank == 0:
            print(f"note: {n_truncated} training prompts were left-truncated to fit the prompt budget")
        num_iterations = args.total_episodes // (args.rollout_batch_size * world_size)
        score_moments = RunningMoments()
        vars(score_moments).update(state.get("score_moments", {}))
        for iteration in range(state.get("step", 0) + 1, num_iterations + 1):
            t0 = time.time()
            batch_index = torch.randint(len(train_prompts), (args.rollout_batch_size,), generator=sampler)
            query_ids, query_mask, response_ids, mask, ended, scores, old_logprobs, ref_logprobs = \
                rollout([train_prompts[i] for i in batch_index], [train_texts[i] for i in batch_index])
            t_rollout = time.time() - t0
            batch = (query_ids, query_mask, response_ids, mask)
            # ALGO LOGIC: the score on the last response token, no KL term in the reward (ALGORITHMS.md §1):
            # the KL to π_init is logged, not penalised (as in the released code).
            raw_scores = scores.clone()
            if args.missing_eos_penalty is not None:
                scores = torch.where(ended, scores, torch.full_like(scores, args.missing_eos_penalty))
            if args.reward_scaling == "running":
                score_moments.update(scores)
                scores = scores / (score_moments.std + 1e-8)
            if args.reward_clip is not None:
                scores = scores.clamp(-args.reward_clip, args.reward_clip)
            token_rewards = torch.zeros_like(mask)
            token_rewards[torch.arange(len(mask)), mask.sum(1).long() - 1] = scores
            advantages, returns = compute_gae(token_rewards, all_values(batch), mask, args.gamma, args.gae_lambda)
            if args.whiten_advantages:
                advantages = whiten_masked(advantages, mask, across_ranks=True)
            t1 = time.time()
            epoch_stats = [update(batch, advantages, returns, ref_logprobs) for _ in range(args.ppo_epochs)]
            metrics = {k: sum(s[k] for s in epoch_stats) / len(epoch_stats) for k in epoch_stats[0]}
            t_update = time.time() - t1
            metrics.update({
                "rollout/score": raw_scores.mean().item(),
                "rollout/kl_to_ref": ((old_logprobs - ref_logprobs) * mask).sum(1).mean().item(),
                "rollout/response_length": mask.sum(1).mean().item(),
                "rollout/no_eos_fraction": (~ended).float().mean().item(),
                "rollout/perplexity": torch.exp(-masked_mean(old_logprobs, mask, across_ranks=True)).item()})
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
                      f"kl {metrics['rollout/kl_to_ref']:.2f} len {metrics['rollout/response_length']:.1f} "
                      f"tokens/s {metrics['time/rollout_tokens_per_s']:.0f} (rollout) "
                      f"{metrics['time/update_tokens_per_s']:.0f} (update) "
                      f"episodes/s {metrics['time/episodes_per_s']:.1f}", flush=True)
            save_resume(iteration, stop_requested(), score_moments=vars(score_moments))

    common.save_hf(policy, tokenizer, os.path.join(run_dir, "policy"), rank)
    common.save_hf(value_model, tokenizer, os.path.join(run_dir, "value"), rank)
    if rank == 0:
        first, final = eval_history[0][1], eval_history[-1][1]
        print(f"done in {time.time() - start_time:.0f} s; held-out before → after: " + ", ".join(
            f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first) + f"; policy saved to {run_dir}/policy")
    common.exit_cleanly()
