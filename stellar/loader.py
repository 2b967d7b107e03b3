"""Stream the ``features`` table into PyTorch: a pyarrow.dataset-backed IterableDataset.

This replaces petastorm (its last release, 0.13.1, imports modules that
pyarrow removed in version 15 and needs numpy < 2). Parquet fragments are
sharded by DataLoader worker and by distributed rank, record batches become
numpy arrays column-wise (fixed-size lists reshape without copies), a seeded
shuffle buffer mixes rows across fragments, and batches come out as tensors:
no Python work per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stellar.features import Normaliser
from stellar.tables import TableStore

ARRAY_COLUMNS = ("spectrum", "spectrum_error", "spectrum_mask", "xp", "scalars")


def _as_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        values = arr.values.slice(arr.offset * width, len(arr) * width)
        return values.to_numpy(zero_copy_only=False).reshape(len(arr), width)
    return pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False) if pa.types.is_floating(arr.type) \
        else arr.to_numpy(zero_copy_only=False)


class FeatureDataset(IterableDataset):
    """Batches of feature tensors for one split.

    Yields dicts: ``spectrum``, ``spectrum_error`` (B, n_pix) float32,
    ``spectrum_mask`` (B, n_pix) bool, ``xp`` (B, n_xp), ``scalars`` (B, n_s),
    ``labels`` and ``label_err`` (B, n_labels) (z-scored with the table's
    statistics when ``normalise``), ``snr``, ``quality``, ``source_id``.
    """

    def __init__(self, features_root: str, split: str | None = "train", batch_size: int = 256,
                 shuffle: bool = True, shuffle_buffer: int = 8192, seed: int = 0, labels: list[str] | None = None,
                 stats: dict | None = None, normalise: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        super().__init__()
        store = TableStore(features_root)
        self.path = store.table_path("features")
        if stats is None:
            from stellar.tables import load_stats

            stats = load_stats(features_root)
        self.stats = stats
        self.labels = list(labels or stats["label_names"])
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = max(shuffle_buffer, batch_size)
        self.seed = seed
        self.normalise = normalise
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._norm = {k: Normaliser.from_stats(stats[k]) for k in ("xp", "scalars")}
        lab = stats["labels"]
        order = [list(stats["label_names"]).index(k) for k in self.labels]
        self._label_norm = Normaliser(np.asarray(lab["mean"])[order], np.asarray(lab["std"])[order])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (same seed + epoch -> same order)."""
        self.epoch = epoch

    def fragments(self) -> list:
        """The features table's Parquet fragments sorted by path: a fixed order to shard by worker and rank."""
        dataset = ds.dataset(self.path, format="parquet", partitioning="hive")
        return sorted(dataset.get_fragments(), key=lambda f: f.path)

    def _shard(self, frags: list) -> tuple[list, int]:
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        shard = self.rank * workers + wid
        total = self.world_size * workers
        return frags[shard::total], shard

    def _columns(self) -> list[str]:
        return ["source_id", *ARRAY_COLUMNS, "snr", "quality", *self.labels, *[f"{k}_err" for k in self.labels]]

    def _convert(self, batch: pa.RecordBatch) -> dict[str, np.ndarray]:
        out = {name: _as_numpy(batch.column(name)) for name in ("source_id", *ARRAY_COLUMNS, "snr", "quality")}
        out["labels"] = np.stack([_as_numpy(batch.column(k)) for k in self.labels], axis=1) if self.labels else \
            np.zeros((batch.num_rows, 0))
        out["label_err"] = np.stack([_as_numpy(batch.column(f"{k}_err")) for k in self.labels], axis=1) \
            if self.labels else np.zeros((batch.num_rows, 0))
        return out

    def _emit(self, buf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.normalise:
            buf = dict(buf)
            buf["xp"] = self._norm["xp"].normalise(buf["xp"])
            buf["scalars"] = self._norm["scalars"].normalise(buf["scalars"])
            buf["labels"] = self._label_norm.normalise(buf["labels"])
            buf["label_err"] = (buf["label_err"] / self._label_norm.std).astype(np.float32)
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in buf.items()}
        t["spectrum_mask"] = t["spectrum_mask"].view(torch.bool)  # uint8 0/1 -> bool, no copy
        return t

    def _flush(self, pending: list[dict[str, np.ndarray]], rng, final: bool):
        """Shuffle the buffered rows and yield full batches (all rows when ``final``).

        Rows are gathered straight from the buffered chunks into each batch (one copy per
        value, no concatenated intermediate); returns the rows left for the next flush.
        """
        sizes = np.array([len(p["source_id"]) for p in pending])
        total = int(sizes.sum())
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        order = rng.permutation(total) if self.shuffle else np.arange(total)
        n_out = total if final else (total // self.batch_size) * self.batch_size
        for lo in range(0, n_out, self.batch_size):
            idx = order[lo:lo + self.batch_size]
            if final and self.drop_last and idx.size < self.batch_size:
                break
            if not self.shuffle:
                idx = np.sort(idx)
            chunk_of = np.searchsorted(offsets, idx, side="right") - 1
            pieces = []
            for c in np.unique(chunk_of):
                rows = idx[chunk_of == c] - offsets[c]
                pieces.append({k: np.take(v, rows, axis=0) for k, v in pending[c].items()})
            batch = pieces[0] if len(pieces) == 1 else {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            yield self._emit(batch)
        rest = order[n_out:]
        if rest.size == 0:
            self._rest = []
            return
        chunk_of = np.searchsorted(offsets, rest, side="right") - 1
        self._rest = [{k: v[rest[chunk_of == c] - offsets[c]] for k, v in pending[c].items()}
                      for c in np.unique(chunk_of)]

    def __iter__(self):
        frags, shard = self._shard(self.fragments())
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        if self.shuffle:
            frags = [frags[i] for i in rng.permutation(len(frags))]
        flt = pc.field("split") == self.split if self.split else None
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0
        if not frags:
            return
        # One scanner over this shard's files: it reads ahead several fragments in parallel
        # (I/O and decoding in Arrow threads) while batches are consumed here, in file order.
        shard_ds = ds.dataset([f.path for f in frags], format="parquet")
        for rb in shard_ds.to_batches(columns=self._columns(), filter=flt, batch_size=8192,
                                      fragment_readahead=4, batch_readahead=4):
            if rb.num_rows == 0:
                continue
            pending.append(self._convert(rb))
            n_pending += rb.num_rows
            if n_pending >= self.shuffle_buffer:
                yield from self._flush(pending, rng, final=False)
                pending = self._rest
                n_pending = sum(len(p["source_id"]) for p in pending)
        if n_pending:
            yield from self._flush(pending, rng, final=True)
