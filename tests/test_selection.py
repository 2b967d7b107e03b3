"""Training-sample selection: out-of-distribution stars flagged, determinism, one row per star."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

from stellar.config import load_config
from stellar.ingest.run import ingest
from stellar.preprocess import preprocess
from stellar.selection import select
from stellar.synth.survey import run_survey
from stellar.tables import TableStore, read_table

from conftest import ROOT, small_config


@pytest.fixture(scope="module")
def built(tmp_path_factory, rvs_instrument):
    tmp = tmp_path_factory.mktemp("select")
    cfg = small_config(tmp, n_stars=5000, stars_per_file=2500, **{"synth.ood_fraction": 0.04})
    run_survey(cfg.synth, rvs_instrument)
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp}", "select.place_batch=1000",
                                                     "select.observed_sample=1500", "select.observed_per_training=10", "select.threshold=0.3"])
    ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    preprocess(cfg.preprocess, rvs_instrument, cfg.ingest.output_dir)
    summary = select(cfg.select, cfg.preprocess.output_dir)
    return tmp, cfg, summary


@pytest.mark.slow
def test_out_of_distribution_stars_are_flagged(built):
    tmp, cfg, s = built
    sel = read_table(cfg.select.output_dir, "selection").to_pandas().set_index("source_id")
    truth = pq.read_table(tmp / "synth" / "truth", columns=["source_id", "is_ood"]).to_pandas().set_index("source_id")
    assert len(sel) == s["rows"] == 5000 and sel.index.is_unique  # every input star has exactly one row
    assert set(sel.index) == set(truth.index)
    obs = sel[sel.split != "train"]
    ood = truth.loc[obs.index, "is_ood"].to_numpy()
    flagged = ~obs.train_like.to_numpy()
    ood_rate, wrong_rate = flagged[ood].mean(), flagged[~ood].mean()
    print(f"OOD flagged train-unlike: {ood_rate:.3f} ({ood.sum()} stars); in-distribution flagged: {wrong_rate:.3f}")
    # A 2-D map of a small survey (5000 stars, ~900 training stars) moves a lot with the seed and with
    # the last bits of its input. Over six synth/select seed pairs (issue 15) the map flagged 0.49-0.88
    # of the out-of-distribution stars and 0.020-0.065 of the others, never less than 13x as often.
    # The floors keep a margin below the worst seed; a map that carries no information flags both
    # kinds alike and fails the ratio. The 90 % / 5 % targets are measured at scale by
    # benchmarks/selection.py.
    assert ood_rate >= 0.30 and wrong_rate <= 0.10 and ood_rate >= 5 * wrong_rate
    assert (TableStore(cfg.select.output_dir).table_path("selection").parent / "map.png").stat().st_size > 10_000


@pytest.mark.slow
def test_same_seed_same_flags_and_rerun_is_a_no_op(built, tmp_path):
    _, cfg, s = built
    again = select(cfg.select, cfg.preprocess.output_dir)
    assert again.get("up_to_date")
    other = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={cfg.work_dir}", "select.place_batch=1000",
                                                       "select.observed_sample=1500", "select.observed_per_training=10", "select.threshold=0.3",
                                                       f"select.output_dir={tmp_path / 'sel'}"]).select
    select(other, cfg.preprocess.output_dir)
    a = read_table(cfg.select.output_dir, "selection").sort_by("source_id")
    b = read_table(tmp_path / "sel", "selection").sort_by("source_id")
    assert a["train_like"].to_pylist() == b["train_like"].to_pylist()
    assert np.array_equal(a["x"].to_numpy(), b["x"].to_numpy())


def _select_into(cfg, out: Path, mapper=None):
    other = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={cfg.work_dir}", "select.place_batch=1000",
                                                       "select.observed_sample=1500", "select.observed_per_training=10",
                                                       "select.threshold=0.3", f"select.output_dir={out}"]).select
    select(other, cfg.preprocess.output_dir, mapper=mapper)
    return read_table(out, "selection").sort_by("source_id")


@pytest.mark.spark
@pytest.mark.slow
def test_spark_placement_equals_in_process_under_any_blas_threads(spark, built, tmp_path):
    """The map's fit and placement in Spark tasks equal the in-process run's to the bit, whether the
    driver process runs its BLAS with 1 or 2 threads (stellar.numerics' thread policy)."""
    from stellar.runtime import SparkExecutor

    _, cfg, _ = built
    runs = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads):
            runs[threads] = _select_into(cfg, tmp_path / f"local{threads}")
    b = _select_into(cfg, tmp_path / "spark", SparkExecutor(spark))
    for a in runs.values():
        assert np.array_equal(a["x"].to_numpy(), b["x"].to_numpy()) and np.array_equal(a["y"].to_numpy(), b["y"].to_numpy())
        assert a["train_like"].equals(b["train_like"])
