"""MLflow pyfunc flavour of a stellar ensemble, logged as *code* (MLflow "models from code").

MLflow would otherwise pickle a PythonModel instance into the registry; this
file is logged instead, and the weights travel as safetensors plus JSON
(``Ensemble.save``), so loading a registered model never unpickles anything.

Input: a dict of numpy arrays ``spectrum`` (N, P) float32, ``spectrum_mask``
(N, P) bool/uint8, ``xp`` (N, X) float32 and ``scalars`` (N, S) float32, the
raw (unnormalised) features of the ``features`` table. Output: a dict with
``mean`` and ``sigma`` (N, L) in physical units, labels in ``labels`` order.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class StellarEnsembleModel(PythonModel):
    """The pyfunc model MLflow loads: an :class:`~stellar.ensemble.Ensemble` from the logged artifacts."""

    def load_context(self, context) -> None:
        """Load the ensemble from the ``ensemble`` artifact folder (safetensors and JSON, nothing unpickled)."""
        from stellar.ensemble import Ensemble

        self.ensemble = Ensemble.load(context.artifacts["ensemble"])

    def predict(self, context, model_input, params=None):
        """Raw feature arrays -> ``mean`` and calibrated ``sigma``, (N, L) float64 in physical units."""
        from stellar.inference_core import features_to_tensors

        data = features_to_tensors(self.ensemble.stats, model_input)
        out = self.ensemble.predict(data)
        return {"mean": out["mean"].astype(np.float64), "sigma": out["sigma"].astype(np.float64)}


mlflow.models.set_model(StellarEnsembleModel())
