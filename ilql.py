"""ILQL: Implicit Language Q-Learning. Snell, Kostrikov, Su, Yang, Levine, "Offline RL for Natural Language
Generation with Implicit Language Q Learning", 2022 (ICLR 2023), arXiv 2206.11871.

Offline RL from scored responses; the responses are then decoded with the learned advantage.

The task as a token-level MDP: the state s_t is the prompt and the response tokens before t, the action a_t is the
response token y_t, the reward r_t is the response's score on its last token (0 elsewhere), and the state after the
last token is terminal. Three heads read the LM's last hidden state: V_ψ(s), two Q heads Q_θi(s, ·) over the
vocabulary, and target copies Q̂_i of the Q heads that follow them by Polyak averaging. The LM itself is π_β, the
policy the values steer. Over the dataset's tokens (every term a mean over the response tokens):

    Q loss          L_Q(θ)    = Σ_i (r_t + γ V_ψ(s_{t+1}) − Q_θi(s_t, a_t))²        V_ψ(terminal) = 0, no gradient to V
    expectile loss  L_V(ψ)    = L_2^τ(min_i Q̂_i(s_t, a_t) − V_ψ(s_t)),   L_2^τ(u) = |τ − 1(u < 0)| u²
    CQL term        L_CQL(θ)  = Σ_i (log Σ_a exp Q_θi(s_t, a) − Q_θi(s_t, a_t))      (cross-entropy of the Q logits)
    AWAC term       L_AWAC    = −exp(β_train (min_i Q̂_i − V_ψ)(s_t, a_t)) log π_β(a_t | s_t), the weight a constant
    total           L = L_Q + L_V + cql_scale · L_CQL + awac_scale · L_AWAC
    decoding        π(a | s) ∝ π_β(a | s) exp(β (min_i Q̂_i(s, a) − V_ψ(s)))
    target heads    Q̂_i ← α Q_θi + (1 − α) Q̂_i, every steps_for_target_q_sync optimiser steps

τ > 0.5 makes V an upper expectile of the target Q over the actions the data took, so Q is regressed on an
approximate max over supported actions without ever querying an action the data does not hold. The paper's own
equation numbers for these terms are not cited here (they could not be checked against the paper's text): the
code cites each term by the name above, "ILQL (Snell et al. 2022)" with the symbol.

As in the released code (CarperAI/trlx, which the APA paper's HH experiments used):
- the four terms and their sum: https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/models/modeling_ilql.py#L94-L151
- the decoding rule with top-k: https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/models/modeling_ilql.py#L370-L384
- the Polyak step: https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/models/modeling_ilql.py#L216-L219
- sequence scores z-scored over the dataset: https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/trainer/accelerate_ilql_trainer.py#L83-L86
- the heads, Linear(h, 2h) → ReLU → Linear(2h, out): https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/trlx/utils/modeling.py#L13-L19
  (the paper authors' code has the same terms: https://github.com/Sea-Snell/Implicit-Language-Q-Learning/blob/0dc556150bfbdca5e1e6ee322c9126486c2162f7/src/models/iql_model.py#L345-L371)
Where we differ:
- the target Q heads are a float32 copy beside the trained engine (trlx keeps them inside its heads module, in the
  model's dtype: .../trlx/models/modeling_ilql.py#L216-L219); the Polyak step is the same.
- decoding is transformers' `generate` with a LogitsProcessor for the β shift, top-k and temperature after it (trlx
  samples in its own loop: .../trlx/models/modeling_ilql.py#L382-L390).
- HH rows score chosen 1 and rejected 0 (trlx: 1 and −1, https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/examples/hh/ilql_hh.py#L79);
  after z-scoring the two are the same rewards.
- the `hh-*` presets train the APA paper's HH models (Dahoas' Pythia SFT policies, top 2 blocks); trlx's ILQL HH
  example trains GPT-J 6B whole, 4 rows a step for 20000 steps, with a cosine schedule
  (https://github.com/CarperAI/trlx/blob/3340c2f3a56d1d14fdd5f13ad575121fa26b6d92/examples/hh/ilql_hh.py#L20-L46).

    python ilql.py                                            # the built-in scored responses, one CPU process
    python ilql.py --eval-only --checkpoint runs/RUN/policy   # decode a saved model over a β sweep
    torchrun --nproc_per_node 2 ilql.py --zero-stage 2        # two processes (CPU or GPUs)
    deepspeed --num_gpus 8 ilql.py --zero-stage 3 --bf16 ...  # one node's GPUs, ZeRO-3
    python ilql.py --preset hh-1b --reward-device cuda:1      # the HH setting (./launch.sh paper ilql-hh picks GPUs)
"""

import copy
import inspect
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import common
from common import masked_mean


# The math: ILQL's losses, the Polyak step, the Q / V heads and the decoding rule;
# functions of tensors, each unit-tested.
class ILQLLoss(NamedTuple):
    """ILQL's loss and its terms, each a mean over the response tokens; the three means are detached statistics."""

    loss: torch.Tensor  # q_loss + value_loss + cql_scale · cql_loss + awac_scale · awac_loss: what is minimised
    q_loss: torch.Tensor  # L_Q, summed over the Q heads
    value_loss: torch.Tensor  # L_V, the expectile regression of V on the target Q
    cql_loss: torch.Tensor  # L_CQL, summed over the Q heads
    awac_loss: torch.Tensor  # L_AWAC, the LM head's weighted likelihood of the data
    q_mean: torch.Tensor  # Q_θi(s_t, a_t), mean over the heads and tokens
    target_q_mean: torch.Tensor  # min_i Q̂_i(s_t, a_t)
    value_mean: torch.Tensor  # V_ψ(s_t)


def ilql_loss(
    *,
    logprobs,
    q,
    q_cross_entropy,
    target_q,
    values,
    rewards,
    response_mask,
    gamma: float,
    tau: float,
    cql_scale: float,
    awac_scale: float,
    beta_train: float,
) -> ILQLLoss:
    """ILQL's loss over the response tokens (ILQL (Snell et al. 2022): L_Q, L_V, L_CQL and the AWAC term; see the
    module docstring). For T response positions, states s_0..s_T (s_t = prompt + y_<t) and actions a_t = y_t, each
    term reads the vocabulary-wide heads only at the data's token and through the Q heads' log-sum-exp (token_terms):
      logprobs         [B, T]       log π_β(a_t | s_t), the LM's log-prob of the data's token
      q                [n_q, B, T]  Q_θi(s_t, a_t), with gradient
      q_cross_entropy  [n_q, B, T]  log Σ_a exp Q_θi(s_t, a) − Q_θi(s_t, a_t), with gradient
      target_q         [n_q, B, T]  the target heads' Q̂_i(s_t, a_t) (no gradient)
      values           [B, T + 1]   V_ψ(s_0..s_T); V(s_{t+1}) counts only where token t+1 is real (else terminal)
      rewards          [B, T]       r_t: the sequence's score on its last token, 0 elsewhere
      response_mask    [B, T]       1 on response tokens"""
    response_mask = response_mask.float()
    value = values[:, :-1].float()
    next_value = values[:, 1:].float()
    next_mask = torch.cat([response_mask[:, 1:], torch.zeros_like(response_mask[:, :1])], 1)  # 0 after the last token
    q = q.float()  # Q_θi(s_t, a_t)
    target_q = target_q.float().min(0).values.detach()  # min_i Q̂_i(s_t, a_t): the pessimistic target
    q_target = (rewards + gamma * next_value * next_mask).detach()  # r_t + γ V(s_{t+1}), V = 0 at the terminal
    q_loss = torch.stack([masked_mean((q_i - q_target) ** 2, response_mask) for q_i in q]).sum()  # ILQL L_Q
    # expectile regression of V on the target Q: weight τ where Q̂ > V and 1 − τ where Q̂ < V
    expectile_weight = (tau - (target_q < value).float()).abs()
    value_loss = masked_mean(expectile_weight * (target_q - value) ** 2, response_mask)  # ILQL L_V (L_2^τ)
    # CQL: each Q head's logits as a softmax over the vocabulary, pushed towards the data's token
    cql_terms = [masked_mean(cross_entropy_i, response_mask) for cross_entropy_i in q_cross_entropy]
    cql_loss = torch.stack(cql_terms).sum()  # ILQL L_CQL
    # AWAC: the LM head's likelihood of the data, weighted by exp(β_train · advantage) (a constant weight)
    awac_weight = torch.exp(beta_train * (target_q - value)).detach()
    awac_loss = masked_mean(-logprobs * awac_weight, response_mask)  # ILQL AWAC term
    loss = q_loss + value_loss + cql_scale * cql_loss + awac_scale * awac_loss  # ILQL total loss
    return ILQLLoss(
        loss=loss,
        q_loss=q_loss,
        value_loss=value_loss,
        cql_loss=cql_loss,
        awac_loss=awac_loss,
        q_mean=masked_mean(q.mean(0), response_mask).detach(),
        target_q_mean=masked_mean(target_q, response_mask),
        value_mean=masked_mean(value, response_mask).detach(),
    )


class TokenTerms(NamedTuple):
    """What ilql_loss reads of the LM head and the Q heads at each state s_t, at the data's token a_t."""

    logprobs: torch.Tensor  # [B, T], log π_β(a_t | s_t)
    q: torch.Tensor  # [n_q, B, T], Q_θi(s_t, a_t)
    q_cross_entropy: torch.Tensor  # [n_q, B, T], log Σ_a exp Q_θi(s_t, a) − Q_θi(s_t, a_t)


def token_terms(logits, q_logits, actions) -> TokenTerms:
    """TokenTerms from the vocabulary-wide logits [B, T, vocab] of the LM and [n_q, B, T, vocab] of the Q heads at
    the states s_t, and the actions a_t [B, T] long."""

    def cross_entropy(token_logits):
        """−log softmax(token_logits)[a_t] at every position, [B, T]."""
        flat = token_logits.float().flatten(0, -2)
        return F.cross_entropy(flat, actions.flatten(), reduction="none").view_as(actions)

    q = q_logits.float().gather(-1, actions.expand(len(q_logits), -1, -1)[..., None]).squeeze(-1)
    q_cross_entropy = torch.stack([cross_entropy(q_i) for q_i in q_logits])  # the CQL term's, per head
    return TokenTerms(logprobs=-cross_entropy(logits), q=q, q_cross_entropy=q_cross_entropy)


@torch.no_grad()
def polyak_update(target_heads, q_heads, alpha: float):
    """Q̂ ← α · Q + (1 − α) · Q̂, parameter by parameter (ILQL's target Q heads); α = 1 copies Q."""
    for target, source in zip(target_heads.parameters(), q_heads.parameters()):
        target.mul_(1 - alpha).add_(source.detach().to(target.dtype), alpha=alpha)  # ILQL target heads, Polyak step


# ---- Helpers: the heads on the LM, β-shifted decoding, checkpoints --------------------------------------------------
def mlp(hidden: int, out: int):
    """The heads' shape in the released code: Linear(h, 2h) → ReLU → Linear(2h, out)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, out))


class ILQLOutput(NamedTuple):
    """ILQLModel's outputs at the states s_0..s_T of a response a_0..a_{T-1} (the last T + 1 positions)."""

    hidden: torch.Tensor  # [B, T + 1, h], the last hidden state (what the LM head and the heads read)
    values: torch.Tensor  # [B, T + 1], V(s_0..s_T)
    logprobs: torch.Tensor  # [B, T], log π_β(a_t | s_t)
    q: torch.Tensor  # [n_q, B, T], Q_i(s_t, a_t)
    q_cross_entropy: torch.Tensor  # [n_q, B, T], log Σ_a exp Q_i(s_t, a) − Q_i(s_t, a_t)


class ILQLModel(nn.Module):
    """The LM plus V and two Q heads on its last hidden state, one module so one DeepSpeed engine trains, shards and
    checkpoints them together. The target Q heads are kept apart (float32, no optimiser): see polyak_update."""

    def __init__(self, lm, n_q: int = 2):
        super().__init__()
        hidden = lm.config.get_text_config().hidden_size
        vocab = lm.get_output_embeddings().out_features
        self.lm = lm
        self.v_head = mlp(hidden, 1)
        self.q_heads = nn.ModuleList(mlp(hidden, vocab) for _ in range(n_q))

    def forward(self, input_ids, attention_mask, position_ids, actions, chunk: int = 0) -> ILQLOutput:
        """The outputs at the states of the response `actions` ([B, T], the last T columns of input_ids): the heads
        run on the last T + 1 positions only, no vocabulary-wide head on the prompt. `chunk` > 0 runs the LM head
        and the Q heads over chunks of that many positions, each chunk recomputed in the backward pass (activation
        checkpointing), so that no [n_q, B, T, vocab] tensor is ever alive (ilql_chunk_size picks it); 0: one pass.
        The values are those of one pass."""
        keep = actions.shape[1] + 1
        if chunk:
            hidden = common.last_hidden(self.lm, input_ids, mask=attention_mask, position_ids=position_ids)
            hidden = hidden[:, -keep:]  # after the final norm: what the LM head reads
            values = self.v_head(hidden.to(self.v_head[0].weight.dtype)).squeeze(-1)
            head = common.hf_model(self.lm).get_output_embeddings()
            parts = []
            states = hidden[:, :-1]  # s_0..s_{T-1}: the states where a response token is chosen
            for start in range(0, keep - 1, chunk):
                inputs = (head, self.q_heads, states[:, start : start + chunk], actions[:, start : start + chunk])
                if torch.is_grad_enabled():
                    parts.append(torch.utils.checkpoint.checkpoint(_chunk_terms, *inputs, use_reentrant=False))
                else:
                    parts.append(_chunk_terms(*inputs))
            terms = TokenTerms._make(torch.cat(part, -1) for part in zip(*parts))
            return ILQLOutput(hidden=hidden, values=values, **terms._asdict())
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            **self.keep_logits(keep),
        )
        hidden = out.hidden_states[-1][:, -keep:]  # after the final norm: what the LM head reads
        logits = out.logits[:, -keep:]  # remote code without `logits_to_keep`: all positions, cut here
        heads_in = hidden.to(self.v_head[0].weight.dtype)  # float32 heads on a 4-bit LM's half-precision states
        values = self.v_head(heads_in).squeeze(-1)
        q_logits = torch.stack([q(heads_in) for q in self.q_heads])
        terms = token_terms(logits[:, :-1], q_logits[:, :, :-1], actions)  # at s_0..s_{T-1}, where a token is chosen
        return ILQLOutput(hidden=hidden, values=values, **terms._asdict())

    def keep_logits(self, keep: int) -> dict:
        """`logits_to_keep` for the LM's forward where it takes it: the LM head on the last `keep` positions only."""
        forward = common.hf_model(self.lm).forward
        return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def _chunk_terms(head, q_heads, hidden, actions) -> TokenTerms:
    """token_terms of a chunk of states from their last hidden states [B, C, h] (the LM's `head` and the Q heads
    run on these C positions only)."""
    q_logits = torch.stack([q(hidden.to(q[0].weight.dtype)) for q in q_heads])
    return token_terms(head(hidden), q_logits, actions)


@torch.no_grad()
def target_q_values(target_q_heads, hidden, actions, chunk: int = 0):
    """Q̂_i(s_t, a_t), [n_q, B, T]: the target heads on the last hidden states [B, T, h] of s_0..s_{T-1}, at the
    actions [B, T]; over chunks of `chunk` positions (0: one pass), as ILQLModel runs the Q heads."""
    width = actions.shape[1]
    size = chunk or width
    parts = []
    for start in range(0, width, size):
        states = hidden[:, start : start + size].float()
        target_q_logits = torch.stack([q(states) for q in target_q_heads])
        taken = actions[:, start : start + size].expand(len(target_q_logits), -1, -1)[..., None]
        parts.append(target_q_logits.gather(-1, taken).squeeze(-1))
    return torch.cat(parts, -1)


def ilql_chunk_size(model, rows: int, width: int) -> int:
    """Positions per chunk of ILQLModel's LM and Q heads (0: one pass), by forward_logprobs's rule
    (common.LOGPROB_CHUNK, --logprob-chunk) counted over the 1 + n_q vocabulary-wide logits a chunk computes: "auto"
    chunks a micro-batch whose logits would be large, and never an LM whose logits are not its head's."""
    model = getattr(model, "module", model)  # the ILQLModel inside a DeepSpeed engine
    tensors = 1 + len(model.q_heads)
    return common.logprob_chunk_size(model.lm, rows=rows * tensors, width=width, chunk=common.LOGPROB_CHUNK)


class ILQLLogitsProcessor(LogitsProcessor):
    """logits' = log_softmax(logits) + β · (min_i Q̂_i(s, ·) − V(s)), ILQL's decoding rule
    π(a | s) ∝ π_β(a | s) exp(β (Q̂(s, a) − V(s))), for `generate`: top-k and temperature then apply to the shifted
    logits. The state s is read from the LM head's input (the last hidden state), which a forward hook keeps at every
    decoding step; use the processor as a context manager."""

    def __init__(self, model, target_q_heads, beta: float):
        self.model = model
        self.target_q_heads = target_q_heads
        self.beta = beta
        self.hidden = None

    def keep_hidden(self, module, inputs, output):
        """The forward hook on the LM head: its input at the last position is the state being decoded."""
        self.hidden = inputs[0][:, -1]

    def __enter__(self):
        self.hook = self.model.lm.get_output_embeddings().register_forward_hook(self.keep_hidden)
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
        return F.log_softmax(scores.float(), -1) + self.beta * advantage  # ILQL decoding rule


# The arguments: the fields every script shares (common.RunArgs), this algorithm's, the papers' presets.
@dataclass
class Args(common.RunArgs):
    # Algorithm
    gamma: float = 0.99
    """discount γ of the Q target r_t + γ V(s_{t+1}) (released HH: 0.99)"""
    tau: float = 0.7
    """expectile τ of the V loss; τ > 0.5 pushes V towards the best supported action (released HH 0.6, trlx 0.7)"""
    cql_scale: float = 0.1
    """weight of the CQL term: cross-entropy of the Q heads' logits against the data's tokens (released 0.1)"""
    awac_scale: float = 1.0
    """weight of the AWAC term that trains the LM head (released 1)"""
    beta_train: float = 0.0
    """AWAC weight exp(β_train (Q − V)); 0 = plain likelihood of the data (released 0)"""
    alpha: float = 0.2
    """Polyak rate of the target Q heads, Q̂ ← α Q + (1 − α) Q̂ (released 1e-4 over ~10⁴ steps; short runs need more)"""
    steps_for_target_q_sync: int = 1
    """update the target Q heads every this many optimiser steps (released 1)"""
    eval_betas: list[float] = field(default_factory=lambda: [0.0, 1.0, 4.0])
    """the β sweep of evaluation: logits' = log_softmax(logits) + β · (min_i Q̂_i − V) (released β 1, 4)"""
    top_k: int = 20
    """top-k of decoding, after the β shift (released 20; 0 = off)"""
    temperature: float = 1.0
    """decoding temperature, after the β shift"""
    offline_epochs: int = 10
    """passes over the offline dataset"""
    forward_batch_size: int | None = None
    """prompts per rank per decoding call of an evaluation (no gradients); default --micro-batch-size, or 64"""
    learning_rate: float = 1e-3
    """learning rate of the LM and heads together (released HH 1e-6 for the 125M-6B models)"""
    weight_decay: float = 0.0
    """AdamW weight decay (released HH: 1e-6)"""
    unfrozen_layers: int = -1
    """train only the top N transformer blocks of the policy (and what follows them); -1 = all (released HH: 2)"""

    # Models and data
    checkpoint: str | None = None
    """an ilql.py checkpoint folder (policy + ilql_heads.safetensors) to start from instead of fresh heads"""
    eval_only: bool = False
    """only evaluate --checkpoint over the β sweep, no training"""
    offline_dataset: str = "builtin"
    """{prompt, response, reward} or preference rows: a hub name, a folder, a .jsonl/.json/.parquet file, `builtin`"""
    offline_split: str = "train"
    """the split of --offline-dataset to train on"""
    reward_model: list[str] = field(default_factory=lambda: ["builtin"])
    """reward(s) of the evaluation, summed: 1-output classifiers (hub name, folder, `builtin`), `module:function`
    callables and/or URLs of scoring servers"""
    dataset: str = "builtin"
    """held-out prompts for evaluation: a hub name, a folder, a .jsonl/.json/.parquet file, or `builtin`"""
    prompt_field: str = "prompt"
    """the column holding the prompt text (of --dataset, and of --offline-dataset rows)"""
    response_field: str = "response"
    """the column of --offline-dataset rows holding the response text"""
    reward_field: str = "reward"
    """the column of --offline-dataset rows holding the scalar reward"""

    # Devices and precision
    bf16: bool = False
    """train in bfloat16 (DeepSpeed) and hold the reward model in bfloat16; the target Q heads stay float32"""
    lora_r: int = 0
    """rank r of a LoRA adapter trained in place of the LM's weights (0: no adapter, the weights train); the V and
    Q heads always train in full"""
    reward_device: str = "policy"
    """where the reward model lives: `policy` (this rank's device, sharded with ZeRO-3), `cpu`, or `cuda:N`"""

    # Logging and checkpoints
    exp_name: str = "ilql"
    """the name of this experiment; the run is written to {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (rank r shuffles and samples with seed + r)"""
    log_samples: int = 16
    """responses shown per β at each evaluation (rank 0's first prompts) in TensorBoard, samples.jsonl, W&B; 0: none"""
    eval_every: int = 5
    """evaluate every this many epochs, and before and after training"""
    log_every: int = 10
    """print a progress line every this many steps"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many steps (0: only when stopped by SIGTERM /
    Ctrl-C); the final model and heads are written to {run dir}/policy"""


# The HH setting of the APA paper's experiments, as trlX ran them: Dahoas' Pythia SFT policies, the rm-static rows
# (chosen and rejected replies, scored 1 and 0) and its test prompts, the GPT-J reward model to score evaluations.
HH = dict(
    offline_dataset="Dahoas/rm-static",
    dataset="Dahoas/rm-static",
    eval_split="test",
    eval_prompts=280,  # the first 280 test prompts (trlX examples/hh: islice(dataset["test"], 280))
    reward_model=["Dahoas/gptj-rm-static"],
    max_prompt_length=872,  # released seq_length 1000 − 128 new tokens (trlX cuts prompts to their difference)
    max_new_tokens=128,
    stop_strings=["Human:", "Assistant:"],
    unfrozen_layers=2,  # trlX's num_layers_unfrozen in the APA HH configs
    adam_betas=(0.9, 0.95),
    weight_decay=1e-6,
    bf16=True,
)
# ILQL's released HH hyper-parameters (trlX examples/hh/ilql_hh.py, lines 34-46)
ILQL_HH = dict(
    tau=0.6,
    gamma=0.99,
    cql_scale=0.1,
    awac_scale=1.0,
    alpha=1e-4,
    beta_train=0.0,
    steps_for_target_q_sync=1,
    learning_rate=1e-6,
    eval_betas=[1.0, 4.0],
    top_k=20,
)
SIZES = {"125m": "125M", "1b": "1B", "6b": "6B"}
PRESETS = {
    f"hh-{size}": dict(**HH, **ILQL_HH, model_name_or_path=f"Dahoas/pythia-{name}-static-sft")
    for size, name in SIZES.items()
}


@torch.no_grad()
def generate(model, target_q_heads, *, query_ids, query_mask, generation_config, beta: float, zero3: bool):
    """Sample with the β-shifted logits and the KV cache. Under ZeRO-3 the shards are gathered once for the whole
    decode, and `synced_gpus` keeps ranks stepping together until every rank's batch has finished."""
    engine = model
    model = getattr(engine, "module", engine)  # the ILQLModel inside a DeepSpeed engine
    processor = ILQLLogitsProcessor(model, target_q_heads, beta)
    with common.gathered_for_generation(engine, zero3), processor:
        out = model.lm.generate(
            input_ids=query_ids,
            attention_mask=query_mask,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([processor]),
            synced_gpus=zero3,
        )
    return out[:, query_ids.shape[1] :]


def gathered_parameters(module, zero3: bool):
    """Under ZeRO-3, the module's whole parameters for the duration of the block (each rank holds a shard)."""
    if not zero3:
        return nullcontext()
    import deepspeed  # present whenever --zero-stage 3 runs

    return deepspeed.zero.GatheredParameters(list(module.parameters()))


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    lengths = response_mask.sum(1).tolist()
    return [
        tokenizer.decode(row[: int(n)], skip_special_tokens=False) for row, n in zip(response_ids.tolist(), lengths)
    ]


def save_checkpoint(engine, target_q_heads, tokenizer, *, path: str, rank: int):
    """The LM as an HF folder (from_pretrained loads it) plus V, Q and target Q heads in ilql_heads.safetensors; an
    LM with a LoRA adapter is saved merged into its weights, and the adapter alone under `path`/adapter. Written
    aside and renamed: never half a checkpoint under `path`."""
    model = getattr(engine, "module", engine)
    if hasattr(engine, "zero_optimization_stage") and engine.zero_optimization_stage() == 3:
        # DeepSpeed's private API (DeepSpeedEngine in deepspeed/runtime/engine.py), written against deepspeed 0.19.8
        # (requirements.txt); a collective: every rank calls it
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = model.state_dict()
    if rank == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm_state = {k[len("lm.") :]: v for k, v in state.items() if k.startswith("lm.")}
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


def load_heads(model, target_q_heads, checkpoint: str):
    """V, Q and target Q heads from an ilql.py checkpoint folder, into `model` and `target_q_heads`."""
    heads_file = os.path.join(checkpoint, "ilql_heads.safetensors")
    if not os.path.exists(heads_file):
        common.fail(f"{heads_file} is missing: --checkpoint must be a folder written by ilql.py")
    heads = load_file(heads_file)
    trained = {k: v for k, v in heads.items() if not k.startswith("target_q_heads.")}
    missing, unexpected = model.load_state_dict(trained, strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]  # the LM itself comes from the HF folder
    if unexpected or missing:
        common.fail(
            f"{heads_file} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}); pass the "
            f"--checkpoint written by ilql.py for this model"
        )
    prefix = "target_q_heads."
    target_q_heads.load_state_dict({k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)})


class EvalData(NamedTuple):
    """What an evaluation reads besides the model: this rank's share of the held-out prompts, and their scorers."""

    prompts: list  # token ids of each held-out prompt
    texts: list  # each prompt as the dataset gave it: the reward models read them
    reward_fns: list  # a model or module:function per --reward-model
    reward_weights: list  # the weight of each reward function in the reward Σ_i w_i r_i
    gold_score: object  # the built-in task's gold score of response texts, or None


@torch.no_grad()
def evaluate(step: int, *, model, target_q_heads, tokenizer, data: EvalData, generation_config, args: Args, run, log):
    """Held-out prompts decoded at every β of the sweep (--eval-betas), one fixed seed: reward, gold score, length,
    the fraction cut before EOS, means over all ranks; at every β the first --log-samples responses of rank 0 go to
    log.samples."""
    metrics = {}
    samples = []
    names = ["reward", "response_length", "no_eos_fraction"] + (["gold_score"] if data.gold_score else [])
    model.eval()  # decoding in eval mode; training in train mode (LoRA dropout, gradient checkpointing)
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for beta in args.eval_betas:
            torch.manual_seed(10**6 + run.rank)  # the same draws at every β: differences come from β alone
            rows = []
            shown = []  # this β's samples
            for start in common.progress(
                range(0, len(data.prompts), args.forward_batch_size),
                desc=f"evaluate β={beta:g}",
                enabled=args.progress,
            ):
                chunk = slice(start, start + args.forward_batch_size)
                query_ids, query_mask = common.pad_left(data.prompts[chunk], tokenizer.pad_token_id, run.device)
                response_ids = generate(
                    model,
                    target_q_heads,
                    query_ids=query_ids,
                    query_mask=query_mask,
                    generation_config=generation_config,
                    beta=beta,
                    zero3=args.zero_stage == 3,
                )
                response_ids, response_mask, ended = common.truncate_after_eos(
                    response_ids,
                    eos_id=tokenizer.eos_token_id,
                    pad_id=tokenizer.pad_token_id,
                    tokenizer=tokenizer,
                    stop_strings=args.stop_strings,
                )
                scores = torch.zeros(len(response_ids))
                for weight, reward_fn in zip(data.reward_weights, data.reward_fns):
                    scores = scores + weight * reward_fn(
                        query_ids=query_ids,
                        query_mask=query_mask,
                        response_ids=response_ids,
                        response_mask=response_mask,
                        prompts=data.texts[chunk],
                    )
                texts = decode_responses(tokenizer, response_ids, response_mask)
                gold = data.gold_score(texts) if data.gold_score else [0.0] * len(texts)
                columns = [scores, response_mask.sum(1).float().cpu(), (~ended).float().cpu(), torch.tensor(gold)]
                rows.append(torch.stack(columns, 1))
                shown += common.sample_rows(
                    args.log_samples - len(shown),
                    beta=beta,
                    prompt=data.texts[chunk],
                    rendered_prompt=common.rendered_prompts(tokenizer, query_ids, query_mask),
                    response=texts,
                    score=scores,
                    gold_score=gold if data.gold_score else None,
                )
            samples += shown
            means = torch.cat(rows).mean(0).tolist()
            metrics.update({f"eval/beta_{beta:g}/{name}": value for name, value in zip(names, means)})
    model.train()
    log.samples(step, samples)
    return common.mean_across_ranks(metrics)


def report(prefix: str, metrics: dict, *, betas, gold: bool, rank: int):
    """One line on rank 0: the gold score (with `gold`, else the reward) at every β of `betas`."""
    if rank == 0:
        key = "gold_score" if gold else "reward"
        sweep = [f"β={beta:g}: {key} {metrics[f'eval/beta_{beta:g}/{key}']:+.3f}" for beta in betas]
        print(prefix + ", ".join(sweep), flush=True)


def update(model, target_q_heads, *, data: common.Batch, rewards, idx, args: Args, device) -> ILQLLoss:
    """One optimiser step of the LM and the V and Q heads on the rows `idx` of `data` (steps 1-4 of the training
    loop). Every term of ILQL's loss is a mean over the mini-batch's response tokens, so the mini-batch is taken in
    micro-batches of --micro-batch-size rows, each one's loss weighted by its share of those tokens
    (common.token_share): the accumulated gradient is the whole mini-batch's. Returns the terms as the mini-batch's
    token means, without gradient."""
    total = None
    for micro in common.micro_batches(idx, args.micro_batch_size):
        batch = data.rows(micro)
        input_ids, attention_mask, position_ids = common.concat_inputs(*batch, device)
        # 1. Forward the batch: the state s_t (before response token t) sits at position P−1+t, s_T (after the
        # last column) at P−1+T; the heads run on these T + 1 positions only: V(s_0..s_T), and the LM's and the Q
        # heads' values at the data's tokens at s_0..s_{T-1}, over chunks of positions where the logits are large
        chunk = ilql_chunk_size(model, rows=len(micro), width=batch.response_ids.shape[1])
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            actions=batch.response_ids,
            chunk=chunk,
        )
        # 2. The target heads' Q̂_i(s_t, a_t), without gradient
        target_q = target_q_values(target_q_heads, out.hidden[:, :-1], batch.response_ids, chunk=chunk)
        # 3. L_Q + L_V + cql_scale · L_CQL + awac_scale · L_AWAC over the response tokens
        losses = ilql_loss(
            logprobs=out.logprobs,
            q=out.q,
            q_cross_entropy=out.q_cross_entropy,
            target_q=target_q,
            values=out.values,
            rewards=rewards[micro],
            response_mask=batch.response_mask,
            gamma=args.gamma,
            tau=args.tau,
            cql_scale=args.cql_scale,
            awac_scale=args.awac_scale,
            beta_train=args.beta_train,
        )
        # 4. The micro-batch's part of the gradient; the engine steps the optimiser after the mini-batch's last
        share = common.token_share(batch.response_mask, data.response_mask[idx])
        model.backward(losses.loss * share, scale_wrt_gas=False)
        model.step()
        weighted = ILQLLoss(*(term.detach() * share for term in losses))
        total = weighted if total is None else ILQLLoss(*(a + b for a, b in zip(total, weighted)))
    return total


if __name__ == "__main__":
    # Arguments: the command line over the defaults (or over a --preset's values)
    args = common.parse_args(Args, PRESETS)
    # no-grad passes bounded as the training passes are (--micro-batch-size), else by 64 rows
    args = replace(args, forward_batch_size=args.forward_batch_size or args.micro_batch_size or 64)

    # Validation: what can be checked before anything loads
    if args.eval_only and args.checkpoint is None:
        common.fail("--eval-only needs --checkpoint PATH (a folder written by ilql.py)")
    run = common.start_run(args, "ilql.py")
    rank = run.rank
    world_size = run.world_size
    device = run.device
    zero3 = args.zero_stage == 3
    if not args.eval_only:  # the data first: a dataset that cannot train fails before minutes of model loading
        fields = dict(prompt=args.prompt_field, response=args.response_field, reward=args.reward_field)
        prompts, responses, dataset_scores = common.load_offline_rows(
            args.offline_dataset, args.offline_split, fields=fields, held_out=(args.dataset, args.eval_split)
        )
        rows_per_rank = len(prompts) // world_size
        if rows_per_rank < args.mini_batch_size:
            common.fail(
                f"the offline dataset has {len(prompts)} rows, fewer than one batch of {args.mini_batch_size} on each "
                f"of the {world_size} ranks; lower --mini-batch-size"
            )

    # Seeding: the model and heads are created under one seed, so that they agree across ranks; shuffling and
    # sampling then use seed + rank.
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Loading: the LM (from --checkpoint or the SFT model) with fresh or saved V, Q and target Q heads; one Placement
    # holds the settings every model is loaded and placed with (under ZeRO-3 the LM loads shard by shard)
    place = common.Placement.of(args)
    source = args.checkpoint or args.model_name_or_path
    flag = "--checkpoint" if args.checkpoint else "--model-name-or-path"
    tokenizer = common.load_tokenizer(source, flag, trust_remote_code=args.trust_remote_code)
    lm = place.load(source, kind="causal", flag=flag, at="policy")  # DeepSpeed keeps float32 master weights under bf16
    common.freeze_lower_layers(lm, args.unfrozen_layers)
    common.gradient_checkpointing(lm, args.gradient_checkpointing)
    lm = common.add_lora(
        lm,
        kind="causal",
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        quantized=args.load_in_4bit,
    )
    model = ILQLModel(lm)  # the heads always train
    target_q_heads = copy.deepcopy(model.q_heads).float().requires_grad_(False)  # Q̂ starts as Q
    if args.checkpoint:
        load_heads(model, target_q_heads, args.checkpoint)
    context = model.lm.config.max_position_embeddings
    encode = dict(
        max_prompt_length=args.max_prompt_length,
        max_new_tokens=args.max_new_tokens,
        context=context,
        chat_template=args.chat_template,
    )
    if not args.eval_only:  # rows whose chat prompt cannot fit go before the schedule counts rows
        need = args.mini_batch_size * world_size
        kept = common.fitting_prompts(tokenizer, prompts, what="offline rows", need=need, **encode)
        prompts, responses, dataset_scores = common.rows_at(kept, prompts, responses, dataset_scores)
        rows_per_rank = len(prompts) // world_size
    log = common.make_logger(args, run.name, rank)

    # Placement: the LM + heads are one DeepSpeed engine on this rank's device; the target Q heads are a float32
    # copy on the same device (Polyak steps of α ~ 1e-4 would vanish in bf16); the reward models, used only to
    # score evaluations, are frozen on `policy` (sharded under ZeRO-3), `cpu` or `cuda:N`.
    model.lm.generation_config.pad_token_id = tokenizer.pad_token_id
    # The learning-rate schedule counts optimiser steps; the decay ends at the last one (--eval-only takes none and
    # reads no rows).
    steps_per_epoch = 0 if args.eval_only else rows_per_rank // args.mini_batch_size
    schedule = common.lr_schedule(args.lr_warmup_steps, args.offline_epochs * steps_per_epoch, args.lr_schedule)
    model = place.trainable(model, at="policy", lr=args.learning_rate, schedule=schedule)
    model.eval()  # eval mode (decoding); the training loop switches to train mode
    target_q_heads = target_q_heads.float().to(device)
    reward_weights = args.reward_weights or [1.0] * len(args.reward_model)
    reward_fns = [place.reward(name, tokenizer, at=args.reward_device) for name in args.reward_model]
    generation_config = GenerationConfig(
        do_sample=True,
        top_k=args.top_k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )

    # Evaluation data: held-out prompts, the same number on every rank (ranks decode in lockstep)
    eval_texts = common.load_prompts(args.dataset, args.eval_split, args.prompt_field)
    kept = common.fitting_prompts(tokenizer, eval_texts, what="evaluation prompts", **encode)
    eval_texts = [eval_texts[i] for i in kept]
    eval_prompts, _ = common.encode_prompts(tokenizer, eval_texts, **encode)
    n_eval = min(args.eval_prompts, len(eval_prompts)) // world_size * world_size
    if n_eval == 0:
        common.fail(
            f"the '{args.eval_split}' split has fewer prompts than the {world_size} ranks; pass another --eval-split "
            f"or raise --eval-prompts"
        )
    eval_prompts = eval_prompts[:n_eval][rank::world_size]
    eval_texts = eval_texts[:n_eval][rank::world_size]  # the same prompts as given: the reward models read them
    gold_score = common.builtin_gold_score if args.dataset == common.BUILTIN else None

    # Evaluate: the held-out prompts decoded over the β sweep, a line of it on rank 0; --eval-only stops after one
    eval_data = EvalData(
        prompts=eval_prompts,
        texts=eval_texts,
        reward_fns=reward_fns,
        reward_weights=reward_weights,
        gold_score=gold_score,
    )
    evaluation = dict(
        model=model,
        target_q_heads=target_q_heads,
        tokenizer=tokenizer,
        data=eval_data,
        generation_config=generation_config,
        args=args,
        run=run,
        log=log,
    )
    sweep = dict(betas=args.eval_betas, gold=gold_score is not None, rank=rank)  # what report() prints

    if args.eval_only:
        metrics = evaluate(0, **evaluation)
        report(f"{args.checkpoint}: ", metrics, **sweep)
        log(0, metrics)
        common.exit_cleanly()
        raise SystemExit(0)

    # Training data: scored responses, EOS appended; the score, z-scored over the whole dataset, is the reward on the
    # last token (r_t = 0 elsewhere), as trlX's make_experience does
    scores = torch.tensor(dataset_scores[: rows_per_rank * world_size], dtype=torch.float32)
    scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    mine = list(range(rank, rows_per_rank * world_size, world_size))
    data = common.encode_offline_rows(
        tokenizer,
        [prompts[i] for i in mine],
        [responses[i] for i in mine],
        **encode,
        device=device,
    )
    rewards = torch.zeros_like(data.response_mask)
    last_token = data.response_mask.sum(1).long() - 1
    rewards[torch.arange(len(mine)), last_token] = scores[mine].to(device)
    data_gold = {}
    if gold_score and args.offline_dataset == common.BUILTIN:  # the data's own gold score: the bar to clear
        gold = gold_score([responses[i] for i in mine])
        data_gold = common.mean_across_ranks({"data/gold_score": sum(gold) / len(gold)})

    # Resume: `resume/` holds all a run needs to go on as if never stopped: the engine (LM and heads) with its
    # optimizer, the target Q heads, the step, each rank's RNG and its shuffler's state at the start of the epoch.
    shuffler = torch.Generator().manual_seed(args.seed + rank)
    step = 0
    start_time = time.time()
    engines = {"model": model}
    stop_requested = common.stop_signals()  # SIGTERM / Ctrl-C from here on: a checkpoint at the next step, then exit
    first_epoch = 1
    skip = 0
    if args.resume:
        state = common.load_resume(args.resume, engines, rank)
        step = state["step"]
        eval_history = state["eval_history"]
        target_q_heads.load_state_dict(state["target_q_heads"])
        shuffler.set_state(state["epoch_shuffler"])
        first_epoch = (step - 1) // steps_per_epoch + 1  # the epoch of the saved step; its batches before it skipped
        skip = step - (first_epoch - 1) * steps_per_epoch
    else:
        eval_history = [(0, {**evaluate(0, **evaluation), **data_gold})]
        log(0, eval_history[-1][1])
    report(f"{run.name}: {world_size} rank(s), {len(prompts)} rows; before training: ", eval_history[0][1], **sweep)

    # ALGO LOGIC, steps 1-5: ILQL's training loop, a pass over the shuffled rows per epoch, one step per mini-batch
    model.train()  # gradient checkpointing and LoRA dropout act in train mode only (other dropout is off)
    for epoch in range(first_epoch, args.offline_epochs + 1):
        epoch_start = time.time()
        n_tokens = 0
        epoch_shuffler = shuffler.get_state()
        order = torch.randperm(rows_per_rank, generator=shuffler)[: steps_per_epoch * args.mini_batch_size]
        for idx in common.progress(
            order.split(args.mini_batch_size)[skip:], desc=f"epoch {epoch}", enabled=args.progress
        ):
            t_step = time.time()
            # 1-4. The forward passes, ILQL's loss and one optimiser step of the LM and the V and Q heads together
            losses = update(model, target_q_heads, data=data, rewards=rewards, idx=idx, args=args, device=device)
            step += 1
            # 5. The target Q heads follow the Q heads: Q̂ ← α Q + (1 − α) Q̂
            if step % args.steps_for_target_q_sync == 0:
                q_heads = getattr(model, "module", model).q_heads
                with gathered_parameters(q_heads, zero3):
                    polyak_update(target_q_heads, q_heads, args.alpha)

            # Statistics, logging, and a resumable checkpoint when due
            n_tokens += int(data.response_mask[idx].sum()) * world_size
            stats = {
                "q/loss": losses.q_loss.item(),
                "value/loss": losses.value_loss.item(),
                "q/cql_loss": losses.cql_loss.item(),
                "policy/awac_loss": losses.awac_loss.item(),
                "q/mean": losses.q_mean.item(),
                "q/target_mean": losses.target_q_mean.item(),
                "value/mean": losses.value_mean.item(),
            }
            stats = common.mean_across_ranks(stats)
            common.check_finite(stats, step, run.resume_path)
            if step % args.log_every == 0:
                stats["time/tokens_per_s"] = n_tokens / (time.time() - epoch_start)
                stats["time/update"] = time.time() - t_step  # seconds: this step's pass, backward and optimiser step
                stats["policy/learning_rate"] = common.current_lr(model)  # of the next step (--lr-schedule)
                log(step, stats)
                if rank == 0:
                    print(
                        f"epoch {epoch} step {step:5d} q {stats['q/loss']:.4f} v {stats['value/loss']:.4f} "
                        f"cql {stats['q/cql_loss']:.3f} awac {stats['policy/awac_loss']:.3f} "
                        f"V {stats['value/mean']:+.3f} tokens/s {stats['time/tokens_per_s']:.0f}, "
                        f"{stats['time/update']:.2f} s/step",
                        flush=True,
                    )
            resume_state = dict(
                step=step,
                eval_history=eval_history,
                target_q_heads=target_q_heads.state_dict(),
                epoch_shuffler=epoch_shuffler,
            )
            common.checkpoint_if_due(run, args, step=step, engines=engines, state=resume_state, signum=stop_requested())
        skip = 0
        # Evaluation: decode the held-out prompts over the β sweep
        if epoch % args.eval_every == 0 or epoch == args.offline_epochs:
            t_eval = time.time()
            eval_history.append((step, evaluate(step, **evaluation)))
            log(step, {**eval_history[-1][1], "time/eval": time.time() - t_eval})
            report(f"epoch {epoch}/{args.offline_epochs}: ", eval_history[-1][1], **sweep)

    # Save: the LM as an HF folder and the heads beside it
    save_checkpoint(model, target_q_heads, tokenizer, path=os.path.join(run.dir, "policy"), rank=rank)
    if rank == 0:
        first = eval_history[0][1]
        final = eval_history[-1][1]
        changes = ", ".join(f"{k[5:]} {first[k]:+.3f} → {final[k]:+.3f}" for k in final)
        print(
            f"done in {time.time() - start_time:.0f} s; held-out before → after: {changes}; saved to {run.dir}/policy"
        )
    common.exit_cleanly()
