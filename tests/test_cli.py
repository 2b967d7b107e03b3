import subprocess
import sys

from stellar.cli import main
from stellar.java import find_java


def test_doctor_lists_versions_and_java(capsys):
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("pyspark", "torch", "mlflow", "java", "spark", "gpu"):
        assert name in out
    assert "MISSING" not in out


def test_java_helper_finds_a_spark_capable_java():
    info = find_java()
    assert info is not None and info.major >= 17
    out = subprocess.run([sys.executable, "-m", "stellar.java"], capture_output=True, text=True)
    assert out.returncode == 0 and f"java {info.version}" in out.stdout


def test_synth_command_in_process(tmp_path, capsys):
    rc = main(["synth", "--no-spark", "--stars", "150", "--set", f"work_dir={tmp_path}",
               "--set", "synth.stars_per_file=100"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "stars 150 in 2 HEALPix-range files" in out
    assert (tmp_path / "synth" / "labels" / "allStar-synth.fits").is_file()


def test_help_texts_list_every_command():
    out = subprocess.run([sys.executable, "-m", "stellar.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("doctor", "synth", "ingest", "preprocess", "select", "train", "predict", "export", "promote", "report", "pipeline", "demo"):
        assert cmd in out


def test_job_scripts_do_not_shadow_the_standard_library():
    """A script's folder comes first on sys.path: a jobs/select.py once broke every spark-submit job."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for folder in ("jobs", "benchmarks"):
        scripts = {p.stem for p in (root / folder).glob("*.py")}
        assert scripts and not scripts & set(sys.stdlib_module_names), folder


def test_export_where_terms_fail_in_one_line():
    """A bad --where value is a StellarError (one line, exit 2), never a ValueError traceback."""
    import pytest

    from stellar.errors import StellarError
    from stellar.export import _filter

    assert _filter("hpx=17,train_like") is not None
    for bad, msg in (("hpx=abc", "hpx takes a whole number"), ("ra=1", "cannot filter on 'ra'"),
                     ("bogus", "unknown term 'bogus'")):
        with pytest.raises(StellarError, match=msg):
            _filter(bad)


def test_ingest_in_a_terminal_shows_progress_within_5_s(tmp_path, small_survey):
    """``stellar ingest`` in a pseudo-terminal prints a live progress line within its first 5 s (before the
    Spark session exists: the line says the stage is starting), and the run then succeeds."""
    import os
    import pty
    import select
    import time

    from conftest import ROOT

    survey, _, _ = small_survey
    cmd = [str(ROOT / ".venv" / "bin" / "stellar"), "--config", str(ROOT / "conf" / "local.yaml"), "ingest",
           "--set", f"work_dir={tmp_path}", "--set", f"ingest.gaia_root={survey}", "--set", "ingest.labels=[]", "--set", "spark.master=local[2]"]
    t0 = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command on the terminal
        os.execv(cmd[0], cmd)
    seen, first = b"", None
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if first is None and b"[ingest]" in seen:
                    first = time.monotonic() - t0
            if time.monotonic() - t0 > 600:
                break
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert first is not None and first < 5.0, (first, text[:2000])
    assert os.WEXITSTATUS(status) == 0 and "ingested into" in text, text[-2000:]
