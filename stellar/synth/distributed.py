"""Run the synthetic-survey file tasks as Spark tasks (one file per task)."""

from __future__ import annotations

from stellar.config import SynthConfig
from stellar.instruments import Instrument
from stellar.synth.survey import FileTask, generate_file


def spark_runner(spark, partitions: int | None = None):
    """A ``Runner`` for ``run_survey`` that generates each file in a Spark task.

    The config and preset travel as plain dicts and are re-validated on the
    worker; output files are written by the workers straight into the
    (shared) output folder, and only small result dicts come back.
    ``partitions`` (default: one per file) changes only scheduling, never output.
    """

    def run(tasks: list[FileTask], cfg: SynthConfig, instrument: Instrument, out_dir: str) -> list[dict]:
        cfg_d, inst_d = cfg.model_dump(), instrument.model_dump()

        def work(task: FileTask) -> dict:
            return generate_file(task, SynthConfig(**cfg_d), Instrument(**inst_d), out_dir)

        sc = spark.sparkContext
        sc.setJobDescription(f"stellar synth: {len(tasks)} files")
        return sc.parallelize(tasks, numSlices=partitions or max(1, len(tasks))).map(work).collect()

    return run
