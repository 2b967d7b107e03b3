"""MLflow pyfunc flavour of a stellar model, logged as *code* (MLflow "models from code").

MLflow would otherwise pickle a PythonModel instance into the registry; this
file is logged instead, and the model travels as safetensors plus JSON
(``Ensemble.save``), so loading a registered model never unpickles anything.

Input: a DataFrame (or ``mlflow models serve`` JSON: ``dataframe_records`` or
``dataframe_split``) with Gaia archive columns: ``flux`` and ``flux_error``
(lists of the instrument's pixels, 2401 for RVS) and, each optional,
``bp_coefficients``/``rp_coefficients`` (lists of 55), ``parallax``,
``parallax_error``, ``phot_g_mean_mag``, ``phot_bp_mean_mag``,
``phot_rp_mean_mag``, ``phot_g_mean_flux``, ``bp_n_relevant_bases``,
``rp_n_relevant_bases``, ``rvs_spec_sig_to_noise``, ``source_id``. Output: one
row per star with named columns (``teff``, ``teff_err``, ..., ``ood``,
``ood_reason``, ``ood_reasons``, ``train_like``): :meth:`stellar.api.StellarModel.predict`.
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel


# MLflow checks a PythonModel subclass for type hints on ``predict`` when the class is defined (so on every
# load) and warns without them, under its own "once" filter that no caller's filter overrides. The model is
# logged with an explicit signature (``stellar.registry.pyfunc_signature``), so the hint-based inference it
# asks for has nothing to add: the notice is recorded here and dropped.
with warnings.catch_warnings(record=True):
    class StellarEnsembleModel(PythonModel):
        """The pyfunc model MLflow loads: a :class:`~stellar.api.StellarModel` from the logged artifacts."""

        def load_context(self, context) -> None:
            """Load the ensemble from the ``ensemble`` artifact folder (safetensors and JSON, nothing unpickled)."""
            from stellar.api import StellarModel
            from stellar.ensemble import Ensemble

            self.model = StellarModel(Ensemble.load(context.artifacts["ensemble"]), {"mlflow": "pyfunc"})

        def predict(self, context, model_input, params=None):
            """Archive columns -> labels, calibrated uncertainties and trust flags, one row per star."""
            import pandas as pd

            if isinstance(model_input, dict):  # tensor-style input: columns of arrays
                model_input = pd.DataFrame({k: list(v) if getattr(v, "ndim", 1) > 1 else v
                                            for k, v in model_input.items()})
            out = self.model.predict_table(model_input)
            return out.astype({c: "float64" for c in out.columns if out[c].dtype == "float32"})


mlflow.models.set_model(StellarEnsembleModel())
