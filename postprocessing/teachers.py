"""Store the teachers of salsa's stage 2 once: embed every clip and caption of the training split with each of the
best trials of a finished experiment (or with named checkpoints) and write them to one HDF5 file, keyed by the
teachers' ids (utils/teachers.py). main.py does this itself before a distilling search; this command does it on
its own, for example on a GPU machine before the search runs elsewhere. It reads the config's distillation
section, which the options below set or override, and writes nothing when the store holds these teachers for
this split already (--overwrite: write it anyway). Also runs as ``python -m postprocessing.teachers``.

  python postprocessing/teachers.py --experiment runs/demo-audio-retrieval_20261201-101500 --top-k 3
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import DEFAULT_CONFIG, exit_on_input_error, location_arg, make_parser, positive_int, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="the student's config, its data (default: conf.yaml)"
    )
    parser.add_argument(
        "--experiment", type=location_arg, help="a finished experiment whose best trials teach (distillation.teachers)"
    )
    parser.add_argument("--top-k", type=positive_int, help="how many of its best trials (distillation.top_k)")
    parser.add_argument(
        "--checkpoint",
        type=location_arg,
        action="append",
        help="a teacher checkpoint or model export instead; repeat for several (distillation.checkpoints)",
    )
    parser.add_argument(
        "--store", type=location_arg, help="the store's file (distillation.store; default: in the experiment)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="where the teachers run (default: the config's device)"
    )
    parser.add_argument("--overwrite", action="store_true", help="write the store even if it is up to date")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides of the config, e.g. data.dataset_dir=data/clotho"
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)


from utils.config import Config, validate, with_overrides
from utils.config_files import is_uri, load_raw
from utils.runtime import resolve_device
from utils.teachers import ensure_teacher_store, select_teachers

log = logging.getLogger("teachers")


def absolute(location: str | Path | None) -> str | None:
    """A location given on the command line, as the config takes it: a URI as it is, a path made absolute."""
    if location is None:
        return None
    return location if is_uri(location) else str(Path(location).resolve())


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    setup_logging()  # the teachers embed under torch.no_grad (write_teacher_store)
    with exit_on_input_error():
        raw = load_raw(args.config, args.overrides, Config)
        settings = dict(raw.get("distillation") or {})
        settings.pop("stage2", None)  # a two-stage config's second-stage overrides: not this command's business
        chosen = {  # paths given here are the working directory's, not the config file's
            "teachers": absolute(args.experiment),
            "top_k": args.top_k,
            "checkpoints": [absolute(c) for c in args.checkpoint] if args.checkpoint else None,
            "store": absolute(args.store),
        }
        settings |= {key: value for key, value in chosen.items() if value is not None}
        if args.checkpoint:  # the teachers come from one place: the one given here wins
            settings.pop("teachers", None)
        elif args.experiment is not None:
            settings.pop("checkpoints", None)
        if not settings.get("teachers") and not settings.get("checkpoints"):
            parser.error("give --experiment or --checkpoint (or a config whose distillation section names teachers)")
        config = validate(with_overrides(raw, {"distillation": settings}))
        device = resolve_device(args.device or config.device)
        location = ensure_teacher_store(config, device, args.overwrite)
        teachers = ", ".join(t.id for t in select_teachers(config.distillation))
        print(f"teachers' store {location}: {teachers}")


if __name__ == "__main__":
    main()
