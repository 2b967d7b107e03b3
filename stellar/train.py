"""The train stage: a deep ensemble trained as parallel tasks, calibrated, tracked and registered in MLflow.

One MLflow parent run per ensemble with a child run per member (parameters,
per-epoch losses, the drop decision); on the parent: the test-split metrics
per label (RMSE, bias, z-score spread and 68 % coverage, overall and by S/N
bin), residual and calibration figures, and the ensemble as one model
(safetensors weights + JSON config + normalisation statistics, with the
pyfunc flavour logged as code). The model is registered as a new version of
``mlflow.model_name``, tagged with the features version, config hash and git
commit, and given the configured alias (``challenger``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from stellar.augment import catalogue_snr_quantiles, degraded_copies, fainter_star_model
from stellar.config import StellarConfig
from stellar.emulator import MAX_FIT_STARS, line_window
from stellar.errors import StellarError
from stellar.figures import coverage_figure
from stellar.features import Normaliser, split_hash
from stellar.instruments import Instrument
from stellar.mapping import MAP_FILE, MapReference
from stellar.model_card import model_card
from stellar.model import ModelConfig, load_model_preset
from stellar.tables import load_stats
from stellar.tables import TableStore, settings_hash
from stellar.ensemble import (Ensemble, coverage_curve, evaluate, load_split, outlier_members,
                              train_member)
from stellar.registry import Registry, log_training_run
from stellar.runtime import LOCAL, Executor
from stellar.stage import StageResult, git_commit
from stellar.trust import TrustThresholds


class TrainError(StellarError):
    """A training run that cannot go on: no features, labels missing, bad model overrides, or an empty
    validation or test split."""
    pass


def model_config(cfg: StellarConfig) -> ModelConfig:
    """The resolved architecture: the ``train.model`` preset with ``train.model_overrides`` applied and
    validated (a bad override is a TrainError naming the key)."""
    base = load_model_preset(cfg.train.model, cfg.conf_dir)
    if not cfg.train.model_overrides:
        return base
    try:
        return ModelConfig.model_validate({**base.model_dump(), **cfg.train.model_overrides})
    except Exception as exc:  # noqa: BLE001 - a validation error names the key
        raise TrainError(f"train.model_overrides: {exc}") from None


def train_digest(cfg: StellarConfig, instrument: str, features_version: str | None) -> str:
    """What determines the trained ensemble: train settings, the resolved architecture, instrument,
    features and selection versions (the map test's threshold is fitted on the selection scores) and
    code version (a registered version with this tag need not be retrained)."""
    from stellar import __version__

    payload = {"train": cfg.train.model_dump(exclude={"alias", "register_model"}),
               "model": model_config(cfg).model_dump(), "instrument": instrument,
               "features": features_version, "selection": selection_table(cfg, features_version)[1],
               "v": __version__}
    return settings_hash(payload)


def selection_table(cfg: StellarConfig, features_version: str | None) -> tuple[Path | None, str | None]:
    """The committed selection table made from these features, if there is one: (its folder, version).
    A selection of other features is not used (the map test then falls back to train_like)."""
    store = TableStore(cfg.select.output_dir)
    man = store.current_manifest()
    if man is None or features_version is None or man.get("summary", {}).get("features_version") != features_version:
        return None, None
    version = store.current_version()
    return store.root / version / "selection", version


def input_datasets(cfg: StellarConfig, features: TableStore, selection: Path | None) -> list[dict]:
    """The training run's inputs as MLflow datasets: the features version (training), the ingested tables
    it was built from and the selection (context 'source'/'selection'), each with a content digest, and each
    label catalogue file with its SHA-256."""
    import hashlib

    out = [{"name": f"features {features.current_version()}", "uri": str(features.root / features.current_version()),
            "digest": features.content_digest(), "context": "training"}]
    tables = TableStore(cfg.ingest.output_dir)
    if tables.current_version():
        out.append({"name": f"tables {tables.current_version()}", "uri": str(tables.root / tables.current_version()),
                    "digest": tables.content_digest(), "context": "source"})
    if selection is not None:
        sel = TableStore(selection.parent.parent)
        out.append({"name": f"selection {selection.parent.name}", "uri": str(selection.parent),
                    "digest": sel.content_digest(selection.parent.name), "context": "selection"})
    for lab in cfg.ingest.labels:
        path = Path(lab.path)
        if path.is_file():
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out.append({"name": f"labels {path.name} ({lab.catalogue})", "uri": str(path.resolve()),
                        "digest": h.hexdigest()[:16], "context": "labels"})
    return out


def stored_map(selection: Path | None) -> MapReference | None:
    """The selection version's map (stellar.mapping), which the model carries so that a survey it never
    saw gets train_like from the same map; None without a selection, for a UMAP map (its placement
    cannot be rebuilt from arrays) or for a selection written before maps were stored."""
    path = None if selection is None else selection.parent / MAP_FILE
    if path is None or not path.is_file():
        return None
    ref = MapReference.from_files({MAP_FILE: path.read_bytes()})
    return ref if ref.portable else None


def map_scores(selection: Path | None, source_id: np.ndarray) -> np.ndarray | None:
    """The selection-map score of each of ``source_id`` (NaN where it has none); None without a selection."""
    if selection is None:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ids = pa.array(np.asarray(source_id, dtype=np.int64))
    t = pads.dataset(selection, format="parquet", partitioning="hive").to_table(
        columns=["source_id", "score"], filter=pc.field("source_id").isin(ids))
    pos = pc.fill_null(pc.index_in(ids, t["source_id"]), -1).to_numpy(zero_copy_only=False)
    score = t["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    out = np.full(len(ids), np.nan)
    out[pos >= 0] = score[pos[pos >= 0]]
    return out


def registered_with_digest(cfg: StellarConfig, digest: str) -> int | None:
    """The newest registered version trained with exactly these inputs, if any."""
    return Registry.from_config(cfg).version_with_tag("train_digest", digest)


def training_progress_dir(cfg: StellarConfig) -> Path:
    """Where members leave their per-epoch records while the train stage runs (the work folder, which
    driver and executors share on one machine and on a cluster with a shared file system)."""
    return Path(cfg.work_dir) / ".progress" / "train"


def train_ensemble(cfg: StellarConfig, instrument: Instrument, mapper: Executor | None = None,
                   log_mlflow: bool = True) -> dict:
    """The train stage: train the members (in parallel on ``mapper``), drop outliers, fit the emulator,
    trust thresholds and calibration on held-out stars, evaluate on the test split and, with
    ``log_mlflow``, log and register the ensemble.

    Returns the summary: members kept and dropped, calibration, trust thresholds, test metrics, timings,
    the MLflow run and registered version when logged, and the :class:`Ensemble` under ``ensemble``."""

    t0 = time.perf_counter()
    mapper = mapper or LOCAL
    features_root = cfg.preprocess.output_dir
    store = TableStore(features_root)
    if store.current_version() is None:
        raise TrainError(f"no features under {features_root} (run 'stellar preprocess' first)")
    stats = load_stats(features_root)
    labels = list(instrument.labels)
    missing = [lab for lab in labels if lab not in stats["label_names"]]
    if missing:
        raise TrainError(f"features lack labels {missing} needed by instrument {instrument.name}")
    mcfg = model_config(cfg)
    seeds = [cfg.train.seed * 1000 + i for i in range(cfg.train.members)]
    threads = cfg.train.threads_per_member

    progress = str(training_progress_dir(cfg))
    shutil.rmtree(progress, ignore_errors=True)  # a previous run's records would read as this one's

    def work(i: int):
        return train_member(features_root, mcfg, labels, stats, i, seeds[i], threads, cfg.train.device, progress)

    try:
        members = sorted(mapper.map(work, list(range(cfg.train.members))), key=lambda m: m.index)
    finally:  # the records only mean something while the members train
        shutil.rmtree(progress, ignore_errors=True)
    dropped = outlier_members([m.best_val_loss for m in members], cfg.train.outlier_mad) if len(members) > 2 else []
    kept = [m for m in members if m.index not in dropped]
    selection, selection_version = selection_table(cfg, store.current_version())
    meta = {"features_root": features_root, "features_version": store.current_version(),
            "selection_version": selection_version,
            "config_digest": cfg.digest(), "git_commit": git_commit(), "instrument": instrument.name,
            "train_digest": train_digest(cfg, instrument.name, store.current_version()),
            "members": [m.index for m in kept], "dropped": dropped, "seeds": seeds,
            "drop_rule": f"best validation loss > median + {cfg.train.outlier_mad} * 1.4826 * MAD"}
    ens = Ensemble(mcfg, labels, stats, [m.weights for m in kept], meta=meta,
                   selection_map=stored_map(selection))
    val = load_split(features_root, "validation", labels, stats)
    test = load_split(features_root, "test", labels, stats)
    if not val or not test:
        raise TrainError("the validation or test split is empty: too few usable labelled stars")
    raw_cal = evaluate_uncalibrated(ens, test)
    trust = fit_trust_and_calibration(cfg, ens, instrument, selection, val)
    # The test metrics (logged with the run, in its model card and figures, and the promotion gate's
    # z-score spreads) are taken with the calibration the test stars have not seen; only then do they
    # join it (calibrate_on_held_out).
    metrics = evaluate(ens, test)
    # kept with the model: the promotion gate's calibration criterion reads this held-out figure, since
    # the test stars are fit stars of the published calibration
    ens.meta["held_out_z_std"] = {lab: round(float(metrics.get(f"{lab}/all/z_std", float("nan"))), 5)
                                  for lab in labels}
    figures = _figures(ens, test) if log_mlflow else None
    calibrate_on_held_out(cfg, ens, selection, val, test)
    summary = {"members": len(members), "kept": len(kept), "dropped": dropped,
               "calibration": dict(zip(labels, ens.calibration.round(4).tolist())),
               "snr_calibration": ens.snr_calibration(),
               "mean_correction": dict(zip(labels, ens.mean_coef.round(4).tolist())),
               "trust": trust.to_dict(),
               "z_std_uncalibrated": raw_cal, "metrics": metrics,
               "member_seconds": [round(m.seconds, 2) for m in members],
               "member_pretrain_seconds": [round(m.pretrain_seconds, 2) for m in members],
               "member_best_epochs": [m.best_epoch for m in members],
               "member_devices": [m.device for m in members],
               "seconds": round(time.perf_counter() - t0, 2)}
    if log_mlflow:
        fig_r, fig_c = figures
        counts = store.current_manifest()["summary"]["counts"]
        summary.update(log_training_run(cfg, ens, members, dropped, metrics,
                                        {"figures/residuals.png": fig_r, "figures/calibration.png": fig_c},
                                        card=model_card(ens, metrics, counts, cfg),
                                        datasets=input_datasets(cfg, store, selection)))
    summary["ensemble"] = ens
    return summary


def run(cfg: StellarConfig, instrument: Instrument, executor: Executor | None = None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`). Up to date when a registered version was trained on
    exactly these inputs (its ``train_digest`` tag); the result's version is the registry version and its
    summary leaves the live ensemble out."""
    digest = train_digest(cfg, instrument.name, TableStore(cfg.preprocess.output_dir).current_version())
    version = registered_with_digest(cfg, digest)
    if version is not None:
        return StageResult("train", "up_to_date", version, digest, {"train_digest": digest})
    s = train_ensemble(cfg, instrument, mapper=executor)
    return StageResult("train", "ran", s.get("version"), digest,
                       {**{k: v for k, v in s.items() if k != "ensemble"}, "train_digest": digest})


def fit_trust_and_calibration(cfg: StellarConfig, ens: Ensemble, instrument: Instrument, selection: Path | None,
                              val: dict | None = None, fit_emulator: bool = True) -> TrustThresholds:
    """Everything fitted on held-out stars after the members are trained, in order: the spectrum
    emulator (on the training stars), the mean correction (validation stars), the trust thresholds (validation stars and a training-star pool
    for the chi-squares), then the uncertainty calibration on the validation stars the trust tests
    keep (the stars users keep). One function for the trainer and for re-assessing a finished run's
    model with changed trust code (``benchmarks/trust.py --refit``), so both fit exactly alike.
    ``fit_emulator`` False keeps the ensemble's own emulator."""
    features_root = cfg.preprocess.output_dir
    labels, stats = ens.labels, ens.stats
    val = val if val is not None else load_split(features_root, "validation", labels, stats)
    fit_set = emulator_sample(features_root, labels, stats)
    if fit_emulator or ens.emulator is None:
        ens.fit_emulator(fit_set, line_window(stats["wavelength"], [(ln.wavelength, ln.strength)
                                                                    for ln in instrument.lines if ln.kind != "dib"]))
    ens.fit_mean_correction(val)
    val_scores = map_scores(selection, val["source_id"].numpy())
    trust = ens.fit_trust(val, cfg.train.ood_false_flag_rate, val_scores, chi2_pool_sample(fit_set))
    keep = ens.flag(val, val_scores) == 0
    cal, cal_keep, weights, copy = calibration_stars(cfg, ens, val, keep, val_scores)
    ens.calibrate(cal, keep=cal_keep, weights=weights, copy=copy)
    ens.fit_precision(val, keep, cfg.train.catastrophic_errors, cfg.train.catastrophic_odds)
    return trust


def calibrate_on_held_out(cfg: StellarConfig, ens: Ensemble, selection: Path | None, val: dict,
                          test: dict) -> None:
    """The published uncertainty calibration: refitted as :func:`fit_trust_and_calibration` fits it, on
    the validation and the test stars together (the stars the trust tests keep, and their fainter copies),
    then the ``imprecise`` test's limits again on the validation stars with it. Run after the test
    metrics are taken, so those (logged with the run, and each label's z-score spread kept in the
    model's ``meta["held_out_z_std"]`` for the promotion gate) still judge a calibration the test stars
    did not shape.

    Why both splits: the calibration's kind-of-star terms are the difference between dwarfs and giants,
    and a label survey's dwarfs are few and their catalogue noise is as large as the network's error
    (hard survey: log g label noise 0.054 dex, the network's dwarf errors 0.03 at S/N > 50). With the
    ~110 validation dwarfs that difference drowns in the label noise and the priors keep dwarfs near the
    giants' factor: the catalogue's dwarfs got log g errors 1.5x too large (z-score spread 0.59 at
    S/N > 50). Twice the stars halve the variance the label noise leaves (0.85 -> 0.95 over all kinds
    there); the trust thresholds stay on the validation stars alone."""
    if not test:
        return
    stars = {k: torch.cat([val[k], test[k]]) for k in val}
    scores = map_scores(selection, stars["source_id"].numpy())
    keep = ens.flag(stars, scores) == 0
    cal, cal_keep, weights, copy = calibration_stars(cfg, ens, stars, keep, scores)
    ens.calibrate(cal, keep=cal_keep, weights=weights, copy=copy)
    ens.meta["calibration_stars"] = {"validation": int(len(val["source_id"])), "test": int(len(test["source_id"])),
                                     "kept": int(keep.sum())}
    val_keep = keep[:len(val["source_id"])]
    ens.fit_precision(val, val_keep, cfg.train.catastrophic_errors, cfg.train.catastrophic_odds)


def calibration_stars(cfg: StellarConfig, ens: Ensemble, val: dict, keep: np.ndarray,
                      val_scores: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The stars the uncertainty calibration is fitted on: (data, keep, weights, copy).

    The validation stars, and with ``train.calibration_copies`` > 0 that many fainter copies of each
    (:func:`stellar.augment.degraded_copies`): a label survey's stars are bright, and at the catalogue's
    faint end the validation split has a few dozen of them, too few to fit how the errors grow there
    for dwarfs and giants alike. A copy is the star moved further away until its spectrum has an S/N
    drawn from the catalogue's: its spectrum gets the noise a real star of that S/N has (the survey's
    own noise excess and pixel correlation, measured on the validation stars against the emulator:
    :meth:`Ensemble.noise_excess`), its G and parallax what the survey's S/N-G and parallax-error-G
    relations give (:func:`stellar.augment.fainter_star_model`). The trust tests judge the copies as
    they judge real stars (flagged copies stay out, as flagged stars do). The copies of a star share its
    intrinsic error, so together they weigh what the star weighs (each 1 / copies): they give the faint
    end's shape, not more evidence. ``copy`` marks them; the calibration's S/N and label ranges come
    from the real stars only. ``val_scores``: the validation stars' selection-map scores (None: no map),
    which a copy shares with its star."""
    n = int(cfg.train.calibration_copies)
    if n <= 0 or not val:
        return val, keep, None, None
    features_root = cfg.preprocess.output_dir
    excess, lag1 = ens.noise_excess(val)
    scalars = Normaliser.from_stats(ens.stats["scalars"]).denormalise(val["scalars"].numpy())
    fainter = fainter_star_model(scalars, val["snr"].numpy().astype(np.float64))
    copies = degraded_copies(val, torch.from_numpy(catalogue_snr_quantiles(features_root)), n,
                             cfg.train.seed + CALIBRATION_COPY_SEED, excess, lag1,
                             None if fainter is None else (ens.stats["scalars"], fainter))
    ens.meta["calibration_copies"] = {"copies": n, "made": int(len(copies.get("snr", []))),
                                      "noise_excess": round(excess, 4), "noise_lag1": round(lag1, 4),
                                      "dln_snr_dG": None if fainter is None else round(fainter[0], 4),
                                      "dln_parallax_error_dG": None if fainter is None else round(fainter[1], 4)}
    if not copies:
        return val, keep, None, None
    copy_scores = None
    if val_scores is not None:  # a copy is its star: the same source_id, the same map score
        ids = val["source_id"].numpy()
        order = np.argsort(ids, kind="stable")
        copy_scores = np.asarray(val_scores)[order[np.searchsorted(ids[order], copies["source_id"].numpy())]]
    copy_keep = ens.flag(copies, copy_scores) == 0
    data = {k: torch.cat([val[k], copies[k]]) for k in val}
    copy = np.r_[np.zeros(len(keep), bool), np.ones(len(copy_keep), bool)]
    return data, np.concatenate([keep, copy_keep]), np.where(copy, 1.0 / n, 1.0), copy


CALIBRATION_COPY_SEED = 7919  # added to train.seed: the copies' noise draws


def emulator_sample(features_root: str, labels: list[str], stats: dict) -> dict:
    """The training stars the spectrum emulator is fitted on: all of them up to MAX_FIT_STARS, beyond
    that a hash-chosen subset (the same stars whatever the partitioning)."""
    train = load_split(features_root, "train", labels, stats)
    n = len(train["source_id"])
    if n > MAX_FIT_STARS:
        keep = torch.from_numpy(split_hash(train["source_id"].numpy(), 23) < MAX_FIT_STARS / n)
        train = {k: v[keep] for k, v in train.items()}
    return train


CHI2_POOL_STARS = 5000


def chi2_pool_sample(train: dict) -> dict:
    """Up to CHI2_POOL_STARS hash-chosen training stars whose consistency statistics join the
    validation stars' in the chi-square thresholds (stellar.trust.fit_thresholds)."""
    n = len(train["source_id"])
    if n <= CHI2_POOL_STARS:
        return train
    keep = torch.from_numpy(split_hash(train["source_id"].numpy(), 29) < CHI2_POOL_STARS / n)
    return {k: v[keep] for k, v in train.items()}


def evaluate_uncalibrated(ens: Ensemble, test) -> dict:
    """Each label's test z-score spread before calibration (how far off the raw sigmas are), for the summary."""
    ev = evaluate(ens, test, calibrated=False)
    return {lab: round(ev[f"{lab}/all/z_std"], 3) for lab in ens.labels}


def _figures(ens: Ensemble, test):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = ens.predict(test)
    truth, err = ens.physical_labels(test)
    n = len(ens.labels)
    fig_r, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
    curves = {}
    for j, lab in enumerate(ens.labels):
        ok = np.isfinite(truth[:, j])
        ax = axes[0, j]
        ax.scatter(truth[ok, j], pred["mean"][ok, j] - truth[ok, j], s=3, alpha=0.5)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{lab} (label)")
        ax.set_ylabel("prediction - label")
        z = (pred["mean"][ok, j] - truth[ok, j]) / np.sqrt(pred["sigma"][ok, j] ** 2 + np.nan_to_num(err[ok, j]) ** 2)
        curves[lab] = coverage_curve(z)
    fig_r.tight_layout()
    return fig_r, coverage_figure(curves, "observed coverage (test)", figsize=(4, 3.5))
