"""Nothing read from a file or the command line is ever run as code; the dashboard stays local."""

import ast
import os

import h5py
import pytest
import torch
from conftest import REPO_ROOT

from main import is_loopback
from utils.checkpoints import load_checkpoint
from utils.config import RayConfig, load_raw, validate
from utils.config_files import parse_override, safe_yaml
from utils.errors import CheckpointError, ConfigError

PROJECT_FILES = sorted(p for p in REPO_ROOT.rglob("*.py") if ".venv" not in p.parts)


class RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_config_yaml_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "conf.yaml"
    config.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match=r"conf\.yaml line 1: not valid YAML \(could not determine a constructor"):
        load_raw(config)
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override(f"experiment=!!python/object/apply:os.system [touch {marker}]")
    assert not marker.exists()


def test_override_values_are_data_never_code(tmp_path):
    marker = tmp_path / "ran"
    key, value = parse_override(f"seed=__import__('os').system('touch {marker}')")
    assert value == f"__import__('os').system('touch {marker}')"  # a string, not a call
    with pytest.raises(ConfigError, match="seed"):
        validate(load_raw(REPO_ROOT / "conf.yaml", [f"seed={value}"]))
    assert not marker.exists()


def test_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save(
        {"model": RunsCode(marker), "optimizer": {}, "scheduler": {}, "config": {}, "epoch": 1, "metrics": {}},
        tmp_path / "checkpoint.pt",
    )
    with pytest.raises(CheckpointError, match=r"refused, it holds pickled objects \(.*posix\.system.*\); only tensors"):
        load_checkpoint(tmp_path)
    assert not marker.exists()

    (tmp_path / "checkpoint.pt").write_bytes((tmp_path / "checkpoint.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path)
    for junk in (b"", b"hello world\n" * 3, os.urandom(4096)):
        (tmp_path / "checkpoint.pt").write_bytes(junk)
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by this project"):
        load_checkpoint(tmp_path)


def test_stored_features_embeddings_and_tower_stores_are_plain_arrays(tiny_dataset):
    def check(name, item):
        if isinstance(item, h5py.Dataset):
            assert item.dtype.kind in "fiub" or h5py.check_string_dtype(item.dtype), (
                name,
                item.dtype,
            )  # numbers, flags

    for path in tiny_dataset.glob("*.h5"):
        with h5py.File(path) as f:
            f.visititems(check)


UNPICKLERS = ("pickle.load", "pickle.Unpickler", "dill.", "cloudpickle.", "marshal.load", "shelve.", "joblib.load")


def calls(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(func: ast.expr) -> str:
    return f"{dotted(func.value)}.{func.attr}" if isinstance(func, ast.Attribute) else getattr(func, "id", "")


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_source_never_evaluates_strings_or_unpickles_data(path):
    tree = ast.parse(path.read_text())
    for call in calls(tree):
        name = dotted(call.func)
        keywords = {k.arg: k.value for k in call.keywords}
        assert name not in ("eval", "exec", "compile", "__import__"), f"{path.name}:{call.lineno} calls {name}"
        assert name not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "pd.read_pickle"), (
            f"{path.name}:{call.lineno}"
        )
        assert not name.startswith(UNPICKLERS), f"{path.name}:{call.lineno} calls {name}"
        if name == "torch.load":
            assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, (
                f"{path.name}:{call.lineno}"
            )
        if name == "np.load":
            assert isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is False, (
                f"{path.name}:{call.lineno}"
            )


def test_safe_yaml_reads_numbers_as_numbers():
    assert safe_yaml("{lr: 1e-4, b: 5E+3, c: -2.5e-1, d: 1.0, e: 3, f: 1e4x, g: .inf}", "test") == {
        "lr": 1e-4,
        "b": 5e3,
        "c": -0.25,
        "d": 1.0,
        "e": 3,
        "f": "1e4x",
        "g": float("inf"),
    }


def test_dashboard_is_local_by_default_and_the_readme_says_how_to_reach_it():
    assert RayConfig.model_fields["dashboard_host"].default == "127.0.0.1"
    assert validate(load_raw(REPO_ROOT / "conf.yaml")).ray_conf.dashboard_host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("head-node")
    readme = (REPO_ROOT / "README.md").read_text()
    assert "ssh -L 8265:localhost:8265" in readme and "no authentication" in readme
