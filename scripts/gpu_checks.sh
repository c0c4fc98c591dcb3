#!/usr/bin/env bash
# The GPU half of the parity promise, on a CUDA machine with onnxruntime-gpu installed (pip install
# onnxruntime-gpu, or its wheel carried there): the `gpu` tests, `vitseg verify --device cuda` (ONNX Runtime's CUDA provider against the
# PyTorch CUDA reference) for fp32 / fp16 / int8 artifacts, and CUDA latency profiles (eager fp32, eager
# fp16 autocast, the artifacts; batch 1 and 8). Every step writes its log and JSON under $OUT and goes on
# after a failure; the exit code says whether any step failed. TensorRT itself is not run here.
#
#   scripts/gpu_checks.sh PHASE   (tests, b0-export, b0-check, vit-export, vit-check, sizes: each fits one
#   10-minute command; exports are kept in $WORK for the check phases)
# Environment: OUT (results), B0 (a trained SegFormer-B0 run dir; default: train one here), VITSEG (the CLI),
# KINDS (artifacts to export, default: fp32 fp16 int8trt int8cpu), AUTOCAST=0 (skip the eager fp16 profile).
set -u
phase=${1:?usage: gpu_checks.sh tests|b0-export|b0-check|vit-export|vit-check|sizes}
OUT=${OUT:-/tmp/vitseg-gpu}
VITSEG=${VITSEG:-python3 -m vitseg_export}
WORK=${WORK:-/tmp/vitseg-gpu-work}
mkdir -p "$OUT" "$WORK"
failed=0

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  [ $rc -eq 0 ] || failed=1
  return $rc
}

export_set() {  # export_set CKPT NAME SIZE: $KINDS (default fp32 fp16 int8trt int8cpu) ONNX at SIZE
  local ckpt=$1 name=$2 size=$3 kind
  for kind in ${KINDS:-fp32 fp16 int8trt int8cpu}; do
    case $kind in
      int8trt) args=(--precision int8 --target trt) ;;
      int8cpu) args=(--precision int8 --target cpu) ;;
      *) args=(--precision "$kind") ;;
    esac
    step "$name-export-$kind" 400 $VITSEG export "$ckpt" --format onnx "${args[@]}" --image-size "$size" --dynamic-batch -o "$WORK/$name-$kind.onnx"
  done
  cp "$WORK/$name"-*.onnx.json "$OUT/" 2>/dev/null
}

verify_set() {  # verify_set CKPT NAME: every exported artifact, CUDA provider vs PyTorch CUDA, batch 1 and 8
  local ckpt=$1 name=$2 artifact
  for artifact in "$WORK/$name"-*.onnx; do
    [ -f "$artifact" ] || continue
    step "verify-cuda-$(basename "$artifact" .onnx)" 300 $VITSEG verify "$artifact" -r "$ckpt" --device cuda \
      --num-images 32 --batch-sizes 1,8 --report "$OUT/verify-cuda-$(basename "$artifact" .onnx).json"
  done
}

profile_set() {  # profile_set CKPT NAME HxW: eager fp32, eager fp16 autocast, then every artifact; batch 1 and 8
  local ckpt=$1 name=$2 size=$3
  step "profile-cuda-$name-eager" 300 $VITSEG profile "$ckpt" --device cuda --image-size "$size" --batch-sizes 1,8 --warmup 20 --iters 100 --report "$OUT/profile-cuda-$name-eager.json"
  [ "${AUTOCAST:-1}" = 1 ] && step "profile-cuda-$name-autocast" 300 $VITSEG profile "$ckpt" --device cuda --image-size "$size" --autocast --batch-sizes 1,8 --warmup 20 --iters 100 --report "$OUT/profile-cuda-$name-autocast.json"
  local artifacts=("$WORK/$name"-*.onnx)
  [ -f "${artifacts[0]}" ] && step "profile-cuda-$name-onnx" 400 $VITSEG profile "${artifacts[@]}" --device cuda --batch-sizes 1,8 --warmup 20 --iters 100 --report "$OUT/profile-cuda-$name-onnx.json"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
case "$phase" in
  tests)
    step doctor 120 $VITSEG doctor
    step pytest-gpu 500 python3 -m pytest -m gpu -p no:cacheprovider -q -rs tests
    ;;
  b0-export)  # B0: a trained run dir, or trained here on the GPU
    b0=${B0:-$WORK/b0}
    [ -d "$b0" ] || step train-b0-cuda 300 $VITSEG train --model segformer-b0 --epochs 3 --image-size 128 --workers 8 --output "$b0"
    export_set "$b0" b0 512x512
    ;;
  b0-check)
    verify_set "${B0:-$WORK/b0}" b0
    profile_set "${B0:-$WORK/b0}" b0 512x512
    ;;
  vit-export)
    step train-vit-cuda 300 $VITSEG train --model vit-seg-base --epochs 2 --workers 8 --output "$WORK/vit"
    export_set "$WORK/vit" vit 128x128
    ;;
  vit-check)
    verify_set "$WORK/vit" vit
    profile_set "$WORK/vit" vit 128x128
    ;;
  sizes)  # latency only (random weights run as fast as trained ones): B1, B2 eager and fp32/fp16 ONNX at 512
    for arch in segformer-b1 segformer-b2; do
      step "$arch-export-fp32" 300 $VITSEG export "$arch" --format onnx --precision fp32 --image-size 512x512 --dynamic-batch -o "$WORK/$arch-fp32.onnx"
      step "$arch-export-fp16" 300 $VITSEG export "$arch" --format onnx --precision fp16 --image-size 512x512 --dynamic-batch -o "$WORK/$arch-fp16.onnx"
      profile_set "$arch" "$arch" 512x512
    done
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
exit $failed
