"""SparkSession factory: the only place sessions are built (used by jobs/ and the CLI).

Under ``spark-submit`` the submit command owns master, memory and resources:
the factory then only fills settings that are not already set. Run directly
(``stellar ...``), it builds the embedded default from the config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stellar.config import StellarConfig
from stellar.java import configure_java_env

LOG4J2 = Path(__file__).resolve().parent / "log4j2.properties"


def _defaults(cfg: StellarConfig, master: str) -> dict[str, str]:
    local = master.startswith("local")
    conf = {
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "2048",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.compression.codec": "zstd",
        "spark.driver.maxResultSize": "2g",
        "spark.python.worker.reuse": "true",
        "spark.executorEnv.PYTHONHASHSEED": "0",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.warehouse.dir": str(Path(cfg.work_dir) / "spark-warehouse"),
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{LOG4J2}",
    }
    if local:
        conf["spark.ui.enabled"] = "false"
        conf["spark.sql.shuffle.partitions"] = str(max(2, 2 * (os.cpu_count() or 2)))
    return conf


def under_spark_submit() -> bool:
    """Whether ``spark-submit`` started this process (its JVM gateway is in the environment), so that
    the submit command's settings win."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(cfg: StellarConfig, app_suffix: str = ""):
    """A SparkSession for ``cfg``; settings in ``cfg.spark.conf`` win over the defaults."""
    configure_java_env()
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    submitted = under_spark_submit()
    existing = None
    if submitted:
        # attach to spark-submit's JVM first: only then does SparkConf() read what the submit command
        # set (its master included); before that it is an empty dict
        from pyspark import SparkContext

        SparkContext._ensure_initialized()
        existing = SparkConf()
    master = existing.get("spark.master", cfg.spark.master) if existing is not None else cfg.spark.master
    settings = _defaults(cfg, master)
    settings.update(cfg.spark.conf)
    app = cfg.spark.app_name + (f"-{app_suffix}" if app_suffix else "")
    builder = SparkSession.builder.appName(app)
    if existing is not None:
        for key, value in settings.items():
            if key in cfg.spark.conf or not existing.contains(key):
                builder = builder.config(key, value)
    else:
        builder = builder.master(cfg.spark.master).config("spark.driver.memory", cfg.spark.driver_memory)
        for key, value in settings.items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    return spark
