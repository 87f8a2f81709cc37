#!/usr/bin/env bash
# One-GPU embedding benchmark: our replica vs the card's recipe and sentence-transformers, with MFU.
# Offline; needs python3 with torch (CUDA), transformers, sentence-transformers, safetensors, tokenizers,
# numpy, pyarrow, fsspec — no Ray, no pydantic, no network. The Qwen3 tokenizer files come from a folder
# made beforehand with `python -m benchmarks.make_assets` (default .bench_assets/qwen_tokenizer).
#
#   bash benchmarks/gpu.sh .bench_assets/qwen_tokenizer [benchmarks.gpu options]
#   bash benchmarks/gpu.sh .bench_assets/qwen_tokenizer --device cpu --dtype float32 --layers 2 --docs 32  # smoke
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TOKENIZER="${1:?usage: benchmarks/gpu.sh TOKENIZER_DIR [options of python -m benchmarks.gpu]}"
shift
PYTHON="${PYTHON:-python3}"
for f in tokenizer.json tokenizer_config.json; do
  [[ -s "$TOKENIZER/$f" ]] || { echo "missing $TOKENIZER/$f (run: python -m benchmarks.make_assets)" >&2; exit 2; }
done

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"cuda available: {torch.cuda.is_available()}"
      + (f"; device {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
for name in ("transformers", "sentence_transformers", "tokenizers", "safetensors", "numpy", "pyarrow", "fsspec"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {name}: not importable ({exc})")
for name in ("ray", "pydantic"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent (not needed)'}")
PY
"$PYTHON" -c "import actors.embedder, actors.tokenize; print('actors.embedder imports without Ray/pydantic')"
exec "$PYTHON" -m benchmarks.gpu --tokenizer "$TOKENIZER" "$@"
