#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what tests/gpu/run_h200.sh needs on the GPU machine (Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .carry && mkdir -p .carry/model1 .carry/model2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any -d .carry/wheels \
    nvidia-pytriton==0.7.0 tritonclient==2.73.0 python-rapidjson
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .carry/wheels2 \
    gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 brotli==1.2.1 \
    psutil==7.2.2 orjson==3.13.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .carry/numpy1 numpy==1.26.4
# cuda-python's runtime bindings: tritonclient's CUDA shared-memory utilities import them.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .carry/cuda "cuda-bindings==13.5.0" "cuda-pathfinder==1.9.0"
model=$(.venv/bin/python -c "from tandem_serve.model_files import default_model_dir; print(default_model_dir())")
split -n 2 -d "$model/model.safetensors" .carry/model1/model.safetensors.part
mv .carry/model1/model.safetensors.part01 .carry/model2/
(cd "$model" && tar cf - --exclude model.safetensors .) | (cd .carry/model2 && tar xf -)
sha256sum "$model/model.safetensors" | cut -d' ' -f1 > .carry/model2/model.safetensors.sha256
# the shipped tokenizer files alone, for the custom text models of issue 19 (stages custom, custom-triton)
mkdir -p .carry/tok
for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do cp "$model/$f" .carry/tok/; done
du -sh .carry/*
