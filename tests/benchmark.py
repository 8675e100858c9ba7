"""Throughput and memory benchmark of the online scripts (ppo, apa, awr) against bare HF / torch loops, in one process.

    ./launch.sh bench                      # the built-in models, 64 prompts, <= 32 new tokens, median of 3 repeats
    ./launch.sh bench --real               # a real architecture and vocabulary (below), three variants per script
    python tests/benchmark.py --scripts ppo --batch-size 16 --variants full lora --json bench.json

`--real` is short for `--model llama-bpe --dataset <HH> --prompt-length 256 --max-new-tokens 64 --batch-size 16
--mini-batch-size 4 --variants full unchunked lora` (each of these given on the command line wins). `llama-bpe` is a
random Llama of a realistic shape for this CPU: hidden 256, 4 layers, 4 heads, MLP 688, its 50,257 × 256 embedding
tied to the LM head (16.0 M parameters, 80 % of them the embedding), with GPT-2's real BPE tokenizer from
../shared/data/tokenizers/gpt2. It is saved with save_pretrained (a policy folder, and a 1-output
LlamaForSequenceClassification folder that is the reward model and the value model's start) under
~/.cache/onefile-rlhf/bench (or $ONEFILE_RLHF_CACHE/bench), keyed by its settings and the tokenizer, and loaded by
`common.load_model` / `common.load_reward` like any checkpoint. `--model llama-bpe-152k` is the same Llama with
Qwen 2.5's 151,936-row vocabulary (42.1 M parameters; GPT-2's token ids are a subset, the other rows unused by the
prompts but part of every LM head output), to show what the log-probs' logits cost at a real vocabulary;
`--logprob-chunk` sets common.LOGPROB_CHUNK (auto, 0 = the whole logits at once, N positions per chunk).
<HH> = ../shared/data/hh-rlhf/helpful-base-test.jsonl.gz
(the built-in prompts if it is missing). `--prompt-length N` makes every prompt exactly N tokens: the prompts' token
ids, in a seeded random order, are concatenated and cut into consecutive N-token pieces (no padding, no prompt
shorter); without it each prompt is the script's own encode_prompts (cut to its max_prompt_length).

Each script runs in each variant, with its own `Args` defaults (sampling, mini-batch size unless --mini-batch-size,
loss coefficients, learning rates), ZeRO-0, float32, on one fixed prompt batch:
  full       the weights train; no-grad scoring (reward, π_old, π_ref, V) in chunks of --forward-batch-size rows
             via common.in_chunks (default: the mini-batch size, as the scripts do); π_ref a model of its own.
  unchunked  the same, the scoring in one chunk of the whole rollout batch (--forward-batch-size = --batch-size).
  lora       common.add_lora (rank --lora-r, the script's alpha / dropout / all-linear) on the policy and the value
             model; only the adapters (and the value head) train; π_ref is the policy itself under
             common.adapter_off, no second copy; scoring chunked as in `full`.
Every variant mirrors the scripts' iteration: ppo.py's rollout() (policy / value model in eval mode, generate,
truncate_after_eos, reward and log-probs in chunks), the values in chunks, the rewards, GAE and whitening, then one
epoch of the update loop (train mode; ppo: forward_logprobs with_entropy=True, entropy_grad=entropy_coef != 0;
apa.py / awr.py: update(), then eval mode again).

The numbers, per (script, variant); tok/s = real response tokens per second (the EOS counted, padding not):
  rollout ratio  = tok/s of the script's generate() + truncate_after_eos / tok/s of a bare `model.generate(...)` with
                   the same sampling settings; both sample from the same seed and produce the same tokens (checked).
  whole rollout  = response tokens / (generation + scoring time) / the same bare-generate tok/s, where scoring = the
                   reward model, the log-probs of π_old and π_ref, the values, the rewards, GAE and whitening.
  update ratio   = (tokens / s of one epoch of the script's update: forward_logprobs / forward_values, its loss,
                   backward and step on the DeepSpeed engines of common.prepare_trainable)
                 / (the same tokens / s of a bare loop over the same mini-batches and models: a plain forward of the
                   policy with the same logits_to_keep (the response's positions) and of the value model's body and
                   head, loss = mean logit + mean value, one backward, one torch.optim.AdamW step per model).
  peak above idle = peak RSS (VmHWM, reset through /proc/self/clear_refs just before the variant's models are loaded)
                   over loading them and one script iteration (rollout, scoring, one update epoch), minus the idle
                   process's RSS (VmRSS after the imports, the tokenizer and the prompts, before any model); on a GPU:
                   torch.cuda.max_memory_allocated minus what was allocated when idle. The models of the previous
                   variant are freed first (gc, and glibc's malloc_trim to return freed heap pages). RSS counts
                   the pages the allocator keeps after free() too, as a script's process does.
  floor          = what the variant must hold at its peak: the bytes of every weight it keeps (the policy, π_ref when
                   it is a model of its own, the value model, the reward model; tied weights once), plus, for every
                   trainable parameter of the policy and the value model, its gradient and AdamW's two states
                   (exp_avg, exp_avg_sq), all float32. ZeRO-0 float32 DeepSpeed steps torch's AdamW as it is: no
                   master copy, no state beyond AdamW's; the flat copy of the gradients that its all-reduce makes after
                   every backward lives only during that call and is not counted.
  phase peaks    = the same peak per phase of that iteration, each minus the idle process: loading (the models and
                   their engines), generation, scoring, the update epoch (the counter reset as each phase starts; the
                   --json record also has what each phase started from). On the CPU, weights that transformers
                   loads from safetensors stay memory-mapped: their pages count in RSS once first read, so loading
                   reads small and each model's weights show in the first phase that reads them (gradients and
                   AdamW's states in the update's).
  live growth    = with --live-memory (CPU): how far the bytes of live tensors grew over each phase at its peak,
                   from the allocations and frees torch's profiler records in one more iteration right after the
                   memory pass (before anything of the bare side exists); set against that phase's RSS growth,
                   the difference is what glibc's allocator kept resident (freed pages, fragments) beyond the
                   tensors alive. On a GPU the peaks above are already of allocated tensors (the caching
                   allocator's reserve is not counted).
  peak / floor   = peak above idle / floor.
  shares         = generation / scoring / update of one iteration, the update counted update_epochs times.

Targets, printed and marked ⚠ when missed, never asserted (the exit status stays 0): rollout ratio ≥ 0.9,
whole rollout ≥ 0.7, update ratio ≥ 0.85, peak / floor ≤ 2.5 (at prompt 256 / response 64 / batch 16 with a 50k
vocabulary: `--real`). Ratios are medians of the per-repeat ratios; the two sides of a ratio run back to back, in
alternating order. The peak is measured in the warm-up iteration, before anything of the bare side exists.
"""

import argparse
import contextlib
import ctypes
import gc
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLINE = ("ppo", "apa", "awr")
VARIANTS = ("full", "unchunked", "lora")
LLAMA_BPE = "llama-bpe"
LLAMA_152K = "llama-bpe-152k"
VOCAB_152K = 151_936  # Qwen 2.5's embedding rows
BUILT_MODELS = (LLAMA_BPE, LLAMA_152K)
GPT2_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "gpt2")
HH_PROMPTS = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "helpful-base-test.jsonl.gz")
# The built-in real-architecture model: a random Llama whose parameters are mostly its (tied) 50k-row embedding.
LLAMA_BPE_SETTINGS = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "seed": 0,
}
# What `--real` sets, unless the same option is given.
REAL = {
    "model": LLAMA_BPE,
    "prompt_length": 256,
    "max_new_tokens": 64,
    "batch_size": 16,
    "mini_batch_size": 4,
    "variants": list(VARIANTS),
}
# The defaults without `--real` (the old, fast benchmark on the built-in models).
PLAIN = {
    "model": "builtin",
    "dataset": "builtin",
    "max_new_tokens": 32,
    "batch_size": 64,
}
# Ratios of speed must reach these; peak / floor must stay at or below "memory".
TARGETS = {"rollout": 0.9, "whole_rollout": 0.7, "update": 0.85, "memory": 2.5}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="./launch.sh bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument("--real", action="store_true", help="the realistic setting (see below); options given win")
    parser.add_argument(
        "--model", default=None, help="policy (and π_ref): hub name, folder, `builtin`, `llama-bpe` or `llama-bpe-152k`"
    )
    parser.add_argument(
        "--reward-model",
        default=None,
        help="reward model (and value-model start): hub name, folder, `builtin`, `llama-bpe`, `llama-bpe-152k` "
        "or module:function (default: the one that goes with --model)",
    )
    parser.add_argument("--dataset", default=None, help="where the prompts come from (its `train` split)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per rollout (default 64; --real 16)")
    parser.add_argument(
        "--mini-batch-size",
        type=int,
        default=None,
        help="responses per update step (default: the script's own, capped at --batch-size; --real 4)",
    )
    parser.add_argument(
        "--forward-batch-size",
        type=int,
        default=None,
        help="rows per no-grad scoring forward in the full and lora variants (default: the mini-batch size)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest response (default 32; --real 64)")
    parser.add_argument(
        "--prompt-length",
        type=int,
        default=None,
        help="every prompt exactly this many tokens (default: the script's own encoding; --real 256)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="which variants (default: full; all three with llama-bpe)",
    )
    parser.add_argument(
        "--logprob-chunk",
        default="auto",
        help="positions per chunk of forward_logprobs's LM head in the scripts' path (common.LOGPROB_CHUNK): auto "
        "(default), 0 = one pass of the whole logits, N = N positions",
    )
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the adapters of the lora variant")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up; medians are reported")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = cuda if available else cpu (cpu hides the GPUs from this process)",
    )
    parser.add_argument("--scripts", nargs="+", choices=ONLINE, default=list(ONLINE), help="which online scripts")
    parser.add_argument("--seed", type=int, default=1, help="seed of the prompt draw and of the sampling")
    parser.add_argument(
        "--live-memory",
        action="store_true",
        help="CPU: one more iteration under torch's profiler, which reports how far each phase's live tensors grow "
        "(the rest of the RSS growth is what the allocator keeps); costs that iteration's time",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number (and the per-repeat times) here")
    parser.add_argument("--trust-remote-code", action="store_true")
    opts = parser.parse_args(argv)

    # Fill what was not given: the --real preset first, then the plain defaults.
    if opts.real:
        for name, value in REAL.items():
            if getattr(opts, name) is None:
                setattr(opts, name, value)
        if opts.dataset is None and os.path.exists(HH_PROMPTS):
            opts.dataset = HH_PROMPTS
    for name, value in PLAIN.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.reward_model is None:
        opts.reward_model = opts.model if opts.model in BUILT_MODELS else "builtin"
    if opts.variants is None:
        opts.variants = list(VARIANTS) if opts.model in BUILT_MODELS else ["full"]
    if opts.logprob_chunk != "auto":
        if not opts.logprob_chunk.isdigit():
            parser.error("--logprob-chunk must be auto, 0 (off) or a number of positions")
        opts.logprob_chunk = int(opts.logprob_chunk)

    # Sizes that cannot work.
    for name in ("batch_size", "max_new_tokens", "repeats", "lora_r"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if opts.mini_batch_size is not None and (opts.mini_batch_size < 1 or opts.batch_size % opts.mini_batch_size):
        parser.error(f"--mini-batch-size must divide --batch-size {opts.batch_size}")
    if opts.forward_batch_size is not None and opts.forward_batch_size < 1:
        parser.error("--forward-batch-size must be at least 1")
    if opts.prompt_length is not None and opts.prompt_length < 1:
        parser.error("--prompt-length must be at least 1")
    return opts


def machine_line(torch, device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = [f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)"]
    for module in ("transformers", "deepspeed", "peft"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"no {module}")
    gpu = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "none used"
    return (
        f"machine: {cpu}, {os.cpu_count()} cores ({usable} usable), {platform.system()} {platform.release()}; "
        f"{', '.join(versions)}; device {device} (GPU: {gpu})"
    )


# ---- memory: GPU allocated bytes, else the process's RSS (VmRSS now, VmHWM = its peak since the last reset) ----------
def status_bytes(field):
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def idle_bytes(torch, device):
    """What the process holds before any model: GPU bytes allocated, or its resident set (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = status_bytes("VmRSS")
    if rss is None:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
    return rss


def release_freed_memory(torch, device):
    """Free what earlier models left: Python's cycles (DeepSpeed engines hold some), the GPU cache, and the heap pages
    glibc keeps after free() (without malloc_trim they stay resident and the next variant's RSS would start above
    its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def live_growth(torch, fn, *args):
    """(fn(*args), the peak growth of the bytes held by live CPU tensors while it ran), from the allocations and frees
    torch's profiler records: what the phase itself needs at its peak beyond what it started with, whatever the
    allocator keeps around it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args)
    changes = []
    for event in prof.profiler.kineto_results.events():
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
            changes.append((event.start_ns(), event.nbytes()))
    live = 0
    peak = 0
    for _, change in sorted(changes):
        live += change
        peak = max(peak, live)
    return out, peak


def tensor_bytes(torch):
    """The bytes of every CPU tensor Python can reach (parameters, optimiser states, buffers, whatever a variable
    holds), each storage once: what is alive, whether or not its pages were ever touched."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return "GPU max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM (peak RSS) to the current RSS
        return "peak RSS (VmHWM, reset per variant)"
    except OSError:
        return "peak RSS of the process so far (ru_maxrss; cannot reset)"


def read_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    peak = status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
    return peak


def reward_module(reward, torch):
    """The frozen model inside a `common.load_reward` scorer (a closure over it, under torch.no_grad's wrapper); None
    for a Python function."""
    scorer = inspect.unwrap(reward.score)
    for cell in scorer.__closure__ or ():
        if isinstance(cell.cell_contents, torch.nn.Module):
            return cell.cell_contents
    return None


def memory_floor(held_models, trained_models):
    """Bytes the variant must hold: every weight of `held_models` once (a parameter shared by two models, or tied
    within one, counts once), plus a gradient and AdamW's two states (exp_avg, exp_avg_sq, each the parameter's
    size and dtype) for every trainable parameter of `trained_models`."""
    weights = {}
    for model in held_models:
        for parameter in model.parameters():
            weights[id(parameter)] = parameter.numel() * parameter.element_size()
    trained = {}
    for model in trained_models:
        for parameter in model.parameters():
            if parameter.requires_grad:
                trained[id(parameter)] = parameter.numel() * parameter.element_size()
    floor = {
        "weights": sum(weights.values()),
        "gradients": sum(trained.values()),
        "adamw_states": 2 * sum(trained.values()),
        "trainable_parameters_bytes": sum(trained.values()),
    }
    floor["total"] = floor["weights"] + floor["gradients"] + floor["adamw_states"]
    return floor


# ---- the built-in real-architecture model ----------------------------------------------------------------------------
def llama_bpe_folders(common, name=LLAMA_BPE):
    """(policy folder, reward folder) of `llama-bpe` or `llama-bpe-152k`, built on first use (seconds) into the cache.
    Returns them and whether they were built now. `llama-bpe-152k` is the same Llama with Qwen 2.5's 151,936-row
    embedding: GPT-2's 50,257 token ids are a subset, the other rows are never read by a token but are a real
    vocabulary's LM head (its logits, log-sum-exp and softmax)."""
    tokenizer_file = os.path.join(GPT2_TOKENIZER, "tokenizer.json")
    if not os.path.exists(tokenizer_file):
        common.fail(
            f"--model {name} needs GPT-2's tokenizer in {os.path.normpath(GPT2_TOKENIZER)} (../shared "
            f"beside the project); pass another --model"
        )

    # The folder's name: a hash of the settings and of the tokenizer's own file.
    with open(tokenizer_file, "rb") as f:
        tokenizer_digest = hashlib.sha256(f.read()).hexdigest()
    settings = dict(LLAMA_BPE_SETTINGS)
    if name == LLAMA_152K:
        settings["vocab_size"] = VOCAB_152K
    key_text = json.dumps([settings, tokenizer_digest], sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    cache = os.environ.get("ONEFILE_RLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "onefile-rlhf"))
    path = os.path.join(cache, "bench", f"{name}-{key}")
    policy_path = os.path.join(path, "policy")
    reward_path = os.path.join(path, "reward")
    if os.path.exists(os.path.join(reward_path, "config.json")):
        return policy_path, reward_path, False

    # Build aside and rename when complete, so that a killed build leaves nothing half-written under the key.
    import torch
    import transformers

    print(f"bench: building {name} into {path}", file=sys.stderr, flush=True)
    building = f"{path}.tmp-{os.getpid()}"
    tokenizer = transformers.AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    seed = settings.pop("seed")
    vocab_size = settings.pop("vocab_size", len(tokenizer))
    eos = tokenizer.eos_token_id
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        num_labels=1,
        **settings,
    )
    torch.manual_seed(seed)
    policy = transformers.LlamaForCausalLM(config)
    policy.save_pretrained(os.path.join(building, "policy"))
    tokenizer.save_pretrained(os.path.join(building, "policy"))
    torch.manual_seed(seed + 1)
    reward = transformers.LlamaForSequenceClassification(config)
    reward.save_pretrained(os.path.join(building, "reward"))
    tokenizer.save_pretrained(os.path.join(building, "reward"))
    try:
        os.rename(building, path)
    except OSError:  # another process finished first: keep its folder
        import shutil

        shutil.rmtree(building, ignore_errors=True)
    return policy_path, reward_path, True


def fixed_length_prompts(common, tokenizer, texts, length, count, seed):
    """`count` prompts of exactly `length` token ids: the texts in a seeded random order, tokenized without special
    tokens, their ids concatenated and cut into consecutive pieces (the texts are reused if they run out)."""
    import torch

    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    stream = []
    position = 0
    while len(stream) < length * count:
        text = common.prompt_text(texts[order[position % len(order)]])
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        position += 1
    return [stream[i * length : (i + 1) * length] for i in range(count)]


def median(reps, key):
    return statistics.median(rep[key] for rep in reps)


def main(argv=None):
    opts = parse_args(argv)
    if opts.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch / DeepSpeed look: the engines land on the CPU too
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, ROOT)

    import torch
    from transformers import GenerationConfig

    import common

    if opts.device == "cuda" and not torch.cuda.is_available():
        common.fail("--device cuda, but torch sees no GPU")
    _, world_size, device = common.init_distributed(0)  # a world of one: DeepSpeed's ZeRO-0 engines need a group
    if world_size != 1:
        common.fail("the benchmark runs as one process; start it with python (or ./launch.sh bench), not torchrun")
    cuda = device.type == "cuda"
    modules = {name: importlib.import_module(name) for name in opts.scripts}
    if "lora" in opts.variants:
        import peft  # noqa: F401 - imported before the idle measurement, as everything else the run needs

    # The models: `llama-bpe` and `llama-bpe-152k` are built (first time) or found in the cache.
    built_now = False
    model_name = opts.model
    reward_name = opts.reward_model
    for built_in in BUILT_MODELS:
        if built_in in (opts.model, opts.reward_model):
            policy_path, reward_path, built = llama_bpe_folders(common, built_in)
            built_now = built_now or built
            release_freed_memory(torch, device)
            if opts.model == built_in:
                model_name = policy_path
            if opts.reward_model == built_in:
                reward_name = reward_path
    common.LOGPROB_CHUNK = opts.logprob_chunk  # forward_logprobs's default, in the scripts' path only

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed(fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        return out, time.perf_counter() - t0

    # The prompts: one fixed draw, as texts (and, with --prompt-length, as token ids of exactly that length).
    header = machine_line(torch, device)
    tokenizer = common.load_tokenizer(model_name, "--model", trust_remote_code=opts.trust_remote_code)
    all_texts = common.load_prompts(opts.dataset, "train")
    fixed_rows = None
    if opts.prompt_length is not None:
        fixed_rows = fixed_length_prompts(
            common,
            tokenizer=tokenizer,
            texts=all_texts,
            length=opts.prompt_length,
            count=opts.batch_size,
            seed=opts.seed,
        )
        prompt_texts = tokenizer.batch_decode(fixed_rows)
    else:
        generator = torch.Generator().manual_seed(opts.seed)
        draw = torch.randint(len(all_texts), (opts.batch_size,), generator=generator)
        prompt_texts = [all_texts[i] for i in draw]
    del all_texts

    # The idle process: everything imported, the tokenizer and the prompts loaded, no model yet.
    release_freed_memory(torch, device)
    idle = idle_bytes(torch, device)
    idle_tensors = tensor_bytes(torch) if opts.live_memory else 0

    def bench_one(name, variant):
        """Time one script in one variant against the bare baselines; its models live and die in this call."""
        mod = modules[name]
        sargs = mod.Args()  # the script's own defaults: sampling, mini-batch size, loss coefficients, learning rates
        mb = min(opts.mini_batch_size or sargs.mini_batch_size, opts.batch_size)
        if opts.batch_size % mb:
            common.fail(
                f"--batch-size {opts.batch_size} is not a multiple of {name}'s mini-batch size {mb}; pass "
                f"--mini-batch-size"
            )
        chunk = opts.batch_size if variant == "unchunked" else (opts.forward_batch_size or mb)
        lora_r = opts.lora_r if variant == "lora" else 0
        epochs = sargs.update_epochs
        print(
            f"bench: {name} {variant} (mini-batch {mb}, forward batch {chunk}, LoRA r {lora_r}, {opts.repeats} "
            f"repeat(s) after a warm-up)",
            file=sys.stderr,
            flush=True,
        )

        # ---- the peak starts here: the previous variant's models are gone, this one's are not loaded yet -----------
        release_freed_memory(torch, device)
        start_bytes = idle_bytes(torch, device)
        memory_kind = reset_peak(torch, device)

        # ---- models, loaded and placed as the scripts do (ZeRO-0, float32, everything on this rank's device) -------
        random.seed(opts.seed)
        torch.manual_seed(opts.seed)
        load = {
            "dtype": "float32",
            "trust_remote_code": opts.trust_remote_code,
            "attn_implementation": None,
            "sharded": None,
            "load_in_4bit": False,
        }
        policy = common.load_model(model_name, "causal", "--model", **load)
        ref_policy = None
        if not lora_r:  # with LoRA, π_ref is the policy with its adapter switched off
            ref_policy = common.load_model(model_name, "causal", "--model", **load)
        reward = common.load_reward(
            reward_name,
            tokenizer,
            placement="policy",
            zero_stage=0,
            micro_batch_size=mb,
            bf16=False,
            trust_remote_code=opts.trust_remote_code,
            dtype="auto",
        )
        # As the scripts do: the value model starts from the reward model when it reads the policy's token ids
        if reward.same_vocabulary:
            value_source = common.resolve(reward_name, "reward")
        else:
            value_source = common.resolve(model_name, "sft")
        value_model = common.load_model(
            value_source, "score", "--value-model", pad_token_id=tokenizer.pad_token_id, **load
        )
        context = policy.config.max_position_embeddings
        policy.generation_config.pad_token_id = tokenizer.pad_token_id

        # LoRA adapters (a no-op at r = 0), then the DeepSpeed engines with the scripts' optimizer settings
        lora = {
            "r": lora_r,
            "alpha": sargs.lora_alpha,
            "dropout": sargs.lora_dropout,
            "target_modules": sargs.lora_target_modules,
            "quantized": False,
        }
        policy = common.add_lora(policy, "causal", **lora)
        value_model = common.add_lora(value_model, "score", **lora)
        schedule = common.lr_schedule(sargs.lr_warmup_steps, 10**6, sargs.lr_schedule)
        engine = {
            "placement": "policy",
            "zero_stage": 0,
            "micro_batch_size": mb,
            "bf16": False,
            "offload": False,
            "max_grad_norm": sargs.max_grad_norm,
            "betas": sargs.adam_betas,
            "weight_decay": sargs.weight_decay,
            "schedule": schedule,
        }
        policy = common.prepare_trainable(policy, lr=sargs.learning_rate, **engine)
        value_model = common.prepare_trainable(value_model, lr=sargs.value_learning_rate, **engine)
        if lora_r:
            ref_policy = policy  # read through common.adapter_off: the base weights
        else:
            ref_policy = common.prepare_frozen(ref_policy, placement="policy", zero_stage=0, micro_batch_size=mb)
        raw_policy = getattr(policy, "module", policy)  # the HF model (a PeftModel with LoRA) inside the engine
        raw_value = getattr(value_model, "module", value_model)

        # ---- the floor: what this variant must hold ---------------------------------------------------------------
        held = [raw_policy, raw_value]
        if ref_policy is not policy:
            held.append(getattr(ref_policy, "module", ref_policy))
        reward_model = reward_module(reward, torch)
        if reward_model is not None:
            held.append(reward_model)
        floor = memory_floor(held, [raw_policy, raw_value])
        optimizers_used = sorted({type(policy.optimizer).__name__, type(value_model.optimizer).__name__})

        # ---- sampling settings and the prompt batch ---------------------------------------------------------------
        generation_config = GenerationConfig(
            do_sample=True,
            temperature=sargs.temperature,
            top_k=sargs.top_k,
            top_p=sargs.top_p,
            max_new_tokens=opts.max_new_tokens,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if fixed_rows is not None:
            if opts.prompt_length + opts.max_new_tokens > context:
                common.fail(
                    f"--prompt-length {opts.prompt_length} + --max-new-tokens {opts.max_new_tokens} exceeds the "
                    f"model's context of {context} tokens"
                )
            rows = fixed_rows
        else:
            rows, _ = common.encode_prompts(
                tokenizer,
                prompt_texts,
                max_prompt_length=sargs.max_prompt_length,
                max_new_tokens=opts.max_new_tokens,
                context=context,
            )
        query_ids, query_mask = common.pad_left(rows, tokenizer.pad_token_id, device)
        sampling = {"temperature": sargs.temperature}
        if name == "ppo":
            sampling["repetition_penalty"] = sargs.repetition_penalty

        # ---- the script's path --------------------------------------------------------------------------------------
        def script_generate():
            """rollout() up to scoring: eval mode (ppo.py), generate, cut after EOS / stop strings."""
            penalty = {}
            if name == "ppo":
                policy.eval()
                value_model.eval()
                penalty["repetition_penalty"] = sargs.repetition_penalty  # only ppo.py's generate() takes it
            response_ids = mod.generate(
                policy,
                query_ids=query_ids,
                query_mask=query_mask,
                generation_config=generation_config,
                zero3=False,
                **penalty,
            )
            return common.truncate_after_eos(
                response_ids,
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
                tokenizer=tokenizer,
                stop_strings=sargs.stop_strings,
            )

        def bare_generate():  # transformers' own generate with the same settings, nothing of the script around it
            return raw_policy.generate(
                input_ids=query_ids,
                attention_mask=query_mask,
                generation_config=generation_config,
            )

        def policy_logprobs(*rows):
            return common.forward_logprobs(policy, *rows, **sampling)

        def ref_logprobs_of(*rows):
            return common.forward_logprobs(ref_policy, *rows, **sampling)

        def values_of(*rows):
            return common.forward_values(value_model, *rows)

        def script_score(response_ids, response_mask):
            """The rest of rollout() and the iteration up to the update: the reward, π_old and π_ref log-probs, the
            values (all no-grad, `chunk` rows at a time), the rewards, GAE and whitening (the scripts' defaults: no
            reward scaling or clipping, no missing-EOS penalty)."""
            fwd = (query_ids, query_mask, response_ids, response_mask)
            scores = common.in_chunks(reward, (*fwd, prompt_texts), chunk).to(device)
            with torch.no_grad():
                old_logprobs = common.in_chunks(policy_logprobs, fwd, chunk)
                with common.adapter_off(ref_policy):
                    ref_logprobs = common.in_chunks(ref_logprobs_of, fwd, chunk).to(device)
                mask = response_mask.to(old_logprobs.dtype)
                batch = (query_ids, query_mask, response_ids, mask)
                old_values = common.in_chunks(values_of, batch, chunk).to(device)
                if name == "ppo":  # the score on the last token, the k1 KL penalty on every token
                    rewards = -sargs.init_kl_coef * (old_logprobs - ref_logprobs) * mask
                else:  # apa / awr: the score alone on the last token
                    rewards = torch.zeros_like(mask)
                rewards[torch.arange(len(rewards)), mask.sum(1).long() - 1] += scores
                advantages, returns = mod.compute_gae(
                    rewards=rewards,
                    values=old_values,
                    response_mask=mask,
                    gamma=sargs.gamma,
                    gae_lambda=sargs.gae_lambda,
                )
                if sargs.whiten_advantages:
                    advantages = common.whiten_masked(advantages, mask, across_ranks=True)
            return SimpleNamespace(
                batch=batch,
                old_logprobs=old_logprobs,
                ref_logprobs=ref_logprobs,
                old_values=old_values,
                advantages=advantages,
                returns=returns,
            )

        def script_update(r, minibatches):
            """One epoch of the script's update loop (ppo.py's inner loop; apa.py / awr.py's update())."""
            step_stats = []
            policy.train()
            value_model.train()
            for idx in minibatches:
                fwd = [t[idx] for t in r.batch]
                mask = fwd[3]
                if name == "ppo":
                    logprobs, entropy = common.forward_logprobs(
                        policy,
                        *fwd,
                        with_entropy=True,
                        entropy_grad=sargs.entropy_coef != 0,
                        **sampling,
                    )
                    values = common.forward_values(value_model, *fwd).to(device)
                    terms = mod.ppo_loss(
                        logprobs=logprobs,
                        old_logprobs=r.old_logprobs[idx],
                        values=values,
                        old_values=r.old_values[idx],
                        advantages=r.advantages[idx],
                        returns=r.returns[idx],
                        response_mask=mask,
                        cliprange=sargs.cliprange,
                        cliprange_value=sargs.cliprange_value,
                        vf_coef=sargs.vf_coef,
                    )
                    entropy_mean = common.masked_mean(entropy, mask)
                    policy.backward(terms.policy_loss - sargs.entropy_coef * entropy_mean)
                    value_model.backward(sargs.vf_coef * terms.value_loss)
                    policy.step()
                    value_model.step()
                    step_stats.append([terms.policy_loss.item(), terms.value_loss.item(), entropy_mean.item()])
                else:
                    logprobs = common.forward_logprobs(policy, *fwd, **sampling)
                    values = common.forward_values(value_model, *fwd).to(device)
                    if name == "apa":
                        pg_loss = mod.apa_loss(
                            logprobs=logprobs,
                            ref_logprobs=r.ref_logprobs[idx],
                            advantages=r.advantages[idx],
                            response_mask=mask,
                            lam=sargs.lam,
                        )
                    else:
                        pg_loss = mod.awr_loss(
                            logprobs=logprobs,
                            advantages=r.advantages[idx],
                            response_mask=mask,
                            lam=sargs.lam,
                            max_weight=sargs.max_weight,
                        )
                    vf_loss = mod.value_loss(values=values, returns=r.returns[idx], response_mask=mask)
                    policy.backward(pg_loss)
                    value_model.backward(sargs.vf_coef * vf_loss)
                    policy.step()
                    value_model.step()
                    log_ratio = (logprobs - r.ref_logprobs[idx]).detach()
                    stats = [pg_loss.item(), vf_loss.item(), common.masked_mean(log_ratio, mask).item()]
                    if name == "awr":
                        clamped = (r.advantages[idx] / sargs.lam > math.log(sargs.max_weight)).to(log_ratio.dtype)
                        stats.append(common.masked_mean(clamped, mask).item())
                    step_stats.append(stats)
            if name != "ppo":  # apa.py / awr.py's update() ends in eval mode, for the next rollout
                policy.eval()
                value_model.eval()
            return step_stats

        # ---- the bare loop: same models, same mini-batch inputs, simplest loss, plain AdamW --------------------------
        value_inner = common.hf_model(value_model)  # the transformers model (LoRA layers injected, if any)
        value_body = getattr(value_inner, value_inner.base_model_prefix)
        takes_keep = "logits_to_keep" in inspect.signature(common.hf_model(policy).forward).parameters

        def bare_inputs(r, minibatches):
            """(ids, mask, positions, logits_to_keep) per mini-batch, built outside the timed region."""
            inputs = []
            for idx in minibatches:
                ids, mask, pos = common.concat_inputs(*[t[idx] for t in r.batch], device)
                keep = {"logits_to_keep": r.batch[2].shape[1] + 1} if takes_keep else {}
                inputs.append((ids, mask, pos, keep))
            return inputs

        def bare_update(inputs, optimizers):
            for ids, mask, pos, keep in inputs:
                logits = raw_policy(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **keep
                ).logits
                hidden = value_body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                loss = logits.mean() + value_inner.score(hidden.last_hidden_state).mean()
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        def minibatches_for(seed):
            return torch.randperm(opts.batch_size, generator=torch.Generator().manual_seed(seed)).split(mb)

        # ---- warm-up = the memory pass: one script iteration, nothing of the bare side allocated yet ----------------
        # The peak of each phase: the peak counter is reset when the phase starts and read when it ends; what the
        # process held at its start is kept too (the phase's own transient memory is the difference)
        phase_peaks = {"loading": read_peak(torch, device)}
        phase_starts = {"loading": start_bytes}
        torch.manual_seed(opts.seed)
        phase_starts["generation"] = idle_bytes(torch, device)
        reset_peak(torch, device)
        response_ids, response_mask, _ = script_generate()
        phase_peaks["generation"] = read_peak(torch, device)
        phase_starts["scoring"] = idle_bytes(torch, device)
        reset_peak(torch, device)
        rollout = script_score(response_ids, response_mask)
        phase_peaks["scoring"] = read_peak(torch, device)
        phase_starts["update"] = idle_bytes(torch, device)
        reset_peak(torch, device)
        script_update(rollout, minibatches_for(opts.seed))
        phase_peaks["update"] = read_peak(torch, device)
        peak_bytes = max(phase_peaks.values())

        # ---- --live-memory (CPU): the same phases again under the profiler; how far live tensors grow in each ------
        live_peaks = {}
        live_starts = {}
        if opts.live_memory and not cuda:
            torch.manual_seed(opts.seed)
            live_starts["generation"] = tensor_bytes(torch) - idle_tensors
            (live_ids, live_mask, _), live_peaks["generation"] = live_growth(torch, script_generate)
            live_starts["scoring"] = tensor_bytes(torch) - idle_tensors
            live_rollout, live_peaks["scoring"] = live_growth(torch, script_score, live_ids, live_mask)
            live_starts["update"] = tensor_bytes(torch) - idle_tensors
            _, live_peaks["update"] = live_growth(torch, script_update, live_rollout, minibatches_for(opts.seed))
            del live_ids, live_mask, live_rollout

        # ---- the bare side's optimizers and its warm-up ------------------------------------------------------------
        optimizers = []
        for model, lr in ((raw_policy, sargs.learning_rate), (raw_value, sargs.value_learning_rate)):
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizers.append(torch.optim.AdamW(trainable, lr=lr, betas=sargs.adam_betas, weight_decay=0.0))
        torch.manual_seed(opts.seed)
        bare_generate()
        bare_update(bare_inputs(rollout, minibatches_for(opts.seed)), optimizers)

        # ---- timed repeats: each pair back to back, the order alternating --------------------------------------------
        reps = []
        for rep in range(opts.repeats):
            seed = opts.seed + 1 + rep
            order = ("bare", "script") if rep % 2 == 1 else ("script", "bare")
            generated = {}
            for side in order:
                torch.manual_seed(seed)
                generated[side] = timed(script_generate if side == "script" else bare_generate)
            (response_ids, response_mask, _), t_gen = generated["script"]
            bare_out, t_bare_gen = generated["bare"]
            bare_ids, bare_mask, _ = common.truncate_after_eos(
                bare_out[:, query_ids.shape[1] :],
                eos_id=tokenizer.eos_token_id,
                pad_id=tokenizer.pad_token_id,
            )
            same = bool(torch.equal(bare_ids, response_ids) and torch.equal(bare_mask, response_mask))
            gen_tokens = int(response_mask.sum())  # real response tokens, the EOS included, padding not
            bare_gen_tokens = int(bare_mask.sum())
            rollout, t_score = timed(script_score, response_ids, response_mask)
            update_tokens = int(rollout.batch[3].sum())  # one epoch visits every response once
            minibatches = minibatches_for(seed)
            inputs = bare_inputs(rollout, minibatches)
            t_update = {}
            for side in order:
                if side == "script":
                    t_update[side] = timed(script_update, rollout, minibatches)[1]
                else:
                    t_update[side] = timed(bare_update, inputs, optimizers)[1]
            bare_gen_tps = bare_gen_tokens / t_bare_gen
            reps.append(
                {
                    "same_tokens": same,
                    "gen_tokens": gen_tokens,
                    "bare_gen_tokens": bare_gen_tokens,
                    "update_tokens": update_tokens,
                    "t_gen": t_gen,
                    "t_bare_gen": t_bare_gen,
                    "t_score": t_score,
                    "t_update": t_update["script"],
                    "t_bare_update": t_update["bare"],
                    "rollout_tps": gen_tokens / t_gen,
                    "bare_gen_tps": bare_gen_tps,
                    "rollout_ratio": gen_tokens / t_gen / bare_gen_tps,
                    "whole_rollout_ratio": gen_tokens / (t_gen + t_score) / bare_gen_tps,
                    "update_tps": update_tokens / t_update["script"],
                    "bare_update_tps": update_tokens / t_update["bare"],
                    "update_ratio": t_update["bare"] / t_update["script"],
                }
            )

        # ---- medians, shares and memory ----------------------------------------------------------------------------
        t_gen = median(reps, "t_gen")
        t_score = median(reps, "t_score")
        t_update = median(reps, "t_update")
        iteration = t_gen + t_score + epochs * t_update
        peak_above_idle = peak_bytes - idle
        # The policy's own size: its parameters without the LoRA adapters injected into it
        base_parameters = 0
        for parameter_name, parameter in common.hf_model(policy).named_parameters():
            if ".lora_" not in parameter_name:
                base_parameters += parameter.numel()
        return {
            "script": name,
            "variant": variant,
            "lora_r": lora_r,
            "forward_batch_size": chunk,
            "mini_batch_size": mb,
            "update_epochs": epochs,
            "policy_parameters": base_parameters,
            "model_vocabulary": common.hf_model(policy).config.vocab_size,
            "trainable_parameters": sum(p.numel() for p in raw_policy.parameters() if p.requires_grad),
            "optimizers": optimizers_used,
            "rollout_tokens_per_s": median(reps, "rollout_tps"),
            "bare_generate_tokens_per_s": median(reps, "bare_gen_tps"),
            "rollout_ratio": median(reps, "rollout_ratio"),
            "rollout_with_scoring_ratio": median(reps, "whole_rollout_ratio"),
            "update_tokens_per_s": median(reps, "update_tps"),
            "bare_update_tokens_per_s": median(reps, "bare_update_tps"),
            "update_ratio": median(reps, "update_ratio"),
            "same_tokens": all(rep["same_tokens"] for rep in reps),
            "memory_kind": memory_kind,
            "idle_bytes": idle,
            "start_bytes": start_bytes,
            "peak_memory_bytes": peak_bytes,
            "peak_above_idle_bytes": peak_above_idle,
            "phase_peaks_above_idle_bytes": {phase: peak - idle for phase, peak in phase_peaks.items()},
            "phase_starts_above_idle_bytes": {phase: held - idle for phase, held in phase_starts.items()},
            "phase_rss_growth_bytes": {phase: phase_peaks[phase] - phase_starts[phase] for phase in phase_peaks},
            "phase_live_growth_bytes": live_peaks,
            "phase_live_starts_above_idle_bytes": live_starts,
            "live_peak_above_idle_bytes": max((live_starts[p] + live_peaks[p] for p in live_peaks), default=None),
            "logprob_chunk": opts.logprob_chunk,
            "floor_bytes": floor["total"],
            "floor": floor,
            "peak_over_floor": peak_above_idle / floor["total"],
            "share_generation": t_gen / iteration,
            "share_scoring": t_score / iteration,
            "share_update": epochs * t_update / iteration,
            "repeats": reps,
        }

    # ---- every script in every variant; each variant's models are freed before the next is loaded --------------------
    results = []
    for name in opts.scripts:
        for variant in opts.variants:
            results.append(bench_one(name, variant))
    release_freed_memory(torch, device)
    memory_kind = results[0]["memory_kind"]
    n_params = results[0]["policy_parameters"]

    # ---- report -------------------------------------------------------------------------------------------------
    def at_least(x, target):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.2f}" + ("" if x >= target else " ⚠ below")

    def at_most(x, target):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.2f}" + ("" if x <= target else " ⚠ above")

    mib = 2**20
    prompts = (
        f"prompts of exactly {opts.prompt_length} tokens" if opts.prompt_length else "the scripts' prompt encoding"
    )
    setup = (
        f"setup: policy {opts.model} ({n_params / 1e6:.2f} M parameters, vocabulary {results[0]['model_vocabulary']}, "
        f"tokenizer {len(tokenizer)}), reward/value {opts.reward_model}; {opts.batch_size} prompts ({prompts}, "
        f"{opts.dataset}), <= {opts.max_new_tokens} new tokens; float32, ZeRO-0, one process; median of "
        f"{opts.repeats} repeat(s) after 1 warm-up; log-prob chunk {opts.logprob_chunk} (positions per chunk of the "
        f"LM head; 0 = none); memory = {memory_kind}, idle process {idle / mib:.0f} MiB"
    )
    columns = (
        "script",
        "variant",
        "rollout tok/s",
        "bare generate tok/s",
        f"rollout ratio (≥ {TARGETS['rollout']})",
        f"whole rollout ratio (≥ {TARGETS['whole_rollout']})",
        "update tok/s",
        "bare loop tok/s",
        f"update ratio (≥ {TARGETS['update']})",
        "peak above idle (MiB)",
        "load / gen / score / update peaks (MiB)",
        "floor (MiB)",
        f"peak / floor (≤ {TARGETS['memory']})",
        "gen / score / update",
    )
    lines = [header, setup, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in results:
        variant = f"{r['variant']} (fwd {r['forward_batch_size']}, mb {r['mini_batch_size']}"
        if r["lora_r"]:
            variant += f", r {r['lora_r']}"
        variant += ")"
        shares = f"{100 * r['share_generation']:.0f} / {100 * r['share_scoring']:.0f} / {100 * r['share_update']:.0f} %"
        cells = (
            r["script"],
            variant,
            f"{r['rollout_tokens_per_s']:.0f}",
            f"{r['bare_generate_tokens_per_s']:.0f}",
            at_least(r["rollout_ratio"], TARGETS["rollout"]),
            at_least(r["rollout_with_scoring_ratio"], TARGETS["whole_rollout"]),
            f"{r['update_tokens_per_s']:.0f}",
            f"{r['bare_update_tokens_per_s']:.0f}",
            at_least(r["update_ratio"], TARGETS["update"]),
            f"{r['peak_above_idle_bytes'] / mib:.1f}",
            " / ".join(f"{peak / mib:.0f}" for peak in r["phase_peaks_above_idle_bytes"].values()),
            f"{r['floor_bytes'] / mib:.1f}",
            at_most(r["peak_over_floor"], TARGETS["memory"]),
            shares,
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "tok/s = real response tokens per second. rollout = the script's generate() + truncate_after_eos; whole "
        "rollout = generation + scoring (reward, π_old / π_ref log-probs, values, GAE), both against bare "
        "generate(); update = one epoch of the script's mini-batch loop (loss, backward, step on its DeepSpeed "
        "engines) vs a bare forward/backward/AdamW loop on the same models and mini-batches; shares are of one "
        "iteration (generation, scoring, update_epochs × update). fwd = rows per no-grad scoring forward, mb = "
        "mini-batch, r = LoRA rank."
    )
    optimizer_names = sorted({o for r in results for o in r["optimizers"]})
    lines.append(
        "peak above idle = the peak over loading the variant's models and one script iteration, minus the idle "
        "process; the peaks of its phases (loading the models and their engines, generation, scoring, one update "
        "epoch), each minus the idle process, follow it. floor = float32 weights of the policy, π_ref (a model of its "
        "own except with LoRA), the value and the reward model, plus a gradient and AdamW's exp_avg and exp_avg_sq "
        "for every trainable parameter; ZeRO-0 "
        f"float32 DeepSpeed holds nothing more (its optimizer: {', '.join(optimizer_names)}; the flat gradient copy "
        "of its all-reduce lives only during that call and is not counted). ⚠ = target missed (reported, not "
        "failed)."
    )
    for r in results:
        if r["variant"] == "full" and r["forward_batch_size"] >= opts.batch_size:
            lines.append(
                f"note: {r['script']}: the forward batch of `full` is the whole rollout batch: it does the work of "
                f"`unchunked` (pass --mini-batch-size or --forward-batch-size below --batch-size)"
            )
    if built_now:
        lines.append(
            f"note: {opts.model} was built in this run; what the build left resident counts in the idle process"
        )
    for r in results:
        if not r["same_tokens"]:
            lines.append(
                f"warning: {r['script']} {r['variant']}: the script's and the bare generate() sampled different "
                f"tokens from the same seed; the rollout ratio compares different work"
            )
    if any(r["phase_live_growth_bytes"] for r in results):
        lines.append("")
        lines.append(
            "Where each phase's memory goes (--live-memory; MiB, above the idle process): the RSS at the phase's "
            "start and how far it grew over the phase; the bytes of the tensors alive at its start and how far they "
            "grew (torch's profiler, a second iteration); live peak = the largest start + growth, against the floor. "
            "RSS − live is what glibc's allocator keeps resident beyond the tensors alive, and mapped weight pages not "
            "yet read."
        )
        phases = ("generation", "scoring", "update")
        live_columns = ["script", "variant", "floor"]
        for phase in phases:
            live_columns += [f"{phase}: RSS at start", "RSS growth", "live at start", "live growth"]
        live_columns += ["live peak", "live peak / floor"]
        lines.append("| " + " | ".join(live_columns) + " |")
        lines.append("|" + "---|" * len(live_columns))
        for r in results:
            if not r["phase_live_growth_bytes"]:
                continue
            cells = [r["script"], r["variant"], f"{r['floor_bytes'] / mib:.0f}"]
            for phase in phases:
                cells.append(f"{r['phase_starts_above_idle_bytes'][phase] / mib:.0f}")
                cells.append(f"{r['phase_rss_growth_bytes'][phase] / mib:.0f}")
                cells.append(f"{r['phase_live_starts_above_idle_bytes'][phase] / mib:.0f}")
                cells.append(f"{r['phase_live_growth_bytes'][phase] / mib:.0f}")
            cells.append(f"{r['live_peak_above_idle_bytes'] / mib:.0f}")
            cells.append(at_most(r["live_peak_above_idle_bytes"] / r["floor_bytes"], TARGETS["memory"]))
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)

    # ---- every number, for later comparison -----------------------------------------------------------------------
    if opts.json:
        record = {
            "machine": header,
            "settings": vars(opts),
            "device": str(device),
            "memory_kind": memory_kind,
            "idle_bytes": idle,
            "policy_parameters": n_params,
            "vocabulary": len(tokenizer),
            "targets": TARGETS,
            "results": results,
        }
        with open(opts.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {opts.json}")
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
