"""int8/uint8 calibration: each dimension's [min, max], once per output, part of the output's identity.

Ranges given in the config are used as they are. Otherwise they come from a job record whose fingerprint
they reproduce (this output's `_job.json` on a resume; the current version's on a reindex), so replicas,
resumes and reindex versions all quantise the same way; only where no record fits are they computed, from the
plan's first `calibration_rows` documents (deterministic: the same plan gives the same sample). The calibrated
config then records them (`_job.json`) and its fingerprint names their digest, so another calibration is
refused as any other fingerprint change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TextIO

import numpy as np

from actors.quantize import calibration_ranges
from common.columns import EMBEDDING, ITEM, REJECT, ROW
from pipelines.embed.config import VectorOutput, VectorOutputs
from pipelines.input.plan import WorkItem

Ranges = dict[str, list[list[float]]]


def recorded_ranges(job: dict[str, Any] | None, section: str) -> Ranges:
    """The ranges a job record's config holds (`config.<section>.vectors[].ranges`), by column."""
    vectors = (((job or {}).get("config") or {}).get(section) or {}).get("vectors") or []
    return {v["column"]: v["ranges"] for v in vectors if v.get("ranges") is not None}


def sample_items(items: list[WorkItem], rows: int) -> list[WorkItem]:
    """The plan's first items holding at least `rows` rows (an item whose row count is unknown until read, a
    JSONL one, ends the sample), rejected files skipped."""
    out, known = [], 0
    for item in items:
        if item.bad_reason:
            continue
        out.append(item)
        if item.row_end is None:
            break
        known += item.row_end - item.row_start
        if known >= rows:
            break
    return out


def sample_ranges(rows: Iterable[dict[str, Any]], items: list[WorkItem], needed: list[VectorOutput],
                  n: int) -> Ranges:
    """Each needed column's ranges over the first `n` accepted rows in plan order (item, then row) of `rows`
    (dicts with `_item`, `_row`, `_reject` and the float pooled `embedding`)."""
    order = {item.item_id: k for k, item in enumerate(items)}
    kept = sorted(((order[r[ITEM]], r[ROW]), r[EMBEDDING]) for r in rows if r[REJECT] is None)[:n]
    if len(kept) < 2:
        raise ValueError(f"int8/uint8 calibration needs at least 2 documents; the plan's first items gave "
                         f"{len(kept)}")
    matrix = np.asarray([v for _, v in kept], dtype=np.float32)
    return {v.column: calibration_ranges(matrix, v.dimensions or matrix.shape[1]).tolist() for v in needed}


def calibrated(outputs: VectorOutputs, records: list[tuple[str, dict[str, Any] | None, str]],
               fingerprint_of: Callable[[VectorOutputs], dict[str, Any]],
               compute: Callable[[list[VectorOutput]], Ranges], stream: TextIO) -> VectorOutputs:
    """`outputs` with every int8/uint8 column's ranges: from the first of `records` ((label, job record, config
    section)) whose ranges give its fingerprint, else `compute`d."""
    needed = outputs.needs_calibration()
    if not needed:
        return outputs
    names = [v.column for v in needed]
    for label, job, section in records:
        ranges = recorded_ranges(job, section)
        if job is None or not all(n in ranges for n in names):
            continue
        candidate = outputs.with_ranges({n: ranges[n] for n in names})
        if fingerprint_of(candidate) == job.get("fingerprint"):
            print(f"calibration: {', '.join(names)} quantise with the ranges {label}", file=stream, flush=True)
            return candidate
    print(f"calibration: {', '.join(names)}: per-dimension ranges from the plan's first "
          f"{outputs.calibration_rows} document(s)", file=stream, flush=True)
    return outputs.with_ranges(compute(needed))
