"""Each algorithm script and common.py, copied alone into an empty folder, run there: it trains on your own model,
reward and data; formats.py, lora.py, tracking.py, released.py, evaluate.py and builtin/ are optional parts, each a
one-line error naming it where a run needs it. Also: `import common` imports no algorithm script and no optional
part."""

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, error_line, read_run

GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt2"
SCRIPTS = ["ppo.py", "apa.py", "awr.py", "ilql.py", "alol.py", "dpo.py", "pro.py", "grpo.py"]
REWARD_FUNCTION = "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
# Flags every run passes: the policy is --model-name-or-path (added per run), the rest keeps each run to seconds
TINY = "--max-new-tokens 6 --eval-prompts 4 --output-dir runs".split()
ONLINE = "--total-episodes 16 --rollout-batch-size 8 --mini-batch-size 8 --update-epochs 1 --eval-every 1".split()
# Per script, its data and reward (names of files in its folder, `RM` the classifier folder) and its tiny settings:
# online scripts read prompts; ILQL scored rows, A-LoL scored rows and held-out prompts for V_ref, DPO preference
# pairs, PRO rankings; each evaluates on the last 8 prompts of prompts.jsonl
RUNS = {
    "ppo.py": ["--reward-model", "RM", "--dataset", "prompts.jsonl", *ONLINE],
    "apa.py": ["--reward-model", "my_reward:length", "--dataset", "prompts.jsonl", "--value-model", "policy", *ONLINE],
    "awr.py": ["--reward-model", "my_reward:length", "--dataset", "prompts.jsonl", "--value-model", "policy", *ONLINE],
    "grpo.py": ["--reward-model", "my_reward:length", "--dataset", "prompts.jsonl", *ONLINE],  # groups of 4
    "ilql.py": [
        *("--reward-model", "my_reward:length", "--offline-dataset", "scored.jsonl", "--dataset", "prompts.jsonl"),
        *"--offline-epochs 1 --mini-batch-size 8 --eval-betas 1 --log-every 2".split(),
    ],
    "alol.py": [
        *("--reward-model", "RM", "--offline-dataset", "scored.jsonl", "--dataset", "prompts.jsonl"),
        *("--value-split", "train[:24]", "--cache-dir", "cache"),
        *"--total-steps 4 --mini-batch-size 4 --eval-every 4 --value-prompts 16 --value-epochs 1".split(),
        *"--value-batch-size 8".split(),
    ],
    "dpo.py": [
        *("--reward-model", "my_reward:length", "--offline-dataset", "pairs.jsonl", "--dataset", "prompts.jsonl"),
        *"--total-steps 3 --mini-batch-size 4 --eval-every 3 --heldout-pairs 4 --cache-dir cache".split(),
    ],
    "pro.py": [
        *("--reward-model", "my_reward:length", "--offline-dataset", "rankings.jsonl", "--dataset", "prompts.jsonl"),
        *"--total-steps 3 --mini-batch-size 4 --eval-every 3 --cache-dir cache".split(),
    ],
}


def copy_alone(script, folder):
    """SCRIPT and common.py, nothing else, in `folder` (made empty)."""
    folder.mkdir(parents=True)
    for name in (script, "common.py"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def run_in(folder, *args, timeout=120, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def copied(tmp_path):
    """apa.py and common.py, nothing else, in an empty folder."""
    return copy_alone("apa.py", tmp_path / "apa")


@pytest.fixture(scope="module")
def yours(tmp_path_factory):
    """Your own files, as save_pretrained and a text editor write them: a tiny random Llama with the real GPT-2 BPE
    (the policy), a tiny random 1-output LlamaForSequenceClassification on the same tokenizer (a reward model), a
    module:function reward and .jsonl files of every shape the scripts read."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("yours")
    tokenizer = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
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
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        num_labels=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "tiny-llama")
    tokenizer.save_pretrained(folder / "tiny-llama")
    LlamaForSequenceClassification(config).save_pretrained(folder / "tiny-rm")
    tokenizer.save_pretrained(folder / "tiny-rm")
    (folder / "my_reward.py").write_text(REWARD_FUNCTION)
    write_jsonl(folder / "prompts.jsonl", [{"prompt": f"Review {i}: the film was"} for i in range(40)])
    responses = [" good.", " bad.", " long and slow.", " fine."]
    write_jsonl(
        folder / "scored.jsonl",
        [{"prompt": f"Story {i}: it was", "response": responses[i % 4], "reward": (i % 4) / 3} for i in range(32)],
    )
    write_jsonl(
        folder / "pairs.jsonl",
        [
            {"prompt": f"Story {i}: it was", "chosen": responses[i % 4], "rejected": responses[(i + 1) % 4]}
            for i in range(32)
        ],
    )
    write_jsonl(
        folder / "rankings.jsonl",
        [{"prompt": f"Story {i}: it was", "responses": responses[:3], "rewards": [1.0, 0.0, 0.5]} for i in range(32)],
    )
    return folder


def _train_copied(script, base, yours):
    """Copy SCRIPT and common.py alone into base/SCRIPT, put your reward function and data beside them, run it there
    on your models; return (folder, CompletedProcess, seconds)."""
    folder = copy_alone(script, base / script.removesuffix(".py"))
    for name in ("my_reward.py", "prompts.jsonl", "scored.jsonl", "pairs.jsonl", "rankings.jsonl"):
        shutil.copy(yours / name, folder / name)
    args = [str(yours / "tiny-rm") if arg == "RM" else arg for arg in RUNS[script]]
    policy = ["--model-name-or-path", str(yours / "tiny-llama"), "--eval-split", "train[-8:]"]
    start = time.time()
    proc = run_in(folder, script, *policy, *args, *TINY, timeout=300, env={"OMP_NUM_THREADS": "1"})
    return folder, proc, time.time() - start


@pytest.fixture(scope="module")
def trained(yours, tmp_path_factory):
    """Every script trained in its own copied folder, two one-thread runs at a time: {script: (folder, proc, s)}."""
    base = tmp_path_factory.mktemp("copies")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda script: _train_copied(script, base, yours), SCRIPTS)
        return dict(zip(SCRIPTS, results))


def test_import_common_imports_no_algorithm_script_and_no_optional_part():
    scripts = ["ppo", "apa", "awr", "ilql", "alol", "dpo", "pro", "grpo"]
    parts = [*scripts, "released", "evaluate", "builtin_build", "formats", "lora", "tracking"]
    check = f"import sys, common; print([name for name in {parts} if name in sys.modules])"
    proc = run_in(ROOT, "-c", check)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """Each script copied alone with common.py, run there with --help and with its defaults, two one-thread runs at
    a time: {script: (folder, --help's CompletedProcess, the default run's)}."""
    base = tmp_path_factory.mktemp("defaults")
    folders = {script: copy_alone(script, base / script.removesuffix(".py")) for script in SCRIPTS}
    jobs = [(script, args) for script in SCRIPTS for args in (["--help"], ["--output-dir", "runs"])]
    env = {"OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda job: run_in(folders[job[0]], job[0], *job[1], env=env), jobs))
    return {script: (folders[script], procs[2 * i], procs[2 * i + 1]) for i, script in enumerate(SCRIPTS)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_shows_its_help(script, defaults):
    _, proc, _ = defaults[script]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--reward-model" in proc.stdout and "--model-name-or-path" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_without_builtin_says_what_to_pass(script, defaults):
    """The defaults name the built-in task: without builtin/, one line before any model is loaded or trained."""
    folder, _, proc = defaults[script]
    line = error_line(proc)
    assert "'builtin' names the built-in task, which is not beside common.py" in line, line
    assert "and likewise for every other option left at 'builtin'" in line, line
    assert not (folder / "builtin").exists() and not (folder / "runs").exists()  # nothing built or written


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


def test_hh_rows_and_lora_without_their_optional_part_name_it(copied):
    """HH transcripts are read by formats.py and a LoRA adapter is made by lora.py: without them beside common.py,
    one line names the file; plain columns and r = 0 need neither."""
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}
    write_jsonl(copied / "hh.jsonl", [hh])
    write_jsonl(copied / "plain.jsonl", [{"prompt": "Hi"}])
    line = error_line(run_in(copied, "-c", "import common; common.load_prompts('hh.jsonl', 'train')"))
    assert "dataset 'hh.jsonl' (HH, chat, PRO or TL;DR rows) needs formats.py" in line, line
    assert "put formats.py beside common.py" in line, line
    line = error_line(run_in(copied, "-c", "import common; common.add_lora(None, 'causal', 4, 8.0, 0.0, ['q_proj'])"))
    assert "--lora-r 4 needs lora.py" in line and "put lora.py beside common.py" in line, line
    check = (
        "import common; print(common.load_prompts('plain.jsonl', 'train'), common.add_lora('m', 'causal', 0, 1, 0, []))"
    )
    proc = run_in(copied, "-c", check)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("['Hi'] m"), proc.stderr[-2000:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_trains_on_your_own_model_reward_and_data(script, trained):
    """A tiny random Llama with the real GPT-2 BPE (save_pretrained); a module:function reward, or (PPO, A-LoL) a
    1-output sequence-classification folder; a local .jsonl of the shape the script reads: the run exits 0 and
    writes its policy folder, with no other .py file than the script, common.py and your reward beside it."""
    folder, proc, seconds = trained[script]
    print(f"{script} copied alone: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run, records = read_run(folder / "runs")
    assert (run / "policy" / "config.json").exists() and records
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == sorted(
        [script, "common.py", "my_reward.py"]
    )
