"""Spark mapper for the ingest stage: each (file, chunk) task and each dedup partition is a Spark task."""

from __future__ import annotations

from typing import Callable


def spark_mapper(spark, description: str = "stellar ingest") -> Callable[[Callable, list], list]:
    """``mapper(fn, items)`` that runs ``fn`` on every item in Spark tasks, results in item order.

    Tasks write their Parquet parts straight into the new table version
    (a folder every executor can reach) and return small dicts.
    """

    def mapper(fn: Callable, items: list) -> list:
        if not items:
            return []
        sc = spark.sparkContext
        sc.setJobDescription(f"{description}: {len(items)} tasks")
        return sc.parallelize(list(items), numSlices=len(items)).map(fn).collect()

    mapper.parallelism = spark.sparkContext.defaultParallelism  # type: ignore[attr-defined]
    mapper.share = spark.sparkContext.broadcast  # type: ignore[attr-defined]
    return mapper
