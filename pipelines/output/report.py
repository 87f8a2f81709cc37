"""The run report: one self-contained HTML page in the output (`_report.html`), written when a run finishes.

Everything in it comes from the commit records (times, rows, tokens, padded
tokens, token-length histograms, reject reasons), so it costs no extra pass
over the data and `embedrank report OUTPUT` can rebuild it at any time.
Plots are PNGs inlined as data URIs: the page needs no network and no files.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from typing import Any

from common.errors import OutputError
from pipelines.output import plan_store
from pipelines.output.records import ItemCommit, Totals, sum_histograms
from pipelines.output.root import SUCCESS_FILE, OutputRoot

REPORT_FILE = "_report.html"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return fig, ax


def _time(commit: ItemCommit) -> dt.datetime:
    return dt.datetime.fromisoformat(commit.committed_at)


def throughput_plot(commits: list[ItemCommit], run_started: dt.datetime) -> str:
    fig, ax = _figure("Rows committed over time")
    ordered = sorted(commits, key=_time)
    if ordered:
        start = min(run_started, _time(ordered[0]))
        span = (_time(ordered[-1]) - start).total_seconds()
        unit, scale = ("minutes", 60) if span > 180 else ("seconds", 1)
        times, cumulative, total = [0.0], [0], 0
        for c in ordered:
            total += c.rows + c.rejected
            times.append((_time(c) - start).total_seconds() / scale)
            cumulative.append(total)
        ax.step(times, cumulative, where="post", marker=".", ms=4)
        ax.set_xlabel(f"{unit} since {start:%Y-%m-%d %H:%M:%S} UTC (commit times have 1 s resolution)")
    ax.set_ylabel("rows (committed + rejected)")
    return _png(fig)


def length_plot(hist: list[int]) -> str:
    fig, ax = _figure("Document length (tokens per text, after truncation)")
    labels = [f"≤{2 ** k:,}" for k in range(len(hist))]
    ax.bar(range(len(hist)), hist)
    ax.set_xticks(range(len(hist)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("rows")
    return _png(fig)


def padding_plot(commits: list[ItemCommit]) -> str:
    fig, ax = _figure("Padding efficiency per work item (real tokens / tokens computed)")
    measured = sorted((c for c in commits if c.padded_tokens), key=_time)
    if measured:
        ax.plot(range(1, len(measured) + 1), [c.tokens / c.padded_tokens for c in measured], "o", ms=4)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("work items in commit order")
    else:
        ax.text(0.5, 0.5, "not measured for this task", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("efficiency")
    return _png(fig)


def rejects_plot(reasons: dict[str, int], files: int) -> str:
    fig, ax = _figure("Rejects by reason")
    bars = dict(reasons, **({"(files rejected whole)": files} if files else {}))
    if bars:
        from matplotlib.ticker import MaxNLocator

        ax.barh(list(bars), list(bars.values()), height=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rows (files for the last bar)" if files else "rows")
    else:
        ax.text(0.5, 0.5, "no rejects", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def vector_columns_line(fp: dict[str, Any]) -> str:
    """The stored vector columns as the fingerprint names them: `name dtype[dims]` each (the default output: the
    single `embedding` of `vector_dtype`; "-" for jobs without vectors)."""
    if "vectors" in fp:
        return ", ".join(f"{v['column']} {v['dtype']}[{v['dimensions'] or 'full'}]"
                         + (f" (ranges {v['ranges']})" if v.get("ranges") else "") for v in fp["vectors"])
    if fp.get("task") == "embed":
        return f"embedding {fp.get('vector_dtype', 'float32')}[{fp.get('dimensions') or 'full'}]"
    return "-"


def render(job: dict[str, Any], commits: list[ItemCommit], wall_s: float | None) -> str:
    """The report page for a job whose commits are `commits` and whose last run took `wall_s` seconds."""
    sums = Totals.of(commits)
    tokens = sums.tokens
    padded = sum(c.padded_tokens for c in commits)
    fp = job["fingerprint"]
    rows = [
        ("task", fp.get("task")), ("model", fp.get("model")), ("revision", fp.get("revision") or "-"),
        ("vector columns", vector_columns_line(fp)),
        ("work items", f"{len(commits):,} of {plan_store.header(job)['items']:,}"),
        ("rows committed", f"{sums.rows:,}"),
        ("rows rejected", f"{sums.rejected:,}"),
        ("files rejected whole", ", ".join(f"{f['file']} ({f['reason']})" for f in sums.rejected_files) or "none"),
        ("tokens", f"{tokens:,}"),
        ("padding efficiency", f"{tokens / padded:.1%} ({padded:,} tokens computed)" if padded else "not measured"),
        ("last run wall time", f"{wall_s or 0:,.1f} s"),
        ("report written", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")),
    ]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    plots = [("throughput", throughput_plot(commits, dt.datetime.fromisoformat(job["updated_at"]))),
             ("lengths", length_plot(sum_histograms(c.length_hist for c in commits))),
             ("padding", padding_plot(commits)), ("rejects", rejects_plot(sums.reject_reasons, len(sums.rejected_files)))]
    images = "\n".join(f'<figure><img id="{name}" alt="{name}" src="data:image/png;base64,{data}"></figure>'
                       for name, data in plots)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedrank run report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}th{{text-align:left;padding-right:2em}}
figure{{margin:1.5em 0}}img{{max-width:100%}}</style></head>
<body><h1>embedrank run report</h1>
<table>{table}</table>
{images}
</body></html>
"""


def write_report(root: OutputRoot, commits: dict[str, ItemCommit], wall_s: float | None) -> str:
    """Render and store `_report.html`; returns its path relative to the output."""
    job = root.read_job_header()  # the plan header's count is all the page needs of the plan
    if job is None:
        raise OutputError(f"{root.storage.url}: no _job.json; nothing to report")
    root.storage.write_bytes(REPORT_FILE, render(job, list(commits.values()), wall_s).encode())
    return REPORT_FILE


def rebuild_report(root: OutputRoot) -> str:
    """`embedrank report`: the report from what the output holds now (totals from `_SUCCESS` if present)."""
    job = root.read_job_header()
    if job is None:
        raise OutputError(f"{root.storage.url}: no _job.json; not an embedrank output")
    return write_report(root, root.read_planned_commits(), (root.read_json(SUCCESS_FILE) or {}).get("wall_s"))
