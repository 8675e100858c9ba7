"""ILQL: Implicit Language Q-Learning (Snell, Kostrikov, Su, Yang, Levine 2022; arXiv 2206.11871), offline RL from
scored responses, decoded with the learned advantage. Math: ../shared/ALGORITHMS.md §7.

Value heads on the language model's last hidden state learn Q(s, a) and V(s) from a fixed dataset: V is an expectile
of the target Q (so it approaches max_a Q over actions the data supports, without querying unseen actions), and Q is
regressed on r + γ V(s'). At decoding time the LM's log-probabilities are shifted by β · (Q − V):
    log π_β(a|s) = log π(a|s) + β · (min_i Q̂_i(s, a) − V(s))      (ILQL eq. 6, ALGORITHMS.md §7)

    python ilql.py                                            # the built-in scored responses, one CPU process
    python ilql.py --eval-only --checkpoint runs/RUN/policy   # decode a saved model over a β sweep
    torchrun --nproc_per_node 2 ilql.py --zero-stage 2        # two processes (CPU or GPUs)
"""
import copy
import inspect
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import common
from common import masked_mean


@dataclass
class Args:
    exp_name: str = "ilql"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (rank r shuffles and samples with seed + r)"""
    output_dir: str = "runs"
    """folder for TensorBoard logs, metrics.jsonl and checkpoints"""
    model_name_or_path: str = "builtin"
    """the starting (SFT) language model: a hub name, a local folder, or `builtin`"""
    checkpoint: Optional[str] = None
    """an ilql.py checkpoint folder (policy + ilql_heads.safetensors) to start from instead of fresh heads"""
    eval_only: bool = False
    """only evaluate --checkpoint over the β sweep, no training"""
    offline_dataset: str = "builtin"
    """{prompt, response, reward} or preference rows: a hub name, a folder, a .jsonl/.json/.parquet file, `builtin`"""
    offline_split: str = "train"
    """the split of --offline-dataset to train on"""
    reward_model: List[str] = field(default_factory=lambda: ["builtin"])
    """reward(s), summed: 1-output classifiers (hub name, folder, `builtin`) and/or `module:function` callables"""
    reward_weights: List[float] = field(default_factory=list)
    """weight of each --reward-model in the sum (default 1 each)"""
    dataset: str = "builtin"
    """held-out prompts for evaluation: a hub name, a folder, a .jsonl/.json/.parquet file, or `builtin`"""
    prompt_field: str = "prompt"
    """the column holding the prompt text (of --dataset, and of --offline-dataset rows)"""
    chat_template: bool = False
    """render each prompt with the policy tokenizer's chat template, the assistant turn opened: HH dialogues become
    user / assistant messages, a `messages` column is read as it is; without it prompts stay raw text"""
    response_field: str = "response"
    """the column of --offline-dataset rows holding the response text"""
    reward_field: str = "reward"
    """the column of --offline-dataset rows holding the scalar reward"""
    eval_split: str = "test"
    """the split of --dataset used for evaluation"""
    trust_remote_code: bool = False
    """allow model repositories to run their own code (off unless you trust them)"""
    gamma: float = 0.99
    """discount γ of the Q target r + γ V(s') (released HH: 0.99)"""
    tau: float = 0.7
    """expectile τ of the V loss; τ > 0.5 pushes V towards the best supported action (released HH 0.6, trlx 0.7)"""
    cql_scale: float = 0.1
    """weight of the CQL term: cross-entropy of the Q heads' logits against the data's tokens (released 0.1)"""
    awac_scale: float = 1.0
    """weight of the AWAC term that trains the LM head (released 1)"""
    beta_train: float = 0.0
    """AWAC weight exp(β_train (Q − V)); 0 = plain likelihood of the data (released 0)"""
    alpha: float = 0.2
    """Polyak rate of the target Q heads, tQ ← α Q + (1 − α) tQ (released 1e-4 over ~10⁴ steps; short runs need more)"""
    steps_for_target_q_sync: int = 1
    """update the target Q heads every this many optimiser steps (released 1)"""
    epochs: int = 10
    """passes over the offline dataset"""
    batch_size: int = 16
    """rows per rank per optimiser step"""
    learning_rate: float = 1e-3
    """learning rate of the LM and heads together (AdamW betas 0.9, 0.95; released HH 1e-6 for the 125M-6B models)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
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
    max_prompt_length: int = 16
    """prompts are left-truncated to this many tokens (and to what the context leaves after the response)"""
    max_new_tokens: int = 32
    """dataset responses are cut to this many tokens (EOS included); the longest decoded response"""
    stop_strings: List[str] = field(default_factory=list)
    """cut a response before the first of these strings in its text (HH: "Human:" "Assistant:")"""
    eval_betas: List[float] = field(default_factory=lambda: [0.0, 1.0, 4.0])
    """the β sweep of evaluation: logits' = log_softmax(logits) + β · (min_i tQ_i − V) (released β 1, 4)"""
    top_k: int = 20
    """top-k of decoding, after the β shift (released 20; 0 = off)"""
    temperature: float = 1.0
    """decoding temperature, after the β shift"""
    eval_prompts: int = 128
    """number of held-out prompts per evaluation, over all ranks"""
    eval_every: int = 5
    """evaluate every this many epochs, and before and after training"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 also runs without DeepSpeed installed)"""
    bf16: bool = False
    """train in bfloat16 (DeepSpeed) and hold the reward model in bfloat16; the target Q heads stay float32"""
    offload: bool = False
    """offload optimizer states (and ZeRO-3 parameters) to CPU"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass instead of keeping them: less memory for about a
    third more compute, in the update's forward passes only"""
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = None
    """the attention kernel of every model loaded (default: transformers' choice, sdpa where the model has it)"""
    lora_r: int = 0
    """rank r of a LoRA adapter trained in place of the LM's weights (0: no adapter, the weights train); the V and
    Q heads always train in full"""
    lora_alpha: float = 16.0
    """LoRA's scale α: an adapted layer computes W x + (α / r) · B A x"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input, in the update's forward passes"""
    lora_target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """the layers that get an adapter, by name (e.g. q_proj v_proj); all-linear: every linear layer but the output
    head (as QLoRA and the A-LoL paper did)"""
    load_in_4bit: bool = False
    """hold the frozen base weights in 4-bit NF4 (QLoRA): needs --lora-r, a CUDA GPU, bitsandbytes, --zero-stage 0"""
    reward_device: str = "policy"
    """where the reward model lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""
    reward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the reward model's weights: auto = bfloat16 with --bf16, else float32; float16 for a reward model trained in
    fp16 (GPU)"""
    log_every: int = 10
    """print a progress line every this many steps"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many steps (0: only when stopped by SIGTERM /
    Ctrl-C); the final model and heads are written to {run dir}/policy"""
    resume: Optional[str] = None
    """continue a stopped run from its checkpoint folder (runs/RUN_NAME/resume), with the same arguments"""
    local_rank: int = 0
    """set by the `deepspeed` launcher; the rank is read from the environment"""


def mlp(hidden: int, out: int):
    """The heads' shape in the released code: Linear(h, 2h) → ReLU → Linear(2h, out)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLModel(nn.Module):
    """The LM plus V and two Q heads on its last hidden state, one module so one DeepSpeed engine trains, shards and
    checkpoints them together. The target Q heads are kept apart (float32, no optimiser): see polyak_update."""

    def __init__(self, lm, n_q: int = 2):
        super().__init__()
        hidden, vocab = lm.config.get_text_config().hidden_size, lm.get_output_embeddings().out_features
        self.lm, self.v_head = lm, mlp(hidden, 1)
        self.q_heads = nn.ModuleList(mlp(hidden, vocab) for _ in range(n_q))

    def forward(self, input_ids, attention_mask, position_ids, keep: int):
        """(LM logits [B, K, vocab], last hidden state [B, K, h], V [B, K], Q [n_q, B, K, vocab]) at the last K = `keep`
        positions only (the states of the response): no vocabulary-wide head runs over the prompt."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False, **self.keep_logits(keep))
        hidden = out.hidden_states[-1][:, -keep:]  # after the final norm: what the LM head reads
        logits = out.logits[:, -keep:]  # remote code without `logits_to_keep`: all positions, cut here
        heads_in = hidden.to(self.v_head[0].weight.dtype)  # float32 heads on a 4-bit LM's half-precision states
        return logits, hidden, self.v_head(heads_in).squeeze(-1), torch.stack([q(heads_in) for q in self.q_heads])

    def keep_logits(self, keep: int) -> dict:
        """`logits_to_keep` for the LM's forward where it takes it: the LM head on the last `keep` positions only."""
        forward = common.hf_model(self.lm).forward
        return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(forward).parameters else {}


# ALGO LOGIC: the four ILQL loss terms, ALGORITHMS.md §7 (ILQL eq. 1-5)
def ilql_loss(logits, q_logits, target_q_logits, values, actions, rewards, mask, gamma, tau, cql_scale, awac_scale,
              beta_train):
    """ILQL's loss over the response tokens. For T response positions, states s_0..s_T (s_t = prompt + y_<t):
      logits           [B, T, vocab]       the LM's logits at s_t
      q_logits         [n_q, B, T, vocab]  Q_i(s_t, ·), with grad
      target_q_logits  [n_q, B, T, vocab]  the target heads' Q̂_i(s_t, ·) (no grad)
      values           [B, T + 1]          V(s_0..s_T); V(s_{t+1}) counts only where token t+1 is real (0 = terminal)
      actions          [B, T] long         y_t;  rewards [B, T]: r_t (the reward on the last token);  mask [B, T]
    Returns (loss, stats): loss = loss_q + loss_v + cql_scale · loss_cql + awac_scale · loss_awac."""
    mask = mask.float()
    v, next_v = values[:, :-1].float(), values[:, 1:].float()
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)  # 0 after the last token: terminal
    q = q_logits.float().gather(-1, actions.expand(len(q_logits), -1, -1)[..., None]).squeeze(-1)  # Q_i(s_t, y_t)
    target_q = target_q_logits.float().gather(-1, actions.expand(len(q_logits), -1, -1)[..., None]).squeeze(-1)
    target_q = target_q.min(0).values.detach()  # tQ = min_i Q̂_i(s_t, y_t): the pessimistic target
    q_target = (rewards + gamma * next_v * next_mask).detach()  # r_t + γ V(s_{t+1}), V = 0 at the terminal
    loss_q = sum(masked_mean((q_i - q_target) ** 2, mask) for q_i in q)
    # expectile regression of V on tQ: weight τ where tQ > V and 1 − τ where tQ < V
    loss_v = masked_mean((tau - (target_q < v).float()).abs() * (target_q - v) ** 2, mask)
    # CQL: each Q head's logits as a softmax over the vocabulary, pushed towards the data's token
    ce = lambda z: F.cross_entropy(z.float().flatten(0, -2), actions.flatten(), reduction="none").view_as(mask)
    loss_cql = sum(masked_mean(ce(q_i), mask) for q_i in q_logits)
    # AWAC: the LM head's likelihood of the data, weighted by exp(β_train · advantage) (a constant weight)
    weights = torch.exp(beta_train * (target_q - v)).detach()
    loss_awac = masked_mean(ce(logits) * weights, mask)
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    stats = {"loss/q": loss_q.item(), "loss/v": loss_v.item(), "loss/cql": loss_cql.item(),
             "loss/awac": loss_awac.item(), "values/q": masked_mean(q.mean(0), mask).item(),
             "values/target_q": masked_mean(target_q, mask).item(), "values/v": masked_mean(v, mask).item()}
    return loss, stats


@torch.no_grad()
def polyak_update(target_heads, q_heads, alpha: float):
    """tQ ← α · Q + (1 − α) · tQ, parameter by parameter (ALGORITHMS.md §7); α = 1 copies Q."""
    for target, source in zip(target_heads.parameters(), q_heads.parameters()):
        target.mul_(1 - alpha).add_(source.detach().to(target.dtype), alpha=alpha)


class ILQLLogitsProcessor(LogitsProcessor):
    """logits' = log_softmax(logits) + β · (min_i tQ_i(s, ·) − V(s)) (ALGORITHMS.md §7), for `generate`: top-k and
    temperature then apply to the shifted logits. The state s is read from the LM head's input (the last hidden
    state), which a forward hook keeps at every decoding step; use the processor as a context manager."""

    def __init__(self, model, target_q_heads, beta: float):
        self.model, self.target_q_heads, self.beta, self.hidden = model, target_q_heads, beta, None

    def __enter__(self):
        keep = lambda module, inputs, output: setattr(self, "hidden", inputs[0][:, -1])
        self.hook = self.model.lm.get_output_embeddings().register_forward_hook(keep)
        return self

    def __exit__(self, *exc):
        self.hook.remove()

    def __call__(self, input_ids, scores):
        hidden = self.hidden.to(next(self.target_q_heads.parameters()))
        target_q = torch.stack([q(hidden) for q in self.target_q_heads]).min(0).values
        first, _, last = self.model.v_head  # applied without a module call: under ZeRO-3 the decode has gathered
        # the parameters, and a module call would start ZeRO-3's own fetch outside the LM's traced order (a hang)
        value = F.linear(F.relu(F.linear(self.hidden, first.weight, first.bias)), last.weight, last.bias)
        value = value.float().to(target_q.device)
        advantage = (target_q - value).to(scores.device)
        return F.log_softmax(scores.float(), -1) + self.beta * advantage


@torch.no_grad()
def generate(model, target_q_heads, query_ids, query_mask, generation_config, beta, zero3):
    """Sample with the β-shifted logits and the KV cache. Under ZeRO-3 the shards are gathered once for the whole
    decode, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    engine, model = model, getattr(model, "module", model)  # the ILQLModel inside a DeepSpeed engine
    with common.gathered_for_generation(engine, zero3), ILQLLogitsProcessor(model, target_q_heads, beta) as processor:
        out = model.lm.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config,
                                logits_processor=LogitsProcessorList([processor]), synced_gpus=zero3)
    return out[:, query_ids.shape[1]:]


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    return [tokenizer.decode(r[: int(n)], skip_special_tokens=False)
            for r, n in zip(response_ids.tolist(), response_mask.sum(1).tolist())]


def save_checkpoint(engine, target_q_heads, tokenizer, path: str, rank: int):
    """The LM as an HF folder (from_pretrained loads it) plus V, Q and target Q heads in ilql_heads.safetensors; an
    LM with a LoRA adapter is saved merged into its weights, and the adapter alone under `path`/adapter. Written
    aside and renamed: never half a checkpoint under `path`."""
    model = getattr(engine, "module", engine)
    if hasattr(engine, "zero_optimization_stage") and engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # a collective: every rank calls it
    else:
        state = model.state_dict()
    if rank == 0:
        shutil.rmtree(tmp := path.rstrip("/") + ".tmp", ignore_errors=True)
        lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        heads = {k: v.contiguous() for k, v in state.items() if not k.startswith("lm.")}
        heads.update({f"target_q_heads.{k}": v.contiguous() for k, v in target_q_heads.state_dict().items()})
        if common.peft_model(model.lm) is None:
            model.lm.save_pretrained(tmp, state_dict=lm_state)
        else:
            common.hf_model(model.lm).save_pretrained(tmp, state_dict=common.merged_state_dict(lm_state, model.lm))
            model.lm.save_pretrained(os.path.join(tmp, "adapter"), state_dict=lm_state)
        save_file(heads, os.path.join(tmp, "ilql_heads.safetensors"))
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.reward_weights and len(args.reward_weights) != len(args.reward_model):
        common.fail(f"--reward-weights has {len(args.reward_weights)} values for {len(args.reward_model)} "
                    f"--reward-model entries; give one weight per reward model")
    if args.eval_only and args.checkpoint is None:
        common.fail("--eval-only needs --checkpoint PATH (a folder written by ilql.py)")
    common.check_lora(args)
    rank, world_size, device = common.init_distributed(args.zero_stage)
    if args.resume:
        common.check_resume(args.resume, "ilql.py")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    zero3 = args.zero_stage == 3

    if not args.eval_only:  # the data first: a dataset that cannot train fails before minutes of model loading
        prompts, responses, rewards = common.load_offline_rows(
            args.offline_dataset, args.offline_split,
            fields=dict(prompt=args.prompt_field, response=args.response_field, reward=args.reward_field))
        rows_per_rank = len(prompts) // world_size
        if rows_per_rank < args.batch_size:
            common.fail(f"the offline dataset has {len(prompts)} rows, fewer than one batch of {args.batch_size} on "
                        f"each of the {world_size} ranks; lower --batch-size")

    # Seeding: the model and heads are created under one seed, so that they agree across ranks; shuffling and
    # sampling then use seed + rank.
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    source = args.checkpoint or args.model_name_or_path
    flag = "--checkpoint" if args.checkpoint else "--model-name-or-path"
    tokenizer = common.load_tokenizer(source, flag, trust_remote_code=args.trust_remote_code)
    lm = common.load_model(
        source,
        "causal",
        flag,
        dtype="bfloat16" if args.bf16 else "float32",  # DeepSpeed keeps float32 master weights under bf16
        trust_remote_code=args.trust_remote_code,
        attn_implementation=args.attn_implementation,
        # under ZeRO-3 the LM is loaded shard by shard: no rank ever holds a whole copy
        sharded=common.zero3_config("policy", args.zero_stage, args.batch_size, args.bf16, args.offload),
        load_in_4bit=args.load_in_4bit,
    )
    common.freeze_lower_layers(lm, args.unfrozen_layers)
    common.gradient_checkpointing(lm, args.gradient_checkpointing)
    lm = common.add_lora(lm, "causal", r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                         target_modules=args.lora_target_modules, quantized=args.load_in_4bit)
    model = ILQLModel(lm)  # the heads always train
    target_q_heads = copy.deepcopy(model.q_heads).float().requires_grad_(False)  # tQ starts as Q
    if args.checkpoint:
        heads_file = os.path.join(args.checkpoint, "ilql_heads.safetensors")
        if not os.path.exists(heads_file):
            common.fail(f"{heads_file} is missing: --checkpoint must be a folder written by ilql.py")
        heads = load_file(heads_file)
        missing, unexpected = model.load_state_dict({k: v for k, v in heads.items()
                                                     if not k.startswith("target_q_heads.")}, strict=False)
        if unexpected or any(not k.startswith("lm.") for k in missing):
            missing = [k for k in missing if not k.startswith("lm.")]
            common.fail(f"{heads_file} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"pass the --checkpoint written by ilql.py for this model")
        target_q_heads.load_state_dict({k[len("target_q_heads."):]: v for k, v in heads.items()
                                        if k.startswith("target_q_heads.")})
    context = model.lm.config.max_position_embeddings
    log = common.make_logger(args, run_name, rank)

    # Placement: the LM + heads are one DeepSpeed engine on this rank's device; the target Q heads are a float32
    # copy on the same device (Polyak steps of α ~ 1e-4 would vanish in bf16); the reward models, used only to
    # score evaluations, are frozen on `policy` (sharded under ZeRO-3), `cpu` or `cuda:N`.
    model.lm.generation_config.pad_token_id = tokenizer.pad_token_id
    # The learning-rate schedule counts optimiser steps; the decay ends at the last one (--eval-only takes none and
    # reads no rows).
    total_steps = 0 if args.eval_only else args.epochs * (rows_per_rank // args.batch_size)
    schedule = common.lr_schedule(args.lr_warmup_steps, total_steps, args.lr_schedule)
    model = common.prepare_trainable(model, "policy", args.zero_stage, args.batch_size, args.learning_rate,
                                     args.bf16, args.offload, args.max_grad_norm,
                                     args.adam_betas, args.weight_decay, schedule=schedule)
    model.eval()  # eval mode (decoding); the training loop switches to train mode
    target_q_heads = target_q_heads.float().to(device)
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [common.load_reward(name, tokenizer, args.reward_device, args.zero_stage, args.batch_size, args.bf16,
                                     args.trust_remote_code, args.reward_dtype) for name in args.reward_model]
    generation_config = GenerationConfig(do_sample=True, top_k=args.top_k, temperature=args.temperature,
                                         max_new_tokens=args.max_new_tokens, use_cache=True,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    encode = dict(max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens, context=context,
                  chat_template=args.chat_template)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size  # equal per rank: lockstep
    if n_eval == 0:
        common.fail(f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another "
                    f"--eval-split or raise --eval-prompts")
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None

    def evaluate():
        """Held-out prompts decoded at every β of the sweep, one fixed seed: proxy reward, gold score, length."""
        metrics = {}
        model.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for beta in args.eval_betas:
                torch.manual_seed(10**6 + rank)  # the same draws at every β: differences come from β alone
                rows = []
                for i in range(0, len(eval_prompts), 64):
                    query_ids, query_mask = common.pad_left(eval_prompts[i:i + 64], tokenizer.pad_token_id, device)
                    response_ids = generate(model, target_q_heads, query_ids, query_mask, generation_config, beta,
                                            zero3)
                    response_ids, mask, ended = common.truncate_after_eos(response_ids, tokenizer.eos_token_id,
                                                                          tokenizer.pad_token_id, tokenizer,
                                                                          args.stop_strings)
                    scores = sum(w * reward(query_ids, query_mask, response_ids, mask, eval_texts[i:i + 64])
                                 for w, reward in zip(reward_weights, reward_fns))
                    texts = decode_responses(tokenizer, response_ids, mask)
                    rows.append(torch.stack([scores, mask.sum(1).float().cpu(), (~ended).float().cpu(),
                                             torch.tensor(gold_score(texts) if gold_score else [0.0] * len(texts))],
                                            1))
                means = torch.cat(rows).mean(0).tolist()
                names = ["reward", "response_length", "no_eos_fraction"] + (["gold_score"] if gold_score else [])
                metrics.update({f"eval/beta_{beta:g}/{k}": v for k, v in zip(names, means)})
        model.train()
        return common.mean_across_ranks(metrics)

    def report(prefix, metrics):
        if rank == 0:
            key = "gold_score" if gold_score else "reward"
            print(prefix + ", ".join(f"β={b:g}: {key} {metrics[f'eval/beta_{b:g}/{key}']:+.3f}"
                                     for b in args.eval_betas), flush=True)

    if args.eval_only:
        report(f"{args.checkpoint}: ", metrics := evaluate())
        log(0, metrics)
        common.exit_cleanly()
        raise SystemExit(0)

    # Data: scored responses, EOS appended, the z-scored reward on the last token (ALGORITHMS.md §7).
    rewards = torch.tensor(rewards[: rows_per_rank * world_size], dtype=torch.float32)
    rewards = (rewards - rewards.mean()) / (rewards.std() + 1e-8)  # z-scored over the whole dataset
    mine = list(range(rank, rows_per_rank * world_size, world_size))
    query_rows, _ = common.encode_prompts(tokenizer, [prompts[i] for i in mine], **encode)
    eos = tokenizer.eos_token
    texts = [responses[i].replace(eos, "").rstrip() if eos else responses[i] for i in mine]
    response_rows = [ids[: args.max_new_tokens - 1] + [tokenizer.eos_token_id]  # EOS appended to every response
                     for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    query_ids, query_mask = common.pad_left(query_rows, tokenizer.pad_token_id, device)
    width = max(len(r) for r in response_rows)
    response_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in response_rows],
                                device=device)
    response_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in response_rows], device=device)
    token_rewards = torch.zeros_like(response_mask)
    token_rewards[torch.arange(len(mine)), response_mask.sum(1).long() - 1] = rewards[mine].to(device)
    if gold_score and args.offline_dataset == common.BUILTIN:  # the data's own gold score: the bar to clear
        data_gold = common.mean_across_ranks({"data/gold_score": sum(g := gold_score(
            [responses[i] for i in mine])) / len(g)})
    else:
        data_gold = {}

    shuffler = torch.Generator().manual_seed(args.seed + rank)
    steps_per_epoch, step, start_time = rows_per_rank // args.batch_size, 0, time.time()
    # Checkpoints: `resume/` holds all a run needs to go on as if never stopped: the engine (LM and heads) with its
    # optimizer, the target Q heads, the step, each rank's RNG and its shuffler's state at the start of the epoch.
    engines, resume_path, stop_requested = {"model": model}, os.path.join(run_dir, "resume"), common.stop_signals()
    first_epoch, skip = 1, 0
    if args.resume:
        state = common.load_resume(args.resume, engines, rank)
        step, eval_history = state["step"], state["eval_history"]
        target_q_heads.load_state_dict(state["target_q_heads"])
        shuffler.set_state(state["epoch_shuffler"])
        first_epoch = (step - 1) // steps_per_epoch + 1  # the epoch of the saved step; its batches before it skipped
        skip = step - (first_epoch - 1) * steps_per_epoch
    else:
        eval_history = [(0, {**evaluate(), **data_gold})]
        log(0, eval_history[-1][1])
    report(f"{run_name}: {world_size} rank(s), {len(prompts)} rows; before training: ", eval_history[0][1])
    model.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for epoch in range(first_epoch, args.epochs + 1):
        t0, n_tokens, epoch_shuffler = time.time(), 0, shuffler.get_state()
        order = torch.randperm(rows_per_rank, generator=shuffler)[: steps_per_epoch * args.batch_size]
        for idx in order.split(args.batch_size)[skip:]:
            ids, mask, pos = common.concat_inputs(query_ids[idx], query_mask[idx], response_ids[idx],
                                                  response_mask[idx], device)
            # state s_t (before response token t) sits at position P−1+t; s_T, after the last column, at P−1+T: the
            # model's heads run on these T + 1 positions only, and V(s_0..s_T) is `values` whole
            logits, hidden, values, q_logits = model(ids, mask, pos, keep=response_ids.shape[1] + 1)
            states = slice(0, -1)  # s_0..s_{T-1}: the states where a response token is chosen
            with torch.no_grad():
                target_q_logits = torch.stack([q(hidden[:, states].float()) for q in target_q_heads])
            # ALGO LOGIC: loss = Q + expectile V + cql_scale · CQL + awac_scale · AWAC (ALGORITHMS.md §7)
            loss, stats = ilql_loss(logits[:, states], q_logits[:, :, states], target_q_logits, values,
                                    response_ids[idx], token_rewards[idx], response_mask[idx], args.gamma, args.tau,
                                    args.cql_scale, args.awac_scale, args.beta_train)
            model.backward(loss)
            model.step()
            step += 1
            if step % args.steps_for_target_q_sync == 0:
                q_heads = getattr(model, "module", model).q_heads
                gather = common.deepspeed.zero.GatheredParameters(list(q_heads.parameters())) if zero3 \
                    else nullcontext()
                with gather:
                    polyak_update(target_q_heads, q_heads, args.alpha)
            n_tokens += int(response_mask[idx].sum()) * world_size
            stats = common.mean_across_ranks(stats)
            common.check_finite(stats, step, resume_path)
            if step % args.log_every == 0:
                stats["time/tokens_per_s"] = n_tokens / (time.time() - t0)
                stats["policy/learning_rate"] = common.current_lr(model)  # of the next step (--lr-schedule)
                log(step, stats)
                if rank == 0:
                    print(f"epoch {epoch} step {step:5d} q {stats['loss/q']:.4f} v {stats['loss/v']:.4f} "
                          f"cql {stats['loss/cql']:.3f} awac {stats['loss/awac']:.3f} V {stats['values/v']:+.3f} "
                          f"tokens/s {stats['time/tokens_per_s']:.0f}", flush=True)
            if (signum := stop_requested()) or (args.save_every and step % args.save_every == 0):
                common.save_resume(resume_path, "ilql.py", step, engines, dict(
                    step=step, eval_history=eval_history, target_q_heads=target_q_heads.state_dict(),
                    epoch_shuffler=epoch_shuffler), args, run_dir, rank)
            if signum:
                common.exit_after_signal(signum, resume_path, "ilql.py", rank)
        skip = 0
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            eval_history.append((step, evaluate()))
            log(step, eval_history[-1][1])
            report(f"epoch {epoch}/{args.epochs}: ", eval_history[-1][1])

    save_checkpoint(model, target_q_heads, tokenizer, os.path.join(run_dir, "policy"), rank)
    if rank == 0:
        first, final = eval_history[0][1], eval_history[-1][1]
        print(f"done in {time.time() - start_time:.0f} s; held-out before → after: " + ", ".join(
            f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in final) + f"; saved to {run_dir}/policy")
    common.exit_cleanly()
