"""The teachers of salsa's stage 2: which trained models they are, their embeddings of the training split, stored
once in HDF5, and the averaged cosine scores a training batch reads from them (no Ray here).

The store (``store_location``) holds one group per teacher, in rank order (``teachers/0`` the best), each with
its ``id``, ``checkpoint`` and selection ``value`` as attributes and the training split's clip ids ``fids``
``(n_audio,)`` and caption ids ``cids`` ``(n_captions,)``, then either unit vectors ``audio`` ``(n_audio, E)`` and
``text`` ``(n_captions, E)`` or, for a teacher with a text-aware pooling head (whose pair scores do not factor
into two vectors), its whole ``scores`` matrix ``(n_audio, n_captions)`` in float16. The store's attributes name
the teachers (``ids``), the ``split`` and a ``digest`` of the split's clip and caption tables (the ids are
positions in them): a store with the same teachers and digest is not written again, and training refuses a store
whose digest is not its dataset's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from utils.checkpoints import load_trained_model
from utils.config import Config, DistillationConfig
from utils.config_files import is_uri
from utils.errors import ConfigError, DatasetError
from utils.experiments import BEST_FILE
from utils.inference import encode_split
from utils.reporting import RESULTS_TABLE
from utils.storage import download, exists, file_time, join, mirror, parent, read_bytes, read_json_at, upload
from utils.stores import AUDIO_COLUMNS, TEXT_COLUMNS, atomic_h5, audio_table, read_table, text_table

log = logging.getLogger(__name__)

GROUP = "teachers"


@dataclass
class Teacher:
    """One teacher: its id (a trial id, or the checkpoint's path), where its checkpoint is, and its selection
    metric's value (None for a named checkpoint)."""

    id: str
    checkpoint: str
    value: float | None = None


def store_location(config: Config) -> str | Path:
    """Where the teachers' store of ``config`` is: ``distillation.store``, or ``teachers_<split>_top<k>.h5`` in the
    teachers' experiment."""
    distillation = config.distillation
    if distillation.store is not None:
        return distillation.store if is_uri(distillation.store) else Path(distillation.store)
    return join(distillation.teachers, f"{GROUP}_{config.data.train_split}_top{distillation.top_k}.h5")


def mirror_file(uri: str | Path) -> Path:
    """Where the file at a cloud ``uri`` is copied: its folder's local mirror (``utils.storage.mirror``)."""
    return mirror(parent(uri)) / Path(str(uri)).name


def local_file(location: str | Path) -> Path:
    """A local copy of the file at ``location`` (itself, or its copy in the local mirror of a cloud folder)."""
    if not is_uri(location):
        return Path(location)
    local = mirror_file(location)
    if local.is_file() and local.stat().st_mtime >= (file_time(location) or 0):
        return local
    return download(str(location), local)  # missing here, or rewritten there since


def select_teachers(distillation: DistillationConfig) -> list[Teacher]:
    """The named checkpoints (the first one listed counts as the best), or the ``top_k`` best trials of the
    teachers' experiment that did not fail (its ``results.csv``, best first: each trial's best kept checkpoint).
    ``ConfigError`` when the experiment has none to give."""
    if distillation.checkpoints:
        return [Teacher(str(path), str(path)) for path in distillation.checkpoints]
    table_file = join(distillation.teachers, RESULTS_TABLE)
    if not exists(table_file) or not exists(join(distillation.teachers, BEST_FILE)):
        raise ConfigError(
            f"distillation.teachers: {distillation.teachers} has no {RESULTS_TABLE} and {BEST_FILE}: not a finished "
            "experiment of main.py"
        )
    table = pd.read_csv(io.BytesIO(read_bytes(table_file)), keep_default_na=False)
    if "checkpoint" not in table:
        raise ConfigError(
            f"distillation.teachers: {table_file} names no checkpoints (an older main.py wrote it): give them as "
            "distillation.checkpoints"
        )
    usable = table[(table["checkpoint"] != "") & (table["status"] != "ERROR")]
    if usable.empty:
        raise ConfigError(f"distillation.teachers: no trial of {distillation.teachers} kept a checkpoint")
    if len(usable) < distillation.top_k:
        log.warning(
            "distillation.top_k %d: %s has %d usable trials", distillation.top_k, distillation.teachers, len(usable)
        )
    metric = read_json_at(join(distillation.teachers, BEST_FILE))["metric"]  # what results.csv is sorted by
    teachers = []
    for _, row in usable.head(distillation.top_k).iterrows():
        # the checkpoint relative to the experiment's folder, so that a moved or copied experiment still teaches
        checkpoint = str(row["checkpoint"])
        if not is_uri(checkpoint) and not Path(checkpoint).is_absolute():
            checkpoint = str(join(distillation.teachers, checkpoint))
        value = float(row[metric]) if metric in row and row[metric] != "" else None
        teachers.append(Teacher(str(row["trial_id"]), checkpoint, value))
    return teachers


def split_digest(dataset_dir: Path, split: str) -> str:
    """A digest of a split's clip ids and file names and its caption ids and texts (``{split}_audio.csv``,
    ``{split}_text.csv``): what a teachers' store's ids mean."""
    audio = read_table(audio_table(dataset_dir, split), AUDIO_COLUMNS)[["fid", "fname"]]
    text = read_table(text_table(dataset_dir, split), TEXT_COLUMNS)[["cid", "raw_text"]]
    return hashlib.sha256((audio.to_csv(index=False) + text.to_csv(index=False)).encode()).hexdigest()


def store_checkpoints(path: Path) -> list[str]:
    """The checkpoints of the teachers a store at ``path`` holds, best first."""
    with h5py.File(path, "r") as f:
        return [f[f"{GROUP}/{i}"].attrs["checkpoint"] for i in range(len(f[GROUP]))]


def store_attrs(path: Path) -> dict[str, str]:
    """A store's ``ids`` (JSON), ``split`` and ``digest``; empty when there is no readable store at ``path``."""
    try:
        with h5py.File(path, "r") as f:
            return {key: str(f.attrs[key]) for key in ("ids", "split", "digest")}
    except (OSError, KeyError):
        return {}


def store_teacher_ids(path: Path) -> list[str] | None:
    """The teacher ids a store at ``path`` lists, or None when there is no readable store."""
    attrs = store_attrs(path)
    return json.loads(attrs["ids"]) if attrs else None


def check_teacher_dataset(teacher_id: str, teacher: Config, config: Config) -> None:
    """A teacher (its config) was trained on the student's ``data.dataset_dir``, or a ``ConfigError``: the store is
    keyed by the dataset's clip and caption ids."""
    if Path(teacher.data.dataset_dir).resolve() != Path(config.data.dataset_dir).resolve():
        raise ConfigError(
            f"distillation: teacher {teacher_id} was trained on {teacher.data.dataset_dir}, not on "
            f"data.dataset_dir {config.data.dataset_dir}: its ids would name other clips"
        )


@torch.no_grad()
def write_teacher_store(teachers: list[Teacher], config: Config, path: Path, device: torch.device) -> Path:
    """Embed every clip and caption of ``config``'s training split with each teacher, once, and write the store
    at ``path`` (atomically). A teacher trained on another dataset is a ``ConfigError``."""
    split = config.data.train_split
    with atomic_h5(path) as f:
        f.attrs["ids"] = json.dumps([t.id for t in teachers])
        f.attrs["split"] = split
        f.attrs["digest"] = split_digest(config.data.dataset_dir, split)
        for rank, teacher in enumerate(teachers):
            model, own = load_trained_model(local_file(teacher.checkpoint), device)
            check_teacher_dataset(teacher.id, own, config)
            embeds = encode_split(model, own, split, device, own.param_conf.batch_size)
            group = f.create_group(f"{GROUP}/{rank}")
            group.attrs.update(
                id=teacher.id, checkpoint=teacher.checkpoint, value=np.nan if teacher.value is None else teacher.value
            )
            group.create_dataset("fids", data=embeds.fids)
            group.create_dataset("cids", data=embeds.cids)
            if model.text_aware:  # pair scores through the head: the whole matrix
                group.create_dataset("scores", data=embeds.scores().numpy().astype(np.float16))
            else:
                group.create_dataset("audio", data=embeds.audio.pooled().numpy())
                group.create_dataset("text", data=F.normalize(embeds.text, dim=-1).numpy())
            log.info(
                "teacher %d/%d %s: %d clips, %d captions of %s",
                rank + 1,
                len(teachers),
                teacher.id,
                len(embeds.fids),
                len(embeds.cids),
                split,
            )
    return path


def ensure_teacher_store(config: Config, device: torch.device, overwrite: bool = False) -> str | Path:
    """The teachers' store of ``config``, written first unless one of the same teachers and split exists (or with
    ``overwrite``); a cloud store is written in the local mirror, then uploaded. Returns its location."""
    teachers = select_teachers(config.distillation)
    location = store_location(config)
    split = config.data.train_split
    ids = [t.id for t in teachers]
    wanted = {"ids": json.dumps(ids), "split": split, "digest": split_digest(config.data.dataset_dir, split)}
    if not is_uri(location):
        local = Path(location)
    elif exists(location):
        local = local_file(location)  # the newest copy, in the local mirror
    else:
        local = mirror_file(location)
    if not overwrite and store_attrs(local) == wanted:
        log.info("teachers' store %s is up to date (%s)", location, ", ".join(ids))
        return location
    log.info("embedding %s with %d teacher(s) into %s", config.data.train_split, len(teachers), location)
    write_teacher_store(teachers, config, local, device)
    if is_uri(location):
        upload(local, str(location))
    return location


class TeacherScores:
    """The teachers' averaged cosine of any (clip, caption) pairs of the training split, from their store, held in
    memory (a text-aware teacher's matrix in float16); ``fids`` and ``cids`` are the ids training will ask for, every
    one checked to be in every teacher, and ``digest`` the dataset's (``split_digest``), checked against the store's."""

    def __init__(self, path: Path, fids: np.ndarray, cids: np.ndarray, digest: str) -> None:
        if store_attrs(path).get("digest") != digest:
            raise DatasetError(
                f"{path} was written for other clip and caption ids than the dataset's now (re-indexed since?): "
                "delete it, or rewrite it with postprocessing/teachers.py --overwrite"
            )
        self.parts: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.checkpoints = store_checkpoints(path)
        with h5py.File(path, "r") as f:
            group = f[GROUP]
            for i in range(len(group)):
                teacher = group[str(i)]
                rows = {
                    name: torch.from_numpy(teacher[name][:]) for name in ("audio", "text", "scores") if name in teacher
                }
                audio_row = _row_lookup(teacher["fids"][:], fids, f"{path}: teacher {teacher.attrs['id']}", "clip fid")
                text_row = _row_lookup(
                    teacher["cids"][:], cids, f"{path}: teacher {teacher.attrs['id']}", "caption cid"
                )
                self.parts.append((audio_row, text_row, rows))

    def __len__(self) -> int:
        return len(self.parts)

    def __call__(self, audio_ids: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """``(N, N)`` mean over the teachers of the cosine between clip ``audio_ids[i]`` and caption
        ``caption_ids[j]`` (both ``(N,)``), on their device."""
        a, c = audio_ids.cpu(), caption_ids.cpu()
        total = torch.zeros(len(a), len(c))
        for audio_row, text_row, rows in self.parts:  # a handful of teachers; each term is one matrix product
            if "scores" in rows:  # only the batch's (N, N) entries, widened from float16
                total += rows["scores"][audio_row[a][:, None], text_row[c][None, :]].float()
            else:
                total += rows["audio"][audio_row[a]] @ rows["text"][text_row[c]].T
        return (total / len(self.parts)).to(audio_ids.device)


def _row_lookup(stored: np.ndarray, wanted: np.ndarray, source: str, what: str) -> torch.Tensor:
    """A table from id to row of ``stored`` ids ``(n,)``, as a tensor indexed by id (-1 for ids not stored);
    ``DatasetError`` naming ``source`` when an id of ``wanted`` is missing."""
    table = torch.full((int(max(stored.max(initial=0), wanted.max(initial=0))) + 1,), -1, dtype=torch.long)
    table[torch.from_numpy(stored.astype(np.int64))] = torch.arange(len(stored))
    missing = wanted[table[torch.from_numpy(wanted.astype(np.int64))].numpy() < 0]
    if len(missing):
        raise DatasetError(f"{source} has no {what} {int(missing[0])} ({len(missing)} missing): rebuild the store")
    return table
