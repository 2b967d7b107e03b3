"""The model registry floor: every MLflow call of the stages goes through here.

A :class:`Registry` wraps one ``MlflowClient`` for one tracking URI and one registered model name,
passed explicitly, so two registries in one process (a benchmark comparing two runs, a test with
two work folders) never see each other's store. Train registers through it, promote moves aliases
and writes the champion history through it, predict and report resolve and load through it. Its
failures are :class:`RegistryError`: one line naming the model, the alias or version, and the store.

Only the training run's own logging (params, per-epoch metrics, figures, the pyfunc model) uses
MLflow's fluent API, which needs a process-wide tracking URI; :func:`log_training_run` sets it
for that call without exporting it (:func:`use_tracking_uri`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from stellar.errors import StellarError


class RegistryError(StellarError):
    """A model, version or alias that the registry does not hold."""


def use_tracking_uri(uri: str) -> None:
    """Point this process's fluent MLflow API at ``uri`` without exporting it.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI into the process environment (for
    subprocesses), and ``stellar.config.load_config`` lets that variable win over the config file (how
    cluster jobs are pointed at a shared server). Left exported, the first store a process touched
    would silently replace the store of every config it loads later: a benchmark re-assessing two
    runs in one process got the first run's champion for the second. The variable is restored to
    what it was (the user's own setting, or absent)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@dataclass
class Registry:
    """One registered model in one MLflow store.

    Args:
        tracking_uri: the store (``sqlite:///...`` or a server URL); also its model registry.
        model_name: the registered model's name (``mlflow.model_name``).
    """

    tracking_uri: str
    model_name: str
    client: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @classmethod
    def from_config(cls, cfg) -> "Registry":
        """The registry of ``cfg.mlflow``'s tracking store and registered model name."""
        return cls(cfg.mlflow.tracking_uri, cfg.mlflow.model_name)

    # -- reading -------------------------------------------------------------
    def version(self, ref: str, missing_alias_ok: bool = False):
        """The ``ModelVersion`` of an alias or a version number.

        Raises RegistryError when the model or the version does not exist, and for a missing alias
        unless ``missing_alias_ok`` (then None: promote's "no champion yet")."""
        from mlflow.exceptions import MlflowException

        name = self.model_name
        try:
            model = self.client.get_registered_model(name)
        except MlflowException:
            raise RegistryError(f"no registered model {name!r} in {self.tracking_uri} (run 'stellar train' "
                                "first)") from None
        try:
            return self.client.get_model_version(name, ref) if ref.isdigit() else \
                self.client.get_model_version_by_alias(name, ref)
        except MlflowException:
            if not ref.isdigit() and missing_alias_ok:
                return None
            raise RegistryError(f"model {name!r} has no {'version' if ref.isdigit() else 'alias'} {ref!r} in "
                                f"{self.tracking_uri}" + self._next_steps(model, ref)) from None

    def _next_steps(self, model, ref: str) -> str:
        """What a user can do about a missing alias or version: which aliases and versions exist, why the
        newest version holds no alias (its promotion decision), and the two ways on. A rerun alone never
        helps here: promotion decides the same way on the same data."""
        aliases = dict(getattr(model, "aliases", None) or {})
        try:
            versions = sorted(self.client.search_model_versions(f"name = '{self.model_name}'"),
                              key=lambda v: int(v.version))
        except Exception:  # noqa: BLE001 - the message is a courtesy; the error stands without it
            versions = []
        held = ", ".join(f"@{a} = version {v}" for a, v in sorted(aliases.items())) or "none"
        text = f" (aliases: {held}; versions: {', '.join(str(v.version) for v in versions) or 'none'})"
        if not versions:
            return text
        newest = versions[-1]
        tags = newest.tags or {}
        if tags.get("promotion_decision") == "rejected":
            try:
                reasons = json.loads(tags.get("promotion", "{}")).get("reasons", [])
            except ValueError:
                reasons = []
            text += (f". Promotion rejected version {newest.version}" +
                     (f" ({'; '.join(str(r) for r in reasons[:2])})" if reasons else ""))
        example = next(iter(sorted(aliases)), None) or newest.version
        text += (f". To go on: predict with another model (--model ALIAS|VERSION, e.g. --model {example}), or promote "
                 "a version ('stellar promote --challenger VERSION'; a rejected one only with the promote.* "
                 "criteria relaxed); rerunning as it is decides the same way")
        return text

    def load(self, ref: str):
        """Resolve ``ref`` once and load its ensemble, pickle-free; returns (Ensemble, identity).

        Reads the registry, never writes it: only the model's ``artifacts/ensemble`` folder is copied,
        into a temporary folder of this call, and read into memory. (``download_artifacts`` of the
        model's root on a local store would return the store's own folder and rewrite its
        ``registered_model_meta`` there, so a read-only registry failed and two concurrent predicts
        raced on that file.)"""
        import mlflow

        from stellar.ensemble import Ensemble

        mv = self.version(ref)
        # a batch job's log is no place for a progress bar per model load (a user's own setting wins)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        source = self.client.get_model_version_download_uri(self.model_name, mv.version).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="stellar-model-") as tmp:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/ensemble", dst_path=tmp,
                                                         tracking_uri=self.tracking_uri)
            ens = Ensemble.load(folder)
        return ens, {"name": self.model_name, "version": int(mv.version), "run_id": mv.run_id}

    def version_with_tag(self, key: str, value: str) -> int | None:
        """The newest version whose tag ``key`` is ``value`` (None also when the model is not registered)."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException:
            return None
        found = [int(v.version) for v in versions if (v.tags or {}).get(key) == value]
        return max(found) if found else None

    def model_tags(self) -> dict[str, str]:
        """The registered model's tags (the champion history among them)."""
        return dict(self.client.get_registered_model(self.model_name).tags or {})

    # -- writing -------------------------------------------------------------
    def tag_version(self, version: int | str, tags: dict[str, str]) -> None:
        """Set ``tags`` on one version of the registered model."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), key, value)

    def tag_model(self, key: str, value: str) -> None:
        """Set one tag on the registered model itself."""
        self.client.set_registered_model_tag(self.model_name, key, value)

    def set_alias(self, alias: str, version: int | str) -> None:
        """Point ``alias`` at ``version`` of the registered model (moving it from where it was)."""
        self.client.set_registered_model_alias(self.model_name, alias, str(version))

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str) -> None:
        """Upload a local folder into an existing run's artifacts under ``artifact_path``."""
        self.client.log_artifacts(run_id, str(folder), artifact_path)


def load_registered(cfg, alias_or_version: str):
    """``Registry.from_config(cfg).load(alias_or_version)``: (Ensemble, identity)."""
    return Registry.from_config(cfg).load(alias_or_version)


def redacted(obj):
    """A JSON-able config with the credentials of any URI removed (stellar.tracking.redact)."""
    from stellar.tracking import redact

    if isinstance(obj, dict):
        return {k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    return redact(obj) if isinstance(obj, str) and "://" in obj else obj


def default_tracking_uri() -> str:
    """MLflow's own tracking URI for this process (MLFLOW_TRACKING_URI, else its default)."""
    import mlflow

    return mlflow.get_tracking_uri()


def download_model_ensemble(uri: str, tracking_uri: str):
    """The ensemble of a logged model (``runs:/RUN/model``), read from its ``artifacts/ensemble`` folder copied
    into a temporary folder (nothing written into the store, nothing unpickled)."""
    import mlflow

    from stellar.ensemble import Ensemble

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="stellar-model-") as tmp:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/artifacts/ensemble",
                                                     dst_path=tmp, tracking_uri=tracking_uri)
        return Ensemble.load(folder)


def pyfunc_signature(labels: list[str]):
    """The MLflow signature of the pyfunc model (``stellar.mlflow_model``): archive columns in (only the
    spectrum required), named label, uncertainty and flag columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = [ColSpec(Array(DataType.double), "flux"), ColSpec(Array(DataType.double), "flux_error"),
              ColSpec(Array(DataType.double), "bp_coefficients", required=False),
              ColSpec(Array(DataType.double), "rp_coefficients", required=False),
              ColSpec(DataType.long, "source_id", required=False)]
    from stellar.features import SCALAR_INPUTS

    inputs += [ColSpec(DataType.double, name, required=False) for name in SCALAR_INPUTS]
    outputs = [ColSpec(DataType.double, "snr"), ColSpec(DataType.integer, "quality")]
    for lab in labels:
        outputs += [ColSpec(DataType.double, lab, required=False), ColSpec(DataType.double, f"{lab}_err", required=False)]
    outputs += [ColSpec(DataType.integer, "out_of_range"), ColSpec(DataType.string, "problem", required=False),
                ColSpec(DataType.boolean, "train_like", required=False),
                ColSpec(DataType.double, "selection_score", required=False),
                ColSpec(DataType.double, "spectrum_chi2", required=False),
                ColSpec(DataType.double, "line_chi2", required=False),
                ColSpec(DataType.double, "line_broadening", required=False),
                ColSpec(DataType.boolean, "ood", required=False), ColSpec(DataType.integer, "ood_reason", required=False),
                ColSpec(DataType.string, "ood_reasons", required=False),
                ColSpec(DataType.long, "source_id", required=False)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def log_training_run(cfg, ens, members, dropped, metrics: dict, figures: dict, card: str | None = None,
                     datasets: list[dict] | None = None) -> dict:
    """Log a trained ensemble as one MLflow run (a nested run per member, with its loss curves), its
    pyfunc model and figures, and register it under ``mlflow.model_name`` with the ``train.alias``
    when ``train.register_model``. ``figures``: artifact path -> matplotlib figure; ``card``: the model card
    (markdown, :mod:`stellar.model_card`), logged as ``model_card.md`` and set as the registered version's
    description; ``datasets``: the inputs (name, uri, digest, context), logged as MLflow datasets. The
    resolved config (credentials redacted) is logged as ``config/resolved.json`` and the git commit,
    features version and instrument as run tags. Returns the run id, model URI and, when registered,
    the version."""
    import mlflow
    use_tracking_uri(cfg.mlflow.tracking_uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        root = cfg.mlflow.artifact_root or None  # None: the tracking server's artifact store
        if root and "://" not in root:
            Path(root).mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=root)
    else:
        exp_id = exp.experiment_id
    meta = ens.meta
    with mlflow.start_run(experiment_id=exp_id, run_name=f"ensemble-{ens.cfg.name}") as parent:
        mlflow.log_params({f"model.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                           for k, v in ens.cfg.model_dump().items()})
        mlflow.log_params({"members": len(members), "labels": ",".join(ens.labels), "instrument": meta["instrument"],
                           "features_version": meta["features_version"], "config_digest": meta["config_digest"],
                           "drop_rule": meta["drop_rule"]})
        mlflow.log_params({f"label_cuts.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                           for k, v in cfg.preprocess.label_cuts.model_dump().items()})
        mlflow.log_params({f"select.{k}": v for k, v in cfg.select.model_dump(exclude={"output_dir"}).items()})
        mlflow.log_params({f"preprocess.{k}": v for k, v in cfg.preprocess.model_dump(
            exclude={"output_dir", "label_cuts", "split"}).items()})
        mlflow.set_tags({"git_commit": meta.get("git_commit", "unknown"), "features_version": meta["features_version"],
                         "instrument": meta["instrument"]})
        mlflow.log_dict(redacted(cfg.model_dump(mode="json")), "config/resolved.json")
        if datasets:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            for d in datasets:
                with warnings.catch_warnings():  # a local path matches two equivalent registered source kinds
                    warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
                    source = resolve_dataset_source(d["uri"])
                mlflow.log_input(MetaDataset(source, name=d["name"], digest=d["digest"]), context=d["context"])
        if card:
            mlflow.log_text(card, "model_card.md")
        for m in members:
            with mlflow.start_run(experiment_id=exp_id, run_name=f"member-{m.index}", nested=True):
                mlflow.log_params({"member": m.index, "seed": m.seed})
                for h in m.history:
                    mlflow.log_metrics({"train_loss": h["train_loss"], "val_loss": h["val_loss"],
                                        **{f"val_loss.{k}": v for k, v in h.get("val_loss_by_label", {}).items()}},
                                       step=h["epoch"])
                for epoch, loss in enumerate(m.pretrain_losses):
                    mlflow.log_metric("pretrain_loss", loss, step=epoch)
                mlflow.log_metrics({"best_val_loss": m.best_val_loss, "best_epoch": m.best_epoch,
                                    "seconds": m.seconds, "pretrain_seconds": m.pretrain_seconds})
                mlflow.set_tag("dropped", str(m.index in dropped).lower())
        mlflow.log_metrics({k.replace("/", "."): v for k, v in metrics.items()})
        mlflow.log_dict({"calibration": dict(zip(ens.labels, ens.calibration.tolist())), **meta}, "ensemble_meta.json")
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
        signature = pyfunc_signature(ens.labels)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # MLflow's advice on type hints and input examples does not apply to a signature given in full
            # (raw archive columns): nothing a user can act on, so not shown on every training run
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            folder = ens.save(Path(tmp) / "ensemble")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
                artifacts={"ensemble": str(folder)}, signature=signature)
        out = {"run_id": parent.info.run_id, "model_uri": info.model_uri}
        if cfg.train.register_model:
            registry = Registry.from_config(cfg)
            mv = mlflow.register_model(info.model_uri, cfg.mlflow.model_name)
            registry.tag_version(mv.version, {key: str(meta[key]) for key in
                                              ("features_version", "config_digest", "git_commit", "instrument",
                                               "train_digest")})
            registry.tag_version(mv.version, {"labels": ",".join(ens.labels)})
            registry.set_alias(cfg.train.alias, mv.version)
            if card:
                registry.client.update_model_version(cfg.mlflow.model_name, mv.version, description=card)
            out.update({"registered_model": cfg.mlflow.model_name, "version": int(mv.version), "alias": cfg.train.alias})
    return out
