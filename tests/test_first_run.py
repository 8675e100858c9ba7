"""A user's first run: one process compiles nothing and prints only the scripts' own lines (no library's warnings,
each note once, no terminal colour codes), `--help` prints its usage first, and a build lock left by a killed run is
one error line, not a silent hang (torch waits on such a lock forever)."""

import gzip
import json
import os
import subprocess
import sys
import time

from conftest import ROOT, error_line, read_run, run_script

TINY = (
    "--total-episodes 16 --rollout-batch-size 16 --mini-batch-size 8 --update-epochs 1 --max-new-tokens 8 "
    "--eval-prompts 16"
).split()


HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"
# What libraries print on their own, and must not (DeepSpeed's accelerator guess, transformers' load report of a new
# value head and its deprecations, a missing attention mask, terminal colour codes)
NOISE = [
    "Setting accelerator to CPU",
    "LOAD REPORT",
    "Consider training on your downstream task",
    "is_gradient_checkpointing",
    "FutureWarning",
    "strongly recommend passing in an `attention_mask`",
    "Token indices sequence length",
    "\x1b[",
]


def test_one_process_compiles_nothing_and_prints_only_its_own_lines(builtin_path, tmp_path):
    """A run as a user's first: their own HH file (read as both splits, one row of it dropped), LoRA with gradient
    checkpointing, the value model made from the policy (a new head)."""
    with gzip.open(HH_FILE, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(24), f)]
    rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."})  # dropped
    (data := tmp_path / "hh.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    extensions = tmp_path / "torch_extensions"  # empty: anything compiled would land here
    proc = run_script(
        "apa.py",
        *TINY,
        *f"--dataset {data} --train-split train --eval-split train --value-model policy --lora-r 4".split(),
        "--gradient-checkpointing",
        "--output-dir",
        str(tmp_path / "run"),
        env={"TORCH_EXTENSIONS_DIR": str(extensions)},
    )
    assert "built successfully" not in proc.stdout + proc.stderr
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
    read_run(tmp_path / "run")
    assert proc.stderr == ""  # libraries log and warn on stderr; the scripts' own lines go to stdout
    assert not [line for line in proc.stdout.splitlines() if any(noise in line for noise in NOISE)], proc.stdout
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == len(set(notes)) and sum("1 of 25 HH rows" in line for line in notes) == 1, notes
    assert sum("has no score head" in line for line in notes) == 1, notes  # the new value head, in our words


def test_help_prints_its_usage_first():
    """`python SCRIPT.py --help` prints nothing before its usage line: each script run in turn in one process (what
    importing common prints, it prints before the first), stdout and stderr together."""
    code = (
        "import runpy, sys\n"
        "for script in sys.argv[1:]:\n"
        "    print(f'=== {script}', flush=True)\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    sys.stdout.flush()\n"
        "    sys.stderr.flush()\n"
    )
    scripts = [f"{name}.py" for name in ("ppo", "apa", "awr", "ilql", "alol", "dpo", "pro")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *scripts],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, "PYTHONPATH": str(ROOT)},  # as a shell
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    parts = proc.stdout.split("=== ")
    assert parts[0] == "" and len(parts) == 1 + len(scripts), proc.stdout[:3000]
    for script, part in zip(scripts, parts[1:]):
        name, _, output = part.partition("\n")
        assert name == script and output.startswith(f"usage: {script}"), part[:2000]


def test_stale_build_lock_is_one_error_line(builtin_path, tmp_path, monkeypatch):
    from torch.utils.cpp_extension import _get_build_directory

    import common

    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))  # where the run below looks for its build lock
    lock = os.path.join(_get_build_directory(common.SHM_COMM_OP, False), "lock")
    open(lock, "w").close()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    proc = run_script(
        "apa.py",
        *TINY,
        "--total-episodes",
        "32",
        "--output-dir",
        str(tmp_path / "run"),
        nproc=2,
        env={"TORCH_EXTENSIONS_DIR": str(extensions)},
        check=False,
        timeout=120,
    )
    line = error_line(proc, nproc=2)
    assert lock in line and f"rm {lock}" in line


def test_load_report_of_a_new_value_head_is_one_note_and_other_reports_pass(tmp_path, capsys):
    """A score model made from a causal LM's checkpoint (its LM head left unused, its score head new): one note, said
    once however often it is loaded. A checkpoint that lacks a weight of the trunk: transformers' report, as it is
    (without colour codes), for the user to act on."""
    import logging

    from transformers import LlamaConfig, LlamaForCausalLM

    import common

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,  # the checkpoint has an lm_head.weight that a score model leaves unused
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "causal")
    state = {k: v for k, v in model.state_dict().items() if "up_proj" not in k}
    model.save_pretrained(tmp_path / "broken", state_dict=state)
    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())  # what passes LoadReport
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        for _ in range(2):
            common.load_model(str(tmp_path / "causal"), kind="score", flag="--value-model")
        notes = [line for line in capsys.readouterr().out.splitlines() if "has no score head" in line]
        assert reports == [] and len(notes) == 1, (reports, notes)
        assert notes[0].startswith(f"note: {tmp_path / 'causal'} has no score head: LlamaForSequenceClassification")
        common.load_model(str(tmp_path / "broken"), kind="causal", flag="--model-name-or-path")
    finally:
        logger.removeHandler(handler)
    assert len(reports) == 1 and "model.layers.0.mlp.up_proj.weight | MISSING" in reports[0], reports
    assert "\x1b[" not in reports[0] and reports[0].startswith("LlamaForCausalLM LOAD REPORT from: ")
