"""Ray Data stages that declare their columns, and the check that holds every batch to the declaration.

A `Stage` names what Ray Data maps (a task function or a replica class), the columns it needs from its
batch, the columns it adds and those it drops. A task function declares its own with the `@stage(...)`
decorator (its stage module); the replica classes are declared in their job's graph module
(`pipelines/embed/graph.py`, …), since `actors/` never imports `pipelines/`. `pipelines.graph` wires every stage
through `Stage.task()`:

- at run time, a batch that lacks a needed column fails before the stage runs, naming the stage and the
  column (`MissingColumnError`), instead of a KeyError deep inside it;
- at build time, `Stage.columns_after` tells the graph which columns flow on, so a stage wired where its
  needs are not met is a programming error caught before any work starts.

Torch-free: Ray imports this module in every worker that runs a wrapped stage.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from common.errors import EmbedrankError

EVERY_COLUMN: Literal["every column"] = "every column"
"""`drops` of a stage whose output is a new table: nothing of its batch flows on but what it adds."""


Function = TypeVar("Function", bound=Callable[..., Any])


class MissingColumnError(EmbedrankError):
    """A batch reached a stage without a column the stage needs; the message names both."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One Ray Data stage and its columns: the batch must have `needs`; the output has `adds`, and what the batch
    had except `drops` (`EVERY_COLUMN`: the output is a new table)."""

    fn: Callable[..., Any]
    needs: tuple[str, ...] = ()
    adds: tuple[str, ...] = ()
    drops: tuple[str, ...] | Literal["every column"] = ()

    @property
    def name(self) -> str:
        """The name Ray Data shows for the stage (`MapBatches(<name>)`)."""
        return self.fn.__name__

    def needing(self, *columns: str) -> "Stage":
        """This stage, needing `columns` too (columns that a job's config names, e.g. pass-through columns)."""
        return dataclasses.replace(self, needs=self.needs + columns)

    def adding(self, *columns: str) -> "Stage":
        """This stage, adding `columns` too (columns that a job's config names)."""
        return dataclasses.replace(self, adds=self.adds + columns)

    def check(self, batch: Any) -> None:
        """Raise `MissingColumnError` unless `batch` (an Arrow table or a mapping of columns) has every need."""
        has = list(batch.keys() if isinstance(batch, Mapping) else batch.column_names)
        missing = [c for c in self.needs if c not in has]
        if missing:
            raise MissingColumnError(
                f"stage {self.name}: its batch has no column {', '.join(map(repr, missing))} "
                f"(the stage needs {list(self.needs)}; the batch has {has})")

    def columns_after(self, columns: Iterable[str]) -> frozenset[str]:
        """The columns that flow on from this stage, given those its upstream stages provide.

        Raises AssertionError where those lack one of its needs: the graph wires the stage in the wrong place."""
        columns = frozenset(columns)
        missing = [c for c in self.needs if c not in columns]
        if missing:
            raise AssertionError(f"stage {self.name} needs {missing}, which no stage upstream adds "
                                 f"(upstream: {sorted(columns)})")
        kept = frozenset() if self.drops == EVERY_COLUMN else columns - frozenset(self.drops)
        return kept | frozenset(self.adds)

    def task(self) -> Callable[..., Any]:
        """What the graph hands to `map_batches`/`map_groups`: the stage, checking each batch first.

        It keeps the stage's `__name__` (a replica class becomes a subclass of the same name), so Ray Data's
        operator names do not change, and it pickles with cloudpickle as Ray ships it."""
        return _checked_class(self) if isinstance(self.fn, type) else _checked_function(self)


def stage(*, needs: Iterable[str] = (), adds: Iterable[str] = (),
          drops: Iterable[str] | Literal["every column"] = ()) -> Callable[[Function], Function]:
    """Declares the columns of the task function it decorates, as that function's `stage` attribute.

    The function itself is returned unchanged: calls and tests use it as before, and Ray pickles it by name."""
    def declare(fn: Function) -> Function:
        fn.stage = Stage(fn, tuple(needs), tuple(adds), drops if drops == EVERY_COLUMN else tuple(drops))
        return fn

    return declare


def _checked_function(stage: Stage) -> Callable[..., Any]:
    fn = stage.fn

    @functools.wraps(fn)
    def checked(batch, *args, **kwargs):
        stage.check(batch)
        return fn(batch, *args, **kwargs)

    return checked


def _checked_class(stage: Stage) -> type:
    replica = stage.fn

    def __call__(self, batch, *args, **kwargs):
        stage.check(batch)
        return replica.__call__(self, batch, *args, **kwargs)

    return type(replica.__name__, (replica,), {"__call__": __call__, "__doc__": replica.__doc__,
                                               "__module__": replica.__module__,
                                               "__qualname__": replica.__qualname__})
