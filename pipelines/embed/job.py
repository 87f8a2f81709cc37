"""The embedding backfill job: every input row embedded into committed Parquet exactly once."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from pipelines.output.root import OutputRoot, totals
from pipelines.config import EmbedJobConfig
from common.errors import ModelLoadError
from pipelines.fingerprint import embed_fingerprint
from pipelines.output.lock import OutputLock
from pipelines.input.plan import make_plan
from pipelines.output.report import REPORT_FILE, write_report
from pipelines.lifecycle import process_items
from pipelines.storage import Storage


def recorded_config(cfg: Any) -> dict[str, Any]:
    """The config as stored in `_job.json`: storage options (credentials) are never written."""
    data = cfg.model_dump(mode="json")
    for section in data.values():
        if isinstance(section, dict):
            section.pop("storage_options", None)
    return data


def _check_model_config(path: str, config: dict[str, Any], dimensions: int | None) -> None:
    if config.get("embedrank_random_init"):
        print(f"NOTE: {path} is a randomly initialised model; its outputs are not meaningful", file=sys.stderr)
    hidden = config.get("hidden_size")
    if dimensions and hidden and dimensions > hidden:
        raise ModelLoadError(f"model.dimensions={dimensions} exceeds the model's embedding size {hidden}")


def preflight_model(path: str, dimensions: int | None = None, storage_options: dict[str, Any] | None = None,
                    revision: str | None = None) -> None:
    """Checks that need no Ray: a local or remote (URL) model directory exists, holds config.json and
    safetensors weights, and fits the requested dimensions. A URL model is only listed here (and its
    config.json read); replicas fetch it."""
    from common.model_cache import is_model_url, read_remote_json, remote_model

    if is_model_url(path):
        if revision is not None:
            raise ModelLoadError(f"model.revision is for hub ids; model.path {path!r} is a URL, versioned by "
                                 "its files (use a new path per model version)")
        remote_model(path, storage_options)
        _check_model_config(path, read_remote_json(path, "config.json", storage_options), dimensions)
        return
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")):
            raise ModelLoadError(f"model.path {path!r} is not a model directory")
        return
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelLoadError(f"model.path {path!r} has no config.json")
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise ModelLoadError(
            f"model.path {path!r} has no .safetensors weights"
            + (f" (only pickle files {pickled}, which embedrank never loads: convert them to safetensors)"
               if pickled else ""))
    with open(config_file) as fh:
        _check_model_config(path, json.load(fh), dimensions)


def dry_run_summary(plan, compute, stream: TextIO) -> dict[str, Any]:
    """`--dry-run`: the plan's figures plus its GPU-hour and cost estimate (the plan itself is printed already)."""
    figures, line = plan.estimate(compute.estimate_tokens_per_gpu_s, compute.estimate_usd_per_gpu_hour,
                                  compute.max_replicas)
    print(line, file=stream, flush=True)
    return {**plan.summary(), **figures}


def close_output(root: OutputRoot, commits: dict[str, dict], all_totals: dict[str, Any]) -> list[str]:
    """End of a run, lock held: drop orphans, write `_SUCCESS` and the report; returns the orphans removed."""
    removed = root.remove_orphans(commits)
    root.write_success(all_totals)
    write_report(root, commits, all_totals)
    return removed


def summarize(outcome, all_totals: dict[str, Any], output: str, stream: TextIO,
              removed: list[str]) -> dict[str, Any]:
    outcome.progress.print_line()
    summary = {**outcome.progress.summary(), "output": output, "totals": all_totals}
    reasons = ", ".join(f"{r}={n}" for r, n in all_totals["reject_reasons"].items()) or "none"
    print(f"done: {summary['items_processed']} item(s) processed, {summary['items_skipped']} skipped · "
          f"{all_totals['rows']:,} rows committed · {all_totals['rejected']:,} rejected ({reasons}) · "
          f"{all_totals['tokens']:,} tokens · {outcome.progress.elapsed:.1f}s · output {output}",
          file=stream, flush=True)
    bad = all_totals.get("rejected_files") or []
    if bad:
        print(f"WARNING: {len(bad)} file(s) rejected whole (see _rejects/): "
              + ", ".join(f"{f['file']} ({f['reason']})" for f in bad), file=stream, flush=True)
    print(f"report: {output.rstrip('/')}/{REPORT_FILE}", file=stream, flush=True)
    summary["orphans_removed_at_end"] = len(removed)
    return summary


def run_embed(cfg: EmbedJobConfig, *, dry_run: bool = False, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or resume) one embedding job; returns its summary. Progress and summary go to `stream`."""
    stream = stream or sys.stderr
    preflight_model(cfg.model.path, cfg.model.dimensions, cfg.model_storage_options, cfg.model.revision)
    plan = make_plan(cfg.input)
    print(plan.describe(), file=stream, flush=True)
    if dry_run:
        return dry_run_summary(plan, cfg.compute, stream)

    from pipelines.graph import build_embed_graph

    root = OutputRoot(Storage(cfg.output.path, cfg.output_storage_options))
    fingerprint = embed_fingerprint(cfg)
    with OutputLock(root.storage, cfg.run.lock_stale_s, stream):
        outcome = process_items(
            plan=plan, source=cfg.input, root=root, fingerprint=fingerprint, recorded_config=recorded_config(cfg),
            run=cfg.run,
            build_graph=lambda items: build_embed_graph(cfg, items, root.storage, fingerprint), label="embed",
            stream=stream)
        all_totals = {**totals(list(outcome.commits.values())), "wall_s": round(outcome.progress.elapsed, 3)}
        removed = close_output(root, outcome.commits, all_totals)
    return summarize(outcome, all_totals, cfg.output.path, stream, removed)
