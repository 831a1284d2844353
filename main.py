"""Launch a Ray Tune search over dual-encoder training runs.

Reads conf.yaml (or --config), applies dotted overrides such as ``param_conf.batch_size=64``,
samples ``ray_conf.search_space`` (random/grid or Optuna TPE), schedules the trials (FIFO,
ASHA or PBT, optionally a plateau stopper), retries crashed trials from their checkpoints and
selects on the validation metric. The experiment folder then holds ``best.json``, the
self-contained ``best/`` model, ``results.csv`` and ``search.png``. ``--resume`` continues an
interrupted experiment. A config with a ``distillation`` section and no teachers runs two experiments
(salsa's two stages): the search, then a search distilling from its best trials. Only this file talks
to Ray; the training loop is ``utils/training.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from utils.cli import DEFAULT_CONFIG, exit_on_input_error, location_arg, make_parser, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """The command line: config, cluster address, ``--resume`` and dotted overrides."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="experiment config (default: conf.yaml)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster, e.g. 'auto' (default: start a local Ray, or use RAY_ADDRESS)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="EXPERIMENT_DIR",
        help="continue an interrupted experiment (default: the newest run of the config's experiment, either "
        "stage of a two-stage config); it keeps its own saved config, so overrides are ignored; a two-stage run's "
        "first stage goes on to the second",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. param_conf.batch_size=64 optimizer.lr=0.0005"
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before Ray and torch load (seconds)

import pandas as pd
import ray
import torch
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TrialPlateauStopper
from transformers import AutoConfig

from models.pretrained import load_pretrained
from models.text_encoders import TEXT_ENCODERS
from models.weights import check_state_dict
from preprocessing.demo_dataset import DEMO_DIRS, prepare_demo
from preprocessing.tower_stores import (
    finish_audio_store,
    plan_audio_store,
    store_lock,
    write_audio_parts,
    write_text_store,
)
from utils.checkpoints import CHECKPOINT_FILE, build_model, export_model, load_trained_model, read_model_config
from utils.config import (
    SEARCH_SPACE_KINDS,
    STAGE1_SUFFIX,
    Config,
    RayConfig,
    SearchSpace,
    load_config,
    stage2_config,
    stage_configs,
    validate,
    with_overrides,
)
from utils.config_files import describe, flatten, is_uri
from utils.errors import ConfigError, InputError
from utils.experiments import BEST_FILE, latest_experiment_file, new_experiment_name
from utils.extractors import CaptionTokens, make_extractor
from utils.relevance import read_relevance, relevance_matrix
from utils.reporting import RESULTS_TABLE, SEARCH_PLOT, TrialHistory, as_epoch, plot_metric, results_table
from utils.runtime import resolve_device
from utils.storage import (
    as_location,
    check_storage,
    exists,
    file_time,
    join,
    mirror,
    parent,
    read_json_at,
    upload,
    write_json_at,
)
from utils.stores import (
    AUDIO_COLUMNS,
    TEXT_COLUMNS,
    audio_table,
    logmel_file,
    read_table,
    relevance_csv,
    text_embeds_file,
    text_table,
    write_csv,
    write_json,
)
from utils.teachers import check_teacher_dataset, ensure_teacher_store, local_file, select_teachers, store_checkpoints
from utils.tower_stores import check_inputs, extra_sources, is_pretrained, missing_stores
from utils.training import train

log = logging.getLogger("main")

BASE_CONFIG = "base_config.json"  # the raw config of an experiment, for --resume
NEXT_STAGE = "next_stage.json"  # in a two-stage run's first experiment: the second's raw config, and its folder
BEST_MODEL_DIR = "best"  # self-contained export of the best checkpoint
FAILURE_FILE = "failure.json"  # in a trial's folder: why it ended without retries (DETERMINISTIC_ERRORS)
# Errors that the same trial meets again on every retry (a diverged loss, unusable data or config, a batch that
# does not fit the device): the trial ends at once with its reason. Tune's FailureConfig retries every error alike,
# so the trainable ends such a trial itself; crashes (a killed worker, a lost node) keep their max_failures retries.
DETERMINISTIC_ERRORS = (FloatingPointError, InputError, torch.OutOfMemoryError)
# Tune adds its CSV, JSON and TensorBoard writers to every run unless told not to; main.py adds its own
# (make_run_config), so that Tune's TensorBoard hint, which names a folder without events, is not printed.
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
# CPU share of a data-parallel trial's own process, which only coordinates its Ray Train workers
# (Ray refuses an empty resource request).
COORDINATOR_CPU = 0.01


# ---------------------------------------------------------------------------------------------
# The run: parse, check, start or resume the experiment


def main() -> None:
    args = build_parser().parse_args()
    setup_logging()
    # Ray's TensorBoard logger renames every '@' metric ("R@1" -> "R_1") with one INFO line per key and epoch.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    with exit_on_input_error():
        config, raw = load_config(args.config, args.overrides)
        try:
            if args.resume:
                if args.overrides:
                    log.warning("--resume keeps the experiment's saved config: ignoring %s", " ".join(args.overrides))
                folder = None if args.resume == "latest" else location_arg(args.resume)
                names = [config.experiment]
                if config.distillation is not None and config.distillation.two_stage:
                    names.append(f"{config.experiment}{STAGE1_SUFFIX}")
                resume_experiment(folder, config.ray_conf.storage_path, names, args.address)
            else:
                prepare_demo_if_missing(config)
                if config.distillation is not None and config.distillation.two_stage:
                    check_two_stages(raw, joins_cluster(args.address))
                    run_two_stages(raw, args.address)
                else:
                    check_before_ray(config, joins_cluster(args.address))
                    run_experiment(config, raw, args.address)
        except ExperimentInterrupted as err:
            log.warning("%s", err)
            sys.exit(130)


def run_experiment(
    config: Config,
    raw: dict[str, Any],
    address: str | None = None,
    callbacks: list[tune.Callback] | None = None,
    name: str | None = None,
) -> Path:
    """Run a new Tuner, then write the experiment summary; returns the (local) folder that holds it.

    The raw config is saved as ``base_config.json`` in the experiment folder (or under its URI) first, so that
    ``--resume`` rebuilds exactly the same trials whatever ``conf.yaml`` says by then. ``name``: the folder's name
    (default: a new ``<experiment>_<time>``). A distilling config's teachers' store is written first.
    """
    ray_conf = config.ray_conf
    init_ray(ray_conf, address)
    check_resources(ray_conf, ray.cluster_resources())
    prepare_stores(config)
    if config.distillation is not None:
        prepare_teachers(config)
    name = name or new_experiment_name(config.experiment)
    write_json_at(raw, join(ray_conf.storage_path, name, BASE_CONFIG))
    log.info("TensorBoard: tensorboard --logdir %s", join(ray_conf.storage_path, name))
    tuner = tune.Tuner(
        make_trainable(raw, ray_conf),
        param_space=make_param_space(ray_conf),
        tune_config=make_tune_config(config),
        run_config=make_run_config(ray_conf, name, [*make_trackers(config, raw), *(callbacks or [])]),
    )
    return summarise(tuner.fit(), raw, ray_conf)


def run_two_stages(raw: dict[str, Any], address: str | None = None) -> Path:
    """salsa's two stages as two experiments (``utils.config.stage_configs``): the search without distillation,
    then the search distilling from its best trials; returns the second's (local) folder. The first experiment's
    folder holds the second's plan (``NEXT_STAGE``) from the start, so that ``--resume`` of it goes on to the
    second stage."""
    first, second = stage_configs(raw)
    config = validate(first)
    name = new_experiment_name(config.experiment)
    location = join(config.ray_conf.storage_path, name)
    write_json_at({"config": second, "experiment": None}, join(location, NEXT_STAGE))
    log.info("stage 1 of 2: %s", location)
    run_experiment(config, first, address, name=name)
    return run_second_stage(location, address)


def run_second_stage(first: str | Path, address: str | None = None) -> Path:
    """The second stage of the two-stage run whose first experiment is ``first`` (finished): resumed when it was
    started before far enough to be (Tune saved its state), else started. Returns its (local) folder."""
    plan = read_json_at(join(first, NEXT_STAGE))
    if plan["experiment"] is not None and tune.Tuner.can_restore(str(plan["experiment"])):
        log.info("stage 2 of 2 was started before: resuming %s", plan["experiment"])
        return resume_experiment(plan["experiment"], "", [], address)
    raw = stage2_config(plan["config"], str(first))
    config = validate(raw)
    name = new_experiment_name(config.experiment)
    location = join(config.ray_conf.storage_path, name)
    write_json_at(plan | {"experiment": str(location)}, join(first, NEXT_STAGE))
    log.info("stage 2 of 2: %s, distilling from the best %d trial(s) of %s", location, config.distillation.top_k, first)
    return run_experiment(config, raw, address, name=name)


def resume_experiment(
    path: str | Path | None, storage_path: str, experiments: list[str], address: str | None = None
) -> Path:
    """Continue an interrupted experiment (a folder or a URI): finished trials are kept, unfinished and errored
    ones continue from their latest checkpoints; the first stage of a two-stage run then goes on to the second.
    ``path`` defaults to the newest run of any of ``experiments`` under ``storage_path``."""
    if path is None:
        if is_uri(storage_path):
            check_storage(storage_path)
        found = [f for name in experiments if (f := latest_experiment_file(storage_path, BASE_CONFIG, name))]
        if not found:
            raise ConfigError(
                f"no run of experiment {' or '.join(map(repr, experiments))} to resume under {storage_path}"
            )
        path = parent(max(found, key=file_time))
    if is_uri(path):
        check_storage(str(path), "--resume")
    else:
        path = Path(path).resolve()
    if not exists(join(path, BASE_CONFIG)) or not tune.Tuner.can_restore(str(path)):
        raise ConfigError(f"{path} is not a resumable experiment folder of main.py")
    raw = read_json_at(join(path, BASE_CONFIG))
    ray_conf = validate(raw).ray_conf
    init_ray(ray_conf, address)
    log.info("resuming %s (TensorBoard: tensorboard --logdir %s)", path, path)
    tuner = tune.Tuner.restore(str(path), make_trainable(raw, ray_conf), resume_unfinished=True, resume_errored=True)
    folder = summarise(tuner.fit(), raw, ray_conf)
    return run_second_stage(path, address) if exists(join(path, NEXT_STAGE)) else folder


# ---------------------------------------------------------------------------------------------
# Before any trial starts: data, model, device and resources


def prepare_demo_if_missing(config: Config) -> None:
    """A first ``python main.py`` on a fresh clone: the embedded demo dataset (``conf.yaml``'s, under ``data/demo``,
    or the shared variant's under ``data/demo-shared``) is generated and preprocessed when its files are missing.
    Any other dataset is the user's to prepare."""
    data = config.data
    folder = data.dataset_dir.resolve()
    if folder not in DEMO_DIRS:
        return
    stores = (audio_table, text_table, logmel_file, text_embeds_file)
    if all(store(folder, split).is_file() for split in data.splits() for store in stores):
        return
    log.info("the demo dataset %s is not ready: generating and preprocessing it (about a minute on 2 cores)", folder)
    start = time.perf_counter()
    prepare_demo(config, variant=DEMO_DIRS[folder])
    log.info("demo dataset ready in %.0f s", time.perf_counter() - start)


def check_before_ray(config: Config, joins_cluster: bool, check_teachers: bool = True) -> bool:
    """Refuse, before Ray starts, a config whose trials could only fail or wait forever: missing or
    out-of-date preprocessed data, a pretrained model that cannot be loaded or built (a wrong weight file,
    a model id without internet), ``device: cuda`` without GPUs for the trials, or (on this machine) a
    trial bigger than the machine, a validation relevance table that names nothing of its split, or distillation
    teachers that are not there or do not fit the student (``check_teachers``). A cluster's size is checked once
    joined (``check_resources``); tower stores that do not exist yet are computed once Ray runs
    (``prepare_stores``), and so is the teachers' store (``prepare_teachers``). Returns whether every tower store
    the search reads exists already (the models were then built once, here)."""
    data, ray_conf = config.data, config.ray_conf
    if is_uri(ray_conf.storage_path):
        check_storage(ray_conf.storage_path)
    if not data.dataset_dir.is_dir():
        raise ConfigError(f"data.dataset_dir: {data.dataset_dir} does not exist or is not a folder")
    variants = store_variants(config)  # every architecture and store setting the search can choose
    for variant in variants:
        check_model_ids(variant)
        missing = missing_preprocessing(variant)
        if missing:
            raise ConfigError(
                f"{'; '.join(missing)}; run the preprocessing scripts first, with main.py's --config and overrides "
                "(see README)"
            )
        for _, source, split in training_reads(variant):
            check_inputs(source, split, missing_ok=True)  # tower stores still to be made: once Ray runs
    stores_ready = not any(missing_stores(variant, variant.data.splits()) for variant in variants)
    if stores_ready:
        build_variants(config)  # else once the stores are made (prepare_stores)
    if config.device == "cuda" and ray_conf.gpus_per_trial == 0:
        raise ConfigError(
            "device: 'cuda' needs ray_conf.gpus_per_trial > 0: Ray hides the GPUs from trials that reserve none "
            "(a fraction such as 0.5 shares a GPU), or use device: auto"
        )
    if not joins_cluster:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        check_resources(ray_conf, {"CPU": cpus, "GPU": torch.cuda.device_count()}, "this machine")
    if ray_conf.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("ray_conf.wandb: Weights & Biases logging needs the wandb package (pip install wandb)")
    if ray_conf.metric.startswith("val/relevance/") and not relevance_csv(data.dataset_dir, data.val_split).is_file():
        raise ConfigError(
            f"ray_conf.metric {ray_conf.metric} needs a relevance table of the validation split: "
            f"{relevance_csv(data.dataset_dir, data.val_split)} does not exist"
        )
    if relevance_csv(data.dataset_dir, data.val_split).is_file():  # what every validation will read: checked once
        check_relevance_table(data.dataset_dir, data.val_split)
    if config.distillation is not None and check_teachers and not config.distillation.two_stage:
        check_teachers_exist(config, stores_ready)
    return stores_ready


def check_relevance_table(dataset_dir: Path, split: str) -> None:
    """The split's relevance table reads and names clips and captions of the split, or a ``DatasetError``."""
    path = relevance_csv(dataset_dir, split)
    fnames = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)["fname"].tolist()
    captions = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)["raw_text"].tolist()
    relevance_matrix(read_relevance(path, dataset_dir, split), fnames, captions, str(path))


def check_teachers_exist(config: Config, stores_ready: bool) -> None:
    """A distilling config's teachers: each checkpoint is there and was trained on the student's dataset, and (with
    ``init_from_teacher``, once the towers' stores exist) every architecture the search can choose takes the best
    one's weights."""
    teachers = select_teachers(config.distillation)
    for teacher in teachers:
        if not exists(teacher.checkpoint):
            raise ConfigError(f"distillation: teacher {teacher.id}'s checkpoint {teacher.checkpoint} does not exist")
        check_teacher_dataset(teacher.id, read_model_config(local_file(teacher.checkpoint)), config)
    if config.distillation.init_from_teacher and stores_ready:
        best = load_trained_model(local_file(teachers[0].checkpoint), torch.device("cpu"))[0]
        check_init_from_teacher(config, {f"the best teacher {teachers[0].id}": best.state_dict()})


def check_init_from_teacher(config: Config, teachers: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every architecture the search can choose takes the weights of each of ``teachers`` (a label -> its state
    dict), or a ``ConfigError`` naming the searched values: the student starts from the best teacher's weights."""
    for chosen, variant in search_variants(config, ("model.", *STORE_KEYS))[0].items():
        student = build_model(variant, torch.device("cpu")).state_dict()
        for source, weights in teachers.items():
            try:
                check_state_dict(student, weights, source)
            except InputError as err:
                where = f"ray_conf.search_space: {chosen}: " if chosen else ""
                raise ConfigError(
                    f"distillation.init_from_teacher: {where}{err} (init_from_teacher: false trains from scratch)"
                ) from None


def check_two_stages(raw: dict[str, Any], joins_cluster: bool) -> None:
    """Both experiments of a two-stage config, before Ray starts: each as ``check_before_ray`` checks one (the
    second's teachers do not exist yet), and, when the student starts from the best teacher, every architecture
    of the second search takes the weights of every architecture of the first (any of them can be the best)."""
    first, second = stage_configs(raw)
    first_config = validate(first)
    stores_ready = check_before_ray(first_config, joins_cluster)
    second_config = validate(stage2_config(second, "the first stage's experiment"))
    try:
        stores_ready &= check_before_ray(second_config, joins_cluster, check_teachers=False)
    except ConfigError as err:
        raise ConfigError(f"distillation.stage2 gives a second stage that cannot run: {err}") from None
    if second_config.distillation.init_from_teacher and stores_ready:
        teachers = {
            f"a first-stage trial{f' with {chosen}' if chosen else ''}": build_model(
                v, torch.device("cpu")
            ).state_dict()
            for chosen, v in search_variants(first_config, ("model.", *STORE_KEYS))[0].items()
        }
        check_init_from_teacher(second_config, teachers)


def training_reads(config: Config) -> list[tuple[str, Config, str]]:
    """What a trial reads, each as ``(config key, config, split)``: ``data.dataset_dir``'s training and validation
    splits, then each ``data.extra_train`` source's split with its config (``utils.tower_stores.extra_sources``)."""
    data = config.data
    reads = [("data.dataset_dir", config, data.train_split), ("data.dataset_dir", config, data.val_split)]
    return reads + [(f"data.extra_train[{i}]", s, s.data.train_split) for i, s in enumerate(extra_sources(config))]


def missing_preprocessing(config: Config) -> list[str]:
    """One line per dataset a trial reads (``training_reads``) whose preprocessed files are missing: the files,
    then the commands that make them, in order. Tower stores are not among them: ``prepare_stores`` makes those."""
    reads: dict[tuple[str, Path], list[str]] = {}
    for key, source, split in training_reads(config):
        reads.setdefault((key, source.data.dataset_dir), []).append(split)
    steps = [("clotho_dataset.py", (audio_table, text_table))]
    if not is_pretrained(config.model.audio_enc):
        steps.append(("audio_logmel.py", (logmel_file,)))
    if not is_pretrained(config.model.text_enc):
        steps.append(("sbert_embeddings.py", (text_embeds_file,)))
    lines = []
    for (key, folder), splits in reads.items():
        files, commands = [], []
        for script, outputs in steps:
            paths = {split: [out(folder, split) for out in outputs] for split in splits}
            todo = [split for split in splits if not all(path.is_file() for path in paths[split])]
            if todo:
                files += [path.name for split in todo for path in paths[split] if not path.is_file()]
                commands.append(
                    f"python preprocessing/{script} --dataset-dir {shlex.quote(str(folder))} "
                    f"--splits {' '.join(map(shlex.quote, todo))}"
                )
        if files:
            lines.append(f"{key}: {folder} has no {', '.join(files)}: {' && '.join(commands)}")
    return lines


def check_model_ids(config: Config) -> None:
    """Every pretrained model the config names can be loaded: its config, and the tower's feature extractor or
    tokenizer, are read (from a local folder, the cache, or the hub), or one ``ConfigError`` names the key and
    the model id."""
    audio, text = config.model.audio_enc, config.model.text_enc
    for key, tower in (("model.audio_enc.model_id", audio), ("model.text_enc.model_id", text)):
        if is_pretrained(tower):
            # a Stable Diffusion text encoder's config.json is in its subfolder of the pipeline's repository
            subfolder = getattr(tower, "subfolder", None)
            load_pretrained(
                AutoConfig.from_pretrained,
                tower.model_id,
                key,
                trust_remote_code=tower.trust_remote_code,
                **({"subfolder": subfolder} if subfolder else {}),
            )
    if is_pretrained(audio):
        make_extractor(audio)
    if is_pretrained(text):
        tokens = CaptionTokens(text)
        if TEXT_ENCODERS.get(text.name).pads_to_max_length and tokens.max_length != text.max_length:
            # a sequence tower's targets have max_length positions: the tokenizer must give that many
            raise ConfigError(
                f"model.text_enc.max_length {text.max_length} is more than the {tokens.max_length} tokens that "
                f"{text.model_id!r}'s tokenizer takes"
            )
    if config.model.init_from is not None:
        load_pretrained(AutoConfig.from_pretrained, config.model.init_from, "model.init_from")


# Keys whose values change what a tower store holds, or where it is: a search over them needs one store per value.
STORE_KEYS = (
    "model.audio_enc",
    "model.text_enc",
    "model.pooling",  # a frozen tower keeps one mean frame per clip for mean pooling only
    "crops",
    "features.max_seconds",
    "text_embeddings",
    "data",
)


def search_variants(config: Config, keys: tuple[str, ...]) -> tuple[dict[str, Config], list[str]]:
    """The config, and one per combination of the ``choice``/``grid`` values searched under ``keys`` (deduplicated),
    each by what it sets (``"model.pooling='tap'"``, empty for the file's own); and the searched paths under
    ``keys`` that take a continuous range."""
    raw = config.model_dump(mode="json")
    discrete, continuous = {}, []
    for path, spec in config.ray_conf.search_space.items():
        # the pooling head changes a store by its name only (mean pooling or not); the other keys by any value
        pooling_setting = path.startswith("model.pooling.") and path != "model.pooling.name"
        if path.startswith(keys) and not (keys == STORE_KEYS and pooling_setting):
            ((kind, values),) = spec.items()
            if kind in ("choice", "grid"):
                discrete[path] = values
            else:
                continuous.append(f"ray_conf.search_space.{path}: {kind}")
    seen, variants = {json.dumps(raw, sort_keys=True)}, {"": config}
    for values in itertools.product(*discrete.values()):
        chosen = dict(zip(discrete, values))
        variant = validate(with_overrides(raw, chosen))
        if (dumped := json.dumps(variant.model_dump(mode="json"), sort_keys=True)) not in seen:
            seen.add(dumped)
            variants[" with ".join(f"{path}={describe(value)!r}" for path, value in chosen.items())] = variant
    return variants, continuous


def store_variants(config: Config) -> list[Config]:
    """The config, and one config per combination of the searched values of keys that change what the towers read
    (log-mels, caption embeddings, tower stores): a search across architectures needs each one's inputs. A
    continuous range over such a key is refused where a ``transformers`` tower reads stores computed once per
    value (use ``choice`` or ``grid``)."""
    variants, continuous = search_variants(config, STORE_KEYS)
    towers = [tower for v in variants.values() for tower in (v.model.audio_enc, v.model.text_enc)]
    if continuous and any(map(is_pretrained, towers)):
        raise ConfigError(
            f"{continuous[0]} cannot be searched with a transformers tower, whose stores are computed once per "
            "value; use choice or grid"
        )
    return list(variants.values())


def build_variants(config: Config) -> None:
    """Build the model of every architecture the search can choose (each combination of the ``choice``/``grid``
    values of ``model.*`` and of the keys that change the towers' inputs): heads that do not fit their towers, a
    missing weight file or a CLAP checkpoint that does not match fail once, here, naming the searched values,
    not in every trial. The towers' stores must exist (a frozen tower's width is its store's)."""
    for chosen, variant in search_variants(config, ("model.", *STORE_KEYS))[0].items():
        try:
            build_model(variant, torch.device("cpu"))
        except InputError as err:
            if not chosen:
                raise
            raise type(err)(f"ray_conf.search_space: {chosen} gives a model that cannot be built: {err}") from None


def prepare_stores(config: Config) -> None:
    """Compute the tower stores that the config (and the values its search can take) read but that do not exist
    yet, as Ray tasks with a trial's resources (so on a cluster they run where the GPUs are), then check them."""
    ray_conf = config.ray_conf
    work = {}  # one task per store, though several searched values may share it
    for variant in store_variants(config):
        for split, side, path in missing_stores(variant, variant.data.splits()):
            work.setdefault(path, (variant, split, side))
        for source in extra_sources(variant):  # each data.extra_train dataset's training split, in its own folder
            for split, side, path in missing_stores(source, [source.data.train_split]):
                work.setdefault(path, (source, split, side))
    if work:
        with ExitStack() as locks:  # each store's split_lock, held here while the Ray tasks write it
            for path, (_, split, _) in work.items():
                locks.enter_context(store_lock(path, split))
            # one task per part of an audio store (the clips of a split spread over the cluster's GPUs), one per
            # caption store; the parts are merged here, on the driver, once all are done
            task = ray.remote(num_cpus=ray_conf.cpus_per_trial, num_gpus=ray_conf.gpus_per_trial)(store_task)
            plans, futures = [], []
            for variant, split, side in work.values():
                dumped = variant.model_dump(mode="json")
                if side == "audio":
                    plans.append(plan_audio_store(variant, split))
                    futures += [task.remote(dumped, split, side, part) for part in plans[-1].todo()]
                else:
                    futures.append(task.remote(dumped, split, side))
            log.info(
                "computing %d tower store(s) once, in %d Ray tasks: %s",
                len(work),
                len(futures),
                ", ".join(p.name for p in work),
            )
            try:
                ray.get(futures)
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, InputError):  # a data or config problem: its one line, not a traceback
                    raise err.cause from None
                raise
            for plan in plans:
                finish_audio_store(plan)
    for variant in store_variants(config):
        for _, source, split in training_reads(variant):
            check_inputs(source, split)
    build_variants(config)


def prepare_teachers(config: Config) -> None:
    """Stage 2: the teachers' store (``utils.teachers``) written once, in a Ray task with a trial's resources,
    unless it is up to date; then, when the student starts from the best teacher, every architecture the search
    can choose is checked to take its weights."""
    ray_conf = config.ray_conf
    task = ray.remote(num_cpus=ray_conf.cpus_per_trial, num_gpus=ray_conf.gpus_per_trial)(teacher_task)
    try:
        location = ray.get(task.remote(config.model_dump(mode="json")))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):
            raise err.cause from None
        raise
    if config.distillation.init_from_teacher:  # also where the stores were still to be made before Ray started
        best = store_checkpoints(local_file(location))[0]
        weights = load_trained_model(local_file(best), torch.device("cpu"))[0].state_dict()
        check_init_from_teacher(config, {f"the best teacher {best}": weights})


def teacher_task(config: dict[str, Any]) -> str:
    """In a Ray worker: the teachers' store of ``config``, written unless up to date; returns its location."""
    setup_logging()
    resolved = validate(config)
    torch.set_num_threads(max(1, int(resolved.ray_conf.cpus_per_trial)))
    return str(ensure_teacher_store(resolved, resolve_device(resolved.device)))


def store_task(config: dict[str, Any], split: str, side: str, part: int | None = None) -> None:
    """In a Ray worker: one part of a split's audio store, or its caption store."""
    setup_logging()
    resolved = validate(config)
    torch.set_num_threads(max(1, int(resolved.ray_conf.cpus_per_trial)))
    device = resolve_device(resolved.device)
    if side == "audio":
        write_audio_parts(resolved, split, device, [part])
    else:
        write_text_store(resolved, split, device)


def check_resources(ray_conf: RayConfig, have: dict[str, float], where: str = "the Ray cluster") -> None:
    """Refuse a trial that needs more CPUs or GPUs than ``have`` (all of ``where``): it would wait forever."""
    workers = ray_conf.workers_per_trial
    need = {
        "CPU": workers * ray_conf.cpus_per_trial + (COORDINATOR_CPU if workers > 1 else 0),
        "GPU": workers * ray_conf.gpus_per_trial,
    }
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            coordinator = f" + {COORDINATOR_CPU} for the coordinator" if workers > 1 and kind == "CPU" else ""
            raise ConfigError(
                f"ray_conf: one trial needs {amount:g} {kind} ({workers} worker(s) x cpus/gpus_per_trial{coordinator}) "
                f"but {where} has {have.get(kind, 0):g}"
            )


def init_ray(ray_conf: RayConfig, address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray with its dashboard on
    ``dashboard_host``."""
    if ray.is_initialized():
        return
    if joins_cluster(address):
        try:
            context = ray.init(address=address)
        except ConnectionError as err:  # Ray has retried for about 20 s by then
            raise ConfigError(
                f"cannot join the Ray cluster at {address or os.environ['RAY_ADDRESS']}: {err}. A head started with "
                "RAY_AUTH_MODE=token refuses clients without its token: run with RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN_PATH naming a file that holds what `ray get-auth-token` prints on the head (or "
                "RAY_AUTH_TOKEN set to it)"
            ) from None
    else:
        if ray_conf.include_dashboard and not is_loopback(ray_conf.dashboard_host):
            log.warning(
                "the Ray dashboard and job API listen on %s without authentication: anyone who reaches that address "
                "can run code here. Prefer 127.0.0.1 and an SSH tunnel (README, 'Running on a cluster')",
                ray_conf.dashboard_host,
            )
        context = ray.init(include_dashboard=ray_conf.include_dashboard, dashboard_host=ray_conf.dashboard_host)
    if context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def joins_cluster(address: str | None) -> bool:
    """Whether ``main.py`` joins a running cluster (``--address`` or ``RAY_ADDRESS``) rather than starting Ray here."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


# ---------------------------------------------------------------------------------------------
# The Tuner's pieces, built from the config


def search_space_to_tune(search_space: SearchSpace) -> dict[str, Any]:
    """``{"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}`` -> Ray Tune domains under the same flat keys."""
    space = {}
    for path, spec in search_space.items():
        ((kind, args),) = spec.items()
        kind_spec = SEARCH_SPACE_KINDS[kind]
        domain = getattr(tune, kind_spec.tune_function)
        # value lists (choice, grid) are one argument; bounds are separate arguments
        space[path] = domain(args) if kind_spec.n_numbers is None else domain(*args)
    return space


def make_param_space(ray_conf: RayConfig) -> dict[str, Any]:
    """The searched values under their dotted config paths; under PBT every mutated value also needs a start."""
    param_space = search_space_to_tune(ray_conf.search_space)
    if ray_conf.scheduler.name == "PBT":
        for path, domain in search_space_to_tune(ray_conf.scheduler.hyperparam_mutations).items():
            param_space.setdefault(path, domain)
    return param_space


def make_scheduler(ray_conf: RayConfig, num_epochs: int) -> tune.schedulers.TrialScheduler:
    """FIFO, ASHA or PBT from ``ray_conf.scheduler``; the time unit is the epoch (``epoch`` in every report,
    fractional for the reports within an epoch that ``param_conf.val_every_steps`` adds)."""
    scheduler_conf = ray_conf.scheduler
    if scheduler_conf.name == "ASHA":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=num_epochs,
            grace_period=scheduler_conf.grace_period,
            reduction_factor=scheduler_conf.reduction_factor,
            brackets=scheduler_conf.brackets,
        )
    if scheduler_conf.name == "PBT":
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=scheduler_conf.perturbation_interval,
            burn_in_period=scheduler_conf.burn_in_period,
            quantile_fraction=scheduler_conf.quantile_fraction,
            resample_probability=scheduler_conf.resample_probability,
            synch=scheduler_conf.synch,
            hyperparam_mutations=search_space_to_tune(scheduler_conf.hyperparam_mutations),
        )
    return FIFOScheduler()


def make_tune_config(config: Config) -> tune.TuneConfig:
    """Selection metric, sample count, concurrency, search algorithm and trial scheduler."""
    ray_conf = config.ray_conf
    return tune.TuneConfig(
        metric=ray_conf.metric,
        mode=ray_conf.mode,
        num_samples=ray_conf.num_samples,
        max_concurrent_trials=ray_conf.max_concurrent_trials,
        reuse_actors=ray_conf.reuse_actors,
        search_alg=OptunaSearch(seed=config.seed) if ray_conf.search_alg == "optuna" else None,
        scheduler=make_scheduler(ray_conf, config.param_conf.num_epochs),
    )


def make_run_config(ray_conf: RayConfig, name: str, callbacks: list[tune.Callback] | None) -> tune.RunConfig:
    """Where the experiment is stored, when trials stop early, how often they are retried, which checkpoints stay."""
    plateau = ray_conf.plateau_stopper
    stopper = None
    if plateau is not None:
        stopper = TrialPlateauStopper(
            metric=ray_conf.metric,
            mode=ray_conf.mode,
            std=plateau.std,
            num_results=plateau.num_results,
            grace_period=plateau.grace_period,
        )
    return tune.RunConfig(
        name=name,
        storage_path=ray_conf.storage_path,
        verbose=ray_conf.verbose,
        callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TensorBoardEvents(), *(callbacks or [])],
        stop=stopper,
        failure_config=tune.FailureConfig(max_failures=ray_conf.max_failures),
        sync_config=tune.SyncConfig(sync_period=ray_conf.sync_period),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=ray_conf.num_to_keep,
            checkpoint_score_attribute=ray_conf.metric,
            checkpoint_score_order=ray_conf.mode,
        ),
    )


class TensorBoardEvents(tune.Callback):
    """Tune's TensorBoard writer (an events file in each trial's folder) under a type of our own.

    For its own ``TBXLoggerCallback`` Tune prints ``tensorboard --logdir <driver staging folder>``,
    a folder that holds no events; ``run_experiment`` logs the experiment folder instead.
    """

    def __init__(self) -> None:
        self.writer = TBXLoggerCallback()

    def on_trial_start(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_start(*args, **kwargs)

    def on_trial_restore(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_restore(*args, **kwargs)

    def on_trial_save(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_save(*args, **kwargs)

    def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_result(*args, **kwargs)

    def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_complete(*args, **kwargs)

    def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
        self.writer.on_trial_error(*args, **kwargs)


def trial_config(raw: dict[str, Any], trial_params: dict[str, Any]) -> dict[str, Any]:
    """A trial's whole resolved config, flattened to dotted keys (what the trackers log as its parameters)."""
    return flatten(validate(with_overrides(raw, trial_params)).model_dump(mode="json"))


def make_trackers(config: Config, raw: dict[str, Any]) -> list[tune.Callback]:
    """The experiment trackers that ``ray_conf.mlflow`` and ``ray_conf.wandb`` switch on, besides TensorBoard:
    Tune's own logger callbacks, each trial's whole resolved config as the run's parameters (Tune's log only the
    sampled values). Their modules load only when asked for (MLflow's import alone takes a second)."""
    ray_conf, trackers = config.ray_conf, []
    if ray_conf.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class MLflowTrials(MLflowLoggerCallback):
            def log_trial_start(self, trial: Any) -> None:
                super().log_trial_start(trial)  # logs the sampled values as Tune drew them (0 for a float's 0.0)
                # MLflow refuses a parameter logged twice with another spelling: the rest of the config only
                params = {k: v for k, v in trial_config(raw, trial.config).items() if k not in trial.config}
                self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

            def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
                # MLflow refuses "@" in names (val/t2a_mAP@10 -> val/t2a_mAP_at_10); the result's "config" entry
                # repeats the sampled values, already parameters
                renamed = {k.replace("@", "_at_"): v for k, v in result.items() if k != "config"}
                super().log_trial_result(iteration, trial, renamed)

        uri = ray_conf.mlflow.tracking_uri or mlflow_file_store(ray_conf.storage_path)
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        log.info("MLflow: mlflow ui --backend-store-uri %s", uri)
        trackers.append(
            MLflowTrials(
                tracking_uri=uri,
                experiment_name=ray_conf.mlflow.experiment_name or config.experiment,
                tags=dict(ray_conf.mlflow.tags),
                save_artifact=ray_conf.mlflow.save_artifact,
            )
        )
    if ray_conf.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        class WandbTrials(WandbLoggerCallback):
            def log_trial_start(self, trial: Any) -> None:
                # Tune builds wandb.init's arguments from the sampled values, then applies self.kwargs over them:
                # the resolved config goes in there, per trial (the driver starts trials one at a time)
                self.kwargs["config"] = trial_config(raw, trial.config)
                super().log_trial_start(trial)

        wandb = ray_conf.wandb
        if wandb.mode == "offline":  # Tune asks for an API key unless the environment says offline
            os.environ["WANDB_MODE"] = "offline"
        trackers.append(
            WandbTrials(
                project=wandb.project or config.experiment,
                group=wandb.group,
                api_key_file=wandb.api_key_file,
                entity=wandb.entity,
                mode=wandb.mode,
            )
        )
    return trackers


def mlflow_file_store(storage_path: str) -> str:
    """The default MLflow tracking URI: a file store beside the experiments, ``<storage_path>/mlruns``."""
    return (Path(storage_path).resolve() / "mlruns").as_uri()


def make_trainable(raw: dict[str, Any], ray_conf: RayConfig) -> Any:
    """The trial function with the base config attached and the per-trial resources.

    A data-parallel trial only coordinates: its Ray Train workers ask for the CPUs and GPUs.
    """
    if ray_conf.workers_per_trial > 1:
        resources = {"cpu": COORDINATOR_CPU, "gpu": 0}
    else:
        resources = {"cpu": ray_conf.cpus_per_trial, "gpu": ray_conf.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(train_trial, base_config=raw), resources)


# ---------------------------------------------------------------------------------------------
# The trainables: one trial in one process, or one trial over data-parallel Ray Train workers


def train_trial(trial_params: dict[str, Any], base_config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one training run with the trial's sampled values applied."""
    config = validate(with_overrides(base_config, trial_params))
    context = tune.get_context()
    # in the trial's folder in storage (its local folder has the same name): the record of a deterministic failure
    trial_folder = Path(context.get_trial_dir()).name
    failure_file = str(join(config.ray_conf.storage_path, context.get_experiment_name(), trial_folder, FAILURE_FILE))
    try:
        if config.ray_conf.workers_per_trial > 1:
            train_data_parallel(config, failure_file)
        else:
            run_training(config, tune.get_checkpoint(), tune.report, tune.Checkpoint, failure_file)
    finally:  # with ray_conf.reuse_actors the next trial runs in this process: it gets this one's memory back
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial; Ray Train has set up the process group."""
    rank_zero = ray.train.get_context().get_world_rank() == 0
    run_training(
        validate(loop_config["config"]),
        ray.train.get_checkpoint(),
        ray.train.report,
        ray.train.Checkpoint,
        loop_config["failure_file"] if rank_zero else None,
    )


def run_training(
    config: Config, restored: Any, report: Callable[..., None], checkpoint_type: type, failure_file: str | None
) -> None:
    """What both trainables do: train from the ``restored`` checkpoint (if any) and ``report`` each
    epoch's metrics with its checkpoint folder wrapped as ``checkpoint_type`` (Tune's or Ray Train's).

    A ``DETERMINISTIC_ERRORS`` error ends the training here: its reason goes to ``failure_file`` (when given) and
    the trial returns instead of raising, so that Tune does not run it again to the same end."""
    torch.set_num_threads(max(1, int(config.ray_conf.cpus_per_trial)))
    resume_from = Path(restored.to_directory()) / CHECKPOINT_FILE if restored is not None else None

    def report_epoch(metrics: dict[str, float], folder: Path | None) -> None:
        # Every data-parallel worker reports each epoch (the call is a barrier); only rank 0 has a checkpoint.
        report(metrics, checkpoint=checkpoint_type.from_directory(str(folder)) if folder else None)

    try:
        train(config, report_epoch, resume_from=resume_from)
    except DETERMINISTIC_ERRORS as err:
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        log.error("the trial ends without retries (a retry would fail the same way): %s", reason)
        if failure_file is not None:
            write_json_at({"reason": reason}, failure_file)


def train_data_parallel(config: Config, failure_file: str) -> None:
    """Run the trial as a Ray Train ``TorchTrainer`` over ``workers_per_trial`` workers.

    Ray Train keeps this trial's checkpoints (under ``<experiment>/<trial id>_data_parallel``)
    and its callback forwards rank 0's metrics, with the checkpoint path, to Tune. A worker that
    dies (a killed process, a lost node) restarts the worker group from that latest checkpoint,
    up to ``max_failures`` times; a retried trial reuses the same run name, so Ray Train resumes
    it from its latest checkpoint as well.
    """
    ray_conf = config.ray_conf
    context = tune.get_context()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "failure_file": failure_file},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_conf.workers_per_trial,
            use_gpu=ray_conf.gpus_per_trial > 0,
            resources_per_worker={"CPU": ray_conf.cpus_per_trial, "GPU": ray_conf.gpus_per_trial},
        ),
        run_config=ray.train.RunConfig(
            name=f"{context.get_trial_id()}_data_parallel",
            storage_path=str(join(ray_conf.storage_path, context.get_experiment_name())),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ray_conf.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=ray_conf.num_to_keep,
                checkpoint_score_attribute=ray_conf.metric,
                checkpoint_score_order=ray_conf.mode,
            ),
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# The summary: check that every trial ended, pick the best, export it, write the table and plot


class ExperimentInterrupted(RuntimeError):
    """Tuning stopped (Ctrl-C, lost driver) before every trial finished."""


def summarise(results: tune.ResultGrid, raw: dict[str, Any], ray_conf: RayConfig) -> Path:
    """Write ``best.json``, the ``best/`` model export, ``results.csv`` and ``search.png`` into the experiment
    folder; returns it. With cloud storage they are written into its local mirror (``utils.storage.mirror``),
    then uploaded beside the trials, ``best.json`` last: a reader that finds it finds the rest."""
    location = join(ray_conf.storage_path, Path(results.experiment_path).name)
    check_all_finished(location, planned_trials(ray_conf))
    trials = trial_histories(results, raw, location)
    best, checkpoint, metrics = pick_best(results, ray_conf)
    experiment = mirror(location) if is_uri(location) else Path(location)
    export_best(checkpoint, experiment / BEST_MODEL_DIR)
    summary = {
        "trial_id": metrics["trial_id"],
        "model": str(join(location, BEST_MODEL_DIR)),
        "checkpoint": str(join(as_location(checkpoint.path, ray_conf.storage_path), CHECKPOINT_FILE)),
        "metric": ray_conf.metric,
        "mode": ray_conf.mode,
        "value": float(metrics[ray_conf.metric]),
        "epoch": as_epoch(metrics["epoch"]),
        "trial_params": dict(best.config),
        "config": validate(with_overrides(raw, best.config)).model_dump(mode="json"),
    }
    write_json(summary, experiment / BEST_FILE)
    write_results(trials, ray_conf, experiment)
    if is_uri(location):
        for name in (BEST_MODEL_DIR, RESULTS_TABLE, SEARCH_PLOT, BEST_FILE):
            upload(experiment / name, join(location, name))
    log.info(
        "best trial %s: %s = %.4f at epoch %g with %s",
        summary["trial_id"],
        ray_conf.metric,
        summary["value"],
        summary["epoch"],
        summary["trial_params"],
    )
    log.info("wrote %s, %s/, %s and %s in %s", BEST_FILE, BEST_MODEL_DIR, RESULTS_TABLE, SEARCH_PLOT, location)
    return experiment


def planned_trials(ray_conf: RayConfig) -> int:
    """How many trials the search runs: ``num_samples`` per combination of the ``grid`` values (Tune's
    variant generator; a search without grids, Optuna's too, runs ``num_samples``)."""
    grids = [len(spec["grid"]) for spec in ray_conf.search_space.values() if "grid" in spec]
    return ray_conf.num_samples * math.prod(grids)


def check_all_finished(experiment: str | Path, trials: int) -> None:
    """Raise ``ExperimentInterrupted`` with the resume command unless all ``trials`` of the experiment (a folder or
    URI) ended, finished or failed.

    After Ctrl-C, Tune marks the trials it cut short as terminated in memory; the experiment
    state it saved on the way out still says which ones were pending or running. Trials that Tune had not
    created yet are not in it at all (the variant generator makes them as slots free up), so the ended ones are
    counted against the plan, not against the saved trials.
    """
    saved = tune.ExperimentAnalysis(str(experiment)).trials
    unfinished = trials - sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)
    if unfinished > 0:
        raise ExperimentInterrupted(
            f"{unfinished} of {trials} trials did not finish; continue with: python main.py --resume {experiment}"
        )


def trial_histories(results: tune.ResultGrid, raw: dict[str, Any], experiment: str | Path) -> list[TrialHistory]:
    """Per-trial parameters, status, per-epoch metrics, best kept checkpoint and, for a failed trial, its error (also
    logged).

    The status is ``ERROR`` (failed: Tune's retries were spent, or a deterministic error recorded in the trial's
    ``failure.json`` ended it at once), ``STOPPED`` (ended before its last epoch by the scheduler or the plateau
    stopper) or ``TERMINATED`` (trained every epoch).
    """
    trials, ray_conf = [], validate(raw).ray_conf
    for result in results:
        params = dict(result.config or {})
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        planned = validate(with_overrides(raw, params)).param_conf.num_epochs  # num_epochs may be searched
        failure_file = join(experiment, Path(result.path).name, FAILURE_FILE)
        error = None
        if result.error is not None:
            error = str(result.error).strip().splitlines()[-1]
        elif exists(failure_file):
            error = read_json_at(failure_file)["reason"]
        if error is not None:
            log.error("trial %s failed: %s", Path(result.path).name, error)
            status = "ERROR"
        elif "epoch" in history and len(history) and history["epoch"].max() < planned:
            status = "STOPPED"
        else:
            status = "TERMINATED"
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        kept = best_checkpoint(result, ray_conf)
        checkpoint = None
        if kept:  # relative to the experiment's folder (a data-parallel trial's may lie elsewhere: then in full)
            checkpoint = str(join(as_location(kept[0].path, ray_conf.storage_path), CHECKPOINT_FILE))
            inside = f"{str(experiment).rstrip('/')}/"
            checkpoint = checkpoint[len(inside) :] if checkpoint.startswith(inside) else checkpoint
        trials.append(TrialHistory(trial_id, params, status, history, error, checkpoint))
    return trials


def pick_best(results: tune.ResultGrid, ray_conf: RayConfig) -> tuple[tune.Result, tune.Checkpoint, dict[str, Any]]:
    """The best trial over all its epochs, its best kept checkpoint and the metrics saved with that checkpoint."""
    best = results.get_best_result(ray_conf.metric, ray_conf.mode, scope="all")
    kept = best_checkpoint(best, ray_conf)
    if kept is None:
        raise RuntimeError("no trial kept a checkpoint; see the errors above")
    return best, *kept


def best_checkpoint(result: tune.Result, ray_conf: RayConfig) -> tuple[tune.Checkpoint, dict[str, Any]] | None:
    """A trial's best kept checkpoint by the selection metric, with the metrics saved with it; None if it kept none.

    Tune keeps the checkpoints of ordinary trials; a data-parallel trial's checkpoints are
    kept by Ray Train, and Tune only sees their paths in the ``checkpoint_path`` metric.
    """
    pick = max if ray_conf.mode == "max" else min
    if result.best_checkpoints:
        return pick(result.best_checkpoints, key=lambda kept: kept[1][ray_conf.metric])
    history = result.metrics_dataframe
    if history is not None and CHECKPOINT_PATH_KEY in history:
        # Ray Train's paths carry no scheme on a cloud filesystem: as locations under storage_path
        paths = history[CHECKPOINT_PATH_KEY].map(
            lambda p: as_location(p, ray_conf.storage_path) if isinstance(p, str) else None
        )
        kept = history[paths.map(lambda p: p is not None and exists(join(p, CHECKPOINT_FILE)))]
        if len(kept):
            row = kept.loc[kept[ray_conf.metric].idxmax() if ray_conf.mode == "max" else kept[ray_conf.metric].idxmin()]
            return tune.Checkpoint(paths[row.name]), row.to_dict()
    return None


def export_best(checkpoint: tune.Checkpoint, folder: Path) -> Path:
    """The self-contained export (safetensors, config, metrics) of ``checkpoint`` in ``folder``."""
    with checkpoint.as_directory() as local:  # downloads it first when storage is remote
        return export_model(Path(local) / CHECKPOINT_FILE, folder)


def write_results(trials: list[TrialHistory], ray_conf: RayConfig, experiment: Path) -> None:
    """``results.csv`` (one row per trial, best first) and ``search.png`` (the metric per epoch)."""
    write_csv(results_table(trials, ray_conf.metric, ray_conf.mode), experiment / RESULTS_TABLE)
    plot_metric(trials, ray_conf.metric, experiment / SEARCH_PLOT)


if __name__ == "__main__":
    main()
