"""Shared test plumbing: the scripts run as subprocesses with tiny settings (cleanRL-style), offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # anything that reaches for the hub fails at once instead of hanging
# Every process the tests start fails where a pass in eval mode builds an autograd graph (no_graph/sitecustomize.py)
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(ROOT / "tests" / "no_graph"), os.environ.get("PYTHONPATH")])
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# This venv's tools first, for every run: DeepSpeed compiles its CPU comm op with the first `ninja` on PATH, and the
# venv's ninja (1.13) and the system's (1.11) keep different build logs, so alternating between them recompiles it.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


# The settings of a quick online run on the built-in task: two iterations of 16 responses, one update epoch
TINY_ONLINE = (
    "--total-episodes 32 --rollout-batch-size 16 --mini-batch-size 8 --update-epochs 1 --max-new-tokens 12 "
    "--eval-prompts 16 --eval-every 1"
).split()


@pytest.fixture(scope="session")
def builtin_path():
    """The shipped built-in task: builtin/ beside common.py."""
    import common

    return os.path.dirname(common.resolve(common.BUILTIN, "sft"))


# How many of the built-in task's 1024 scored rows an offline run that checks plumbing (not learning) trains on
OFFLINE_HEAD_ROWS = 256


@pytest.fixture(scope="session")
def builtin_offline_head(builtin_path, tmp_path_factory):
    """The first OFFLINE_HEAD_ROWS rows {prompt, response, reward} of the built-in task's scored rows, as a .jsonl for
    --offline-dataset: an offline run over them takes a quarter of the steps of one over all 1024."""
    from datasets import load_from_disk

    rows = load_from_disk(os.path.join(builtin_path, "data", "offline")).select(range(OFFLINE_HEAD_ROWS))
    path = tmp_path_factory.mktemp("builtin_offline") / f"head{OFFLINE_HEAD_ROWS}.jsonl"
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({key: row[key] for key in ("prompt", "response", "reward")}) + "\n")
    return str(path)


def train_bpe(texts, vocab_size):
    """A byte-level BPE tokenizer trained on `texts`, with <|endoftext|> (EOS) and <|pad|> (pad): a tokenizer of
    another vocabulary than the policy's, made in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")


def free_port():
    """A port no other run of this session uses: DeepSpeed names its CPU shared-memory all-reduce buffers
    (/dev/shm/deepspeed_allreduce_buffer_*) after the master port, so two runs on one port share them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, nproc=1, env=None, check=True, timeout=600):
    """Run SCRIPT.py with ARGS in a subprocess (torchrun with nproc > 1); return the CompletedProcess."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(ROOT / script),
            *args,
        ]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def read_run(output_dir):
    """(run folder, list of metrics.jsonl records) of the single run written under output_dir."""
    runs = [p for p in Path(output_dir).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    with open(runs[0] / "metrics.jsonl") as f:
        return runs[0], [json.loads(line) for line in f]


def run_and_stop(script, *args, after, nproc=1, sig=None, env=None, timeout=600):
    """Start SCRIPT like run_script, send it SIGTERM (or `sig`) once a stdout line contains `after`, as a cluster
    preempting the job would (under torchrun: to the launcher, which forwards it); return (returncode, stdout)."""
    import signal
    import time

    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        **(env or {}),
    }
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        if nproc > 1
        else [sys.executable]
    )
    proc = subprocess.Popen(
        [*launcher, str(ROOT / script), *args],
        cwd=ROOT,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if after in line:
            proc.send_signal(sig or signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    lines += proc.stdout.readlines()
    return proc.wait(timeout=timeout), "".join(lines)


def assert_resume_reproduces(script, args, records, tmp_path, nproc=1, env=None):
    """Stop SCRIPT with SIGTERM as soon as it starts training, resume it from the checkpoint it wrote, and check that
    the resumed run logs exactly `records`, those of an uninterrupted run with the same ARGS (and `env`: the thread
    count changes the last bits)."""
    rc, out = run_and_stop(
        script, *args, "--output-dir", str(tmp_path / "stopped"), after="before training", nproc=nproc, env=env
    )
    assert "stopped by SIGTERM; continue with" in out, out[-3000:]
    assert rc == (143 if nproc == 1 else 1), out[-3000:]  # torchrun itself exits 1 after forwarding the signal
    stopped, _ = read_run(tmp_path / "stopped")
    saved_step = json.loads((stopped / "resume" / "meta.json").read_text())["step"]
    assert 1 <= saved_step < records[-1]["step"], saved_step  # stopped mid-run, not at the end
    assert not (stopped / "policy").exists()  # no final model from a stopped run
    resumed = run_script(
        script,
        *args,
        "--output-dir",
        str(tmp_path / "resumed"),
        "--resume",
        str(stopped / "resume"),
        nproc=nproc,
        env=env,
    )
    assert f"resumed from {stopped / 'resume'} at step {saved_step}" in resumed.stdout
    _, resumed_records = read_run(tmp_path / "resumed")
    # every logged number, before and after the stop, to the last digit written; wall-clock seconds aside
    assert without_timings(resumed_records) == without_timings(records)


def without_timings(records):
    """metrics.jsonl records without their time/ keys (wall-clock seconds and rates, which differ from run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def timed(records, *phases):
    """The records after step 0 that carry the seconds of every one of `phases` (time/rollout, time/update,
    time/eval, time/iteration: the scripts' shared names), each a number ≥ 0."""
    return [r for r in records if r["step"] > 0 and all(r.get(f"time/{phase}", -1) >= 0 for phase in phases)]


def error_line(proc, nproc=1):
    """The one `error:` line a run that was given bad input ends with: no Python traceback from the script (torchrun
    adds its own report of the failed ranks)."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert lines, proc.stderr[-3000:]
    assert nproc > 1 or "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def run_pairs(jobs: dict, workers=2):
    """Run each job {name: (script, args, kwargs of run_script)} as a subprocess, two at a time, one thread each
    (these tiny models spend most of their time in single-threaded Python: two one-thread runs take ~1.3× one
    two-thread run), with check=False; returns {name: CompletedProcess}."""
    from concurrent.futures import ThreadPoolExecutor

    def launch(name):
        script, args, kwargs = jobs[name]
        env = {"OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
        return name, run_script(script, *args, env=env, check=False, **kwargs)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(launch, jobs))


def tiny_lm(kind: str, vocab_size: int):
    """A random 2-layer causal LM, hidden 16: `gpt2` (its LM head tied to the token embedding; no dropout, as the
    scripts run it) or `llama` (an untied head)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"bos_token_id": 0, "eos_token_id": 0}
    if kind == "gpt2":
        no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=2, n_head=2, **ids, **no_dropout)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        **ids,
    )
    return LlamaForCausalLM(config)
