"""stellar: stellar labels from survey spectra with hybrid CNN ensembles on Spark.

The package is a pure, importable core (numpy/torch/Arrow): stages that stand side by
side on a shared floor (``runtime`` to run tasks here or on Spark, ``registry`` for MLflow,
``tables`` for the versioned Parquet store, ``config``, the model). Spark sessions are built
only by ``stellar.spark.build_session``, which the entry points call: ``jobs/``, the CLI, the
pipeline driver and ``doctor``. See ARCHITECTURE.md.
"""

__version__ = "0.2.0"


def load_model(uri, tracking_uri=None, device="cpu"):
    """A trained model ready to predict from Gaia archive arrays or files (:func:`stellar.api.load_model`;
    imported on first use, so ``import stellar`` stays light)."""
    from stellar.api import load_model as _load

    return _load(uri, tracking_uri=tracking_uri, device=device)
