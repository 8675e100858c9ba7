"""--track (Weights & Biases, offline here) and the sample tables (--log-samples): what a run writes to W&B, to
samples.jsonl and to TensorBoard's text tab, for an online script (PPO), an offline one (DPO) and ILQL's β sweep;
--track without wandb installed; a resumed run's samples.jsonl."""

import json
import struct

import pytest
from conftest import TINY_ONLINE, assert_resume_reproduces, error_line, read_run, run_script

ONLINE_COLUMNS = ["step", "prompt", "rendered_prompt", "response", "score", "gold_score", "kl_to_ref"]
OFFLINE_COLUMNS = ["step", "prompt", "rendered_prompt", "response", "score", "gold_score"]


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log of 32 KiB blocks after a 7-byte
    header, each record cut into chunks with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, record, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's last bytes, too few for a chunk header, are padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            records.append(parsed)
            record = b""
    return records


def tensorboard_samples(run_dir):
    """{step: markdown} of the `samples` text in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}


def check_samples(run_dir, steps, rows_per_step, columns):
    """samples.jsonl holds rows_per_step rows of `columns` at each of `steps`, and TensorBoard the same tables."""
    with open(run_dir / "samples.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [step for step in steps for _ in range(rows_per_step)]
    assert all(list(row) == columns for row in rows), rows[0]
    assert all(row["prompt"] and isinstance(row["score"], float) for row in rows)
    # the built-in prompts have no template: the policy saw the prompt's last --max-prompt-length tokens
    assert all(row["rendered_prompt"] and row["prompt"].endswith(row["rendered_prompt"]) for row in rows)
    tables = tensorboard_samples(run_dir)
    assert sorted(tables) == steps
    for table in tables.values():
        lines = table.splitlines()
        assert lines[0] == "|" + "|".join(columns[1:]) + "|" and len(lines) == 2 + rows_per_step, table
    return rows


@pytest.fixture(scope="module")
def tracked_ppo(builtin_path, tmp_path_factory):
    """ppo.py with --track, W&B offline in a temporary folder: (args without --track, output dir, W&B dir)."""
    tmp = tmp_path_factory.mktemp("tracked")
    args = [*TINY_ONLINE, "--log-samples", "3"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb_dir")}
    run_script("ppo.py", *args, "--track", "--output-dir", str(tmp / "runs"), env=env)
    return args, tmp / "runs", tmp / "wandb_dir" / "wandb"


def test_track_writes_an_offline_wandb_run_with_the_config_scalars_code_and_tables(tracked_ppo):
    _, output_dir, wandb_dir = tracked_ppo
    run_dir, records = read_run(output_dir)
    (offline,) = wandb_dir.glob("offline-run-*")
    records_wb = wandb_records(next(offline.glob("*.wandb")))
    (run,) = [r.run for r in records_wb if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert run.display_name == run_dir.name and run.project == "onefile-rlhf"
    assert config["track"] is True and config["exp_name"] == "ppo" and config["log_samples"] == 3
    assert (offline / "files" / "code" / "ppo.py").exists()  # save_code
    history = []
    for r in records_wb:
        if r.WhichOneof("record_type") == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    # every scalar of metrics.jsonl, synced from TensorBoard at its step (float32 there)
    for record in records:
        (synced,) = [row for row in history if row.get("global_step") == record["step"] and "eval/reward" in row]
        for key, value in record.items():
            if key != "step":
                assert synced[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    tables = [row for row in history if "samples/_type" in row]
    assert [row["global_step"] for row in tables] == [0, 1, 2]
    assert all(row["samples/_type"] == "table-file" and row["samples/nrows"] == 3 for row in tables)
    table = json.loads((offline / "files" / tables[0]["samples/path"]).read_text())
    assert table["columns"] == ONLINE_COLUMNS and len(table["data"]) == 3
    exits = [r.exit for r in records_wb if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1 and exits[0].exit_code == 0  # finished by common.exit_cleanly


def test_online_samples_at_every_evaluation_and_in_tensorboard(tracked_ppo):
    _, output_dir, _ = tracked_ppo
    run_dir, _ = read_run(output_dir)
    rows = check_samples(run_dir, steps=[0, 1, 2], rows_per_step=3, columns=ONLINE_COLUMNS)
    assert rows[0]["kl_to_ref"] == 0  # before training π = π_ref
    with open(run_dir / "samples.jsonl") as f:
        assert json.loads(f.readline())["prompt"] in tensorboard_samples(run_dir)[0]


def test_resumed_run_has_the_samples_of_an_uninterrupted_one(tracked_ppo, tmp_path):
    """Stopped after its first evaluation and resumed without --track: the same metrics as the tracked run (--track
    changes no number), and the samples.jsonl of the stopped run up to its checkpoint, then the resumed run's."""
    args, output_dir, _ = tracked_ppo
    run_dir, records = read_run(output_dir)
    assert_resume_reproduces("ppo.py", args, records, tmp_path)
    resumed, _ = read_run(tmp_path / "resumed")
    assert (resumed / "samples.jsonl").read_text() == (run_dir / "samples.jsonl").read_text()
    assert sorted(tensorboard_samples(resumed)) == [0, 1, 2]


def test_samples_hold_the_prompt_the_policy_saw_with_its_chat_template():
    """samples.jsonl's rendered_prompt (common.rendered_prompts): the query ids decoded without their left padding,
    special tokens kept, so a template (here ChatML on GPT-2's BPE) can be checked from the outputs."""
    from test_chat_templates import HH, HH_MESSAGES, qwen_tokenizer

    import common

    tok = qwen_tokenizer()
    prompts = [HH, "\n\nHuman: Hi?\n\nAssistant:"]
    rows, _ = common.encode_prompts(tok, prompts, 512, 16, 1024, chat_template=True)
    query_ids, query_mask = common.pad_left(rows, tok.pad_token_id)
    assert query_mask[1, 0] == 0  # the shorter prompt is padded
    rendered = common.rendered_prompts(tok, query_ids, query_mask)
    expected = [
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in (HH_MESSAGES, [{"role": "user", "content": "Hi?"}])
    ]
    assert rendered == expected
    rows = common.sample_rows(2, prompt=prompts, rendered_prompt=rendered, response=["a", "b"])
    assert len(rows) == 2 and rows[0] == {
        "prompt": common.prompt_text(HH),
        "rendered_prompt": expected[0],
        "response": "a",
    }


def test_track_without_wandb_fails_in_one_line_before_loading(builtin_path, tmp_path):
    fake = tmp_path / "no_wandb"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    out = tmp_path / "runs"
    proc = run_script("ppo.py", "--track", "--output-dir", str(out), env={"PYTHONPATH": str(fake)}, check=False)
    line = error_line(proc)
    assert "--track" in line and "pip install wandb" in line, line
    assert not out.exists()  # nothing was loaded or written


def test_offline_script_samples_have_no_kl_column(builtin_path, tmp_path):
    args = "--total-steps 6 --mini-batch-size 4 --eval-every 3 --eval-prompts 8 --heldout-pairs 8".split()
    run_script(
        "dpo.py", *args, "--log-samples", "2", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)
    )
    run_dir = next(p for p in tmp_path.iterdir() if p.name.startswith("dpo__"))
    check_samples(run_dir, steps=[0, 3, 6], rows_per_step=2, columns=OFFLINE_COLUMNS)


def test_ilql_samples_at_every_beta_of_the_sweep(builtin_path, tmp_path):
    args = "--offline-epochs 1 --mini-batch-size 64 --eval-prompts 16 --max-new-tokens 16 --eval-betas 0 2".split()
    run_script("ilql.py", *args, "--log-samples", "2", "--output-dir", str(tmp_path))
    run_dir, _ = read_run(tmp_path)
    rows = check_samples(run_dir, steps=[0, 16], rows_per_step=4, columns=["step", "beta", *OFFLINE_COLUMNS[1:]])
    assert [row["beta"] for row in rows[:4]] == [0, 0, 2, 2]
    assert rows[0]["prompt"] == rows[2]["prompt"]  # the same prompts at every β
