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
