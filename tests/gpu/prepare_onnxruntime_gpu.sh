#!/usr/bin/env bash
# Fill .carry/ort1..N (git-ignored) with onnxruntime-gpu for the GPU machine (Python 3.12, CUDA 13 beside torch
# cu130), for the ONNX tests of tests/gpu/run_h200.sh custom-onnx: the wheel is 255 MB, its CUDA provider 284 MB
# unpacked, so it travels unpacked, xz-compressed and split into pieces of 55 MiB (a call carries 64 MiB with the
# working tree), one device call each. (.carry/tok, the tokenizer files of the custom stages: tests/gpu/prepare_carry.sh.)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=${ORT_GPU_VERSION:-1.31.1}
cache=${ORT_CACHE:-/tmp/ort-gpu-$version}
mkdir -p "$cache"
if [ ! -f "$cache/ort.tar.xz" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$cache" "onnxruntime-gpu==$version"
    rm -rf "$cache/unpacked" && mkdir "$cache/unpacked"
    (cd "$cache/unpacked" && python3 -m zipfile -e "$cache"/onnxruntime_gpu-*.whl .)
    # TensorRT's provider is not used (no TensorRT there); xz because the machine's Python reads it (lzma)
    (cd "$cache/unpacked" && tar cf - --exclude=libonnxruntime_providers_tensorrt.so . | xz -9 -T2 > "$cache/ort.tar.xz.tmp")
    mv "$cache/ort.tar.xz.tmp" "$cache/ort.tar.xz"
fi
rm -rf .carry/ort[0-9]*
split -b 55M -d -a 1 "$cache/ort.tar.xz" "$cache/ort.tar.xz.part"
for part in "$cache"/ort.tar.xz.part*; do
    n=$(( ${part##*part} + 1 )); mkdir -p ".carry/ort$n"; mv "$part" ".carry/ort$n/"
done
sha256sum "$cache/ort.tar.xz" | cut -d' ' -f1 > ".carry/ort$n/ort.tar.xz.sha256"
du -sh .carry/ort*
