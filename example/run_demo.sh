#!/usr/bin/env bash
# The whole pipeline on the embedded demo dataset, from a fresh clone: install, then main.py (which generates
# and preprocesses the data, then tunes with Ray Tune), then score the best trial and an untrained model of the
# same config on the evaluation split, with the HTML report. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0  # nothing is downloaded at run time

declare -a timings=()
lap() {  # lap NAME: record the seconds since the previous lap
  timings+=("$1 $((SECONDS - ${last:-0})) s")
  last=$SECONDS
}

python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
lap install
py=.venv/bin/python

# main.py generates and preprocesses data/demo itself when it is missing (logging how long that took), as
# preprocessing/demo_dataset.py, clotho_dataset.py, audio_logmel.py and sbert_embeddings.py would one by one
$py main.py
lap "demo data and tuning"
$py postprocessing/xmodal_retrieval.py --untrained
$py postprocessing/xmodal_retrieval.py --report
lap scoring
$py - <<'PY'
import json
from utils.config import load_raw, validate
from utils.experiments import find_best_file
config = validate(load_raw("conf.yaml"))
folder = find_best_file(config.ray_conf.storage_path, config.experiment).parent
trained = json.loads((folder / "retrieval_metrics.json").read_text())["t2a"]["mAP@10"]
untrained = json.loads((folder / "retrieval_metrics_untrained.json").read_text())["t2a"]["mAP@10"]
print(f"\nevaluation t2a mAP@10: best trial {trained:.4f}, untrained {untrained:.4f} ({trained / untrained:.1f}x)")
print(f"report: {folder / 'evaluation.report.html'}")
print(f"results: {folder}")
PY
printf 'time: %s; total %d s\n' "$(IFS=,; echo "${timings[*]}" | sed 's/,/, /g')" "$SECONDS"
