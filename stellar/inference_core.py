"""Turn raw feature arrays into network inputs and run an ensemble over them (shared by every caller).

``features_to_tensors`` normalises raw features exactly as the training
loader does; ``arrow_features`` gets the same raw arrays out of an Arrow
batch without a Python loop per row (and says which rows are unusable and
why); ``forward_members`` evaluates every member of an ensemble on each
sub-batch in one pass over the data, on CPU or GPU, optionally in mixed
precision.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stellar.features import Normaliser
from stellar.model import StackedEnsemble

INPUTS = ("spectrum", "spectrum_mask", "xp", "scalars")


def features_to_tensors(stats: dict, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Raw ``spectrum``, ``spectrum_mask``, ``xp``, ``scalars`` -> the tensors of FeatureDataset batches."""
    xp = Normaliser.from_stats(stats["xp"]).normalise(np.asarray(arrays["xp"], dtype=np.float64))
    sc = Normaliser.from_stats(stats["scalars"]).normalise(np.asarray(arrays["scalars"], dtype=np.float64))
    n = len(xp)
    spectrum = np.ascontiguousarray(arrays["spectrum"], dtype=np.float32)
    if not spectrum.flags.writeable:  # a zero-copy Arrow view: torch wants memory it may own
        spectrum = spectrum.copy()
    return {
        "spectrum": torch.from_numpy(spectrum),
        "spectrum_mask": torch.from_numpy(np.ascontiguousarray(arrays["spectrum_mask"]).astype(bool)),
        "xp": torch.from_numpy(xp),
        "scalars": torch.from_numpy(sc),
        "source_id": torch.from_numpy(np.asarray(arrays.get("source_id", np.arange(n)), dtype=np.int64)),
    }


def _fixed(col: pa.ChunkedArray | pa.Array, width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A list column (fixed or variable size, as Parquet or Spark hands it over) -> (n, width) array and
    a per-row 'has exactly width values, none null' mask; bad rows come back as zeros."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    if pa.types.is_fixed_size_list(col.type) and col.type.list_size == width and col.null_count == 0 \
            and col.flatten().null_count == 0:
        return col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(n, width), \
            np.ones(n, dtype=bool)
    lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
    inner_nulls = np.zeros(n, dtype=bool)
    ok = lengths == width
    good = col.filter(pa.array(ok))
    values = good.flatten()
    if values.null_count:
        per_row = values.is_null().to_numpy(zero_copy_only=False).reshape(-1, width).any(axis=1)
        idx = np.flatnonzero(ok)
        inner_nulls[idx[per_row]] = True
        values = pc.fill_null(values, 0)
    out = np.zeros((n, width), dtype=dtype)
    out[ok] = values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)
    return out, ok & ~inner_nulls


def arrow_features(batch: pa.RecordBatch | pa.Table, stats: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw feature arrays of a batch plus a per-row problem text ('' when the row is usable).

    A row is unusable when an array has the wrong length or holds nulls, or a
    value the network would read is not finite (unmasked flux, XP, scalars):
    those rows get no prediction and land in quarantine, the rest go on.
    """
    n_pix, n_xp, n_sc = stats["n_spectrum"], 2 * stats["xp_bases"], len(stats["scalar_names"])
    spec, ok_s = _fixed(batch.column("spectrum"), n_pix, np.float32)
    mask, ok_m = _fixed(batch.column("spectrum_mask"), n_pix, np.uint8)
    xp, ok_x = _fixed(batch.column("xp"), n_xp, np.float32)
    sc, ok_c = _fixed(batch.column("scalars"), n_sc, np.float32)
    problem = np.full(len(spec), "", dtype=object)
    for ok, what in ((ok_c, f"scalars: not {n_sc} values"), (ok_x, f"xp: not {n_xp} values"),
                     (ok_m, f"spectrum_mask: not {n_pix} values"), (ok_s, f"spectrum: not {n_pix} values")):
        problem[~ok] = what
    usable = ok_s & ok_m & ok_x & ok_c
    # A row sum is finite exactly when every value is (NaN and inf propagate): one pass over the
    # batch; the pixel-by-pixel test, which forgives masked pixels, runs only on the rows it flags.
    spec_bad = ~np.isfinite(spec.sum(axis=1, dtype=np.float64))
    if spec_bad.any():
        rows = np.flatnonzero(spec_bad)
        spec_bad[rows] = ~(np.isfinite(spec[rows]) | (mask[rows] != 0)).all(axis=1)
    for bad, what in ((spec_bad, "spectrum: non-finite flux in unmasked pixels"),
                      (~np.isfinite(xp.sum(axis=1, dtype=np.float64)), "xp: non-finite coefficients"),
                      (~np.isfinite(sc.sum(axis=1, dtype=np.float64)), "scalars: non-finite values")):
        problem[usable & bad] = what
        usable &= ~bad
    sid = batch.column("source_id")
    sid = (sid.combine_chunks() if isinstance(sid, pa.ChunkedArray) else sid)
    if sid.null_count:
        problem[sid.is_null().to_numpy(zero_copy_only=False)] = "source_id: null"
    arrays = {"spectrum": spec, "spectrum_mask": mask, "xp": xp, "scalars": sc,
              "source_id": pc.fill_null(sid, -1).to_numpy(zero_copy_only=False)}
    if "spectrum_error" in batch.schema.names:  # for the spectrum-consistency check; the network does not read it
        err, ok_e = _fixed(batch.column("spectrum_error"), n_pix, np.float32)
        arrays["spectrum_error"] = np.where(ok_e[:, None], err, np.nan).astype(np.float32)
    return arrays, problem


def forward_members(model: "StackedEnsemble | list[torch.nn.Module]", data: dict[str, torch.Tensor],
                    device: torch.device, chunk: int, autocast_dtype: torch.dtype | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Every member on each sub-batch (inputs moved to the device once per sub-batch): normalised
    means and variances, (M, N, L) float32 each, on the host. ``model`` is a StackedEnsemble
    (one call for all members) or a list of member networks (one call each)."""
    n = len(data["spectrum"])
    if isinstance(model, StackedEnsemble):
        m, n_lab, call = model.m, model.n_labels, model
    else:
        m, n_lab = len(model), model[0].n_labels

        def call(*x):
            outs = [net(*x) for net in model]
            return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])
    means = np.empty((m, n, n_lab), dtype=np.float32)
    variances = np.empty((m, n, n_lab), dtype=np.float32)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else \
        contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for lo in range(0, n, chunk):
            x = [data[k][lo:lo + chunk] for k in INPUTS]
            rows = len(x[0])
            if rows < chunk and n > chunk:
                # pad the last sub-batch to the full size: one kernel shape for the whole run (a new
                # shape costs oneDNN/cuDNN a fresh plan, and every row then goes through the same code)
                x = [torch.cat([t, t[:1].expand(chunk - rows, *t.shape[1:])]) for t in x]
            mu, log_var = call(*(t.to(device, non_blocking=True) for t in x))
            means[:, lo:lo + rows] = mu[:, :rows].float().cpu().numpy()
            variances[:, lo:lo + rows] = log_var[:, :rows].float().exp().cpu().numpy()
    return means, variances
