"""The records that cross stage and process boundaries, defined once: file references, pieces, commits, totals.

Each record has one JSON form (what `_commits/`, `_rank_commits/` and `_SUCCESS` hold), stamped with
`format` = `FORMAT_VERSION`; records written before the stamp existed (format 0) read unchanged. Pieces
and rank results travel from Ray tasks to the driver as Arrow rows, so they also have an Arrow schema;
their nested parts travel as JSON strings, which keeps the schema flat and stable across Ray versions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

FORMAT_VERSION = 1
"""Bumped when a record's JSON form changes incompatibly; readers accept every version up to it."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _check_format(data: dict[str, Any], kind: str) -> None:
    found = int(data.get("format", 0))
    if found > FORMAT_VERSION:
        from common.errors import OutputError

        raise OutputError(f"a {kind} record has format {found}, newer than this embedrank reads ({FORMAT_VERSION}); "
                          "upgrade embedrank")


@dataclasses.dataclass(frozen=True)
class FileRef:
    """One committed file, relative to the output root; `first_row`/`end_row` place a data file in its item."""

    path: str
    rows: int
    sha256: str
    bytes: int | None = None
    first_row: int | None = None
    end_row: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FileRef":
        return cls(path=data["path"], rows=int(data["rows"]), sha256=data["sha256"], bytes=data.get("bytes"),
                   first_row=data.get("first_row"), end_row=data.get("end_row"))

    def moved(self, path: str) -> "FileRef":
        return dataclasses.replace(self, path=path)


def _refs(data: Iterable[dict[str, Any]]) -> tuple[FileRef, ...]:
    return tuple(FileRef.from_json(f) for f in data)


def sum_reasons(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


def sum_histograms(hists: Iterable[Iterable[int]]) -> list[int]:
    total: list[int] = []
    for h in hists:
        h = list(h)
        total += [0] * (len(h) - len(total))
        for k, n in enumerate(h):
            total[k] += n
    return total


@dataclasses.dataclass(frozen=True)
class Piece:
    """What a write task wrote for one contiguous run `[start, end)` of one item's rows, for the committer.

    `data_files` holds one file per partition value (one without partitioning); `padded_tokens` counts the
    tokens computed with padding (0 where the stage does not report it); `length_hist[k]` counts rows of
    2^(k-1) < tokens ≤ 2^k; `carried_rows` counts rows whose vector came from an older index version;
    `replica_startup` holds the start-up reports (`actors.startup`) of the replicas whose first output rows are
    among the piece's, for the job summary (piece records are never stored: this reaches the driver only)."""

    item: str
    start: int
    end: int
    item_rows: int
    data_files: tuple[FileRef, ...] = ()
    reject_file: FileRef | None = None
    reject_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    padded_tokens: int = 0
    length_hist: tuple[int, ...] = ()
    carried_rows: int = 0
    replica_startup: tuple[dict[str, Any], ...] = ()

    ARROW_SCHEMA = pa.schema([
        ("item", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("item_rows", pa.int64()),
        ("data_files", pa.string()), ("reject_file", pa.string()), ("reject_reasons", pa.string()),
        ("tokens", pa.int64()), ("padded_tokens", pa.int64()), ("length_hist", pa.string()),
        ("carried_rows", pa.int64()), ("replica_startup", pa.string()),
    ])

    @property
    def data_rows(self) -> int:
        return sum(f.rows for f in self.data_files)

    @property
    def reject_rows(self) -> int:
        return self.reject_file.rows if self.reject_file else 0

    @property
    def key(self) -> tuple:
        """Equal for a piece reported twice (a retried task that wrote the same bytes)."""
        return (self.start, self.end, tuple(f.path for f in self.data_files),
                self.reject_file.path if self.reject_file else None)

    def to_row(self) -> dict[str, Any]:
        return {"item": self.item, "start": self.start, "end": self.end, "item_rows": self.item_rows,
                "data_files": json.dumps([f.to_json() for f in self.data_files]),
                "reject_file": json.dumps(self.reject_file.to_json()) if self.reject_file else None,
                "reject_reasons": json.dumps(self.reject_reasons, sort_keys=True), "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "length_hist": json.dumps(list(self.length_hist)),
                "carried_rows": self.carried_rows,
                "replica_startup": json.dumps(list(self.replica_startup)) if self.replica_startup else None}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Piece":
        reject = row["reject_file"]
        return cls(item=row["item"], start=row["start"], end=row["end"], item_rows=row["item_rows"],
                   data_files=_refs(json.loads(row["data_files"])),
                   reject_file=FileRef.from_json(json.loads(reject)) if reject else None,
                   reject_reasons=json.loads(row["reject_reasons"] or "{}"), tokens=row["tokens"],
                   padded_tokens=row["padded_tokens"], length_hist=tuple(json.loads(row["length_hist"])),
                   carried_rows=row["carried_rows"],
                   replica_startup=tuple(json.loads(row.get("replica_startup") or "[]")))

    @classmethod
    def table(cls, pieces: list["Piece"]) -> pa.Table:
        return pa.Table.from_pylist([p.to_row() for p in pieces], schema=cls.ARROW_SCHEMA)


@dataclasses.dataclass(frozen=True)
class BadFile:
    """Why a whole input file was rejected at planning."""

    reason: str
    detail: str | None = None


@dataclasses.dataclass(frozen=True)
class ItemCommit:
    """`_commits/<item>.json`: the commit point of one work item, naming exactly the files that tile it.

    `carried_from` is set when the record was copied by reference from an older index version; `epoch` is the
    lease epoch of the writer that created it (0: written before epochs), which decides whether a newer writer
    may replace it (`OutputRoot.write_commit`)."""

    item: str
    fingerprint_id: str
    source: str
    row_start: int
    row_end: int
    files: tuple[FileRef, ...] = ()
    rejects: tuple[FileRef, ...] = ()
    rows: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    padded_tokens: int = 0
    carried: int = 0
    length_hist: tuple[int, ...] = ()
    committed_at: str = ""
    bad_file: BadFile | None = None
    carried_from: str | None = None
    epoch: int = 0

    @classmethod
    def of_pieces(cls, *, item: str, fingerprint_id: str, source: str, row_start: int, row_end: int,
                  pieces: list[Piece], bad_file: BadFile | None = None) -> "ItemCommit":
        """The commit of an item from the pieces that tile it (a file rejected whole: its marker piece)."""
        return cls(
            item=item, fingerprint_id=fingerprint_id, source=source, row_start=row_start, row_end=row_end,
            files=tuple(dataclasses.replace(f, first_row=p.start, end_row=p.end) for p in pieces for f in p.data_files),
            rejects=tuple(p.reject_file for p in pieces if p.reject_file),
            rows=sum(p.data_rows for p in pieces), rejected=0 if bad_file else sum(p.reject_rows for p in pieces),
            reject_reasons=sum_reasons(p.reject_reasons for p in pieces), tokens=sum(p.tokens for p in pieces),
            padded_tokens=sum(p.padded_tokens for p in pieces), carried=sum(p.carried_rows for p in pieces),
            length_hist=tuple(sum_histograms(p.length_hist for p in pieces)), committed_at=now(), bad_file=bad_file)

    @property
    def named_paths(self) -> list[str]:
        return [f.path for f in self.files + self.rejects]

    def by_reference(self, rebase, from_version: str) -> "ItemCommit":
        """This record as another version of the same index keeps it: paths rebased, rows counted as carried."""
        return dataclasses.replace(self, files=tuple(f.moved(rebase(f.path)) for f in self.files),
                                   rejects=tuple(f.moved(rebase(f.path)) for f in self.rejects),
                                   carried=self.rows, carried_from=from_version)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT_VERSION, "item": self.item, "fingerprint_id": self.fingerprint_id,
                "source": self.source, "row_start": self.row_start, "row_end": self.row_end,
                "files": [f.to_json() for f in self.files], "rejects": [f.to_json() for f in self.rejects],
                "rows": self.rows, "rejected": self.rejected, "reject_reasons": self.reject_reasons,
                "tokens": self.tokens, "padded_tokens": self.padded_tokens, "carried": self.carried,
                "length_hist": list(self.length_hist), "committed_at": self.committed_at}
        if self.bad_file:
            data["bad_file"] = dataclasses.asdict(self.bad_file)
        if self.carried_from:
            data["carried_from"] = self.carried_from
        if self.epoch:
            data["epoch"] = self.epoch
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ItemCommit":
        _check_format(data, "commit")
        bad = data.get("bad_file")
        return cls(item=data["item"], fingerprint_id=data["fingerprint_id"], source=data.get("source", ""),
                   row_start=data["row_start"], row_end=data["row_end"], files=_refs(data.get("files", [])),
                   rejects=_refs(data.get("rejects", [])), rows=data["rows"], rejected=data["rejected"],
                   reject_reasons=dict(data.get("reject_reasons", {})), tokens=data.get("tokens", 0),
                   padded_tokens=data.get("padded_tokens", 0), carried=data.get("carried", 0),
                   length_hist=tuple(data.get("length_hist", ())), committed_at=data.get("committed_at", ""),
                   bad_file=BadFile(bad["reason"], bad.get("detail")) if bad else None,
                   carried_from=data.get("carried_from"), epoch=int(data.get("epoch", 0)))


@dataclasses.dataclass(frozen=True)
class RankCommit:
    """`_rank_commits/bucket-<n>.json`: one bucket of queries ranked whole (rerank, phase 2).

    `buckets` is how many buckets the rank phase hashed queries into (None in records written before it was
    recorded: those of an explicit `output.rank_buckets`, which the fingerprint holds)."""

    bucket: int
    fingerprint_id: str
    files: tuple[FileRef, ...] = ()
    rejects: tuple[FileRef, ...] = ()
    rows: int = 0
    rejected: int = 0
    queries: int = 0
    scored: int = 0
    buckets: int | None = None
    epoch: int = 0
    scores: str | None = None
    """Digest of the score commits this bucket was ranked from (`scores_digest`); None in records written before it."""

    ARROW_SCHEMA = pa.schema([("bucket", pa.int64()), ("data_file", pa.string()), ("reject_file", pa.string()),
                              ("queries", pa.int64()), ("scored", pa.int64())])
    """The rank stage's output row; the driver adds the fingerprint id and stores `to_json()`."""

    @property
    def name(self) -> str:
        return f"bucket-{self.bucket:05d}"

    @property
    def named_paths(self) -> list[str]:
        return [f.path for f in self.files + self.rejects]

    @staticmethod
    def row(bucket: int, data_file: FileRef | None, reject_file: FileRef | None, queries: int,
            scored: int) -> dict[str, Any]:
        return {"bucket": bucket, "data_file": json.dumps(data_file.to_json()) if data_file else None,
                "reject_file": json.dumps(reject_file.to_json()) if reject_file else None,
                "queries": queries, "scored": scored}

    @classmethod
    def from_row(cls, row: dict[str, Any], fingerprint_id: str, buckets: int | None = None,
                 scores: str | None = None) -> "RankCommit":
        data = FileRef.from_json(json.loads(row["data_file"])) if row["data_file"] else None
        rejects = FileRef.from_json(json.loads(row["reject_file"])) if row["reject_file"] else None
        return cls(bucket=row["bucket"], fingerprint_id=fingerprint_id, files=(data,) if data else (),
                   rejects=(rejects,) if rejects else (), rows=data.rows if data else 0,
                   rejected=rejects.rows if rejects else 0, queries=row["queries"], scored=row["scored"],
                   buckets=buckets, scores=scores)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT_VERSION, "bucket": self.bucket, "fingerprint_id": self.fingerprint_id,
                "files": [f.to_json() for f in self.files], "rejects": [f.to_json() for f in self.rejects],
                "rows": self.rows, "rejected": self.rejected, "queries": self.queries, "scored": self.scored}
        if self.buckets is not None:
            data["buckets"] = self.buckets
        if self.epoch:
            data["epoch"] = self.epoch
        if self.scores:
            data["scores"] = self.scores
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RankCommit":
        _check_format(data, "rank commit")
        return cls(bucket=data["bucket"], fingerprint_id=data["fingerprint_id"], files=_refs(data.get("files", [])),
                   rejects=_refs(data.get("rejects", [])), rows=data["rows"], rejected=data["rejected"],
                   queries=data["queries"], scored=data["scored"], buckets=data.get("buckets"),
                   epoch=int(data.get("epoch", 0)), scores=data.get("scores"))


def scores_digest(commits: Iterable[ItemCommit]) -> str:
    """What a rank record was ranked from: every score commit's item, epoch and files (by checksum)."""
    import hashlib

    h = hashlib.sha256()
    for c in sorted(commits, key=lambda c: c.item):
        h.update(json.dumps([c.item, c.epoch, [f.sha256 for f in c.files]]).encode() + b"\n")
    return h.hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Totals:
    """Sums over a job's commits, as `_SUCCESS` and the run summary report them.

    `carried` counts rows whose vector came from an older index version (`rows - carried` were computed).
    A rerank job adds `scored` (pairs scored), `queries` and `top_k`, and counts ranked rows in `rows`."""

    items: int = 0
    rows: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: int = 0
    carried: int = 0
    rejected_files: tuple[dict[str, str], ...] = ()
    wall_s: float | None = None
    scored: int | None = None
    queries: int | None = None
    top_k: int | None = None

    @classmethod
    def of(cls, commits: Iterable[ItemCommit]) -> "Totals":
        commits = list(commits)
        return cls(items=len(commits), rows=sum(c.rows for c in commits), rejected=sum(c.rejected for c in commits),
                   reject_reasons=sum_reasons(c.reject_reasons for c in commits),
                   tokens=sum(c.tokens for c in commits), carried=sum(c.carried for c in commits),
                   rejected_files=tuple(sorted(({"file": c.source, "reason": c.bad_file.reason}
                                                for c in commits if c.bad_file), key=lambda f: f["file"])))

    def ranked(self, ranks: Iterable[RankCommit], top_k: int | None) -> "Totals":
        """A rerank job's totals: these (the scores') plus the rank phase's rows, queries and duplicate pairs."""
        ranks = list(ranks)
        duplicates = sum(r.rejected for r in ranks)
        reasons = sum_reasons([self.reject_reasons, {"duplicate_pair": duplicates} if duplicates else {}])
        return dataclasses.replace(self, rejected=self.rejected + duplicates, reject_reasons=reasons,
                                   scored=self.rows, rows=sum(r.rows for r in ranks),
                                   queries=sum(r.queries for r in ranks), top_k=top_k)

    def to_json(self) -> dict[str, Any]:
        data = {"items": self.items, "rows": self.rows, "rejected": self.rejected,
                "reject_reasons": self.reject_reasons, "tokens": self.tokens, "carried": self.carried,
                "rejected_files": [dict(f) for f in self.rejected_files]}
        if self.scored is not None:  # a rerank job's (`ranked`)
            data.update(scored=self.scored, queries=self.queries, top_k=self.top_k)
        if self.wall_s is not None:
            data["wall_s"] = self.wall_s
        return data
