"""A-LoL: Advantage-Leftover-Lunch RL and its baselines, offline, on {prompt, response, reward} rows.

Paper: Baheti, Lu, Brahman, Le Bras, Sap, Riedl, "Leftover Lunch: Advantage-based Offline Reinforcement Learning for
Language Models", ICLR 2024, arXiv 2305.14718. Released code: https://github.com/abaheti95/LoL-RL

The algorithm, in the paper's notation. The whole response y to a prompt x is ONE action, scored by a sequence-level
reward R(x, y) (here: Σ_i w_i · transform(r_i) over the --reward-fields, sigmoid of reward-model logits as in the
paper's HH setting). π_ref is the starting (SFT) policy, frozen; π_θ starts as a copy of it. Training rows come from a
fixed dataset D_tr, never from π_θ.

- Offline policy gradient with an importance weight: sampling y from the data instead of π_θ, the policy gradient
  E_{y~π_θ}[R ∇ ln π_θ(y|x)] becomes E_{(x,y)~D_tr}[R · π_θ(y|x)/π_ref(y|x) · ∇ ln π_θ(y|x)] (the data's responses
  taken as π_ref's). A-LoL replaces R by the reference policy's advantage A_πref = R(x, y) − V_πref(x):
      ∇J(θ) = E_{D_tr}[ A_πref(x, y) · π_θ(y|x)/π_ref(y|x) · ∇ ln π_θ(y|x) ],
  the equation the released README shows (images/A_LoL_eq.png). Rows with A_πref ≤ 0 are never trained on.
- V_πref(x): a value head on π_ref's frozen last hidden states of the prompt, fitted (MSE) to the reward of π_ref's
  own greedy responses on held-out prompts. A_πref is computed once, before training.
- The importance weight is clipped: clip(π_θ(y|x)/π_ref(y|x), 1 − ε, 1 + ε) (a plain clamp, no PPO min), treated as a
  constant (no gradient through it), ε = --cliprange.
- Variants of the weight: A-LoL ref-free (weight 1), A-LoL seq (a clipped per-token weight π_θ(y_t)/π_ref(y_t) on
  each token's log-likelihood), A-LoL KL (weight 1 and a penalty β · (ln π_θ(y|x) − ln π_ref(y|x)), β = --kl-coef).
- Baselines: NLL (behaviour cloning), weighted BC (wBC: NLL · R), R-LoL (R in place of A_πref), R-GOLD (Pang & He,
  "Text Generation by Learning from Demonstrations", ICLR 2021, arXiv 2009.07839: a per-token weight max(π_θ(y_t), u),
  u = 0.1, times R).
- Priority sampling: rows are drawn i.i.d. with probability ∝ A_πref⁺ (∝ R for wBC, R-GOLD, R-LoL), and the number
  of steps is scaled by the fraction of rows with a positive weight.
The paper numbers these equations; this file names them instead (the numbers were not checked against the paper).
The main block numbers the run's steps: 1-3 once, before training (compute_advantages: V_πref's targets, its fit,
A_πref of every row), then 4-6 at each training step (the priority-sampled rows, the loss, the optimiser step).

Where this file differs from the released HH script (lolrl_qlora_llama_hh.py at commit 9f8d816, "released" below):
- A-LoL KL is its own --algorithm: the released dispatch has no a_lol_kl branch; its KL term lives inside a_lol
  behind kl_beta > 0 with ppo_clip = 0:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L880-L886
- V_πref scores the rows with its dropout off; released, the value head is put in train mode and never back:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L193
- V_πref keeps the epoch with the lowest MSE on held-out prompts; released, the lowest training loss:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L237-L241
- V_πref and A_πref (of every row: priority sampling draws from all) are cached under a key of everything they depend
  on, π_ref's log-probs per row and of the rows drawn only; released, a pickle is reused whatever changed:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L520-L528
As in the released code (same commit):
- the learning rate constant from step 1: the released script sets 300 warm-up steps, but transformers'
  get_scheduler("constant") takes none (see the HH preset below):
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L635-L636
- the sequence weight from summed token log-probs, clamped to [1 − ε, 1 + ε]:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L869-L875
- A-LoL seq's clamped per-token weights, summed over the response:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L929-L939
- R-GOLD's floor u = 0.1 on π_θ(y_t):
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L781
- priority weights A⁺, and the step count scaled by the positive fraction:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py#L585-L596
- the value head: attention pooling of the prompt's hidden states, sigmoid output:
  https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/utils/rl_utils.py#L452

    python alol.py                                                  # A-LoL on the built-in scored SFT responses
    python alol.py --algorithm a_lol_seq --reward-transform none    # per-token weights, raw reward-model logits
    torchrun --nproc_per_node 2 alol.py --zero-stage 3              # two processes (CPU or GPUs)
    python alol.py --preset hh-1b --reward-device cuda:1            # the paper's HH setting on Pythia 1B (GPUs)
"""

import copy
import functools
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import datasets
import torch
import torch.distributed as dist
from transformers import GenerationConfig

import common
from common import Batch

CACHE_VERSION = 4  # raise when what the cache holds, or how it is computed, changes


# The math: A-LoL's eight losses, priority sampling, the value head V_πref and its fit;
# functions of tensors, each unit-tested.
ALGORITHMS = ("nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")


REWARD_WEIGHTED = ("wbc", "r_gold", "r_lol")  # weighted (and priority-sampled) by R rather than by A_πref


class ALoLLoss(NamedTuple):
    loss: torch.Tensor  # the batch mean of the chosen variant's per-sequence loss (with grad)
    log_ratio_to_ref: torch.Tensor  # mean of log π_θ(y|x) − log π_ref(y|x) over the batch (no grad)
    clipfrac: torch.Tensor  # fraction of sequences whose weight π_θ(y|x)/π_ref(y|x) lies outside [1 − ε, 1 + ε]


def alol_loss(
    *,
    algorithm: str,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    scores: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float = 0.9,
    kl_coef: float = 0.001,
    gold_floor: float = 0.1,
) -> ALoLLoss:
    """A-LoL's offline policy-gradient losses and their baselines, one per --algorithm: minimising
    −(weight · ln π_θ(y|x)) gives the paper's gradient A_πref · π_θ(y|x)/π_ref(y|x) · ∇ ln π_θ(y|x) (A-LoL's main
    equation) when the weight is held constant. `logprobs` (with grad) and `ref_logprobs` are per-token
    [batch, response_len], `response_mask` 1 on response tokens; `scores` R and `advantages` A_πref are [batch].
    Every importance weight and R-GOLD weight is computed without gradient. Padding may hold anything, even inf."""
    real = response_mask.bool()
    lp = torch.where(real, logprobs, torch.zeros_like(logprobs))
    ref = torch.where(real, ref_logprobs, torch.zeros_like(ref_logprobs))
    seq_nll = -lp.sum(1)  # S = Σ_t −ln π_θ(y_t|x, y_<t) = −ln π_θ(y|x)
    ref_nll = -ref.sum(1)  # S_ref, the same under π_ref
    a_plus = advantages.clamp(min=0)  # A-LoL: A_πref⁺ = max(R − V_πref(x), 0), rows with A ≤ 0 get no weight
    weight = torch.exp(ref_nll - seq_nll).detach()  # importance weight π_θ(y|x) / π_ref(y|x)
    clipped = weight.clamp(1 - cliprange, 1 + cliprange)  # A-LoL: the clipped importance weight (a plain clamp)
    if algorithm == "nll":
        per_sequence = seq_nll
    elif algorithm == "wbc":
        per_sequence = seq_nll * scores  # A-LoL's wBC baseline: NLL weighted by R
    elif algorithm == "r_gold":
        token_weight = lp.detach().exp().clamp(min=gold_floor)  # GOLD (Pang & He 2021): max(π_θ(y_t), u), no grad
        per_sequence = (-lp * token_weight).sum(1) * scores  # A-LoL's R-GOLD baseline: R in place of GOLD's return
    elif algorithm == "r_lol":
        per_sequence = seq_nll * clipped * scores  # A-LoL's R-LoL: R in place of A_πref
    elif algorithm == "a_lol":
        per_sequence = seq_nll * clipped * a_plus  # A-LoL: A_πref⁺ · clip(π_θ/π_ref) · (−ln π_θ(y|x))
    elif algorithm == "a_lol_ref_free":
        per_sequence = seq_nll * a_plus  # A-LoL ref-free: importance weight 1
    elif algorithm == "a_lol_seq":
        token_weight = torch.exp(lp - ref).detach().clamp(1 - cliprange, 1 + cliprange)  # π_θ(y_t)/π_ref(y_t)
        per_sequence = (-lp * token_weight).sum(1) * a_plus  # A-LoL seq: per-token clipped weights
    elif algorithm == "a_lol_kl":
        # Importance weight 1, plus β (S_ref − S) = β (ln π_θ(y|x) − ln π_ref(y|x)). Per row this is S·(A⁺ − β) +
        # const: where A⁺ < β the data's likelihood is pushed down, so β must be small next to A⁺.
        per_sequence = seq_nll * a_plus + kl_coef * (ref_nll - seq_nll)  # A-LoL KL
    else:
        raise ValueError(f"unknown A-LoL algorithm '{algorithm}'")
    log_ratio = (lp.detach() - ref).sum(1)  # ln π_θ(y|x) − ln π_ref(y|x) of the data responses
    clipfrac = ((log_ratio.exp() - 1).abs() > cliprange).float().mean()
    return ALoLLoss(loss=per_sequence.mean(), log_ratio_to_ref=log_ratio.mean(), clipfrac=clipfrac)


def priority_sampler(weights, num_draws, generator=None):
    """A-LoL's priority sampling: `num_draws` row indices drawn i.i.d. with probability ∝ max(weight, 0), so rows with
    weight ≤ 0 are never drawn (uniform sampling: all weights 1)."""
    positive = weights.double().clamp(min=0)
    if positive.sum() <= 0:
        raise ValueError("no row has a positive weight")
    return torch.multinomial(positive, num_draws, replacement=True, generator=generator)


class ValueHead(torch.nn.Module):
    """V_πref(x): attention pooling of π_ref's last hidden states of the prompt with a learned query (padding masked),
    then Linear → sigmoid, scaled into [lo, hi] (the released head: sigmoid · max_value, lo = 0)."""

    def __init__(self, width, lo, hi, dropout=0.1):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(width))  # zero query: a plain mean over the prompt at first
        self.dropout = torch.nn.Dropout(dropout)
        self.out = torch.nn.Linear(width, 1)
        self.lo = lo
        self.hi = hi

    def forward(self, hidden, query_mask):  # hidden [batch, prompt_len, width], query_mask [batch, prompt_len]
        real = query_mask.bool()
        hidden = torch.where(real[..., None], hidden, torch.zeros_like(hidden))
        attention = (hidden @ self.query / hidden.shape[-1] ** 0.5).masked_fill(~real, float("-inf")).softmax(-1)
        pooled = (attention[..., None] * hidden).sum(1)
        return self.lo + (self.hi - self.lo) * torch.sigmoid(self.out(self.dropout(pooled))).squeeze(-1)


@torch.enable_grad()  # also when called under no_grad
def fit_value_head(
    hidden, query_mask, targets, *, lo, hi, epochs, lr, batch_size, seed, device="cpu", show_progress=False
):
    """V_πref fitted by MSE to `targets` (the reward of π_ref's own responses) on the first 90% of the prompts; the
    epoch with the lowest MSE on the last 10% is kept. Returns (head in eval mode: no dropout when scoring,
    held-out MSE per epoch). `show_progress`: a bar over the epochs (common.progress)."""
    torch.manual_seed(seed)  # same head, same dropout masks on every rank
    head = ValueHead(hidden.shape[-1], lo, hi).to(device)
    head.out.bias.data.fill_(torch.logit((targets.mean() - lo) / (hi - lo), eps=1e-4).item())  # start at the mean
    # torch's AdamW defaults (ε 1e-8, weight decay 0.01); the released script's head took transformers' AdamW (ε 1e-6,
    # no weight decay: lolrl_qlora_llama_hh.py L187)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    n_fit = max(1, int(0.9 * len(targets)))
    order = torch.Generator().manual_seed(seed)
    held = slice(n_fit, None) if n_fit < len(targets) else slice(0, n_fit)  # (fewer than 2 prompts: no held-out)

    def mse(part):
        predicted = head(hidden[part].to(device), query_mask[part].to(device))
        return ((predicted - targets[part].to(device)) ** 2).mean()

    history = []
    best = None
    for _ in common.progress(range(max(epochs, 1)), desc="V_ref fit", enabled=show_progress):
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


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    algorithm: str = "a_lol"
    """the loss: nll, wbc (weighted BC), r_gold, r_lol, a_lol, a_lol_ref_free, a_lol_seq, a_lol_kl"""
    cliprange: float = 0.9
    """ε: importance weights are clamped to [1 − ε, 1 + ε] (released ppo_clip 0.9)"""
    kl_coef: float = 0.001
    """β of a_lol_kl: S·A⁺ + β·(log π_θ − log π_ref); keep it below the typical A⁺, or rows are unlearned"""
    sampling: Literal["good_priority", "uniform"] | None = None
    """row sampling: i.i.d. ∝ max(A, 0) (∝ R for wbc, r_gold, r_lol) or uniform; default good_priority, nll uniform"""
    total_steps: int = 300
    """optimisation steps before good_priority scales them by the fraction of rows with positive weight"""
    scale_steps: bool = True
    """good_priority: scale --total-steps by the fraction of rows with positive weight (as released); off: exactly
    --total-steps, for comparisons at an equal number of steps"""
    max_grad_norm: float = 0.3
    """global gradient-norm clip (released: 0.3)"""
    adam_eps: float = 1e-8
    """AdamW's ε, added to √v̂ in the update's denominator (released A-LoL HH: 1e-6)"""
    reward_transform: Literal["sigmoid", "none"] = "sigmoid"
    """applied to each raw score (data, π_ref's responses for V_ref, evaluation): sigmoid(logit), as in A-LoL HH"""
    value_prompts: int = 512
    """number of prompts for fitting V_ref; the last 10% are held out to choose the epoch"""
    value_epochs: int = 8
    """epochs of V_ref fitting; the one with the lowest held-out MSE is kept"""
    value_learning_rate: float = 1e-3
    """V_ref head learning rate (AdamW)"""
    value_batch_size: int = 32
    """prompts per V_ref step"""

    # Models and data
    model_name_or_path: str = "builtin"
    """the starting policy, which is also the frozen π_ref: a hub name, a local folder, or `builtin`"""
    reward_model: list[str] = field(default_factory=lambda: ["builtin"])
    """scorer of each reward field (one, or one per field): a 1-output classifier, module:function, URL or `gold`"""
    offline_dataset: str = "builtin"
    """training rows {prompt, response, reward columns} or preference rows {prompt, chosen, ...}: hub, path, builtin"""
    offline_split: str = "train"
    """the split of --offline-dataset trained on"""
    reward_fields: list[str] = field(default_factory=lambda: ["reward"])
    """columns summed into R; a column the rows lack is scored by its --reward-model (preference rows: the chosen)"""
    reward_weights: list[float] = field(default_factory=list)
    """weight of each reward field in R = Σ w_i · transform(r_i) (empty = all 1)"""
    dataset: str = "builtin"
    """prompts for fitting V_ref and for evaluation: a hub name, a save_to_disk folder, a .jsonl/.json file, builtin"""
    value_split: str = "test"
    """the split of --dataset whose prompts π_ref answers greedily to fit V_ref; prompts of training rows, and those
    evaluated, are left out"""
    forward_batch_size: int | None = None
    """rows per no-grad pass / generate call (V_ref, advantages, evaluation); default --micro-batch-size, or 64"""
    cache_dir: str | None = None
    """where V_ref and the advantages (of every row: priority sampling weighs them all) are cached, and π_ref's
    log-probs of the rows drawn, per row (default $ONEFILE_RLHF_CACHE/alol or ~/.cache/onefile-rlhf/alol)"""
    no_cache: bool = False
    """recompute V_ref, the advantages and π_ref's log-probs of the rows drawn even when cached (and overwrite them)"""

    # Devices and precision
    lora_r: int = 0
    """rank r of a LoRA adapter trained in place of the policy's weights (0: no adapter, the weights train).
    π_ref is then the policy with its adapter switched off: no second copy of the model"""
    ref_device: str = "policy"
    """where π_ref lives while V_ref and advantages are computed: `policy` (sharded with ZeRO-3), `cpu` or `cuda:N`"""

    # Logging and checkpoints
    exp_name: str = "alol"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (V_ref is fitted under this seed on every rank; rank r draws batches with seed + r)"""
    eval_every: int = 100
    """evaluate on held-out prompts (and print a progress line) every this many steps, and before and after"""


# The paper's HH setting (A-LoL paper, HH experiments; released lolrl_qlora_llama_hh.py at commit 9f8d816): 16
# sequences a step (4 × 4 accumulation steps, L55-L56), 9000 steps (L76), lr 2e-4 (L49) constant (L52, L636:
# transformers' get_scheduler("constant") takes no warm-up), bitsandbytes' paged AdamW (L44, L632-L634) with betas
# (0.9, 0.999) and ε 1e-6 (L45-L47) and its own weight decay 0.01 (the script's weight_decay, L48, never reaches the
# optimiser; see dpo.py's HH preset for the library lines), gradient clip 0.3 (L50), prompts cut to 768 − 128 tokens
# (L70, L218), greedy evaluation on 280 test prompts, R = sigmoid(OpenAssistant RM logit). The released run goes on
# training the SFT adapter it loads (timdettmers/qlora-hh-rlhf-7b on 4-bit LLaMA-7B, L42, L411); its lora_r /
# lora_alpha / lora_dropout fields (L65-L67) are never read. Here a fresh adapter (r 64, α 16, dropout 0.05: the
# values of those unread fields, every linear layer) on Dahoas' Pythia SFT policies, 16-bit base weights (add
# --load-in-4bit on a GPU for QLoRA). Devices (--reward-device) are chosen by launch.sh.
# https://github.com/abaheti95/LoL-RL/blob/9f8d81660bfa0bad17ae5d7835185987f028812e/lolrl_qlora_llama_hh.py
HH = dict(
    offline_dataset="Anthropic/hh-rlhf",  # HH transcripts; the RM scores their chosen replies
    dataset="Anthropic/hh-rlhf",
    eval_split="test",
    eval_prompts=280,
    max_prompt_length=640,  # released: 768 − 128
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    bf16=True,
    lora_r=64,
    lora_alpha=16.0,
    lora_dropout=0.05,
    lora_target_modules=["all-linear"],
    reward_model=["OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5"],  # the A-LoL paper's train / validation RM
    reward_transform="sigmoid",
    mini_batch_size=16,
    total_steps=9000,
    learning_rate=2e-4,
    adam_betas=(0.9, 0.999),
    adam_eps=1e-6,
    weight_decay=0.01,
    max_grad_norm=0.3,
    # V_ref's head as the released script fits it (lolrl_qlora_llama_hh.py L187: AdamW at 1e-5; L109: 10 epochs;
    # L61 and L206: batches of 16 prompts)
    value_learning_rate=1e-5,
    value_epochs=10,
    value_batch_size=16,
)
PRESETS = {
    f"hh-{size}": dict(HH, model_name_or_path=f"Dahoas/pythia-{name}-static-sft")
    for size, name in [("125m", "125M"), ("1b", "1B"), ("6b", "6B")]
}


class Prompts(NamedTuple):
    """Prompts to answer: V_πref's held-out prompts, or those evaluated."""

    ids: list  # each prompt's token ids, unpadded (common.encode_prompts)
    texts: list  # the prompts as the dataset gave them (text or chat messages): the reward models read them


class Reward(NamedTuple):
    """A-LoL's sequence-level reward R(x, y) = Σ_i w_i · transform(r_i) over the --reward-fields."""

    scorer_names: list  # the scorer of each field: a --reward-model entry, or `gold` (the built-in task's gold score)
    scorers: dict  # a model or module:function per distinct --reward-model entry but `gold`
    weights: torch.Tensor  # w_i, [fields]
    transform: str  # --reward-transform, applied to each raw score r_i: "sigmoid" or "none"
    tokenizer: object  # decodes the responses that the gold score reads


class Decoding(NamedTuple):
    """Greedy decoding, as π_ref answers V_πref's prompts and as the policy is evaluated."""

    tokenizer: object
    generation_config: GenerationConfig
    stop_strings: list  # --stop-strings: a response is cut at the first


@torch.no_grad()
def prompt_hidden(ref_policy, query_ids, query_mask, device):
    """π_ref's last-layer hidden states of left-padded prompts, in float on `device`: what V_πref reads."""
    query_ids = query_ids.to(ref_policy.device)
    query_mask = query_mask.to(ref_policy.device)
    position_ids = (query_mask.cumsum(1) - 1).clamp(min=0)
    hidden = common.last_hidden(ref_policy, ids=query_ids, mask=query_mask, position_ids=position_ids)
    return hidden.float().to(device)


@torch.no_grad()
def value_targets(ref_policy, prompts: Prompts, *, reward: Reward, decoding: Decoding, zero3, args, device):
    """Step 1: V_πref's targets, the reward of π_ref's own greedy responses to the held-out `prompts`, and π_ref's
    hidden states of those prompts. Returns (targets [n], hidden [n, prompt_len, width], query_mask [n, prompt_len]),
    every prompt left-padded to one width."""
    value_ids, value_mask = common.pad_left(prompts.ids, decoding.tokenizer.pad_token_id, device)
    targets = []
    hidden = []
    for query_ids, query_mask, texts in common.progress(
        chunks(value_ids, value_mask, prompts.texts, size=args.forward_batch_size),
        desc="π_ref greedy responses",
        enabled=args.progress,
    ):
        batch = respond_greedily(ref_policy, query_ids, query_mask, decoding=decoding, zero3=zero3)
        targets.append(score(reward, batch, texts))
        hidden.append(prompt_hidden(ref_policy, query_ids, query_mask, device))
    return torch.cat(targets), torch.cat(hidden), value_mask


@torch.no_grad()
def row_advantages(ref_policy, head, rows: Batch, raw_data, prompts, *, reward: Reward, args, device):
    """Step 3: R(x, y), V_πref(x) and A_πref(x, y) = R(x, y) − V_πref(x) of every training row (priority sampling
    weighs them all), [rows] each. `raw_data` [rows, fields] holds the rows' reward columns (NaN: scored by the
    field's scorer); `prompts`, the rows' prompts as the dataset gave them."""
    scores = []
    values = []
    for *columns, raw, texts in common.progress(
        chunks(*rows, raw_data, prompts, size=args.forward_batch_size), desc="advantages", enabled=args.progress
    ):
        batch = to_device(trim(Batch(*columns)), device)
        response_mask = batch.response_mask.long()  # as the scorers read it
        scores.append(score(reward, batch._replace(response_mask=response_mask), texts, raw))
        values.append(
            head(prompt_hidden(ref_policy, batch.query_ids, batch.query_mask, device), batch.query_mask).cpu()
        )
    scores = torch.cat(scores)
    values = torch.cat(values)
    return {
        "scores": scores,
        "values": values,
        "advantages": scores - values,  # A-LoL: A_πref(x, y) = R(x, y) − V_πref(x)
    }


def compute_advantages(
    load_ref, *, value_prompts: Prompts, rows: Batch, raw_data, prompts, reward, decoding, zero3, args, device, rank=0
):
    """Steps 1-3, once per run, before training: V_πref fitted (MSE) to the reward of π_ref's greedy responses to
    held-out prompts, then A_πref = R − V_πref(x) of every training row. `load_ref()` gives π_ref (called here only,
    so that a cache hit never loads it); `zero3`: π_ref is sharded. Returns (tensors: scores, values, advantages
    [rows]; info: the fit's held-out MSE per epoch, the epoch kept, the targets' mean and std), as common.cached
    stores them."""
    if rank == 0:
        print(f"V_ref, and the advantages of all {len(prompts)} rows (sampling reads them all)", flush=True)
    ref_policy = load_ref()
    # 1. V_πref's targets: the reward of π_ref's own greedy responses to held-out prompts
    targets, hidden, value_mask = value_targets(
        ref_policy, value_prompts, reward=reward, decoding=decoding, zero3=zero3, args=args, device=device
    )
    if reward.transform == "sigmoid":  # each transformed score lies in (0, 1): R in (Σ w⁻, Σ w⁺)
        lo = reward.weights.clamp(max=0).sum().item()
        hi = reward.weights.clamp(min=0).sum().item()
    else:
        lo = targets.min().item()
        hi = targets.max().item() + 1e-6
    # 2. Fit V_πref on π_ref's frozen hidden states of the prompt (MSE; the held-out best epoch is kept)
    head, history = fit_value_head(
        hidden,
        value_mask,
        targets,
        lo=lo,
        hi=hi,
        epochs=args.value_epochs,
        lr=args.value_learning_rate,
        batch_size=args.value_batch_size,
        seed=args.seed,
        device=device,
        show_progress=args.progress,
    )
    # 3. R, V_πref(x) and A_πref = R − V_πref(x) of every training row
    tensors = row_advantages(ref_policy, head, rows, raw_data, prompts, reward=reward, args=args, device=device)
    info = {
        "value_heldout_mse": history,
        "value_epoch": history.index(min(history)) + 1,
        "value_target_mean": targets.mean().item(),
        "value_target_std": targets.std().item(),
    }
    return tensors, info


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
    """The batch's tensors on `device`."""
    return Batch(*(tensor.to(device) for tensor in batch))


def token_lists(ids, mask):
    """The rows' token ids without their padding, as lists."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


def chunks(*columns, size):
    """`size` rows of each column at a time (--forward-batch-size), as a list: a progress bar reads its length."""
    return [[column[i : i + size] for column in columns] for i in range(0, len(columns[0]), size)]


def score(reward: Reward, batch: Batch, prompts, raw=None):
    """R = Σ_i w_i · transform(r_i), [n]: r_i from `raw` [n, fields] where not NaN, else from field i's scorer,
    which reads the token ids and the `prompts` as the dataset gave them."""
    raw = torch.full((len(batch.query_ids), len(reward.scorer_names)), float("nan")) if raw is None else raw.clone()
    for i, name in enumerate(reward.scorer_names):
        if not raw[:, i].isnan().any():
            continue
        if name == "gold":
            texts = decode_responses(reward.tokenizer, batch.response_ids, batch.response_mask)
            raw[:, i] = torch.tensor(common.builtin_gold_score(texts))
        else:
            raw[:, i] = reward.scorers[name](*batch, prompts=prompts)
    transformed = torch.sigmoid(raw) if reward.transform == "sigmoid" else raw
    return (transformed * reward.weights).sum(1)


def respond_greedily(model, query_ids, query_mask, *, decoding: Decoding, zero3):
    """Greedy responses to left-padded prompts, cut after EOS and at the stop strings, as a Batch."""
    response_ids = generate(
        model, query_ids=query_ids, query_mask=query_mask, generation_config=decoding.generation_config, zero3=zero3
    )
    response_ids, response_mask, _ = common.truncate_after_eos(
        response_ids,
        eos_id=decoding.tokenizer.eos_token_id,
        pad_id=decoding.tokenizer.pad_token_id,
        tokenizer=decoding.tokenizer,
        stop_strings=decoding.stop_strings,
    )
    return Batch(query_ids, query_mask, response_ids, response_mask)


def load_reference_policy(args, *, policy, place: common.Placement):
    """π_ref: with LoRA, the untrained policy itself, read with its adapter off (the caller's common.adapter_off);
    else a frozen copy of --model-name-or-path placed on --ref-device."""
    if args.lora_r:
        return policy
    ref_model = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at=args.ref_device)
    return place.frozen(ref_model, at=args.ref_device)


@torch.no_grad()
def compute_ref_logprobs(positions, *, load_ref, rows: Batch, drawn, args, device):
    """π_ref's per-token log-probs of the rows drawn[positions], [n, response width of `rows`] (0 past each
    response): the denominator of A-LoL's importance weight, fixed before training."""
    ref_policy = load_ref()
    width = rows.response_ids.shape[1]
    ref_logprobs = []
    for (idx,) in common.progress(
        chunks(drawn[positions], size=args.forward_batch_size), desc="π_ref log-probs", enabled=args.progress
    ):
        logprobs = common.forward_logprobs(ref_policy, *to_device(trim(rows.rows(idx)), device)).cpu()
        ref_logprobs.append(torch.nn.functional.pad(logprobs, (0, width - logprobs.shape[1])))
    return {"ref_logprobs": torch.cat(ref_logprobs)}


def evaluate(policy, step, *, prompts: Prompts, reward, decoding, gold_score, zero3, log, args, device):
    """Greedy responses to this rank's held-out `prompts`: proxy reward (R's scale), gold score (`gold_score`: a
    function of the response texts, or None), length, and distinct-1/2 over every rank's responses; rank 0's first
    --log-samples responses go to log.samples."""
    tokenizer = decoding.tokenizer
    stats = []
    texts = []
    samples = []  # rank 0's first --log-samples responses, for log.samples
    policy.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
    for prompt_rows, prompt_texts in common.progress(
        chunks(prompts.ids, prompts.texts, size=args.forward_batch_size), desc="evaluate", enabled=args.progress
    ):
        query_ids, query_mask = common.pad_left(prompt_rows, tokenizer.pad_token_id, device)
        batch = respond_greedily(policy, query_ids, query_mask, decoding=decoding, zero3=zero3)
        kept = decode_responses(tokenizer, batch.response_ids, batch.response_mask)
        gold = torch.tensor(gold_score(kept) if gold_score else [0.0] * len(kept))
        lengths = batch.response_mask.sum(1).float().cpu()
        scores = score(reward, batch, prompt_texts)
        stats.append(torch.stack([scores, lengths, gold], 1))
        samples += common.sample_rows(
            args.log_samples - len(samples),
            prompt=prompt_texts,
            rendered_prompt=common.rendered_prompts(tokenizer, query_ids, query_mask),
            response=kept,
            score=scores,
            gold_score=gold if gold_score else None,
        )
        texts += [text.replace(tokenizer.eos_token, " ") if tokenizer.eos_token else text for text in kept]
    names = ["eval/reward", "eval/response_length", "eval/gold_score"]
    metrics = dict(zip(names, torch.cat(stats).mean(0).tolist()))
    if gold_score is None:
        metrics.pop("eval/gold_score")
    gathered = [None] * dist.get_world_size()  # distinct-n over every rank's responses, not a mean of per-rank ratios
    dist.all_gather_object(gathered, texts)
    texts = [text for part in gathered for text in part]
    policy.train()
    log.samples(step, samples)
    return {
        **common.mean_across_ranks(metrics),
        "eval/distinct_1": common.distinct_n(texts, 1),
        "eval/distinct_2": common.distinct_n(texts, 2),
    }


def update(policy, *, rows: Batch, ref_logprobs, scores, advantages, idx, args: Args, device) -> ALoLLoss:
    """One optimiser step on the rows `idx` of `rows` (steps 5-6 of the training loop). Every variant's loss, and its
    statistics, is a mean over the rows of per-row terms (the importance weights are clipped row by row), so the
    mini-batch is taken in micro-batches of --micro-batch-size rows, each one's loss weighted by its share of the
    rows: the accumulated gradient is the whole mini-batch's. Returns the mini-batch's loss and statistics, without
    gradient."""
    total = None
    for micro in common.micro_batches(idx, args.micro_batch_size):
        batch = to_device(trim(rows.rows(micro)), device)
        ref = ref_logprobs[micro][:, : batch.response_ids.shape[1]].to(device)
        # 5. π_θ's per-token log-probs of the data responses, and the chosen variant's loss
        logprobs = common.forward_logprobs(policy, *batch)
        terms = alol_loss(
            algorithm=args.algorithm,
            logprobs=logprobs,
            ref_logprobs=ref,
            response_mask=batch.response_mask,
            scores=scores[micro].to(device),
            advantages=advantages[micro].to(device),
            cliprange=args.cliprange,
            kl_coef=args.kl_coef,
        )
        # 6. The micro-batch's part of the gradient; the engine steps the optimiser after the mini-batch's last
        share = len(micro) / len(idx)
        policy.backward(terms.loss * share, scale_wrt_gas=False)
        policy.step()
        weighted = ALoLLoss(*(term.detach() * share for term in terms))
        total = weighted if total is None else ALoLLoss(*(a + b for a, b in zip(total, weighted)))
    return total


if __name__ == "__main__":
    # Parse the command line (--preset NAME: a paper setting as the defaults)
    args = common.parse_args(Args, PRESETS)
    # no-grad passes bounded as the training passes are (--micro-batch-size), else by 64 rows
    args = replace(args, forward_batch_size=args.forward_batch_size or args.micro_batch_size or 64)

    # Validate: the variant, and one weight and one scorer per reward field (or one scorer for all)
    if args.algorithm not in ALGORITHMS:
        common.fail(f"unknown --algorithm {args.algorithm}; pick one of {', '.join(ALGORITHMS)}")
    n_fields = len(args.reward_fields)
    if len(args.reward_weights) not in (0, n_fields) or len(args.reward_model) not in (1, n_fields):
        common.fail(
            f"--reward-weights ({len(args.reward_weights)}) and --reward-model ({len(args.reward_model)}) need one "
            f"value per --reward-fields entry ({n_fields}); --reward-model may also give one"
        )
    scorer_names = list(args.reward_model) * (n_fields // len(args.reward_model))  # the scorer of each field
    run = common.start_run(args, "alol.py", one_weight_per_reward_model=False)  # one weight per field, checked above
    rank = run.rank
    world_size = run.world_size
    device = run.device
    zero3 = args.zero_stage == 3
    sampling = args.sampling or ("uniform" if args.algorithm == "nll" else "good_priority")
    weights = torch.tensor(args.reward_weights or [1.0] * n_fields)

    # Read the rows and check them before any model is loaded
    data = common.load_split(
        args.offline_dataset,
        args.offline_split,
        role="data/offline",
        flag="--offline-dataset",
        held_out=(args.dataset, args.eval_split),
    )
    if "prompt" not in data.column_names:
        canonical = common.canonical_rows(data, args.offline_dataset)
        if canonical:  # HH transcripts: split at the last "Assistant:"; train on the chosen reply
            data = datasets.Dataset.from_dict(canonical)
    response_field = "response" if "response" in data.column_names else "chosen"
    if not {"prompt", response_field} <= set(data.column_names):
        common.fail(
            f"dataset '{args.offline_dataset}' has columns {', '.join(data.column_names)}; A-LoL rows need prompt and "
            f"response (or preference rows: prompt, chosen), plus the --reward-fields columns"
        )
    common.check_rows(args.offline_dataset, prompt=data["prompt"], response=data[response_field])
    missing = [name for name in args.reward_fields if name not in data.column_names]
    if missing:
        common.note(f"the rows have no column {', '.join(missing)}: their responses are scored by --reward-model")

    # Seed: one seed while loading and while fitting V_ref (every rank computes the same V_ref and advantages, with
    # no communication); rank r then draws its own batches with seed + r.
    torch.manual_seed(args.seed)

    # Load the policy (π_θ, and π_ref until it trains), the tokenizer and the reward models
    place = common.Placement.of(args)  # the settings every model is loaded and placed with
    dtype = place.dtype  # the policy's (cache keys name it)
    tokenizer = common.load_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = place.load(args.model_name_or_path, kind="causal", flag="--model-name-or-path", at="policy")
    scorers = {  # a model or module:function per distinct --reward-model entry
        name: place.reward(name, tokenizer, at=args.reward_device)
        for name in dict.fromkeys(name for name in scorer_names if name != "gold")
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
    # The learning-rate schedule counts optimiser steps; the decay ends at --total-steps (priority sampling can end
    # the run sooner: it trains on the positive-weight share of the steps).
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

    # Data: the training rows (all of them on every rank), the prompts that fit V_ref and those evaluated; the rows
    # whose chat prompt cannot fit the prompt budget are dropped first
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=policy.module.config.max_position_embeddings,  # GPT-2's n_positions is mapped to it
        chat_template=args.chat_template,
    )
    data = data.select(common.fitting_prompts(tokenizer, data["prompt"], what="offline rows", **encode))
    raw_data = torch.tensor(  # [rows, fields]; NaN: scored by the field's --reward-model in compute_advantages
        [
            [float(v) for v in data[name]] if name not in missing else [float("nan")] * len(data)
            for name in args.reward_fields
        ]
    ).T
    train_texts = [prompt if isinstance(prompt, list) else str(prompt) for prompt in data["prompt"]]  # text / chat
    rows = common.encode_offline_rows(tokenizer, train_texts, data[response_field], **encode)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    kept = common.fitting_prompts(tokenizer, eval_texts, what="evaluation prompts", **encode)
    eval_texts = [eval_texts[i] for i in kept]
    # V_ref is fitted on held-out prompts, as in the paper: none that a training row has, and none of the prompts
    # evaluated (the first --eval-prompts of the evaluation split, which is also the default --value-split).
    held_out = {json.dumps(prompt) for prompt in train_texts + eval_texts[: args.eval_prompts]}
    value_texts = common.load_prompts(args.dataset, args.value_split, args.prompt_field)
    value_texts = [prompt for prompt in value_texts if json.dumps(prompt) not in held_out]
    kept = common.fitting_prompts(tokenizer, value_texts, what="V_ref prompts", **encode)
    value_texts = [value_texts[i] for i in kept][: args.value_prompts]
    if len(value_texts) < 2:  # one to fit, one to choose the epoch
        common.fail(
            f"the '{args.value_split}' split of --dataset {args.dataset} has {len(value_texts)} prompt(s) that "
            f"neither a training row nor the evaluation has; V_ref needs held-out prompts: pass another "
            f"--value-split or --dataset"
        )
    value_prompts, _ = common.encode_prompts(tokenizer, value_texts, **encode)
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
    reward = Reward(scorer_names, scorers, weights, args.reward_transform, tokenizer)
    decoding = Decoding(tokenizer, greedy, args.stop_strings)
    # π_ref, loaded at most once and only when a cache misses (load_ref.cache_clear() frees it)
    load_ref = functools.cache(functools.partial(load_reference_policy, args, policy=policy, place=place))
    ref_zero3 = zero3 and (args.lora_r != 0 or args.ref_device == "policy")  # π_ref sharded: decoding gathers it

    # ALGO LOGIC, steps 1-3 (once per run, before training): V_πref, then A_πref of every training row
    # (compute_advantages). A_πref and π_ref's log-probs are cached under a key of everything they depend on but the
    # algorithm (so the eight variants share one entry)
    key = dict(
        version=CACHE_VERSION,
        model=common.fingerprint(args.model_name_or_path, "sft"),
        # `gold`, the built-in task's gold score, is code: its name keys it
        reward_models=[[name] if name == "gold" else common.fingerprint(name, "reward") for name in scorer_names],
        reward_fields=args.reward_fields,
        reward_weights=weights.tolist(),
        reward_transform=args.reward_transform,
        seed=args.seed,
        dtype=dtype,
        rows=common.json_digest(
            [
                token_lists(rows.query_ids, rows.query_mask),
                token_lists(rows.response_ids, rows.response_mask),
                raw_data.tolist(),
            ]
        ),
        value_prompts=common.json_digest(value_prompts),
        value_fit=[args.value_epochs, args.value_learning_rate, args.value_batch_size],
        max_new_tokens=args.max_new_tokens,
        stop_strings=args.stop_strings,
        reward_dtype=args.reward_dtype,
        chat_template=tokenizer.chat_template if args.chat_template else None,
        load_in_4bit=args.load_in_4bit,
    )
    cache_dir = common.cache_folder(args.cache_dir, "alol")
    t0 = time.time()
    compute = functools.partial(
        compute_advantages,
        load_ref,
        value_prompts=Prompts(value_prompts, value_texts),
        rows=rows,
        raw_data=raw_data,
        prompts=train_texts,
        reward=reward,
        decoding=decoding,
        zero3=ref_zero3,
        args=args,
        device=device,
        rank=rank,
    )
    with common.adapter_off(policy):  # with LoRA, the policy is π_ref until it trains
        cache, info, hit = common.cached(key, compute, cache_dir, use_cache=not args.no_cache, rank=rank)
    scores = cache["scores"]
    advantages = cache["advantages"]

    # A-LoL's priority sampling: good_priority draws rows i.i.d. ∝ max(A, 0) (∝ R for wbc, r_gold, r_lol) and
    # scales the number of steps by the fraction of rows with positive weight (--no-scale-steps: it does not);
    # uniform keeps every row and step.
    if sampling == "uniform":
        priority = torch.ones_like(scores)
    elif args.algorithm in REWARD_WEIGHTED:
        priority = scores
    else:
        priority = advantages
    positive = common.mean_across_ranks({"p": (priority > 0).float().mean().item()})["p"]  # one step count: lockstep
    if positive == 0:
        common.fail("no row has a positive advantage (or reward): nothing to train on with --sampling good_priority")
    num_steps = max(1, round(args.total_steps * positive)) if args.scale_steps else args.total_steps
    draws = [  # rank r's draws, from seed + r: every rank knows all of them
        priority_sampler(priority, num_steps * args.mini_batch_size, torch.Generator().manual_seed(args.seed + r))
        for r in range(world_size)
    ]
    drawn = torch.cat(draws).unique()  # the rows this run trains on, on any rank
    draws = draws[rank]

    # π_ref's per-token log-probs of the rows drawn only, cached per row (a longer run computes the rows it adds)
    queries = token_lists(rows.query_ids, rows.query_mask)
    responses = token_lists(rows.response_ids, rows.response_mask)
    ref_key = dict(
        version=CACHE_VERSION,
        model=key["model"],
        dtype=dtype,
        width=rows.response_ids.shape[1],  # each row's log-probs are stored padded to it
        chat_template=key["chat_template"],
        load_in_4bit=args.load_in_4bit,
    )
    with common.adapter_off(policy):  # with LoRA, the policy is π_ref until it trains
        cache, n_scored = common.cached_rows(
            ref_key,
            [common.json_digest([queries[i], responses[i]]) for i in drawn.tolist()],
            functools.partial(
                compute_ref_logprobs, load_ref=load_ref, rows=rows, drawn=drawn, args=args, device=device
            ),
            os.path.join(cache_dir, "ref_logprobs"),
            use_cache=not args.no_cache,
            rank=rank,
        )
    load_ref.cache_clear()  # π_ref freed
    ref_logprobs = torch.full(  # NaN: a row never drawn
        (len(scores), rows.response_ids.shape[1]), float("nan"), dtype=cache["ref_logprobs"].dtype
    )
    ref_logprobs[drawn] = cache["ref_logprobs"]
    torch.manual_seed(args.seed + rank)
    data_stats = {
        "data/rows": len(scores),
        "data/dropped_rows": int((priority <= 0).sum()),
        "data/reward_mean": scores.mean().item(),
        "data/advantage_mean": advantages.mean().item(),
        "data/positive_advantage_fraction": (advantages > 0).float().mean().item(),
        "value/heldout_mse": min(info["value_heldout_mse"]),
        "value/epoch": info["value_epoch"],
    }
    if rank == 0:
        print(
            f"{run.name}: {world_size} rank(s), {args.algorithm}; V_ref {'from the cache' if hit else 'fitted'} "
            f"({time.time() - t0:.0f} s): epoch {info['value_epoch']}/{args.value_epochs}, held-out MSE "
            f"{data_stats['value/heldout_mse']:.3g} (targets {info['value_target_mean']:.3g} ± "
            f"{info['value_target_std']:.2g}); {len(scores)} rows, {data_stats['data/dropped_rows']} dropped "
            f"(weight ≤ 0) by {sampling} sampling; {num_steps} steps; π_ref's log-probs of the {len(drawn)} rows "
            f"drawn: {n_scored} computed, {len(drawn) - n_scored} cached",
            flush=True,
        )

    # Evaluate: greedy responses to held-out prompts
    evaluation = dict(
        prompts=Prompts(eval_prompts, eval_texts),
        reward=reward,
        decoding=decoding,
        gold_score=gold_score,
        zero3=zero3,
        log=log,
        args=args,
        device=device,
    )

    # Resume: `resume/` holds all a run needs to go on as if never stopped: the policy engine with its optimizer,
    # the step (the draws above are fixed by the seed) and each rank's RNG states. V_ref comes back from the cache.
    engines = {"policy": policy}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    state = common.load_resume(args.resume, engines, rank) if args.resume else {}
    if args.resume:
        eval_history = state["eval_history"]
    else:
        eval_history = [(0, evaluate(policy, 0, **evaluation))]
        log(0, {**data_stats, **eval_history[0][1]})
    if rank == 0:
        print("before training: " + ", ".join(f"{k[5:]} {v:+.3f}" for k, v in eval_history[0][1].items()), flush=True)

    # ALGO LOGIC: V_πref and A_πref are fixed above (cache or compute_advantages, steps 1-3); each step below trains
    # on one priority-sampled mini-batch
    start_time = time.time()
    window = []
    policy.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for step in common.progress(range(state.get("step", 0) + 1, num_steps + 1), desc="steps", enabled=args.progress):
        t_step = time.time()
        # 4. The step's rows, drawn by priority sampling (∝ A_πref⁺, or ∝ R for the reward-weighted baselines)
        idx = draws[(step - 1) * args.mini_batch_size : step * args.mini_batch_size]
        # 5-6. π_θ's log-probs, the chosen variant's loss and one optimiser step on the mini-batch
        terms = update(
            policy,
            rows=rows,
            ref_logprobs=ref_logprobs,
            scores=scores,
            advantages=advantages,
            idx=idx,
            args=args,
            device=device,
        )
        metrics = {
            "policy/loss": terms.loss.item(),
            "policy/log_ratio_to_ref": terms.log_ratio_to_ref.item(),
            "policy/clipfrac": terms.clipfrac.item(),
        }
        window.append([time.time() - t_step, rows.response_mask[idx].sum().item() * world_size])
        metrics = common.mean_across_ranks(metrics)
        metrics["time/update"] = window[-1][0]  # seconds: this step's passes, backward and optimiser step
        common.check_finite(metrics, step, run.resume_path)  # before evaluating (decoding) from NaN weights
        if step % args.eval_every == 0 or step == num_steps:
            seconds, tokens = torch.tensor(window).sum(0).tolist()
            t_eval = time.time()
            eval_history.append((step, evaluate(policy, step, **evaluation)))
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
                f"step {step:5d}/{num_steps} loss {metrics['policy/loss']:.4f} log-ratio to ref "
                f"{metrics['policy/log_ratio_to_ref']:+.3f} eval reward {metrics['eval/reward']:.3f}{gold} "
                f"distinct-2 {metrics['eval/distinct_2']:.3f} steps/s {metrics['time/steps_per_s']:.3g} "
                f"({1 / metrics['time/steps_per_s']:.2f} s/step) "
                f"tokens/s {metrics['time/tokens_per_s']:.0f}",
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
