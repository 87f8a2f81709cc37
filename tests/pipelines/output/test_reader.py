"""The reader API: committed files, a pyarrow dataset and a Ray Dataset over exactly them, the same rows as the
in-memory table, on local disk and S3; and the documented snippets (README, docs/output.md: pandas, Polars, DuckDB, LanceDB) on a real output.

One small embedding output (partitioned by `lang`, so files sit in Hive-style folders) is built per module on
the session Ray and copied to the S3 server.
"""

import pathlib
import re
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.reader import (
    committed_files,
    open_dataset,
    read_committed,
    read_dataset,
)

pytestmark = pytest.mark.integration

DIM = 64


@pytest.fixture(scope="module")
def outputs(ray_local, s3_server, tiny_embedding_model, tmp_path_factory):
    """{"local": (url, options), "s3": (url, options)}: one finished output, 2 shards × 20 rows (one rejected)."""
    base = tmp_path_factory.mktemp("reader")
    corpus = base / "corpus"
    corpus.mkdir()
    for shard in range(2):
        texts = [f"text {shard}-{i} " + "word " * (i % 5) for i in range(20)]
        if shard == 1:
            texts[3] = None
        pq.write_table(pa.table({"doc_id": [f"s{shard}-{i}" for i in range(20)], "text": pa.array(texts, pa.string()),
                                 "lang": ["en" if i % 3 else "de" for i in range(20)]}),
                       corpus / f"part-{shard}.parquet", row_group_size=10)
    out = base / "out"
    run_embed(EmbedJobConfig.model_validate({
        "input": {"paths": [f"{corpus}/*.parquet"], "id_column": "doc_id", "passthrough_columns": ["lang"],
                  "rows_per_item": 10},
        "model": {"path": str(tiny_embedding_model), "max_length": 32},
        "output": {"path": str(out), "partition_by": "lang",
                   "table": {"name": "docs", "publish_every_s": 0.001}},  # a progress snapshot at every commit
        "compute": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 1, "batch_rows": 32},
    }))
    bucket = s3_server.make_bucket(f"reader-{uuid.uuid4().hex[:12]}")
    s3_server.filesystem().put(str(out), f"{bucket}/out", recursive=True)
    return {"local": (str(out), {}), "s3": (f"s3://{bucket}/out", s3_server.storage_options())}


def rows(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r.get("id") or "", r.get("row") or 0))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_streaming_readers_return_exactly_the_committed_rows(outputs, where):
    out, options = outputs[where]
    for rejects in (False, True):
        whole = read_committed(out, options, rejects=rejects)
        assert whole.num_rows == (1 if rejects else 39)

        files = committed_files(out, options, rejects=rejects)
        assert len(files) == len(set(files)) >= 1
        assert all(f.startswith("s3://" if where == "s3" else "/") for f in files)
        if not rejects:
            assert any("/data/lang=de/" in f for f in files) and any("/data/lang=en/" in f for f in files)

        dataset = open_dataset(out, options, rejects=rejects)
        assert sorted(dataset.files) == sorted(f.removeprefix("s3://") for f in files)
        assert dataset.schema.names == whole.schema.names  # no partition column added from the paths
        assert rows(dataset.to_table()) == rows(whole)

    whole = read_committed(out, options)  # the same files as open_dataset's: one read through Ray suffices
    ray_rows = pa.concat_tables(read_dataset(out, options).iter_batches(batch_format="pyarrow", batch_size=None))
    assert ray_rows.schema.names == whole.schema.names
    assert rows(ray_rows) == rows(whole)


def test_the_readme_snippets(outputs, tmp_path):
    """The README's "Reading the output" examples, as written there, on a local output."""
    out, _ = outputs["local"]
    whole = read_committed(out).sort_by("id")
    query = np.asarray(whole.column("embedding")[0].values, dtype=np.float32)

    # pandas
    df = open_dataset(out).to_table(columns=["id", "embedding"]).to_pandas()
    assert sorted(df["id"]) == whole.column("id").to_pylist() and len(df["embedding"][0]) == DIM

    # Polars, lazily, through the pyarrow dataset or straight from the files
    import polars as pl

    lazy = pl.scan_pyarrow_dataset(open_dataset(out)).filter(pl.col("lang") == "de").select("id", "embedding")
    de = lazy.collect()
    assert sorted(de["id"]) == sorted(r["id"] for r in whole.to_pylist() if r["lang"] == "de")
    assert de.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert pl.scan_parquet(committed_files(out)).select(pl.len()).collect().item() == whole.num_rows

    # DuckDB: the Parquet files give FLOAT[], cast to FLOAT[dim] for the array functions
    import duckdb

    files = committed_files(out)
    kinds = duckdb.sql("SELECT typeof(embedding) FROM read_parquet($files) LIMIT 1", params={"files": files})
    assert kinds.fetchall() == [("FLOAT[]",)]
    nearest = duckdb.sql(
        f"SELECT id, array_cosine_similarity(embedding::FLOAT[{DIM}], $q::FLOAT[{DIM}]) AS sim "
        "FROM read_parquet($files) ORDER BY sim DESC LIMIT 3",
        params={"q": query.tolist(), "files": files}).fetchall()
    assert nearest[0][0] == whole.column("id")[0].as_py() and nearest[0][1] == pytest.approx(1.0, abs=1e-5)
    dataset = open_dataset(out)  # noqa: F841 - DuckDB finds the Python variable by its name
    assert duckdb.sql("SELECT typeof(embedding) FROM dataset LIMIT 1").fetchall() == [(f"FLOAT[{DIM}]",)]
    counted = duckdb.sql("SELECT lang, count(*) AS n FROM dataset GROUP BY lang ORDER BY lang").fetchall()
    assert counted == [(lang, sum(r["lang"] == lang for r in whole.to_pylist())) for lang in ("de", "en")]

    # LanceDB: a table loaded from the stream of record batches, searched by vector
    import lancedb

    db = lancedb.connect(str(tmp_path / "lance"))
    docs = db.create_table("docs", open_dataset(out).scanner(columns=["id", "embedding"]).to_reader())
    hits = docs.search(query).distance_type("cosine").limit(3).to_list()
    assert docs.count_rows() == whole.num_rows and hits[0]["id"] == whole.column("id")[0].as_py()


REPO = pathlib.Path(__file__).resolve().parents[3]


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of a page of the repository, in order."""
    return re.findall(r"^```python\n(.*?)^```", (REPO / page).read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/output.md"])
def test_the_documented_snippets_run_as_written(outputs, tmp_path, page):
    """Every Python snippet of README's "Reading the output" and of docs/output.md, executed as the page has it
    (one namespace, in order) on a real output: only the output URL, the LanceDB folder and the vector width are
    put in."""
    out, _ = outputs["local"]
    whole = read_committed(out).sort_by("id")
    query = np.asarray(whole.column("embedding")[0].values, dtype=np.float32)
    blocks = python_blocks(page)
    assert blocks and "from pipelines.output.reader import" in blocks[0]
    namespace = {"query_vector": query.tolist()}
    for block in blocks:
        code = (block.replace('"s3://bucket/vectors/v1"', repr(out)).replace('"/data/lance"', repr(str(tmp_path)))
                .replace("FLOAT[1024]", f"FLOAT[{DIM}]"))
        exec(compile(code, f"{page} snippet", "exec"), namespace)  # noqa: S102 - the page's own code
    assert namespace["table"].num_rows == whole.num_rows == 39
    assert sorted(namespace["files"]) == sorted(committed_files(out))
    if page == "docs/output.md":
        assert len(namespace["df"]) == 39 and namespace["rows"] == 39
        assert sorted(namespace["de"]["id"]) == sorted(r["id"] for r in whole.to_pylist() if r["lang"] == "de")
        assert namespace["hits"][0]["id"] == whole.column("id")[0].as_py()


def test_duckdb_reads_both_vector_dtypes_from_the_files_as_written(tmp_path):
    """As README says: DuckDB reads float32 (byte-stream-split) and float16 vectors from embedrank's Parquet files
    as FLOAT[], values intact; half floats it does not take from Arrow."""
    import duckdb
    import pyarrow.dataset

    from pipelines.output.pieces import _parquet_bytes

    values = np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32)
    for dtype, arrow in (("float32", pa.float32()), ("float16", pa.float16())):
        vectors = values.astype(dtype)
        table = pa.table({"id": [f"d{i}" for i in range(5)],
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), arrow), DIM)})
        path = tmp_path / f"{dtype}.parquet"
        path.write_bytes(_parquet_bytes(table, "{}"))
        got = duckdb.sql(f"SELECT typeof(embedding), embedding FROM read_parquet('{path}') ORDER BY id").fetchall()
        assert {kind for kind, _ in got} == {"FLOAT[]"}
        np.testing.assert_array_equal(np.array([v for _, v in got], dtype=np.float32), vectors.astype(np.float32))
    dataset = pyarrow.dataset.dataset(str(tmp_path / "float16.parquet"))  # noqa: F841 - found by name
    with pytest.raises(duckdb.NotImplementedException):
        duckdb.sql("SELECT embedding FROM dataset").fetchall()


def test_engines_read_exactly_the_committed_rows_through_the_iceberg_table(outputs, ray_local):
    """The embed run published its output to the embedded catalog: pyiceberg, Polars and Ray Data (readers no one
    here wrote) read exactly the committed rows; every snapshot before the last held whole committed items."""
    import polars as pl
    import ray

    from pipelines.output.root import OutputRoot
    from pipelines.output.table import open_catalog
    from pipelines.config import TableConfig
    from pipelines.storage import Storage

    out, _ = outputs["local"]
    whole = read_committed(out)
    catalog_kwargs = {"name": "embedrank", "type": "sql", "uri": f"sqlite:///{out}/_iceberg/catalog.db"}
    table = open_catalog(TableConfig(name="docs"), Storage(out)).load_table("embedrank.docs")
    got = table.scan().to_arrow()
    assert sorted(got.column("id").to_pylist()) == sorted(whole.column("id").to_pylist())
    assert got.num_rows == whole.num_rows == 39
    by_id = dict(zip(whole.column("id").to_pylist(), whole.column("embedding").to_pylist()))
    for i, vec in zip(got.column("id").to_pylist(), got.column("embedding").to_pylist()):
        assert vec == pytest.approx(by_id[i])

    # Polars 2.1's native Iceberg reader refuses the files' fixed_size_list for the table's list (a SchemaError):
    # its pyiceberg reader reads them
    polars = pl.scan_iceberg(table, reader_override="pyiceberg").select("id", "embedding").collect()
    assert sorted(polars["id"].to_list()) == sorted(by_id) and len(polars["embedding"][0]) == DIM
    fixed = polars.select(pl.col("embedding").list.to_array(DIM))
    assert fixed.schema["embedding"] == pl.Array(pl.Float32, DIM)

    rows = ray.data.read_iceberg(table_identifier="embedrank.docs", catalog_kwargs=catalog_kwargs).take_all()
    assert sorted(r["id"] for r in rows) == sorted(by_id)

    # progress: each snapshot's files are exactly the files of a set of whole committed items
    commits = OutputRoot(Storage(out)).read_commits()
    item_files = {c.item: {Storage(out).path(f.path) for f in c.files} for c in commits.values()}
    owner = {f: item for item, files in item_files.items() for f in files}
    snapshots = [s for s in table.snapshots()]
    assert len(snapshots) >= 2  # progress snapshots before the last
    for snap in snapshots:
        files = {t.file.file_path for t in table.scan(snapshot_id=snap.snapshot_id).plan_files()}
        items = {owner[f] for f in files}
        assert files == set().union(*(item_files[i] for i in items)), snap.snapshot_id
    assert {t.file.file_path for t in table.scan().plan_files()} == set(committed_files(out))
    rejects = open_catalog(TableConfig(name="docs"), Storage(out)).load_table("embedrank.docs_rejects")
    assert rejects.scan().to_arrow().num_rows == read_committed(out, rejects=True).num_rows == 1


DAFT_READ = """
import sys
import daft
import pyarrow.parquet as pq
from pyiceberg.catalog.sql import SqlCatalog

catalog = SqlCatalog("embedrank", uri=sys.argv[1])
frame = daft.read_iceberg(catalog.load_table("embedrank.docs")).select("id", "embedding")
pq.write_table(frame.to_arrow(), sys.argv[2])
print(daft.__version__)
"""


def test_daft_reads_exactly_the_committed_rows_through_the_iceberg_table(outputs, tmp_path):
    """Daft (`read_iceberg`, in an environment of its own: its pyarrow pin clashes with ours) reads exactly the
    committed rows and vectors through the table. Daft 0.7.26 reads data files by their Parquet field ids only
    (it refuses files without them, not applying `schema.name-mapping.default`): the committed files carry the
    table's ids (`pipelines.output.field_ids`)."""
    import subprocess

    from support.reader_envs import daft_python

    python, why = daft_python()
    if python is None:
        pytest.skip(why)
    out, _ = outputs["local"]
    got_path = tmp_path / "daft.parquet"
    proc = subprocess.run([str(python), "-c", DAFT_READ, f"sqlite:///{out}/_iceberg/catalog.db", str(got_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "0.7.26"
    got = pq.read_table(got_path).sort_by("id")
    whole = read_committed(out).sort_by("id")
    assert got.column("id").to_pylist() == whole.column("id").to_pylist() and got.num_rows == 39
    assert np.array_equal(np.asarray(got.column("embedding").to_pylist(), np.float32),
                          np.asarray(whole.column("embedding").to_pylist(), np.float32))


def _duckdb_extension(name: str):
    """The file of DuckDB's `name` extension from its PyPI wheel (`duckdb-extension-<name>`), for the installed
    DuckDB; None where the wheel is missing or built for another DuckDB."""
    import importlib
    import os

    import duckdb

    try:
        package = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(package.__file__), "extensions", f"v{duckdb.__version__}",
                        f"{name}.duckdb_extension")
    return path if os.path.exists(path) else None


def test_duckdb_reads_exactly_the_committed_rows_through_the_iceberg_table(outputs):
    """DuckDB's iceberg extension (installed from its PyPI wheel, which pins the DuckDB it loads into) reads the
    table's current metadata: exactly the committed rows and vectors, cast back to fixed-size arrays."""
    import duckdb

    from pipelines.config import TableConfig
    from pipelines.output.table import open_catalog
    from pipelines.storage import Storage

    found = {n: _duckdb_extension(n) for n in ("avro", "iceberg")}
    if None in found.values():
        pytest.skip(f"no duckdb-extension-iceberg/-avro wheel for DuckDB {duckdb.__version__} (the test extra pins "
                    "the DuckDB they match)")
    out, _ = outputs["local"]
    table = open_catalog(TableConfig(name="docs"), Storage(out)).load_table("embedrank.docs")
    con = duckdb.connect()
    for name, path in found.items():
        con.execute(f"INSTALL '{path}'; LOAD {name}")
    cast = table.properties["embedrank.cast.embedding.duckdb"]
    got = con.execute(f"SELECT id, {cast} AS embedding FROM iceberg_scan('{table.metadata_location}') "
                      "ORDER BY id").fetch_arrow_table()
    whole = read_committed(out).sort_by("id")
    assert got.column("id").to_pylist() == whole.column("id").to_pylist() and got.num_rows == 39
    assert got.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert np.array_equal(np.asarray(got.column("embedding").to_pylist(), np.float32),
                          np.asarray(whole.column("embedding").to_pylist(), np.float32))
