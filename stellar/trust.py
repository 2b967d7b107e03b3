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
   labels beyond the training labels' range, label combinations where the
   training set holds no stars (the label hull, as a k-nearest-neighbour
   density), ensemble disagreement far above
   its level on held-out stars, input blocks the model cannot do without,
   the spectrum emulated at the predicted labels failing to reproduce the
   observed one (overall, around the strongest lines, or lines broader than
   emulated: :mod:`stellar.emulator`),
   and (guard) a label outside the physical envelope, which is then withheld.
   One more bit is a precision test, not a likeness one: ``imprecise``, a
   label whose calibrated uncertainty is so large that, at the odds
   held-out stars' own z-scores give (heavy tails included), a catastrophic
   error (``train.catastrophic_errors``) is more likely than
   ``train.catastrophic_odds`` (:func:`fit_precision_limits`). ``ood`` is
   true when any bit is set -- the one flag a user filters on.
3. **Thresholds from the validation split.** At train time the tests with a
   free threshold each flag the same share of the validation stars (in
   distribution by construction), chosen so that all tests together flag
   ``train.ood_false_flag_rate`` of them; the thresholds travel with the model
   (``ensemble.json``). Injected test stars never set them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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
OOD_UNCERTAINTY = 1 << 7
OOD_ENVELOPE = 1 << 8
OOD_IMPRECISE = 1 << 9
OOD_LABEL_DENSITY = 1 << 10
OOD_BROADENING = 1 << 11

# name: (bit, meaning) -- the documented bitmask (README, column descriptions, export headers)
OOD_BITS: dict[str, tuple[int, str]] = {
    "map": (OOD_MAP, "on the selection map, fewer training stars among the neighbours than the "
                     "validation-calibrated level (selection_score; train_like where the model has none)"),
    "input_range": (OOD_INPUT_RANGE, "an XP coefficient, colour, magnitude or parallax feature lies beyond the "
                                     "training stars' range by more than the validation-calibrated margin"),
    "label_range": (OOD_LABEL_RANGE, "a predicted label lies outside the training labels' range (extrapolation)"),
    "label_density": (OOD_LABEL_DENSITY, "the predicted labels together lie where the training set has no stars "
                                         "(each label may be in range): the distance to the k-th nearest "
                                         "training star in label space, in units of each label's training "
                                         "spread, is above the validation-calibrated level -- a combination the "
                                         "label survey never held, such as alpha-rich at super-solar metallicity"),
    "disagreement": (OOD_DISAGREEMENT, "the ensemble members disagree far more than on held-out stars "
                                       "(above the validation-calibrated level)"),
    "missing_input": (OOD_MISSING_INPUT, "an input block the model reads (XP, BP, RP, parallax, photometry) is "
                                         "missing, and the model was not trained to do without it"),
    "spectrum": (OOD_SPECTRUM, "the spectrum emulated at the predicted labels does not reproduce the observed one "
                               "(spectrum_chi2 above the validation-calibrated level for its S/N)"),
    "lines": (OOD_LINES, "residuals around the strongest lines (Ca II triplet): doubled, shifted or too-weak lines "
                         "(line_chi2 above the validation-calibrated level for its S/N)"),
    "broadening": (OOD_BROADENING, "the lines are broader than the spectrum emulated at the predicted labels "
                                   "(line_broadening, a matched filter of the residuals against the emulated "
                                   "spectrum's second difference, above the validation-calibrated level for its "
                                   "S/N): a double-lined binary closer than the resolution element, or a rapid "
                                   "rotator"),
    "uncertainty": (OOD_UNCERTAINTY, "the network's own uncertainty of a label is far above its level on held-out "
                                     "stars of the same S/N (the validation-calibrated level): the inputs do not "
                                     "pin the star down the way they pin down training-like stars"),
    "envelope": (OOD_ENVELOPE, "a label fell outside the physical envelope and was withheld (null)"),
    "imprecise": (OOD_IMPRECISE, "a label's calibrated uncertainty is above its precision limit: the "
                                 "catastrophic error (train.catastrophic_errors: Teff 1000 K, log g 1, [M/H] "
                                 "and [Fe/H] 0.5 dex by default) over the held-out stars' |z| quantile at "
                                 "train.catastrophic_odds (1 %), so the star's own error bar allows a "
                                 "catastrophic error at those odds"),
}

# Which scalar features an absent input block leaves undefined (SCALAR_NAMES order).
_SCALAR_NEEDS = {
    "phot_g_mean_mag": ("photometry",), "bp_rp": ("photometry",), "g_rp": ("photometry",),
    "parallax": ("parallax",), "parallax_error": ("parallax",), "reduced_parallax": ("parallax", "photometry"),
    "log_reduced_parallax": ("parallax", "photometry"),
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


CHI2_PIVOT_SNR = 30.0


@dataclass
class TrustThresholds:
    """What the tests need beyond the normalisation statistics; fitted on the validation split.

    ``false_flag_rate`` is the share of validation stars that all tests together flag; each test with a
    free threshold flags the same share ``per_test_rate`` of them, chosen so that the union comes to
    ``false_flag_rate`` (the threshold-free tests count towards it too).
    """

    false_flag_rate: float = 0.03  # all tests together, on the validation split
    per_test_rate: float = 0.0
    input_excess: float = 0.0  # flag when input_excess() exceeds this
    disagreement_ref: list[float] = field(default_factory=list)  # per label: validation median epistemic std
    disagreement: float = np.inf  # flag when max_label(epistemic / ref) exceeds this
    trained_missing: list[str] = field(default_factory=list)  # blocks the model learned to do without
    # The selection map: flag a star whose selection score is below this (-inf: use train_like).
    map_score: float = -np.inf
    # The chi-squares grow with S/N, and so does their spread (label and emulator errors leave residuals
    # that noise hides at low S/N): the test is on the standardised excess (log chi2 - m(t)) / s(t),
    # t = log(S/N / pivot) clipped to the fit's range, m quadratic and log s linear in t, both fitted to
    # the medians and MADs of S/N bins (:func:`chi2_trend`).
    chi2_t_range: list[float] = field(default_factory=lambda: [0.0, 0.0])
    spectrum_trend: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    line_trend: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0])
    spectrum_chi2: float = np.inf  # flag when the standardised excess exceeds this
    line_chi2: float = np.inf  # ... over the strong-line windows
    # The broadening matched filter (stellar.emulator) is a signed significance, not a chi-square: its
    # excess is (b - m(t)) / s(t) on b itself, with the same kind of trend (empty: a model from before it,
    # test off), and only a positive excess (lines broader than emulated) flags.
    broadening_trend: list[float] = field(default_factory=list)
    line_broadening: float = np.inf
    n_chi2_fit: int = 0  # stars the chi-square trends and thresholds were fitted on
    # The network's own (uncalibrated, normalised) uncertainty per label grows as S/N falls: the test is
    # on the largest standardised excess of log sigma over its S/N trend (one chi2_trend per label,
    # fitted on the validation stars, t clipped to sigma_t_range). A star whose inputs leave the network
    # unsure far beyond what held-out stars of that S/N leave it (a very metal-poor star whose weak
    # lines it has never seen so weak) is unlike the training set even where each input is in range.
    sigma_t_range: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sigma_trend: list[list[float]] = field(default_factory=list)
    uncertainty: float = np.inf  # flag when the largest standardised excess exceeds this
    # The label hull: the distance from a star's predicted labels (normalised) to its ``label_k``-th
    # nearest training star's catalogue labels (:func:`label_sparsity`); flag above ``label_density``.
    # The reference labels (a hash-chosen sample of the training split, normalised, in ``label_columns``
    # order) travel as their own safetensors file, not in the JSON (:data:`LABEL_REFERENCE_FILE`).
    label_k: int = 10
    label_density: float = np.inf
    label_columns: list[str] = field(default_factory=list)  # the labels the distance is over
    label_reference: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Precision limits (physical units) on the calibrated uncertainty, by label: the catastrophic error
    # over ``precision_z``, the validation stars' |z| quantile at ``catastrophic_odds``
    # (:func:`fit_precision_limits`); outside the false-flag budget (empty: test off).
    precision_limit: dict[str, float] = field(default_factory=dict)
    precision_z: float = 0.0
    catastrophic_odds: float = 0.0
    n_validation: int = 0

    _INF_FIELDS = ("disagreement", "spectrum_chi2", "line_chi2", "map_score", "uncertainty", "label_density",
                   "line_broadening")

    def to_dict(self) -> dict:
        """The thresholds as a JSON-able dict; an infinite threshold (test off) is null. The label
        reference is not in it (:meth:`reference_files`)."""
        d = asdict(self)
        d.pop("label_reference", None)
        for k in self._INF_FIELDS:  # JSON has no infinity: null means "test off"
            d[k] = None if not np.isfinite(getattr(self, k)) else float(getattr(self, k))
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrustThresholds | None":
        """Thresholds from :meth:`to_dict`'s dict (None for None): null is infinite again, unknown keys are
        ignored, and a model of 0.2.0 or before gets its chi-square tests off."""
        if not d:
            return None
        d = dict(d)
        if len(d.get("spectrum_trend") or []) != 5:  # a model of 0.2.0 or before: its chi2 thresholds are not kept
            d["spectrum_chi2"] = d["line_chi2"] = None
            d.pop("spectrum_trend", None)
            d.pop("line_trend", None)
        for k in cls._INF_FIELDS:
            d[k] = (-np.inf if k == "map_score" else np.inf) if d.get(k) is None else float(d[k])
        known = set(cls.__dataclass_fields__) - {"label_reference"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def reference_files(self) -> dict[str, bytes]:
        """The label reference as a safetensors file (empty without one)."""
        if self.label_reference is None:
            return {}
        from safetensors.numpy import save as np_save

        return {LABEL_REFERENCE_FILE: np_save({"labels": np.ascontiguousarray(self.label_reference, np.float32)})}

    def attach_reference(self, files: dict[str, bytes]) -> None:
        """Take the label reference from a model's files; without the file the label-density test is off
        (a model from before the test)."""
        if LABEL_REFERENCE_FILE not in files:
            self.label_density = np.inf
            return
        from safetensors.numpy import load as np_load

        ref = np_load(files[LABEL_REFERENCE_FILE]).get("labels")
        if ref is None or ref.ndim != 2 or ref.shape[1] != len(self.label_columns):
            raise ValueError(f"{LABEL_REFERENCE_FILE}: a 2-D array 'labels' with one column per label of "
                             f"label_columns ({len(self.label_columns)}) expected")
        self.label_reference = ref.astype(np.float64)

    def _excess(self, y: np.ndarray, snr: np.ndarray | None, trend: list[float]) -> np.ndarray:
        """(y - m(t)) / s(t) for a :func:`chi2_trend` fit, t clipped to the fit's S/N range (unknown S/N: the
        pivot's)."""
        t = np.clip(_snr_t(snr, len(y)), self.chi2_t_range[0], self.chi2_t_range[1])
        a, b, c, d, e = trend
        return (y - (a + b * t + c * t * t)) / np.exp(d + e * t)

    def chi2_excess(self, chi2: np.ndarray, snr: np.ndarray | None, trend: list[float]) -> np.ndarray:
        """The standardised excess of log chi2 over its S/N trend."""
        return self._excess(np.log(np.maximum(np.asarray(chi2, dtype=np.float64), 1e-12)), snr, trend)

    def broadening_excess(self, broadening: np.ndarray, snr: np.ndarray | None) -> np.ndarray:
        """The standardised excess of the (signed) broadening statistic over its S/N trend (NaN without a
        trend: a model fitted before the test)."""
        b = np.asarray(broadening, dtype=np.float64)
        if len(self.broadening_trend) != 5:
            return np.full(b.shape, np.nan)
        return self._excess(b, snr, self.broadening_trend)

    def uncertainty_excess(self, sigma_norm: np.ndarray, snr: np.ndarray | None) -> np.ndarray:
        """Per star: the largest standardised excess of a label's log sigma over its S/N trend."""
        sig = np.asarray(sigma_norm, dtype=np.float64)
        t = np.clip(_snr_t(snr, len(sig)), self.sigma_t_range[0], self.sigma_t_range[1])
        out = np.full(len(sig), -np.inf)
        for j, (a, b, c, d, e) in enumerate(self.sigma_trend[: sig.shape[1]]):
            y = np.log(np.maximum(sig[:, j], 1e-12))
            out = np.maximum(out, (y - (a + b * t + c * t * t)) / np.exp(d + e * t))
        return out


LABEL_REFERENCE_FILE = "label_reference.safetensors"


def label_sparsity(reference: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``z`` (N, L): the Euclidean distance to its ``k``-th nearest row of ``reference`` (M, L),
    both in normalised label units; NaN for a row with a non-finite label (other tests see those).

    A k-d tree query: about 10 microseconds a star on one core against 5,000 reference stars in five
    labels (the tree itself is built in about a millisecond)."""
    from scipy.spatial import cKDTree

    z = np.asarray(z, dtype=np.float64)
    out = np.full(len(z), np.nan)
    ok = np.isfinite(z).all(axis=1)
    ref = np.asarray(reference, dtype=np.float64)
    if not ok.any() or len(ref) == 0:
        return out
    kk = int(min(max(k, 1), len(ref)))
    d, _ = cKDTree(ref).query(z[ok], k=[kk])
    out[ok] = d[:, 0]
    return out


# A label takes part in the distance only where at least this share of the reference stars has it (a
# survey's lithium, say, is mostly upper limits); reference stars missing one of those labels are left out.
LABEL_REFERENCE_MIN_FINITE = 0.5


def _label_z(stats: dict, labels: list[str], mean: np.ndarray) -> np.ndarray:
    idx = [stats["label_names"].index(k) for k in labels]
    mu = np.asarray(stats["labels"]["mean"], dtype=np.float64)[idx]
    sd = np.asarray(stats["labels"]["std"], dtype=np.float64)[idx]
    return (np.asarray(mean, dtype=np.float64) - mu) / sd


def _snr_t(snr: np.ndarray | None, n: int) -> np.ndarray:
    if snr is None:
        return np.zeros(n)
    snr = np.asarray(snr, dtype=np.float64)
    return np.log(np.where(np.isfinite(snr) & (snr > 0), snr, CHI2_PIVOT_SNR) / CHI2_PIVOT_SNR)


CHI2_TREND_BINS = 8


def chi2_trend(t: np.ndarray, y: np.ndarray) -> list[float]:
    """[a, b, c, d, e]: median log chi2 ``a + b t + c t^2`` and robust spread ``exp(d + e t)``, fitted to
    the medians and MADs of :data:`CHI2_TREND_BINS` equal-count bins of ``t`` (medians: the outliers
    these tests exist to find do not pull the trend)."""
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if t.size < 4 * CHI2_TREND_BINS:
        med = float(np.median(y)) if t.size else 0.0
        mad = float(1.4826 * np.median(np.abs(y - med))) if t.size else 1.0
        return [med, 0.0, 0.0, float(np.log(max(mad, 1e-3))), 0.0]
    order = np.argsort(t, kind="stable")
    centres, meds, scales = [], [], []
    for chunk in np.array_split(order, CHI2_TREND_BINS):
        yc = y[chunk]
        med = np.median(yc)
        centres.append(np.median(t[chunk]))
        meds.append(med)
        scales.append(max(1.4826 * np.median(np.abs(yc - med)), 1e-3))
    centres = np.asarray(centres)
    if np.ptp(centres) < 1e-6:  # one S/N for all: no trend
        return [float(np.median(meds)), 0.0, 0.0, float(np.log(np.median(scales))), 0.0]
    c, b, a = np.polyfit(centres, meds, 2)
    e, d = np.polyfit(centres, np.log(scales), 1)
    return [float(a), float(b), float(c), float(d), float(e)]


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


def fit_thresholds(stats: dict, labels: list[str], xp: np.ndarray, scalars: np.ndarray, quality: np.ndarray,
                   mean: np.ndarray, epistemic: np.ndarray, rate: float, trained_missing: list[str] | None = None,
                   reads: set[str] = frozenset(BLOCKS), spectrum_chi2: np.ndarray | None = None,
                   line_chi2: np.ndarray | None = None, snr: np.ndarray | None = None,
                   map_score: np.ndarray | None = None, chi2_pool: dict | None = None,
                   sigma_norm: np.ndarray | None = None,
                   label_reference: np.ndarray | None = None,
                   line_broadening: np.ndarray | None = None) -> TrustThresholds:
    """Thresholds under which all tests together flag ``rate`` of the validation stars.

    Args:
        stats: the features' normalisation statistics (training split).
        labels: label names, in the columns' order of ``mean``.
        xp, scalars: the validation stars' normalised inputs.
        quality: their quality bits.
        mean: (N, L) their physical predicted labels (for the threshold-free tests).
        epistemic: (N, L) the ensemble members' spread of the normalised means.
        rate: the false-flag rate of all tests together.
        trained_missing: input blocks the model was trained to do without.
        reads: the input blocks the model reads (:func:`blocks_read`).
        spectrum_chi2, line_chi2: the emulator's statistics of the validation stars (None: tests off).
        snr: their S/N (the chi-square tests are on the excess over a trend in S/N).
        map_score: their selection-map scores (None or all NaN: the map test keeps train_like).
        chi2_pool: more stars' ``spectrum_chi2``, ``line_chi2`` and ``snr`` (the trainer passes a
            hash-chosen sample of training stars), fitted with the validation stars' for the chi-square
            trends and thresholds: a tail quantile of a few hundred stars is a handful of values, and
            the emulator's 21 numbers per pixel hardly fit any one star.
        sigma_norm: (N, L) the network's uncalibrated uncertainties, normalised units (None: the
            uncertainty test is off).
        label_reference: (M, L) training stars' normalised catalogue labels, in ``labels`` order (None:
            the label-density test is off).
        line_broadening: the emulator's broadening statistic of the validation stars (None: test off);
            the pool's ``line_broadening``, where given, joins it as for the chi-squares.
    """
    n = len(xp)
    ref = np.median(epistemic, axis=0) if len(epistemic) else np.ones(epistemic.shape[1])
    base = TrustThresholds(false_flag_rate=rate, disagreement_ref=[float(r) for r in ref],
                           trained_missing=list(trained_missing or []), n_validation=int(n))
    excess = input_excess(stats, xp, scalars, quality)
    disagree = disagreement_statistic(epistemic, ref)
    spec_res = line_res = broad_res = None
    if spectrum_chi2 is not None and line_chi2 is not None:
        pool = chi2_pool or {}
        all_snr = np.concatenate([np.asarray(snr if snr is not None else np.full(n, np.nan), np.float64),
                                  np.asarray(pool.get("snr", []), np.float64)])
        all_spec = np.concatenate([np.asarray(spectrum_chi2, np.float64), np.asarray(pool.get("spectrum_chi2", []))])
        all_line = np.concatenate([np.asarray(line_chi2, np.float64), np.asarray(pool.get("line_chi2", []))])
        t = _snr_t(all_snr, len(all_snr))
        if len(t) >= 10:
            base.chi2_t_range = [float(v) for v in np.quantile(t, [0.02, 0.98])]
        tc = np.clip(t, *base.chi2_t_range)
        base.spectrum_trend = chi2_trend(tc, np.log(np.maximum(all_spec, 1e-12)))
        base.line_trend = chi2_trend(tc, np.log(np.maximum(all_line, 1e-12)))
        base.n_chi2_fit = int(len(all_snr))
        spec_res = base.chi2_excess(all_spec, all_snr, base.spectrum_trend)
        line_res = base.chi2_excess(all_line, all_snr, base.line_trend)
        if line_broadening is not None:
            pool_b = pool.get("line_broadening")
            all_b = np.concatenate([np.asarray(line_broadening, np.float64),
                                    np.asarray(pool_b if pool_b is not None else np.full(len(all_snr) - n, np.nan),
                                               np.float64)])
            base.broadening_trend = chi2_trend(tc, all_b)
            broad_res = base.broadening_excess(all_b, all_snr)
    unc = None
    if sigma_norm is not None and len(sigma_norm):
        t = _snr_t(snr, n)
        base.sigma_t_range = [float(v) for v in np.quantile(t, [0.02, 0.98])] if n >= 10 else [0.0, 0.0]
        tc = np.clip(t, *base.sigma_t_range)
        sig = np.asarray(sigma_norm, dtype=np.float64)
        base.sigma_trend = [chi2_trend(tc, np.log(np.maximum(sig[:, j], 1e-12))) for j in range(sig.shape[1])]
        unc = base.uncertainty_excess(sig, snr)
    sparse = None
    if label_reference is not None and len(label_reference):
        ref = np.asarray(label_reference, dtype=np.float64)
        use = np.isfinite(ref).mean(axis=0) >= LABEL_REFERENCE_MIN_FINITE
        ref = ref[:, use]
        ref = ref[np.isfinite(ref).all(axis=1)]
        if use.any() and len(ref) > base.label_k:
            base.label_reference = ref
            base.label_columns = [lab for lab, u in zip(labels, use) if u]
            sparse = label_sparsity(ref, _label_z(stats, base.label_columns, mean[:, use]), base.label_k)
    neg_score = None
    if map_score is not None and np.isfinite(np.asarray(map_score, dtype=np.float64)).any():
        neg_score = -np.asarray(map_score, dtype=np.float64)

    def at(r: float) -> TrustThresholds:
        thr = replace(base, per_test_rate=float(r))  # shares base's fields (the label reference too)
        if sparse is not None:
            thr.label_density = _quantile_threshold(sparse, r)
        thr.input_excess = max(0.0, _quantile_threshold(excess, r))
        thr.disagreement = _quantile_threshold(disagree, r)
        if spec_res is not None:
            thr.spectrum_chi2 = _quantile_threshold(spec_res, r)
            thr.line_chi2 = _quantile_threshold(line_res, r)
        if broad_res is not None:
            thr.line_broadening = _quantile_threshold(broad_res, r)
        if neg_score is not None:
            thr.map_score = -_quantile_threshold(neg_score, r)
        if unc is not None:
            thr.uncertainty = _quantile_threshold(unc, r)
        return thr

    def flagged(thr: TrustThresholds) -> float:
        reason, _ = assess(stats, thr, labels, xp, scalars, quality, mean, epistemic, None, reads,
                           spectrum_chi2, line_chi2, snr, map_score, sigma_norm, line_broadening=line_broadening)
        return float((reason != 0).mean()) if n else 0.0

    lo, hi = 0.0, float(rate)
    if n == 0 or flagged(at(hi)) <= rate:
        return at(hi)
    for _ in range(30):  # the largest per-test rate whose union stays within ``rate`` (monotone in r)
        mid = 0.5 * (lo + hi)
        if flagged(at(mid)) <= rate:
            lo = mid
        else:
            hi = mid
    return at(lo)


def assess(stats: dict, thr: TrustThresholds | None, labels: list[str], xp: np.ndarray, scalars: np.ndarray,
           quality: np.ndarray, mean: np.ndarray, epistemic: np.ndarray,
           train_like: np.ndarray | None, reads: set[str] = frozenset(BLOCKS), spectrum_chi2: np.ndarray | None = None,
           line_chi2: np.ndarray | None = None, snr: np.ndarray | None = None,
           map_score: np.ndarray | None = None,
           sigma_norm: np.ndarray | None = None, sigma: np.ndarray | None = None,
           line_broadening: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
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
        train_like: (N,) the map's verdict, None or NaN where unknown; the map test where the model
            has no map-score threshold or a star no score.
        reads: the input blocks the model reads (:func:`blocks_read`).
        spectrum_chi2, line_chi2: the emulator's statistics at the predicted labels (None: not run).
        snr: (N,) S/N, for the chi-square tests' S/N trend.
        map_score: (N,) selection-map scores (NaN where unknown).
        sigma_norm: (N, L) the network's uncalibrated uncertainties, normalised (None: not tested).
        sigma: (N, L) the published (calibrated, physical) uncertainties, for the precision test (None:
            not tested -- so at train time, before calibration, the test stays out of the budget).
        line_broadening: (N,) the emulator's broadening statistic (None: not run).

    Returns:
        (ood_reason int32 (N,), withheld bool (N, L)).
    """
    n = len(mean)
    reason = np.zeros(n, dtype=np.int32)
    map_flag = np.zeros(n, dtype=bool)
    if train_like is not None:
        map_flag |= np.asarray(train_like, dtype=np.float64) == 0.0
    if thr is not None and np.isfinite(thr.map_score) and map_score is not None:
        sc = np.asarray(map_score, dtype=np.float64)
        map_flag = np.where(np.isfinite(sc), sc < thr.map_score, map_flag)
    reason |= np.where(map_flag, OOD_MAP, 0).astype(np.int32)
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
        for values, trend, limit, bit in ((spectrum_chi2, thr.spectrum_trend, thr.spectrum_chi2, OOD_SPECTRUM),
                                          (line_chi2, thr.line_trend, thr.line_chi2, OOD_LINES)):
            if values is not None and np.isfinite(limit):
                res = thr.chi2_excess(values, snr, trend)
                reason |= np.where(np.nan_to_num(res, nan=-np.inf) > limit, bit, 0).astype(np.int32)
        if line_broadening is not None and np.isfinite(thr.line_broadening):
            res = thr.broadening_excess(line_broadening, snr)
            reason |= np.where(np.nan_to_num(res, nan=-np.inf) > thr.line_broadening,
                               OOD_BROADENING, 0).astype(np.int32)
        if sigma_norm is not None and thr.sigma_trend and np.isfinite(thr.uncertainty):
            res = thr.uncertainty_excess(sigma_norm, snr)
            reason |= np.where(np.nan_to_num(res, nan=-np.inf) > thr.uncertainty, OOD_UNCERTAINTY, 0).astype(np.int32)
        if (thr.label_reference is not None and np.isfinite(thr.label_density) and thr.label_columns
                and set(thr.label_columns) <= set(labels)):
            cols = [labels.index(lab) for lab in thr.label_columns]
            d = label_sparsity(thr.label_reference, _label_z(stats, thr.label_columns, np.asarray(mean)[:, cols]),
                               thr.label_k)
            reason |= np.where(np.nan_to_num(d, nan=-np.inf) > thr.label_density,
                               OOD_LABEL_DENSITY, 0).astype(np.int32)
        if sigma is not None and thr.precision_limit:
            s = np.asarray(sigma, dtype=np.float64)
            over = np.zeros(n, dtype=bool)
            for j, lab in enumerate(labels):
                if lab in thr.precision_limit:
                    over |= np.nan_to_num(s[:, j], nan=0.0) > thr.precision_limit[lab]
            reason |= np.where(over, OOD_IMPRECISE, 0).astype(np.int32)
    return reason, withheld


def fit_precision_limits(residual: np.ndarray, sigma: np.ndarray, label_err: np.ndarray, labels: list[str],
                         catastrophic: dict[str, float], odds: float) -> tuple[dict[str, float], float]:
    """The ``imprecise`` test's limits: per label, the calibrated uncertainty above which a catastrophic
    error is more likely than ``odds``, read off held-out stars.

    A Gaussian error bar makes a 2.6-sigma error a 1 % event; the network's errors have heavier tails
    (more so away from the label set's mix), so the odds come from the held-out stars' own z-scores:
    q = the (1 - odds) quantile of |z| pooled over the labels in ``catastrophic`` (pooled because a
    validation split of a few hundred stars holds a handful of 1 % tail values per label, and the
    tails' shape is the network's, not a label's), never below the Gaussian value. A label's limit is
    its catastrophic error over q.

    Args:
        residual, sigma, label_err: (N, L) predicted minus catalogue label, the calibrated uncertainty
            and the label survey's own error (physical units; NaN where a label is missing).
        labels: the L label names.
        catastrophic: label -> the size of a catastrophic error (physical units).
        odds: the accepted odds of a catastrophic error behind a published error bar.

    Returns:
        (label -> limit, for the labels of ``catastrophic`` the model predicts; q).
    """
    from scipy.stats import norm

    q_gauss = float(norm.isf(odds / 2.0))
    r = np.asarray(residual, dtype=np.float64)
    var = np.asarray(sigma, dtype=np.float64) ** 2 + np.nan_to_num(np.asarray(label_err, dtype=np.float64)) ** 2
    cols = [j for j, k in enumerate(labels) if k in catastrophic]
    z = np.abs(r[:, cols] / np.sqrt(np.maximum(var[:, cols], 1e-300))).ravel() if cols else np.zeros(0)
    z = z[np.isfinite(z)]
    q = q_gauss if z.size == 0 else max(q_gauss, float(np.quantile(z, 1.0 - odds)))
    return {labels[j]: float(catastrophic[labels[j]]) / q for j in cols}, q


def describe_bits() -> str:
    """One line per ood_reason bit, for headers and --help."""
    return "; ".join(f"{bit} {name}: {text}" for name, (bit, text) in OOD_BITS.items())
