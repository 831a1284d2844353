"""Convert a PANNs ``Cnn14_mAP=0.431.pth`` checkpoint into ``CNN14Encoder`` weights (safetensors).

PANNs stores its state dict under the key ``model`` with layers ``bn0``,
``conv_block1..6.{conv1,conv2,bn1,bn2}``, ``fc1`` and ``fc_audioset``, plus the STFT and
mel front-end buffers. The encoder keeps ``bn0``, the conv blocks and ``fc1`` (the 2048-d
embedding) under the same names; the AudioSet classifier and the front end are dropped
because features are precomputed by ``audio_logmel.py``. Point ``model.audio_enc.weight``
at the output file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file: import the project from its root, as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import exit_on_input_error, make_parser, setup_logging


def build_parser() -> argparse.ArgumentParser:
    """This script's command line."""
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="PANNs Cnn14_mAP=0.431.pth")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("pretrained/CNN14Encoder.safetensors"),
        help="output file (default: pretrained/CNN14Encoder.safetensors)",
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and usage errors answer here, before torch loads (seconds)

import torch
from safetensors.torch import save_file

from models import CNN14Encoder
from models.weights import check_state_dict, read_torch_file
from utils.errors import CheckpointError
from utils.stores import atomic_path

log = logging.getLogger("cnn14_transfer")

PANNS_N_MELS = 64
DROPPED_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "fc_audioset.")


def convert_panns_state(
    panns_state: dict[str, torch.Tensor], source: str = "PANNs checkpoint"
) -> dict[str, torch.Tensor]:
    """PANNs Cnn14 state dict -> ``CNN14Encoder`` state dict; every encoder tensor must be present with its shape
    (``CheckpointError`` listing the keys otherwise)."""
    expected = CNN14Encoder(n_mels=PANNS_N_MELS).state_dict()
    kept = {k: v for k, v in panns_state.items() if not k.startswith(DROPPED_PREFIXES)}
    check_state_dict(expected, kept, source)
    return {k: kept[k].detach().clone().contiguous() for k in expected}


def transfer(panns_checkpoint: Path, output: Path) -> Path:
    """Read a PANNs checkpoint safely (``weights_only``) and write the encoder weights to ``output``."""
    checkpoint = read_torch_file(panns_checkpoint)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{panns_checkpoint}: expected a dict with the state dict under 'model'")
    state = convert_panns_state(checkpoint["model"], str(panns_checkpoint))
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as partial_file:
        save_file(state, str(partial_file))
    log.info(
        "wrote %d tensors (%.1fM parameters) to %s", len(state), sum(v.numel() for v in state.values()) / 1e6, output
    )
    return output


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    setup_logging()
    with exit_on_input_error():
        transfer(args.checkpoint, args.output)


if __name__ == "__main__":
    main()
