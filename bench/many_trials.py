"""Many tiny trials: disk, driver memory and per-trial overhead of one long search, run as users run it.

Runs ``python main.py`` in a subprocess with ``ray_conf.num_samples=--trials`` one-epoch trials of a tiny model
(a random search over the learning rate, FIFO, ``--concurrent`` trials of one CPU at a time, ``num_to_keep``
checkpoints per trial) on the embedded demo dataset that main.py prepares itself, or on ``--dataset-dir``, with
storage under ``--workdir``. Samples the main.py process's resident memory every 0.5 s (Linux's ``/proc``),
then reads Tune's per-trial ``result.json`` files, the experiment folder and Ray's session folder. Writes the
report as JSON (``--out``) and prints it as a markdown table.

    python bench/many_trials.py --trials 100 --out many_trials.json

Definitions (Tune's ``timestamp`` counts whole seconds, so the times below are good to about a second):
- a trial's training time is its last result's ``time_total_s``, Tune's clock of the trainable (data loading,
  model, epoch, validation, checkpoint); the trial ends at that result's ``timestamp`` and started
  ``time_total_s`` before it.
- search_s: first trial start to last trial end; startup_s: main.py's start to the first trial start (imports,
  Ray start, checks, and making the demo data when main.py does); summary_s: last trial end to main.py's exit.
- overhead_per_trial_s = search_s * concurrent / trials - mean training time: how long each trial holds a slot
  beyond its own training (worker process and imports, scheduling, results, checkpoints, experiment state).
- slot_gap_s: the k-th trial to end frees the slot that the (k + concurrent)-th trial to start takes; its gap
  is that start minus that end (median, 90th percentile, max).
- disk: bytes of every file under the experiment folder (and per trial: that / trials), of each trial folder,
  checkpoints kept per trial (``checkpoint_*`` folders; at most ``num_to_keep`` + 1, as Tune keeps the best ones
  and also the newest, which a retried trial restores) and written per trial (results that carried one), and the
  bytes under ``logs/`` of the Ray session main.py started (found from its Ray processes' command lines).
- memory (MB = 2**20 bytes): start = last sample before the first trial start, after_10pct = first sample once
  ceil(trials / 10) trials have ended, end = last sample before the last trial end, peak over all samples;
  growth_mb_per_trial = least-squares slope of RSS against the number of trials ended, over the later half
  (in time) of the samples taken between the first trial start and the last trial end.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

from utils.cli import make_parser, positive_int
from utils.stores import write_json

SAMPLE_EVERY_S = 0.5
MB = 2**20
# One epoch of a tiny CNN on the CPU, quiet and undecorated (the tests' trials too: tests/conftest.py)
TINY_CNN = [
    "param_conf.num_epochs=1",
    "model.embed_dim=16",
    "model.audio_enc.channels=[4, 8]",
    "model.audio_enc.out_dim=16",
    "device=cpu",
    "ray_conf.include_dashboard=false",
    "ray_conf.verbose=0",
]
# ... one CPU each, searched over the learning rate so that the trials differ
TINY_TRIALS = [
    *TINY_CNN,
    "ray_conf.cpus_per_trial=1",
    "ray_conf.scheduler={name: FIFO}",
    "ray_conf.search_space={optimizer.lr: {loguniform: [0.0001, 0.01]}}",
]


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--trials", type=positive_int, default=100, help="trials in the search (default: 100)")
    parser.add_argument("--concurrent", type=positive_int, default=2, help="trials at a time (default: 2)")
    parser.add_argument("--num-to-keep", type=positive_int, default=1, help="checkpoints kept per trial (default: 1)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPO_ROOT / "runs" / "many_trials",
        help="experiments (under runs/) and main.py's log go here (default: runs/many_trials)",
    )
    parser.add_argument("--out", type=Path, help="write the report as JSON here (default: print it only)")
    parser.add_argument("--config", type=Path, help="config for main.py (default: main.py's conf.yaml)")
    parser.add_argument("--dataset-dir", type=Path, help="a preprocessed dataset (default: the config's, the demo)")
    parser.add_argument("overrides", nargs="*", help="more dotted overrides for main.py, e.g. param_conf.batch_size=16")
    return parser


def run_many_trials(
    trials: int,
    workdir: Path,
    concurrent: int = 2,
    num_to_keep: int = 1,
    config: Path | None = None,
    dataset_dir: Path | None = None,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one search of ``trials`` tiny trials with main.py and return the report (see the module docstring)."""
    storage = (workdir / "runs").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    before = set(storage.iterdir())
    command = [sys.executable, str(REPO_ROOT / "main.py"), *(["--config", str(config.resolve())] if config else [])]
    command += [
        *TINY_TRIALS,
        f"ray_conf.num_samples={trials}",
        f"ray_conf.max_concurrent_trials={concurrent}",
        f"ray_conf.num_to_keep={num_to_keep}",
        f"ray_conf.storage_path={storage}",
        *([f"data.dataset_dir={dataset_dir.resolve()}"] if dataset_dir else []),
        *overrides,
    ]
    log_file = workdir / "main.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_file.open("w") as log:
        started = time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        samples, session = sample_driver(proc)
        ended = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"main.py exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
    (experiment,) = [p for p in storage.iterdir() if p not in before and p.is_dir()]
    runs = trial_runs(experiment)
    return {
        "trials": trials,
        "concurrent": concurrent,
        "num_to_keep": num_to_keep,
        "experiment": str(experiment),
        "main_log": str(log_file),
        "status": dict(
            Counter(row["status"] for row in csv.DictReader((experiment / "results.csv").read_text().splitlines()))
        ),
        **timing(runs, started, ended, concurrent),
        "disk": disk_use(experiment, runs, session),
        "memory": driver_memory(samples, runs),
    }


def sample_driver(proc: subprocess.Popen) -> tuple[list[tuple[float, float]], Path | None]:
    """``(time, RSS in MB)`` of ``proc`` every ``SAMPLE_EVERY_S`` until it exits, and the folder of the Ray
    session it started."""
    samples, session = [], None
    while proc.poll() is None:
        try:
            samples.append((time.time(), rss_mb(proc.pid)))
        except OSError:  # exited between poll() and the sample
            break
        session = session or session_dir(proc.pid)
        time.sleep(SAMPLE_EVERY_S)
    proc.wait()
    return samples, session


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (Linux's ``/proc/<pid>/statm``: its second field, in pages)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def processes() -> dict[int, tuple[int, list[bytes]]]:
    """This machine's processes, from ``/proc``: pid -> (parent pid, command-line arguments). A process that ends
    while the table is read is left out."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
            table[int(stat.parent.name)] = (parent, (stat.parent / "cmdline").read_bytes().split(b"\0"))
        except OSError:
            continue
    return table


def session_dir(driver: int) -> Path | None:
    """The Ray session folder that a child of process ``driver`` names on its command line (the GCS server's
    ``--session-dir=``), or None while there is none. Reads ``/proc``: other Ray sessions may run meanwhile."""
    for parent, args in processes().values():
        for arg in args if parent == driver else []:
            if arg.startswith(b"--session-dir="):
                return Path(os.fsdecode(arg.split(b"=", 1)[1]))
    return None


def trial_runs(experiment: Path) -> list[dict[str, Any]]:
    """Per trial folder: training time, start and end (see the module docstring) and checkpoints written."""
    runs = []
    for folder in sorted(experiment.glob("train_trial_*")):
        results = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        last = results[-1]
        runs.append(
            {
                "folder": folder,
                "train_s": last["time_total_s"],
                "start": last["timestamp"] - last["time_total_s"],
                "end": float(last["timestamp"]),
                "checkpoints_written": sum(bool(r.get("checkpoint_dir_name")) for r in results),
            }
        )
    return runs


def timing(runs: list[dict[str, Any]], started: float, ended: float, concurrent: int) -> dict[str, Any]:
    """Wall times, trials per minute, per-trial overhead and slot gaps."""
    first, last = min(r["start"] for r in runs), max(r["end"] for r in runs)
    search_s = last - first
    mean_train = statistics.fmean(r["train_s"] for r in runs)
    starts, ends = sorted(r["start"] for r in runs), sorted(r["end"] for r in runs)
    gaps = [start - end for start, end in zip(starts[concurrent:], ends)]
    return {
        "wall_s": ended - started,
        "startup_s": first - started,
        "search_s": search_s,
        "summary_s": ended - last,
        "trials_per_minute": 60 * len(runs) / (ended - started),
        "search_trials_per_minute": 60 * len(runs) / search_s,
        "mean_train_s": mean_train,
        "overhead_per_trial_s": search_s * concurrent / len(runs) - mean_train,
        "slot_gap_s": quantiles(gaps),
    }


def quantiles(values: list[float]) -> dict[str, float | None]:
    """Median, 90th percentile and max of ``values`` (None for none)."""
    if not values:
        return {"median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        "max": ordered[-1],
    }


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def disk_use(experiment: Path, runs: list[dict[str, Any]], session: Path | None) -> dict[str, Any]:
    """Bytes of the experiment, its trials and checkpoints, and of the Ray session's logs."""
    trial_bytes = [folder_bytes(r["folder"]) for r in runs]
    checkpoints = [sorted(r["folder"].glob("checkpoint_*")) for r in runs]
    kept = [folder_bytes(c) for cs in checkpoints for c in cs]
    total = folder_bytes(experiment)
    return {
        "experiment_bytes": total,
        "bytes_per_trial": total / len(runs),
        "trial_folder_bytes_mean": statistics.fmean(trial_bytes),
        "trial_folder_bytes_max": max(trial_bytes),
        "checkpoint_bytes_mean": statistics.fmean(kept) if kept else 0.0,
        "checkpoints_kept_per_trial_max": max(len(cs) for cs in checkpoints),
        "checkpoints_written_per_trial_max": max(r["checkpoints_written"] for r in runs),
        "experiment_state_bytes": sum(p.stat().st_size for p in experiment.glob("experiment_state-*.json")),
        "ray_session": str(session) if session else None,
        "ray_session_logs_bytes": folder_bytes(session / "logs") if session else None,
    }


def driver_memory(samples: list[tuple[float, float]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """RSS of main.py at the search's landmarks and its growth per trial (see the module docstring)."""
    ends = sorted(r["end"] for r in runs)
    first, last = min(r["start"] for r in runs), ends[-1]

    def ended_by(t: float) -> int:
        return sum(end <= t for end in ends)

    tenth = math.ceil(len(runs) / 10)
    during = [(t, rss) for t, rss in samples if first <= t <= last]
    later = during[len(during) // 2 :]
    return {
        "samples": len(samples),
        "rss_start_mb": next((rss for t, rss in reversed(samples) if t < first), samples[0][1]),
        "rss_after_10pct_mb": next((rss for t, rss in samples if ended_by(t) >= tenth), None),
        "rss_end_mb": next((rss for t, rss in reversed(samples) if t <= last), None),
        "rss_peak_mb": max(rss for _, rss in samples),
        "growth_mb_per_trial": slope([float(ended_by(t)) for t, _ in later], [rss for _, rss in later]),
    }


def slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of ``y`` on ``x`` (None when ``x`` does not vary)."""
    if len(x) < 2:
        return None
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else None


def markdown_table(report: dict[str, Any]) -> str:
    """The report's headline numbers as a two-column markdown table."""
    disk, memory, gaps = report["disk"], report["memory"], report["slot_gap_s"]

    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    rows = [
        ("trials (status)", ", ".join(f"{n} {s}" for s, n in sorted(report["status"].items()))),
        ("concurrent trials, num_to_keep", f"{report['concurrent']}, {report['num_to_keep']}"),
        (
            "wall time (startup + search + summary)",
            f"{num(report['wall_s'])} s ({num(report['startup_s'])} + "
            f"{num(report['search_s'])} + {num(report['summary_s'])})",
        ),
        (
            "trials per minute (whole run / search)",
            f"{num(report['trials_per_minute'], 2)} / {num(report['search_trials_per_minute'], 2)}",
        ),
        ("mean training time per trial", f"{num(report['mean_train_s'], 2)} s"),
        ("overhead per trial", f"{num(report['overhead_per_trial_s'], 2)} s"),
        ("slot gap median / p90 / max", f"{num(gaps['median'])} / {num(gaps['p90'])} / {num(gaps['max'])} s"),
        (
            "experiment folder (per trial)",
            f"{num(disk['experiment_bytes'] / MB, 2)} MB ({num(disk['bytes_per_trial'] / 1024)} KiB)",
        ),
        (
            "trial folder mean / max",
            f"{num(disk['trial_folder_bytes_mean'] / 1024)} / {num(disk['trial_folder_bytes_max'] / 1024)} KiB",
        ),
        (
            "checkpoints per trial kept / written (max)",
            f"{disk['checkpoints_kept_per_trial_max']} / {disk['checkpoints_written_per_trial_max']}",
        ),
        ("checkpoint size (mean)", f"{num(disk['checkpoint_bytes_mean'] / 1024)} KiB"),
        ("experiment_state json", f"{num(disk['experiment_state_bytes'] / 1024)} KiB"),
        (
            "Ray session logs",
            "-" if disk["ray_session_logs_bytes"] is None else f"{num(disk['ray_session_logs_bytes'] / MB, 2)} MB",
        ),
        (
            "driver RSS start / 10% / end / peak",
            f"{num(memory['rss_start_mb'])} / {num(memory['rss_after_10pct_mb'])} "
            f"/ {num(memory['rss_end_mb'])} / {num(memory['rss_peak_mb'])} MB",
        ),
        ("driver RSS growth", f"{num(memory['growth_mb_per_trial'], 3)} MB per trial"),
    ]
    return "\n".join(["| measure | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> None:
    args = build_parser().parse_args()
    report = run_many_trials(
        args.trials,
        args.workdir,
        args.concurrent,
        args.num_to_keep,
        args.config,
        args.dataset_dir,
        tuple(args.overrides),
    )
    if args.out:
        write_json(report, args.out)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
