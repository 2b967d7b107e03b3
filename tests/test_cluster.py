"""The cluster path for real, on 127.0.0.1.

A Spark standalone master and two workers started from the installed pyspark
(``deploy/standalone``), a real ``mlflow server`` with a SQLite backend and
proxied artifacts, and the stages spark-submitted (``deploy/submit``) with the
packed environment (``deploy/pack``) as their executors' Python. Then faults:
a worker killed during predict, the driver killed during a write, the MLflow
server unreachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stellar.tables import TableStore, read_table

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

BIN = ROOT / ".venv" / "bin"
SETS = ["synth.n_stars=3000", "synth.stars_per_file=500", "synth.training_fraction=0.5", "train.members=2",
        "train.model_overrides={max_epochs: 2, patience: 2, pretrain_epochs: 1}", "select.place_batch=500",
        "promote.max_z_std_error=10", "predict.batch_size=32"]
STAGES = ["ingest", "preprocess", "select", "train", "promote", "predict"]
LABEL_COLS = ["teff", "teff_err", "logg", "m_h", "m_h_err", "alpha_m", "fe_h"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _pack_key() -> str:
    """What the packed environment is built from: a rebuild whenever any of it changes."""
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "deploy" / "requirements.lock", ROOT / "deploy" / "pack"]
    files += sorted((ROOT / "stellar").rglob("*.py")) + sorted((ROOT / "conf").rglob("*.yaml"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def packed_env() -> Path:
    """deploy/pack's archive, cached under build/ by the hash of what goes into it."""
    cache = ROOT / "build" / "packed-env"
    out = cache / f"stellar-env-{_pack_key()}.tar.gz"
    if not out.is_file():
        shutil.rmtree(cache, ignore_errors=True)
        r = subprocess.run([str(ROOT / "deploy" / "pack"), str(out)], capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                             "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                            stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start: " + (tmp / "server.log").read_text()[-3000:])
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    run = tmp_path_factory.mktemp("standalone")
    port, webui = free_port(), free_port()
    r = subprocess.run([str(ROOT / "deploy" / "standalone"), "start", "--dir", str(run), "--workers", "2",
                        "--cores", "1", "--memory", "3g", "--port", str(port), "--webui-port", str(webui),
                        "--cleanup-after", "20"],  # each application unpacks ~1.7 GB per executor
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    url = r.stdout.strip().splitlines()[-1]
    assert url == f"spark://127.0.0.1:{port}"
    yield {"url": url, "run": run, "webui": f"http://127.0.0.1:{webui}"}
    subprocess.run([str(ROOT / "deploy" / "standalone"), "stop", "--dir", str(run)], timeout=120)


def submit_cmd(cluster, env_archive: Path, stage: str, work: Path, *sets: str, ui_port: int | None = None):
    cmd = [str(ROOT / "deploy" / "submit"), "--master", cluster["url"], "--env", str(env_archive),
           "--conf", "spark.executor.memory=2g", "--conf", "spark.task.maxFailures=4",
           "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
           # executors fetch the packed environment into java.io.tmpdir: a killed one leaves ~0.7 GB there,
           # so it goes to the suite's scratch folder (conftest), not /tmp
           "--conf", f"spark.executor.extraJavaOptions=-Djava.io.tmpdir={os.environ['SPARK_LOCAL_DIRS']}"]
    if ui_port:
        cmd += ["--conf", f"spark.ui.port={ui_port}"]
    cmd += [stage, "--config", str(ROOT / "conf" / "local.yaml"), "--set", f"work_dir={work}",
            "--set", "mlflow.artifact_root=null"]  # the server's proxied artifact store, as deploy/README.md says
    for s in [*SETS, *sets]:
        cmd += ["--set", s]
    return cmd


def submit_env(tracking_uri: str) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "DRIVER_PYTHON": str(BIN / "python"),
            "SPARK_SUBMIT": str(BIN / "spark-submit"), "PATH": f"{BIN}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, packed_env, mlflow_server, cluster):
    """The stages on the cluster (spark-submit, MLflow server) and the same in local mode (SQLite)."""
    tmp = tmp_path_factory.mktemp("cluster-runs")
    survey_work = tmp / "survey"
    r = subprocess.run([str(BIN / "stellar"), "--config", str(ROOT / "conf" / "local.yaml"), "synth", "--no-spark",
                        "--set", f"work_dir={survey_work}", *sum((["--set", s] for s in SETS), [])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    gaia = survey_work / "synth"
    data = [f"ingest.gaia_root={gaia}", f"ingest.labels=[{{path: {gaia / 'labels' / 'allStar-synth.fits'}}}]"]

    # ingest as its own application (jobs/ingest.py), then the other stages as one application of the
    # pipeline job (jobs/pipeline.py, what the scheduled rerun submits): both entry points, and one
    # executor start-up (unpacking the environment) instead of five
    on_cluster = tmp / "cluster"
    for stage in ("ingest", "pipeline"):
        extra = ["--only", ",".join(STAGES[1:])] if stage == "pipeline" else []
        r = subprocess.run(submit_cmd(cluster, packed_env, stage, on_cluster, *data) + extra,
                           env=submit_env(mlflow_server), capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, (stage, r.stdout[-3000:], r.stderr[-5000:])

    local = tmp / "local"
    r = subprocess.run([str(BIN / "stellar"), "--config", str(ROOT / "conf" / "local.yaml"), "pipeline",
                        "--only", ",".join(STAGES), "--set", f"work_dir={local}", "--set", "spark.master=local[2]",
                        *sum((["--set", s] for s in [*SETS, *data]), [])],
                       env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"cluster": on_cluster, "local": local, "data": data}


def predictions(root: Path):
    return read_table(root, "predictions").sort_by("source_id")


def test_spark_submit_on_a_standalone_cluster_equals_local_mode(runs, cluster, mlflow_server):
    state = get_json(cluster["webui"] + "/json/")
    # both applications ran on the cluster, each with its executors on both workers
    apps = [a for a in state["completedapps"] if a["name"] in ("stellar-ingest", "stellar-pipeline")]
    assert state["aliveworkers"] == 2 and sorted(a["name"] for a in apps) == ["stellar-ingest", "stellar-pipeline"]
    assert all(a["cores"] == 2 for a in apps), apps

    for table, root, cols in (("features", "features", ["source_id", "split", "snr"]),
                              ("selection", "selection", ["source_id", "train_like"])):
        a = read_table(runs["cluster"] / root, table, cols).sort_by("source_id")
        b = read_table(runs["local"] / root, table, cols).sort_by("source_id")
        assert a.num_rows == b.num_rows > 2000 and a.equals(b), table

    a, b = predictions(runs["cluster"] / "predictions"), predictions(runs["local"] / "predictions")
    n = TableStore(runs["cluster"] / "features").current_manifest()["summary"]["counts"]["stars"]
    assert a.num_rows == b.num_rows == n and len(set(a["source_id"].to_pylist())) == n
    assert a["source_id"].equals(b["source_id"])
    for col in LABEL_COLS:
        np.testing.assert_allclose(a[col].to_numpy(zero_copy_only=False), b[col].to_numpy(zero_copy_only=False),
                                   rtol=1e-5, err_msg=col)
    assert a["train_like"].equals(b["train_like"])
    # the model came from the MLflow server's registry, its artifacts through the server
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("stellar-hybrid", "champion")
    assert set(a["model_version"].to_pylist()) == {int(champion.version)}
    assert set(a["model_run_id"].to_pylist()) == {champion.run_id}
    assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")


def test_worker_killed_during_predict_changes_nothing(runs, cluster, packed_env, mlflow_server):
    ui = free_port()
    out = runs["cluster"] / "pred-fault"
    proc = subprocess.Popen(submit_cmd(cluster, packed_env, "predict", runs["cluster"], *runs["data"],
                                       f"predict.output_dir={out}", ui_port=ui),
                            env=submit_env(mlflow_server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    victim = int((cluster["run"] / "worker-2.pid").read_text())
    killed_at = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            apps = get_json(f"http://127.0.0.1:{ui}/api/v1/applications")
            stages = get_json(f"http://127.0.0.1:{ui}/api/v1/applications/{apps[0]['id']}/stages?status=active")
            execs = get_json(f"http://127.0.0.1:{ui}/api/v1/applications/{apps[0]['id']}/executors")
        except (OSError, ValueError, IndexError):
            time.sleep(0.05)
            continue
        # both executors up and a multi-task stage part done: kill one worker (its executor goes with it)
        busy = [s for s in stages if s["numTasks"] > 1 and 1 <= s["numCompleteTasks"] < s["numTasks"]]
        if len([e for e in execs if e["id"] != "driver"]) >= 2 and busy:
            os.kill(victim, signal.SIGKILL)
            killed_at = busy[0]
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=900)
    try:
        assert killed_at is not None, "predict finished before a worker could be killed:\n" + output[-3000:]
        assert proc.returncode == 0, output[-5000:]
        a, b = predictions(out), predictions(runs["cluster"] / "predictions")
        assert a.num_rows == b.num_rows and len(set(a["source_id"].to_pylist())) == a.num_rows  # none lost or doubled
        assert a.select(["source_id", *LABEL_COLS, "train_like"]).equals(
            b.select(["source_id", *LABEL_COLS, "train_like"]))
        assert get_json(cluster["webui"] + "/json/")["aliveworkers"] == 1
    finally:  # bring the worker back for the tests after this one
        _restart_worker(cluster, 2)


def _restart_worker(cluster, i: int) -> None:
    run = cluster["run"]
    p = subprocess.Popen([str(ROOT / "deploy" / "standalone"), "worker", cluster["url"], "--host", "127.0.0.1",
                          "--cores", "1", "--memory", "3g", "--dir", str(run), "--index", str(i),
                          "--cleanup-after", "20"],
                         stdout=open(run / f"worker-{i}-restart.log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    (run / f"worker-{i}.pid").write_text(str(p.pid))  # exec'd: the pid becomes the worker JVM's
    deadline = time.time() + 120
    while time.time() < deadline and get_json(cluster["webui"] + "/json/")["aliveworkers"] < 2:
        time.sleep(0.5)


def test_driver_killed_during_a_write_leaves_nothing_visible(runs, cluster, packed_env, mlflow_server):
    out = runs["cluster"] / "features-killed"
    cmd = submit_cmd(cluster, packed_env, "preprocess", runs["cluster"], *runs["data"],
                     f"preprocess.output_dir={out}")
    proc = subprocess.Popen(cmd, env=submit_env(mlflow_server), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    seen_current_before_kill = False
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        seen_current_before_kill |= (out / "_CURRENT").exists()
        if any(out.glob("v000001/features/*/*.parquet")):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver (spark-submit and its JVM) mid-write
            break
        time.sleep(0.02)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "preprocess finished before its driver could be killed"
    assert not seen_current_before_kill and not (out / "_CURRENT").exists()
    with pytest.raises(FileNotFoundError):  # readers see no table at all, not a partial one
        read_table(out, "features")

    r = subprocess.run(cmd, env=submit_env(mlflow_server), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    a = read_table(out, "features").sort_by("source_id")
    b = read_table(runs["cluster"] / "features", "features").sort_by("source_id")
    assert a.num_rows == b.num_rows
    for col in ("source_id", "split", "snr", "xp", "scalars"):
        assert a[col].equals(b[col]), col
    assert TableStore(out).current_version() == "v000001" and not (out / "v000002").exists()


def test_mlflow_server_down_fails_before_any_work(runs, cluster, packed_env):
    before = len(get_json(cluster["webui"] + "/json/")["completedapps"])
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    r = subprocess.run(submit_cmd(cluster, packed_env, "train", runs["cluster"], *runs["data"],
                                  "train.seed=99"), env=submit_env(dead), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr  # spark-submit passes the Python driver's stderr through its stdout
    assert r.returncode == 2, out[-3000:]
    assert f"MLflow tracking server {dead} is unreachable" in out and "nothing was run" in out
    assert time.time() - t0 < 120
    state = get_json(cluster["webui"] + "/json/")  # no application reached the cluster
    assert len(state["completedapps"]) == before and not state["activeapps"]
