#!/usr/bin/env bash
# GPU smoke benchmark: bf16 DeepSpeed ZeRO-2 (configs/trainer/deepspeed_stage_2.yaml, unchanged) training the
# MM-DiT for a few hundred steps on random latents with text conditions, through the real
# `python -m flowmatch fit`. Prints samples/s, model FLOPs utilisation (FLOPs of one real training step,
# counted by torch's FlopCounterMode, against the GPU's peak bf16 FLOP/s) and peak GPU memory, per
# flowmatch.strategies.SpeedMonitor, plus each rank's optimizer state.
#
#   bash benchmarks/gpu_smoke.sh                          # 1 GPU, MM-DiT d16 (~600M), batch 32 of 16x32x32 latents, 300 steps
#   bash benchmarks/gpu_smoke.sh --devices 8 --steps 500  # all GPUs of a node
#   bash benchmarks/gpu_smoke.sh --model configs/model/mmdit_depth24.yaml --batch 16
#   bash benchmarks/gpu_smoke.sh --cpu-dry-run            # no GPU: the same path on CPU, tiny model, a few steps
#
# Status: UNMEASURED on a GPU. Written and dry-run on CPU only (--cpu-dry-run); no GPU numbers exist yet.
# Data: tests/helpers_latents.RandomLatentsDataModule (random tensors shaped like the demo latents, so the
# measurement is of the model and the strategy, not of data loading). Needs the repository checkout.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS=300
MODEL="configs/model/mmdit_depth16.yaml"
BATCH=32
LATENT=32          # latent side: 32 = 256 px images through an 8x autoencoder
TOKENS=32
DEVICES=1
WARMUP=20
DRY=0
OUT=""

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) DRY=1; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --batch) BATCH="$2"; shift 2 ;;
    --latent-size) LATENT="$2"; shift 2 ;;
    --devices) DEVICES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

ACCEL=gpu
if [[ "$DRY" == 1 ]]; then
  # the same command on CPU processes: tiny MM-DiT, tiny latents, a few steps (checks the path, measures nothing)
  ACCEL=cpu; STEPS=4; MODEL="configs/model/mmdit_depth2.yaml"; BATCH=2; LATENT=8; TOKENS=8; WARMUP=1
  DEVICES="${DEVICES_DRY:-1}"
else
  if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch; use --cpu-dry-run to check the path on CPU" >&2
    exit 1
  fi
fi

OUT="${OUT:-$(mktemp -d -t flowmatch-gpu-smoke-XXXXXX)}"
mkdir -p "$OUT"
[[ "$MODEL" = /* ]] || MODEL="$REPO/$MODEL"
CHANNELS=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['init_args'].get('in_channels', 16))" "$MODEL")
POOLED=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['init_args'].get('pooled_dim', 2048))" "$MODEL")
CONTEXT=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['init_args'].get('context_dim', 4096))" "$MODEL")
NUM_TRAIN=$(( BATCH * DEVICES * 16 ))

cat > "$OUT/smoke.yaml" <<EOF
seed_everything: 0
model:
  class_path: flowmatch.objectives.RectifiedFlow
  init_args:
    network: $MODEL
    lr: 0.0001
    warmup_steps: 10
    time_sampler:
      class_path: flowmatch.time_samplers.LogitNormalTime
      init_args: {m: 0.0, s: 1.0}
data:
  class_path: helpers_latents.RandomLatentsDataModule
  init_args: {channels: $CHANNELS, size: $LATENT, pooled_dim: $POOLED, context_dim: $CONTEXT, num_tokens: $TOKENS,
              num_train: $NUM_TRAIN, num_val: $BATCH, batch_size: $BATCH}
trainer:
  max_steps: $STEPS
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_checkpointing: false
  enable_model_summary: false
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: flowmatch.strategies.SpeedMonitor
      init_args: {warmup_steps: $WARMUP, out_dir: $OUT/perf}
EOF

echo "gpu_smoke: $( [[ $DRY == 1 ]] && echo 'CPU DRY RUN (numbers are meaningless)' || echo GPU ) - $(basename "$MODEL"), batch $BATCH/device x $DEVICES, latents ${CHANNELS}x${LATENT}x${LATENT}, $STEPS steps, bf16 ZeRO-2; output in $OUT"
start=$(date +%s)
PYTHONPATH="$REPO:$REPO/tests${PYTHONPATH:+:$PYTHONPATH}" JSONARGPARSE_DEPRECATION_WARNINGS=off \
  python -m flowmatch fit --config "$OUT/smoke.yaml" --trainer "$REPO/configs/trainer/deepspeed_stage_2.yaml" \
    --trainer.accelerator "$ACCEL" --trainer.devices "$DEVICES" --trainer.default_root_dir "$OUT/runs" \
  > "$OUT/fit.log" 2>&1 || { tail -n 40 "$OUT/fit.log" >&2; echo "error: the fit failed; full log: $OUT/fit.log" >&2; exit 1; }
end=$(date +%s)

python - "$OUT" "$(( end - start ))" <<'EOF'
import json, pathlib, sys
out, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2])
ranks = sorted((out / "perf").glob("rank*.json"))
if not ranks:
    sys.exit(f"error: no perf/rank*.json in {out}")
r = [json.loads(p.read_text()) for p in ranks]
r0 = r[0]
gib = lambda b: f"{b / 2**30:.2f} GiB"
mib = lambda b: f"{b / 2**20:.1f} MiB"
rows = [
    ("processes", r0["world_size"]),
    ("timed steps (after warm-up)", r0.get("timed_steps", "-")),
    ("samples / s (all processes)", f"{r0['samples_per_s']:.1f}" if "samples_per_s" in r0 else "-"),
    ("seconds / step", f"{r0['seconds_per_step']:.4f}" if "seconds_per_step" in r0 else "-"),
    ("model TFLOP/s per device", f"{r0['tflops_per_device']:.2f}" if r0.get("tflops_per_device") else "-"),
    ("MFU (vs peak bf16)", f"{100 * r0['mfu']:.1f} %" if r0.get("mfu") else "n/a (no known peak for this device)"),
    (f"peak memory, max over ranks ({r0['peak_memory_kind']})", gib(max(x["peak_memory_bytes"] for x in r))),
    ("optimizer state per rank", ", ".join(mib(x["optimizer"]["state"]) for x in r if "optimizer" in x)),
    ("wall time incl. start-up", f"{wall} s"),
]
w = max(len(k) for k, _ in rows)
print("\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
EOF
