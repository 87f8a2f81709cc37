"""Reading one work item into rows, with bad rows marked for `_rejects/` instead of dropped.

Every output row carries `_item`, `_row` (index in its file) and `_item_rows`
(rows in the item, learnt here for JSONL), plus `id`, `text`, `_reject` (a reason
code or null) and the configured pass-through columns.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import InputConfig
from pipelines.errors import InputError
from pipelines.plan import WorkItem
from pipelines.storage import open_input

REJECT_REASONS = {
    "null_text": "the text is null",
    "empty_text": "the text is empty or only whitespace",
    "not_string": "the text is not a string",
    "missing_text": "the row has no text field",
    "null_id": "the id is null or missing",
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the line is JSON but not an object",
    "invalid_utf8": "the line is not valid UTF-8",
}


def _finish(item: WorkItem, rows: pa.Table, first_row: int) -> pa.Table:
    n = rows.num_rows
    return (
        rows.append_column("_item", pa.array([item.item_id] * n, pa.string()))
        .append_column("_row", pa.array(range(first_row, first_row + n), pa.int64()))
        .append_column("_item_rows", pa.array([n] * n, pa.int64()))
    )


def _default_ids(item: WorkItem, first_row: int, n: int) -> pa.Array:
    return pa.array([f"{item.rel}:{r}" for r in range(first_row, first_row + n)], pa.string())


def _read_parquet(item: WorkItem, cfg: InputConfig) -> pa.Table:
    columns = list(dict.fromkeys([cfg.text_column, *([cfg.id_column] if cfg.id_column else []),
                                  *cfg.passthrough_columns]))
    g0, g1 = item.row_groups or (0, 0)
    try:
        with open_input(item.url, cfg.storage_options) as fh:
            table = pq.ParquetFile(fh).read_row_groups(list(range(g0, g1)), columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise InputError(f"{item.url}: cannot read row groups {g0}..{g1 - 1} ({exc})") from None
    n = table.num_rows
    if n != item.row_end - item.row_start:
        raise InputError(f"{item.url}: expected {item.row_end - item.row_start} rows, read {n} (file changed?)")

    text = table.column(cfg.text_column).cast(pa.string())
    if cfg.id_column:
        ids = pc.cast(table.column(cfg.id_column), pa.string())
    else:
        ids = _default_ids(item, item.row_start, n)
    reason = pc.if_else(
        pc.is_null(ids), "null_id",
        pc.if_else(pc.is_null(text), "null_text",
                   pc.if_else(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), "empty_text",
                              pa.scalar(None, pa.string()))))
    out = pa.table({"id": ids, "text": pc.if_else(pc.is_null(reason), text, pa.scalar(None, pa.string())),
                    "_reject": reason})
    for col in cfg.passthrough_columns:
        out = out.append_column(col, table.column(col))
    return _finish(item, out, item.row_start)


def _parse_jsonl_row(line: bytes, cfg: InputConfig) -> tuple[dict[str, Any] | None, str | None]:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        obj = json.loads(decoded)
    except ValueError:
        return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    if cfg.id_column and obj.get(cfg.id_column) is None:
        return obj, "null_id"
    if cfg.text_column not in obj:
        return obj, "missing_text"
    text = obj[cfg.text_column]
    if text is None:
        return obj, "null_text"
    if not isinstance(text, str):
        return obj, "not_string"
    if not text.strip():
        return obj, "empty_text"
    return obj, None


def _read_jsonl(item: WorkItem, cfg: InputConfig) -> pa.Table:
    try:
        with open_input(item.url, cfg.storage_options) as fh:
            data = fh.read()
    except OSError as exc:
        raise InputError(f"{item.url}: cannot read ({exc})") from None
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    ids, texts, reasons = [], [], []
    extra: dict[str, list[Any]] = {c: [] for c in cfg.passthrough_columns}
    for row, line in enumerate(lines):
        obj, reason = _parse_jsonl_row(line, cfg)
        obj = obj or {}
        if cfg.id_column:
            value = obj.get(cfg.id_column)
            ids.append(None if value is None else str(value))
        else:
            ids.append(f"{item.rel}:{row}")
        texts.append(obj.get(cfg.text_column) if reason is None else None)
        reasons.append(reason)
        for col in extra:
            extra[col].append(obj.get(col))
    out = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                    "_reject": pa.array(reasons, pa.string())})
    for col, values in extra.items():
        try:
            out = out.append_column(col, pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"{item.url}: pass-through column {col!r} has mixed types ({exc})") from None
    return _finish(item, out, 0)


def read_item(item: WorkItem, cfg: InputConfig) -> pa.Table:
    return _read_parquet(item, cfg) if item.format == "parquet" else _read_jsonl(item, cfg)


def read_items(batch: pa.Table, cfg: InputConfig) -> pa.Table:
    """Ray Data stage (CPU task): planned items (JSON in column `item`) in, all of their rows out."""
    tables = [read_item(WorkItem.from_dict(json.loads(s)), cfg) for s in batch.column("item").to_pylist()]
    return pa.concat_tables(tables, promote_options="default")
