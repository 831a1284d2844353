from pathlib import Path

import pytest
from conftest import REPO_ROOT

from models import AUDIO_ENCODERS
from models.registry import StrictModel
from utils.config import load_config, load_raw, validate, validate_search_space, with_overrides
from utils.config_files import flatten, parse_override
from utils.errors import ConfigError

CONF = REPO_ROOT / "conf.yaml"


def test_shipped_config_is_valid_and_paths_resolve_against_its_folder():
    config, _ = load_config(CONF)
    assert config.data.dataset_dir == (REPO_ROOT / "data/demo").resolve()
    assert config.ray_conf.storage_path == str((REPO_ROOT / "runs").resolve())
    assert config.ray_conf.metric == "val/t2a_mAP@10"


def test_overrides_are_typed_by_yaml():
    assert parse_override("param_conf.batch_size=64") == ("param_conf.batch_size", 64)
    assert parse_override("model.audio_enc.channels=[4, 8]") == ("model.audio_enc.channels", [4, 8])
    config, _ = load_config(CONF, ["param_conf.batch_size=64", "optimizer.lr=5e-4"])
    assert config.param_conf.batch_size == 64 and config.optimizer.lr == 5e-4
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("no_equals_sign")


@pytest.mark.parametrize(
    "override, path",
    [
        ("param_conf.bach_size=64", "param_conf.bach_size"),
        ("model.audio_enc.chanels=[4]", "model.audio_enc.chanels"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("criterion.dist=euclid", "criterion.dist"),
    ],
)
def test_unknown_or_mistyped_key_fails_with_its_path(override, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load_config(CONF, [override])


def test_encoder_name_typo_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        validate(with_overrides(load_raw(CONF), {"model.audio_enc": {"name": "CNN14Encodr"}}))
    assert "CNN14Encoder" in str(err.value) and "SmallCNNEncoder" in str(err.value)
    with pytest.raises(KeyError, match="Did you mean 'CNN14Encoder'"):
        AUDIO_ENCODERS.get("CNN14Encodr")


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optimizer.lrr": {"grid": [0.1]}}, r"optimizer\.lrr"),
        ({"optimizer.lr": {"grid": [0.1, "big"]}}, r"optimizer\.lr='big'"),
        ({"optimizer.lr": {"loguniform": [0, 1]}}, "not a valid range"),
        ({"optimizer.lr": {"normal": [0, 1]}}, "unknown kind 'normal'"),
        ({"param_conf.batch_size": {"randint": [8]}}, "needs 2 numbers"),
        ({"ray_conf.num_samples": {"grid": [1, 2]}}, "cannot be searched"),
    ],
)
def test_bad_search_space_is_rejected_before_ray_starts(space, message):
    with pytest.raises(ConfigError, match=message):
        validate_search_space(load_raw(CONF), space)


def test_search_space_from_yaml_is_checked_at_load(tmp_path: Path):
    config_file = tmp_path / "conf.yaml"
    config_file.write_text(
        CONF.read_text().replace("optimizer.lr:\n      grid:", "optimizer.learning_rate:\n      grid:")
    )
    with pytest.raises(ConfigError, match=r"search_space\.optimizer\.learning_rate"):
        load_config(config_file)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/conf.yaml")


def test_batch_must_split_over_data_parallel_workers():
    with pytest.raises(ConfigError, match="split evenly"):
        load_config(CONF, ["param_conf.batch_size=30", "ray_conf.workers_per_trial=4"])
    config, _ = load_config(CONF, ["param_conf.batch_size=32", "ray_conf.workers_per_trial=4"])
    assert config.ray_conf.workers_per_trial == 4


def defaults_that_disagree(model, raw: dict, path: str = "") -> list[str]:
    """Keys of ``raw`` (conf.yaml) whose schema field has a default other than the value written there."""
    wrong = []
    for key, written in raw.items():
        field, value = type(model).model_fields[key], getattr(model, key)
        if isinstance(value, StrictModel) and isinstance(written, dict):
            wrong += defaults_that_disagree(value, written, f"{path}{key}.")
        elif not field.is_required() and value != field.get_default(call_default_factory=True):
            wrong.append(
                f"{path}{key}: {value!r} in conf.yaml, default {field.get_default(call_default_factory=True)!r}"
            )
    return wrong


def test_schema_defaults_agree_with_conf_yaml():
    config, raw = load_config(CONF)
    assert defaults_that_disagree(config, raw) == []
    # keys the file must give: the experiment's own choices have no default to drift from
    missing = validate_errors({k: v for k, v in raw.items() if k not in ("experiment", "features")})
    assert "experiment: Field required" in missing and "features: Field required" in missing


def validate_errors(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate(raw)
    return str(err.value)


def test_misspelt_key_inside_a_named_section_is_reported_at_its_real_path():
    raw = with_overrides(load_raw(CONF), {"criterion.temprature": 0.1, "ray_conf.scheduler.grace_perod": 2})
    message = validate_errors(raw)
    assert "criterion.temprature: Extra inputs are not permitted" in message
    assert "ray_conf.scheduler.grace_perod: Extra inputs are not permitted" in message
    assert "LogSoftmaxLoss" not in message and "ASHA." not in message  # no union tags in the paths


def test_numbers_are_numbers_everywhere_a_config_is_read(tmp_path):
    config_file = tmp_path / "conf.yaml"
    text = CONF.read_text().replace("grid: [0.003, 0.001, 0.0003]", "{loguniform: [1e-4, 1e-2]}")
    config_file.write_text(text.replace("lr: 0.001", "lr: 5e-4"))
    config, _ = load_config(config_file, ["criterion.temperature=7E-2"])
    assert config.optimizer.lr == 5e-4 and config.criterion.temperature == 0.07
    assert config.ray_conf.search_space["optimizer.lr"] == {"loguniform": [1e-4, 1e-2]}


@pytest.mark.parametrize("value", ["null", "{}"])
def test_one_trial_without_a_search(value):
    config, _ = load_config(CONF, [f"ray_conf.search_space={value}"])
    assert config.ray_conf.search_space == {}


def test_paths_a_search_chooses_between_resolve_against_the_config_file():
    config, _ = load_config(CONF, ["ray_conf.search_space={data.dataset_dir: {grid: [data/a, /elsewhere/b]}}"])
    assert config.ray_conf.search_space["data.dataset_dir"]["grid"] == [str(REPO_ROOT / "data" / "a"), "/elsewhere/b"]


def test_signed_and_exponent_numbers_and_a_missing_section_named():
    from utils.config_files import safe_yaml, validate_section
    from utils.stores import DataConfig

    assert safe_yaml("[-.5, +.5e-3, 1e-4, 5E+3, 3, x1e4]", "test") == [-0.5, 0.0005, 1e-4, 5000.0, 3, "x1e4"]
    with pytest.raises(ConfigError, match=r"^invalid config: data: Input should be a valid dictionary"):
        validate_section({"data": None}, "data", DataConfig)
    with pytest.raises(ConfigError, match=r"experiment: String should match pattern"):
        load_config(CONF, ["experiment=a/b"])


def test_trackers_are_checked_before_ray():
    config, _ = load_config(REPO_ROOT / "conf.yaml", ["ray_conf.mlflow={}", "ray_conf.wandb={project: p}"])
    assert config.ray_conf.mlflow.tracking_uri is None and config.ray_conf.wandb.mode == "offline"
    with pytest.raises(ConfigError, match="mlflow.tracking_uri must be given when storage_path is a URI"):
        load_config(REPO_ROOT / "conf.yaml", ["ray_conf.mlflow={}", "ray_conf.storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"ray_conf\.wandb\.mode"):
        load_config(REPO_ROOT / "conf.yaml", ["ray_conf.wandb={mode: cloud}"])


def test_flatten_gives_every_value_its_dotted_key():
    assert flatten({"a": {"b": 1, "c": {"d": [2, 3]}}, "e": {}, "f": "x"}) == {
        "a.b": 1,
        "a.c.d": [2, 3],
        "e": {},
        "f": "x",
    }
