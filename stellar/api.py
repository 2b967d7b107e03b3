"""The model as a product: load a trained ensemble and predict from Gaia archive arrays or files.

::

    import stellar
    model = stellar.load_model("models:/stellar-hybrid@champion", tracking_uri="sqlite:///work/mlflow.db")
    table = model.predict(flux=flux, flux_error=flux_error,            # (n, 2401) RVS, archive grid
                          bp_coefficients=bp, rp_coefficients=rp,      # (n, 55) XP, NaN rows: no band
                          parallax=plx, parallax_error=plx_err,
                          phot_g_mean_mag=g, phot_bp_mean_mag=bp_mag, phot_rp_mean_mag=rp_mag)
    table[["teff", "teff_err", "logg", "ood", "ood_reasons", "train_like"]]
    model.predict_files(["XP_CONTINUOUS-Gaia DR3 123.csv", "RVS-Gaia DR3 123.csv"])  # DataLink files

Everything a prediction needs travels in the model (``Ensemble`` files: safetensors and JSON, no
pickle): the preprocessing settings and wavelength grid the features were built with, the
normalisation, the members, the calibration, the trust thresholds, the spectrum emulator and the
training run's selection map. The features come from :func:`stellar.features.star_features` (the
preprocess stage's own function), the files from the ingest readers (:func:`stellar.ingest.run.
read_rows`), the labels and flags from :class:`stellar.predict.BatchPredictor` (the predict stage's),
so a star gets the same numbers here as in a pipeline run. ``train_like`` comes from placing the
star on the stored map (:class:`stellar.mapping.MapReference`); a model without a map (UMAP maps,
models trained before maps were stored) leaves it null, and its other trust tests still run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stellar.ensemble import Ensemble
from stellar.errors import StellarError
from stellar.features import SCALAR_INPUTS, SCALAR_NAMES, RawStars, star_features
from stellar.numerics import one_blas_thread
from stellar.tables import fixed_list
from stellar.trust import OOD_BITS

ASTROMETRY_INPUTS = ("phot_g_mean_mag", "phot_g_mean_flux", "phot_bp_mean_mag", "phot_rp_mean_mag", "parallax",
                     "parallax_error", "rvs_spec_sig_to_noise")
N_XP = 55  # Gaia DR3 XP coefficients per band


class ModelInputError(StellarError, ValueError):
    """Inputs a model cannot read: wrong shapes, a spectrum on another grid, a model without its settings."""


def ood_reason_names(reason: np.ndarray) -> list[str | None]:
    """Each star's ``ood_reason`` bitmask as '+'-joined bit names ('' for none, None where the row has no
    prediction; the bits: OOD_BITS). Decoded once per distinct value, not per star."""
    values = np.asarray(reason, dtype=np.float64)
    known = np.isfinite(values)
    codes, inverse = np.unique(values[known].astype(np.int64), return_inverse=True)
    names = np.array(["+".join(n for n, (bit, _) in OOD_BITS.items() if int(c) & bit) for c in codes] + [""],
                     dtype=object)
    out = np.full(len(values), None, dtype=object)
    out[known] = names[inverse]
    return out.tolist()


@dataclass
class StellarModel:
    """A trained ensemble ready to predict from archive arrays (see the module docstring).

    Args:
        ensemble: the loaded :class:`~stellar.ensemble.Ensemble`.
        identity: where it came from (name, version, run id, or the folder).
        device: ``cpu``, ``cuda`` or ``auto`` (a GPU where torch sees one).
        chunk: stars per forward pass.
    """

    ensemble: Ensemble
    identity: dict = field(default_factory=dict)
    device: str = "cpu"
    chunk: int = 512
    _predictor: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from stellar.predict import BatchPredictor

        settings = self.ensemble.stats.get("preprocess")
        if not settings:
            raise ModelInputError("this model does not carry its preprocessing settings (trained before they were "
                                  "stored with the features): retrain it to use it outside a pipeline run")
        model_scalars = list(self.ensemble.stats.get("scalar_names") or [])
        if model_scalars != list(SCALAR_NAMES):
            # the arrays are turned into features by this stellar version's code: its scalar set is fixed
            raise ModelInputError(f"this model reads the scalars {model_scalars} but this stellar version computes "
                                  f"{list(SCALAR_NAMES)}: it was trained by another stellar version; retrain it "
                                  "(stellar train) or use the stellar version it was trained with")
        self.settings = settings
        dev = "cuda" if self.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if self.device == "auto" else self.device)
        self._predictor = BatchPredictor(self.ensemble.to(dev), torch.device(dev), self.chunk)

    @property
    def labels(self) -> list[str]:
        """The labels predicted, in order (each with a ``<label>_err`` column)."""
        return list(self.ensemble.labels)

    @property
    def n_pixels(self) -> int:
        """Pixels of an input spectrum on the instrument's grid (Gaia RVS: 2401)."""
        return int(self.settings["n_pixels"])

    @property
    def wavelength(self) -> np.ndarray:
        """The instrument grid (nm) that ``flux`` must be sampled on."""
        return np.asarray(self.settings["input_wavelength"])

    # -- arrays ---------------------------------------------------------------------------------------
    def raw_stars(self, flux, flux_error, bp_coefficients=None, rp_coefficients=None, **scalars) -> RawStars:
        """Archive arrays -> :class:`~stellar.features.RawStars`, with shapes checked and NaN where a value is
        not given (a missing input costs the star a quality bit, not its prediction)."""
        unknown = sorted(set(scalars) - set(SCALAR_INPUTS))
        if unknown:
            raise ModelInputError(f"unknown inputs {unknown}; known: flux, flux_error, bp_coefficients, "
                                  f"rp_coefficients, {', '.join(SCALAR_INPUTS)}")
        flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
        err = np.atleast_2d(np.asarray(flux_error, dtype=np.float32))
        n = flux.shape[0]
        if flux.shape[1] != self.n_pixels or err.shape != flux.shape:
            raise ModelInputError(f"flux and flux_error must be (n, {self.n_pixels}) on the "
                                  f"{self.settings.get('instrument', 'instrument')} grid, got {flux.shape} and "
                                  f"{err.shape}")

        def coeffs(value, name: str) -> np.ndarray:
            if value is None:
                return np.full((n, N_XP), np.nan)
            arr = np.atleast_2d(np.asarray(value, dtype=np.float64))
            if arr.shape != (n, N_XP):
                raise ModelInputError(f"{name} must be (n, {N_XP}) with n = {n}, got {arr.shape}")
            return arr

        def column(name: str) -> np.ndarray:
            value = scalars.get(name)
            if value is None:
                return np.full(n, np.nan)
            arr = np.asarray(value, dtype=np.float64).reshape(-1)
            if arr.size == 1 and n != 1:
                arr = np.full(n, arr[0])
            if arr.size != n:
                raise ModelInputError(f"{name} must have one value per star ({n}), got {arr.size}")
            return arr

        bp, rp = coeffs(bp_coefficients, "bp_coefficients"), coeffs(rp_coefficients, "rp_coefficients")
        cols = {field_name: column(name) for name, field_name in SCALAR_INPUTS.items()}
        has_xp = np.isfinite(bp[:, 0]) | np.isfinite(rp[:, 0])
        has_astrometry = np.zeros(n, dtype=bool)
        for name in ASTROMETRY_INPUTS:
            has_astrometry |= np.isfinite(cols[SCALAR_INPUTS[name]])
        return RawStars(flux=flux, flux_error=err, bp=bp, rp=rp, has_xp=has_xp, has_astrometry=has_astrometry, **cols)

    def features(self, raw: RawStars) -> dict[str, np.ndarray]:
        """The model's inputs of ``raw`` (:func:`stellar.features.star_features` with the model's settings)."""
        return star_features(raw, self.settings)

    def predict(self, flux, flux_error, *, bp_coefficients=None, rp_coefficients=None, source_id=None, **scalars):
        """Labels, calibrated uncertainties and trust flags of stars given as archive arrays.

        ``flux``, ``flux_error``: (n, pixels) on the instrument grid (:attr:`wavelength`), NaN where a pixel
        is missing; ``bp_coefficients``/``rp_coefficients``: (n, 55); any of ``parallax``,
        ``parallax_error``, ``phot_g_mean_mag``, ``phot_bp_mean_mag``, ``phot_rp_mean_mag``,
        ``phot_g_mean_flux``, ``bp_n_relevant_bases``, ``rp_n_relevant_bases``,
        ``rvs_spec_sig_to_noise``: (n,). Returns a pandas DataFrame, one row per star in input order:
        ``source_id`` (when given), ``snr``, ``quality``, each label and ``<label>_err`` (null where the
        model withholds it), ``out_of_range``, ``problem``, ``train_like`` and ``selection_score`` (the
        stored map's verdict), the consistency chi-squares, ``ood``, ``ood_reason`` and ``ood_reasons``."""
        raw = self.raw_stars(flux, flux_error, bp_coefficients, rp_coefficients, **scalars)
        return self._predict_raw(raw, source_id)

    def predict_table(self, table) -> "Any":
        """:meth:`predict` on a pandas DataFrame or Arrow table whose columns carry the archive names
        (``flux``, ``flux_error`` and ``bp_coefficients``/``rp_coefficients`` as list columns)."""
        if not isinstance(table, (pa.Table, pa.RecordBatch)):
            table = pa.Table.from_pandas(table, preserve_index=False)
        names = table.schema.names
        if "flux" not in names or "flux_error" not in names:
            raise ModelInputError(f"the table needs flux and flux_error columns, it has {names}")
        kwargs = {name: _dense(table.column(name), self.n_pixels if name.startswith("flux") else N_XP)
                  for name in ("flux", "flux_error", "bp_coefficients", "rp_coefficients") if name in names}
        kwargs.update({name: pc.fill_null(table.column(name).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
                       for name in SCALAR_INPUTS if name in names})
        sid = table.column("source_id").to_numpy(zero_copy_only=False) if "source_id" in names else None
        return self.predict(source_id=sid, **kwargs)

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> "Any":
        """:meth:`predict` on Gaia files: DataLink downloads (RVS, XP_CONTINUOUS), archive query results
        with the gaia_source columns, bulk ECSV files; folders are searched. Read with the ingest readers
        and joined on source_id, one row per spectrum. Rows a reader rejects are in the result's
        ``attrs["quarantine"]`` (file, line, source_id, reason), never silently dropped."""
        import pandas as pd

        tables, quarantine = _read_files(paths, self.settings)
        rvs = tables.get("rvs")
        if rvs is None or rvs.num_rows == 0:
            raise ModelInputError("no readable RVS spectrum among the files" +
                                  (f" ({len(quarantine)} rows quarantined: {quarantine[0]['reason']})"
                                   if quarantine else ""))
        sid = rvs["source_id"].to_numpy()
        kwargs: dict[str, Any] = {"flux": _dense(rvs["flux"], self.n_pixels),
                                  "flux_error": _dense(rvs["flux_error"], self.n_pixels)}
        for product, names in (("xp", ("bp_coefficients", "rp_coefficients", "bp_n_relevant_bases",
                                       "rp_n_relevant_bases")), ("astrometry", ASTROMETRY_INPUTS)):
            t = tables.get(product)
            if t is None:
                continue
            pos = pc.index_in(pa.array(sid), value_set=t["source_id"])
            for name in names:
                if name not in t.schema.names:
                    continue
                col = pc.take(t[name], pos)
                kwargs[name] = _dense(col, N_XP) if name.endswith("coefficients") else \
                    pc.fill_null(col.cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)
        out = self.predict(source_id=sid, **kwargs)
        out.attrs["quarantine"] = pd.DataFrame(quarantine, columns=["source_file", "line", "source_id", "reason"])
        return out

    # -- the one prediction path ------------------------------------------------------------------------
    def _predict_raw(self, raw: RawStars, source_id=None):
        feat = self.features(raw)
        n = len(feat["snr"])
        rows = np.arange(n, dtype=np.int64)  # the join key inside: a user's ids need not be unique
        batch = pa.table({
            "source_id": pa.array(rows),
            "spectrum": fixed_list(feat["spectrum"], pa.float32()),
            "spectrum_error": fixed_list(feat["spectrum_error"], pa.float32()),
            "spectrum_mask": fixed_list(feat["spectrum_mask"], pa.uint8()),
            "xp": fixed_list(feat["xp"], pa.float32()),
            "scalars": fixed_list(feat["scalars"], pa.float32()),
            "snr": pa.array(feat["snr"]), "quality": pa.array(feat["quality"]),
        })
        selection = None
        smap = self.ensemble.selection_map
        if smap is not None and n:
            ids = None if source_id is None else np.asarray(source_id, dtype=np.int64).reshape(-1)
            with one_blas_thread():  # the selection stage's thread policy: the same last bits
                score, like = smap.verdict(feat["spectrum"], feat["xp"], self.ensemble.stats, ids)
            selection = pa.table({"source_id": pa.array(rows), "train_like": pa.array(like),
                                  "score": pa.array(score.astype(np.float32))})
        out = self._predictor.predict_batch(batch, selection).to_pandas()
        out = out.drop(columns=["hpx", "split"])
        if source_id is not None:
            out["source_id"] = np.asarray(source_id).reshape(-1)
        else:
            out = out.drop(columns=["source_id"])
        out["ood_reasons"] = ood_reason_names(out["ood_reason"].to_numpy(dtype="float64", na_value=np.nan))
        return out



def _dense(col, width: int) -> np.ndarray:
    """A list column -> (n, width) float64, rows of NaN where a value is null or has another length."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    out = np.full((n, width), np.nan)
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    ok = lengths == width
    if ok.any():
        values = pc.fill_null(col.filter(pa.array(ok)).flatten().cast(pa.float64()), np.nan)
        out[ok] = values.to_numpy(zero_copy_only=False).reshape(-1, width)
    return out


def _read_files(paths: Iterable[str | os.PathLike], settings: dict) -> tuple[dict[str, pa.Table], list[dict]]:
    """Every Gaia product among ``paths`` (folders searched) read as the ingest stage reads it: canonical
    tables per product (first row per source_id) and the quarantined rows."""
    from stellar.ingest.products import astrometry_product, rvs_product, xp_product
    from stellar.ingest.readers import InputFile, sniff
    from stellar.config import DEFAULT_ASTROMETRY_COLUMNS
    from stellar.ingest.run import IngestTask, TaskContext, file_key, read_rows

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ModelInputError(f"{p}: no such file or folder")
    wave = np.asarray(settings["input_wavelength"])
    products = {"rvs": rvs_product(int(settings["n_pixels"])), "xp": xp_product(False),
                "astrometry": astrometry_product(list(DEFAULT_ASTROMETRY_COLUMNS))}
    with tempfile.TemporaryDirectory(prefix="stellar-read-") as tmp:
        ctx = TaskContext(12, products, wave, None, tmp)
        found: dict[str, list[pa.Table]] = {}
        quarantine: list[dict] = []
        for path in files:
            kind = sniff(path)
            if kind is None:
                continue
            st = path.stat()
            inp = InputFile(str(path), path.name, kind[0], kind[1], st.st_size, st.st_mtime_ns)
            res, unreadable, good, quars = read_rows(IngestTask(inp, file_key(inp.source_file), 0, 0, None), ctx)
            if res.corrupt and good is not None:  # a file known to be damaged: none of its rows is trusted
                quarantine += [{"source_file": path.name, "line": ln, "source_id": s, "reason": f"file: {res.corrupt}"}
                               for ln, s in zip(good["source_line"].to_pylist(), good["source_id"].to_pylist())]
                good = None
            for q in quars:
                quarantine += [{"source_file": path.name, "line": r["line"], "source_id": r["source_id"],
                                "reason": r["reason"]} for r in q.select(["line", "source_id", "reason"]).to_pylist()]
            if good is not None and good.num_rows:
                found.setdefault(kind[0], []).append(good)
    tables = {}
    for product, parts in found.items():
        t = pa.concat_tables(parts, promote_options="default")
        if product != "rvs":  # one row per star to join on (the first read)
            _, first = np.unique(t["source_id"].to_numpy(), return_index=True)
            t = t.take(pa.array(np.sort(first)))
        tables[product] = t
    return tables, quarantine


def load_model(uri: str | os.PathLike, tracking_uri: str | None = None, device: str = "cpu") -> StellarModel:
    """A trained model, pickle-free, from the registry or a folder.

    ``uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (read from ``tracking_uri``, else
    MLFLOW_TRACKING_URI / MLflow's default), ``runs:/RUN_ID/model``, the local folder of a logged MLflow
    model (with ``artifacts/ensemble``) or an ensemble folder (with ``ensemble.json``)."""
    text = str(uri)
    local = Path(text)
    if local.is_dir():
        folder = local / "artifacts" / "ensemble" if (local / "artifacts" / "ensemble").is_dir() else local
        if not (folder / "ensemble.json").is_file():
            raise ModelInputError(f"{local} is neither an MLflow model folder nor an ensemble folder (no ensemble.json)")
        return StellarModel(Ensemble.load(folder), {"folder": str(folder)}, device)
    from stellar.registry import Registry, default_tracking_uri, download_model_ensemble

    tracking = tracking_uri or default_tracking_uri()
    if text.startswith("models:/"):
        ref = text[len("models:/"):]
        name, sep, alias = ref.partition("@")
        if not sep:
            name, _, alias = ref.rpartition("/")
        if not name or not alias:
            raise ModelInputError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        ens, identity = Registry(tracking, name).load(alias)
        return StellarModel(ens, identity, device)
    if text.startswith("runs:/"):
        return StellarModel(download_model_ensemble(text, tracking), {"uri": text}, device)
    raise ModelInputError(f"{text}: not a folder, models:/ or runs:/ URI")
