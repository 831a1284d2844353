"""Retrieve with a trained checkpoint: best captions for each audio file, best clips for each caption.

Audio files are analysed with the checkpoint's own feature settings and captions embedded
with its Sentence-BERT model, so any wav/flac/ogg file and any sentence can be queried.
Candidates are the given files and captions plus, with ``--gallery``, every clip and caption
of a dataset split.

    python example/retrieve.py --audio example/example.wav --caption "a dog barks" "rain falls"
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from utils.audio import file_logmel  # noqa: E402
from utils.errors import exit_on_input_error  # noqa: E402
from utils.data import pad_logmels  # noqa: E402
from utils.experiments import best_model  # noqa: E402
from utils.runtime import resolve_device  # noqa: E402
from utils.text import load_sentence_model  # noqa: E402
from utils.training import embed_split, load_trained_model  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CAPTIONS = [
    "Three high beeps, then a burst of static noise.",
    "A low electrical hum followed by a rising whistle.",
    "Birds chirp while cars pass by on a wet road.",
    "Rain falls steadily on a metal roof.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", type=Path, nargs="+", default=[HERE / "example.wav"], help="audio files to query with (default: example/example.wav)")
    parser.add_argument("--caption", nargs="+", default=DEFAULT_CAPTIONS, help="captions to query with")
    parser.add_argument("--gallery", metavar="SPLIT", help="also rank every clip and caption of this split of the checkpoint's dataset")
    parser.add_argument("--top", type=int, default=5, help="results per query (default: 5)")
    parser.add_argument("--best", type=Path, help="best.json of an experiment (default: the latest)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint.pt or exported model folder to use instead of best.json's")
    parser.add_argument("--config", type=Path, default=HERE.parent / "conf.yaml", help="config naming ray_conf.storage_path (default: conf.yaml)")
    args = parser.parse_args()

    with exit_on_input_error():
        retrieve(args)


@torch.no_grad()
def retrieve(args: argparse.Namespace) -> None:
    """Embed the query files and captions (and the gallery split), then print the best matches both ways."""
    device = resolve_device("auto")
    checkpoint = args.checkpoint or best_model(args.best, args.config)[0]
    model, config = load_trained_model(checkpoint, device)
    batch, lengths = pad_logmels([file_logmel(path, config.features) for path in args.audio])
    audio_names = [p.name for p in args.audio]
    audio = model.encode_audio(batch.to(device), lengths.to(device))  # (n_files, E)
    sentence_model = load_sentence_model(config.text_embeddings.model_name, device)
    sentence_embeds = torch.from_numpy(sentence_model.encode(args.caption, convert_to_numpy=True))
    captions = list(args.caption)
    text = model.encode_text(sentence_embeds.to(device))  # (n_captions, E)
    if args.gallery:
        gallery = embed_split(model, config.data.dataset_dir, args.gallery, device)
        audio, audio_names = torch.cat([audio, gallery.audio.to(device)]), audio_names + gallery.fnames
        text, captions = torch.cat([text, gallery.text.to(device)]), captions + gallery.captions
    scores = (audio @ text.T).cpu()  # (n_audio, n_captions) cosine similarity

    for i, path in enumerate(args.audio):
        print(f"\nCaptions for {path}:")
        values, order = scores[i].topk(min(args.top, scores.shape[1]))
        for value, j in zip(values, order):
            print(f"  {value:+.3f}  {captions[j]}")
    for j, caption in enumerate(args.caption):
        print(f"\nClips for {caption!r}:")
        values, order = scores[:, j].topk(min(args.top, scores.shape[0]))
        for value, i in zip(values, order):
            print(f"  {value:+.3f}  {audio_names[i]}")


if __name__ == "__main__":
    main()
