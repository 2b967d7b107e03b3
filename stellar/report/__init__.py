"""The science report: one HTML page with PNG figures beside it, logged to the model's MLflow run.

Figures (each also saved as the numbers it plots, in ``report.json``, so tests
and users can check content, not pixels):

* Kiel diagram (Teff-log g coloured by [M/H]) of train-like stars;
* [alpha/M] vs [M/H] density in bins of Galactocentric R and |Z| (astropy
  coordinates from ra, dec and parallax): the thin/thick disc bimodality;
* the [alpha/M] histogram at fixed [M/H], predictions beside the training labels;
* residuals vs S/N per label on the test split, and calibration curves;
* the selection map (training, observed train-like, train-unlike);
* saliency: mean d(label)/d(flux) over the spectrum, lines marked;
* counts per stage (in, out, quarantined, flagged).

The figures are ``figures.py`` (one function each); the page is the ``page.html`` template (Jinja2,
autoescaped).

A report whose inputs (the committed table versions, the model, where it is
logged, the stellar version) have not changed since its last complete build is
not rebuilt: ``_built.json`` records them once the page is written and logged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stellar import __version__
from stellar.config import StellarConfig
from stellar.errors import StellarError
from stellar.report.figures import (ALPHA_EDGES, BIMODAL_MH, UNITS, Page, _ensemble, _plt, _residuals,  # noqa: F401
                                    _saliency, accuracy_table, alpha_mh, bimodality, galactocentric, kiel,
                                    one_to_one, residuals_snr, selection_map)
from stellar.stage import StageResult
from stellar.tables import TableStore, read_table, settings_hash


class ReportError(StellarError):
    """A report that cannot be built, e.g. no committed predictions."""


BUILT = "_built.json"

# The figures of the page, in page order (each draws nothing where its inputs are absent).
FIGURES = (kiel, alpha_mh, one_to_one, residuals_snr, selection_map)


def report_inputs_digest(cfg: StellarConfig, model: dict, log_mlflow: bool) -> str:
    """What a report depends on: every committed table it reads, the model, and where it is logged."""
    versions = {name: TableStore(root).current_version() for name, root in (
        ("ingest", cfg.ingest.output_dir), ("preprocess", cfg.preprocess.output_dir),
        ("select", cfg.select.output_dir), ("predict", cfg.predict.output_dir))}
    return settings_hash({"tables": versions, "model": model.get("digest"), "run": model.get("run_id"),
                          "mlflow": cfg.mlflow.tracking_uri if log_mlflow else None, "v": __version__})


def _built_report(out: Path, digest: str) -> dict | None:
    """The last complete build in ``out`` if it was made from the same inputs and its files are all there."""
    try:
        built = json.loads((out / BUILT).read_text())
        data = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    files = [out / "index.html", *(out / f for f in built.get("figures", []))]
    if built.get("inputs_digest") != digest or not all(f.is_file() for f in files):
        return None
    return {"path": str(out / "index.html"), "figures": built["figures"], **data,
            "logged_to_run": built.get("logged_to_run"), "up_to_date": True}


def build_report(cfg: StellarConfig, out_dir: str | Path | None = None, log_mlflow: bool = True,
                 force: bool = False) -> dict:
    """Write the report into ``out_dir`` (default WORK_DIR/report) unless an up-to-date one is there
    (``force`` rebuilds it anyway). Returns the page's path, its figure files and the numbers behind them."""
    t0 = time.perf_counter()
    pstore = TableStore(cfg.predict.output_dir)
    pman = pstore.current_manifest()
    if pman is None:
        raise ReportError(f"no predictions under {cfg.predict.output_dir} (run 'stellar predict' first)")
    out = Path(out_dir or Path(cfg.work_dir) / "report")
    labels = pman["summary"]["labels"]
    model = pman["model"]
    digest = report_inputs_digest(cfg, model, log_mlflow)
    if not force and (done := _built_report(out, digest)):
        return done
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILT).unlink(missing_ok=True)  # a build that dies from here on is not taken for a finished one
    preds = read_table(cfg.predict.output_dir, "predictions").to_pandas()
    ok = preds["problem"].isna().to_numpy()
    like = preds["train_like"].fillna(False).to_numpy(dtype=bool) & ok
    # the labelled stars' labels, read once: the training-label histogram and the test-split residuals
    feats = read_table(cfg.preprocess.output_dir, "features",
                       ["source_id", "split", *labels, *[f"{lab}_err" for lab in labels]]).to_pandas()
    page = Page(cfg, out, labels, preds, ok, like, feats, plt=_plt(),
                data={"model": model, "labels": labels, "rows": len(preds), "train_like": int(like.sum())})
    for draw in FIGURES:
        draw(page)
    data, figures = page.data, page.figures

    # saliency and the residual spectra of flagged stars: where the network looks, and where the
    # spectra of stars it should not be trusted on leave the emulated ones
    ens = _ensemble(cfg, model)
    figures_sal, sal = _saliency(cfg, ens, preds[like]["source_id"].to_numpy()[:512], out, labels)
    if figures_sal:
        figures.append(figures_sal)
        data["saliency"] = sal
    figures_res, res = _residuals(cfg, ens, preds[ok], out, labels)
    if figures_res:
        figures.append(figures_res)
        data["residual_spectra"] = res

    data["counts"] = stage_counts(cfg)
    data["trust"] = trust_summary(preds)
    data["provenance"] = run_provenance(cfg, model)
    data["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "index.html").write_text(render_page(data, figures, out))
    if log_mlflow and model.get("run_id") not in (None, "", "none"):
        from stellar.registry import Registry

        Registry.from_config(cfg).log_artifacts(model["run_id"], out, "report")
        data["logged_to_run"] = model["run_id"]
    names = [f for f, _, _ in figures]
    (out / BUILT).write_text(json.dumps({"inputs_digest": digest, "figures": names,
                                         "logged_to_run": data.get("logged_to_run")}) + "\n")
    return {"path": str(out / "index.html"), "figures": names, **data}


def run_provenance(cfg: StellarConfig, model: dict) -> dict:
    """What made this page: code version and commit, date, the digest of the resolved config as the training
    run logs it (credentials redacted), the model, and the committed versions of the tables it reads."""
    import datetime

    from stellar.registry import redacted
    from stellar.stage import git_commit

    return {"stellar_version": __version__, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "config_digest": settings_hash(redacted(cfg.model_dump(mode="json"))),
            "instrument": str(cfg.instrument),
            "model": f"{model.get('name')} v{model.get('version')} (run {model.get('run_id')})",
            "tables": {name: TableStore(root).current_version() or "-" for name, root in (
                ("ingest", cfg.ingest.output_dir), ("preprocess", cfg.preprocess.output_dir),
                ("select", cfg.select.output_dir), ("predict", cfg.predict.output_dir))}}


def trust_summary(preds) -> dict:
    """The trust flags over the catalogue: stars predicted, withheld, ``ood`` and each ``ood_reason`` bit
    (stars per bit; a star may have several), train-like, and any label out of the training range."""
    import numpy as np

    from stellar.trust import OOD_BITS

    n = len(preds)
    predicted = int(preds["problem"].isna().sum())
    reason = preds["ood_reason"].fillna(0).to_numpy(np.int64) if "ood_reason" in preds else np.zeros(n, np.int64)
    bits = [{"name": name, "bit": bit, "stars": int(((reason & bit) != 0).sum()), "meaning": text}
            for name, (bit, text) in OOD_BITS.items()]
    ood = int(preds["ood"].fillna(False).astype(bool).sum()) if "ood" in preds else 0
    like = int(preds["train_like"].fillna(False).astype(bool).sum())
    oor = int((preds["out_of_range"].fillna(0).to_numpy(np.int64) != 0).sum()) if "out_of_range" in preds else 0
    return {"rows": n, "predicted": predicted, "withheld": n - predicted, "ood": ood,
            "not_ood": predicted - ood, "train_like": like, "out_of_range": oor, "bits": bits}


def stage_counts(cfg: StellarConfig) -> list[dict]:
    """Rows in / out / quarantined / flagged per stage, from the committed manifests."""
    rows = []
    man = TableStore(cfg.ingest.output_dir).current_manifest()
    if man:
        s = man["summary"]
        rows.append({"stage": "ingest", "in": s.get("rows_in"), "out": s.get("written"),
                     "quarantined": s.get("quarantined"), "flagged": None})
    man = TableStore(cfg.preprocess.output_dir).current_manifest()
    if man:
        c = man["summary"]["counts"]
        rows.append({"stage": "preprocess", "in": c.get("stars"), "out": c.get("stars"), "quarantined": 0,
                     "flagged": sum(v for k, v in c.items() if k.startswith("quality:"))})
    man = TableStore(cfg.select.output_dir).current_manifest()
    if man:
        s = man["summary"]
        rows.append({"stage": "select", "in": s.get("rows"), "out": s.get("rows"), "quarantined": 0,
                     "flagged": s.get("observed_train_unlike")})
    man = TableStore(cfg.predict.output_dir).current_manifest()
    if man:
        s = man["summary"]
        rows.append({"stage": "predict", "in": s.get("rows"), "out": s.get("predicted"),
                     "quarantined": s.get("quarantined"), "flagged": s.get("out_of_range")})
    return rows


# labels as the page writes them (plain text: the page is autoescaped)
PAGE_NAMES = {"teff": "Teff", "logg": "log g", "m_h": "[M/H]", "alpha_m": "[\u03b1/M]", "fe_h": "[Fe/H]",
              "a_li": "A(Li)"}


def _png_width(path: Path) -> int | None:
    """A PNG's width in pixels (its IHDR chunk), None where it is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else None


def render_page(data: dict, figures: list[tuple[str, str, str]], folder: Path | None = None) -> str:
    """The HTML page (template ``page.html``, autoescaped) for the report's numbers and figures. The
    figures are 200 dpi PNGs shown at half their pixel width (100 CSS pixels per inch: sharp on a high-
    density screen, the size a reader expects on any)."""
    import jinja2

    widths = {f: (w // 2 if (w := _png_width(folder / f)) else None) for f, _, _ in figures} if folder else {}
    env = jinja2.Environment(loader=jinja2.PackageLoader("stellar.report", "."), autoescape=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template("page.html").render(model=data["model"], rows=data["rows"], train_like=data["train_like"],
                                                counts=data["counts"], figures=figures, prov=data.get("provenance"),
                                                trust=data.get("trust"), accuracy=data.get("accuracy", []),
                                                units=UNITS, names=PAGE_NAMES, widths=widths)


def run(cfg: StellarConfig, instrument=None, executor=None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): the page and figures, unless made from these very inputs."""
    return StageResult.from_summary("report", build_report(cfg))
