"""Model promotion in the MLflow registry: a challenger replaces the champion only on evidence.

Both versions are evaluated on the same held-out test stars of the current
features with the metrics of the train stage (``ensemble.evaluate``: per
label RMSE, bias, z-score spread, 68 % coverage). The challenger takes the
champion alias when, for every label, its RMSE is at most
``max_rmse_ratio`` times the champion's and its z-score spread is within
``1 +- max_z_std_error`` (calibrated uncertainties), on at least
``min_test_stars`` stars. With no champion yet, only the calibration and
size criteria apply. The test stars are half of a model's published calibration's
fit stars (``stellar.train.calibrate_on_held_out``), so the z-score criterion reads
the spreads the train stage measured on them before they joined it (the model's
``meta["held_out_z_std"]``); a model trained before that record is judged on the
re-evaluated spreads. The decision and both versions' metrics are written as
tags on both versions; the registered model keeps the champion history
(tag ``champion_history``), which ``--rollback`` walks back.
"""

from __future__ import annotations

import json
import time

from stellar.config import StellarConfig
from stellar.errors import StellarError
from stellar.tables import load_stats
from stellar.registry import Registry
from stellar.stage import StageResult
from stellar.ensemble import Ensemble, evaluate, load_split

HISTORY_TAG = "champion_history"


class PromoteError(StellarError):
    """A promotion or rollback that cannot be decided or done: no challenger or champion, different label
    sets, no test stars, or an unreadable champion history."""
    pass


def held_out_metrics(cfg: StellarConfig, ens: Ensemble) -> dict:
    """The train-stage metrics of ``ens`` on the test split of the current features (its own normalisation)."""
    stats = load_stats(cfg.preprocess.output_dir)
    missing = [lab for lab in ens.labels if lab not in stats["label_names"]]
    if missing:
        raise PromoteError(f"the current features lack labels {missing} of this model")
    test = load_split(cfg.preprocess.output_dir, "test", ens.labels, ens.stats)
    if not test:
        raise PromoteError("the test split of the current features is empty")
    return evaluate(ens, test)


def decide(cfg: StellarConfig, labels: list[str], challenger: dict, champion: dict | None,
           held_out_z: dict[str, float] | None = None) -> tuple[bool, list[str]]:
    """Apply the configured criteria; returns (promote?, reasons it may not). ``held_out_z``: the
    challenger's z-score spread per label measured before the test stars joined its calibration (the
    train stage's record); where given, the calibration criterion reads it instead of ``challenger``'s."""
    p = cfg.promote
    fails = []
    for lab in labels:
        n = challenger.get(f"{lab}/all/n", 0)
        if n < p.min_test_stars:
            fails.append(f"{lab}: {n} test stars < {p.min_test_stars}")
        held = lab in (held_out_z or {})
        z = float(held_out_z[lab]) if held else challenger.get(f"{lab}/all/z_std", float("nan"))
        if not abs(z - 1.0) <= p.max_z_std_error:
            fails.append(f"{lab}: z-score spread {z:.3f}{' (held out, at training)' if held else ''} "
                         f"outside 1 +- {p.max_z_std_error}")
        if champion is not None:
            a, b = challenger.get(f"{lab}/all/rmse", float("inf")), champion.get(f"{lab}/all/rmse", float("nan"))
            if not a <= p.max_rmse_ratio * b:
                fails.append(f"{lab}: RMSE {a:.4g} > {p.max_rmse_ratio} x champion {b:.4g}")
    return not fails, fails


def _summary(metrics: dict, labels: list[str]) -> dict:
    return {lab: {k: round(metrics.get(f"{lab}/all/{k}", float("nan")), 5) for k in ("rmse", "bias", "z_std", "n")}
            for lab in labels}


def promote(cfg: StellarConfig, dry_run: bool = False) -> dict:
    """Evaluate ``@challenger`` and ``@champion`` on the current test split and move the champion alias
    when :func:`decide` allows it.

    The decision record (criteria, both versions' metrics, reasons) is tagged on both versions, and the
    replaced champion joins the history :func:`rollback` walks back; ``dry_run`` changes nothing.
    Returns the record ("unchanged" when the challenger already holds the alias)."""
    registry = Registry.from_config(cfg)
    name, p = cfg.mlflow.model_name, cfg.promote
    chal_mv = registry.version(p.challenger, missing_alias_ok=True)
    if chal_mv is None:
        raise PromoteError(f"model {name!r} has no alias {p.challenger!r} (the challenger) in "
                           f"{cfg.mlflow.tracking_uri}")
    champ_mv = registry.version(p.champion, missing_alias_ok=True)
    if champ_mv is not None and champ_mv.version == chal_mv.version:
        return {"decision": "unchanged", "reasons": [f"version {chal_mv.version} is already @{p.champion}"],
                "challenger": int(chal_mv.version), "champion": int(champ_mv.version)}
    chal, _ = registry.load(str(chal_mv.version))
    m_chal = held_out_metrics(cfg, chal)
    m_champ = None
    if champ_mv is not None:
        champ, _ = registry.load(str(champ_mv.version))
        if champ.labels != chal.labels:
            raise PromoteError(f"challenger labels {chal.labels} differ from champion labels {champ.labels}")
        m_champ = held_out_metrics(cfg, champ)
    held_out_z = chal.meta.get("held_out_z_std") or None
    ok, reasons = decide(cfg, chal.labels, m_chal, m_champ, held_out_z)
    decision = "promoted" if ok else "rejected"
    record = {"decision": decision, "reasons": reasons, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "challenger": int(chal_mv.version), "champion": int(champ_mv.version) if champ_mv else None,
              "criteria": p.model_dump(), "held_out_z_std": held_out_z,
              "metrics": {"challenger": _summary(m_chal, chal.labels),
                                                      "champion": _summary(m_champ, chal.labels) if m_champ else None}}
    if dry_run:
        return {**record, "dry_run": True}
    tag = json.dumps(record, sort_keys=True)
    registry.tag_version(chal_mv.version, {"promotion": tag, "promotion_decision": decision})
    if champ_mv is not None:
        registry.tag_version(champ_mv.version, {
            "challenged_by": json.dumps({"version": int(chal_mv.version), "decision": decision, "time": record["time"]}),
            "promotion": tag})
    if ok:
        history = _history(registry)
        if champ_mv is not None:
            history.append(int(champ_mv.version))
        registry.tag_model(HISTORY_TAG, json.dumps(history))
        registry.set_alias(p.champion, chal_mv.version)
    return record


def _history(registry: Registry) -> list[int]:
    name = registry.model_name
    tags = registry.model_tags()
    try:
        return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except (ValueError, TypeError):
        raise PromoteError(f"registered model {name!r} has an unreadable {HISTORY_TAG} tag") from None


def rollback(cfg: StellarConfig) -> dict:
    """Give the champion alias back to the previous champion (the last one in the history)."""
    registry = Registry.from_config(cfg)
    name, alias = cfg.mlflow.model_name, cfg.promote.champion
    current = registry.version(alias, missing_alias_ok=True)
    if current is None:
        raise PromoteError(f"model {name!r} has no alias {alias!r}: nothing to roll back")
    history = _history(registry)
    if not history:
        raise PromoteError(f"model {name!r} has no previous champion to roll back to")
    previous = history.pop()
    registry.version(str(previous))  # refuses clearly when it was deleted
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    registry.set_alias(alias, previous)
    registry.tag_model(HISTORY_TAG, json.dumps(history))
    registry.tag_version(current.version, {"rolled_back": json.dumps({"time": stamp, "champion_now": previous})})
    registry.tag_version(previous, {"restored": json.dumps({"time": stamp, "replacing": int(current.version)})})
    return {"decision": "rolled back", "from": int(current.version), "to": previous, "time": stamp}


def run(cfg: StellarConfig, instrument=None, executor=None) -> StageResult:
    """The stage contract (:mod:`stellar.stage`): up to date when the decision leaves the aliases unchanged."""
    r = promote(cfg)
    return StageResult("promote", "up_to_date" if r["decision"] == "unchanged" else "ran", r.get("version"),
                       None, r)
