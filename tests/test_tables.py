"""The table store on its own: commit, resume, one writer, stale versions swept, parts verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from stellar.tables import (_VERIFIED, StoreBusyError, StoreDamagedError, TableStore, done_results, mark_done,
                            read_table, write_part)


def _part(store: TableStore, version: str, rel: str, values: list[int]) -> str:
    write_part(store.root / version / rel, pa.table({"source_id": pa.array(values, pa.int64())}), {"stellar.table": "t"})
    return rel


def test_commit_switches_the_pointer_and_lists_every_part(tmp_path):
    store = TableStore(tmp_path / "s")
    assert store.committed_with("d1") is None and store.current_version() is None
    v = store.new_version()
    rels = [_part(store, v, "t/hpx=1/part-a.parquet", [1, 2]), _part(store, v, "t/hpx=2/part-b.parquet", [3])]
    assert store.current_version() is None  # nothing visible before the commit
    store.commit(v, {"settings_digest": "d1", "summary": {}})
    assert store.current_version() == v == "v000001"
    m = store.current_manifest()
    assert sorted(m["parts"]) == rels and all(size > 0 for size in m["parts"].values())
    assert store.committed_with("d1")["settings_digest"] == "d1" and store.committed_with("d2") is None
    assert sorted(read_table(store.root, "t")["source_id"].to_pylist()) == [1, 2, 3]
    # a commit whose own part lists miss a part on disk is refused: nothing unaccounted becomes visible
    v2 = store.new_version()
    _part(store, v2, "t/hpx=1/part-a.parquet", [1])
    _part(store, v2, "t/hpx=1/part-extra.parquet", [9])
    with pytest.raises(StoreDamagedError, match="part-extra"):
        store.commit(v2, {"files": {"f": {"parts": ["t/hpx=1/part-a.parquet"]}}})
    assert store.current_version() == v


def test_a_killed_run_is_swept_or_resumed_by_the_same_plan(tmp_path):
    store = TableStore(tmp_path / "s")
    v1 = store.new_version()
    store.commit(v1, {"summary": {}})
    killed = store.new_version("plan-A")
    _part(store, killed, "t/hpx=1/part-a.parquet", [1])
    mark_done(store.root / killed, "task-0", {"rows": 1})
    (store.root / killed / "t" / "hpx=1" / ".part-b.parquet.tmp-123").write_bytes(b"half")
    assert store.resumable("plan-B") is None  # another plan starts afresh
    assert store.resumable("plan-A") == killed  # the same plan carries on in it ...
    assert done_results(store.root / killed) == {"task-0": {"rows": 1}}
    assert not list((store.root / killed).rglob(".*.tmp-*"))  # ... without the killed task's half-written file
    store.seal(killed)
    assert store.resumable("plan-A") is None  # past its resumable phase: never adopted
    assert store.clean_uncommitted() == [killed] and not (store.root / killed).exists()
    assert store.current_version() == v1


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path):
    store = TableStore(tmp_path / "s")
    code = ("import sys, time; from stellar.tables import TableStore\n"
            "with TableStore(sys.argv[1]).writing('ingest'):\n    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(store.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError, match=rf"ingest on \S+, pid {holder.pid}"):
            with store.writing("preprocess"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with store.writing("preprocess"):  # the kernel dropped the dead holder's lock: no stale lock
        holder_info = json.loads((store.root / "_LOCK").read_text())
        assert holder_info["pid"] == os.getpid() and holder_info["stage"] == "preprocess"


def test_old_versions_are_pruned_and_damage_is_found(tmp_path):
    store = TableStore(tmp_path / "s")
    for i in range(4):
        v = store.new_version()
        _part(store, v, "t/hpx=1/part-a.parquet", [i])
        store.commit(v, {"summary": {}})
    assert sorted(d.name for d in store.root.iterdir() if d.name.startswith("v")) == ["v000003", "v000004"]
    assert store.verify() == []
    (store.root / "v000004" / "t" / "hpx=1" / "part-a.parquet").write_bytes(b"not parquet")
    assert store.verify() == ["t/hpx=1/part-a.parquet: 11 bytes, manifest says "
                              f"{store.current_manifest()['parts']['t/hpx=1/part-a.parquet']}"]
    _VERIFIED.clear()
    with pytest.raises(StoreDamagedError, match="does not match its manifest"):
        store.table_path("t")


def test_a_stage_run_commits_once_then_is_up_to_date(tmp_path):
    """The stage skeleton (stellar.stage.StoreRun): the first run with a digest commits a version whose
    manifest records the digest, code version and HEALPix order; a run with the same digest finds it
    up to date and writes nothing; another digest commits the next version; a leftover is swept."""
    from stellar import __version__
    from stellar.stage import StageResult, StoreRun

    root = tmp_path / "s"
    with StoreRun("select", root, "d1") as run:
        assert run.committed() is None
        v = run.new_version()
        _part(run.store, v, "t/hpx=3/part-a.parquet", [1])
        summary = run.commit({"rows": 1, "version": v}, healpix_order=1, extra="x")
    m = TableStore(root).current_manifest()
    assert (m["settings_digest"], m["stellar_version"], m["healpix_order"], m["extra"]) == ("d1", __version__, 1, "x")
    assert m["summary"] == summary == {"rows": 1, "version": "v000001"}
    TableStore(root).new_version()  # a killed run's leftover v000002
    with StoreRun("select", root, "d1") as run:
        assert run.committed() == {"rows": 1, "version": "v000001"}
    assert not (root / "v000002").exists()
    r = StageResult.from_summary("select", {**run.committed(), "up_to_date": True})
    assert r.up_to_date and r.version == "v000001" and r.as_dict() == {"rows": 1, "version": "v000001",
                                                                        "up_to_date": True}
    with StoreRun("select", root, "d2") as run:
        assert run.committed() is None
        assert run.new_version() == "v000002"
        with pytest.raises(StoreBusyError):
            with StoreRun("select", root, "d2"):
                pass
