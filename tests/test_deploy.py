"""deploy/: the manifests validate without a cluster, and the wrapper builds the right spark-submit commands."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stellar.config import load_config

from conftest import ROOT

DEPLOY = ROOT / "deploy"
ENV_PY = "./environment/bin/python"


def lock_version(package: str) -> str:
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} not in the lock")


def check_app_spec(spec: dict, where: str) -> None:
    """What spark-operator needs, and what stellar needs, in a SparkApplication spec."""
    for key in ("type", "mode", "image", "mainApplicationFile", "sparkVersion", "driver", "executor", "restartPolicy"):
        assert key in spec, f"{where}: spec.{key} missing"
    assert spec["type"] == "Python" and spec["mode"] == "cluster", where
    job = spec["mainApplicationFile"]
    assert job.startswith("local:///opt/stellar/jobs/"), where
    assert (ROOT / "jobs" / Path(job).name).is_file(), f"{where}: {job} is not a file in jobs/"
    assert spec["sparkVersion"] == lock_version("pyspark"), f"{where}: Spark version differs from the lock"
    args = spec.get("arguments", [])
    assert "--config" in args, where
    assert any(a.endswith("#environment") for a in spec["deps"]["archives"]), f"{where}: no packed env archive"
    conf = spec["sparkConf"]
    assert conf["spark.pyspark.python"] == ENV_PY and conf["spark.pyspark.driver.python"] == ENV_PY, where
    assert conf["spark.executorEnv.PYTHONHASHSEED"] == "0", where
    for role in ("driver", "executor"):
        part = spec[role]
        assert "cores" in part and re.fullmatch(r"\d+[gm]", part["memory"]), f"{where}: {role} resources"
        env = {e["name"]: e for e in part.get("env", [])}
        assert env["PYSPARK_PYTHON"]["value"] == ENV_PY, f"{where}: {role} PYSPARK_PYTHON"
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for mount in part.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: {role} mounts undeclared volume {mount['name']}"
    # no secret values in the manifest: the token comes from a Secret
    for e in spec["driver"].get("env", []):
        if "TOKEN" in e["name"] or "PASSWORD" in e["name"]:
            assert "valueFrom" in e and "value" not in e, f"{where}: {e['name']} must come from a Secret"
    gpu = spec["executor"].get("gpu")
    if gpu:
        assert gpu["name"] == "nvidia.com/gpu" and gpu["quantity"] >= 1, where
        assert float(conf["spark.executor.resource.gpu.amount"]) == gpu["quantity"], where
        assert 0 < float(conf["spark.task.resource.gpu.amount"]) <= 1, where
        script = conf["spark.executor.resource.gpu.discoveryScript"]
        assert script.startswith("/opt/stellar/deploy/") and (DEPLOY / Path(script).name).is_file(), where


@pytest.mark.parametrize("name", ["ingest", "preprocess", "select", "train", "predict"])
def test_spark_applications_validate(name):
    doc = yaml.safe_load((DEPLOY / "k8s" / f"{name}.yaml").read_text())
    assert doc["apiVersion"] == "sparkoperator.k8s.io/v1beta2" and doc["kind"] == "SparkApplication"
    assert doc["metadata"]["name"] == f"stellar-{name}" and doc["metadata"]["namespace"] == "stellar"
    check_app_spec(doc["spec"], name)
    if name in ("train", "predict"):  # GPU executors where the network runs
        assert doc["spec"]["executor"]["gpu"]["name"] == "nvidia.com/gpu"


def test_scheduled_rerun_validates():
    doc = yaml.safe_load((DEPLOY / "k8s" / "rerun-scheduled.yaml").read_text())
    assert doc["kind"] == "ScheduledSparkApplication"
    spec = doc["spec"]
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"  # two reruns must never write at once
    check_app_spec(spec["template"], "rerun")
    assert spec["template"]["mainApplicationFile"].endswith("/jobs/pipeline.py")


def test_configmap_holds_a_valid_config(tmp_path):
    doc = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())
    path = tmp_path / "stellar.yaml"
    path.write_text(doc["data"]["stellar.yaml"])
    cfg = load_config(path, [f"work_dir={tmp_path}"])
    assert cfg.mlflow.artifact_root is None and cfg.mlflow.tracking_uri.startswith("http://")
    # every app mounts the config map where its --config points
    for f in (DEPLOY / "k8s").glob("*.yaml"):
        d = yaml.safe_load(f.read_text())
        spec = d["spec"].get("template", d["spec"]) if d["kind"] != "ConfigMap" else None
        if spec:
            assert spec["arguments"][spec["arguments"].index("--config") + 1] == "/etc/stellar/stellar.yaml"


def dry(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEPLOY / "submit"), "--dry-run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_submit_standalone_client_mode():
    r = dry("--master", "spark://node01:7077", "predict", "--config", "conf/local.yaml",
            env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[cmd.index("--deploy-mode") + 1] == "client"
    assert cmd[cmd.index("--archives") + 1].endswith("stellar-env.tar.gz#environment")
    assert "spark.pyspark.python=./environment/bin/python" in cmd
    assert "spark.executorEnv.MLFLOW_TRACKING_URI=http://mlflow:5000" in cmd
    assert cmd[-3:] == [str(ROOT / "jobs" / "predict.py"), "--config", "conf/local.yaml"]


def test_submit_yarn_cluster_mode_ships_the_config():
    r = dry("--master", "yarn", "--executors", "10", "--gpus", "1", "select", "--config", "conf/cluster.example.yaml")
    assert r.returncode == 0, r.stderr
    cmd = r.stdout.split()
    assert cmd[cmd.index("--deploy-mode") + 1] == "cluster"
    assert "spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python" in cmd
    assert cmd[cmd.index("--files") + 1] == "conf/cluster.example.yaml"
    assert cmd[-2:] == ["--config", "cluster.example.yaml"]  # the driver finds it beside itself
    assert str(ROOT / "jobs" / "selection.py") in cmd and "spark.executor.resource.gpu.amount=1" in cmd


def test_submit_kubernetes_needs_an_image_and_a_uri():
    assert "needs --image" in dry("--master", "k8s://https://api:6443", "train").stderr
    r = dry("--master", "k8s://https://api:6443", "--image", "img:1", "--env", "/local/env.tar.gz", "train")
    assert r.returncode == 2 and "must be a URI" in r.stderr
    r = dry("--master", "k8s://https://api:6443", "--image", "img:1", "--env", "local:///opt/stellar/env.tar.gz",
            "train", "--config", "/etc/stellar/stellar.yaml")
    assert r.returncode == 0 and "spark.kubernetes.container.image=img:1" in r.stdout


def test_submit_refuses_credentials_and_unknown_stages():
    r = dry("--master", "yarn", "train", env={"MLFLOW_TRACKING_URI": "https://bob:pw@mlflow:5000"})
    assert r.returncode == 2 and "must not carry credentials" in r.stderr
    r = dry("trian")
    assert r.returncode == 2 and "unknown stage 'trian'" in r.stderr


def test_scripts_parse():
    for script in ("pack", "submit", "standalone", "gpu-discovery.sh", "slurm/stellar-rerun.sbatch", "mlflow/serve"):
        path = DEPLOY / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr)
    sbatch = (DEPLOY / "slurm" / "stellar-rerun.sbatch").read_text()
    for directive in ("--nodes", "--ntasks-per-node=1", "--cpus-per-task", "--time", "--exclusive"):
        assert f"#SBATCH {directive}" in sbatch
    assert "deploy/standalone\" master" in sbatch and "deploy/submit\" --master" in sbatch
    assert "deploy/standalone\" wait" in sbatch and "urllib" not in sbatch  # one wait loop, in standalone


def test_standalone_wait_gives_up_with_the_reason():
    """With no master listening, 'wait' exits 2 after its timeout and names what it waited for."""
    import socket

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([str(DEPLOY / "standalone"), "wait", "--webui-port", str(port), "--workers", "2",
                        "--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"fewer than 2 workers registered with http://127.0.0.1:{port} within 2 s" in r.stderr
