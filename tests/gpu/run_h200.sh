#!/usr/bin/env bash
# The GPU tier on the lent H200 (earlier H100; the same stages), in four device calls because of the 64 MiB carry limit
# (nvidia-pytriton's wheel is 55 MB, all-MiniLM-L6-v2's weights 87 MB). Prepare here:
#   tests/gpu/prepare_carry.sh            # wheels and the split model under .carry/
# then, back to back while the machine stays warm:
#   run: bash tests/gpu/run_h200.sh wheels   carry: [".carry/wheels"]
#   run: bash tests/gpu/run_h200.sh model1   carry: [".carry/model1", ".carry/wheels2"]
#   run: bash tests/gpu/run_h200.sh numpy1   carry: [".carry/numpy1"]
#   run: bash tests/gpu/run_h200.sh test     carry: [".carry/model2"]  (add ".carry/cuda" where cuda.bindings is missing)
#   run: bash tests/gpu/run_h200.sh bench    (no carry; the benchmarks)
# Alone, on a bare machine (torch only, no carry): bash tests/gpu/run_h200.sh transfer
# Issue 6 (after wheels, model1, numpy1): profile carry [".carry/model2"], then tune (no carry).
# Issue 7 (after wheels, model1, numpy1): graphs and suite-prep carry [".carry/model2"], then ensembles and suite
# (SUITE_ARGS, one workload per call).
# Issue 17 (after wheels, model1, numpy1): decode carry [".carry/decode"]; detector carry [".carry/model2"]; after
# suite-prep, flags (FLAGS_ARGS="--variant base= --variant pool=--cuda-memory-pool-byte-size=0:1073741824"; the
# batching window at concurrency 1 vs under load: FLAGS_ARGS="--variant base= --delay-scales 1 0.25 0"). After wheels
# alone: ts-decode carry [".carry/numpy1", ".carry/wheels2"] (the TorchServe handler decoding with nvJPEG / in tandem).
# Issue 18, a real TorchServe on the GPU (tests/gpu/prepare_torchserve.sh here, after prepare_carry.sh): after wheels
# and model1, ts-java carry [".carry/jre"], ts-wheel [".carry/torchserve"], ts-real [".carry/model2"] (TSREAL_ARGS);
# ts-planned [".carry/model2"] serves the plan's TorchServe batches for several loads. Bulk: after wheels, model1,
# numpy1, bulk carry [".carry/model2"] (BULK_ARGS; replan first for a planned repository).
# Queue policy: after wheels, model1, numpy1, queue-policy carry [".carry/model2"] (QUEUE_ARGS, QUEUE_ENSEMBLES).
# Short of device time: after wheels, `quick` carry [".carry/shell", ".carry/wheels2", ".carry/numpy1"] stands for model1
# and numpy1 (random weights; timings only); chain in the same call stages that need no .carry/model2 (replan, items).
# Shortest: one call carrying [".carry/wheels", ".carry/shell"] runs wheels, quick, replan and ITEMS_ARGS="--items
# --utf8-instances 4" items (UINT8 text_embedding_utf8 rows only: without numpy1 the stubs serve no BYTES).
# One text per request as UTF-8 (text_embedding_utf8, issue 18): after wheels, model1, numpy1, PLAN_ARGS="--cpus 12"
# replan carry [".carry/model2"] then ITEMS_ARGS="--items 1 16 --concurrency 256 512 --utf8-instances 4 8" items (the
# two-step plan's rows beside text_embedding_utf8, one run); the plan for UTF-8 clients: PLAN_ARGS="--cpus 12
# --text-input utf8" replan, then SUITE_ARGS="--workloads minilm" suite (its triton-plugin row is text_embedding_utf8).
# Token budget: after wheels, model1, numpy1, token-budget carry [".carry/model2"] (BUDGET_ARGS, PLAN_ARGS), then
# suite SUITE_ARGS="--workloads minilm".
# The suite's LitServe peer: after wheels, litserve carry [".carry/litserve"] before suite (else it is skipped).
# Issue 16 (after wheels, model1, numpy1): installed carry [".carry/model2", ".carry/dist"].
# Issue 15 (after wheels, model1, numpy1): faults carry [".carry/model2"] (the fault tier with KIND_GPU encoders),
# then soak (SOAK_ARGS, e.g. --ensembles text_embedding_fused --requests 100000; results under $OUT/soak).
# Issue 19 (a bare machine, no other stage first; tests/gpu/prepare_carry.sh and prepare_onnxruntime_gpu.sh here): custom carry
# [".carry/tok", ".carry/ort1"] (the text heads and detector forms on the GPU, onnxruntime CPU-only there), then
# ort-part carry [".carry/ort2"], ort-part [".carry/ort3"], custom-onnx [".carry/ort4"] (onnxruntime-gpu assembled:
# the ONNX tests on its CUDA provider; after wheels, with ".carry/numpy1", ".carry/wheels2" beside ".carry/ort4", also
# the ONNX detector served by Triton). After wheels: custom-triton carry [".carry/numpy1", ".carry/wheels2", ".carry/tok"]
# (the user's models served by Triton on the GPU).
# The machine's numpy is 2.x, which this Triton's stubs cannot use for TYPE_STRING tensors: the
# stubs get numpy 1.26 first on their path (TANDEM_STUB_PYTHONPATH); the tests keep numpy 2.
set -euo pipefail
stage=${1:?stage: wheels, model1, numpy1, test, gpu, bench, transfer, custom, ... (see the case below)}
base=/root/tandem
out=${OUT:-/tmp/out}
mkdir -p "$base/model" "$out"

install_carried() {  # the wheels of .carry/$1 into $2, offline, as they are
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" .carry/"$1"/*.whl
}
assemble_model() {  # the second half of the model from .carry/model2, joined and checked
    cp -r .carry/model2/* "$base/model/"
    cat "$base/model"/model.safetensors.part0* > "$base/model/model.safetensors"
    echo "$(cat "$base/model/model.safetensors.sha256")  $base/model/model.safetensors" | sha256sum -c - \
        || { rm -f "$base/model/model.safetensors"; return 1; }  # not left for a later stage to take as assembled
}
case "$stage" in
wheels)
    install_carried wheels "$base/site"
    nvidia-smi -L
    python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
    ;;
model1)
    cp .carry/model1/* "$base/model/"
    install_carried wheels2 "$base/site"
    ;;
numpy1)
    install_carried numpy1 "$base/numpy1"
    ;;
test)
    for extra in wheels2 cuda; do  # gevent & co. for tritonclient.http; cuda-bindings for CUDA shm
        if [ -d ".carry/$extra" ]; then install_carried "$extra" "$base/site"; fi
    done
    assemble_model
    ;&
gpu)  # on a machine where `test` already assembled the model: the GPU tier only
    [ "$stage" = gpu ] && tiers="tests/gpu" || tiers="tests/unit tests/integration tests/gpu"
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    export TANDEM_RESULTS="$out/gpu_results.json" PYTHONUNBUFFERED=1
    python3 -m pytest $tiers -q -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
    ;;
graphs)  # after wheels, model1, numpy1; carry [".carry/model2"]: the text GPU tests (CUDA graphs vs eager, Triton)
    assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    export TANDEM_RESULTS="$out/gpu_results.json" PYTHONUNBUFFERED=1
    python3 -m pytest tests/gpu/test_text_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
    ;;
bench)  # after `test`: the benchmarks (TANDEM_TEXT_BENCH=0 skips the Triton placement bench)
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" PYTHONUNBUFFERED=1
    python3 bench/transfer.py --out "$out/bench_transfer.json" 2>&1 | tee "$out/bench_transfer.log"
    python3 bench/shm.py --out "$out/bench_shm.json" 2>&1 | tee "$out/bench_shm.log"
    python3 bench/bulk_memory.py --lines 20000 --out "$out/bench_bulk_memory.json" 2>&1 | tee "$out/bench_bulk_memory.log"
    python3 bench/torchserve_pipeline.py --out "$out/bench_torchserve_pipeline.json" 2>&1 | tee "$out/bench_torchserve.log"
    if [ "${TANDEM_TEXT_BENCH:-1}" = 1 ]; then
        python3 bench/text_pipeline.py --out "$out/bench_text_pipeline.json" 2>&1 | tee "$out/bench.log"
    fi
    ;;
profile)  # after wheels, model1, numpy1; carry [".carry/model2"]: tandem profile + plan of both pipelines
    assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    python3 -m tandem_serve.cli profile --out "$out/profile.json" 2>&1 | grep -v "\] " | tee "$out/profile.log"
    python3 -m tandem_serve.cli plan "$out/profile.json" --out "$base/plan" 2>&1 | tee "$out/plan.txt"
    cp "$base/plan/plan.json" "$out/"
    ;;
tune)  # after profile: the project's default configs measured, then the plan served and tuned, per pipeline
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/tuning.py --plan "$base/plan" --out "$out/bench_tuning.json" ${TUNE_ARGS:-} 2>&1 | tee "$out/bench_tuning.log"
    ;;
latency)  # after wheels, model1, numpy1; carry [".carry/model2"]: where object_detection's latency goes
    assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/detection_latency.py --out "$out/bench_detection_latency.json" 2>&1 | tee "$out/bench_detection_latency.log"
    ;;
suite-prep)  # after wheels, model1, numpy1; carry [".carry/model2"] (or after quick): issue 7's models, a profile + plan per workload
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"  # the profile's serving-cost probe starts the embedded Triton
    python3 -c "from pathlib import Path; from tandem_serve.workloads import random_bert; random_bert('base', Path('$base/models'))"
    # the text encoders up to 256 (the ceiling's best batch on the H200); PLAN_ARGS e.g. "--cpus 12" where the
    # suite's load processes take the other cores
    for w in ${PREP_WORKLOADS:-minilm bert-base yolov5s}; do
        case "$w" in
        minilm) args="--pipelines text --seq-lengths 32 --batch-sizes 1 16 64 256" ;;
        bert-base) args="--pipelines text --seq-lengths 32 --batch-sizes 1 16 64 256 --model-dir $base/models/bert-base-random" ;;
        yolov5s) args="--pipelines detection --detector-size s --batch-sizes 1 16 64" ;;
        esac
        python3 -m tandem_serve.cli profile $args --repeats 3 --out "$out/profile-$w.json" 2>&1 | grep -v "\] " | tail -3
        python3 -m tandem_serve.cli plan "$out/profile-$w.json" ${PLAN_ARGS:-} --out "$base/plans/$w" 2>&1 | tee "$out/plan-$w.txt" | head -30
    done
    ;;
quick)  # after wheels alone; carry [".carry/shell", ".carry/wheels2", ".carry/numpy1"]: model1 and numpy1's set-up in
    # one call, with all-MiniLM-L6-v2's weights replaced by random ones of its architecture (timings only: the same
    # kernels; embeddings are not the model's), for benchmarks when a lease is short: chain the next stages in the call
    # without them (a call of wheels + shell alone): no HTTP client, and the stubs serve no BYTES tensors (numpy 2)
    if [ -d .carry/wheels2 ]; then install_carried wheels2 "$base/site"; fi
    if [ -d .carry/numpy1 ]; then install_carried numpy1 "$base/numpy1"; fi
    touch .carry/shell/model.safetensors  # the files' check wants one; random_bert writes the weights
    rm -rf "$base/model" "$base/models/bert-source-random"
    PYTHONPATH="$base/site:$PWD/src" python3 -c "from pathlib import Path; from tandem_serve.workloads import random_bert
print(random_bert('source', Path('$base/models'), Path('.carry/shell')))"
    mv "$base/models/bert-source-random" "$base/model"
    ls -la "$base/model" | head -20
    ;;
replan)  # after wheels, model1, numpy1; carry [".carry/model2"]: plans from a kept profile instead of suite-prep's
    # profiling (REPLAN_PROFILE, REPLAN_WORKLOAD, PLAN_ARGS) into $base/plans/<workload>; REPLAN_HEADROOM sets the
    # plan's CPU_INSTANCE_HEADROOM (the CPU stages' instances over their share of the cores) to compare it served
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    rm -rf "$base/plans/${REPLAN_WORKLOAD:-minilm}"
    python3 -c "import sys; import tandem_serve.tuning.plan as plan; from tandem_serve.cli import main
plan.CPU_INSTANCE_HEADROOM = float(sys.argv[1]); sys.exit(main(sys.argv[2:]))" "${REPLAN_HEADROOM:-1.25}" plan \
        "${REPLAN_PROFILE:-bench/results/h200-2026-12-04-profile-minilm.json}" ${PLAN_ARGS:-} \
        --out "$base/plans/${REPLAN_WORKLOAD:-minilm}" 2>&1 | tee "$out/plan-${REPLAN_WORKLOAD:-minilm}-${REPLAN_HEADROOM:-1.25}.txt" | head -8
    ;;
bulk)  # issue 18, after wheels, model1, numpy1; carry [".carry/model2"]: tandem embed on a large file vs sentence-
    # transformers' encode on it (bench/bulk_embed.py BULK_ARGS, e.g. --repository $base/plans/minilm/triton after replan)
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/bulk_embed.py --out "$out/bulk-embed${BULK_TAG:-}.json" ${BULK_ARGS:-} 2>&1 \
        | grep -v "^[IWE][0-9]\{4\} " | tee "$out/bulk-embed${BULK_TAG:-}.log" | tail -30
    ;;
token-budget)  # issue 18, after wheels, model1, numpy1; carry [".carry/model2"]: bench/token_budget.py (the encoder
    # split by a token budget vs one padded call), then minilm profiled to 256 x 128 tokens and planned into
    # $base/plans/minilm (the plan picks the budget where the token rate levels off), for `suite --workloads minilm`
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/token_budget.py --out "$out/token-budget.json" ${BUDGET_ARGS:-} 2>&1 | tee "$out/token-budget.log" | tail -50
    python3 -m tandem_serve.cli profile --pipelines text --seq-lengths 32 128 --batch-sizes 1 16 64 256 --repeats 3 \
        --out "$out/profile-minilm.json" 2>&1 | grep -v "\] " | tail -3
    rm -rf "$base/plans/minilm"
    python3 -m tandem_serve.cli plan "$out/profile-minilm.json" ${PLAN_ARGS:-} --out "$base/plans/minilm" 2>&1 \
        | tee "$out/plan-minilm.txt" | head -40
    ;;
queue-policy)  # after wheels, model1, numpy1; carry [".carry/model2"]: bench/queue_policy.py on both ensembles (the
    # shipped two instances vs one bottleneck instance vs no queue policy, closed load; QUEUE_ARGS)
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    for e in ${QUEUE_ENSEMBLES:-text_embedding_fused object_detection}; do
        python3 bench/queue_policy.py --ensemble "$e" --out "$out/queue-policy-$e.json" ${QUEUE_ARGS:-} 2>&1 \
            | grep "round\|Error\|error" | tail -12
    done
    ;;
litserve)  # issue 18, after wheels; carry [".carry/litserve"]: the suite's external peer (LitServe + sentence-transformers)
    install_carried litserve "$base/site"
    PYTHONPATH="$base/site" python3 -c "import litserve, sentence_transformers; print('litserve', litserve.__version__)"
    ;;
suite)  # after suite-prep: bench/suite.py (SUITE_ARGS, e.g. --workloads minilm); results under $OUT/suite
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/suite.py --out "$out/suite" --plans "$base/plans" ${SUITE_ARGS:-} 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
        | tee "$out/suite.log" | grep -v "^20[0-9-]* [0-9:,]* tandem_serve" | tail -60
    ;;
flags)  # after suite-prep: one plan served under several tritonserver flag sets (FLAGS_ARGS: --variant NAME=FLAG ...)
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    (cd bench && python3 server_flags.py --repository "$base/plans/${FLAGS_WORKLOAD:-yolov5s}/triton" --out "$out/flags" \
        ${FLAGS_ARGS:---variant base=}) 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tee "$out/flags.log" | grep -v "^20[0-9-]* [0-9:,]*" | tail -40
    ;;
items)  # after suite-prep (PREP_WORKLOADS=minilm is enough): 1, 4 and 16 texts per request vs the ceiling
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    (cd bench && python3 items_per_request.py --repository "$base/plans/minilm/triton" --out "$out/items-minilm.json" ${ITEMS_ARGS:-}) \
        2>&1 | grep -v "^[IWE][0-9]\{4\} " | tail -16
    ;;
ensembles)  # after suite-prep: the shipped ensembles side by side, 1 vs 4 load processes (bench/ensembles.py)
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    (cd bench && python3 ensembles.py --out "$out/ensembles-minilm.json" ${ENSEMBLES_ARGS:-}) 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tail -20
    if [ "${ENSEMBLES_DETECTION:-1}" = 1 ]; then
        weights=$(python3 -c "from pathlib import Path; from tandem_serve.workloads import random_yolov5; print(random_yolov5('s', Path('$base/models')))")
        (cd bench && python3 ensembles.py --out "$out/ensembles-yolov5s.json" --ensembles object_detection --concurrency 16 64 \
            --detector-weights "$weights") 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tail -8
    fi
    ;;
faults)  # after wheels, model1, numpy1; carry [".carry/model2"]: the fault tier and bad input with GPU encoders
    assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" PYTHONUNBUFFERED=1
    python3 -m pytest tests/integration/test_faults.py tests/integration/test_bad_input.py -q -rs -s -p no:cacheprovider \
        2>&1 | grep -v "^[IWE][0-9]\{4\} " | tee "$out/pytest_faults.log" | tail -40
    ;;
soak)  # after faults (the model is assembled): bench/soak.py with SOAK_ARGS; results under $OUT/soak
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/soak.py --out "$out/soak" --interval 10 ${SOAK_ARGS:-} 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
        | grep -v "done, 0 errors" | tail -20
    rm -rf "$out/soak/triton"
    ;;
recovery)  # after wheels, model1, numpy1 (carry [".carry/model2"] unless assembled): each model's stub killed in turn
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1"
    python3 bench/recovery.py --out "$out/recovery" ${RECOVERY_ARGS:-} 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tail -14
    rm -rf "$out/recovery/triton"
    ;;
installed)  # after wheels, model1, numpy1; carry [".carry/model2", ".carry/dist"] (dist: `pip wheel --no-deps -w .carry/dist .`
    # here): the wheel installed by docker/install.sh into a venv, served through docker/triton/entrypoint.sh on the GPU
    [ -f "$base/model/model.safetensors" ] || assemble_model
    # torch, numpy, tokenizers, ... from the machine's Python (itself a venv: --system-site-packages would not see
    # them), the carried wheels from $base/site, through a .pth file
    python3 -m venv "$base/venv"
    { echo "$base/site"; python3 -c 'import sys; print("\n".join(p for p in sys.path[1:] if p.endswith("-packages")))'; } \
        > "$("$base/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tandem-machine.pth"
    TANDEM_PIP_ARGS="--no-index --no-deps" bash docker/install.sh "$base/venv/bin/python" "$(ls .carry/dist/tandem_serve-*.whl)"
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" TANDEM_INSTALLED_VENV="$base/venv" TANDEM_RESULTS="$out/gpu_installed.json"
    python3 -m pytest tests/gpu/test_installed_gpu.py -q -rs -p no:cacheprovider 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
        | tee "$out/pytest_installed.log" | tail -30
    ;;
decode)  # after wheels, model1, numpy1; carry [".carry/decode"] (simplejpeg): bench/decode.py on one core, then the
    # GPU decoder's tests (nvJPEG vs the CPU path, the tandem image_preprocess in Triton)
    install_carried decode "$base/site"
    export PYTHONPATH="$base/site:$PWD/src:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" TANDEM_RESULTS="$out/gpu_decode.json"
    if [ "${DECODE_BENCH:-1}" = 1 ]; then
        taskset -c 3 python3 bench/decode.py --out "$out/decode.json" ${DECODE_ARGS:-} 2>&1 | tee "$out/decode.log"
    fi
    python3 -m pytest tests/gpu/test_decode_gpu.py -q -rs -p no:cacheprovider 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
        | tee "$out/pytest_decode.log" | tail -30
    ;;
detector)  # after wheels, model1, numpy1; carry [".carry/model2"]: bench/detector_step.py (CUDA graphs vs eager vs the
    # per-image filter), then the detection GPU tests (graphs vs eager, accuracy, nvJPEG, Triton, TorchServe handler)
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" TANDEM_RESULTS="$out/gpu_detector.json"
    python3 bench/detector_step.py --out "$out/detector_step.json" 2>&1 | tail -24
    python3 -m pytest tests/gpu/test_vision_gpu.py tests/gpu/test_decode_gpu.py tests/gpu/test_torchserve_gpu.py -q -rs \
        -p no:cacheprovider 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tee "$out/pytest_detector.log" | tail -30
    ;;
ts-decode)  # issue 17, after wheels; carry [".carry/numpy1", ".carry/wheels2"]: the TorchServe detection handler with
    # decode cpu / gpu (nvJPEG) / tandem (bench/torchserve_decode.py, TSDECODE_ARGS), then the decoding GPU tests (the
    # handler's modes vs the CPU path, GpuDecoder, the tandem image_preprocess in Triton)
    install_carried numpy1 "$base/numpy1"
    install_carried wheels2 "$base/site"
    export PYTHONPATH="$base/site:$PWD/src:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" TANDEM_RESULTS="$out/gpu_ts_decode.json"
    if [ "${TSDECODE_BENCH:-1}" = 1 ]; then
        python3 bench/torchserve_decode.py --out "$out/ts-decode" ${TSDECODE_ARGS:-} 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
            | tee "$out/ts-decode.log" | tail -14
    fi
    python3 -m pytest tests/gpu/test_torchserve_gpu.py tests/gpu/test_decode_gpu.py -k "detection or pipeline_outputs or decode" -x \
        -q -rs -p no:cacheprovider 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tee "$out/pytest_ts_decode.log" | tail -30
    ;;
ts-java)  # issue 18, after wheels and model1; carry [".carry/jre"] (tests/gpu/prepare_torchserve.sh): the jlink'd Java
    echo "$(cat .carry/jre/jre.tar.xz.sha256)  .carry/jre/jre.tar.xz" | sha256sum -c -
    tar -C "$base" -xJf .carry/jre/jre.tar.xz
    "$base/tandem-jre/bin/java" -version 2>&1 | head -1
    ;;
ts-wheel)  # issue 18, after ts-java; carry [".carry/torchserve"]: torchserve and torch-model-archiver
    install_carried torchserve "$base/site"
    python3 -c "import aiohttp, yaml; print('aiohttp', aiohttp.__version__)"
    ;;
ts-real)  # issue 18, after ts-wheel; carry [".carry/model2"]: the handlers behind a real TorchServe on the GPU
    # (bench/torchserve_served.py, TSREAL_ARGS), against the naive handler and the ceiling; first the worker's frame
    # reader (bench/torchserve_frames.py)
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export JAVA_HOME="$base/tandem-jre"
    python3 bench/torchserve_frames.py --out "$out/ts-frames.json" 2>&1 | tee "$out/ts-frames.md"  # the worker's reader
    python3 bench/torchserve_served.py --out "$out/ts-real" ${TSREAL_ARGS:-} 2>&1 | grep -v "MODEL_LOG\|ACCESS_LOG\|TS_METRICS" \
        | tee "$out/ts-real.log" | grep -v "^20[0-9-]* [0-9:,]* tandem_serve" | tail -30
    ;;
ts-planned)  # issue 18, after ts-wheel; carry [".carry/model2"]: TorchServe's batches as `tandem plan` sizes them for
    # each of TS_PLAN_CONCURRENCY (default 64 256 512 requests in flight), from TS_PROFILE, served at those loads
    [ -f "$base/model/model.safetensors" ] || assemble_model
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_MODEL_DIR="$base/model" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export JAVA_HOME="$base/tandem-jre"
    levels=${TS_PLAN_CONCURRENCY:-64 256 512}
    plans=()
    for c in $levels; do
        python3 -m tandem_serve.cli plan "${TS_PROFILE:-bench/results/h200-2026-12-04-profile-minilm.json}" --cpus 12 \
            --torchserve-concurrency "$c" --out "$base/plans/ts-c$c" 2>&1 | grep "TorchServe:" | tee -a "$out/ts-planned.txt"
        plans+=("$base/plans/ts-c$c")
    done
    python3 bench/torchserve_served.py --out "$out/ts-planned" --pipelines text --workers --job-queue-size 2000 \
        --concurrency $levels --planned "${plans[@]}" 2>&1 | grep -v "MODEL_LOG\|ACCESS_LOG\|TS_METRICS" \
        | tee "$out/ts-planned.log" | grep -v "^20[0-9-]* [0-9:,]* tandem_serve" | tail -12
    ;;
custom-triton)  # issue 19, after wheels; carry [".carry/numpy1", ".carry/wheels2", ".carry/tok"]: a user's text model and
    # YOLOv8-style detector served by Triton on the GPU (KIND_AUTO), then the AOTInductor probe of the custom models
    install_carried numpy1 "$base/numpy1"
    install_carried wheels2 "$base/site"
    mkdir -p "$base/tok" && cp .carry/tok/* "$base/tok/"
    export PYTHONPATH="$base/site:$PWD/src:$PWD" TANDEM_TOKENIZER_DIR="$base/tok" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_STUB_PYTHONPATH="$base/numpy1" TANDEM_RESULTS="$out/gpu_custom_triton.json"
    python3 -m pytest tests/gpu/test_custom_triton_gpu.py -q -rs -p no:cacheprovider 2>&1 | grep -v "^[IWE][0-9]\{4\} " \
        | tee "$out/pytest_custom_triton.log" | tail -30
    TANDEM_RESULTS="$out/gpu_custom_aoti.json" python3 -m pytest tests/gpu/test_custom_models_gpu.py --noconftest -q -rs \
        -p no:cacheprovider -k aoti 2>&1 | tee "$out/pytest_custom_aoti.log" | tail -30
    ;;
ort-part|custom|custom-onnx)  # issue 19: onnxruntime-gpu's pieces kept on the machine, then the custom-model tests
    mkdir -p "$base/ort-parts"
    for part in .carry/ort*/ort.tar.xz.*; do [ -e "$part" ] && cp "$part" "$base/ort-parts/"; done
    ls "$base/ort-parts"
    [ "$stage" = ort-part ] && exit 0
    pythonpath="$PWD/src:$PWD" select=()
    if [ "$stage" = custom-onnx ]; then
        if [ ! -d "$base/ort/onnxruntime" ]; then
            cat "$base"/ort-parts/ort.tar.xz.part* > "$base/ort.tar.xz"
            echo "$(cat "$base/ort-parts/ort.tar.xz.sha256")  $base/ort.tar.xz" | sha256sum -c -
            mkdir -p "$base/ort"
            python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2], filter='data')" \
                "$base/ort.tar.xz" "$base/ort"
            rm "$base/ort.tar.xz"
        fi
        pythonpath="$base/ort:$pythonpath" select=(-k "onnx or timed")
        for extra in numpy1 wheels2; do  # carried where the Triton ONNX test runs too (after wheels)
            [ "$extra" = numpy1 ] && into="$base/numpy1" || into="$base/site"
            if [ -d ".carry/$extra" ]; then install_carried "$extra" "$into"; fi
        done
    fi
    if [ -d .carry/tok ]; then mkdir -p "$base/tok" && cp .carry/tok/* "$base/tok/"; fi
    export PYTHONPATH="$pythonpath" TANDEM_TOKENIZER_DIR="$base/tok" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    export TANDEM_RESULTS="$out/gpu_$stage.json"
    python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())" || true
    python3 -m pytest tests/gpu/test_custom_models_gpu.py --noconftest -q -rs -p no:cacheprovider "${select[@]}" 2>&1 \
        | tee "$out/pytest_$stage.log" | tail -30
    if [ "$stage" = custom-onnx ]; then  # how far TF32 (torch's, onnxruntime's) moves the detector's raw output
        PYTHONPATH="$pythonpath" python3 bench/detector_forms.py --out "$out/detector_forms.json" 2>&1 | grep -v initializer_dedup
    fi
    if [ "$stage" = custom-onnx ] && [ -d "$base/site/tritonclient" ] && [ -d "$base/numpy1/numpy" ]; then
        # the ONNX detector served by Triton: onnxruntime-gpu on the stubs' path too, after their numpy 1.26
        PYTHONPATH="$base/site:$pythonpath" TANDEM_STUB_PYTHONPATH="$base/numpy1:$base/ort" \
            TANDEM_RESULTS="$out/gpu_custom_onnx_triton.json" python3 -m pytest tests/gpu/test_custom_triton_gpu.py -q -rs \
            -p no:cacheprovider -k onnx 2>&1 | grep -v "^[IWE][0-9]\{4\} " | tee "$out/pytest_custom_onnx_triton.log" | tail -30
    fi
    ;;
transfer)  # the transfer tests and bench/transfer.py: needs torch only
    export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
    python3 -m pytest tests/gpu/test_transfer_gpu.py --noconftest -q -p no:cacheprovider 2>&1 | tee "$out/pytest_transfer.log"
    python3 bench/transfer.py --out "$out/bench_transfer.json" 2>&1 | tee "$out/bench_transfer.log"
    ;;
*)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
