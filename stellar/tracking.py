"""Reaching the MLflow tracking server: a check before any work, and URIs safe to print.

A stage that needs MLflow (train, promote, predict, report) checks the
server first, so a full-catalogue rerun fails in seconds with a clear
message, not after hours of ingest or when its first task tries to log.
Credentials come from the environment (``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, read by MLflow
itself), never from config files, and are never printed.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from stellar.errors import StellarError

MLFLOW_STAGES = frozenset({"train", "promote", "predict", "report"})
MLFLOW_WRITERS = frozenset({"train", "promote"})  # stages that write runs, versions or aliases


class TrackingError(StellarError):
    """An MLflow tracking store that cannot be reached or written, or a URI of an unsupported scheme."""
    pass


def redact(uri: str) -> str:
    """The URI without any user:password part (for messages and logs)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def is_server(uri: str) -> bool:
    """Whether the tracking URI names a server (http or https), checked through its /health endpoint."""
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def check_tracking(uri: str, timeout: float = 10.0, write: bool = False) -> None:
    """Raise TrackingError unless the tracking store can be reached (server: its /health answers OK;
    SQLite: its folder exists or can be created, and with ``write`` the database and its folder are
    writable, so a read-only work folder fails in one line before any training, not in SQLAlchemy)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if is_server(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                body = resp.read(64).decode(errors="replace").strip()
        except urllib.error.HTTPError as exc:
            raise TrackingError(f"MLflow tracking server {redact(uri)} answered {exc.code} on /health; "
                                "nothing was run") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); nothing was run. "
                                "Start it (see deploy/README.md) or point mlflow.tracking_uri / "
                                "MLFLOW_TRACKING_URI at a running one.") from None
        if body.upper() != "OK":
            raise TrackingError(f"{redact(uri)}/health answered {body!r}, not an MLflow server's 'OK'; nothing "
                                "was run")
    elif scheme == "sqlite":
        db = Path(uri.split("sqlite:///", 1)[-1])  # sqlite:////abs/path or sqlite:///relative/path
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create its folder ({exc}); nothing was run") from None
        if write:
            for target in (db, db.parent):  # SQLite writes a journal beside the database
                if target.exists() and not os.access(target, os.W_OK):
                    raise TrackingError(f"MLflow store {uri}: {target} is not writable (a read-only folder?); "
                                        "nothing was run") from None
    elif scheme not in ("", "file", "databricks", "postgresql", "mysql", "mssql"):
        raise TrackingError(f"mlflow.tracking_uri {redact(uri)!r}: unsupported scheme {scheme!r}")
