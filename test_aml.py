"""Tests for aml.py. Sections mirror aml.py's numbered sections.

Every store is generated in ``tmp_path`` by the factories below; nothing here reads
``../shared``. Run with ``make test``.
"""

import datetime as dt
import gzip
import hashlib
import json
import math
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

def test_bloom_has_no_false_negatives_and_meets_its_rate():
    bloom = aml.BloomFilter(10000, 0.01)
    keys = [str(uuid.UUID(int=random.Random(9).getrandbits(128) + i)) for i in range(10000)]
    for key in keys:
        bloom.add(key)
    assert all(key in bloom for key in keys)
    false_hits = sum(("probe-%d" % i) in bloom for i in range(100000))
    assert false_hits / 100000.0 <= 0.01
    assert false_hits > 0  # a filter that answers "no" to everything would pass the line above


def test_bloom_size_is_within_five_percent_of_optimum():
    for capacity, rate in ((10000, 0.01), (1000, 0.001), (250000, 0.05)):
        bloom = aml.BloomFilter(capacity, rate)
        optimum = -capacity * math.log(rate) / math.log(2) ** 2
        assert optimum <= bloom.m <= optimum * 1.05
        assert bloom.size_bytes == (bloom.m + 7) // 8
    assert 11000 < aml.BloomFilter(10000, 0.01).size_bytes < 12500  # ~9.6 bits per item


def test_bloom_bytes_round_trip_and_corruption_detected():
    bloom = aml.BloomFilter(500, 0.01)
    for i in range(300):
        bloom.add("id-%d" % i)
    copy = aml.BloomFilter.from_bytes(bloom.to_bytes())
    assert (copy.m, copy.k, len(copy)) == (bloom.m, bloom.k, 300) and "id-7" in copy
    data = bytearray(bloom.to_bytes())
    data[40] ^= 0x01
    with pytest.raises(aml.IntegrityError):
        aml.BloomFilter.from_bytes(bytes(data))
    with pytest.raises(aml.IntegrityError):
        aml.BloomFilter.from_bytes(bloom.to_bytes()[:-1])


def test_lru_evicts_least_recently_used_within_byte_budget():
    cache = aml.LRUCache(max_bytes=100)
    for key in "abc":
        assert cache.put(key, b"x" * 30)
    assert cache.get("a") == b"x" * 30      # a is now the most recent
    cache.put("d", b"y" * 30)               # 120 > 100: evict b, the least recent
    assert cache.keys() == ["c", "a", "d"] and cache.bytes == 90
    assert cache.get("b") is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.items) == (1, 1, 1, 3)
    assert stats.hit_rate == 0.5


def test_lru_refuses_oversize_items_and_charges_json_size():
    cache = aml.LRUCache(max_bytes=50)
    cache.put("small", {"a": 1})
    assert cache.bytes == len('{"a":1}')
    assert cache.put("big", "z" * 51) is False
    assert "big" not in cache and cache.stats().refused == 1 and "small" in cache
    cache.put("small", "é" * 10)   # replacing re-charges: 20 UTF-8 bytes
    assert cache.bytes == 20 and len(cache) == 1


# =============================================================================
# 10. Index and search
# =============================================================================

def search_json(root, *args, capsys):
    code, out, err = run_cli(root, "search", "--format", "json", *args, capsys=capsys)
    return code, json.loads(out), err


def brute_force(root, agent=None, rtype=None, tags=(), conf=None, rate=None, text=None):
    """Independent scan of the generated store: (file, index) of every matching record."""
    hits = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name not in
                         ("global", ".aml")):
        if agent and folder.name != agent:
            continue
        for name in ("decisions.json", "patterns.json", "solutions.json"):
            if rtype and name != rtype + "s.json":
                continue
            for i, rec in enumerate(read_data(folder / name)):
                c = rec.get("evolution", {}).get("confidenceScore")
                r = rec.get("metrics", {}).get("successRate")
                if (set(tags) <= set(rec.get("tags", []))
                        and (conf is None or (c is not None and c >= conf))
                        and (rate is None or (r is not None and r >= rate))
                        and (text is None or text.lower() in json.dumps(rec).lower())):
                    hits.append(("%s/%s" % (folder.name, name), i))
    return hits


@pytest.fixture
def mixed_store(tmp_path):
    return build_store(tmp_path / "memory", gz="mixed", agents=("alpha", "beta", "gamma", "delta"))


@pytest.mark.parametrize("flags,filters", [
    ((), {}),
    (("--agent", "beta"), {"agent": "beta"}),
    (("--type", "solution"), {"rtype": "solution"}),
    (("--tag", "database"), {"tags": ("database",)}),
    (("--tag", "api", "backend"), {"tags": ("api", "backend")}),
    (("--min-confidence", "0.6"), {"conf": 0.6}),
    (("--min-success-rate", "0.7"), {"rate": 0.7}),
    (("--text", "Backoff"), {"text": "backoff"}),
    (("--agent", "gamma", "--type", "pattern", "--tag", "ui", "--min-confidence", "0.3"),
     {"agent": "gamma", "rtype": "pattern", "tags": ("ui",), "conf": 0.3}),
])
@pytest.mark.parametrize("mode", ["index", "scan"])
def test_search_equals_brute_force_scan(mixed_store, capsys, flags, filters, mode):
    extra = ("--scan",) if mode == "scan" else ()
    code, doc, _ = search_json(mixed_store, *(flags + extra), capsys=capsys)
    expected = brute_force(mixed_store, **filters)
    assert code == 0 and expected
    assert [(r["file"], r["index"]) for r in doc["records"]] == expected
    assert doc["source"] == mode
    first = doc["records"][0]
    assert first["record"] == read_data(mixed_store / first["file"])[first["index"]]


def test_search_limit_and_text_output(mixed_store, capsys):
    code, out, _ = run_cli(mixed_store, "search", "--type", "pattern", "--limit", "3",
                           capsys=capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[-1] == "3 records (index)"
    assert lines[0].startswith("alpha/patterns.json[0]  ")


def test_search_unknown_agent_is_empty_and_fails(mixed_store, capsys):
    code, doc, err = search_json(mixed_store, "--agent", "nobody", capsys=capsys)
    assert code == 1 and doc["records"] == [] and doc["not_found"]
    assert "no agent named 'nobody'" in err


def test_get_prints_the_record_and_unknown_id_fails(store, capsys):
    record = read_data(store / "code-reviewer" / "solutions.json")[4]
    code, out, _ = run_cli(store, "get", record["id"], capsys=capsys)
    assert code == 0 and json.loads(out) == record
    code, out, err = run_cli(store, "get", "no-such-id", capsys=capsys)
    assert code == 1 and out == "" and "no record with id 'no-such-id'" in err


def test_get_returns_same_id_from_every_agent(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2"))
    shared = read_data(root / "a1" / "patterns.json")[3]
    twin = dict(shared, agent="a2")
    write_data(root / "a2" / "decisions.json", read_data(root / "a2" / "decisions.json") + [twin])
    code, out, _ = run_cli(root, "get", shared["id"], "--format", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and [r["agent"] for r in doc["records"]] == ["a1", "a2"]


def test_get_uses_bloom_filter_for_absent_ids(store, monkeypatch):
    assert run_cli(store, "optimize", "index") == 0
    monkeypatch.setattr(aml.MemoryIndex, "locate", lambda *a: pytest.fail("id table read"))
    result = aml.get_record(aml.Store(store), "absent-id")
    assert result.not_found and result.source == "bloom"


def test_index_refresh_rereads_only_changed_files(store, monkeypatch):
    s = aml.Store(store)
    index = aml.MemoryIndex(s)
    assert index.stale_files() and index.size_bytes() == 0
    first = index.refresh()
    assert first.rebuilt and first.records == 3 * 65 and index.size_bytes() > 0
    assert aml.MemoryIndex(s).stale_files() == []
    target = store / "test-automator" / "patterns.json"
    records = read_data(target)
    new = make_pattern("test-automator", random.Random(5), tags=["fresh"])
    write_data(target, records[:-1] + [new], gz=target.read_bytes()[:2] == b"\x1f\x8b")
    assert aml.MemoryIndex(s).stale_files() == ["test-automator/patterns.json"]
    loads = []
    real = aml.load_json_file
    monkeypatch.setattr(aml, "load_json_file", lambda p, **k: loads.append(p) or real(p, **k))
    result = aml.MemoryIndex(s).refresh()
    assert [p for p in loads if ".aml" not in Path(p).parts] == [target]
    assert result.files_reread == ["test-automator/patterns.json"]
    found = aml.get_record(s, new["id"])
    assert found.records[0].record == new and found.source == "index"
    assert aml.get_record(s, records[-1]["id"]).not_found


def test_parallel_index_build_equals_sequential(tmp_path, monkeypatch):
    built = []
    for parallel in (False, True):
        root = build_store(tmp_path / str(parallel), gz="mixed")
        if parallel:
            monkeypatch.setattr(aml, "_PARALLEL_INDEX_BYTES", 0)
            monkeypatch.setattr(aml, "_PARALLEL_BLOOM_IDS", 0)
        aml.MemoryIndex(aml.Store(root)).refresh()
        folder = root / ".aml" / "index"
        built.append({n: (folder / n).read_bytes() for n in ("postings.dat", "keys.dat",
                                                               "ids.bin", "bloom.bin")})
    assert built[0] == built[1]


def test_index_drops_removed_files(store):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    (store / "alpha").mkdir()
    write_data(store / "alpha" / "decisions.json", [make_decision("alpha", random.Random(1))])
    (store / "code-reviewer" / "decisions.json").unlink()
    assert sorted(aml.MemoryIndex(s).stale_files()) == ["alpha/decisions.json",
                                                         "code-reviewer/decisions.json"]
    result = aml.MemoryIndex(s).refresh()
    assert result.files_removed == ["code-reviewer/decisions.json"]
    assert [e["path"] for e in aml.MemoryIndex(s).files(rtype="decision")] == [
        "alpha/decisions.json", "backend-developer/decisions.json",
        "test-automator/decisions.json"]


@pytest.mark.parametrize("part", ["manifest.json", "postings.dat", "ids.bin", "bloom.bin"])
def test_corrupt_index_part_is_never_trusted_and_rebuilt(store, capsys, part):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    path = s.state_dir / "index" / part
    record = read_data(store / "backend-developer" / "patterns.json")[17]
    data = bytearray(path.read_bytes())
    spot = len(data) // 2
    if part == "ids.bin":   # inside the bucket this id's lookup reads
        buckets = aml.MemoryIndex(s).manifest()["ids"]["buckets"]
        start = buckets[aml.bloom_digest(record["id"])[0]][0]
        spot = 9 + start * 24 + 20
    data[spot] ^= 0x20
    path.write_bytes(bytes(data))
    code, out, _ = run_cli(store, "get", record["id"], capsys=capsys)
    assert code == 0 and json.loads(out) == record
    code, doc, _ = search_json(store, "--tag", "api", capsys=capsys)
    assert [(r["file"], r["index"]) for r in doc["records"]] == brute_force(store, tags=("api",))
    index = aml.MemoryIndex(s)
    assert index.manifest() is not None and index.might_contain(record["id"])
    assert index.locate(record["id"])[0][1] == 17


def test_unreadable_file_is_reported_and_skipped(store, capsys):
    (store / "code-reviewer" / "patterns.json").write_bytes(b"[{broken")
    code, doc, err = search_json(store, "--type", "pattern", capsys=capsys)
    assert code == 3 and "code-reviewer/patterns.json" in err
    assert {r["agent"] for r in doc["records"]} == {"backend-developer", "test-automator"}
    assert (store / "code-reviewer" / "patterns.json").read_bytes() == b"[{broken"


def test_scan_writes_nothing(store, capsys):
    before = tree_digest(store)
    record = read_data(store / "code-reviewer" / "patterns.json")[0]
    assert run_cli(store, "get", record["id"], "--scan", capsys=capsys)[0] == 0
    assert run_cli(store, "search", "--tag", "ui", "--scan", capsys=capsys)[0] == 0
    assert tree_digest(store) == before


def test_busy_maintenance_lock_falls_back_read_only(store, capsys):
    s = aml.Store(store)
    record = read_data(store / "test-automator" / "solutions.json")[2]
    with s.maintenance_lock():
        before = tree_digest(store)
        code, out, _ = run_cli(store, "get", record["id"], "--format", "json", capsys=capsys)
        assert code == 0 and json.loads(out)["source"] == "scan"
        assert tree_digest(store) == before
    run_cli(store, "optimize", "index", capsys=capsys)
    with s.maintenance_lock():
        code, out, _ = run_cli(store, "get", record["id"], "--format", "json", capsys=capsys)
        assert json.loads(out)["source"] == "index"


def test_warm_cache_answers_lookups_and_counts_hits(store, capsys):
    s = aml.Store(store)
    assert aml.hot_cache_stats(s) == {"hits": 0, "misses": 0}
    code, out, _ = run_cli(store, "optimize", "warm-cache", "--cache-bytes", "20000",
                           "--format", "json", capsys=capsys)
    warm = json.loads(out)["steps"]["warm-cache"]
    assert code == 0 and 0 < warm["bytes"] <= 20000 and 0 < warm["records"] < 195
    hot = {r["id"]: r for r in aml.HotCache(aml.MemoryIndex(s)).records()}
    assert len(hot) == warm["records"]
    hot_id = next(iter(hot))
    hot_file = aml.get_record(s, hot_id).records[0].file   # a hit, counted below
    cold_id = next(r["id"] for r in read_data(store / hot_file) if r["id"] not in hot)
    assert aml.get_record(s, hot_id).records[0].source == "hot-cache"
    assert aml.get_record(s, cold_id).records[0].source == "index"
    stats = aml.hot_cache_stats(s)
    assert (stats["hits"], stats["misses"]) == (2, 1)
    path = store / hot_file
    records = read_data(path)
    changed = [dict(r, tags=["edited"]) if r["id"] == hot_id else r for r in records]
    write_data(path, changed, gz=path.read_bytes()[:2] == b"\x1f\x8b")
    again = aml.get_record(s, hot_id).records[0]
    assert again.source == "index" and again.record["tags"] == ["edited"]


def test_warm_score_prefers_confident_recent_active_records():
    rng = random.Random(2)
    good = aml.posting_row(make_pattern("a", rng, age=5, last_used=1, success=0.9, count=50,
                                        conf=0.9), 0)
    stale = aml.posting_row(make_pattern("a", rng, age=300, last_used=200, success=0.9,
                                         count=50, conf=0.9), 1)
    inactive = aml.posting_row(make_pattern("a", rng, age=5, last_used=1, success=0.9, count=50,
                                            conf=0.9, active=False), 2)
    score = lambda row: aml.warm_score(row, NOW)  # noqa: E731
    assert score(good) > score(stale) and score(good) > score(inactive) > 0


# =============================================================================
# 11. Pruning
# =============================================================================


# =============================================================================
# 12. Compression and garbage collection
# =============================================================================

def age_files(root, days, pattern="*/*.json"):
    """Set the mtime of matching files ``days`` before NOW."""
    moment = (NOW - dt.timedelta(days=days)).timestamp()
    for path in Path(root).glob(pattern):
        os.utime(path, (moment, moment))


def plain_bytes(path):
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


@pytest.mark.parametrize("workers", ["1", "2"])
def test_compress_in_place_keeps_names_content_and_mtime(tmp_path, capsys, workers):
    root = build_store(tmp_path / "m")
    age_files(root, 40)
    age_files(root, 5, "code-reviewer/patterns.json")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*.json")}
    code, out, _ = run_cli(root, "optimize", "compress", "--no-backup", "--now", NOW_TEXT,
                           "--workers", workers, "--format", "json", capsys=capsys)
    result = json.loads(out)["steps"]["compress"]
    assert code == 0 and len(result["files"]) == 14
    assert result["skipped_recent"] == ["code-reviewer/patterns.json"]
    assert 0 < result["bytes_after"] < result["bytes_before"]
    for path, (raw, mtime) in before.items():
        zipped = path.read_bytes()[:2] == b"\x1f\x8b"
        expected = path.parent.parent == root and path.parent.name != "global" \
            and path.name != "config.json" and path != root / "code-reviewer" / "patterns.json"
        assert zipped == expected, path
        assert plain_bytes(path) == raw and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in root.rglob("*") if p.is_file() and ".aml" not in p.parts) == \
        sorted(p.name for p in before)
    assert aml.Store(root).last_operation("compress")["summary"]["files"] == 14


def test_compress_age_zero_takes_everything_and_decompress_round_trips(tmp_path):
    root = build_store(tmp_path / "m")
    original = tree_digest(root)
    assert run_cli(root, "optimize", "compress", "--age-days", "0", "--no-backup", "-q") == 0
    assert all(plain_bytes(root / f) and (root / f).read_bytes()[:2] == b"\x1f\x8b"
               for f in original if f.count("/") == 1 and not f.startswith("global"))
    assert run_cli(root, "optimize", "decompress", "--no-backup", "-q") == 0
    assert tree_digest(root, skip_state=True) == original


def test_decompress_reindents_compact_gzip(tmp_path):
    root = build_store(tmp_path / "m", agents=("a",))
    path = root / "a" / "decisions.json"
    records = read_data(path)
    path.write_bytes(gzip.compress(json.dumps(records, separators=(",", ":")).encode()))
    assert run_cli(root, "optimize", "decompress", "--no-backup", "-q") == 0
    assert path.read_text(encoding="utf-8") == json.dumps(records, indent=2, ensure_ascii=False)


def test_compress_skips_parsing_only_files_the_index_vouches_for(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a", "b"))
    aml.MemoryIndex(aml.Store(root)).refresh()
    write_data(root / "b" / "patterns.json", [make_pattern("b", random.Random(4))])  # now stale
    parsed = []
    real = aml.parse_json_text
    monkeypatch.setattr(aml, "parse_json_text", lambda text: parsed.append(1) or real(text))
    result = aml.transcode_store(aml.Store(root), True, age_days=0, workers=1)
    # 4 metrics/context files, the stale patterns file and the index manifest itself
    assert len(result.files) == 10 and len(parsed) == 6
    assert all(read_data(root / f) for f in result.files)


def test_compress_never_touches_unparseable_files(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a", "b"))
    bad = root / "b" / "solutions.json"
    bad.write_bytes(b'[{"id": "x", "v": NaN}]')
    code, _, err = run_cli(root, "optimize", "compress", "--age-days", "0", "--no-backup",
                           capsys=capsys)
    assert code == 3 and "b/solutions.json" in err
    assert bad.read_bytes() == b'[{"id": "x", "v": NaN}]'
    assert (root / "b" / "patterns.json").read_bytes()[:2] == b"\x1f\x8b"


def test_compress_crash_leaves_files_intact_and_rerun_completes(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a",))
    original = tree_digest(root)
    calls = []
    real = os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(aml.os, "replace", flaky)
    with pytest.raises(OSError):
        aml.transcode_store(aml.Store(root), True, age_days=0, workers=1)
    monkeypatch.undo()
    for rel, digest in original.items():
        path = root / rel
        assert hashlib.sha256(plain_bytes(path)).hexdigest() == digest or \
            hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not [p for p in root.rglob("*") if aml.is_temp_leftover(p.name)]
    result = aml.transcode_store(aml.Store(root), True, age_days=0, workers=1)
    assert len(result.files) + len(result.skipped_done) == 5


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("action", ["compress", "decompress", "gc", "index", "warm-cache", "all"])
def test_optimize_dry_runs_change_nothing(tmp_path, capsys, gz, action):
    root = build_store(tmp_path / "m", gz=gz)
    seed_defects(root)
    age_files(root, 90)
    before = tree_digest(root)
    code, out, _ = run_cli(root, "optimize", action, "--dry-run", "--age-days", "0",
                           capsys=capsys)
    assert code == 0 and tree_digest(root) == before
    if action in ("gc", "all"):
        assert "would remove 7 records" in out


def seed_defects(root):
    """One record of each gc defect class in backend-developer; returns the expected reasons."""
    rng = random.Random(11)
    folder = root / "backend-developer"
    gz = (folder / "patterns.json").read_bytes()[:2] == b"\x1f\x8b"
    patterns = read_data(folder / "patterns.json")
    no_id = make_pattern("backend-developer", rng)
    del no_id["id"]
    old, new = patterns[0], dict(patterns[0], tags=["newer"])
    old["evolution"] = dict(old["evolution"], lastUsed="2026-01-01T00:00:00.000Z")
    new["evolution"] = dict(new["evolution"], lastUsed="2026-11-01T00:00:00.000Z")
    patterns[0] = old
    patterns += [no_id, dict(make_pattern("backend-developer", rng), agent=""),
                 dict(make_pattern("backend-developer", rng), timestamp="sometime"),
                 {k: v for k, v in make_pattern("backend-developer", rng).items()
                  if k != "pattern"},
                 "not a record", dict(patterns[5]), new]
    write_data(folder / "patterns.json", patterns, gz)
    return {"missing_id": 1, "missing_agent": 1, "missing_timestamp": 1, "missing_body": 1,
            "not_an_object": 1, "duplicate": 1, "id_conflict": 1}


def test_gc_removes_exactly_each_defect_class_and_archives_it(store, capsys, monkeypatch):
    expected = seed_defects(store)
    path = store / "backend-developer" / "patterns.json"
    seeded = read_data(path)
    backups = []
    monkeypatch.setattr(aml, "safety_backup", lambda s, reason, config=None:
                        backups.append(tree_digest(store, skip_state=True)) or "snap-1")
    before = tree_digest(store, skip_state=True)
    code, out, _ = run_cli(store, "optimize", "gc", "--format", "json", capsys=capsys)
    gc = json.loads(out)["steps"]["gc"]
    assert code == 0 and gc["by_reason"] == expected and gc["backup_id"] == "snap-1"
    assert backups == [before]
    kept = read_data(path)
    assert kept == seeded[1:40] + [seeded[-1]]       # the older id twin and the seven defects go
    archive = aml.Archive(aml.Store(store)).load(gc["run_id"])
    assert sorted(e["reason"] for e in archive["entries"]) == sorted(expected)
    conflict = next(e for e in archive["entries"] if e["reason"] == "id_conflict")
    assert conflict["record"] == seeded[0] and conflict["details"]["kept_index"] == 46
    assert all(e["file"] == "backend-developer/patterns.json" and e["agent"] ==
               "backend-developer" for e in archive["entries"])
    assert {e["index"] for e in archive["entries"]} == {0, 40, 41, 42, 43, 44, 45}
    others = {k: v for k, v in before.items() if "backend-developer/patterns" not in k}
    assert {k: v for k, v in tree_digest(store, skip_state=True).items() if k in others} == others


def test_gc_crash_midway_leaves_files_whole_and_rerun_finishes(store, monkeypatch):
    seed_defects(store)
    path = store / "code-reviewer" / "solutions.json"
    write_data(path, read_data(path) + [read_data(path)[0]],
               gz=path.read_bytes()[:2] == b"\x1f\x8b")
    calls, real = [], os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 3:   # archive, first data file, then the second data file fails
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(aml.os, "replace", flaky)
    with pytest.raises(OSError):
        aml.collect_garbage(aml.Store(store))
    monkeypatch.undo()
    assert len(read_data(store / "backend-developer" / "patterns.json")) == 40
    assert len(read_data(path)) == 16                 # untouched: its rewrite failed
    assert not [p for p in store.rglob("*") if aml.is_temp_leftover(p.name)]
    assert not list(store.rglob("*.json.lock"))
    result = aml.collect_garbage(aml.Store(store))
    assert result.by_reason == {"duplicate": 1} and len(read_data(path)) == 15


def test_gc_keeps_same_id_in_two_agents(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2"))
    twin = dict(read_data(root / "a1" / "patterns.json")[0], agent="a2")
    write_data(root / "a2" / "patterns.json", read_data(root / "a2" / "patterns.json") + [twin])
    before = tree_digest(root)
    code, out, _ = run_cli(root, "optimize", "gc", "--no-backup", capsys=capsys)
    assert code == 0 and "remove 0 records" in out
    assert {k: v for k, v in tree_digest(root).items() if not k.startswith(".aml")} == before


def test_gc_mass_deletion_guard(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a", "b"), patterns=3, solutions=1, decisions=1)
    path = root / "a" / "patterns.json"
    write_data(path, [dict(r, timestamp=None) for r in read_data(path)])
    before = tree_digest(root)
    assert run_cli(root, "optimize", "gc", "--dry-run", capsys=capsys)[0] == 4
    code, _, err = run_cli(root, "optimize", "gc", "--no-backup", capsys=capsys)
    assert code == 4 and "--force" in err and "a" in err
    assert {k: v for k, v in tree_digest(root).items() if not k.startswith(".aml")} == before
    assert run_cli(root, "optimize", "gc", "--no-backup", "--force", capsys=capsys)[0] == 0
    assert read_data(path) == []


def test_gc_refuses_when_backup_fails_and_skips_unparseable(store, capsys):
    seed_defects(store)
    (store / "code-reviewer" / "decisions.json").write_bytes(b"[1,")
    before = tree_digest(store)
    code, _, err = run_cli(store, "optimize", "gc", capsys=capsys)   # the stub backup refuses
    assert code == 4 and "backup" in err
    assert {k: v for k, v in tree_digest(store).items() if not k.startswith(".aml")} == before
    code, _, err = run_cli(store, "optimize", "gc", "--no-backup", capsys=capsys)
    assert code == 3 and "code-reviewer/decisions.json" in err
    assert (store / "code-reviewer" / "decisions.json").read_bytes() == b"[1,"


def test_gc_cleans_stale_locks_temp_files_and_orphaned_index(store, capsys):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    stale = store / "code-reviewer" / "patterns.json.lock"
    fresh = store / "test-automator" / "patterns.json.lock"
    busy = store / "backend-developer" / "solutions.json.lock"
    for lock in (stale, fresh, busy):
        lock.mkdir()
    (busy / "owner").write_text("pid")
    for lock in (stale, busy):
        os.utime(lock, (0, 0))
    temp = store / "code-reviewer" / ".solutions.json.aml-tmp-1-abcd"
    temp.write_text("half")
    stray = s.state_dir / "index" / "ids-07.bin"
    stray.write_bytes(b"old format")
    (store / "test-automator" / "decisions.json").unlink()
    code, out, _ = run_cli(store, "optimize", "gc", "--no-backup", "--format", "json",
                           capsys=capsys)
    gc = json.loads(out)["steps"]["gc"]
    assert code == 0 and gc["stale_locks"] == ["code-reviewer/patterns.json.lock"]
    assert not stale.exists() and fresh.is_dir() and busy.is_dir() and not temp.exists()
    assert not stray.exists() and "test-automator/decisions.json" in gc["orphaned_state"]
    assert aml.MemoryIndex(s).stale_files() == []


def test_optimize_all_runs_every_step_in_order(store, capsys):
    age_files(store, 60)
    code, out, _ = run_cli(store, "optimize", "all", "--no-backup", "--now", NOW_TEXT,
                           capsys=capsys)
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "gc", "gc", "compress", "index", "warm-cache"]
    s = aml.Store(store)
    assert aml.MemoryIndex(s).stale_files() == []
    history = [e["operation"] for e in s.read_state("history.json")]
    assert history == ["gc", "compress", "index", "warm-cache"]
    assert run_cli(store, "optimize", "build-index", "-q", capsys=capsys) == (0, "", "")


# =============================================================================
# 13. Migration
# =============================================================================


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
