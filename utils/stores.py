"""Dataset layout and the files preprocessing writes: CSV tables and HDF5 stores (no torch here).

A dataset folder follows Clotho's layout, plus the files preprocessing writes::

    <dataset_dir>/{split}/*.wav              audio clips
    <dataset_dir>/clotho_captions_{split}.csv  file_name,caption_1..5 (Clotho as downloaded), or
    <dataset_dir>/{split}_captions.csv       fname,raw_text[,text] (any captions per clip)
    <dataset_dir>/{split}_relevance.csv      caption,fname,relevance  (optional: more relevant clips, DCASE 2025)
    <dataset_dir>/{split}_audio.csv          fid,fname,duration       (clotho_dataset.py)
    <dataset_dir>/{split}_text.csv           cid,fid,fname,raw_text,text
    <dataset_dir>/{split}_logmel.h5          log-mels of every clip   (audio_logmel.py)
    <dataset_dir>/{split}_text_embeds.h5     caption embeddings       (sbert_embeddings.py)

Every file is written under a temporary name and renamed when complete (``atomic_path``), a folder the same way
(``atomic_folder``), and a run writing a split's store holds that store's lock (``split_lock``) meanwhile.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
from pydantic import model_validator

from models.registry import StrictModel
from utils.errors import DatasetError

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks (split_lock then keeps nothing apart)
    fcntl = None

if TYPE_CHECKING:  # only types here: importing utils.audio would load the audio libraries
    from utils.audio import FeatureConfig
    from utils.text import TextEmbeddingConfig

CAPTION_COLUMNS = ("fname", "raw_text", "text")  # one caption per row; `text` may be left out
RELEASE_COLUMNS = ("file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5")  # Clotho as downloaded
AUDIO_COLUMNS = ("fid", "fname", "duration")
TEXT_COLUMNS = ("cid", "fid", "fname", "raw_text", "text")
NAME_MAX = 255  # bytes in one file name on ext4, XFS, APFS and NTFS

log = logging.getLogger(__name__)


class TrainSource(StrictModel):
    """One more dataset for training (an entry of ``data.extra_train``): a Clotho-layout folder, preprocessed by
    the same scripts with the same config, and the split of it whose clips and captions join training."""

    dataset_dir: Path
    split: str = "development"


class DataConfig(StrictModel):
    """The ``data`` section: a Clotho-layout dataset folder and its split names, and more training data."""

    dataset_dir: Path
    train_split: str = "development"
    val_split: str = "validation"  # trials are selected on this split
    eval_split: str = "evaluation"  # only post-processing reads it
    # other datasets whose clips and captions join the training split (Clotho + converted tags, ...); validation
    # and evaluation stay on dataset_dir's splits
    extra_train: list[TrainSource] = []
    # graded {split}_relevance.csv tables (DCASE 2025): the grades that count as relevant, in validation and scoring;
    # null: any grade above 0
    relevance_threshold: float | None = None

    def splits(self) -> list[str]:
        """Training, validation and evaluation split names: what preprocessing does by default."""
        return [self.train_split, self.val_split, self.eval_split]

    @model_validator(mode="after")
    def _extra_sources_are_new_training_data(self) -> DataConfig:
        # the same split twice would weigh its captions double; a held-out split in training leaks it
        main = self.dataset_dir.resolve()
        named = {(main, getattr(self, key)): key for key in ("eval_split", "val_split", "train_split")}
        for i, source in enumerate(self.extra_train):
            key = (source.dataset_dir.resolve(), source.split)
            if key in named:
                raise ValueError(
                    f"extra_train[{i}] is the {source.split!r} split of {source.dataset_dir}, already data.{named[key]}"
                )
            named[key] = f"extra_train[{i}]"
        return self


def captions_csv(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_captions.csv"


def relevance_csv(dataset_dir: Path, split: str) -> Path:
    """A split's relevance table (``utils.relevance``): every clip that fits a caption, beyond its own."""
    return Path(dataset_dir) / f"{split}_relevance.csv"


def release_captions_csv(dataset_dir: Path, split: str) -> Path:
    """The captions file of the Clotho v2 release: ``clotho_captions_{split}.csv``, five captions per row."""
    return Path(dataset_dir) / f"clotho_captions_{split}.csv"


def audio_table(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_audio.csv"


def text_table(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_text.csv"


def logmel_file(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_logmel.h5"


def text_embeds_file(dataset_dir: Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_text_embeds.h5"


def require_file(path: Path, writer: str) -> Path:
    """``path`` if it exists; else a ``FileNotFoundError`` naming what writes it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run {writer} first")
    return Path(path)


def dataset_member(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name read from a CSV; ``DatasetError`` unless it is a plain
    file name, so a CSV can never point outside its dataset folder (``../``, ``/etc/...``)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DatasetError(f"file name {name!r} must be a plain file name inside {folder}, without folders")
    if len(name.encode()) > NAME_MAX:
        raise DatasetError(
            f"file name {name[:40]!r}... is longer than {NAME_MAX} bytes, which no common filesystem allows"
        )
    return Path(folder) / name


def read_csv(path: Path, columns: Sequence[str], dtype: Any = None) -> pd.DataFrame:
    """Read a UTF-8 CSV whose header holds ``columns`` (others are kept); anything else is a
    ``DatasetError`` naming the file. Empty cells stay empty strings, never NaN."""
    try:
        with warnings.catch_warnings():
            # Without index_col=False a first row longer than the header silently becomes the index;
            # with it, pandas only warns and drops the extra cells: make that an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(path, index_col=False, keep_default_na=False, dtype=dtype, encoding="utf-8")
    except (
        UnicodeDecodeError,
        pd.errors.ParserError,
        pd.errors.ParserWarning,
        pd.errors.EmptyDataError,
        ValueError,
    ) as err:
        raise DatasetError(f"{path}: not a readable UTF-8 CSV ({str(err).strip().splitlines()[0]})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        found = ", ".join(map(str, table.columns[:8]))
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(columns)}, found {found}"
        )
    return table


def read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read a table written by preprocessing; a missing file names the script that writes it."""
    return read_csv(require_file(path, "the preprocessing scripts (see README)"), columns)


def read_json(path: Path) -> Any:
    """Parse a JSON file written by this project; a damaged one is a ``DatasetError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``target`` to write to; rename it to ``target`` only when the
    block completes. The rename is atomic on one filesystem, so readers see the old file or the
    whole new one, never a half-written file after a crash."""
    target = Path(target)
    partial_file = target.with_suffix(target.suffix + ".partial")
    try:
        yield partial_file
        os.replace(partial_file, target)
    finally:
        partial_file.unlink(missing_ok=True)


def write_csv(table: pd.DataFrame, target: Path) -> None:
    """Write ``table`` to ``target`` as a CSV, atomically (``atomic_path``)."""
    with atomic_path(target) as partial_file:
        table.to_csv(partial_file, index=False)


def write_json(obj: Any, target: Path) -> None:
    """Write ``obj`` to ``target`` as indented UTF-8 JSON, atomically (``atomic_path``)."""
    text = json.dumps(obj, indent=2)  # serialised first: an object that cannot be leaves the old file untouched
    with atomic_path(target) as partial_file:
        partial_file.write_text(text, encoding="utf-8")


def write_caption_rows(
    rows: list[tuple[str, str]], problems: list[str], source: str, unit: str, dataset_dir: Path, split: str
) -> pd.DataFrame:
    """What a converter of another dataset ends with: each of ``problems`` (what it skipped) logged, then
    ``{split}_captions.csv`` written one caption per row (``fname,raw_text``, the form ``clotho_dataset.py`` reads
    with any number of captions per clip) from ``(file name, caption)`` rows; returns the table. No rows: a
    ``DatasetError`` naming ``source`` and what it reads one by one (``unit``: item, row), and nothing written."""
    for line in problems:
        log.warning(line)
    if not rows:
        raise DatasetError(f"{source}: no usable {unit} (see the warnings above); nothing written")
    table = pd.DataFrame(rows, columns=["fname", "raw_text"])
    write_csv(table, captions_csv(dataset_dir, split))
    return table


@contextmanager
def atomic_h5(target: Path) -> Iterator[h5py.File]:
    """Write an HDF5 file atomically (``atomic_path``): open it, fill it, and it appears whole."""
    with atomic_path(target) as partial_file, h5py.File(partial_file, "w") as f:
        yield f


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``target`` to fill; when the block completes it replaces ``target``: an
    older ``target`` is renamed away, the new one renamed in, then the old one deleted. Readers find the old
    folder or the whole new one (for the instant between the two renames, none); a failed block leaves the old."""
    target = Path(target)
    partial, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    if old.exists() and not target.exists():  # a crash between the two renames: the old folder is the only one
        os.replace(old, target)
    for leftover in (partial, old):  # of a crash or a failed run
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)
    finally:
        if old.exists() and not target.exists():  # the second rename failed: put the old folder back
            os.replace(old, target)
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def lock_file(dataset_dir: Path, split: str, kind: str) -> Path:
    """The lock of one split's ``kind`` of store: ``<dataset_dir>/.{split}_{kind}.lock``."""
    return Path(dataset_dir) / f".{split}_{kind}.lock"


@contextmanager
def split_lock(dataset_dir: Path, split: str, kind: str) -> Iterator[None]:
    """Hold the exclusive lock of ``split``'s ``kind`` of store (``index``, ``logmel``, ``text_embeds``, a tower
    store's name) while writing it: a second run on the same store fails at once with a ``DatasetError`` naming
    the run that holds it (its pid and start time, kept in the lock file). The OS drops the lock when the
    process ends, however it ends; the lock file stays (removing it would let two runs lock two files)."""
    path = lock_file(dataset_dir, split, kind)
    if fcntl is None:
        log.debug("%s: no fcntl here, so runs on the same split are not kept apart", path)
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            # a POSIX record lock (lockf), not flock: audio_logmel.py's workers fork from this process, and an
            # flock would stay held by them if this process were killed; a record lock is this process's alone
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES, by platform: held by another process
            pid, _, started = os.read(fd, 100).decode(errors="replace").strip().partition(" ")
            holder = f"pid {pid}, started {started}" if started else "just started"
            raise DatasetError(
                f"{path}: another preprocessing run ({holder}) is writing this split; wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {time.strftime('%H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_logmels(dataset_dir: Path, split: str, features: FeatureConfig) -> None:
    """Refuse log-mels made from another clip list (clip ids are positions in the sorted names, so one added
    file shifts them) or with other ``features``."""
    store, table = logmel_file(dataset_dir, split), audio_table(dataset_dir, split)
    audio = read_table(table, AUDIO_COLUMNS)
    with h5py.File(require_file(store, "preprocessing/audio_logmel.py"), "r") as f:
        if "source_fname" not in f:
            raise DatasetError(f"{store}: written by an older audio_logmel.py; rerun it")
        made_from = dict(zip(f["source_fid"][:].tolist(), f["source_fname"].asstr()[:].tolist()))
        stored = json.loads(f.attrs["features"])
    if made_from != dict(zip(audio["fid"].tolist(), audio["fname"].astype(str).tolist())):
        raise DatasetError(
            f"{store}: made from another clip list than {table.name}; rerun preprocessing/audio_logmel.py"
        )
    wanted = features.model_dump(mode="json")
    changed = [
        f"{key} {stored.get(key)!r} in the store, {value!r} in the config"
        for key, value in wanted.items()
        if stored.get(key) != value
    ]
    if changed:
        raise DatasetError(
            f"{store}: made with other features ({'; '.join(changed)}); "
            "rerun preprocessing/audio_logmel.py with this config"
        )


def check_caption_embeddings(dataset_dir: Path, split: str, text_embeddings: TextEmbeddingConfig | None) -> None:
    """Refuse caption embeddings missing captions of the table or (given ``text_embeddings``) made by
    another text model or from the other caption column."""
    embeds = text_embeds_file(dataset_dir, split)
    with h5py.File(require_file(embeds, "preprocessing/sbert_embeddings.py"), "r") as f:
        embedded = set(f["cid"][:].tolist())
        # stores from before the caption_column setting embedded the `text` column
        made_by = (str(f.attrs["model_name"]), str(f.attrs.get("caption_column", "text")))
    if text_embeddings is not None and made_by != (text_embeddings.model_name, text_embeddings.caption_column):
        raise DatasetError(
            f"{embeds}: made by {made_by[0]} from the {made_by[1]} column, the config asks for "
            f"{text_embeddings.model_name} on {text_embeddings.caption_column}; "
            "rerun preprocessing/sbert_embeddings.py with this config"
        )
    missing = sorted(set(read_table(text_table(dataset_dir, split), TEXT_COLUMNS)["cid"].tolist()) - embedded)
    if missing:
        raise DatasetError(
            f"{embeds}: no embedding for caption id(s) {missing[:8]} of {text_table(dataset_dir, split).name}; "
            "rerun preprocessing/sbert_embeddings.py"
        )


class RowStore:
    """Read access to a store of items, each a 2-D array: ``rows`` concatenated, ``offsets`` (n+1,), item ids
    (``ids``: one per item, several items per id for views of one clip) and per-item scalars (``extra/*``).
    The HDF5 handle opens lazily, so the store can be sent to DataLoader worker processes."""

    def __init__(self, path: Path, writer: str, rows: str = "rows", ids: str = "item_id") -> None:
        self.path, self.rows_name = require_file(path, writer), rows
        with h5py.File(self.path, "r") as f:
            self.ids = f[ids][:].astype(np.int64)
            self.offsets = f["offsets"][:].astype(np.int64)
            self.width = int(f[rows].shape[1])
            self.extras = {name: data[:] for name, data in f["extra"].items()} if "extra" in f else {}
        self.items_of: dict[int, list[int]] = {}
        for item, key in enumerate(self.ids.tolist()):
            self.items_of.setdefault(key, []).append(item)
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def rows(self, item: int) -> np.ndarray:
        """The ``(n, width)`` array of item number ``item``."""
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.rows_name][self.offsets[item] : self.offsets[item + 1]]

    def read_all(self) -> np.ndarray:
        """Every item's rows, concatenated ``(total rows, width)``: one read, for stores small enough."""
        with h5py.File(self.path, "r") as f:
            return f[self.rows_name][:]

    def item(self, item: int) -> dict[str, np.ndarray]:
        """Item number ``item`` as an extractor makes it: ``rows`` plus its scalars."""
        return {"rows": np.asarray(self.rows(item), dtype=np.float32)} | {
            name: values[item] for name, values in self.extras.items()
        }


class LogmelStore(RowStore):
    """Read access to ``{split}_logmel.h5``: clip ``fid`` -> ``(frames, n_mels)`` float32 (all clips concatenated
    along time in ``logmel``, ``offsets`` (n+1,) marking each clip's rows: one contiguous slice read)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "preprocessing/audio_logmel.py", rows="logmel", ids="fid")
        self.fids, self.n_mels = self.ids, self.width
        self.row_of = {int(fid): row for row, fid in enumerate(self.fids)}

    def __getitem__(self, fid: int) -> np.ndarray:
        return self.rows(self.row_of[int(fid)])


def read_text_embeds(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """``(cids (n,), embeddings (n, dim) float32, model name)`` from ``{split}_text_embeds.h5``."""
    with h5py.File(require_file(path, "preprocessing/sbert_embeddings.py"), "r") as f:
        return f["cid"][:].astype(np.int64), f["embedding"][:].astype(np.float32), str(f.attrs["model_name"])


def text_embed_dim(path: Path) -> int:
    """Width of the sentence embeddings in ``{split}_text_embeds.h5``, read without loading them."""
    with h5py.File(require_file(path, "preprocessing/sbert_embeddings.py"), "r") as f:
        return int(f["embedding"].shape[1])
