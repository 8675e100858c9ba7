"""A-LoL: Advantage-Leftover-Lunch offline RL (Baheti, Lu, Brahman, Le Bras, Sap, Riedl; ICLR 2024) and its baselines,
on {prompt, response, reward} rows. Math: ../shared/ALGORITHMS.md §0, §8.

The whole response is one action. A frozen π_ref (the starting model) gives a value estimate V_ref(x) of the prompt,
fitted to the reward of π_ref's own greedy responses; A = R − V_ref(x) is computed once, rows with A ≤ 0 are never
trained on, and the sequence NLL is weighted by A⁺ times a clamped importance ratio π_θ(y|x) / π_ref(y|x).

    python alol.py                                                  # A-LoL on the built-in scored SFT responses
    python alol.py --algorithm a_lol_seq --reward-transform none    # per-token ratios, raw reward-model logits
    torchrun --nproc_per_node 2 alol.py --zero-stage 3              # two processes (CPU or GPUs)
"""
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import datasets
import torch
import torch.distributed as dist
import tyro
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

import common

CACHE_VERSION = 1  # raise when what the cache holds, or how it is computed, changes


@dataclass
class Args:
    exp_name: str = "alol"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (V_ref is fitted under this seed on every rank; rank r draws batches with seed + r)"""
    output_dir: str = "runs"
    """folder for TensorBoard logs, metrics.jsonl and checkpoints"""
    algorithm: str = "a_lol"
    """the loss, ALGORITHMS.md §8: nll, wbc (weighted BC), r_gold, r_lol, a_lol, a_lol_ref_free, a_lol_seq, a_lol_kl"""
    model_name_or_path: str = "builtin"
    """the starting policy, which is also the frozen π_ref: a hub name, a local folder, or `builtin`"""
    reward_model: Tuple[str, ...] = ("builtin",)
    """scorer of each reward field (one, or one per field): a 1-output classifier, module:function, or `gold`"""
    offline_dataset: str = "builtin"
    """training rows {prompt, response, reward columns} or preference rows {prompt, chosen, ...}: hub, path, builtin"""
    offline_split: str = "train"
    """the split of --offline-dataset trained on"""
    reward_fields: Tuple[str, ...] = ("reward",)
    """columns summed into R; a column the rows lack is scored by its --reward-model (preference rows: the chosen)"""
    reward_weights: Tuple[float, ...] = ()
    """weight of each reward field in R = Σ w_i · transform(r_i) (empty = all 1)"""
    reward_transform: Literal["sigmoid", "none"] = "sigmoid"
    """applied to each raw score (data, π_ref's responses for V_ref, evaluation): sigmoid(logit), as in A-LoL HH"""
    dataset: str = "builtin"
    """prompts for fitting V_ref and for evaluation: a hub name, a save_to_disk folder, a .jsonl/.json file, builtin"""
    prompt_field: str = "prompt"
    """the column of --dataset holding the prompt text"""
    chat_template: bool = False
    """render each prompt with the policy tokenizer's chat template, the assistant turn opened: HH dialogues become
    user / assistant messages, a `messages` column is read as it is; without it prompts stay raw text"""
    value_split: str = "test"
    """the split of --dataset whose prompts π_ref answers greedily to fit V_ref; prompts of training rows, and those
    evaluated, are left out"""
    eval_split: str = "test"
    """the held-out split of --dataset used for evaluation"""
    value_prompts: int = 512
    """number of prompts for fitting V_ref; the last 10% are held out to choose the epoch"""
    value_epochs: int = 8
    """epochs of V_ref fitting; the one with the lowest held-out MSE is kept"""
    value_learning_rate: float = 1e-3
    """V_ref head learning rate (AdamW)"""
    value_batch_size: int = 32
    """prompts per V_ref step"""
    sampling: Optional[Literal["good_priority", "uniform"]] = None
    """row sampling: i.i.d. ∝ max(A, 0) (∝ R for wbc, r_gold, r_lol) or uniform; default good_priority, nll uniform"""
    total_steps: int = 300
    """optimisation steps before good_priority scales them by the fraction of rows with positive weight"""
    batch_size: int = 16
    """sequences per rank per step"""
    learning_rate: float = 3e-5
    """policy learning rate (AdamW, constant)"""
    max_grad_norm: float = 0.3
    """global gradient-norm clip (released: 0.3)"""
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
    """train only the top N transformer blocks of the policy (and what follows them); -1 = all (released HH: 2)"""
    clip: float = 0.9
    """ε: importance ratios are clamped to [1 − ε, 1 + ε] (released ppo_clip 0.9)"""
    kl_beta: float = 0.001
    """β_kl of a_lol_kl: S·A⁺ + β_kl·(log π_θ − log π_ref); keep it below the typical A⁺, or rows are unlearned"""
    max_prompt_length: int = 16
    """prompts are left-truncated to this many tokens (and to what the context leaves after the response)"""
    max_new_tokens: int = 32
    """responses are cut to this many tokens, EOS included; also the longest greedy response"""
    stop_strings: List[str] = field(default_factory=list)
    """cut a response before the first of these strings in its text (HH: "Human:" "Assistant:")"""
    forward_batch_size: int = 64
    """rows per forward pass / generate call outside training (V_ref, advantages, evaluation)"""
    cache_dir: Optional[str] = None
    """where V_ref and advantages are cached (default $ONEFILE_RLHF_CACHE/alol or ~/.cache/onefile-rlhf/alol)"""
    no_cache: bool = False
    """recompute V_ref and the advantages even when a cache entry with the same key exists (and overwrite it)"""
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
    """rank r of a LoRA adapter trained in place of the policy's weights (0: no adapter, the weights train).
    π_ref is then the policy with its adapter switched off: no second copy of the model (alol-hh: 64)"""
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
    """where π_ref lives while V_ref and advantages are computed: `policy` (sharded with ZeRO-3), `cpu` or `cuda:N`"""
    reward_device: str = "policy"
    """where the reward model(s) live: `policy`, `cpu`, or `cuda:N`"""
    reward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the reward model's weights: auto = bfloat16 with --bf16, else float32; float16 for a reward model trained in
    fp16 (GPU)"""
    eval_every: int = 100
    """evaluate on held-out prompts (and print a progress line) every this many steps, and before and after"""
    eval_prompts: int = 128
    """number of held-out prompts per evaluation, over all ranks"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many steps (0: only when stopped by SIGTERM /
    Ctrl-C); the final policy is an HF folder"""
    resume: Optional[str] = None
    """continue a stopped run from its checkpoint folder (runs/RUN_NAME/resume), with the same arguments"""
    trust_remote_code: bool = False
    """allow model repositories to run their own code (off unless you trust them)"""
    local_rank: int = 0
    """set by the `deepspeed` launcher; the rank is read from the environment"""


ALGORITHMS = ("nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")


# ALGO LOGIC: the eight losses, ALGORITHMS.md §8 (one row per variant of its table)
def alol_loss(algorithm, logprobs, ref_logprobs, mask, rewards, advantages, clip=0.9, kl_beta=0.001, gold_floor=0.1):
    """Batch mean of the per-sequence loss. `logprobs` (with grad) and `ref_logprobs` are per-token
    [batch, response_len], `mask` 1 on response tokens; `rewards` R and `advantages` A are [batch]. Every
    importance ratio and r_gold weight is computed without gradient."""
    real = mask.bool()
    lp = torch.where(real, logprobs, torch.zeros_like(logprobs))  # padding may hold anything, even inf
    ref = torch.where(real, ref_logprobs, torch.zeros_like(ref_logprobs))
    seq_nll, ref_nll = -lp.sum(1), -ref.sum(1)  # S = Σ_t −log π_θ(y_t|s_t), Sref the same under π_ref
    a_plus = advantages.clamp(min=0)  # A⁺ = max(A, 0)
    ratio = torch.exp(ref_nll - seq_nll).detach().clamp(1 - clip, 1 + clip)  # π_θ(y|x)/π_ref(y|x), plain clamp
    if algorithm == "nll":
        per_seq = seq_nll
    elif algorithm == "wbc":
        per_seq = seq_nll * rewards
    elif algorithm == "r_gold":  # Σ_t −log π_θ(y_t) · max(π_θ(y_t), u), the weight detached
        per_seq = (-lp * lp.detach().exp().clamp(min=gold_floor)).sum(1) * rewards
    elif algorithm == "r_lol":
        per_seq = seq_nll * ratio * rewards
    elif algorithm == "a_lol":
        per_seq = seq_nll * ratio * a_plus
    elif algorithm == "a_lol_ref_free":
        per_seq = seq_nll * a_plus
    elif algorithm == "a_lol_seq":  # per-token ratios π_θ(y_t)/π_ref(y_t), clamped, detached
        token_ratio = torch.exp(lp - ref).detach().clamp(1 - clip, 1 + clip)
        per_seq = (-lp * token_ratio).sum(1) * a_plus
    elif algorithm == "a_lol_kl":  # no ratio; + β_kl (Sref − S) = β_kl (log π_θ(y|x) − log π_ref(y|x))
        per_seq = seq_nll * a_plus + kl_beta * (ref_nll - seq_nll)  # = S·(A⁺ − β_kl) + const: where A⁺ < β_kl
        # the data's likelihood is pushed DOWN, so β_kl must be small next to A⁺ (A⁺ ≤ 0.006 on the built-in task)
    else:
        raise ValueError(f"unknown A-LoL algorithm '{algorithm}'")
    return per_seq.mean()


def priority_sampler(weights, num_draws, generator=None):
    """`num_draws` row indices drawn i.i.d. with probability ∝ max(weight, 0): rows with weight ≤ 0 are never drawn
    (A-LoL §8 `good_priority`; uniform sampling = all weights 1)."""
    positive = weights.double().clamp(min=0)
    if positive.sum() <= 0:
        raise ValueError("no row has a positive weight")
    return torch.multinomial(positive, num_draws, replacement=True, generator=generator)


class ValueHead(torch.nn.Module):
    """V_ref(x), A-LoL §8: attention pooling of π_ref's last hidden states of the prompt with a learned query (padding
    masked), then Linear → sigmoid, scaled into [lo, hi] (lo = 0, hi = max_value: the paper's sigmoid · max_value)."""

    def __init__(self, width, lo, hi, dropout=0.1):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(width))  # zero query: a plain mean over the prompt at first
        self.dropout, self.out, self.lo, self.hi = torch.nn.Dropout(dropout), torch.nn.Linear(width, 1), lo, hi

    def forward(self, hidden, mask):  # hidden [batch, prompt_len, width], mask [batch, prompt_len]
        real = mask.bool()
        hidden = torch.where(real[..., None], hidden, torch.zeros_like(hidden))
        attention = (hidden @ self.query / hidden.shape[-1] ** 0.5).masked_fill(~real, float("-inf")).softmax(-1)
        pooled = (attention[..., None] * hidden).sum(1)
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.out(self.dropout(pooled))).squeeze(-1)


@torch.enable_grad()  # also when called under no_grad
def fit_value_head(hidden, mask, targets, lo, hi, epochs, lr, batch_size, seed, device="cpu"):
    """MSE fit on the first 90% of the prompts; the epoch with the lowest MSE on the last 10% is kept (the released
    code chose it by training loss). Returns (head in eval mode: no dropout when scoring, held-out MSE per epoch)."""
    torch.manual_seed(seed)  # same head, same dropout masks on every rank
    head = ValueHead(hidden.shape[-1], lo, hi).to(device)
    head.out.bias.data.fill_(torch.logit((targets.mean() - lo) / (hi - lo), eps=1e-4).item())  # start at the mean
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    n_fit, order = max(1, int(0.9 * len(targets))), torch.Generator().manual_seed(seed)
    held = slice(n_fit, None) if n_fit < len(targets) else slice(0, n_fit)  # (fewer than 2 prompts: no held-out)
    mse = lambda part: ((head(hidden[part].to(device), mask[part].to(device)) - targets[part].to(device)) ** 2).mean()
    history, best = [], None
    for _ in range(max(epochs, 1)):
        head.train()
        for idx in torch.randperm(n_fit, generator=order).split(batch_size):
            optimizer.zero_grad()
            mse(idx).backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            history.append(mse(held).item())
        if history[-1] <= min(history):
            best = copy.deepcopy(head.state_dict())
    head.load_state_dict(best)
    return head.eval().requires_grad_(False), history


def cached(key: dict, compute, cache_dir: str, use_cache=True, rank=0):
    """compute() -> (dict of tensors, dict of JSON info), stored as <sha256 of key>.safetensors + .json under
    cache_dir and reused only when the stored key equals `key` (the released pickles were reused whatever changed).
    Returns (tensors, info, hit). Every rank takes the same branch, since compute() may hold collectives."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    path = os.path.join(cache_dir, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20])
    exists = use_cache and os.path.exists(path + ".json") and os.path.exists(path + ".safetensors")
    entry = json.loads(open(path + ".json").read()) if exists else {}
    if common.mean_across_ranks({"hit": float(entry.get("key") == key)})["hit"] == 1.0:
        return load_file(path + ".safetensors"), entry["info"], True
    tensors, info = compute()
    if rank == 0:  # written aside and renamed: a reader never sees half an entry; the JSON (checked first) goes last
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f".{os.getpid()}.tmp"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path + ".safetensors" + tmp)
        os.replace(path + ".safetensors" + tmp, path + ".safetensors")
        open(path + ".json" + tmp, "w").write(json.dumps({"key": key, "info": info}, indent=1))
        os.replace(path + ".json" + tmp, path + ".json")
    return tensors, info, False


def fingerprint(name: str, role: str):
    """A model for the cache key. A local folder: its files' contents (SHA-256 of each; of its size and first and
    last 16 MiB above 64 MiB, as weights change everywhere when trained). A hub name: the commit it resolves to,
    asked of the hub, else that of the copy in the local hub cache, else the name alone."""
    if name == "gold":
        return [name]
    path = common.resolve(name, role)
    if ":" in path and not os.path.exists(path):  # a module:function reward: its name
        return [path]
    if not os.path.isdir(path):
        return [path, hub_commit(path)]
    contents = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            contents.append((entry.name, file_digest(entry.path)))
    return contents


def file_digest(path: str, whole_below=64 << 20, chunk=16 << 20) -> str:
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= whole_below:
            digest.update(f.read())
        else:
            digest.update(f.read(chunk))
            f.seek(size - chunk)
            digest.update(f.read(chunk))
    return digest.hexdigest()


def hub_commit(name: str):
    """The commit a hub model name resolves to now (None when neither the hub nor its local cache knows it)."""
    import huggingface_hub

    try:
        return huggingface_hub.model_info(name).sha
    except Exception:  # noqa: BLE001 - offline, unknown name: try the local hub cache
        pass
    try:
        return os.path.basename(huggingface_hub.snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached either: the name alone keys the cache
        return None


def distinct_n(texts, n):
    """Distinct-n: unique word n-grams / all word n-grams over all texts."""
    grams = [tuple(ws[i:i + n]) for ws in (t.split() for t in texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def generate(policy, query_ids, query_mask, generation_config, zero3):
    """Decode responses with the KV cache. Under ZeRO-3 the policy's shards are gathered once for the whole call,
    and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    model = getattr(policy, "module", policy)  # the HF model inside a DeepSpeed engine
    with common.gathered_for_generation(policy, zero3):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config,
                             synced_gpus=zero3)
    return out[:, query_ids.shape[1]:]


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    return [tokenizer.decode(r[: int(n)], skip_special_tokens=False)
            for r, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())]


def trim(query_ids, query_mask, response_ids, response_mask):
    """Drop the columns that are padding in every row (left of the prompts, right of the responses)."""
    start, end = int(query_mask.any(0).long().argmax()), int(response_mask.sum(1).max())
    return query_ids[:, start:], query_mask[:, start:], response_ids[:, :end], response_mask[:, :end]


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.algorithm not in ALGORITHMS:
        common.fail(f"unknown --algorithm {args.algorithm}; pick one of {', '.join(ALGORITHMS)}")
    n_fields = len(args.reward_fields)
    if len(args.reward_weights) not in (0, n_fields) or len(args.reward_model) not in (1, n_fields):
        common.fail(f"--reward-weights ({len(args.reward_weights)}) and --reward-model ({len(args.reward_model)}) "
                    f"need one value per --reward-fields entry ({n_fields}); --reward-model may also give one")
    common.check_lora(args)
    rank, world_size, device = common.init_distributed(args.zero_stage)
    if args.resume:
        common.check_resume(args.resume, "alol.py")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    zero3 = args.zero_stage == 3
    sampling = args.sampling or ("uniform" if args.algorithm == "nll" else "good_priority")
    weights = torch.tensor(args.reward_weights or [1.0] * n_fields)
    transform = torch.sigmoid if args.reward_transform == "sigmoid" else (lambda x: x)
    scorer_names = list(args.reward_model) * (n_fields // len(args.reward_model))

    data = common.load_split(args.offline_dataset, args.offline_split, "data/offline", "--offline-dataset")
    if "prompt" not in data.column_names and (rows := common.canonical_rows(data, args.offline_dataset)):
        data = datasets.Dataset.from_dict(rows)  # HH transcripts: split at the last "Assistant:"; train on chosen
    response_field = "response" if "response" in data.column_names else "chosen"
    if not {"prompt", response_field} <= set(data.column_names):  # checked before any model is loaded
        common.fail(f"dataset '{args.offline_dataset}' has columns {', '.join(data.column_names)}; A-LoL rows need "
                    f"prompt and response (or preference rows: prompt, chosen), plus the --reward-fields columns")
    common.check_rows(args.offline_dataset, prompt=data["prompt"], response=data[response_field])
    missing = [f for f in args.reward_fields if f not in data.column_names]
    if missing and rank == 0:
        print(f"note: the rows have no column {', '.join(missing)}: their responses are scored by --reward-model")

    # Seeding: one seed while loading and while fitting V_ref (every rank computes the same V_ref and advantages,
    # with no communication); rank r then draws its own batches with seed + r.
    torch.manual_seed(args.seed)
    dtype = "bfloat16" if args.bf16 else "float32"
    load = dict(dtype=dtype, trust_remote_code=args.trust_remote_code, attn_implementation=args.attn_implementation,
                load_in_4bit=args.load_in_4bit)
    # Under ZeRO-3 every model on `policy` is loaded shard by shard: no rank ever holds a whole copy
    sharded = lambda placement: common.zero3_config(placement, args.zero_stage, args.batch_size, args.bf16,
                                                    args.offload)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = common.load_model(args.model_name_or_path, "causal", "--model-name-or-path", **load,
                               sharded=sharded("policy"))
    scorers = {name: common.load_reward(name, tokenizer, args.reward_device, args.zero_stage, args.batch_size,
                                        args.bf16, args.trust_remote_code, args.reward_dtype)
               for name in dict.fromkeys(n for n in scorer_names if n != "gold")}  # a model or module:function
    log = common.make_logger(args, run_name, rank)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    common.freeze_lower_layers(policy, args.unfrozen_layers)  # released HH: only the top 2 blocks train
    common.gradient_checkpointing(policy, args.gradient_checkpointing)
    policy = common.add_lora(policy, "causal", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             target_modules=args.lora_target_modules, quantized=args.load_in_4bit)
    # The learning-rate schedule counts optimiser steps; the decay ends at --total-steps (good-priority scaling can
    # end the run sooner: it trains on the positive-advantage share of the steps).
    schedule = common.lr_schedule(args.lr_warmup_steps, args.total_steps, args.lr_schedule)
    policy = common.prepare_trainable(policy, "policy", args.zero_stage, args.batch_size, args.learning_rate,
                                      args.bf16, args.offload, args.max_grad_norm,
                                      args.adam_betas, args.weight_decay, schedule=schedule)
    policy.eval()  # eval mode (π_ref's passes, decoding); the training loop switches to train mode
    greedy = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    # Data: {prompt, response, reward fields} rows, or preference rows (their chosen response); all rows on every rank.
    raw_data = torch.tensor([[float(v) for v in data[f]] if f not in missing else [float("nan")] * len(data)
                             for f in args.reward_fields]).T  # [rows, fields]; NaN: scored in compute_advantages
    encode = dict(max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
                  context=policy.module.config.max_position_embeddings,  # GPT-2's n_positions is mapped to it
                  chat_template=args.chat_template)
    train_texts = [p if isinstance(p, list) else str(p) for p in data["prompt"]]  # a text, or chat messages
    query_rows, _ = common.encode_prompts(tokenizer, train_texts, **encode)
    eos = tokenizer.eos_token
    texts = [str(r).replace(eos, "").rstrip() if eos else str(r) for r in data[response_field]]
    response_rows = [ids[: args.max_new_tokens - 1] + [tokenizer.eos_token_id]  # EOS appended to every response
                     for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in response_rows)
    rows = (*common.pad_left(query_rows, tokenizer.pad_token_id),
            torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in response_rows]),
            torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in response_rows]))
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    # V_ref is fitted on held-out prompts, as in the paper: none that a training row has, and none of the prompts
    # evaluated (the first --eval-prompts of the evaluation split, which is also the default --value-split).
    held_out = {json.dumps(prompt) for prompt in train_texts + eval_texts[: args.eval_prompts]}
    value_texts = common.load_prompts(args.dataset, args.value_split, args.prompt_field)
    value_texts = [prompt for prompt in value_texts if json.dumps(prompt) not in held_out][: args.value_prompts]
    if len(value_texts) < 2:  # one to fit, one to choose the epoch
        common.fail(f"the '{args.value_split}' split of --dataset {args.dataset} has {len(value_texts)} prompt(s) "
                    f"that neither a training row nor the evaluation has; V_ref needs held-out prompts: pass another "
                    f"--value-split or --dataset")
    value_prompts, _ = common.encode_prompts(tokenizer, value_texts, **encode)
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size  # equal per rank: lockstep
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    if n_eval == 0:
        common.fail(f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another "
                    f"--eval-split or raise --eval-prompts")
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None

    def chunks(*tensors):
        for i in range(0, len(tensors[0]), args.forward_batch_size):
            yield [t[i:i + args.forward_batch_size] for t in tensors]

    def reward(query_ids, query_mask, response_ids, response_mask, prompts, raw=None):
        """R = Σ_i w_i · transform(r_i), [n]: r_i from `raw` [n, fields] where not NaN, else from field i's scorer,
        which reads the token ids and the `prompts` as the dataset gave them."""
        raw = torch.full((len(query_ids), n_fields), float("nan")) if raw is None else raw.clone()
        for i, name in enumerate(scorer_names):
            if raw[:, i].isnan().any():
                raw[:, i] = torch.tensor(common.builtin_gold_score(decode_responses(
                    tokenizer, response_ids, response_mask))) if name == "gold" else scorers[name](
                    query_ids, query_mask, response_ids, response_mask, prompts)
        return (transform(raw) * weights).sum(1)

    @torch.no_grad()
    def compute_advantages():
        """V_ref fitted on π_ref's greedy responses; then R, V_ref(x), A and π_ref's per-token log-probs of all rows.
        π_ref is loaded here only: a cache hit needs no π_ref, and it is freed afterwards."""
        if args.lora_r:  # the untrained policy, read with its adapter off (the caller's common.adapter_off)
            ref_policy = policy
        else:
            ref_policy = common.prepare_frozen(common.load_model(
                args.model_name_or_path, "causal", "--model-name-or-path", **load, sharded=sharded(args.ref_device)),
                args.ref_device, args.zero_stage, args.batch_size, args.bf16)

        def prompt_hidden(query_ids, query_mask):  # π_ref's last-layer hidden states of the (left-padded) prompt
            ids, mask = query_ids.to(ref_policy.device), query_mask.to(ref_policy.device)
            return common.last_hidden(ref_policy, ids, mask, (mask.cumsum(1) - 1).clamp(min=0)).float().to(device)

        value_ids, value_mask = common.pad_left(value_prompts, tokenizer.pad_token_id, device)  # one prompt width
        targets, hidden = [], []
        for ids, mask, prompts in chunks(value_ids, value_mask, value_texts):
            out, out_mask, _ = common.truncate_after_eos(generate(
                ref_policy, ids, mask, greedy, zero3 and (ref_policy is policy or args.ref_device == "policy")),
                tokenizer.eos_token_id,
                tokenizer.pad_token_id, tokenizer,
                args.stop_strings)
            targets.append(reward(ids, mask, out, out_mask, prompts))
            hidden.append(prompt_hidden(ids, mask))
        targets, hidden = torch.cat(targets), torch.cat(hidden)
        lo, hi = (weights.clamp(max=0).sum().item(), weights.clamp(min=0).sum().item()) if args.reward_transform \
            == "sigmoid" else (targets.min().item(), targets.max().item() + 1e-6)  # sigmoids: R in (Σw⁻, Σw⁺)
        head, history = fit_value_head(hidden, value_mask, targets, lo, hi, args.value_epochs,
                                       args.value_learning_rate, args.value_batch_size, args.seed, device)
        rewards, values, ref_logprobs = [], [], []
        for q, qm, r, rm, raw, prompts in chunks(*rows, raw_data, train_texts):
            q, qm, r, rm = (t.to(device) for t in trim(q, qm, r, rm))
            rewards.append(reward(q, qm, r, rm.long(), prompts, raw))
            values.append(head(prompt_hidden(q, qm), qm).cpu())  # head in eval mode: no dropout
            logprobs = common.forward_logprobs(ref_policy, q, qm, r, rm).cpu()
            ref_logprobs.append(torch.nn.functional.pad(logprobs, (0, rows[2].shape[1] - logprobs.shape[1])))
        rewards, values = torch.cat(rewards), torch.cat(values)
        info = {"value_heldout_mse": history, "value_epoch": history.index(min(history)) + 1,
                "value_target_mean": targets.mean().item(), "value_target_std": targets.std().item()}
        return {"rewards": rewards, "values": values, "advantages": rewards - values,
                "ref_logprobs": torch.cat(ref_logprobs)}, info

    # ALGO LOGIC: A = R − V_ref(x) and π_ref's log-probs, once per run, cached under a key of everything they depend
    # on but the algorithm (so the eight variants share one entry)
    sha = lambda obj: hashlib.sha256(json.dumps(obj).encode()).hexdigest()
    key = dict(version=CACHE_VERSION, model=fingerprint(args.model_name_or_path, "sft"),
               reward_models=[fingerprint(n, "reward") for n in scorer_names], reward_fields=args.reward_fields,
               reward_weights=weights.tolist(), reward_transform=args.reward_transform, seed=args.seed, dtype=dtype,
               rows=sha([query_rows, response_rows, raw_data.tolist()]), value_prompts=sha(value_prompts),
               value_fit=[args.value_epochs, args.value_learning_rate, args.value_batch_size],
               max_new_tokens=args.max_new_tokens, stop_strings=args.stop_strings, reward_dtype=args.reward_dtype,
               chat_template=tokenizer.chat_template if args.chat_template else None, load_in_4bit=args.load_in_4bit)
    cache_dir = args.cache_dir or os.path.join(os.environ.get("ONEFILE_RLHF_CACHE", os.path.join(
        os.path.expanduser("~"), ".cache", "onefile-rlhf")), "alol")
    t0 = time.time()
    with common.adapter_off(policy):  # with LoRA, the policy is π_ref until it trains
        cache, info, hit = cached(key, compute_advantages, cache_dir, not args.no_cache, rank)
    rewards, advantages, ref_logprobs = cache["rewards"], cache["advantages"], cache["ref_logprobs"]

    # Sampling, A-LoL §8: good_priority draws rows i.i.d. ∝ max(A, 0) (∝ R for wbc, r_gold, r_lol) and scales the
    # number of steps by the fraction of rows with positive weight; uniform keeps every row and every step.
    priority = torch.ones_like(rewards) if sampling == "uniform" else \
        rewards if args.algorithm in ("wbc", "r_gold", "r_lol") else advantages
    positive = common.mean_across_ranks({"p": (priority > 0).float().mean().item()})["p"]  # one step count: lockstep
    if positive == 0:
        common.fail("no row has a positive advantage (or reward): nothing to train on with --sampling good_priority")
    num_steps = max(1, round(args.total_steps * positive))
    torch.manual_seed(args.seed + rank)
    draws = priority_sampler(priority, num_steps * args.batch_size, torch.Generator().manual_seed(args.seed + rank))
    data_stats = {"data/rows": len(rewards), "data/dropped_rows": int((priority <= 0).sum()),
                  "data/reward_mean": rewards.mean().item(), "data/advantage_mean": advantages.mean().item(),
                  "data/positive_advantage_fraction": (advantages > 0).float().mean().item(),
                  "value/heldout_mse": min(info["value_heldout_mse"]), "value/epoch": info["value_epoch"]}
    if rank == 0:
        print(f"{run_name}: {world_size} rank(s), {args.algorithm}; V_ref {'from the cache' if hit else 'fitted'} "
              f"({time.time() - t0:.0f} s): epoch {info['value_epoch']}/{args.value_epochs}, held-out MSE "
              f"{data_stats['value/heldout_mse']:.3g} (targets {info['value_target_mean']:.3g} ± "
              f"{info['value_target_std']:.2g}); {len(rewards)} rows, {data_stats['data/dropped_rows']} dropped "
              f"(weight ≤ 0) by {sampling} sampling; {num_steps} steps", flush=True)

    def evaluate():
        """Greedy responses to held-out prompts: proxy reward (R's scale), gold score, distinct-1/2, length."""
        stats, texts = [], []
        policy.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
        for prompt_rows, prompts in chunks(eval_prompts, eval_texts):
            ids, mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
            out, out_mask, _ = common.truncate_after_eos(generate(policy, ids, mask, greedy, zero3),
                                                         tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer,
                                                         args.stop_strings)
            kept = decode_responses(tokenizer, out, out_mask)
            stats.append(torch.stack([reward(ids, mask, out, out_mask, prompts), out_mask.sum(1).float().cpu(),
                                      torch.tensor(gold_score(kept) if gold_score else [0.0] * len(kept))], 1))
            texts += [t.replace(eos, " ") if eos else t for t in kept]
        names = ["eval/reward", "eval/response_length", "eval/gold_score"]
        metrics = dict(zip(names, torch.cat(stats).mean(0).tolist()))
        if gold_score is None:
            metrics.pop("eval/gold_score")
        gathered = [None] * world_size  # distinct-n over every rank's responses, not a mean of per-rank ratios
        dist.all_gather_object(gathered, texts)
        texts = [t for part in gathered for t in part]
        policy.train()
        return {**common.mean_across_ranks(metrics), "eval/distinct_1": distinct_n(texts, 1),
                "eval/distinct_2": distinct_n(texts, 2)}

    # Checkpoints: `resume/` holds all a run needs to go on as if never stopped: the policy engine with its optimizer,
    # the step (the draws above are fixed by the seed) and each rank's RNG states. V_ref comes back from the cache.
    engines, resume_path, stop_requested = {"policy": policy}, os.path.join(run_dir, "resume"), common.stop_signals()
    state = common.load_resume(args.resume, engines, rank) if args.resume else {}
    if args.resume:
        eval_history = state["eval_history"]
    else:
        eval_history = [(0, evaluate())]
        log(0, {**data_stats, **eval_history[0][1]})
    if rank == 0:
        print("before training: " + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items()), flush=True)
    start_time, window = time.time(), []
    policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for step in range(state.get("step", 0) + 1, num_steps + 1):
        t_step = time.time()
        idx = draws[(step - 1) * args.batch_size: step * args.batch_size]
        q, qm, r, rm = (t.to(device) for t in trim(*[t[idx] for t in rows]))
        ref = ref_logprobs[idx][:, :r.shape[1]].to(device)
        logprobs = common.forward_logprobs(policy, q, qm, r, rm)
        # ALGO LOGIC: the chosen variant's loss, ALGORITHMS.md §8; one optimiser step per batch
        loss = alol_loss(args.algorithm, logprobs, ref, rm, rewards[idx].to(device), advantages[idx].to(device),
                         args.clip, args.kl_beta)
        policy.backward(loss)
        policy.step()
        log_ratio = ((logprobs.detach() - ref) * rm).sum(1)  # log π_θ(y|x) − log π_ref(y|x) of the data responses
        metrics = {"policy/loss": loss.item(), "policy/seq_log_ratio_to_ref": log_ratio.mean().item(),
                   "policy/ratio_clipped_fraction": ((log_ratio.exp() - 1).abs() > args.clip).float().mean().item()}
        window.append([time.time() - t_step, rm.sum().item() * world_size])
        metrics = common.mean_across_ranks(metrics)
        common.check_finite(metrics, step, resume_path)  # before evaluating (decoding) from NaN weights
        if step % args.eval_every == 0 or step == num_steps:
            seconds, tokens = torch.tensor(window).sum(0).tolist()
            eval_history.append((step, evaluate()))
            metrics.update({**eval_history[-1][1], "time/steps_per_s": len(window) / seconds,
                            "time/tokens_per_s": tokens / seconds})
            window = []
        metrics["policy/learning_rate"] = common.current_lr(policy)  # of the next step (--lr-schedule)
        log(step, metrics)
        if rank == 0 and "eval/reward" in metrics:
            gold = f" gold {metrics['eval/gold_score']:+.3f}" if gold_score else ""
            print(f"step {step:5d}/{num_steps} loss {metrics['policy/loss']:.4f} log-ratio to ref "
                  f"{metrics['policy/seq_log_ratio_to_ref']:+.3f} eval reward {metrics['eval/reward']:.3f}{gold} "
                  f"distinct-2 {metrics['eval/distinct_2']:.3f} steps/s {metrics['time/steps_per_s']:.1f} "
                  f"tokens/s {metrics['time/tokens_per_s']:.0f}", flush=True)
        if (signum := stop_requested()) or (args.save_every and step % args.save_every == 0):
            common.save_resume(resume_path, "alol.py", step, engines, dict(step=step, eval_history=eval_history),
                               args, run_dir, rank)
        if signum:
            common.exit_after_signal(signum, resume_path, "alol.py", rank)

    common.save_hf(policy, tokenizer, os.path.join(run_dir, "policy"), rank)
    if rank == 0:
        first, final = eval_history[0][1], eval_history[-1][1]
        print(f"done in {time.time() - start_time:.0f} s; held-out before → after: " + ", ".join(
            f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in first) + f"; policy saved to {run_dir}/policy")
    common.exit_cleanly()
