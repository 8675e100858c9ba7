"""Progress bars (common.progress, --progress / --no-progress): a tqdm bar on rank 0 only where stdout is a terminal,
printed lines whole above it, and nothing of it in what a run logs. End to end: dpo.py on a pseudo-terminal."""

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from concurrent.futures import ThreadPoolExecutor

from conftest import ROOT, read_run, run_script, without_timings
from tqdm import tqdm

import common


class Terminal(io.StringIO):
    """A stdout that says it is a terminal, and keeps what is written to it."""

    def isatty(self):
        return True


def test_progress_is_a_bar_only_when_enabled_on_rank_0_in_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.delenv("RANK", raising=False)  # a plain `python script.py`: rank 0
    monkeypatch.setattr(sys, "stdout", Terminal())
    bar = common.progress(items, desc="items")
    assert isinstance(bar, tqdm) and list(bar) == items
    assert common.progress(items, desc="items", enabled=False) is items  # --no-progress
    monkeypatch.setenv("RANK", "1")
    assert common.progress(items, desc="items") is items  # another rank
    monkeypatch.setenv("RANK", "0")
    bar = common.progress(iter(items), desc="items", total=3)  # an iterable without len()
    assert isinstance(bar, tqdm) and bar.total == 3
    bar.close()
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal: logs, CI, tests
    assert common.progress(items, desc="items") is items


def test_lines_printed_under_bars_come_out_whole_and_stdout_comes_back(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    for i in common.progress(range(3), desc="outer"):
        for _ in common.progress(range(2), desc="inner"):
            assert isinstance(sys.stdout, common.PrintAboveBars)
        print(f"line {i}", end="")  # a line in two writes: it goes out with its newline
        print(" done", flush=True)
    assert sys.stdout is terminal
    for _ in common.progress(range(3), desc="broken off"):
        print("unfinished", end="")
        break
    assert sys.stdout is terminal
    assert terminal.getvalue() == "line 0 done\nline 1 done\nline 2 done\nunfinished"


# dpo.py's quick settings: every phase with a bar runs (π_ref's log-probs, evaluations, steps)
TINY = "--total-steps 4 --mini-batch-size 4 --eval-every 4 --eval-prompts 8 --heldout-pairs 8".split()
DESCS = ("π_ref log-probs", "evaluate", "steps")
BAR = r"{}: +\d+%\|"  # tqdm's bar after its description: "steps:  50%|█████     | 2/4 ..."
OUR_BARS = BAR.format("(" + "|".join(map(re.escape, DESCS)) + ")")  # transformers draws its own ("Loading weights")


def run_in_terminal(*args):
    """dpo.py with ARGS, its stdout and stderr on one pseudo-terminal of 120 columns, as in a shell; returns (exit
    status, everything written to the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "dpo.py"), *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    output = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not data:
            break
        output.append(data)
    os.close(master)
    return proc.wait(), b"".join(output).decode(errors="replace")


def terminal_lines(text: str) -> set:
    """The rows a terminal ends up showing, as text: cursor moves dropped, each row what its last carriage return
    left (a printed line is written after the bars are cleared with one)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return {row.split("\r")[-1] for row in text.split("\r\n")}


def test_dpo_shows_bars_in_a_terminal_only_and_logs_the_same(builtin_path, tmp_path):
    def job(name):
        args = [*TINY, "--output-dir", str(tmp_path / name), "--cache-dir", str(tmp_path / f"cache_{name}")]
        if name == "captured":
            proc = run_script("dpo.py", *args, env={"OMP_NUM_THREADS": "1"})
            return proc.returncode, proc.stdout, proc.stderr
        return (*run_in_terminal(*args, *(["--no-progress"] if name == "no_progress" else [])), "")

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(
            zip(["terminal", "no_progress", "captured"], pool.map(job, ["terminal", "no_progress", "captured"]))
        )
    for name, (returncode, out, err) in runs.items():
        assert returncode == 0, f"{name}\n{out[-3000:]}\n{err[-3000:]}"

    # In a terminal: a bar for each phase, on rank 0; every line the run prints comes out whole, on a row of its own
    terminal = runs["terminal"][1]
    for desc in DESCS:
        assert re.search(BAR.format(re.escape(desc)), terminal), (desc, terminal[-3000:])

    def masked(text, name):  # timings and the run's folder differ from run to run
        return re.sub(r"\d", "#", text.replace(str(tmp_path / name), "OUT"))

    rows = {masked(row, "terminal") for row in terminal_lines(terminal)}
    printed = runs["captured"][1].splitlines()
    assert any(line.startswith("step     4/4 loss") for line in printed), printed
    for line in printed:
        assert masked(line, "captured") in rows, (line, terminal[-3000:])
    # --no-progress in a terminal, and no terminal at all: none of these bars
    assert not re.search(OUR_BARS, runs["no_progress"][1]), runs["no_progress"][1][-3000:]
    assert not re.search(OUR_BARS, runs["captured"][1] + runs["captured"][2]), runs["captured"][2][-3000:]
    # nor those of transformers (loading, saving the weights): a log has no bars
    for name in ("no_progress", "captured"):
        assert "Loading weights" not in "".join(runs[name][1:]) and "%|" not in "".join(runs[name][1:]), name
    # The bars change nothing a run logs
    records = {name: without_timings(read_run(tmp_path / name)[1]) for name in runs}  # seconds aside
    assert records["terminal"] == records["captured"] == records["no_progress"]
