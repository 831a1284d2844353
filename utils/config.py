"""Typed experiment configuration: ``conf.yaml`` + dotted overrides -> validated ``Config``.

Every section forbids unknown keys, so a typo fails at load time with its dotted path,
whether it comes from the YAML file, the command line or a Ray Tune search space. The
sections of components (encoders, losses, features, text embeddings) are those components'
own ``Config`` classes: each default and constraint is written once, beside the code that
uses it. A key without a default (``embed_dim``, ``num_epochs``, ...) is the experiment's
choice, and ``conf.yaml`` is where it is made.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from models.dual_encoder import DualEncoderModel
from models.losses import LOSSES
from models.registry import StrictModel
from utils.audio import FeatureConfig
from utils.errors import ConfigError
from utils.text import TextEmbeddingConfig


class SearchKind(NamedTuple):
    """One kind of ``ray_conf.search_space`` spec: the Ray Tune function it becomes and how many
    numbers it takes (``None``: a list of values)."""

    tune_function: str
    n_numbers: int | None


# The one list of search-space kinds: validated here, turned into Ray Tune domains by main.py.
SEARCH_SPACE_KINDS = {
    "choice": SearchKind("choice", None),
    "grid": SearchKind("grid_search", None),
    "uniform": SearchKind("uniform", 2),
    "loguniform": SearchKind("loguniform", 2),
    "randint": SearchKind("randint", 2),
    "quniform": SearchKind("quniform", 3),
}


class DataConfig(StrictModel):
    """The ``data`` section: a Clotho-layout dataset folder and its split names."""

    dataset_dir: Path
    train_split: str = "development"
    val_split: str = "validation"  # trials are selected on this split
    eval_split: str = "evaluation"  # only post-processing reads it


class OptimizerConfig(StrictModel):
    """The ``optimizer`` section: a ``torch.optim`` optimizer over the trainable parameters."""

    name: Literal["Adam", "AdamW"] = "Adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0


class LRSchedulerConfig(StrictModel):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` stepped on the validation loss each epoch
    (the DCASE 2023 baseline's settings)."""

    name: Literal["ReduceLROnPlateau"] = "ReduceLROnPlateau"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: NonNegativeInt = 5
    threshold: NonNegativeFloat = 0.005
    threshold_mode: Literal["rel", "abs"] = "abs"
    min_lr: NonNegativeFloat = 1e-6


class ParamConfig(StrictModel):
    """Per-trial training parameters (``param_conf`` in the DCASE baseline)."""

    num_epochs: PositiveInt  # no default: how long to train is each experiment's choice
    batch_size: int = Field(32, gt=1)  # InfoNCE needs at least one negative
    num_workers: NonNegativeInt = 0


SearchSpace = dict[str, dict[str, list[Any]]]  # dotted config path -> {kind: arguments}


class FIFOSchedulerConfig(StrictModel):
    """Run every trial to its last epoch."""

    name: Literal["FIFO"] = "FIFO"


class ASHASchedulerConfig(StrictModel):
    """Asynchronous successive halving: stop trials that trail their peers at epoch milestones."""

    name: Literal["ASHA"] = "ASHA"
    grace_period: PositiveInt = 1  # epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)
    brackets: PositiveInt = 1


class PBTSchedulerConfig(StrictModel):
    """Population based training: weak trials copy a strong trial's checkpoint and perturb its values."""

    name: Literal["PBT"] = "PBT"
    perturbation_interval: PositiveInt = 2  # epochs between exploit/explore steps
    burn_in_period: NonNegativeInt = 0
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    synch: bool = False  # wait for the whole population at each perturbation (reproducible, slower)
    hyperparam_mutations: SearchSpace = Field(min_length=1)


TrialSchedulerConfig = Annotated[
    Union[FIFOSchedulerConfig, ASHASchedulerConfig, PBTSchedulerConfig],  # noqa: UP007 (pydantic discriminated union)
    Field(discriminator="name"),
]


class PlateauStopperConfig(StrictModel):
    """Stop a trial once the selection metric's last ``num_results`` values vary by less than ``std``."""

    std: PositiveFloat = 0.005
    num_results: int = Field(3, ge=2)
    grace_period: PositiveInt = 3


class RayConfig(StrictModel):
    """How Ray Tune runs the trials; only ``main.py`` reads this section."""

    storage_path: str  # absolute folder or a cloud URI (s3://, gs://)
    num_samples: PositiveInt = 1
    metric: str = "val/t2a_mAP@10"
    mode: Literal["min", "max"] = "max"
    cpus_per_trial: PositiveFloat = 1.0  # per data-parallel worker when workers_per_trial > 1
    gpus_per_trial: NonNegativeFloat = 0.0  # likewise; fractions let trials share a GPU
    workers_per_trial: PositiveInt = 1  # > 1: data-parallel training with Ray Train inside each trial
    max_concurrent_trials: PositiveInt | None = None
    num_to_keep: PositiveInt = 2
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    verbose: int = Field(1, ge=0, le=3)
    max_failures: NonNegativeInt = 1  # retries of a crashed trial, each from its latest checkpoint
    search_alg: Literal["random", "optuna"] = "random"  # random/grid sampling, or Optuna's TPE
    scheduler: TrialSchedulerConfig  # no default: how trials are stopped is each experiment's choice
    plateau_stopper: PlateauStopperConfig | None = None
    search_space: SearchSpace  # no default: what to search is each experiment's choice ({} runs one trial)

    @field_validator("metric")
    @classmethod
    def _metric_is_validation(cls, metric: str) -> str:
        # Trials are selected on held-out validation data, never on training loss or the eval split.
        if not metric.startswith("val/"):
            raise ValueError(f"metric must be a validation metric 'val/...', got {metric!r}")
        return metric

    @model_validator(mode="after")
    def _pbt_keeps_enough_checkpoints(self) -> RayConfig:
        # PBT clones other trials' checkpoints; with only 1-2 kept per trial they can be deleted before the clone.
        if self.scheduler.name == "PBT" and self.num_to_keep < 3:
            raise ValueError(
                f"scheduler PBT needs num_to_keep >= 3 so the checkpoints it clones still exist, got {self.num_to_keep}"
            )
        return self

    @model_validator(mode="after")
    def _optuna_cannot_grid(self) -> RayConfig:
        if self.search_alg == "optuna":
            grids = [path for path, spec in self.search_space.items() if "grid" in spec]
            if grids:
                raise ValueError(
                    f"search_alg 'optuna' cannot run grid searches ({', '.join(grids)}): use choice instead"
                )
        return self


class Config(StrictModel):
    """The whole resolved experiment configuration, saved inside every checkpoint."""

    experiment: str  # no default: the name of each experiment's folders
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the only place the device is chosen
    data: DataConfig
    features: FeatureConfig
    text_embeddings: TextEmbeddingConfig = TextEmbeddingConfig()
    model: DualEncoderModel.Config
    criterion: LOSSES.config_union()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_scheduler: LRSchedulerConfig = LRSchedulerConfig()
    param_conf: ParamConfig
    ray_conf: RayConfig

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> Config:
        workers = self.ray_conf.workers_per_trial
        if self.param_conf.batch_size % workers or self.param_conf.batch_size // workers < 1:
            raise ValueError(
                f"param_conf.batch_size {self.param_conf.batch_size} must split evenly over "
                f"ray_conf.workers_per_trial={workers}"
            )
        return self


# Config fields holding paths that are resolved against the config file's folder.
_PATH_KEYS = ("data.dataset_dir", "ray_conf.storage_path", "model.audio_enc.weight")


def parse_override(text: str) -> tuple[str, Any]:
    """``"param_conf.batch_size=64"`` -> ``("param_conf.batch_size", 64)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), safe_yaml(value, f"override {text!r}")


def safe_yaml(text: Any, source: str) -> Any:
    """Parse YAML with the safe loader (plain data only: no ``!!python`` tags, nothing executed);
    a syntax error or a refused tag is a ``ConfigError`` naming ``source`` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: not valid YAML ({problem})") from None


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted == "a.b.c"``, creating missing sections."""
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"config key {'.'.join(parents[: i + 1])!r} is a value, not a section: cannot set {dotted!r}"
            )
        node = child
    node[leaf] = value


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def key_path(loc: tuple[str | int, ...], raw: Any) -> str:
    """A pydantic error location as the dotted key a user wrote.

    For a section chosen by its ``name`` (a discriminated union) pydantic puts the name in the
    location (``model.audio_enc.SmallCNNEncoder.chanels``); no such key exists in the file, so
    it is dropped (``model.audio_enc.chanels``).
    """
    keys, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("name") == part:
            continue
        keys.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(keys)


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted-path override applied."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        set_path(out, dotted, value)
    return out


def validate(raw: dict[str, Any]) -> Config:
    """Turn a raw dict into a ``Config``; every problem is reported with its dotted key path."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            path = key_path(e["loc"], raw)
            got = f" (got {e['input']!r})" if e["type"] not in ("missing", "extra_forbidden") else ""
            lines.append(f"{path}: {e['msg']}{got}")
        raise ConfigError("invalid config: " + "; ".join(lines)) from None


def search_space_samples(path: str, spec: dict[str, list[Any]], where: str = "ray_conf.search_space") -> list[Any]:
    """Values a search-space spec can produce at its extremes, to validate before Ray starts.

    ``{"choice": [a, b]}`` and ``{"grid": [a, b]}`` give every value; ``{"uniform": [lo, hi]}``,
    ``{"loguniform": [lo, hi]}``, ``{"randint": [lo, hi]}`` and ``{"quniform": [lo, hi, q]}`` give the bounds.
    """
    if len(spec) != 1:
        raise ConfigError(f"{where}.{path}: give exactly one of {', '.join(SEARCH_SPACE_KINDS)}, got {sorted(spec)}")
    ((kind, args),) = spec.items()
    if kind not in SEARCH_SPACE_KINDS:
        raise ConfigError(f"{where}.{path}: unknown kind {kind!r}; valid kinds: {', '.join(SEARCH_SPACE_KINDS)}")
    n_numbers = SEARCH_SPACE_KINDS[kind].n_numbers
    if n_numbers is None:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{path}.{kind}: needs a list of at least one value")
        return list(args)
    if not isinstance(args, list) or len(args) != n_numbers or not all(_is_number(a) for a in args):
        raise ConfigError(f"{where}.{path}.{kind}: needs {n_numbers} numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}.{path}.{kind}: bounds {args[:2]!r} are not a valid range")
    return [low, high - 1] if kind == "randint" else [low, high]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_search_space(raw: dict[str, Any], search_space: SearchSpace, where: str = "ray_conf.search_space") -> None:
    """Check that every searched key exists and accepts the values its spec can produce."""
    for path, spec in search_space.items():
        if path.startswith("ray_conf."):
            raise ConfigError(f"{where}.{path}: the ray_conf section cannot be searched")
        for value in search_space_samples(path, spec, where):
            try:
                validate(with_overrides(raw, {path: value}))
            except ConfigError as err:
                raise ConfigError(f"{where}.{path}={value!r} gives an {err}") from None


def load_raw(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read YAML safely, apply ``key=value`` overrides and make relative paths absolute.

    Relative paths resolve against the config file's folder, never the process's or a
    Ray trial's working directory.
    """
    config_path = Path(config_path).resolve()
    if not config_path.is_file():
        raise ConfigError(f"config file {config_path} does not exist")
    try:
        text = config_path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not a UTF-8 text file") from None
    raw = safe_yaml(text, str(config_path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path} must hold a mapping of config sections")
    raw = with_overrides(raw, dict(parse_override(o) for o in overrides or []))
    for dotted in _PATH_KEYS:
        value = _get_path(raw, dotted)
        if isinstance(value, str) and "://" not in value:
            set_path(raw, dotted, str((config_path.parent / Path(value).expanduser()).resolve()))
    return raw


def load_config(config_path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """Load, override, resolve and validate; also checks the search space. Returns the config and its raw dict."""
    raw = load_raw(config_path, overrides)
    config = validate(raw)
    validate_search_space(raw, config.ray_conf.search_space)
    if isinstance(config.ray_conf.scheduler, PBTSchedulerConfig):
        validate_search_space(
            raw, config.ray_conf.scheduler.hyperparam_mutations, "ray_conf.scheduler.hyperparam_mutations"
        )
    return config, raw
