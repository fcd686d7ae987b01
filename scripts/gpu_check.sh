#!/usr/bin/env bash
# The device check for a lent GPU (device tool): steps/s and peak memory of the real presets' pre-training
# step (S3D-B first), printed as Markdown rows for docs/benchmarks.md and written to $OUT/gpu_check.json.
#
# The device image has python3 with a CUDA torch, einops, matplotlib, scipy, scikit-image, tifffile and tqdm,
# but not monai, nibabel, optuna or zarr, and nothing can be fetched there. Before the call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     monai==1.6.1 nibabel==5.4.2 optuna zarr numcodecs donfig crc32c alembic sqlalchemy colorlog mako \
#     greenlet typing_extensions
# then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
PY=python3
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv || true
$PY scripts/gpu_check.py \
  --presets "${PRESETS:-s3d-b,amaes-unet-b,mae-xnt,amaes-mednext-m,swinunetr-ssl,models-genesis,volume-fusion,voco,s3d-l}" \
  --steps "${STEPS:-10}" --device cuda --out "$OUT/gpu_check.json"
# S3D block-sparse vs masked-dense vs dense step at the S3D-B size (issue 14; resenc-l at 160^3, batch 6 as in the
# paper, bf16 as S3D-B trains), then the block-sparse step compiled: set STEP_BENCH=0 to skip.
if [ "${STEP_BENCH:-1}" = 1 ]; then
  $PY -m volssl bench step --json --device cuda --arch resenc-l --patch 160 --batch "${STEP_BATCH:-6}" \
    --repeats 3 --warmup 1 --ratios 0.6,0.75,0.9 --no-flops --precision bf16 > "$OUT/bench_step_s3d_b.json" || true
  cat "$OUT/bench_step_s3d_b.json" || true
  $PY -m pytest -q tests/methods/test_s3d.py -k "compiles_under_bf16" || true
fi
