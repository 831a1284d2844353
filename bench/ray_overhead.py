"""Ray's overhead on tiny trials, against what any fresh trial process pays: importing torch and building the model.

Every search is ``python main.py`` in a subprocess, run by ``bench/many_trials.run_many_trials`` with its tiny
one-epoch CNN trials (``TINY_TRIALS``: one CPU each, FIFO, a random learning rate) on one small demo dataset
generated and preprocessed once for this benchmark (``prepare_demo``: 32/16/16 clips). Measured:
(a) main.py's start to the first reported epoch: the moment the first trial's ``progress.csv`` (written by the
    driver when a result arrives) first holds a row, watched every 50 ms, in the 2-trial search of (c) that runs
    one trial at a time;
(b) overhead per trial in a search of tiny trials, 2 at a time, with ``ray_conf.reuse_actors`` true (the default:
    the next trial runs in a finished trial's process; 20 trials) and false (a new process per trial; 10 trials, to
    keep the run within its budget): ``search_s * concurrent /
    trials - mean training time`` (``many_trials``' definition; Tune's timestamps are whole seconds, so it is good to
    about ``concurrent / trials`` s);
(c) the wall time of a 2-trial search with ``max_concurrent_trials`` 2 against 1;
(d) ``python -c`` that imports torch and the project's ``build_model`` and builds the tiny model (best of 3).
--quick skips the searches (rows marked so) and times (d) once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import Row, Timing, measure, seconds
from bench.many_trials import TINY_CNN, run_many_trials
from preprocessing.demo_dataset import prepare_demo
from utils.config import load_raw, validate

CLIPS = {"development": 32, "validation": 16, "evaluation": 16}
MANY_TRIALS = {True: 20, False: 10}  # per reuse_actors: a new process per trial costs 10-25 s on 2 busy cores
TARGET_BEYOND_IMPORT_S = 2.0
TARGET = f"<= {TARGET_BEYOND_IMPORT_S:.0f} s beyond the import"
# (d): what a new trial process does at the least before it trains: torch, the project's model code, the model
FRESH_BUILD = (
    "import json, sys, torch\n"
    "from utils.checkpoints import build_model\n"
    "from utils.config import load_raw, validate\n"
    "config = validate(load_raw('conf.yaml', json.loads(sys.argv[1])))\n"
    "build_model(config, torch.device('cpu'), inputs={'n_mels': config.features.n_mels, 'text_dim': 384})\n"
)


class FirstResult(threading.Thread):
    """Watches ``storage`` until some trial's ``progress.csv`` holds a result row; ``at`` is then that moment
    (``time.time()``)."""

    def __init__(self, storage: Path) -> None:
        super().__init__(daemon=True)
        self.storage, self.at, self.stop = storage, None, threading.Event()

    def run(self) -> None:
        while self.at is None and not self.stop.is_set():
            for path in self.storage.glob("*/train_trial_*/progress.csv"):
                if path.read_text().count("\n") >= 2:  # the header and a first row
                    self.at = time.time()
                    break
            time.sleep(0.05)


def search(workdir: Path, dataset_dir: Path, trials: int, concurrent: int, reuse: bool = True) -> dict[str, Any]:
    """``run_many_trials``' report of one search, with ``first_result_s``: main.py's start to the first result."""
    watcher = FirstResult(workdir / "runs")
    watcher.start()
    started = time.time()
    try:
        report = run_many_trials(
            trials,
            workdir,
            concurrent,
            dataset_dir=dataset_dir,
            overrides=(f"ray_conf.reuse_actors={str(reuse).lower()}",),
        )
    finally:
        watcher.stop.set()
        watcher.join()
    if watcher.at is None:
        raise RuntimeError(f"no trial's progress.csv under {workdir / 'runs'} got a row")
    return {**report, "first_result_s": watcher.at - started}


def fresh_build(repeats: int, warmup: int) -> Timing:
    """(d): wall time of a fresh ``python -c`` that imports torch and builds the tiny model."""
    command = [sys.executable, "-c", FRESH_BUILD, json.dumps(TINY_CNN)]
    return measure(lambda: subprocess.run(command, cwd=REPO_ROOT, check=True), repeats=repeats, warmup=warmup)


def overhead_row(report: dict[str, Any], fresh: Timing) -> Row:
    """(b) for one ``reuse_actors`` setting."""
    overhead, beyond = report["overhead_per_trial_s"], report["overhead_per_trial_s"] - fresh.min_s
    reuse = "true" if report["reuse"] else "false"
    return Row(
        f"Ray per-trial overhead, {report['trials']} tiny trials, {report['concurrent']} at a time, "
        f"reuse_actors={reuse}",
        f"{overhead:.2f} s per trial",
        against=f"import torch + build model, fresh process: {seconds(fresh.min_s)}",
        ratio=f"{beyond:+.2f} s beyond the import",
        target=TARGET,
        met=beyond <= TARGET_BEYOND_IMPORT_S,
        note=(
            f"search {report['search_s']:.0f} s x {report['concurrent']} slots / {report['trials']} trials - mean "
            f"training {report['mean_train_s']:.2f} s (Tune's whole-second timestamps: "
            f"+-{report['concurrent'] / report['trials']:.1g} s); "
            f"slot gap median {report['slot_gap_s']['median']:.0f} s; main.py wall {report['wall_s']:.1f} s"
            + (
                ""
                if report["reuse"]
                else "; each trial starts a new Ray worker, which imports Ray and main.py's trainable (Tune, data, "
                "training code) besides torch and the model, on the 2 cores the other slot's trial and Ray's own "
                "processes use; a fresh process's first epoch also pays first-call costs inside its training time"
            )
        ),
    )


def run(quick: bool) -> list[Row]:
    """Rows (a)-(d); in quick mode (d) only, the searches marked skipped."""
    fresh = fresh_build(*((1, 0) if quick else (3, 1)))
    fresh_row = Row(
        "import torch + build the tiny model in a fresh process (python -c)",
        str(fresh),
        note="what every new trial process pays at the least; the reference of the rows above",
    )
    names = [
        "python main.py to the first reported epoch (tiny CNN, 32 clips)",
        f"Ray per-trial overhead, {MANY_TRIALS[True]} tiny trials, 2 at a time, reuse_actors=true",
        f"Ray per-trial overhead, {MANY_TRIALS[False]} tiny trials, 2 at a time, reuse_actors=false",
        "2 tiny trials on 2 cores at once (max_concurrent_trials 2)",
    ]
    if quick:
        skipped = [Row(name, "skipped in --quick", target=TARGET if "overhead" in name else "") for name in names]
        return [*skipped, fresh_row]

    with tempfile.TemporaryDirectory(prefix="bench_ray_overhead_") as tmp:
        dataset_dir = Path(tmp) / "data"
        config = validate(load_raw(REPO_ROOT / "conf.yaml", ["device=cpu", f"data.dataset_dir={dataset_dir}"]))
        prepare_demo(config, CLIPS, workers=2)
        serial = search(Path(tmp) / "serial", dataset_dir, 2, 1)
        paired = search(Path(tmp) / "paired", dataset_dir, 2, 2)
        many = {
            reuse: {**search(Path(tmp) / f"reuse_{reuse}", dataset_dir, MANY_TRIALS[reuse], 2, reuse), "reuse": reuse}
            for reuse in (True, False)
        }
    first = serial["first_result_s"]
    return [
        Row(
            names[0],
            f"{first:.1f} s",
            against=f"import torch + build model, fresh process: {seconds(fresh.min_s)}",
            ratio=f"{first / fresh.min_s:.1f}x the import",
            note=(
                f"the first trial started {serial['startup_s']:.0f} s after main.py (imports, Ray start, checks; "
                f"whole-second timestamps) and trained {serial['mean_train_s']:.2f} s on average"
            ),
        ),
        overhead_row(many[True], fresh),
        overhead_row(many[False], fresh),
        Row(
            names[3],
            f"{paired['wall_s']:.1f} s main.py wall",
            against=f"one after the other (max_concurrent_trials 1): {serial['wall_s']:.1f} s",
            ratio=f"{serial['wall_s'] / paired['wall_s']:.2f}x the serial search's speed",
            note=(
                f"trials' span {paired['search_s']:.0f} s vs {serial['search_s']:.0f} s (whole seconds), mean training "
                f"{paired['mean_train_s']:.2f} s vs {serial['mean_train_s']:.2f} s; reuse_actors=true (the default)"
            ),
        ),
        fresh_row,
    ]


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
