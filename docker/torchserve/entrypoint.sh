#!/usr/bin/env bash
# Entrypoint of the tandem-serve TorchServe image: `tandem serve torchserve` on the archives built into it.
#
# config.properties is written by the launcher into the workspace: token authorization on (the tokens are in
# <workspace>/key_file.json, or mount your own workspace to read them), Prometheus metrics, the model
# management API off, the management address on 127.0.0.1, inference on $TANDEM_HOST.
# Extra arguments go to `tandem serve torchserve` (see `tandem serve torchserve --help`).
set -euo pipefail

exec tandem serve torchserve \
    --store "${TANDEM_MODEL_STORE:-/opt/tandem/model-store}" \
    --workspace "${TANDEM_WORKSPACE:-/home/tandem/workspace/torchserve}" \
    --host "${TANDEM_HOST:-0.0.0.0}" \
    --management-host "${TANDEM_MANAGEMENT_HOST:-127.0.0.1}" \
    --inference-port "${TANDEM_INFERENCE_PORT:-8080}" \
    --management-port "${TANDEM_MANAGEMENT_PORT:-8081}" \
    --metrics-port "${TANDEM_METRICS_PORT:-8082}" \
    --grpc-inference-port "${TANDEM_GRPC_INFERENCE_PORT:-7070}" \
    --grpc-management-port "${TANDEM_GRPC_MANAGEMENT_PORT:-7071}" \
    --health-port "${TANDEM_HEALTH_PORT:-8083}" \
    --startup-timeout "${TANDEM_STARTUP_TIMEOUT:-600}" \
    "$@"
