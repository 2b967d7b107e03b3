"""Shared fixtures: real-data folder, a small generated survey, one local SparkSession."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stellar.config import load_config
from stellar.instruments import load_instrument

ROOT = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("STELLAR_REAL_DATA", ROOT.parent / "shared" / "data" / "real"))


# MLFLOW_TRACKING_URI as the test session found it (set by a user or CI, or absent).
_SESSION_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI into this process's environment, and
    ``load_config`` lets that variable win over the file (how cluster jobs are pointed at a shared
    server): without this, a test that trains would point every later test's config at its store,
    and the suite's result would depend on the order its files run in. Each test starts and ends
    with the variable as the session found it."""
    _restore_tracking_uri()
    yield
    _restore_tracking_uri()


def _restore_tracking_uri() -> None:
    if _SESSION_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _SESSION_TRACKING_URI


@pytest.fixture(scope="session", autouse=True)
def _spark_scratch_inside_the_test_folder(tmp_path_factory):
    """Every JVM the suite starts (the in-process SparkSession, ``stellar`` subprocesses, spark-submit
    drivers, standalone workers) keeps its scratch under this session's base folder, never in /tmp:
    a driver killed on purpose by a fault test cannot run its shutdown hook, and each one left a
    ~2.7 GB ``/tmp/spark-*`` folder (the packed environment, copied and unpacked) behind, which over a
    few runs filled the disk. The folder is removed when the session ends, whatever happened."""
    import shutil

    scratch = tmp_path_factory.getbasetemp() / "spark-scratch"
    scratch.mkdir(exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("SPARK_LOCAL_DIRS", "SPARK_SUBMIT_OPTS")}
    os.environ["SPARK_LOCAL_DIRS"] = str(scratch)  # block manager, userFiles, pyspark scratch
    os.environ["SPARK_SUBMIT_OPTS"] = " ".join(  # the launcher JVM's own temp folder (archive copies)
        filter(None, [saved["SPARK_SUBMIT_OPTS"], f"-Djava.io.tmpdir={scratch}"]))
    yield scratch
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real Gaia/APOGEE samples not found at {REAL} (set STELLAR_REAL_DATA to their folder)")
    return REAL


@pytest.fixture(scope="session")
def rvs_instrument():
    return load_instrument("gaia_rvs")


@pytest.fixture(scope="session")
def hr15n_instrument():
    return load_instrument("ges_hr15n")


def small_config(tmp: Path, n_stars: int = 1200, stars_per_file: int = 500, **extra):
    sets = [f"work_dir={tmp}", f"synth.n_stars={n_stars}", f"synth.stars_per_file={stars_per_file}"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(ROOT / "conf" / "local.yaml", sets)


@pytest.fixture(scope="session")
def small_survey(tmp_path_factory, rvs_instrument):
    """A 1200-star, 3-file Gaia RVS survey generated in-process (shared by read-only tests)."""
    from stellar.synth.survey import run_survey

    tmp = tmp_path_factory.mktemp("survey")
    cfg = small_config(tmp, **{"synth.ood_fraction": 0.05, "synth.missing_bp_fraction": 0.03,
                               "synth.nan_pixel_fraction": 0.1})
    manifest = run_survey(cfg.synth, rvs_instrument)
    return Path(manifest["path"]), manifest, cfg


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from stellar.spark import build_session

    tmp = tmp_path_factory.mktemp("spark")
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp}", "spark.master=local[2]"])
    session = build_session(cfg, "tests")
    yield session
    session.stop()
