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
import re
import subprocess
import sys
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


# =============================================================================
# Benchmark script (bench_aml.py): its store generator and process measurement
# =============================================================================

import bench_aml  # noqa: E402  (beside aml.py; only these tests use it)

RUNTIME_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _is_num(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strs(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _shape_problems(kind, rec):
    """What the runtime's validator (SPEC 2.1) would reject in one generated record."""
    base = [isinstance(rec.get(k), str) for k in ("id", "agent")] + [
        bool(RUNTIME_TS.match(rec.get("timestamp", ""))), isinstance(rec.get("active"), bool),
        _strs(rec.get("tags", []))]
    if kind == "patterns.json":
        p, m, ev = rec["pattern"], rec["metrics"], rec["evolution"]
        checks = [isinstance(p["type"], str), isinstance(p["context"], dict),
                  isinstance(p["approach"]["technique"], str),
                  isinstance(p["approach"]["rationale"], str), _strs(p["approach"]["steps"]),
                  _strs(p["conditions"]["whenApplicable"]),
                  _strs(p["conditions"]["whenNotApplicable"]), 0 <= m["successRate"] <= 1,
                  isinstance(m["executionCount"], int), _is_num(m["avgTimeSavedMs"]),
                  isinstance(m["errorPreventionCount"], int), isinstance(ev["refinements"], int),
                  0 <= ev["confidenceScore"] <= 1, ev["lastUsed"] >= ev["created"]]
    elif kind == "solutions.json":
        pr, so, ef = rec["problem"], rec["solution"], rec["effectiveness"]
        checks = [isinstance(pr["errorType"], str), isinstance(pr["errorMessage"], str),
                  isinstance(pr["context"], dict), isinstance(so["rootCause"], str),
                  isinstance(so["fixApproach"], str), isinstance(so["prevention"], str),
                  _strs(so.get("relatedPatterns", [])), isinstance(ef["worked"], bool),
                  _is_num(ef["timeToFixMinutes"]), isinstance(ef["preventedRecurrence"], int),
                  isinstance(rec["verifiedCount"], int)]
    else:
        d = rec["decision"]
        checks = [isinstance(d["question"], str), isinstance(d["chosenOption"], str),
                  _strs(d["alternativesConsidered"]), _strs(d["decisionFactors"]["primary"]),
                  _strs(d["decisionFactors"]["secondary"]), rec.get("outcome", {}) is not None]
        if "outcome" in rec:
            o = rec["outcome"]
            checks += [isinstance(o["wouldRepeat"], bool), _strs(o["lessonsLearned"]),
                       0 <= o["successMetrics"].get("developmentSpeed", 1) <= 2,
                       0 <= o["successMetrics"].get("maintainability", 0.5) <= 1]
    return [i for i, ok in enumerate(base + checks) if not ok]


def _bench_store(tmp_path, name="s", size=0.3, seed=7, encoding="mixed"):
    meta = bench_aml.generate_store(tmp_path / name, size, seed=seed, encoding=encoding)
    return tmp_path / name, meta


def test_bench_generator_is_reproducible_from_its_seed(tmp_path):
    a, _ = _bench_store(tmp_path, "a")
    b, _ = _bench_store(tmp_path, "b")
    c, _ = _bench_store(tmp_path, "c", seed=8)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)


def test_bench_generator_writes_records_the_runtime_accepts(tmp_path):
    root, meta = _bench_store(tmp_path, size=0.5)
    store = aml.Store(root)
    assert sorted(store.agents()) == sorted(a["agent"] for a in meta["agents"])
    ages, seen = [], 0
    for path in bench_aml.record_files(root):
        records = read_data(path)
        assert isinstance(records, list) and records
        for rec in records:
            assert _shape_problems(path.name, rec) == [], (path, rec["id"])
            assert rec["agent"] == path.parent.name
            ages.append((NOW - aml.parse_timestamp(rec["timestamp"])).days)
        seen += len(records)
    assert seen == meta["records"]
    assert max(ages) > 400 and min(ages) < 30
    assert read_data(root / "config.json")["version"] == "1.0.0"


@pytest.mark.parametrize("encoding", ["gzip", "plain", "mixed"])
def test_bench_generator_encodings_and_size(tmp_path, encoding):
    root, meta = _bench_store(tmp_path, size=0.4, encoding=encoding)
    heads = {p: p.read_bytes()[:2] == b"\x1f\x8b" for p in bench_aml.record_files(root)}
    if encoding == "gzip":
        assert all(heads.values())
    elif encoding == "plain":
        assert not any(heads.values())
        text = next(iter(heads)).read_text()
        assert text == json.dumps(json.loads(text), indent=2)   # the runtime's layout exactly
    else:
        assert len(set(heads.values())) == 2
    assert (root / "config.json").read_bytes()[:1] == b"{"
    assert 0.85 * 0.4 * bench_aml.MB < meta["bytes"] < 1.2 * 0.4 * bench_aml.MB


def test_bench_generator_has_near_and_exact_duplicates_and_inactive_records(tmp_path):
    rng = random.Random(3)
    data, ids, count, _ = bench_aml.generate_records(
        "patterns.json", "qa", 400000, False, rng, dup_rate=0.2, exact_dup_rate=0.02)
    records = json.loads(data)
    assert len(records) == count > len(ids) == len(set(ids))    # exact duplicates share an id
    bodies = {}
    for rec in records:
        key = json.dumps([rec["pattern"]["conditions"], rec["pattern"]["approach"]["steps"],
                          rec["tags"]], sort_keys=True)
        bodies.setdefault(key, set()).add(rec["id"])
    assert any(len(group) > 1 for group in bodies.values())     # same content, new id
    assert any(rec["active"] is False for rec in records)


def test_bench_plan_scales_agents_and_keeps_each_under_the_limit(tmp_path):
    small = bench_aml.plan_store(tmp_path, 10, 1, "mixed")
    big = bench_aml.plan_store(tmp_path, 1000, 1, "mixed")
    assert len(big) > len(small) >= 3
    assert all(p.budget < bench_aml.AGENT_LIMIT for p in big)
    assert {p.gzip for p in small} == {True, False}
    assert len({p.agent for p in big}) == len(big)


def test_bench_mutation_rewrites_whole_files_and_changes_one_percent(tmp_path):
    root, meta = _bench_store(tmp_path, size=0.6)
    before = {p: read_data(p) for p in bench_aml.record_files(root)}
    zipped = {p: p.read_bytes()[:2] == b"\x1f\x8b" for p in before}
    counts = bench_aml.mutate_store(root, 0.01, 1, NOW + dt.timedelta(days=1))
    changed = 0
    for path, old in before.items():
        new = read_data(path)
        assert [r["id"] for r in new] == [r["id"] for r in old]
        changed += sum(a != b for a, b in zip(old, new))
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == zipped[path]
        if not zipped[path]:
            assert path.read_text() == json.dumps(new, indent=2)
    assert changed == counts["records_changed"]
    assert 0.005 * meta["records"] <= changed <= 0.02 * meta["records"]


def test_bench_process_peak_memory_is_the_childs_not_the_parents():
    ballast = bytearray(150 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])          # touch every page
    run = bench_aml.run_process([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert run.code == 3 and 0 < run.maxrss_mb < 100 and run.seconds > 0
    del ballast


def test_bench_reports_a_missing_command_as_not_available(tmp_path):
    root, meta = _bench_store(tmp_path, size=0.1)
    opts = bench_aml.parse_args(["--aml", str(HERE / "aml.py"), "--sizes", "1"])
    bench = bench_aml.Bench(opts, 0.1, root, meta, tmp_path, runs=1)
    bench.work.mkdir()
    op = bench_aml.Op("no such", ("no-such-command",), lambda b, c: [], bench_aml._ro)
    assert bench.run_op(op) == {"name": "no such", "command": "no-such-command",
                                "available": False}


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
