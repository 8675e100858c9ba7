"""--reward-model takes Python `module:function` rewards and several rewards summed with --reward-weights, end to end
(apa.py, the main script, on the built-in task; tiny settings)."""

import json

import pytest
from conftest import TINY_ONLINE, read_run, run_script

REWARD_MODULE = '''
def words(prompts, responses):
    """one point per word of the response (special tokens are already stripped)"""
    assert len(prompts) == len(responses) and all(isinstance(p, str) and p for p in prompts)
    return [len(r.split()) for r in responses]
'''


@pytest.fixture
def reward_module(tmp_path):
    (tmp_path / "word_reward.py").write_text(REWARD_MODULE)
    return {"PYTHONPATH": str(tmp_path)}


def test_python_reward_function_alone(builtin_path, tmp_path, reward_module):
    proc = run_script(
        "apa.py",
        *TINY_ONLINE,
        "--reward-model",
        "word_reward:words",
        "--reward-weights",
        "2",
        "--output-dir",
        str(tmp_path / "run"),
        env=reward_module,
    )
    assert "value model is initialised from the policy" in proc.stdout  # no reward model to start it from
    run, records = read_run(tmp_path / "run")
    for r in records[1:]:
        # score = 2 · words; words = tokens − the EOS of the responses that emitted one
        words = r["rollout/response_length"] - (1 - r["rollout/no_eos_fraction"])
        assert r["rollout/score"] == pytest.approx(2 * words, abs=1e-4), r
    assert json.loads((run / "args.json").read_text())["value_model"] == "policy"


def test_reward_model_plus_function_summed_with_weights(builtin_path, tmp_path, reward_module):
    base = run_script("apa.py", *TINY_ONLINE, "--output-dir", str(tmp_path / "base"), env=reward_module)
    run_script(
        "apa.py",
        *TINY_ONLINE,
        "--reward-model",
        "builtin",
        "word_reward:words",
        "--reward-weights",
        "1",
        "0.5",
        "--output-dir",
        str(tmp_path / "sum"),
        env=reward_module,
    )
    _, base_records = read_run(tmp_path / "base")
    run, records = read_run(tmp_path / "sum")
    assert json.loads((run / "args.json").read_text())["value_model"] == "reward"  # from the builtin RM, first
    # same seed, same policy before the first update: the first rollout is the same, so the sum is the builtin
    # score plus 0.5 · words
    words = records[1]["rollout/response_length"] - (1 - records[1]["rollout/no_eos_fraction"])
    assert records[1]["rollout/response_length"] == base_records[1]["rollout/response_length"]
    assert records[1]["rollout/score"] == pytest.approx(base_records[1]["rollout/score"] + 0.5 * words, abs=1e-4)
    assert "done in" in base.stdout


def test_reward_weights_must_match(builtin_path, tmp_path):
    proc = run_script(
        "apa.py", "--reward-model", "builtin", "--reward-weights", "1", "2", "--output-dir", str(tmp_path), check=False
    )
    assert proc.returncode != 0
    assert "--reward-weights has 2 values for 1 --reward-model entries" in proc.stderr.strip().splitlines()[-1]
