"""The ``stellar`` command: one subcommand per stage plus set-up helpers.

Every subcommand takes ``--config FILE`` (default ``conf/local.yaml`` when it
exists) and any number of ``--set section.key=value`` overrides. Errors a
user can fix (bad config, missing Java, bad input) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stellar import __version__
from stellar.config import StellarConfig, load_config
from stellar.errors import StellarError
from stellar.tracking import MLFLOW_STAGES, MLFLOW_WRITERS, check_tracking

DEFAULT_CONFIG = Path("conf/local.yaml")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # Accepted before and after the subcommand; the two are merged in _load().
    prefix = "sub_" if suppress else ""
    parser.add_argument("--config", "-c", dest=f"{prefix}config", default=None, metavar="FILE",
                        help="YAML config (default: conf/local.yaml if present, else built-in defaults)")
    parser.add_argument("--set", dest=f"{prefix}overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. --set spark.master=local[2] (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """The ``stellar`` argument parser: one subcommand per stage and set-up helper, each accepting
    ``--config`` and ``--set`` before or after the subcommand (``_load`` merges the two)."""
    parser = argparse.ArgumentParser(
        prog="stellar",
        description="Stellar labels from survey spectra with hybrid CNN ensembles on Spark.",
        epilog="Run 'stellar COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"stellar {__version__}")
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("doctor", help="print versions, Java, Spark master, MLflow URI and GPUs")
    _common(p, suppress=True)
    p.add_argument("--spark", action="store_true", help="also start a SparkSession and run a tiny job")

    p = sub.add_parser("synth", help="generate a synthetic survey in the Gaia archive / APOGEE formats")
    _common(p, suppress=True)
    p.add_argument("--stars", type=int, help="number of stars (synth.n_stars)")
    p.add_argument("--seed", type=int, help="random seed (synth.seed)")
    p.add_argument("--output", help="output folder (synth.output_dir)")
    p.add_argument("--instrument", help="instrument preset name or YAML path")
    p.add_argument("--realism", help="realism preset (conf/realism/: default, hard) or YAML path (synth.realism)")
    p.add_argument("--no-spark", action="store_true", help="generate in this process instead of Spark tasks")

    p = sub.add_parser("ingest", help="Gaia archive files and label catalogues -> partitioned Parquet tables "
                                      "(a killed run resumes from its finished tasks)")
    _common(p, suppress=True)
    p.add_argument("--gaia-root", help="root of a Gaia bulk-download layout (ingest.gaia_root)")
    p.add_argument("--datalink", action="append", help="DataLink/query product file or folder (repeatable)")
    p.add_argument("--output", help="table store folder (ingest.output_dir)")
    p.add_argument("--no-spark", action="store_true", help="parse in this process instead of Spark tasks")

    p = sub.add_parser("preprocess", help="ingested tables -> model-ready features table (+ normalisation stats)")
    _common(p, suppress=True)
    p.add_argument("--output", help="features store folder (preprocess.output_dir)")
    p.add_argument("--no-spark", action="store_true", help="compute in this process instead of Spark tasks")

    p = sub.add_parser("select", help="t-SNE/UMAP map of training + observed stars and train-like flags")
    _common(p, suppress=True)
    p.add_argument("--no-spark", action="store_true", help="place the stars in this process instead of Spark tasks")

    p = sub.add_parser("train", help="train the deep ensemble, calibrate it, track it and register it in MLflow")
    _common(p, suppress=True)
    p.add_argument("--model", help="model preset (train.model): hybrid, rave2020, gaia_eso2023, or a YAML path")
    p.add_argument("--members", type=int, help="ensemble size (train.members)")
    p.add_argument("--no-spark", action="store_true", help="train the members in this process, one after another")

    p = sub.add_parser("predict", help="apply a registered ensemble (default @champion) to every star -> predictions")
    _common(p, suppress=True)
    p.add_argument("--model", dest="predict_model", metavar="ALIAS|VERSION|URI",
                   help="model alias or version number of mlflow.model_name (predict.model); with --input also "
                        "a models:/NAME@ALIAS or runs:/ URI or a model folder")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="predict.device")
    p.add_argument("--no-spark", action="store_true", help="predict in this process instead of Spark tasks")
    p.add_argument("--input", dest="predict_inputs", action="append", metavar="PATH",
                   help="predict these Gaia files or folders directly (DataLink downloads, archive query results, "
                        "bulk files; repeatable), with no run folder: the model's own preprocessing settings and "
                        "selection map give the features and train_like; needs --output")
    p.add_argument("--output", dest="predict_output", metavar="FILE.parquet",
                   help="with --input: where the predictions go (rows a reader rejected: FILE.quarantine.parquet)")

    p = sub.add_parser("export", help="write the predictions to FITS, VOTable or CSV (for TOPCAT and friends), "
                       "or a HATS catalogue (for LSDB)")
    _common(p, suppress=True)
    p.add_argument("output", help="output file, or folder for HATS; the format follows its suffix "
                   "(.fits .vot .xml .csv .hats) or --format")
    p.add_argument("--format", choices=["fits", "votable", "csv", "hats"], help="output format")
    p.add_argument("--where", help="comma-separated filters: train_like, good, hpx=N, model_version=N, split=S")
    p.add_argument("--max-rows", type=int, default=5_000_000, help="refuse FITS/VOTable above this many rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--hats-max-rows", type=int, default=None, metavar="N",
                   help="HATS: the most rows in one leaf partition (default 500000); denser sky gets smaller pixels")

    p = sub.add_parser("promote", help="evaluate @challenger vs @champion on the test split; move @champion if better")
    _common(p, suppress=True)
    p.add_argument("--challenger", help="alias or version of the candidate (promote.challenger)")
    p.add_argument("--champion", help="alias to move (promote.champion)")
    p.add_argument("--dry-run", action="store_true", help="evaluate and decide, change nothing")
    p.add_argument("--rollback", action="store_true", help="give the champion alias back to the previous champion")

    p = sub.add_parser("report", help="the science report (HTML + PNG figures) of the current predictions, "
                                      "logged to the model's MLflow run")
    _common(p, suppress=True)
    p.add_argument("--output", dest="report_output", help="report folder (default: WORK_DIR/report)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the model's MLflow run")
    p.add_argument("--force", action="store_true",
                   help="rebuild even when the report in the folder was built from the same tables and model")

    for name, text in (("pipeline", "run every stage in order, skipping those whose committed output is up to date "
                                     "(synth -> ingest -> preprocess -> select -> train -> promote -> predict -> report); "
                                     "under spark-submit: jobs/pipeline.py, the full-catalogue rerun"),
                       ("demo", "the pipeline on the embedded default (what 'make demo' runs); same options")):
        p = sub.add_parser(name, help=text)
        _common(p, suppress=True)
        p.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage (earlier ones are not run)")
        p.add_argument("--only", action="append", metavar="STAGE",
                       help="run only these stages (repeatable, or comma-separated)")
        p.add_argument("--no-spark", action="store_true", help="run every stage in this process instead of Spark tasks")
    return parser


def _load(args: argparse.Namespace) -> StellarConfig:
    path = getattr(args, "sub_config", None) or args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    overrides = list(args.overrides) + list(getattr(args, "sub_overrides", []))
    output_key = {"ingest": "ingest.output_dir", "preprocess": "preprocess.output_dir"}.get(args.command,
                                                                                             "synth.output_dir")
    for flag, key in (("stars", "synth.n_stars"), ("seed", "synth.seed"), ("output", output_key),
                      ("instrument", "instrument"), ("realism", "synth.realism"), ("gaia_root", "ingest.gaia_root"),
                      ("model", "train.model"), ("members", "train.members"),
                      ("predict_model", "predict.model"), ("device", "predict.device"),
                      ("challenger", "promote.challenger"), ("champion", "promote.champion")):
        value = getattr(args, flag, None)
        if flag == "predict_model" and value is not None and _is_model_uri(value):
            continue  # a URI or folder (predict --input) is no alias of mlflow.model_name: cmd_predict reads it
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "datalink", None):
        overrides.append("ingest.datalink=[" + ",".join(json.dumps(d) for d in args.datalink) + "]")
    return load_config(path, overrides)


def cmd_doctor(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar doctor``: print versions, Java, Spark master, MLflow URI and GPUs; returns 2 when
    something needed is missing."""
    from stellar.doctor import report

    lines, ok = report(cfg, spark_check=args.spark)
    print("\n".join(lines))
    return 0 if ok else 2


def run_synth(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Generate the synthetic survey, as Spark tasks unless ``use_spark`` is False; returns its manifest."""
    from stellar.instruments import load_instrument
    from stellar.synth.survey import run_survey

    instrument = load_instrument(cfg.instrument, cfg.conf_dir)
    return _staged(cfg, "synth", use_spark, lambda m: run_survey(cfg.synth, instrument, executor=m),
                   stars=cfg.synth.n_stars)


def summarise_synth(m: dict) -> str:
    """What ``stellar synth`` prints of a survey manifest: where it went, stars, files and size, label
    and out-of-distribution counts, speed."""
    total = sum(sum(f["bytes"].values()) for f in m["files"])
    rate = m["n_stars"] / m["seconds"] if m["seconds"] else float("nan")
    return "\n".join([
        f"synthetic survey ({m['instrument']}) written to {m['path']}",
        f"  stars {m['n_stars']} in {m['n_files']} HEALPix-range files, {total / 1e6:.1f} MB",
        f"  training labels {m['n_labelled']} (labels/allStar-synth.fits), out-of-distribution {m['n_ood']}",
        "  truth table: truth/*.parquet; manifest: survey.json",
        f"  {m['seconds']:.1f} s wall, {rate:.0f} stars/s",
    ])


def cmd_synth(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar synth``: generate the survey and print its summary."""
    manifest = run_synth(cfg, use_spark=not args.no_spark)
    print(summarise_synth(manifest))
    return 0


def _staged(cfg: StellarConfig, stage: str, use_spark: bool, fn, stars: int | None = None, spark_arg: bool = False):
    """``fn(mapper)`` in this process (mapper None) or with Spark tasks of a session built for ``stage``
    (``spark_arg``: ``fn(spark)`` instead), with the live progress line from the first second: the
    session's start, then the Spark tasks (:class:`stellar.pipeline.Progress`)."""
    from stellar.pipeline import Progress, stage_detail

    progress = Progress()
    progress.start(stage, stars, stage_detail(stage, cfg))
    try:
        if not use_spark:
            return fn(None)
        from stellar.runtime import SparkExecutor
        from stellar.spark import build_session

        spark = build_session(cfg, stage)
        progress.spark = spark
        try:
            return fn(spark if spark_arg else SparkExecutor(spark, f"stellar {stage}"))
        finally:
            spark.stop()
    finally:
        progress.stop()


def run_ingest(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Run the ingest stage for ``cfg``, as Spark tasks unless ``use_spark`` is False; returns its summary."""
    from stellar.ingest.run import ingest
    from stellar.instruments import load_instrument

    instrument = load_instrument(cfg.instrument, cfg.conf_dir)
    return _staged(cfg, "ingest", use_spark, lambda m: ingest(cfg.ingest, instrument, cfg.conf_dir, mapper=m))


def summarise_ingest(s: dict, root: str) -> str:
    """What ``stellar ingest`` prints: the version, rows in / written / quarantined per table, the bad
    fraction, per-file warnings and the ten commonest quarantine reasons."""
    if s.get("up_to_date"):
        return f"tables in {root} are up to date (version {s['version']}): nothing to ingest"
    lines = [f"ingested into {root} (version {s['version']}; {s['parsed_files']} files parsed in {s['tasks']} tasks, "
             f"{s['reused_files']} unchanged files reused)"]
    for table, c in sorted(s["tables"].items()):
        lines.append(f"  {table:<11} in {c['rows_in']:>9}  written {c['written']:>9}  quarantined {c['quarantined']:>7}")
    lines.append(f"  bad fraction {s['bad_fraction']:.4%}; {s['seconds']:.1f} s")
    for name, f in s["per_file"].items():
        for note in f["notes"]:
            lines.append(f"  warning: {name}: {note}")
    kinds: dict[str, int] = {}
    for per in s["reasons"].values():
        for k, v in per.items():
            kinds[k] = kinds.get(k, 0) + v
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"  quarantine: {v} x {k}")
    return "\n".join(lines)


def cmd_ingest(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar ingest``: ingest into ``ingest.output_dir`` and print the summary."""
    summary = run_ingest(cfg, use_spark=not args.no_spark)
    print(summarise_ingest(summary, cfg.ingest.output_dir))
    return 0


def run_preprocess(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Run the preprocess stage on the committed ingest tables; returns its summary."""
    from stellar.instruments import load_instrument
    from stellar.preprocess import preprocess

    instrument = load_instrument(cfg.instrument, cfg.conf_dir)
    return _staged(cfg, "preprocess", use_spark,
                   lambda m: preprocess(cfg.preprocess, instrument, cfg.ingest.output_dir, mapper=m))


def summarise_preprocess(s: dict, root: str) -> str:
    """What ``stellar preprocess`` prints: the version, star and join counts, split sizes, unjoined rows,
    label cuts and the quality flags raised."""
    c = s["counts"]
    if s.get("up_to_date"):
        return f"features in {root} are up to date (version {s['version']}, from tables {s['tables_version']})"
    lines = [f"features written to {root} (version {s['version']}, from tables {s['tables_version']}, "
             f"{s['partitions']} partitions, {s['seconds']:.1f} s)",
             f"  stars {c.get('stars', 0)}: with XP {c.get('with_xp', 0)}, with astrometry {c.get('with_astrometry', 0)}, "
             f"with a label row {c.get('with_label_row', 0)}, usable labels {c.get('usable_labels', 0)}",
             "  split: " + ", ".join(f"{k.split(':')[1]} {v}" for k, v in c.items() if k.startswith("split:")),
             "  not joined (no spectrum): " + ", ".join(f"{k.split('_')[0]} {v}" for k, v in c.items()
                                                         if k.endswith("_without_spectrum"))]
    cuts = {k[4:]: v for k, v in c.items() if k.startswith("cut:")}
    if cuts:
        lines.append("  label cuts: " + ", ".join(f"{k} {v}" for k, v in cuts.items()))
    flags = {k[8:]: v for k, v in c.items() if k.startswith("quality:") and v}
    if flags:
        lines.append("  quality flags: " + ", ".join(f"{k} {v}" for k, v in flags.items()))
    return "\n".join(lines)


def cmd_preprocess(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar preprocess``: build the features table and print the summary."""
    summary = run_preprocess(cfg, use_spark=not args.no_spark)
    print(summarise_preprocess(summary, cfg.preprocess.output_dir))
    return 0


def run_select(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Run the selection stage on the committed features; returns its summary."""
    from stellar.selection import select

    return _staged(cfg, "select", use_spark, lambda m: select(cfg.select, cfg.preprocess.output_dir, mapper=m))


def cmd_select(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar select``: build the selection map and print one line (fit set, placement, observed
    train-unlike stars)."""
    s = run_select(cfg, use_spark=not args.no_spark)
    if s.get("up_to_date"):
        print(f"selection in {cfg.select.output_dir} is up to date (version {s['version']})")
        return 0
    print(f"selection written to {cfg.select.output_dir} (version {s['version']}): {s['rows']} stars, map fitted on "
          f"{s['fit_set']} ({s['fit_training']} training) in {s['fit_seconds']:.0f} s, {s['placed']} placed in "
          f"{s['place_seconds']:.0f} s; observed train-unlike {s['observed_train_unlike']} of {s['observed']}")
    return 0


def run_train(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Train, calibrate and register the ensemble; returns the train summary (the ``Ensemble`` itself under
    ``ensemble``)."""
    from stellar.instruments import load_instrument
    from stellar.train import train_ensemble

    instrument = load_instrument(cfg.instrument, cfg.conf_dir)
    return _staged(cfg, "train", use_spark, lambda m: train_ensemble(cfg, instrument, mapper=m))


def summarise_train(s: dict) -> str:
    """What ``stellar train`` prints: members kept and dropped, the registered version and alias, and per
    label the test-split RMSE, bias, RMSE at S/N > 50, z-score spread and 68 % coverage."""
    m = s["metrics"]
    ens = s["ensemble"]
    lines = [f"ensemble: {s['kept']} of {s['members']} members kept (dropped: {s['dropped'] or 'none'}); "
             f"{s['seconds']:.1f} s, per member {', '.join(f'{x:.0f}' for x in s['member_seconds'])} s"]
    if "version" in s:
        lines.append(f"  registered {s['registered_model']} version {s['version']} as @{s['alias']} "
                     f"(MLflow run {s['run_id']})")
    lines.append(f"  {'label':<8} {'RMSE':>9} {'bias':>9} {'RMSE S/N>50':>12} {'z std':>6} {'cov68':>6} (test split)")
    for lab in ens.labels:
        lines.append(f"  {lab:<8} {m.get(f'{lab}/all/rmse', float('nan')):>9.4g} {m.get(f'{lab}/all/bias', float('nan')):>9.3g} "
                     f"{m.get(f'{lab}/snr_50_inf/rmse', float('nan')):>12.4g} {m.get(f'{lab}/all/z_std', float('nan')):>6.2f} "
                     f"{m.get(f'{lab}/all/coverage68', float('nan')):>6.2f}")
    return "\n".join(lines)


def cmd_train(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar train``: train the ensemble and print the summary."""
    summary = run_train(cfg, use_spark=not args.no_spark)
    print(summarise_train(summary))
    return 0


def run_predict(cfg: StellarConfig, use_spark: bool = True) -> dict:
    """Resolve ``predict.model`` once, before any task (the alias may move meanwhile), then predict every
    star; returns the predict summary."""
    from stellar.predict import predict, resolve_model

    bundle = resolve_model(cfg)  # once, before any task runs: the alias may move meanwhile
    return _staged(cfg, "predict", use_spark, lambda spark: predict(cfg, bundle, spark=spark), spark_arg=True)


def summarise_predict(s: dict, root: str) -> str:
    """What ``stellar predict`` prints: version and model, rows predicted and quarantined, train-like
    counts, labels outside the training range, ood counts by reason and quarantine reasons."""
    m = s["model"]
    if s.get("up_to_date"):
        return (f"predictions in {root} are up to date (version {s['version']}, model {m['name']} "
                f"v{m['version']})")
    lines = [f"predictions written to {root} (version {s['version']}) with {m['name']} version {m['version']} "
             f"(run {m['run_id']}); {s['seconds']:.1f} s, {s['rows'] / max(s['seconds'], 1e-9):.0f} stars/s",
             f"  stars {s['rows']}: predicted {s['predicted']}, quarantined {s['quarantined']}; train-like "
             f"{s['train_like']}, train-unlike {s['train_unlike']}"
             + (" (from the model's own map)" if s.get("map_source") == "model" else "")
             + f", no selection row {s['no_selection']}; "
             f"a label outside the training range {s['out_of_range']}",
             f"  out of distribution (ood) {s.get('ood', 0)}: " + ", ".join(
                 f"{k} {v}" for k, v in s.get("ood_by_reason", {}).items() if v)]
    for k, v in s.get("problems", {}).items():
        lines.append(f"  quarantine: {v} x {k}")
    return "\n".join(lines)


def _is_model_uri(ref: str) -> bool:
    return ":/" in ref or Path(ref).is_dir()


def cmd_predict(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar predict``: predict with the resolved model and print the summary; with ``--input``, predict
    files directly through the Python API (:func:`predict_inputs`)."""
    uri = args.predict_model if args.predict_model and _is_model_uri(args.predict_model) else None
    if args.predict_inputs:
        print(predict_inputs(cfg, args.predict_inputs, args.predict_output, uri))
        return 0
    if uri or args.predict_output:
        raise StellarError("--model URI and --output go with --input FILES; the run folder's predictions take an "
                           "alias or version of mlflow.model_name (--model champion, --model 3)")
    print(summarise_predict(run_predict(cfg, use_spark=not args.no_spark), cfg.predict.output_dir))
    return 0


def model_uri(cfg: StellarConfig, ref: str) -> str:
    """An alias or version of ``mlflow.model_name`` (``predict.model``) as a model URI."""
    return f"models:/{cfg.mlflow.model_name}/{ref}" if ref.isdigit() else f"models:/{cfg.mlflow.model_name}@{ref}"


def predict_inputs(cfg: StellarConfig, inputs: list[str], output: str | None, uri: str | None = None) -> str:
    """``stellar predict --input PATH --output FILE``: a survey's files predicted with a model from any
    registry (``mlflow.tracking_uri``) or folder, no run folder; returns the summary line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stellar.api import load_model

    if not output:
        raise StellarError("stellar predict --input needs --output FILE.parquet")
    out = Path(output)
    if out.suffix != ".parquet":
        raise StellarError(f"--output {out}: expected a .parquet file")
    t0 = time.perf_counter()
    uri = uri or model_uri(cfg, cfg.predict.model)
    model = load_model(uri, tracking_uri=cfg.mlflow.tracking_uri, device=cfg.predict.device)
    table = model.predict_files(inputs)
    quarantine = table.attrs.pop("quarantine")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"stellar.table": "predictions", "stellar.model": json.dumps({"uri": uri, **model.identity})}
    from stellar.columns import with_field_metadata

    pa_table = with_field_metadata(pa.Table.from_pandas(table, preserve_index=False), model.labels)
    pq.write_table(pa_table.replace_schema_metadata({**(pa_table.schema.metadata or {}), **meta}), out)
    qpath = out.with_suffix(".quarantine.parquet")
    if len(quarantine):
        pq.write_table(pa.Table.from_pandas(quarantine, preserve_index=False), qpath)
    seconds = time.perf_counter() - t0
    n_tl = int(table["train_like"].fillna(False).sum())
    return (f"predictions of {len(table)} stars written to {out} with {uri} in {seconds:.1f} s; ood "
            f"{int(table['ood'].fillna(False).sum())}, train-like {n_tl}" +
            ("; map verdict unavailable for all (the model carries no map)" if table["train_like"].isna().all() else "")
            + (f"; {len(quarantine)} rows quarantined -> {qpath}" if len(quarantine) else ""))


def cmd_export(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar export``: write the committed predictions (filtered by ``--where``) to FITS, VOTable or
    CSV and print what was written."""
    from stellar.export import export

    s = export(cfg.predict.output_dir, args.output, args.format, args.where, args.max_rows, args.overwrite,
               sources={"features": cfg.preprocess.output_dir, "tables": cfg.ingest.output_dir},
               hats_max_rows=args.hats_max_rows)
    m = s.get("model") or {}
    print(f"wrote {s['rows']} rows to {s['path']} ({s['format']}; model {m.get('name')} v{m.get('version')})")
    if s["format"] == "hats":
        orders = ", ".join(f"{n} at order {o}" for o, n in s["partitions_by_order"].items())
        print(f"  {s['partitions']} partitions ({orders}), at most {s['max_rows_in_a_partition']} rows each; "
              f"{s['rows_without_position']} rows without a gaia_source position (null ra/dec)")
    return 0


def summarise_promote(r: dict) -> str:
    """What ``stellar promote`` prints: the decision (or the rollback), each label's challenger and
    champion test metrics, and why a challenger was not promoted."""
    if r["decision"] == "rolled back":
        return f"@champion rolled back from version {r['from']} to version {r['to']}"
    head = f"challenger version {r['challenger']} vs champion " + (
        f"version {r['champion']}" if r.get("champion") else "(none yet)") + f": {r['decision']}"
    if r.get("dry_run"):
        head += " (dry run: nothing changed)"
    lines = [head]
    mets = r.get("metrics") or {}
    if mets:
        lines.append(f"  {'label':<8} {'RMSE chal':>10} {'RMSE champ':>11} {'z std chal':>11} {'n':>6}")
        for lab, v in mets["challenger"].items():
            champ = (mets.get("champion") or {}).get(lab, {}).get("rmse", float("nan"))
            lines.append(f"  {lab:<8} {v['rmse']:>10.4g} {champ:>11.4g} {v['z_std']:>11.3f} {v['n']:>6}")
    lines += [f"  not promoted because {why}" for why in r.get("reasons", []) if r["decision"] == "rejected"]
    lines += [f"  {why}" for why in r.get("reasons", []) if r["decision"] == "unchanged"]
    return "\n".join(lines)


def cmd_promote(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar promote``: evaluate the challenger and move the champion alias if it wins (``--dry-run``:
    change nothing), or ``--rollback``; prints the decision."""
    from stellar.promote import promote, rollback

    r = rollback(cfg) if args.rollback else promote(cfg, dry_run=args.dry_run)
    print(summarise_promote(r))
    return 0


def summarise_report(r: dict) -> str:
    """What ``stellar report`` prints: where the report went (or that it is up to date), its figures, the
    MLflow run it was logged to, and the [alpha/M] bimodality peaks."""
    if r.get("up_to_date"):
        return (f"report {r['path']} is up to date ({len(r['figures'])} figures of the same tables and model): "
                "nothing to rebuild (--force rebuilds it)")
    lines = [f"report written to {r['path']} ({len(r['figures'])} figures, {r['seconds']:.1f} s)"
             + (f"; logged to MLflow run {r['logged_to_run']}" if r.get("logged_to_run") else "")]
    bim = r.get("alpha_mh", {}).get("all", {}).get("bimodality")
    if bim and bim["peaks"]:
        lines.append(f"  [alpha/M] peaks at {bim['peaks'][0]:.2f} and {bim['peaks'][1]:.2f} "
                     f"(dip {bim['dip_ratio']:.2f} of the lower peak) for {r['alpha_mh']['mh_band']} in [M/H]")
    return "\n".join(lines)


def cmd_report(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar report``: build the science report (logged to MLflow unless ``--no-mlflow``) and print
    the summary."""
    from stellar.report import build_report

    print(summarise_report(build_report(cfg, args.report_output, log_mlflow=not args.no_mlflow, force=args.force)))
    return 0


def _stage_text(run, cfg: StellarConfig) -> str:
    s = run.summary
    if run.status == "failed":
        return f"  failed: {run.error}"
    text = {"synth": lambda: summarise_synth({"seconds": run.seconds, **s}) if "files" in s else "",
            "ingest": lambda: summarise_ingest(s, cfg.ingest.output_dir),
            "preprocess": lambda: summarise_preprocess(s, cfg.preprocess.output_dir),
            "train": lambda: summarise_train(s) if "ensemble" in s else "",
            "promote": lambda: summarise_promote(s),
            "predict": lambda: summarise_predict(s, cfg.predict.output_dir),
            "report": lambda: summarise_report(s)}.get(run.name)
    if run.status == "skipped":
        return f"  up to date (version {s.get('version', '-')}): skipped"
    if run.name == "select":
        return f"  {s['rows']} stars mapped; observed train-unlike {s['observed_train_unlike']} of {s['observed']}"
    return text() if text else ""


def cmd_pipeline(cfg: StellarConfig, args: argparse.Namespace) -> int:
    """``stellar pipeline`` and ``stellar demo``: run the chosen stages in order, print each stage's
    outcome as it ends and write ``pipeline-summary.json`` in the work folder.

    Returns 2 when a stage failed (a rerun resumes from it), else 0."""
    from stellar.pipeline import choose_stages, run_pipeline

    only = [x.strip() for item in (args.only or []) for x in item.split(",") if x.strip()]
    stages = choose_stages(cfg, args.start, only)
    if MLFLOW_STAGES & set(stages):
        check_tracking(cfg.mlflow.tracking_uri, write=bool(MLFLOW_WRITERS & set(stages)))
    t0 = time.perf_counter()
    print(f"[pipeline] stages: {' -> '.join(stages)} (work folder {cfg.work_dir})", flush=True)

    def show(run) -> None:
        print(f"[pipeline] {run.name}: {run.status} in {run.seconds:.1f} s", flush=True)
        text = _stage_text(run, cfg)
        if text:
            print(text, flush=True)

    runs = run_pipeline(cfg, stages, use_spark=not args.no_spark, report=show)
    summary = {"stages": {r.name: {"status": r.status, "seconds": r.seconds, "error": r.error or None,
                                   **{k: v for k, v in r.summary.items() if k in (
                                       "version", "rows", "n_stars", "written", "quarantined", "predicted",
                                       "train_like", "train_unlike", "decision", "path", "figures", "model")}}
                          for r in runs},
               "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.work_dir) / "pipeline-summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    failed = [r for r in runs if r.status == "failed"]
    print(f"[pipeline] {'FAILED at ' + failed[0].name if failed else 'done'} in {summary['seconds']} s; "
          f"summary: {out}" + (f"; the stages before {failed[0].name} are kept: once its error above is dealt "
                               f"with, a rerun goes on from {failed[0].name}" if failed else ""))
    return 2 if failed else 0


COMMANDS = {"doctor": cmd_doctor, "synth": cmd_synth, "ingest": cmd_ingest, "preprocess": cmd_preprocess,
            "select": cmd_select, "train": cmd_train, "predict": cmd_predict, "export": cmd_export,
            "promote": cmd_promote, "report": cmd_report, "pipeline": cmd_pipeline, "demo": cmd_pipeline}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stellar`` command: parse, load the config, check the MLflow store for the
    stages that use it, run the subcommand. Errors a user can fix (StellarError, OSError) print one
    line and return 2."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one-line logs, not bars
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _load(args)
        if args.command in MLFLOW_STAGES:
            # before any work, so a dead server or a read-only store costs seconds
            check_tracking(cfg.mlflow.tracking_uri, write=args.command in MLFLOW_WRITERS)
        return COMMANDS[args.command](cfg, args)
    except StellarError as exc:
        print(f"stellar: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only, missing or full folder: one line naming the path, not a traceback
        print(f"stellar: error: {_os_error_line(exc)}", file=sys.stderr)
        return 2


def _os_error_line(exc: OSError) -> str:
    import errno

    path = exc.filename if exc.filename is not None else ""
    hint = {errno.EACCES: "permission denied (a read-only folder? check work_dir and the output paths)",
            errno.EPERM: "operation not permitted (a read-only folder? check work_dir and the output paths)",
            errno.EROFS: "read-only file system (point work_dir at a writable folder)",
            errno.ENOSPC: "no space left on the device",
            errno.ENOENT: "no such file or folder",
            errno.ENOTDIR: "a path component is a file, not a folder",
            errno.EISDIR: "is a folder, expected a file"}.get(exc.errno, exc.strerror or str(exc))
    return f"{path}: {hint}" if path else hint


if __name__ == "__main__":
    sys.exit(main())
