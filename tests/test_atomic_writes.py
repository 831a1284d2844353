"""Files users read appear whole or not at all, and two preprocessing runs never write one split at once.

Half-written files: a serialiser that fails part-way, and a writer killed with SIGKILL mid-write, leave the
old file as it was (and no temporary file once the next write succeeds); an export that fails leaves the old
``best/`` folder complete. Locks: a second ``clotho_dataset.py`` on a split another process holds fails at
once with the holder's pid, and runs once the holder has exited or been killed (forked children included).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import utils.checkpoints
import utils.stores
from preprocessing.demo_dataset import write_demo_dataset
from utils.checkpoints import EXPORT_CONFIG, EXPORT_INPUTS, EXPORT_METRICS, EXPORT_WEIGHTS, export_model
from utils.errors import DatasetError
from utils.reporting import TrialHistory, plot_metric
from utils.stores import audio_table, lock_file, split_lock, write_csv, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_MESSAGE = (
    r"error: (?P<file>\S+): another preprocessing run \(pid (?P<pid>\d+), started \d\d:\d\d:\d\d\) "
    r"is writing this split; wait for it or stop it"
)


def leftovers(folder: Path) -> list[str]:
    """Temporary names the atomic writers use, left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


def start(code: str) -> subprocess.Popen:
    """A Python process running ``code`` from the repository root; returns once it printed its first line."""
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    return process


# --- half-written files --------------------------------------------------------------------------------------


def test_failed_serialiser_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.csv"
    write_csv(pd.DataFrame({"a": [1, 2]}), target)
    old = target.read_bytes()

    def half_then_fail(self: pd.DataFrame, path: Path, **_: object) -> None:
        Path(path).write_text("a\n1\n")  # some rows, then the serialiser dies
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_csv(pd.DataFrame({"a": [3, 4, 5]}), target)
    assert target.read_bytes() == old
    assert leftovers(tmp_path) == []

    with pytest.raises(TypeError):  # cannot be serialised: the old file is not even opened
        write_json({"x": object()}, tmp_path / "best.json")
    assert not (tmp_path / "best.json").exists() and leftovers(tmp_path) == []


def test_failed_plot_leaves_old_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    history = pd.DataFrame({"epoch": [1, 2], "val/t2a_mAP@10": [0.1, 0.3]})
    trials = [TrialHistory("t0", {"optimizer.lr": 0.001}, "TERMINATED", history)]
    png = plot_metric(trials, "val/t2a_mAP@10", tmp_path / "search.png")
    old = png.read_bytes()
    assert old.startswith(b"\x89PNG")
    real_savefig = matplotlib.figure.Figure.savefig

    def half_then_fail(self: matplotlib.figure.Figure, path: Path, **kwargs: object) -> None:
        real_savefig(self, path, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # cut short, as by a crash
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        plot_metric(trials, "val/t2a_mAP@10", png)
    assert png.read_bytes() == old and leftovers(tmp_path) == []


def test_sigkill_mid_write_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "retrieval_metrics.json"
    write_json({"run": 1}, target)
    writer = start(
        "import sys, time\n"
        "from utils.stores import atomic_path\n"
        f"with atomic_path({str(target)!r}) as partial, open(partial, 'wb') as f:\n"
        "    f.write(b'{' * (8 << 20)); f.flush()\n"  # 8 MB of a file that will never be finished
        "    print('ready', flush=True); time.sleep(60)\n"
    )
    try:
        assert (tmp_path / "retrieval_metrics.json.partial").stat().st_size == 8 << 20
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert json.loads(target.read_text()) == {"run": 1}  # readers still see the whole old file
    write_json({"run": 2}, target)
    assert json.loads(target.read_text()) == {"run": 2}
    assert leftovers(tmp_path) == []  # the next write took over the killed one's temporary file


# --- the best/ export ------------------------------------------------------------------------------------------


def fake_checkpoint(path: Path, seed: int) -> dict[str, torch.Tensor]:
    """A checkpoint file as ``save_checkpoint`` writes it (plain containers and tensors); returns its weights."""
    weights = {"audio_proj.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))}
    state = {
        "model": weights,
        "optimizer": {},
        "scheduler": {},
        "config": {"seed": seed},
        "epoch": seed,
        "metrics": {"val/loss": 1.0 / seed},
        "inputs": {"n_mels": 64},
    }
    torch.save(state, path)
    return weights


def assert_export(folder: Path, weights: dict[str, torch.Tensor], seed: int) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_METRICS, EXPORT_INPUTS]
    )
    assert torch.equal(load_file(folder / EXPORT_WEIGHTS)["audio_proj.weight"], weights["audio_proj.weight"])
    assert json.loads((folder / EXPORT_CONFIG).read_text()) == {"seed": seed}
    assert json.loads((folder / EXPORT_METRICS).read_text()) == {"epoch": seed, "val/loss": 1.0 / seed}


def test_export_replaces_best_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    best = tmp_path / "run" / "best"
    old_weights = fake_checkpoint(tmp_path / "old.pt", seed=1)
    new_weights = fake_checkpoint(tmp_path / "new.pt", seed=2)
    export_model(tmp_path / "old.pt", best)
    assert_export(best, old_weights, 1)

    real_save_file = utils.checkpoints.save_file

    def half_then_fail(tensors: dict, filename: str) -> None:
        real_save_file(tensors, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:50])
        raise OSError("no space left on device")

    monkeypatch.setattr(utils.checkpoints, "save_file", half_then_fail)
    with pytest.raises(OSError, match="no space left"):
        export_model(tmp_path / "new.pt", best)
    assert_export(best, old_weights, 1)
    assert leftovers(best.parent) == []
    monkeypatch.undo()

    # the second rename (new folder in) fails after the old one was moved away: the old one is put back
    real_replace = os.replace

    def fail_moving_in(src: os.PathLike, dst: os.PathLike) -> None:
        if str(src).endswith("best.partial"):
            raise PermissionError("rename refused")
        real_replace(src, dst)

    monkeypatch.setattr(utils.stores.os, "replace", fail_moving_in)
    with pytest.raises(PermissionError):
        export_model(tmp_path / "new.pt", best)
    monkeypatch.undo()
    assert_export(best, old_weights, 1)
    assert leftovers(best.parent) == []

    # a crash between the renames left only best.old: it is the export until a new one is complete
    os.replace(best, best.with_name("best.old"))
    monkeypatch.setattr(utils.checkpoints, "save_file", half_then_fail)
    with pytest.raises(OSError, match="no space left"):
        export_model(tmp_path / "new.pt", best)
    monkeypatch.undo()
    assert_export(best, old_weights, 1)
    assert leftovers(best.parent) == []
    export_model(tmp_path / "new.pt", best)
    assert_export(best, new_weights, 2)
    assert leftovers(best.parent) == []


# --- one writer per split ------------------------------------------------------------------------------------


def hold_lock(dataset_dir: Path, fork: bool = False) -> subprocess.Popen:
    """A process holding the ``index`` lock of ``development`` (with ``fork``, also a child forked after
    locking, printing its pid) until its stdin closes."""
    return start(
        "import os, sys\n"
        "from utils.stores import split_lock\n"
        f"with split_lock({str(dataset_dir)!r}, 'development', 'index'):\n"
        f"    child = os.fork() if {fork} else -1\n"
        "    if child == 0:\n"
        "        sys.stdin.read(); os._exit(0)\n"
        "    print('ready', flush=True); print(child, flush=True); sys.stdin.read()\n"
    )


def index_development(dataset_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocessing.clotho_dataset", "--dataset-dir", str(dataset_dir)]
        + ["--splits", "development"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    write_demo_dataset(tmp_path, {"development": 3}, seed=0)
    return tmp_path


def test_second_run_on_a_split_fails_at_once(small_dataset: Path) -> None:
    holder = hold_lock(small_dataset)
    try:
        started = time.perf_counter()
        refused = index_development(small_dataset)
        assert time.perf_counter() - started < 20  # at once: no waiting for the holder
        assert refused.returncode != 0
        line = refused.stderr.strip().splitlines()[-1]
        match = re.fullmatch(LOCK_MESSAGE, line)
        assert match, refused.stderr
        assert Path(match["file"]) == lock_file(small_dataset, "development", "index")
        assert int(match["pid"]) == holder.pid
        assert "Traceback" not in refused.stderr
        assert not audio_table(small_dataset, "development").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    done = index_development(small_dataset)
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(audio_table(small_dataset, "development"))) == 3


def test_lock_is_released_when_its_holder_is_killed(small_dataset: Path) -> None:
    # the holder forks a child first, as audio_logmel.py's worker pool does: the child must not keep the lock
    holder = hold_lock(small_dataset, fork=True)
    child = int(holder.stdout.readline())
    try:
        refused = rf"another preprocessing run \(pid {holder.pid}, started"
        with pytest.raises(DatasetError, match=refused), split_lock(small_dataset, "development", "index"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        os.kill(child, 0)  # the forked child is still running
        with split_lock(small_dataset, "development", "index"):
            assert lock_file(small_dataset, "development", "index").read_text().split()[0] == str(os.getpid())
        with split_lock(small_dataset, "development", "logmel"):  # other kinds of store are locked apart
            pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)
