"""Where experiments live: a local folder or a cloud URI (``s3://bucket/prefix``, ``gs://...``), read and written
through pyarrow's filesystems, the ones Ray Tune itself uses, so the two always agree on what a URI means.

S3 is configured by the standard AWS environment (``AWS_ENDPOINT_URL`` for MinIO, Ceph or any S3-compatible store,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), never by settings of ours. The scripts that read
a cloud experiment work on a local mirror of the files they need (``mirror``): ``main.py`` writes its summary there
and uploads it, post-processing downloads the model there and uploads what it writes (``publish_new_files``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from utils.config_files import is_uri
from utils.errors import ConfigError, DatasetError, InputError
from utils.stores import read_json, write_json

log = logging.getLogger(__name__)

URI_SCHEMES = ("s3", "gs", "gcs")  # what pyarrow's filesystems (and so Ray Tune) open without extra set-up
SOURCE_FILE = ".source_uri"  # in a mirror: the cloud folder it copies


def check_uri(uri: str) -> str:
    """``uri`` if this project can store experiments there, else a ``ValueError`` saying why (no network)."""
    parsed = urlparse(uri)
    if parsed.scheme not in URI_SCHEMES:
        raise ValueError(f"{uri}: supported cloud storage is {', '.join(s + '://' for s in URI_SCHEMES)}")
    if not parsed.netloc:
        raise ValueError(f"{uri} names no bucket")
    if parsed.query or parsed.fragment:
        # a URI's options would be lost in every path joined to it; the environment configures the store instead
        raise ValueError(
            f"{uri}: options in the URI are not supported; set AWS_ENDPOINT_URL, AWS_REGION and the credentials "
            "in the environment instead"
        )
    return uri


def join(location: str | Path, *names: str) -> str | Path:
    """``location/name/...``: a URI for a URI, a ``Path`` for a folder."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location, *names)


def parent(location: str | Path) -> str | Path:
    """The folder that holds ``location``."""
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_uri(location) else Path(location).parent


def as_location(fs_path: str, storage_path: str) -> str:
    """A path as Ray's checkpoints and results give it (``bucket/key`` on a cloud filesystem: no scheme) as a
    location under ``storage_path``: a URI with its scheme, or the local path unchanged."""
    return f"{urlparse(storage_path).scheme}://{fs_path.lstrip('/')}" if is_uri(storage_path) else fs_path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it; an ``InputError`` when it cannot be opened."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot open {uri}: {err}") from None


def check_storage(uri: str, key: str = "ray_conf.storage_path") -> None:
    """Reach ``uri`` now (its bucket exists, the credentials are accepted), so that a wrong endpoint, bucket or key
    is one ``ConfigError`` before Ray starts rather than trials that fail to sync."""
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"bucket {bucket!r} does not exist")
    except (OSError, ValueError) as err:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f" (AWS_ENDPOINT_URL={endpoint})" if endpoint and urlparse(uri).scheme == "s3" else ""
        raise ConfigError(f"{key}: cannot use {uri}{where}: {str(err).strip().splitlines()[0]}") from None


def exists(location: str | Path) -> bool:
    """Whether a file or folder is at ``location``."""
    if not is_uri(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    """The bytes of the file at ``location``; ``FileNotFoundError`` when there is none."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(str(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location} does not exist")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json_at(location: str | Path) -> Any:
    """The JSON file at ``location``, local or in the cloud; a damaged one is a ``DatasetError`` naming it."""
    if not is_uri(location):
        return read_json(Path(location))
    try:
        return json.loads(read_bytes(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{location}: not valid JSON ({err})") from None


def write_json_at(obj: Any, location: str | Path) -> None:
    """Write ``obj`` as indented UTF-8 JSON to a local file (atomically, ``utils.stores.write_json``) or to one
    object in the cloud, which an object store makes visible whole."""
    if not is_uri(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        write_json(obj, Path(location))
        return
    text = json.dumps(obj, indent=2)
    fs, path = filesystem(str(location))
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def upload(local: Path, uri: str) -> None:
    """Copy a local file, or a folder's files (replacing what the folder held there), to ``uri``."""
    fs, path = filesystem(uri)
    if local.is_dir():
        fs.delete_dir_contents(path, missing_dir_ok=True)  # no stale files of an earlier upload beside the new ones
    pafs.copy_files(str(local), path, destination_filesystem=fs)


def download(uri: str, local: Path) -> Path:
    """Copy the file or folder at ``uri`` to ``local`` (its parents made); returns ``local``."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    # pyarrow writes a folder's files into an existing local folder only
    (local if kind == pafs.FileType.Directory else local.parent).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs)
    return local


def folder_names(uri: str) -> list[str]:
    """The names of the folders (an object store's prefixes) directly under ``uri``."""
    fs, path = filesystem(uri)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [Path(entry.path).name for entry in entries if entry.type == pafs.FileType.Directory]


def file_time(location: str | Path) -> float | None:
    """The modification time of the file at ``location`` (seconds since the epoch), or None when there is none."""
    if not is_uri(location):
        return Path(location).stat().st_mtime if Path(location).is_file() else None
    fs, path = filesystem(str(location))
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None


def mirror(uri: str) -> Path:
    """The local folder that mirrors the cloud folder ``uri`` (made, and marked with the URI it copies):
    ``$XDG_CACHE_HOME/dual-encoder-tune/<scheme>/<bucket>/<key>``, so every run on this machine shares it."""
    parsed = urlparse(uri.rstrip("/"))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "dual-encoder-tune" / parsed.scheme / parsed.netloc / parsed.path.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SOURCE_FILE).write_text(uri.rstrip("/"), encoding="utf-8")
    return folder


def source_uri(folder: Path) -> str | None:
    """The cloud folder that ``folder`` mirrors, or None for an ordinary folder."""
    marker = Path(folder) / SOURCE_FILE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def _fingerprints(folder: Path) -> dict[Path, str]:
    # size, time and a hash of the first MiB: enough to tell a file the block rewrote from one it left alone
    prints = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.name != SOURCE_FILE:
            with path.open("rb") as handle:
                head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
            stat = path.stat()
            prints[path] = f"{stat.st_size}:{stat.st_mtime_ns}:{head}"
    return prints


@contextmanager
def publish_new_files(folder: Path) -> Iterator[None]:
    """Around a block that writes into ``folder``: when it mirrors a cloud folder, upload the files the block
    wrote or changed there (scores, metrics, submission, report) to the same names under that folder."""
    uri = source_uri(folder)
    before = _fingerprints(folder) if uri else {}
    yield
    if uri is None:
        return
    changed = [path for path, mark in _fingerprints(folder).items() if before.get(path) != mark]
    for path in changed:
        relative = path.relative_to(folder).as_posix()
        upload(path, join(uri, relative))
    if changed:
        log.info("uploaded %d file(s) to %s: %s", len(changed), uri, ", ".join(p.name for p in changed))
