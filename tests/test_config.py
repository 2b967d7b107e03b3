from pathlib import Path

import pytest

from stellar.cli import main
from stellar.config import load_config, parse_override
from stellar.errors import ConfigError
from stellar.instruments import load_instrument

ROOT = Path(__file__).resolve().parent.parent


def test_local_yaml_is_the_embedded_default(tmp_path):
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"work_dir={tmp_path}"])
    assert cfg.spark.master == "local[*]"
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.synth.output_dir == f"{tmp_path}/synth"
    assert cfg.instrument == "gaia_rvs"


def test_cluster_example_validates(tmp_path):
    cfg = load_config(ROOT / "conf" / "cluster.example.yaml", [f"work_dir={tmp_path}"])
    assert cfg.spark.master.startswith("spark://")
    assert cfg.spark.conf["spark.executor.cores"] == "8"


def test_overrides_keep_types_and_reach_spark_conf(tmp_path):
    cfg = load_config(None, [f"work_dir={tmp_path}", "synth.n_stars=123", "synth.training_fraction=0.5",
                             "spark.master=local[2]", "spark.conf.spark.sql.shuffle.partitions=7",
                             "spark.conf.spark.eventLog.enabled=true"])
    assert cfg.synth.n_stars == 123 and cfg.synth.training_fraction == 0.5
    assert cfg.spark.master == "local[2]"
    assert cfg.spark.conf == {"spark.sql.shuffle.partitions": "7", "spark.eventLog.enabled": "true"}


@pytest.mark.parametrize("override, fragment", [
    ("synth.n_starz=5", "synth.n_starz: unknown key"),
    ("synth.n_stars=-4", "synth.n_stars: Input should be greater than 0"),
    ("synth.training_fraction=2", "synth.training_fraction: Input should be less than or equal to 1"),
    ("spark.driver_memory=lots", "spark.driver_memory"),
    ("spark.log_level=LOUD", "spark.log_level"),
    ("bogus=1", "bogus: unknown key"),
    ("synth=3", "synth"),
    # a boolean is never read as a number (pydantic alone takes true for 1)
    ("ingest.chunk_mb=true", "ingest.chunk_mb: Value error, expected a number, got the boolean true"),
    ("train.catastrophic_odds=false", "train.catastrophic_odds: Value error, expected a number, got the boolean"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "conf" / "local.yaml", [override])
    assert fragment in str(err.value)


def test_spark_conf_keys_must_be_spark_settings(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  conf:\n    executor.memory: 4g\n")
    with pytest.raises(ConfigError, match="keys must start with 'spark.'"):
        load_config(bad)


def test_unreadable_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("synth.n_stars")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("synth..n=1")


def test_config_digest_changes_with_content(tmp_path):
    a = load_config(None, [f"work_dir={tmp_path}"])
    b = load_config(None, [f"work_dir={tmp_path}", "synth.seed=7"])
    assert a.digest() == load_config(None, [f"work_dir={tmp_path}"]).digest()
    assert a.digest() != b.digest()


def test_instrument_presets(rvs_instrument, hr15n_instrument):
    assert rvs_instrument.n_pixels == 2401
    assert rvs_instrument.wave[0] == 846.0 and rvs_instrument.wave[-1] == 870.0
    assert abs(rvs_instrument.wave[1] - 846.01) < 1e-9
    assert hr15n_instrument.n_pixels == 3201 and "a_li" in hr15n_instrument.labels
    assert any(line.element == "Li" for line in hr15n_instrument.lines)


def test_bad_instrument_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_instrument("no_such_instrument")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nwavelength: {start: 10, stop: 5, step: 1}\nresolution: 1000\n"
                   "labels: [teff, colour]\nspectrum_format: fits_table\nlines: []\n")
    with pytest.raises(ConfigError) as err:
        load_instrument(str(bad))
    text = str(err.value)
    assert "wavelength" in text and "lines" in text


def test_cli_reports_bad_config_without_traceback(capsys, tmp_path):
    rc = main(["synth", "--no-spark", "--set", f"work_dir={tmp_path}", "--set", "synth.n_stars=0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "stellar: error: invalid configuration" in err and "synth.n_stars" in err
    assert "Traceback" not in err
    rc = main(["synth", "--no-spark", "--set", f"work_dir={tmp_path}", "--instrument", "nope"])
    assert rc == 2 and "instrument preset 'nope' not found" in capsys.readouterr().err
