"""Typed experiment configuration: ``conf.yaml`` + dotted overrides -> validated ``Config``.

Every section forbids unknown keys, so a typo fails at load time with its dotted path,
whether it comes from the YAML file, the command line or a Ray Tune search space. The
sections of components (encoders, losses, features, text embeddings) are those components'
own ``Config`` classes: each default and constraint is written once, beside the code that
uses it. A key without a default (``embed_dim``, ``num_epochs``, ...) is the experiment's
choice, and ``conf.yaml`` is where it is made.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

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
from utils.audio import CropConfig, FeatureConfig
from utils.config_files import describe, is_uri, load_raw, validation_message
from utils.config_files import with_overrides as apply_overrides
from utils.errors import ConfigError
from utils.storage import check_uri
from utils.stores import DataConfig
from utils.text import TextEmbeddingConfig

log = logging.getLogger(__name__)


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


ParameterGroup = Literal[
    "heads", "pooling", "audio_encoder", "text_encoder", "logit_scale"
]  # DualEncoderModel.parameter_groups


class GroupSettings(StrictModel):
    """Learning rate and weight decay of one part of the model; unset values are the optimizer's."""

    lr: PositiveFloat | None = None
    weight_decay: NonNegativeFloat | None = None


class OptimizerConfig(StrictModel):
    """The ``optimizer`` section: a ``torch.optim`` optimizer over the trainable parameters, with
    optional settings per part (``param_groups.audio_encoder.lr: 4e-6``; the learnable temperature
    gets no weight decay unless its group sets one, as in open_clip)."""

    name: Literal["Adam", "AdamW"] = "Adam"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's; LAION CLAP's paper states (0.99, 0.9)
    param_groups: dict[ParameterGroup, GroupSettings] = {}

    @field_validator("betas")
    @classmethod
    def _betas_are_probabilities(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(betas)}")
        return betas

    def group(self, name: str) -> dict[str, float]:
        """``{"lr", "weight_decay"}`` of the part ``name``."""
        own = self.param_groups.get(name, GroupSettings())
        default_decay = 0.0 if name == "logit_scale" else self.weight_decay
        return {
            "lr": own.lr if own.lr is not None else self.lr,
            "weight_decay": own.weight_decay if own.weight_decay is not None else default_decay,
        }


class ReduceLROnPlateauConfig(StrictModel):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` stepped on the validation loss each epoch
    (the DCASE 2023 baseline's settings)."""

    name: Literal["ReduceLROnPlateau"] = "ReduceLROnPlateau"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: NonNegativeInt = 5
    threshold: NonNegativeFloat = 0.005
    threshold_mode: Literal["rel", "abs"] = "abs"
    min_lr: NonNegativeFloat = 1e-6


class WarmupScheduleConfig(StrictModel):
    """Linear warmup from 0 to each group's lr, then decay to ``min_lr_ratio`` x lr at the last step,
    stepped after every optimizer step. The warmup is ``warmup_steps``, or ``warmup_epochs`` when set."""

    warmup_steps: NonNegativeInt = 0
    warmup_epochs: NonNegativeFloat | None = None
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)
    # the decay ends here and the lr stays at min_lr_ratio x lr after it (salsa: epoch 15 of 20); None: the last step
    decay_epochs: PositiveFloat | None = None


class CosineWithWarmupConfig(WarmupScheduleConfig):
    """Warmup, then cosine decay (CLAP, salsa)."""

    name: Literal["CosineWithWarmup"] = "CosineWithWarmup"


class LinearWithWarmupConfig(WarmupScheduleConfig):
    """Warmup, then linear decay (the Hugging Face ``Trainer`` default)."""

    name: Literal["LinearWithWarmup"] = "LinearWithWarmup"


LRSchedulerConfig = Annotated[
    Union[ReduceLROnPlateauConfig, CosineWithWarmupConfig, LinearWithWarmupConfig],  # noqa: UP007
    Field(discriminator="name"),
]


class ParamConfig(StrictModel):
    """Per-trial training parameters (``param_conf`` in the DCASE baseline)."""

    num_epochs: PositiveInt  # no default: how long to train is each experiment's choice
    batch_size: int = Field(32, gt=1)  # InfoNCE needs at least one negative
    num_workers: NonNegativeInt = 0
    # gradients of this many batches are summed before a step (the negatives stay those of one batch)
    accumulate_grad_batches: PositiveInt = 1
    clip_grad_norm: PositiveFloat | None = None  # max L2 norm of all gradients, None: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision on CUDA; the CPU runs fp32
    # also validate, report and checkpoint every this many optimizer steps within an epoch, so schedulers act
    # within long epochs (the Whisper embedder trained one epoch and evaluated every 10 steps); None: per epoch
    val_every_steps: PositiveInt | None = None


SearchSpace = dict[str, dict[str, list[Any]]]  # dotted config path -> {kind: arguments}


class FIFOSchedulerConfig(StrictModel):
    """Run every trial to its last epoch."""

    name: Literal["FIFO"] = "FIFO"


class ASHASchedulerConfig(StrictModel):
    """Asynchronous successive halving: stop trials that trail their peers at epoch milestones."""

    name: Literal["ASHA"] = "ASHA"
    grace_period: PositiveFloat = 1  # epochs every trial runs before it can be stopped (a fraction: val_every_steps)
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


class MLflowConfig(StrictModel):
    """Each trial as an MLflow run (Ray Tune's ``MLflowLoggerCallback``): its resolved config as parameters,
    its metrics per epoch (``@`` written ``_at_``: MLflow refuses ``@`` in names)."""

    tracking_uri: str | None = None  # null: a local file store, <storage_path>/mlruns; or http://host:5000
    experiment_name: str | None = None  # null: the config's experiment
    tags: dict[str, str] = {}
    save_artifact: bool = False  # also copy each trial's folder (its checkpoints too) into the run's artifacts


class WandbConfig(StrictModel):
    """Each trial as a Weights & Biases run (Ray Tune's ``WandbLoggerCallback``; needs ``pip install wandb``)."""

    project: str | None = None  # null: the config's experiment
    entity: str | None = None  # team or user; null: the account's default
    group: str | None = None  # null: the experiment folder's name
    mode: Literal["offline", "online"] = "offline"  # offline: no account needed; `wandb sync` uploads later
    api_key_file: str | None = None  # online without `wandb login`: a file holding the API key


class RayConfig(StrictModel):
    """How Ray Tune runs the trials; only ``main.py`` reads this section."""

    storage_path: str  # absolute folder or a cloud URI (s3://bucket/prefix, gs://...; AWS_* environment for S3)
    num_samples: PositiveInt = 1
    metric: str = "val/t2a_mAP@10"
    mode: Literal["min", "max"] = "max"
    cpus_per_trial: PositiveFloat = 1.0  # per data-parallel worker when workers_per_trial > 1
    gpus_per_trial: NonNegativeFloat = 0.0  # likewise; fractions let trials share a GPU
    workers_per_trial: PositiveInt = 1  # > 1: data-parallel training with Ray Train inside each trial
    max_concurrent_trials: PositiveInt | None = None
    # a finished trial's worker process runs the next trial: no new process and imports per trial (about 4 s each
    # on 2 cores); the trial's memory is released (CUDA's cache emptied) first. false: a new process per trial
    reuse_actors: bool = True
    num_to_keep: PositiveInt = 2
    include_dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    verbose: int = Field(1, ge=0, le=3)
    max_failures: NonNegativeInt = 1  # retries of a crashed trial, each from its latest checkpoint
    # seconds between uploads of the experiment's state and trial logs to storage_path (Ray's default, 300 s, can
    # lose five minutes of finished trials to a driver killed hard); checkpoints upload as they are saved
    sync_period: PositiveFloat = 10.0
    search_alg: Literal["random", "optuna"] = "random"  # random/grid sampling, or Optuna's TPE
    scheduler: TrialSchedulerConfig  # no default: how trials are stopped is each experiment's choice
    plateau_stopper: PlateauStopperConfig | None = None
    mlflow: MLflowConfig | None = None  # e.g. {} for a local file store
    wandb: WandbConfig | None = None  # e.g. {project: audio-retrieval}
    # no default: what to search is each experiment's choice; null (or {}) runs one trial with the file's values
    search_space: SearchSpace | None

    @field_validator("search_space")
    @classmethod
    def _no_search_is_one_trial(cls, search_space: SearchSpace | None) -> SearchSpace:
        return search_space or {}

    @field_validator("storage_path")
    @classmethod
    def _storage_is_a_folder_or_supported_uri(cls, storage_path: str) -> str:
        return check_uri(storage_path) if is_uri(storage_path) else storage_path

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
    def _mlflow_file_store_needs_a_folder(self) -> RayConfig:
        if self.mlflow is not None and self.mlflow.tracking_uri is None and is_uri(self.storage_path):
            raise ValueError(
                f"mlflow.tracking_uri must be given when storage_path is a URI ({self.storage_path}): the default "
                "MLflow file store lives in a local storage_path"
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


class DistillationConfig(StrictModel):
    """salsa's stage 2 ("Estimated Audio-Caption Correspondences Improve Language-Based Audio Retrieval"): the
    teachers' cosine scores between every clip and caption of the batch, averaged over the teachers and divided by
    the temperature, are softmax targets of a cross-entropy in both directions (``models.losses.distillation_loss``),
    added to the supervised loss. The teachers are the ``top_k`` best trials of a finished experiment (or named
    checkpoints); their embeddings of the training split are stored once (``utils.teachers``).

    With neither ``teachers`` nor ``checkpoints``, ``main.py`` runs both stages: the search without distillation
    (experiment ``<experiment>-stage1``), then the search distilling from its best ``top_k`` trials, with the
    ``stage2`` overrides applied (experiment ``<experiment>``)."""

    teachers: str | None = None  # a finished experiment of main.py: its folder or URI
    checkpoints: list[str] = []  # or teacher checkpoints / model exports by path (any recipe, the same dataset)
    top_k: PositiveInt = 3  # the experiment's best trials taken as teachers (its best checkpoint each)
    store: str | None = None  # the teachers' store; null: teachers_<split>_top<k>.h5 in the teachers' experiment
    weight: NonNegativeFloat = 1.0  # of the distillation term
    supervised_weight: NonNegativeFloat = 1.0  # of the criterion's loss; 0: the estimated targets alone
    temperature: PositiveFloat | None = None  # the teachers' scores are divided by it; null: the student's
    init_from_teacher: bool = True  # the student starts from the best teacher's weights (salsa's stage 2)
    stage2: dict[str, Any] = {}  # two-stage runs: dotted overrides of the second stage (search space, epochs, ...)

    @property
    def two_stage(self) -> bool:
        """No teachers given: ``main.py`` runs the search that makes them first."""
        return self.teachers is None and not self.checkpoints

    @model_validator(mode="after")
    def _teachers_from_one_place(self) -> DistillationConfig:
        if self.teachers is not None and self.checkpoints:
            raise ValueError("give teachers (an experiment) or checkpoints, not both")
        if self.checkpoints and self.store is None:
            raise ValueError("checkpoints need store: the file where their embeddings of the training split go")
        if self.stage2 and not self.two_stage:
            raise ValueError("stage2 applies to two-stage runs only (teachers and checkpoints not given)")
        return self


class Config(StrictModel):
    """The whole resolved experiment configuration, saved inside every checkpoint."""

    experiment: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")  # no default: names the runs' folders <experiment>_<time>
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"  # the only place the device is chosen
    data: DataConfig
    features: FeatureConfig
    crops: CropConfig = CropConfig()
    text_embeddings: TextEmbeddingConfig = TextEmbeddingConfig()
    model: DualEncoderModel.Config
    criterion: LOSSES.config_union()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_scheduler: LRSchedulerConfig = ReduceLROnPlateauConfig()
    param_conf: ParamConfig
    ray_conf: RayConfig
    distillation: DistillationConfig | None = None  # salsa's stage 2: teachers' estimated correspondences
    # named sub-configs that a section takes by name, on the command line or in a search space: with
    # {cnn14: {name: CNN14Encoder, ...}, ast: {name: ASTEncoder, ...}}, model.audio_enc: {grid: [cnn14, ast]}
    # searches across architectures, and results.csv names each trial's by its preset
    presets: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _schedulers_fit_the_epochs(self) -> Config:
        epochs = self.param_conf.num_epochs
        for section, name, value in (
            ("ray_conf.scheduler", "grace_period", getattr(self.ray_conf.scheduler, "grace_period", 1)),
            ("ray_conf.plateau_stopper", "grace_period", getattr(self.ray_conf.plateau_stopper, "grace_period", 1)),
        ):
            if value > epochs:
                raise ValueError(f"{section}.{name} {value:g} is more than param_conf.num_epochs {epochs}")
        return self

    @model_validator(mode="after")
    def _stored_views_are_drawn_once(self) -> Config:
        # A transformers tower reads stored inputs or a frozen backbone's cached outputs: their views are fixed
        # when the store is written. Cropping cached frames would not be cropping the input (self-attention
        # is global), so fresh random views cannot be had there.
        tower = self.model.audio_enc
        fusion = getattr(tower, "fusion", False)
        if fusion and self.crops.seconds is not None:
            raise ValueError("crops.seconds and model.audio_enc.fusion both choose 10 s views: set one of them")
        if hasattr(tower, "model_id") and self.crops.train_views == 0 and (self.crops.seconds is not None or fusion):
            what = "crops.seconds" if self.crops.seconds is not None else "model.audio_enc.fusion"
            stored = "cached backbone outputs" if not tower.trainable else "stored model inputs"
            raise ValueError(
                f"{what} with crops.train_views 0 asks for a fresh random view at every draw, but "
                f"model.audio_enc ({tower.name}, trainable {tower.trainable}) reads {stored}, whose views are drawn "
                "once: set crops.train_views to the number of views to store per clip"
            )
        return self

    @model_validator(mode="after")
    def _sequences_align_with_sequences(self) -> Config:
        # audio2img: a sequence head's (B, L, W) output is trained position by position against a sequence text
        # tower's hidden states; a vector loss or a vector text tower cannot take it, nor the reverse
        head = self.model.pooling.name if self.model.pooling is not None else None
        parts = {
            "model.pooling": head == "SequenceResampling",
            "model.text_enc": self.model.text_enc.name == "CLIPTextEncoder",
            "criterion": self.criterion.name == "SequenceContrastiveLoss",
        }
        if len(set(parts.values())) > 1:
            have = ", ".join(f"{key} {'is' if seq else 'is not'}" for key, seq in parts.items())
            raise ValueError(
                "sequence alignment needs all three of model.pooling SequenceResampling, model.text_enc "
                f"CLIPTextEncoder and criterion SequenceContrastiveLoss, or none: {have}"
            )
        if head == "SequenceResampling" and (
            self.model.projection.name != "IdentityProjection" or self.model.text_enc.trainable
        ):
            # the targets are the frozen CLIP hidden states themselves: a head or training on the text side would
            # move them, and the audio side would no longer be a pipeline's prompt_embeds
            raise ValueError(
                "sequence alignment trains the audio side towards the frozen CLIP hidden states: model.projection "
                "must be IdentityProjection and model.text_enc.trainable false"
            )
        if head == "SequenceResampling" and self.model.pooling.positions != self.model.text_enc.max_length:
            raise ValueError(
                f"model.pooling.positions {self.model.pooling.positions} must equal model.text_enc.max_length "
                f"{self.model.text_enc.max_length}: each audio position is scored against the same text position"
            )
        return self

    @model_validator(mode="after")
    def _distillation_fits_the_training(self) -> Config:
        if self.distillation is None:
            return self
        if self.data.extra_train:
            raise ValueError(
                "distillation: the teachers' store covers data.dataset_dir's training split only; "
                "data.extra_train must be empty"
            )
        if self.criterion.name == "SequenceContrastiveLoss":
            raise ValueError("distillation needs one vector per clip and caption: not with SequenceContrastiveLoss")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> Config:
        workers = self.ray_conf.workers_per_trial
        if self.param_conf.batch_size % workers or self.param_conf.batch_size // workers < 1:
            raise ValueError(
                f"param_conf.batch_size {self.param_conf.batch_size} must split evenly over "
                f"ray_conf.workers_per_trial={workers}"
            )
        return self


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with dotted-path ``overrides`` applied, preset names given to sub-config keys resolved (the schema
    says which keys hold sub-configs)."""
    return apply_overrides(raw, overrides, Config)


def validate(raw: dict[str, Any]) -> Config:
    """Turn a raw dict into a ``Config``; every problem is reported with its dotted key path."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_message(err, raw, Config)) from None


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


MAX_COMBINATIONS = 4096  # beyond this many, each searched key is checked alone (with the others as in the file)


def validate_search_space(raw: dict[str, Any], search_space: SearchSpace, where: str = "ray_conf.search_space") -> None:
    """Check that every searched key exists and accepts the values its spec can produce, and that every
    combination of them (each choice, each bound of a range) is a valid config: a CNN with TAP, a
    ``transformers`` tower with mean pooling, ... An invalid combination fails naming its keys and values."""
    samples = {}
    for path, spec in search_space.items():
        if path.startswith("ray_conf."):
            raise ConfigError(f"{where}.{path}: the ray_conf section cannot be searched")
        samples[path] = search_space_samples(path, spec, where)
        for value in samples[path]:
            _check_values(raw, {path: value}, where)
    combinations = math.prod(map(len, samples.values()))
    if len(samples) > 1 and combinations > MAX_COMBINATIONS:
        log.warning(
            "%s: %d combinations of the searched values' extremes, over %d: each key checked alone, not together",
            where,
            combinations,
            MAX_COMBINATIONS,
        )
    elif len(samples) > 1:
        for values in itertools.product(*samples.values()):
            _check_values(raw, dict(zip(samples, values)), where)


def _check_values(raw: dict[str, Any], values: dict[str, Any], where: str) -> None:
    try:
        validate(with_overrides(raw, values))
    except ConfigError as err:
        chosen = " with ".join(f"{path}={describe(value)!r}" for path, value in values.items())
        raise ConfigError(f"{where}{'.' if len(values) == 1 else ': '}{chosen} gives an {err}") from None


STAGE1_SUFFIX = "-stage1"  # a two-stage run's first experiment: <experiment>-stage1; the second keeps <experiment>


def stage_configs(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A two-stage config's two experiments (``DistillationConfig``): stage 1, the search without distillation, as
    ``<experiment>-stage1``; stage 2, the same with the ``distillation.stage2`` overrides applied and its teachers
    still to be set (``stage2_config``) to the stage-1 experiment."""
    first = {key: value for key, value in raw.items() if key != "distillation"}
    first["experiment"] = f"{raw['experiment']}{STAGE1_SUFFIX}"
    second = dict(raw, distillation={k: v for k, v in raw["distillation"].items() if k != "stage2"})
    return first, with_overrides(second, raw["distillation"].get("stage2", {}))


def stage2_config(stage2: dict[str, Any], teachers: str) -> dict[str, Any]:
    """The second stage's raw config with its teachers: the finished stage-1 experiment at ``teachers``."""
    return with_overrides(stage2, {"distillation.teachers": teachers})


SEARCHABLE_DISTILLATION = ("distillation.weight", "distillation.supervised_weight", "distillation.temperature")


def check_search(raw: dict[str, Any], config: Config) -> None:
    """The search space (and PBT's mutations) of a validated config: every value it can take gives a valid config,
    and the distillation keys searched are the loss's weights and temperature of a distilling search (the teachers
    and their store are made once, before the trials)."""
    spaces = {"ray_conf.search_space": config.ray_conf.search_space}
    if isinstance(config.ray_conf.scheduler, PBTSchedulerConfig):
        spaces["ray_conf.scheduler.hyperparam_mutations"] = config.ray_conf.scheduler.hyperparam_mutations
    for where, space in spaces.items():
        for path in space:
            if path != "distillation" and not path.startswith("distillation."):
                continue
            if path not in SEARCHABLE_DISTILLATION:
                raise ConfigError(
                    f"{where}.{path}: of distillation only {', '.join(SEARCHABLE_DISTILLATION)} can be searched: "
                    "the teachers' store is written once, before the trials"
                )
            if config.distillation is None or config.distillation.two_stage:
                raise ConfigError(
                    f"{where}.{path}: searched without teachers; a two-stage run searches it in its second stage "
                    "(distillation.stage2's ray_conf.search_space)"
                )
        validate_search_space(raw, space, where)


def load_config(config_path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """Load, override, resolve and validate; also checks the search space, and for a two-stage config both stages'
    configs and searches (stage 2's keys reported under ``distillation.stage2``). Returns the config and its raw
    dict."""
    raw = load_raw(config_path, overrides, Config)
    config = validate(raw)
    check_search(raw, config)
    if config.distillation is not None and config.distillation.two_stage:
        try:
            second = stage2_config(stage_configs(raw)[1], "stage1-placeholder")
            check_search(second, validate(second))
        except ConfigError as err:
            raise ConfigError(f"distillation.stage2 gives a second stage that cannot run: {err}") from None
    return config, raw
