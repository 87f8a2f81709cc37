"""The committed output as an Apache Iceberg table (`pipelines.output.table`): exactly the committed files, each
once, idempotent, converging after a crash on either side of the catalog's commit, index versions as tagged
overwrite snapshots with time travel, gc expiring them, and a table of other columns refused.

Outputs are built with the real commit protocol (`support.late_writer.run_output`, no Ray) on local disk and on
the S3 server; catalogs are real: the embedded SQL catalog on SQLite, and a SQL catalog on a PostgreSQL server
the session fixture starts on 127.0.0.1 (`postgres_server`, warehouse on the S3 server). The expected sets come
from the commit records, read by the reader (`committed_files`, `read_committed`), never from the table code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import OutputError
from pipelines.config import TableConfig
from pipelines.output.lock import OutputLock
from pipelines.output.reader import committed_files, committed_listing, read_committed
from pipelines.output.root import OutputRoot
from pipelines.output.table import (
    EPOCH,
    PROGRESS,
    VERSION,
    ProgressPublisher,
    TablePublisher,
    claim_tables,
    expire_index_versions,
    open_catalog,
    publish_output,
)
from pipelines.reindex.index import IndexRoot
from pipelines.storage import Storage
from support.late_writer import FP, FP_ID, attempt, commit_of, item, run_output, write_piece
from support.vector_output import HALF, POOLED, VECTORS, build_vector_output

REPO = Path(__file__).resolve().parents[3]


def table_config(store: Storage, tmp_path: Path, name: str = "docs") -> TableConfig:
    """The embedded catalog for a local output; for S3, a SQL catalog on SQLite here with its warehouse in the
    bucket (the S3 FileIO properties come from the output's storage options)."""
    if store.is_local:
        return TableConfig(name=name)
    bucket = store.url.removeprefix("s3://").split("/")[0]
    return TableConfig(name=name, catalog={"name": "s3cat", "properties": {
        "type": "sql", "uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"s3://{bucket}/warehouse"}})


def load(store: Storage, cfg: TableConfig, name: str | None = None):
    return open_catalog(cfg, store).load_table((cfg.namespace, name or cfg.name))


def table_files(table, snapshot_id: int | None = None) -> list[str]:
    return [t.file.file_path for t in table.scan(snapshot_id=snapshot_id).plan_files()]


def ids_of(table: pa.Table) -> list[str]:
    return sorted(table.column("id").to_pylist())


def build(store: Storage, items, cfg: TableConfig, salt: float = 0.0):
    with OutputLock(store, 30):
        commits = run_output(OutputRoot(store), items, salt, recorded={"output": {"table": cfg.model_dump()}})
        published = publish_output(store.url, store.storage_options, cfg)
    return commits, published


def test_the_table_names_exactly_the_committed_files_once_and_republishing_is_a_no_op(store, tmp_path):
    cfg = table_config(store, tmp_path)
    _, first = build(store, [item(1), item(2), item(3)], cfg)
    expected = committed_files(store.url, store.storage_options)
    table = load(store, cfg)
    files = table_files(table)
    assert sorted(files) == sorted(expected) and len(files) == len(set(files)) == 3
    assert first["table"]["added"] == 3 and first["table"]["changed"]
    got = table.scan().to_arrow()
    want = read_committed(store.url, store.storage_options)
    assert ids_of(got) == ids_of(want) == sorted(f"d{n}-{i}" for n in (1, 2, 3) for i in range(3))
    by_id = dict(zip(got.column("id").to_pylist(), got.column("embedding").to_pylist()))
    for i, vec in zip(want.column("id").to_pylist(), want.column("embedding").to_pylist()):
        assert by_id[i] == pytest.approx(vec)
    summary = table.current_snapshot().summary
    assert summary[EPOCH] == "1" and summary["embedrank.fingerprint_id"] == "fpid-late-writer"
    assert table.properties["embedrank.cast.embedding.duckdb"] == "CAST(embedding AS FLOAT[2])"
    assert "list.to_array(2)" in table.schema().find_field("embedding").doc
    snapshots = len(table.snapshots())

    with OutputLock(store, 30):  # a rerun: the table is at the committed set, so nothing is committed
        again = publish_output(store.url, store.storage_options, cfg)
    assert not again["table"]["changed"] and again["table"]["added"] == again["table"]["removed"] == 0
    assert len(load(store, cfg).snapshots()) == snapshots


def test_a_replaced_record_swaps_its_file_in_the_table(tmp_path):
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    commits, _ = build(store, [item(1), item(2)], cfg)
    lost = commits[item(2).item_id].files[0].path
    os.remove(store.path(lost))  # a committed file removed by hand: the rerun recommits item 2 under a new name
    _, second = build(store, [item(1), item(2)], cfg)
    assert (second["table"]["added"], second["table"]["removed"]) == (1, 1)
    files = table_files(load(store, cfg))
    assert sorted(files) == sorted(committed_files(store.url)) and store.path(lost) not in files


def test_progress_snapshots_are_expired_as_the_job_goes_and_the_last_ones_still_read(store, tmp_path):
    """A long backfill publishes a progress snapshot every `publish_every_s`: each publication expires the progress
    snapshots before the table's current one (the metadata JSON grows by each snapshot kept), so the table keeps
    at most two, and one after a final publication that adds files; the claim and the final snapshot stay, and what
    is kept reads back exactly its items."""
    import io

    cfg = table_config(store, tmp_path).model_copy(update={"publish_every_s": 1})
    items = [item(n) for n in range(1, 7)]
    with OutputLock(store, 30):
        root = OutputRoot(store)
        commits = root.prepare(FP, FP_ID, items, {"output": {"table": cfg.model_dump()}}, None)
        claim_tables(store, cfg)
        progress = ProgressPublisher(cfg, store, FP, FP_ID, io.StringIO())
        published = {}  # snapshot id -> the items it was published with
        for it in items:
            commits[it.item_id] = root.write_commit(commit_of(it, [write_piece(store, it)]))
            progress(dict(commits), force=True)
            published[load(store, cfg).current_snapshot().snapshot_id] = dict(commits)
            marked = [s for s in load(store, cfg).snapshots() if s.summary[PROGRESS] == "true"]
            assert len(marked) == min(len(published), 2), [s.snapshot_id for s in marked]
        items.append(item(7))  # a last item after the last progress publication: the final one adds it
        commits = run_output(root, items, recorded={"output": {"table": cfg.model_dump()}})
        publish_output(store.url, store.storage_options, cfg)
    table = load(store, cfg)
    kept = table.snapshots()
    assert len(published) == 6 and len(kept) == 3, [(s.snapshot_id, s.summary.additional_properties) for s in kept]
    claim, *marked, final = kept  # the final publication expired all but the last progress snapshot, its parent
    assert table_files(table, claim.snapshot_id) == [] and claim.summary[PROGRESS] is None
    assert [s.snapshot_id for s in marked] == list(published)[-1:]
    assert final.summary[PROGRESS] is None and final.snapshot_id == table.current_snapshot().snapshot_id
    for snap in marked:  # the progress snapshots kept still read back exactly the items published with them
        want = [store.path(f.path) if store.is_local else f"s3://{store.path(f.path)}"
                for c in published[snap.snapshot_id].values() for f in c.files]
        assert sorted(table_files(table, snap.snapshot_id)) == sorted(want)
    assert sorted(table_files(table)) == sorted(committed_files(store.url, store.storage_options))
    assert len(table_files(table)) == 7
    with table.io.new_input(table.metadata_location).open() as fh:  # what every reader loads: 3 snapshots
        assert len(json.loads(fh.read())["snapshots"]) == 3


def _publish_cli(url: str, failpoint: str | None = None, options: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}",
           "EMBEDRANK_FAILPOINTS": failpoint or ""}
    argv = [sys.executable, "-m", "pipelines.cli", "publish", url, "--json"]
    for key, value in (options or {}).items():
        argv += ["--storage-option", f"{key}={json.dumps(value)}"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow  # the crashing publisher and the converging one are `embedrank publish` processes
def test_a_crash_on_either_side_of_the_catalog_commit_converges_on_the_next_publish(tmp_path):
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    with OutputLock(store, 30):  # committed, never published: a crash between our commit and the table's
        run_output(OutputRoot(store), [item(1), item(2)], recorded={"output": {"table": cfg.model_dump()}})
    crashed = _publish_cli(store.url, "before_table_commit")
    assert crashed.returncode == 137, crashed.stderr
    table = load(store, cfg)
    assert table.current_snapshot() is None and table_files(table) == []  # nothing half-published

    done = _publish_cli(store.url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["table"]["added"] == 2
    assert sorted(table_files(load(store, cfg))) == sorted(committed_files(store.url))

    with OutputLock(store, 30):  # a third item committed; the publisher dies right after the catalog's commit
        run_output(OutputRoot(store), [item(1), item(2), item(3)], recorded={"output": {"table": cfg.model_dump()}})
    crashed = _publish_cli(store.url, "after_table_commit")
    assert crashed.returncode == 137, crashed.stderr
    assert sorted(table_files(load(store, cfg))) == sorted(committed_files(store.url))
    again = _publish_cli(store.url)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["table"] == {
        **json.loads(again.stdout.splitlines()[-1])["table"], "changed": False, "added": 0, "removed": 0}
    assert len(table_files(load(store, cfg))) == 3


def test_files_prints_the_committed_files_with_rows_and_checksums(tmp_path):
    import hashlib

    store = Storage(str(tmp_path / "out"))
    with OutputLock(store, 30):
        run_output(OutputRoot(store), [item(1), item(2)])
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    plain = subprocess.run([sys.executable, "-m", "pipelines.cli", "files", store.url], capture_output=True,
                           text=True, env=env, timeout=60, check=True)
    assert plain.stdout.split() == committed_files(store.url)
    rows = json.loads(subprocess.run([sys.executable, "-m", "pipelines.cli", "files", store.url, "--json"],
                                     capture_output=True, text=True, env=env, timeout=60, check=True).stdout)
    assert [r["url"] for r in rows] == committed_files(store.url) and sum(r["rows"] for r in rows) == 6
    for r in rows:
        assert r["sha256"] == hashlib.sha256(Path(r["url"]).read_bytes()).hexdigest()
    assert rows == committed_listing(store.url)


def test_a_table_with_other_columns_is_refused_naming_the_difference(tmp_path):
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    catalog = open_catalog(cfg, store)
    catalog.create_namespace_if_not_exists("embedrank")
    catalog.create_table(("embedrank", "docs"), schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
    with OutputLock(store, 30):
        run_output(OutputRoot(store), [item(1)])
        with pytest.raises(OutputError, match=r"other columns.*lacks: \['text'\].*lacks: \['embedding'\]"):
            publish_output(store.url, None, cfg)
    assert load(store, cfg).current_snapshot() is None


def test_several_vector_columns_are_published_as_lists_of_their_element_types(tmp_path):
    """An output with `output.vectors` (float32, int8[8], ubinary packed bits): the table registers its files in
    place and reads every value back as the committed files hold it, each vector column a list (Iceberg has no
    fixed-size list, nor 8-bit ints: int8/uint8 read as int; the table's properties say how to cast back)."""
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    build_vector_output(store, recorded={"output": {"table": cfg.model_dump()}})
    published = publish_output(store.url, None)  # the recorded table config
    assert published["table"]["added"] == 3
    table = load(store, cfg)
    assert sorted(table_files(table)) == sorted(committed_files(store.url))
    columns = {f.name: str(f.field_type) for f in table.schema().fields}
    assert {c: columns[c] for c in ("f32", "i8", "bits")} == {"f32": "list<float>", "i8": "list<int>",
                                                            "bits": "list<int>"}
    got, want = table.scan().to_arrow().sort_by("id"), read_committed(store.url).sort_by("id")
    assert got.column("id").to_pylist() == want.column("id").to_pylist() and got.num_rows == 9
    for column, element in (("f32", pa.float32()), ("i8", pa.int32()), ("bits", pa.int32())):
        assert got.schema.field(column).type.value_type == element  # int8/uint8 widen to Iceberg's 32-bit int
        assert got.column(column).to_pylist() == want.column(column).to_pylist()  # every value as committed
    assert json.loads(table.properties["embedrank.vector.i8"]) == {"dimensions": 8, "dtype": "int8"}
    assert table.properties["embedrank.cast.bits.duckdb"] == "CAST(bits AS UTINYINT[2])"
    assert table.properties["embedrank.cast.f32.duckdb"] == f"CAST(f32 AS FLOAT[{POOLED}])"


def file_field_ids(schema: pa.Schema) -> dict[str, int]:
    """The `PARQUET:field_id` of each column of a file's (flat, or list-of-primitive) schema, by Iceberg name."""
    out = {}
    for field in schema:
        out[field.name] = int(field.metadata[b"PARQUET:field_id"])
        if pa.types.is_fixed_size_list(field.type) or pa.types.is_list(field.type):
            out[f"{field.name}.element"] = int(field.type.value_field.metadata[b"PARQUET:field_id"])
    return out


def file_field_ids_of_any(schema: pa.Schema) -> bool:
    """Whether any field of the schema, or any list element's, carries a field id."""
    fields = list(schema) + [f.type.value_field for f in schema if pa.types.is_fixed_size_list(f.type)]
    return any(f.metadata and b"PARQUET:field_id" in f.metadata for f in fields)


def iceberg_ids(table) -> dict[str, int]:
    from pyiceberg.schema import index_name_by_id

    return {name: field_id for field_id, name in index_name_by_id(table.schema()).items()}


def test_a_claimed_table_takes_the_field_ids_the_files_carry_and_reads_every_column_by_them(tmp_path):
    """A lock holder claims the table first (no columns); the first publication gives it the files' columns with
    the Parquet field ids every committed file carries (vector lists before other columns: pyiceberg's
    `union_by_name` would number each list's element next to it, not after the top-level columns). pyiceberg
    then reads each file by those ids: every value as committed."""
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    build_vector_output(store, recorded={"output": {"table": cfg.model_dump()}})
    with OutputLock(store, 30):
        claim_tables(store, cfg)
        assert not load(store, cfg).schema().fields
        publish_output(store.url, None)
    table = load(store, cfg)
    have = iceberg_ids(table)
    assert have == {"id": 1, "f32": 2, "i8": 3, "bits": 4, "n_tokens": 5, "truncated": 6,
                    "f32.element": 7, "i8.element": 8, "bits.element": 9}
    files = committed_files(store.url)
    assert len(files) == 3 and all(file_field_ids(pq.read_schema(f)) == have for f in files)
    mapping = {f["names"][0]: f["field-id"] for f in json.loads(table.properties["schema.name-mapping.default"])}
    assert mapping == {name: have[name] for name in ("id", "f32", "i8", "bits", "n_tokens", "truncated")}
    got, want = table.scan().to_arrow().sort_by("id"), read_committed(store.url).sort_by("id")
    for column in ("id", "f32", "i8", "bits", "n_tokens", "truncated"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column


def without_field_ids(schema: pa.Schema) -> pa.Schema:
    """The columns as files of before field ids held them: no field metadata, the list elements' included."""
    def bare(field: pa.Field) -> pa.Field:
        t = field.type
        if pa.types.is_fixed_size_list(t):
            t = pa.list_(t.value_type, t.list_size)
        return pa.field(field.name, t, field.nullable)

    return pa.schema([bare(f) for f in schema])


def test_a_table_numbered_otherwise_takes_files_without_ids_and_refuses_files_with_them(tmp_path):
    """A table made by an older embedrank (its columns numbered by `union_by_name`) still takes files written
    without field ids (read by name through its name mapping), and refuses in one line files whose ids would
    make a reader take one column for another."""
    store = Storage(str(tmp_path / "out"))
    cfg = TableConfig(name="docs")
    build_vector_output(store, recorded={"output": {"table": cfg.model_dump()}})
    columns = pq.read_schema(committed_files(store.url)[0])
    catalog = open_catalog(cfg, store)
    catalog.create_namespace_if_not_exists("embedrank")
    from pyiceberg.schema import Schema

    older = catalog.create_table(("embedrank", "docs"), schema=Schema())
    with older.update_schema(allow_incompatible_changes=True) as update:
        update.union_by_name(without_field_ids(columns))
    assert iceberg_ids(load(store, cfg))["f32.element"] == 3  # numbered otherwise than the files
    with OutputLock(store, 30):
        with pytest.raises(OutputError, match=r"numbers its columns otherwise than the Parquet field ids") as no:
            publish_output(store.url, None)
    assert "\n" not in str(no.value) and load(store, cfg).current_snapshot() is None

    plain = read_committed(store.url).sort_by("id")  # the same rows, written as files of before field ids
    plain = plain.cast(without_field_ids(plain.schema))
    path = store.path("data/written-before-field-ids.parquet")
    pq.write_table(plain, path)
    assert not file_field_ids_of_any(pq.read_schema(path))
    with OutputLock(store, 30):
        done = TablePublisher(cfg, store).publish([path])
    assert done.added == 1
    got = load(store, cfg).scan().to_arrow().sort_by("id")
    for column in ("id", "f32", "i8", "bits", "n_tokens"):
        assert got.column(column).to_pylist() == plain.column(column).to_pylist(), column


def test_a_float16_vector_column_is_refused_in_one_line_naming_it(tmp_path, capsys):
    """Iceberg has no 16-bit float: an output holding one (published after the fact: `embedrank publish` with a
    table config) is refused in one line that names the column and says to use float32; no table is made."""
    store = Storage(str(tmp_path / "out"))
    build_vector_output(store, vectors=VECTORS + [HALF])
    with pytest.raises(OutputError) as refused:
        publish_output(store.url, None, TableConfig(name="docs"))
    message = str(refused.value)
    assert "\n" not in message and "'h'" in message and "float32" in message
    for other in ("'f32'", "'i8'", "'bits'"):
        assert other not in message
    from pyiceberg.exceptions import NoSuchTableError

    with pytest.raises(NoSuchTableError):
        load(store, TableConfig(name="docs"))


def build_version(index: IndexRoot, items, salt: float, plan: str, cfg: TableConfig) -> str:
    """One reindex version with the real index protocol (claim, attempt, commits, pointer swap), then published."""
    with OutputLock(index.storage, 30):
        index.claim()
        base = (index.current() or {}).get("version")
        target, _ = index.start_attempt(base, {**attempt(plan), "base": base}, sys.stderr)
        run_output(index.version_root(target), items, salt, recorded={"index": {"table": cfg.model_dump()}})
        index.publish(target, {"rows": 3 * len(items)})
        publish_output(index.storage.url, index.storage.storage_options, cfg)
    return target


def test_index_versions_are_tagged_overwrite_snapshots_with_time_travel_and_gc_expires_them(tmp_path):
    index = IndexRoot(Storage(str(tmp_path / "index")))
    cfg = TableConfig(name="idx")
    wanted = {}
    for n, (items, salt) in enumerate([([item(1), item(2)], 0.0), ([item(1), item(3)], 1.0),
                                       ([item(2), item(3), item(4)], 2.0)]):
        name = build_version(index, items, salt, f"plan{n}", cfg)
        wanted[name] = read_committed(index.storage.url)
    assert list(wanted) == ["v000001", "v000002", "v000003"]
    table = load(index.storage, cfg)
    for name, rows in wanted.items():
        snap = table.snapshot_by_name(name)
        assert snap is not None and snap.summary[VERSION] == name
        assert snap.summary.operation.value == ("append" if name == "v000001" else "overwrite")
        got = table.scan(snapshot_id=snap.snapshot_id).to_arrow()
        assert ids_of(got) == ids_of(rows)
        want_vec = dict(zip(rows.column("id").to_pylist(), rows.column("embedding").to_pylist()))
        for i, vec in zip(got.column("id").to_pylist(), got.column("embedding").to_pylist()):
            assert vec == pytest.approx(want_vec[i])
    assert sorted(table_files(table)) == sorted(committed_files(index.storage.url))

    with OutputLock(index.storage, 30):
        result = index.gc(1, sys.stderr, before_delete=lambda dropped: expire_index_versions(index.storage, dropped))
    assert result["collected"] == ["v000001", "v000002"]
    table = load(index.storage, cfg)
    assert table.snapshot_by_name("v000001") is None and table.snapshot_by_name("v000002") is None
    assert {s.summary[VERSION] for s in table.snapshots()} == {"v000003"}
    assert ids_of(table.scan().to_arrow()) == ids_of(wanted["v000003"])  # every file it names is still there
    assert ids_of(table.scan(snapshot_id=table.snapshot_by_name("v000003").snapshot_id).to_arrow()) == \
        ids_of(wanted["v000003"])


@pytest.mark.integration
def test_a_sql_catalog_on_a_postgresql_server_with_its_warehouse_on_s3(postgres_server, s3_bucket, tmp_path):
    """A catalog server: pyiceberg's SQL catalog on the PostgreSQL server the fixture started on 127.0.0.1, the
    warehouse (table metadata) in the S3 server's bucket, the output on S3. The table names exactly the committed
    files and reads exactly the committed rows; PostgreSQL's own catalog row points at the current metadata in
    the bucket; a republish commits nothing."""
    import psycopg2

    bucket, options = s3_bucket
    store = Storage(f"s3://{bucket}/out", options)
    cfg = TableConfig(name="docs", catalog={"name": "pg", "properties": {
        "type": "sql", "uri": postgres_server.uri(), "warehouse": f"s3://{bucket}/warehouse"}})
    _, first = build(store, [item(1), item(2), item(3)], cfg)
    assert first["table"]["added"] == 3
    table = load(store, cfg)
    assert sorted(table_files(table)) == sorted(committed_files(store.url, options))
    assert ids_of(table.scan().to_arrow()) == ids_of(read_committed(store.url, options))
    assert table.metadata_location.startswith(f"s3://{bucket}/warehouse/")

    dsn = postgres_server.uri().replace("postgresql+psycopg2", "postgresql")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_namespace, table_name, metadata_location FROM iceberg_tables ORDER BY 2")
        found = cur.fetchall()
    assert [(ns, name) for ns, name, _ in found] == [("embedrank", "docs")]  # no rejects: no rejects table
    assert found[0][2] == table.metadata_location
    assert store.fs.exists(table.metadata_location)

    with OutputLock(store, 30):
        again = publish_output(store.url, options, cfg)
    assert not again["table"]["changed"] and len(load(store, cfg).snapshots()) == len(table.snapshots())
