"""Reading config files: safe YAML, dotted ``key.path=value`` overrides, and relative paths resolved
against the file's folder. Torch-free, so that plain tools (dataset indexing) can read a config
without loading the model code that ``utils.config``'s full schema needs.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from utils.errors import ConfigError

# Floats that YAML 1.1, and so ``yaml.safe_load``, leaves as strings: an exponent without a dot or
# without a sign (1e-4, 5E+3, 1.0e4) and a signed leading dot (-.5). YAML 1.2 reads them as numbers.
UNREAD_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$")


def numbers_as_written(value: Any) -> Any:
    """``value`` (parsed YAML) with every string that is one of those floats turned into the float,
    in lists and mapping values at any depth. A quoted ``"1e-4"`` becomes a number too: after
    ``safe_load`` quoting cannot be told apart."""
    if isinstance(value, str) and UNREAD_FLOAT.match(value):
        return float(value.replace("_", ""))
    if isinstance(value, dict):
        return {key: numbers_as_written(item) for key, item in value.items()}
    if isinstance(value, list):
        return [numbers_as_written(item) for item in value]
    return value


# Config fields holding paths that are resolved against the config file's folder.
_PATH_KEYS = (
    "data.dataset_dir",
    "ray_conf.storage_path",
    "model.audio_enc.weight",
    "distillation.teachers",
    "distillation.store",
)
# Model ids: a hub id, or a local folder, resolved against the config file's folder when one is there.
_MODEL_ID_KEYS = ("model.audio_enc.model_id", "model.text_enc.model_id", "model.init_from")


def parse_override(text: str) -> tuple[str, Any]:
    """``"param_conf.batch_size=64"`` -> ``("param_conf.batch_size", 64)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    return key.strip(), safe_yaml(value, f"override {text!r}")


def safe_yaml(text: Any, source: str) -> Any:
    """Parse YAML with ``yaml.safe_load`` (plain data only: no ``!!python`` tags, nothing executed), numbers
    read as people write them (``numbers_as_written``); a syntax error or a refused tag is a
    ``ConfigError`` naming ``source`` and the line."""
    try:
        return numbers_as_written(yaml.safe_load(text))
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


def get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c": [2]}``: every value by its dotted key (lists are values)."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def describe(value: Any) -> Any:
    """A searched value as users recognise it: an inline sub-config by its class ``name`` (a preset is its name
    already), any other value as it is."""
    return value.get("name", str(value)) if isinstance(value, dict) else value


def is_section(schema: type[BaseModel], dotted: str) -> bool:
    """Whether the key at ``dotted`` holds a sub-config (a model, or a union of models) in ``schema``, in any of
    the classes a union along the way may name."""
    models: list[Any] = [schema]
    for part in dotted.split("."):
        fields = [m.model_fields[part].annotation for m in models if part in m.model_fields]
        models = [t for a in fields for t in _union_members(a) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return False
    return True


def with_overrides(
    raw: dict[str, Any], overrides: dict[str, Any], schema: type[BaseModel] | None = None
) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted-path override applied. With the config's ``schema``, a string naming
    one of ``raw``'s ``presets`` given to a sub-config key becomes that preset: ``model.audio_enc=ast``, or
    ``{model.audio_enc: {grid: [cnn14, ast]}}`` in a search space (a plain value such as ``pooling: mean`` stays)."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        presets = out.get("presets") or {}  # as far as the overrides so far have set them
        if isinstance(value, str) and value in presets and schema is not None and is_section(schema, dotted):
            value = copy.deepcopy(presets[value])
        set_path(out, dotted, value)
    return out


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``s3://bucket/key``) rather than a local path."""
    return "://" in str(location)


def load_raw(
    config_path: str | Path, overrides: list[str] | None = None, schema: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Read YAML safely, apply ``key=value`` overrides and make relative paths absolute.

    Relative paths resolve against the config file's folder, never the process's or a
    Ray trial's working directory; those inside ``presets`` too. ``schema``: see ``with_overrides``.
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
    raw = with_overrides(raw, dict(parse_override(o) for o in overrides or []), schema)

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and not is_uri(value):
            return str((config_path.parent / Path(value).expanduser()).resolve())
        return value

    for dotted in _PATH_KEYS:
        if isinstance(get_path(raw, dotted), str):
            set_path(raw, dotted, absolute(get_path(raw, dotted)))
    checkpoints = get_path(raw, "distillation.checkpoints")
    if isinstance(checkpoints, list):  # teachers named by path
        set_path(raw, "distillation.checkpoints", [absolute(c) for c in checkpoints])
    stage2 = get_path(raw, "distillation.stage2")  # a two-stage run's second-stage overrides, dotted keys
    for dotted, value in (stage2 if isinstance(stage2, dict) else {}).items():
        folder_id = dotted in _MODEL_ID_KEYS and (config_path.parent / Path(str(value))).is_dir()
        if isinstance(value, str) and (dotted in _PATH_KEYS or folder_id):
            stage2[dotted] = absolute(value)
    extra_train = get_path(raw, "data.extra_train")
    for source in extra_train if isinstance(extra_train, list) else []:  # more training datasets' folders
        if isinstance(source, dict) and isinstance(source.get("dataset_dir"), str):
            source["dataset_dir"] = absolute(source["dataset_dir"])
    for dotted in _MODEL_ID_KEYS:
        value = get_path(raw, dotted)
        if isinstance(value, str) and (config_path.parent / Path(value).expanduser()).is_dir():
            set_path(raw, dotted, absolute(value))
    # a preset's paths, for a search that chooses it in a trial (whose working directory is elsewhere)
    for preset in (raw.get("presets") or {}).values():
        if isinstance(preset, dict) and isinstance(preset.get("weight"), str):
            preset["weight"] = absolute(preset["weight"])
        for key in ("model_id", "init_from"):
            value = preset.get(key) if isinstance(preset, dict) else None
            if isinstance(value, str) and (config_path.parent / Path(value).expanduser()).is_dir():
                preset[key] = absolute(value)
    # paths a search chooses between, e.g. {data.dataset_dir: {grid: [data/a, data/b]}}
    for dotted, spec in (get_path(raw, "ray_conf.search_space") or {}).items():
        if dotted in _PATH_KEYS and isinstance(spec, dict):
            raw["ray_conf"]["search_space"][dotted] = {
                kind: [absolute(v) for v in values] if isinstance(values, list) else values
                for kind, values in spec.items()
            }
    return raw


def section_keys(schema: type[BaseModel], keys: list[str], raw: Any) -> list[str]:
    """The keys the section at dotted ``keys`` accepts (for a section chosen by its ``name``, those of
    the class it names); empty where the path leaves the schema."""
    model, node = schema, raw
    for key in keys:
        field = model.model_fields.get(key)
        node = node.get(key) if isinstance(node, dict) else None
        if field is None:
            return []
        members = [t for t in _union_members(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        named = [
            t
            for t in members
            if isinstance(node, dict)
            and t.model_fields.get("name")
            and t.model_fields["name"].default == node.get("name")
        ]
        if len(members) == 1 or named:
            model = (named or members)[0]
        else:
            return []
    return list(model.model_fields)


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Annotated:
        return _union_members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return tuple(m for arg in get_args(annotation) for m in _union_members(arg))
    return (annotation,)


def validation_message(err: ValidationError, raw: Any, schema: type[BaseModel], prefix: str = "") -> str:
    """One line for all of a validation's problems, each at the dotted key the user wrote; a misspelt
    key gets the nearest valid one (``param_conf.bach_size: ... (did you mean batch_size?)``)."""
    lines = []
    for e in err.errors():
        path, message = key_path(e["loc"], raw), e["msg"].removeprefix("Value error, ")
        hint = f" (got {e['input']!r})"
        if e["type"] in ("missing", "value_error"):  # a value error's message names the values itself
            hint = ""
        elif e["type"] == "extra_forbidden":
            *section, key = path.split(".")
            close = difflib.get_close_matches(key, section_keys(schema, section, raw), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        where = f"{prefix}{path}: " if path else (f"{prefix.rstrip('.')}: " if prefix else "")
        lines.append(f"{where}{message}{hint}")
    return "invalid config: " + "; ".join(lines)


def validate_section(raw: dict[str, Any], section: str, schema: type[BaseModel]) -> Any:
    """Only the ``section`` of a raw config, checked against ``schema`` (errors name ``section.key``)."""
    value = raw.get(section)
    try:
        return schema.model_validate(value)
    except ValidationError as err:
        raise ConfigError(validation_message(err, value, schema, f"{section}.")) from None
