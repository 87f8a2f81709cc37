"""Reading one work item into rows, with bad rows marked for `_rejects/` instead of dropped.

The source config says which fields a job needs (`SourceConfig.fields()`); every
output row carries them under their role names, plus `_reject` (a reason code or
null), `_item`, `_row` (index in its file; for a JSONL item cut from a larger file,
index among its item's non-blank lines), `_item_rows` (rows in the item, learnt here
for JSONL) and the source's extra (pass-through) columns.

A JSONL item with a byte range `[start, end)` owns every line that starts in it: its
reader skips the partial first line unless `start` is 0 or byte `start - 1` is a
newline, and reads through the end of the line that straddles `end`. So every line of
the file belongs to exactly one item whatever the cut (a newline byte never occurs
inside a multi-byte UTF-8 character), and planning needs only the file's size.
Generated ids of such rows are `<path>@<byte offset of the line>`, which a user can
find (`tail -c +<offset + 1> FILE | head -n 1`); of a whole file, `<path>:<row>`.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from common.columns import ITEM, ITEM_JSON, ITEM_ROWS, READ_BOOKKEEPING, REJECT, ROW
from common.errors import InputChanged, InputError
from pipelines.config import FieldSpec, SourceConfig
from pipelines.input import compressed
from pipelines.input.parquet_io import CorruptFile, StorageReadError, open_pinned, read_row_groups
from pipelines.input.plan import WorkItem
from pipelines.stages import EVERY_COLUMN, stage
from pipelines.storage import decompressing

NO_REASON = pa.scalar(None, pa.string())


def _finish(item: WorkItem, rows: pa.Table, first_row: int, fields: list[FieldSpec]) -> pa.Table:
    """Blank the texts of rejected rows (no stage may use them) and add the bookkeeping columns."""
    ok = pc.is_null(rows.column(REJECT))
    for fs in fields:
        if fs.kind == "text":
            idx = rows.schema.get_field_index(fs.role)
            rows = rows.set_column(idx, fs.role, pc.if_else(ok, rows.column(idx), NO_REASON))
    n = rows.num_rows
    return (
        rows.append_column(ITEM, pa.array([item.item_id] * n, pa.string()))
        .append_column(ROW, pa.array(range(first_row, first_row + n), pa.int64()))
        .append_column(ITEM_ROWS, pa.array([n] * n, pa.int64()))
    )


def _default_ids(item: WorkItem, first_row: int, n: int) -> pa.Array:
    """Generated ids `<rel>:<row>` (`GENERATED_IDS`): `rel` is relative to the common prefix of every input's
    folder (`pipelines.input.plan.relative_to_common_prefix`), so ids are unique across globs."""
    return pa.array([f"{item.rel}:{r}" for r in range(first_row, first_row + n)], pa.string())


def _arrow_field(fs: FieldSpec, table: pa.Table, item: WorkItem) -> tuple[pa.ChunkedArray | pa.Array, Any]:
    """The field's values as strings and, per row, its reject reason (or null)."""
    if fs.column is None:
        return _default_ids(item, item.row_start, table.num_rows), NO_REASON
    values = pc.cast(table.column(fs.column), pa.string())
    if fs.kind == "id":
        return values, pc.if_else(pc.is_null(values), f"null_{fs.role}", NO_REASON)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
    return values, pc.if_else(pc.is_null(values), f"null_{fs.role}",
                              pc.if_else(blank, f"empty_{fs.role}", NO_REASON))


def _read_parquet(item: WorkItem, cfg: SourceConfig) -> pa.Table:
    fields = cfg.fields()
    columns = list(dict.fromkeys([fs.column for fs in fields if fs.column] + cfg.extra_columns))
    g0, g1 = item.row_groups or (0, 0)
    try:
        table = read_row_groups(item.url, cfg.storage_options, range(g0, g1), columns, item.pin)
    except CorruptFile as bad:
        if cfg.on_bad_file == "fail":
            raise InputError(f"{bad.detail} [on_bad_file: fail]") from None
        return _reject_unreadable(item, cfg, bad)
    if table.num_rows != item.row_end - item.row_start:
        raise InputError(f"{item.url}: expected {item.row_end - item.row_start} rows, read {table.num_rows} "
                         "(file changed since planning?)")
    out: dict[str, Any] = {}
    reason: Any = NO_REASON
    for fs in reversed(fields):
        values, why = _arrow_field(fs, table, item)
        out[fs.role] = values
        reason = pc.if_else(pc.is_null(why), reason, why) if why is not NO_REASON else reason
    if not isinstance(reason, (pa.Array, pa.ChunkedArray)):
        reason = pa.nulls(table.num_rows, pa.string())
    result = pa.table({**{fs.role: out[fs.role] for fs in fields}, REJECT: reason})
    for col in cfg.extra_columns:
        result = result.append_column(col, table.column(col))
    return _finish(item, result, item.row_start, fields)


def _reject_unreadable(item: WorkItem, cfg: SourceConfig, bad: CorruptFile) -> pa.Table:
    """Every row of an item whose row groups do not decode, rejected; ids kept where their column still reads."""
    fields = cfg.fields()
    n = item.row_end - item.row_start
    out: dict[str, Any] = {}
    for fs in fields:
        values: Any = pa.nulls(n, pa.string())
        if fs.kind == "id" and fs.column is None:
            values = _default_ids(item, item.row_start, n)
        elif fs.kind == "id":
            try:
                ids = read_row_groups(item.url, cfg.storage_options, range(*item.row_groups), [fs.column],
                                      item.pin)
                values = pc.cast(ids.column(fs.column), pa.string())
            except CorruptFile:
                pass
        out[fs.role] = values
    result = pa.table({**out, REJECT: pa.array([bad.reason] * n, pa.string())})
    for col in cfg.extra_columns:
        result = result.append_column(col, pa.nulls(n))
    return _finish(item, result, item.row_start, fields)


def _parse_line(line: bytes) -> tuple[dict[str, Any], str | None]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "invalid_utf8"
    except ValueError:
        return {}, "invalid_json"
    if not isinstance(obj, dict):
        return {}, "not_an_object"
    return obj, None


def _json_field(fs: FieldSpec, obj: dict[str, Any]) -> tuple[str | None, str | None]:
    if fs.kind == "id":
        value = obj.get(fs.column)
        return (None, f"null_{fs.role}") if value is None else (str(value), None)
    if fs.column not in obj:
        return None, f"missing_{fs.role}"
    value = obj[fs.column]
    if value is None:
        return None, f"null_{fs.role}"
    if not isinstance(value, str):
        return None, f"{fs.role}_not_string"
    if not value.strip():
        return None, f"empty_{fs.role}"
    return value, None


READ_PAST_END = 1 << 16
"""Bytes read at a time past a cut JSONL item's end, to the newline that ends its last line."""


def _read_up_to(fh: Any, n: int) -> bytes:
    """Up to `n` bytes (fewer only at the end of the file)."""
    parts = []
    while n > 0:
        chunk = fh.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def jsonl_bytes(fh: Any, item: WorkItem) -> tuple[bytes, int]:
    """The bytes of the lines `item` owns and the file offset of the first: a whole file, or for a byte range
    `[start, end)`, every line that starts in it (see the module's docstring); `(b"", end)` if none does."""
    if item.byte_range is None:
        return fh.read(), 0
    start, end = item.byte_range
    if start == 0:
        data, offset = _read_up_to(fh, end), 0
    else:
        fh.seek(start - 1)  # the byte before: a newline there means a line starts exactly at `start`
        head = _read_up_to(fh, end - start + 1)
        newline = head.find(b"\n")
        if newline < 0:
            return b"", end  # inside one line that an earlier item owns
        data, offset = head[newline + 1:], start + newline
    if data and not data.endswith(b"\n"):  # the last line owned goes on past `end`: read it to its newline
        tail = []
        while chunk := fh.read(READ_PAST_END):
            newline = chunk.find(b"\n")
            if newline >= 0:
                tail.append(chunk[:newline + 1])
                break
            tail.append(chunk)
        data += b"".join(tail)
    return data, offset


def jsonl_lines(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """The non-blank lines of `data` with the file offset of each (`data` starts at `offset`)."""
    lines = []
    for line in data.split(b"\n"):
        if line.strip():
            lines.append((offset, line))
        offset += len(line) + 1
    return lines


def _decompressed(fh: Any, item: WorkItem, codec: str) -> bytes:
    """The whole decompressed stream of a compressed JSONL file; a stream that does not decode fails the job
    naming the file (`InputError`), never rejects rows. Store errors pass as they are."""
    try:
        with decompressing(fh, codec) as stream:
            return stream.read()
    except (StorageReadError, InputChanged):
        raise
    except (OSError, EOFError, ValueError, RuntimeError) as exc:
        raise InputError(f"{item.url}: not a readable {codec} stream ({type(exc).__name__}: {exc})") from None


def _read_jsonl(item: WorkItem, cfg: SourceConfig) -> pa.Table:
    codec = compressed.codec_for(item.url)
    with open_pinned(item.url, cfg.storage_options, item.pin) as fh:  # store errors: StorageReadError
        if codec is not None:
            data, offset = _decompressed(fh, item, codec), 0
        else:
            data, offset = jsonl_bytes(fh, item)
            if offset == 0:
                compressed.refuse_mislabelled(item.url, data)
        lines = jsonl_lines(data, offset)
    fields = cfg.fields()
    values: dict[str, list[Any]] = {fs.role: [] for fs in fields}
    extra: dict[str, list[Any]] = {c: [] for c in cfg.extra_columns}
    reasons: list[str | None] = []
    cut = item.byte_range is not None
    for row, (offset, line) in enumerate(lines):
        obj, reason = _parse_line(line)
        for fs in fields:
            if fs.column is None:
                value, why = (f"{item.rel}@{offset}" if cut else f"{item.rel}:{row}"), None
            else:
                value, why = _json_field(fs, obj)
            values[fs.role].append(value)
            reason = reason or why
        reasons.append(reason)
        for col in extra:
            extra[col].append(obj.get(col))
    out = pa.table({**{role: pa.array(v, pa.string()) for role, v in values.items()},
                    REJECT: pa.array(reasons, pa.string())})
    for col, vals in extra.items():
        try:
            out = out.append_column(col, pa.array(vals))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{item.url}: pass-through column {col!r} has mixed types ({exc})") from None
    return _finish(item, out, 0, fields)


def read_item(item: WorkItem, cfg: SourceConfig) -> pa.Table:
    return _read_parquet(item, cfg) if item.format == "parquet" else _read_jsonl(item, cfg)


@stage(needs=(ITEM_JSON,), adds=READ_BOOKKEEPING, drops=EVERY_COLUMN)
def read_items(batch: pa.Table, cfg: SourceConfig) -> pa.Table:
    """Ray Data stage (CPU task): planned items (JSON in column `item`) in, all of their rows out.

    Its rows have the source's `row_columns` too, which the graph adds to the declaration from the config."""
    tables = [read_item(WorkItem.from_dict(json.loads(s)), cfg) for s in batch.column(ITEM_JSON).to_pylist()]
    return pa.concat_tables(tables, promote_options="default")


def row_columns(cfg: SourceConfig) -> tuple[str, ...]:
    """The columns a source's rows have besides the bookkeeping: its fields' roles, then its extra columns."""
    return tuple(fs.role for fs in cfg.fields()) + tuple(cfg.extra_columns)
