"""The output as an Apache Iceberg table: a projection of the commit records, published exactly once.

The Parquet output and its commit records stay the source of truth. This module brings an Iceberg table (any
pyiceberg catalog; by default an embedded SQL catalog on SQLite in `<output>/_iceberg/`) to name exactly the
files the commits name, each once, registered in place (nothing is copied): the committed data files of an
output, the final ranks of a rerank, the current version's files of an index (one overwrite snapshot per
published version, tagged with its name), and the reject files in `<name>_rejects`. The table numbers its columns
with the Parquet field ids every committed file carries (`field_ids`), so readers that find a file's columns by
id only (Daft) read them; files written before they carried ids are read by name (`schema.name-mapping.default`).

Exactly once, converging: a publication reads the table's current files and commits only the difference with
the committed set (new files appended, files the commits no longer name removed); when they are equal it does
nothing. A crash anywhere (before, inside or after the catalog's commit) leaves the table at the old set or the
new one, and the next publication (a rerun, `embedrank publish`) converges.

Fencing: every snapshot's summary carries the publisher's lease epoch (`embedrank.epoch`) and fingerprint id. A
publisher stops (`LockLost`) if any snapshot of the table carries a newer epoch. Its commit rides on the
catalog's compare-and-swap (a commit whose base snapshot is no longer the table's is refused; pyiceberg's own
retry, which would re-apply the change on the new state, is switched off for these tables), and a refused
commit is re-planned from the table's new state only after that epoch check passes again. A new lock holder
`claim`s the table (an empty snapshot of its epoch) before it deletes anything, creating it when there is none
yet (columns unknown until the first committed file: an empty schema, adopted by the first publication), so a
paused publisher that wakes always meets the newer epoch (its base stale, or the table it meant to create already
there): it can never roll the table back, nor add files a newer writer removed, even where its own lease check
and its catalog commit are far apart.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, TextIO

import pyarrow as pa

from common import failpoints
from common.errors import LockLost, OutputError
from pipelines.config import TableConfig
from pipelines.output.field_ids import field_ids, with_field_ids
from pipelines.output.index_pointer import current_version, version_storage
from pipelines.output.lock import fence, held_epoch
from pipelines.storage import Storage

TABLE_DIR = "_iceberg"
"""The embedded catalog's folder in an output (or index) root: `catalog.db` (SQLite) and `warehouse/`."""
EPOCH = "embedrank.epoch"
FINGERPRINT = "embedrank.fingerprint_id"
VERSION = "embedrank.version"
OUTPUT = "embedrank.output"
ITEMS = "embedrank.files"
PROGRESS = "embedrank.progress"
"""In the summary of a snapshot published while a job ran ("true"): each publication expires the progress
snapshots before the table's current one, so that a long backfill's table keeps at most two of them."""
ATTEMPTS = 10
logging.getLogger("pyiceberg.io.pyarrow").setLevel(logging.ERROR)  # "statistics missing" for every vector column
TABLE_PROPERTIES = {
    "commit.retry.num-retries": "0",  # a refused commit comes back to us: the epoch is checked before a retry
    "commit.manifest-merge.enabled": "true",  # periodic publications do not leave one manifest each: at the 16th
    "commit.manifest.min-count-to-merge": "16",  # small manifest they merge (pyiceberg's default waits for 100)
}


def fileio_properties(storage: Storage) -> dict[str, str]:
    """pyiceberg FileIO properties for the files of an S3 output, from its fsspec storage options."""
    if storage.is_local:
        return {}
    opts = storage.storage_options or {}
    client = opts.get("client_kwargs") or {}
    found = {
        "s3.endpoint": opts.get("endpoint_url") or client.get("endpoint_url"),
        "s3.access-key-id": opts.get("key") or client.get("aws_access_key_id"),
        "s3.secret-access-key": opts.get("secret") or client.get("aws_secret_access_key"),
        "s3.session-token": opts.get("token") or client.get("aws_session_token"),
        "s3.region": client.get("region_name") or opts.get("region_name"),
    }
    return {k: str(v) for k, v in found.items() if v}


def embedded_catalog(storage: Storage) -> dict[str, str]:
    """The default catalog: SQL on a SQLite file beside the output's data (local outputs only)."""
    if not storage.is_local:
        raise OutputError(f"{storage.url}: the embedded Iceberg catalog (SQLite) is for local outputs only; set "
                          "table.catalog (e.g. type: rest, glue, hive, or sql on a PostgreSQL uri)")
    folder = storage.path(TABLE_DIR)
    os.makedirs(f"{folder}/warehouse", exist_ok=True)
    return {"type": "sql", "uri": f"sqlite:///{folder}/catalog.db", "warehouse": f"file://{folder}/warehouse"}


def open_catalog(cfg: TableConfig, storage: Storage):
    """The pyiceberg catalog of `cfg` (the embedded one when none is set)."""
    from pyiceberg.catalog import load_catalog

    if cfg.catalog is None:
        name, props = "embedrank", embedded_catalog(storage)
    else:
        name, props = cfg.catalog.name, dict(cfg.catalog.properties)
    try:
        return load_catalog(name, **{**fileio_properties(storage), **props})
    except (ValueError, NotImplementedError, ImportError) as exc:
        raise OutputError(f"table.catalog {name!r}: {exc}") from None


def _type_name(arrow_type: pa.DataType) -> str:
    return str(arrow_type.value_type) if pa.types.is_fixed_size_list(arrow_type) else str(arrow_type)


def describe_vectors(fingerprint: dict[str, Any], fp_id: str, schema: pa.Schema) -> tuple[dict[str, str],
                                                                                       dict[str, str]]:
    """(table properties, column docs) that say what the vectors are and how to read them as fixed-size arrays."""
    props = {FINGERPRINT: fp_id}
    for key in ("model", "revision", "dimensions", "dtype", "vector_dtype", "instruction", "task"):
        if fingerprint.get(key) is not None:
            props[f"embedrank.{key}"] = str(fingerprint[key])
    docs: dict[str, str] = {}
    for field in schema:
        if not pa.types.is_fixed_size_list(field.type):
            continue
        d, value = field.type.list_size, _type_name(field.type)
        duck = {"float": "FLOAT", "halffloat": "FLOAT", "double": "DOUBLE", "int8": "TINYINT", "uint8": "UTINYINT"}
        docs[field.name] = (
            f"{fingerprint.get('model')} (revision {fingerprint.get('revision')}) vectors: {d} x {value} "
            f"(Parquet fixed_size_list<{value}>[{d}]; Iceberg has no fixed-size list, so the table reads them as "
            f"list<{value}>). Fixed-size array: DuckDB CAST({field.name} AS {duck.get(value, value.upper())}[{d}]); "
            f"Polars pl.col('{field.name}').list.to_array({d}). Fingerprint {fp_id}; instruction: "
            f"{fingerprint.get('instruction')!r}")
        props[f"embedrank.vector.{field.name}"] = json.dumps({"dimensions": d, "dtype": value})
        props[f"embedrank.cast.{field.name}.duckdb"] = f"CAST({field.name} AS {duck.get(value, value.upper())}[{d}])"
        props[f"embedrank.cast.{field.name}.polars"] = f"pl.col('{field.name}').list.to_array({d})"
    return props, docs


def iceberg_schema(schema: pa.Schema, docs: dict[str, str]):
    """The table's explicit schema: the files' columns (fixed-size vectors as lists), with column docs, and the
    field ids our files carry (`field_ids.with_field_ids`: Iceberg's fresh ids, so `create_table`'s own fresh
    assignment keeps them)."""
    from pyiceberg.io.pyarrow import pyarrow_to_schema
    from pyiceberg.schema import Schema

    half = [f.name for f in schema if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type)]
    if half:
        raise OutputError(f"Iceberg has no 16-bit float type, so vector column(s) {', '.join(map(repr, half))} "
                          "(float16) cannot be published: use dtype float32 for them (output.vectors[].dtype, or "
                          "output.vector_dtype), or int8/uint8/binary/ubinary, or drop output.table")
    numbered = pyarrow_to_schema(with_field_ids(schema.remove_metadata()))
    return Schema(*[f.model_copy(update={"doc": docs.get(f.name, f.doc)}) for f in numbered.fields])


def table_field_ids(table_schema) -> dict[str, int]:
    """Dotted column path → field id of an Iceberg schema (the names `field_ids.field_ids` gives a file's)."""
    from pyiceberg.schema import index_name_by_id

    return {name: fid for fid, name in index_name_by_id(table_schema).items()}


def adopt_schema(tx, columns) -> None:
    """Give a claim's placeholder table (no columns) `columns`, their field ids kept (pyiceberg's
    `union_by_name` would number them afresh, in another order than the files' ids)."""
    from pyiceberg.schema import Schema
    from pyiceberg.table.update import AddSchemaUpdate, AssertCurrentSchemaId, SetCurrentSchemaUpdate

    meta = tx.table_metadata
    numbered = Schema(*columns.fields, schema_id=1 + max(s.schema_id for s in meta.schemas))
    tx._apply((AddSchemaUpdate(schema=numbered), SetCurrentSchemaUpdate(schema_id=-1)),
              (AssertCurrentSchemaId(current_schema_id=meta.current_schema_id),))


def schema_difference(have, want) -> str | None:
    """How two Iceberg schemas differ in their columns (names, types, required), ignoring ids and docs."""
    def cols(s):
        return {f.name: (str(f.field_type), f.required) for f in s.fields}

    a, b = cols(have), cols(want)
    parts = []
    if set(a) - set(b):
        parts.append(f"the table has column(s) the output lacks: {sorted(set(a) - set(b))}")
    if set(b) - set(a):
        parts.append(f"the output has column(s) the table lacks: {sorted(set(b) - set(a))}")
    for name in sorted(set(a) & set(b)):
        if a[name][0] != b[name][0]:
            parts.append(f"column {name!r} is {a[name][0]} in the table, {b[name][0]} in the output")
    return "; ".join(parts) or None


def table_epoch(table) -> int:
    """The newest lease epoch any snapshot of the table carries (0: none)."""
    return max((int(s.summary[EPOCH] or 0) for s in table.snapshots() if s.summary and s.summary[EPOCH]), default=0)


@dataclass
class Published:
    table: str
    snapshot_id: int | None
    files: int
    added: int
    removed: int
    changed: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TablePublisher:
    """Publishes committed file sets of one output (or index) to one Iceberg table, fenced by a lease epoch."""

    def __init__(self, cfg: TableConfig, storage: Storage, *, name: str | None = None, epoch: int | None = None,
                 fingerprint_id: str = "", properties: dict[str, str] | None = None,
                 docs: dict[str, str] | None = None, catalog=None):
        self.cfg = cfg
        self.storage = storage
        self.name = name or cfg.name
        self.identifier = (cfg.namespace, self.name)
        self.epoch = held_epoch(storage) if epoch is None else epoch
        self.fingerprint_id = fingerprint_id
        self.properties = {OUTPUT: storage.url, **(properties or {})}
        self.docs = docs or {}
        self.catalog = catalog if catalog is not None else open_catalog(cfg, storage)

    @property
    def full_name(self) -> str:
        return ".".join(self.identifier)

    # -- reading and creating the table --------------------------------------------------------------------------

    def load(self):
        """The table, or None if it does not exist."""
        from pyiceberg.exceptions import NoSuchTableError

        try:
            return self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            return None

    def _file_schema(self, url: str) -> pa.Schema:
        import pyarrow.parquet as pq

        from pipelines.output.reader import arrow_filesystem

        path = url if self.storage.is_local else self.storage.fs._strip_protocol(url)
        return pq.read_schema(path, filesystem=arrow_filesystem(self.storage))

    def _create(self, schema: pa.Schema | None):
        """Create the table (`schema` None: with no columns yet, a claim's placeholder that the first publication
        fills); if another created it meanwhile, that one (the caller then checks its epoch)."""
        from pyiceberg.exceptions import TableAlreadyExistsError
        from pyiceberg.schema import Schema

        failpoints.hit("before_table_create")
        self.catalog.create_namespace_if_not_exists(self.cfg.namespace)
        columns = Schema() if schema is None else iceberg_schema(schema, self.docs)
        props = {**TABLE_PROPERTIES, **(self.properties if schema is not None else {OUTPUT: self.storage.url})}
        try:
            return self.catalog.create_table(self.identifier, schema=columns, properties=props)
        except TableAlreadyExistsError:
            return self.catalog.load_table(self.identifier)

    def _check(self, table, schema: pa.Schema | None) -> None:
        """Refuse a table of another output, of other columns, or of a newer lease (`LockLost`)."""
        owner = table.properties.get(OUTPUT)
        if owner is not None and owner != self.storage.url:
            raise OutputError(f"Iceberg table {self.full_name} holds the output {owner}, not {self.storage.url}; "
                              "refusing to replace its files (use another table name)")
        if schema is not None and table.schema().fields:  # no columns: a claim's placeholder, adopted
            diff = schema_difference(table.schema(), iceberg_schema(schema, {}))
            if diff is not None:
                raise OutputError(f"Iceberg table {self.full_name} has other columns than this output ({diff}); "
                                  "a vector table is never evolved silently: use another table name, or drop it")
        newer = table_epoch(table)
        if newer > self.epoch:
            raise LockLost(f"Iceberg table {self.full_name} was published by a newer lease (epoch {newer}, this "
                           f"publisher's is {self.epoch}); this publisher stops")

    def _check_field_ids(self, table, schema: pa.Schema, add: list[str]) -> None:
        """Refuse to add files whose Parquet field ids are not the table's: a reader would take one column for
        another. Files of these columns carry `with_field_ids`'s ids (or none, if written before they did); a
        table that numbers its columns so (any made since) takes both. One made by an older embedrank (columns
        numbered in another order) takes only files without ids, read by name through its name mapping."""
        have = table_field_ids(table.schema())
        if field_ids(with_field_ids(schema)) == have:
            return
        for url in add:
            carried = field_ids(self._file_schema(url))
            if carried and carried != have:
                raise OutputError(f"Iceberg table {self.full_name} numbers its columns otherwise than the Parquet "
                                  f"field ids of {url} (the table was made by an older embedrank); drop the table "
                                  "and run `embedrank publish` on the output to rebuild it")

    def _summary(self, version: str | None, progress: bool = False) -> dict[str, str]:
        out = {EPOCH: str(self.epoch), FINGERPRINT: self.fingerprint_id}
        if version is not None:
            out[VERSION] = version
        if progress:
            out[PROGRESS] = "true"
        return out

    # -- fencing -------------------------------------------------------------------------------------------------

    def claim(self) -> bool:
        """Stamp the table with this holder's epoch (an empty snapshot), before the holder deletes anything: a late
        publisher's commit then has a stale base, and on its re-read it finds the newer epoch and stops. Nothing
        to do when the table already carries this epoch; True if a snapshot was committed. A missing table is
        created first (no columns until the first publication): a late publisher that meant to create it finds it
        there, with this epoch."""
        from pyiceberg.exceptions import CommitFailedException

        for _ in range(ATTEMPTS):
            table = self.load()
            if table is None:
                table = self._create(None)
            self._check(table, None)
            if table_epoch(table) == self.epoch and table.current_snapshot() is not None:
                return False
            parent = table.current_snapshot().summary[VERSION] if table.current_snapshot() else None
            tx = table.transaction()
            with tx.update_snapshot(snapshot_properties=self._summary(parent)).fast_append():
                pass
            try:
                tx.commit_transaction()
                return True
            except CommitFailedException:
                continue
        raise LockLost(f"Iceberg table {self.full_name} kept changing under this writer; another writer is active")

    # -- publication ---------------------------------------------------------------------------------------------

    def current_files(self, table) -> dict[str, Any]:
        """The table's current data files: path → DataFile."""
        if table.current_snapshot() is None:
            return {}
        return {task.file.file_path: task.file for task in table.scan().plan_files()}

    def publish(self, files: list[str], *, version: str | None = None, tag: str | None = None,
                progress: bool = False) -> Published:
        """Bring the table to exactly `files` (full URLs of committed files): one snapshot adding what is new and
        removing what the commits no longer name (an overwrite when anything is removed or a `tag` is asked for,
        else an append); `tag` (an index version's name) names that snapshot. Nothing when the table holds
        exactly these files (and the tag). Creates the table (schema from the first file) when it is missing.
        `progress`: a publication while the job runs (marked `PROGRESS`). Any snapshot committed here expires, in
        the same commit, the progress snapshots older than the table's current one (metadata only: no file is
        deleted, and a reader still scanning one keeps its files)."""
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.table import _parquet_files_to_data_files
        from pyiceberg.table.update.snapshot import ExpireSnapshots, ManageSnapshots

        wanted = list(dict.fromkeys(files))
        schema = self._file_schema(wanted[0]) if wanted else None
        for _ in range(ATTEMPTS):
            table = self.load()
            if table is None:
                if schema is None:
                    return Published(self.full_name, None, 0, 0, 0, False)
                table = self._create(schema)
            self._check(table, schema)
            fence(self.storage)
            current = self.current_files(table)
            keep = set(wanted)
            add = [f for f in wanted if f not in current]
            if schema is not None and table.schema().fields:
                self._check_field_ids(table, schema, add)
            remove = [df for path, df in current.items() if path not in keep]
            tagged = tag is None or tag in table.metadata.refs
            if not add and not remove and tagged and table.current_snapshot() is not None:
                return Published(self.full_name, table.current_snapshot().snapshot_id, len(wanted), 0, 0, False)
            tx = table.transaction()
            if schema is not None and not table.schema().fields:  # a claim's placeholder: the output's columns
                adopt_schema(tx, iceberg_schema(schema, self.docs))
                tx.set_properties(**{**self.properties, "schema.name-mapping.default":
                                     tx.table_metadata.schema().name_mapping.model_dump_json()})
            elif schema is not None:
                # what the table says about its vectors follows the output (a reindex to new dimensions, say)
                stale = {k: v for k, v in self.properties.items() if table.properties.get(k) != v}
                docs = {n: d for n, d in self.docs.items()
                        if n in table.schema().column_names and table.schema().find_field(n).doc != d}
                if stale:
                    tx.set_properties(**stale)
                if docs:
                    with tx.update_schema() as columns:
                        for name, doc in docs.items():
                            columns.update_column(name, doc=doc)
            if tx.table_metadata.name_mapping() is None:
                tx.set_properties(**{"schema.name-mapping.default":
                                     tx.table_metadata.schema().name_mapping.model_dump_json()})
            committing = bool(add or remove) or table.current_snapshot() is None
            superseded = _superseded_progress(table) if committing else []
            if committing:
                update = tx.update_snapshot(snapshot_properties=self._summary(version, progress))
                with (update.overwrite() if remove or tag else update.merge_append()) as producer:
                    for df in remove:
                        producer.delete_data_file(df)
                    for df in _parquet_files_to_data_files(tx.table_metadata, add, table.io):
                        producer.append_data_file(df)
            if tag is not None:
                manage = ManageSnapshots(tx)
                if tag in tx.table_metadata.refs:
                    manage.remove_tag(tag)
                manage.create_tag(tx.table_metadata.current_snapshot().snapshot_id, tag)
                manage.commit()
            if superseded:
                ExpireSnapshots(tx).by_ids(superseded).commit()
            fence(self.storage)
            failpoints.hit("before_table_commit")
            try:
                table = tx.commit_transaction()
            except CommitFailedException:
                continue  # the table moved: re-read it, check the epoch again, re-plan
            failpoints.hit("after_table_commit")
            return Published(self.full_name, table.current_snapshot().snapshot_id, len(wanted), len(add),
                             len(remove), True)
        raise LockLost(f"Iceberg table {self.full_name} kept changing under this writer; another writer is active")

    def expire_versions(self, versions: list[str]) -> int:
        """Before `gc` deletes index versions: drop their tags and expire every snapshot of them (never the
        current one), and the version-less ones (claims made before the first version: they name no files);
        returns how many snapshots were expired."""
        from pyiceberg.exceptions import CommitFailedException
        from pyiceberg.table.update.snapshot import ExpireSnapshots, ManageSnapshots

        gone = set(versions)
        for _ in range(ATTEMPTS):
            table = self.load()
            if table is None:
                return 0
            self._check(table, None)
            current = table.current_snapshot()
            doomed = [s.snapshot_id for s in table.snapshots()
                      if s.summary and (s.summary[VERSION] in gone or not s.summary[VERSION])
                      and (current is None or s.snapshot_id != current.snapshot_id)]
            tags = [t for t in gone if t in table.metadata.refs]
            if not doomed and not tags:
                return 0
            tx = table.transaction()
            if tags:
                manage = ManageSnapshots(tx)
                for t in tags:
                    manage.remove_tag(t)
                manage.commit()
            if doomed:
                ExpireSnapshots(tx).by_ids(doomed).commit()
            fence(self.storage)
            try:
                tx.commit_transaction()
                return len(doomed)
            except CommitFailedException:
                continue
        raise LockLost(f"Iceberg table {self.full_name} kept changing under this writer; another writer is active")


# -- the committed sets of an output ----------------------------------------------------------------------------

@dataclass
class CommittedSet:
    """What an output's tables should hold: full URLs of its committed data and reject files."""

    storage: Storage
    """The output's (an index: its root's, where the table's catalog and lock live)."""
    data: list[str]
    rejects: list[str]
    fingerprint: dict[str, Any]
    fingerprint_id: str
    version: str | None
    """An index's current version (its tag), None for any other output."""
    table: TableConfig | None
    """The table config the output's run recorded (`output.table` / `index.table`)."""


def recorded_table(job: dict[str, Any]) -> TableConfig | None:
    """The table config recorded in an output's `_job.json` (a reindex version: its `index.table`)."""
    config = job.get("config") or {}
    for section in ("index", "output"):
        found = (config.get(section) or {}).get("table")
        if found:
            return TableConfig.model_validate(found)
    return None


def committed_set(output: str, storage_options: dict[str, Any] | None = None) -> CommittedSet:
    """The committed files of an output, or of an index root's current version."""
    from pipelines.output.reader import committed_refs, open_committed

    storage = Storage(output, storage_options)
    root, job, commits = open_committed(output, storage_options)
    version = None
    if root.storage.url != storage.url:
        version = current_version(storage)

    def urls(rejects: bool) -> list[str]:
        refs = committed_refs(root, job, commits, rejects)
        return [_url(root.storage, root.storage.path(r.path)) for r in refs]

    from pipelines.fingerprint import fingerprint_id

    return CommittedSet(storage, urls(False), urls(True), job["fingerprint"],
                        job.get("fingerprint_id") or fingerprint_id(job["fingerprint"]), version,
                        recorded_table(job))


def _url(storage: Storage, path: str) -> str:
    return os.path.normpath(path) if storage.is_local else storage.fs.unstrip_protocol(os.path.normpath(path))


def publishers(found: CommittedSet, cfg: TableConfig, *, epoch: int | None = None) -> tuple[TablePublisher,
                                                                                          TablePublisher]:
    """The data table's publisher and the rejects table's (`<name>_rejects`), sharing one catalog."""
    catalog = open_catalog(cfg, found.storage)
    props, docs = ({}, {})
    if found.data:
        props, docs = describe_vectors(found.fingerprint, found.fingerprint_id,
                                       TablePublisher(cfg, found.storage, epoch=epoch, catalog=catalog)
                                       ._file_schema(found.data[0]))
    data = TablePublisher(cfg, found.storage, epoch=epoch, fingerprint_id=found.fingerprint_id, properties=props,
                          docs=docs, catalog=catalog)
    rejects = TablePublisher(cfg, found.storage, name=f"{cfg.name}_rejects", epoch=epoch,
                             fingerprint_id=found.fingerprint_id, properties={FINGERPRINT: found.fingerprint_id},
                             catalog=catalog)
    return data, rejects


def publish_output(output: str, storage_options: dict[str, Any] | None, cfg: TableConfig | None = None,
                   stream: TextIO | None = None, *, epoch: int | None = None) -> dict[str, Any]:
    """Bring an output's tables to its committed set (the lock holder calls this: at the end of a run, after a
    reindex publishes, from `embedrank publish`). `cfg`: the recorded one when None. Idempotent."""
    found = committed_set(output, storage_options)
    cfg = cfg or found.table
    if cfg is None:
        raise OutputError(f"{output}: no table is configured (output.table / index.table) and none was recorded")
    data, rejects = publishers(found, cfg, epoch=epoch)
    out = {"table": data.publish(found.data, version=found.version, tag=found.version).to_json()}
    out["rejects"] = rejects.publish(found.rejects, version=found.version).to_json()
    if stream is not None:
        for key in ("table", "rejects"):
            p = out[key]
            what = (f"{p['added']} file(s) added, {p['removed']} removed" if p["changed"] else "already current")
            print(f"table: {p['table']}: {p['files']} committed file(s), {what}", file=stream, flush=True)
    return out


def claim_tables(storage: Storage, cfg: TableConfig, epoch: int | None = None) -> None:
    """A new lock holder stamps its tables with its epoch before it deletes anything (`TablePublisher.claim`)."""
    catalog = open_catalog(cfg, storage)
    for name in (cfg.name, f"{cfg.name}_rejects"):
        TablePublisher(cfg, storage, name=name, epoch=epoch, catalog=catalog).claim()


def expire_index_versions(storage: Storage, dropped: list[str], stream: TextIO | None = None) -> int:
    """`embedrank gc`, before it deletes `dropped` versions' files: expire their snapshots in the index's table
    (the table config the current version recorded; nothing without one). Returns how many were expired."""
    from pipelines.output.root import OutputRoot

    current = current_version(storage)
    job = OutputRoot(version_storage(storage, current)).read_job_header() if current else None
    cfg = recorded_table(job or {})
    if cfg is None:
        return 0
    expired = TablePublisher(cfg, storage).expire_versions(dropped)
    if stream is not None:
        print(f"gc: table {cfg.namespace}.{cfg.name}: expired {expired} snapshot(s) of {', '.join(dropped)}",
              file=stream, flush=True)
    return expired


def _superseded_progress(table: Any) -> list[int]:
    """The progress snapshots of `table` but its current one, none that a tag or branch names."""
    current = table.current_snapshot()
    named = {ref.snapshot_id for ref in table.metadata.refs.values()}
    return [s.snapshot_id for s in table.snapshots()
            if s.summary and s.summary[PROGRESS] == "true" and s.snapshot_id not in named
            and (current is None or s.snapshot_id != current.snapshot_id)]


class ProgressPublisher:
    """While an embed job runs: every `publish_every_s`, the items committed so far (whole items only: a commit
    record names every file of its item) as one snapshot, so readers follow a backfill's progress."""

    def __init__(self, cfg: TableConfig, storage: Storage, fingerprint: dict[str, Any], fp_id: str, stream: TextIO,
                 clock=None):
        import time

        self.cfg, self.storage, self.fingerprint, self.fp_id, self.stream = cfg, storage, fingerprint, fp_id, stream
        self.clock = clock or time.monotonic
        self.last = self.clock()
        self.publisher: TablePublisher | None = None
        self.published = 0

    def __call__(self, commits: dict[str, Any], force: bool = False) -> None:
        if not force and self.clock() - self.last < self.cfg.publish_every_s:
            return
        self.last = self.clock()
        files = [_url(self.storage, self.storage.path(f.path)) for c in commits.values() for f in c.files]
        if not files:
            return
        try:
            if self.publisher is None:
                found = CommittedSet(self.storage, files, [], self.fingerprint, self.fp_id, None, self.cfg)
                self.publisher = publishers(found, self.cfg)[0]
            done = self.publisher.publish(files, progress=True)
        except (LockLost, OutputError):
            raise
        except Exception as exc:  # noqa: BLE001 - a catalog hiccup must not stop a backfill; the end publishes
            print(f"table: progress publication failed ({type(exc).__name__}: {exc}); retried later",
                  file=self.stream, flush=True)
            return
        self.published += done.changed
        if done.changed:
            print(f"table: {done.table}: {len(commits)} committed item(s) published ({done.added} file(s) added)",
                  file=self.stream, flush=True)
