"""launch.sh builds the right launcher command (checked with --dry-run; no process is started), runs a script from
the caller's folder, finds the project's python or says how to install it, and checks a judge before sampling."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import common
import evaluate


def launch(*args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VIRTUAL_ENV")}  # printed when set
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # this test's python
    return subprocess.run(
        ["bash", str(ROOT / "launch.sh"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def test_cpu_single_process_is_plain_python():
    out = launch("ppo", "--gpus", "0", "--dry-run", "--", "--seed", "3").stdout
    assert "python" in out and "ppo.py --seed 3" in out and "torchrun" not in out
    assert f" {ROOT / 'ppo.py'} --seed 3" in out  # the script by its path: the caller's folder stays the working one


USER_MODULES = {
    "my_reward.py": "def score(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n",
    "my_judge.py": "def score(prompts, responses):\n    return [-float(len(r)) for r in responses]\n",
}


def test_train_and_eval_from_a_folder_outside_the_repository(builtin_path, tmp_path):
    """From the user's own folder: a relative --output-dir and run folder, a module:function reward and judge that live
    in that folder (neither is importable from the repository)."""
    for name, code in USER_MODULES.items():
        (tmp_path / name).write_text(code)
    tiny = "--total-episodes 16 --rollout-batch-size 16 --mini-batch-size 8 --update-epochs 1 --max-new-tokens 8"
    proc = launch(
        "apa",
        "--gpus",
        "0",
        "--",
        *tiny.split(),
        *"--eval-prompts 8 --reward-model my_reward:score --output-dir runs".split(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = os.listdir(tmp_path / "runs")
    proc = launch("eval", f"runs/{run}", "--judge", "my_judge:score", "--prompts", "8", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / run / "eval-vs-sft.json").read_text())
    assert summary["judge"] == "my_judge:score" and summary["prompts"] == 8 and summary["run"] == f"runs/{run}"
    assert f"runs/{run}: win rate against sft under my_judge:score" in proc.stdout


def test_a_bad_judge_stops_in_one_line_before_sampling(tmp_path):
    """A judge that cannot work stops `launch.sh eval` before any model is loaded: one error line that names the
    folder the module was looked for in."""
    run = tmp_path / "runs" / "run"
    (run / "policy").mkdir(parents=True)  # no weights: anything loaded or sampled would fail otherwise
    (run / "args.json").write_text(json.dumps({"dataset": "builtin", "reward_model": ["builtin"]}))
    proc = launch("eval", "runs/run", "--judge", "vader_reward:score", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot import the reward function 'vader_reward:score'"), proc.stderr
    assert f"put vader_reward.py in the working directory ({tmp_path})" in proc.stderr


def test_entries_are_checked_before_anything_is_loaded(tmp_path, monkeypatch):
    """check_reward_entry on evaluate_run's judge and the run's own reward entries, and on a script's --reward-model
    in start_run: each wrong kind is one line before a model is loaded or a process group started."""
    import ppo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the working directory that the check puts on it goes after
    (tmp_path / "entry_judge.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    (tmp_path / "entry_needs.py").write_text("import no_such_package_here\n")
    for step in ("load_tokenizer", "load_model", "init_distributed"):
        for module in (common, evaluate):
            if hasattr(module, step):
                monkeypatch.setattr(module, step, lambda *a, **k: pytest.fail("loaded before the entry was checked"))
    run = tmp_path / "run"
    (run / "policy").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"dataset": "builtin", "reward_model": ["builtin"]}))
    bad = {
        "entry_judge:nothing": "cannot import the reward function 'entry_judge:nothing'",
        "entry_needs:score": "--judge entry_needs:score: entry_needs imports no_such_package_here, which is not",
        "./no_such_model": f"--judge ./no_such_model does not exist (seen from {tmp_path})",
        "http://host:port/score": "--judge http://host:port/score is not a server's URL",
    }
    for judge, message in bad.items():
        with pytest.raises(SystemExit, match=r"^error: ") as stop:
            evaluate.evaluate_run(str(run), judge=judge)
        assert message in str(stop.value) and "\n" not in str(stop.value), str(stop.value)
    (run / "args.json").write_text(json.dumps({"dataset": "builtin", "reward_model": ["gone_reward:score"]}))
    with pytest.raises(SystemExit, match="cannot import the reward function 'gone_reward:score'"):
        evaluate.evaluate_run(str(run), judge="entry_judge:score")
    args = common.parse_args(ppo.Args, ppo.PRESETS, argv=["--reward-model", "builtin", "./no_such_rm"])
    with pytest.raises(SystemExit, match=r"--reward-model ./no_such_rm does not exist"):
        common.start_run(args, "ppo.py")


def test_without_the_packages_launch_sh_says_how_to_install(tmp_path):
    """No python with the packages on PATH and no .venv beside launch.sh: one line naming the install. With a .venv
    beside it, launch.sh uses that one."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "launch.sh", repo / "launch.sh")
    (repo / "common.py").symlink_to(ROOT / "common.py")
    (repo / "evaluate.py").symlink_to(ROOT / "evaluate.py")
    bin_dir = tmp_path / "bin"  # the tools launch.sh needs, and a python without the packages
    bin_dir.mkdir()
    for tool in ("dirname", "readlink"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": str(bin_dir)}

    def run(*args):
        command = [shutil.which("bash"), str(repo / "launch.sh"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    proc = run("eval", "runs/x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"python on PATH: {bin_dir / 'python'}" in proc.stderr
    assert f"python3 -m venv {repo}/.venv && {repo}/.venv/bin/pip install -r {repo}/requirements.txt" in proc.stderr
    venv_python = repo / ".venv" / "bin" / "python"  # the project's venv: this test's python behind a wrapper
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    venv_python.chmod(0o755)
    proc = run("eval", "--help")
    assert proc.returncode == 0 and "RUN_DIR" in proc.stdout, proc.stderr


def test_cpu_two_processes_use_torchrun_with_one_thread_each():
    out = launch("ppo", "--gpus", "0", "--procs", "2", "--zero", "2", "--dry-run").stdout
    assert "torchrun --nproc_per_node 2" in out and "ppo.py --zero-stage 2" in out


def test_two_nodes_and_hostfile(tmp_path):
    out = launch(
        "ppo", "--gpus", "8", "--nnodes", "2", "--node-rank", "1", "--master", "10.0.0.1:29500", "--dry-run"
    ).stdout
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


def test_compare_runs_the_methods_asked_and_prints_one_table(builtin_path, tmp_path):
    """PPO, and the two methods that grpo.py runs with their own flags (Dr. GRPO, RLOO)."""
    methods = ["ppo", "dr_grpo", "rloo"]
    proc = launch(
        "compare",
        "--seeds",
        "1",
        "--episodes",
        "16",
        "--methods",
        " ".join(methods),
        "--out",
        str(tmp_path),
        "--",
        "--rollout-batch-size",
        "16",
        "--mini-batch-size",
        "8",
        "--eval-prompts",
        "16",
        "--max-new-tokens",
        "12",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    assert table in proc.stdout
    for row in ("SFT (before)", *methods):
        assert f"| {row} | 1 |" in table
    assert "| apa |" not in table and "| grpo |" not in table
    assert "win rate vs SFT (gold)" in table
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(["eval", *methods])
    for algo in methods:  # each run judged against SFT on its held-out prompts
        summary = json.loads((tmp_path / "eval" / f"{algo}-1.json").read_text())
        assert summary["prompts"] == 16
        assert f"| {summary['win_rate']:.3f} ± 0.000 |" in table.split(f"| {algo} | 1 |")[1].splitlines()[0]


PRESETS = [
    "apa-hh",
    "awr-hh",
    "ppo-hh",
    "apa-tldr",
    "ppo-tldr",
    "ilql-hh",
    "apa-off-hh",
    "awr-off-hh",
    "alol-hh",
    "dpo-hh",
    "pro-hh",
]


@pytest.mark.parametrize("name", PRESETS)
def test_every_paper_preset_parses_with_its_script_args(name):
    """./launch.sh paper NAME --dry-run passes the script's --preset and the GPU layout; the script's own Args parse
    the command with the preset's values (no download: nothing is loaded)."""
    import importlib
    import shlex

    import common

    for size in ["6b"] if "tldr" in name else ["125m", "1b", "6b"]:
        proc = launch("paper", name, "--size", size, "--dry-run", "--", "--seed", "7")
        assert proc.returncode == 0, proc.stderr
        words = shlex.split(proc.stdout.strip().splitlines()[-1])
        script = next(w for w in words if w.endswith(".py"))
        module = importlib.import_module(os.path.basename(script)[:-3])
        args = common.parse_args(module.Args, module.PRESETS, argv=words[words.index(script) + 1 :])
        assert args.preset in module.PRESETS
        assert args.seed == 7 and args.bf16  # extra arguments pass through; every preset trains in bf16
        # the released APA / PPO layout: π_ref, the value model and the reward model on GPUs 1-3
        if name in ("apa-hh", "awr-hh", "ppo-hh", "apa-tldr", "ppo-tldr", "apa-off-hh", "awr-off-hh"):
            assert (args.ref_device, args.value_device, args.reward_device) == ("cuda:1", "cuda:2", "cuda:3")
        if name.endswith("-hh") and name != "alol-hh":
            assert args.model_name_or_path == f"Dahoas/pythia-{size.upper()}-static-sft"
            assert args.stop_strings == ["Human:", "Assistant:"] and args.max_new_tokens == 128
        if name in ("apa-hh", "apa-tldr", "apa-off-hh"):
            assert args.lam == 0.1 and args.learning_rate == 1e-6
        if name == "awr-hh":
            assert args.lam == 2 and args.learning_rate == 1e-6  # released HH: adv_coeff_log = 1/λ = 0.5
        if name == "ppo-hh":
            assert args.learning_rate == (1e-6 if size == "1b" else 8e-6) and args.target_kl == 6
        if name == "ilql-hh":
            assert (args.tau, args.alpha, args.eval_betas, args.top_k) == (0.6, 1e-4, [1.0, 4.0], 20)
        if name in ("alol-hh", "dpo-hh", "pro-hh"):  # the A-LoL work's HH runs: 16 sequences a step, 9000 steps
            assert (args.mini_batch_size, args.total_steps, args.max_grad_norm) == (16, 9000, 0.3)
            # the released QLoRA adapter's settings, on every linear layer
            assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (64, 16, 0.05)
            assert args.lora_target_modules == ["all-linear"] and args.unfrozen_layers == -1


def test_paper_list_and_bad_input():
    out = launch("paper", "--list").stdout
    assert all(name in out for name in PRESETS) and "GPU" in out and "GB" in out
    proc = launch("paper", "apa-tldr", "--size", "1b", "--dry-run")
    assert proc.returncode != 0 and "has one size" in proc.stderr
    proc = launch("paper", "nope")
    assert proc.returncode != 0 and "unknown preset 'nope'" in proc.stderr


def readme_launch_commands():
    """Every complete `./launch.sh SCRIPT ... -- ARGS` command of README.md's bash blocks (lines joined at a trailing
    `\\`; those with a `...` placeholder left out)."""
    import re

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    scripts = ("ppo", "apa", "awr", "ilql", "alol", "dpo", "pro")
    return [
        line.split("#")[0].strip()
        for line in lines
        if line.startswith("./launch.sh ") and line.split()[1] in scripts and " -- " in line and "..." not in line
    ]


def test_readme_launch_commands_parse_with_their_script_args():
    """The README's worked examples (a hub policy, a paper reward model, HH prompts, --chat-template) build a command
    that the script's own Args accept."""
    import importlib
    import shlex

    import common

    commands = readme_launch_commands()
    assert any("--chat-template" in c for c in commands) and len(commands) >= 3, commands
    for command in commands:
        words = shlex.split(command)[1:]
        proc = launch(*words[: words.index("--")], "--dry-run", *words[words.index("--") :])
        assert proc.returncode == 0, (command, proc.stderr)
        words = shlex.split(proc.stdout.strip().splitlines()[-1])
        script = next(w for w in words if w.endswith(".py"))
        module = importlib.import_module(os.path.basename(script)[:-3])
        args = common.parse_args(module.Args, module.PRESETS, argv=words[words.index(script) + 1 :])
        if "--chat-template" in command:
            assert args.chat_template and "/" in args.model_name_or_path, args  # a hub name
        if "--lora-r" in command:  # the 7B-on-one-GPU example
            assert args.lora_r > 0 and args.gradient_checkpointing and args.bf16, args
    assert any("Qwen/" in c for c in commands) and any("--lora-r" in c for c in commands), commands
