"""The stage contract, once: what a run of a stage returns, and the steps every table-writing stage takes.

A stage reads committed inputs and writes a new version of its own output. The steps are always the
same, and :class:`StoreRun` takes them so that no stage writes them by hand:

1. hold the output store's writer lock for the whole run (a second run refuses);
2. compare the digest of everything the output depends on (settings, input versions, code version)
   with the committed version's: equal means *up to date*, and the run returns that version's summary;
3. open a new version (with a plan digest a killed run resumes there);
4. the stage maps its tasks and accounts its rows;
5. commit the manifest (code version, digest, HEALPix order, summary) and switch the pointer.

:class:`StageResult` is what every stage's ``run`` returns, in one shape: the stage, whether it ran or
found its output up to date, the version it committed or found, the digest, and a JSON-able summary
(counts and timings, never a live object). The pipeline and the CLI read nothing else.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stellar import __version__
from stellar.tables import TableStore


@dataclass(frozen=True)
class StageResult:
    """What one run of a stage did.

    Attributes:
        stage: the stage's name (``ingest``, ``preprocess``, ...).
        status: ``"ran"`` (it wrote a new version) or ``"up_to_date"`` (its output already matched).
        version: the table version (``v000003``) or registry version (``4``) it committed or found.
        digest: the digest of everything the output depends on, where the stage has one.
        summary: the stage's counts and timings, JSON-able; the keys are the stage's own.
    """

    stage: str
    status: Literal["ran", "up_to_date"]
    version: str | int | None
    digest: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def up_to_date(self) -> bool:
        """True when the stage found its output matching its inputs and did nothing."""
        return self.status == "up_to_date"

    def as_dict(self) -> dict[str, Any]:
        """The summary as the CLI prints it and ``pipeline-summary.json`` stores it: the stage's own keys,
        ``version``, and ``up_to_date: true`` when it did nothing."""
        out = {**self.summary}
        if self.version is not None:
            out.setdefault("version", self.version)
        if self.up_to_date:
            out["up_to_date"] = True
        return out

    @classmethod
    def from_summary(cls, stage: str, summary: dict[str, Any], digest: str | None = None) -> "StageResult":
        """The result of a stage whose function returns its summary dict (``up_to_date`` and ``version``
        keys read from it)."""
        return cls(stage, "up_to_date" if summary.get("up_to_date") else "ran", summary.get("version"),
                   digest or summary.get("settings_digest"), {k: v for k, v in summary.items() if k != "up_to_date"})


class StoreRun:
    """One run of a stage on its output store: ``with StoreRun("select", root, digest) as run:``.

    Inside, :meth:`committed` says whether the committed version already has this digest (the run is
    then up to date), :meth:`new_version` opens the version the run writes, and :meth:`commit` writes
    its manifest with the fields every stage records. The lock is held from ``with`` to its end.
    """

    def __init__(self, stage: str, root, digest: str):
        self.stage = stage
        self.store = TableStore(root)
        self.digest = digest
        self.version: str | None = None
        self.started = time.perf_counter()
        self._lock = None

    def __enter__(self) -> "StoreRun":
        self._lock = self.store.writing(self.stage)
        self._lock.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def seconds(self) -> float:
        """Seconds since the run started (before the lock was taken)."""
        return time.perf_counter() - self.started

    def committed(self) -> dict | None:
        """The committed summary when its digest is this run's (nothing to do), else None. Versions a
        killed run left behind are removed (``TableStore.committed_with``)."""
        manifest = self.store.committed_with(self.digest)
        return None if manifest is None else {**manifest["summary"], "version": self.store.current_version()}

    def new_version(self, plan_digest: str | None = None) -> str:
        """Open the version this run writes (``TableStore.new_version``)."""
        self.version = self.store.new_version(plan_digest)
        return self.version

    def commit(self, summary: dict, healpix_order: int | None, **manifest: Any) -> dict:
        """Commit the version with its summary: the manifest records the code version, the digest, the
        HEALPix order of the partitions and ``manifest``'s extra fields. Returns ``summary``."""
        self.store.commit(self.version, {"stellar_version": __version__, "settings_digest": self.digest,
                                         "summary": summary, "healpix_order": healpix_order, **manifest})
        return summary


def git_commit() -> str:
    """The commit of the code's checkout (tagged on the registered version); ``unknown`` outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
