"""Trust in a published label: physical bounds, out-of-distribution tests and their thresholds.

A catalogue row is a claim, and one absurd row costs the users' trust in all
the others. Three layers stand between the network and the catalogue:

1. **Bounded outputs.** The network's mean head passes through
   :func:`bound_outputs`: the identity inside the training-label range, a
   tanh-saturated margin beyond it, so no input whatever (an all-zero
   spectrum, a flux of 10, a huge parallax) can drive a label past the
   training range plus ``ModelConfig.output_margin`` of it, and never past the
   physical envelope (:data:`PHYSICAL_ENVELOPE`). Inside the range gradients
   are untouched; beyond it they fade smoothly, so training stays sane.
2. **Tests of unlikeness**, each a bit of ``ood_reason`` (:data:`OOD_BITS`):
   the selection map's verdict, inputs beyond the training inputs' range,
   labels beyond the training labels' range, ensemble disagreement far above
   its level on held-out stars, input blocks the model cannot do without,
   and (guard) a label outside the physical envelope, which is then withheld.
   ``ood`` is true when any bit is set.
3. **Thresholds from the validation split.** Each test with a free threshold
   gets the one that flags ``false_flag_rate`` of the validation stars (in
   distribution by construction) at train time; the thresholds travel with
   the model (``ensemble.json``). Injected test stars never set them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from stellar.features import (Q_NO_ASTROMETRY, Q_NO_BP, Q_NO_PARALLAX, Q_NO_PHOTOMETRY, Q_NO_RP, Q_NO_XP,
                              SCALAR_NAMES)

# Values a star can physically have; a label outside is never published as a number.
PHYSICAL_ENVELOPE: dict[str, tuple[float, float]] = {
    "teff": (2500.0, 50000.0),
    "logg": (-1.0, 6.0),
    "m_h": (-5.0, 1.5),
    "alpha_m": (-1.0, 1.5),
    "fe_h": (-5.0, 1.5),
    "a_li": (-2.0, 5.0),
}

OOD_MAP = 1 << 0
OOD_INPUT_RANGE = 1 << 1
OOD_LABEL_RANGE = 1 << 2
OOD_DISAGREEMENT = 1 << 3
OOD_MISSING_INPUT = 1 << 4
OOD_SPECTRUM = 1 << 5
OOD_LINES = 1 << 6
OOD_ENVELOPE = 1 << 8

# name: (bit, meaning) -- the documented bitmask (README, column descriptions, export headers)
OOD_BITS: dict[str, tuple[int, str]] = {
    "map": (OOD_MAP, "train-unlike on the selection map (train_like false)"),
    "input_range": (OOD_INPUT_RANGE, "an XP coefficient, colour, magnitude or parallax feature lies beyond the "
                                     "training stars' range by more than the validation-calibrated margin"),
    "label_range": (OOD_LABEL_RANGE, "a predicted label lies outside the training labels' range (extrapolation)"),
    "disagreement": (OOD_DISAGREEMENT, "the ensemble members disagree far more than on held-out stars "
                                       "(above the validation-calibrated level)"),
    "missing_input": (OOD_MISSING_INPUT, "an input block the model reads (XP, BP, RP, parallax, photometry) is "
                                         "missing, and the model was not trained to do without it"),
    "spectrum": (OOD_SPECTRUM, "the spectrum emulated at the predicted labels does not reproduce the observed one "
                               "(spectrum_chi2 above the validation-calibrated level)"),
    "lines": (OOD_LINES, "residuals around the strongest lines (Ca II triplet): doubled, shifted or too-weak lines "
                         "(line_chi2 above the validation-calibrated level)"),
    "envelope": (OOD_ENVELOPE, "a label fell outside the physical envelope and was withheld (null)"),
}

# Which scalar features an absent input block leaves undefined (SCALAR_NAMES order).
_SCALAR_NEEDS = {
    "phot_g_mean_mag": ("photometry",), "bp_rp": ("photometry",), "g_rp": ("photometry",),
    "parallax": ("parallax",), "parallax_error": ("parallax",), "reduced_parallax": ("parallax", "photometry"),
}


def label_bounds(stats: dict, labels: list[str], margin: float) -> dict[str, np.ndarray]:
    """The output bounds in normalised label units.

    ``lo``/``hi``: the training labels' range clipped to the physical envelope;
    ``m_lo``/``m_hi``: the saturating margin beyond each side, ``margin`` times
    the range, shortened where it would cross the envelope.
    """
    idx = [stats["label_names"].index(k) for k in labels]
    mean = np.asarray(stats["labels"]["mean"], dtype=np.float64)[idx]
    std = np.asarray(stats["labels"]["std"], dtype=np.float64)[idx]
    lo = np.asarray(stats["labels"]["min"], dtype=np.float64)[idx]
    hi = np.asarray(stats["labels"]["max"], dtype=np.float64)[idx]
    env = np.array([PHYSICAL_ENVELOPE.get(k, (-np.inf, np.inf)) for k in labels], dtype=np.float64)
    tiny = 1e-3 * std
    # keep at least `tiny` of margin inside the envelope on each side
    lo = np.clip(np.where(np.isfinite(lo), lo, mean - 3 * std), env[:, 0] + tiny, env[:, 1] - 2 * tiny)
    hi = np.clip(np.where(np.isfinite(hi), hi, mean + 3 * std), lo + tiny, env[:, 1] - tiny)
    width = margin * (hi - lo)
    m_lo = np.maximum(np.minimum(width, lo - env[:, 0]), tiny)
    m_hi = np.maximum(np.minimum(width, env[:, 1] - hi), tiny)
    return {"lo": (lo - mean) / std, "hi": (hi - mean) / std, "m_lo": m_lo / std, "m_hi": m_hi / std}


def bound_outputs(x, lo, hi, m_lo, m_hi):
    """Identity on [lo, hi]; beyond, ``hi + m_hi tanh((x - hi) / m_hi)`` (and its mirror below lo).

    Continuous with slope 1 at the joins, so in-range training is unchanged; the output can never
    pass ``lo - m_lo`` or ``hi + m_hi``. Works on torch tensors (the network) and numpy arrays."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            above = hi + m_hi * torch.tanh((x - hi) / m_hi)
            below = lo - m_lo * torch.tanh((lo - x) / m_lo)
            return torch.where(x > hi, above, torch.where(x < lo, below, x))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    above = hi + m_hi * np.tanh((x - hi) / m_hi)
    below = lo - m_lo * np.tanh((lo - x) / m_lo)
    return np.where(x > hi, above, np.where(x < lo, below, x))


def missing_features(quality: np.ndarray, n_bases: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the quality bits: which XP features (n, 2*n_bases) and scalar features (n, S) are absent
    (filled with zeros by preprocess), and per star the absent blocks as a (n, 5) bool array in the
    order xp, bp, rp, parallax, photometry."""
    q = np.asarray(quality, dtype=np.int64)
    no_xp = (q & Q_NO_XP) != 0
    no_bp = no_xp | ((q & Q_NO_BP) != 0)
    no_rp = no_xp | ((q & Q_NO_RP) != 0)
    no_ast = (q & Q_NO_ASTROMETRY) != 0
    no_plx = no_ast | ((q & Q_NO_PARALLAX) != 0)
    no_phot = no_ast | ((q & Q_NO_PHOTOMETRY) != 0)
    xp_missing = np.concatenate([np.repeat(no_bp[:, None], n_bases, 1), np.repeat(no_rp[:, None], n_bases, 1)], 1)
    block = {"photometry": no_phot, "bp": no_bp, "rp": no_rp, "parallax": no_plx}
    sc_missing = np.stack([np.logical_or.reduce([block[b] for b in _SCALAR_NEEDS[name]]) for name in SCALAR_NAMES], 1)
    blocks = np.stack([no_xp, no_bp, no_rp, no_plx, no_phot], axis=1)
    return xp_missing, sc_missing, blocks


BLOCKS = ("xp", "bp", "rp", "parallax", "photometry")


def blocks_read(use_xp: bool, use_scalars: bool) -> set[str]:
    """The input blocks a network with these branches reads."""
    return ({"xp", "bp", "rp"} if use_xp else set()) | ({"parallax", "photometry"} if use_scalars else set())


def drop_blocks(xp, scalars, rates: dict[str, float], stats: dict, generator):
    """Training augmentation: blank whole input blocks of random stars as preprocess blanks a missing one.

    Each star loses block ``b`` with probability ``rates[b]`` (independently per block), its features set
    to the normalised value of the raw zero that preprocess writes for an absent value, so that at predict
    time a star without BP, RP, XP or a parallax meets inputs the network has seen, and its predicted
    variance can grow honestly. ``xp``, ``scalars``: normalised torch tensors (B, X), (B, S), changed in place.
    """
    import torch

    nb = stats["xp_bases"]
    fill_xp = torch.as_tensor(-np.asarray(stats["xp"]["mean"]) / np.asarray(stats["xp"]["std"]), dtype=xp.dtype)
    fill_sc = torch.as_tensor(-np.asarray(stats["scalars"]["mean"]) / np.asarray(stats["scalars"]["std"]),
                              dtype=scalars.dtype)
    cols_xp = {"xp": slice(0, 2 * nb), "bp": slice(0, nb), "rp": slice(nb, 2 * nb)}
    sc_cols = {b: [i for i, name in enumerate(SCALAR_NAMES) if b in _SCALAR_NEEDS[name]]
               for b in ("parallax", "photometry")}
    n = xp.shape[0]
    for block in BLOCKS:  # fixed order: the same draws for the same generator state
        rate = float(rates.get(block, 0.0))
        if rate <= 0:
            continue
        hit = torch.rand(n, generator=generator) < rate
        if not bool(hit.any()):
            continue
        if block in cols_xp:
            sl = cols_xp[block]
            xp[hit, sl] = fill_xp[sl].to(xp.device)
        else:
            cols = sc_cols[block]
            scalars[hit.nonzero()[:, 0][:, None], torch.as_tensor(cols)[None, :]] = fill_sc[cols].to(scalars.device)
    return xp, scalars


def _feature_range(stats: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The training range of one feature group, in normalised units."""
    s = stats[key]
    mean, std = np.asarray(s["mean"], dtype=np.float64), np.asarray(s["std"], dtype=np.float64)
    lo = (np.asarray(s["min"], dtype=np.float64) - mean) / std
    hi = (np.asarray(s["max"], dtype=np.float64) - mean) / std
    return np.where(np.isfinite(lo), lo, -np.inf), np.where(np.isfinite(hi), hi, np.inf)


def input_excess(stats: dict, xp: np.ndarray, scalars: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Per star: how far its most extreme present input feature lies beyond the training range,
    in units of that feature's training range (0 inside). Absent features (quality bits) are skipped:
    they have their own test."""
    xp_missing, sc_missing, _ = missing_features(quality, stats["xp_bases"])
    out = np.zeros(len(xp))
    for values, missing, key in ((xp, xp_missing, "xp"), (scalars, sc_missing, "scalars")):
        lo, hi = _feature_range(stats, key)
        width = np.maximum(hi - lo, 1e-6)
        v = np.asarray(values, dtype=np.float64)
        excess = np.maximum(np.maximum(v - hi, lo - v), 0.0) / width
        excess[missing] = 0.0
        out = np.maximum(out, np.nan_to_num(excess.max(axis=1), nan=np.inf) if len(v) else out)
    return out


@dataclass
class TrustThresholds:
    """What the tests need beyond the normalisation statistics; fitted on the validation split."""

    false_flag_rate: float = 0.01  # per test, on the validation split
    input_excess: float = 0.0  # flag when input_excess() exceeds this
    disagreement_ref: list[float] = field(default_factory=list)  # per label: validation median epistemic std
    disagreement: float = np.inf  # flag when max_label(epistemic / ref) exceeds this
    trained_missing: list[str] = field(default_factory=list)  # blocks the model learned to do without
    spectrum_chi2: float = np.inf  # flag when the emulator's reduced chi-square exceeds this
    line_chi2: float = np.inf  # ... over the strong-line windows
    # The chi-squares grow with S/N (label errors leave residuals that noise hides at low S/N), so their
    # thresholds are fitted per S/N bin too; a bin with too few validation stars takes the overall one.
    snr_edges: list[float] = field(default_factory=list)
    spectrum_chi2_by_snr: list[float] = field(default_factory=list)
    line_chi2_by_snr: list[float] = field(default_factory=list)
    n_validation: int = 0

    _INF_FIELDS = ("disagreement", "spectrum_chi2", "line_chi2")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in self._INF_FIELDS:  # JSON has no infinity: null means "test off"
            d[k] = None if not np.isfinite(getattr(self, k)) else float(getattr(self, k))
        for k in ("spectrum_chi2_by_snr", "line_chi2_by_snr"):
            d[k] = [None if not np.isfinite(v) else float(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrustThresholds | None":
        if not d:
            return None
        d = dict(d)
        for k in cls._INF_FIELDS:
            d[k] = np.inf if d.get(k) is None else float(d[k])
        for k in ("spectrum_chi2_by_snr", "line_chi2_by_snr"):
            d[k] = [np.inf if v is None else float(v) for v in d.get(k, [])]
        return cls(**d)

    def chi2_limits(self, snr: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per star the spectrum_chi2 and line_chi2 thresholds of its S/N bin."""
        if snr is None or not self.spectrum_chi2_by_snr:
            return np.full(n, self.spectrum_chi2), np.full(n, self.line_chi2)
        b = np.searchsorted(np.asarray(self.snr_edges), np.nan_to_num(np.asarray(snr, float)), side="right")
        return np.asarray(self.spectrum_chi2_by_snr)[b], np.asarray(self.line_chi2_by_snr)[b]


def _quantile_threshold(values: np.ndarray, rate: float) -> float:
    """The smallest threshold flagging at most ``rate`` of ``values`` (flag = value > threshold)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.inf
    return float(np.quantile(v, 1.0 - rate, method="higher"))


def disagreement_statistic(epistemic: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per star: the largest ratio of a label's ensemble spread (normalised units) to its held-out median."""
    return (np.asarray(epistemic, dtype=np.float64) / np.maximum(np.asarray(ref, dtype=np.float64), 1e-9)).max(axis=1)


def fit_thresholds(stats: dict, xp: np.ndarray, scalars: np.ndarray, quality: np.ndarray, epistemic: np.ndarray,
                   rate: float, trained_missing: list[str] | None = None, spectrum_chi2: np.ndarray | None = None,
                   line_chi2: np.ndarray | None = None, snr: np.ndarray | None = None,
                   snr_edges: tuple[float, ...] = (15.0, 25.0, 50.0), min_per_bin: int = 50) -> TrustThresholds:
    """Thresholds that flag ``rate`` of the validation stars per test.

    Args:
        stats: the features' normalisation statistics (training split).
        xp, scalars: the validation stars' normalised inputs.
        quality: their quality bits.
        epistemic: (N, L) the ensemble members' spread of the normalised means.
        rate: the false-flag rate per test.
        trained_missing: input blocks the model was trained to do without.
        spectrum_chi2, line_chi2: the emulator's statistics of the validation stars (None: tests off).
        snr: their S/N, for per-bin chi-square thresholds (``snr_edges``; bins with fewer than
            ``min_per_bin`` stars take the overall threshold).
    """
    ref = np.median(epistemic, axis=0) if len(epistemic) else np.ones(epistemic.shape[1])
    excess = input_excess(stats, xp, scalars, quality)
    by_snr: dict[str, list[float]] = {"spectrum_chi2_by_snr": [], "line_chi2_by_snr": []}
    if snr is not None and spectrum_chi2 is not None and line_chi2 is not None:
        b = np.searchsorted(np.asarray(snr_edges), np.nan_to_num(np.asarray(snr, float)), side="right")
        for key, values in (("spectrum_chi2_by_snr", spectrum_chi2), ("line_chi2_by_snr", line_chi2)):
            overall = _quantile_threshold(values, rate)
            by_snr[key] = [_quantile_threshold(values[b == i], rate) if (b == i).sum() >= min_per_bin else overall
                           for i in range(len(snr_edges) + 1)]
    return TrustThresholds(
        snr_edges=list(snr_edges) if by_snr["spectrum_chi2_by_snr"] else [], **by_snr,
        false_flag_rate=rate, input_excess=max(0.0, _quantile_threshold(excess, rate)),
        disagreement_ref=[float(r) for r in ref],
        disagreement=_quantile_threshold(disagreement_statistic(epistemic, ref), rate),
        trained_missing=list(trained_missing or []), n_validation=int(len(xp)),
        spectrum_chi2=np.inf if spectrum_chi2 is None else _quantile_threshold(spectrum_chi2, rate),
        line_chi2=np.inf if line_chi2 is None else _quantile_threshold(line_chi2, rate))


def assess(stats: dict, thr: TrustThresholds | None, labels: list[str], xp: np.ndarray, scalars: np.ndarray,
           quality: np.ndarray, mean: np.ndarray, epistemic: np.ndarray,
           train_like: np.ndarray | None, reads: set[str] = frozenset(BLOCKS), spectrum_chi2: np.ndarray | None = None,
           line_chi2: np.ndarray | None = None, snr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``ood_reason`` bits of a batch, and which label values must be withheld (outside the envelope).

    Args:
        stats: normalisation statistics.
        thr: the model's fitted thresholds (None for a model trained before they existed: the
            threshold tests are then skipped, the others still run).
        labels: label names, in the columns' order.
        xp, scalars: normalised inputs (N, X) and (N, S).
        quality: quality bits (N,).
        mean: (N, L) physical predicted labels.
        epistemic: (N, L) members' spread of the normalised means.
        train_like: (N,) the map's verdict, None or NaN where unknown.
        reads: the input blocks the model reads (:func:`blocks_read`).
        spectrum_chi2, line_chi2: the emulator's statistics at the predicted labels (None: not run).
        snr: (N,) S/N, for the chi-square thresholds per S/N bin.

    Returns:
        (ood_reason int32 (N,), withheld bool (N, L)).
    """
    n = len(mean)
    reason = np.zeros(n, dtype=np.int32)
    if train_like is not None:
        tl = np.asarray(train_like, dtype=np.float64)
        reason |= np.where(tl == 0.0, OOD_MAP, 0).astype(np.int32)
    idx = [stats["label_names"].index(k) for k in labels]
    lab_lo = np.asarray(stats["labels"]["min"], dtype=np.float64)[idx]
    lab_hi = np.asarray(stats["labels"]["max"], dtype=np.float64)[idx]
    outside = ((mean < lab_lo) | (mean > lab_hi)).any(axis=1)
    reason |= np.where(outside, OOD_LABEL_RANGE, 0).astype(np.int32)
    env = np.array([PHYSICAL_ENVELOPE.get(k, (-np.inf, np.inf)) for k in labels], dtype=np.float64)
    withheld = ~((mean >= env[:, 0]) & (mean <= env[:, 1]))
    reason |= np.where(withheld.any(axis=1), OOD_ENVELOPE, 0).astype(np.int32)
    _, _, blocks = missing_features(quality, stats["xp_bases"])
    trained = set(thr.trained_missing) if thr else set()
    needed = np.array([b in reads and b not in trained for b in BLOCKS])
    reason |= np.where((blocks & needed[None, :]).any(axis=1), OOD_MISSING_INPUT, 0).astype(np.int32)
    if thr is not None:
        reason |= np.where(input_excess(stats, xp, scalars, quality) > thr.input_excess,
                           OOD_INPUT_RANGE, 0).astype(np.int32)
        if thr.disagreement_ref:
            d = disagreement_statistic(epistemic, np.asarray(thr.disagreement_ref))
            reason |= np.where(d > thr.disagreement, OOD_DISAGREEMENT, 0).astype(np.int32)
        lim_spec, lim_line = thr.chi2_limits(snr, n)
        for values, limit, bit in ((spectrum_chi2, lim_spec, OOD_SPECTRUM), (line_chi2, lim_line, OOD_LINES)):
            if values is not None:
                reason |= np.where(np.nan_to_num(values, nan=0.0) > limit, bit, 0).astype(np.int32)
    return reason, withheld


def describe_bits() -> str:
    """One line per ood_reason bit, for headers and --help."""
    return "; ".join(f"{bit} {name}: {text}" for name, (bit, text) in OOD_BITS.items())
