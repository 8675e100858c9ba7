"""launch.sh builds the right launcher command (checked with --dry-run; no process is started)."""
import os
import subprocess
import sys

from conftest import ROOT


def launch(*args):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # this test's python
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], capture_output=True, text=True, env=env)


def test_cpu_single_process_is_plain_python():
    out = launch("ppo", "--gpus", "0", "--dry-run", "--", "--seed", "3").stdout
    assert "python" in out and "ppo.py --seed 3" in out and "torchrun" not in out


def test_cpu_two_processes_use_torchrun_with_one_thread_each():
    out = launch("ppo", "--gpus", "0", "--procs", "2", "--zero", "2", "--dry-run").stdout
    assert "torchrun --nproc_per_node 2" in out and "ppo.py --zero-stage 2" in out


def test_two_nodes_and_hostfile(tmp_path):
    out = launch("ppo", "--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master", "10.0.0.1:29500",
                 "--dry-run").stdout
    assert "--nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500" in out
    (hostfile := tmp_path / "hosts.txt").write_text("10.0.0.1 slots=8\n10.0.0.2 slots=8\n")
    out = launch("ppo", "--hostfile", str(hostfile), "--master", "10.0.0.1:29500", "--zero", "3", "--dry-run").stdout
    assert out.startswith(f"deepspeed --hostfile {hostfile}") and "--zero-stage 3" in out
    assert "not found" in launch("ppo", "--hostfile", str(tmp_path / "no"), "--dry-run").stderr


def test_help_and_bad_input():
    assert "two nodes" in launch("--help").stdout
    proc = launch("ppo", "--bogus")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert launch("nosuchscript").returncode == 2


def test_compare_runs_the_three_algorithms_and_prints_one_table(builtin_path, tmp_path):
    proc = launch("compare", "--seeds", "1", "--episodes", "32", "--out", str(tmp_path), "--", "--rollout-batch-size",
                  "16", "--mini-batch-size", "8", "--eval-prompts", "16", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert table in proc.stdout
    for row in ("SFT (before)", "ppo", "apa", "awr"):
        assert f"| {row} | 1 |" in table
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["apa", "awr", "ppo"]
