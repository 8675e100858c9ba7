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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def builtin_path():
    """The built-in task, built once (minutes the first time; cached after)."""
    import common
    return common.builtin_dir()


def free_port():
    """A port no other run of this session uses: DeepSpeed names its CPU shared-memory all-reduce buffers
    (/dev/shm/deepspeed_allreduce_buffer_*) after the master port, so two runs on one port share them."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script, *args, nproc=1, env=None, check=True, timeout=600):
    """Run SCRIPT.py with ARGS in a subprocess (torchrun with nproc > 1); return the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(ROOT / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_run(output_dir):
    """(run folder, list of metrics.jsonl records) of the single run written under output_dir."""
    runs = [p for p in Path(output_dir).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    with open(runs[0] / "metrics.jsonl") as f:
        return runs[0], [json.loads(line) for line in f]
