"""The execution floor every stage stands on: map a function over items, here or as Spark tasks.

A stage never builds its own parallelism. It takes an :class:`Executor` and calls
``executor.map(fn, items)`` (results in item order), reads ``executor.parallelism`` to size its
plan, and hands large read-only values to its tasks with ``executor.share(value)`` (read back as
``.value``). :data:`LOCAL` runs everything in this process; :class:`SparkExecutor` runs each item
as a Spark task (the function and its items are pickled by Spark's own closure serialiser: only
stellar's code and plain data travel, never a model loaded from outside). Swapping one for the
other never changes a stage's output: tasks write deterministic files and return small dicts.

CPU discovery lives here too (:func:`available_threads`), so a Spark task and a local run agree
on how many threads a task may use.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    """A value handed to every task as ``.value`` (in-process: the object itself)."""

    def __init__(self, value: T):
        self.value = value


class Executor:
    """Map a function over items. Callable as ``executor(fn, items)`` too (the stages' older
    ``mapper`` shape)."""

    parallelism: int = 1

    def map(self, fn: Callable[[Any], T], items: list) -> list[T]:
        """``fn`` applied to every item, results in item order; subclasses decide where the calls run."""
        raise NotImplementedError

    def share(self, value: T) -> Any:
        """Ship ``value`` to the tasks once; they read it as ``.value``."""
        return Shared(value)

    def __call__(self, fn: Callable[[Any], T], items: list) -> list[T]:
        return self.map(fn, items)


class LocalExecutor(Executor):
    """Every item in this process, one after another (tests, ``--no-spark``, small runs)."""

    def map(self, fn: Callable[[Any], T], items: list) -> list[T]:
        """``fn`` over ``items`` in this process, in order."""
        return [fn(x) for x in items]


class SparkExecutor(Executor):
    """Every item a Spark task; results come back to the driver in item order.

    Tasks write their outputs straight into a folder every executor can reach and return small
    dicts. ``partitions`` (default: one task per item) changes only scheduling, never output.
    Large read-only values travel as broadcasts: once per executor, read once per Python worker.
    """

    def __init__(self, spark, description: str = "stellar", partitions: int | None = None):
        self._sc = spark.sparkContext
        self.description = description
        self.partitions = partitions
        self.parallelism = self._sc.defaultParallelism

    def map(self, fn: Callable[[Any], T], items: list) -> list[T]:
        """``fn`` over ``items`` as Spark tasks (one per item unless ``partitions``), collected in item order."""
        if not items:
            return []
        self._sc.setJobDescription(f"{self.description}: {len(items)} tasks")
        return self._sc.parallelize(list(items), numSlices=self.partitions or len(items)).map(fn).collect()

    def share(self, value: T) -> Any:
        """A Spark broadcast of ``value``: shipped once per executor, read by tasks as ``.value``."""
        return self._sc.broadcast(value)


LOCAL = LocalExecutor()


def available_threads() -> int:
    """CPUs this process may use: a Spark task's own ``spark.task.cpus`` inside a task (so tasks
    never oversubscribe their executor), else the CPUs this process is allowed to run on."""
    try:
        from pyspark import TaskContext as SparkTaskContext

        ctx = SparkTaskContext.get()
        if ctx is not None:
            return max(1, int(ctx.cpus()))
    except ImportError:  # pragma: no cover - pyspark is a dependency; a bare core install may lack it
        pass
    return max(1, len(os.sched_getaffinity(0)))
