"""Training one ensemble member, and the deep ensemble with calibrated uncertainties.

A member is trained with Adam on the Gaussian NLL of the normalised labels,
streaming the training split with the issue-4 loader, with early stopping on
the validation split; the same seed gives the same weights (deterministic
torch on CPU). Members are independent, so ``train_ensemble`` maps them over
any mapper (Spark tasks in ``stellar train``, in-process in tests).

The ensemble's variance is aleatoric (mean of the members' predicted
variances) plus epistemic (variance of the members' means). A per-label
factor fitted on the validation split calibrates it, so that on held-out
stars (y - mu) / sigma has unit spread; the test split measures that. The
ensemble's mean gets a small correction fitted on the validation split too
(:func:`fit_mean_correction`): the pull toward the middle of the training
labels at their edges, where it is larger than the scatter.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from stellar.augment import catalogue_snr_quantiles, degrade_spectra, spectrum_noise_excess
from stellar.balance import label_density_weights, weight_lookup
from stellar.devices import make_deterministic, pick_device
from stellar.emulator import SpectrumEmulator
from stellar.features import split_hash
from stellar.inference_core import INPUTS, forward_members
from stellar.loader import FeatureDataset
from stellar.mapping import MAP_FILE, MapReference
from stellar.model import HybridNet, ModelConfig, gaussian_nll
from stellar.shift import catalogue_shift_weights
from stellar.trust import (LABEL_REFERENCE_FILE, TrustThresholds, assess, blocks_read, bound_outputs, drop_blocks,
                           fit_precision_limits, fit_thresholds, label_bounds)

SNR_BINS = ((15.0, 25.0), (25.0, 50.0), (50.0, np.inf))


@dataclass
class Member:
    """One trained member: index and seed, its best weights (safetensors bytes), best epoch and validation
    loss, per-epoch losses, training time and the device it ran on."""

    index: int
    seed: int
    weights: bytes  # safetensors
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    pretrain_losses: list[float] = field(default_factory=list)  # stellar.pretrain's loss per epoch
    pretrain_seconds: float = 0.0  # of ``seconds``, the pre-training's


def load_split(features_root: str, split: str, labels: list[str], stats: dict) -> dict[str, torch.Tensor]:
    """A whole split in memory (validation/test sets are small), in table order."""
    ds = FeatureDataset(features_root, split=split, batch_size=4096, shuffle=False, labels=labels, stats=stats)
    batches = list(ds)
    if not batches:
        return {}
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def split_labels(features_root: str, split: str, labels: list[str], stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(source_id (N,), normalised labels (N, L)) of one split, read without the array columns."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from stellar.tables import TableStore

    path = TableStore(features_root).table_path("features")
    t = pads.dataset(path, format="parquet", partitioning="hive").to_table(
        columns=["source_id", *labels], filter=pc.field("split") == split)
    order = [list(stats["label_names"]).index(k) for k in labels]
    mean = np.asarray(stats["labels"]["mean"], dtype=np.float64)[order]
    std = np.asarray(stats["labels"]["std"], dtype=np.float64)[order]
    y = np.stack([t.column(k).to_numpy(zero_copy_only=False).astype(np.float64) for k in labels], axis=1) \
        if labels else np.zeros((t.num_rows, 0))
    return t.column("source_id").to_numpy(zero_copy_only=False), (y - mean) / std


def input_dims(stats: dict) -> tuple[int, int, int]:
    """(spectrum pixels, XP coefficients, scalar features) of the features the statistics describe."""
    return stats["n_spectrum"], 2 * stats["xp_bases"], len(stats["scalar_names"])


def build_net(cfg: ModelConfig, stats: dict, labels: list[str]) -> HybridNet:
    """The network for these statistics, its means bounded to the training labels' range plus margin."""
    n_pix, n_xp, n_s = input_dims(stats)
    return HybridNet(cfg, n_pix, n_xp, n_s, len(labels), bounds=label_bounds(stats, list(labels), cfg.output_margin))


def _forward_chunks(net: HybridNet, data: dict[str, torch.Tensor], chunk: int = 256):
    """Forward in sub-batches on the net's device (CPU convs slow down above ~512 rows); results on CPU."""
    dev = next(net.parameters()).device
    means, logvars = [], []
    with torch.no_grad():
        for lo in range(0, len(data["source_id"]), chunk):
            x = [data[k][lo:lo + chunk].to(dev, non_blocking=True) for k in INPUTS]
            m, lv = net(*x)
            means.append(m.float().cpu())
            logvars.append(lv.float().cpu())
    return torch.cat(means), torch.cat(logvars)


def write_member_progress(folder: str | None, index: int, record: dict) -> None:
    """Best effort: the member's latest epoch as ``<folder>/member-<index>.json`` (replaced atomically), for
    the driver's progress line (:func:`member_progress_line`). A folder the task cannot write (an executor
    without the driver's file system) only costs the line, never the training."""
    if not folder:
        return
    with contextlib.suppress(OSError):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"member-{index}.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)


def member_progress_line(folder: str | os.PathLike | None, members: int | None = None) -> str | None:
    """The members' training as one short line: members finished, the running members' epochs, and
    the best validation loss so far ("members 1/5 done, epochs 12 14 9 11 of <=60, best val loss -3.214")."""
    if folder is None or not Path(folder).is_dir():
        return None
    recs = []
    for f in sorted(Path(folder).glob("member-*.json")):
        try:
            recs.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    if not recs:
        return None
    recs.sort(key=lambda r: r["member"])
    running = [r for r in recs if not r.get("done")]
    text = f"members {len(recs) - len(running)}/{members or len(recs)} done"
    for phase, what, bound in (("pretrain", "pre-training epoch", ""), ("train", "epoch", "<=")):
        now = [r for r in running if r.get("phase", "train") == phase]
        if now:
            text += (f", {what}" + ("s " if len(now) > 1 else " ") + " ".join(str(r["epoch"] + 1) for r in now)
                     + f" of {bound}{now[0]['max_epochs']}")
    best = [r["best_val_loss"] for r in recs if "best_val_loss" in r]
    return text + (f", best val loss {min(best):.3f}" if best else "")


def train_member(features_root: str, cfg: ModelConfig, labels: list[str], stats: dict, index: int,
                 seed: int, threads: int | None = None, device: str = "auto", progress: str | None = None) -> Member:
    """Train one member with Adam on the Gaussian NLL, early-stopped on the validation split; returns the
    weights of its best epoch.

    Deterministic for a given ``seed`` (deterministic torch kernels; the block dropout draws from its own
    generator), so a rerun or another executor gives the same member. ``threads`` caps torch's CPU
    threads; ``device`` is the :func:`stellar.devices.pick_device` preference; ``progress``: a folder for
    the per-epoch record the driver's progress line reads (:func:`write_member_progress`)."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    make_deterministic(dev)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7919)  # the block-dropout draws: their own stream
    snr_gen = torch.Generator().manual_seed(seed + 104729)  # the S/N augmentation's draws: another
    snr_q = (torch.from_numpy(catalogue_snr_quantiles(features_root)) if cfg.snr_augment > 0 else None)
    dropout = {k: v for k, v in cfg.input_dropout.items() if v > 0}
    net = build_net(cfg, stats, labels).to(dev)
    pre_losses: list[float] = []
    pre_seconds = 0.0
    if cfg.pretrain_epochs > 0:  # stellar.pretrain: learn the inputs' structure from the unlabelled catalogue
        from stellar.pretrain import pretrain

        def pre_progress(epoch: int, loss: float) -> None:
            write_member_progress(progress, index, {"member": index, "phase": "pretrain", "epoch": epoch,
                                                    "max_epochs": cfg.pretrain_epochs, "pretrain_loss": loss,
                                                    "done": False, "seconds": round(time.perf_counter() - t0, 1)})

        pre_losses = pretrain(net, features_root, stats, cfg.pretrain_epochs, cfg.batch_size, cfg.learning_rate,
                              seed, dev, cfg.pretrain_span, on_epoch=pre_progress)
        pre_seconds = time.perf_counter() - t0
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.lr_factor, patience=cfg.lr_patience,
                                                          threshold=1e-5, threshold_mode="abs")
               if cfg.lr_factor < 1 else None)
    train = FeatureDataset(features_root, split="train", batch_size=cfg.batch_size, shuffle=True, seed=seed,
                           labels=labels, stats=stats)
    val = load_split(features_root, "validation", labels, stats)
    weight_of = None
    if cfg.label_balance > 0 or cfg.catalogue_weight > 0:
        ids, y = split_labels(features_root, "train", labels, stats)
        w = np.ones(len(ids))
        if cfg.label_balance > 0:  # stellar.balance: flatten the label density the loss sees
            w = w * label_density_weights(y, cfg.label_balance, cfg.label_balance_cap)
        if cfg.catalogue_weight > 0:  # stellar.shift: the catalogue's mix of stars, not the label set's
            sid, ws = catalogue_shift_weights(features_root, cfg.catalogue_weight, cfg.catalogue_weight_cap)
            w = w * weight_lookup(sid, ws)(ids)
        weight_of = weight_lookup(ids, w / w.mean())
    best, best_state, best_epoch, bad = np.inf, None, -1, 0
    history = []
    averaged = None
    if cfg.weight_average > 0:  # the weights' moving average: what is validated and kept
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.weight_average), use_buffers=True)
    for epoch in range(cfg.max_epochs):
        train.set_epoch(epoch)
        net.train()
        total, n = 0.0, 0
        for b in train:
            if dropout:  # blank whole input blocks as preprocess blanks missing ones (stellar.trust.drop_blocks)
                drop_blocks(b["xp"], b["scalars"], dropout, stats, gen)
            if snr_q is not None:  # stellar.augment: some spectra at the catalogue's S/N
                degrade_spectra(b["spectrum"], b["spectrum_error"], b["snr"], snr_q, cfg.snr_augment, snr_gen)
            w = torch.from_numpy(weight_of(b["source_id"].numpy())).to(dev) if weight_of else None
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            mean, log_var, heads = net.forward_with_branches(*(b[k] for k in INPUTS))
            loss = gaussian_nll(mean, log_var, b["labels"], b["label_err"], w, cfg.nll_beta)
            if heads:  # ModelConfig.branch_loss: the branch heads' mean NLL beside the joint head's
                loss = loss + cfg.branch_loss * torch.stack(
                    [gaussian_nll(m, lv, b["labels"], b["label_err"], w, cfg.nll_beta) for m, lv in heads]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if averaged is not None:
                averaged.update_parameters(net)
            total += float(loss.detach()) * len(b["source_id"])
            n += len(b["source_id"])
        net.eval()
        judged = net if averaged is None else averaged.module
        judged.eval()
        mean, log_var = _forward_chunks(judged, val)
        val_loss = float(gaussian_nll(mean, log_var, val["labels"], val["label_err"]))
        # each label's own validation NLL: where each would have stopped (one stopping point serves all)
        by_label = {k: float(gaussian_nll(mean[:, i:i + 1], log_var[:, i:i + 1], val["labels"][:, i:i + 1],
                                          val["label_err"][:, i:i + 1])) for i, k in enumerate(labels)}
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                        "val_loss_by_label": by_label, "learning_rate": opt.param_groups[0]["lr"]})
        if plateau is not None:  # ModelConfig.lr_factor: a smaller step once the validation loss stalls
            plateau.step(val_loss)
        if val_loss < best - 1e-5:
            best, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in judged.state_dict().items()}
        else:
            bad += 1
        stop = bad >= cfg.patience or epoch + 1 == cfg.max_epochs
        write_member_progress(progress, index, {"member": index, "epoch": epoch, "max_epochs": cfg.max_epochs,
                                                "val_loss": val_loss, "best_val_loss": best, "best_epoch": best_epoch,
                                                "done": stop,
                                                "seconds": round(time.perf_counter() - t0, 1)})
        if stop:
            break
    return Member(index, seed, st_save(best_state), best_epoch, best, history, time.perf_counter() - t0, str(dev),
                  pre_losses, pre_seconds)


def outlier_members(losses: list[float], n_mad: float = 3.0) -> list[int]:
    """Members whose best validation loss is above median + n_mad * 1.4826 * MAD (the recorded rule)."""
    x = np.asarray(losses, dtype=float)
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    limit = med + n_mad * max(mad, 1e-3 * abs(med) + 1e-6)
    return [i for i, v in enumerate(x) if v > limit]


# The calibration factor is a smooth function of S/N, log c = a + b t + q t^2 with t = log(S/N / pivot),
# per label: three numbers fitted on all validation stars (bins of ~100 stars each would leave the
# factors noisy, and a step at a bin edge is not physical). t is clipped to the validation stars' 2-98 %
# range, so the factor never extrapolates beyond the S/N the fit saw. The curvature is there because a
# straight line in log S/N measurably could not fit the middle and both ends at once: on the demo and the
# hard survey, every label's z-score spread was 0.02-0.13 lower at S/N 25-50 than at 15-25 and > 50.
CALIBRATION_PIVOT_SNR = 30.0
# The curvature q has a Gaussian prior N(0, CALIBRATION_CURVATURE_PRIOR^2): over the 2-98 % range of t
# (about 2.5 wide) q = 0.1 already moves the factor by ~15 %, so a few hundred stars cannot bend it far.
CALIBRATION_CURVATURE_PRIOR = 0.1
CALIBRATION_SLOPES = np.round(np.arange(-1.5, 1.5001, 0.01), 2)  # the slope b is chosen on this grid
MIN_CALIBRATION_STARS = 30  # fewer validation stars with a label: one factor, no slope


def _calibration_factor(r: np.ndarray, s: np.ndarray, e: np.ndarray, w: np.ndarray | None = None) -> float:
    """c such that the (``w``-weighted) mean of r^2 / (c^2 s^2 + e^2) is 1 (bisection: monotone in c)."""
    w = np.ones(len(r)) if w is None else np.asarray(w, dtype=np.float64)
    w = w / w.sum()
    lo, hi = 1e-3, 1e3
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite sigma only means "c too large"
        for _ in range(60):
            c = np.sqrt(lo * hi)
            if np.sum(w * r**2 / (c**2 * s**2 + e**2)) > 1:
                lo = c
            else:
                hi = c
    return float(np.sqrt(lo * hi))


def fit_snr_calibration(r: np.ndarray, s: np.ndarray, e: np.ndarray, t: np.ndarray,
                        w: np.ndarray | None = None) -> tuple[float, float]:
    """(a, b) of c(t) = exp(a + b t) for residuals ``r``, predicted sigmas ``s``, label errors ``e`` and
    clipped log-S/N ``t``: for each slope on :data:`CALIBRATION_SLOPES`, the ``a`` that makes the
    z-scores' (``w``-weighted) mean square exactly 1, and of those the (a, b) of the highest Gaussian
    likelihood. Deterministic (a grid and bisections, no optimiser state)."""
    w = np.ones(len(r)) if w is None else np.asarray(w, dtype=np.float64)
    best = (-np.inf, 0.0, 0.0)
    for b in CALIBRATION_SLOPES:
        g = np.exp(b * t)
        a = np.log(_calibration_factor(r, s * g, e, w))
        var = (np.exp(a) * g * s) ** 2 + e**2
        loglike = -0.5 * float(np.sum(w * (np.log(var) + r**2 / var)))
        if loglike > best[0] + 1e-9:
            best = (loglike, float(a), float(b))
    return best[1], best[2]


# The factor also depends on the star's predicted labels: log c = a + b t + g . [u, u^2], with u the
# predicted normalised labels clipped to the fit stars' 2-98 % range (the square lets a factor differ
# between the two ends of a label, dwarfs and giants, without a compromise through the middle). A label survey's stars are not
# the catalogue's mix (APOGEE-like label sets are mostly giants, a magnitude-limited catalogue is
# 40 % dwarfs), and the raw sigmas are too large for some kinds of star and right for others; a
# factor conditional on the kind of star transfers to another mix, a marginal one does not.
# g has a Gaussian prior N(0, CALIBRATION_LABEL_PRIOR^2) so that few stars cannot push it far.
CALIBRATION_LABEL_PRIOR = 0.3
# Which predicted labels say what kind of star it is (its place in the Kiel diagram); the abundance
# labels are left out: their tails are where the biases live, and a factor fitted there on a few
# hundred stars follows those few stars.
CALIBRATION_COVARIATES = ("teff", "logg")
# The kind-of-star terms may move a factor at most this much (log) from the S/N-only one: a quadratic is
# poorly held near the edges of the fit stars' range, and a factor of 0.2 there would publish errors 5x
# too small for exactly the stars at the edge of the grid.
CALIBRATION_LABEL_MAX_LOG = float(np.log(2.0))
MIN_LABEL_CALIBRATION_STARS = 200  # fewer: the S/N-only factor


def label_terms(mu_norm: np.ndarray, label_range: np.ndarray) -> np.ndarray:
    """(N, L) normalised predicted labels -> the calibration's (N, 2L) covariates [u, u^2], u clipped
    to ``label_range`` (L, 2) so the factor never extrapolates."""
    u = np.clip(np.asarray(mu_norm, dtype=np.float64), label_range[:, 0], label_range[:, 1])
    return np.concatenate([u, u**2], axis=1)


def fit_label_calibration(r: np.ndarray, s: np.ndarray, e: np.ndarray, t: np.ndarray, u: np.ndarray,
                          prior: float = CALIBRATION_LABEL_PRIOR,
                          curvature_prior: float = CALIBRATION_CURVATURE_PRIOR,
                          w: np.ndarray | None = None, floor: float = 0.0
                          ) -> tuple[float, float, float, np.ndarray, np.ndarray]:
    """(a, b, q, g, h) of the calibrated variance (c s)^2 + (f k)^2, c = exp(a + b t + q t^2 + g . u) and,
    for an error floor ``floor`` = f > 0, k = exp(h . u), by maximum (penalised) Gaussian likelihood of
    the residuals (label variance e^2 added), started from the S/N-only straight line; ``a`` is then set
    so the z-scores' mean square is exactly 1. Without a floor h is 0.

    Args:
        r, s, e: residuals, raw predicted sigmas, label errors (N,).
        t: clipped log(S/N / pivot) (N,).
        u: (N, K) covariates of the predicted labels (:func:`label_terms`); K may be 0.
        prior, curvature_prior: the Gaussian priors' widths on g and on q (h: :data:`CALIBRATION_FLOOR_PRIOR`).
        w: (N,) weights of the stars (None: equal): a star of weight 2 counts as that star twice
            (:func:`stellar.train.calibration_stars` gives each of a star's k faint copies 1 / k).
        floor: the floor f (the units of ``s``); 0: none.
    """
    from scipy.optimize import minimize

    w = np.ones(len(r)) if w is None else np.asarray(w, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64).reshape(len(r), -1)
    K = u.shape[1]
    kf = K if floor > 0 else 0  # the floor's own kind terms, only where there is a floor
    a0, b0 = fit_snr_calibration(r, s, np.sqrt(e**2 + floor**2), t, w)
    X = np.column_stack([np.ones(len(r)), t, t**2, u])
    s2, e2, r2, f2 = s**2, e**2, r**2, float(floor) ** 2
    pen = np.r_[0.0, 0.0, 1.0 / curvature_prior**2, np.full(K, 1.0 / prior**2),
                np.full(kf, 1.0 / CALIBRATION_FLOOR_PRIOR**2)]

    def nll(beta):
        # The line search may try steps whose factor overflows (with an error floor that explains the
        # residuals the likelihood is flat as c -> 0): such a step is infinitely unlikely, not an error.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            c2 = np.exp(2.0 * (X @ beta[:3 + K]))
            F2 = f2 * np.exp(2.0 * (u @ beta[3 + K:])) if kf else np.full(len(r), f2)
            var = c2 * s2 + F2 + e2
            f = 0.5 * np.sum(w * (np.log(var) + r2 / var)) + 0.5 * np.sum(pen * beta**2)
            dnll = 0.5 * w * (1.0 / var - r2 / var**2)  # d nll / d var
            grad = np.r_[X.T @ (dnll * 2.0 * c2 * s2), u.T @ (dnll * 2.0 * F2) if kf else np.zeros(0)] + pen * beta
        if not (np.isfinite(f) and np.all(np.isfinite(grad))):
            return np.inf, np.zeros_like(beta)
        return f, grad

    beta0 = np.r_[a0, b0, 0.0, np.zeros(K + kf)]
    res = minimize(nll, beta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    beta = res.x if np.all(np.isfinite(res.x)) and res.fun <= nll(beta0)[0] else beta0
    g, h = np.asarray(beta[3:3 + K], dtype=float), (np.asarray(beta[3 + K:], dtype=float) if kf else np.zeros(K))
    fac = np.exp(beta[1] * t + beta[2] * t**2 + np.clip(u @ g, -CALIBRATION_LABEL_MAX_LOG, CALIBRATION_LABEL_MAX_LOG))
    ef = np.sqrt(e2 + f2 * floor_scale(u, h) ** 2)
    a = np.log(_calibration_factor(r, s * fac, ef, w))
    return float(a), float(beta[1]), float(beta[2]), g, h


def floor_scale(u: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The error floor's kind-of-star factor exp(clip(h . u)) for covariates ``u`` (N, K): (N,) for one
    label's ``h`` (K,), (N, L) for every label's (L, K)."""
    h = np.asarray(h, dtype=np.float64)
    if h.shape[-1] == 0:
        return np.ones((np.asarray(u).shape[0], *h.shape[:-1]))
    u = np.asarray(u, dtype=np.float64).reshape(-1, h.shape[-1])
    return np.exp(np.clip(u @ h.T, -CALIBRATION_FLOOR_MAX_LOG, CALIBRATION_FLOOR_MAX_LOG))


# An error floor in quadrature, sigma' = sqrt((c sigma)^2 + f^2): the network's sigma shrinks with S/N
# faster than its errors do. On the demo the giants' log g errors above S/N 50 stayed at 0.06-0.08 dex
# whatever sigma said (z-score spread 1.44 among the fifth with the smallest sigma, 1.04 among the
# largest), and a factor of S/N and kind of star cannot lift the small sigmas alone. For a floor f the
# factor c is fitted as if f^2 were more label variance (it adds to the residuals' variance alike); f is
# chosen per label on this grid (times the fit stars' median raw sigma) by the Gaussian likelihood of
# the same residuals. 0 (no floor) is on it, so a label whose errors follow its sigma keeps none.
CALIBRATION_FLOORS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
# The floor has a kind-of-star factor of its own, f exp(h . u) with u the same predicted-label covariates
# as the factor's: a network's systematic error is not the same for every kind of star, and one floor
# for all, set by the giants (most of a label set), is larger than a dwarf's whole error. Hard survey,
# log g at S/N > 50: the giants' floor made the dwarfs' published errors 0.042 dex against errors of
# 0.028 (z-score spread 0.59 for dwarfs, 1.04 for giants); with the floor's own kind terms the likelihood
# of the validation stars rises and the catalogue's dwarfs and giants come out alike. h has a Gaussian
# prior N(0, CALIBRATION_FLOOR_PRIOR^2) and moves the floor at most CALIBRATION_FLOOR_MAX_LOG either way
# (a floor is a small part of a large error and a large part of a small one, so it may move further
# than the factor).
CALIBRATION_FLOOR_PRIOR = 0.5
CALIBRATION_FLOOR_MAX_LOG = float(np.log(4.0))


def calibration_nll(r: np.ndarray, s: np.ndarray, e: np.ndarray, t: np.ndarray, u: np.ndarray,
                    coef: tuple, w: np.ndarray | None = None, floor: float = 0.0) -> float:
    """The (``w``-weighted) Gaussian negative log-likelihood of residuals ``r`` under the calibrated
    variance (c s)^2 + (f k)^2 + e^2 as the ensemble applies it: c = exp(a + b t + q t^2 + clip(g . u)),
    k = :func:`floor_scale` (``coef`` = (a, b, q, g[, h]); f = ``floor``)."""
    a, b, q, g = coef[:4]
    w = np.ones(len(r)) if w is None else np.asarray(w, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64).reshape(len(r), -1)
    lab = np.clip(u @ np.asarray(g, dtype=np.float64), -CALIBRATION_LABEL_MAX_LOG, CALIBRATION_LABEL_MAX_LOG) \
        if u.shape[1] else 0.0
    fk = floor * floor_scale(u, coef[4]) if len(coef) > 4 and u.shape[1] else floor
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        var = (np.exp(a + b * t + q * t * t + lab) * s) ** 2 + fk**2 + e**2
        nll = float(0.5 * np.sum(w * (np.log(var) + r**2 / var)))
    return nll if np.isfinite(nll) else np.inf


def fit_calibration_with_floor(r: np.ndarray, s: np.ndarray, e: np.ndarray, t: np.ndarray, u: np.ndarray,
                               w: np.ndarray | None = None
                               ) -> tuple[float, float, float, np.ndarray, float, np.ndarray]:
    """(a, b, q, g, f, h): :func:`fit_label_calibration` for each floor f of :data:`CALIBRATION_FLOORS`
    (times median s), and of those the fit of the highest likelihood. The published sigma is then
    sqrt((c s)^2 + (f exp(clip(h . u)))^2)."""
    med = float(np.median(s)) if len(s) else 0.0
    best = None
    for k in CALIBRATION_FLOORS:
        f = k * med
        coef = fit_label_calibration(r, s, e, t, u, w=w, floor=f)
        nll = calibration_nll(r, s, e, t, u, coef, w, floor=f)
        if best is None or nll < best[0] - 1e-9:
            best = (nll, (*coef[:4], f, coef[4]))
    return best[1]


# The mean correction: the members' mean is pulled toward the dense middle of the training labels at the
# edges of the label set (regularisation and dropout attenuate; the demo's dwarfs came out 0.04 dex low in
# log g at a scatter of 0.03, its lowest-gravity giants 0.1 high, on validation and test stars alike), and a
# bias the size of the scatter leaves the z-scores of those stars off-centre whatever the uncertainty.
# Per label, mu' = mu + delta(u), delta a quadratic in the star's predicted kind (teff, logg), u clipped to
# the fit stars' 2-98 % range (never extrapolated), fitted on the validation stars' catalogue labels (their
# noise is unbiased, so E[label - mu | mu] is the bias) by a Huber-weighted least squares. A label keeps
# its correction only where a 2-fold cross-validation over the validation stars says it lowers their
# residuals; otherwise it gets none. The label's own predicted value is not a covariate: an abundance's
# fitted stretch, right for the validation stars (brighter than the catalogue), amplified the noise of
# fainter ones (hard survey, [M/H] at S/N 25-50: RMSE +2.7 %); the kind of star moved no label's RMSE up.
MEAN_CORRECTION_COVARIATES = ("teff", "logg")
MEAN_CORRECTION_PRIOR = 0.1  # Gaussian prior width of each coefficient (normalised label units)
MEAN_CORRECTION_MAX = 0.5  # the correction never moves a label more than this (normalised) from the mean
MEAN_CORRECTION_HUBER = 2.0  # residuals beyond this many sigma count linearly (catalogue outliers)
MIN_MEAN_CORRECTION_STARS = 200  # fewer validation stars with a label: no correction


def mean_terms(mu_norm: np.ndarray, label_range: np.ndarray) -> np.ndarray:
    """(N, L) normalised predicted labels -> the mean correction's (N, 1 + 2L) design [1, u, u^2], u clipped to
    ``label_range`` (L, 2)."""
    u = label_terms(mu_norm, label_range)
    return np.concatenate([np.ones((len(u), 1)), u], axis=1)


def _huber_fit(X: np.ndarray, d: np.ndarray, w: np.ndarray, prior: float) -> np.ndarray:
    """Coefficients of d ~ X beta, weights ``w`` (1 / variance), Huber-reweighted (iteratively), with a
    Gaussian prior N(0, prior^2) on every coefficient."""
    pen = np.eye(X.shape[1]) / prior**2
    beta = np.zeros(X.shape[1])
    for _ in range(8):
        z = (d - X @ beta) * np.sqrt(w)
        ww = w * np.minimum(1.0, MEAN_CORRECTION_HUBER / np.maximum(np.abs(z), 1e-12))
        beta = np.linalg.solve(X.T @ (ww[:, None] * X) + pen, X.T @ (ww * d))
    return beta


def _huber_loss(res: np.ndarray, w: np.ndarray) -> float:
    z = np.abs(res) * np.sqrt(w)
    k = MEAN_CORRECTION_HUBER
    return float(np.sum(np.where(z <= k, 0.5 * z**2, k * z - 0.5 * k**2)))


def fit_mean_correction(d: np.ndarray, w: np.ndarray, X: np.ndarray, fold: np.ndarray,
                        prior: float = MEAN_CORRECTION_PRIOR) -> np.ndarray:
    """The correction's coefficients (X's columns) for residuals ``d`` = label - mu with weights ``w``, or
    zeros where the 2-fold cross-validation (``fold``: a boolean split of the stars) finds that the fitted
    correction does not lower the held-out Huber loss."""
    cv_fit, cv_none = 0.0, 0.0
    for f in (fold, ~fold):
        beta = _huber_fit(X[~f], d[~f], w[~f], prior)
        shift = np.clip(X[f] @ beta, -MEAN_CORRECTION_MAX, MEAN_CORRECTION_MAX)
        cv_fit += _huber_loss(d[f] - shift, w[f])
        cv_none += _huber_loss(d[f], w[f])
    return _huber_fit(X, d, w, prior) if cv_fit < cv_none else np.zeros(X.shape[1])


class Ensemble:
    """Members + normalisation + calibration + trust thresholds: everything needed to predict,
    loadable without pickle.

    The uncertainty calibration is a factor per label that varies smoothly with S/N and with the
    star's predicted labels (:func:`fit_label_calibration`): one factor per label cannot fit both
    S/N ends (at high S/N the raw spread is too large, at low S/N about right), nor dwarfs and giants
    when the label set and the catalogue mix them differently. ``calibration`` keeps the all-S/N
    factor, used where no S/N is given.
    """

    def __init__(self, cfg: ModelConfig, labels: list[str], stats: dict, weights: list[bytes],
                 calibration: np.ndarray | None = None, meta: dict | None = None,
                 snr_calibration: dict | None = None, trust: TrustThresholds | None = None,
                 emulator: SpectrumEmulator | None = None, selection_map: MapReference | None = None,
                 mean_correction: dict | None = None):
        self.cfg = cfg
        self.labels = list(labels)
        self.stats = stats
        self.weights = list(weights)
        self.calibration = np.ones(len(labels)) if calibration is None else np.asarray(calibration, dtype=float)
        sc = snr_calibration or {}
        # log c = a + b t + q t^2, t = clip(log(S/N / pivot), t_lo, t_hi), per label; without it, the
        # all-S/N factor. Models calibrated before the curvature term store (a, b): q = 0.
        coef = np.asarray(sc.get("coef", np.c_[np.log(self.calibration), np.zeros(len(labels))]),
                          dtype=float).reshape(len(labels), -1)
        self.snr_coef = np.zeros((len(labels), 3))
        self.snr_coef[:, :coef.shape[1]] = coef[:, :3]
        self.snr_pivot = float(sc.get("pivot", CALIBRATION_PIVOT_SNR))
        self.snr_t_range = tuple(float(v) for v in sc.get("t_range", (0.0, 0.0)))
        # the predicted-label terms (fit_label_calibration); absent in models trained before them
        self.label_coef = np.asarray(sc.get("label_coef", np.zeros((len(labels), 2 * len(labels)))),
                                     dtype=float).reshape(len(labels), 2 * len(labels))
        self.label_range = np.asarray(sc.get("label_range", np.zeros((len(labels), 2))),
                                      dtype=float).reshape(len(labels), 2)
        # the error floor per label (normalised units; fit_calibration_with_floor); absent before it: none
        self.sigma_floor = np.asarray(sc.get("floor", np.zeros(len(labels))), dtype=float).reshape(len(labels))
        # the floor's kind-of-star terms (CALIBRATION_FLOOR_PRIOR); absent before them: one floor for all
        self.floor_coef = np.asarray(sc.get("floor_coef", np.zeros((len(labels), 2 * len(labels)))),
                                     dtype=float).reshape(len(labels), 2 * len(labels))
        # the mean correction (fit_mean_correction); absent in models trained before it: none
        mc = mean_correction or {}
        self.mean_coef = np.asarray(mc.get("coef", np.zeros((len(labels), 1 + 2 * len(labels)))),
                                    dtype=float).reshape(len(labels), 1 + 2 * len(labels))
        self.mean_range = np.asarray(mc.get("label_range", np.zeros((len(labels), 2))),
                                     dtype=float).reshape(len(labels), 2)
        self._bounds = label_bounds(stats, list(labels), cfg.output_margin)
        self.trust = trust
        self.emulator = emulator
        # the training run's selection map (stellar.mapping): train_like for stars of any survey
        self.selection_map = selection_map
        self.meta = dict(meta or {})
        idx = [stats["label_names"].index(k) for k in self.labels]
        self.label_mean = np.asarray(stats["labels"]["mean"])[idx]
        self.label_std = np.asarray(stats["labels"]["std"])[idx]
        self.nets = []
        for w in self.weights:
            net = build_net(cfg, stats, self.labels)
            net.load_state_dict(st_load(w))
            net.eval()
            self.nets.append(net)

    def to(self, device: str | torch.device) -> "Ensemble":
        """Move every member network to ``device``; returns the ensemble."""
        for net in self.nets:
            net.to(device)
        return self

    def predict_normalised(self, data: dict[str, torch.Tensor], chunk: int = 256):
        """Per member means and variances (normalised units): (M, N, L) each."""
        device = next(self.nets[0].parameters()).device
        means, variances = forward_members(self.nets, data, device, chunk)
        return means.astype(np.float64), variances.astype(np.float64)

    def predict(self, data: dict[str, torch.Tensor], calibrated: bool = True) -> dict[str, np.ndarray]:
        """Physical means and uncertainties of ``data`` (:meth:`combine`), calibrated at each star's S/N when
        ``data`` has ``snr``."""
        means, variances = self.predict_normalised(data)
        snr = data["snr"].numpy() if "snr" in data else None
        return self.combine(means, variances, calibrated, snr)

    def snr_term(self, snr: np.ndarray) -> np.ndarray:
        """The clipped log(S/N / pivot) the calibration is a function of (unknown S/N: the pivot)."""
        snr = np.asarray(snr, dtype=np.float64)
        t = np.log(np.where(np.isfinite(snr) & (snr > 0), snr, self.snr_pivot) / self.snr_pivot)
        return np.clip(t, *self.snr_t_range)

    def factors(self, snr: np.ndarray | None, n: int, mu_norm: np.ndarray | None = None) -> np.ndarray:
        """(N, L) calibration factors at each star's S/N and (``mu_norm``, (N, L) normalised) predicted
        labels; the all-S/N factor where no S/N is given."""
        if snr is None:
            return np.broadcast_to(self.calibration, (n, len(self.labels)))
        t = self.snr_term(snr)
        log_c = np.stack([np.ones_like(t), t, t**2], axis=1) @ self.snr_coef.T  # a + b t + q t^2, (N, L)
        if mu_norm is not None and np.any(self.label_coef):
            log_c = log_c + np.clip(label_terms(mu_norm, self.label_range) @ self.label_coef.T,
                                    -CALIBRATION_LABEL_MAX_LOG, CALIBRATION_LABEL_MAX_LOG)
        return np.exp(log_c)

    def correct_mean(self, mu_norm: np.ndarray) -> np.ndarray:
        """The members' mean (N, L, normalised) with the mean correction added (:func:`fit_mean_correction`),
        kept inside the network's output bounds; unchanged where the model has no correction."""
        if not np.any(self.mean_coef):
            return mu_norm
        shift = np.clip(mean_terms(mu_norm, self.mean_range) @ self.mean_coef.T,
                        -MEAN_CORRECTION_MAX, MEAN_CORRECTION_MAX)
        b = self._bounds
        return bound_outputs(mu_norm + shift, b["lo"], b["hi"], b["m_lo"], b["m_hi"])

    def fit_mean_correction(self, data: dict[str, torch.Tensor]) -> np.ndarray:
        """The mean correction from held-out (validation) stars' catalogue labels (:func:`fit_mean_correction`,
        one label at a time, covariates the predicted :data:`MEAN_CORRECTION_COVARIATES`); replaces any
        earlier one. Run before the trust thresholds and the calibration, which see the corrected labels.
        Returns the (L, 1 + 2L) coefficients."""
        L = len(self.labels)
        self.mean_coef = np.zeros((L, 1 + 2 * L))
        pred = self.predict(data, calibrated=False)
        mu = (np.asarray(pred["mean"], dtype=np.float64) - self.label_mean) / self.label_std
        y = data["labels"].numpy().astype(np.float64)
        e = np.nan_to_num(data["label_err"].numpy().astype(np.float64))
        fold = split_hash(data["source_id"].numpy(), 31) < 0.5
        coef = np.zeros((L, 1 + 2 * L))
        span = (np.quantile(mu, [0.02, 0.98], axis=0).T if len(mu) >= MIN_MEAN_CORRECTION_STARS
                else np.zeros((L, 2)))
        X = mean_terms(mu, span)
        which = [i for i, k in enumerate(self.labels) if k in MEAN_CORRECTION_COVARIATES]
        cols = [0] + [1 + i for i in which] + [1 + L + i for i in which]
        for j in range(L if which else 0):
            ok = np.isfinite(y[:, j])
            if ok.sum() < MIN_MEAN_CORRECTION_STARS:
                continue
            w = 1.0 / (pred["sigma_norm"][ok, j] ** 2 + e[ok, j] ** 2)
            coef[j, cols] = fit_mean_correction(y[ok, j] - mu[ok, j], w, X[ok][:, cols], fold[ok])
        self.mean_coef, self.mean_range = coef, np.asarray(span, dtype=float)
        return coef

    def snr_calibration(self) -> dict:
        """The calibration's S/N and predicted-label terms as a JSON-able dict: ``snr_calibration`` in
        ``ensemble.json``, read back by the constructor."""
        return {"kind": "logquadratic_labels", "pivot": self.snr_pivot, "t_range": list(self.snr_t_range),
                "coef": self.snr_coef.tolist(), "label_coef": self.label_coef.tolist(),
                "label_range": self.label_range.tolist(), "floor": self.sigma_floor.tolist(),
                "floor_coef": self.floor_coef.tolist()}

    def combine(self, means: np.ndarray, variances: np.ndarray, calibrated: bool = True,
                snr: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Members' normalised (M, N, L) means and variances -> physical mean and uncertainties.

        ``epistemic_norm`` (the members' spread in normalised units) feeds the disagreement test."""
        means = np.asarray(means, dtype=np.float64)
        variances = np.asarray(variances, dtype=np.float64)
        mu = self.correct_mean(means.mean(axis=0))
        aleatoric = variances.mean(axis=0)
        epistemic = means.var(axis=0)
        sigma = np.sqrt(aleatoric + epistemic)
        sigma_norm = sigma
        if calibrated:
            sigma = sigma * self.factors(snr, mu.shape[0], mu)
            if np.any(self.sigma_floor):
                floor = self.sigma_floor
                if np.any(self.floor_coef):  # the floor's kind-of-star factor, per label
                    floor = floor * floor_scale(label_terms(mu, self.label_range), self.floor_coef)
                sigma = np.sqrt(sigma**2 + floor**2)
        return {"mean": mu * self.label_std + self.label_mean, "sigma": sigma * self.label_std,
                "sigma_aleatoric": np.sqrt(aleatoric) * self.label_std,
                "sigma_epistemic": np.sqrt(epistemic) * self.label_std, "epistemic_norm": np.sqrt(epistemic),
                "sigma_norm": sigma_norm}

    def calibrate(self, data: dict[str, torch.Tensor], keep: np.ndarray | None = None,
                  weights: np.ndarray | None = None, copy: np.ndarray | None = None) -> np.ndarray:
        """Per-label calibration on held-out stars: the all-S/N factor making the z-scores' mean square
        1 (label noise included), and the smooth S/N dependence (:func:`fit_snr_calibration`).

        ``keep``: the stars to fit on (default all) -- the trainer passes those the trust tests do not
        flag, because the published uncertainties are meant for the stars users keep. ``weights``: each
        star's weight in the fits (default 1). ``copy``: the rows that are fainter copies of validation
        stars (:func:`stellar.train.calibration_stars`); the S/N and predicted-label ranges the factor is
        clipped to come from the real stars alone. Returns the all-S/N factors."""
        pred = self.predict(data, calibrated=False)
        truth, err = self.physical_labels(data)
        keep = np.ones(len(truth), bool) if keep is None else np.asarray(keep, bool)
        copy = np.zeros(len(truth), bool) if copy is None else np.asarray(copy, bool)
        real = keep & ~copy
        snr = data["snr"].numpy().astype(np.float64)
        t_all = np.log(np.where(np.isfinite(snr) & (snr > 0), snr, CALIBRATION_PIVOT_SNR) / CALIBRATION_PIVOT_SNR)
        lo, hi = (np.quantile(t_all[real], [0.02, 0.98]) if real.sum() >= MIN_CALIBRATION_STARS else (0.0, 0.0))
        t = np.clip(t_all, lo, hi)
        L = len(self.labels)
        overall, coef = [], np.zeros((L, 3))
        u_all = (np.asarray(pred["mean"], dtype=np.float64) - self.label_mean) / self.label_std
        label_range = (np.quantile(u_all[real], [0.02, 0.98], axis=0).T if real.sum() >= MIN_CALIBRATION_STARS
                       else np.zeros((L, 2)))
        u = label_terms(u_all, label_range)
        cov = np.array([k in CALIBRATION_COVARIATES for k in self.labels] * 2)
        w_all = np.ones(len(truth)) if weights is None else np.asarray(weights, dtype=np.float64)
        label_coef = np.zeros((L, 2 * L))
        floor, floor_coef = np.zeros(L), np.zeros((L, 2 * L))
        for j in range(L):
            ok = keep & np.isfinite(truth[:, j])
            s, e = pred["sigma"][:, j], np.nan_to_num(err[:, j])
            r = pred["mean"][:, j] - truth[:, j]
            if ok.sum() == 0:
                overall.append(1.0)
                continue
            overall.append(_calibration_factor(r[ok], s[ok], e[ok], w_all[ok]))
            if ok.sum() >= MIN_LABEL_CALIBRATION_STARS:
                a, b, q, g, f, h = fit_calibration_with_floor(r[ok], s[ok], e[ok], t[ok], u[ok][:, cov], w=w_all[ok])
                coef[j], label_coef[j, cov], floor[j], floor_coef[j, cov] = (a, b, q), g, f / self.label_std[j], h
                if f > 0:  # the all-S/N factor (stars without an S/N) on the floored sigmas too
                    fk = f * floor_scale(u[ok][:, cov], h)
                    overall[-1] = _calibration_factor(r[ok], s[ok], np.sqrt(e[ok] ** 2 + fk**2), w_all[ok])
            elif ok.sum() >= MIN_CALIBRATION_STARS:
                coef[j] = (*fit_snr_calibration(r[ok], s[ok], e[ok], t[ok], w_all[ok]), 0.0)
            else:
                coef[j] = (np.log(overall[-1]), 0.0, 0.0)
        self.calibration = np.asarray(overall)
        self.snr_coef = coef
        self.snr_pivot = CALIBRATION_PIVOT_SNR
        self.snr_t_range = (float(lo), float(hi))
        self.label_coef, self.label_range = label_coef, np.asarray(label_range, dtype=float)
        self.sigma_floor, self.floor_coef = floor, floor_coef
        return self.calibration

    def fit_emulator(self, data: dict[str, torch.Tensor], window: np.ndarray) -> SpectrumEmulator:
        """The label-to-spectrum emulator on training stars (their catalogue labels, normalised)."""
        self.emulator = SpectrumEmulator.fit(data["labels"].numpy(), data["spectrum"].numpy(),
                                             data["spectrum_error"].numpy(), data["spectrum_mask"].numpy(), window)
        return self.emulator

    def noise_excess(self, data: dict[str, torch.Tensor]) -> tuple[float, float]:
        """How the spectra's noise departs from their quoted errors (:func:`stellar.augment.spectrum_noise_excess`),
        from the residuals of ``data``'s stars (a held-out split) against the emulator at their catalogue
        labels; (1, 0) without an emulator or labels."""
        if self.emulator is None or "labels" not in data:
            return 1.0, 0.0
        z = data["labels"].numpy().astype(np.float64)
        ok = np.all(np.isfinite(z), axis=1)
        if ok.sum() == 0:
            return 1.0, 0.0
        model = self.emulator.model(z[ok])
        return spectrum_noise_excess(data["spectrum"].numpy()[ok].astype(np.float64),
                                     data["spectrum_error"].numpy()[ok].astype(np.float64),
                                     data["spectrum_mask"].numpy()[ok], model)

    def consistency(self, mean: np.ndarray,
                    data: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[None, None, None]:
        """(spectrum_chi2, line_chi2, line_broadening) of each star's spectrum against the emulator at its
        predicted (physical) labels (:meth:`SpectrumEmulator.statistics`); (None, None, None) without an
        emulator."""
        if self.emulator is None:
            return None, None, None
        z = (np.asarray(mean, dtype=np.float64) - self.label_mean) / self.label_std
        arr = lambda v: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
        return self.emulator.statistics(z, arr(data["spectrum"]), arr(data["spectrum_error"]), arr(data["spectrum_mask"]))

    def fit_trust(self, data: dict[str, torch.Tensor], rate: float, map_score: np.ndarray | None = None,
                  chi2_pool: dict[str, torch.Tensor] | None = None) -> TrustThresholds:
        """The out-of-distribution tests' thresholds from held-out (validation) stars: together they
        flag ``rate`` of them. ``map_score``: those stars' selection-map scores (None: no map test
        threshold; predict then uses train_like). ``chi2_pool``: more stars (a training sample) whose
        consistency statistics join the validation stars' in the chi-square trends and thresholds, and
        whose catalogue labels are the label-density test's reference (the label hull)."""
        pred = self.predict(data)
        trained = [b for b, r in self.cfg.input_dropout.items() if r > 0]
        chi2, line, broad = self.consistency(pred["mean"], data)
        pool = reference = None
        if chi2_pool is not None and len(chi2_pool.get("source_id", [])):
            reference = chi2_pool["labels"].numpy().astype(np.float64)
            if chi2 is not None:
                pc2, pl2, pb = self.consistency(self.predict(chi2_pool)["mean"], chi2_pool)
                pool = {"spectrum_chi2": pc2, "line_chi2": pl2, "line_broadening": pb,
                        "snr": chi2_pool["snr"].numpy()}
        self.trust = fit_thresholds(self.stats, self.labels, data["xp"].numpy(), data["scalars"].numpy(),
                                    data["quality"].numpy(), pred["mean"], pred["epistemic_norm"], rate, trained,
                                    blocks_read(self.cfg.use_xp, self.cfg.use_scalars), chi2, line,
                                    data["snr"].numpy(), map_score, pool, pred["sigma_norm"], reference,
                                    line_broadening=broad)
        return self.trust

    def fit_precision(self, data: dict[str, torch.Tensor], keep: np.ndarray, catastrophic: dict[str, float],
                      odds: float) -> dict[str, float]:
        """The ``imprecise`` test's limits (:func:`stellar.trust.fit_precision_limits`) from the calibrated
        predictions of the held-out stars ``keep`` selects (those the other tests keep: the published
        uncertainties are meant for them). Run after :meth:`calibrate` and :meth:`fit_trust`."""
        if self.trust is None:
            raise RuntimeError("fit_trust first: the precision limits live in the trust thresholds")
        pred = self.predict(data)
        truth, err = self.physical_labels(data)
        keep = np.asarray(keep, bool)
        limits, q = fit_precision_limits((pred["mean"] - truth)[keep], pred["sigma"][keep], err[keep], self.labels,
                                         catastrophic, odds)
        self.trust.precision_limit, self.trust.precision_z, self.trust.catastrophic_odds = limits, q, float(odds)
        return limits

    def flag(self, data: dict[str, torch.Tensor], map_score: np.ndarray | None = None) -> np.ndarray:
        """``ood_reason`` of each star of ``data`` under this ensemble's thresholds."""
        pred = self.predict(data)
        chi2, line, broad = self.consistency(pred["mean"], data)
        reason, _ = assess(self.stats, self.trust, self.labels, data["xp"].numpy(), data["scalars"].numpy(),
                           data["quality"].numpy(), pred["mean"], pred["epistemic_norm"], None,
                           blocks_read(self.cfg.use_xp, self.cfg.use_scalars), chi2, line, data["snr"].numpy(),
                           map_score, pred["sigma_norm"], line_broadening=broad)
        return reason

    def physical_labels(self, data: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """The catalogue labels of ``data`` and their errors in physical units, (N, L) each."""
        y = data["labels"].numpy().astype(np.float64) * self.label_std + self.label_mean
        e = data["label_err"].numpy().astype(np.float64) * self.label_std
        return y, e

    # -- persistence: JSON + safetensors, nothing pickled ----------------------------------------
    def to_files(self) -> dict[str, bytes]:
        """The ensemble as named files (what is saved, logged to MLflow and shipped to executors)."""
        files = {f"member_{i:02d}.safetensors": w for i, w in enumerate(self.weights)}
        files["ensemble.json"] = json.dumps({
            "model": self.cfg.model_dump(), "labels": self.labels, "n_members": len(self.weights),
            "calibration": self.calibration.tolist(),
            "snr_calibration": self.snr_calibration(),
            "mean_correction": {"coef": self.mean_coef.tolist(), "label_range": self.mean_range.tolist()},
            "trust": self.trust.to_dict() if self.trust else None, "meta": self.meta},
            indent=1, default=str).encode()
        files["stats.json"] = json.dumps(self.stats).encode()
        if self.emulator is not None:
            files["emulator.safetensors"] = np_save(self.emulator.to_tensors())
        if self.selection_map is not None:
            files.update(self.selection_map.to_files())
        if self.trust is not None:
            files.update(self.trust.reference_files())
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "Ensemble":
        """An ensemble from :meth:`to_files`' named files, without pickle; ValueError names a missing file."""
        try:
            spec = json.loads(files["ensemble.json"])
            stats = json.loads(files["stats.json"])
            weights = [files[f"member_{i:02d}.safetensors"] for i in range(spec["n_members"])]
        except KeyError as exc:
            raise ValueError(f"ensemble files incomplete: {exc.args[0]} missing") from None
        trust = TrustThresholds.from_dict(spec.get("trust"))
        if trust is not None:
            if not trust.label_columns and LABEL_REFERENCE_FILE in files:
                trust.label_columns = list(spec["labels"])  # the first models with the test used every label
            trust.attach_reference(files)
        return cls(ModelConfig.model_validate(spec["model"]), spec["labels"], stats, weights,
                   np.asarray(spec["calibration"]), spec.get("meta"), spec.get("snr_calibration"),
                   trust,
                   SpectrumEmulator.from_tensors(np_load(files["emulator.safetensors"]))
                   if "emulator.safetensors" in files else None,
                   MapReference.from_files(files) if MAP_FILE in files else None, spec.get("mean_correction"))

    def save(self, folder: str | Path) -> Path:
        """Write :meth:`to_files` into ``folder`` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            (folder / name).write_bytes(data)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Ensemble":
        """An ensemble from a folder :meth:`save` wrote (the emulator where its file is there);
        FileNotFoundError when the folder holds no ``ensemble.json``."""
        folder = Path(folder)
        if not (folder / "ensemble.json").is_file():
            raise FileNotFoundError(f"{folder} holds no ensemble.json")
        n = json.loads((folder / "ensemble.json").read_text())["n_members"]
        names = ["ensemble.json", "stats.json"] + [f"member_{i:02d}.safetensors" for i in range(n)]
        names += [name for name in ("emulator.safetensors", MAP_FILE, LABEL_REFERENCE_FILE)
                  if (folder / name).is_file()]
        return cls.from_files({name: (folder / name).read_bytes() for name in names})


COVERAGE_LEVELS = np.linspace(0.05, 0.95, 19)


def coverage_curve(z: np.ndarray, levels: np.ndarray = COVERAGE_LEVELS) -> list[float]:
    """Share of z-scores inside the central interval of each nominal coverage (equal to it when the
    uncertainties are calibrated): the calibration curve of the train stage and of the report."""
    from scipy.stats import norm

    limits = norm.ppf(0.5 + np.asarray(levels) / 2)
    return (np.abs(np.asarray(z, dtype=float))[:, None] < limits).mean(axis=0).tolist()


def evaluate(ens: Ensemble, data: dict[str, torch.Tensor], calibrated: bool = True) -> dict:
    """Per label: RMSE, bias, z-score std and 68 % coverage, overall and in S/N bins."""
    pred = ens.predict(data, calibrated=calibrated)
    truth, err = ens.physical_labels(data)
    snr = data["snr"].numpy()
    out: dict = {}
    for j, lab in enumerate(ens.labels):
        ok = np.isfinite(truth[:, j])
        for name, sel in [("all", ok)] + [(f"snr_{lo:g}_{hi:g}", ok & (snr >= lo) & (snr < hi)) for lo, hi in SNR_BINS]:
            if sel.sum() < 2:
                continue
            r = pred["mean"][sel, j] - truth[sel, j]
            z = r / np.sqrt(pred["sigma"][sel, j] ** 2 + np.nan_to_num(err[sel, j]) ** 2)
            out[f"{lab}/{name}/rmse"] = float(np.sqrt(np.mean(r**2)))
            out[f"{lab}/{name}/bias"] = float(np.mean(r))
            out[f"{lab}/{name}/z_std"] = float(np.std(z))
            out[f"{lab}/{name}/coverage68"] = float(np.mean(np.abs(z) < 1.0))
            out[f"{lab}/{name}/n"] = int(sel.sum())
    return out

