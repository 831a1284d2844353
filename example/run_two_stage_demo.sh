#!/usr/bin/env bash
# salsa's two stages on the demo's shared variant, over several seeds: for each seed, main.py runs
# example/recipes/demo_two_stage.yaml (stage 1: a 3-trial search; stage 2: distilling from its best 3 trials,
# with the distillation weight 0 as the control and 1), then every stage's model is scored on the evaluation
# split, by the pairing (Clotho's protocol, mAP@10) and by the relevance table (DCASE 2025's, mAP@16). Prints
# one table, mean and spread over the seeds. Usage: bash example/run_two_stage_demo.sh [SEED ...] (default 1 2 3)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
py=.venv/bin/python
seeds=("${@:-1 2 3}")
read -r -a seeds <<< "${seeds[*]}"
for seed in "${seeds[@]}"; do
  $py main.py --config example/recipes/demo_two_stage.yaml seed="$seed" experiment="demo-two-stage-s$seed"
done
$py - "${seeds[@]}" <<'PY'
import json
import sys
from pathlib import Path

import pandas as pd

from postprocessing.xmodal_retrieval import evaluate
from utils.config import load_raw, validate
from utils.experiments import find_best_file

config = validate(load_raw("example/recipes/demo_two_stage.yaml"))
storage = config.ray_conf.storage_path
rows = []
for seed in sys.argv[1:]:
    first = Path(find_best_file(storage, f"demo-two-stage-s{seed}-stage1")).parent
    second = Path(find_best_file(storage, f"demo-two-stage-s{seed}")).parent
    table = pd.read_csv(second / "results.csv")
    arms = {"stage 1 (best trial)": (first / "best", first / "evaluation")}
    for weight in (0.0, 1.0):
        row = table[table["param/distillation.weight"].astype(float) == weight].iloc[0]
        # results.csv names each trial's best checkpoint relative to the experiment's folder
        arms[f"stage 2, distillation weight {weight:g}"] = (second / row["checkpoint"], second / f"evaluation_w{weight:g}")
    for arm, (checkpoint, out) in arms.items():
        out.mkdir(exist_ok=True)
        evaluate(checkpoint, out, config.data.eval_split, relevance="dataset")
        saved = json.loads((out / "retrieval_metrics.json").read_text())
        rows.append(
            {
                "seed": seed,
                "model": arm,
                "t2a mAP@10 (pairing)": saved["t2a"]["mAP@10"],
                "t2a R@1 (pairing)": saved["t2a"]["R@1"],
                "t2a mAP@10 (relevance)": saved["relevance"]["t2a"]["mAP@10"],
                "t2a mAP@16 (relevance)": saved["relevance"]["t2a"]["mAP@16"],
            }
        )
frame = pd.DataFrame(rows)
print(frame.to_string(index=False, float_format="%.3f"))
summary = frame.drop(columns="seed").groupby("model", sort=False).agg(["mean", "std", "min", "max"])
print(f"\nover {len(sys.argv) - 1} seeds (mean, std, min, max):")
print(summary.to_string(float_format="%.3f"))
PY
