"""One algorithm script and common.py, copied alone into an empty folder, run there: it trains on your own model,
reward and data; released.py, evaluate.py and builtin/ are optional parts, each a one-line error naming it where a
run needs it. Also: `import common` imports no algorithm script and no optional part."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, error_line, read_run

GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"


@pytest.fixture
def copied(tmp_path):
    """apa.py and common.py, nothing else, in an empty folder."""
    for name in ("apa.py", "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def run_in(folder, *args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=timeout)


def test_import_common_imports_no_algorithm_script_and_no_optional_part():
    parts = ["ppo", "apa", "awr", "ilql", "alol", "dpo", "pro", "released", "evaluate", "builtin_build"]
    check = f"import sys, common; print([name for name in {parts} if name in sys.modules])"
    proc = run_in(ROOT, "-c", check)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_copied_script_shows_its_help(copied):
    proc = run_in(copied, "apa.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--reward-model" in proc.stdout and "--model-name-or-path" in proc.stdout


def test_a_copied_script_without_builtin_says_what_to_pass(copied):
    """The defaults name the built-in task: without builtin/, one line before any model is loaded or trained."""
    line = error_line(run_in(copied, "apa.py"))
    assert "'builtin' names the built-in task, which is not beside common.py" in line, line
    assert "pass your own reward (--reward-model" in line and "model, reward and dataset" in line, line
    assert not (copied / "builtin").exists()  # nothing built in its place


def test_a_url_reward_without_released_py_names_it(copied):
    line = error_line(run_in(copied, "apa.py", "--reward-model", "http://127.0.0.1:9/score"))
    assert "--reward-model http://127.0.0.1:9/score (a scoring server) needs released.py" in line, line
    assert "put released.py beside common.py" in line, line


def test_a_released_layout_without_released_py_names_it(copied):
    """A folder in trlX's layout (hf_ckpt.pt only) is read as a sequence-classification model, which it is not: the
    error line says which file reads it."""
    (copied / "rm").mkdir()
    (copied / "rm" / "hf_ckpt.pt").write_bytes(b"")
    line = error_line(run_in(copied, "-c", "import common; common.load_reward('./rm', None)"))
    assert line.startswith("error: cannot load './rm'"), line
    assert "if it is a reward model in a released layout (hf_ckpt.pt" in line and "put released.py beside" in line


def test_a_copied_script_trains_on_your_own_model_reward_and_data(copied):
    """A tiny random Llama with the real GPT-2 BPE (save_pretrained), a module:function reward and a local .jsonl of
    prompts: the run exits 0 and writes its policy folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(copied / "tiny-llama")
    tokenizer.save_pretrained(copied / "tiny-llama")
    (copied / "my_reward.py").write_text(
        "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    )
    prompts = [{"prompt": f"Review {i}: the film was"} for i in range(40)]
    (copied / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in prompts))
    args = (
        "--model-name-or-path tiny-llama --reward-model my_reward:length --dataset prompts.jsonl --eval-split "
        "train[-8:] --value-model policy --total-episodes 16 --rollout-batch-size 8 --mini-batch-size 8 "
        "--update-epochs 1 --max-new-tokens 6 --eval-prompts 8 --output-dir runs"
    ).split()
    proc = run_in(copied, "apa.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run, records = read_run(copied / "runs")
    assert (run / "policy" / "config.json").exists() and records
    assert sorted(p.name for p in copied.iterdir() if p.suffix == ".py") == ["apa.py", "common.py", "my_reward.py"]
