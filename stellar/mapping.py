"""The selection map as plain arrays: a PCA basis and a t-SNE reference that new stars are placed on.

The selection stage fits the map (PCA on the training stars, openTSNE on the fit set) and the
model carries it, so a survey the model has never seen gets ``train_like`` from the same map
the training run used. Nothing here is pickled: the map is the PCA mean and components, the
fit set's PCA coordinates and map coordinates, which of them are training stars, and a few
settings. :meth:`MapReference.place` rebuilds openTSNE's reference embedding from those arrays
(exact nearest neighbours on the fit set, so the rebuild is deterministic) and places new stars
with its ``transform``; the selection stage places its own stars through this same method, so
the stage and a model applied elsewhere give the same verdict for the same star.

A UMAP map cannot be rebuilt from arrays (its ``transform`` needs the fitted object), so only a
t-SNE map travels with the model (:attr:`MapReference.portable`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from stellar.features import Normaliser

MAP_FILE = "map.safetensors"
_ARRAYS = ("pca_mean", "pca_components", "ref_z", "ref_xy", "ref_is_train", "ref_source_id")
# openTSNE gradient-descent settings kept with the map (numbers and strings only; callbacks are not)
_SCALAR_TYPES = (int, float, str, bool, type(None))


def feature_matrix(spectrum: np.ndarray, xp: np.ndarray | None, stats: dict, use_xp: bool) -> np.ndarray:
    """The map's input per star: the rebinned spectrum minus 1, with (``use_xp``) the z-scored XP
    coefficients appended at a tenth of their weight."""
    spec = np.asarray(spectrum, dtype=np.float32) - 1.0
    if not use_xp:
        return spec
    z = Normaliser.from_stats(stats["xp"]).normalise(np.asarray(xp))
    return np.concatenate([spec, 0.1 * z], axis=1)


@dataclass
class MapReference:
    """A fitted selection map as arrays (see the module docstring).

    ``ref_z``: the fit set in the PCA basis (what t-SNE embedded); ``ref_xy``: its map coordinates;
    ``ref_is_train``: which fit-set stars are training stars; ``ref_source_id``: their ids, ascending
    (a fit-set star keeps its fitted place wherever it is looked up); ``settings``: method, use_xp,
    perplexity, neighbours (k of the score), threshold, seed and openTSNE's gradient-descent
    parameters."""

    pca_mean: np.ndarray
    pca_components: np.ndarray
    ref_z: np.ndarray
    ref_xy: np.ndarray
    ref_is_train: np.ndarray
    ref_source_id: np.ndarray
    settings: dict
    _affinities: object = field(default=None, repr=False, compare=False)
    _tree: object = field(default=None, repr=False, compare=False)

    @property
    def portable(self) -> bool:
        """Whether new stars can be placed from the arrays alone (a t-SNE map; UMAP needs its object)."""
        return self.settings.get("method") == "tsne"

    @property
    def threshold(self) -> float:
        return float(self.settings["threshold"])

    def project(self, x: np.ndarray) -> np.ndarray:
        """Features (:func:`feature_matrix`) -> coordinates in the fitted PCA basis."""
        return (np.asarray(x, dtype=np.float64) - self.pca_mean) @ self.pca_components.T

    def prepare(self) -> "MapReference":
        """Build the t-SNE reference index now (done lazily otherwise; seconds for 10^4 fit-set stars)."""
        if self.portable:
            self._reference_embedding()
        return self

    def _reference_embedding(self):
        """A fresh openTSNE reference embedding (``transform`` re-centres it in place, so every call
        starts from the stored coordinates); the affinity index is built once per object."""
        from openTSNE import TSNEEmbedding
        from openTSNE.affinity import PerplexityBasedNN

        if self._affinities is None:
            self._affinities = PerplexityBasedNN(self.ref_z, perplexity=self.settings["perplexity"], method="exact",
                                                 n_jobs=1, random_state=self.settings["seed"], verbose=False)
        gd = dict(self.settings.get("gradient_descent", {}))
        return TSNEEmbedding(np.array(self.ref_xy, dtype=np.float64), self._affinities,
                             random_state=self.settings["seed"], **gd)

    def place(self, z: np.ndarray) -> np.ndarray:
        """Map coordinates of new stars from their PCA coordinates (openTSNE ``transform``: each star is
        placed against the reference alone, never against the other new stars)."""
        if len(z) == 0:
            return np.zeros((0, 2))
        if not self.portable:
            raise ValueError(f"a {self.settings.get('method')} map cannot place new stars from its arrays")
        return np.asarray(self._reference_embedding().transform(np.asarray(z, dtype=np.float64)))

    def scores(self, xy: np.ndarray) -> np.ndarray:
        """Share of training stars among the k nearest fit-set stars on the map, relative to their share
        in the whole fit set: ~1 where training stars are as common as anywhere, 0 where there are none.
        (Relative, so the threshold does not depend on how many observed stars were sampled.)"""
        from scipy.spatial import cKDTree

        if self._tree is None:
            self._tree = cKDTree(self.ref_xy)
        _, idx = self._tree.query(xy, k=int(self.settings["neighbours"]))
        idx = np.asarray(idx).reshape(len(xy), -1)
        return self.ref_is_train[idx].mean(axis=1) / max(self.ref_is_train.mean(), 1e-9)

    def fitted_positions(self, source_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xy, in_fit): the fitted coordinates of the stars that are in the fit set (zeros elsewhere) and
        which those are. The fit set's own stars are not placed again: t-SNE gave them their place."""
        sid = np.asarray(source_id, dtype=np.int64)
        ref = self.ref_source_id
        xy = np.zeros((len(sid), 2))
        if not len(ref):
            return xy, np.zeros(len(sid), dtype=bool)
        pos = np.minimum(np.searchsorted(ref, sid), len(ref) - 1)
        in_fit = ref[pos] == sid
        xy[in_fit] = self.ref_xy[pos[in_fit]]
        return xy, in_fit

    def verdict(self, spectrum: np.ndarray, xp: np.ndarray | None, stats: dict,
                source_id: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(score, train_like) of stars given their rebinned spectra (and XP features): the selection
        stage's rule, so a star gets the verdict the training run gave it."""
        n = len(spectrum)
        xy, in_fit = self.fitted_positions(source_id) if source_id is not None else \
            (np.zeros((n, 2)), np.zeros(n, dtype=bool))
        rest = ~in_fit
        if rest.any():
            xp_rest = None if xp is None else np.asarray(xp)[rest]
            xy[rest] = self.place(self.project(feature_matrix(np.asarray(spectrum)[rest], xp_rest, stats,
                                                              self.settings["use_xp"])))
        score = self.scores(xy)
        return score, score >= self.threshold

    # -- persistence: safetensors + JSON, nothing pickled -------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        """The map as named files: the arrays (safetensors) and its settings (JSON)."""
        arrays = {k: np.ascontiguousarray(getattr(self, k)) for k in _ARRAYS}
        arrays["ref_is_train"] = arrays["ref_is_train"].astype(np.uint8)
        arrays["ref_source_id"] = arrays["ref_source_id"].astype(np.int64)
        return {MAP_FILE: np_save(arrays, metadata={"settings": json.dumps(self.settings, sort_keys=True)})}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> "MapReference":
        """A map from :meth:`to_files` (ValueError names what is missing)."""
        raw = files[MAP_FILE]
        arrays = np_load(raw)
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"{MAP_FILE}: arrays {missing} missing")
        settings = json.loads(_metadata(raw).get("settings", "{}"))
        for key in ("method", "use_xp", "perplexity", "neighbours", "threshold", "seed"):
            if key not in settings:
                raise ValueError(f"{MAP_FILE}: setting '{key}' missing")
        return cls(arrays["pca_mean"], arrays["pca_components"], arrays["ref_z"], arrays["ref_xy"],
                   arrays["ref_is_train"].astype(bool), arrays["ref_source_id"], settings)


def _metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (its JSON header), without touching the tensors."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {}) or {}


def gradient_descent_settings(params: dict) -> dict:
    """The JSON-storable part of a fitted openTSNE embedding's ``gradient_descent_params``."""
    return {k: v for k, v in params.items() if isinstance(v, _SCALAR_TYPES)}
