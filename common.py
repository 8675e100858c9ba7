"""What the algorithm scripts share that is not an algorithm: start-up, loading, devices, forward passes,
statistics, logging and checkpoints. Conventions: prompts LEFT-padded, responses RIGHT-padded, `response_mask` 1 on
response tokens (their EOS included).

Sections, in file order (each starts with a `# ---- Name ----` line):

     1. Start-up                       fail, note, optional_part, LoadReport, parse_args (--preset), start_run, ...
     2. The built-in task              builtin/ beside this file: resolve(), builtin_gold_score
     3. Datasets                       load_prompts, load_offline_rows, load_preference_pairs, load_rankings
     4. Dataset and prompt formats     plain columns and text (canonical_rows, render_prompts); the rest: formats.py
     5. Token ids                      fitting_prompts, encode_prompts, pad_left, Batch, encode_offline_rows, ...
     6. Tokenizers and models          load_tokenizer, load_model, 4-bit weights, ZeRO-3 loading, no dropout
     7. Which weights train            LoRA adapters (add_lora, adapter_off; lora.py's code), freeze_lower_layers
     8. Rewards                        load_reward: a Python function or a 1-output classifier (URLs and released
                                       layouts through released.py)
     9. Distributed set-up             the process group, all-reduce of CPU tensors, generate under ZeRO-3
    10. Engines                        DeepSpeed or TorchEngine, their configs, learning-rate schedules
    11. Forward passes                 log-probs, values and entropies over (prompt | response), sampling penalties,
                                       the LM head over chunks of positions (LOGPROB_CHUNK)
    12. Masked statistics              means and whitening where padding never counts, optionally over all ranks
    13. Evaluation of online runs      Rollout, decode_responses, held_out_prompts, evaluate_held_out (the held-out
                                       evaluation), rollout_metrics, log_iteration: ppo.py, apa.py, awr.py, grpo.py
    14. Logging and saving             progress bars, TensorBoard, metrics.jsonl, samples.jsonl, HF folders, W&B
    15. Resumable checkpoints          save / load bit for bit, stop signals, non-finite guards, a clean exit
    16. Caches                         content keys (fingerprint, file_digest, hub_commit), cached(_rows), distinct_n

Copying one algorithm script into a project: copy the script and common.py; nothing else is needed. formats.py,
lora.py, tracking.py, released.py, evaluate.py and builtin/ are optional parts beside common.py, each imported only
where it is used (optional_part): a missing one is a one-line error that names it.
- formats.py: data in other formats than plain columns and text (HH dialogues, chat messages and templates, PRO and
  TL;DR rows), reached through a few calls here (canonical_rows, fitting_prompts, encode_prompts, load_rankings,
  prompt_messages, prompt_text) only where a row's shape or --chat-template needs it.
- lora.py: the LoRA adapter's code (add_lora's peft set-up, merged_state_dict), for a run with --lora-r.
- tracking.py: Weights & Biases, for a run with --track.
- released.py: reward models in their released layouts (trlX / Dahoas, trlX TL;DR, OpenAssistant) and scoring
  servers (a URL --reward-model entry). Without it a model entry is read as a 1-output sequence-classification model.
- evaluate.py: the judged evaluation of a saved run (`./launch.sh eval`, `python evaluate.py RUN_DIR`).
- builtin/: the built-in task (`builtin` as a model, reward or dataset name, the default of every script) and
  builtin/build.py, the code that built it (`python builtin/build.py`) and its gold score. Without it, pass your own
  model, reward and dataset."""

import contextlib
import dataclasses
import functools
import hashlib
import html
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
)

if not torch.cuda.is_available():  # the scripts run on CUDA or on the CPU: DeepSpeed is told so, instead of
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # guessing and warning at every start that it found no GPU
try:
    import deepspeed
except ImportError:  # ZeRO-0 runs without it: plain torch.distributed and TorchEngine
    deepspeed = None


# ---- Start-up: one-line errors, the command line, the checks every script makes, checkpoints when due ----------------
def fail(message: str):
    """Stop with a one-line error that names the fix, and no traceback: the input was wrong, not the code."""
    raise SystemExit(f"error: {message}")


def note(message: str):
    """Print `note: message` on rank 0, once per process however often it is reached (one file read as two splits
    notes its dropped rows once)."""
    if message in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(message)
    print(f"note: {message}")


_NOTED = set()
HERE = os.path.dirname(os.path.abspath(__file__))  # this file's folder, where the optional parts sit beside it


def optional_part(file: str, needed_for: str = ""):
    """An optional part of the project beside this file (released.py, evaluate.py, builtin/build.py), imported only
    where it is used, once, by its path. Where the file is absent: None when `needed_for` is empty (the caller goes
    on without it), else a one-line error that names the file."""
    name = os.path.splitext(file)[0].replace("/", "_")  # builtin/build.py: the module builtin_build
    path = os.path.join(HERE, file)
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", None) or "") == os.path.abspath(path):
        return loaded
    if loaded is not None:  # a module of the same name from elsewhere (the user's own `formats`): kept apart
        name = f"onefile_rlhf_{name}"
        if name in sys.modules:
            return sys.modules[name]
    if not os.path.isfile(path):
        if not needed_for:
            return None
        fail(f"{needed_for} needs {file}, an optional part of this project; put {file} beside common.py ({HERE})")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# What a score model made from a causal LM's checkpoint (a value model, as the scripts start one) reports: its new
# head missing from the checkpoint, and the checkpoint's LM head unused
NEW_HEAD = re.compile(r"score\.(weight|bias)")
UNUSED_LM_HEAD = re.compile(r"(lm_head|embed_out)\.(weight|bias)")


class LoadReport(logging.Filter):
    """transformers' report on a from_pretrained load (a table of the weights it did not load as saved), as the user
    needs it. A score model whose only new weights are its head, from a causal LM's checkpoint, is said in one note:
    a value model starts so on purpose, while a reward model or judge without a trained head must be replaced. Any
    other report is passed on, without the terminal's colour codes when stderr is not a terminal (a log file)."""

    def filter(self, record) -> bool:
        text = ANSI_ESCAPE.sub("", record.getMessage())
        title = re.match(r"(\S+) LOAD REPORT from: (.*)", text)
        if title is None:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in text.splitlines()[2:] if "|" in line]
        expected = [
            (status == "MISSING" and NEW_HEAD.fullmatch(key))
            or (status == "UNEXPECTED" and UNUSED_LM_HEAD.fullmatch(key))
            for key, status, *_ in rows
        ]
        if rows and all(expected) and any(row[1] == "MISSING" for row in rows):
            note(
                f"{title[2]} has no score head: {title[1]} starts one from random weights, as a value model made "
                f"from a causal LM does; a --reward-model or --judge needs a checkpoint with a trained head"
            )
            return False
        if not sys.stderr.isatty():
            record.msg = text
            record.args = ()
        return True


# Quiet by default, on these messages only: peft reads a property that transformers deprecates (nothing for the user
# to change), and transformers' load report goes through LoadReport
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("transformers.modeling_utils").addFilter(LoadReport())


@dataclasses.dataclass
class RunArgs:
    """The command-line fields every script has: the models and data it reads, where they go and in what precision,
    LoRA, logging and checkpoints, the optimiser. Each script's `Args(common.RunArgs)` adds its algorithm's fields and
    re-declares a field of these only where its default or its meaning differs, with its own docstring. These come
    first in each script's --help, in the same order in every script, and the script's own fields after them."""

    preset: str | None = None
    """start from a paper's released settings, a name of the script's PRESETS (a wrong name lists them); flags given
    on the command line win over them"""

    # The optimiser
    mini_batch_size: int = 16
    """rows per rank per optimiser step"""
    micro_batch_size: int = 0
    """rows per rank per forward/backward pass (0: the whole mini-batch in one): the optimiser step's gradient is
    accumulated over mini_batch_size / micro_batch_size passes, each loss weighted by its micro-batch's share of the
    mini-batch, so that accumulation changes the memory a step takes and nothing else"""
    learning_rate: float = 3e-5
    """policy learning rate (AdamW)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip, of each trained model"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2)"""
    adam_eps: float = 1e-8
    """AdamW's ε, added to √v̂ in the update's denominator"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_warmup_steps: int = 0
    """optimiser steps of linear learning-rate warm-up from lr/N to lr"""
    lr_schedule: Literal["constant", "linear", "cosine", "inverse_sqrt"] = "constant"
    """the learning rate after warm-up: constant, linear or cosine decay to 0 at the last step, or inverse_sqrt
    (sqrt(warm-up / step)); each trained model counts its own optimiser steps"""
    unfrozen_layers: int = -1
    """train only the top N transformer blocks of the policy (and what follows them); -1 = all"""

    # Models and data
    model_name_or_path: str = "builtin"
    """the starting (SFT) policy: a hub name, a local folder, or `builtin`"""
    reward_model: list[str] = dataclasses.field(default_factory=lambda: ["builtin"])
    """reward(s), summed: 1-output classifiers (hub name, folder, `builtin`), `module:function` callables, URLs"""
    reward_weights: list[float] = dataclasses.field(default_factory=list)
    """weight of each --reward-model in the sum (default 1 each)"""
    dataset: str = "builtin"
    """prompts: a hub name, a folder saved with `save_to_disk`, a .jsonl/.json/.parquet file, or `builtin`"""
    prompt_field: str = "prompt"
    """the column of --dataset holding the prompt text"""
    chat_template: bool = False
    """render each prompt with the policy tokenizer's chat template, the assistant turn opened: HH dialogues become
    user / assistant messages, a `messages` column is read as it is; without it prompts stay raw text"""
    eval_split: str = "test"
    """the held-out split of --dataset evaluated; 'train[-5%:]' holds that slice of the same file out of training"""
    max_prompt_length: int = 16
    """prompts are left-truncated to this many tokens (and to what the context leaves after the response)"""
    max_new_tokens: int = 32
    """the longest response sampled; responses read from a dataset are cut to this many tokens, EOS included"""
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    """cut a response before the first of these strings in its text (HH: "Human:" "Assistant:")"""
    forward_batch_size: int | None = None
    """rows per no-grad forward pass (reward models, π_old, π_ref, V) over the rows an update reads; default
    --micro-batch-size, else --mini-batch-size, so that scoring holds no more than one forward/backward pass does"""
    trust_remote_code: bool = False
    """allow model repositories to run their own code (off unless you trust them)"""

    # Devices and precision
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (0 also runs without DeepSpeed installed)"""
    bf16: bool = False
    """train in bfloat16 (DeepSpeed) and hold frozen models in bfloat16"""
    offload: bool = False
    """offload optimizer states (and ZeRO-3 parameters) to CPU"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in the backward pass instead of keeping them: less memory for about a
    third more compute, in the update's forward passes only"""
    logprob_chunk: int | Literal["auto"] = "auto"
    """response positions per chunk of the LM head when log-probs are computed (each chunk recomputed in the backward
    pass), so that no [rows, positions, vocabulary] logits tensor is alive: `auto` chunks where those logits would
    exceed 128 MiB of float32 (a large vocabulary times long responses), 0 never, N always in N positions"""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """the attention kernel of every model loaded (default: transformers' choice, sdpa where the model has it)"""
    reward_device: str = "policy"
    """where the reward model(s) live: `policy`, `cpu`, or `cuda:N`"""
    reward_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """the reward model's weights: auto = bfloat16 with --bf16, else float32; float16 for a reward model trained in
    fp16 (GPU)"""

    # LoRA
    lora_r: int = 0
    """rank r of a LoRA adapter trained in place of the policy's weights (0: no adapter, the weights train)"""
    lora_alpha: float = 16.0
    """LoRA's scale α: an adapted layer computes W x + (α / r) · B A x"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input, in the update's forward passes"""
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    """the layers that get an adapter, by name (e.g. q_proj v_proj); all-linear: every linear layer but the output
    head (as QLoRA and the A-LoL paper did)"""
    load_in_4bit: bool = False
    """hold the frozen base weights in 4-bit NF4 (QLoRA): needs --lora-r, a CUDA GPU, bitsandbytes, --zero-stage 0"""

    # Logging and checkpoints
    exp_name: str = "run"
    """the name of this experiment (each script's default: its own name); the run is written to
    {output_dir}/{exp_name}__{seed}__{time}"""
    seed: int = 1
    """seed of the experiment (rank r samples with seed + r)"""
    output_dir: str = "runs"
    """folder for TensorBoard logs, metrics.jsonl and checkpoints"""
    track: bool = False
    """log the run to Weights & Biases too (`pip install wandb`): args, code, TensorBoard scalars, sample tables"""
    wandb_project_name: str = "onefile-rlhf"
    """the W&B project of --track"""
    wandb_entity: str | None = None
    """the W&B entity (user or team) of --track; None: your default entity"""
    eval_every: int = 10
    """evaluate on held-out prompts every this many iterations (and before and after training)"""
    eval_prompts: int = 128
    """number of held-out prompts per evaluation, over all ranks"""
    log_samples: int = 16
    """responses shown at each evaluation (rank 0's first prompts) in TensorBoard, samples.jsonl, W&B; 0: none"""
    progress: bool = True
    """tqdm bars on rank 0 for long phases; off when stdout is not a terminal"""
    save_every: int = 0
    """write a resumable checkpoint to {run dir}/resume every this many steps (0: only when stopped by SIGTERM /
    Ctrl-C); the final policy is an HF folder"""
    resume: str | None = None
    """continue a stopped run from its checkpoint folder (runs/RUN_NAME/resume), with the same arguments"""
    local_rank: int = 0
    """set by the `deepspeed` launcher; the rank is read from the environment"""


def parse_args(args_class: type[RunArgs], presets: dict, argv=None) -> RunArgs:
    """The script's `Args` from the command line. `--preset NAME` makes the values of presets[NAME] (a paper's
    released settings) the defaults, so that every flag given on the command line still wins over them:
    `--preset hh --learning-rate 1e-5` runs the preset with another learning rate."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    name = None
    for i, word in enumerate(argv):
        if word == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif word.startswith("--preset="):
            name = word.split("=", 1)[1]
    if name is None:
        return tyro.cli(args_class, args=argv)
    if name not in presets:
        fail(f"--preset {name} is not one of this script's presets; pick one of: {', '.join(presets) or 'none'}")
    default = dataclasses.replace(args_class(), **presets[name], preset=name)
    return tyro.cli(args_class, args=argv, default=default)


class Run(NamedTuple):
    """This process's place in the run, and where the run is written."""

    rank: int
    world_size: int
    device: torch.device
    name: str  # {exp_name}__{seed}__{unix time}
    dir: str  # {output_dir}/{name}: args.json, metrics.jsonl, samples.jsonl, TensorBoard events, the saved models
    script: str  # whose checkpoints these are: "ppo.py", or "apa.py --offline-dataset" (modes do not mix)

    @property
    def resume_path(self) -> str:  # the resumable checkpoint, rewritten in place
        return os.path.join(self.dir, "resume")


def start_run(args: RunArgs, script: str, one_weight_per_reward_model: bool = True) -> Run:
    """What every script checks before it loads anything (each --reward-model entry, check_reward_entry; one
    --reward-weights value per --reward-model, unless the script weighs something else and checks that itself; the
    LoRA flags; wandb for --track; a --resume folder this script with this many ranks can continue), then the process
    group. `script` names the script and its mode: a
    checkpoint is continued only by the same."""
    set_logprob_chunk(args.logprob_chunk)
    check_micro_batch(args)
    for entry in args.reward_model:
        check_reward_entry(entry)
    weights = args.reward_weights
    if one_weight_per_reward_model and weights and len(weights) != len(args.reward_model):
        fail(
            f"--reward-weights has {len(weights)} values for {len(args.reward_model)} --reward-model entries; give "
            f"one weight per reward model"
        )
    check_lora(args)
    if args.track:
        optional_part("tracking.py", "--track").import_wandb()  # missing: fail now, not after the models are loaded
    rank, world_size, device = init_distributed(args.zero_stage)
    library_bars(args.progress and rank == 0)
    if args.resume:
        check_resume(args.resume, script)
    # One start time for every rank (rank 0's): ranks that cross a second apart would name two run folders
    started = all_reduce_cpu(torch.tensor([time.time() if rank == 0 else 0.0], dtype=torch.float64))
    name = f"{args.exp_name}__{args.seed}__{int(started.item())}"
    return Run(
        rank=rank,
        world_size=world_size,
        device=device,
        name=name,
        dir=os.path.join(args.output_dir, name),
        script=script,
    )


def check_micro_batch(args: RunArgs):
    """--micro-batch-size must split each mini-batch into equal passes."""
    micro = args.micro_batch_size
    if micro < 0 or (micro and args.mini_batch_size % micro):
        fail(
            f"--micro-batch-size {micro} does not divide --mini-batch-size {args.mini_batch_size}; pick a divisor of "
            f"it (or 0 for the whole mini-batch in one pass)"
        )


def micro_batches(idx: torch.Tensor, micro_batch_size: int) -> tuple[torch.Tensor, ...]:
    """The rows `idx` of one mini-batch as the micro-batches of --micro-batch-size rows that accumulate its gradient
    (0: one micro-batch, the whole mini-batch)."""
    return idx.split(micro_batch_size or len(idx))


def token_share(micro_mask: torch.Tensor, mini_mask: torch.Tensor) -> float:
    """The micro-batch's share of the mini-batch's response tokens: a token-mean loss over the micro-batch times this
    is its part of the mini-batch's token mean, so the accumulated gradient is the mini-batch's."""
    return micro_mask.sum().item() / max(mini_mask.sum().item(), 1)


def checkpoint_if_due(run: Run, args: RunArgs, *, step: int, engines: dict, state: dict, signum: int):
    """Write the resumable checkpoint every --save-every steps, or now when the run was signalled (`signum`, from
    stop_requested(); 0 if not); after a signal the run then exits with 128 + signum."""
    if signum or (args.save_every and step % args.save_every == 0):
        save_resume(
            path=run.resume_path,
            script=run.script,
            step=step,
            engines=engines,
            state=state,
            args=args,
            run_dir=run.dir,
            rank=run.rank,
        )
    if signum:
        exit_after_signal(signum, path=run.resume_path, script=run.script, rank=run.rank)


# ---- The built-in task: builtin/ beside this file, the task a run uses by default (README, "The built-in task") ------
# builtin/ holds an SFT policy and a reward model trained on a tiny movie-review world, and prompt, offline and
# preference datasets; builtin/build.py built them and holds the task's gold score. A run only reads the folder.
BUILTIN = "builtin"  # the model / dataset name that stands for the built-in task
# The task ships with the project, built once by `python builtin/build.py`: training is not bit-exact
# across CPUs (Intel / AMD, AVX2 / AVX-512), so a task built on each machine would differ from machine to machine.
BUILTIN_SHIPPED = os.path.join(HERE, "builtin")
BUILTIN_MANIFEST = "MANIFEST.json"
# What to pass instead of `builtin` where builtin/ is missing, by the role resolve() looks it up for
BUILTIN_INSTEAD = {
    "sft": "model (--model-name-or-path: a local folder or a hub name)",
    "reward": "reward (--reward-model: a model folder, a hub name, module:function or a URL)",
}


def resolve(name: str, role: str) -> str:
    """Map `builtin` to the built-in artefact for `role` (sft, reward, data/prompts, ...); other names unchanged.
    Without the built task beside this file (common.py copied with one script), `builtin` is a one-line error."""
    if name != BUILTIN:
        return name
    if not os.path.exists(os.path.join(BUILTIN_SHIPPED, BUILTIN_MANIFEST)):
        instead = BUILTIN_INSTEAD.get(role, "dataset (a local folder, a .jsonl / .json / .parquet file or a hub name)")
        fail(
            f"'{BUILTIN}' names the built-in task, which is not beside common.py (no {BUILTIN_SHIPPED}/"
            f"{BUILTIN_MANIFEST}); pass your own {instead} instead, and likewise for every other option left at "
            f"'{BUILTIN}' (a script's model, reward and dataset by default)"
        )
    return os.path.join(BUILTIN_SHIPPED, role)


def builtin_gold_score(texts) -> list:
    """The built-in task's true objective (builtin/build.py's builtin_gold_score), for responses decoded WITH special
    tokens: mean word polarity in [-1, 1], minus 1 if the response never emitted <eos>."""
    return optional_part("builtin/build.py", "the built-in task's gold score").builtin_gold_score(texts)


# ---- Datasets: a builtin folder, a save_to_disk folder, a .jsonl / .json / .parquet file or a hub name ---------------
def _first_line(error: Exception) -> str:
    """An exception's message cut to its first line and 160 characters, for a one-line error."""
    return str(error).strip().splitlines()[0][:160]


def split_rows(split: str, sizes: dict, name: str) -> list:
    """The row numbers of `split` ("train", or datasets' slice syntax: "train[-5%:]", "train[:100]",
    "train[:10%]+train[-10%:]") in a dataset whose splits have `sizes` rows, as [(split name, rows)]."""
    import datasets

    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute(sizes)
    except (ValueError, AssertionError) as e:
        if split.split("[")[0] in sizes:
            fail(f"cannot read the split '{split}' of '{name}' ({_first_line(e)}); write a slice as 'train[-5%:]'")
        fail(
            f"dataset '{name}' has no split '{split.split('[')[0]}' (it has: {', '.join(sizes)}); pass one of those, "
            f"or hold out part of one for evaluation: --eval-split '{next(iter(sizes))}[-5%:]'"
        )
    return [(part.splitname, range(part.from_, part.to)) for part in instructions]


def _stamp(path: str):
    """What changes when the file or folder at `path` is written again: each file's name, size and modification time
    (a folder's top-level files); None for a hub name."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return (stat.st_size, stat.st_mtime_ns)
    if os.path.isdir(path):
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))
    return None


@functools.lru_cache(maxsize=4)
def _read_dataset(path: str, stamp):
    """The dataset at `path`, read once per process while it is unchanged (`stamp`): a training split and an
    --eval-split of the same file read it once."""
    import datasets

    if os.path.isdir(path) and {"dataset_dict.json", "state.json"} & set(os.listdir(path)):  # save_to_disk
        return datasets.load_from_disk(path)
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet")):
        return datasets.load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path)
    return datasets.load_dataset(path)


def load_split(name: str, split: str, role: str, flag: str, held_out=None):
    """A split of `builtin`'s `role` folder, a save_to_disk folder, a .jsonl/.json/.parquet file (one split, `train`)
    or a hub name. `split` may be a slice in datasets' syntax ("train[:100]", "train[-5%:]"). `held_out`, the
    (dataset, split) evaluated: when it slices the same dataset and split, its rows are left out of this one, so
    that `--eval-split 'train[-5%:]'` holds the last 5% of a file out of training (the two exactly complementary)."""
    import datasets

    path = resolve(name, role)
    try:
        data = _read_dataset(path, _stamp(path))
    except Exception as e:  # datasets raises many kinds of error; the user needs one line
        fail(
            f"cannot load dataset '{name}' ({_first_line(e)}); pass {flag} a dataset folder, a .jsonl/.json/.parquet "
            f"file or a hub name"
        )
    if not isinstance(data, datasets.DatasetDict):  # one saved Dataset: whatever the split is called
        data = datasets.DatasetDict({split.split("[")[0]: data})
    sizes = {key: len(rows) for key, rows in data.items()}
    parts = split_rows(split, sizes, name)
    held_path = resolve(held_out[0], "data/prompts") if held_out is not None else None
    if held_path and os.path.realpath(held_path) == os.path.realpath(path) and "[" in held_out[1]:  # a slice of it
        excluded = {(key, i) for key, rows in split_rows(held_out[1], sizes, name) for i in rows}
        parts = [(key, [i for i in rows if (key, i) not in excluded]) for key, rows in parts]
        if not any(rows for _, rows in parts):
            fail(f"--eval-split '{held_out[1]}' holds out every row of '{split}' of '{name}'; hold out fewer")
    if len(parts) == 1 and parts[0][1] == range(sizes[parts[0][0]]):  # a whole split, as it is
        return data[parts[0][0]]
    return datasets.concatenate_datasets([data[key].select(rows) for key, rows in parts])


def load_prompts(name: str, split: str, prompt_field="prompt", flag="--dataset", held_out=None):
    """The prompts of a split: its `prompt_field` column, or the prompts of HH / TL;DR / `messages` rows
    (canonical_rows). A prompt is a text, or a list of chat messages [{role, content}] (rendered by render_prompts).
    `held_out`: the (dataset, split) evaluated, left out of this split where it slices it (load_split)."""
    data = load_split(name, split, role="data/prompts", flag=flag, held_out=held_out)
    prompts = canonical_rows(data, name).get("prompt") if prompt_field == "prompt" else None
    if not prompts:
        if prompt_field not in data.column_names:
            fail(
                f"dataset '{name}' has no column '{prompt_field}' (it has: {', '.join(data.column_names)}); "
                f"pass --prompt-field NAME"
            )
        prompts = data[prompt_field]
    check_rows(name, prompt=prompts)
    return [p if isinstance(p, list) else str(p) for p in prompts]


def load_offline_rows(name: str, split: str = "train", flag="--offline-dataset", fields=None, held_out=None):
    """(prompts, responses, rewards) from rows {prompt, response, reward}, or from preference rows of any shape that
    canonical_rows reads: two rows each, reward 1 for the chosen response and 0 for the rejected one.
    `fields` maps those names to the file's own columns, e.g. {"prompt": "question", "reward": "score"}. `held_out`:
    the (dataset, split) evaluated, left out of these rows where it slices the same file (load_split)."""
    data = load_split(name, split, role="data/offline", flag=flag, held_out=held_out)
    renames = {col: key for key, col in (fields or {}).items() if col != key and col in data.column_names}
    data = data.remove_columns([k for k in renames.values() if k in data.column_names]).rename_columns(renames)
    rows = canonical_rows(data, name)
    if {"prompt", "response", "reward"} <= set(rows):
        check_rows(name, prompt=rows["prompt"], response=rows["response"])
        bad = [i for i, r in enumerate(rows["reward"]) if not math.isfinite(float(r))]
        if bad:
            fail(
                f"dataset '{name}' has {len(bad)} row(s) whose reward is NaN or inf (the first: row {bad[0]}); fix "
                f"or drop them"
            )
        return rows["prompt"], rows["response"], [float(r) for r in rows["reward"]]
    if "chosen" in rows:
        n = len(rows["prompt"])
        check_rows(name, prompt=rows["prompt"], response=rows["chosen"] + rows["rejected"])
        return rows["prompt"] * 2, rows["chosen"] + rows["rejected"], [1.0] * n + [0.0] * n
    fail(
        f"dataset '{name}' has columns {', '.join(data.column_names)}; offline rows need prompt, response, reward "
        f"(or prompt, chosen, rejected, or HH dialogues chosen, rejected)"
    )


def load_preference_pairs(name: str, split: str = "train", flag="--offline-dataset", held_out=None):
    """(prompts, chosen, rejected) of preference rows of any shape canonical_rows reads: {prompt, chosen, rejected},
    rm-static, HH transcripts, chat preference rows; `builtin`: the built-in task's preference rows. `held_out`: the
    (dataset, split) evaluated, left out where it slices the same file (load_split)."""
    data = load_split(name, split, role="data/preference", flag=flag, held_out=held_out)
    rows = canonical_rows(data, name)
    if "chosen" not in rows:
        fail(
            f"dataset '{name}' has columns {', '.join(data.column_names)}; preference pairs need prompt, chosen, "
            f"rejected (or HH dialogues chosen, rejected)"
        )
    check_rows(name, prompt=rows["prompt"], response=rows["chosen"] + rows["rejected"])
    return rows["prompt"], rows["chosen"], rows["rejected"]


def load_rankings(name: str, split: str = "train", flag="--offline-dataset", held_out=None):
    """(prompts, candidates, rewards): per prompt, a list of n >= 2 candidate responses and a list of their n rewards
    (higher is better), in the dataset's order. Rows: {prompt, responses, rewards}; PRO's {prefix, suffix, reward}
    (one ranking per row, prompt and responses as pro_pairs joins them); or preference rows of any shape (rankings
    of 2, rewards 1 and 0). `builtin`: 4 samples of the SFT policy per prompt, scored by the built-in reward model.
    A row whose candidates and rewards differ in length, or with fewer than 2 candidates, fails with one line.
    `held_out`: the (dataset, split) evaluated, left out where it slices the same file (load_split)."""
    data = load_split(name, split, role="data/rankings", flag=flag, held_out=held_out)
    cols = set(data.column_names)
    if {"prompt", "responses", "rewards"} <= cols:
        prompts = list(data["prompt"])
        candidates = [[str(response) for response in row] for row in data["responses"]]
        rewards = list(data["rewards"])
    elif {"prefix", "suffix", "reward"} <= cols:  # PRO's rows, read by formats.py
        prompts, candidates, rewards = optional_part("formats.py", f"dataset '{name}' (PRO rows)").pro_rankings(
            data, name
        )
    else:
        prompts, chosen, rejected = load_preference_pairs(name, split, flag, held_out=held_out)
        candidates = [[good, bad] for good, bad in zip(chosen, rejected)]
        rewards = [[1.0, 0.0]] * len(prompts)
    for i, (row_candidates, row_rewards) in enumerate(zip(candidates, rewards)):
        if len(row_candidates) != len(row_rewards):
            fail(
                f"dataset '{name}' row {i} has {len(row_candidates)} candidates and {len(row_rewards)} rewards; give "
                f"one reward per candidate"
            )
        if len(row_candidates) < 2:
            fail(f"dataset '{name}' row {i} has {len(row_candidates)} candidate; a ranking needs at least 2")
        if not all(math.isfinite(float(r)) for r in row_rewards):
            fail(f"dataset '{name}' row {i} has a NaN or inf reward; fix or drop it")
    check_rows(name, prompt=prompts, response=[c for row in candidates for c in row])
    return prompts, candidates, [[float(r) for r in row] for row in rewards]


def check_rows(name: str, **columns):
    """Fail on the first empty text (or empty list of messages) of any column (prompt=..., response=...), naming the
    row and the fix."""
    for kind, texts in columns.items():
        empty = [i for i, text in enumerate(texts) if not (text if isinstance(text, list) else str(text).strip())]
        if empty:
            fail(
                f"dataset '{name}' has {len(empty)} row(s) with an empty {kind} (the first: row {empty[0]}); remove "
                f"them, or map another column with --{kind}-field"
            )


# ---- Dataset and prompt formats: plain columns here, HH dialogues, chat messages and PRO rows in formats.py ----------
# canonical_rows turns every known dataset shape into plain columns; a prompt is a text or a list of chat messages.
# formats.py, an optional part beside this file, is imported only where a row's shape or --chat-template needs it.
def canonical_rows(data, name: str) -> dict:
    """A dataset as columns {prompt, response[, reward]} or {prompt, chosen, rejected}: plain columns as they are
    ({prompt, chosen, rejected} as texts; rm-static's {prompt, response, chosen, rejected} is a preference row);
    HH transcripts {chosen, rejected}, chat `messages`, PRO rows {prefix, suffix, reward} and TL;DR {prompt, label}
    as formats.py's canonical_rows reads them."""
    cols = set(data.column_names)
    shaped = "prompt" not in cols and (
        "messages" in cols or {"chosen", "rejected"} <= cols or {"prefix", "suffix", "reward"} <= cols
    )
    tldr = {"prompt", "label"} <= cols and "response" not in cols and not {"chosen", "rejected"} <= cols
    if shaped or tldr:
        return optional_part("formats.py", f"dataset '{name}' (HH, chat, PRO or TL;DR rows)").canonical_rows(data, name)
    if {"prompt", "chosen", "rejected"} <= cols:
        return {k: [str(v) for v in data[k]] for k in ("prompt", "chosen", "rejected")}
    return {k: data[k] for k in ("prompt", "response", "reward") if k in cols}


def prompt_messages(prompt) -> list:
    """A prompt as chat messages [{role, content}] (formats.py's prompt_messages: an HH prompt as alternating user /
    assistant turns)."""
    return optional_part("formats.py", "a prompt as chat messages").prompt_messages(prompt)


def prompt_text(prompt) -> str:
    """A prompt as plain text: a text as it is; chat messages as an HH transcript (formats.py's prompt_text)."""
    if isinstance(prompt, str):
        return prompt
    return optional_part("formats.py", "a prompt of chat messages").prompt_text(prompt)


def render_prompts(tokenizer, prompts, chat_template: bool) -> list:
    """The text the policy sees for each prompt: with `chat_template`, the tokenizer's template of its messages with
    the assistant turn opened (add_generation_prompt); without, the prompt text as it is."""
    if not chat_template:
        if any(not isinstance(p, str) for p in prompts):
            fail(
                "the dataset's prompts are chat messages; pass --chat-template to render them with the tokenizer's "
                "chat template"
            )
        return list(prompts)
    if not tokenizer.chat_template:
        fail(
            f"the tokenizer of '{tokenizer.name_or_path}' has no chat template (chat_template in "
            f"tokenizer_config.json, or chat_template.jinja); drop --chat-template, or use a chat model's tokenizer"
        )
    return [
        tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True) for p in prompts
    ]


# ---- Token ids: prompts left-padded, responses right-padded, cut after EOS, decoded back to text ---------------------
def prompt_budget(max_prompt_length: int, max_new_tokens: int, context: int) -> int:
    """The tokens a prompt may take: --max-prompt-length, and no more than the context leaves after the response."""
    budget = min(max_prompt_length, context - max_new_tokens)
    if budget < 1:
        fail(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens; lower --max-new-tokens"
        )
    return budget


def fitting_prompts(
    tokenizer, prompts, *, max_prompt_length, max_new_tokens, context, chat_template=False, what="prompts", need=1
) -> list:
    """The indices of the prompts that encode_prompts can fit: all of them for plain text (cut on the left); under
    --chat-template, those whose last user turn fits (formats.py's fitting_prompts). Callers keep these rows of every
    column (prompts, responses, rewards), so that rows stay aligned."""
    if not chat_template:
        return list(range(len(prompts)))
    return optional_part("formats.py", "--chat-template").fitting_prompts(
        tokenizer,
        prompts,
        max_prompt_length=max_prompt_length,
        max_new_tokens=max_new_tokens,
        context=context,
        chat_template=chat_template,
        what=what,
        need=need,
    )


def rows_at(kept, *columns) -> list:
    """Each column (a list, or a datasets.Dataset) cut to the rows `kept` (fitting_prompts' indices), in order."""
    return [column.select(kept) if hasattr(column, "select") else [column[i] for i in kept] for column in columns]


def encode_prompts(tokenizer, prompts, max_prompt_length: int, max_new_tokens: int, context: int, chat_template=False):
    """Token ids of each prompt (rendered by render_prompts: raw text, or the chat template with the assistant turn
    opened) within the prompt budget, and how many were shortened to fit it. Text is LEFT-truncated (a leading BOS
    kept first); a chat prompt loses whole turns from its start (fit_chat_prompt), never part of a message. Chat
    prompts that cannot fit are refused: keep the rows of fitting_prompts first."""
    budget = prompt_budget(max_prompt_length, max_new_tokens, context)
    texts = render_prompts(tokenizer, prompts, chat_template)
    ids = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]  # a template writes its own BOS
    if any(len(row) == 0 for row in ids):
        fail("the dataset has an empty prompt; remove it or pick another --prompt-field")
    n_truncated = sum(len(row) > budget for row in ids)
    if chat_template:
        fit_chat_prompt = optional_part("formats.py", "--chat-template").fit_chat_prompt
        fitted = [row if len(row) <= budget else fit_chat_prompt(tokenizer, p, budget) for row, p in zip(ids, prompts)]
        if None in fitted:
            fail(
                f"{fitted.count(None)} chat prompt(s) do not fit the prompt budget of {budget} tokens even as their "
                f"last user turn; raise --max-prompt-length (or keep the rows of common.fitting_prompts)"
            )
        return fitted, n_truncated

    def cut(row):
        # A prompt that starts with BOS (Llama, Mistral, Gemma) keeps it first when cut on the left: the model never
        # saw a text without it. GPT-2 / Pythia / Qwen add none.
        keep = row[:1] if row[0] == tokenizer.bos_token_id else []
        return keep + row[len(row) - budget + len(keep) :] if len(row) > budget else row

    return [cut(row) for row in ids], n_truncated


def pad_left(rows, pad_id: int, device=None):
    """List of token-id lists -> (ids, attention_mask), both [batch, longest], padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.to(device), mask.to(device)


class Batch(NamedTuple):
    """Rows of (left-padded prompt | right-padded response), in the order every forward pass takes them:
    `forward_logprobs(model, *batch)`."""

    query_ids: torch.Tensor  # [batch, prompt_len], left-padded
    query_mask: torch.Tensor  # [batch, prompt_len], 1 on prompt tokens
    response_ids: torch.Tensor  # [batch, response_len], right-padded
    response_mask: torch.Tensor  # [batch, response_len], float, 1 on response tokens (their EOS included)

    def rows(self, index) -> "Batch":
        """The rows at `index` (a slice, a list or a tensor of row numbers)."""
        return Batch(*(tensor[index] for tensor in self))


def encode_offline_rows(
    tokenizer, prompts, responses, *, max_prompt_length, max_new_tokens, context, chat_template=False, device=None
) -> Batch:
    """Dataset rows (prompt, response text) as a Batch. Each response is cut to --max-new-tokens − 1 tokens and
    ends in EOS (an EOS in its text is dropped first), so that every row ends as a sampled response that stopped
    does, and the last response token is where a sequence's reward goes."""
    prompts = [prompt if isinstance(prompt, list) else str(prompt) for prompt in prompts]  # text, or chat messages
    query_rows, _ = encode_prompts(
        tokenizer,
        prompts,
        max_prompt_length=max_prompt_length,
        max_new_tokens=max_new_tokens,
        context=context,
        chat_template=chat_template,
    )
    eos = tokenizer.eos_token
    texts = [str(response).replace(eos, "").rstrip() if eos else str(response) for response in responses]
    response_rows = [
        ids[: max_new_tokens - 1] + [tokenizer.eos_token_id]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    query_ids, query_mask = pad_left(query_rows, tokenizer.pad_token_id, device)
    width = max(len(row) for row in response_rows)
    response_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in response_rows])
    response_mask = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in response_rows])
    return Batch(query_ids, query_mask, response_ids.to(device), response_mask.to(device))


def truncate_after_eos(response_ids, eos_id: int, pad_id: int, tokenizer=None, stop_strings=()):
    """Cut responses after their first EOS (kept, mask 1): returns (response_ids, response_mask, ended_with_eos).
    With stop strings (HH: "Human:", "Assistant:"), a response whose decoded text contains one is also cut to the
    tokens before it (at least one token kept) and counts as ended."""
    is_eos = (response_ids == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    ids = response_ids.masked_fill(after_eos, pad_id)
    mask = (~after_eos).long()
    ended = is_eos.bool().any(1)
    if not stop_strings:
        return ids, mask, ended

    def decode(row, n):
        return tokenizer.decode(row[:n], skip_special_tokens=True)

    for b, row in enumerate(ids.tolist()):
        n = int(mask[b].sum())
        cut = min([i for i in (decode(row, n).find(s) for s in stop_strings) if i >= 0], default=-1)
        if cut >= 0:  # the longest prefix of tokens whose text ends before the stop string
            keep = max(next(k for k in range(n, -1, -1) if len(decode(row, k)) <= cut), 1)
            ids[b, keep:] = pad_id
            mask[b, keep:] = 0
            ended[b] = True
    return ids, mask, ended


def response_texts(tokenizer, query_ids, query_mask, response_ids, response_mask):
    """Each response as text, decoded after its prompt and cut off it: a SentencePiece tokenizer (Llama) drops the
    space that starts a text decoded alone, which would glue the reply's first word to the prompt's last."""
    prompts = [q[m.bool()] for q, m in zip(query_ids, query_mask)]
    responses = [r[m.bool()] for r, m in zip(response_ids, response_mask)]
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    both = tokenizer.batch_decode([torch.cat(pair) for pair in zip(prompts, responses)], skip_special_tokens=True)
    return [
        text[len(prompt) :] if text.startswith(prompt) else tokenizer.decode(response, skip_special_tokens=True)
        for prompt, text, response in zip(prompt_texts, both, responses)
    ]


def _decoded_prompts(tokenizer, query_ids, query_mask, prompts=None) -> list:
    """The rows' prompts as the dataset gave them (text or messages), or, without them, decoded from the ids."""
    if prompts is not None:
        return list(prompts)
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(query_ids, query_mask)]


# ---- Tokenizers and models: a hub name and a local folder take the same path -----------------------------------------
def _from_pretrained(cls, name: str, flag: str, **kwargs):
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # a missing folder or an unreachable hub name: one line, naming the flag
        fail(f"cannot load '{name}' ({_first_line(e)}); pass {flag} an existing local folder or a hub name")


def load_tokenizer(name: str, flag: str = "--model-name-or-path", padding_side="left", trust_remote_code=False):
    tok = _from_pretrained(AutoTokenizer, resolve(name, "sft"), flag=flag, trust_remote_code=trust_remote_code)
    tok.pad_token = tok.pad_token or tok.eos_token  # GPT-2 family: pad with EOS; masks decide what is padding
    tok.padding_side = padding_side
    # the scripts cut what they encode to fit (prompts left-truncated with a note, texts for a reward model to its
    # length): transformers' warning that a whole text is longer than the model reads is not for this tokenizer
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def load_model(
    name: str,
    kind: str,
    flag: str,
    dtype="float32",
    trust_remote_code=False,
    pad_token_id=None,
    attn_implementation=None,
    sharded=None,
    load_in_4bit=False,
):
    """kind `causal` (policy / reference) or `score` (reward / value: a 1-output sequence-classification model).

    A causal model comes without the sampling settings of its checkpoint's generation_config.json (temperature,
    top-k / top-p, repetition penalty, ...): `generate` fills every field that the script's GenerationConfig leaves
    unset from the model's own, so an instruct checkpoint would otherwise change how the script samples. Only its
    token ids (BOS, EOS, pad) are kept. A score model whose config has no pad id gets `pad_token_id` (its
    tokenizer's): transformers needs one to read a batch of more than one sequence.

    `attn_implementation`: eager / sdpa / flash_attention_2 (None: transformers' choice). `sharded`: a ZeRO-3
    DeepSpeed config; the model is then built and loaded shard by shard, each rank keeping its own (see
    sharded_loading). `load_in_4bit`: NF4 base weights (QLoRA; bitsandbytes and a GPU). Dropout is switched off in
    every model (see disable_dropout)."""
    if kind == "causal":
        cls = AutoModelForCausalLM
        role = "sft"
        extra = {}
    else:
        cls = AutoModelForSequenceClassification
        role = "reward"
        extra = {"num_labels": 1}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if load_in_4bit:
        extra.update(quantization_4bit(dtype))
    with sharded_loading(sharded):
        model = _from_pretrained(
            cls,
            resolve(name, role),
            flag=flag,
            dtype=getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            **extra,
        )
    if kind == "causal":
        saved = model.generation_config
        model.generation_config = GenerationConfig(
            bos_token_id=saved.bos_token_id,
            eos_token_id=saved.eos_token_id,
            pad_token_id=saved.pad_token_id,
        )
    elif model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return disable_dropout(model)


def disable_dropout(model):
    """Every dropout of the model off (p = 0), as most RLHF code does: the scripts switch their trained models to train
    mode for the update (gradient checkpointing and LoRA's own dropout act only there), and dropout in the base model
    would make π_θ's forward differ from the π_old that sampled the responses."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@contextlib.contextmanager
def sharded_loading(config):
    """With a ZeRO-3 DeepSpeed `config`, `from_pretrained` inside builds the model under deepspeed.zero.Init and
    loads the checkpoint into it shard by shard: each rank holds only its part of the weights, never a whole copy
    (transformers reads the config through HfDeepSpeedConfig while the object lives). None: nothing changes."""
    if config is None:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(config)  # noqa: F841 (transformers holds only a weak reference: it must live here)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def quantization_4bit(dtype: str) -> dict:
    """from_pretrained arguments for NF4 base weights with double quantisation, computing in `dtype` (QLoRA)."""
    if not torch.cuda.is_available():
        fail("--load-in-4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); drop --load-in-4bit on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        fail("--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def gradient_checkpointing(model, enabled: bool):
    """Recompute each block's activations in the backward pass instead of keeping them (transformers' own, the
    non-reentrant kind, in train mode only): memory for about a third more compute."""
    if enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---- Which weights train: LoRA adapters (peft) beside frozen weights, or the top blocks only -------------------------
def check_lora(args: RunArgs):
    """One-line errors for LoRA settings that cannot work together, before anything is loaded."""
    if args.lora_r < 0:
        fail(f"--lora-r must be 0 (no adapter: train the weights) or a positive rank, got {args.lora_r}")
    if args.load_in_4bit and not args.lora_r:
        fail(
            "--load-in-4bit trains an adapter on frozen 4-bit weights: pass --lora-r (e.g. 64), or drop --load-in-4bit"
        )
    if args.load_in_4bit and args.zero_stage:
        fail(
            f"--load-in-4bit runs without DeepSpeed (4-bit weights cannot be sharded or cast): use --zero-stage 0, "
            f"not {args.zero_stage}"
        )
    if args.lora_r and args.unfrozen_layers != -1:
        fail(
            f"--unfrozen-layers {args.unfrozen_layers} trains the top blocks' own weights, --lora-r an adapter on all "
            f"of them: pass one of the two"
        )
    if args.lora_r:  # the adapter's code: lora.py, beside this file
        lora = optional_part("lora.py", f"--lora-r {args.lora_r}")
        note = lora.lora_learning_rate_note(args.lora_r, args.learning_rate, getattr(type(args), "learning_rate", None))
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(note, flush=True)


def add_lora(model, kind: str, r: int, alpha: float, dropout: float, target_modules, quantized=False):
    """The model with a LoRA adapter of rank `r` on `target_modules`, scaled by alpha / r (lora.py's add_lora: only
    the adapter trains, and a `score` model's head beside it). r = 0: the model as it is, without lora.py."""
    if not r:
        return model
    return optional_part("lora.py", f"--lora-r {r}").add_lora(
        model, kind, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, quantized=quantized
    )


def freeze_lower_layers(model, unfrozen_layers: int):
    """Train only the top `unfrozen_layers` transformer blocks and what follows them (final norm, an untied head), as
    trlX's num_layers_unfrozen; -1 trains everything. The blocks are the model's longest ModuleList; parameters
    registered before the first trained block (embeddings, lower blocks; a head tied to them) are frozen."""
    if unfrozen_layers >= 0:
        blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
        in_blocks = {id(p) for p in blocks.parameters()}
        top = blocks[max(len(blocks) - unfrozen_layers, 0) :] if unfrozen_layers else []
        kept = {id(p) for block in top for p in block.parameters()}
        after_blocks = False
        for p in model.parameters():  # registration order: embeddings, blocks, final norm, head
            after_blocks = after_blocks or id(p) in in_blocks
            p.requires_grad_(id(p) in kept or (after_blocks and id(p) not in in_blocks))
    return model


def peft_model(model):
    """The PeftModel in a DeepSpeed engine / TorchEngine, or None when the model has no adapter."""
    from peft import PeftModel

    inner = getattr(model, "module", model)
    return inner if isinstance(inner, PeftModel) else None


def hf_model(model):
    """The transformers model itself, inside a DeepSpeed engine and a PeftModel (which injects its layers into it)."""
    peft = peft_model(model)
    return peft.get_base_model() if peft is not None else getattr(model, "module", model)


@contextlib.contextmanager
def adapter_off(model):
    """With LoRA, π_ref is the policy itself with its adapter switched off: the frozen base weights, no second copy.
    Without an adapter: nothing changes (π_ref is then a model of its own)."""
    peft = peft_model(model)
    if peft is None:
        yield
        return
    with peft.disable_adapter():
        yield


def merged_state_dict(state: dict, model) -> dict:
    """A PeftModel's state dict (`state`) as the plain transformers model's, each adapter merged into the weight it
    adapts (lora.py's merged_state_dict): `from_pretrained` loads the result as it is."""
    return optional_part("lora.py", "a LoRA adapter's merged checkpoint").merged_state_dict(state, model)


# ---- Rewards: a Python function, a URL, a sequence-classification model, or a reward model as released ---------------
# The hub revision a run loads of a released reward model (released.py), where its paper's code pinned one: trlX's pin
# (ppo_hh.py:159); later uploads differ. Cache keys (fingerprint) name the same revision.
RELEASED_REVISIONS = {"Dahoas/gptj-rm-static": "676bfd4d"}


def check_reward_entry(entry: str, flag: str = "--reward-model"):
    """What can be known of a --reward-model (or --judge) entry before anything is loaded or sampled, so that a wrong
    one stops a run in seconds: a `module:function` imports and is callable, a URL names a host, a local path (one
    that starts with / . or ~) exists. Another name is a hub name or a folder, for loading to find."""
    if entry == BUILTIN:
        resolve(entry, "reward")  # without builtin/: one line before anything is loaded
        return
    if is_remote_reward(entry):
        optional_part("released.py", f"{flag} {entry} (a scoring server)").check_url(entry, flag)
    elif is_function_entry(entry):
        import_reward_function(entry, flag)
    elif entry.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(entry)):
        fail(
            f"{flag} {entry} does not exist (seen from {os.getcwd()}); pass a model folder, a hub name, "
            f"module:function or a URL"
        )


def is_function_entry(name: str) -> bool:
    """Whether a --reward-model entry is `module:function` (and not a path that has a colon)."""
    module, _, function = name.partition(":")
    return bool(function) and module.replace(".", "").replace("_", "").isalnum() and not os.path.exists(name)


class Reward(NamedTuple):
    """A loaded --reward-model entry (load_reward). Called as score(query_ids, query_mask, response_ids, response_mask,
    prompts=None) -> [batch] float (CPU). `same_vocabulary`: it is a model with the policy's vocabulary, so it reads
    the policy's own token ids and a value model may start from it (value_model_start)."""

    score: Callable
    same_vocabulary: bool

    def __call__(self, *batch, **kwargs):
        return self.score(*batch, **kwargs)


def load_reward(
    name: str,
    tokenizer,
    placement="policy",
    zero_stage=0,
    micro_batch_size=8,
    bf16=False,
    trust_remote_code=False,
    dtype="auto",
) -> Reward:
    """One --reward-model entry as a Reward, score(query_ids, query_mask, response_ids, response_mask, prompts=None)
    -> [batch] float (CPU), where `prompts` are the rows' prompts as the dataset gave them (text or messages; without
    them, the decoded query ids stand in). An entry is:
    - `module:function`, a Python f(prompts, responses) -> list of floats: the prompts as given (texts, or lists of
      messages), the responses decoded after their prompts (reward_texts; the module is looked up in the working
      directory and on PYTHONPATH, import_reward_function);
    - `http://HOST:PORT/PATH` or `https://...`, a server that scores the same texts: POSTed JSON {"prompts": [...],
      "responses": [...]}, REMOTE_BATCH rows a request, it answers {"scores": [one number per response]}
      (_remote_reward: retried with back-off while it is down or answers 5xx, one error line when it stays down or
      answers badly);
    - a 1-output sequence-classification model (hub name, folder, builtin), frozen on `placement`. One whose tokenizer
      has a chat template scores its own template of (prompt messages, response); else one with the policy's
      vocabulary reads its head at the last real token of the policy's ids; else it reads the prompt text and the
      response re-encoded with its own tokenizer (left-truncated);
    - a released layout (trlX / Dahoas hf_ckpt.pt, trlX TL;DR, OpenAssistant), scored on its own text format
      (released.load_released_reward).
    URLs and released layouts are read by released.py, an optional part beside this file: without it a URL entry is
    a one-line error naming it, and a model entry is read as a 1-output sequence-classification model.
    `dtype` float32 / bfloat16 / float16, or auto (bfloat16 under --bf16); scores are returned in float32."""
    if is_remote_reward(name):  # before module:function, which a URL's colon would also match
        remote = optional_part("released.py", f"--reward-model {name} (a scoring server)")
        return Reward(score=remote._remote_reward(name, tokenizer), same_vocabulary=False)
    if is_function_entry(name):
        return Reward(score=_reward_function(name, tokenizer), same_vocabulary=False)
    if dtype == "auto":
        dtype = "bfloat16" if bf16 else "float32"
    path = resolve(name, "reward")
    released = optional_part("released.py")
    layout = released.reward_layout(path) if released is not None else "score"
    if layout != "score":  # a released layout (see released.py, "Reward models as released"): its own tokenizer
        score = released.load_released_reward(
            layout,
            path,
            tokenizer,
            placement=placement,
            zero_stage=zero_stage,
            micro_batch_size=micro_batch_size,
            dtype=dtype,
        )
        return Reward(score=score, same_vocabulary=False)
    frozen = _frozen_settings(placement, zero_stage=zero_stage, micro_batch_size=micro_batch_size, dtype=dtype)
    try:
        reward_tokenizer = load_tokenizer(
            name, flag="--reward-model", padding_side="right", trust_remote_code=trust_remote_code
        )
        model = load_model(
            name,
            kind="score",
            flag="--reward-model",
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            pad_token_id=reward_tokenizer.pad_token_id,
            sharded=zero3_config(**frozen),
        )
    except SystemExit as error:  # a one-line error of loading; without released.py, it may be a released layout
        if released is not None:
            raise
        fail(
            f"{str(error).removeprefix('error: ')}; if it is a reward model in a released layout (hf_ckpt.pt, a "
            f"trlX TL;DR pytorch_model.bin, OpenAssistant's gpt_neox_reward_model), put released.py beside common.py"
        )
    model = prepare_frozen(model, **frozen)
    same_vocabulary = reward_tokenizer.get_vocab() == tokenizer.get_vocab()
    own_template = bool(reward_tokenizer.chat_template)
    reward_tokenizer.truncation_side = "left"  # keep the response when a long dialogue must be cut
    max_length = min(reward_tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None) or 10**9)

    def own_texts(query_ids, query_mask, response_ids, response_mask, prompts):
        """The texts the reward model reads: its chat template of (prompt, response), or prompt text + response."""
        texts = reward_texts(tokenizer, query_ids, query_mask, response_ids, response_mask, prompts=prompts)
        pairs = zip(texts.prompts, texts.responses)
        if own_template:
            return [
                reward_tokenizer.apply_chat_template(
                    prompt_messages(prompt) + [{"role": "assistant", "content": reply}], tokenize=False
                )
                for prompt, reply in pairs
            ]
        return [prompt_text(prompt) + reply for prompt, reply in pairs]

    @torch.no_grad()
    def score_with_model(query_ids, query_mask, response_ids, response_mask, prompts=None):
        if same_vocabulary and not own_template:  # the head at the last real token (the response's EOS if any)
            ids, mask, pos = concat_inputs(query_ids, query_mask, response_ids, response_mask, device=model.device)
            last = query_ids.shape[1] + response_mask.sum(1).long().cpu() - 1
            return token_scores(model, ids, mask=mask, position_ids=pos)[torch.arange(len(ids)), last].cpu()
        joined = own_texts(query_ids, query_mask, response_ids, response_mask, prompts)
        enc = reward_tokenizer(
            joined,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=not own_template,  # a template writes its own BOS
        ).to(model.device)
        return model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, 0].float().cpu()

    return Reward(score=score_with_model, same_vocabulary=same_vocabulary)


def value_model_start(value_model: str, reward: Reward, rank: int) -> str:
    """The --value-model a run uses: `reward` (the first reward model) only where that reward is a model with the
    policy's vocabulary (the value model reads the policy's token ids), else `policy` with a note; another entry (a
    model name) as given. The run records the answer in args.json."""
    if value_model != "reward" or reward.same_vocabulary:
        return value_model
    if rank == 0:
        note(
            "the first --reward-model is not a model with the policy's tokenizer; the value model is initialised "
            "from the policy (--value-model policy)"
        )
    return "policy"


class RewardTexts(NamedTuple):
    """What a reward that reads text gets: the prompts as the dataset gave them (text or messages; decoded from the
    query ids without them) and the responses decoded after their prompts (response_texts)."""

    prompts: list
    responses: list


def reward_texts(tokenizer, query_ids, query_mask, response_ids, response_mask, prompts=None) -> RewardTexts:
    """The texts of rows (query_ids, query_mask, response_ids, response_mask) as a reward reads them."""
    return RewardTexts(
        prompts=_decoded_prompts(tokenizer, query_ids, query_mask, prompts=prompts),
        responses=response_texts(tokenizer, query_ids, query_mask, response_ids, response_mask),
    )


def _text_reward(tokenizer, score_texts):
    """load_reward's score(...) of a reward that reads text: score_texts(prompts, responses) -> one float per row."""

    def score_with_texts(query_ids, query_mask, response_ids, response_mask, prompts=None):
        texts = reward_texts(tokenizer, query_ids, query_mask, response_ids, response_mask, prompts=prompts)
        return torch.tensor(score_texts(texts.prompts, texts.responses), dtype=torch.float32)

    return score_with_texts


def import_reward_function(name: str, flag: str = "--reward-model"):
    """The function of a `module:function` entry. The module is looked up in the working directory first, then on
    PYTHONPATH, whether the script was started from that folder or not (`python /path/to/ppo.py` puts the script's
    folder on sys.path, not the working directory; launch.sh runs the scripts so)."""
    module, _, function = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        missing = e.name if isinstance(e, ModuleNotFoundError) else None
        if missing and module != missing and not module.startswith(f"{missing}."):  # found; what it imports is not
            fail(f"{flag} {name}: {module} imports {missing}, which is not installed; install it for {sys.executable}")
        fail(
            f"cannot import the reward function '{name}' ({e}); put {module}.py in the working directory "
            f"({os.getcwd()}) or on PYTHONPATH, and give {flag} as module:function"
        )
    if not callable(fn):
        fail(f"{flag} {name}: {function} in {module} is not a function; name a function f(prompts, responses)")
    return fn


def _reward_function(name: str, tokenizer):
    """A `module:function` --reward-model entry as load_reward's score(...): f(prompts, responses) -> floats."""
    fn = import_reward_function(name)

    def call(prompts, responses):
        scores = [float(s) for s in fn(prompts, responses)]
        if len(scores) != len(responses):
            fail(
                f"the reward function '{name}' returned {len(scores)} scores for {len(responses)} responses; it "
                f"must return one float per (prompt, response)"
            )
        return scores

    return _text_reward(tokenizer, call)


def is_remote_reward(name: str) -> bool:
    """Whether a --reward-model entry is a scoring server's URL (http:// or https://)."""
    return name.lower().startswith(("http://", "https://"))


def _frozen_settings(placement: str, zero_stage: int, micro_batch_size: int, dtype: str) -> dict:
    """prepare_frozen's (and zero3_config's) keyword arguments for a frozen reward model held in `dtype`."""
    return dict(
        placement=placement,
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
    )


# ---- Distributed set-up: the process group (also for one process), all-reduce, generate under ZeRO-3 -----------------
# DeepSpeed's CPU comm op, by its internal name (ShareMemCommBuilder.NAME in deepspeed/ops/op_builder/cpu/comm.py);
# written against deepspeed 0.19.8, the version requirements.txt pins
SHM_COMM_OP = "deepspeed_shm_comm"


def init_distributed(zero_stage: int):
    """Start the process group (also for one process without a launcher). Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if deepspeed is None and zero_stage > 0:
        fail(
            f"--zero-stage {zero_stage} needs DeepSpeed, which is not installed; pip install -r requirements.txt, "
            f"or use --zero-stage 0"
        )
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if deepspeed is None:
        dist.init_process_group(backend)
    else:
        if not cuda and os.environ["WORLD_SIZE"] == "1":
            # DeepSpeed compiles a shared-memory all-reduce op for CPU ranks when it starts; one process reduces
            # nothing, so it is marked unavailable and nothing is compiled. DeepSpeed's private API
            # (deepspeed/ops/__init__.py's lazily probed table), written against deepspeed 0.19.8 (requirements.txt).
            deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        elif not cuda:
            check_build_lock(SHM_COMM_OP)
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def check_build_lock(op_name: str, stale_after=600):
    """torch compiles an extension under a lock file and every later build waits for it to go, silently and
    forever: a build killed half-way leaves it behind. A lock older than `stale_after` seconds (a build takes about
    a minute) is reported in one line instead of a hang."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(op_name, False), "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > stale_after:
        fail(
            f"{lock} was left by a DeepSpeed build that was killed ({time.time() - os.path.getmtime(lock):.0f} s "
            f"old), and every build waits for it; remove it (rm {lock}) and start again"
        )


def _world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_cpu(values, op=None):
    """All-reduce a CPU tensor (NCCL only reduces CUDA tensors: it goes through this rank's GPU there)."""
    if _world() > 1:
        on_gpu = dist.get_backend() == "nccl"
        reduced = values.to(f"cuda:{torch.cuda.current_device()}") if on_gpu else values
        dist.all_reduce(reduced, op=op or dist.ReduceOp.SUM)
        values.copy_(reduced)
    return values


@contextlib.contextmanager
def gathered_for_generation(engine, zero3: bool):
    """Under ZeRO-3, the engine's whole model for one `generate` call: its shards gathered once, and DeepSpeed's
    per-module fetch / release hooks off meanwhile (as TRL's unwrap_model_for_generation does). With the hooks on,
    the prefetching that a traced training step turns on leaves parameters in flight when the gathered weights are
    partitioned again ("Cannot partition a param in flight" on GPUs, from the second rollout on). Else: nothing."""
    if not zero3:
        yield
        return
    model = engine.module
    # DeepSpeed's private API from here to the end (the optimizer's parameter_offload, its forward / backward hook
    # lists and _register_deepspeed_module in deepspeed/runtime/zero/parameter_offload.py, each parameter's
    # ds_active_sub_modules in partition_parameters.py): written against deepspeed 0.19.8 (requirements.txt)
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # frozen engines: the offload itself
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for param in model.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks = []
        offload.backward_hooks = []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # the hooks back; the fetch trace is recorded anew


# ---- Engines: a DeepSpeed engine on this rank's device, or a TorchEngine; learning-rate schedules --------------------
def deepspeed_config(
    zero_stage: int,
    micro_batch_size: int,
    lr: float,
    bf16=False,
    offload=False,
    max_grad_norm=1.0,
    betas=(0.9, 0.95),
    weight_decay=0.0,
    train=True,
    hidden_size=None,
    eps=1e-8,
    accumulation_steps=1,
):
    """`train=False`: a frozen model sharded like the policy. torch's AdamW (nothing to compile) unless offloading.
    With the model's `hidden_size` h, ZeRO's buffers are sized to it as transformers' Trainer sizes them ("auto"):
    gradients reduced in buckets of h² elements, ZeRO-3 prefetching 0.9 h² and keeping parameters under 10 h whole.
    DeepSpeed's own defaults (buckets of 5·10⁸ elements) would hold a whole small model's gradients twice."""
    cpu = {"device": "cpu", "pin_memory": True}
    zero = {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True}
    if hidden_size:
        zero["reduce_bucket_size"] = hidden_size**2
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size**2)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if offload and train:
        zero["offload_optimizer"] = cpu
    if offload and zero_stage == 3:
        zero["offload_param"] = cpu
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    if train:
        config["gradient_clipping"] = max_grad_norm
        adamw = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay, "torch_adam": not offload}
        config["optimizer"] = {"type": "AdamW", "params": adamw}
    return config


def zero3_config(placement, zero_stage, micro_batch_size, bf16=False, offload=False, fp16=False, hidden_size=None):
    """The DeepSpeed config of a model sharded under ZeRO-3 (at `policy`), for sharded_loading and prepare_frozen;
    None for a model that is not sharded."""
    if placement != "policy" or zero_stage != 3 or deepspeed is None:
        return None
    config = deepspeed_config(
        3,
        micro_batch_size=micro_batch_size,
        lr=0.0,
        bf16=bf16,
        offload=offload,
        train=False,
        hidden_size=hidden_size,
    )
    return {**config, "fp16": {"enabled": fp16}}


def hidden_size_of(model):
    """The hidden size of the (first) transformers model in `model`, to size DeepSpeed's buffers; None without one."""
    configs = (getattr(m, "config", None) for m in hf_model(model).modules())
    config = next((c for c in configs if hasattr(c, "get_text_config")), None)
    return getattr(config.get_text_config(), "hidden_size", None) if config is not None else None


LR_SCHEDULES = ("constant", "linear", "cosine", "inverse_sqrt")


def lr_schedule(warmup_steps: int, total_steps: int, kind: str = "constant"):
    """The learning rate's factor at optimiser step s (0, 1, ...), for torch's LambdaLR: a linear warm-up from
    1/warmup_steps to 1 over the first `warmup_steps` steps, then `constant` 1, `linear` decay to 0 at `total_steps`,
    `cosine` decay to 0 at `total_steps`, or `inverse_sqrt`: sqrt(warmup_steps / s) (the PPO-max scripts' schedule)."""
    if kind not in LR_SCHEDULES:
        fail(f"unknown --lr-schedule {kind}; pick one of {', '.join(LR_SCHEDULES)}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        if kind == "inverse_sqrt":
            return math.sqrt(max(warmup_steps, 1) / max(step, 1))
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _constant_lr(step: int) -> float:
    """The learning rate's factor without a schedule."""
    return 1.0


def current_lr(engine) -> float:
    """The learning rate the engine's next optimiser step uses."""
    return engine.optimizer.param_groups[0]["lr"]


class TorchEngine:
    """Engine calls (forward, backward, step, .module, .device) for a model on its own device, or without DeepSpeed."""

    def __init__(
        self,
        model,
        lr,
        max_grad_norm=1.0,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        schedule=None,
        eps=1e-8,
        accumulation_steps=1,
    ):
        self.module = model
        self.device = model.device
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps
        self.micro_steps = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule or _constant_lr)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss, scale_wrt_gas=True):
        """loss.backward(), the loss divided by the accumulation steps unless `scale_wrt_gas` is False (DeepSpeed's
        engine.backward: the scripts pass losses already weighted by their micro-batch's share, and False)."""
        (loss / self.accumulation_steps if scale_wrt_gas else loss).backward()

    def train(self, mode=True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def step(self):
        """Called after every micro-batch's backward, as DeepSpeed's engine.step(): the optimiser steps at the last
        micro-batch of each mini-batch (the gradient accumulation boundary) and only then."""
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if _world() > 1:  # the mean gradient over ranks, in one flat buffer (through this rank's GPU under NCCL)
            flat = all_reduce_cpu(torch.cat([p.grad.flatten() for p in params]))
            for p, reduced in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(reduced.view_as(p.grad) / _world())
        torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()


def _device(placement: str):  # `policy` -> this rank's device; otherwise the named one (`cpu`, `cuda:N`)
    here = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return torch.device(here if placement == "policy" else placement)


def prepare_trainable(
    model,
    placement,
    zero_stage,
    micro_batch_size,
    lr,
    bf16=False,
    offload=False,
    max_grad_norm=1.0,
    betas=(0.9, 0.95),
    weight_decay=0.0,
    schedule=None,
    eps=1e-8,
    accumulation_steps=1,
):
    """A DeepSpeed engine on this rank's device, or a TorchEngine when the model is placed elsewhere. `schedule`
    (see lr_schedule) scales `lr` at every optimiser step; resumable checkpoints keep its position. Each optimiser
    step accumulates the gradients of `accumulation_steps` micro-batches of `micro_batch_size` rows: engine.step()
    after every micro-batch's backward steps the optimiser at the last of them."""
    if placement.startswith("cuda") and int(os.environ.get("LOCAL_WORLD_SIZE", _world())) > 1:
        fail(
            f"--value-device {placement} would put the value model of every rank of this node on one GPU, where NCCL "
            f"cannot all-reduce its gradients; use --value-device policy (each rank's own GPU) or cpu"
        )
    quantized = getattr(hf_model(model), "is_loaded_in_4bit", False)  # 4-bit weights: already on this rank's GPU
    if quantized or deepspeed is None or placement != "policy":
        return TorchEngine(
            model if quantized else model.to(_device(placement)),
            lr,
            max_grad_norm=max_grad_norm,
            betas=betas,
            weight_decay=weight_decay,
            schedule=schedule,
            eps=eps,
            accumulation_steps=accumulation_steps,
        )
    config = deepspeed_config(
        zero_stage,
        micro_batch_size=micro_batch_size,
        lr=lr,
        bf16=bf16,
        offload=offload,
        max_grad_norm=max_grad_norm,
        betas=betas,
        weight_decay=weight_decay,
        hidden_size=hidden_size_of(model),
        eps=eps,
        accumulation_steps=accumulation_steps,
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or _constant_lr)

    return deepspeed.initialize(model=model, model_parameters=params, config=config, lr_scheduler=scheduler)[0]


def prepare_frozen(model, placement, zero_stage, micro_batch_size, bf16=False, fp16=False):
    """A frozen model (eval, no grad): sharded like the policy under ZeRO-3 at `policy`, else a copy on its device."""
    model.requires_grad_(False).eval()
    config = zero3_config(
        placement,
        zero_stage=zero_stage,
        micro_batch_size=micro_batch_size,
        bf16=bf16,
        fp16=fp16,
        hidden_size=hidden_size_of(model),
    )
    if config is not None:
        return deepspeed.initialize(model=model, config=config)[0]
    return model.to(_device(placement))


class Placement(NamedTuple):
    """The settings every model of a run is loaded and placed with (DeepSpeed's ZeRO stage and micro-batch, bf16,
    offload; loading options; the optimiser's), made once from the parsed arguments: Placement.of(args). Each call
    names where its model goes, `at`: `policy` (this rank's device: a DeepSpeed engine, and under ZeRO-3 sharded and
    loaded shard by shard, no rank ever holding a whole copy), `cpu` or `cuda:N` (a whole copy there)."""

    zero_stage: int
    micro_batch_size: int
    accumulation_steps: int
    bf16: bool
    offload: bool
    trust_remote_code: bool
    attn_implementation: str | None
    load_in_4bit: bool
    reward_dtype: str
    max_grad_norm: float
    betas: tuple
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, args: RunArgs) -> "Placement":
        return cls(
            zero_stage=args.zero_stage,
            micro_batch_size=args.micro_batch_size or args.mini_batch_size,
            accumulation_steps=args.mini_batch_size // (args.micro_batch_size or args.mini_batch_size),
            bf16=args.bf16,
            offload=args.offload,
            trust_remote_code=args.trust_remote_code,
            attn_implementation=args.attn_implementation,
            load_in_4bit=args.load_in_4bit,
            reward_dtype=args.reward_dtype,
            max_grad_norm=args.max_grad_norm,
            betas=args.adam_betas,
            eps=args.adam_eps,
            weight_decay=args.weight_decay,
        )

    @property
    def dtype(self) -> str:
        """The weights' dtype: bfloat16 under --bf16 (DeepSpeed keeps float32 master weights of what trains)."""
        return "bfloat16" if self.bf16 else "float32"

    def load(self, name: str, kind: str, flag: str, at: str, dtype=None, pad_token_id=None):
        """load_model for a model that goes `at`: kind `causal` or `score`, in `dtype` (default: self.dtype)."""
        sharded = zero3_config(
            at,
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            bf16=self.bf16,
            offload=self.offload,
        )
        return load_model(
            name,
            kind=kind,
            flag=flag,
            dtype=dtype or self.dtype,
            trust_remote_code=self.trust_remote_code,
            pad_token_id=pad_token_id,
            attn_implementation=self.attn_implementation,
            sharded=sharded,
            load_in_4bit=self.load_in_4bit,
        )

    def trainable(self, model, at: str, lr: float, schedule=None):
        """prepare_trainable: the engine that trains `model` at `at` with learning rate `lr` (scaled by `schedule`)."""
        return prepare_trainable(
            model,
            placement=at,
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            lr=lr,
            bf16=self.bf16,
            offload=self.offload,
            max_grad_norm=self.max_grad_norm,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            schedule=schedule,
            accumulation_steps=self.accumulation_steps,
        )

    def frozen(self, model, at: str):
        """prepare_frozen: `model` frozen at `at` (sharded like the policy under ZeRO-3 at `policy`)."""
        return prepare_frozen(
            model, placement=at, zero_stage=self.zero_stage, micro_batch_size=self.micro_batch_size, bf16=self.bf16
        )

    def reward(self, name: str, tokenizer, at: str) -> Reward:
        """load_reward: one --reward-model entry, a model among them frozen at `at` in --reward-dtype."""
        return load_reward(
            name,
            tokenizer,
            placement=at,
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            bf16=self.bf16,
            trust_remote_code=self.trust_remote_code,
            dtype=self.reward_dtype,
        )


# ---- Forward passes over (left-padded prompt | right-padded response) ------------------------------------------------
def concat_inputs(query_ids, query_mask, response_ids, response_mask, device):
    """(ids, attention mask, position ids) of prompt and response side by side, on `device`."""
    ids = torch.cat([query_ids, response_ids], 1).to(device)
    mask = torch.cat([query_mask, response_mask.long()], 1).to(device)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)  # positions follow the mask: left padding changes nothing


def in_chunks(fn, rows, size: int):
    """fn(*chunk) over chunks of `size` rows of `rows` (tensors, or lists, of one length), its outputs concatenated:
    a no-grad pass whose memory is bounded by `size` rows, with the result of one pass over all rows. Every rank
    calls fn equally often for equal rows (ZeRO-3 forwards gather parameters together)."""
    return torch.cat([fn(*[r[i : i + size] for r in rows]) for i in range(0, len(rows[0]), size)])


LOGPROB_CHUNK: int | str = "auto"
"""Positions per chunk of forward_logprobs's LM head when it takes no `chunk`: "auto" chunks a forward whose
[rows, response positions, vocabulary] float32 logits would exceed 2 × LOGPROB_CHUNK_FLOATS, in chunks of about
LOGPROB_CHUNK_FLOATS; 0 never chunks; N > 0 chunks every forward in N positions."""
LOGPROB_CHUNK_FLOATS = 1 << 24  # 64 MiB of float32 logits per chunk: large enough that the head's matmul stays
# efficient (each chunk reads the whole head again), small next to a real model's weights and activations
# Config fields of architectures whose logits are not `lm_head(last hidden state)`: they take the unchunked path
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def forward_logprobs(
    model,
    query_ids,
    query_mask,
    response_ids,
    response_mask,
    temperature=1.0,
    with_entropy=False,
    repetition_penalty=1.0,
    entropy_grad=True,
    chunk=None,
):
    """Per-token log π(y_t | x, y_<t) of the response, [batch, response_len] (0 on padding), from the logits at the
    last prompt position and the response's: the LM head runs on those positions only (`logits_to_keep`), never on
    the prompt's, where a real vocabulary would cost prompt × vocabulary floats each.
    The logits are first penalised as ResponseRepetitionPenalty does while sampling, then divided by temperature:
    the log-probs are those of the distribution the responses were sampled from (top-k / top-p aside). Optionally the
    entropy per token; `entropy_grad=False` computes it without a graph (logged, not trained on).
    `chunk` (default LOGPROB_CHUNK): positions per chunk of the LM head, log-sum-exp, gather and entropy, each chunk
    recomputed in the backward pass (activation checkpointing), so that no [batch, response_len, vocabulary] tensor
    is ever alive; "auto" chunks only where that tensor is large, 0 never. The values are those of one pass."""
    ids, mask, pos = concat_inputs(query_ids, query_mask, response_ids, response_mask, device=model.device)
    prompt_length = query_ids.shape[1]
    width = response_ids.shape[1]
    response_tokens = ids[:, prompt_length:]
    on_response = mask[:, prompt_length:]
    settings = {
        "temperature": temperature,
        "repetition_penalty": repetition_penalty,
        "with_entropy": with_entropy,
        "entropy_grad": entropy_grad,
    }
    size = logprob_chunk_size(model, rows=len(ids), width=width, chunk=LOGPROB_CHUNK if chunk is None else chunk)
    if size:
        hidden = last_hidden(model, ids, mask=mask, position_ids=pos)[:, -width - 1 : -1]  # position t predicts t + 1
        head = hf_model(model).get_output_embeddings()
        parts = []
        for start in range(0, width, size):
            inputs = (head, hidden[:, start : start + size], response_tokens[:, : start + size], start)
            if torch.is_grad_enabled():
                parts.append(
                    torch.utils.checkpoint.checkpoint(_head_logprobs, *inputs, **settings, use_reentrant=False)
                )
            else:
                parts.append(_head_logprobs(*inputs, **settings))
        if not with_entropy:
            return torch.cat(parts, 1) * on_response
        return torch.cat([p[0] for p in parts], 1) * on_response, torch.cat([p[1] for p in parts], 1) * on_response
    forward = hf_model(model).forward  # a DeepSpeed engine and a PeftModel pass keyword arguments through
    keep = {"logits_to_keep": width + 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **keep).logits
    logits = logits[:, -width - 1 : -1]  # the logit at position t predicts token t + 1
    out = token_logprobs(logits, response_tokens, **settings)
    if not with_entropy:
        return out * on_response
    return out[0] * on_response, out[1] * on_response


def set_logprob_chunk(chunk):
    """--logprob-chunk: the chunk every forward_logprobs of this process uses (LOGPROB_CHUNK)."""
    global LOGPROB_CHUNK
    if chunk != "auto" and chunk < 0:
        fail(f"--logprob-chunk {chunk}: pass auto, 0 (never chunk) or a positive number of positions")
    LOGPROB_CHUNK = chunk


def logprob_chunk_size(model, rows: int, width: int, chunk) -> int:
    """Positions per chunk of forward_logprobs's LM head, 0 for one unchunked pass of the whole model: `chunk`
    ("auto", 0 or N), and 0 where the model's logits are not its head applied to its last hidden state."""
    if chunk == 0:
        return 0
    inner = hf_model(model)
    head = inner.get_output_embeddings()
    config = inner.config
    if head is None or any(getattr(config, name, None) not in (None, 1, 1.0) for name in HEAD_TRANSFORMS):
        return 0
    if chunk != "auto":
        return int(chunk)
    vocabulary = getattr(config, "vocab_size", None) or 0
    if rows * width * vocabulary <= 2 * LOGPROB_CHUNK_FLOATS:
        return 0
    return max(1, LOGPROB_CHUNK_FLOATS // (rows * vocabulary))


def _head_logprobs(head, hidden, tokens_so_far, start, **settings):
    """token_logprobs of the positions start.. of a chunk from their hidden states; tokens_so_far = the response's
    tokens up to the chunk's end, so that the repetition penalty sees the tokens of earlier chunks."""
    return token_logprobs(head(hidden), tokens_so_far, first=start, **settings)


def token_logprobs(logits, response_tokens, temperature, repetition_penalty, with_entropy, entropy_grad, first=0):
    """log-softmax(penalised logits / temperature) at each response token, [batch, len], and optionally the entropy
    per position, without padding's mask. logits [batch, len, vocab] predict response_tokens[:, first:]; the tokens
    before `first` count as emitted for the repetition penalty."""
    logits = logits.float()
    tokens = response_tokens[:, first:]
    if repetition_penalty != 1.0:
        logits = penalise_repeats(logits, tokens, repetition_penalty, emitted=response_tokens[:, :first])
    if temperature != 1.0:  # a division by 1 would still be a pass (and its backward) over batch × length × vocabulary
        logits = logits / temperature
    logsumexp = logits.logsumexp(-1)  # gather − logsumexp: no [batch, len, vocab] log-softmax kept around
    logprobs = logits.gather(-1, tokens[:, :, None]).squeeze(-1) - logsumexp
    if not with_entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logsumexp - (logits.softmax(-1) * logits).sum(-1)
    return logprobs, entropy


class ResponseRepetitionPenalty(LogitsProcessor):
    """PPO-max's repetition penalty, for `generate`: the logit of every token the response has already emitted is
    divided by `penalty` where positive and multiplied by it where negative. Unlike transformers' own
    repetition_penalty, the prompt does not count (nor does its padding), as in the released MOSS-RLHF sampler."""

    def __init__(self, penalty: float, prompt_length: int):
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        emitted = input_ids[:, self.prompt_length :]
        if emitted.shape[1] == 0:
            return scores
        picked = scores.gather(1, emitted)
        penalised = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, emitted, penalised)


def penalise_repeats(logits, response_ids, penalty: float, emitted=None):
    """The teacher-forced ResponseRepetitionPenalty: logits[:, t] with the tokens response_ids[:, :t] penalised.
    logits [batch, response_len, vocab] predict response_ids [batch, response_len]; `emitted` [batch, n], tokens
    emitted before response_ids[:, 0] (a chunk's earlier positions), are penalised at every position too."""
    seen = torch.zeros_like(logits[:, 0], dtype=torch.bool)
    if emitted is not None and emitted.shape[1]:
        seen = seen.scatter(1, emitted, True)
    penalised = []
    for t in range(logits.shape[1]):
        step = logits[:, t]
        penalised.append(torch.where(seen, torch.where(step < 0, step * penalty, step / penalty), step))
        seen = seen.scatter(1, response_ids[:, t : t + 1], True)
    return torch.stack(penalised, 1)


def last_hidden(model, ids, mask, position_ids):
    """The backbone's last hidden state (after its final norm) at every position, [batch, seq_len, hidden]: no head."""
    inner = hf_model(model)  # the transformers model in a DeepSpeed engine (LoRA layers are injected into it)
    backbone = getattr(inner, inner.base_model_prefix)
    return backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state


def token_scores(model, ids, mask, position_ids):
    """A sequence-classification model's head at every position, [batch, seq_len]: V(s_t), or a reward read anywhere."""
    hidden = last_hidden(model, ids, mask=mask, position_ids=position_ids)
    return hf_model(model).score(hidden).squeeze(-1).float()


def forward_values(model, query_ids, query_mask, response_ids, response_mask):
    """V(s_t) for every response token t, where s_t = x + y_<t: [batch, response_len] (0 on padding)."""
    ids, mask, pos = concat_inputs(query_ids, query_mask, response_ids, response_mask, device=model.device)
    prompt_length = query_ids.shape[1]
    scores = token_scores(model, ids, mask=mask, position_ids=pos)
    return scores[:, prompt_length - 1 : -1] * mask[:, prompt_length:]  # the head at s_t reads the tokens before t


# ---- Masked statistics (padding never counts), optionally over all ranks ---------------------------------------------
def masked_mean(x, mask, across_ranks=False):
    """Mean of x over entries where mask is 1; with `across_ranks`, over those entries on every rank."""
    total = (x * mask).sum()
    count = mask.sum().to(x.dtype)
    if across_ranks and _world() > 1:
        sums = torch.stack([total.detach(), count])
        dist.all_reduce(sums)
        total = total + (sums[0] - total.detach())  # every rank's sum, with this rank's gradient path
        count = sums[1]
    return total / count.clamp(min=1)


def whiten_masked(x, mask, across_ranks=True, shift_mean=True):
    """(x − mean) / sqrt(var + 1e-8) over the masked entries only; padding stays 0. `shift_mean=False` adds the
    mean back: the spread is normalised, the mean kept."""
    mean = masked_mean(x, mask, across_ranks)
    var = masked_mean((x - mean) ** 2, mask, across_ranks)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def mean_across_ranks(metrics: dict) -> dict:
    """Average a dict of floats over ranks (each rank contributed the same number of rows)."""
    keys = sorted(metrics)
    values = all_reduce_cpu(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, (values / _world()).tolist()))


# ---- Evaluation and the per-iteration log of the online scripts (ppo.py, apa.py, awr.py, grpo.py) --------------------
class Rollout(NamedTuple):
    """Responses sampled for a batch of prompts, scored, with their log-probs under π_old and π_ref."""

    batch: Batch  # (query_ids, query_mask, response_ids, response_mask), response_mask float
    scores: torch.Tensor  # [batch], the weighted sum of the rewards, before any scaling
    ended: torch.Tensor  # [batch] bool, the response emitted EOS (or a stop string)
    old_logprobs: torch.Tensor  # [batch, response_len], log π_old: the policy that sampled
    ref_logprobs: torch.Tensor | None  # [batch, response_len], log π_ref = log π_init; None: no π_ref loaded


class HeldOut(NamedTuple):
    """This rank's share of the held-out prompts: the same count on every rank, as sampling runs in lockstep."""

    prompts: list  # token ids, as encode_prompts gives them
    texts: list  # the same prompts as the dataset gave them: reward models and samples.jsonl read them


class IterationTimes(NamedTuple):
    """Wall-clock marks of one online iteration, for its time/ metrics (which metrics.jsonl leaves out)."""

    start: float  # time.time() when the iteration began
    rollout: float  # seconds: sampling, the rewards, the π_old and π_ref passes
    update: float  # seconds: the --update-epochs passes over the rollout


def decode_responses(tokenizer, response_ids, response_mask):
    """Response texts with special tokens kept (so a text contains EOS exactly when the response ended)."""
    lengths = response_mask.sum(1).tolist()
    return [
        tokenizer.decode(row[: int(n)], skip_special_tokens=False) for row, n in zip(response_ids.tolist(), lengths)
    ]


def held_out_prompts(tokenizer, texts, *, run: Run, args: RunArgs, **encode) -> HeldOut:
    """The first --eval-prompts held-out prompts that fit (`encode`: encode_prompts' budget and chat template),
    encoded, cut to a multiple of the ranks and dealt out: rank r takes every world_size-th from the r-th."""
    kept = fitting_prompts(tokenizer, texts, what="evaluation prompts", **encode)
    texts = [texts[i] for i in kept]
    prompts, _ = encode_prompts(tokenizer, texts, **encode)
    n_eval = min(args.eval_prompts, len(prompts)) // run.world_size * run.world_size  # equal per rank: lockstep
    if n_eval == 0:
        fail(
            f"the '{args.eval_split}' split has fewer prompts than the {run.world_size} ranks; pass another "
            f"--eval-split or raise --eval-prompts"
        )
    return HeldOut(
        prompts=prompts[:n_eval][run.rank :: run.world_size],
        texts=texts[:n_eval][run.rank :: run.world_size],
    )


EVAL_KEYS = ["eval/reward", "eval/kl_to_ref", "eval/response_length", "eval/no_eos_fraction", "eval/gold_score"]


def evaluate_held_out(
    step: int, *, sample, held_out: HeldOut, tokenizer, gold_score, batch_size: int, run: Run, args: RunArgs, log
) -> dict:
    """The held-out evaluation of an online run: responses sampled by `sample(prompt_rows, prompts) -> Rollout` (the
    script's rollout, the training sampling setting) for `held_out`, `batch_size` prompts at a time, under a fixed
    seed per rank, so that every evaluation of a run draws alike. Returns the means over all ranks of the proxy
    reward, the KL to π_ref (log π_old − log π_ref summed over a response), the response length, the fraction
    without EOS and, given `gold_score` (the built-in task's), the gold score. The first --log-samples responses of
    rank 0 go to log.samples."""
    rows = []
    samples = []
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(10**6 + run.rank)
        for i in progress(range(0, len(held_out.prompts), batch_size), desc="evaluate", enabled=args.progress):
            part = slice(i, i + batch_size)
            sampled = sample(held_out.prompts[part], held_out.texts[part])
            response_mask = sampled.batch.response_mask
            texts = decode_responses(tokenizer, sampled.batch.response_ids, response_mask)
            gold = gold_score(texts) if gold_score else [0.0] * len(texts)
            kl_to_ref = None  # without π_ref (grpo.py at β = 0) there is no KL to report
            if sampled.ref_logprobs is not None:
                kl_to_ref = ((sampled.old_logprobs - sampled.ref_logprobs) * response_mask).sum(1)
            columns = [  # in the order of EVAL_KEYS
                sampled.scores.cpu(),
                torch.full_like(sampled.scores.cpu(), math.nan) if kl_to_ref is None else kl_to_ref.cpu(),
                response_mask.sum(1).cpu(),
                (~sampled.ended).float().cpu(),
                torch.tensor(gold),
            ]
            rows.append(torch.stack(columns, 1))
            samples += sample_rows(
                args.log_samples - len(samples),
                prompt=held_out.texts[part],
                rendered_prompt=rendered_prompts(tokenizer, sampled.batch.query_ids, sampled.batch.query_mask),
                response=texts,
                score=sampled.scores,
                gold_score=gold if gold_score else None,
                kl_to_ref=kl_to_ref,
            )
    means = torch.cat(rows).mean(0).tolist()
    metrics = dict(zip(EVAL_KEYS, means))
    if gold_score is None:
        metrics.pop("eval/gold_score")
    if sampled.ref_logprobs is None:
        metrics.pop("eval/kl_to_ref")
    log.samples(step, samples)
    return mean_across_ranks(metrics)


def rollout_metrics(sampled: Rollout, kl: dict, *, tokenizer, gold_score) -> dict:
    """This rank's statistics of a rollout that every online script logs: the mean raw score, each per-token KL
    estimate in `kl` ({name: [batch, response_len]}) summed over a response, the response length, the fraction
    without EOS, the policy's perplexity on its own samples (over all ranks) and, given `gold_score`, the gold
    score. log_iteration averages them over ranks."""
    response_mask = sampled.batch.response_mask
    metrics = {"rollout/score": sampled.scores.mean().item()}
    for name, per_token in kl.items():  # each estimate summed over a response (0 on padding), mean over responses
        metrics[f"rollout/kl_{name}"] = per_token.sum(1).mean().item()
    metrics["rollout/response_length"] = response_mask.sum(1).mean().item()
    metrics["rollout/no_eos_fraction"] = (~sampled.ended).float().mean().item()
    # perplexity of the policy on its own samples: the "pattern collapse" watch of Zheng et al. 2023, Section 5.2
    mean_logprob = masked_mean(sampled.old_logprobs, response_mask, across_ranks=True)
    metrics["rollout/perplexity"] = torch.exp(-mean_logprob).item()
    if gold_score:
        gold = gold_score(decode_responses(tokenizer, sampled.batch.response_ids, response_mask))
        metrics["rollout/gold_score"] = sum(gold) / len(gold)
    return metrics


def log_iteration(
    metrics: dict,
    *,
    iteration: int,
    num_iterations: int,
    per_iteration: int,
    update_epochs: int,
    times: IterationTimes,
    evaluate,
    eval_history: list,
    policy,
    run: Run,
    args: RunArgs,
    log,
    shown: str = "",
) -> dict:
    """The end of an online iteration: `metrics` (this rank's) averaged over ranks, a stop on NaN / inf (before
    sampling from broken weights), throughput and timings, `evaluate(iteration)` appended to `eval_history` every
    --eval-every iterations and at the last, the learning rate of the next step; then logged, and one line printed on
    rank 0 (`shown`: the script's own fields, after the KL). `per_iteration`: the responses of an iteration over all
    ranks. Returns the metrics logged."""
    metrics = mean_across_ranks(metrics)
    check_finite(metrics, iteration, run.resume_path)
    n_tokens = metrics["rollout/response_length"] * per_iteration  # all ranks
    metrics["time/rollout_tokens_per_s"] = n_tokens / times.rollout
    metrics["time/update_tokens_per_s"] = n_tokens * update_epochs / times.update
    metrics["time/episodes_per_s"] = per_iteration / (time.time() - times.start)
    metrics["time/rollout"] = times.rollout  # seconds: sampling, the rewards, the π_old and π_ref passes
    metrics["time/update"] = times.update  # seconds: the --update-epochs passes over the rollout
    if iteration % args.eval_every == 0 or iteration == num_iterations:
        t_eval = time.time()
        eval_history.append((iteration, evaluate(iteration)))
        metrics.update(eval_history[-1][1])
        metrics["time/eval"] = time.time() - t_eval
    metrics["time/iteration"] = time.time() - times.start  # seconds: the whole iteration, its evaluation included
    metrics["policy/learning_rate"] = current_lr(policy)  # of the next step (--lr-schedule)
    log(iteration, metrics)
    if run.rank == 0:
        gold = f" gold {metrics['rollout/gold_score']:+.3f}" if "rollout/gold_score" in metrics else ""
        kl = f" kl {metrics['rollout/kl_to_ref']:.2f}" if "rollout/kl_to_ref" in metrics else ""
        print(
            f"iter {iteration:4d}/{num_iterations} score {metrics['rollout/score']:+.3f}{gold}"
            f"{kl}{shown} len {metrics['rollout/response_length']:.1f} "
            f"tokens/s {metrics['time/rollout_tokens_per_s']:.0f} (rollout) "
            f"{metrics['time/update_tokens_per_s']:.0f} (update) "
            f"episodes/s {metrics['time/episodes_per_s']:.3g}, {metrics['time/iteration']:.2f} s/iter",
            flush=True,
        )
    return metrics


# ---- Logging and saving: progress bars, TensorBoard, metrics.jsonl and samples.jsonl, W&B, Hugging Face folders ------
def progress(iterable, *, desc: str, total: int | None = None, enabled: bool = True):
    """`iterable` under a tqdm bar named `desc` (on stderr, erased when the loop ends) on rank 0, when `enabled`
    (--progress) and stdout is a terminal; else `iterable` itself: logs, CI and tests get no bar. `total`: the
    number of items, for an iterable without len()."""
    if not enabled or int(os.environ.get("RANK", "0")) != 0 or not sys.stdout.isatty():
        return iterable
    return ProgressBar(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def library_bars(enabled: bool):
    """transformers' and datasets' own bars (loading and saving weights, dataset shards) follow ours: shown only when
    `enabled` (--progress, rank 0) and stdout is a terminal, so that logs hold no bars."""
    if enabled and sys.stdout.isatty():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()


class ProgressBar(tqdm):
    """A tqdm bar under which print() writes whole lines: while its loop runs, sys.stdout is a PrintAboveBars (one
    for all nested bars), so a printed line never shares a row with a bar."""

    def __iter__(self):
        if isinstance(sys.stdout, PrintAboveBars):  # an outer bar's loop already redirects stdout
            yield from super().__iter__()
            return
        above = PrintAboveBars(sys.stdout)
        with contextlib.redirect_stdout(above):
            try:
                yield from super().__iter__()
            finally:  # the loop ended, broke off or raised: the bar is erased, a line still unfinished goes out
                above.stdout.write(above.pending)


class PrintAboveBars:
    """sys.stdout while bars are shown: each complete line is written with the bars (on stderr) cleared, and the
    bars are drawn again below it; an unfinished line waits for its newline."""

    def __init__(self, stdout):
        self.stdout = stdout
        self.pending = ""

    def write(self, text: str) -> int:
        lines, newline, self.pending = (self.pending + text).rpartition("\n")
        if newline:
            with ProgressBar.external_write_mode(file=sys.stderr):
                self.stdout.write(lines + newline)
                self.stdout.flush()
        return len(text)

    def flush(self):
        self.stdout.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: those of the real stdout
        return getattr(self.stdout, name)


class Logger:
    """What make_logger returns. On rank 0: log(step, metrics) writes scalars to TensorBoard and metrics.jsonl;
    log.samples(step, rows) a table of sample responses to TensorBoard (text, tag `samples`), samples.jsonl and, with
    --track, W&B (a wandb.Table under `samples`). On other ranks both do nothing."""

    def __init__(self, writer=None, metrics_file=None, samples_file=None, wandb_run=None):
        self.writer = writer
        self.metrics_file = metrics_file
        self.samples_file = samples_file
        self.wandb_run = wandb_run

    def __call__(self, step: int, metrics: dict):
        if self.writer is None:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        record = {"step": step, **{k: round(v, 6) for k, v in sorted(metrics.items())}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        self.writer.flush()

    def samples(self, step: int, rows: list):
        """`rows`: dicts of one set of columns (sample_rows makes them); samples.jsonl gets one line per row."""
        if self.writer is None or not rows:
            return
        for row in rows:
            record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}}
            self.samples_file.write(json.dumps(record) + "\n")
        self.samples_file.flush()
        self.show_samples(step, rows)

    def show_samples(self, step: int, rows: list):
        """The rows as a markdown table in TensorBoard and as a wandb.Table (with the step) under --track."""
        columns = list(rows[0])

        def cell(value) -> str:  # one line of markdown: HTML and the table's `|` escaped, newlines as <br>
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")

        lines = ["|" + "|".join(columns) + "|", "|" + "|".join("-" for _ in columns) + "|"]
        lines += ["|" + "|".join(cell(row[c]) for c in columns) + "|" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), step)
        self.writer.flush()
        if self.wandb_run is not None:  # logged at the TensorBoard step: sync_tensorboard's x-axis is global_step
            optional_part("tracking.py", "--track").log_samples_table(self.wandb_run, step, rows)


def rendered_prompts(tokenizer, query_ids, query_mask) -> list:
    """The prompts as the policy saw them: its query ids (after the chat template and the cut to the prompt budget)
    decoded without their padding, special tokens kept, for samples.jsonl beside the dataset's prompt."""
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=False) for row, m in zip(query_ids, query_mask)]


def sample_rows(n: int, **columns) -> list:
    """The first n rows (none for n ≤ 0) of equal-length columns as dicts for Logger.samples: a column is a list or a
    1-D tensor, a single value is repeated on every row, a None column is left out, a `prompt` is shown as text."""
    columns = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in columns.items() if v is not None}
    length = min(len(v) for v in columns.values() if isinstance(v, list))
    columns = {k: v if isinstance(v, list) else [v] * length for k, v in columns.items()}
    if "prompt" in columns:
        columns["prompt"] = [prompt_text(prompt) for prompt in columns["prompt"]]
    return [{k: v[i] for k, v in columns.items()} for i in range(min(max(n, 0), length))]


def make_logger(args: RunArgs, run_name: str, rank: int) -> Logger:
    """On rank 0: with --track, a W&B run first (cleanRL's wandb.init: sync_tensorboard patches TensorBoard's writer,
    so it comes before the SummaryWriter is made), then TensorBoard (cleanRL's hyper-parameter table), args.json,
    metrics.jsonl and samples.jsonl. metrics.jsonl gets all but wall-clock keys (`time/...`), so two runs with one
    seed write identical files. A resumed run's logs start with everything logged up to its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    if rank != 0:
        return Logger()
    run_dir = os.path.join(args.output_dir, run_name)
    wandb_run = None
    if args.track:
        wandb_run = optional_part("tracking.py", "--track").start_wandb(args, run_name)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in sorted(vars(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        f.write(json.dumps(vars(args), indent=1, default=str))
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (written until the run ends)
    samples_file = open(os.path.join(run_dir, "samples.jsonl"), "a")  # noqa: SIM115 (written until the run ends)
    log = Logger(writer=writer, metrics_file=metrics_file, samples_file=samples_file, wandb_run=wandb_run)
    resume = args.resume
    previous = os.path.join(resume, "metrics.jsonl") if resume else None
    if previous and os.path.exists(previous):  # a resumed run's logs start with everything logged up to its checkpoint
        with open(previous) as f:
            for line in f:
                record = json.loads(line)
                metrics_file.write(line)
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(k, v, record["step"])
    previous = os.path.join(resume, "samples.jsonl") if resume else None
    if previous and os.path.exists(previous):  # and its sample tables, as the checkpoint saw them
        by_step = {}
        with open(previous) as f:
            for line in f:
                record = json.loads(line)
                samples_file.write(line)
                by_step.setdefault(record.pop("step"), []).append(record)
        for step, rows in by_step.items():
            log.show_samples(step, rows)
    metrics_file.flush()
    samples_file.flush()
    return log


def finish_tracking(exit_code: int = 0):
    """End this process's W&B run, if --track started one: the TensorBoard events left are synced and the run is
    marked finished (exit_code 0) or failed. exit_cleanly and exit_after_signal call it; a run that stops with an
    error is finished by wandb's own exit hook."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def save_hf(engine, tokenizer, path: str, rank: int):
    """An HF folder (ZeRO-3 shards gathered first), written aside and renamed: never half a checkpoint under `path`.
    A model with a LoRA adapter is saved twice: merged into its weights under `path` (from_pretrained loads it like
    any checkpoint) and as the adapter alone under `path`/adapter (peft's PeftModel.from_pretrained on the base)."""
    state_dict = None
    if hasattr(engine, "zero_optimization_stage") and engine.zero_optimization_stage() == 3:
        # DeepSpeed's private API (DeepSpeedEngine in deepspeed/runtime/engine.py), written against deepspeed 0.19.8
        # (requirements.txt); a collective: every rank calls it
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        peft = peft_model(engine)
        if peft is None:
            getattr(engine, "module", engine).save_pretrained(tmp, state_dict=state_dict)
        else:
            state_dict = state_dict if state_dict is not None else peft.state_dict()
            hf_model(peft).save_pretrained(tmp, state_dict=merged_state_dict(state_dict, peft))
            peft.save_pretrained(os.path.join(tmp, "adapter"), state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
    _barrier()


# ---- Resumable checkpoints, stop signals, non-finite guards, a clean exit --------------------------------------------
def check_resume(path: str, script: str):
    """Fail in the first second when --resume cannot be continued by this script with this many ranks."""
    meta_file = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_file):
        fail(
            f"--resume {path} is not a resumable checkpoint (no meta.json); pass the `resume` folder a run wrote "
            f"(runs/RUN_NAME/resume, with --save-every N or when stopped by SIGTERM/Ctrl-C)"
        )
    with open(meta_file) as f:
        meta = json.load(f)
    if meta["script"] != script:
        fail(
            f"--resume {path} was written by {meta['script']}, not {script}; resume it with {meta['script']}, or "
            f"pass a checkpoint of {script}"
        )
    if meta["world_size"] != _world():
        fail(
            f"--resume {path} was written by {meta['world_size']} rank(s), this run has {_world()}; resume with "
            f"--nproc_per_node {meta['world_size']} (each rank restores its own random state)"
        )
    return meta


def save_resume(path: str, script: str, step: int, engines: dict, state: dict, args: RunArgs, run_dir: str, rank: int):
    """A checkpoint that continues the run bit for bit: each trained engine with its optimizer (DeepSpeed's own,
    ZeRO-sharded, save; torch.save for a TorchEngine), and per rank the script's `state` (step, KL coefficient, data
    position, eval history, generator states, ...) with this rank's RNG states; the metrics logged so far. Written
    to PATH.tmp, then renamed: a run killed while saving keeps its previous checkpoint."""
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    for name, engine in engines.items():
        if isinstance(engine, TorchEngine):  # identical on every rank
            if rank == 0:
                saved = {
                    "model": engine.module.state_dict(),
                    "optimizer": engine.optimizer.state_dict(),
                    "lr_scheduler": engine.lr_scheduler.state_dict(),
                }
                torch.save(saved, os.path.join(tmp, f"{name}.pt"))
        else:  # a collective: every rank writes its shard
            engine.save_checkpoint(tmp, tag=name, save_latest=False)
    rng = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    torch.save({"state": state, "rng": rng}, os.path.join(tmp, f"rank{rank}.pt"))
    if rank == 0:
        for log_file in ("metrics.jsonl", "samples.jsonl"):  # what was logged up to this step, for the resumed run
            if os.path.exists(os.path.join(run_dir, log_file)):
                shutil.copy(os.path.join(run_dir, log_file), tmp)
        meta = {"script": script, "step": step, "world_size": _world(), "args": vars(args)}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    _barrier()
    if rank == 0:  # the new checkpoint in place of the old one
        old = path.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_resume(path: str, engines: dict, rank: int):
    """Restore what save_resume wrote: the engines (weights, optimizer), this rank's RNG states; returns its state."""
    for name, engine in engines.items():
        if isinstance(engine, TorchEngine):
            saved = torch.load(os.path.join(path, f"{name}.pt"), weights_only=False)
            engine.module.load_state_dict(saved["model"])
            engine.optimizer.load_state_dict(saved["optimizer"])
            engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        else:
            engine.load_checkpoint(path, tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
    saved = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=False)
    random.setstate(saved["rng"]["python"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    if rank == 0:
        with open(os.path.join(path, "meta.json")) as f:
            step = json.load(f)["step"]
        print(f"resumed from {path} at step {step}", flush=True)
    return saved["state"]


def stop_signals():
    """SIGTERM (preemption) and SIGINT (Ctrl-C) only raise a flag: returns stop_requested(), called between steps,
    true on every rank once any rank was signalled; the script then saves a resumable checkpoint and exits with
    128 + the signal. A second signal over 3 s later kills at once (torchrun forwards a Ctrl-C its workers already
    got: that one must not)."""
    caught = []  # [signal number, time] of the first signal

    def handler(signum, frame):
        if caught and time.time() - caught[1] > 3:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not caught:
            caught.extend([signum, time.time()])
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step with a resumable checkpoint",
                file=sys.stderr,
                flush=True,
            )

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)

    def stop_requested() -> int:
        """The signal any rank caught, or 0: a collective, so every rank calls it at the same step."""
        signum = torch.tensor([caught[0] if caught else 0])
        return int(all_reduce_cpu(signum, dist.ReduceOp.MAX).item())

    return stop_requested


def exit_after_signal(signum: int, path: str, script: str, rank: int):
    """Leave a signalled run (after its checkpoint at `path`) with exit status 128 + signum, saying how to resume."""
    if rank == 0:
        print(
            f"stopped by {signal.Signals(signum).name}; continue with: {script.split()[0]} --resume {path} (and "
            f"the same arguments)",
            flush=True,
        )
    _barrier()
    dist.destroy_process_group()
    finish_tracking(exit_code=128 + signum)
    raise SystemExit(128 + signum)


def check_finite(metrics: dict, step: int, resume_path: str):
    """NaN/inf in a loss or a reward stops the run here, before anything is saved from it."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if not bad:
        return
    bad = sorted(bad, key=lambda k: ("score" not in k and "reward" not in k, k))  # a reward first: it is the cause
    shown = ", ".join(f"{k} = {metrics[k]}" for k in bad[:3])
    more = " ..." if len(bad) > 3 else ""
    if os.path.isdir(resume_path):
        kept = f"the last good checkpoint is {resume_path}"
    else:
        kept = "no checkpoint was written yet (pass --save-every N)"
    fail(
        f"step {step}: {shown}{more}; the run stopped and {kept}; lower --learning-rate, or check the reward model / "
        f"function for NaN or inf"
    )


def exit_cleanly():
    """The end of a run, once every rank has written all it writes. With several ranks the process then leaves at
    once: at interpreter shutdown a communication thread (gloo's, DeepSpeed's) can still be joinable and abort the
    finished process ("terminate called without an active exception"), failing a run that had succeeded."""
    world_size = _world()
    dist.barrier()
    dist.destroy_process_group()
    finish_tracking()
    if world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---- Caches: content keys and cached results -------------------------------------------------------------------------
# A result that is slow to compute (π_ref's log-probs, rewards, A-LoL's advantages) is stored under a key that names
# everything it depends on: each model by its content (fingerprint), each row by its content (json_digest), every
# setting by its value. An entry is <SHA-256 of the key>.safetensors: the tensors, and in its metadata the key itself,
# checked on every read (a hash collision or a hand-edited file is recomputed, never read); a .json copy of the key
# beside it is for people to read. Each script's key starts with its CACHE_VERSION, raised when what the script caches
# or how it computes it changes.
def cache_folder(cache_dir, script: str) -> str:
    """Where `script`'s entries live: `cache_dir` (--cache-dir) when given, else $ONEFILE_RLHF_CACHE/<script>, else
    ~/.cache/onefile-rlhf/<script>."""
    if cache_dir:
        return cache_dir
    root = os.environ.get("ONEFILE_RLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "onefile-rlhf"))
    return os.path.join(root, script)


def json_digest(obj) -> str:
    """The SHA-256 (hex) of `obj` written as JSON: the content key of a row (its token ids, its texts)."""
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def file_digest(path: str, whole_below=64 << 20, samples=1024, chunk=16 << 10) -> str:
    """The SHA-256 (hex) of a file's size and bytes: all of them up to `whole_below` bytes (64 MiB: configs,
    tokenizers, small weights); above it, `samples` chunks of `chunk` bytes at evenly spaced offsets, the first and
    last bytes included (16 MiB read whatever the size, where reading a 13 GB file whole takes seconds at every
    start). Any change wider than the spacing (size / 1023: about 13 MB in a 13 GB file, where one attention
    projection of a 7B model is 32 MiB) changes the digest, so a model trained in its top blocks only, or LoRA-merged
    into a few projections, keys apart from its base; a change confined to tensors smaller than the spacing (a norm's
    weights alone) may not."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= whole_below:
            digest.update(f.read())
        else:
            for i in range(samples):
                f.seek((size - chunk) * i // (samples - 1))
                digest.update(f.read(chunk))
    return digest.hexdigest()


def hub_commit(name: str, revision=None):
    """The commit of hub repo `name` at `revision` (None: main). A revision that is a commit hash (7 to 40 hex
    digits) is returned as it is: it names fixed content, online or not. Else the commit the hub resolves it to, else
    that of the snapshot in the local hub cache, else None (neither knows it: the name alone keys the cache)."""
    if revision and re.fullmatch(r"[0-9a-f]{7,40}", revision):
        return revision
    import huggingface_hub

    try:
        return huggingface_hub.model_info(name, revision=revision).sha
    except Exception:  # offline, no connection, unknown name: try the local hub cache
        pass
    try:
        return os.path.basename(huggingface_hub.snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached either
        return None


def fingerprint(name: str, role: str) -> list:
    """The content key of a model or reward given as `name` (`builtin` resolved for `role`: sft, reward, ...):
    - a local folder: [[file name, file_digest], ...] over its top-level files in name order (a copy keys alike, one
      changed byte apart; file times are not read);
    - module:function or a URL: [name] (the code and the server are taken as fixed: give another name when they
      change);
    - a hub name: [name, commit], the commit (hub_commit) of the revision a run loads: the one RELEASED_REVISIONS
      pins for a released reward model (not main's, whose later uploads differ), else main's."""
    path = resolve(name, role)
    if ":" in path and not os.path.exists(path):
        return [path]
    if not os.path.isdir(path):
        return [path, hub_commit(path, RELEASED_REVISIONS.get(path))]
    contents = []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_file():
            contents.append((entry.name, file_digest(entry.path)))
    return contents


def _entry_path(key: dict, cache_dir: str) -> str:
    return os.path.join(cache_dir, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20])


def _read_entry(path: str):
    """(record, tensors) of the entry at `path`, or ({}, {}) where there is none. Both come from the one
    .safetensors file (the record in its metadata), so a reader never pairs one writer's record with another's
    tensors, whatever runs beside it."""
    from safetensors import safe_open

    if not os.path.exists(path + ".safetensors"):
        return {}, {}
    with safe_open(path + ".safetensors", framework="pt") as f:
        record = json.loads((f.metadata() or {}).get("entry", "{}"))
        return record, {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _write_entry(path: str, tensors: dict, record: dict):
    """Written aside and renamed: a reader never sees half an entry. The record goes into the .safetensors file's
    metadata (what is read back) and, for people to read, into the .json beside it."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f".{os.getpid()}.tmp"
    metadata = {"entry": json.dumps(record)}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, path + ".safetensors" + tmp, metadata=metadata)
    os.replace(path + ".safetensors" + tmp, path + ".safetensors")
    with open(path + ".json" + tmp, "w") as f:
        f.write(json.dumps(record, indent=1))
    os.replace(path + ".json" + tmp, path + ".json")


@contextlib.contextmanager
def _entry_lock(path: str):
    """Holds an exclusive lock on `path`.lock: two runs that add rows to one entry at once each add theirs to what
    the other wrote, instead of the later one dropping the earlier one's rows."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cached(key: dict, compute, cache_dir: str, use_cache=True, rank=0):
    """compute() -> (dict of tensors, dict of JSON info), stored under `key` in `cache_dir` and read back only when
    the stored key equals `key` (use_cache False, --no-cache: computed and stored anew). Returns (tensors, info, hit).
    Every rank takes the same branch (a hit on all ranks or on none), since compute() may hold collectives; rank 0
    writes."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    path = _entry_path(key, cache_dir)
    entry, stored = _read_entry(path) if use_cache else ({}, {})
    if mean_across_ranks({"hit": float(entry.get("key") == key)})["hit"] == 1.0:
        return stored, entry["info"], True
    tensors, info = compute()
    if rank == 0:
        _write_entry(path, tensors, {"key": key, "info": info})
    return tensors, info, False


def cached_rows(key: dict, digests: list, compute, cache_dir: str, use_cache=True, rank=0):
    """An entry under `key` that holds rows: one row of each tensor per row cached, and in the record each cached
    row's digest (what the row is, e.g. json_digest of its tokens). Returns ({name: tensor [len(digests), ...]},
    number of rows computed): a row whose digest the entry holds is read back; compute(positions) -> {name: tensor
    [len(positions), ...]} computes the others (`positions` index `digests`), which rank 0 adds to the entry. A row
    is only ever read back under its own digest, so an entry written for some rows serves a later run that needs
    more and is never read for rows it lacks. Every rank computes the same rows, since compute() may hold
    collectives."""
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    path = _entry_path(key, cache_dir)
    entry, stored = _read_entry(path) if use_cache else ({}, {})
    if entry.get("key") != key:
        stored = {}
    where = {digest: row for row, digest in enumerate(entry["rows"])} if stored else {}  # digest -> its stored row
    missing = torch.tensor([float(digest not in where) for digest in digests], dtype=torch.float64)
    missing = all_reduce_cpu(missing) > 0  # a row missing on any rank is computed on every rank
    positions = missing.nonzero().flatten()
    computed = compute(positions) if len(positions) else {}
    hits = torch.tensor([where.get(digest, 0) for digest in digests], dtype=torch.long)[~missing]
    tensors = {}
    for name, template in (computed or stored).items():
        tensors[name] = torch.zeros(len(digests), *template.shape[1:], dtype=template.dtype)
        if len(hits):
            tensors[name][~missing] = stored[name][hits]
        if len(positions):
            tensors[name][positions] = computed[name].to(template.dtype)
    if rank == 0 and len(positions):
        _add_rows(path, key, digests, positions, tensors, use_cache)
    return tensors, len(positions)


def _add_rows(path: str, key: dict, digests: list, positions, tensors: dict, use_cache: bool):
    """Adds the rows at `positions` to the entry as it is now on disk (another run may have added rows since it was
    read), under the entry's lock; with use_cache False (--no-cache) the entry is replaced by these rows."""
    with _entry_lock(path):
        entry, stored = _read_entry(path) if use_cache else ({}, {})
        if entry.get("key") != key:
            entry, stored = {}, {}
        rows = list(entry.get("rows", []))
        held = set(rows)
        new = []
        for position in positions.tolist():
            if digests[position] not in held:
                held.add(digests[position])
                rows.append(digests[position])
                new.append(position)
        if not new:
            return
        new = torch.tensor(new, dtype=torch.long)
        union = {
            name: torch.cat([stored[name], tensors[name][new]]) if stored else tensors[name][new] for name in tensors
        }
        _write_entry(path, union, {"key": key, "rows": rows})


def distinct_n(texts, n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams over all texts."""
    grams = [tuple(ws[i : i + n]) for ws in (t.split() for t in texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)
