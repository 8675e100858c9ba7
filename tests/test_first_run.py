"""A user's first run: one process compiles nothing, and a build lock left by a killed run is one error line, not a
silent hang (torch waits on such a lock forever)."""

import os
import time

from conftest import error_line, read_run, run_script

TINY = (
    "--total-episodes 16 --rollout-batch-size 16 --mini-batch-size 8 --update-epochs 1 --max-new-tokens 8 "
    "--eval-prompts 16"
).split()


def test_one_process_compiles_nothing(builtin_path, tmp_path):
    extensions = tmp_path / "torch_extensions"  # empty: anything compiled would land here
    proc = run_script(
        "apa.py", *TINY, "--output-dir", str(tmp_path / "run"), env={"TORCH_EXTENSIONS_DIR": str(extensions)}
    )
    assert "built successfully" not in proc.stdout + proc.stderr
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
    read_run(tmp_path / "run")


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
