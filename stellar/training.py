"""Training one ensemble member, and the deep ensemble with calibrated uncertainties.

A member is trained with Adam on the Gaussian NLL of the normalised labels,
streaming the training split with the issue-4 loader, with early stopping on
the validation split; the same seed gives the same weights (deterministic
torch on CPU). Members are independent, so ``train_ensemble`` maps them over
any mapper (Spark tasks in ``stellar train``, in-process in tests).

The ensemble's variance is aleatoric (mean of the members' predicted
variances) plus epistemic (variance of the members' means). A per-label
factor fitted on the validation split calibrates it, so that on held-out
stars (y - mu) / sigma has unit spread; the test split measures that.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from stellar.devices import make_deterministic, pick_device
from stellar.emulator import SpectrumEmulator
from stellar.inference_core import INPUTS, forward_members
from stellar.loader import FeatureDataset
from stellar.model import HybridNet, ModelConfig, gaussian_nll
from stellar.trust import TrustThresholds, drop_blocks, fit_thresholds, label_bounds

SNR_BINS = ((15.0, 25.0), (25.0, 50.0), (50.0, np.inf))


@dataclass
class Member:
    index: int
    seed: int
    weights: bytes  # safetensors
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def load_split(features_root: str, split: str, labels: list[str], stats: dict) -> dict[str, torch.Tensor]:
    """A whole split in memory (validation/test sets are small), in table order."""
    ds = FeatureDataset(features_root, split=split, batch_size=4096, shuffle=False, labels=labels, stats=stats)
    batches = list(ds)
    if not batches:
        return {}
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _dims(stats: dict) -> tuple[int, int, int]:
    return stats["n_spectrum"], 2 * stats["xp_bases"], len(stats["scalar_names"])


def build_net(cfg: ModelConfig, stats: dict, labels: list[str]) -> HybridNet:
    """The network for these statistics, its means bounded to the training labels' range plus margin."""
    n_pix, n_xp, n_s = _dims(stats)
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


def train_member(features_root: str, cfg: ModelConfig, labels: list[str], stats: dict, index: int,
                 seed: int, threads: int | None = None, device: str = "auto") -> Member:
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    make_deterministic(dev)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7919)  # the block-dropout draws: their own stream
    dropout = {k: v for k, v in cfg.input_dropout.items() if v > 0}
    net = build_net(cfg, stats, labels).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    train = FeatureDataset(features_root, split="train", batch_size=cfg.batch_size, shuffle=True, seed=seed,
                           labels=labels, stats=stats)
    val = load_split(features_root, "validation", labels, stats)
    best, best_state, best_epoch, bad = np.inf, None, -1, 0
    history = []
    for epoch in range(cfg.max_epochs):
        train.set_epoch(epoch)
        net.train()
        total, n = 0.0, 0
        for b in train:
            if dropout:  # blank whole input blocks as preprocess blanks missing ones (stellar.trust.drop_blocks)
                drop_blocks(b["xp"], b["scalars"], dropout, stats, gen)
            b = {k: v.to(dev, non_blocking=True) for k, v in b.items()}
            mean, log_var = net(*(b[k] for k in INPUTS))
            loss = gaussian_nll(mean, log_var, b["labels"], b["label_err"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b["source_id"])
            n += len(b["source_id"])
        net.eval()
        mean, log_var = _forward_chunks(net, val)
        val_loss = float(gaussian_nll(mean, log_var, val["labels"], val["label_err"]))
        history.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss})
        if val_loss < best - 1e-5:
            best, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    return Member(index, seed, st_save(best_state), best_epoch, best, history, time.perf_counter() - t0, str(dev))


def outlier_members(losses: list[float], n_mad: float = 3.0) -> list[int]:
    """Members whose best validation loss is above median + n_mad * 1.4826 * MAD (the recorded rule)."""
    x = np.asarray(losses, dtype=float)
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    limit = med + n_mad * max(mad, 1e-3 * abs(med) + 1e-6)
    return [i for i, v in enumerate(x) if v > limit]


# S/N bin edges of the calibration: one factor per label below 15, 15-25, 25-50 and above 50
CALIBRATION_SNR_EDGES = (15.0, 25.0, 50.0)
MIN_STARS_PER_CALIBRATION_BIN = 30  # fewer validation stars in a bin: the bin takes the global factor


def _calibration_factor(r: np.ndarray, s: np.ndarray, e: np.ndarray) -> float:
    """c such that mean(r^2 / (c^2 s^2 + e^2)) = 1 (bisection: monotone in c)."""
    lo, hi = 1e-3, 1e3
    for _ in range(60):
        c = np.sqrt(lo * hi)
        if np.mean(r**2 / (c**2 * s**2 + e**2)) > 1:
            lo = c
        else:
            hi = c
    return float(np.sqrt(lo * hi))


class Ensemble:
    """Members + normalisation + calibration + trust thresholds: everything needed to predict,
    loadable without pickle.

    The uncertainty calibration is a factor per label and S/N bin (``CALIBRATION_SNR_EDGES``):
    one factor per label cannot fit both ends (at high S/N the raw spread is too large, at low
    S/N about right). ``calibration`` keeps the all-S/N factor, used where no S/N is given.
    """

    def __init__(self, cfg: ModelConfig, labels: list[str], stats: dict, weights: list[bytes],
                 calibration: np.ndarray | None = None, meta: dict | None = None,
                 snr_calibration: dict | None = None, trust: TrustThresholds | None = None,
                 emulator: SpectrumEmulator | None = None):
        self.cfg = cfg
        self.labels = list(labels)
        self.stats = stats
        self.weights = list(weights)
        self.calibration = np.ones(len(labels)) if calibration is None else np.asarray(calibration, dtype=float)
        self.snr_edges = np.asarray((snr_calibration or {}).get("edges", []), dtype=float)
        self.snr_factors = np.asarray((snr_calibration or {}).get("factors", [self.calibration.tolist()]),
                                      dtype=float).reshape(-1, len(labels))
        self.trust = trust
        self.emulator = emulator
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
        for net in self.nets:
            net.to(device)
        return self

    def predict_normalised(self, data: dict[str, torch.Tensor], chunk: int = 256):
        """Per member means and variances (normalised units): (M, N, L) each."""
        device = next(self.nets[0].parameters()).device
        means, variances = forward_members(self.nets, data, device, chunk)
        return means.astype(np.float64), variances.astype(np.float64)

    def predict(self, data: dict[str, torch.Tensor], calibrated: bool = True) -> dict[str, np.ndarray]:
        means, variances = self.predict_normalised(data)
        snr = data["snr"].numpy() if "snr" in data else None
        return self.combine(means, variances, calibrated, snr)

    def factors(self, snr: np.ndarray | None, n: int) -> np.ndarray:
        """(N, L) calibration factors: per S/N bin where the S/N is known, else the all-S/N factor."""
        if snr is None or self.snr_factors.shape[0] == 1:
            return np.broadcast_to(self.calibration if snr is None else self.snr_factors[0], (n, len(self.labels)))
        return self.snr_factors[np.searchsorted(self.snr_edges, np.nan_to_num(np.asarray(snr, float)), side="right")]

    def combine(self, means: np.ndarray, variances: np.ndarray, calibrated: bool = True,
                snr: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Members' normalised (M, N, L) means and variances -> physical mean and uncertainties.

        ``epistemic_norm`` (the members' spread in normalised units) feeds the disagreement test."""
        means = np.asarray(means, dtype=np.float64)
        variances = np.asarray(variances, dtype=np.float64)
        mu = means.mean(axis=0)
        aleatoric = variances.mean(axis=0)
        epistemic = means.var(axis=0)
        sigma = np.sqrt(aleatoric + epistemic)
        if calibrated:
            sigma = sigma * self.factors(snr, mu.shape[0])
        return {"mean": mu * self.label_std + self.label_mean, "sigma": sigma * self.label_std,
                "sigma_aleatoric": np.sqrt(aleatoric) * self.label_std,
                "sigma_epistemic": np.sqrt(epistemic) * self.label_std, "epistemic_norm": np.sqrt(epistemic)}

    def calibrate(self, data: dict[str, torch.Tensor]) -> np.ndarray:
        """Per-label factors making the validation z-scores' spread 1 (label noise included), over all
        stars and in each S/N bin with enough stars; returns the all-S/N factors."""
        pred = self.predict(data, calibrated=False)
        truth, err = self.physical_labels(data)
        snr = data["snr"].numpy().astype(np.float64)
        bins = np.searchsorted(CALIBRATION_SNR_EDGES, snr, side="right")
        overall, per_bin = [], np.ones((len(CALIBRATION_SNR_EDGES) + 1, len(self.labels)))
        for j in range(len(self.labels)):
            ok = np.isfinite(truth[:, j])
            s, e = pred["sigma"][:, j], np.nan_to_num(err[:, j])
            r = truth[:, j] - pred["mean"][:, j]
            overall.append(_calibration_factor(r[ok], s[ok], e[ok]))
            for b in range(per_bin.shape[0]):
                sel = ok & (bins == b)
                per_bin[b, j] = _calibration_factor(r[sel], s[sel], e[sel]) \
                    if sel.sum() >= MIN_STARS_PER_CALIBRATION_BIN else overall[-1]
        self.calibration = np.asarray(overall)
        self.snr_edges = np.asarray(CALIBRATION_SNR_EDGES, dtype=float)
        self.snr_factors = per_bin
        return self.calibration

    def fit_emulator(self, data: dict[str, torch.Tensor], window: np.ndarray) -> SpectrumEmulator:
        """The label-to-spectrum emulator on training stars (their catalogue labels, normalised)."""
        self.emulator = SpectrumEmulator.fit(data["labels"].numpy(), data["spectrum"].numpy(),
                                             data["spectrum_error"].numpy(), data["spectrum_mask"].numpy(), window)
        return self.emulator

    def consistency(self, mean: np.ndarray, data: dict) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """(spectrum_chi2, line_chi2) of each star's spectrum against the emulator at its predicted
        (physical) labels; (None, None) without an emulator."""
        if self.emulator is None:
            return None, None
        z = (np.asarray(mean, dtype=np.float64) - self.label_mean) / self.label_std
        arr = lambda v: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
        return self.emulator.statistics(z, arr(data["spectrum"]), arr(data["spectrum_error"]), arr(data["spectrum_mask"]))

    def fit_trust(self, data: dict[str, torch.Tensor], rate: float) -> TrustThresholds:
        """The out-of-distribution tests' thresholds from held-out (validation) stars: each flags
        ``rate`` of them."""
        pred = self.predict(data)
        trained = [b for b, r in self.cfg.input_dropout.items() if r > 0]
        chi2, line = self.consistency(pred["mean"], data)
        self.trust = fit_thresholds(self.stats, data["xp"].numpy(), data["scalars"].numpy(), data["quality"].numpy(),
                                    pred["epistemic_norm"], rate, trained, chi2, line, data["snr"].numpy(),
                                    CALIBRATION_SNR_EDGES)
        return self.trust

    def physical_labels(self, data: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
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
            "snr_calibration": {"edges": self.snr_edges.tolist(), "factors": self.snr_factors.tolist()},
            "trust": self.trust.to_dict() if self.trust else None, "meta": self.meta},
            indent=1, default=str).encode()
        files["stats.json"] = json.dumps(self.stats).encode()
        if self.emulator is not None:
            files["emulator.safetensors"] = np_save(self.emulator.to_tensors())
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "Ensemble":
        try:
            spec = json.loads(files["ensemble.json"])
            stats = json.loads(files["stats.json"])
            weights = [files[f"member_{i:02d}.safetensors"] for i in range(spec["n_members"])]
        except KeyError as exc:
            raise ValueError(f"ensemble files incomplete: {exc.args[0]} missing") from None
        return cls(ModelConfig.model_validate(spec["model"]), spec["labels"], stats, weights,
                   np.asarray(spec["calibration"]), spec.get("meta"), spec.get("snr_calibration"),
                   TrustThresholds.from_dict(spec.get("trust")),
                   SpectrumEmulator.from_tensors(np_load(files["emulator.safetensors"]))
                   if "emulator.safetensors" in files else None)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            (folder / name).write_bytes(data)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Ensemble":
        folder = Path(folder)
        if not (folder / "ensemble.json").is_file():
            raise FileNotFoundError(f"{folder} holds no ensemble.json")
        n = json.loads((folder / "ensemble.json").read_text())["n_members"]
        names = ["ensemble.json", "stats.json"] + [f"member_{i:02d}.safetensors" for i in range(n)]
        names += [name for name in ("emulator.safetensors",) if (folder / name).is_file()]
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

