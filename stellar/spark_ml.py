"""A pyspark.ml ``Transformer`` that applies a stellar model inside a user's own Spark job.

::

    from stellar.spark_ml import StellarTransformer
    t = StellarTransformer(modelUri="models:/stellar-hybrid@champion", trackingUri="http://mlflow:5000")
    labelled = t.transform(df)   # df: flux, flux_error (arrays), optional XP and gaia_source columns

The input DataFrame carries Gaia archive columns (:data:`stellar.api.SCALAR_INPUTS`, ``flux`` and
``flux_error`` as arrays, ``bp_coefficients``/``rp_coefficients`` as arrays of 55, ``source_id``);
the output is the input plus the prediction columns of :meth:`stellar.api.StellarModel.predict`
(``teff``, ``teff_err``, ..., ``ood``, ``ood_reason``, ``ood_reasons``, ``train_like``). The model is
resolved once on the driver (an alias cannot move between tasks), its files (safetensors and JSON)
are broadcast, and each Python worker builds it once; batches go through ``mapInArrow``, the path
``stellar predict`` uses, with the same feature and prediction code as the Python API.
"""

from __future__ import annotations

import hashlib

from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters

# One model per (files digest) per Python worker: Spark reuses workers across tasks.
_MODELS: dict[str, object] = {}


def _prediction_fields(labels: list[str]):
    """The Spark fields the transformer appends, in :meth:`StellarModel.predict` order."""
    from pyspark.sql import types as T

    fields = [T.StructField("snr", T.FloatType()), T.StructField("quality", T.IntegerType())]
    for lab in labels:
        fields += [T.StructField(lab, T.FloatType()), T.StructField(f"{lab}_err", T.FloatType())]
    fields += [T.StructField("out_of_range", T.IntegerType()), T.StructField("problem", T.StringType()),
               T.StructField("train_like", T.BooleanType()), T.StructField("selection_score", T.FloatType()),
               T.StructField("spectrum_chi2", T.FloatType()), T.StructField("line_chi2", T.FloatType()),
               T.StructField("line_broadening", T.FloatType()), T.StructField("ood", T.BooleanType()), T.StructField("ood_reason", T.IntegerType()),
               T.StructField("ood_reasons", T.StringType())]
    return fields


class StellarTransformer(Transformer):
    """Labels, uncertainties and trust flags for every row of a DataFrame of Gaia archive columns.

    Params:
        modelUri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a model folder.
        trackingUri: the MLflow store holding the model (default: MLflow's own setting).
        device: ``cpu``, ``cuda`` or ``auto`` on the executors.
    """

    modelUri = Param(Params._dummy(), "modelUri", "model URI or folder", typeConverter=TypeConverters.toString)
    trackingUri = Param(Params._dummy(), "trackingUri", "MLflow tracking URI", typeConverter=TypeConverters.toString)
    device = Param(Params._dummy(), "device", "cpu, cuda or auto", typeConverter=TypeConverters.toString)

    @keyword_only
    def __init__(self, *, modelUri: str | None = None, trackingUri: str | None = None, device: str = "cpu"):
        super().__init__()
        self._setDefault(device="cpu")
        self._set(**self._input_kwargs)

    def _transform(self, dataset):
        from pyspark.sql import types as T

        from stellar.api import load_model

        uri = self.getOrDefault(self.modelUri)
        tracking = self.getOrDefault(self.trackingUri) if self.isDefined(self.trackingUri) else None
        device = self.getOrDefault(self.device)
        model = load_model(uri, tracking_uri=tracking)  # resolved once, here
        files = model.ensemble.to_files()
        digest = hashlib.sha256(b"".join(hashlib.sha256(files[k]).digest() for k in sorted(files))).hexdigest()[:16]
        shared = dataset.sparkSession.sparkContext.broadcast(files)
        in_fields = dataset.schema.fields
        clash = {f.name for f in in_fields} & {f.name for f in _prediction_fields(model.labels)}
        if clash:
            raise ValueError(f"the input already has prediction columns {sorted(clash)}: drop or rename them")
        schema = T.StructType(list(in_fields) + _prediction_fields(model.labels))
        names = [f.name for f in _prediction_fields(model.labels)]

        def apply(batches):
            import pyarrow as pa

            m = _worker_model(digest, shared, device)
            for batch in batches:
                table = pa.Table.from_batches([batch])
                out = m.predict_table(table)
                cols = [batch.column(i) for i in range(batch.num_columns)]
                arrow_out = pa.Table.from_pandas(out[names], preserve_index=False)
                for f, name in zip(schema.fields[batch.num_columns:], names):
                    cols.append(arrow_out[name].combine_chunks().cast(_arrow_type(f.dataType)))
                yield pa.RecordBatch.from_arrays(cols, names=list(batch.schema.names) + names)

        return dataset.mapInArrow(apply, schema)


def _arrow_type(spark_type):
    import pyarrow as pa
    from pyspark.sql import types as T

    return {T.FloatType: pa.float32(), T.IntegerType: pa.int32(), T.BooleanType: pa.bool_(),
            T.StringType: pa.string()}[type(spark_type)]


def _worker_model(digest: str, shared, device: str):
    """This worker's model for the broadcast files, built once per Python worker."""
    if digest not in _MODELS:
        from stellar.api import StellarModel
        from stellar.ensemble import Ensemble

        _MODELS[digest] = StellarModel(Ensemble.from_files(shared.value), {"digest": digest}, device)
    return _MODELS[digest]
