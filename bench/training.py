"""Training epochs: what the data path costs, and what caching a frozen backbone saves.

- A real training epoch (``utils.training.run_epoch`` on the project's data loader over an HDF5 log-mel store and
  a caption-vector store, conf.yaml's CNN shrunk, its loss and optimizer) against a pure forward/backward loop
  over the same batches already in memory: the same model, optimizer and steps. Checked first: from the same
  weights and seed both arms end the epoch with the same weights.
- An epoch of the Whisper-embedder recipe (a frozen ``WhisperModel`` encoder, a linear adapter, mean pooling)
  reading its cached backbone outputs against the same epoch running that frozen backbone each step on the stored
  model inputs: the same tiny backbone (a randomly initialised ``WhisperModel``, ``models/tiny.py``) in
  both arms. The text side reads stored caption vectors, so that the backbone is the only difference. Checked
  first: the same mean loss from the same weights and seed.

The arms of each comparison are timed alternately, round after round, so that both see the same load; the
check epochs are the warm-up.

    python bench/training.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(REPO_ROOT))

import torch

from bench.common import Row, Timing, measure, seconds
from bench.memory import write_caption_vectors, write_random_dataset
from models.losses import LOSSES
from models.tiny import tiny_whisper
from models.weights import load_weights
from preprocessing.clotho_dataset import index_splits
from preprocessing.demo_dataset import DEMO_CLIPS, write_demo_dataset
from preprocessing.tower_stores import prepare_split, write_audio_store
from utils.checkpoints import build_model
from utils.config import Config, load_config, load_raw, validate, with_overrides
from utils.data import CaptionPairs, StoredViews, TrainingPairs, pair_loader
from utils.extractors import make_extractor
from utils.stores import TEXT_COLUMNS, read_table, text_table
from utils.training import make_optimizer, run_epoch

CPU = torch.device("cpu")
SPLIT = "development"
# conf.yaml's SmallCNNEncoder ([8, 16, 32, 64] channels, 128-d) shrunk to an epoch of ~10 s on 2 cores
EPOCH_CNN = ["model.audio_enc.channels=[4, 8, 16]", "model.audio_enc.out_dim=64", "model.embed_dim=64"]
# the frozen tower: Whisper's encoder layout (80 mels, two convolutions, 6 s windows) at a small width
WHISPER = {"d_model": 128, "layers": 2, "heads": 4}
QUICK_WHISPER = {"d_model": 32, "layers": 1, "heads": 2}


def alternate(arms: dict[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    """Each arm timed once per round, the arms one after the other, for ``rounds`` rounds (warm up first)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name].append(measure(fn, repeats=1, warmup=0).min_s)
    return {name: Timing(min(t), statistics.median(t), rounds) for name, t in times.items()}


def from_same_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer, arms: list[Callable[[], object]]):
    """Run each arm from the model's and optimizer's present state with the same torch seed; returns what each
    arm returned and the model's weights after it (``{name: tensor}``)."""
    start = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    results = []
    for arm in arms:
        load_weights(model, start[0], "the start")  # a frozen backbone is left out of state_dict: kept as it is
        optimizer.load_state_dict(start[1])
        torch.manual_seed(0)  # the same dropout draws
        out = arm()
        results.append((out, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return results


def epoch_config(dataset_dir: Path) -> Config:
    """conf.yaml with the shrunk CNN on ``dataset_dir``, on the CPU."""
    overrides = [*EPOCH_CNN, "device=cpu", f"data.dataset_dir={dataset_dir}", "ray_conf.search_space={}"]
    return load_config(REPO_ROOT / "conf.yaml", overrides)[0]


def real_epoch_vs_in_memory(quick: bool) -> Row:
    """A training epoch through the data loader against the same steps on batches held in memory."""
    clips = DEMO_CLIPS[SPLIT] // (10 if quick else 1)
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench_training_") as root:
        config = epoch_config(Path(root))
        write_random_dataset(Path(root), {SPLIT: clips}, config.features, config.text_embeddings)
        params = config.param_conf
        dataset = TrainingPairs(config)
        # a new loader per epoch with the trial's seed: each epoch draws the batches the in-memory loop holds
        loader = lambda: pair_loader(dataset, params.batch_size, True, config.seed, params.num_workers)
        batches = list(loader())  # {"audio": {"logmels": (B, T, 64), "lengths": (B,)}, "text": ..., "audio_ids"}
        model = build_model(config, CPU)
        criterion = LOSSES.build(config.criterion)
        optimizer = make_optimizer(model, config.optimizer)

        def real() -> float:
            return run_epoch(model, loader(), criterion, CPU, optimizer, params)

        def in_memory() -> None:
            model.train(True)
            for batch in batches:
                scores = model(batch["audio"], batch["text"])  # (B, B) cosines
                loss = criterion.from_pair_scores(scores, batch["audio_ids"], logit_scale=model.scale())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        (_, after_real), (_, after_pure) = from_same_start(model, optimizer, [real, in_memory])  # and the warm-up
        if not all(torch.allclose(after_real[k], after_pure[k], rtol=1e-5, atol=1e-6) for k in after_real):
            raise AssertionError("the in-memory loop does not take the steps run_epoch takes")
        timing = alternate({"real": real, "pure": in_memory}, rounds)
    ratio = timing["pure"].min_s / timing["real"].min_s
    return Row(
        what=f"a real training epoch: {len(dataset)} pairs of {clips} clips, batch {params.batch_size}, "
        f"{len(batches)} steps, HDF5 stores, data loader ({params.num_workers} workers), {config.criterion.name}, "
        f"{config.optimizer.name}, SmallCNNEncoder {list(config.model.audio_enc.channels)}",
        figure=str(timing["real"]),
        against=f"pure forward/backward over the same batches in memory: {timing['pure']}",
        ratio=f"{ratio:.2f} of the pure loop's speed",
        target=">= 0.9",
        met=ratio >= 0.9,
        note="best of alternating rounds; from the same start both arms end with the same weights (checked)"
        + (
            "" if ratio >= 0.9 else f"; missed by {0.9 - ratio:.2f}: the loader, or other load on the machine (medians)"
        ),
    )


def whisper_config(dataset_dir: Path, whisper: Path, batch_size: int) -> Config:
    """The Whisper-embedder recipe on ``dataset_dir`` with the tiny frozen encoder at ``whisper``, stored caption
    vectors on the text side and a linear projection to 32 dimensions, fp32 on the CPU."""
    raw = load_raw(REPO_ROOT / "example" / "recipes" / "whisper_embedder.yaml")
    return validate(
        with_overrides(
            raw,
            {
                "data.dataset_dir": str(dataset_dir),
                "device": "cpu",
                "model.audio_enc.model_id": str(whisper),
                "model.audio_enc.adapter.out_dim": 32,
                "model.text_enc": {"name": "SentBERTBaseEncoder"},
                "model.projection": {"name": "LinearProjection"},
                "model.embed_dim": 32,
                "param_conf.batch_size": batch_size,
                "param_conf.precision": "fp32",
                "param_conf.num_workers": 0,
                "ray_conf.storage_path": str(dataset_dir / "runs"),
            },
        )
    )


def cached_vs_running_backbone(quick: bool) -> Row:
    """An epoch on a frozen Whisper encoder's cached outputs against the epoch running it each step."""
    clips, batch_size = (16, 16) if quick else (64, 32)
    rounds = 1 if quick else 3
    size = QUICK_WHISPER if quick else WHISPER
    with tempfile.TemporaryDirectory(prefix="bench_whisper_") as root:
        dataset_dir = Path(root) / "data"
        write_demo_dataset(dataset_dir, {SPLIT: clips}, seed=0)  # audio: the stores are computed from it
        index_splits(dataset_dir, [SPLIT])
        config = whisper_config(dataset_dir, tiny_whisper(Path(root) / "whisper", **size), batch_size)
        cids = read_table(text_table(dataset_dir, SPLIT), TEXT_COLUMNS)["cid"].to_numpy()
        write_caption_vectors(dataset_dir, SPLIT, cids, config.text_embeddings, seed=0)
        start = time.perf_counter()
        prepare_split(config, SPLIT, "cpu")  # the backbone once per clip: its mean output frame per clip
        store_s = time.perf_counter() - start
        # what the running arm reads: the same clips' model inputs, stored as a trainable tower reads them
        as_inputs = validate(with_overrides(config.model_dump(mode="json"), {"model.audio_enc.trainable": True}))
        inputs_store = write_audio_store(as_inputs, SPLIT, CPU)

        torch.manual_seed(0)
        cached = build_model(config, CPU)  # reads the store, no backbone
        running = build_model(config, CPU, backbones=True)  # the frozen encoder, run every step
        load_weights(running, cached.state_dict(), "cached model")
        criterion = LOSSES.build(config.criterion)
        cached_data = CaptionPairs(config, SPLIT)
        running_data = CaptionPairs(config, SPLIT)
        running_data.audio = StoredViews(inputs_store, make_extractor(as_inputs.model.audio_enc).collate)
        arms = {}
        for name, model, data in (("cached", cached, cached_data), ("running", running, running_data)):
            optimizer = make_optimizer(model, config.optimizer)

            def epoch(model=model, data=data, optimizer=optimizer) -> float:
                return run_epoch(model, pair_loader(data, batch_size, True, 0), criterion, CPU, optimizer)

            ((loss, _),) = from_same_start(model, optimizer, [epoch])  # and the warm-up
            arms[name] = (epoch, loss)
        if abs(arms["cached"][1] - arms["running"][1]) > 1e-4 * abs(arms["running"][1]):
            raise AssertionError(f"the arms' losses differ: {arms['cached'][1]} and {arms['running'][1]}")
        timing = alternate({name: fn for name, (fn, _) in arms.items()}, rounds)
    ratio = timing["running"].min_s / timing["cached"].min_s
    width = f"{size['layers']} layers, {size['d_model']} wide"
    return Row(
        what=f"an epoch of the Whisper-embedder recipe on cached backbone outputs: {len(cached_data)} pairs of "
        f"{clips} demo clips, batch {batch_size}, frozen WhisperModel encoder ({width}, 6 s windows)",
        figure=str(timing["cached"]),
        against=f"the same epoch running the frozen backbone each step: {timing['running']}",
        ratio=f"{ratio:.1f}x faster",
        target=">= 10x",
        met=ratio >= 10,
        note=f"the same losses in both arms (checked); the store itself took {seconds(store_s)} once for the split"
        + ("" if ratio >= 10 else f"; missed by {10 - ratio:.1f}x"),
    )


def run(quick: bool) -> list[Row]:
    """Both comparisons (``quick``: a tenth of the demo's clips, the tests' Whisper size, one round)."""
    return [real_epoch_vs_in_memory(quick), cached_vs_running_backbone(quick)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    for row in run(parser.parse_args().quick):
        print(row)


if __name__ == "__main__":
    main()
