"""The output root and its commit protocol: the driver is the single committer.

Layout: `data/`, `_scores/` and `_rejects/` hold pieces; `_commits/<item>.json`
is the commit point of one work item and names exactly the files that tile it;
`_rank_commits/<bucket>.json` does the same for one ranked bucket of a rerank
job; `_job.json` records fingerprint and plan; `_SUCCESS` closes a finished
run; `_lock.json` names the one writer. Files no commit names are orphans of
crashed attempts and are deleted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from common import failpoints
from common.errors import OutputError
from pipelines.fingerprint import describe_difference
from pipelines.input.plan import WorkItem
from pipelines.storage import Storage
from pipelines.output.tiling import find_tiling
from pipelines.output.pieces import PIECE_DIRS

COMMITS_DIR = "_commits"
RANK_COMMITS_DIR = "_rank_commits"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


class OutputRoot:
    """Reads and writes the control files of one output root."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(rel))
        except FileNotFoundError:
            return None

    def read_job(self) -> dict[str, Any] | None:
        return self.read_json(JOB_FILE)

    def _names(self, folder: str) -> list[str]:
        return [p.rsplit("/", 1)[-1][: -len(".json")] for p in self.storage.list_files(folder) if p.endswith(".json")]

    def commit_ids(self) -> list[str]:
        return self._names(COMMITS_DIR)

    def read_commits(self, item_ids: Iterable[str] | None = None, max_workers: int = 16) -> dict[str, dict]:
        ids = list(self.commit_ids() if item_ids is None else item_ids)
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            found = pool.map(lambda i: self.read_json(f"{COMMITS_DIR}/{i}.json"), ids)
        return {i: c for i, c in zip(ids, found) if c is not None}

    def prepare(self, fingerprint: dict[str, Any], fp_id: str, items: list[WorkItem],
                recorded_config: dict[str, Any]) -> dict[str, dict]:
        """Check the fingerprint, record the job, drop orphans; returns the existing commits."""
        job = self.read_job()
        if job is not None and job.get("fingerprint_id") != fp_id:
            raise OutputError(
                f"{self.storage.url} holds output of a different job; refusing to mix vectors "
                f"({describe_difference(job.get('fingerprint', {}), fingerprint)}). "
                "Use a new output.path, or restore the original settings to resume."
            )
        commits = self.read_commits()
        planned = {i.item_id for i in items}
        foreign = [c for c in commits.values() if c.get("fingerprint_id") != fp_id]
        if foreign:
            raise OutputError(f"{self.storage.url}: {len(foreign)} commit(s) carry another fingerprint")
        stale = sorted(set(commits) - planned)
        if stale:
            raise OutputError(
                f"{self.storage.url}: {len(stale)} committed item(s) are not in the current plan "
                f"(input files changed or input.paths differs; e.g. {stale[0]}). Use a new output.path."
            )
        self.storage.write_bytes(JOB_FILE, _dumps({
            "fingerprint": fingerprint, "fingerprint_id": fp_id, "config": recorded_config,
            "items": [i.to_dict() for i in items], "updated_at": _now(),
        }))
        if self.storage.exists(SUCCESS_FILE):
            self.storage.delete([SUCCESS_FILE])
        self.remove_orphans(commits)
        return commits

    def read_rank_commits(self) -> dict[str, dict]:
        found = {n: self.read_json(f"{RANK_COMMITS_DIR}/{n}.json") for n in self._names(RANK_COMMITS_DIR)}
        return {n: c for n, c in found.items() if c is not None}

    def drop_rank_commits(self) -> int:
        """Ranks depend on every score: new scores invalidate them (their files become orphans)."""
        stale = self.storage.list_files(RANK_COMMITS_DIR)
        self.storage.delete(stale)
        return len(stale)

    def write_rank_commit(self, bucket: str, record: dict[str, Any]) -> None:
        self.storage.write_bytes(f"{RANK_COMMITS_DIR}/{bucket}.json", _dumps(record))

    def remove_orphans(self, commits: dict[str, dict]) -> list[str]:
        """Delete piece files that neither an item commit nor a rank commit names, and abort unfinished uploads.

        Only the lock holder calls this, before its graph starts or after it ends: no upload of its own is live."""
        all_commits = list(commits.values()) + list(self.read_rank_commits().values())
        named = {f["path"] for c in all_commits for f in c["files"] + c["rejects"]}
        present = [p for d in PIECE_DIRS for p in self.storage.list_files(d)]
        orphans = [p for p in present if p not in named]
        self.storage.delete(orphans)
        self.storage.abort_pending_uploads()
        return orphans

    def write_commit(self, record: dict[str, Any]) -> None:
        """The commit point of an item: one atomic object write (temp + rename locally, one PUT on S3)."""
        failpoints.hit("before_commit_write")
        self.storage.write_bytes(f"{COMMITS_DIR}/{record['item']}.json", _dumps(record))
        failpoints.hit("after_commit_write")

    def write_success(self, totals: dict[str, Any]) -> None:
        self.storage.write_bytes(SUCCESS_FILE, _dumps({**totals, "finished_at": _now()}))


def totals(commits: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums over item commit records: items, rows, rejected rows by reason, tokens, files rejected whole, and
    rows whose vector was carried from an older index version (`rows - carried` were computed)."""
    reasons: dict[str, int] = {}
    for c in commits:
        for r, n in c.get("reject_reasons", {}).items():
            reasons[r] = reasons.get(r, 0) + n
    return {"items": len(commits), "rows": sum(c["rows"] for c in commits),
            "rejected": sum(c["rejected"] for c in commits), "reject_reasons": dict(sorted(reasons.items())),
            "tokens": sum(c["tokens"] for c in commits),
            "carried": sum(c.get("carried", 0) for c in commits),
            "rejected_files": sorted(({"file": c["source"], "reason": c["bad_file"]["reason"]}
                                     for c in commits if c.get("bad_file")), key=lambda f: f["file"])}


def sum_histograms(hists: Iterable[list[int]]) -> list[int]:
    total: list[int] = []
    for h in hists:
        total += [0] * (len(h) - len(total))
        for k, n in enumerate(h):
            total[k] += n
    return total


def _sum_reasons(encoded: Iterable[str | None]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for enc in encoded:
        for reason, n in json.loads(enc or "{}").items():
            total[reason] += n
    return dict(sorted(total.items()))


@dataclasses.dataclass
class _ItemState:
    item: WorkItem
    pieces: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rows: int | None = None


class Committer:
    """Collects piece records per item and commits an item as soon as some of its pieces tile it."""

    def __init__(self, root: OutputRoot, fp_id: str, items: list[WorkItem]):
        self.root = root
        self.fp_id = fp_id
        self.pending: dict[str, _ItemState] = {
            i.item_id: _ItemState(i, rows=None if i.row_end is None else i.row_end - i.row_start) for i in items
        }
        self.seen_pieces: set[tuple] = set()

    def commit_empty(self) -> list[dict[str, Any]]:
        """Items planned with zero rows commit at once: there is nothing to process."""
        empty = [s for s in self.pending.values() if s.rows == 0]
        return [self._commit(s, []) for s in empty]

    def commit_bad_files(self, write_marker: Callable[[WorkItem], dict[str, Any]]) -> list[dict[str, Any]]:
        """Files rejected whole at planning commit at once with their `_rejects/` marker, and no rows."""
        bad = [s for s in self.pending.values() if s.item.bad_reason]
        for s in bad:
            s.rows = 0
        return [self._commit(s, [write_marker(s.item)]) for s in bad]

    def add(self, piece: dict[str, Any]) -> dict[str, Any] | None:
        """Take one piece record; return the commit record if this piece completed its item."""
        state = self.pending.get(piece["item"])
        if state is None:
            return None
        key = (piece["start"], piece["end"], piece["data_files"], piece["reject_file"])
        if key in self.seen_pieces:
            return None
        self.seen_pieces.add(key)
        state.pieces.append(piece)
        if state.rows is None:
            state.rows = piece["item_rows"]
        start = state.item.row_start
        path = find_tiling([(p["start"], p["end"]) for p in state.pieces], start, start + state.rows)
        if path is None:
            return None
        return self._commit(state, [state.pieces[i] for i in path])

    def _commit(self, state: _ItemState, pieces: list[dict[str, Any]]) -> dict[str, Any]:
        item = state.item
        record = {
            "item": item.item_id, "fingerprint_id": self.fp_id, "source": item.rel,
            "row_start": item.row_start, "row_end": item.row_start + (state.rows or 0),
            "files": [{**f, "first_row": p["start"], "end_row": p["end"]}
                      for p in pieces for f in json.loads(p["data_files"])],
            "rejects": [{"path": p["reject_file"], "rows": p["reject_rows"], "sha256": p["reject_sha256"]}
                        for p in pieces if p["reject_file"]],
            "rows": sum(p["data_rows"] for p in pieces),
            "rejected": sum(p["reject_rows"] for p in pieces),
            "reject_reasons": _sum_reasons(p["reject_reasons"] for p in pieces),
            "tokens": sum(p["tokens"] for p in pieces),
            "padded_tokens": sum(p["padded_tokens"] for p in pieces),
            "carried": sum(p["carried_rows"] for p in pieces),
            "length_hist": sum_histograms(json.loads(p["length_hist"]) for p in pieces),
            "committed_at": _now(),
        }
        if item.bad_reason:
            record.update(rejected=0, bad_file={"reason": item.bad_reason, "detail": item.bad_detail})
        self.root.write_commit(record)
        del self.pending[item.item_id]
        return record

    def group_unfinished(self) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for item_id, s in self.pending.items():
            out[item_id] = sorted((p["start"], p["end"]) for p in s.pieces)
        return dict(out)
