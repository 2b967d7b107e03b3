"""Ingest on generated surveys: bad-input corpus, accounting, idempotency, crash safety, increments."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from stellar.config import load_config
from stellar.errors import StellarError
from stellar.ingest.run import IngestTask, ingest
from stellar.runtime import LocalExecutor
from stellar.synth.survey import RVS_DIR, run_survey
from stellar.tables import TableStore, done_results, read_table

from conftest import ROOT, small_config


@pytest.fixture(scope="module")
def survey(tmp_path_factory, rvs_instrument):
    tmp = tmp_path_factory.mktemp("ingest-survey")
    cfg = small_config(tmp, n_stars=800, stars_per_file=200)
    return Path(run_survey(cfg.synth, rvs_instrument)["path"])


def ingest_cfg(tmp: Path, gaia_root: Path, **sets):
    over = [f"work_dir={tmp}", f"ingest.gaia_root={gaia_root}", f"ingest.output_dir={tmp / 'tables'}",
            f"ingest.labels=[{{path: {gaia_root / 'labels' / 'allStar-synth.fits'}, catalogue: apogee_dr17}}]"]
    return load_config(ROOT / "conf" / "local.yaml", over + [f"{k}={v}" for k, v in sets.items()])


def store_digest(root: Path) -> dict[str, str]:
    """Content of the committed version (paths relative to it) -> sha256."""
    vdir = TableStore(root).table_path("rvs").parent
    return {str(p.relative_to(vdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(vdir.rglob("*.parquet"))}


def same_table(a, b) -> bool:
    """Equality that treats NaN == NaN (spectra have NaN pixels)."""
    import pyarrow as pa

    if a.schema != b.schema or a.num_rows != b.num_rows:
        return False
    for name in a.column_names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_list(x.type):
            if x.offsets != y.offsets or x.is_null() != y.is_null():
                return False
            x, y = pc.list_flatten(x), pc.list_flatten(y)
        if pa.types.is_floating(x.type):
            if not np.array_equal(x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False), equal_nan=True):
                return False
        elif not x.equals(y):
            return False
    return True


def split_gz(path: Path) -> tuple[list[str], list[str]]:
    lines = gzip.open(path, "rt").read().splitlines(keepends=True)
    n_head = next(i for i, ln in enumerate(lines) if not ln.startswith("#")) + 1
    return lines[:n_head], lines[n_head:]


def write_gz(path: Path, lines: list[str]) -> None:
    path.write_bytes(gzip.compress("".join(lines).encode(), mtime=0))


def edit(line: str, field: int, fn) -> str:
    row = next(csv.reader([line]))
    row[field] = fn(row[field])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerow(row)
    return out.getvalue()


def test_bad_input_corpus_quarantined_with_reasons(tmp_path, survey, rvs_instrument):
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    rvs_dir = root / RVS_DIR
    (rvs_dir / "_MD5SUM.txt").unlink()  # the edited files no longer match it
    files = sorted(rvs_dir.glob("RvsMeanSpectrum_*.csv.gz"))
    assert len(files) == 4
    good_file, edit_file, trunc_file, header_file = files

    head, data = split_gz(edit_file)
    first = len(head) + 1  # line number of data[0]
    d = list(data)
    d[1] = edit(d[1], 4, lambda s: s.rsplit(",", 1)[0] + "]")                # 2400 values
    d[2] = edit(d[2], 4, lambda s: "[" + "abc" + s[s.index(","):])            # unparseable value
    d[3] = edit(d[3], 1, lambda s: "null")                                     # missing source_id
    d[5] = d[4]                                                                # duplicated source_id
    d[6] = edit(d[6], 4, lambda s: "[" + ",".join(["null"] * 2401) + "]")      # all-NaN flux
    d[7] = d[7].replace(",", "", 1)                                            # one field fewer
    d[8] = edit(d[8], 2, lambda s: "12.3.4")                                   # unparseable scalar
    d[9] = edit(d[9], 1, lambda s: "9000000000000000000")                      # beyond Gaia's source_ids
    d[10] = edit(d[10], 4, lambda s: "[1e39" + s[s.index(","):])                # beyond float32 in the flux
    d[11] = edit(d[11], 4, lambda s: "[inf" + s[s.index(","):])                 # inf in the flux
    d[12] = edit(d[12], 2, lambda s: "inf")                                      # ra = inf
    d[13] = edit(d[13], 1, lambda s: "9300000000000000000")                      # beyond int64
    plus_id = int(next(csv.reader([d[14]]))[1])
    d[14] = edit(edit(d[14], 1, lambda s: "+" + s), 0, lambda s: "+" + s)       # '+5' is valid text: kept
    d[15] = edit(d[15], 5, lambda s: "[-0.01" + s[s.index(","):])               # a negative flux error
    d[16] = edit(d[16], 1, lambda s: "-5")                                        # a negative source_id
    write_gz(edit_file, head + d)
    expected = {first + 1: "flux: 2400 values, expected 2401", first + 2: "flux: unparseable number in array",
                first + 3: "source_id: missing", first + 5: "source_id: duplicate",
                first + 6: "flux: all NaN", first + 7: "wrong number of fields", first + 8: "ra: unparseable number",
                first + 9: "source_id: at or above 6917529027641081856, beyond Gaia's range",
                first + 10: "flux: infinite value (inf, or beyond float32)",
                first + 11: "flux: infinite value", first + 12: "ra: infinite value",
                first + 13: "source_id: integer beyond the range of int64",
                first + 15: "flux_error: negative value (an uncertainty is positive)",
                first + 16: "source_id: zero or negative, not a Gaia source_id"}

    raw = trunc_file.read_bytes()
    trunc_file.write_bytes(raw[: int(len(raw) * 0.6)])  # truncated gzip stream
    h2, d2 = split_gz(header_file)
    text = "".join(h2)
    text = text.replace("- name: flux\n#   datatype: string\n#   subtype: float32[null]\n",
                        "- name: flux\n#   datatype: float64\n")
    assert "datatype: float64\n#   description: Mean RVS" in text
    write_gz(header_file, [text] + d2)

    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0})
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    per = s["per_file"]
    name = lambda f: f"gaia:{RVS_DIR}/{f.name}"  # noqa: E731
    # every file's rows add up: in = written + quarantined
    for f in per.values():
        assert f["rows_in"] == f["written"] + f["quarantined"]
    assert s["rows_in"] == s["written"] + s["quarantined"]
    assert per[name(good_file)]["quarantined"] == 0
    assert per[name(edit_file)]["quarantined"] == len(expected)
    assert per[name(edit_file)]["written"] == len(data) - len(expected)
    q = read_table(tmp_path / "tables", "quarantine")
    qe = {r["line"]: r for r in q.filter(pc.equal(q["source_file"], name(edit_file))).to_pylist()}
    for line, reason in expected.items():
        assert reason in qe[line]["reason"], (line, qe[line])
    assert qe[first + 5]["source_id"] is not None and qe[first + 1]["column"] == "flux"
    # truncated file: the complete lines are kept, the broken last one is quarantined, a note says why
    tr = per[name(trunc_file)]
    assert tr["written"] > 0 and tr["quarantined"] == 1
    assert any("gzip stream damaged" in n for n in tr["notes"])
    # a header that does not match: nothing from the file is trusted
    hd = per[name(header_file)]
    assert hd["written"] == 0 and hd["quarantined"] == hd["rows_in"] == len(d2)
    assert "header declares flux as float64" in hd["top_reason"]
    # the other tables are untouched by the RVS damage
    assert s["tables"]["xp"]["quarantined"] == 0 and s["tables"]["xp"]["written"] == 800
    rvs = read_table(tmp_path / "tables", "rvs")
    assert rvs.num_rows == s["tables"]["rvs"]["written"]
    assert pc.count_distinct(rvs["source_id"]).as_py() == rvs.num_rows
    assert plus_id in set(rvs["source_id"].to_pylist())  # the row with '+' integers was read, not dropped


def test_a_byte_order_mark_is_not_damage(tmp_path, survey, rvs_instrument):
    """An ECSV file saved with a UTF-8 byte-order mark reads like the file without it: every row
    written, none quarantined, the names line not counted as a row."""
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    rvs_dir = root / RVS_DIR
    (rvs_dir / "_MD5SUM.txt").unlink()
    target = sorted(rvs_dir.glob("RvsMeanSpectrum_*.csv.gz"))[0]
    head, data = split_gz(target)
    write_gz(target, ["\ufeff" + head[0]] + head[1:] + data)
    assert gzip.open(target, "rb").read(3) == b"\xef\xbb\xbf"
    cfg = ingest_cfg(tmp_path, root)
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    f = s["per_file"][f"gaia:{RVS_DIR}/{target.name}"]
    assert f["rows_in"] == f["written"] == len(data) and f["quarantined"] == 0
    assert s["tables"]["rvs"]["written"] == 800 and s["quarantined"] == 0


def test_checksums_are_never_silent(tmp_path, survey, rvs_instrument, capsys):
    """With ingest.verify_md5 on: a file whose md5 is not the listed one has every row quarantined with
    the reason; a folder without _MD5SUM.txt, a listed file missing from disk, an unlisted data file and
    an ignored non-data name (a .part download) are each counted in the run summary and warned about."""
    from stellar.synth.survey import SOURCE_DIR, XP_DIR

    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    rvs = sorted((root / RVS_DIR).glob("RvsMeanSpectrum_*.csv.gz"))
    head, data = split_gz(rvs[0])
    rvs[0].write_bytes(gzip.compress("".join(head + data).encode(), mtime=12345))  # same rows, other bytes
    (root / RVS_DIR / (rvs[1].name + ".part")).write_bytes(rvs[1].read_bytes())
    (root / XP_DIR / "_MD5SUM.txt").unlink()
    src = sorted((root / SOURCE_DIR).glob("GaiaSource_*.csv.gz"))
    src[0].rename(src[0].with_name("GaiaSource_renamed.csv.gz"))
    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0})
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert s["checksums"] == {
        "no_md5sum": [XP_DIR], "listed_missing": [f"{SOURCE_DIR}/{src[0].name}"],
        "unlisted": [f"{SOURCE_DIR}/GaiaSource_renamed.csv.gz"], "ignored": [f"{RVS_DIR}/{rvs[1].name}.part"],
        "mismatched": [f"gaia:{RVS_DIR}/{rvs[0].name}"]}
    err = capsys.readouterr().err
    for what in ("1 bulk folders without _MD5SUM.txt", "1 files listed in _MD5SUM.txt but not on disk",
                 "1 data files not listed", "1 files whose md5 is not the listed one", "1 names ignored"):
        assert f"stellar ingest: warning: {what}" in err, err
    f = s["per_file"][f"gaia:{RVS_DIR}/{rvs[0].name}"]
    assert f["rows_in"] == f["quarantined"] == len(data) and f["written"] == 0
    q = read_table(tmp_path / "tables", "quarantine").to_pylist()
    mism = [r for r in q if r["source_file"] == f"gaia:{RVS_DIR}/{rvs[0].name}"]
    assert len(mism) == len(data) and all(r["reason"].startswith("file: md5 mismatch (_MD5SUM.txt says ")
                                          and r["column"] == "file" for r in mism)
    assert not any(".part" in k for k in s["per_file"])  # the .part download was not read as data
    assert s["rows_in"] == s["written"] + s["quarantined"] and s["tables"]["rvs"]["written"] == 800 - len(data)


@pytest.mark.parametrize("damage", ["not_fits", "no_teff", "no_id"])
def test_an_unreadable_label_catalogue_fails_the_run_unless_allowed(tmp_path, survey, rvs_instrument, damage):
    """A label catalogue that is not FITS, or lacks a column its preset maps for a label the run needs
    (TEFF), is not a 'one row' loss: the run fails with one line naming the file and why, commits
    nothing, and goes on only when ingest.allow_unreadable names the file."""
    from astropy.io import fits

    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    lab = root / "labels" / "allStar-synth.fits"
    n_rows = len(fits.getdata(lab, 1))
    if damage == "not_fits":
        lab.write_bytes(b"SIMPLE  = this is not a FITS file" * 10)
    else:
        drop = "TEFF" if damage == "no_teff" else "GAIAEDR3_SOURCE_ID"
        with fits.open(lab) as hdul:
            cols = [c for c in hdul[1].columns if c.name != drop]
            fits.BinTableHDU.from_columns(cols).writeto(lab, overwrite=True)
    cfg = ingest_cfg(tmp_path, root)
    with pytest.raises(StellarError) as err:
        ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    msg = str(err.value)
    assert msg.startswith("1 input file could not be read at all: labels:allStar-synth.fits: file unreadable: ")
    assert "Nothing was committed" in msg and "ingest.allow_unreadable" in msg and "\n" not in msg
    if damage == "no_teff":
        assert "lacks the column TEFF that preset apogee_dr17 maps" in msg
    if damage == "no_id":
        assert "catalogue has no GAIAEDR3_SOURCE_ID column" in msg
    assert TableStore(tmp_path / "tables").current_version() is None
    allowed = ingest_cfg(tmp_path, root, **{"ingest.allow_unreadable": "[allStar-synth.fits]",
                                            "ingest.max_bad_fraction": 1.0})
    s = ingest(allowed.ingest, rvs_instrument, allowed.conf_dir)
    f = s["per_file"]["labels:allStar-synth.fits"]
    # a FITS table's rows are known: one quarantine row each; a file that is not FITS: one file-level row
    assert f["written"] == 0 and f["quarantined"] == f["rows_in"] == (1 if damage == "not_fits" else n_rows)
    assert s["tables"]["rvs"]["written"] == 800 and s["rows_in"] == s["written"] + s["quarantined"]


def test_a_gaia_source_export_with_only_the_needed_columns_ingests(tmp_path, survey, rvs_instrument):
    """An archive query returns only the gaia_source columns it was asked for: every row is kept, the
    absent optional columns are null, and the file's notes name them (they had been 'required', and every
    row was quarantined)."""
    from stellar.synth.survey import SOURCE_DIR

    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    (root / SOURCE_DIR / "_MD5SUM.txt").unlink()
    drop = ["l", "b", "pmra", "pmdec", "grvs_mag", "radial_velocity", "vbroad"]
    for path in sorted((root / SOURCE_DIR).glob("GaiaSource_*.csv.gz")):
        head, data = split_gz(path)
        names = head[-1].rstrip("\n").split(",")
        keep = [i for i, name in enumerate(names) if name not in drop]
        yaml_lines, out, skip = head[:-1], [], False
        for ln in yaml_lines:  # drop the columns' datatype entries (name line and its indented keys)
            if ln.startswith("# - name: "):
                skip = ln[len("# - name: "):].strip() in drop
            elif not ln.startswith("#   "):
                skip = False
            if not skip:
                out.append(ln)
        rows = [",".join(r[i] for i in keep) + "\n" for r in csv.reader(data)]
        assert len(rows) == len(data)
        write_gz(path, out + [",".join(names[i] for i in keep) + "\n"] + rows)
    cfg = ingest_cfg(tmp_path, root)
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert s["tables"]["astrometry"]["written"] == 800 and s["tables"]["astrometry"]["quarantined"] == 0
    notes = [n for k, f in s["per_file"].items() if k.startswith(f"gaia:{SOURCE_DIR}/") for n in f["notes"]]
    assert notes and all(n == "optional columns absent (null): " + ", ".join(
        c for c in cfg.ingest.astrometry_columns if c in drop) for n in notes), notes
    ast = read_table(tmp_path / "tables", "astrometry")
    assert ast["pmra"].null_count == ast.num_rows and ast["parallax"].null_count < ast.num_rows


def test_too_many_bad_rows_fail_and_commit_nothing(tmp_path, survey, rvs_instrument, capsys):
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    victim = sorted((root / RVS_DIR).glob("RvsMeanSpectrum_*.csv.gz"))[0]
    head, data = split_gz(victim)
    write_gz(victim, head + [edit(ln, 4, lambda s: s[:-1] + ",1.0]") for ln in data])  # all 2402 values
    cfg = ingest_cfg(tmp_path, root)
    with pytest.raises(StellarError, match="above ingest.max_bad_fraction=5.0%; nothing was committed"):
        ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert TableStore(tmp_path / "tables").current_version() is None
    from stellar.cli import main

    rc = main(["ingest", "--no-spark", "--gaia-root", str(root), "--output", str(tmp_path / "tables"),
               "--set", f"work_dir={tmp_path}",
               "--set", f"ingest.labels=[{{path: {root / 'labels' / 'allStar-synth.fits'}}}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "flux: 2402 values, expected 2401" in err and "Traceback" not in err


def test_rerun_is_identical_and_incremental(tmp_path, survey, rvs_instrument):
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    extra = sorted((root / RVS_DIR).glob("*.csv.gz"))[-1]
    parked = tmp_path / extra.name
    shutil.move(extra, parked)  # start without one RVS file
    n_parked = len(split_gz(parked)[1])
    cfg = ingest_cfg(tmp_path, root)
    first = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert first["version"] == "v000001" and first["tables"]["rvs"]["written"] == 800 - n_parked
    again = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert again["up_to_date"] and TableStore(tmp_path / "tables").current_version() == "v000001"

    # a clean run elsewhere gives byte-identical tables
    cfg_b = ingest_cfg(tmp_path / "b", root)
    ingest(cfg_b.ingest, rvs_instrument, cfg_b.conf_dir)
    assert store_digest(tmp_path / "tables") == store_digest(tmp_path / "b" / "tables")

    # a new file: only it is parsed; the old parts are carried over as hard links
    shutil.move(parked, extra)
    old_part = next((tmp_path / "tables" / "v000001" / "xp").rglob("*.parquet"))
    third = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert third["parsed_files"] == 1 and third["reused_files"] == first["parsed_files"]
    assert third["tables"]["rvs"]["written"] == 800 and third["version"] == "v000002"
    new_part = tmp_path / "tables" / "v000002" / old_part.relative_to(tmp_path / "tables" / "v000001")
    assert new_part.stat().st_ino == old_part.stat().st_ino
    full = ingest_cfg(tmp_path / "c", root)
    ingest(full.ingest, rvs_instrument, full.conf_dir)
    assert store_digest(tmp_path / "tables") == store_digest(tmp_path / "c" / "tables")


def test_chunked_parsing_gives_the_same_rows(tmp_path, survey, rvs_instrument):
    a = ingest_cfg(tmp_path / "a", survey)
    b = ingest_cfg(tmp_path / "b", survey, **{"ingest.chunk_mb": 1})
    sa = ingest(a.ingest, rvs_instrument, a.conf_dir)
    sb = ingest(b.ingest, rvs_instrument, b.conf_dir)
    assert sb["tasks"] > sa["tasks"] + 4
    for table in ("rvs", "xp", "astrometry", "labels"):
        ta = read_table(tmp_path / "a" / "tables", table).sort_by("source_id")
        tb = read_table(tmp_path / "b" / "tables", table).sort_by("source_id")
        assert ta.num_rows == tb.num_rows > 0
        assert same_table(ta, tb), table


def cli_ingest(tmp_path: Path, survey: Path) -> tuple[list[str], list[str]]:
    """`stellar ingest` of the survey in a subprocess (append the output folder), and its overrides."""
    sets = ["--set", f"work_dir={tmp_path}", "--set", f"ingest.labels=[{{path: {survey / 'labels' / 'allStar-synth.fits'}}}]",
            "--set", "ingest.chunk_mb=1"]
    return [sys.executable, "-m", "stellar.cli", "ingest", "--no-spark", "--gaia-root", str(survey), "--output"], sets


def wait_for_done_markers(vdir: Path, n: int, timeout: float = 120) -> None:
    """Until a running ingest has finished ``n`` tasks in its uncommitted version ``vdir``."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (vdir.is_dir() and len(list(vdir.glob("_done/*.json"))) >= n):
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_run_leaves_nothing_visible_and_rerun_matches(tmp_path, survey):
    """SIGKILL the ingest process mid-run; the rerun equals a clean run, byte for byte."""
    cmd, sets = cli_ingest(tmp_path, survey)
    proc = subprocess.Popen(cmd + [str(tmp_path / "tables")] + sets, cwd=ROOT)
    vdir = tmp_path / "tables" / "v000001"
    wait_for_done_markers(vdir, 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(vdir.glob("_done/*.json"))) >= 2  # it was killed mid-run...
    assert TableStore(tmp_path / "tables").current_version() is None  # ...and nothing is visible
    subprocess.run(cmd + [str(tmp_path / "tables")] + sets, cwd=ROOT, check=True)
    subprocess.run(cmd + [str(tmp_path / "clean")] + sets, cwd=ROOT, check=True)
    assert store_digest(tmp_path / "tables") == store_digest(tmp_path / "clean")
    # the rerun carried on from the killed run's finished tasks (restart plan), and left no temp files
    run = json.loads((tmp_path / "tables" / "_runs" / "v000001.json").read_text())
    assert run["resumed"] and 2 <= run["tasks_resumed"] < run["tasks"], run
    assert not list(vdir.rglob(".*.tmp-*"))
    clean = json.loads((tmp_path / "clean" / "_runs" / "v000001.json").read_text())
    assert not clean["resumed"] and clean["tasks_resumed"] == 0
    for key in ("tables", "per_file", "quarantined", "rows_in"):
        assert run[key] == clean[key], key


def test_a_held_store_refuses_a_second_writer(tmp_path, survey, rvs_instrument):
    """One writer per store: while a run holds the writer lock, ingest refuses with the holder named and
    touches nothing; once it is released the same ingest runs and commits."""
    from stellar.tables import StoreBusyError

    cfg = ingest_cfg(tmp_path, survey)
    store = TableStore(cfg.ingest.output_dir)
    with store.writing("another ingest"):
        with pytest.raises(StoreBusyError, match=f"another ingest on .*, pid {os.getpid()}, since"):
            ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
        assert store.current_version() is None and not list(store.root.glob("v0*"))
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert s["version"] == store.current_version() == "v000001" and s["rows_in"] > 0


@pytest.mark.slow
def test_two_ingests_at_once_one_refuses(tmp_path, survey):
    """Two `stellar ingest` processes on one store: the second refuses (exit 2, one line naming the
    first's pid) while the first runs; the first commits a store equal to a clean run's, and the next
    ingest succeeds (nothing to do)."""
    cmd, sets = cli_ingest(tmp_path, survey)
    first = subprocess.Popen(cmd + [str(tmp_path / "tables")] + sets, cwd=ROOT)
    wait_for_done_markers(tmp_path / "tables" / "v000001", 1)
    second = subprocess.run(cmd + [str(tmp_path / "tables")] + sets, cwd=ROOT, capture_output=True, text=True)
    still_running = first.poll() is None
    assert first.wait(timeout=300) == 0
    assert still_running, "the first ingest ended before the second started: the test proves nothing"
    assert second.returncode == 2, second.stderr[-2000:]
    err = [ln for ln in second.stderr.splitlines() if ln.startswith("stellar: error:")]
    assert len(err) == 1 and "another run is writing this table store" in err[0] and f"pid {first.pid}" in err[0]
    assert "Traceback" not in second.stderr
    subprocess.run(cmd + [str(tmp_path / "clean")] + sets, cwd=ROOT, check=True)
    assert TableStore(tmp_path / "tables").current_version() == "v000001"
    assert store_digest(tmp_path / "tables") == store_digest(tmp_path / "clean")
    again = subprocess.run(cmd + [str(tmp_path / "tables")] + sets, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert TableStore(tmp_path / "tables").current_version() == "v000001"


def test_resume_needs_the_same_plan(tmp_path, survey, rvs_instrument):
    """A killed run's version is resumed only by the same plan on the same base; otherwise removed."""
    cfg = ingest_cfg(tmp_path, survey, **{"ingest.chunk_mb": 1})
    calls = []

    class Dying(LocalExecutor):  # runs three parse tasks, then the 'driver' dies (the checksum pass runs whole)
        def map(self, fn, items):
            if items and not isinstance(items[0], IngestTask):
                return [fn(item) for item in items]
            for item in items[:3]:
                calls.append(fn(item))
            raise KeyboardInterrupt

    dying = Dying()

    with pytest.raises(KeyboardInterrupt):
        ingest(cfg.ingest, rvs_instrument, cfg.conf_dir, mapper=dying)
    store = TableStore(tmp_path / "tables")
    assert store.current_version() is None and len(done_results(tmp_path / "tables" / "v000001")) == 3
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    assert s["resumed"] and s["tasks_resumed"] == 3 and s["version"] == "v000001"
    fresh = ingest_cfg(tmp_path / "fresh", survey, **{"ingest.chunk_mb": 1})
    ingest(fresh.ingest, rvs_instrument, fresh.conf_dir)
    assert store_digest(tmp_path / "tables") == store_digest(tmp_path / "fresh" / "tables")

    # other settings: a different plan, so the killed run's folder is removed, not resumed
    other = ingest_cfg(tmp_path / "other", survey, **{"ingest.chunk_mb": 1})
    with pytest.raises(KeyboardInterrupt):
        ingest(other.ingest, rvs_instrument, other.conf_dir, mapper=dying)
    other = ingest_cfg(tmp_path / "other", survey, **{"ingest.chunk_mb": 2})
    s = ingest(other.ingest, rvs_instrument, other.conf_dir)
    assert not s["resumed"] and s["cleaned"] == ["v000001"] and s["version"] == "v000001"


@pytest.mark.spark
def test_spark_ingest_equals_in_process(spark, tmp_path, survey, rvs_instrument):
    from stellar.runtime import SparkExecutor

    a = ingest_cfg(tmp_path / "local", survey)
    b = ingest_cfg(tmp_path / "spark", survey)
    ingest(a.ingest, rvs_instrument, a.conf_dir)
    s = ingest(b.ingest, rvs_instrument, b.conf_dir, mapper=SparkExecutor(spark))
    assert s["written"] == 800 * 3 + s["tables"]["labels"]["written"]
    assert store_digest(tmp_path / "local" / "tables") == store_digest(tmp_path / "spark" / "tables")
    # Spark reads the partitioned tables directly
    path = str(TableStore(tmp_path / "spark" / "tables").table_path("rvs"))
    df = spark.read.parquet(path)
    assert df.count() == 800 and "hpx" in df.columns
    assert np.all(np.array([r[0] for r in df.select("hpx").distinct().collect()]) >= 0)
