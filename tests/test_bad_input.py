"""Bad input ends a run with one `error:` line that names the fix (issue 6, hardening): empty prompts and responses,
a data set smaller than one batch, episodes that do not split over the ranks, an unknown --algorithm, a --resume
folder from another script, and NaN/inf in a reward or a loss (the run stops at that step and keeps its last good
checkpoint). Subprocesses on the built-in task, as a user would meet them."""
import json

import pytest
from conftest import error_line, read_run, run_script

TINY = ["--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "8", "--ppo-epochs", "1",
        "--max-new-tokens", "12", "--eval-prompts", "16", "--eval-every", "1"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_empty_prompt_names_the_row(builtin_path, tmp_path):
    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ["the movie", "a film", "  ", "the plot"]])
    line = error_line(run_script("ppo.py", "--dataset", data, "--train-split", "train", "--eval-split", "train",
                                 check=False))
    assert "1 row(s) with an empty prompt" in line and "row 2" in line and "--prompt-field" in line


@pytest.mark.parametrize("script", ["apa.py", "ilql.py", "alol.py"])
def test_empty_response_in_offline_rows(builtin_path, tmp_path, script):
    rows = [{"prompt": "the movie", "response": r, "reward": 1.0} for r in ["was fine", "", "", "was dull"]]
    line = error_line(run_script(script, "--offline-dataset", _jsonl(tmp_path / "rows.jsonl", rows),
                                 "--output-dir", str(tmp_path), check=False))
    assert "2 row(s) with an empty response" in line and "row 1" in line and "--response-field" in line


def test_nan_reward_in_offline_rows(builtin_path, tmp_path):
    rows = [{"prompt": "the movie", "response": "was fine", "reward": r} for r in [1.0, float("nan"), 0.5, 0.0]]
    line = error_line(run_script("awr.py", "--offline-dataset", _jsonl(tmp_path / "rows.jsonl", rows),
                                 "--mini-batch-size", "2", check=False))
    assert "reward is NaN or inf" in line and "row 1" in line


def test_dataset_smaller_than_one_batch(builtin_path, tmp_path):
    rows = [{"prompt": "the movie", "response": "was fine", "reward": 1.0}] * 4
    line = error_line(run_script("apa.py", "--offline-dataset", _jsonl(tmp_path / "rows.jsonl", rows),
                                 "--mini-batch-size", "8", check=False))
    assert "4 rows, fewer than one mini-batch of 8" in line and "lower --mini-batch-size" in line


def test_episodes_that_do_not_split_over_the_ranks(builtin_path, tmp_path):
    proc = run_script("ppo.py", *TINY, "--total-episodes", "48", "--output-dir", str(tmp_path), nproc=2, check=False)
    line = error_line(proc, nproc=2)
    assert "--total-episodes 48 is not a positive multiple of --rollout-batch-size 16 × 2 rank(s) = 32" in line
    assert "pass --total-episodes 32" in line


def test_unknown_algorithm(tmp_path):
    line = error_line(run_script("alol.py", "--algorithm", "ppo", "--output-dir", str(tmp_path), check=False))
    assert "unknown --algorithm ppo" in line and "a_lol_seq" in line and "nll" in line


def test_resume_folder_that_does_not_fit(tmp_path):
    """Not a checkpoint; another script's checkpoint; one written by another number of ranks."""
    line = error_line(run_script("ppo.py", "--resume", str(tmp_path), check=False))
    assert "not a resumable checkpoint" in line and "runs/RUN_NAME/resume" in line
    (tmp_path / "meta.json").write_text(json.dumps({"script": "ilql.py", "step": 3, "world_size": 1}))
    line = error_line(run_script("ppo.py", "--resume", str(tmp_path), check=False))
    assert "was written by ilql.py, not ppo.py" in line and "resume it with ilql.py" in line
    (tmp_path / "meta.json").write_text(json.dumps({"script": "apa.py --offline-dataset", "step": 3, "world_size": 1}))
    line = error_line(run_script("apa.py", "--resume", str(tmp_path), check=False))  # online: not the same run
    assert "was written by apa.py --offline-dataset, not apa.py" in line
    (tmp_path / "meta.json").write_text(json.dumps({"script": "ppo.py", "step": 3, "world_size": 2}))
    line = error_line(run_script("ppo.py", "--resume", str(tmp_path), check=False))
    assert "written by 2 rank(s), this run has 1" in line and "--nproc_per_node 2" in line


NAN_REWARD = '''
calls = 0


def late_nan(prompts, responses):
    """1 for the first three batches (evaluation, iteration 1, its evaluation), then NaN"""
    global calls
    calls += 1
    return [1.0 if calls <= 3 else float("nan") for _ in responses]
'''


def test_nan_reward_stops_the_run_and_keeps_the_last_good_checkpoint(builtin_path, tmp_path):
    (tmp_path / "nan_reward.py").write_text(NAN_REWARD)
    proc = run_script("ppo.py", *TINY, "--reward-model", "nan_reward:late_nan", "--save-every", "1",
                      "--output-dir", str(tmp_path / "run"), env={"PYTHONPATH": str(tmp_path)}, check=False)
    line = error_line(proc)
    run, records = read_run(tmp_path / "run")
    assert line.startswith("error: step 2: ") and "rollout/score = nan" in line
    assert f"the last good checkpoint is {run / 'resume'}" in line
    assert json.loads((run / "resume" / "meta.json").read_text())["step"] == 1  # not overwritten by step 2
    assert not (run / "policy").exists()
    assert records[1]["rollout/score"] == 1.0  # what was logged before the NaN is kept


def test_nan_loss_from_a_huge_learning_rate(builtin_path, tmp_path):
    proc = run_script("alol.py", "--algorithm", "nll", "--learning-rate", "1e30", "--total-steps", "8",
                      "--batch-size", "4", "--eval-every", "100", "--eval-prompts", "8", "--value-prompts", "40",
                      "--value-epochs", "1", "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "cache"),
                      "--output-dir", str(tmp_path / "run"), check=False)
    line = error_line(proc)
    assert "policy/loss = nan" in line and "lower --learning-rate" in line
    assert "no checkpoint was written yet (pass --save-every N)" in line
