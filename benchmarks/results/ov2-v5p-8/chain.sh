#!/bin/bash
# Run from the repository root: bash benchmarks/results/ov2-v5p-8/chain.sh [OUTPUT_DIR]
cd "$(dirname "$0")/../../.."
OUT=${1:-runs/benchmarks/ov2-v5p-8}
run() { echo "=== $(date +%T) $*"; nice -n 5 .venv/bin/python -m openvision_max.benchmark "$@" --mode aot --topology v5p-8 --output-dir $OUT scan_layers=false 2>&1 | grep -v "Involuntary\|^W1\|^I1" | tail -15; echo "=== $(date +%T) done"; }
run configs/ov2_L14.yml stage=finetune_224 per_device_batch_size=64
run configs/L14.yml stage=finetune_224 per_device_batch_size=64
run configs/ov2_L14.yml stage=finetune_224 per_device_batch_size=64 decoder.keep_ratio=0.25
run configs/ov2_So400m14.yml stage=finetune_384 per_device_batch_size=32
run configs/So400m14.yml stage=finetune_384 per_device_batch_size=32
run configs/ov2_So400m14.yml stage=finetune_384 per_device_batch_size=32 decoder.keep_ratio=0.35
