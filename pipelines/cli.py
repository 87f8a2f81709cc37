"""`embedrank` command line: the jobs (embed, rerank, reindex) and the tools around their outputs.

versions, gc, verify, status, report, files, publish; schema (a config's JSON Schema); demo.

User mistakes (bad config, unreadable input, refused output, compute that the cluster can never serve) print
one clear message and exit 2; they never print a traceback. SIGINT / SIGTERM stop a job cleanly: exit 130 / 143
with how far it got (`pipelines.driver_session`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
from typing import Any, Callable

from common import errors
from common.errors import EmbedrankError

_REMOTE_ERROR = re.compile(r"^(?:common|pipelines)\.(?:\w+\.)*errors\.(\w+): (.+)$", re.MULTILINE)


def _from_remote_text(exc: BaseException) -> EmbedrankError | None:
    """Ray reports an actor constructor's exception only as text (ActorDiedError); recover it from there."""
    found = _REMOTE_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, EmbedrankError)
    return cls(message) if isinstance(cls, type) and issubclass(cls, EmbedrankError) else EmbedrankError(message)


def _user_error(exc: BaseException) -> EmbedrankError | None:
    """Find an EmbedrankError behind Ray's wrappers (RayTaskError.cause, __cause__, __context__, text)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EmbedrankError):
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, EmbedrankError) else e
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return _from_remote_text(exc)


def _store_error(exc: BaseException) -> EmbedrankError | None:
    """A store refusing us (credentials, endpoint, bucket, permissions) as one line naming the setting."""
    from pipelines.storage import storage_error

    line = storage_error(exc)
    return EmbedrankError(line) if line else None


def _parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise EmbedrankError(f"--storage-option {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


JOBS = {
    "embed": ("pipelines.embed.job:EMBED", "embed a corpus into committed Parquet vectors (resumable)"),
    "rerank": ("pipelines.rerank.job:RERANK", "score and rank candidate (query, document) pairs (resumable)"),
    "reindex": ("pipelines.reindex.job:REINDEX", "publish the next version of an index, embedding only new and "
                "changed documents (resumable; for cron)"),
}
"""Job commands: name → (its spec, `module:attribute`, imported when the command runs; help text)."""


def _job_spec(name: str):
    module, _, attribute = JOBS[name][0].partition(":")
    return getattr(importlib.import_module(module), attribute)


def cmd_job(args: argparse.Namespace) -> int:
    """Load and validate the job's config, run it, print its summary as JSON if asked."""
    from pipelines.config import load_config

    spec = _job_spec(args.command)
    summary = spec.run(load_config(args.config, args.set, schema=spec.config_type), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def _index(args: argparse.Namespace):
    from pipelines.reindex.index import IndexRoot
    from pipelines.storage import Storage

    return IndexRoot(Storage(args.root, _parse_storage_options(args.storage_option)))


def cmd_versions(args: argparse.Namespace) -> int:
    rows = _index(args).describe()
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    if not rows:
        print(f"{args.root}: no versions")
    for r in rows:
        counts = r["counts"] or {}
        changes = " ".join(f"{k}={counts[k]}" for k in ("new", "changed", "unchanged", "deleted") if k in counts)
        rows_text = "?" if r["rows"] is None else f"{r['rows']:,}"
        print(f"{r['version']}  {r['state']}  rows={rows_text}  base={r['base'] or '-'}  {changes}".rstrip())
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pipelines.output.lock import OutputLock

    from pipelines.output.table import expire_index_versions

    index = _index(args)
    with OutputLock(index.storage, args.lock_stale_s, allow_unconditional=args.allow_unconditional_store):
        result = index.gc(args.keep, sys.stdout, before_delete=lambda dropped: expire_index_versions(
            index.storage, dropped, sys.stdout))
    print(f"gc: kept {', '.join(result['kept'])}; collected {len(result['collected'])} version(s), "
          f"deleted {result['files_deleted']} file(s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Quick (control files and sizes) or full (every named file read: in the driver or as a Ray Data job)."""
    from pipelines.output.verify import verify_output

    options = _parse_storage_options(args.storage_option)
    session = contextlib.nullcontext()
    if not args.quick and args.engine != "local":
        from pipelines.driver_session import driver_session

        session = driver_session()  # a local Ray that the ray engine starts is shut down on the way out
    with session:
        report = verify_output(args.output, options, quick=args.quick, engine=args.engine)
    print(report.describe())
    print(json.dumps(report.counts, sort_keys=True))
    for problem in report.problems:
        print(f"problem: {problem}")
    print("invariant holds" if report.ok else f"invariant VIOLATED ({len(report.problems)} problem(s))")
    return 0 if report.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines.output.status import format_status, job_status

    status = job_status(args.output, _parse_storage_options(args.storage_option))
    print(json.dumps(status, sort_keys=True) if args.json else format_status(status))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.output.report import rebuild_report
    from pipelines.output.root import OutputRoot
    from pipelines.storage import Storage

    root = OutputRoot(Storage(args.output, _parse_storage_options(args.storage_option)))
    print(f"{args.output.rstrip('/')}/{rebuild_report(root)}")
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    """The committed files of an output (an index: its current version), for readers without Iceberg."""
    from pipelines.output.reader import committed_listing

    rows = committed_listing(args.output, _parse_storage_options(args.storage_option), rejects=args.rejects)
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(row["url"])
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Bring an output's Iceberg tables to its committed set (idempotent), under the output's lock."""
    from pipelines.output.lock import OutputLock
    from pipelines.output.table import publish_output
    from pipelines.storage import Storage

    options = _parse_storage_options(args.storage_option)
    with OutputLock(Storage(args.output, options), args.lock_stale_s,
                    allow_unconditional=args.allow_unconditional_store):
        result = publish_output(args.output, options, stream=sys.stdout)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schema of a job's config, for editors (the YAML language server validates and completes with it)."""
    from pipelines.config_doc import json_schema

    print(json.dumps(json_schema(args.job), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.workdir, rows=args.rows, config=args.config, overrides=args.set)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedrank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, (_, text) in JOBS.items():
        job = sub.add_parser(name, help=text)
        job.add_argument("config", help="YAML job config")
        job.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set output.path=s3://bucket/v1 (repeatable)")
        job.add_argument("--dry-run", action="store_true", help="print the plan and exit; touches no output")
        job.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
        job.set_defaults(func=cmd_job, runs_ray=True)

    verify = sub.add_parser("verify", help="check an output's exactly-once invariant (exit 0 iff it holds)")
    status = sub.add_parser("status", help="where a job stands (items, rows, rejects, rate, ETA); safe while it runs")
    report = sub.add_parser("report", help="(re)write the output's _report.html from its commits")
    files = sub.add_parser("files", help="print the committed files of an output, one URL a line (for engines "
                           "without Iceberg)")
    publish = sub.add_parser("publish", help="bring the output's Iceberg tables to its committed set (idempotent)")
    for command, func in ((verify, cmd_verify), (status, cmd_status), (report, cmd_report), (files, cmd_files),
                          (publish, cmd_publish)):
        command.add_argument("output", help="output root (local path or fsspec URL)")
        command.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                             help="fsspec option for the output filesystem (repeatable)")
        command.set_defaults(func=func)
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    files.add_argument("--json", action="store_true", help="one JSON list of {url, rows, bytes, sha256}")
    files.add_argument("--rejects", action="store_true", help="the reject files instead of the data files")
    publish.add_argument("--json", action="store_true", help="what was published, as one JSON object")
    publish.add_argument("--lock-stale-s", type=float, default=600.0, help="take over an output lock older than this")
    publish.add_argument("--allow-unconditional-store", action="store_true",
                         help="run on a store that ignores conditional writes (refused by default; unfenced)")
    verify.add_argument("--quick", action="store_true",
                        help="control files and listed sizes only: every item committed, its rows tiled, every named "
                        "file present with its recorded size; reads no data file")
    verify.add_argument("--engine", choices=("auto", "local", "ray"), default="auto",
                        help="where the full check reads the files: local (this process), ray (a Ray Data job: "
                        "RAY_ADDRESS, else a local Ray), auto (local up to 1,000,000 rows; default)")

    versions = sub.add_parser("versions", help="list an index root's versions: current, previous, unpublished")
    gc = sub.add_parser("gc", help="delete old index versions, keeping the newest N and every file they name")
    for command, func in ((versions, cmd_versions), (gc, cmd_gc)):
        command.add_argument("root", help="index root (local path or fsspec URL)")
        command.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                             help="fsspec option for the index filesystem (repeatable)")
        command.set_defaults(func=func)
    versions.add_argument("--json", action="store_true", help="one JSON list instead of text")
    gc.add_argument("--keep", type=int, required=True, help="how many of the newest published versions to keep")
    gc.add_argument("--lock-stale-s", type=float, default=600.0, help="take over an index lock older than this")
    gc.add_argument("--allow-unconditional-store", action="store_true",
                    help="run on a store that ignores conditional writes (refused by default; unfenced)")

    schema = sub.add_parser("schema", help="print the JSON Schema of a job's config (for editors)")
    schema.add_argument("job", nargs="?", default="embed", choices=tuple(JOBS), help="which job (default: embed)")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser("demo", help="generate a sample corpus and run the demo job end to end on local Ray")
    demo.add_argument("--workdir", default=".demo", help="where the corpus, model and output go")
    demo.add_argument("--rows", type=int, default=2000, help="documents in the sample corpus")
    demo.add_argument("--config", default=None, help="job config (default: configs/demo.yaml)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    demo.set_defaults(func=cmd_demo, runs_ray=True)
    for command in (*(sub.choices[name] for name in JOBS), demo):
        command.add_argument("--verbose", action="store_true",
                             help="show Ray's own logs here too (by default they stay in Ray's log directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    session = contextlib.nullcontext()
    if getattr(args, "runs_ray", False):
        from pipelines.driver_session import driver_session

        session = driver_session(verbose=args.verbose)
    try:
        with session:
            return func(args)
    except KeyboardInterrupt as stop:
        return _stopped(stop, job=getattr(args, "runs_ray", False))
    except Exception as exc:  # noqa: BLE001 - user errors become messages, the rest re-raise
        _end_progress_line()
        user = _user_error(exc) or _store_error(exc)
        if user is None:
            raise
        print(f"embedrank: error: {user}", file=sys.stderr)
        return user.exit_code


def _end_progress_line() -> None:
    progress = sys.modules.get("pipelines.progress")
    if progress is not None:
        progress.end_line()


def _stopped(stop: KeyboardInterrupt, job: bool) -> int:
    """SIGINT (Ctrl-C) or SIGTERM: say how far the job got; exit 128 + the signal's number."""
    import signal

    _end_progress_line()
    signum = getattr(stop, "signum", signal.SIGINT)
    progress = sys.modules.get("pipelines.progress")
    got = progress.current() if job and progress is not None else None
    how_far = (f"after {got.committed} of {got.total_items} work item(s) ({got.items} in this run)" if got
               else "before any work item was processed")
    print(f"embedrank: stopped by {signal.Signals(signum).name} {how_far}; no partial item was committed; "
          "rerun the same command to resume", file=sys.stderr, flush=True)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
