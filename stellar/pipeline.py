"""The whole chain in one command, resumable: synth -> ingest -> preprocess -> select -> train ->
promote -> predict -> report.

Every stage commits its output atomically with a digest of its inputs and
settings (table stores, the survey manifest, the ``train_digest`` tag of a
registered model), so a rerun skips the stages whose committed output
matches and reruns a failed or killed stage alone (its half-written version
is removed first). ``synth`` runs only when ``ingest.gaia_root`` is the
synthetic survey's folder (the demo). ``promote`` moves ``@champion`` when the
criteria hold, so that ``predict`` (``@champion``) has a model on a first run.

One SparkSession serves all stages. On a terminal a live line shows the
stage, its Spark tasks done, the estimated stars done, the rate and the ETA;
elsewhere, plain log lines.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stellar.config import StellarConfig
from stellar.errors import StellarError
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult

STAGES = ("synth", "ingest", "preprocess", "select", "train", "promote", "predict", "report")


class PipelineError(StellarError):
    """A pipeline request that cannot run, such as an unknown stage name."""
    pass


@dataclass
class StageRun:
    """One stage of a pipeline run: its status, seconds, the stage's summary and, when it failed, the error."""

    name: str
    status: str = "pending"  # ran | skipped | failed | not selected
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)
    error: str = ""


def choose_stages(cfg: StellarConfig, start: str | None = None, only: list[str] | None = None) -> list[str]:
    """The stages to run, in pipeline order: from ``start`` on, and only those in ``only``. ``synth`` is
    left out unless ingest reads the synthetic survey's folder (the demo) or ``only`` names it.
    Raises PipelineError for an unknown stage."""
    for s in [start, *(only or [])]:
        if s is not None and s not in STAGES:
            raise PipelineError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    stages = list(STAGES)
    if start:
        stages = stages[stages.index(start):]
    if only:
        stages = [s for s in stages if s in only]
    if "synth" in stages and not _is_demo(cfg) and not only:
        stages.remove("synth")
    return stages


def _is_demo(cfg: StellarConfig) -> bool:
    return cfg.ingest.gaia_root is not None and \
        Path(cfg.ingest.gaia_root).resolve() == Path(cfg.synth.output_dir).resolve()


class Progress:
    """Spark task progress for the running stage: a live line on a terminal, periodic lines otherwise."""

    def __init__(self, stream=None, interval: float = 0.5, log_every: float = 30.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval, self.log_every = interval, log_every
        self.spark = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stage, self.stars, self.t0 = "", None, 0.0
        self.detail: Callable[[], str | None] | None = None

    def start(self, stage: str, stars: int | None, detail: Callable[[], str | None] | None = None) -> None:
        """Report on ``stage`` (``stars``: the catalogue size, for the stars estimate) from now on: the
        polling thread runs whether or not a SparkSession exists yet (sessions are built lazily, by the
        stage's first Spark work), so the first seconds of a run say what is going on too. ``detail``:
        the stage's own account appended to the line (the train stage's members and epochs)."""
        self.stage, self.stars, self.t0, self.detail = stage, stars, time.perf_counter(), detail
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread and clear the live line on a terminal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def line(self) -> str | None:
        """The progress text (:meth:`spark_line`), followed by the stage's ``detail`` where it has one."""
        text = self.spark_line()
        extra = self.detail() if self.detail is not None else None
        return f"{text}; {extra}" if extra else text

    def spark_line(self) -> str:
        """The active Spark jobs' tasks done, elapsed, estimated stars and rate, ETA; or, while no Spark
        task runs (the session starting, driver-side work, no Spark at all), the stage and the time
        elapsed."""
        elapsed = time.perf_counter() - self.t0
        if self.spark is None:
            return f"  [{self.stage}] starting, {_clock(elapsed)} elapsed"
        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for job in tracker.getActiveJobsIds():
            info = tracker.getJobInfo(job)
            for sid in (info.stageIds if info else []):
                st = tracker.getStageInfo(sid)
                if st is not None:
                    done += st.numCompletedTasks
                    total += st.numTasks
        if not total:
            return f"  [{self.stage}] working on the driver, {_clock(elapsed)} elapsed"
        frac = done / total
        text = f"  [{self.stage}] tasks {done}/{total} ({frac:.0%}), {_clock(elapsed)} elapsed"
        if self.stars and frac > 0:
            text += f", ~{int(self.stars * frac)} of {self.stars} stars, {self.stars * frac / elapsed:.0f} stars/s"
        if frac > 0:
            text += f", ETA {_clock(elapsed * (1 - frac) / frac)}"
        return text

    def _run(self) -> None:
        last = time.perf_counter()  # logs (not a terminal): the first line after log_every, then every log_every
        while not self._stop.wait(self.interval):
            try:
                text = self.line()
            except Exception:  # noqa: BLE001 - progress must never break a stage
                continue
            if text is None:
                continue
            if self.tty:
                width = shutil.get_terminal_size((150, 24)).columns - 1
                self.stream.write("\r\033[K" + text[:max(width, 40)])
                self.stream.flush()
            elif time.perf_counter() - last >= self.log_every:
                self.stream.write(text + "\n")
                self.stream.flush()
                last = time.perf_counter()


def stage_detail(stage: str, cfg: StellarConfig) -> Callable[[], str | None] | None:
    """The stage's own progress account for :class:`Progress`: the train stage's members and epochs."""
    if stage != "train":
        return None
    from stellar.ensemble import member_progress_line
    from stellar.train import training_progress_dir

    folder = training_progress_dir(cfg)
    return lambda: member_progress_line(folder, cfg.train.members)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_pipeline(cfg: StellarConfig, stages: list[str], use_spark: bool = True,
                 report: Callable[[StageRun], None] | None = None, progress: Progress | None = None) -> list[StageRun]:
    """Run the stages in order; stop at the first failure (later stages are left pending)."""
    from stellar.instruments import load_instrument

    instrument = load_instrument(cfg.instrument, cfg.conf_dir)
    progress = progress or Progress()
    runs = [StageRun(s) for s in stages]
    spark = mapper = None

    def session():
        nonlocal spark, mapper
        if use_spark and spark is None:
            from stellar.runtime import SparkExecutor
            from stellar.spark import build_session

            spark = build_session(cfg, "pipeline")
            mapper = SparkExecutor(spark, "stellar pipeline")
            progress.spark = spark
        return spark, mapper

    def n_stars() -> int | None:
        path = Path(cfg.synth.output_dir) / "survey.json"
        if _is_demo(cfg) and path.is_file():
            return int(json.loads(path.read_text())["n_stars"])
        return None

    try:
        for run in runs:
            t0 = time.perf_counter()
            # tasks of these stages are parts of the catalogue: their share estimates the stars done
            progress.start(run.name, n_stars() if run.name in ("synth", "ingest", "preprocess", "select",
                                                               "predict") else None, stage_detail(run.name, cfg))
            try:
                result = _stage(run.name, cfg, instrument, session)
                run.summary = result.as_dict()
                run.status = "skipped" if result.up_to_date else "ran"
            except StellarError as exc:
                run.status, run.error = "failed", str(exc)
            finally:
                progress.stop()
                run.seconds = round(time.perf_counter() - t0, 2)
            if report:
                report(run)
            if run.status == "failed":
                break
    finally:
        if spark is not None:
            spark.stop()
    return runs


def _stage_module(name: str):
    """The module of stage ``name``: each exposes ``run(cfg, instrument, executor) -> StageResult``
    (:mod:`stellar.stage`). Imported on first use, so a pipeline that runs only some stages never loads the
    others (torch, MLflow, matplotlib)."""
    import importlib

    return importlib.import_module(STAGE_MODULES[name])


# Every stage, by name: the module whose ``run`` carries it out.
STAGE_MODULES = {"synth": "stellar.synth.survey", "ingest": "stellar.ingest.run", "preprocess": "stellar.preprocess",
                 "select": "stellar.selection", "train": "stellar.train", "promote": "stellar.promote",
                 "predict": "stellar.predict", "report": "stellar.report"}


def _stage(name: str, cfg: StellarConfig, instrument, session) -> StageResult:
    """Run stage ``name`` through its contract. ``session()`` builds the Spark session on first use and
    returns (spark, executor), or (None, None) for an in-process run; it is called only when the stage
    maps tasks."""
    if name not in STAGE_MODULES:
        raise PipelineError(f"unknown stage {name!r}")
    return _stage_module(name).run(cfg, instrument, _OnFirstUse(lambda: session()[1]))


class _OnFirstUse(Executor):
    """The pipeline's executor, built when a stage first maps tasks (or asks its parallelism): a stage
    that finds its output up to date, or maps nothing, never starts Spark. In-process runs (``build``
    returns None) get :data:`stellar.runtime.LOCAL`."""

    def __init__(self, build: Callable[[], Executor | None]):
        self._build = build
        self._executor: Executor | None = None

    def _get(self) -> Executor:
        if self._executor is None:
            self._executor = self._build() or LOCAL
        return self._executor

    @property
    def parallelism(self) -> int:  # type: ignore[override]
        """The task slots of the executor (built now if it was not yet)."""
        return self._get().parallelism

    def map(self, fn, items):
        """``fn`` over ``items`` on the executor (built now if it was not yet)."""
        return self._get().map(fn, items)

    def share(self, value):
        """``value`` shared through the executor (built now if it was not yet)."""
        return self._get().share(value)
