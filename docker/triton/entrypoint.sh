#!/usr/bin/env bash
# Entrypoint of the tandem-serve Triton image: `tandem serve triton` on the installed server, supervised.
#
# - Repositories: the package's two (its stage models and its ensembles), or $TANDEM_MODEL_REPOSITORY
#   (colon-separated; e.g. one written by `tandem repository export` on a mounted volume).
# - Keys: the restricted APIs (model repository, logging, trace; shared memory) need the keys in the mounted
#   secret $TANDEM_KEY_FILE (a keys.json; `tandem keys FILE` writes one). Without it fresh keys are made and
#   kept in the workspace, so nobody outside the container can use those APIs.
# - Model control: explicit, but only the supervisor holds the admin key (it reloads a model whose stub died);
#   TANDEM_SUPERVISE=0 turns supervision off and model control with it (--model-control-mode=none).
# - Strict readiness; health for probes on $TANDEM_HEALTH_PORT: /live, /ready, /status.
# Extra arguments go to `tandem serve triton` (see `tandem serve triton --help`).
set -euo pipefail

args=(
    --host "${TANDEM_HOST:-0.0.0.0}"
    --http-port "${TANDEM_HTTP_PORT:-8000}"
    --grpc-port "${TANDEM_GRPC_PORT:-8001}"
    --metrics-port "${TANDEM_METRICS_PORT:-8002}"
    --health-port "${TANDEM_HEALTH_PORT:-8003}"
    --workspace "${TANDEM_WORKSPACE:-/tmp/tandem-triton}"
    --startup-timeout "${TANDEM_STARTUP_TIMEOUT:-600}"
)
# Unset: nvidia-pytriton's embedded server (how CI runs this script); the image sets /opt/tritonserver.
if [ -n "${TANDEM_TRITONSERVER:-}" ]; then
    args+=(--tritonserver "$TANDEM_TRITONSERVER")
fi
key_file=${TANDEM_KEY_FILE:-/run/secrets/tandem-triton-keys}
if [ -r "$key_file" ]; then
    args+=(--key-file "$key_file")
else
    echo "entrypoint: no keys at $key_file (mount a secret there or set TANDEM_KEY_FILE): fresh keys, kept in the workspace" >&2
fi
# KServe downloads an InferenceService's storageUri to /mnt/models: serve that repository when it holds models.
if [ -z "${TANDEM_MODEL_REPOSITORY:-}" ] && compgen -G "/mnt/models/*/config.pbtxt" >/dev/null; then
    echo "entrypoint: serving the repository KServe put at /mnt/models" >&2
    TANDEM_MODEL_REPOSITORY=/mnt/models
fi
if [ -n "${TANDEM_MODEL_REPOSITORY:-}" ]; then
    IFS=: read -r -a repositories <<<"$TANDEM_MODEL_REPOSITORY"
    for repository in "${repositories[@]}"; do
        args+=(--model-repository "$repository")
    done
fi
if [ "${TANDEM_SUPERVISE:-1}" = "0" ]; then
    args+=(--no-supervise)
fi
exec tandem serve triton "${args[@]}" "$@"
