"""Run every benchmark of bench/ in one process and write BENCHMARKS.md.

Each module under bench/ named in MODULES has run(quick) -> rows; they run one after the other with the same
torch threads (one per core this process may use), each timed. A module that is missing or raises becomes a row
saying so, the others still run, and the exit status is 1. The file: the machine (CPU, cores, memory, GPU),
library versions, the commit, one table of all rows (each figure beside what it is compared with, the ratio and
the target), the targets missed with why, and the wall time of each module and of the run.

    python bench/run.py                 # the full run (under 10 minutes on 2 cores)
    python bench/run.py --quick         # a smoke run at tiny sizes (seconds): the figures mean nothing
    python bench/run.py --only losses metrics --out /tmp/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

from utils.cli import make_parser, positive_int

MODULES = ["losses", "metrics", "scoring", "training", "memory", "extraction", "search", "ray_overhead"]
PACKAGES = ["torch", "ray", "transformers", "numpy", "h5py", "sentence-transformers"]
COLUMNS = ["what", "figure", "against", "ratio", "target", "met", "note"]


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds per module (a smoke run)")
    parser.add_argument(
        "--only", nargs="+", choices=MODULES, metavar="NAME", help=f"run only these modules (of {', '.join(MODULES)})"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch threads (default: one per core this process may use; 1 with --quick)",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md", help="the markdown file (default: BENCHMARKS.md)"
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads

import torch

from bench.common import Row, seconds
from utils.stores import atomic_path


def run_module(name: str, quick: bool) -> tuple[list[Row], float, bool]:
    """The rows of ``bench/<name>.py`` (each ``what`` prefixed with the module's name), its wall time and whether
    it ran; a module that is missing or raises gives one row saying so."""
    start = time.perf_counter()
    try:
        rows = importlib.import_module(f"bench.{name}").run(quick)
        ok = True
    except ModuleNotFoundError as error:
        if error.name != f"bench.{name}":  # the module exists but imports something missing
            rows, ok = [failure_row(name, error)], False
        else:
            rows, ok = [Row(what="not run", figure="-", note=f"bench/{name}.py does not exist yet")], False
    except Exception as error:  # noqa: BLE001 -- one module's failure is reported and the run goes on
        rows, ok = [failure_row(name, error)], False
    elapsed = time.perf_counter() - start
    return [Row(**{**row.__dict__, "what": f"{name}: {row.what}"}) for row in rows], elapsed, ok


def failure_row(name: str, error: BaseException) -> Row:
    """A row for a module that raised: the error and where it was raised."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    return Row(
        what="failed",
        figure="-",
        note=f"{type(error).__name__}: {error} ({Path(where.filename).name} line {where.lineno})".replace("\n", " "),
    )


def cell(text: str) -> str:
    """Text that stays in its markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def met_cell(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def machine_lines() -> list[str]:
    """CPU model, logical cores and this process's affinity, memory, GPU (or that there is none)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total_kb = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), 0)
    affinity = sorted(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "no GPU available: the GPU section is left out"
    return [
        f"- CPU: {models[0] if models else platform.processor() or 'unknown'}",
        f"- cores: {os.cpu_count()} logical, this process may use {len(affinity)} ({', '.join(map(str, affinity))}); "
        f"torch threads: {torch.get_num_threads()}, inter-op threads: {torch.get_num_interop_threads()}",
        f"- memory: {total_kb / 2**20:.1f} GiB" if total_kb else "- memory: unknown",
        f"- GPU: {gpu}",
    ]


def version_lines() -> list[str]:
    """Python and the libraries the figures depend on."""
    versions = [f"python {platform.python_version()}"]
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return ["- " + ", ".join(versions)]


def commit(out: Path) -> str:
    """The checked-out commit, with "+ local changes" when the tree differs from it (this output file aside)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    try:
        own = out.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        own = None
    changed = [line for line in status if line[3:].strip('"') not in (own, f"{own}.partial")]
    return head + (" + local changes" if changed else "")


def report(
    command: str, quick: bool, results: list[tuple[str, list[Row], float, bool]], wall_s: float, out: Path
) -> str:
    """BENCHMARKS.md's text."""
    lines = [
        "# Benchmarks",
        "",
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, `{command}`",
        "",
    ]
    if quick:
        lines += ["**A smoke run (`--quick`) at tiny sizes: the figures below mean nothing.**", ""]
    lines += ["## Machine", "", *machine_lines(), "", "## Versions", "", *version_lines(), f"- commit {commit(out)}"]
    lines += ["", "## Figures", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    rows = [row for _, module_rows, _, _ in results for row in module_rows]
    for row in rows:
        values = [row.what, row.figure, row.against, row.ratio, row.target, met_cell(row.met), row.note]
        lines.append("| " + " | ".join(cell(value) for value in values) + " |")
    missed = [row for row in rows if row.met is False]
    lines += ["", "## Targets missed", ""]
    lines += [f"- {row.what} ({row.target}): {row.note}" for row in missed] or ["None."]
    failed = [name for name, _, _, ok in results if not ok]
    if failed:
        lines += ["", "## Modules that did not run", "", *(f"- {name}" for name in failed)]
    lines += ["", "## Wall time", ""]
    lines += [f"- {name}: {seconds(elapsed)}" for name, _, elapsed, _ in results]
    lines += [f"- the whole run: {seconds(wall_s)}", ""]
    return "\n".join(lines)


def main() -> None:
    args = build_parser().parse_args()
    start = time.perf_counter()
    # one thread per core this process may use, the same for every module; no nested parallel regions. A smoke run
    # takes one: it runs beside other work (the tests' other worker), where each of its many tiny parallel ops
    # would wait for a thread that has no free core
    torch.set_num_threads(args.threads or (1 if args.quick else len(os.sched_getaffinity(0))))
    torch.set_num_interop_threads(1)
    results = []
    for name in args.only or MODULES:
        print(f"{name} ...", flush=True)
        rows, elapsed, ok = run_module(name, args.quick)
        results.append((name, rows, elapsed, ok))
        print(f"{name}: {len(rows)} row(s) in {seconds(elapsed)}{'' if ok else ', FAILED'}", flush=True)
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    text = report(command, args.quick, results, time.perf_counter() - start, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as partial:
        partial.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    sys.exit(0 if all(ok for *_, ok in results) else 1)


if __name__ == "__main__":
    main()
