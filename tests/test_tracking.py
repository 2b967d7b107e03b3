"""The MLflow preflight: a clear error before any work when the tracking server is down."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stellar.config import load_config
from stellar.tracking import TrackingError, check_tracking, redact

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redact_hides_credentials():
    assert redact("https://alice:s3cret@mlflow.example.org:5000/x") == "https://***@mlflow.example.org:5000/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_dead_server_is_a_clear_error():
    uri = f"http://user:pw@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=r"unreachable.*nothing was run") as exc:
        check_tracking(uri, timeout=2)
    assert "pw" not in str(exc.value)


def test_environment_points_jobs_at_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path}"])
    assert cfg.mlflow.tracking_uri == "http://mlflow.internal:5000"
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path}", "mlflow.tracking_uri=http://other:1"])
    assert cfg.mlflow.tracking_uri == "http://other:1"  # --set wins over the environment


def test_one_process_two_stores_each_config_keeps_its_own(tmp_path, monkeypatch):
    """Touching one run's store must not re-point a config loaded later at it (mlflow.set_tracking_uri
    exports MLFLOW_TRACKING_URI, which load_config honours): two runs re-assessed in one process got
    the first run's champion for the second. The registry never touches the process-wide URI; the
    training run's fluent logging sets it without exporting it, and a user's own variable survives."""
    import mlflow

    from stellar.registry import Registry, use_tracking_uri
    from stellar.train import registered_with_digest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path / 'a'}"])
    before = mlflow.get_tracking_uri()
    assert registered_with_digest(a, "none") is None  # reads run a's (new, empty) store
    assert Registry.from_config(a).client.tracking_uri == a.mlflow.tracking_uri
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in __import__("os").environ
    b = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path / 'b'}"])
    assert b.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'b'}/mlflow.db" != a.mlflow.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    registered_with_digest(b, "none")
    use_tracking_uri(b.mlflow.tracking_uri)  # what the training run's logging does
    assert mlflow.get_tracking_uri() == b.mlflow.tracking_uri
    assert load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path / 'c'}"]).mlflow.tracking_uri \
        == "http://mlflow.internal:5000"


def test_cli_stops_before_any_work_when_the_server_is_down(tmp_path):
    """`stellar train` against a dead server: exit 2 within seconds, the reason on stderr, no Spark
    session started and nothing written."""
    work = tmp_path / "work"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "stellar.cli", "--config", str(ROOT / "conf" / "local.yaml"), "train",
                        "--set", f"work_dir={work}", "--set", f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "MLflow tracking server http://127.0.0.1:" in r.stderr and "unreachable" in r.stderr
    assert time.time() - t0 < 60 and not work.exists()
