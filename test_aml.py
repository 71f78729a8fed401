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

def _is_int_value(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()


def _is_ts(v):
    return isinstance(v, str) and aml.parse_timestamp(v) is not None


RUNTIME_REQUIRED = {
    "pattern": [("pattern", "type", str), ("pattern", "context", dict),
                ("pattern", "approach", "technique", str),
                ("pattern", "approach", "rationale", str),
                ("pattern", "conditions", "whenApplicable", list),
                ("pattern", "conditions", "whenNotApplicable", list),
                ("metrics", "successRate", "rate"), ("metrics", "executionCount", "int"),
                ("metrics", "avgTimeSavedMs", "num"), ("metrics", "errorPreventionCount", "int"),
                ("evolution", "created", "ts"), ("evolution", "lastUsed", "ts"),
                ("evolution", "refinements", "int"), ("evolution", "confidenceScore", "rate")],
    "solution": [("problem", "errorType", str), ("problem", "errorMessage", str),
                 ("problem", "context", dict), ("solution", "rootCause", str),
                 ("solution", "fixApproach", str), ("solution", "prevention", str),
                 ("effectiveness", "worked", bool), ("effectiveness", "timeToFixMinutes", "num"),
                 ("effectiveness", "preventedRecurrence", "int"),
                 ("effectiveness", "relatedErrorsFixed", "int"), ("verifiedCount", "int")],
    "decision": [("decision", "type", str), ("decision", "question", str),
                 ("decision", "chosenOption", str), ("decision", "alternativesConsidered", list),
                 ("decision", "decisionFactors", "primary", list),
                 ("decision", "decisionFactors", "secondary", list)],
}
def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


KIND_CHECKS = {"rate": lambda v: _is_number(v) and 0 <= v <= 1, "int": _is_int_value,
               "ts": _is_ts, "num": _is_number}


def runtime_valid(rtype, rec):
    """The test's own reading of SPEC 2.1: required fields and their types; [] when valid."""
    bad = []
    for key, check in (("id", str), ("agent", str), ("timestamp", "ts")):
        if not (KIND_CHECKS[check](rec.get(key)) if check in KIND_CHECKS
                else isinstance(rec.get(key), check)):
            bad.append(key)
    for *path, kind in RUNTIME_REQUIRED[rtype]:
        value = rec
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        ok = KIND_CHECKS[kind](value) if isinstance(kind, str) else isinstance(value, kind)
        if not ok:
            bad.append(".".join(path))
    if "tags" in rec and not isinstance(rec["tags"], list):
        bad.append("tags")
    if "active" in rec and not isinstance(rec["active"], bool):
        bad.append("active")
    if rtype == "decision" and "outcome" in rec:
        out = rec["outcome"]
        if not (isinstance(out, dict) and isinstance(out.get("wouldRepeat"), bool)
                and isinstance(out.get("lessonsLearned"), list)):
            bad.append("outcome")
    return bad


def leaves(obj, prefix=()):
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(leaves(value, prefix + (key,)))
        return out
    return {prefix: obj}


# Where the migration documents that legacy values move (README, section migrate).
DOCUMENTED_MOVES = {
    ("successRate",): ("metrics", "successRate"), ("success_rate",): ("metrics", "successRate"),
    ("executionCount",): ("metrics", "executionCount"),
    ("avgTimeSavedMs",): ("metrics", "avgTimeSavedMs"),
    ("errorPreventionCount",): ("metrics", "errorPreventionCount"),
    ("refinements",): ("evolution", "refinements"), ("createdAt",): ("evolution", "created"),
    ("execution_count",): ("metrics", "executionCount"),
    ("avg_time_saved_ms",): ("metrics", "avgTimeSavedMs"),
    ("error_prevention_count",): ("metrics", "errorPreventionCount"),
    ("confidence",): ("evolution", "confidenceScore"),
    ("confidence_score",): ("evolution", "confidenceScore"),
    ("lastUsed",): ("evolution", "lastUsed"), ("last_used",): ("evolution", "lastUsed"),
    ("created_at",): ("evolution", "created"),
    ("performance", "success_rate"): ("metrics", "successRate"),
    ("performance", "execution_count"): ("metrics", "executionCount"),
    ("performance", "avg_time_saved_ms"): ("metrics", "avgTimeSavedMs"),
    ("performance", "error_prevention_count"): ("metrics", "errorPreventionCount"),
    ("performance", "confidence"): ("evolution", "confidenceScore"),
    ("lifecycle", "created_at"): ("evolution", "created"),
    ("lifecycle", "last_used"): ("evolution", "lastUsed"),
    ("lifecycle", "refinements"): ("evolution", "refinements"),
    ("pinned",): ("lifecycle", "pinned"), ("supersededBy",): ("lifecycle", "supersededBy"),
    ("verified_count",): ("verifiedCount",), ("reviewed_at",): ("reviewedAt",),
    ("is_active",): ("active",),
}


def assert_values_preserved(before, after):
    """Every leaf value of ``before`` is at its old path or its documented new path."""
    new = leaves(after)
    for path, value in leaves(before).items():
        if path in new and new[path] == value:
            continue
        moved = DOCUMENTED_MOVES.get(path)
        assert moved is not None and new.get(moved) == value, (path, value, after)


def _strip_to_v1(rec):
    return {k: v for k, v in rec.items() if k not in ("tags", "active", "metadata", "variations")}


def _flat_v1(rec, style):
    """A 1.0.0 pattern whose metrics sit flat at the top level (camelCase or snake_case)."""
    out = _strip_to_v1(rec)
    m, e = out.pop("metrics"), out.pop("evolution")
    if style == "camel":
        out.update(successRate=m["successRate"], executionCount=m["executionCount"],
                   avgTimeSavedMs=m["avgTimeSavedMs"],
                   errorPreventionCount=m["errorPreventionCount"],
                   confidence=e["confidenceScore"], lastUsed=e["lastUsed"],
                   refinements=e["refinements"], createdAt=e["created"])
    else:
        out.update(success_rate=m["successRate"], execution_count=m["executionCount"],
                   avg_time_saved_ms=m["avgTimeSavedMs"],
                   error_prevention_count=m["errorPreventionCount"],
                   confidence_score=e["confidenceScore"], last_used=e["lastUsed"],
                   refinements=e["refinements"], created_at=e["created"])
    return out


def _older_tool(rec, i):
    """The older toolkit's "2.0.0": metrics/evolution dropped for performance + lifecycle."""
    out = dict(rec, tags=[], active=True, metadata={}, variations=[], schema_version="2.0.0")
    m, e = out.pop("metrics"), out.pop("evolution")
    out["performance"] = {"success_rate": m["successRate"], "execution_count": m["executionCount"],
                          "avg_time_saved_ms": m["avgTimeSavedMs"],
                          "error_prevention_count": m["errorPreventionCount"],
                          "confidence": e["confidenceScore"]}
    out["lifecycle"] = {"created_at": e["created"], "last_used": e["lastUsed"],
                        "refinements": e["refinements"]}
    if i % 2:
        out["schemaVersion"] = "2.0.0"  # it even stamped our key: shape decides, not the stamp
    return out


def versioned_store(root, version, seed=5):
    """One agent whose three files hold the same records written as ``version``."""
    rng = random.Random(seed)
    pats = [make_pattern("alpha", rng, tags=[]) for _ in range(12)]
    sols = [make_solution("alpha", rng, tags=[]) for _ in range(5)]
    decs = [make_decision("alpha", rng, tags=[]) for _ in range(5)]
    if version == "1.0.0":
        pats = [_flat_v1(p, ("camel", "snake", "nested")[i % 3]) if i % 3 < 2 else _strip_to_v1(p)
                for i, p in enumerate(pats)]
        sols, decs = [_strip_to_v1(s) for s in sols], [_strip_to_v1(d) for d in decs]
    elif version in ("1.2.0", "older-tool"):
        pats = [dict(p, metadata={}, variations=[]) for p in pats]
        sols = [dict(s, metadata={}) for s in sols]
        decs = [dict(d, metadata={}) for d in decs]
        if version == "older-tool":
            pats = [_older_tool(p, i) for i, p in enumerate(pats)]
    write_data(root / "alpha" / "patterns.json", pats)
    write_data(root / "alpha" / "solutions.json", sols)
    write_data(root / "alpha" / "decisions.json", decs)
    return root


@pytest.fixture
def fake_backup(monkeypatch):
    """safety_backup that succeeds and remembers its calls."""
    calls = []

    def backup(store, reason, config=None):
        calls.append(reason)
        return "snap-%d" % len(calls)

    monkeypatch.setattr(aml, "safety_backup", backup)
    return calls


def store_records(root):
    out = {}
    for path in sorted(Path(root).glob("*/*.json")):
        if aml.RecordType.from_filename(path.name):
            out[str(path.relative_to(root))] = read_data(path)
    return out


def without_legacy_stamps(data):
    return {f: [{k: v for k, v in r.items() if k != "schema_version"} for r in recs]
            for f, recs in data.items()}


def test_every_old_version_reaches_the_same_canonical_result(tmp_path, fake_backup, capsys):
    results = {}
    for version in ("1.0.0", "1.1.0", "1.2.0", "older-tool"):
        root = versioned_store(tmp_path / version, version)
        if version == "older-tool":
            # The runtime rejects these records as they are (metrics/evolution dropped).
            assert all(runtime_valid("pattern", r) for r in read_data(root / "alpha/patterns.json"))
        before = store_records(root)
        code, _, err = run_cli(root, "migrate", "migrate-latest", capsys=capsys)
        assert code == 0, err
        after = store_records(root)
        for name in before:
            for old, new in zip(before[name], after[name]):
                assert_values_preserved(old, new)
        results[version] = without_legacy_stamps(after)
    assert results["1.0.0"] == results["1.1.0"] == results["1.2.0"] == results["older-tool"]
    for name, records in results["1.0.0"].items():
        rtype = aml.RecordType.from_filename(Path(name).name).value
        assert all(runtime_valid(rtype, r) == [] and r["schemaVersion"] == "2.0.0" for r in records)


def test_runtime_store_migrates_to_valid_2_0_0_keeping_every_value(store, fake_backup, capsys):
    before = store_records(store)
    gz_before = {p: p.read_bytes()[:2] == b"\x1f\x8b" for p in store.glob("*/*.json")}
    code, out, _ = run_cli(store, "migrate", "migrate-latest", "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and "backup snap-1" in out
    after = store_records(store)
    assert {f: len(r) for f, r in after.items()} == {f: len(r) for f, r in before.items()}
    for name, records in after.items():
        rtype = aml.RecordType.from_filename(Path(name).name).value
        for old, new in zip(before[name], records):
            assert runtime_valid(rtype, new) == []
            assert_values_preserved(old, new)
    assert {p: p.read_bytes()[:2] == b"\x1f\x8b" for p in gz_before} == gz_before
    code, out, _ = run_cli(store, "migrate", "detect", "--format", "json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["totals"] == {"2.0.0": sum(len(r) for r in before.values())}
    assert report["history"][-1]["backup_id"] == "snap-1" and report["history"][-1]["to"] == "2.0.0"
    digest = tree_digest(store, skip_state=True)
    code, out, _ = run_cli(store, "migrate", "migrate-latest", capsys=capsys)
    assert code == 0 and "changed 0 of" in out and tree_digest(store, skip_state=True) == digest
    assert fake_backup == ["before migrate to 2.0.0"]  # nothing to change: no second backup


def test_detect_reads_runtime_records_and_flags_mixed_and_unplaceable(tmp_path, capsys):
    rng = random.Random(8)
    root = tmp_path / "m"
    runtime_no_tags = {k: v for k, v in make_pattern("a", rng).items() if k != "tags"}
    records = [runtime_no_tags, make_pattern("a", rng),
               _strip_to_v1(make_pattern("a", rng)),
               dict(make_pattern("a", rng), metadata={}, variations=[]),
               dict(make_pattern("a", rng), schemaVersion="9.9"),
               "not a record"]
    write_data(root / "a" / "patterns.json", records)
    write_data(root / "b" / "solutions.json", [make_solution("b", rng)])
    before = tree_digest(root)
    code, out, _ = run_cli(root, "migrate", "detect", capsys=capsys)
    assert code == 0 and tree_digest(root) == before and not (root / ".aml").exists()
    assert "a/patterns.json" in out and "1.0.0: 1, 1.1.0: 2, 1.2.0: 1, unplaceable: 2  MIXED" in out
    assert "Store: 1.0.0: 1, 1.1.0: 3, 1.2.0: 1, unplaceable: 2 (MIXED)" in out
    assert "a/patterns.json[4]" in out and "unknown schemaVersion '9.9'" in out
    assert "a/patterns.json[5]" in out and "b" in out and "Migration history: none" in out


@pytest.mark.parametrize("rec,version", [
    ({"id": "x", "active": True}, "1.1.0"),            # runtime: active kept, empty tags dropped
    ({"id": "x", "tags": []}, "1.1.0"),
    ({"id": "x"}, "1.0.0"),
    ({"id": "x", "variations": []}, "1.2.0"),
    ({"id": "x", "schemaVersion": "1.2.0"}, "1.2.0"),  # a stamp wins over the fields
    ({"id": "x", "schemaVersion": "2.0.0", "performance": {}, "tags": []}, "1.1.0"),
    ({"id": "x", "schemaVersion": "2.0.0", "metrics": {}, "evolution": {},
      "lifecycle": {"state": "active"}}, "2.0.0"),
    ({"id": "x", "schemaVersion": "3.1"}, None),
    ({"unrelated": 1}, None),
])
def test_detect_record_version(rec, version):
    found = aml.detect_record_version(aml.RecordType.PATTERN, rec)
    assert (found.value if found else None) == version


def test_mixed_store_migrates_and_reports_what_it_cannot(tmp_path, fake_backup, capsys):
    rng = random.Random(9)
    root = tmp_path / "m"
    no_rate = _strip_to_v1(make_pattern("a", rng))
    del no_rate["metrics"]["successRate"]
    keep = [no_rate, "not a record"]
    good = [_flat_v1(make_pattern("a", rng), "snake"), make_pattern("a", rng),
            dict(make_pattern("a", rng), metadata={"k": 1}, variations=[])]
    write_data(root / "a" / "patterns.json", keep + good)
    code, _, err = run_cli(root, "migrate", "migrate-latest", capsys=capsys)
    assert code == 3
    assert "a/patterns.json[0]" in err and "no usable metrics.successRate anywhere" in err
    assert "a/patterns.json[1]" in err and "cannot place" in err
    after = read_data(root / "a" / "patterns.json")
    assert after[:2] == keep  # left exactly as they were, not half-migrated
    assert [r["schemaVersion"] for r in after[2:]] == ["2.0.0"] * 3
    assert after[4]["metadata"] == {"k": 1}


def test_crash_between_files_then_rerun_equals_clean_run(tmp_path, monkeypatch, capsys):
    clean = build_store(tmp_path / "clean", gz="mixed")
    crashed = build_store(tmp_path / "crashed", gz="mixed")
    assert run_cli(clean, "migrate", "migrate-latest", "--no-backup", "--now", NOW_TEXT) == 0
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(aml.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        run_cli(crashed, "migrate", "migrate-latest", "--no-backup", "--now", NOW_TEXT)
    monkeypatch.undo()
    partial = store_records(crashed)
    assert sum(1 for recs in partial.values() if recs[0].get("schemaVersion")) == 1
    assert not [p for p in crashed.rglob("*") if ".aml-tmp-" in p.name]
    assert run_cli(crashed, "migrate", "migrate-latest", "--no-backup", "--now", NOW_TEXT) == 0
    assert tree_digest(crashed, skip_state=True) == tree_digest(clean, skip_state=True)


def test_failed_safety_backup_leaves_store_untouched(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "m")

    def no_backup(store, reason, config=None):
        raise aml.RefusedError("backup volume is full")

    monkeypatch.setattr(aml, "safety_backup", no_backup)
    before = tree_digest(root, skip_state=True)
    code, _, err = run_cli(root, "migrate", "migrate-latest", capsys=capsys)
    assert code == 4 and "backup volume is full" in err and "--no-backup" in err
    assert tree_digest(root, skip_state=True) == before
    assert not (root / ".aml" / "migrations.json").exists()


def test_dry_run_reports_steps_and_sample_and_changes_nothing(tmp_path, capsys):
    root = versioned_store(tmp_path / "m", "older-tool")
    before = tree_digest(root)
    code, out, _ = run_cli(root, "migrate", "migrate-latest", "--dry-run", capsys=capsys)
    assert code == 0 and tree_digest(root) == before and not (root / ".aml").exists()
    assert "would change 22 of 22 records" in out and "step 1.2.0->2.0.0" in out
    assert "> performance.success_rate -> metrics.successRate:" in out
    code, out, _ = run_cli(root, "migrate", "migrate", "--version", "2.0.0", "--dry-run",
                           "--format", "json", capsys=capsys)
    plan = json.loads(out)
    assert plan["dry_run"] and plan["steps"]["1.2.0->2.0.0"] == 22 and tree_digest(root) == before


def test_steps_down_lossless_or_refused_with_backup_hint(tmp_path, fake_backup, capsys):
    root = build_store(tmp_path / "m", agents=("alpha",), patterns=6, solutions=3, decisions=3)
    original = store_records(root)
    assert run_cli(root, "migrate", "migrate-latest", capsys=capsys)[0] == 0
    code, out, _ = run_cli(root, "migrate", "migrate", "1.1.0", capsys=capsys)
    assert code == 0 and "step 2.0.0->1.2.0" in out and "step 1.2.0->1.1.0" in out
    assert store_records(root) == original  # runtime records come back byte-for-value equal
    before = tree_digest(root, skip_state=True)
    code, _, err = run_cli(root, "migrate", "migrate", "1.0.0", capsys=capsys)
    assert code == 4 and "would drop tags" in err and "backup restore snap-2" in err
    assert tree_digest(root, skip_state=True) == before


def test_step_down_refused_when_lifecycle_holds_information(tmp_path, fake_backup, capsys):
    rng = random.Random(4)
    root = tmp_path / "m"
    write_data(root / "a" / "decisions.json", [make_decision("a", rng, pinned=True)])
    assert run_cli(root, "migrate", "migrate-latest") == 0
    rec = read_data(root / "a" / "decisions.json")[0]
    assert rec["lifecycle"] == {"pinned": True, "state": "pinned"} and "pinned" not in rec
    facts = aml.record_facts(aml.RecordType.DECISION, rec)
    assert facts.pinned and facts.active
    code, _, err = run_cli(root, "migrate", "migrate", "--version", "1.2.0", capsys=capsys)
    assert code == 4 and "lifecycle" in err


def test_unreadable_file_is_skipped_and_reported(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)
    bad = root / "code-reviewer" / "patterns.json"
    bad.write_bytes(gzip.compress(b'[{"id": "x"}]')[:-5])
    raw = bad.read_bytes()
    code, _, err = run_cli(root, "migrate", "migrate-latest", "--no-backup", capsys=capsys)
    assert code == 3 and "code-reviewer/patterns.json" in err and bad.read_bytes() == raw
    assert read_data(root / "test-automator" / "patterns.json")[0]["schemaVersion"] == "2.0.0"


@pytest.mark.parametrize("rate,count,expected", [
    (0.5, 1, {"successCount": 0, "failureCount": 0}),      # the runtime's fresh pattern
    (0.75, 2, {"successCount": 1, "failureCount": 0}),
    (0.9137931034482759, 29, {"successCount": 26, "failureCount": 2}),
    (0.8, 10, {"successCount": 8, "failureCount": 2}),     # a plain ratio (hand-written)
    (0.73, 3, {"successCount": 2, "failureCount": 1, "countsApproximate": True}),
    (0.0, 0, {"successCount": 0, "failureCount": 0}),
])
def test_exact_counts(rate, count, expected):
    rec = make_pattern("a", random.Random(1), success=rate, count=count)
    out = aml.migrate_record(aml.RecordType.PATTERN, rec, aml.SchemaVersion.V2_0_0).record
    keys = ("successCount", "failureCount", "countsApproximate")
    assert {k: out["metrics"][k] for k in keys if k in out["metrics"]} == expected


def test_lifecycle_state_and_record_facts_on_2_0_0():
    rng = random.Random(2)
    cases = [(dict(make_pattern("a", rng), active=False), "inactive"),
             (dict(make_pattern("a", rng), supersededBy="p-2"), "superseded"),
             (dict(make_pattern("a", rng), tags=["pinned"]), "pinned"),
             (dict(make_pattern("a", rng), lifecycle={"state": "Deprecated"}), "superseded")]
    for rec, state in cases:
        out = aml.migrate_record(aml.RecordType.PATTERN, rec, aml.SchemaVersion.V2_0_0).record
        assert out["lifecycle"]["state"] == state and out["active"] == rec["active"]
        facts = aml.record_facts(aml.RecordType.PATTERN, out)
        assert facts.superseded == (state == "superseded")
        assert facts.pinned == (state == "pinned") and facts.active == rec["active"]
        assert facts.execution_count == rec["metrics"]["executionCount"]
    assert out["lifecycle"]["legacyState"] == "Deprecated"


def test_migration_is_idempotent_per_record():
    rng = random.Random(11)
    recs = [_flat_v1(make_pattern("a", rng), "snake"), _older_tool(make_pattern("a", rng), 1),
            make_pattern("a", rng, pinned=True)]
    for rec in recs:
        once = aml.migrate_record(aml.RecordType.PATTERN, rec, aml.SchemaVersion.V2_0_0)
        twice = aml.migrate_record(aml.RecordType.PATTERN, once.record, aml.SchemaVersion.V2_0_0)
        assert once.changes and not twice.changes and twice.record is once.record


def test_epoch_and_conflicting_legacy_values_are_kept_not_lost():
    rec = _strip_to_v1(make_pattern("a", random.Random(3), success=0.5, count=4))
    rec["success_rate"] = 0.9                      # conflicts with metrics.successRate
    rec["metrics"]["successRate"] = 0.5
    del rec["evolution"]["lastUsed"]
    rec["last_used"] = 1763640000000               # epoch milliseconds
    out = aml.migrate_record(aml.RecordType.PATTERN, rec, aml.SchemaVersion.V2_0_0).record
    assert out["success_rate"] == 0.9 and out["metrics"]["successRate"] == 0.5
    assert out["evolution"]["lastUsed"] == "2025-11-20T12:00:00.000Z"
    assert out["last_used"] == 1763640000000


def test_missing_optional_counters_are_defaulted_and_noted():
    rec = _older_tool(make_pattern("a", random.Random(6)), 0)
    del rec["performance"]["avg_time_saved_ms"]
    out = aml.migrate_record(aml.RecordType.PATTERN, rec, aml.SchemaVersion.V2_0_0)
    assert out.problem is None and out.record["metrics"]["avgTimeSavedMs"] == 0
    assert out.record["metadata"]["amlMigration"] == {"defaulted": ["metrics.avgTimeSavedMs"]}


def test_solution_and_decision_legacy_fields_become_runtime_fields():
    rng = random.Random(12)
    sol = _strip_to_v1(make_solution("a", rng))
    sol["verified_count"] = sol.pop("verifiedCount")
    dec = dict(_strip_to_v1(make_decision("a", rng)), outcome=None, reviewed_at=NOW_TEXT)
    assert runtime_valid("solution", sol) and runtime_valid("decision", dec)
    new_sol = aml.migrate_record(aml.RecordType.SOLUTION, sol, aml.SchemaVersion.V2_0_0).record
    new_dec = aml.migrate_record(aml.RecordType.DECISION, dec, aml.SchemaVersion.V2_0_0).record
    assert runtime_valid("solution", new_sol) == [] and runtime_valid("decision", new_dec) == []
    assert new_sol["verifiedCount"] == sol["verified_count"] and "verified_count" not in new_sol
    assert new_dec["reviewedAt"] == NOW_TEXT and "outcome" not in new_dec
    assert_values_preserved(sol, new_sol)


def test_migrate_cli_spellings_and_usage_errors(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("alpha",), patterns=3, solutions=1, decisions=1)
    assert run_cli(root, "migrate", "migrate", "1.2.0", "--no-backup") == 0
    code, out, _ = run_cli(root, "migrate", "detect", capsys=capsys)
    assert "Store: 1.2.0: 5 (uniform)" in out
    code, _, err = run_cli(root, "migrate", "migrate", capsys=capsys)
    assert code == 2 and "target version" in err
    code, _, err = run_cli(root, "migrate", "migrate", "1.1.0", "--version", "2.0.0",
                           capsys=capsys)
    assert code == 2 and "two different" in err
    code, _, err = run_cli(root, "migrate", "migrate", "--version", "3.0", capsys=capsys)
    assert code == 2 and "unknown schema version" in err


# =============================================================================
# 14. Monitoring and alerts
# =============================================================================


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
