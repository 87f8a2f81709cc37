"""Stall watchdog: a Ray Data pipeline that stops producing fails loudly, naming the stuck stage.

Ray Data waits forever on a task or actor that hangs (ray-project/ray #62746,
#60517, #45822); its own no-progress guard is off for shuffles, does not name
the stage and leaves the hung actor alive. Here the driver consumes the
pipeline on a thread and waits for each batch with a deadline; when one passes
it reads the running executor's operators, blames the most downstream one
whose tasks have produced nothing, and force-stops the executor (which kills
the pool's actors and cancels tasks) before raising `PipelineStalled`.

Ray 2.60 gives no public handle on a running executor: this reads private
attributes (`StreamingExecutor` is a thread; `_topology`, op metrics). Every
access is guarded, so an incompatible Ray still fails the job on a stall,
with the stage reported as unknown.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

from common.errors import EmbedrankError


class PipelineStalled(EmbedrankError):
    """No output reached the driver within the stall timeout; the pipeline was stopped."""

    exit_code = 3

    def __init__(self, message: str, stage: str | None):
        super().__init__(message)
        self.stage = stage


def _executors() -> list[Any]:
    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:
        return []
    return [t for t in threading.enumerate() if isinstance(t, StreamingExecutor)]


def _find_executor(ds: Any, ignore: set[int]) -> Any:
    context = getattr(ds, "_context", None)
    mine = [t for t in _executors() if id(t) not in ignore and getattr(t, "_data_context", None) is context]
    return mine[-1] if mine else getattr(ds, "_current_executor", None)


def _operators(executor: Any) -> list[dict[str, Any]]:
    """Each operator's state, upstream first (read from another thread, hence the retries)."""
    from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer

    error: Exception | None = None
    for _ in range(5):
        try:
            now = time.perf_counter()
            rows = []
            for op, state in list(executor._topology.items()):
                if isinstance(op, InputDataBuffer):
                    continue
                running = list(op.metrics._running_tasks.values())
                actors = op.get_actor_info()
                rows.append({"name": op.name, "done": op.has_completed(), "tasks": op.num_active_tasks(),
                             "idle_s": max((now - t.last_updated for t in running), default=None),
                             "queued": state.total_enqueued_input_blocks(),
                             "actors_starting": actors.pending, "actors_ready": actors.running})
            return rows
        except Exception as exc:  # noqa: BLE001 - a dict changing under us, or a Ray that moved things
            error = exc
            time.sleep(0.05)
    raise RuntimeError(f"cannot read the executor's operators ({error!r})")


def _blame(rows: list[dict[str, Any]], waited: float) -> tuple[str | None, str]:
    """The stuck stage and why. Upstream tasks blocked by a stuck downstream stage are not the cause."""
    live = [r for r in rows if not r["done"]]
    busy = [r for r in live if r["tasks"]]
    if busy:
        stale = [r for r in busy if (r["idle_s"] or 0) >= 0.5 * waited]
        r = stale[-1] if stale else max(busy, key=lambda r: r["idle_s"] or 0)
        return r["name"], f"{r['tasks']} task(s) running, none produced output for {r['idle_s'] or 0:.0f}s"
    starting = [r for r in live if r["actors_starting"] and not r["actors_ready"]]
    if starting:
        return starting[-1]["name"], f"{starting[-1]['actors_starting']} actor(s) still starting, none ready"
    queued = [r for r in live if r["queued"]]
    if queued:
        return queued[-1]["name"], f"{queued[-1]['queued']} input block(s) queued, no task running (no resources?)"
    return None, "no operator has running tasks or queued input"


def _force_stop(executor: Any, error: BaseException | None, timeout_s: float) -> None:
    """`shutdown(force=True)` kills actors and cancels tasks; on a thread since it may block on them."""
    done = threading.Event()

    def stop() -> None:
        try:
            executor.shutdown(force=True, exception=error)
        except Exception:  # noqa: BLE001 - best effort: the driver is failing anyway
            pass
        finally:
            done.set()

    threading.Thread(target=stop, name="embedrank-stop-pipeline", daemon=True).start()
    done.wait(timeout_s)


def iter_batches_watched(ds: Any, stall_timeout_s: float, startup_timeout_s: float,
                         **iter_batches_kwargs: Any) -> Iterator[Any]:
    """`ds.iter_batches(...)` that raises PipelineStalled when the driver waits longer than `stall_timeout_s`
    for a batch (`startup_timeout_s` for the first: actors start and load models). Time the caller
    spends on a batch does not count."""
    if hasattr(ds.context, "execution_no_progress_timeout_s"):
        ds.context.execution_no_progress_timeout_s = -1  # ours replaces it: it would leave hung actors alive
    batches: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stopping = threading.Event()
    before = {id(t) for t in _executors()}

    def hand_over(entry: tuple[str, Any]) -> bool:
        while not stopping.is_set():
            try:
                batches.put(entry, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def consume() -> None:
        try:
            for batch in ds.iter_batches(**iter_batches_kwargs):
                if not hand_over(("batch", batch)):
                    return
            hand_over(("end", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the driver's thread
            hand_over(("error", exc))

    consumer = threading.Thread(target=consume, name="embedrank-consume", daemon=True)
    consumer.start()
    executor, received, stalled = None, 0, None
    try:
        while True:
            limit = startup_timeout_s if received == 0 else stall_timeout_s
            deadline = time.monotonic() + limit
            while True:
                executor = executor or _find_executor(ds, before)
                try:
                    kind, value = batches.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                    break
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        kind, value = "stall", None
                        break
            if kind == "batch":
                received += 1
                yield value
            elif kind == "end":
                return
            elif kind == "error":
                raise value
            else:
                stalled = _stall_error(executor, limit, received)
                raise stalled
    finally:
        stopping.set()
        executor = executor or _find_executor(ds, before)
        if executor is not None:
            _force_stop(executor, stalled, timeout_s=30.0)
        consumer.join(timeout=10.0)


def _stall_error(executor: Any, waited: float, received: int) -> PipelineStalled:
    stage, why, table = None, "the running pipeline could not be inspected", ""
    if executor is not None:
        try:
            rows = _operators(executor)
            stage, why = _blame(rows, waited)
            table = "".join(f"\n  {r['name']}: {'done' if r['done'] else 'running'}, {r['tasks']} task(s), "
                            f"{r['queued']} queued, actors {r['actors_ready']} ready/{r['actors_starting']} starting"
                            for r in rows)
        except Exception as exc:  # noqa: BLE001
            why = f"the running pipeline could not be inspected ({exc})"
    when = "no output at all" if received == 0 else f"no new output after {received} batch(es)"
    return PipelineStalled(
        f"stalled: {when} for {waited:.0f}s; stuck stage: {stage or 'unknown'} ({why}). The pipeline was "
        f"stopped; committed work is kept; rerun the same command to resume (raise run.stall_timeout_s or "
        f"run.startup_timeout_s if the work is just slow).{table}", stage)
