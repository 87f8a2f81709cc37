"""The reranking job: score every candidate pair exactly once, then rank per query and commit.

Phase 1 (score) is the lifecycle's commit protocol with pieces under `_scores/`.
Phase 2 (rank, the after-items step) starts only when every item is committed,
so each query's complete candidate set is known; scores are bucketed by query
on the cluster and each bucket is ranked and committed whole
(`_rank_commits/`). New scores invalidate earlier ranks, so phase 2 reruns
after any phase-1 work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TextIO

from common.errors import OutputError
from pipelines import __version__
from pipelines.fingerprint import model_identity
from pipelines.input.plan import Plan, WorkItem, make_plan
from pipelines.lifecycle import ItemsOutcome, JobSpec, Work
from pipelines.output.records import RankCommit, Totals, scores_digest
from pipelines.output.root import OutputRoot
from pipelines.preflight import preflight_model
from pipelines.ray_runtime import map_on_cluster, stream_rows
from pipelines.rerank.config import RerankJobConfig
from pipelines.rerank.ranking import rank_bucket_count
from pipelines.storage import Storage


def rerank_fingerprint(cfg: RerankJobConfig) -> dict[str, Any]:
    """Everything that changes the scores and ranks, or which pairs are scored (a resume with another value is
    refused)."""
    m = cfg.model
    return {
        "task": "rerank",
        **model_identity(cfg),
        "input": cfg.input.row_settings(),
        "documents": cfg.documents.row_settings() if cfg.documents is not None else None,
        "score": "softmax(no, yes) at the last position",
        "instruction": m.instruction,
        "max_length": m.max_length,
        "top_k": cfg.output.top_k,
        "rank_buckets": cfg.output.rank_buckets,
        "embedrank_version": __version__,
    }


def rank_scores(cfg: RerankJobConfig, root: OutputRoot, fingerprint: dict[str, Any], fp_id: str,
                outcome: ItemsOutcome, item_order: dict[str, int], stream: TextIO) -> list[RankCommit]:
    """Phase 2: rank the committed scores (every item's) bucket by bucket; returns every rank commit.

    `item_order` is the plan's (`Plan.item_order`): of duplicate pairs, the first by file order is kept. The bucket
    count (`rank_bucket_count`) is printed when ranking starts and recorded in each rank commit."""
    commits = outcome.commits.values()
    scored = sum(c.rows for c in commits)
    digest = scores_digest(commits)
    # a bucket ranked from other scores (a late writer's, or before new scores) is ranked again and replaced
    done = list(root.ranks_of(outcome.commits).values())
    recorded = {c.buckets for c in done if c.buckets is not None}
    if len(recorded) > 1:  # never written so; ranks are derived data, so rank again rather than mix two hashings
        print(f"rank: the rank commits found record {sorted(recorded)} buckets; ranking again",
              file=stream, flush=True)
        root.drop_rank_commits()
        done, recorded = [], set()
    buckets, why = rank_bucket_count(cfg.output.rank_buckets, scored, next(iter(recorded), None))
    if scored and sum(c.scored for c in done) < scored:
        from pipelines.rerank.graph import build_rank_graph

        print(f"rank: {buckets} bucket(s) for {scored:,} scored pairs ({why}); {len(done)} already committed",
              file=stream, flush=True)
        files = [f.path for c in commits for f in c.files]
        skip = sorted(c.bucket for c in done)
        for row in stream_rows(lambda: build_rank_graph(files, root.storage, fingerprint, buckets, skip,
                                                        cfg.output.top_k, cfg.compute.io_num_cpus, item_order),
                               cfg.run):
            root.write_rank_commit(RankCommit.from_row(row, fp_id, buckets, digest))
        done = list(root.ranks_of(outcome.commits).values())
    ranked_scores = sum(c.scored for c in done)
    if ranked_scores != scored:
        raise OutputError(f"ranking covered {ranked_scores} of {scored} scored pairs; rerun to resume")
    print(f"rank: {len(done)} bucket(s), {sum(c.queries for c in done):,} queries, "
          f"{sum(c.rows for c in done):,} ranked rows, "
          f"{sum(c.rejected for c in done):,} duplicate pair(s) rejected", file=stream, flush=True)
    return done


@dataclasses.dataclass(frozen=True)
class RerankPlan(Plan):
    """The candidates' work items plus the usable work items of `documents` (joined in on the cluster)."""

    documents: tuple[WorkItem, ...] = ()


class RerankJob(JobSpec):
    name = "rerank"
    config_type = RerankJobConfig

    def preflight(self, cfg: RerankJobConfig) -> None:
        preflight_model(cfg.model.path, storage_options=cfg.model_storage_options, revision=cfg.model.revision,
                        task="rerank")

    def plan(self, cfg: RerankJobConfig, stream: TextIO) -> "RerankPlan":
        plan = super().plan(cfg, stream)
        documents: list[WorkItem] = []
        if cfg.documents is not None:
            doc_plan = make_plan(cfg.documents, on_cluster=map_on_cluster(cfg.run, stream))
            documents = [i for i in doc_plan.items if not i.bad_reason]
            print(f"documents: {len(documents)} work item(s)", file=stream, flush=True)
            for bad in doc_plan.bad_items:
                print(f"WARNING: documents file {bad.rel} skipped ({bad.bad_reason}): {bad.bad_detail}; candidates "
                      "that need its documents are rejected as unknown_doc", file=stream, flush=True)
        return RerankPlan(files=plan.files, items=plan.items, documents=tuple(documents))

    def lock_storage(self, cfg: RerankJobConfig) -> Storage:
        return Storage(cfg.output.path, cfg.output_storage_options)

    def prepare(self, cfg: RerankJobConfig, plan: "RerankPlan", stream: TextIO) -> Work:
        from pipelines.rerank.graph import build_score_graph

        doc_items = list(plan.documents)
        root = OutputRoot(self.lock_storage(cfg))
        fingerprint = rerank_fingerprint(cfg)
        return Work(root=root, source=cfg.input, fingerprint=fingerprint,
                    build_graph=lambda items, compute: build_score_graph(
                        cfg.model_copy(update={"compute": compute}), items, doc_items, root.storage, fingerprint),
                    before_new_work=root.drop_rank_commits, reject_id_columns=("query_id", "doc_id"),
                    state=plan.item_order())

    def after_items(self, cfg: RerankJobConfig, work: Work, outcome: ItemsOutcome, stream: TextIO) -> Totals:
        ranks = rank_scores(cfg, work.root, work.fingerprint, outcome.fingerprint_id, outcome, work.state, stream)
        return Totals.of(outcome.commits.values()).ranked(ranks, cfg.output.top_k)


RERANK = RerankJob()


def run_rerank(cfg: RerankJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one reranking job; returns its summary."""
    return RERANK.run(cfg, dry_run=dry_run, stream=stream)
