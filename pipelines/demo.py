"""`embedrank demo`: a sample corpus on local disk, the configured model, one job end to end.

Where the model hub cannot be reached the demo builds a small randomly
initialised Qwen3 model with the real Qwen tokenizer, and says plainly that its
vectors carry no meaning.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import socket
import sys
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import load_config
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import read_committed
from pipelines.output.verify import verify_output

def _shipped_configs() -> pathlib.Path:
    """configs/ ships with the code (package data), so an installed embedrank finds it as a checkout does. It is a
    namespace package (YAML only): its search path is read directly, since an editable install adds a path hook
    entry to it that `importlib.resources` cannot take."""
    spec = importlib.util.find_spec("configs")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (pathlib.Path(location) / "demo.yaml").is_file():
            return pathlib.Path(location)
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


DEFAULT_CONFIG = _shipped_configs() / "demo.yaml"
WORDS = ("ray data embeds every shard of the corpus exactly once while replicas of the model run "
         "batches sorted by length under a token budget and the driver commits work items atomically "
         "so a crash loses nothing and a rerun resumes where it stopped").split()
LANGS = ("en", "de", "fr", "ja")


def write_sample_corpus(folder: pathlib.Path, rows: int, shards: int = 3, seed: int = 0) -> list[pathlib.Path]:
    """Parquet shards of synthetic documents with a long-tailed length mix and a few bad rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per_shard = -(-rows // shards)
    existing = sorted(folder.glob("part-*.parquet"))
    if len(existing) == shards:
        return existing
    for s in range(shards):
        n = min(per_shard, rows - s * per_shard)
        texts: list[str | None] = []
        for r in range(n):
            words = max(1, int(rng.lognormvariate(3.0, 0.9)))
            texts.append(" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ".")
        if n > 2:
            texts[1], texts[2] = None, "   "
        table = pa.table({"doc_id": [f"doc-{s}-{r:06d}" for r in range(n)], "text": pa.array(texts, pa.string()),
                          "lang": [rng.choice(LANGS) for _ in range(n)]})
        path = folder / f"part-{s:03d}.parquet"
        pq.write_table(table, path, row_group_size=200)
        paths.append(path)
    return paths


STAND_IN_WIDTH = 128
"""The offline stand-in model's embedding width, unless the config asks for more."""


def stand_in_width(cfg: EmbedJobConfig) -> int:
    """The stand-in's width: `STAND_IN_WIDTH`, or the widest `dimensions` the config asks for (model or vector
    columns), rounded up to a multiple of 64, so that every configured column can be cut from it."""
    asked = [cfg.model.dimensions or 0] + [v.dimensions or 0 for v in cfg.output.vectors or []]
    return max(STAND_IN_WIDTH, -(-max(asked) // 64) * 64)


def hub_reachable(model_id: str, timeout: float = 3.0) -> bool:
    """Whether `model_id` can be used: a local directory, or a hub id the hub answers for."""
    if os.path.isdir(model_id):
        return True
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(model_id, "config.json", etag_timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means: use the offline model
        return False


def run_demo(workdir: str, rows: int = 2000, config: str | None = None, overrides: list[str] = ()) -> int:
    work = pathlib.Path(workdir).resolve()
    corpus = work / f"corpus-{rows}"
    write_sample_corpus(corpus, rows)
    cfg = load_config(config or DEFAULT_CONFIG,
                      [f"input.paths=[{corpus / '*.parquet'}]", f"output.path={work / f'output-{rows}'}",
                       *overrides], schema=EmbedJobConfig)
    if not hub_reachable(cfg.model.path):
        from actors.random_qwen import build_random_qwen3

        hidden = stand_in_width(cfg)
        name = "random-qwen3-embedding" + ("" if hidden == STAND_IN_WIDTH else f"-{hidden}")
        model_dir = work / name
        if not (model_dir / "config.json").exists():
            build_random_qwen3(model_dir, kind="embedding", hidden_size=hidden, num_layers=2, num_heads=4,
                               num_kv_heads=2)
        print(f"NOTE: the model hub is not reachable, so this demo uses a small RANDOMLY INITIALISED Qwen3 "
              f"model with the real Qwen tokenizer ({model_dir}). The pipeline is real; the vectors are NOT "
              f"meaningful.", file=sys.stderr, flush=True)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(model_dir)})})
    run_embed(cfg)
    report = verify_output(cfg.output.path)
    table = read_committed(cfg.output.path)
    print(f"verify: {'invariant holds' if report.ok else report.problems} · {report.counts}")
    if table.num_rows:
        first = table.slice(0, 1).to_pylist()[0]
        for column in cfg.output.vector_column_names():
            vec = first[column]
            print(f"read back {table.num_rows} rows; first id {first['id']!r}, {column} "
                  f"{table.schema.field(column).type.value_type}[{len(vec)}], head {[round(v, 4) for v in vec[:4]]}")
    if cfg.output.table is not None:
        from pipelines.output.table import open_catalog
        from pipelines.storage import Storage

        iceberg = open_catalog(cfg.output.table, Storage(cfg.output.path)).load_table(
            (cfg.output.table.namespace, cfg.output.table.name))
        count = iceberg.scan().count()
        print(f"Iceberg table {cfg.output.table.namespace}.{cfg.output.table.name}: {count} rows read back through "
              f"the catalog (snapshot {iceberg.current_snapshot().snapshot_id}); "
              f"{'matches' if count == table.num_rows else 'DIFFERS FROM'} the committed rows")
        if count != table.num_rows:
            return 1
    return 0 if report.ok else 1
