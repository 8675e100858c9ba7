"""launch.sh builds the right launcher command (checked with --dry-run; no process is started)."""
import subprocess

from conftest import ROOT


def launch(*args):
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], capture_output=True, text=True)


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
