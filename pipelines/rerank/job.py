"""The reranking job: score every candidate pair exactly once, then rank per query and commit.

Phase 1 (score) is the item runner's commit protocol with pieces under
`_scores/`. Phase 2 (rank) starts only when every item is committed, so each
query's complete candidate set is known; scores are bucketed by query on the
cluster and each bucket is ranked and committed whole (`_rank_commits/`). New
scores invalidate earlier ranks, so phase 2 reruns after any phase-1 work.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from pipelines.output.root import OutputRoot, totals
from pipelines.config import RerankJobConfig
from pipelines.embed.job import close_output, dry_run_summary, preflight_model, recorded_config, summarize
from common.errors import OutputError
from pipelines.fingerprint import rerank_fingerprint
from pipelines.output.lock import OutputLock
from pipelines.input.plan import make_plan
from pipelines.lifecycle import process_items
from pipelines.storage import Storage
from pipelines.watchdog import iter_batches_watched


def _rank_commit(record: dict[str, Any], fp_id: str) -> dict[str, Any]:
    return {
        "bucket": record["bucket"], "fingerprint_id": fp_id,
        "files": [{"path": record["data_file"], "rows": record["data_rows"], "sha256": record["data_sha256"],
                   "bytes": record["data_bytes"]}] if record["data_file"] else [],
        "rejects": [{"path": record["reject_file"], "rows": record["reject_rows"],
                     "sha256": record["reject_sha256"]}] if record["reject_file"] else [],
        "rows": record["data_rows"], "rejected": record["reject_rows"], "queries": record["queries"],
        "scored": record["scored"],
    }


def rank_scores(cfg: RerankJobConfig, root: OutputRoot, fingerprint: dict[str, Any], fp_id: str,
                commits: dict[str, dict], stream: TextIO) -> dict[str, dict]:
    """Phase 2: rank the committed scores (`commits`: every item's) bucket by bucket; returns every rank commit."""
    scored = sum(c["rows"] for c in commits.values())
    done = root.read_rank_commits()
    if scored and sum(c["scored"] for c in done.values()) < scored:
        from pipelines.graph import build_rank_graph
        from pipelines.ray_runtime import ensure_ray, quiet_ray_data

        ensure_ray(cfg.run.ray_address)
        quiet_ray_data()
        files = [f["path"] for c in commits.values() for f in c["files"]]
        ds = build_rank_graph(files, root.storage, fingerprint, cfg.output.rank_buckets,
                              sorted(c["bucket"] for c in done.values()), cfg.output.top_k,
                              cfg.compute.io_num_cpus)
        for batch in iter_batches_watched(ds, cfg.run.stall_timeout_s, cfg.run.startup_timeout_s,
                                          batch_format="pyarrow", batch_size=None):
            for record in batch.to_pylist():
                root.write_rank_commit(f"bucket-{record['bucket']:05d}", _rank_commit(record, fp_id))
        done = root.read_rank_commits()
    ranked_scores = sum(c["scored"] for c in done.values())
    if ranked_scores != scored:
        raise OutputError(f"ranking covered {ranked_scores} of {scored} scored pairs; rerun to resume")
    print(f"rank: {len(done)} bucket(s), {sum(c['queries'] for c in done.values()):,} queries, "
          f"{sum(c['rows'] for c in done.values()):,} ranked rows, "
          f"{sum(c['rejected'] for c in done.values()):,} duplicate pair(s) rejected", file=stream, flush=True)
    return done


def run_rerank(cfg: RerankJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one reranking job; returns its summary."""
    stream = stream or sys.stderr
    preflight_model(cfg.model.path, storage_options=cfg.model_storage_options, revision=cfg.model.revision)
    plan = make_plan(cfg.input)
    print(plan.describe(), file=stream, flush=True)
    doc_items: list = []
    if cfg.documents is not None:
        doc_plan = make_plan(cfg.documents)
        doc_items = [i for i in doc_plan.items if not i.bad_reason]
        print(f"documents: {len(doc_items)} work item(s)", file=stream, flush=True)
        for bad in doc_plan.bad_items:
            print(f"WARNING: documents file {bad.rel} skipped ({bad.bad_reason}): {bad.bad_detail}; candidates "
                  "that need its documents are rejected as unknown_doc", file=stream, flush=True)
    if dry_run:
        return dry_run_summary(plan, cfg.compute, stream)

    from pipelines.graph import build_score_graph

    root = OutputRoot(Storage(cfg.output.path, cfg.output_storage_options))
    fingerprint = rerank_fingerprint(cfg)
    with OutputLock(root.storage, cfg.run.lock_stale_s, stream):
        outcome = process_items(
            plan=plan, source=cfg.input, root=root, fingerprint=fingerprint, recorded_config=recorded_config(cfg),
            run=cfg.run,
            build_graph=lambda items: build_score_graph(cfg, items, doc_items, root.storage, fingerprint),
            label="rerank", stream=stream, before_new_work=root.drop_rank_commits,
            reject_id_columns=("query_id", "doc_id"))
        ranks = rank_scores(cfg, root, fingerprint, outcome.fingerprint_id, outcome.commits, stream)
        scored = totals(list(outcome.commits.values()))
        duplicates = sum(c["rejected"] for c in ranks.values())
        reasons = dict(scored["reject_reasons"], **({"duplicate_pair": duplicates} if duplicates else {}))
        all_totals = {**scored, "rejected": scored["rejected"] + duplicates,
                      "reject_reasons": dict(sorted(reasons.items())), "scored": scored["rows"],
                      "rows": sum(c["rows"] for c in ranks.values()),
                      "queries": sum(c["queries"] for c in ranks.values()), "top_k": cfg.output.top_k,
                      "wall_s": round(outcome.progress.elapsed, 3)}
        removed = close_output(root, outcome.commits, all_totals)
    return summarize(outcome, all_totals, cfg.output.path, stream, removed)
