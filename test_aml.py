"""Tests for aml.py. Sections mirror aml.py's numbered sections.

Every store is generated in ``tmp_path`` by the factories below; nothing here reads
``../shared``. Run with ``make test``.
"""

import datetime as dt
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import aml

HERE = Path(__file__).resolve().parent
NOW = dt.datetime(2026, 11, 20, 12, 0, 0, tzinfo=dt.timezone.utc)
NOW_TEXT = "2026-11-20T12:00:00Z"


# =============================================================================
# Fixtures: realistic runtime-like stores
# =============================================================================

TECHNIQUES = ["retry with exponential backoff", "database constraints over application checks",
              "feature flags for risky rollouts", "idempotency keys on POST handlers",
              "contract tests between services", "snapshot tests for rendered components"]
ERRORS = [("TypeError", "Cannot read properties of undefined (reading 'id')"),
          ("QueryFailedError", 'column "token" does not exist'),
          ("TimeoutError", "operation timed out after 30000ms")]


def ts(days_ago, rng=None, style="z"):
    """A timestamp ``days_ago`` before NOW in the given style: z, naive or offset."""
    moment = NOW - dt.timedelta(days=days_ago, seconds=rng.randint(0, 3600) if rng else 0)
    if style == "naive":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    if style == "offset":
        return moment.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    return aml.format_timestamp(moment)


def make_pattern(agent, rng, age=None, last_used=None, success=None, count=None, conf=None,
                 **extra):
    age = rng.randint(0, 400) if age is None else age
    last_used = rng.randint(0, age) if last_used is None else last_used
    rec = {
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "agent": agent,
        "timestamp": ts(age, rng),
        "pattern": {
            "type": rng.choice(["resilience", "data-integrity", "testing"]),
            "context": {"language": rng.choice(["python", "typescript", "go"]), "scale": "large"},
            "approach": {"technique": rng.choice(TECHNIQUES),
                         "rationale": "Agreed in review after an incident " * rng.randint(1, 4)},
            "conditions": {"whenApplicable": ["core tables"], "whenNotApplicable": ["analytics"]},
        },
        "metrics": {"successRate": rng.random() if success is None else success,
                    "executionCount": rng.randint(0, 60) if count is None else count,
                    "avgTimeSavedMs": rng.random() * 100000, "errorPreventionCount": 2},
        "evolution": {"created": ts(age, rng), "lastUsed": ts(last_used, rng),
                      "refinements": 3,
                      "confidenceScore": rng.uniform(0.2, 0.8) if conf is None else conf},
        "tags": rng.sample(["backend", "database", "testing", "api", "ui"], 2),
        "active": True,
    }
    rec.update(extra)
    return rec


def make_solution(agent, rng, age=None, worked=None, **extra):
    age = rng.randint(0, 400) if age is None else age
    etype, msg = rng.choice(ERRORS)
    rec = {
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "agent": agent,
        "timestamp": ts(age, rng),
        "problem": {"errorType": etype, "errorMessage": msg, "context": {"language": "sql"}},
        "solution": {"rootCause": "rows locked in different order",
                     "fixApproach": "lock rows in primary key order", "prevention": "CI check"},
        "effectiveness": {"worked": rng.random() > 0.2 if worked is None else worked,
                          "timeToFixMinutes": 30, "preventedRecurrence": 1,
                          "relatedErrorsFixed": 0},
        "tags": ["database"],
        "active": True,
        "verifiedCount": rng.randint(0, 10),
    }
    rec.update(extra)
    return rec


def make_decision(agent, rng, age=None, would_repeat=None, **extra):
    age = rng.randint(0, 400) if age is None else age
    rec = {
        "id": str(uuid.UUID(int=rng.getrandbits(128))),
        "agent": agent,
        "timestamp": ts(age, rng),
        "decision": {"type": "architecture", "question": "Sync or async for the catalog?",
                     "context": {"component": "auth"}, "chosenOption": "queue",
                     "alternativesConsidered": ["monolith"],
                     "decisionFactors": {"primary": ["isolation"], "secondary": []}},
        "tags": ["services"],
        "active": True,
    }
    if would_repeat is not None or rng.random() > 0.3:
        rec["outcome"] = {"successMetrics": {"maintainability": 0.7},
                          "lessonsLearned": ["measure first"],
                          "wouldRepeat": rng.random() > 0.2 if would_repeat is None
                          else would_repeat}
    rec.update(extra)
    return rec


def write_data(path, obj, gz=False, newline=False):
    """Write a store file the way the runtime does (gzip bytes under .json, or plain)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + ("\n" if newline else "")
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def read_data(path):
    """Read a store file whatever its encoding."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw.decode("utf-8-sig"))


CONFIG = {"version": "1.0.0", "storage": {"compression": True},
          "pruning": {"enabled": True, "maxAgeDays": 90, "minConfidence": 0.2,
                      "aggressiveMode": False}}


def build_store(root, agents=("backend-developer", "code-reviewer", "test-automator"),
                gz=False, patterns=40, solutions=15, decisions=10, seed=1):
    """A runtime-like store: several agents, old and new records, gzip or plain (or 'mixed')."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_data(root / "config.json", CONFIG)
    for i, agent in enumerate(agents):
        zipped = (i % 2 == 0) if gz == "mixed" else gz
        folder = root / agent
        write_data(folder / "patterns.json", [make_pattern(agent, rng) for _ in range(patterns)],
                   zipped)
        write_data(folder / "solutions.json",
                   [make_solution(agent, rng) for _ in range(solutions)], zipped)
        write_data(folder / "decisions.json",
                   [make_decision(agent, rng) for _ in range(decisions)], zipped)
        write_data(folder / "metrics.json", {"agent": agent, "timestamp": ts(0)}, zipped)
        write_data(folder / "context.json", {"agent": agent, "project": "northwind"}, zipped)
    write_data(root / "global" / "shared.json", {"notes": ["kept"]})
    return root


def tree_digest(root, skip_state=False):
    """{relative path: sha256} of every file under root (the .aml state folder optionally left out)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip_state:
            dirnames[:] = [d for d in dirnames if d != ".aml"]
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(*argv, capsys=None):
    """Run aml.main in-process; returns (exit code, stdout, stderr) when capsys is given."""
    code = aml.main([str(a) for a in argv])
    if capsys is None:
        return code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=[False, True], ids=["plain", "gzip"])
def store(request, tmp_path):
    """A generated store, once plain and once gzip."""
    return build_store(tmp_path / "memory", gz=request.param)


# =============================================================================
# 4. Small utilities
# =============================================================================

@pytest.mark.parametrize("text,expected", [
    ("2026-11-20T12:00:00.000Z", NOW),
    ("2026-11-20T12:00:00", NOW),
    ("2026-11-20T14:00:00+02:00", NOW),
    ("2026-11-20T14:00:00+0200", NOW),
    ("2026-11-20 12:00:00.123456789Z", NOW.replace(microsecond=123456)),
    ("2026-11-20", NOW.replace(hour=0)),
])
def test_parse_timestamp_accepts_z_offset_and_naive(text, expected):
    assert aml.parse_timestamp(text) == expected


@pytest.mark.parametrize("bad", ["", "yesterday", "2026-13-40T00:00:00Z", None, True, [], float("nan")])
def test_parse_timestamp_returns_none_for_unusable(bad):
    assert aml.parse_timestamp(bad) is None


def test_format_timestamp_is_runtime_form():
    assert aml.format_timestamp(NOW.replace(microsecond=5000)) == "2026-11-20T12:00:00.005Z"


# =============================================================================
# 5. Storage primitives
# =============================================================================

@pytest.mark.parametrize("payload,problem", [
    (gzip.compress(b'[{"id": "a"}]')[:-6], "gzip"),
    (b'[{"id": "a"},', "invalid JSON"),
    (b'{"id": "a"}', "expected a JSON array"),
    (b'[{"x": NaN}]', "invalid JSON"),
    (b"\xff\xfe[]", "not UTF-8"),
])
def test_load_json_file_fails_closed(tmp_path, payload, problem):
    path = tmp_path / "patterns.json"
    path.write_bytes(payload)
    with pytest.raises(aml.CorruptFileError) as info:
        aml.load_json_file(path, expect=list)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_load_json_file_tolerates_bom_and_keeps_it(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"\xef\xbb\xbf[1, 2]\n")
    data, fmt = aml.load_json_file(path, expect=list)
    assert data == [1, 2] and fmt.bom and fmt.trailing_newline and not fmt.gzip
    aml.write_json_file(path, data + [3], fmt)
    assert path.read_bytes() == b"\xef\xbb\xbf[\n  1,\n  2,\n  3\n]\n"


@pytest.mark.parametrize("gz", [False, True])
def test_write_keeps_encoding(tmp_path, gz):
    path = tmp_path / "patterns.json"
    write_data(path, [{"id": "é"}], gz=gz)
    data, fmt = aml.load_json_file(path)
    aml.write_json_file(path, data, fmt)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    assert read_data(path) == [{"id": "é"}]


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, step):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"[1]")
    target = {"write": (aml.os, "fdopen"), "fsync": (aml.os, "fsync"),
              "replace": (aml.os, "replace")}[step]

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(*target, boom)
    with pytest.raises(OSError):
        aml.atomic_write_bytes(path, b"[2]")
    monkeypatch.undo()
    assert path.read_bytes() == b"[1]"
    assert os.listdir(tmp_path) == ["patterns.json"]


def test_atomic_write_keeps_permissions(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"[]")
    os.chmod(path, 0o640)
    aml.atomic_write_bytes(path, b"[1]")
    assert (path.stat().st_mode & 0o777) == 0o640


def test_fresh_foreign_lock_is_respected(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"[]")
    lock_dir = Path(str(path) + ".lock")
    lock_dir.mkdir()
    with pytest.raises(aml.StoreBusyError) as info:
        aml.FileLock(path, timeout=0.2).acquire()
    assert "store busy" in str(info.value)
    assert lock_dir.is_dir()


def test_stale_lock_is_taken_and_released(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"[]")
    lock_dir = Path(str(path) + ".lock")
    lock_dir.mkdir()
    old = os.stat(lock_dir).st_mtime - 120
    os.utime(lock_dir, (old, old))
    with aml.FileLock(path, timeout=1):
        assert lock_dir.is_dir() and os.stat(lock_dir).st_mtime > old
    assert not lock_dir.exists()


def test_lock_file_entry_counts_as_held(tmp_path):
    path = tmp_path / "patterns.json"
    Path(str(path) + ".lock").write_text("x")
    with pytest.raises(aml.StoreBusyError):
        aml.FileLock(path, timeout=0.1).acquire()


def test_lock_released_on_error(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"[]")
    with pytest.raises(RuntimeError):
        with aml.FileLock(path, timeout=1):
            raise RuntimeError("boom")
    assert not Path(str(path) + ".lock").exists()


def test_maintenance_lock_excludes_second_run(tmp_path):
    with aml.MaintenanceLock(tmp_path, timeout=0):
        with pytest.raises(aml.StoreBusyError):
            aml.MaintenanceLock(tmp_path, timeout=0).acquire()
    aml.MaintenanceLock(tmp_path, timeout=0).acquire()


# =============================================================================
# 6. Record model
# =============================================================================

def test_record_facts_reads_runtime_layout():
    rng = random.Random(3)
    rec = make_pattern("a", rng, age=10, last_used=2, success=0.5, count=4, conf=0.9)
    facts = aml.record_facts(aml.RecordType.PATTERN, rec)
    assert (facts.success_rate, facts.execution_count, facts.confidence) == (0.5, 4, 0.9)
    assert facts.last_used.date() == (NOW - dt.timedelta(days=2)).date()


@pytest.mark.parametrize("rec", [
    {"id": "x", "successRate": 0.1, "executionCount": 7, "confidence": 0.3, "lastUsed": NOW_TEXT},
    {"id": "x", "success_rate": 0.1, "execution_count": 7, "confidence_score": 0.3,
     "last_used": NOW_TEXT},
    {"id": "x", "performance": {"success_rate": 0.1, "execution_count": 7, "confidence": 0.3},
     "lifecycle": {"created_at": NOW_TEXT, "last_used": NOW_TEXT}},
])
def test_record_facts_reads_legacy_layouts(rec):
    facts = aml.record_facts(aml.RecordType.PATTERN, rec)
    assert (facts.success_rate, facts.execution_count, facts.confidence) == (0.1, 7, 0.3)
    assert facts.last_used == NOW


def test_record_facts_never_invents_values():
    facts = aml.record_facts(aml.RecordType.PATTERN, {"id": "x", "metrics": {"successRate": "high"}})
    assert facts.success_rate is None and facts.confidence is None and facts.last_activity is None
    assert aml.record_facts(aml.RecordType.PATTERN, "not a record").id is None


@pytest.mark.parametrize("rec", [{"pinned": True}, {"tags": ["pinned"]},
                                 {"lifecycle": {"state": "pinned"}},
                                 {"lifecycle": {"pinned": True}}])
def test_pinned_markers(rec):
    assert aml.record_facts(aml.RecordType.DECISION, rec).pinned


# =============================================================================
# 7. Store and aml state
# =============================================================================

def test_agent_discovery_is_an_allow_list(tmp_path):
    root = build_store(tmp_path / "m", agents=("alpha",))
    for name in ("global", "audit", "backups", ".hidden", "x.lock", "empty"):
        (root / name).mkdir(exist_ok=True)
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an agent")
    assert aml.Store(root).agents() == ["alpha"]


def test_store_rejects_missing_path(tmp_path):
    with pytest.raises(aml.UsageError):
        aml.Store(tmp_path / "nope")


def test_read_only_use_creates_nothing(store):
    before = tree_digest(store)
    s = aml.Store(store)
    list(s.iter_record_files())
    assert tree_digest(store) == before and not (store / ".aml").exists()


def test_iter_record_files_reports_unreadable_and_continues(tmp_path):
    root = build_store(tmp_path / "m")
    (root / "code-reviewer" / "patterns.json").write_bytes(b"[{")
    errors = []
    seen = [f.path.name for f, _, _ in aml.Store(root).iter_record_files(errors=errors)]
    assert len(seen) == 8 and len(errors) == 1
    assert "code-reviewer" in str(errors[0].path)


def test_state_checksum_detects_tampering(tmp_path):
    s = aml.Store(build_store(tmp_path / "m"))
    s.write_state("thing.json", {"a": 1})
    assert s.read_state("thing.json") == {"a": 1}
    path = s.state_path("thing.json")
    path.write_text(path.read_text().replace('"a": 1', '"a": 2'))
    with pytest.raises(aml.IntegrityError):
        s.read_state("thing.json")
    assert s.read_state_lenient("thing.json", "fresh") == "fresh"
    assert Path(str(path) + ".corrupt").exists()


def test_cleanup_removes_only_aml_temp_files(tmp_path):
    root = build_store(tmp_path / "m")
    leftover = root / "code-reviewer" / ".patterns.json.aml-tmp-123-abcd"
    leftover.write_text("half")
    foreign = root / "code-reviewer" / ".patterns.json.tmp"
    foreign.write_text("runtime's")
    removed = aml.Store(root).cleanup_temp_files()
    assert removed == [leftover] and foreign.exists()


def test_aml_config_file_sections_and_unknown_keys(tmp_path):
    s = aml.Store(build_store(tmp_path / "m"))
    assert aml.load_aml_config(s) == {}
    s.ensure_state_dir()
    (s.state_dir / "config.json").write_text('{"prune": {"min_success_rate": 0.3}}')
    assert aml.load_aml_config(s) == {"prune": {"min_success_rate": 0.3}}
    (s.state_dir / "config.json").write_text('{"prunning": {}}')
    with pytest.raises(aml.UsageError, match="prunning"):
        aml.load_aml_config(s)


def test_rewrite_locks_and_keeps_format(tmp_path):
    root = build_store(tmp_path / "m", gz=True)
    s = aml.Store(root)
    path = root / "code-reviewer" / "patterns.json"
    with s.rewrite(path) as job:
        assert Path(str(path) + ".lock").is_dir()
        job.data = job.data[:5]
        job.changed = True
    assert path.read_bytes()[:2] == b"\x1f\x8b" and len(read_data(path)) == 5
    assert not Path(str(path) + ".lock").exists()


# =============================================================================
# 8. Backup and restore
# =============================================================================


# =============================================================================
# 9. Bloom filter and LRU cache
# =============================================================================


# =============================================================================
# 10. Index and search
# =============================================================================


# =============================================================================
# 11. Pruning
# =============================================================================


# =============================================================================
# 12. Compression and garbage collection
# =============================================================================


# =============================================================================
# 13. Migration
# =============================================================================


# =============================================================================
# 14. Monitoring and alerts
# =============================================================================

import html.parser
import http.server
import re
import shutil
import socket
import threading
import zlib


def _health(root, *extra, capsys, fmt="json"):
    """Run ``monitor health`` and return (exit code, parsed JSON or text, stderr)."""
    code, out, err = run_cli(root, "monitor", "health", "--format", fmt, *extra, capsys=capsys)
    return code, (json.loads(out) if fmt == "json" else out), err


def _check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def _record_backup(root, when=None):
    """Record a verified backup whose manifest exists, as section 8 does."""
    manifest = root.parent / "memory-backup" / "snap" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("{}")
    aml.Store(root).record_operation("backup", when or aml.utcnow(), 0.4, {
        "backup_id": "snap", "type": "full", "verified": True, "manifest": str(manifest),
        "bytes_added": 10, "files": 3})


def _make_healthy(root, hits=90, misses=10):
    """Verified backup, recent prune, fresh index and a good cache hit rate."""
    _record_backup(root)
    store = aml.Store(root)
    store.record_operation("prune", aml.utcnow(), 0.2, {"removed": 0})
    store.record_operation("index", aml.utcnow() + dt.timedelta(seconds=1), 0.1, {})
    store.write_state("cache-stats.json", {"hits": hits, "misses": misses, "updated": NOW_TEXT})


def _file_counts(root):
    """{agent: {type: {active, inactive}}} counted straight from the files."""
    counts = {}
    for agent_dir in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name != "global"
                            and not p.name.startswith(".")):
        counts[agent_dir.name] = {}
        for rtype in ("pattern", "solution", "decision"):
            path = agent_dir / (rtype + "s.json")
            recs = read_data(path) if path.exists() else []
            active = sum(1 for r in recs if r.get("active", True))
            counts[agent_dir.name][rtype] = {"active": active, "inactive": len(recs) - active,
                                             "invalid": 0}
    return counts


def test_metrics_counts_equal_records_in_files(store, capsys):
    rng = random.Random(5)
    path = store / "code-reviewer" / "patterns.json"
    recs = read_data(path)
    for rec in recs[:7]:
        rec["active"] = False
    write_data(path, recs, gz=path.read_bytes()[:2] == b"\x1f\x8b")
    write_data(store / "new-agent" / "decisions.json", [make_decision("new-agent", rng)])
    code, out, _ = run_cli(store, "monitor", "metrics", "--format", "json", capsys=capsys)
    doc = json.loads(out)
    got = {a["agent"]: a["records"] for a in doc["agents"]}
    assert code == 0 and got == _file_counts(store)
    assert got["code-reviewer"]["pattern"] == {"active": 33, "inactive": 7, "invalid": 0}
    assert got["new-agent"]["decision"]["active"] == 1
    assert doc["performance"]["full_load_records"] == 3 * 65 + 1
    assert doc["performance"]["lookup_ms"] is None or doc["performance"]["lookup_ms"] >= 0
    assert doc["performance"]["cache_hit_rate"] is None  # no lookups recorded: unknown, not 0
    assert doc["growth"]["bytes_per_day"] is None and doc["growth"]["samples"] == 0
    assert doc["performance"]["last_operations"]["prune"]["seconds"] is None


def test_metrics_reports_unreadable_file_and_exits_3(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)
    bad = root / "test-automator" / "solutions.json"
    bad.write_bytes(bad.read_bytes()[:40])
    before = tree_digest(root, skip_state=True)
    code, out, err = run_cli(root, "monitor", "metrics", "--format", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 3 and "test-automator/solutions.json" in err
    assert doc["unreadable"][0].startswith("test-automator/solutions.json")
    agent = next(a for a in doc["agents"] if a["agent"] == "test-automator")
    assert sum(agent["records"]["solution"].values()) == 0 and agent["records"]["pattern"]["active"]
    assert tree_digest(root, skip_state=True) == before  # only .aml/ was written


def test_metrics_growth_and_days_until_limit(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2"))
    code = run_cli(root, "monitor", "metrics", "--now", "2026-11-01T00:00:00Z", capsys=capsys)[0]
    assert code == 0
    rng = random.Random(9)
    path = root / "a1" / "patterns.json"
    write_data(path, read_data(path) + [make_pattern("a1", rng) for _ in range(20)])
    code, out, _ = run_cli(root, "monitor", "metrics", "--format", "json",
                           "--now", "2026-11-11T00:00:00Z", capsys=capsys)
    doc = json.loads(out)
    assert doc["growth"]["records_since_previous"] == 20
    assert doc["growth"]["bytes_since_previous"] > 0
    growth = doc["growth"]
    assert growth["bytes_per_day"] == pytest.approx(growth["bytes_since_previous"] / 10)
    by_subject = {(f["subject"], f["limit"]): f for f in doc["forecasts"]}
    a1 = by_subject[("a1", "agent_memory_critical_mb")]
    assert a1["days_until"] > 0
    assert by_subject[("a2", "agent_memory_critical_mb")]["note"] == "not growing"


def test_metrics_history_is_bounded(tmp_path, capsys, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a1",), patterns=3, solutions=1, decisions=1)
    monkeypatch.setattr(aml, "METRICS_HISTORY_MAX", 3)
    for day in range(1, 6):
        run_cli(root, "monitor", "metrics", "-q", "--now", "2026-11-0%dT00:00:00Z" % day)
    samples = aml.Store(root).read_state("metrics-history.json")["samples"]
    assert [s["at"][:10] for s in samples] == ["2026-11-03", "2026-11-04", "2026-11-05"]
    run_cli(root, "monitor", "metrics", "-q", "--no-save", "--now", "2026-11-09T00:00:00Z")
    assert len(aml.Store(root).read_state("metrics-history.json")["samples"]) == 3


def test_metrics_reads_last_durations_from_history(tmp_path):
    root = build_store(tmp_path / "m", agents=("a1",), patterns=3, solutions=1, decisions=1)
    store = aml.Store(root, now=NOW)
    store.record_operation("prune", NOW - dt.timedelta(days=2), 1.25, {"removed": 4})
    report = aml.MemoryMonitor(store).metrics(save=False)
    prune = report.performance.last_operations["prune"]
    assert prune.seconds == 1.25 and prune.age_days == pytest.approx(2.0)
    assert report.performance.last_operations["backup"].started is None


def test_fresh_store_without_backup_is_warning(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    before = tree_digest(root, skip_state=True)
    code, doc, _ = _health(root, capsys=capsys)
    assert code == 1 and doc["status"] == "warning"
    assert _check(doc, "backup")["status"] == "warning"
    assert _check(doc, "integrity")["status"] == "healthy"
    assert {c["name"] for c in doc["checks"]} >= {"structure", "size", "index", "backup",
                                                  "integrity", "performance", "maintenance"}
    assert tree_digest(root, skip_state=True) == before
    assert aml.Store(root).last_operation("health")["summary"]["status"] == "warning"


@pytest.mark.parametrize("damage", ["truncated-gzip", "invalid-json", "object-not-array",
                                    "non-object-element"])
def test_corrupted_file_turns_integrity_critical(tmp_path, capsys, damage):
    root = build_store(tmp_path / "m", gz=(damage == "truncated-gzip"))
    bad = root / "code-reviewer" / "decisions.json"
    if damage == "truncated-gzip":
        bad.write_bytes(bad.read_bytes()[:50])
    elif damage == "invalid-json":
        bad.write_text('[{"id": "x", "active": NaN}]')
    elif damage == "object-not-array":
        bad.write_text('{"id": "x"}')
    else:
        bad.write_text('[{"id": "x"}, 3]')
    code, doc, _ = _health(root, capsys=capsys)
    integrity = _check(doc, "integrity")
    assert code == 2 and doc["status"] == "critical" and integrity["status"] == "critical"
    assert "code-reviewer/decisions.json" in integrity["message"]
    code, line, _ = _health(root, capsys=capsys, fmt="nagios")
    assert code == 2 and line.startswith("AML CRITICAL - ")
    assert "code-reviewer/decisions.json" in line


NAGIOS_RE = re.compile(r"^AML (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+ \| "
                       r"(('[^']+'|[A-Za-z0-9_.-]+)=(U|-?[0-9.]+(B|ms|%|s|c)?(;[0-9.]*){0,4}) ?)+$")


def test_nagios_line_format_and_exit_codes(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz="mixed")
    code, out, _ = _health(root, capsys=capsys, fmt="nagios")
    assert code == 1 and out.count("\n") == 1 and NAGIOS_RE.match(out.rstrip("\n")), out
    _make_healthy(root)
    code, out, _ = _health(root, capsys=capsys, fmt="nagios")
    assert code == 0 and out.startswith("AML OK - 7 checks healthy | "), out
    assert NAGIOS_RE.match(out.rstrip("\n")) and "cache_hit_rate=90%" in out
    assert "store_bytes=" in out and ";838860800;0" in out  # critical = 800 MiB
    aml.Store(root).write_state("cache-stats.json", {"hits": 1, "misses": 0})
    if not hasattr(aml, "MemoryIndex"):  # with no measurable performance the result is unknown
        code, out, _ = _health(root, capsys=capsys, fmt="nagios")
        assert code == 3 and out.startswith("AML UNKNOWN - performance: ") and NAGIOS_RE.match(
            out.rstrip("\n"))


def test_health_that_cannot_run_is_unknown(tmp_path, capsys):
    code, out, err = run_cli(tmp_path / "missing", "monitor", "health", "--format", "nagios",
                             capsys=capsys)
    assert code == 3 and out.startswith("AML UNKNOWN - ") and "does not exist" in err


def test_health_plugin_from_cron_like_environment(tmp_path):
    root = build_store(tmp_path / "m", gz=True)
    result = subprocess.run([sys.executable, str(HERE / "aml.py"), str(root), "monitor", "health",
                             "--format", "nagios"], cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.startswith("AML WARNING - ") and result.stdout.count("\n") == 1


def test_health_exit_code_is_the_same_for_every_format(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    codes = {fmt: _health(root, capsys=capsys, fmt=fmt)[0] for fmt in ("text", "json", "nagios")}
    assert set(codes.values()) == {1}
    assert run_cli(root, "monitor", "health", "-q", capsys=capsys)[1].startswith("Health: WARNING")


def test_thresholds_from_store_config_aml_config_and_flags(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    config = dict(CONFIG, storage={"maxSizeGb": 2}, performance={"queryTimeoutMs": 50})
    write_data(root / "config.json", config)
    store = aml.Store(root)
    got = aml.resolve_thresholds(store)
    assert got["global_memory_critical_mb"] == 2048 and got["query_time_warning_ms"] == 50
    got = aml.resolve_thresholds(store, {"query_time_warning_ms": 70},
                                 {"agent_memory_warning_mb": 1})
    assert got["query_time_warning_ms"] == 70 and got["agent_memory_warning_mb"] == 1
    with pytest.raises(aml.UsageError):
        aml.resolve_thresholds(store, flags={"agent_memory_warning_mb": 90})  # above critical
    code, _, err = run_cli(root, "monitor", "health", "--threshold", "nope=1", capsys=capsys)
    assert code == 3 and "unknown threshold" in err  # health: UNKNOWN, the plugin convention
    code, _, err = run_cli(root, "monitor", "metrics", "--threshold", "nope=1", capsys=capsys)
    assert code == 2 and "unknown threshold" in err
    code, doc, _ = _health(root, "--threshold", "agent_memory_critical_mb=0.01",
                           "--threshold", "agent_memory_warning_mb=0.005", capsys=capsys)
    size = _check(doc, "size")
    assert code == 2 and size["status"] == "critical"
    assert {p["subject"] for p in size["problems"]} == {"backend-developer", "code-reviewer",
                                                        "test-automator"}


def test_integrity_cache_rechecks_only_changed_files(tmp_path, capsys, monkeypatch):
    root = build_store(tmp_path / "m", gz="mixed")
    old = time.time() - 60  # older than the racy window, so the first run caches them
    for path in root.rglob("*.json"):
        os.utime(path, (old, old))
    assert _health(root, capsys=capsys)[0] == 1
    loads = []
    real = aml.load_json_file

    def counting(path, expect=None):
        if ".aml" not in Path(path).parts:
            loads.append(Path(path).relative_to(root).as_posix())
        return real(path, expect)

    monkeypatch.setattr(aml, "load_json_file", counting)
    monkeypatch.setattr(aml.Store, "runtime_config", lambda self: {})
    assert _health(root, capsys=capsys)[0] == 1 and loads == []
    changed = root / "test-automator" / "patterns.json"
    write_data(changed, read_data(changed)[:-1])
    os.utime(changed, (old + 5, old + 5))
    assert _health(root, capsys=capsys)[0] == 1
    assert loads == ["test-automator/patterns.json"]


def test_read_only_commands_write_only_inside_state_folder(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)
    before = tree_digest(root)
    for action in (["metrics"], ["health"], ["alerts", "--all"], ["report"]):
        run_cli(root, "monitor", *action, capsys=capsys)
    after = tree_digest(root)
    assert {k: v for k, v in after.items() if not k.startswith(".aml")} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_alert_of_a_check_that_cannot_run_is_error_and_not_resolved(tmp_path, capsys,
                                                                    monkeypatch):
    root = build_store(tmp_path / "m")
    _health(root, capsys=capsys)

    def broken(store, history):
        raise OSError("index folder unreadable")

    monkeypatch.setattr(aml, "_index_staleness", broken)
    code, doc, _ = _health(root, capsys=capsys)
    index = _check(doc, "index")
    assert code == 1 and index["status"] == "unknown" and not index["ran"]
    stored = aml.Store(root).read_state("alerts.json")["alerts"]
    assert stored[aml.alert_id("index", "index")]["state"] == "firing"  # unknown is not cleared
    assert stored[aml.alert_id("index", "check")]["level"] == "ERROR"
    assert [a for a in doc["alerts"]["fired"] if a["level"] == "ERROR"][0]["check"] == "index"


def test_health_reports_but_skips_state_writes_while_another_run_holds_the_store(tmp_path,
                                                                                  capsys):
    root = build_store(tmp_path / "m")
    with aml.Store(root).maintenance_lock():
        code, doc, err = _health(root, "--lock-timeout", "0.3", capsys=capsys)
    assert code == 1 and doc["status"] == "warning" and "not updated" in err
    assert not (root / ".aml" / "alerts.json").exists()
    assert aml.Store(root).last_operation("health") is None


def _alerts(root, capsys, *extra):
    code, out, _ = run_cli(root, "monitor", "alerts", "--format", "json", *extra, capsys=capsys)
    assert code == 0
    return {a["check"]: a for a in json.loads(out)["alerts"]}


def test_alert_raised_twice_is_one_alert_then_resolves(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    _health(root, "--now", "2026-11-20T06:00:00Z", capsys=capsys)
    _health(root, "--now", "2026-11-21T06:00:00Z", capsys=capsys)
    backup = _alerts(root, capsys)["backup"]
    assert backup["count"] == 2 and backup["level"] == "WARNING" and backup["state"] == "firing"
    assert backup["first_seen"].startswith("2026-11-20") and backup["last_seen"].startswith(
        "2026-11-21")
    assert backup["id"] == aml.alert_id("backup", "backup")
    _record_backup(root, when=aml.parse_timestamp("2026-11-22T05:00:00Z"))
    code, doc, _ = _health(root, "--now", "2026-11-22T06:00:00Z", capsys=capsys)
    assert [a["check"] for a in doc["alerts"]["resolved"]] == ["backup"]
    assert "backup" not in _alerts(root, capsys)
    resolved = _alerts(root, capsys, "--all")["backup"]
    assert resolved["state"] == "resolved" and resolved["resolved_by"] == "auto"
    # Retention: 7 days after resolution the alert is still listed, after 8 it is gone.
    lenient = ("--threshold", "backup_max_age_hours=1000", "--threshold",
               "backup_critical_age_hours=1000")
    _health(root, "--now", "2026-11-29T05:00:00Z", *lenient, capsys=capsys)
    assert "backup" in _alerts(root, capsys, "--all", "--now", "2026-11-29T05:00:00Z")
    _health(root, "--now", "2026-11-30T07:00:00Z", *lenient, capsys=capsys)
    stored = aml.Store(root).read_state("alerts.json")["alerts"]
    assert aml.alert_id("backup", "backup") not in stored and "index" in _alerts(root, capsys)


def test_manual_resolve_and_reopen(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    _health(root, capsys=capsys)
    alert_key = aml.alert_id("maintenance", "maintenance")
    code, out, _ = run_cli(root, "monitor", "alerts", "--resolve", alert_key, capsys=capsys)
    assert code == 0 and "resolved" in out
    assert _alerts(root, capsys, "--all")["maintenance"]["resolved_by"] == "manual"
    assert run_cli(root, "monitor", "alerts", "--resolve", "nope-1", capsys=capsys)[0] == 2
    _health(root, capsys=capsys)  # the condition persists: the alert fires again
    again = _alerts(root, capsys)["maintenance"]
    assert again["occurrences"] == 2 and again["count"] == 1


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A JSON receiver on 127.0.0.1 in a thread; yields (url, list of payloads)."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/hook" % server.server_port, server.received
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_webhook_receives_firing_and_resolved(tmp_path, capsys, webhook):
    url, received = webhook
    root = build_store(tmp_path / "m")
    assert _health(root, "--webhook", url, capsys=capsys)[0] == 1
    fired = sorted(p["alert"]["check"] for p in received if p["event"] == "firing")
    assert fired == ["backup", "index", "maintenance"]
    assert all(p["source"] == "aml" and p["alert"]["level"] == "WARNING" for p in received)
    del received[:]
    _health(root, "--webhook", url, capsys=capsys)
    assert received == []  # a persisting condition does not notify again
    _record_backup(root)
    _health(root, "--webhook", url, capsys=capsys)
    assert [(p["event"], p["alert"]["check"]) for p in received] == [("resolved", "backup")]
    assert received[0]["alert"]["resolved_by"] == "auto"


def test_unreachable_webhook_does_not_fail_the_run(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    root = build_store(tmp_path / "m")
    code, doc, err = _health(root, "--webhook", "http://127.0.0.1:%d/x" % port, capsys=capsys)
    assert code == 1 and doc["status"] == "warning" and len(doc["alerts"]["fired"]) == 3
    assert "webhook" in err and "unreachable" in err and "3 notification(s)" in err
    assert len(_alerts(root, capsys)) == 3
    code, _, err = run_cli(root, "monitor", "health", "--webhook", "ftp://x", capsys=capsys)
    assert code == 3 and "http" in err


PROM_LINE = {
    "help": re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$"),
    "type": re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|"
                       r"untyped)$"),
    "sample": re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)'
                         r'(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*")*\})?'
                         r' (-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?|NaN|[+-]Inf)$'),
}


def _parse_prometheus(text):
    """Check every line against the exposition format; returns {family: [sample lines]}."""
    assert text.endswith("\n")
    families, typed = {}, set()
    for line in text.splitlines():
        kind = next((k for k, rx in PROM_LINE.items() if rx.match(line)), None)
        assert kind is not None, "not exposition format: %r" % line
        name = PROM_LINE[kind].match(line).group(1)
        if kind == "type":
            assert name not in typed
            typed.add(name)
            families[name] = []
        elif kind == "sample":
            assert name in typed and name.startswith("aml_"), line
            families[name].append(line)
    return families


def test_prometheus_output_parses_line_by_line(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", 'we"ird\\agent'), gz="mixed")
    code, out, _ = run_cli(root, "monitor", "metrics", "--format", "prometheus", capsys=capsys)
    families = _parse_prometheus(out)
    assert code == 0 and 'aml_records{agent="we\\"ird\\\\agent",type="pattern",state="active"} 40' \
        in families["aml_records"]
    assert "aml_cache_hit_ratio" not in families  # unknown is left out, never a made-up 0
    target = tmp_path / "textfile" / "aml.prom"
    target.parent.mkdir()
    code, out, _ = run_cli(root, "monitor", "report", "--format", "prometheus", "--output", target,
                           capsys=capsys)
    families = _parse_prometheus(target.read_text())
    assert code == 0 and out == "" and os.listdir(target.parent) == ["aml.prom"]
    assert families["aml_health_overall"] == ["aml_health_overall 1"]
    assert 'aml_health_status{check="backup"} 1' in families["aml_health_status"]


class _HtmlCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _html_report(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2<b>"))
    for day in (1, 5):
        run_cli(root, "monitor", "metrics", "-q", "--now", "2026-11-%02dT00:00:00Z" % day)
    _health(root, capsys=capsys)
    target = tmp_path / "report.html"
    assert run_cli(root, "monitor", "report", "--format", "html", "--output", target,
                   capsys=capsys)[0] == 0
    return target


def test_html_report_is_self_contained(tmp_path, capsys):
    target = _html_report(tmp_path, capsys)
    parser = _HtmlCollector()
    parser.feed(target.read_text())
    assert {"script", "link", "img", "iframe"}.isdisjoint(parser.tags)
    assert not [v for k, v in parser.attrs if k in ("src", "href") and v]
    assert parser.tags.count("svg") == 2 and parser.tags.count("polyline") == 4  # 2 charts x 2
    text = " ".join(parser.text)
    assert "a2<b>" in text and "no verified backup yet" in text and "backup-" in text


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless chromium is not installed")
def test_html_report_renders_in_headless_chromium(tmp_path, capsys):
    target = _html_report(tmp_path, capsys)
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--user-data-dir=%s" % (tmp_path / "profile"),
                    "--window-size=1200,1400", "--screenshot=%s" % shot, target.as_uri()],
                   check=True, timeout=120, capture_output=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels, offset = b"", 8
    while offset < len(data):  # concatenate the IDAT chunks: a blank page has ~1 byte value
        length = int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + 8] == b"IDAT":
            pixels += data[offset + 8:offset + 8 + length]
        offset += 12 + length
    assert len(set(zlib.decompress(pixels))) > 50


# =============================================================================
# 16. Command line
# =============================================================================

def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        aml.main(["--version"])
    assert info.value.code == 0 and aml.__version__ in capsys.readouterr().out


def test_missing_store_is_usage_error(tmp_path, capsys):
    code, _, err = run_cli(tmp_path / "missing", "prune", capsys=capsys)
    assert code == 2 and err.startswith("aml: error:") and "does not exist" in err
