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
# the suite's external peer (bench/peers/litserve_text.py): LitServe and what the GPU image lacks of its dependencies
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .carry/litserve \
    litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2 anyio==4.16.0 \
    uvicorn==0.55.0 h11==0.16.0 httptools==0.9.0 websockets==17.4 watchfiles==1.3.0 python-dotenv==1.2.4 pyzmq==27.3.0
# cuda-python's runtime bindings: tritonclient's CUDA shared-memory utilities import them.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d .carry/cuda "cuda-bindings==13.5.0" "cuda-pathfinder==1.9.0"
model=$(.venv/bin/python -c "from tandem_serve.model_files import default_model_dir; print(default_model_dir())")
split -n 2 -d "$model/model.safetensors" .carry/model1/model.safetensors.part
mv .carry/model1/model.safetensors.part01 .carry/model2/
(cd "$model" && tar cf - --exclude model.safetensors .) | (cd .carry/model2 && tar xf -)
sha256sum "$model/model.safetensors" | cut -d' ' -f1 > .carry/model2/model.safetensors.sha256
# the model's files without its weights: the `quick` stage gives them random weights of the same architecture
mkdir -p .carry/shell && (cd "$model" && tar cf - --exclude model.safetensors .) | (cd .carry/shell && tar xf -)
# the shipped tokenizer files alone, for the custom text models of issue 19 (stages custom, custom-triton)
mkdir -p .carry/tok
for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do cp "$model/$f" .carry/tok/; done
du -sh .carry/*
