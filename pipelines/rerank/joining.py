"""Candidates given by doc id: document texts joined in on the cluster, rows put back per work item.

Ray Data's hash join scatters an item's rows over partitions; grouping by item
afterwards gives each item's rows back in row order, so pieces stay contiguous
and the commit protocol is unchanged. A candidate whose document is unknown,
unusable or ambiguous (the id appears twice in the documents) is rejected.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import DocumentsConfig
from pipelines.input.reading import NO_REASON, read_items

DOC_COLUMNS = ["doc_id", "text", "_doc_reject", "_doc_found"]


def read_documents(batch: pa.Table, cfg: DocumentsConfig) -> pa.Table:
    """Ray Data stage: planned document items in; (doc_id, text, _doc_reject, _doc_found) out."""
    rows = read_items(batch, cfg)
    rows = rows.filter(pc.is_valid(rows.column("doc_id")))
    return pa.table({"doc_id": rows.column("doc_id"), "text": rows.column("text"),
                     "_doc_reject": rows.column("_reject"),
                     "_doc_found": pa.array(np.ones(rows.num_rows, dtype=bool))})


def order_joined_item(group: pa.Table) -> pa.Table:
    """Ray Data stage (map_groups by `_item`): one item's joined rows, in row order, one row per input row."""
    group = group.sort_by([("_row", "ascending")])
    rows = group.column("_row").to_numpy()
    repeated = np.zeros(len(rows), dtype=bool)
    repeated[1:] = rows[1:] == rows[:-1]
    ambiguous = np.zeros(len(rows), dtype=bool)
    ambiguous[:-1] |= repeated[1:]
    ambiguous |= repeated
    group = group.filter(pa.array(~repeated))
    ambiguous = ambiguous[~repeated]
    found = pc.fill_null(group.column("_doc_found"), False)
    reason = pc.coalesce(
        group.column("_reject"),
        pc.if_else(pa.array(ambiguous), "duplicate_document", NO_REASON),
        pc.if_else(found, NO_REASON, "unknown_doc"),
        group.column("_doc_reject"),
    )
    text = pc.if_else(pc.is_null(reason), group.column("text"), NO_REASON)
    group = group.drop_columns(["_reject", "_doc_reject", "_doc_found", "text"])
    return group.append_column("text", text).append_column("_reject", reason)
