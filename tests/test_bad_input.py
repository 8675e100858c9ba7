"""Bad input ends a run with one `error:` line that names the fix (issue 6, hardening): empty prompts and responses,
a data set smaller than one batch, episodes that do not split over the ranks, an unknown --algorithm, a --resume
folder from another script, and NaN/inf in a reward or a loss (the run stops at that step and keeps its last good
checkpoint). Subprocesses on the built-in task, as a user would meet them."""

import json

import pytest
from conftest import TINY_ONLINE, error_line, read_run, run_pairs

NAN_REWARD = '''
rows = 0


def late_nan(prompts, responses):
    """1 for the first 48 responses (evaluation, iteration 1, its evaluation: 16 each), then NaN"""
    global rows
    rows += len(responses)
    return [1.0 if rows - len(responses) + i < 48 else float("nan") for i in range(len(responses))]
'''


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def runs(builtin_path, builtin_offline_head, tmp_path_factory):
    """Every bad run of this file, two at a time (they are mostly start-up): name -> (CompletedProcess, folder)."""
    tmp = tmp_path_factory.mktemp("bad")
    prompts = _jsonl(tmp / "prompts.jsonl", [{"prompt": p} for p in ["the movie", "a film", "  ", "the plot"]])
    empty = _jsonl(
        tmp / "empty.jsonl",
        [{"prompt": "the movie", "response": r, "reward": 1.0} for r in ["was fine", "", "", "was dull"]],
    )
    nan = _jsonl(
        tmp / "nan.jsonl",
        [{"prompt": "the movie", "response": "was fine", "reward": r} for r in [1.0, float("nan"), 0.5, 0.0]],
    )
    small = _jsonl(tmp / "small.jsonl", [{"prompt": "the movie", "response": "was fine", "reward": 1.0}] * 4)
    (tmp / "nan_reward.py").write_text(NAN_REWARD)
    resume = {}
    for name, meta in [
        ("none", None),
        ("ilql", {"script": "ilql.py", "step": 3, "world_size": 1}),
        ("offline", {"script": "apa.py --offline-dataset", "step": 3, "world_size": 1}),
        ("ranks", {"script": "ppo.py", "step": 3, "world_size": 2}),
    ]:
        (folder := tmp / f"resume_{name}").mkdir()
        if meta:
            (folder / "meta.json").write_text(json.dumps(meta))
        resume[name] = str(folder)
    jobs = {
        "empty_prompt": ("ppo.py", ["--dataset", prompts, "--train-split", "train", "--eval-split", "train"], {}),
        **{f"empty_response_{s}": (s, ["--offline-dataset", empty], {}) for s in ("apa.py", "ilql.py", "alol.py")},
        "nan_in_rows": ("awr.py", ["--offline-dataset", nan, "--mini-batch-size", "2"], {}),
        "small": ("apa.py", ["--offline-dataset", small, "--mini-batch-size", "8"], {}),
        "episodes": ("ppo.py", [*TINY_ONLINE, "--total-episodes", "48"], {"nproc": 2}),
        "value_device": ("ppo.py", [*TINY_ONLINE, "--total-episodes", "32", "--value-device", "cuda:0"], {"nproc": 2}),
        "algorithm": ("alol.py", ["--algorithm", "ppo"], {}),
        "value_prompts": (
            "alol.py",
            [
                "--dataset",
                small,
                "--offline-dataset",
                small,
                "--eval-split",
                "train",
                "--value-split",
                "train",
                "--cache-dir",
                str(tmp / "cache"),
            ],
            {},
        ),  # V_ref would see training prompts
        "resume_none": ("ppo.py", ["--resume", resume["none"]], {}),
        "resume_ilql": ("ppo.py", ["--resume", resume["ilql"]], {}),
        "resume_offline": ("apa.py", ["--resume", resume["offline"]], {}),  # online: not the same run
        "resume_ranks": ("ppo.py", ["--resume", resume["ranks"]], {}),
        "nan_reward": (
            "ppo.py",
            [*TINY_ONLINE, "--reward-model", "nan_reward:late_nan", "--save-every", "1"],
            {"env": {"PYTHONPATH": str(tmp)}},
        ),
        "nan_loss": (
            "alol.py",
            [
                "--algorithm",
                "nll",
                "--offline-dataset",
                builtin_offline_head,  # R and V_ref of 256 rows, not 1024, before the first step
                "--learning-rate",
                "1e30",
                "--total-steps",
                "8",
                "--mini-batch-size",
                "4",
                "--eval-every",
                "100",
                "--eval-prompts",
                "8",
                "--value-prompts",
                "40",
                "--value-epochs",
                "1",
                "--max-new-tokens",
                "8",
                "--cache-dir",
                str(tmp / "cache"),
            ],
            {},
        ),
    }
    for name, (_, args, _) in jobs.items():
        args += ["--output-dir", str(tmp / "out" / name)]
    return {name: (proc, tmp / "out" / name) for name, proc in run_pairs(jobs).items()}


def test_empty_prompt_names_the_row(runs):
    line = error_line(runs["empty_prompt"][0])
    assert "1 row(s) with an empty prompt" in line and "row 2" in line and "--prompt-field" in line


@pytest.mark.parametrize("script", ["apa.py", "ilql.py", "alol.py"])
def test_empty_response_in_offline_rows(runs, script):
    line = error_line(runs[f"empty_response_{script}"][0])
    assert "2 row(s) with an empty response" in line and "row 1" in line and "--response-field" in line


def test_nan_reward_in_offline_rows(runs):
    line = error_line(runs["nan_in_rows"][0])
    assert "reward is NaN or inf" in line and "row 1" in line


def test_dataset_smaller_than_one_batch(runs):
    line = error_line(runs["small"][0])
    assert "4 rows, fewer than one mini-batch of 8" in line and "lower --mini-batch-size" in line


def test_episodes_that_do_not_split_over_the_ranks(runs):
    line = error_line(runs["episodes"][0], nproc=2)
    assert "--total-episodes 48 is not a positive multiple of --rollout-batch-size 16 × 2 rank(s) = 32" in line
    assert "pass --total-episodes 32" in line


def test_unknown_algorithm(runs):
    line = error_line(runs["algorithm"][0])
    assert "unknown --algorithm ppo" in line and "a_lol_seq" in line and "nll" in line


def test_resume_folder_that_does_not_fit(runs):
    """Not a checkpoint; another script's checkpoint; the other mode of a script; another number of ranks."""
    line = error_line(runs["resume_none"][0])
    assert "not a resumable checkpoint" in line and "runs/RUN_NAME/resume" in line
    line = error_line(runs["resume_ilql"][0])
    assert "was written by ilql.py, not ppo.py" in line and "resume it with ilql.py" in line
    assert "was written by apa.py --offline-dataset, not apa.py" in error_line(runs["resume_offline"][0])
    line = error_line(runs["resume_ranks"][0])
    assert "written by 2 rank(s), this run has 1" in line and "--nproc_per_node 2" in line


def test_nan_reward_stops_the_run_and_keeps_the_last_good_checkpoint(runs):
    proc, out = runs["nan_reward"]
    line = error_line(proc)
    run, records = read_run(out)
    assert line.startswith("error: step 2: rollout/score = nan")
    assert f"the last good checkpoint is {run / 'resume'}" in line
    assert json.loads((run / "resume" / "meta.json").read_text())["step"] == 1  # not overwritten by step 2
    assert not (run / "policy").exists()
    assert records[1]["rollout/score"] == 1.0  # what was logged before the NaN is kept


def test_nan_loss_from_a_huge_learning_rate(runs):
    line = error_line(runs["nan_loss"][0])
    assert "policy/loss = nan" in line and "lower --learning-rate" in line
    assert "no checkpoint was written yet (pass --save-every N)" in line


def test_alol_value_prompts_must_be_held_out(runs):
    line = error_line(runs["value_prompts"][0])
    assert "0 prompt(s) that neither a training row nor the evaluation has" in line and "--value-split" in line


def test_value_model_shared_by_the_ranks_of_a_node_on_one_gpu(runs):
    line = error_line(runs["value_device"][0], nproc=2)
    assert "--value-device cuda:0" in line and "use --value-device policy" in line
