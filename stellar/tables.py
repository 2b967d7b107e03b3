"""Versioned Parquet table store: a run writes a new version, one pointer commits it.

Layout under a store root (e.g. ``work/tables``)::

    _CURRENT                      {"version": "v000002", "schema_version": 1}
    v000002/_manifest.json        what the version holds (inputs, counts, provenance)
    v000002/rvs/hpx=17/part-<key>-<chunk>.parquet
    v000002/xp/...  astrometry/...  labels/...  quarantine/...

Readers resolve ``_CURRENT`` once (``table_path``). A run builds its version
folder next to the committed one (hard-linking parts it does not change),
then replaces ``_CURRENT`` atomically: a killed run leaves the previous
version visible and whole, and its half-written folder is removed by the next
run -- unless it was opened for a resumable plan (``new_version(plan_digest)``):
a rerun of the same plan on the same base then carries on in it, skipping
the tasks whose done markers (``_done/<task>.json``) are there. Part files
are written with deterministic names and content, so the same inputs give
byte-identical tables, resumed or not.

One writer at a time: a run holds the store's writer lock (``writing``, an
``flock`` on ``_LOCK``, which names the holder's host and pid) from before it
looks for leftovers until after its commit, so a second run on the same store
refuses with a clear message instead of removing or adopting the first one's
unfinished version. The kernel drops the lock when its holder dies, so a killed
run never leaves a stale lock behind (on NFS, Linux maps ``flock`` onto the
server's byte-range locks). Readers take no lock: they only follow ``_CURRENT``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stellar.errors import StellarError

SCHEMA_VERSION = 1
POINTER = "_CURRENT"
MANIFEST = "_manifest.json"
RESUME = "_resume.json"  # in an uncommitted version: the plan it belongs to (resumable runs)
DONE = "_done"  # ... and one marker per finished task
SEALED = "_sealed"  # ... past the resumable phase
LOCK = "_LOCK"  # the writer lock (TableStore.writing): flock'ed by the run writing the store
STATS = "stats.json"  # in a features version: the normalisation statistics the network was fed with
_VERSION_RE = re.compile(r"^v(\d{6})$")


class StoreBusyError(StellarError):
    """Another run holds the store's writer lock."""


class TableStore:
    """One versioned table store under ``root``: the writer lock, the committed pointer and manifest, and
    the steps of a run (open, resume, new version, link, seal, commit)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- one writer ----------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Hold the store's writer lock for one run of ``what`` (a stage name, for the message).

        Raises StoreBusyError, naming the holder, when another run (in this or another process, on
        this or, over NFS, another host) writes the store. Not re-entrant: a run takes it once."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StellarError(f"{self.root}: cannot open the table store for writing ({exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                raise StoreBusyError(
                    f"{self.root}: another run is writing this table store ({holder}); wait for it to finish "
                    f"(the lock goes with its process) and run {what} again") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"stage": what, "host": socket.gethostname(), "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock (the holder text stays: only a held lock counts)

    # -- committed state -------------------------------------------------
    def current_version(self) -> str | None:
        """The committed version's name (``v000002``); None before the first commit."""
        ptr = self.root / POINTER
        if not ptr.is_file():
            return None
        return json.loads(ptr.read_text())["version"]

    def current_manifest(self) -> dict | None:
        """The committed version's manifest; None before the first commit."""
        v = self.current_version()
        if v is None:
            return None
        return json.loads((self.root / v / MANIFEST).read_text())

    def content_digest(self, version: str | None = None) -> str:
        """A digest of a version's content for provenance headers: every part's path, size and Parquet
        footer (schema, row counts, each column chunk's offsets, sizes and min/max statistics), so two
        versions with the same digest hold the same rows in all but a vanishing case, without reading
        the data (footers are kilobytes at any catalogue size). Non-Parquet parts count by size."""
        v = version or self.current_version()
        if v is None:
            return ""
        h = hashlib.sha256()
        parts = json.loads((self.root / v / MANIFEST).read_text()).get("parts", {})
        for rel, size in sorted(parts.items()):
            h.update(f"{rel}\0{size}\0".encode())
            path = self.root / v / rel
            if rel.endswith(".parquet") and size >= 12:
                with open(path, "rb") as fh:
                    fh.seek(size - 8)
                    n = int.from_bytes(fh.read(4), "little")
                    fh.seek(max(0, size - 8 - n))
                    h.update(fh.read(n))
        return h.hexdigest()[:16]

    def healpix_order(self) -> int | None:
        """The HEALPix order of the committed version's ``hpx=`` partitions (from its manifest; every
        stage after ingest keeps ingest's partitioning). None for a store written before it was recorded."""
        m = self.current_manifest()
        return None if m is None else m.get("healpix_order")

    def table_path(self, table: str, version: str | None = None) -> Path:
        """The folder of ``table`` in the committed (or given) version, checked once per process
        against its manifest's part list (``verify``): dataset readers read whatever a folder holds."""
        v = version or self.current_version()
        if v is None:
            raise FileNotFoundError(f"no committed tables under {self.root} (run 'stellar ingest' first)")
        key = (str(self.root.resolve()), v)
        if key not in _VERIFIED:
            problems = self.verify(v)
            if problems:
                raise StoreDamagedError(f"table store {self.root / v} does not match its manifest: "
                                        + "; ".join(problems[:3])
                                        + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
            _VERIFIED.add(key)
        return self.root / v / table

    def verify(self, version: str | None = None) -> list[str]:
        """What is wrong with a committed version: parts its manifest lists that are missing or of
        another size, and parts on disk it does not list. Empty when whole (or when the manifest is
        older than part lists)."""
        v = version or self.current_version()
        if v is None:
            return []
        try:
            listed = json.loads((self.root / v / MANIFEST).read_text()).get("parts")
        except (OSError, ValueError) as exc:
            return [f"manifest unreadable ({exc})"]
        if listed is None:
            return []
        on_disk = _part_sizes(self.root / v)
        problems = [f"{rel}: listed, missing" for rel in sorted(set(listed) - set(on_disk))]
        problems += [f"{rel}: {on_disk[rel]} bytes, manifest says {listed[rel]}" for rel in sorted(listed)
                     if rel in on_disk and on_disk[rel] != listed[rel]]
        problems += [f"{rel}: on disk, not in the manifest" for rel in sorted(set(on_disk) - set(listed))]
        return problems

    # -- a run -------------------------------------------------------------
    def committed_with(self, digest: str) -> dict | None:
        """Open a run: create the root, remove versions a killed run left, and return the committed
        manifest when it was made with these settings (the stage then has nothing to do)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_uncommitted()
        current = self.current_manifest()
        return current if current and current.get("settings_digest") == digest else None

    def clean_uncommitted(self, keep: str | None = None) -> list[str]:
        """Remove version folders newer than the committed one (left by a killed run), except ``keep``."""
        current = self.current_version()
        removed = []
        if not self.root.is_dir():
            return removed
        for d in sorted(self.root.iterdir()):
            m = _VERSION_RE.match(d.name)
            if m and d.is_dir() and (current is None or d.name > current) and d.name != keep:
                shutil.rmtree(d)
                removed.append(d.name)
        return removed

    def resumable(self, plan_digest: str) -> str | None:
        """The uncommitted version a killed run left for the same plan on the same committed base,
        if any: a run with that plan carries on in it (its finished tasks left done markers)."""
        current = self.current_version()
        if not self.root.is_dir():
            return None
        for d in sorted(self.root.iterdir(), reverse=True):
            if _VERSION_RE.match(d.name) and d.is_dir() and (current is None or d.name > current):
                try:
                    plan = json.loads((d / RESUME).read_text())
                except (OSError, ValueError):
                    return None
                if plan.get("plan_digest") != plan_digest or plan.get("base_version") != current \
                        or (d / SEALED).exists():
                    return None
                for tmp in d.rglob(".*.tmp-*"):  # half-written files of the tasks that were killed
                    tmp.unlink()
                return d.name
        return None

    def new_version(self, plan_digest: str | None = None) -> str:
        """A fresh version folder; with ``plan_digest`` a killed run can resume in it (``resumable``)."""
        current = self.current_version()
        n = int(current[1:]) + 1 if current else 1
        name = f"v{n:06d}"
        (self.root / name).mkdir(parents=True, exist_ok=False)
        if plan_digest is not None:
            _write_json(self.root / name / RESUME, {"plan_digest": plan_digest, "base_version": current})
        return name

    def seal(self, version: str) -> None:
        """Mark a version as past its resumable phase (later steps rewrite parts in place): a run
        killed after this starts again from scratch rather than resume."""
        (self.root / version / SEALED).touch()

    def link_part(self, src_version: str, rel: str, dst_version: str) -> None:
        """Carry an unchanged part into the new version without copying (copy where links fail)."""
        src = self.root / src_version / rel
        dst = self.root / dst_version / rel
        if dst.exists():  # a resumed run linked it already; never write through a shared link
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def commit(self, version: str, manifest: dict, keep: int = 2) -> None:
        """Record every part the version holds (with its size) in its manifest, then switch the
        pointer. A stage that lists its parts per input (ingest's ``files[*].parts``) must list
        exactly what is on disk: a part written but not accounted for refuses the commit."""
        sizes = _part_sizes(self.root / version)
        declared = manifest.get("files")
        if isinstance(declared, dict) and all(isinstance(f, dict) and "parts" in f for f in declared.values()):
            named = {rel for f in declared.values() for rel in f["parts"]}
            extra, missing = sorted(set(sizes) - named), sorted(named - set(sizes))
            if extra or missing:
                raise StoreDamagedError(f"version {version} not committed: parts on disk that no input accounts "
                                        f"for {extra[:3]}, parts accounted for but missing {missing[:3]}")
        manifest = {**manifest, "parts": sizes}
        _write_json(self.root / version / MANIFEST, manifest)
        _write_json(self.root / POINTER, {"version": version, "schema_version": SCHEMA_VERSION})  # the switch
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        versions = sorted(d.name for d in self.root.iterdir() if _VERSION_RE.match(d.name) and d.is_dir())
        current = self.current_version()
        for name in versions[:-keep] if keep > 0 else versions:
            if name != current:
                shutil.rmtree(self.root / name)


class StoreDamagedError(StellarError):
    """A committed version's folder and its manifest disagree (a part missing, changed or added)."""


_VERIFIED: set[tuple[str, str]] = set()  # (store root, version) checked by table_path in this process


def _part_sizes(vdir: Path) -> dict[str, int]:
    """Relative path -> size of every Parquet part under a version folder (not temporary files)."""
    out = {}
    for p in vdir.rglob("*.parquet"):
        rel = p.relative_to(vdir)
        if not any(part.startswith((".", "_")) for part in rel.parts):
            out[rel.as_posix()] = p.stat().st_size
    return out


def _read_holder(fd: int) -> str:
    """The lock holder's stage, host and pid, as the holder wrote them (best effort)."""
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{h['stage']} on {h['host']}, pid {h['pid']}, since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def mark_done(version_dir: str | os.PathLike, task_id: str, result: dict) -> None:
    """Record a finished task of a resumable run (after its parts are in place), with its result."""
    folder = Path(version_dir) / DONE
    folder.mkdir(exist_ok=True)
    _write_json(folder / f"{task_id}.json", result)


def done_results(version_dir: str | os.PathLike) -> dict[str, dict]:
    """Results of the tasks a resumable run finished, by task id."""
    folder = Path(version_dir) / DONE
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def settings_hash(payload: dict) -> str:
    """Short, stable hash of what a stage's output depends on (recorded as its settings_digest)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    """An (n, w) array as an Arrow fixed-size list column of ``arrow_type`` (how feature arrays are stored)."""
    n, w = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=arrow_type), w)


def write_part(path: Path, table: pa.Table, metadata: dict[str, str]) -> None:
    """Write one Parquet part atomically, with stellar metadata in the schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(table.schema.metadata or {})
    meta.update({k.encode(): v.encode() for k, v in metadata.items()})
    meta[b"stellar.schema_version"] = str(SCHEMA_VERSION).encode()
    table = table.replace_schema_metadata(meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.exists():  # never write through a hard link shared with an older version
        path.unlink()
    pq.write_table(table, tmp, compression="zstd", write_statistics=True, row_group_size=8192)
    os.replace(tmp, path)


def load_stats(features_root: str | os.PathLike) -> dict:
    """The normalisation statistics of the committed features version (label and input scaling,
    written by preprocess): the one thing about the features that train, select, promote and
    predict all need, kept beside the tables it describes so no stage reads another's module."""
    store = TableStore(features_root)
    version = store.current_version()
    if version is None:
        raise FileNotFoundError(f"no committed features under {store.root} (run 'stellar preprocess' first)")
    return json.loads((store.root / version / STATS).read_text())


def read_table(root: str | os.PathLike, table: str, columns: list[str] | None = None) -> pa.Table:
    """The committed table as one Arrow table (small tables / tests), hpx partition column included."""
    import pyarrow.dataset as ds

    path = TableStore(root).table_path(table)
    if not path.exists():
        return pa.table({})
    dataset = ds.dataset(path, format="parquet", partitioning="hive")
    return dataset.to_table(columns=columns)
