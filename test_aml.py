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

def backup_manager(root, **config):
    """A BackupManager on a store, its clock at NOW unless ``now`` is given."""
    now = config.pop("now", NOW)
    return aml.BackupManager(aml.Store(root, now=now), aml.BackupConfig(**config))


def content_digest(root):
    """{path: (is gzip, decoded JSON or raw bytes)} of a store without aml's state."""
    out = {}
    for rel in tree_digest(root, skip_state=True):
        raw = (Path(root) / rel).read_bytes()
        try:
            out[rel] = (raw[:2] == b"\x1f\x8b", read_data(Path(root) / rel))
        except ValueError:
            out[rel] = (False, raw)
    return out


def mutate_store(root):
    """What happens to a store between a backup and a restore: prune, edit, add, delete."""
    root = Path(root)
    for name, change in (("code-reviewer/patterns.json", lambda r: r[7:]),
                         ("test-automator/solutions.json",
                          lambda r: [dict(r[0], verifiedCount=99)] + r[1:])):
        path = root / name
        zipped = path.read_bytes()[:2] == b"\x1f\x8b"
        write_data(path, change(read_data(path)), gz=zipped)
    write_data(root / "new-agent" / "patterns.json", [make_pattern("new-agent", random.Random(2))])
    (root / "backend-developer" / "context.json").unlink()


def repo_bytes(manager):
    return sum(p.stat().st_size for p in manager.repo.rglob("*") if p.is_file())


@pytest.mark.parametrize("gz", [False, True, "mixed"], ids=["plain", "gzip", "mixed"])
def test_round_trip_restores_the_snapshot_exactly(tmp_path, gz):
    root = build_store(tmp_path / "memory", gz=gz)
    before, before_content = tree_digest(root), content_digest(root)
    snap = backup_manager(root).create(aml.BackupType.FULL)
    assert snap.verified and snap.files == len(before)
    mutate_store(root)
    result = backup_manager(root).restore(snap.backup_id)
    assert result.removed == ["new-agent/patterns.json"]
    assert result.created == ["backend-developer/context.json"] and result.safety_backup
    assert content_digest(root) == before_content          # gzip stays gzip, same content
    plain = {k: v for k, v in before.items() if not before_content[k][0]}
    assert {k: v for k, v in tree_digest(root, skip_state=True).items() if k in plain} == plain
    assert set(tree_digest(root, skip_state=True)) == set(before)
    assert not (root / "new-agent").exists()


def test_restore_is_byte_exact_for_hand_formatted_files(tmp_path):
    root = build_store(tmp_path / "memory")
    odd = root / "code-reviewer" / "decisions.json"
    odd.write_bytes(b'\xef\xbb\xbf[ {"id": "a"},{"id":"b"} ,\n\t{"id": "c"}]\n\n')
    (root / "code-reviewer" / "notes.json").write_bytes(b'{"x": [1, 2]}')
    before = tree_digest(root)
    snap = backup_manager(root).create()
    odd.write_bytes(b"[]")
    backup_manager(root).restore(snap.backup_id)
    assert tree_digest(root, skip_state=True) == before


def test_unparseable_file_is_backed_up_as_bytes_and_reported(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    bad = root / "code-reviewer" / "patterns.json"
    bad.write_bytes(b'[{"id": "a"},')
    code, out, err = run_cli(root, "backup", "create", capsys=capsys)
    assert code == 3 and "not valid JSON" in err and str(bad) in err
    snap = backup_manager(root).list().snapshots[-1].backup_id
    bad.write_bytes(b"[]")
    assert run_cli(root, "backup", "restore", snap, "-q") == 0
    assert bad.read_bytes() == b'[{"id": "a"},'
    assert run_cli(root, "backup", "verify", snap, "--deep", "-q") == 0


def test_unchanged_records_cost_nothing_even_when_gzip_is_rewritten(tmp_path):
    root = build_store(tmp_path / "memory", gz=True, patterns=200)
    first = backup_manager(root).create()
    path = root / "code-reviewer" / "patterns.json"
    records = read_data(path)
    records[3]["metrics"]["executionCount"] += 1
    records[150]["tags"] = ["changed"]
    write_data(path, records, gz=True)                     # the runtime rewrites it all
    second = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    assert second.files_reread == 1
    assert second.objects_added == 3                        # two records + one list delta
    assert second.bytes_added < first.bytes_added / 20


def test_incremental_trusts_unchanged_files_and_full_rereads(tmp_path):
    root = build_store(tmp_path / "memory")
    backup_manager(root).create()
    incr = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    full = backup_manager(root).create(aml.BackupType.FULL)
    assert incr.type is aml.BackupType.INCREMENTAL and incr.files_reread == 0
    assert full.files_reread == full.files and full.objects_added == 0
    assert incr.files == full.files and incr.records == full.records


def test_every_snapshot_restores_on_its_own(tmp_path):
    root = build_store(tmp_path / "memory", gz="mixed")
    first = backup_manager(root).create()
    mutate_store(root)
    expected = content_digest(root)
    second = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    manager = backup_manager(root, retention_days=0, max_backups=1)
    assert manager.rotate().deleted == [first.backup_id]
    assert manager.verify(second.backup_id, deep=True).ok
    target = tmp_path / "elsewhere"
    backup_manager(root).restore(second.backup_id, target=target)
    assert content_digest(target) == expected


def test_agents_created_after_the_last_backup_are_included(tmp_path):
    root = build_store(tmp_path / "memory")
    backup_manager(root).create()
    late = [make_decision("late-agent", random.Random(1))]
    write_data(root / "late-agent" / "decisions.json", late)
    snap = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    paths = [e["path"] for e in backup_manager(root).load_manifest(snap.backup_id)["files"]]
    assert "late-agent/decisions.json" in paths


def test_derived_state_locks_and_temp_files_are_not_backed_up(tmp_path):
    root = build_store(tmp_path / "memory")
    store = aml.Store(root, now=NOW)
    aml.Archive(store).save("prune_x", "prune", [{"record": {"id": "r"}}])
    (root / ".aml" / "index").mkdir()
    (root / ".aml" / "index" / "records.json").write_text("{}")
    (root / "code-reviewer" / ".patterns.json.aml-tmp-1-ab").write_text("half")
    (root / "code-reviewer" / "ghost.json.lock").mkdir()      # a runtime lock of another file
    snap = backup_manager(root).create()
    paths = {e["path"] for e in backup_manager(root).load_manifest(snap.backup_id)["files"]}
    assert ".aml/archive/prune_x.json" in paths and "config.json" in paths
    assert "global/shared.json" in paths
    assert not [p for p in paths if "index" in p or "lock" in p or "tmp" in p]


# -- crash safety -------------------------------------------------------------

def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("step", ["objects", "index", "manifest"])
def test_crash_during_backup_leaves_nothing_visible(tmp_path, monkeypatch, step):
    root = build_store(tmp_path / "memory", gz="mixed")
    first = backup_manager(root).create()
    mutate_store(root)
    store_before = tree_digest(root, skip_state=True)
    target = {"objects": (aml._PackWriter, "_write_oldest"),
              "index": (aml, "_encode_index"), "manifest": (aml, "_write_manifest")}[step]
    monkeypatch.setattr(*target, _boom)
    with pytest.raises(OSError):
        backup_manager(root).create(aml.BackupType.INCREMENTAL)
    monkeypatch.undo()
    manager = backup_manager(root)
    assert manager.snapshot_ids() == [first.backup_id]
    assert tree_digest(root, skip_state=True) == store_before
    assert manager.verify(first.backup_id, deep=True).ok
    second = manager.create(aml.BackupType.INCREMENTAL)
    assert not [p for p in manager.packs.glob("*.pack") if not p.with_suffix(".idx").exists()]
    assert manager.verify(all_snapshots=True, deep=True).ok and second.verified


def test_crash_mid_restore_keeps_files_whole_and_rerun_completes(tmp_path, monkeypatch):
    root = build_store(tmp_path / "memory", gz=True)
    snap = backup_manager(root).create()
    expected = content_digest(root)
    for agent in ("backend-developer", "code-reviewer", "test-automator"):
        path = root / agent / "patterns.json"
        write_data(path, read_data(path)[:3], gz=True)
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(aml.os, "replace", flaky)
    with pytest.raises(OSError):
        backup_manager(root).restore(snap.backup_id)
    monkeypatch.undo()
    for rel in tree_digest(root, skip_state=True):
        read_data(root / rel)                               # every file is whole
    assert backup_manager(root).verify(all_snapshots=True).ok
    backup_manager(root).restore(snap.backup_id)
    assert content_digest(root) == expected
    assert not list((root / ".aml").glob("restore-*"))


# -- corruption and hostile input -------------------------------------------

def _corrupt(manager, how):
    pack = sorted(manager.packs.glob("*.pack"))[0]
    data = bytearray(pack.read_bytes())
    if how == "truncated":
        pack.write_bytes(bytes(data[:len(data) // 2]))
    elif how == "flipped":
        data[len(data) // 2] ^= 0x01
        pack.write_bytes(bytes(data))
    elif how == "missing":
        pack.with_suffix(".idx").unlink()
        pack.unlink()
    else:
        path = manager.manifest_path(manager.snapshot_ids()[-1])
        doc = json.loads(gzip.decompress(path.read_bytes()))
        doc["payload"]["files"][0]["size"] += 1
        path.write_bytes(gzip.compress(json.dumps(doc).encode()))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing", "manifest"])
def test_corrupt_backup_is_detected_and_never_restored(tmp_path, capsys, how):
    root = build_store(tmp_path / "memory", gz="mixed")
    snap = backup_manager(root, verify_after_backup=False).create()
    mutate_store(root)
    _corrupt(backup_manager(root), how)
    code, _, err = run_cli(root, "backup", "verify", snap.backup_id, capsys=capsys)
    assert code == 6 and snap.backup_id in err
    assert ("checksum" in err or "missing" in err or "unreadable" in err)
    before = tree_digest(root)
    code, _, err = run_cli(root, "backup", "restore", snap.backup_id, capsys=capsys)
    assert code == 6 and err.startswith("aml: error:")
    assert tree_digest(root) == before


@pytest.mark.parametrize("bad_path", ["../escape.json", "/tmp/abs.json", "a/../../x.json",
                                      ".aml/config.json"])
def test_hostile_manifest_writes_nothing_outside(tmp_path, bad_path):
    root = build_store(tmp_path / "memory")
    manager = backup_manager(root)
    snap = manager.create()
    path = manager.manifest_path(snap.backup_id)
    payload = manager.load_manifest(snap.backup_id)
    payload["files"][0]["path"] = bad_path
    aml._write_manifest(path, payload)
    outside = tree_digest(tmp_path)
    target = tmp_path / "restored"
    with pytest.raises(aml.IntegrityError, match="path"):
        backup_manager(root).restore(snap.backup_id, target=target)
    assert tree_digest(tmp_path) == outside and not target.exists()


def test_symlink_in_target_is_refused(tmp_path):
    root = build_store(tmp_path / "memory")
    snap = backup_manager(root).create()
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "restored"
    target.mkdir()
    (target / "code-reviewer").symlink_to(outside)
    with pytest.raises(aml.RefusedError, match="symlink"):
        backup_manager(root).restore(snap.backup_id, target=target, force=True)
    assert list(outside.iterdir()) == []
    linked = tmp_path / "linked-store"
    linked.symlink_to(root)                       # the store's own path may be a symlink
    write_data(root / "global" / "shared.json", {"changed": True})
    backup_manager(linked).restore(snap.backup_id)
    assert read_data(root / "global" / "shared.json") == {"notes": ["kept"]}


def test_restore_waits_for_the_runtime_lock_and_refuses_without_a_full_safety_copy(tmp_path):
    root, snap, _, mutated = snapshot_then_mutate(tmp_path)
    busy = root / "code-reviewer" / "patterns.json"
    Path(str(busy) + ".lock").mkdir()                         # the runtime holds it
    manager = aml.BackupManager(aml.Store(root, now=NOW, lock_timeout=0.2))
    with pytest.raises(aml.RefusedError, match="code-reviewer/patterns.json"):
        manager.restore(snap.backup_id)
    assert tree_digest(root, skip_state=True) == mutated    # the lock is an empty folder


def test_restore_dry_run_changes_nothing(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    snap = backup_manager(root).create()
    mutate_store(root)
    before, repo_before = tree_digest(root), tree_digest(tmp_path / "memory-backup")
    code, out, _ = run_cli(root, "backup", "restore", snap.backup_id, "--dry-run",
                           capsys=capsys)
    assert code == 0 and "would remove new-agent/patterns.json" in out
    assert "would replace code-reviewer/patterns.json" in out
    assert tree_digest(root) == before
    assert tree_digest(tmp_path / "memory-backup") == repo_before


def snapshot_then_mutate(tmp_path):
    """A store, its snapshot, and the tree digests at the snapshot and after mutate_store."""
    root = build_store(tmp_path / "memory")
    snap = backup_manager(root).create()
    at_snapshot = tree_digest(root, skip_state=True)
    mutate_store(root)
    return root, snap, at_snapshot, tree_digest(root, skip_state=True)


def test_restore_target_leaves_store_alone_and_needs_force_when_not_empty(tmp_path):
    root, snap, expected, before = snapshot_then_mutate(tmp_path)
    target = tmp_path / "copy"
    backup_manager(root).restore(snap.backup_id, target=target)
    assert tree_digest(target) == expected and tree_digest(root, skip_state=True) == before
    (target / "stray.json").write_text("{}")
    with pytest.raises(aml.RefusedError, match="--force"):
        backup_manager(root).restore(snap.backup_id, target=target)
    result = backup_manager(root).restore(snap.backup_id, target=target, force=True)
    assert result.removed == ["stray.json"] and result.safety_backup is None


def test_restore_agents_restores_only_those(tmp_path):
    root, snap, original, after_mutation = snapshot_then_mutate(tmp_path)
    backup_manager(root).restore(snap.backup_id, agents=["code-reviewer"])
    now = tree_digest(root, skip_state=True)
    assert now["code-reviewer/patterns.json"] == original["code-reviewer/patterns.json"]
    assert now["test-automator/solutions.json"] == after_mutation["test-automator/solutions.json"]
    assert "new-agent/patterns.json" in now and "backend-developer/context.json" not in now


def test_restore_at_picks_newest_snapshot_not_after_the_time(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    ids = []
    for day in (1, 2, 3):
        write_data(root / "global" / "shared.json", {"day": day})
        ids.append(backup_manager(root, now=NOW + dt.timedelta(days=day)).create().backup_id)
    code, out, _ = run_cli(root, "backup", "restore", "--at", "2026-11-22T23:00:00Z", "-q",
                           capsys=capsys)
    assert code == 0 and read_data(root / "global" / "shared.json") == {"day": 2}
    with pytest.raises(aml.UsageError):
        backup_manager(root).restore(at=NOW)


def test_two_backups_in_the_same_second_get_distinct_sortable_ids(tmp_path):
    root = build_store(tmp_path / "memory")
    ids = [backup_manager(root).create(t).backup_id
           for t in (aml.BackupType.FULL, aml.BackupType.INCREMENTAL, aml.BackupType.FULL)]
    assert ids == ["full_20261120_120000", "incr_20261120_120000_2", "full_20261120_120000_3"]
    assert backup_manager(root).snapshot_ids() == ids


# -- rotation, auto, list, config -------------------------------------------

def test_rotation_keeps_remaining_snapshots_whole_and_frees_space(tmp_path, capsys):
    root = build_store(tmp_path / "memory", gz="mixed")
    for day in range(6):
        path = root / "code-reviewer" / "patterns.json"
        write_data(path, [make_pattern("code-reviewer", random.Random(day)) for _ in range(40)])
        backup_manager(root, now=NOW + dt.timedelta(days=day)).create()
    manager = backup_manager(root, now=NOW + dt.timedelta(days=5), retention_days=2)
    preview = manager.rotate(dry_run=True)
    size = repo_bytes(manager)
    assert len(preview.deleted) == 3 and repo_bytes(manager) == size
    result = manager.rotate()
    assert result.deleted == preview.deleted and result.bytes_freed > 0
    assert repo_bytes(manager) < size
    assert manager.verify(all_snapshots=True, deep=True).ok


def _daily_snapshots(root, days, **config):
    """One snapshot a day, each after rewriting code-reviewer's patterns with a changed record."""
    path = root / "code-reviewer" / "patterns.json"
    for day in range(days):
        records = read_data(path)
        records[day % len(records)]["metrics"]["executionCount"] = 1000 + day
        write_data(path, records, gz=True)
        backup_manager(root, now=NOW + dt.timedelta(days=day), **config).create()


def test_crash_during_rotation_loses_nothing(tmp_path, monkeypatch):
    root = build_store(tmp_path / "memory", gz=True)
    _daily_snapshots(root, 4)
    manager = backup_manager(root, now=NOW + dt.timedelta(days=40), max_backups=1,
                             retention_days=0)
    monkeypatch.setattr(aml, "PACK_REWRITE_DEAD_SHARE", 0.0)   # rewrite every partly-dead pack
    monkeypatch.setattr(aml._GarbageCollector, "_delete", _boom)  # crash after the new pack
    packs = len(list(manager.packs.glob("*.idx")))
    with pytest.raises(OSError):
        manager.rotate()
    monkeypatch.undo()
    assert len(list(manager.packs.glob("*.idx"))) == packs + 1   # rewritten copy committed
    assert manager.verify(all_snapshots=True, deep=True).ok
    manager.rotate()
    assert manager.verify(all_snapshots=True, deep=True).ok and len(manager.snapshot_ids()) == 1


def test_item_list_delta_chains_are_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(aml, "MAX_DELTA_DEPTH", 2)
    root = build_store(tmp_path / "memory", gz=True)
    _daily_snapshots(root, 5)
    manager = backup_manager(root)
    depths = [next(e["depth"] for e in manager.load_manifest(i)["files"]
                   if e["path"] == "code-reviewer/patterns.json") for i in manager.snapshot_ids()]
    assert depths == [0, 1, 2, 0, 1]
    assert manager.verify(all_snapshots=True, deep=True).ok


def test_rotation_calendar_rules_and_max_backups(tmp_path):
    root = build_store(tmp_path / "memory", patterns=5)
    for day in range(0, 60, 3):
        backup_manager(root, now=NOW + dt.timedelta(days=day)).create()
    manager = backup_manager(root, now=NOW + dt.timedelta(days=60), retention_days=7)
    ids = manager.snapshot_ids()
    kept = manager.retained(ids, keep_weekly=4, keep_monthly=3)
    assert ids[-1] in kept and len(kept) < len(ids)
    assert len({aml._id_time(i).isocalendar()[:2] for i in kept}) >= 4
    assert manager.retained(ids) == ids[-2:]                 # days 54 and 57 of 60
    assert backup_manager(root, max_backups=3).retained(ids) == ids[-3:]


def test_rotation_never_deletes_the_newest_verified_snapshot(tmp_path):
    root = build_store(tmp_path / "memory", patterns=5)
    good = backup_manager(root).create().backup_id
    later = backup_manager(root, now=NOW + dt.timedelta(days=1),
                           verify_after_backup=False).create().backup_id
    manager = backup_manager(root, now=NOW + dt.timedelta(days=90), max_backups=1)
    assert manager.newest_verified() == good
    assert manager.rotate().kept == [good, later]


def test_auto_follows_the_schedule(tmp_path):
    root = build_store(tmp_path / "memory", patterns=5)
    backup_manager(root).create(agents=["code-reviewer"])   # does not count as the store's
    first = backup_manager(root).auto()
    assert first.backup.type is aml.BackupType.FULL
    again = backup_manager(root, now=NOW + dt.timedelta(hours=2)).auto()
    assert again.backup is None and "recent" in again.skipped
    day = backup_manager(root, now=NOW + dt.timedelta(days=1)).auto()
    assert day.backup.type is aml.BackupType.INCREMENTAL and day.backup.verified
    week = backup_manager(root, now=NOW + dt.timedelta(days=7)).auto()
    assert week.backup.type is aml.BackupType.FULL
    weekly = backup_manager(root, now=NOW + dt.timedelta(days=9), backup_schedule="weekly")
    assert weekly.auto().backup is None


def test_config_fields_have_effects(tmp_path):
    root = build_store(tmp_path / "memory")
    plain = backup_manager(root, backup_root=tmp_path / "a", compression_level=0).create()
    packed = backup_manager(root, backup_root=tmp_path / "b", compression_level=9).create()
    assert plain.bytes_added > 2 * packed.bytes_added
    assert plain.manifest.parent.parent.parent == tmp_path / "a"
    off = backup_manager(root, backup_root=tmp_path / "b", incremental_enabled=False,
                         verify_after_backup=False).create(aml.BackupType.INCREMENTAL)
    assert off.type is aml.BackupType.FULL and not off.verified
    with pytest.raises(aml.UsageError):
        backup_manager(root, backup_schedule="sometimes")


def test_config_file_section_moves_the_backup_root(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text('{"backup": {"backup_root": "vault"}}')
    assert run_cli(root, "backup", "create", "-q") == 0
    assert len(list((tmp_path / "vault" / "aml" / "snapshots").iterdir())) == 1
    code, out, _ = run_cli(root, "backup", "list", "--backup-root", tmp_path / "none",
                           capsys=capsys)
    assert code == 0 and "0 snapshots" in out


def test_backup_root_inside_the_store_is_refused(tmp_path):
    root = build_store(tmp_path / "memory")
    with pytest.raises(aml.UsageError, match="inside the store"):
        backup_manager(root, backup_root=root / "backups")


def test_foreign_backups_are_left_alone_and_permissions_are_private(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    backups = tmp_path / "memory-backup"
    backups.mkdir()
    foreign = backups / "backup-1732500000000-abc.tar.gz"
    foreign.write_bytes(b"runtime's own")
    (backups / "backup-1732500000000-abc.meta.json").write_text("{}")
    manager = backup_manager(root)
    manager.create()
    manager.rotate()
    code, out, _ = run_cli(root, "backup", "list", capsys=capsys)
    assert code == 0 and "foreign" in out and foreign.name in out
    assert foreign.read_bytes() == b"runtime's own"
    for path in manager.repo.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), path
    assert manager.repo.stat().st_mode & 0o777 == 0o700


def test_history_entries_follow_the_contract(tmp_path):
    root = build_store(tmp_path / "memory")
    snap = backup_manager(root).create()
    store = aml.Store(root)
    entry = store.last_operation("backup")["summary"]
    assert entry["backup_id"] == snap.backup_id and entry["verified"] is True
    assert entry["type"] == "full" and Path(entry["manifest"]).exists()
    assert entry["files"] == snap.files and entry["bytes_added"] == snap.bytes_added
    assert store.last_operation("verify")["summary"] == {"backup_id": snap.backup_id, "ok": True,
                                                        "deep": False}


def test_safety_backup_returns_a_verified_id_or_refuses(tmp_path):
    root = build_store(tmp_path / "memory")
    store = aml.Store(root, now=NOW)
    first = aml.safety_backup(store, "prune")
    second = aml.safety_backup(store, "prune")
    assert first.startswith("full_") and second.startswith("incr_")
    assert backup_manager(root).load_manifest(second)["reason"] == "prune"
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the backup folder should be")
    with pytest.raises(aml.RefusedError, match="--no-backup"):
        aml.safety_backup(store, "prune", aml.BackupConfig(backup_root=blocker))


def test_cli_original_spellings_and_json(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    assert run_cli(root, "backup", "full", "-q", "--now", "2026-11-20T00:00:00Z") == 0
    assert run_cli(root, "backup", "incremental", "-q", "--now", "2026-11-21T00:00:00Z") == 0
    code, out, _ = run_cli(root, "backup", "list", "--format", "json", capsys=capsys)
    ids = [s["backup_id"] for s in json.loads(out)["snapshots"]]
    assert code == 0 and ids[0].startswith("full_") and ids[1].startswith("incr_")
    code, out, _ = run_cli(root, "backup", "verify", ids[0], "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    assert run_cli(root, "backup", "restore", "--backup-id", ids[0], "-q") == 0
    code, out, _ = run_cli(root, "backup", "verify", "--all", "--deep", capsys=capsys)
    assert code == 0 and "OK" in out
    code, _, err = run_cli(root, "backup", "restore", "full_20200101_000000", capsys=capsys)
    assert code == 2 and "no backup" in err
    code, out, err = run_cli(root, "backup", "auto", "-q", "--now", "2026-11-22T02:00:00Z",
                             capsys=capsys)
    assert code == 0 and out == "" and err == ""


def test_cron_line_runs_quietly_and_fails_loudly(tmp_path):
    root = build_store(tmp_path / "memory", patterns=5)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    argv = [sys.executable, str(HERE / "aml.py"), str(root), "backup", "auto", "-q"]
    done = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    pack = next((tmp_path / "memory-backup" / "aml" / "packs").glob("*.pack"))
    pack.write_bytes(pack.read_bytes()[:40])
    argv[-2:] = ["verify", "--all"]
    done = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert done.returncode == 6 and done.stderr.startswith("aml: error:")


@pytest.mark.parametrize("text", ['[{"a": 1}, {"b": [2, 3]}]', '[\n  1,\n  "x"\n]\n', "[7]"])
def test_split_json_array_reassembles_exactly(text):
    head, sep, tail, spans = aml.split_json_array(text)
    assert head + sep.join(text[s:e] for s, e in spans) + tail == text


@pytest.mark.parametrize("text", ["[]", "{}", "[1,", "[1] x", "[1, 2 ,3]", "[NaN]"])
def test_split_json_array_refuses_what_it_cannot_split(text):
    assert aml.split_json_array(text) is None


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
# 16. Command line
# =============================================================================

def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        aml.main(["--version"])
    assert info.value.code == 0 and aml.__version__ in capsys.readouterr().out


def test_missing_store_is_usage_error(tmp_path, capsys):
    code, _, err = run_cli(tmp_path / "missing", "prune", capsys=capsys)
    assert code == 2 and err.startswith("aml: error:") and "does not exist" in err
