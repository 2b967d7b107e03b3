"""Damaged inputs that once cost a whole file: gzip damage, quotes across lines, truncated label
FITS, a read-only work folder, a store whose folder and manifest disagree.

Each case asserts what the run says (exit code or error, the message or note) and that rows in =
written + quarantined = the rows the input really holds. The rest of the corpus lives beside the
code it exercises: ``tests/test_ingest.py`` (bad values and fields, source_ids beyond Gaia's range
or int64, '+' integers, inf and float32 overflow, BOM, checksums, a label FITS that is not FITS or
lacks TEFF, column subsets, two ingests at once, a killed run) and ``tests/test_predict.py`` (a
registry predict never writes, and a predict run as an unprivileged user on a registry it cannot write).
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from stellar.errors import StellarError
from stellar.ingest.run import ingest
from stellar.io.gaia_ecsv import uncompressed_size_hint
from stellar.synth.survey import RVS_DIR, run_survey
from stellar.tables import _VERIFIED, StoreDamagedError, TableStore, read_table

from conftest import ROOT, small_config
from test_ingest import ingest_cfg, split_gz, write_gz


@pytest.fixture(scope="module")
def survey(tmp_path_factory, rvs_instrument):
    tmp = tmp_path_factory.mktemp("damaged-survey")
    cfg = small_config(tmp, n_stars=400, stars_per_file=100)
    return Path(run_survey(cfg.synth, rvs_instrument)["path"])


def _copy(survey: Path, tmp: Path) -> tuple[Path, Path, int]:
    """A copy of the survey without the RVS checksums (the damage would trip them first), its
    second RVS file, and that file's true number of data rows."""
    root = tmp / "gaia"
    shutil.copytree(survey, root)
    (root / RVS_DIR / "_MD5SUM.txt").unlink()
    target = sorted((root / RVS_DIR).glob("RvsMeanSpectrum_*.csv.gz"))[1]
    return root, target, len(split_gz(target)[1])


def _undecodable(raw: bytes) -> bytes:
    """``raw`` with 64 bytes overwritten near its middle where stdlib zlib (the oracle) reports
    undecodable deflate data, not merely a checksum mismatch."""
    for shift in range(0, 40_000, 997):
        b = bytearray(raw)
        i = len(b) // 2 + shift
        b[i:i + 64] = b"\xff" * 64
        try:
            zlib.decompressobj(wbits=31).decompress(bytes(b))
        except zlib.error as exc:
            if "invalid" in str(exc):
                return bytes(b)
    raise AssertionError("no undecodable damage found")  # pragma: no cover


DAMAGE = {
    "flipped_bit": lambda raw: raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x10]) + raw[len(raw) // 2 + 1:],
    "undecodable": _undecodable,
    "trailing_garbage": lambda raw: raw + b"garbage after the stream",
    "zero_padding": lambda raw: raw + bytes(512),
    "two_members": None,  # not damage: a multi-member gzip is read through
}


@pytest.mark.parametrize("chunk_mb", [512, 1])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_gzip_damage_is_counted_row_by_row(tmp_path, survey, rvs_instrument, damage, chunk_mb):
    """No gzip damage costs a whole file. A flipped bit (the stream decodes, its CRC-32 fails): every row
    is quarantined with the reason, in every chunk of the file. Undecodable deflate data: the lines before
    it are kept and the lines after it are counted (estimated from the trailer's size) as quarantine rows.
    Bytes after the stream (garbage, zero padding): every row kept, a note says they were ignored, and
    the planning size hint is not fooled into a 4 GiB file."""
    root, target, n_true = _copy(survey, tmp_path)
    raw = target.read_bytes()
    if damage == "two_members":
        text = gzip.decompress(raw)
        cut = text.index(b"\n", len(text) // 2) + 1
        target.write_bytes(gzip.compress(text[:cut], mtime=0) + gzip.compress(text[cut:], mtime=0))
    else:
        target.write_bytes(DAMAGE[damage](raw))
    assert uncompressed_size_hint(target) <= 64 * target.stat().st_size
    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0, "ingest.chunk_mb": chunk_mb})
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    f = s["per_file"][f"gaia:{RVS_DIR}/{target.name}"]
    assert (s["tasks"] == 13) == (chunk_mb == 512)  # one task per file, or 1 MB chunks (the RVS files: 5 each)
    assert f["rows_in"] == f["written"] + f["quarantined"]
    assert s["rows_in"] == s["written"] + s["quarantined"] and s["tables"]["xp"]["written"] == 400
    notes = " | ".join(f["notes"])
    if damage == "flipped_bit":
        assert f["rows_in"] == f["quarantined"] == n_true and f["written"] == 0
        assert "fails its CRC-32/size check" in f["example"] and "its rows are quarantined" in notes
    elif damage == "undecodable":
        assert 0 < f["written"] < n_true and "corrupt deflate data" in notes
        assert abs(f["rows_in"] - n_true) <= max(2, 0.03 * n_true), (f["rows_in"], n_true)
        q = read_table(tmp_path / "tables", "quarantine").to_pylist()
        lost = [r for r in q if r["source_file"].endswith(target.name) and r["reason"].startswith("lost: ")]
        assert lost and all(r["line"] is None for r in lost)
    else:
        assert f["rows_in"] == f["written"] == n_true and f["quarantined"] == 0
        if damage == "trailing_garbage":
            assert "24 bytes of trailing garbage after the gzip stream ignored" in notes
        elif damage == "zero_padding":
            assert "512 zero bytes after the gzip stream ignored" in notes
        else:
            assert notes == ""


def test_quotes_across_lines_cost_only_their_row(tmp_path, survey, rvs_instrument):
    """A newline inside a quoted flux array (the CSV parser would carry the open quote over every later
    line): between two values, the two lines are read as the one row they are; inside a number, that
    one row is quarantined (counted once); a stray quote is one bad line, and the lines after it are
    read as usual."""
    root, target, n_true = _copy(survey, tmp_path)
    head, data = split_gz(target)
    first = len(head) + 1
    d = list(data)
    k = d[3].index(",", d[3].index("[") + 100)
    d[3] = d[3][:k] + "\n" + d[3][k:]                        # newline before a comma: the row is fine
    k = d[6].index(",", d[6].index("[") + 100) + 3
    d[6] = d[6][:k] + "\n" + d[6][k:]                        # newline inside a number: that row is bad
    d[9] = d[9].replace('"[', '"[', 1).replace(']"', "]", 1)  # a quote never closed
    write_gz(target, head + d)
    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0})
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    f = s["per_file"][f"gaia:{RVS_DIR}/{target.name}"]
    assert f["rows_in"] == n_true and f["written"] == n_true - 2 and f["quarantined"] == 2
    assert any(f"line {first + 3}: a quoted value continued on the next line" in n for n in f["notes"])
    q = {r["line"]: r["reason"] for r in read_table(tmp_path / "tables", "quarantine").to_pylist()
         if r["source_file"].endswith(target.name)}
    assert q[first + 6 + 1] == "flux: unparseable number in array"  # +1: the newline inserted above
    assert q[first + 9 + 2] == "unbalanced quotes: a quoted value is cut by a newline"  # +2 inserted lines
    rvs = read_table(tmp_path / "tables", "rvs")
    assert rvs.num_rows == s["tables"]["rvs"]["written"] == 400 - 2


def test_bytes_that_are_not_utf8_cost_only_their_line(tmp_path, survey, rvs_instrument):
    """The archive writes ASCII. A byte that is not UTF-8 (a disk or transfer error) inside a flux array,
    or a line of such bytes, made the CSV parser refuse the whole file ("file unreadable", the run
    failed); now exactly the damaged rows are quarantined with the reason and the rest are read."""
    root, target, n_true = _copy(survey, tmp_path)
    head, data = split_gz(target)
    first = len(head) + 1
    d = [ln.encode() for ln in data]
    k = d[4].index(b"[") + 3
    d[4] = d[4][:k] + b"\xe9" + d[4][k + 1:]  # one digit of the flux array replaced by a Latin-1 byte
    d.insert(20, b"\xff\xfe\x00garbage,\xe9\n")  # a line of bytes that are not text
    target.write_bytes(gzip.compress(b"".join(ln.encode() for ln in head) + b"".join(d), mtime=0))
    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0})
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    f = s["per_file"][f"gaia:{RVS_DIR}/{target.name}"]
    assert f["rows_in"] == n_true + 1 and f["written"] == n_true - 1 and f["quarantined"] == 2
    q = {r["line"]: r["reason"] for r in read_table(tmp_path / "tables", "quarantine").to_pylist()
         if r["source_file"].endswith(target.name)}
    assert set(q) == {first + 4, first + 20}
    assert all(r.startswith("not UTF-8 text") for r in q.values()), q
    assert read_table(tmp_path / "tables", "rvs").num_rows == 400 - 1


@pytest.mark.parametrize("damage", ["truncated", "no_table"])
def test_a_damaged_label_fits_keeps_what_it_can(tmp_path, survey, rvs_instrument, damage):
    """A label FITS cut short keeps its complete rows and quarantines each missing one by its row number
    (NAXIS2 says how many there were); a FITS file without a table HDU cannot be read at all: the run
    fails in one line naming it."""
    from astropy.io import fits

    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    lab = root / "labels" / "allStar-synth.fits"
    full = fits.getdata(lab, 1)
    if damage == "truncated":
        raw = lab.read_bytes()
        lab.write_bytes(raw[: len(raw) // 2])
    else:
        fits.PrimaryHDU(np.zeros(3)).writeto(lab, overwrite=True)
    cfg = ingest_cfg(tmp_path, root, **{"ingest.max_bad_fraction": 1.0})
    if damage == "no_table":
        with pytest.raises(StellarError, match=r"labels:allStar-synth\.fits: file unreadable: no table in HDU 1"):
            ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
        assert TableStore(tmp_path / "tables").current_version() is None
        return
    s = ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    f = s["per_file"]["labels:allStar-synth.fits"]
    assert f["rows_in"] == len(full) and 0 < f["written"] < len(full)
    assert f["written"] + f["quarantined"] == len(full)
    assert f"table data truncated: {f['written']} of {len(full)} rows" in " ".join(f["notes"])
    labels = read_table(tmp_path / "tables", "labels").sort_by("source_line")
    n = f["written"]
    assert labels["source_id"].to_pylist() == [int(x) for x in full["GAIAEDR3_SOURCE_ID"][:n]]
    np.testing.assert_allclose(labels["teff"].to_numpy(), full["TEFF"][:n], rtol=1e-6)


def _read_only(folder: Path) -> list[str] | None:
    """A command prefix that runs with ``folder`` read-only (a private read-only bind mount where we
    are root, who ignores file modes), or None where this machine cannot make one."""
    import os

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && mount -o "
                            f"remount,bind,ro {folder} && ! touch {folder}/.probe"], capture_output=True)
    return None if probe.returncode else ["unshare", "-m", "sh", "-c",
                                          f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} '
                                          '&& exec "$0" "$@"']


def test_a_read_only_work_folder_is_one_line_and_exit_2(tmp_path, survey):
    work = tmp_path / "work"
    work.mkdir()
    prefix = _read_only(work)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (root without unshare/mount)")
    r = subprocess.run(prefix + [sys.executable, "-m", "stellar.cli", "ingest", "--no-spark", "--gaia-root",
                                 str(survey), "--set", f"work_dir={work}", "--set", "ingest.labels=[]"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("stellar: error: ") and str(work / "tables") in lines[0], lines
    assert "Traceback" not in r.stderr and "read-only" in lines[0].lower()


def test_a_version_whose_folder_and_manifest_disagree_is_refused(tmp_path, survey, rvs_instrument):
    """A committed version lists every part it holds, with its size: a part added to its folder (a
    dataset reader would read it silently), removed or changed is found before any reader uses the
    table, with one line naming it."""
    root = tmp_path / "gaia"
    shutil.copytree(survey, root)
    cfg = ingest_cfg(tmp_path, root)
    ingest(cfg.ingest, rvs_instrument, cfg.conf_dir)
    store = TableStore(tmp_path / "tables")
    v = store.current_version()
    listed = store.current_manifest()["parts"]
    assert store.verify() == [] and len(listed) == len(list((store.root / v).rglob("*.parquet")))
    some = sorted(rel for rel in listed if rel.startswith("rvs/"))[0]
    stray = store.root / v / "rvs" / Path(some).parent.name / "part-stray.parquet"
    shutil.copy(store.root / v / some, stray)
    _VERIFIED.clear()  # a fresh process
    with pytest.raises(StoreDamagedError, match=r"part-stray\.parquet: on disk, not in the manifest"):
        store.table_path("rvs")
    stray.unlink()
    (store.root / v / some).unlink()
    assert store.verify() == [f"{some}: listed, missing"]
    _VERIFIED.clear()
    with pytest.raises(StoreDamagedError, match="listed, missing"):
        read_table(tmp_path / "tables", "rvs")
