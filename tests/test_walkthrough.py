"""The README's "A first run from your own folder", run as written: its reward file and its two commands, from a
folder outside the repository that holds a chat model saved with save_pretrained (a tiny random Llama with GPT-2's
real BPE and a ChatML template, as SmolLM2 and Qwen instruct checkpoints have) and Anthropic's HH rows."""

import gzip
import json
import os
import re
import subprocess
import sys

from conftest import ROOT, read_run
from test_chat_templates import GPT2_DIR, qwen_tokenizer

HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"
N_ROWS = 160  # the file's first rows: 144 train, 16 held out by 'train[-10%:]'


def walkthrough():
    """The README's walk-through: (the python file's name, its code, the bash commands)."""
    text = (ROOT / "README.md").read_text().split("<!-- walkthrough -->", 1)[1]
    python, bash = re.findall(r"```(?:python|bash)\n(.*?)```", text, flags=re.S)[:2]
    name = re.match(r"# (\w+\.py):", python).group(1)
    return name, python, bash


def save_chat_model(path):
    """A tiny random Llama chat model as a user would have it: weights, config, tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_the_readme_walkthrough_runs_as_written_from_a_folder_of_ones_own(tmp_path):
    assert (GPT2_DIR / "tokenizer.json").exists(), (
        f"{GPT2_DIR} is missing: this test needs ../shared beside the project"
    )
    assert HH_FILE.exists(), f"{HH_FILE} is missing: this test needs ../shared/data/hh-rlhf beside the project"
    name, python, bash = walkthrough()
    (tmp_path / name).write_text(python)
    save_chat_model(tmp_path / "my_model")
    with gzip.open(HH_FILE, "rt") as f:
        rows = [line for _, line in zip(range(N_ROWS), f)]
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt") as f:
        f.writelines(rows)
    # The commands as written; only the clone's path is this repository's
    assert re.search(r"^ONEFILE=\S+", bash, flags=re.M), bash
    bash = re.sub(r"^ONEFILE=\S+", f"ONEFILE={ROOT}", bash, flags=re.M)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # the python this suite runs under
    proc = subprocess.run(
        ["bash", "-e", "-c", bash], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The run trained on the rows the slice leaves, evaluated on the held-out tenth, with the model's template
    run, records = read_run(tmp_path / "runs")
    assert run.name.startswith("first-run__1__") and (run / "policy" / "config.json").exists()
    args = json.loads((run / "args.json").read_text())
    assert args["eval_split"] == "train[-10%:]" and args["lora_r"] == 16 and args["value_model"] == "policy"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["rendered_prompt"].startswith("<|im_start|>user\n") for s in samples)
    assert all(s["rendered_prompt"].endswith("<|im_start|>assistant\n") for s in samples)
    held_out = {json.loads(line)["chosen"].rsplit("\n\nAssistant:", 1)[0] for line in rows[-N_ROWS // 10 :]}
    first_turns = {re.split(r"\n\nAssistant:", h, maxsplit=1)[0].split("Human: ", 1)[1] for h in held_out}
    assert all(any(turn in s["prompt"] for turn in first_turns) for s in samples)  # the last tenth, not training rows
    assert records[-1]["step"] == 8 and "eval/reward" in records[-1]
    # The evaluation: a win rate against the starting model under the same function, from the user's folder
    summary = json.loads((run / "eval-vs-sft.json").read_text())
    assert summary["judge"] == "my_reward:score" and 0.0 <= summary["win_rate"] <= 1.0
    assert "win rate against sft under my_reward:score" in proc.stdout
    assert "Traceback" not in proc.stderr
