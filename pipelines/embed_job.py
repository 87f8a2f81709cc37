"""The embedding backfill job: plan, prepare the output, stream the graph, commit, summarise."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from pipelines.commit import Committer, OutputRoot
from pipelines.config import EmbedJobConfig
from pipelines.errors import ModelLoadError, OutputError
from pipelines.fingerprint import embed_fingerprint, fingerprint_id
from pipelines.plan import Plan, make_plan
from pipelines.progress import Progress
from pipelines.reading import read_item
from pipelines.storage import Storage


def recorded_config(cfg: EmbedJobConfig) -> dict[str, Any]:
    """The config as stored in `_job.json`: storage options (credentials) are never written."""
    return cfg.model_dump(mode="json", exclude={"input": {"storage_options"}, "output": {"storage_options"}})


def _commit_empty_jsonl(committer: Committer, cfg: EmbedJobConfig) -> list[dict[str, Any]]:
    """JSONL items that produced no piece may be empty files; those commit with no rows."""
    done = []
    for state in list(committer.pending.values()):
        if state.rows is None and not state.pieces and read_item(state.item, cfg.input).num_rows == 0:
            state.rows = 0
            done.extend(committer.commit_empty())
    return done


def preflight_model(cfg: EmbedJobConfig) -> None:
    """Checks that need no Ray: a local model directory exists and fits the requested dimensions."""
    path = cfg.model.path
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")):
            raise ModelLoadError(f"model.path {path!r} is not a model directory")
        return
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"model.path {path!r} has no config.json")
    with open(config_file) as fh:
        hidden = json.load(fh).get("hidden_size")
    if cfg.model.dimensions and hidden and cfg.model.dimensions > hidden:
        raise ModelLoadError(f"model.dimensions={cfg.model.dimensions} exceeds the model's embedding size {hidden}")


def _totals(commits: dict[str, dict], wall_s: float) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for c in commits.values():
        for r, n in c.get("reject_reasons", {}).items():
            reasons[r] = reasons.get(r, 0) + n
    return {"items": len(commits), "rows": sum(c["rows"] for c in commits.values()),
            "rejected": sum(c["rejected"] for c in commits.values()), "reject_reasons": reasons,
            "tokens": sum(c["tokens"] for c in commits.values()), "wall_s": round(wall_s, 3)}


def run_embed(cfg: EmbedJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one embedding job; returns its summary. Progress and summary go to `stream`."""
    stream = stream or sys.stderr
    preflight_model(cfg)
    plan: Plan = make_plan(cfg.input)
    print(plan.describe(), file=stream, flush=True)
    if dry_run:
        return {"dry_run": True, "files": len(plan.files), "items": len(plan.items), "rows": plan.known_rows,
                "est_tokens": plan.est_tokens}

    root = OutputRoot(Storage(cfg.output.path, cfg.output_storage_options))
    fingerprint = embed_fingerprint(cfg)
    fp_id = fingerprint_id(fingerprint)
    existing = root.prepare(fingerprint, fp_id, plan.items, recorded_config(cfg))
    todo = [i for i in plan.items if i.item_id not in existing]
    print(f"resume: {len(existing)} item(s) already committed, {len(todo)} to process", file=stream, flush=True)

    committer = Committer(root, fp_id, todo)
    progress = Progress(len(plan.items), len(existing), plan.known_rows, cfg.run.progress_interval_s, stream)
    for commit in committer.commit_empty():
        progress.update(commit)
    if committer.pending:
        from pipelines.graph import build_embed_graph
        from pipelines.ray_runtime import ensure_ray, quiet_ray_data

        ensure_ray(cfg.run.ray_address)
        quiet_ray_data()
        work = [s.item for s in committer.pending.values()]
        ds = build_embed_graph(cfg, work, root.storage, fingerprint)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for piece in batch.to_pylist():
                commit = committer.add(piece)
                if commit is not None:
                    progress.update(commit)
    for commit in _commit_empty_jsonl(committer, cfg):
        progress.update(commit)
    if committer.pending:
        unfinished = committer.group_unfinished()
        example = next(iter(unfinished.items()))
        raise OutputError(
            f"{len(unfinished)} work item(s) did not complete (e.g. {example[0]} with pieces {example[1]}); "
            "nothing partial was committed; rerun the same command to resume"
        )
    all_commits = root.read_commits()
    removed = root.remove_orphans(all_commits)
    totals = _totals(all_commits, progress.elapsed)
    root.write_success(totals)
    progress.print_line()
    summary = {**progress.summary(), "output": cfg.output.path, "orphans_removed_at_end": len(removed),
               "totals": totals}
    reasons = ", ".join(f"{r}={n}" for r, n in totals["reject_reasons"].items()) or "none"
    print(f"done: {summary['items_processed']} item(s) processed, {summary['items_skipped']} skipped · "
          f"{totals['rows']:,} rows committed · {totals['rejected']:,} rejected ({reasons}) · "
          f"{totals['tokens']:,} tokens · {progress.elapsed:.1f}s · output {cfg.output.path}",
          file=stream, flush=True)
    return summary
