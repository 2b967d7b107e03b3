"""The model card: what a registered version is, what it was trained on, how well it does, where not to
trust it. Written as the registered version's description (and as ``model_card.md`` in its run), so the
registry itself answers "can I use this model on my stars?".
"""

from __future__ import annotations

import numpy as np

from stellar.ensemble import SNR_BINS
from stellar.features import SCALAR_NAMES

SECTIONS = ("Model", "Training data", "Valid ranges", "Test metrics", "Calibration", "Trust flags", "Known limits")


def _bin_names() -> list[tuple[str, str]]:
    out = [("all", "all")]
    for lo, hi in SNR_BINS:
        out.append((f"snr_{lo:g}_{hi:g}", f"{lo:g}-{hi:g}" if np.isfinite(hi) else f"> {lo:g}"))
    return out


def model_card(ens, metrics: dict, features_counts: dict, cfg, identity: dict | None = None) -> str:
    """Markdown model card of a trained ensemble.

    ``metrics``: :func:`stellar.ensemble.evaluate` on the test split; ``features_counts``: the features
    manifest's counts (splits, cuts); ``cfg``: the run's config (label cuts, selection); ``identity``:
    what is known of where it is registered."""
    meta = ens.meta
    stats = ens.stats
    lines = [f"# stellar model card: {ens.cfg.name} ensemble, {len(ens.nets)} members", ""]
    lines += ["## Model", "",
              f"* instrument `{meta.get('instrument', '')}`; labels {', '.join(ens.labels)}; inputs: RVS spectrum "
              f"({stats['n_spectrum']} pixels after rebinning by {stats.get('rebin', '')})"
              + (f", {2 * stats['xp_bases']} XP coefficients" if ens.cfg.use_xp else "")
              + (f", scalars {', '.join(SCALAR_NAMES)}" if ens.cfg.use_scalars else ""),
              f"* code: stellar git commit `{meta.get('git_commit', '')}`; config digest `{meta.get('config_digest', '')}`;"
              f" train digest `{meta.get('train_digest', '')}`",
              f"* members kept {meta.get('members')}, dropped {meta.get('dropped')} ({meta.get('drop_rule', '')});"
              f" seeds {meta.get('seeds')}", ""]
    c = features_counts
    cuts = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("cut:")}
    catalogues = ", ".join(str(lab.catalogue) + " (" + str(lab.path).rsplit("/", 1)[-1] + ")"
                           for lab in getattr(cfg.ingest, "labels", [])) or "none"
    lc = cfg.preprocess.label_cuts
    lines += ["## Training data", "",
              f"* label catalogues: {catalogues}",
              f"* stars with a label row {c.get('with_label_row', 0)}, passing the cuts {c.get('usable_labels', 0)}: "
              f"train {c.get('split:train', 0)}, validation {c.get('split:validation', 0)}, test "
              f"{c.get('split:test', 0)}; features version `{meta.get('features_version', '')}`",
              f"* label cuts: label S/N >= {lc.min_snr}, ASPCAPFLAG bits {lc.aspcapflag_bad_bits}, STARFLAG bits "
              f"{lc.starflag_bad_bits}, required labels {lc.required_labels or ens.labels}, physical envelope"
              + ("; removed: " + ", ".join(f"{k} {v}" for k, v in sorted(cuts.items())) if cuts else ""), ""]
    lines += ["## Valid ranges", "", "| label | training min | training max |", "|---|---|---|"]
    idx = [stats["label_names"].index(k) for k in ens.labels]
    for j, lab in zip(idx, ens.labels):
        lines.append(f"| {lab} | {stats['labels']['min'][j]:.3g} | {stats['labels']['max'][j]:.3g} |")
    lines += ["", "Input ranges: XP and scalar features beyond the training stars' range by more than a "
              "validation-calibrated margin set the `input_range` bit of `ood_reason`.", ""]
    lines += ["## Test metrics", "", "RMSE (z-score spread) on the test split, by S/N:", "",
              "| label | " + " | ".join(name for _, name in _bin_names()) + " |",
              "|---|" + "---|" * len(_bin_names())]
    for lab in ens.labels:
        cells = []
        for key, _ in _bin_names():
            r, z, n = (metrics.get(f"{lab}/{key}/{m}") for m in ("rmse", "z_std", "n"))
            cells.append("-" if r is None else f"{r:.3g} ({z:.2f}, n={n})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    sc = ens.snr_calibration()
    lines += ["", "## Calibration", "",
              "Uncertainties are the ensemble's (members' variance + spread) times a factor per label that varies "
              "with log S/N and the predicted labels, fitted on the held-out stars the trust tests keep "
              + (f"({meta['calibration_stars']['kept']} of the {meta['calibration_stars']['validation']} validation "
                 f"and {meta['calibration_stars']['test']} test stars, after the test metrics above were taken "
                 "with a fit on the validation stars alone). " if meta.get("calibration_stars") else
                 "(the validation stars). ") +
              "All-S/N factors: " + ", ".join(f"{lab} {f:.3f}" for lab, f in zip(ens.labels, ens.calibration)) + "; "
              f"pivot S/N {sc.get('pivot')}. Error floors added in quadrature (the errors the network's "
              "sigma does not shrink below, chosen by likelihood on the same stars, each with its own factor "
              "for the kind of star; 0: none): "
              + ", ".join(f"{lab} {f:.3g}" for lab, f in zip(ens.labels, ens.sigma_floor * ens.label_std)) + ".", ""]
    cc = meta.get("calibration_copies")
    if cc:
        excess = cc.get("noise_excess")
        lines += [f"The fit's faint end came from {cc.get('made')} fainter copies of the validation stars "
                  f"({cc.get('copies')} per star, weighing together what the star weighs). Measured on the "
                  f"validation stars against the spectrum emulator: the spectra's real noise is "
                  f"{np.sqrt(excess):.2f}x their quoted flux errors (variance ratio {excess:.2f}; neighbouring "
                  f"pixels correlated {cc.get('noise_lag1')}); "
                  + ("the quoted errors look honest." if excess < 1.1 else
                     "the survey's quoted flux errors understate its noise.")
                  + f" S/N falls as exp({cc.get('dln_snr_dG')} G) and the parallax error grows as "
                  f"exp({cc.get('dln_parallax_error_dG')} G) in this survey.", ""]
    corrected = [lab for lab, row in zip(ens.labels, ens.mean_coef) if np.any(row)]
    lines += ["Mean correction (a quadratic in the predicted Teff and log g, fitted on the validation stars' "
              "labels, kept where a 2-fold cross-validation says it helps): "
              + (", ".join(corrected) if corrected else "none kept") + ".", ""]
    lines += ["## Trust flags", "",
              "`ood` is true where any test flags the star; `ood_reason` says which (bits in the predictions' "
              "column descriptions). Free thresholds were set on the validation split at a "
              f"{cfg.train.ood_false_flag_rate:.1%} false-flag budget; `imprecise` flags labels whose calibrated "
              f"uncertainty leaves a catastrophic error more likely than {cfg.train.catastrophic_odds:.1%}. "
              + ("The model carries the training run's t-SNE selection map: `train_like` works on any survey."
                 if ens.selection_map is not None else "The model carries no selection map: `train_like` is "
                 "null outside the training run."), ""]
    lines += ["## Known limits", "",
              "* Trained on labels of one catalogue's scale: biases of that catalogue carry over.",
              "* Outside the valid ranges the labels extrapolate (`label_range` bit); a star missing XP, BP, RP, "
              "parallax or photometry gets the `missing_input` bit where the model reads that block.",
              "* Binaries, hot stars and stars beyond the training grid are caught by the spectrum-consistency "
              "and map tests, not by the labels themselves.",
              "* Metal-poor giants at low S/N are the sparsest corner of typical training sets: their log g is "
              "pulled towards denser regions; check `ood` and the uncertainties.", ""]
    if identity:
        lines += [f"Registered as `{identity.get('name')}` version {identity.get('version')}, run "
                  f"`{identity.get('run_id')}`.", ""]
    return "\n".join(lines)
