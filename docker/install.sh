#!/usr/bin/env bash
# Installs tandem-serve into a Python environment. Both images run it, and so does the installed-package test
# (tests/integration/test_installed_package.py), so what CI checks is what the images do.
#
#   docker/install.sh PYTHON PACKAGE [EXTRAS]
#     PYTHON   the interpreter to install into (python3 in the Triton image, a venv's python elsewhere)
#     PACKAGE  a wheel (or a source directory) of tandem-serve
#     EXTRAS   comma-separated extras, e.g. "torchserve" or "embedded" (default none)
#   TORCH_VERSION / TORCH_INDEX_URL pick the torch build when the environment has none (default: PyPI's).
#   TANDEM_PIP_ARGS: more pip arguments for the package, e.g. "--no-index --no-deps" where the dependencies are
#   already installed and no index can be reached (the GPU tier's machine).
set -euo pipefail

python=$1
package=$2
extras=${3:-}

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# Keep the numpy the environment already has: the NGC images' Python-backend stubs are built against
# numpy 1.x (server issue #8301), and the package needs no particular numpy.
"$python" -c 'import numpy; print(f"numpy=={numpy.__version__}")' >"$constraints" 2>/dev/null || true

pip=("$python" -m pip install --no-cache-dir --disable-pip-version-check)
if ! "$python" -c 'import torch' 2>/dev/null; then
    torch_index=()
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_index=(--index-url "$TORCH_INDEX_URL")
    fi
    "${pip[@]}" "${torch_index[@]}" "torch${TORCH_VERSION:+==$TORCH_VERSION}"
fi
read -r -a more <<<"${TANDEM_PIP_ARGS:-}"
"${pip[@]}" "${more[@]}" --constraint "$constraints" "${package}${extras:+[$extras]}"

# The installed package must find its model repositories, handlers and weights without a checkout.
"$python" - <<'PY'
from tandem_serve.paths import PACKAGED_ASSETS, assets_root, default_repositories, shipped_weights

assert assets_root() == PACKAGED_ASSETS, f"assets read from {assets_root()}, not the installed package"
assert all(path.is_dir() for path in default_repositories()) and shipped_weights().is_file()
print(f"tandem-serve installed; assets in {PACKAGED_ASSETS}")
PY
