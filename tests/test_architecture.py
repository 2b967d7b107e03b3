"""The import boundaries of ARCHITECTURE.md, checked on the source (every import, function-level too).

Stages stand side by side on the shared floor (runtime, registry, table store, config, the model):
no stage module imports another; only the orchestrators (``cli``, ``pipeline``, the Python API
``api`` that composes the ingest readers and the predict stage's scorer for users) and ``jobs/`` see
them all. Spark is imported only by the execution floor, the session factory, device discovery
(predict runs its tasks on the floor's executor like every stage) and the users' pyspark.ml
transformer; MLflow only by the registry and the model flavour.
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "stellar"
STAGES = ("synth", "ingest", "preprocess", "selection", "train", "predict", "promote", "report", "export")
ORCHESTRATORS = ("stellar.cli", "stellar.pipeline", "stellar.api")
SPARK_ALLOWED = ("stellar.runtime", "stellar.spark", "stellar.devices", "stellar.spark_ml")
MLFLOW_ALLOWED = ("stellar.registry", "stellar.mlflow_model")


def _modules() -> dict[str, set[str]]:
    """Module name -> every module it imports (absolute names)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
        out[name] = imported
    return out


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stellar" and parts[1] in STAGES else None


def test_no_stage_imports_another():
    crossings = []
    for module, imported in _modules().items():
        own = _stage_of(module)
        if module in ORCHESTRATORS:
            continue
        for target in imported:
            other = _stage_of(target)
            if other is not None and other != own:
                crossings.append(f"{module} -> {target}")
    assert crossings == []


def test_floor_modules_import_no_stage():
    """The floor (everything that is neither a stage nor an orchestrator) stands on nothing above it."""
    found = [f"{m} -> {t}" for m, imported in _modules().items()
             if _stage_of(m) is None and m not in ORCHESTRATORS for t in imported if _stage_of(t) is not None]
    assert found == []


def test_spark_and_mlflow_stay_in_their_modules():
    mods = _modules()
    spark = sorted(m for m, imp in mods.items() if any(t == "pyspark" or t.startswith("pyspark.") for t in imp))
    mlflow = sorted(m for m, imp in mods.items() if any(t == "mlflow" or t.startswith("mlflow.") for t in imp))
    assert set(spark) <= set(SPARK_ALLOWED), spark
    assert set(mlflow) <= set(MLFLOW_ALLOWED), mlflow
    assert "stellar.runtime" in spark and "stellar.registry" in mlflow  # the test sees real imports


def test_the_pipeline_looks_every_stage_up_in_one_table():
    """Every stage is one entry of the pipeline's table: a module whose ``run(cfg, instrument, executor)``
    returns a :class:`stellar.stage.StageResult` (the one contract the pipeline calls)."""
    import importlib
    import inspect

    from stellar.pipeline import STAGE_MODULES, STAGES

    assert list(STAGE_MODULES) == list(STAGES)
    for name, module in STAGE_MODULES.items():
        sig = inspect.signature(importlib.import_module(module).run)
        assert list(sig.parameters)[:3] == ["cfg", "instrument", "executor"], name
        assert sig.return_annotation == "StageResult", name


def test_every_name_the_scripts_import_from_stellar_exists():
    """The benchmarks, jobs and tests import from ``stellar`` inside functions too (heavy modules load
    late), where no test run reaches them: a name moved or renamed must fail here, not in a user's
    benchmark after ten minutes of training."""
    import importlib
    import importlib.util

    missing = []
    for folder in ("benchmarks", "jobs", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] == "stellar":
                    module = importlib.import_module(node.module)
                    missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                                if a.name != "*" and not hasattr(module, a.name)
                                and not (hasattr(module, "__path__")  # a submodule of a package
                                         and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not missing, "imports of names stellar does not have:\n" + "\n".join(missing)
