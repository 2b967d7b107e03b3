"""stellar: stellar labels from survey spectra with hybrid CNN ensembles on Spark.

The package is a pure, importable core (numpy/torch/Arrow) with Spark-aware
helpers; only `jobs/` and the CLI build Spark sessions.
"""

__version__ = "0.2.0"
