"""apa.py and awr.py end to end on the built-in task (subprocesses, tiny settings), online and offline."""
import math

import pytest
from conftest import read_run, run_script

TINY = ["--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "8", "--ppo-epochs", "1",
        "--max-new-tokens", "12", "--eval-prompts", "16", "--eval-every", "1"]
OFFLINE = ["--offline-dataset", "builtin", "--offline-epochs", "2", "--mini-batch-size", "32", "--max-new-tokens",
           "24", "--eval-prompts", "16"]


def _check(records, steps, keys):
    assert [r["step"] for r in records] == list(range(steps + 1))
    for key in keys:
        assert key in records[-1], key
    assert all(math.isfinite(v) for r in records for v in r.values())


@pytest.mark.parametrize("script", ["apa.py", "awr.py"])
def test_online_single_process(builtin_path, tmp_path, script):
    proc = run_script(script, *TINY, "--output-dir", str(tmp_path))
    assert "done in" in proc.stdout
    _, records = read_run(tmp_path)
    _check(records, 2, ["policy/loss", "value/loss", "rollout/score", "rollout/gold_score", "rollout/kl_to_ref",
                        "eval/gold_score", "eval/kl_to_ref"])


@pytest.mark.parametrize("script", ["apa.py", "awr.py"])
def test_offline_advantages_are_refreshed_every_epoch(builtin_path, tmp_path, script):
    """The released offline code computed advantages once, from a random value head (ALGORITHMS.md §6). Here the
    value model is fitted first and the advantages recomputed every epoch: they must change between epochs."""
    run_script(script, *OFFLINE, "--output-dir", str(tmp_path))
    _, records = read_run(tmp_path)
    _check(records, 2, ["policy/loss", "value/loss", "offline/advantage_change", "eval/gold_score"])
    assert records[1]["offline/advantage_change"] == 0.0  # nothing to compare with at the first epoch
    assert records[2]["offline/advantage_change"] > 1e-3


def test_apa_torchrun_zero3(builtin_path, tmp_path):
    proc = run_script("apa.py", *TINY, "--total-episodes", "64", "--zero-stage", "3", "--output-dir", str(tmp_path),
                      nproc=2)
    assert "2 rank(s)" in proc.stdout
    run, records = read_run(tmp_path)
    _check(records, 2, ["policy/loss", "eval/kl_to_ref"])
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "policy")


def test_offline_dataset_with_wrong_columns_names_the_shapes(builtin_path, tmp_path):
    import json
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the movie", "text": "was fine"}) + "\n" for _ in range(4)))
    proc = run_script("apa.py", "--offline-dataset", str(data), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "offline rows need prompt, response, reward (or prompt, chosen, rejected)" in proc.stderr
