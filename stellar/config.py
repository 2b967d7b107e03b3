"""Typed, validated configuration.

One YAML file (``conf/local.yaml`` is the embedded default) describes where
data live, how Spark and MLflow are reached and the parameters of every stage.
Unknown keys and bad values fail on load with a message that names the key,
and ``--set section.key=value`` overrides are applied before validation so
they are checked the same way. ``{work_dir}`` in any string is replaced by the
resolved work folder, so one setting moves every table.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stellar.errors import ConfigError

CONF_DIR_ENV = "STELLAR_CONF_DIR"


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number (int, float, or an optional one) and not also a bool."""
    import types
    import typing

    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment, and a
    boolean is never read as a number (pydantic would take ``true`` for 1: ``ingest.chunk_mb=true``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info) -> Any:
        if isinstance(value, bool) and info.field_name and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value


class SparkConfig(StrictModel):
    """The ``spark`` section: master, app name, driver memory, log level and extra ``spark.*`` settings of
    the sessions stellar builds."""

    master: str = "local[*]"
    app_name: str = "stellar"
    driver_memory: str = "4g"
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "WARN"
    # Passed through verbatim to SparkSession.builder.config(); keys must start with "spark.".
    conf: dict[str, str] = Field(default_factory=dict)

    @field_validator("conf", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, dict):
            bad = [k for k in value if not str(k).startswith("spark.")]
            if bad:
                raise ValueError(f"keys must start with 'spark.', got {bad}")
            return {str(k): _spark_str(v) for k, v in value.items()}
        return value

    @field_validator("driver_memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"\d+[kmgtKMGT]?", value):
            raise ValueError(f"expected a JVM memory size such as '4g', got {value!r}")
        return value


def _spark_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class MlflowConfig(StrictModel):
    """The ``mlflow`` section: the tracking store, where new experiments keep artifacts, the experiment and
    the registered model name."""

    # MLFLOW_TRACKING_URI in the environment wins over the file (--set wins over both)
    tracking_uri: str = "sqlite:///{work_dir}/mlflow.db"
    # where new experiments keep artifacts; null: the tracking server's own store (mlflow server
    # --artifacts-destination), what a shared server wants
    artifact_root: str | None = "{work_dir}/mlartifacts"
    experiment: str = "stellar"
    model_name: str = "stellar-hybrid"


class RealismConfig(StrictModel):
    """What real survey data has beyond photon noise and the defects every variant gets.

    All off by default (the demo survey). ``synth.realism: hard`` loads ``conf/realism/hard.yaml``,
    the benchmark variant that no threshold or model setting is tuned on."""

    # Multiplies the dust layer's A_V (2 puts A0 up to ~3 mag along the disc); the 862 nm DIB,
    # reddened XP and photometry follow it.
    extinction_scale: float = Field(1.0, ge=0.0, le=5.0)
    # Gaussian sigma, in instrument pixels, of the kernel that correlates the pixel noise (resampling
    # of epoch spectra); the published errors, like Gaia's, say nothing of it. 0: white noise.
    noise_correlation_px: float = Field(0.0, ge=0.0, le=5.0)
    # Standard deviation of the radial velocity left in the "rest-frame" spectrum.
    rv_residual_kms: float = Field(0.0, ge=0.0, le=20.0)
    # RMS of a smooth multiplicative continuum error (normalisation residuals), three low-order terms.
    continuum_wiggle: float = Field(0.0, ge=0.0, le=0.1)
    # Share of in-distribution dwarfs and subgiants that rotate fast (vbroad 15-60 km/s).
    fast_rotator_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # The label survey's preference for bright stars: a star's chance of a catalogue label scales as its
    # RVS S/N to this power (normalised so that ``training_fraction`` still holds on average). A label
    # survey observes at high resolution, so its stars are mostly brighter than the RVS catalogue's; at
    # 0.5 the labelled stars' median S/N is ~1.6x the catalogue's. 0: labels regardless of brightness.
    label_snr_power: float = Field(0.0, ge=0.0, le=2.0)
    # Double-lined binaries (the injected SB2 stars): the range of the components' velocity separation
    # |dv| in km/s. The RVS resolution element is ~26 km/s; below it the lines only broaden and blend.
    sb2_dv_kms: tuple[float, float] = (40.0, 120.0)
    # SB2 secondaries as on the main sequence: 0.65-1 of the primary's Teff, light ratio ~ (Teff2/Teff1)^5
    # (0.17 at 0.7), their light blended into the colours and the XP spectra. Off: a secondary 0.8-1 of
    # the primary's Teff at a light ratio of 0.4-1 in the spectrum only.
    sb2_blend: bool = False
    # The injected hot stars' Teff range (K); the training set ends near 7,000 K.
    hot_teff: tuple[float, float] = (7500.0, 11500.0)
    # The injected extremely metal-poor stars' [M/H] range; the in-distribution population ends at -2.5.
    emp_m_h: tuple[float, float] = (-4.0, -3.0)
    # Share of the extremely metal-poor stars that are turn-off dwarfs (5,600-6,500 K) instead of giants.
    emp_dwarf_fraction: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("sb2_dv_kms", "hot_teff", "emp_m_h")
    @classmethod
    def _ranges(cls, v, info):
        limits = {"sb2_dv_kms": (0.0, 500.0), "hot_teff": (6000.0, 50000.0), "emp_m_h": (-5.0, -2.0)}[info.field_name]
        if not (limits[0] <= v[0] <= v[1] <= limits[1]):
            raise ValueError(f"{info.field_name} must be {limits[0]:g} <= low <= high <= {limits[1]:g}, got {list(v)}")
        return v


class SynthConfig(StrictModel):
    """The synthetic survey: population, defects and file layout."""

    n_stars: int = Field(20000, gt=0, le=200_000_000)
    seed: int = Field(42, ge=0)
    # Target stars per bulk file; files split the sky by HEALPix level-8 ranges
    # of equal expected star counts, as the Gaia archive does.
    stars_per_file: int = Field(2500, gt=0)
    # Share of in-distribution stars that have APOGEE-like training labels.
    training_fraction: float = Field(0.3, ge=0.0, le=1.0)
    # Share of stars that are out-of-distribution (hot, extremely metal-poor, SB2); never labelled.
    ood_fraction: float = Field(0.03, ge=0.0, le=0.5)
    missing_bp_fraction: float = Field(0.01, ge=0.0, le=1.0)
    nan_pixel_fraction: float = Field(0.05, ge=0.0, le=1.0)
    edge_spike_fraction: float = Field(0.005, ge=0.0, le=1.0)
    # Share of labelled stars whose label catalogue row carries a STAR_BAD-like flag.
    label_bad_fraction: float = Field(0.03, ge=0.0, le=1.0)
    # Faintest G_RVS of the sample; sets the low-S/N tail (about a third at S/N 15-25).
    grvs_limit: float = Field(14.1, gt=6.0, le=17.0)
    # ISA-L gzip level 0-3 (standard gzip output; level 1 matches zlib -1 in size, 3x faster).
    gzip_level: int = Field(1, ge=0, le=3)
    # Extra realism: a preset name under conf/realism/ (default, hard), a YAML path, or the fields inline.
    realism: RealismConfig = Field(default_factory=RealismConfig)
    output_dir: str = "{work_dir}/synth"

    @field_validator("realism", mode="before")
    @classmethod
    def _realism_preset(cls, v):
        if isinstance(v, str):
            return load_preset("realism", v, RealismConfig, label="synth.realism")
        return v


DEFAULT_ASTROMETRY_COLUMNS = [
    "source_id", "ra", "dec", "l", "b", "parallax", "parallax_error", "pmra", "pmdec", "ruwe",
    "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag", "phot_g_mean_flux", "phot_g_mean_flux_error",
    "bp_rp", "grvs_mag", "rvs_spec_sig_to_noise", "radial_velocity", "vbroad", "has_xp_continuous", "has_rvs",
]


class LabelInput(StrictModel):
    """One entry of ``ingest.labels``: a label catalogue file and the catalogue preset that maps its columns."""

    path: str
    catalogue: str = "apogee_dr17"  # preset under conf/catalogues/ (or a path to one)


class IngestConfig(StrictModel):
    """Inputs and layout of the ingest stage."""

    # Root of a Gaia archive bulk layout (gaia_source/, Spectroscopy/rvs_mean_spectrum/,
    # Spectroscopy/xp_continuous_mean_spectrum/); any of the three may be absent.
    gaia_root: str | None = "{work_dir}/synth"
    # DataLink / query products (files or folders): RVS CSV/FITS, XP_CONTINUOUS CSV/ECSV/FITS/VOTable, Parquet.
    datalink: list[str] = Field(default_factory=list)
    labels: list[LabelInput] = Field(default_factory=lambda: [
        LabelInput(path="{work_dir}/synth/labels/allStar-synth.fits")])
    healpix_order: int = Field(1, ge=0, le=12)
    astrometry_columns: list[str] = Field(default_factory=lambda: list(DEFAULT_ASTROMETRY_COLUMNS))
    keep_xp_correlations: bool = True
    # Text files above this many uncompressed MB are split into chunks parsed in parallel (big
    # files are also split when there are fewer of them than task slots).
    chunk_mb: int = Field(512, ge=1)
    # Above this share of quarantined rows (over all inputs) the run fails and commits nothing.
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    verify_md5: bool = True
    # Input files that may be lost whole: a file that cannot be read at all (not FITS, no table, no id
    # column, a label catalogue without a column its preset maps) fails the run unless listed here by
    # its name or path; listed, it is counted and quarantined as one file-level row and the run goes on.
    allow_unreadable: list[str] = Field(default_factory=list)
    output_dir: str = "{work_dir}/tables"

    @field_validator("astrometry_columns")
    @classmethod
    def _known_columns(cls, value: list[str]) -> list[str]:
        from stellar.io.gaia_schema import gaia_table

        known = set(gaia_table("gaia_source").names)
        unknown = [c for c in value if c not in known]
        if unknown:
            raise ValueError(f"not gaia_source columns: {unknown}")
        return value


class LabelCuts(StrictModel):
    """Quality cuts on training labels; failing rows stay in the features as observed stars."""

    min_snr: float | None = Field(70.0, ge=0)  # label survey S/N (APOGEE SNR); null: no cut
    aspcapflag_bad_bits: list[int] = Field(default_factory=lambda: [23])  # STAR_BAD
    starflag_bad_bits: list[int] = Field(default_factory=lambda: [3, 4])  # VERY_BRIGHT_NEIGHBOR, LOW_SNR
    flag_sp_must_be_zero: bool = True  # GALAH
    # Labels a star must have to train; default: the instrument's label set.
    required_labels: list[str] | None = None


class SplitConfig(StrictModel):
    """The ``preprocess.split`` section: train / validation / test shares (summing to 1) and the hash seed."""

    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        if abs(self.train + self.validation + self.test - 1.0) > 1e-9:
            raise ValueError("train + validation + test must be 1")
        return self


class PreprocessConfig(StrictModel):
    """Model-ready features from the ingested tables."""

    # Average this many pixels into one (Gaia's GSP-Spec: 3, 2401 -> 800; the last pixel is dropped).
    rebin: int = Field(3, ge=1, le=64)
    # Edge spikes: within this many pixels of either end, flux above 1 + spike_excess and
    # above spike_sigma errors is masked.
    edge_pixels: int = Field(30, ge=0)
    spike_excess: float = Field(0.25, gt=0)
    spike_sigma: float = Field(5.0, gt=0)
    # Quality bits only (rows are never dropped): masked share and S/N thresholds.
    max_masked_fraction: float = Field(0.2, ge=0, le=1)
    low_snr: float = Field(20.0, ge=0)
    # XP coefficients are divided by this flux scale: the G-band mean flux or each band's first coefficient.
    xp_scale: Literal["g_flux", "first_coefficient", "none"] = "g_flux"
    xp_truncate: bool = True  # zero the coefficients beyond n_relevant_bases
    xp_bases: int = Field(55, ge=1, le=55)
    label_cuts: LabelCuts = Field(default_factory=LabelCuts)
    split: SplitConfig = Field(default_factory=SplitConfig)
    output_dir: str = "{work_dir}/features"


class SelectConfig(StrictModel):
    """Training-sample selection map (t-SNE default, or UMAP) and the train-like flag."""

    method: Literal["tsne", "umap"] = "tsne"
    use_xp: bool = False  # embed spectrum + XP (default: the spectrum alone, as the reference analysis)
    pca_components: int = Field(50, ge=2, le=500)
    # Observed stars fitted with the training stars (hash-chosen, S/N-stratified); caps driver memory.
    observed_sample: int = Field(20000, ge=0)
    # ... and at most this many per training star in the fit set: a fit set swamped by observed stars
    # makes the training share among a star's neighbours noisy, and so the flags
    observed_per_training: float = Field(1.0, gt=0)
    # Training stars in the fit set (hash-chosen when there are more); the rest are placed like
    # observed stars. With observed_sample this bounds driver memory and the fit time.
    train_sample: int = Field(20000, ge=10)
    perplexity: int = Field(30, ge=2)  # t-SNE perplexity / UMAP n_neighbors
    neighbours: int = Field(20, ge=1)  # k for the train-like score
    # train_like when (share of training stars among the k map neighbours) / (their share in the fit set) >= this
    threshold: float = Field(0.5, ge=0)
    seed: int = Field(0, ge=0)
    # Stars placed per transform call (fixed by the data, so results do not depend on the cluster).
    place_batch: int = Field(10000, ge=100)
    # openTSNE negative-gradient method of the placement: fft (fast at any size) or bh (Barnes-Hut)
    place_gradient: Literal["fft", "bh"] = "fft"
    output_dir: str = "{work_dir}/selection"


class TrainConfig(StrictModel):
    """The deep ensemble: architecture preset, members, seeds, registration."""

    model: str = "hybrid"  # preset under conf/models/ (hybrid, rave2020, gaia_eso2023) or a YAML path
    # Per-run changes to the preset, e.g. {max_epochs: 10}; validated against the model schema.
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    members: int = Field(5, ge=1, le=100)
    seed: int = Field(0, ge=0)
    # Members whose best validation loss exceeds median + this many robust sigmas are dropped.
    outlier_mad: float = Field(3.0, gt=0)
    threads_per_member: int = Field(1, ge=1)
    # auto: the task's Spark-assigned GPU where there is one, else CPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    register_model: bool = True
    alias: str = "challenger"
    # Share of held-out (validation) stars that all out-of-distribution tests together may flag; each test
    # with a free threshold takes an equal share of it (stellar.trust.fit_thresholds).
    ood_false_flag_rate: float = Field(0.01, gt=0, lt=0.5)
    # The ``imprecise`` ood bit: what a catastrophic error is (physical units, per label), and the odds
    # of one that a published error bar may leave. A label's limit is its catastrophic error over the
    # validation stars' |z| quantile at those odds (stellar.trust.fit_precision_limits), so the test
    # follows the network's real error tails, not a Gaussian's. {} turns it off.
    catastrophic_errors: dict[str, float] = Field(default_factory=lambda: {"teff": 1000.0, "logg": 1.0,
                                                                             "m_h": 0.5, "fe_h": 0.5})
    catastrophic_odds: float = Field(0.01, gt=0, lt=0.5)
    # The uncertainty calibration's faint end: this many fainter copies of each validation star
    # (stellar.train.calibration_stars: the star moved further away, its spectrum, G and parallax as
    # noisy as the survey's own at the S/N drawn); 0 = the validation stars alone.
    calibration_copies: int = Field(4, ge=0, le=32)

    @field_validator("catastrophic_errors")
    @classmethod
    def _positive_limits(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not (math.isfinite(x) and x > 0)}
        if bad:
            raise ValueError(f"catastrophic_errors must be positive and finite, got {bad}")
        return v


_ALIAS = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$|^[0-9]{1,9}$"


class PredictConfig(StrictModel):
    """Applying a registered ensemble to the whole features table."""

    # alias (resolved once, at the start) or version number of mlflow.model_name
    model: str = Field("champion", pattern=_ALIAS)
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: the task's Spark-assigned GPU, else CPU
    # auto: fp16 autocast on GPU when the first sub-batch agrees with fp32 within amp_tolerance, else fp32
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    amp_tolerance: float = Field(0.02, gt=0)  # max |mixed - fp32| of the mean, in units of its sigma
    batch_size: int = Field(64, ge=1)  # rows per forward on CPU (cache-sized: larger is slower on CPU)
    gpu_batch_size: int = Field(16384, ge=1)  # rows per forward on GPU
    arrow_batch_rows: int = Field(10000, ge=1)  # rows per Arrow batch handed to a Python worker
    output_dir: str = "{work_dir}/predictions"

    @field_validator("model", mode="before")
    @classmethod
    def _version_number(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class PromoteConfig(StrictModel):
    """When a challenger may replace the champion (both evaluated on the same held-out test stars)."""

    challenger: str = Field("challenger", pattern=_ALIAS)
    champion: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # an alias, never a number
    # every label's test RMSE must be <= this times the champion's
    max_rmse_ratio: float = Field(1.0, gt=0)
    # every label's test z-score spread must lie within 1 +- this (calibrated uncertainties)
    max_z_std_error: float = Field(0.25, gt=0)
    min_test_stars: int = Field(30, ge=1)

    @field_validator("challenger", mode="before")
    @classmethod
    def _version_number(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class StellarConfig(StrictModel):
    """The whole YAML config: work folder, instrument preset and one section per stage; ``{work_dir}`` in
    its strings is expanded on validation."""

    work_dir: str = "./work"
    instrument: str = "gaia_rvs"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    # Directory the config was loaded from: instrument presets are looked up under it.
    conf_dir: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _expand(self) -> "StellarConfig":
        work = str(Path(os.path.expanduser(self.work_dir)).resolve())
        object.__setattr__(self, "work_dir", work)
        _expand_placeholders(self, work)
        return self

    def digest(self) -> str:
        """A short hash of the effective config; recorded with outputs for provenance."""
        payload = json.dumps(self.model_dump(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _expand_placeholders(model: BaseModel, work: str) -> None:
    """Replace {work_dir} in every string of every (nested) section."""

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{work_dir}", work)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, BaseModel):
            _expand_placeholders(value, work)
        return value

    for name in type(model).model_fields:
        value = getattr(model, name)
        new = fix(value)
        if new is not value and not isinstance(value, BaseModel):
            object.__setattr__(model, name, new)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so numbers and booleans keep their type."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. spark.master=local[2]")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    # spark.conf keys contain dots themselves: spark.conf.spark.sql.x=1 sets conf["spark.sql.x"].
    if len(path) > 2 and path[:2] == ["spark", "conf"]:
        path = ["spark", "conf", ".".join(path[2:])]
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if err["type"] == "extra_forbidden" or isinstance(got, dict) or repr(got) in msg else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def preset_dirs(kind: str, conf_dir: str | None = None) -> list[Path]:
    """Folders searched for ``conf/<kind>/<name>.yaml`` presets: beside the loaded config, then
    ``$STELLAR_CONF_DIR``, then the repository's ``conf/``."""
    roots = [conf_dir, os.environ.get(CONF_DIR_ENV), str(Path(__file__).resolve().parent.parent / "conf")]
    return [Path(r) / kind for r in roots if r]


def load_preset(kind: str, name: str, model: type[BaseModel], conf_dir: str | None = None, label: str = ""):
    """Load and validate a preset by name (``conf/<kind>/<name>.yaml``) or by YAML path."""
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    candidates += [d / f"{name}.yaml" for d in preset_dirs(kind, conf_dir)]
    for path in candidates:
        if path.is_file():
            try:
                return model.model_validate(yaml.safe_load(path.read_text()))
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            except ValidationError as exc:
                raise ConfigError(_format_validation_error(str(path), exc)) from None
            except ValueError as exc:  # cross-field checks in model_post_init
                raise ConfigError(f"{path}: {exc}") from None
    searched = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{label or kind} preset {name!r} not found (looked in: {searched})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> StellarConfig:
    """Load and validate a config file, applying ``KEY=VALUE`` overrides first."""
    data: dict[str, Any] = {}
    source = "defaults"
    conf_dir = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = copy.deepcopy(loaded)
        source = str(p)
        conf_dir = str(p.resolve().parent)
    if os.environ.get("MLFLOW_TRACKING_URI"):  # how cluster jobs are pointed at the shared server
        data.setdefault("mlflow", {})
        if not isinstance(data["mlflow"], dict):
            raise ConfigError(f"{source}: section 'mlflow' must be a mapping")
        data["mlflow"]["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    data["conf_dir"] = conf_dir or os.environ.get(CONF_DIR_ENV, "")
    try:
        return StellarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
