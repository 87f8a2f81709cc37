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

from common.columns import DOC_FOUND, DOC_ID, DOC_REJECT, ITEM_JSON, REJECT, ROW, TEXT
from pipelines.input.reading import NO_REASON, read_items
from pipelines.rerank.config import DocumentsConfig
from pipelines.stages import EVERY_COLUMN, stage


@stage(needs=(ITEM_JSON,), adds=(DOC_ID, TEXT, DOC_REJECT, DOC_FOUND), drops=EVERY_COLUMN)
def read_documents(batch: pa.Table, cfg: DocumentsConfig) -> pa.Table:
    """Ray Data stage: planned document items in; (doc_id, text, _doc_reject, _doc_found) out."""
    rows = read_items(batch, cfg)
    rows = rows.filter(pc.is_valid(rows.column(DOC_ID)))
    return pa.table({DOC_ID: rows.column(DOC_ID), TEXT: rows.column(TEXT), DOC_REJECT: rows.column(REJECT),
                     DOC_FOUND: pa.array(np.ones(rows.num_rows, dtype=bool))})


@stage(needs=(ROW, REJECT, TEXT, DOC_REJECT, DOC_FOUND), adds=(TEXT, REJECT), drops=(DOC_REJECT, DOC_FOUND))
def order_joined_item(group: pa.Table) -> pa.Table:
    """Ray Data stage (map_groups by `_item`): one item's joined rows, in row order, one row per input row."""
    group = group.sort_by([(ROW, "ascending")])
    rows = group.column(ROW).to_numpy()
    repeated = np.zeros(len(rows), dtype=bool)
    repeated[1:] = rows[1:] == rows[:-1]
    ambiguous = np.zeros(len(rows), dtype=bool)
    ambiguous[:-1] |= repeated[1:]
    ambiguous |= repeated
    group = group.filter(pa.array(~repeated))
    ambiguous = ambiguous[~repeated]
    found = pc.fill_null(group.column(DOC_FOUND), False)
    reason = pc.coalesce(
        group.column(REJECT),
        pc.if_else(pa.array(ambiguous), "duplicate_document", NO_REASON),
        pc.if_else(found, NO_REASON, "unknown_doc"),
        group.column(DOC_REJECT),
    )
    text = pc.if_else(pc.is_null(reason), group.column(TEXT), NO_REASON)
    group = group.drop_columns([REJECT, DOC_REJECT, DOC_FOUND, TEXT])
    return group.append_column(TEXT, text).append_column(REJECT, reason)
