"""Tests for aml.py. Sections mirror aml.py's numbered sections.

Every store is generated in ``tmp_path`` by the factories below; nothing here reads
``../shared``. Run with ``make test``.
"""

import base64
import contextlib
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
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
    """Write a store file the way the runtime does (gzip bytes under .json, or plain).

    The gzip header carries no time, so two stores built from one seed are byte-identical.
    """
    text = json.dumps(obj, indent=2, ensure_ascii=False) + ("\n" if newline else "")
    data = text.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


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


def cron_env():
    """The environment cron gives a job (a minimal PATH), plus CI's calendar shift when set."""
    env = {"PATH": "/usr/bin:/bin"}
    for name in ("PYTHONPATH", "AML_CLOCK_SHIFT_DAYS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def run_cli(*argv, capsys=None):
    """Run aml.main in-process; returns (exit code, stdout, stderr) when capsys is given."""
    code = aml.main([str(a) for a in argv])
    if capsys is None:
        return code
    out, err = capsys.readouterr()
    return code, out, err


def fail_nth_replace(monkeypatch, n=2, counts=lambda dst: True, err=(5, "I/O error")):
    """Make the ``n``-th counted os.replace raise OSError(err): a crash between two writes."""
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        if counts(dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError(*err)
        return real_replace(src, dst)

    monkeypatch.setattr(aml.os, "replace", flaky)
    return calls


@contextlib.contextmanager
def held_by_other_process(state_dir):
    """Hold aml's maintenance lock on ``state_dir`` from another process (another aml run)."""
    code = ("import sys, aml; l = aml.MaintenanceLock(sys.argv[1], timeout=0); l.acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(state_dir)], cwd=str(HERE),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")


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


def _splice_records():
    """Records with nesting, non-ASCII text, escapes, floats and scalars, as the runtime has."""
    rng = random.Random(5)
    return [make_pattern("backend-developer", rng, note="caf\u00e9 \u2713 \"q\"\n\ttab"),
            {"id": "x", "nested": {"list": [1, 2.5, -0.0, 1e-07, None, True, {}, []]}},
            "a plain string", 42, make_pattern("code-reviewer", rng), [], {"emoji": "\U0001f600"}]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "bom"])
@pytest.mark.parametrize("newline", [False, True], ids=["", "newline"])
@pytest.mark.parametrize("positions", [{0}, {3}, {6}, {1, 4, 5}, set(range(7))],
                         ids=["first", "middle", "last", "several", "all"])
def test_remove_array_elements_is_byte_identical_to_encoding(tmp_path, gz, bom, newline,
                                                              positions):
    records = _splice_records()
    fmt = aml.FileFormat(gzip=gz, bom=bom, trailing_newline=newline)
    path = tmp_path / "patterns.json"
    path.write_bytes(aml.encode_json(records, fmt))   # a runtime-formatted file
    data, loaded_fmt, text = aml.load_json_text(path, expect=list)
    assert loaded_fmt == fmt and data == records
    kept = [r for i, r in enumerate(records) if i not in positions]
    spliced = aml.remove_array_elements(text, fmt, positions)
    assert spliced == aml.encode_json(kept, fmt)
    path.write_bytes(spliced)
    assert aml.load_json_file(path, expect=list) == (kept, fmt)


@pytest.mark.parametrize("text,positions", [
    ("[1, 2,3]", {0}),            # hand-edited: separators differ
    ("[]", set()),                # empty array
    ("[1, 2", {0}),               # invalid JSON
    ("[1, 2]", {2}),              # position out of range
    ("[1, 2]", {-1}),
])
def test_remove_array_elements_declines_what_it_cannot_splice(text, positions):
    assert aml.remove_array_elements(text, aml.FileFormat(), positions) is None


def test_remove_array_elements_keeps_a_compact_files_own_layout():
    assert aml.remove_array_elements('[{"a":1},{"b":2},3]', aml.FileFormat(), {1}) == \
        b'[{"a":1},3]'


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


def test_maintenance_lock_excludes_another_process(tmp_path):
    with held_by_other_process(tmp_path):
        with pytest.raises(aml.StoreBusyError):
            aml.MaintenanceLock(tmp_path, timeout=0).acquire()
    with aml.MaintenanceLock(tmp_path, timeout=0):
        pass


def test_maintenance_lock_is_reentrant_in_one_process(tmp_path):
    outer = aml.MaintenanceLock(tmp_path, timeout=0)
    with outer:
        with aml.MaintenanceLock(tmp_path, timeout=0):
            pass
        assert os.path.abspath(str(outer.path)) in aml.MaintenanceLock._held
    assert not aml.MaintenanceLock._held



# ---- issue 13: speed (gzip over every core, the indented writer) ----

def test_gzip_bytes_of_a_large_input_is_one_member_with_the_same_content():
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "retry", "backoff", "index", "\u00e9t\u00e9"]
    text = json.dumps([{"n": i, "w": " ".join(rng.choice(words) for _ in range(12))}
                       for i in range(90000)], indent=2, ensure_ascii=False).encode("utf-8")
    assert len(text) > aml.GZIP_PARALLEL_MIN
    packed = aml.gzip_bytes(text, mtime=1234)
    inflater = zlib.decompressobj(31)
    assert inflater.decompress(packed) == text and inflater.eof and not inflater.unused_data
    assert gzip.decompress(packed) == text and packed[4:8] == (1234).to_bytes(4, "little")
    # The chunks are primed with the window before them: the size stays that of one stream.
    assert len(packed) <= 1.01 * len(gzip.compress(text, 6, mtime=0))
    assert aml.gzip_bytes(b"[1]") == gzip.compress(b"[1]", 6, mtime=0)


class _Rate(float):
    """A float subclass: json.dumps writes it by float.__repr__ all the same."""


@pytest.mark.parametrize("value", [
    {}, [], [[], {}], {"a": [], "b": {}}, "s", 0, -1, 10 ** 30, 1.5, -0.0, 1e16, 1e-7, True,
    None, {"x": {"y": [1, 2.5, True, False, None, "\u00e9 \u2028 \" \\ \n \x01 \ud83d\ude00"]}},
    {"k": {"": ""}, "\u00e9": [[[1]]]}, (1, [2]), {"t": (1, 2)}, [_Rate(0.25)], {1: 2, "a": [3]},
    {True: 1, None: 2}, [float("nan")], {"k": {"z": float("inf")}}])
def test_indented_writer_gives_exactly_json_dumps_or_its_error(value):
    for pad in ("\n", "\n  ", "\n    "):
        try:
            expected = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                aml.indented_json(value, pad)
            continue
        assert aml.indented_json(value, pad) == expected.replace("\n", pad)


# ---- issue 14: one lock-wait routine and one staleness rule ----

import fcntl  # noqa: E402  (only the lock-wait tests need it)


class _FakeClock:
    """A monotonic clock that moves only when the injected sleep is called: no real waiting."""

    def __init__(self):
        self.t, self.sleeps = 100.0, []

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.sleeps.append(round(seconds, 6))
        self.t += seconds


def test_wait_for_lock_backs_off_up_to_the_deadline_and_never_past_it():
    clock = _FakeClock()
    assert not aml.wait_for_lock(lambda: False, 1.0, clock.sleep, clock)
    assert clock.sleeps == [0.05, 0.1, 0.2, 0.4, 0.25] and clock.t == 101.0
    clock = _FakeClock()
    assert not aml.wait_for_lock(lambda: False, 0, clock.sleep, clock) and clock.sleeps == []
    tries = iter([False, False, True])
    assert aml.wait_for_lock(lambda: next(tries), 60, clock.sleep, clock)
    assert clock.sleeps == [0.05, 0.1]
    clock = _FakeClock()
    assert not aml.wait_for_lock(lambda: False, 9, clock.sleep, clock)
    assert max(clock.sleeps) == 2.0 and sum(clock.sleeps) == pytest.approx(9)


def test_file_lock_waits_through_the_shared_routine_with_its_message(tmp_path):
    path = tmp_path / "patterns.json"
    path.write_bytes(b"[]")
    Path(str(path) + ".lock").mkdir()  # fresh: a runtime writer holds it
    clock, busy = _FakeClock(), set()
    with pytest.raises(aml.StoreBusyError, match=r"store busy: .*patterns\.json\.lock is locked "
                       r"by another process \(waited 5 s\)"):
        aml.FileLock(path, timeout=5, sleep=clock.sleep, busy=busy, clock=clock).acquire()
    assert sum(clock.sleeps) == pytest.approx(5) and busy == {str(path) + ".lock"}
    with pytest.raises(aml.StoreBusyError, match="not waited for again"):
        aml.FileLock(path, timeout=5, sleep=clock.sleep, busy=busy, clock=clock).acquire()


def test_maintenance_lock_waits_in_the_shared_routine_and_takes_a_freed_lock(tmp_path):
    holder = os.open(str(tmp_path / "maintenance.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts within this process too
    try:
        clock = _FakeClock()
        with pytest.raises(aml.StoreBusyError, match="store busy: another aml run holds"):
            aml.MaintenanceLock(tmp_path, timeout=1, sleep=clock.sleep, clock=clock).acquire()
        assert clock.sleeps == [0.2] * 5 and not aml.MaintenanceLock._held

        def release_then_sleep(seconds):
            fcntl.flock(holder, fcntl.LOCK_UN)
            clock.sleep(seconds)
        lock = aml.MaintenanceLock(tmp_path, timeout=60, sleep=release_then_sleep, clock=clock)
        assert lock.try_acquire()
        lock.release()
        fcntl.flock(holder, fcntl.LOCK_SH)  # a reader: shared locks go on, exclusive ones wait
        assert aml.flock_within(os.open(str(tmp_path / "maintenance.lock"), os.O_RDONLY),
                                fcntl.LOCK_SH, 0)
        assert not aml.MaintenanceLock(tmp_path, timeout=0).try_acquire()
    finally:
        os.close(holder)


def test_stale_lock_age_is_the_one_rule_at_a_fixed_now(tmp_path):
    now = 1_700_000_000.0
    def lock(name, age, inside=False):
        path = tmp_path / name
        path.mkdir()
        if inside:
            (path / "owner").write_text("pid")
        os.utime(path, (now - age, now - age))
        return path
    assert aml.stale_lock_age(lock("old.json.lock", 31), now) == pytest.approx(31)
    assert aml.stale_lock_age(lock("edge.json.lock", 30), now) is None  # "older than 30 s"
    assert aml.stale_lock_age(lock("held.json.lock", 3600, inside=True), now) is None
    (tmp_path / "link.json.lock").symlink_to(tmp_path / "old.json.lock")
    assert aml.stale_lock_age(tmp_path / "link.json.lock", now) is None
    (tmp_path / "file.json.lock").write_text("x")
    os.utime(tmp_path / "file.json.lock", (now - 3600, now - 3600))
    assert aml.stale_lock_age(tmp_path / "file.json.lock", now) is None
    assert aml.stale_lock_age(tmp_path / "gone.json.lock", now) is None
    assert aml.stale_lock_age(tmp_path / "old.json.lock", now - 60) is None  # fresh back then


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
    path.write_text(path.read_text().replace('"a":1', '"a":2'))
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


def _rewrite_both_ways(path, edit, monkeypatch):
    """File bytes after ``edit`` in Store.rewrite, spliced and (forced) re-encoded."""
    original = path.read_bytes()
    s = aml.Store(path.parent.parent)
    results = []
    for splice in (True, False):
        path.write_bytes(original)
        if not splice:
            monkeypatch.setattr(aml, "remove_array_elements", lambda *a: None)
        with s.rewrite(path) as job:
            edit(job)
        monkeypatch.undo()
        results.append(path.read_bytes())
    return results


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("bom,newline", [(False, False), (True, True)], ids=["", "bom+newline"])
@pytest.mark.parametrize("positions", [{0}, {20}, {39}, {0, 7, 39}, set(range(40))],
                         ids=["first", "middle", "last", "several", "all"])
def test_rewrite_splices_pure_deletions_byte_identically(tmp_path, monkeypatch, gz, bom,
                                                         newline, positions):
    root = build_store(tmp_path / "m", gz=gz)
    path = root / "code-reviewer" / "patterns.json"
    before = read_data(path)
    fmt = aml.FileFormat(gzip=gz, bom=bom, trailing_newline=newline)
    path.write_bytes(aml.encode_json(before, fmt))
    calls = []
    real = aml.remove_array_elements
    monkeypatch.setattr(aml, "remove_array_elements", lambda *a: calls.append(a) or real(*a))

    def delete(job):
        job.data = [r for i, r in enumerate(job.data) if i not in positions]
        job.changed, job.removed = True, set(positions)

    with aml.Store(root).rewrite(path) as job:
        delete(job)
    assert len(calls) == 1 and job.bytes_written == path.stat().st_size
    monkeypatch.undo()
    assert read_data(path) == [r for i, r in enumerate(before) if i not in positions]
    path.write_bytes(aml.encode_json(before, fmt))
    fast, slow = _rewrite_both_ways(path, delete, monkeypatch)
    assert fast == slow and aml.decode_file_bytes(path, fast)[1] == fmt


@pytest.mark.parametrize("tamper", ["edit", "reorder", "wrong-positions"])
def test_rewrite_reencodes_when_the_change_is_not_pure_deletion(tmp_path, monkeypatch, tamper):
    root = build_store(tmp_path / "m")
    path = root / "code-reviewer" / "patterns.json"
    before = read_data(path)

    def change(job):
        job.data = job.data[1:]
        if tamper == "edit":
            job.data[0] = dict(job.data[0], tags=["edited"])
        elif tamper == "reorder":
            job.data.reverse()
        job.changed, job.removed = True, ({1} if tamper == "wrong-positions" else {0})

    fast, slow = _rewrite_both_ways(path, change, monkeypatch)
    assert fast == slow
    expected = before[1:]
    if tamper == "edit":
        expected[0] = dict(expected[0], tags=["edited"])
    elif tamper == "reorder":
        expected.reverse()
    assert json.loads(fast) == expected


def test_rewrite_splice_failure_leaves_file_whole(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m")
    path = root / "code-reviewer" / "patterns.json"
    original, names = path.read_bytes(), sorted(os.listdir(path.parent))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aml.os, "replace", boom)
    with pytest.raises(OSError):
        with aml.Store(root).rewrite(path) as job:
            job.data, job.changed, job.removed = job.data[1:], True, {0}
    monkeypatch.undo()
    assert path.read_bytes() == original and sorted(os.listdir(path.parent)) == names


# ---- issue 11: every public constructor takes a Store or a path ----

STORE_TAKERS = ("Archive", "BackupManager", "MemoryIndex", "HotCache", "MemoryPruner",
                "GarbageCollector", "MigrationManager", "MemoryMonitor")


@pytest.mark.parametrize("name", STORE_TAKERS)
def test_public_constructors_take_a_path_or_a_store_and_reject_the_rest(tmp_path, name):
    root = build_store(tmp_path / "memory", agents=("alpha",), patterns=4, solutions=2,
                       decisions=2)
    cls = getattr(aml, name)
    assert name in aml.__all__
    for given in (str(root), root, aml.Store(root, now=NOW)):
        made = cls(given)
        store = made.index.store if name == "HotCache" else made.store
        assert isinstance(store, aml.Store) and store.root == root
    for wrong in (42, None, b"/tmp", ["memory"]):
        with pytest.raises(TypeError, match=r"%s\(\) takes a Store or a memory path" % name):
            cls(wrong)
    with pytest.raises(aml.UsageError):
        cls(str(tmp_path / "missing"))


def test_path_built_components_work_as_the_older_toolkit_used_them(tmp_path):
    root = build_store(tmp_path / "memory", agents=("alpha",), patterns=4, solutions=2,
                       decisions=2)
    assert aml.MemoryIndex(str(root)).refresh().records == 8
    assert aml.MemoryPruner(root, aml.PruneConfig()).plan().agents[0].records_before == 8
    assert sum(aml.MigrationManager(str(root)).detect().totals.values()) == 8
    assert aml.MemoryMonitor(root).metrics(save=False).totals["total"] == 8


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


def test_restore_warns_when_its_safety_backup_keeps_a_corrupt_file_as_bytes(tmp_path, capsys):
    root = build_store(tmp_path / "memory", gz="mixed")
    before = content_digest(root)
    snap = backup_manager(root).create()
    bad = root / "code-reviewer" / "patterns.json"
    bad.write_bytes(b'[{"id": "a"},')
    code, out, err = run_cli(root, "backup", "restore", snap.backup_id, "-q", capsys=capsys)
    safety = aml.Store(root).last_operation("restore")["summary"]["safety_backup"]
    assert code == 0 and "not valid JSON" in err and str(bad) in err and safety in err
    assert content_digest(root) == before
    # The safety snapshot holds exactly the bytes the restore replaced.
    backup_manager(root).restore(safety, agents=["code-reviewer"], target=tmp_path / "t")
    assert (tmp_path / "t" / "code-reviewer" / "patterns.json").read_bytes() == b'[{"id": "a"},'


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
    assert ".aml/archive/prune_x/part-0001.json.gz" in paths and "config.json" in paths
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
    fail_nth_replace(monkeypatch)
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
                           "--now", "2026-11-24T12:00:00Z", capsys=capsys)
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


def _rewrite_index_unsorted(idx):
    """Rewrite a pack index the way older aml wrote it: magic AMLIDX02, rows in any order."""
    import struct
    import zlib
    pack = aml._decode_index(idx, idx.read_bytes())
    rows = [pack.table[i:i + aml._ROW] for i in range(0, len(pack.table), aml._ROW)][::-1]
    payload = b"".join([struct.pack("<I", len(pack.blocks))]
                       + [struct.pack("<QII", *b) for b in pack.blocks]
                       + [struct.pack("<I", len(rows))] + rows)
    idx.write_bytes(b"AMLIDX02" + hashlib.sha256(payload).digest() + zlib.compress(payload))


def test_index_search_and_map_agree_and_older_unsorted_indexes_still_read(tmp_path,
                                                                          monkeypatch):
    root = build_store(tmp_path / "memory", gz="mixed")
    manager = backup_manager(root)
    snap = manager.create()
    expected = content_digest(root)
    keys = [k + bytes(20) for p in aml._ObjectStore(manager.packs).pack_list for k in p.keys()]
    probes = keys[:40] + [bytes(32), b"\xff" * 32]
    searched = aml._ObjectStore(manager.packs)          # few lookups: binary search
    assert [searched.has(k) for k in probes] == [True] * 40 + [False, False]
    assert searched._where is None
    monkeypatch.setattr(aml, "_PROBES_BEFORE_MAP", 0)  # every lookup through the map
    assert [aml._ObjectStore(manager.packs).has(k) for k in probes] == [True] * 40 + [False] * 2
    monkeypatch.undo()
    for idx in manager.packs.glob("*.idx"):
        _rewrite_index_unsorted(idx)
    mutate_store(root)
    older = backup_manager(root)
    assert older.verify(snap.backup_id, deep=True).ok
    assert older.create().objects_added < 10        # unchanged records found in the old index
    older.restore(snap.backup_id)
    assert content_digest(root) == expected


def test_verify_in_batches_names_every_snapshot_sharing_a_damaged_object(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(aml, "VERIFY_BATCH_OBJECTS", 7)
    root = build_store(tmp_path / "memory")
    first = backup_manager(root, verify_after_backup=False).create()
    second = backup_manager(root, verify_after_backup=False).create(aml.BackupType.FULL)
    one, both = backup_manager(root).verify(first.backup_id), \
        backup_manager(root).verify(all_snapshots=True)
    assert one.ok and both.ok and both.objects_checked == one.objects_checked > 7
    _corrupt(backup_manager(root), "flipped")
    result = backup_manager(root).verify(all_snapshots=True)
    assert not result.ok and result.failed == [first.backup_id, second.backup_id]


def test_corrupt_backup_restored_into_a_new_target_leaves_no_folder(tmp_path):
    root = build_store(tmp_path / "memory", gz="mixed")
    snap = backup_manager(root, verify_after_backup=False).create()
    _corrupt(backup_manager(root), "flipped")
    target = tmp_path / "copy"
    with pytest.raises(aml.IntegrityError):
        backup_manager(root).restore(snap.backup_id, target=target)
    assert not target.exists()


def test_stores_sharing_a_backup_root_never_touch_each_other(tmp_path):
    vault = tmp_path / "vault"
    one = build_store(tmp_path / "one" / "memory", gz=True, seed=1)
    two = build_store(tmp_path / "two" / "memory", gz=True, seed=2)
    _daily_snapshots(one, 3, backup_root=vault)
    theirs = backup_manager(two, backup_root=vault, now=NOW + dt.timedelta(days=5)).create()
    ours = backup_manager(one, backup_root=vault, now=NOW + dt.timedelta(days=60),
                          retention_days=1, max_backups=1)
    result = ours.rotate()
    assert len(result.deleted) == 2 and theirs.backup_id not in result.deleted
    assert ours.snapshot_at(NOW + dt.timedelta(days=10)) != theirs.backup_id
    assert ours.verify(all_snapshots=True, deep=True).ok
    assert ours.list().other_stores == 1


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


def test_relative_backup_root_library_is_taken_from_the_cwd_once(tmp_path, monkeypatch):
    root = build_store(tmp_path / "memory")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    manager = backup_manager(root, backup_root="vault")
    assert manager.root == tmp_path / "work" / "vault"
    monkeypatch.chdir(tmp_path)                       # a later chdir moves nothing
    manager.create()
    assert len(list((tmp_path / "work" / "vault" / "aml" / "snapshots").iterdir())) == 1
    assert not (tmp_path / "vault").exists()
    with pytest.raises(aml.UsageError, match="backup_root"):
        backup_manager(root, backup_root=5)


def test_relative_backup_root_in_config_is_beside_the_store_as_named(tmp_path, monkeypatch):
    real = build_store(tmp_path / "disk" / "memory")
    (tmp_path / "loom").mkdir()
    (tmp_path / "loom" / "memory").symlink_to(real)   # the store is reached through a link
    root = tmp_path / "loom" / "memory"
    (real / ".aml").mkdir()
    (real / ".aml" / "config.json").write_text('{"backup": {"backup_root": "vault"}}')
    monkeypatch.chdir(tmp_path / "disk")
    config = aml.backup_config_for(aml.Store(root))
    assert config.backup_root == tmp_path / "loom" / "vault"
    assert aml.BackupManager(aml.Store(root)).root == tmp_path / "loom" / "memory-backup"
    (real / ".aml" / "config.json").write_text('{"backup": {"backup_root": 7}}')
    assert run_cli(root, "backup", "list") == 2


def test_relative_backup_root_flag_is_taken_from_the_cwd(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "memory")
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text('{"backup": {"backup_root": "vault"}}')
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    code, out, _ = run_cli(root, "backup", "create", "--backup-root", "flagged",
                           "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)["manifest"].startswith(str(tmp_path / "work" /
                                                                    "flagged"))
    assert not (tmp_path / "vault").exists()


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
    code, out, _ = run_cli(root, "backup", "verify", "--backup-id", ids[0], "--format", "json",
                           capsys=capsys)
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
    env = dict(cron_env(), HOME=str(tmp_path))
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


def _flip_byte(pack):
    """Damage one pack the way a bad disk sector does: one bit of a compressed block."""
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", [["create"], ["full", "--no-verify"], ["incremental"]],
                         ids=["create", "full-no-verify", "incremental"])
def test_new_backup_repairs_damaged_objects_it_has_the_bytes_of(tmp_path, capsys, kind):
    root = build_store(tmp_path / "memory", gz="mixed")
    before = content_digest(root)
    old = backup_manager(root).create(aml.BackupType.FULL)
    pack = next(backup_manager(root).packs.glob("*.pack"))
    _flip_byte(pack)
    # A name from a clock ahead: the repaired copy must still win the lookup.
    for suffix in (".pack", ".idx"):
        pack.with_suffix(suffix).rename(pack.parent / ("pack-29991231235959-ffffffff" + suffix))
    code, _, err = run_cli(root, "backup", "verify", "--all", "--deep", capsys=capsys)
    assert code == 6 and old.backup_id in err
    code, out, err = run_cli(root, "backup", *kind, capsys=capsys)
    assert code == 0 and "repaired damaged backup data" in err, err
    if kind != ["full", "--no-verify"]:
        check = aml.Store(root).last_operation("verify")
        assert "verified" in out and check["summary"]["ok"] and check["summary"]["repaired"]
    # Keys are content hashes: the older snapshot reads the repaired copies too.
    assert run_cli(root, "backup", "verify", "--all", "--deep", "-q") == 0
    mutate_store(root)
    assert run_cli(root, "backup", "restore", old.backup_id, "-q") == 0
    assert content_digest(root) == before


def test_new_pack_names_sort_last_and_keep_their_length_when_the_clock_is_behind(tmp_path):
    (tmp_path / "pack-29991231235959-ffffffff.idx").write_bytes(b"")
    first = aml._new_pack_name(tmp_path)
    assert first.startswith("pack-29991231235960-") and len(first) == 28
    (tmp_path / (first + ".idx")).write_bytes(b"")
    assert aml._new_pack_name(tmp_path).startswith("pack-29991231235961-")


def test_crash_during_a_repair_leaves_earlier_snapshots_and_a_rerun_repairs(tmp_path,
                                                                            monkeypatch):
    root = build_store(tmp_path / "memory")
    old = backup_manager(root).create(aml.BackupType.FULL)
    _flip_byte(next(backup_manager(root).packs.glob("*.pack")))
    real = aml.atomic_write_bytes

    def crash_on_index(path, *args, **kwargs):
        if str(path).endswith(".idx"):
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(aml, "atomic_write_bytes", crash_on_index)
    with pytest.raises(OSError):
        backup_manager(root, now=NOW + dt.timedelta(hours=1)).create(aml.BackupType.FULL)
    monkeypatch.setattr(aml, "atomic_write_bytes", real)
    manager = backup_manager(root, now=NOW + dt.timedelta(hours=2))
    assert len(list(manager.packs.glob("*.pack"))) == 1      # the half-written pack is gone
    assert manager.manifest_path(old.backup_id).exists()
    assert manager.create(aml.BackupType.FULL).repaired
    assert manager.verify(all_snapshots=True, deep=True).ok


def test_restore_of_an_intact_agent_works_beside_a_damaged_one(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    backup_manager(root).create(aml.BackupType.FULL, agents=["test-automator"])
    damaged = next(backup_manager(root).packs.glob("*.pack"))
    snap = backup_manager(root).create(aml.BackupType.FULL)   # others land in a new pack
    before = content_digest(root)
    _flip_byte(damaged)
    path = root / "code-reviewer" / "patterns.json"
    write_data(path, read_data(path)[5:])
    # The damaged agent's restore fails closed, naming the file; nothing is written.
    code, _, err = run_cli(root, "backup", "restore", snap.backup_id, "--agents",
                           "test-automator", "--target", tmp_path / "t", capsys=capsys)
    assert code == 6 and "test-automator/" in err and not (tmp_path / "t").exists()
    code, out, err = run_cli(root, "backup", "restore", snap.backup_id, "--agents",
                             "code-reviewer", capsys=capsys)
    assert code == 0 and "repaired damaged backup data" in err and "test-automator/" in err
    assert content_digest(root) == before
    # Its safety backup re-stored test-automator's objects from the live files.
    assert run_cli(root, "backup", "verify", snap.backup_id, "--deep", "-q") == 0


@pytest.mark.parametrize("text", ["[]", "{}", "[1,", "[1] x", "[1, 2 ,3]", "[NaN]"])
def test_split_json_array_refuses_what_it_cannot_split(text):
    assert aml.split_json_array(text) is None


# ---- issue 11: the runtime's temp and lock entries are not store content ----

def _runtime_in_flight(root, lock=True):
    """What a busy runtime leaves beside its files: a temp file about to be renamed, a lock."""
    tmp = root / "backend-developer" / "patterns.json.tmp"
    tmp.write_bytes((root / "backend-developer" / "patterns.json").read_bytes())
    if lock:  # held (fresh): whatever reads code-reviewer/solutions.json waits for it
        (root / "code-reviewer" / "solutions.json.lock").mkdir()
    (root / "global" / "shared.json.tmp").write_text('{"notes": []}')
    return tmp


def test_backup_skips_runtime_temp_files_that_vanish_mid_backup(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "memory", gz=True)
    tmp = _runtime_in_flight(root, lock=False)
    real_entry = aml._SnapshotBuilder.file_entry

    def runtime_renames_meanwhile(self, rel, *args):
        if tmp.exists():
            os.replace(str(tmp), str(tmp.with_name("patterns.json")))
        return real_entry(self, rel, *args)

    monkeypatch.setattr(aml._SnapshotBuilder, "file_entry", runtime_renames_meanwhile)
    code, out, err = run_cli(root, "backup", "create", "--format", "json", capsys=capsys)
    assert code == 0 and err == "", err
    manager = aml.BackupManager(aml.Store(root), aml.BackupConfig(backup_root=tmp_path /
                                                                  "memory-backup"))
    paths = [e["path"] for e in manager.load_manifest(json.loads(out)["backup_id"])["files"]]
    assert "backend-developer/patterns.json" in paths
    assert not [p for p in paths if p.endswith((".tmp", ".lock")) or ".lock/" in p]


def test_runtime_temp_and_lock_entries_are_skipped_by_every_walk(tmp_path):
    root = build_store(tmp_path / "memory", agents=("backend-developer", "code-reviewer"))
    store = aml.Store(root, now=NOW)
    sizes = {a: aml.agent_disk_bytes(store, a) for a in store.agents()}
    total = aml.store_disk_bytes(store)
    tmp = _runtime_in_flight(root)
    assert store.agents() == ["backend-developer", "code-reviewer"]
    assert {a: aml.agent_disk_bytes(store, a) for a in store.agents()} == sizes
    assert aml.store_disk_bytes(store) == total
    assert [f.path.name for f in store.agent_files("backend-developer")] == [
        "context.json", "decisions.json", "metrics.json", "patterns.json", "solutions.json"]
    assert not any(rel.endswith(".tmp") or ".lock" in rel
                   for rel in aml.store_scope_files(root, None))
    before = tree_digest(root, skip_state=True)
    assert run_cli(root, "optimize", "gc", "-q", "--now", NOW_TEXT) == 0
    assert tree_digest(root, skip_state=True) == before  # the runtime's entries stay untouched
    health = aml.MemoryMonitor(aml.Store(root, now=NOW)).health(False, record=False)
    assert not [p for c in health.checks for p in c.problems if ".tmp" in str(p)]
# ---- issue 16: copies to a second repository, inspection, retention rules ----

def two_snapshots(tmp_path, gz=False, **config):
    """A store with a full snapshot on day 0 and, after mutate_store, an incremental on day 1."""
    root = build_store(tmp_path / "memory", gz=gz, patterns=20)
    first = backup_manager(root, **config).create()
    mutate_store(root)
    later = backup_manager(root, now=NOW + dt.timedelta(days=1), **config).create(
        aml.BackupType.INCREMENTAL)
    return root, first, later


def restored_tree(manager, backup_id, target):
    manager.restore(backup_id, target=target)
    return tree_digest(target)


@pytest.mark.parametrize("gz", [False, "mixed"], ids=["plain", "mixed"])
def test_copy_to_a_folder_is_incremental_verified_and_restores_byte_for_byte(tmp_path, gz):
    root = build_store(tmp_path / "memory", gz=gz, patterns=20)
    original = tree_digest(root, skip_state=True)
    first = backup_manager(root).create()
    dest = tmp_path / "usb"
    copied = aml.copy_backups(backup_manager(root), str(dest))
    assert copied.copied == [first.backup_id] and copied.verified and not copied.problems
    assert copied.objects_checked == copied.objects_copied == first.objects_added
    mutate_store(root)
    later = backup_manager(root, now=NOW + dt.timedelta(days=1)).create(
        aml.BackupType.INCREMENTAL)
    again = aml.copy_backups(backup_manager(root), str(dest))
    assert again.present == [first.backup_id] and again.copied == [later.backup_id]
    assert again.objects_copied == later.objects_added      # only what the copy lacked
    assert aml.copy_backups(backup_manager(root), str(dest)).copied == []
    with aml.open_repository(backup_manager(root), str(dest)) as copy:
        assert copy.verify(all_snapshots=True).ok
        from_copy = restored_tree(copy, first.backup_id, tmp_path / "from-copy")
    from_home = restored_tree(backup_manager(root), first.backup_id, tmp_path / "from-home")
    assert from_copy == from_home                            # byte for byte
    if not gz:
        assert from_copy == original
    for snap in (first, later):   # the manifests are the same bytes
        assert (dest / "aml" / "snapshots" / snap.manifest.name).read_bytes() == \
            snap.manifest.read_bytes()


def test_copy_killed_mid_way_leaves_the_destination_valid_and_a_rerun_completes(tmp_path):
    root, first, later = two_snapshots(tmp_path)
    dest = tmp_path / "usb"
    backup_manager(root).create()    # a third one, so the copy has several packs to write
    ids = backup_manager(root).snapshot_ids()
    assert run_cli(root, "backup", "copy", first.backup_id, "--to", dest, "-q") == 0
    # A real aml process, killed (SIGKILL) right after its first pack landed at the
    # destination and before that snapshot's manifest was written.
    code = ("import sys, time, aml\n"
            "real = aml._PackWriter.commit\n"
            "def commit(self):\n"
            "    n = real(self)\n"
            "    print('landed', flush=True)\n"
            "    time.sleep(120)\n"
            "    return n\n"
            "aml._PackWriter.commit = commit\n"
            "sys.exit(aml.main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), "backup", "copy", "--to",
                             str(dest)], cwd=str(HERE), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "landed"
    finally:
        proc.kill()
        proc.wait()
    copy = aml.BackupManager(aml.Store(root, now=NOW), aml.BackupConfig(backup_root=dest))
    assert copy.snapshot_ids() == [first.backup_id]          # the manifest comes last
    assert copy.verify(all_snapshots=True).ok
    assert run_cli(root, "backup", "copy", "--to", dest, "-q") == 0
    assert copy.snapshot_ids() == ids and copy.verify(all_snapshots=True).ok
    with aml.open_repository(backup_manager(root), str(dest)) as view:
        assert restored_tree(view, later.backup_id, tmp_path / "a") == \
            restored_tree(backup_manager(root), later.backup_id, tmp_path / "b")


def test_copy_crash_before_an_index_lands_leaves_the_destination_valid(tmp_path, monkeypatch):
    root, first, later = two_snapshots(tmp_path)
    dest = tmp_path / "usb"
    fail_nth_replace(monkeypatch, n=2, counts=lambda dst: str(dst).endswith(".idx"))
    with pytest.raises(OSError):
        aml.copy_backups(backup_manager(root), str(dest))
    monkeypatch.undo()
    packs = dest / "aml" / "packs"
    assert len(list(packs.glob("*.pack"))) == len(list(packs.glob("*.idx"))) == 1
    (packs / "pack-20990101000000-deadbeef.pack").write_bytes(b"AMLPACK1 killed mid-write")
    (packs / ".aml-tmp-1234-x").write_bytes(b"")
    history = aml.Store(root).read_state("history.json", [])
    assert history[-1]["operation"] == "copy" and history[-1]["summary"]["ok"] is False
    copy = aml.BackupManager(aml.Store(root, now=NOW), aml.BackupConfig(backup_root=dest))
    assert copy.snapshot_ids() == [first.backup_id] and copy.verify().ok
    result = aml.copy_backups(backup_manager(root), str(dest))
    assert result.copied == [later.backup_id] and result.verified
    assert len(list(packs.glob("*.pack"))) == len(list(packs.glob("*.idx"))) == 2


def test_copy_refuses_its_own_repository_and_skips_another_stores_snapshot(tmp_path):
    root, first, later = two_snapshots(tmp_path)
    for inside in ("memory-backup", "memory-backup/aml/packs", "memory/usb"):
        with pytest.raises(aml.UsageError):
            aml.copy_backups(backup_manager(root), str(tmp_path / inside))
    other = build_store(tmp_path / "other", patterns=3)
    dest = tmp_path / "usb"
    clash = backup_manager(other, backup_root=dest).create()
    assert clash.backup_id == first.backup_id               # same second, another store
    result = aml.copy_backups(backup_manager(root), str(dest))
    assert result.copied == [later.backup_id] and "another store" in result.warnings[0]
    assert backup_manager(other, backup_root=dest).verify(clash.backup_id).ok


def rclone_env(monkeypatch, tmp_path):
    if shutil.which("rclone") is None:
        pytest.skip("rclone not installed")
    monkeypatch.setenv("RCLONE_CONFIG_AMLTEST_TYPE", "local")
    monkeypatch.setenv("RCLONE_CONFIG", str(tmp_path / "rclone.conf"))   # no user config
    return "rclone:amltest:%s" % (tmp_path / "remote")


def test_copy_to_an_rclone_remote_verifies_there_and_restores(tmp_path, monkeypatch, capsys):
    remote = rclone_env(monkeypatch, tmp_path)
    root, first, later = two_snapshots(tmp_path, gz="mixed")
    code, out, err = run_cli(root, "backup", "copy", "--to", remote, capsys=capsys)
    assert code == 0 and "verified there" in out, err
    on_disk = tmp_path / "remote" / "aml"
    assert sorted(p.name for p in (on_disk / "snapshots").iterdir()) == [
        first.manifest.name, later.manifest.name]
    # The remote is a repository of its own: readable as a folder, and through rclone.
    assert backup_manager(root, backup_root=tmp_path / "remote").verify(all_snapshots=True).ok
    code, out, _ = run_cli(root, "backup", "verify", "--all", "--repo", remote, capsys=capsys)
    assert code == 0 and "OK" in out
    assert run_cli(root, "backup", "restore", first.backup_id, "--repo", remote, "--target",
                   tmp_path / "drill", "-q") == 0
    assert tree_digest(tmp_path / "drill") == restored_tree(
        backup_manager(root), first.backup_id, tmp_path / "home")
    code, out, _ = run_cli(root, "backup", "copy", "--to", remote, capsys=capsys)
    assert code == 0 and "nothing to copy" in out
    code, out, _ = run_cli(root, "backup", "diff", first.backup_id, later.backup_id, "--repo",
                           remote, "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)["records_removed"] == 7


def test_rclone_copy_interrupted_between_uploads_recovers(tmp_path, monkeypatch):
    remote = rclone_env(monkeypatch, tmp_path)
    root, first, later = two_snapshots(tmp_path)
    real, calls = aml._Rclone.upload, []

    def flaky(self, local, rel):
        calls.append(rel)
        if len(calls) == 5:   # pack, idx, manifest of the first; the second's pack; its idx
            raise aml.AmlError("network gone")
        return real(self, local, rel)

    monkeypatch.setattr(aml._Rclone, "upload", flaky)
    with pytest.raises(aml.AmlError):
        aml.copy_backups(backup_manager(root), remote)
    monkeypatch.setattr(aml._Rclone, "upload", real)
    packs = tmp_path / "remote" / "aml" / "packs"
    assert len(list(packs.glob("*.pack"))) == 2 and len(list(packs.glob("*.idx"))) == 1
    with aml.open_repository(backup_manager(root), remote) as view:
        assert view.snapshot_ids() == [first.backup_id] and view.verify().ok
    result = aml.copy_backups(backup_manager(root), remote)
    assert result.copied == [later.backup_id] and result.verified
    assert len(list(packs.glob("*.pack"))) == len(list(packs.glob("*.idx"))) == 2
    assert not [p for p in packs.iterdir() if aml.is_temp_leftover(p.name)]


def test_rclone_missing_is_one_clear_error(tmp_path, monkeypatch, capsys):
    root, _, _ = two_snapshots(tmp_path)
    monkeypatch.setattr(aml.shutil, "which", lambda name: None)
    code, _, err = run_cli(root, "backup", "copy", "--to", "rclone:x:y", capsys=capsys)
    assert code == 1 and err.startswith("aml: error:") and "rclone is not installed" in err


def test_restore_from_a_copy_keeps_its_safety_snapshot_at_home(tmp_path, capsys):
    root, first, later = two_snapshots(tmp_path)
    dest = tmp_path / "usb"
    aml.copy_backups(backup_manager(root), str(dest))
    before = content_digest(root)
    code, out, _ = run_cli(root, "backup", "restore", first.backup_id, "--repo", dest,
                           "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and "safety backup" in out
    safety = out.rsplit("safety backup ", 1)[1].strip()
    assert safety in backup_manager(root).snapshot_ids()
    assert safety not in aml.BackupManager(aml.Store(root), aml.BackupConfig(
        backup_root=dest)).snapshot_ids()
    assert backup_manager(root).restore(safety).replaced   # the way back works
    assert content_digest(root) == before
    code, _, err = run_cli(root, "backup", "list", "--repo", tmp_path / "nowhere",
                           capsys=capsys)
    assert code == 2 and "no aml repository" in err


def test_a_damaged_copy_fails_verify_and_health_says_so(tmp_path, capsys):
    root, first, later = two_snapshots(tmp_path)
    dest = tmp_path / "usb"
    aml.copy_backups(backup_manager(root), str(dest))
    for pack in (dest / "aml" / "packs").glob("*.pack"):
        _flip_byte(pack)
    code, _, err = run_cli(root, "backup", "verify", "--all", "--repo", dest, capsys=capsys)
    assert code == 6 and "aml: error:" in err
    assert backup_manager(root).verify(all_snapshots=True).ok   # the home repository is fine
    health = json.loads(run_cli(root, "monitor", "health", "--format", "json",
                                "--now", NOW_TEXT, capsys=capsys)[1])
    messages = [p["message"] for c in health["checks"] for p in c.get("problems", [])]
    assert any("verify of the copy" in m for m in messages), messages


def test_auto_copies_to_copy_to_and_reports_a_failed_copy(tmp_path, capsys):
    root = build_store(tmp_path / "memory", patterns=5)
    (root / ".aml").mkdir()
    config = root / ".aml" / "config.json"
    config.write_text('{"backup": {"copy_to": "offsite"}}')   # beside the store
    code, out, err = run_cli(root, "backup", "auto", "--now", NOW_TEXT, capsys=capsys)
    assert code == 0, err
    first = backup_manager(root).snapshot_ids()
    assert [p.stem for p in (tmp_path / "offsite" / "aml" / "snapshots").iterdir()] == first
    (tmp_path / "blocked").write_text("a file, not a folder")
    config.write_text('{"backup": {"copy_to": "%s"}}' % (tmp_path / "blocked"))
    code, out, err = run_cli(root, "backup", "auto", "--now", "2026-11-21T12:00:00Z",
                             capsys=capsys)
    assert code != 0 and "aml: error: copy to" in err
    assert len(backup_manager(root).snapshot_ids()) == 2      # the backup itself stands
    health = json.loads(run_cli(root, "monitor", "health", "--format", "json", "--now",
                                "2026-11-21T13:00:00Z", capsys=capsys)[1])
    messages = [p["message"] for c in health["checks"] for p in c.get("problems", [])]
    assert any("last copy to" in m and "failed" in m for m in messages), messages
    config.write_text('{"backup": {"copy_to": "offsite"}}')
    assert run_cli(root, "backup", "auto", "-q", "--now", "2026-11-21T14:00:00Z") == 0
    health = json.loads(run_cli(root, "monitor", "health", "--format", "json", "--now",
                                "2026-11-21T15:00:00Z", capsys=capsys)[1])
    assert not [p for c in health["checks"] for p in c.get("problems", [])
                if "copy" in p["message"]]
    health = json.loads(run_cli(root, "monitor", "health", "--format", "json", "--now",
                                "2026-11-24T15:00:00Z", capsys=capsys)[1])
    messages = [p["message"] for c in health["checks"] for p in c.get("problems", [])]
    assert any(re.match(r"last copy to .*offsite is 73 h old", m) for m in messages), messages


def test_diff_lists_exactly_the_records_changed(tmp_path, capsys):
    root = build_store(tmp_path / "memory", gz="mixed", patterns=12)
    first = backup_manager(root).create()
    patterns = root / "code-reviewer" / "patterns.json"     # plain (mixed: odd agents)
    records = read_data(patterns)
    removed = [records[1]["id"], records[4]["id"]]
    records[2]["metrics"]["successRate"] = 0.01
    records[3]["tags"] = ["edited"]
    added = make_pattern("code-reviewer", random.Random(9))
    kept = [r for r in records if r["id"] not in removed] + [added]
    write_data(patterns, kept)
    gz_file = root / "backend-developer" / "solutions.json"  # gzip: same records, new bytes
    write_data(gz_file, read_data(gz_file), gz=True, newline=True)
    metrics = root / "test-automator" / "metrics.json"
    write_data(metrics, dict(read_data(metrics), timestamp="2026-11-21T00:00:00.000Z"),
               gz=True)
    later = backup_manager(root, now=NOW + dt.timedelta(days=1)).create()
    result = aml.diff_snapshots(backup_manager(root), first.backup_id, later.backup_id)
    by_path = {f.path: f for f in result.files}
    change = by_path["code-reviewer/patterns.json"]
    assert change.status == "changed" and change.agent == "code-reviewer"
    assert change.removed == removed and change.added == [added["id"]]
    assert {(c.id, tuple(c.fields)) for c in change.changed} == {
        (records[2]["id"], ("metrics.successRate",)), (records[3]["id"], ("tags",))}
    assert by_path["backend-developer/solutions.json"].status == "rewritten"
    assert by_path["test-automator/metrics.json"].fields == ["timestamp"]
    assert set(by_path) == {"code-reviewer/patterns.json", "backend-developer/solutions.json",
                            "test-automator/metrics.json"}
    assert (result.records_added, result.records_removed, result.records_changed) == (1, 2, 2)
    code, out, _ = run_cli(root, "backup", "diff", first.backup_id, later.backup_id,
                           capsys=capsys)
    assert code == 0 and "~ %s: metrics.successRate" % records[2]["id"] in out
    doc = json.loads(run_cli(root, "backup", "diff", first.backup_id, later.backup_id,
                             "--format", "json", capsys=capsys)[1])
    assert doc["records_changed"] == 2 and len(doc["files"]) == 3


def test_ls_and_dump_show_files_and_records_as_stored(tmp_path, capsys):
    root = build_store(tmp_path / "memory", patterns=8)
    snap = backup_manager(root).create()
    listing = aml.list_snapshot(backup_manager(root), snap.backup_id)
    assert {f.path for f in listing.files} == set(tree_digest(root, skip_state=True))
    row = next(f for f in listing.files if f.path == "code-reviewer/patterns.json")
    assert (row.records, row.kind, row.size) == (8, "records",
                                                 (root / row.path).stat().st_size)
    code, out, _ = run_cli(root, "backup", "ls", snap.backup_id, "--format", "json",
                           capsys=capsys)
    assert code == 0 and json.loads(out)["records"] == listing.records
    raw = (root / "code-reviewer" / "patterns.json").read_bytes()
    assert aml.dump_file(backup_manager(root), snap.backup_id,
                         "code-reviewer/patterns.json").data == raw
    doc = json.loads(run_cli(root, "backup", "dump", snap.backup_id,
                             "code-reviewer/patterns.json", "--format", "json",
                             capsys=capsys)[1])
    assert base64.b64decode(doc["base64"]) == raw and doc["exact"]
    record = read_data(root / "code-reviewer" / "patterns.json")[5]
    found = aml.dump_record(backup_manager(root), snap.backup_id, record["id"])
    assert len(found) == 1 and found[0].position == 5 and found[0].data in raw
    assert json.loads(found[0].data) == record
    code, out, _ = run_cli(root, "backup", "dump", snap.backup_id, "--record", record["id"],
                           capsys=capsys)
    assert code == 0 and json.loads(out) == record
    code, _, err = run_cli(root, "backup", "dump", snap.backup_id, "--record", "no-such-id",
                           capsys=capsys)
    assert code == 1 and "no record" in err
    twin = root / "test-automator" / "patterns.json"
    write_data(twin, read_data(twin) + [record])
    again = backup_manager(root, now=NOW + dt.timedelta(hours=1)).create()
    code, _, err = run_cli(root, "backup", "dump", again.backup_id, "--record", record["id"],
                           capsys=capsys)
    assert code == 2 and "in 2 files" in err
    assert run_cli(root, "backup", "dump", again.backup_id, "test-automator/patterns.json",
                   "--record", record["id"], capsys=capsys)[0] == 0
    code, _, err = run_cli(root, "backup", "dump", snap.backup_id, "nope.json", capsys=capsys)
    assert code == 2 and "has no file" in err


def test_stats_measures_size_deduplication_and_what_each_snapshot_added(tmp_path, capsys):
    root = build_store(tmp_path / "memory", patterns=20)
    first = backup_manager(root).create()
    same = backup_manager(root, now=NOW + dt.timedelta(hours=1)).create()
    mutate_store(root)
    later = backup_manager(root, now=NOW + dt.timedelta(hours=2)).create()
    stats = aml.repository_stats(backup_manager(root))
    rows = {r.backup_id: r for r in stats.snapshots}
    assert rows[first.backup_id].new_objects == first.objects_added
    assert rows[same.backup_id].new_objects == 0 == rows[same.backup_id].added_bytes
    assert rows[later.backup_id].new_objects == later.objects_added
    plain = sum((root / p).stat().st_size for p in tree_digest(root, skip_state=True))
    assert rows[later.backup_id].logical_bytes == plain      # a plain store restores as is
    assert stats.repository_bytes == repo_bytes(backup_manager(root))
    assert stats.unique_objects == sum(r.new_objects for r in stats.snapshots)
    assert stats.dedup_ratio > 2.5 and stats.compression_ratio > 1
    assert stats.unreferenced_objects == 0
    doc = json.loads(run_cli(root, "backup", "stats", "--format", "json", capsys=capsys)[1])
    assert doc["unique_bytes"] == stats.unique_bytes and len(doc["snapshots"]) == 3


def test_keep_rules_replace_the_age_rule_and_the_dry_run_says_why(tmp_path, capsys):
    root = build_store(tmp_path / "memory", patterns=3)
    for hours in range(0, 24 * 400, 24 * 10):
        backup_manager(root, now=NOW + dt.timedelta(hours=hours), verify_after_backup=False
                       ).create()
    later = NOW + dt.timedelta(days=400)
    manager = backup_manager(root, now=later, retention_days=60)
    ids = manager.snapshot_ids()
    assert manager.retained(ids) == [i for i in ids if aml._id_time(i) >= later -
                                     dt.timedelta(days=60)]
    assert manager.retained(ids, keep_last=2) == ids[-2:]   # the age rule does not add 6
    assert manager.retained(ids, keep_within=35, keep_last=1) == ids[-3:]   # 10, 20, 30 days old
    yearly = manager.retained(ids, keep_yearly=5)
    assert [aml._id_time(i).year for i in yearly] == [2026, 2027] and yearly[-1] == ids[-1]
    reasons = manager.retention_reasons(ids, {"last": 1, "hourly": 2, "monthly": 2})
    assert reasons[ids[-1]] == ["last 1", "hourly %s" % aml._id_time(ids[-1]).strftime(
        "%Y-%m-%d %H:00"), "monthly %s" % aml._id_time(ids[-1]).strftime("%Y-%m"),
        "newest snapshot"]
    assert len(reasons) == 3
    before = tree_digest(tmp_path)
    code, out, _ = run_cli(root, "backup", "rotate", "--dry-run", "--keep-last", "3",
                           "--now", "2027-12-25T12:00:00Z", capsys=capsys)
    assert code == 0 and out.count("would keep") == 3 and out.count("would delete ") == 38
    assert "would keep %s: last 3, newest snapshot" % ids[-1] in out
    assert tree_digest(tmp_path) == before
    with pytest.raises(aml.UsageError):
        manager.retained(ids, keep_last=-1)
    result = manager.rotate(keep_weekly=2, keep_last=1)
    assert result.kept == ids[-2:] and len(result.deleted) == len(ids) - 2


def test_create_and_auto_dry_runs_predict_and_change_nothing(tmp_path, capsys):
    root = build_store(tmp_path / "memory", gz="mixed", patterns=10)
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text('{"backup": {"copy_to": "offsite"}}')
    before = tree_digest(tmp_path)
    plan = aml.plan_backup(backup_manager(root), aml.BackupType.FULL)
    code, out, _ = run_cli(root, "backup", "auto", "--dry-run", "--now", NOW_TEXT,
                           capsys=capsys)
    assert code == 0 and "would take a full backup" in out
    assert tree_digest(tmp_path) == before and not (tmp_path / "memory-backup").exists()
    done = backup_manager(root).create(aml.BackupType.FULL)
    assert (plan.files, plan.records, plan.objects_added) == (done.files, done.records,
                                                             done.objects_added)
    mutate_store(root)
    plan = aml.plan_backup(backup_manager(root))
    assert plan.type is aml.BackupType.INCREMENTAL and plan.baseline == done.backup_id
    assert (plan.files_new, plan.files_changed) == (1, 2) and plan.files_read == 3
    before = tree_digest(tmp_path)
    code, out, _ = run_cli(root, "backup", "create", "--incremental", "--dry-run",
                           "--format", "json", capsys=capsys)
    assert code == 0 and json.loads(out)["objects_added"] == plan.objects_added
    code, out, _ = run_cli(root, "backup", "auto", "--dry-run", "--now", "2026-11-21T12:00:00Z",
                           capsys=capsys)
    assert code == 0 and "would copy %s" % done.backup_id in out
    assert tree_digest(tmp_path) == before
    real = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    assert real.objects_added == plan.objects_added and real.files_reread == plan.files_read



# ---- issue 13: speed (verification after a backup trusts only what it may) ----

def test_no_change_incremental_reads_no_object_of_its_verified_baseline(tmp_path):
    root = build_store(tmp_path / "memory", gz="mixed")
    full = backup_manager(root).create(aml.BackupType.FULL)
    assert full.verified
    pack = next(backup_manager(root).packs.glob("*.pack"))
    _flip_byte(pack)   # damage the baseline's only pack after it was verified
    incr = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    # Packs are immutable: nothing of the verified baseline is read again.
    assert incr.verified and incr.files_reread == 0 and not incr.repaired
    # An explicit verify trusts nothing and finds the damage in both snapshots.
    for backup_id in (full.backup_id, incr.backup_id):
        assert not backup_manager(root).verify(backup_id).ok
    assert not backup_manager(root).verify(all_snapshots=True).ok


def test_incremental_on_an_unverified_baseline_reads_every_object(tmp_path):
    root = build_store(tmp_path / "memory")
    backup_manager(root, verify_after_backup=False).create(aml.BackupType.FULL)
    _flip_byte(next(backup_manager(root).packs.glob("*.pack")))
    result = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    # No verified baseline: every object is read, the damage found and repaired.
    assert result.verified and result.repaired
    assert backup_manager(root).verify(result.backup_id, deep=True).ok


def test_changed_file_in_an_incremental_is_verified_past_its_baseline(tmp_path):
    root = build_store(tmp_path / "memory", gz=True)
    backup_manager(root).create(aml.BackupType.FULL)
    path = root / "code-reviewer" / "patterns.json"
    records = read_data(path)
    records[0]["tags"] = ["changed"]
    write_data(path, records, gz=True)
    objects_before = backup_manager(root).verify().objects_checked
    result = backup_manager(root).create(aml.BackupType.INCREMENTAL)
    check = backup_manager(root)._verify_locked([result.backup_id], False,
                                                trusted=_trusted_of(root, result))
    # Only the changed record's object (in the fresh pack: checked whole) and the new item
    # list are new; the verification reads far fewer objects than a full one.
    assert result.verified and check.ok and check.objects_checked < objects_before / 10


def test_restore_gives_back_the_exact_gzip_bytes_of_a_large_file(tmp_path):
    root = build_store(tmp_path / "memory", agents=("code-reviewer",), gz=True)
    rng = random.Random(3)
    big = root / "code-reviewer" / "patterns.json"
    text = json.dumps([make_pattern("code-reviewer", rng) for _ in range(6000)], indent=2)
    big.write_bytes(gzip.compress(text.encode("utf-8"), 6, mtime=0))   # the runtime's level
    assert len(text) > aml.GZIP_PARALLEL_MIN
    snap = backup_manager(root).create(aml.BackupType.FULL)
    code = run_cli(root, "backup", "restore", snap.backup_id, "--target", tmp_path / "t", "-q")
    # Rebuilt as one zlib stream at the file's level: the bytes it had, not only its content.
    assert code == 0 and (tmp_path / "t" / "code-reviewer" / "patterns.json").read_bytes() \
        == big.read_bytes()


def _trusted_of(root, result):
    manager = backup_manager(root)
    marks = manager._verified()
    manifest = manager.load_manifest(result.backup_id)
    previous = [i for i in manager.snapshot_ids() if i != result.backup_id][-1]
    assert marks[previous]["ok"] and manifest["files"]
    return aml._Trusted(entries={e["path"]: e for e in
                                 manager.load_manifest(previous)["files"]})


def test_a_fresh_pack_damaged_on_disk_is_read_in_full_and_repaired(tmp_path, monkeypatch):
    root = build_store(tmp_path / "memory", gz="mixed")
    real_commit = aml._PackWriter.commit

    def commit_then_damage(self):
        added = real_commit(self)
        if added and not getattr(aml, "_damaged_once", False):
            aml._damaged_once = True
            _flip_byte(self.path)   # the disk returns other bytes than were written
        return added

    monkeypatch.setattr(aml, "_damaged_once", False, raising=False)
    monkeypatch.setattr(aml._PackWriter, "commit", commit_then_damage)
    result = backup_manager(root).create(aml.BackupType.FULL)
    # The pack's checksum did not match what was written: its objects were read, the
    # damage found, and the files stored again.
    assert result.verified and result.repaired
    assert backup_manager(root).verify(result.backup_id, deep=True).ok

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


def test_bloom_add_digests_sets_the_same_bits_as_add():
    keys = ["key-%d" % i for i in range(3000)]
    one, bulk = aml.BloomFilter(5000), aml.BloomFilter(5000)
    for key in keys:
        one.add(key)
    bulk.add_digests(b"".join(aml.bloom_digest(k) for k in keys[:1000]))   # 16-byte stride
    rows = b"".join(aml.bloom_digest(k) + b"slot+pos" for k in keys[1000:])  # id-table rows
    bulk.add_digests(rows, 24)
    assert bulk.bits == one.bits and len(bulk) == len(one) == 3000


def test_paused_cyclic_gc_nests_and_restores():
    import gc
    assert gc.isenabled()
    with aml.paused_cyclic_gc():
        with aml.paused_cyclic_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()   # the inner block does not re-enable early
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with aml.paused_cyclic_gc():
            raise KeyError("x")
    assert gc.isenabled()


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
    real = aml.load_records_with_offsets
    monkeypatch.setattr(aml, "load_records_with_offsets", lambda p: loads.append(p) or real(p))
    result = aml.MemoryIndex(s).refresh()
    assert loads == [target]
    assert result.files_reread == ["test-automator/patterns.json"]
    found = aml.get_record(s, new["id"])
    assert found.records[0].record == new and found.source == "index"
    assert aml.get_record(s, records[-1]["id"]).not_found


def test_parallel_index_build_equals_sequential(tmp_path, monkeypatch):
    built = []
    for parallel in (False, True):
        root = build_store(tmp_path / str(parallel), gz="mixed")
        if parallel:
            monkeypatch.setattr(aml, "_PARALLEL_BYTES", 0)
        aml.MemoryIndex(aml.Store(root)).refresh()
        folder = root / ".aml" / "index"
        built.append({n: (folder / n).read_bytes() for n in ("postings.dat", "keys.dat",
                                                               "ids.bin", "bloom.bin")})
    assert built[0] == built[1]


def _logged_call(key, *job):
    with open(os.environ["AML_TEST_PID_LOG"], "a") as log:
        log.write("%d\n" % os.getpid())
    return aml._FORKED[key](*job)


def _file_runs(root):
    """Prune (dry and real), migrate (dry and real) and detect on one store, as comparable data."""
    out = []
    for argv in (["prune", "--dry-run"], ["migrate", "detect"],
                 ["migrate", "migrate-latest", "--dry-run"], ["prune", "--no-backup", "--force"],
                 ["migrate", "migrate-latest", "--no-backup"]):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            code = aml.main([str(root)] + argv + ["--format", "json", "--now", NOW_TEXT])
        doc = json.loads(text.getvalue().replace(str(root), "ROOT"))
        for key in ("run_id", "seconds", "archive", "history"):
            doc.pop(key, None)
        out.append(dict(doc, exit_code=code))
    return out, tree_digest(root, skip_state=True)


def test_prune_and_migrate_in_worker_processes_equal_one_process(tmp_path, monkeypatch):
    """Files planned, migrated and detected in forked workers (map_files) give the same
    results, findings, unreadable lines and bytes on disk as in one process."""
    log = tmp_path / "pids"
    monkeypatch.setenv("AML_TEST_PID_LOG", str(log))
    monkeypatch.setattr(aml, "_call_forked", _logged_call)
    runs = []
    for parallel in (False, True):
        root = _prune_store(tmp_path / str(parallel), gz="mixed")
        (root / "code-reviewer" / "solutions.json").write_bytes(b"[{\"id\": ")  # unreadable
        future = make_pattern("code-reviewer", random.Random(2))
        future["evolution"]["lastUsed"] = "2027-06-01T00:00:00.000Z"
        data = read_data(root / "test-automator" / "patterns.json")
        write_data(root / "test-automator" / "patterns.json", data + [future])
        if parallel:
            monkeypatch.setattr(aml, "_PARALLEL_BYTES", 0)
            monkeypatch.setattr(aml, "worker_count", lambda workers, jobs: min(jobs, 2))
        runs.append(_file_runs(root))
        assert log.exists() == parallel  # the second pass really ran in workers
    pids = set(log.read_text().split())
    assert len(pids) >= 2 and str(os.getpid()) not in pids
    (first, disk), (second, disk2) = runs
    assert first == second and disk == disk2
    dry, detect, migrate_plan, pruned, migrated = first
    assert dry["removed"] and pruned["removed"] and migrated["changed"]
    assert any("timestamp in the future" in f["problem"] for f in dry["findings"])
    assert [doc["exit_code"] for doc in first] == [4, 3, 3, 3, 3]  # 4: the guard (dry run)
    for doc in (dry, detect, migrate_plan, pruned, migrated):
        assert len(doc["unreadable"]) == 1 and "code-reviewer/solutions.json: invalid JSON" \
            in doc["unreadable"][0]


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
        spot = 9 + start * aml._ID_ROW.size + 20
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
    with held_by_other_process(s.state_dir):
        before = tree_digest(store)
        code, out, _ = run_cli(store, "get", record["id"], "--format", "json", capsys=capsys)
        assert code == 0 and json.loads(out)["source"] == "scan"
        assert tree_digest(store) == before
    run_cli(store, "optimize", "index", capsys=capsys)
    with held_by_other_process(s.state_dir):
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


@pytest.mark.parametrize("text", ['[]', ' [ ] ', '[{"a": [1, {"b": "]"}]}, 2,"x" ,null]\n',
                                  json.dumps([{"id": "é", "n": 1.5}] * 3, indent=2)])
def test_array_with_offsets_parses_like_json_loads(text):
    items, offsets, _ = aml.scan_json_array(text)  # the one scanner (was _array_with_offsets)
    assert items == json.loads(text) and len(offsets) == len(items)
    assert [json.JSONDecoder().raw_decode(text, at)[0] for at in offsets] == items


@pytest.mark.parametrize("text", ['[1,]', '[1] 2', '{"a": 1}', '[NaN]', '[1', '', '[1 2]'])
@pytest.mark.parametrize("threshold", [0, 10 ** 9])   # element-wise parse, json.loads
def test_load_records_with_offsets_fails_closed_like_load_json_file(tmp_path, monkeypatch, text,
                                                                    threshold):
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", threshold)
    path = tmp_path / "patterns.json"
    path.write_text(text)
    with pytest.raises(aml.CorruptFileError) as caught:
        aml.load_records_with_offsets(path)
    with pytest.raises(aml.CorruptFileError) as expected:
        aml.load_json_file(path, expect=list)
    assert str(caught.value) == str(expected.value)


def test_get_parses_only_the_record_not_its_big_file(store, monkeypatch):
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", 1000)   # every patterns file counts as big
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    wanted = read_data(store / "backend-developer" / "patterns.json")[9]
    real = aml.load_json_file
    monkeypatch.setattr(aml, "load_json_file", lambda p, **k: real(p, **k) if ".aml" in
                        Path(p).parts else pytest.fail("a data file parsed whole"))
    result = aml.get_record(s, wanted["id"])
    assert [(r.record, r.index, r.source) for r in result.records] == [(wanted, 9, "index")]


@pytest.mark.parametrize("text", ["ascii only", "non-ASCII: caf\u00e9 \u2713"])
def test_get_reads_the_record_at_its_offset_in_plain_files(tmp_path, monkeypatch, text):
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", 1000)
    root = build_store(tmp_path / "m", agents=("a",), gz=False)
    path = root / "a" / "patterns.json"
    records = read_data(path)
    records[4]["pattern"]["note"] = text
    path.write_bytes(aml.UTF8_BOM + aml.runtime_json(records).encode("utf-8"))
    s = aml.Store(root)
    aml.MemoryIndex(s).refresh()
    offset = aml.MemoryIndex(s).locate_rows(records[4]["id"])[0][2]
    assert bool(offset & aml._BYTE_OFFSET) == text.isascii()   # bytes only when chars are
    for position in (0, 4, len(records) - 1):
        found = aml.get_record(s, records[position]["id"]).records
        assert [(r.record, r.index) for r in found] == [(records[position], position)]


def test_get_on_a_fresh_index_stats_only_the_file_holding_the_id(store, monkeypatch):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    wanted = read_data(store / "code-reviewer" / "solutions.json")[2]
    monkeypatch.setattr(aml, "_file_stats", lambda *a: pytest.fail("every file stat-ed"))
    result = aml.get_record(s, wanted["id"])
    assert [r.record for r in result.records] == [wanted] and result.source == "index"


def test_get_sees_a_changed_file_holding_the_id(store):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    path = store / "code-reviewer" / "solutions.json"
    records = read_data(path)
    changed = dict(records[2], tags=["edited"])
    write_data(path, [records[0], changed], gz=path.read_bytes()[:2] == b"\x1f\x8b")
    result = aml.get_record(s, changed["id"])
    assert [(r.record, r.index) for r in result.records] == [(changed, 1)]
    assert aml.MemoryIndex(s).stale_files() == []   # the lookup refreshed the index


def test_get_finds_an_id_added_after_indexing_and_documents_the_copy_it_can_miss(store):
    s = aml.Store(store)
    aml.MemoryIndex(s).refresh()
    new = make_pattern("test-automator", random.Random(8))
    path = store / "test-automator" / "patterns.json"
    gz = path.read_bytes()[:2] == b"\x1f\x8b"
    write_data(path, read_data(path) + [new], gz=gz)
    assert [r.record for r in aml.get_record(s, new["id"]).records] == [new]  # refreshed
    # The documented limit: a copy of an indexed id written into another, unchanged-before
    # file is not seen by the quick path until something refreshes the index.
    twin = dict(new, agent="code-reviewer")
    other = store / "code-reviewer" / "patterns.json"
    write_data(other, read_data(other) + [twin], gz=other.read_bytes()[:2] == b"\x1f\x8b")
    assert [r.agent for r in aml.get_record(s, new["id"]).records] == ["test-automator"]
    aml.MemoryIndex(s).refresh()
    assert sorted(r.agent for r in aml.get_record(s, new["id"]).records) == [
        "code-reviewer", "test-automator"]


# ---- issue 13: search fetches its candidates by offset, as get does ----

def _offset_store(tmp_path, monkeypatch):
    """Every kind of file that carries record offsets: gzip, plain ASCII (byte offsets), plain
    with a BOM, plain non-ASCII (character offsets); ids repeat, one record has none."""
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", 0)  # offsets for these small files too
    monkeypatch.setattr(aml, "_SEARCH_READS", 3)       # both ways of reading a plain file
    root = build_store(tmp_path / "s", gz="mixed", patterns=60)
    rng = random.Random(5)
    bom = root / "code-reviewer" / "patterns.json"
    bom.write_bytes(aml.UTF8_BOM + bom.read_bytes())
    wide = [make_pattern("wide", rng, note="café ✓ %d" % i) for i in range(50)]
    wide[7] = dict(wide[3])  # the same record twice in one file
    del wide[9]["id"]
    write_data(root / "wide" / "patterns.json", wide)
    return aml.Store(root, now=NOW)


def _hits(result):
    return [(r.agent, r.file, r.index, r.record) for r in result.records]


@pytest.mark.parametrize("query", [
    dict(limit=5), dict(limit=200), dict(tags=("database",), limit=7),
    dict(text="exponential backoff", limit=9), dict(rtype="pattern", text="incident", limit=40),
    dict(agent="wide", limit=30), dict(text="café", limit=100), dict(tags=("api",))])
def test_search_by_offset_returns_what_a_full_parse_returns(tmp_path, monkeypatch, query):
    s = _offset_store(tmp_path, monkeypatch)
    expected = _hits(aml.search_records(s, aml.SearchQuery(**query), use_index=False))
    assert expected
    aml.MemoryIndex(s).refresh()
    found = aml.search_records(s, aml.SearchQuery(**query))
    assert found.source == "index" and _hits(found) == expected


def test_search_with_a_limit_parses_only_the_records_it_fetches(tmp_path, monkeypatch):
    s = _offset_store(tmp_path, monkeypatch)
    aml.MemoryIndex(s).refresh()

    def whole_file(self, entry):
        raise AssertionError("parsed %s whole" % entry["path"])
    monkeypatch.setattr(aml.MemoryIndex, "load_file", whole_file)
    for query in (dict(limit=20), dict(tags=("testing",), limit=4), dict(agent="wide", limit=9),
                  dict(text="exponential backoff", limit=3)):
        assert aml.search_records(s, aml.SearchQuery(**query)).records


def test_search_by_offset_notices_a_file_changed_since_indexing(tmp_path, monkeypatch):
    s = _offset_store(tmp_path, monkeypatch)
    aml.MemoryIndex(s).refresh()
    path = s.root / "wide" / "patterns.json"
    records = read_data(path)
    records[0]["tags"] = ["changed"]
    write_data(path, records)
    found = aml.search_records(s, aml.SearchQuery(agent="wide", tags=("changed",), limit=5))
    assert [r.record for r in found.records] == [records[0]]


# =============================================================================
# 11. Pruning
# =============================================================================

import shlex  # noqa: E402  (only the crontab tests need it)


def _prune_store(root, gz=False, **kwargs):
    """A generated store whose default prune stays under the mass-deletion guard (seed 3)."""
    return build_store(root, gz=gz, seed=3, **kwargs)


def _one_agent(root, patterns=(), solutions=(), decisions=(), gz=False):
    """A store with one agent 'solo' holding exactly the given records."""
    root = Path(root)
    write_data(root / "config.json", CONFIG)
    for name, records in (("patterns", patterns), ("solutions", solutions),
                          ("decisions", decisions)):
        write_data(root / "solo" / (name + ".json"), list(records), gz)
    return root


def _plan(root, strategies=None, **config):
    store = aml.Store(root, now=NOW)
    return aml.MemoryPruner(store, aml.PruneConfig(**config)).plan(strategies)


def _reasons(result):
    return {r.id: r.reason.value for r in result.removed}


def _all_records(root):
    """{relative file: records} of every agent record file."""
    root = Path(root)
    return {str(p.relative_to(root)): read_data(p) for p in sorted(root.glob("*/*s.json"))
            if p.name in aml.RECORD_FILES}


def _no_backup(monkeypatch):
    monkeypatch.setattr(aml, "safety_backup", lambda *a, **k: pytest.fail("backup taken"))


def _pattern(rng, **kw):
    """A pattern that nothing prunes unless the overrides say so (value 0.7, used recently)."""
    kw.setdefault("last_used", 1)
    kw.setdefault("age", max(kw["last_used"], 10))
    kw.setdefault("success", 0.7)
    kw.setdefault("count", 10)
    kw.setdefault("conf", 0.7)
    return make_pattern("solo", rng, **kw)


REASON_CASES = {
    # reason: (kind, over-the-threshold overrides, just-below overrides)
    "unused_too_long": ("p", {"last_used": 91}, {"last_used": 89}),
    "failed_pattern_unused": ("p", {"last_used": 31, "success": 0.1, "count": 2},
                              {"last_used": 29, "success": 0.1, "count": 2}),
    "low_success_rate": ("p", {"success": 0.19, "count": 3}, {"success": 0.21, "count": 3}),
    "low_confidence": ("p", {"conf": 0.14}, {"conf": 0.16}),
    "decision_too_old": ("d", {"age": 181}, {"age": 179}),
    "negative_outcome": ("d", {"age": 5, "would_repeat": False}, {"age": 5, "would_repeat": True}),
    "failed_solution": ("s", {"age": 5, "worked": False}, {"age": 5, "worked": True}),
    "outdated_solution": ("s", {"age": 5, "worked": True, "supersededBy": "b"},
                          {"age": 5, "worked": True}),
}


@pytest.mark.parametrize("reason", sorted(REASON_CASES))
def test_each_reason_triggers_and_not_below_its_threshold(tmp_path, reason):
    kind, over, under = REASON_CASES[reason]
    rng = random.Random(7)
    make = {"p": _pattern,
            "s": lambda r, **kw: make_solution("solo", r, verifiedCount=0, **kw),
            "d": lambda r, **kw: make_decision("solo", r, **kw)}[kind]
    hit, miss = make(rng, **over), make(rng, **under)
    if kind == "d" and "would_repeat" not in over:
        hit.pop("outcome", None)
        miss.pop("outcome", None)
    files = {"p": "patterns", "s": "solutions", "d": "decisions"}[kind]
    root = _one_agent(tmp_path / "m", **{files: [hit, miss]})
    assert _reasons(_plan(root)) == {hit["id"]: reason}


def test_reason_details_name_the_triggering_values(tmp_path):
    rng = random.Random(1)
    rec = _pattern(rng, success=0.1, count=8)
    result = _plan(_one_agent(tmp_path / "m", patterns=[rec]), ["performance_based"])
    assert result.removed[0].details == {"success_rate": 0.1, "min_success_rate": 0.2,
                                         "execution_count": 8, "min_execution_count": 3}


def test_pinned_and_high_value_records_survive(tmp_path):
    rng = random.Random(2)
    pinned = _pattern(rng, last_used=300, conf=0.05, pinned=True)
    tagged = _pattern(rng, last_used=300, conf=0.05)
    tagged["tags"] = ["pinned"]
    valuable = _pattern(rng, last_used=300, success=0.95, count=50, conf=0.95)
    plain = _pattern(rng, last_used=300)
    root = _one_agent(tmp_path / "m", patterns=[pinned, tagged, valuable, plain])
    assert set(_reasons(_plan(root))) == {plain["id"]}
    removed = set(_reasons(_plan(root, preserve_high_value=False)))
    assert removed == {plain["id"], valuable["id"]}


def test_record_without_time_is_not_time_pruned_and_future_is_a_finding(tmp_path):
    rng = random.Random(4)
    timeless = _pattern(rng)
    timeless.pop("timestamp")
    timeless["evolution"] = {"confidenceScore": 0.7}
    future = _pattern(rng)
    future["evolution"]["lastUsed"] = "2027-06-01T00:00:00Z"
    result = _plan(_one_agent(tmp_path / "m", patterns=[timeless, future]))
    assert result.removed == []
    assert [f["id"] for f in result.findings] == [future["id"]]
    assert "future" in result.findings[0]["problem"]


def test_aggressive_thresholds(tmp_path):
    rng = random.Random(5)
    stale = _pattern(rng, last_used=65)
    weak = _pattern(rng, success=0.25, count=5)
    old_decision = make_decision("solo", rng, age=125)
    old_decision.pop("outcome", None)
    root = _one_agent(tmp_path / "m", patterns=[stale, weak], decisions=[old_decision])
    assert _plan(root).removed == []
    assert _reasons(_plan(root, aggressive=True)) == {
        stale["id"]: "unused_too_long", weak["id"]: "low_success_rate",
        old_decision["id"]: "decision_too_old"}
    config = aml.PruneConfig(aggressive=True, pattern_max_age_days=40).effective()
    assert (config.pattern_max_age_days, config.decision_max_age_days,
            config.min_success_rate) == (40, 120, 0.30)


def test_mixed_timestamp_styles_in_one_file(tmp_path):
    rng = random.Random(6)
    records = []
    for style in ("z", "naive", "offset"):
        for days in (100, 80):
            rec = _pattern(rng, last_used=days)
            rec["evolution"]["lastUsed"] = ts(days, style=style)
            records.append(rec)
    result = _plan(_one_agent(tmp_path / "m", patterns=records))
    assert set(_reasons(result)) == {r["id"] for r in records[0::2]}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_dry_run_changes_nothing_and_lists_every_record(tmp_path, capsys, gz):
    root = _prune_store(tmp_path / "m", gz=gz)
    before = tree_digest(root)
    code, out, _ = run_cli(root, "prune", "--dry-run", "--list", "--now", NOW_TEXT,
                           capsys=capsys)
    assert code == 0 and tree_digest(root) == before and not (root / ".aml").exists()
    code, doc, _ = run_cli(root, "prune", "--dry-run", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    removed = json.loads(doc)["removed"]
    lines = [line for line in out.splitlines() if line.startswith("would remove ")]
    assert len(lines) == len(removed) > 10 and json.loads(doc)["bytes_estimated"] is True
    assert all(r["id"] in line and r["reason"] in line for r, line in zip(removed, lines))
    assert tree_digest(root) == before and not (root / ".aml").exists()


def _spliced_and_encoded(make_store, argv, tmp_path, monkeypatch):
    """Run ``argv`` on two identical stores, spliced and (forced) re-encoded; returns the
    data-file digests of both and how often the splice produced the bytes."""
    used, real = [], aml.remove_array_elements
    digests = []
    for name, splice in (("a", True), ("b", False)):
        root = make_store(tmp_path / name)
        monkeypatch.setattr(aml, "remove_array_elements",
                            (lambda *a: used.append(1) or real(*a)) if splice else
                            (lambda *a: None))
        monkeypatch.setattr(aml, "safety_backup", lambda s, reason, config=None: "snap-1")
        assert run_cli(root, *argv) == 0
        monkeypatch.undo()
        digests.append(tree_digest(root, skip_state=True))
    return digests[0], digests[1], len(used)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_prune_splices_files_byte_identically_to_reencoding(tmp_path, monkeypatch, gz):
    spliced, encoded, used = _spliced_and_encoded(
        lambda root: _prune_store(root, gz=gz), ["prune", "--now", NOW_TEXT, "-q"],
        tmp_path, monkeypatch)
    assert spliced == encoded and used > 0
    assert spliced != tree_digest(_prune_store(tmp_path / "c", gz=gz), skip_state=True)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_real_run_keeps_format_and_every_remaining_record(tmp_path, capsys, gz):
    root = _prune_store(tmp_path / "m", gz=gz)
    before = _all_records(root)
    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    result = json.loads(doc)
    assert code == 0 and result["removed"] and result["bytes_after"] < result["bytes_before"]
    gone = {(r["file"], r["index"]) for r in result["removed"]}
    for rel, records in _all_records(root).items():
        assert ((root / rel).read_bytes()[:2] == b"\x1f\x8b") == gz
        assert records == [r for i, r in enumerate(before[rel]) if (rel, i) not in gone]
    archive = aml.Archive(aml.Store(root)).load(result["run_id"])
    assert sorted((e["file"], e["index"], e["reason"]) for e in archive["entries"]) == sorted(
        (r["file"], r["index"], r["reason"]) for r in result["removed"])
    assert all(e["record"] == before[e["file"]][e["index"]] for e in archive["entries"])
    assert aml.Store(root).last_operation("prune")["summary"]["run_id"] == result["run_id"]


def test_real_run_takes_the_safety_backup_first(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m")
    before = tree_digest(root)
    calls = []

    def backup(store, reason, config=None):
        calls.append(tree_digest(root, skip_state=True) == before)
        return "snap-1"

    monkeypatch.setattr(aml, "safety_backup", backup)
    result = aml.MemoryPruner(aml.Store(root, now=NOW)).run()
    assert calls == [True] and result.backup_id == "snap-1"


def test_failed_safety_backup_stops_before_any_change(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m")
    before = tree_digest(root)

    def no_backup(store, reason, config=None):
        raise aml.RefusedError("backup is not available")

    monkeypatch.setattr(aml, "safety_backup", no_backup)
    with pytest.raises(aml.RefusedError):
        aml.MemoryPruner(aml.Store(root, now=NOW)).run()
    assert tree_digest(root, skip_state=True) == before
    assert aml.Archive(aml.Store(root)).runs() == []


def _sorted_by_id(records):
    return sorted(records, key=lambda r: json.dumps(r, sort_keys=True))


def test_undo_restores_exactly_and_keeps_a_reappeared_id_beside_it(tmp_path, capsys):
    root = _prune_store(tmp_path / "m", gz="mixed")
    before = _all_records(root)
    plain = {p: p.read_bytes() for p in (root / "code-reviewer").glob("*.json")}
    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    run_id = json.loads(doc)["run_id"]
    assert any(p.read_bytes() != raw for p, raw in plain.items())
    code, out, _ = run_cli(root, "prune", "--undo", run_id, capsys=capsys)
    assert code == 0 and "restored" in out and _all_records(root) == before
    assert all(p.read_bytes() == raw for p, raw in plain.items())  # key order kept too
    code, out, _ = run_cli(root, "prune", "--undo", run_id, capsys=capsys)
    assert code == 0 and "already undone" in out and _all_records(root) == before

    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    second = json.loads(doc)
    back = second["removed"][0]
    path = root / back["file"]
    again = dict(before[back["file"]][back["index"]], tags=["re-learned"])
    write_data(path, read_data(path) + [again], gz=path.read_bytes()[:2] == b"\x1f\x8b")
    result = aml.undo_run(aml.Store(root, now=NOW), second["run_id"])
    # "Present" is decided by content (issue 18): a changed record with the archived one's id
    # does not stand in for it, so both are there after the undo and nothing is lost.
    assert result.skipped == [] and result.restored == len(second["removed"])
    expected = {rel: records + ([again] if rel == back["file"] else [])
                for rel, records in before.items()}
    assert {k: _sorted_by_id(v) for k, v in _all_records(root).items()} == {
        k: _sorted_by_id(v) for k, v in expected.items()}


def test_undo_restores_a_gc_run_with_the_same_entry_schema(tmp_path):
    rng = random.Random(8)
    keep, lost = _pattern(rng), _pattern(rng)
    root = _one_agent(tmp_path / "m", patterns=[keep], gz=True)
    store = aml.Store(root, now=NOW)
    aml.Archive(store).save("gc_20261120_120000_abcdef", "gc", [{
        "agent": "solo", "file": "solo/patterns.json", "type": "pattern", "id": lost["id"],
        "index": 0, "reason": "duplicate", "details": {}, "record": lost}])
    result = aml.undo_run(store, "gc_20261120_120000_abcdef")
    assert result.restored == 1 and read_data(root / "solo" / "patterns.json") == [lost, keep]
    assert (root / "solo" / "patterns.json").read_bytes()[:2] == b"\x1f\x8b"


def test_undo_refuses_archive_entries_outside_the_store(tmp_path):
    root = _one_agent(tmp_path / "m", patterns=[_pattern(random.Random(9))])
    store = aml.Store(root, now=NOW)
    aml.Archive(store).save("gc_x", "gc", [{"agent": "solo", "file": "../evil/patterns.json",
                                            "type": "pattern", "id": "a", "index": 0,
                                            "reason": "r", "details": {}, "record": {}}])
    with pytest.raises(aml.IntegrityError):
        aml.undo_run(store, "gc_x")
    assert not (tmp_path / "evil").exists()


def _part_doc(path):
    """An archive part decoded: {"format", "sha256", "payload"}."""
    return json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))


def test_archive_is_a_manifest_and_one_checksummed_gzip_part_per_file(tmp_path):
    root = _prune_store(tmp_path / "m", gz="mixed")
    before = _all_records(root)
    result = aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    folder = root / ".aml" / "archive" / result.run_id
    manifest = aml.read_checksummed(folder / "manifest.json")
    assert manifest["status"] == "complete" and manifest["operation"] == "prune"
    parts = sorted(folder.glob("part-*.json.gz"))
    assert manifest["counts"] == {"entries": len(result.removed), "parts": len(parts)}
    assert len(parts) == len({r.file for r in result.removed}) > 1
    for part in parts:
        doc = _part_doc(part)
        body = json.dumps(doc["payload"], sort_keys=True, ensure_ascii=False)
        assert doc["sha256"] == hashlib.sha256(body.encode("utf-8")).hexdigest()
        entries = doc["payload"]["entries"]
        assert len({e["file"] for e in entries}) == 1
        for entry in entries:  # the record is stored once, as its exact text
            assert "record" not in entry
            assert entry["record_text"] == json.dumps(before[entry["file"]][entry["index"]],
                                                      ensure_ascii=False, separators=(",", ":"))
    assert not list((root / ".aml" / "archive").glob("*.json"))


def test_corrupt_archive_part_refuses_undo_before_any_change(tmp_path):
    root = _prune_store(tmp_path / "m")
    result = aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    last = sorted((root / ".aml" / "archive" / result.run_id).glob("part-*.json.gz"))[-1]
    doc = _part_doc(last)
    doc["payload"]["entries"][0]["index"] += 1  # tampered, checksum left as it was
    last.write_bytes(gzip.compress(json.dumps(doc).encode("utf-8")))
    pruned = tree_digest(root, skip_state=True)
    with pytest.raises(aml.IntegrityError, match="checksum"):
        aml.undo_run(aml.Store(root, now=NOW), result.run_id)
    assert tree_digest(root, skip_state=True) == pruned
    last.write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(aml.IntegrityError, match="unreadable archive part"):
        aml.undo_run(aml.Store(root, now=NOW), result.run_id)
    assert [r["run_id"] for r in aml.list_runs(aml.Store(root)) if "problem" in r] == []


def test_crash_while_archiving_changes_no_data_file_and_rerun_completes(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m", gz=True)
    before = tree_digest(root)
    real_write = aml.atomic_write_bytes
    parts = []

    def flaky_write(path, data, mode=None):
        if Path(path).name.startswith("part-"):
            parts.append(path)
            if len(parts) == 2:
                raise OSError(28, "No space left on device")
        return real_write(path, data, mode)

    monkeypatch.setattr(aml, "atomic_write_bytes", flaky_write)
    with pytest.raises(OSError):
        aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    monkeypatch.undo()
    assert tree_digest(root, skip_state=True) == before
    store = aml.Store(root, now=NOW)
    [run] = aml.list_runs(store)
    assert run["status"] == "writing" and run["records"] > 0
    undo = aml.undo_run(store, run["run_id"])  # every archived record is still in its file
    assert undo.restored == 0 and len(undo.skipped) == run["records"]
    assert tree_digest(root, skip_state=True) == before
    second = aml.MemoryPruner(store, aml.PruneConfig(create_backup=False)).run()
    assert second.exit_code == 0 and second.removed


def test_prune_and_undo_never_hold_two_parsed_files_at_once(tmp_path, monkeypatch):
    import weakref

    class Records(list):
        """A list that can be weakly referenced, to see which loaded arrays are still alive."""

    root = _prune_store(tmp_path / "m", agents=tuple("agent-%d" % i for i in range(6)))
    alive, peak = [], [0]
    real_load = aml.load_json_text   # every parse of a data file goes through it

    def tracking_load(path, expect=None, **kwargs):
        data, fmt, text = real_load(path, expect, **kwargs)
        if not isinstance(data, list):
            return data, fmt, text
        alive[:] = [ref for ref in alive if ref() is not None]
        data = Records(data)
        alive.append(weakref.ref(data))
        peak[0] = max(peak[0], len(alive))
        return data, fmt, text

    monkeypatch.setattr(aml, "load_json_text", tracking_load)
    store = aml.Store(root, now=NOW)
    config = aml.PruneConfig(create_backup=False, agent_memory_limit=20000)
    planned = aml.MemoryPruner(store, config).plan()
    result = aml.MemoryPruner(store, config).run(force=True)
    assert len(result.removed) >= len(planned.removed) > 0
    assert aml.undo_run(store, result.run_id).restored == len(result.removed)
    assert peak[0] == 1  # of 18 record files: never two parsed at once


@pytest.mark.parametrize("bom,newline,gz", [(False, False, False), (True, True, False),
                                            (False, True, True)])
def test_array_writer_gives_the_runtime_bytes_one_record_at_a_time(bom, newline, gz):
    # prune's memory bound needs encode_json to serialize an array one element at a time;
    # the bytes must stay exactly those of json.dumps(indent=2) on the whole document.
    rng = random.Random(15)
    records = [make_pattern("a", rng) for _ in range(3)] + [
        {}, [], {"nested": [[], {}, [1, {"x": "line\nbreak \u2028 é ☃"}]]}, "text", 1.5, None]
    fmt = aml.FileFormat(gzip=gz, bom=bom, trailing_newline=newline)
    for doc in (records, [], [{}], {"not": ["an array"]}):
        expected = ((b"\xef\xbb\xbf" if bom else b"") + json.dumps(
            doc, indent=2, ensure_ascii=False).encode("utf-8") + (b"\n" if newline else b""))
        data = aml.encode_json(doc, fmt)
        assert (gzip.decompress(data) if gz else data) == expected


def test_undo_puts_back_what_gc_archived(tmp_path):
    root = _prune_store(tmp_path / "m", gz="mixed")
    path = root / "code-reviewer" / "solutions.json"
    zipped = path.read_bytes()[:2] == b"\x1f\x8b"
    orphan = {k: v for k, v in read_data(path)[0].items() if k != "id"}  # gc: missing_id
    write_data(path, read_data(path)[:3] + [orphan] + read_data(path)[3:], gz=zipped)
    before = _all_records(root)
    store = aml.Store(root, now=NOW)
    result = aml.collect_garbage(store)
    assert result.run_id and orphan not in read_data(path)
    [run] = aml.list_runs(store)
    assert (run["operation"], run["status"], run["records"]) == ("gc", "complete", 1)
    assert aml.undo_run(store, result.run_id).restored == 1
    assert _all_records(root) == before and (path.read_bytes()[:2] == b"\x1f\x8b") == zipped


def test_mass_deletion_guard_refuses_then_force_works(tmp_path, capsys):
    rng = random.Random(10)
    root = _one_agent(tmp_path / "m", patterns=[_pattern(rng, last_used=200) for _ in range(6)]
                      + [_pattern(rng) for _ in range(4)])
    before = tree_digest(root)
    code, _, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, capsys=capsys)
    assert code == 4 and "solo" in err and "60%" in err and "--force" in err
    assert tree_digest(root, skip_state=True) == before
    code, _, err = run_cli(root, "prune", "--dry-run", "--now", NOW_TEXT, capsys=capsys)
    assert code == 4 and "would refuse" in err
    code, _, _ = run_cli(root, "prune", "--no-backup", "--force", "--now", NOW_TEXT,
                         capsys=capsys)
    assert code == 0 and len(read_data(root / "solo" / "patterns.json")) == 4


@pytest.mark.parametrize("payload", [gzip.compress(b"[" + b"{}," * 50 + b"{}]")[:-9],
                                     b'[{"id": "a"},', b'{"id": "a"}', b'[{"x": NaN}]'],
                         ids=["truncated-gzip", "invalid-json", "object", "nan"])
def test_unreadable_file_is_untouched_and_the_rest_is_pruned(tmp_path, capsys, payload):
    root = _prune_store(tmp_path / "m")
    other = root / "backend-developer" / "patterns.json"
    count = len(read_data(other))
    bad = root / "code-reviewer" / "patterns.json"
    bad.write_bytes(payload)
    code, _, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, capsys=capsys)
    assert code == 3 and "code-reviewer/patterns.json" in err
    assert bad.read_bytes() == payload and len(read_data(other)) < count


def test_held_fresh_lock_means_store_busy_and_that_file_unchanged(tmp_path, capsys):
    root = _prune_store(tmp_path / "m", gz=True)
    held = root / "backend-developer" / "patterns.json"
    raw = held.read_bytes()
    lock = Path(str(held) + ".lock")
    lock.mkdir()
    before = _all_records(root)
    code, _, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--lock-timeout",
                           "0.2", capsys=capsys)
    assert code == 5 and "store busy" in err and held.read_bytes() == raw and lock.is_dir()
    assert len(read_data(root / "code-reviewer" / "patterns.json")) < len(
        before["code-reviewer/patterns.json"])
    run_id = aml.Archive(aml.Store(root)).runs()[0]
    entries = aml.Archive(aml.Store(root)).load(run_id)["entries"]
    assert entries and not any(e["file"] == "backend-developer/patterns.json" for e in entries)


def test_runtime_change_between_plan_and_write_is_replanned(tmp_path, monkeypatch):
    rng = random.Random(11)
    stale, fresh = _pattern(rng, last_used=200), _pattern(rng)
    root = _one_agent(tmp_path / "m", patterns=[stale, fresh] + [_pattern(rng) for _ in range(3)])
    path = root / "solo" / "patterns.json"
    newcomer = _pattern(rng)
    real_rewrite = aml.Store.rewrite

    def runtime_writes_first(self, target, expect=list):
        write_data(path, [newcomer] + read_data(path))  # the runtime prepends a record
        return real_rewrite(self, target, expect)

    monkeypatch.setattr(aml.Store, "rewrite", runtime_writes_first)
    result = aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    assert [r.id for r in result.removed] == [stale["id"]] and result.removed[0].index == 1
    assert [r["id"] for r in read_data(path)][:2] == [newcomer["id"], fresh["id"]]
    assert aml.Archive(aml.Store(root)).load(result.run_id)["entries"][0]["index"] == 1


def test_crash_on_second_file_leaves_files_old_or_new_and_rerun_completes(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m", gz="mixed")
    before = _all_records(root)
    fail_nth_replace(monkeypatch, counts=lambda dst: Path(dst).name in aml.RECORD_FILES)
    with pytest.raises(OSError):
        aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    monkeypatch.undo()
    store = aml.Store(root, now=NOW)
    entries = aml.Archive(store).load(aml.Archive(store).runs()[0])["entries"]
    for rel, records in _all_records(root).items():
        gone = {e["index"] for e in entries if e["file"] == rel}
        assert records in (before[rel], [r for i, r in enumerate(before[rel]) if i not in gone])
    assert not [p for p in root.rglob("*") if aml.TMP_MARKER in p.name]
    second = aml.MemoryPruner(store, aml.PruneConfig(create_backup=False)).run()
    assert second.exit_code == 0
    assert _reasons(aml.MemoryPruner(aml.Store(root, now=NOW)).plan()) == {}
    assert second.removed and {r.id for r in second.removed} <= {e["id"] for e in entries}


def test_space_based_ends_measured_under_the_limit(tmp_path, capsys):
    root = _prune_store(tmp_path / "m", agents=("backend-developer", "code-reviewer"))
    store = aml.Store(root, now=NOW)
    size = aml.agent_disk_bytes(store, "backend-developer")
    limit = int(size * 0.8)
    pinned = read_data(root / "backend-developer" / "patterns.json")
    pinned[0]["pinned"] = True
    write_data(root / "backend-developer" / "patterns.json", pinned)
    untouched = tree_digest(root / "code-reviewer")
    store.ensure_state_dir()
    (root / ".aml" / "config.json").write_text(json.dumps(
        {"prune": {"agent_memory_limit": limit, "create_backup": False}}))
    code, doc, _ = run_cli(root, "prune", "space_based", "--agents", "backend-developer",
                           "--now", NOW_TEXT, "--format", "json", capsys=capsys)
    result = json.loads(doc)
    assert code == 0 and result["removed"]
    assert {r["reason"] for r in result["removed"]} == {"memory_limit_exceeded"}
    assert aml.agent_disk_bytes(store, "backend-developer") <= limit
    assert result["agents"][0]["bytes_after"] == aml.agent_disk_bytes(store, "backend-developer")
    assert read_data(root / "backend-developer" / "patterns.json")[0]["pinned"] is True
    assert tree_digest(root / "code-reviewer") == untouched


def test_space_based_iterates_when_the_estimate_was_optimistic(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m", gz=True, agents=("backend-developer",))
    store = aml.Store(root, now=NOW)
    limit = int(aml.agent_disk_bytes(store, "backend-developer") * 0.85)
    real_estimate = aml._FilePlan.estimate
    monkeypatch.setattr(aml._FilePlan, "estimate", lambda self, i: 1.5 * real_estimate(self, i))
    config = aml.PruneConfig(agent_memory_limit=limit, create_backup=False)
    result = aml.MemoryPruner(store, config).run(["space_based"])
    assert result.space_iterations >= 2 and result.findings == []
    assert aml.agent_disk_bytes(store, "backend-developer") <= limit


def test_space_based_store_limit_spreads_over_agents(tmp_path):
    root = _prune_store(tmp_path / "m", gz=True)
    store = aml.Store(root, now=NOW)
    limit = int(aml.store_disk_bytes(store) * 0.9)
    config = aml.PruneConfig(global_memory_limit=limit, create_backup=False)
    result = aml.MemoryPruner(store, config).run(["space_based"])
    assert {r.details["scope"] for r in result.removed} == {"store"}
    assert aml.store_disk_bytes(store) <= limit and result.bytes_after <= limit


@pytest.mark.parametrize("rtype,record,value", [
    ("PATTERN", {"metrics": {"successRate": 0.9, "executionCount": 3},
                 "evolution": {"confidenceScore": 0.7}}, 0.8),
    ("PATTERN", {"metrics": {"successRate": 0.9, "executionCount": 2},
                 "evolution": {"confidenceScore": 0.7}}, 0.7),
    ("PATTERN", {}, 0.0),
    ("SOLUTION", {"effectiveness": {"worked": True}, "verifiedCount": 3}, 0.9),
    ("SOLUTION", {"verifiedCount": 1}, 0.4),
    ("SOLUTION", {"effectiveness": {"worked": True}, "supersededBy": "x"}, 0.0),
    ("DECISION", {"outcome": {"wouldRepeat": True}}, 0.9),
    ("DECISION", {}, 0.5),
])
def test_value_score_is_the_documented_formula(rtype, record, value):
    facts = aml.record_facts(aml.RecordType[rtype], record)
    assert aml.record_value(facts, aml.PruneConfig()) == pytest.approx(value)


def test_space_based_dry_run_says_it_estimates(tmp_path):
    root = _prune_store(tmp_path / "m", agents=("backend-developer",))
    limit = int(aml.agent_disk_bytes(aml.Store(root), "backend-developer") * 0.8)
    result = _plan(root, ["space_based"], agent_memory_limit=limit)
    assert result.bytes_estimated and result.removed
    assert result.agents[0].bytes_after <= limit


def test_config_precedence_store_then_aml_config_then_flags(tmp_path, capsys):
    rng = random.Random(12)
    at95, at65 = _pattern(rng, last_used=95), _pattern(rng, last_used=65)
    root = _one_agent(tmp_path / "m", patterns=[at95, at65] + [_pattern(rng) for _ in range(4)])
    config = dict(CONFIG, pruning={"enabled": True, "maxAgeDays": 100, "minConfidence": 0.1})
    write_data(root / "config.json", config)

    def dry(*extra):
        code, doc, _ = run_cli(root, "prune", "--dry-run", "--now", NOW_TEXT, "--format", "json",
                               *extra, capsys=capsys)
        doc = json.loads(doc)
        return code, {r["id"] for r in doc["removed"]}, doc["config"]

    code, removed, cfg = dry()
    assert removed == set() and cfg["pattern_max_age_days"] == 100
    assert cfg["min_confidence_score"] == 0.1
    aml_config = tmp_path / "aml.json"
    aml_config.write_text('{"prune": {"pattern_max_age_days": 70}}')
    assert dry("--config", aml_config)[1] == {at95["id"]}
    assert dry("--config", aml_config, "--aggressive")[1] == {at95["id"], at65["id"]}
    aml_config.write_text('{"prune": {"pattern_max_age_days": "soon"}}')
    code, _, err = run_cli(root, "prune", "--dry-run", "--config", aml_config, capsys=capsys)
    assert code == 2 and "pattern_max_age_days" in err


def test_pruning_disabled_in_store_config_refuses_without_force(tmp_path, capsys):
    rng = random.Random(13)
    root = _one_agent(tmp_path / "m", patterns=[_pattern(rng, last_used=200)]
                      + [_pattern(rng) for _ in range(3)])
    write_data(root / "config.json", dict(CONFIG, pruning={"enabled": False}))
    code, _, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, capsys=capsys)
    assert code == 4 and "pruning.enabled=false" in err
    code, _, _ = run_cli(root, "prune", "--no-backup", "--force", "--now", NOW_TEXT,
                         capsys=capsys)
    assert code == 0 and len(read_data(root / "solo" / "patterns.json")) == 3


def test_positional_strategies_are_the_original_spelling(tmp_path, capsys):
    root = _prune_store(tmp_path / "m")

    def removed(*words):
        code, doc, _ = run_cli(root, "prune", *words, "--dry-run", "--now", NOW_TEXT,
                               "--format", "json", capsys=capsys)
        assert code == 0
        return json.loads(doc)

    positional = removed("time_based")
    assert positional["strategies"] == ["time_based"]
    assert {r["reason"] for r in positional["removed"]} <= {
        "unused_too_long", "failed_pattern_unused", "decision_too_old"}
    assert removed("time_based", "performance_based") == removed(
        "--strategies", "time_based", "performance_based")
    code, _, err = run_cli(root, "prune", "time_baked", capsys=capsys)
    assert code == 2 and "time_baked" in err


def test_list_runs_is_read_only(tmp_path, capsys):
    root = _prune_store(tmp_path / "m")
    code, out, _ = run_cli(root, "prune", "--list-runs", capsys=capsys)
    assert code == 0 and out == "" and not (root / ".aml").exists()
    run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "-q", capsys=capsys)
    code, out, _ = run_cli(root, "prune", "--list-runs", capsys=capsys)
    assert code == 0 and out.startswith("prune_20261120_120000_") and "records" in out


def _crontab_commands():
    """Each crontab.example job as tokens, with its variables expanded."""
    vars_, jobs = {}, []
    for line in (HERE / "crontab.example").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if sep and name.isidentifier() and " " not in name:
            vars_[name] = shlex.split(value)[0] if value else ""
            continue
        command = " ".join(line.split()[5:])
        for key in sorted(vars_, key=len, reverse=True):
            command = command.replace("${%s}" % key, vars_[key]).replace("$" + key, vars_[key])
        jobs.append(shlex.split(command))
    return jobs


def _aml_args(tokens):
    script = next(i for i, t in enumerate(tokens) if t.endswith("aml.py") or t == "aml")
    return tokens[:script], tokens[script + 1:]


def test_every_crontab_line_parses():
    jobs = [j for j in _crontab_commands() if any(t.endswith("aml.py") for t in j)]
    assert jobs
    for tokens in jobs:
        _, argv = _aml_args(tokens)
        args = aml.build_parser().parse_args(argv)
        assert callable(args.func)


def test_crontab_prune_line_runs_in_a_cron_environment(tmp_path):
    root = _prune_store(tmp_path / "memory")
    # The line has no --now, so records age with the real clock: lift the guard (via the
    # store's own aml config file) so the test does not depend on today's date.
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text('{"prune": {"max_removal_share": 1.0}}')
    job = next(j for j in _crontab_commands() if "prune" in j)
    _, argv = _aml_args(job)
    argv[0] = str(root)  # the memory path comes first
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, str(HERE / "aml.py")] + argv, cwd=str(elsewhere),
                          env=cron_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    store = aml.Store(root)
    summary = store.last_operation("prune")["summary"]
    assert summary["removed"] > 0 and summary["backup_id"]
    backup = store.last_operation("backup")["summary"]
    assert backup["backup_id"] == summary["backup_id"] and backup["verified"] is True


# ---- issue 11: old-style decision outcomes ----

def test_old_style_decision_outcomes_count_as_negative(tmp_path):
    rng = random.Random(11)

    def decision(outcome):
        rec = make_decision("solo", rng, age=5)
        rec["outcome"] = outcome
        return rec

    snake_no = decision({"would_repeat": False, "lessons_learned": ["slow"]})
    snake_yes = decision({"would_repeat": True})
    low_mean = decision({"success_metrics": {"speed": 0.2, "quality": 0.4, "note": "n/a"}})
    ok_mean = decision({"success_metrics": {"speed": 0.5, "quality": 0.6}})
    camel_no = decision({"successMetrics": {}, "lessonsLearned": [], "wouldRepeat": False})
    root = _one_agent(tmp_path / "m", decisions=[snake_no, snake_yes, low_mean, ok_mean, camel_no])
    result = _plan(root, ["performance_based"])
    assert _reasons(result) == {r["id"]: "negative_outcome" for r in (snake_no, low_mean, camel_no)}
    details = {r.id: r.details for r in result.removed}
    assert details[snake_no["id"]] == {"would_repeat": False}
    assert details[low_mean["id"]] == {"success_metrics_mean": pytest.approx(0.3)}
    # A negative outcome has no value, so high-value preservation never keeps it.
    facts = aml.record_facts(aml.RecordType.DECISION, low_mean)
    assert facts.negative_outcome and aml.record_value(facts, aml.PruneConfig()) == 0.0


# ---- issue 11: the mass-deletion refusal is one bounded line ----

def test_mass_deletion_refusal_names_a_few_agents_and_the_count(tmp_path, capsys):
    rng = random.Random(13)
    root = tmp_path / "m"
    write_data(root / "config.json", CONFIG)
    agents = ["agent-%02d-with-a-long-descriptive-name" % n for n in range(40)]
    for agent in agents:  # 3 of 4 patterns unused for 200 days: prune would take 75 %
        stale = [make_pattern(agent, rng, age=300, last_used=200, success=0.7, count=10,
                              conf=0.6) for _ in range(3)]
        fresh = make_pattern(agent, rng, age=10, last_used=1, success=0.7, count=10, conf=0.7)
        write_data(root / agent / "patterns.json", stale + [fresh])
    for argv in (("prune", "--no-backup"), ("optimize", "gc", "--no-backup")):
        if argv[0] == "optimize":  # 3 of 4 solutions lack their body: gc would take 75 %
            for agent in agents:
                (root / agent / "patterns.json").unlink()
                write_data(root / agent / "solutions.json", [
                    {"id": "x-%s-%d" % (agent, n), "agent": agent} for n in range(3)] + [
                    make_solution(agent, rng)])
        before = tree_digest(root, skip_state=True)
        code, _, err = run_cli(root, *argv, "--now", NOW_TEXT, capsys=capsys)
        lines = err.strip().splitlines()
        assert code == 4 and len(lines) == 1 and len(lines[0]) < 400, err
        assert agents[0] in lines[0] and agents[3] not in lines[0] and agents[-1] not in lines[0]
        assert "and 37 more agents (40 in all)" in lines[0]
        assert tree_digest(root, skip_state=True) == before
    assert aml.first_few(["a", "b"], "agent") == "a, b"
    assert aml.first_few(list("abcd"), "agent") == "a, b, c and 1 more agent (4 in all)"
# ---- issue 18: undo returns the store to its pre-run state ----

def _texts(root):
    """{file: decompressed bytes} of every agent record file (gzip undone, order kept)."""
    out = {}
    for path in sorted(Path(root).glob("*/*s.json")):
        raw = path.read_bytes()
        out[str(path.relative_to(root))] = (raw[:2] == b"\x1f\x8b",
                                            gzip.decompress(raw) if raw[:2] == b"\x1f\x8b"
                                            else raw)
    return out


def _gc_mess(root, gz):
    """One agent with exact duplicates and a same-id conflict among enough good records."""
    rng = random.Random(18)
    good = [_pattern(rng) for _ in range(10)]
    dup = _pattern(rng)
    newer = _pattern(rng, last_used=1)
    older = dict(_pattern(rng, last_used=50), id=newer["id"])  # same id, other content
    patterns = good[:3] + [dup, dict(dup)] + good[3:6] + [older, newer, dict(dup)] + good[6:]
    return _one_agent(root, patterns=patterns, gz=gz)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_undo_of_gc_puts_back_exact_duplicates_and_id_conflicts(tmp_path, capsys, gz):
    root = _gc_mess(tmp_path / "m", gz)
    before, texts = _all_records(root), _texts(root)
    code, doc, _ = run_cli(root, "optimize", "gc", "--no-backup", "--format", "json",
                           capsys=capsys)
    gc = json.loads(doc)["steps"]["gc"]
    assert code == 0 and gc["by_reason"] == {"duplicate": 2, "id_conflict": 1}
    code, out, _ = run_cli(root, "prune", "--undo", gc["run_id"], capsys=capsys)
    assert code == 0 and "restored 3 records, skipped 0" in out
    assert _all_records(root) == before and _texts(root) == texts  # byte for byte, gzip kept
    code, out, _ = run_cli(root, "prune", "--undo", gc["run_id"], capsys=capsys)
    assert code == 0 and "already undone" in out and _all_records(root) == before


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_undo_of_prune_puts_back_every_record_sharing_an_id(tmp_path, capsys, gz):
    rng = random.Random(19)
    old = _pattern(rng, last_used=200)
    other = dict(_pattern(rng, last_used=300), id=old["id"])  # same id, other content
    patterns = [_pattern(rng) for _ in range(8)]
    patterns[2:2] = [old, dict(old)]
    patterns[6:6] = [other]
    root = _one_agent(tmp_path / "m", patterns=patterns, gz=gz)
    before, texts = _all_records(root), _texts(root)
    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    run = json.loads(doc)
    assert code == 0 and [r["id"] for r in run["removed"]] == [old["id"]] * 3
    kept = [p for p in patterns if p["id"] != old["id"]]
    assert _all_records(root)["solo/patterns.json"] == kept
    result = aml.undo_run(aml.Store(root, now=NOW), run["run_id"])
    assert (result.restored, result.skipped, result.not_restored) == (3, [], [])
    assert _all_records(root) == before and _texts(root) == texts


def test_undo_after_a_crash_between_files_restores_the_pre_run_set(tmp_path, monkeypatch):
    root = _prune_store(tmp_path / "m", gz="mixed")
    before = _all_records(root)
    data = lambda dst: Path(dst).name in aml.RECORD_FILES  # noqa: E731
    fail_nth_replace(monkeypatch, n=3, counts=data)
    with pytest.raises(OSError):
        aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    monkeypatch.undo()
    assert _all_records(root) != before  # two files were pruned, the third was not
    run_id = aml.Archive(aml.Store(root)).runs()[0]
    result = aml.undo_run(aml.Store(root, now=NOW), run_id)
    assert _all_records(root) == before and result.not_restored == []
    assert result.skipped  # the records of the files the crash left untouched


def test_gc_crash_after_its_part_then_undo_restores_the_pre_run_set(tmp_path, monkeypatch):
    root = _gc_mess(tmp_path / "m", gz=True)
    before = _all_records(root)
    data = lambda dst: Path(dst).name in aml.RECORD_FILES  # noqa: E731
    fail_nth_replace(monkeypatch, n=1, counts=data)  # the part is written, the file is not
    with pytest.raises(OSError):
        aml.collect_garbage(aml.Store(root, now=NOW))
    monkeypatch.undo()
    assert _all_records(root) == before
    run_id = aml.Archive(aml.Store(root)).runs()[0]
    result = aml.undo_run(aml.Store(root, now=NOW), run_id)
    assert result.restored == 0 and len(result.skipped) == 3  # all still in the file
    assert _all_records(root) == before


def test_undo_that_cannot_restore_a_file_says_why_and_stays_not_undone(tmp_path, capsys,
                                                                        monkeypatch):
    root = _prune_store(tmp_path / "m")
    before = _all_records(root)
    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    run_id = json.loads(doc)["run_id"]
    real = aml.atomic_write_bytes
    full = str(root / "code-reviewer" / "patterns.json")

    def no_space(path, data, mode=None):
        if str(path) == full:
            raise OSError(28, "No space left on device")
        return real(path, data, mode)

    monkeypatch.setattr(aml, "atomic_write_bytes", no_space)
    code, out, err = run_cli(root, "prune", "--undo", run_id, capsys=capsys)
    assert code == 1 and "code-reviewer/patterns.json" in err and "No space left" in err
    assert aml.Archive(aml.Store(root)).manifest(run_id)["undone"] is None
    monkeypatch.undo()
    code, out, _ = run_cli(root, "prune", "--undo", run_id, capsys=capsys)
    assert code == 0 and _all_records(root) == before
    assert aml.Archive(aml.Store(root)).manifest(run_id)["undone"]


import signal  # noqa: E402  (only the kill -9 tests need it)

_KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import aml
n, when, calls, real = int(sys.argv[2]), sys.argv[3], [0], os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == n and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if calls[0] == n and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
code = aml.main(sys.argv[4:])
print("replaces", calls[0])
sys.exit(code)
"""


def _killed_run(root, argv, n, when):
    """Run aml in a subprocess that SIGKILLs itself at its n-th os.replace (before or after)."""
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(HERE), str(n), when, str(root)]
                          + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=120)
    return proc


@pytest.mark.parametrize("command", [["prune", "--no-backup", "--now", NOW_TEXT],
                                     ["optimize", "gc", "--no-backup"]], ids=["prune", "gc"])
def test_kill_9_then_undo_returns_the_exact_pre_run_record_set(tmp_path, command):
    def fresh(name):
        root = _prune_store(tmp_path / name / "m", gz="mixed")
        for path in list(root.glob("*/patterns.json"))[:2]:  # something for gc to remove
            records = read_data(path)
            older = dict(records[1], id=records[0]["id"], timestamp=ts(399))
            write_data(path, records[:3] + [records[2], older] + records[3:],
                       gz=path.read_bytes()[:2] == b"\x1f\x8b")
        return root

    counted = fresh("count")
    total = _killed_run(counted, command, 0, "never")
    assert total.returncode == 0, total.stderr
    uninterrupted = _all_records(counted)
    replaces = int(total.stdout.split()[-1])
    assert replaces > 4

    def undo(root, run_id):
        proc = subprocess.run([sys.executable, str(HERE / "aml.py"), str(root), "prune",
                               "--undo", run_id], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    for n in sorted({1, replaces // 3, replaces // 2, replaces - 2, replaces - 1}):
        for when in ("before", "after"):
            root = fresh("%d-%s" % (n, when))
            before = _all_records(root)
            proc = _killed_run(root, command, n, when)
            assert proc.returncode == -signal.SIGKILL, (n, when, proc.stderr)
            for lock in root.glob("*/*.lock"):  # left by the killed run: let them go stale
                os.utime(str(lock), (time.time() - 60, time.time() - 60))
            assert not [p for p in root.rglob("*") if p.name.endswith(".json")
                        and p.is_file() and ".aml" not in p.parts
                        and not _parses(p)], (n, when)  # no torn file
            killed = aml.Archive(aml.Store(root)).runs()
            if not killed:  # killed before its archive existed: nothing may have changed
                assert _all_records(root) == before, (n, when)
                continue
            rerun = _killed_run(root, command, 0, "never")  # a rerun ends as if never killed
            assert rerun.returncode == 0 and _all_records(root) == uninterrupted, (n, when)
            for run_id in reversed(aml.Archive(aml.Store(root)).runs()):
                undo(root, run_id)  # both runs (same second: in either order)
            assert _all_records(root) == before, (n, when)
            assert not [p for p in root.rglob("*") if aml.is_temp_leftover(p.name)]


def _parses(path):
    try:
        read_data(path)
        return True
    except ValueError:
        return False


# ---- issue 15: evidence-aware scoring (--scoring wilson) ----

def test_wilson_interval_of_thin_and_thick_evidence():
    assert aml.wilson_interval(0, 3) == (0.0, pytest.approx(0.5615, abs=1e-4))
    low, high = aml.wilson_interval(18, 20)
    assert (round(low, 3), round(high, 3)) == (0.699, 0.972)
    assert aml.wilson_interval(0, 0) == (0.0, 1.0) and aml.wilson_interval(5, 5)[1] == 1.0


def _wilson_store(root):
    rng = random.Random(15)
    thin = _pattern(rng, success=0, count=3)        # 0 of 3: not evidence of < 20 %
    thick = _pattern(rng, success=0, count=40)      # 0 of 40: it is
    explicit = _pattern(rng, success=0.1, count=30)  # 3 of 30 by the mean, 0 of 30 counted
    explicit["metrics"].update(successCount=0, failureCount=30)
    stale = _pattern(rng, success=0.1, count=30)     # counts the runtime has moved past
    stale["metrics"].update(successCount=0, failureCount=12)
    return _one_agent(root, patterns=[thin, thick, explicit, stale]), thin, thick, explicit, stale


def test_wilson_scoring_prunes_on_the_upper_bound_with_the_interval_shown(tmp_path, capsys):
    root, thin, thick, explicit, stale = _wilson_store(tmp_path / "m")
    mean = _reasons(_plan(root, ["performance_based"]))
    assert set(mean) == {thin["id"], thick["id"], explicit["id"], stale["id"]}
    result = _plan(root, ["performance_based"], scoring="wilson")
    assert set(_reasons(result)) == {thick["id"], explicit["id"]}
    details = {r.id: r.details for r in result.removed}
    assert details[thick["id"]]["wilson_high"] == pytest.approx(0.0876, abs=1e-4)
    assert (details[explicit["id"]]["successes"], details[explicit["id"]]["trials"]) == (0, 30)
    code, out, _ = run_cli(root, "prune", "performance_based", "--scoring", "wilson",
                           "--dry-run", "--list", "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and "wilson_high=0.088" in out and thin["id"] not in out


def test_wilson_scoring_from_the_aml_config_and_bad_values_refused(tmp_path, capsys):
    root, thin, thick, _, _ = _wilson_store(tmp_path / "m")
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"prune": {"scoring": "wilson"}}))
    code, out, _ = run_cli(root, "prune", "performance_based", "--dry-run", "--list", "--config",
                           config, "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and thick["id"] in out and thin["id"] not in out
    config.write_text(json.dumps({"prune": {"scoring": "bayes"}}))
    code, _, err = run_cli(root, "prune", "--dry-run", "--config", config, capsys=capsys)
    assert code == int(aml.ExitCode.USAGE) and "scoring" in err


def test_wilson_scoring_protects_and_ranks_on_the_lower_bound(tmp_path):
    rng = random.Random(16)
    lucky = _pattern(rng, success=1, count=3, conf=0.9)      # mean value 0.95: protected
    proven = _pattern(rng, success=0.98, count=200, conf=0.9)
    facts = [aml.record_facts(aml.RecordType.PATTERN, r) for r in (lucky, proven)]
    mean, wilson = aml.PruneConfig(), aml.PruneConfig(scoring="wilson")
    assert all(aml.is_protected(f, mean) for f in facts)
    assert [aml.is_protected(f, wilson) for f in facts] == [False, True]
    assert aml.record_value(facts[0], wilson) < aml.record_value(facts[1], wilson)



# ---- issue 13: prune notices a changed file by its text ----

@pytest.mark.parametrize("rewrite_as", ["compact", "gzip"])
def test_runtime_rewriting_the_same_records_between_plan_and_write(tmp_path, monkeypatch,
                                                                   rewrite_as):
    rng = random.Random(12)
    stale = _pattern(rng, last_used=200)
    others = [_pattern(rng) for _ in range(4)]
    root = _one_agent(tmp_path / "m", patterns=[others[0], stale] + others[1:])
    path = root / "solo" / "patterns.json"
    real_rewrite = aml.Store.rewrite

    def runtime_rewrites(self, target, expect=list):
        records = read_data(path)   # the same records, written another way
        if rewrite_as == "compact":
            path.write_text(json.dumps(records, separators=(",", ":")))
        else:
            write_data(path, records, gz=True)
        return real_rewrite(self, target, expect)

    monkeypatch.setattr(aml.Store, "rewrite", runtime_rewrites)
    result = aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    assert [r.id for r in result.removed] == [stale["id"]] and result.removed[0].index == 1
    assert read_data(path) == others
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (rewrite_as == "gzip")

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
    fail_nth_replace(monkeypatch)
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


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_gc_splices_files_byte_identically_to_reencoding(tmp_path, monkeypatch, gz):
    def make(root):
        root = build_store(root, gz=gz)
        seed_defects(root)
        return root

    spliced, encoded, used = _spliced_and_encoded(make, ["optimize", "gc", "-q"], tmp_path,
                                                  monkeypatch)
    assert spliced == encoded and used == 1
    assert spliced != tree_digest(make(tmp_path / "c"), skip_state=True)


def test_gc_serialises_only_records_whose_id_repeats_and_ignores_key_order(tmp_path,
                                                                          monkeypatch):
    root = build_store(tmp_path / "m", agents=("a",), gz=False)
    path = root / "a" / "patterns.json"
    records = read_data(path)
    reordered = dict(reversed(list(records[3].items())))   # same content, other key order
    write_data(path, records + [reordered])
    canon = []
    real = aml._canonical
    monkeypatch.setattr(aml, "_canonical", lambda r: canon.append(r) or real(r))
    result = aml.collect_garbage(aml.Store(root), dry_run=True)
    assert [(e["reason"], e["index"], e["details"]) for e in result.removed] == [
        ("duplicate", len(records), {"duplicate_of_index": 3})]
    assert canon == [records[3], reordered]   # nothing else was serialised


def test_compress_and_decompress_keep_a_fresh_index_fresh(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a", "b"), gz=False)
    s = aml.Store(root)
    aml.MemoryIndex(s).refresh()
    write_data(root / "b" / "patterns.json", [make_pattern("b", random.Random(4))])  # stale
    aml.transcode_store(s, True, age_days=0)
    assert aml.MemoryIndex(s).stale_files() == ["b/patterns.json"]
    aml.MemoryIndex(s).refresh()
    aml.transcode_store(s, False)
    assert aml.MemoryIndex(s).stale_files() == []
    monkeypatch.setattr(aml, "index_file_part", lambda *a: pytest.fail("a file re-indexed"))
    wanted = read_data(root / "a" / "decisions.json")[1]
    assert [r.record for r in aml.get_record(s, wanted["id"]).records] == [wanted]
    assert [r.record for r in aml.search_records(s, aml.SearchQuery(agent="a")).records] == [
        r for name in ("decisions", "patterns", "solutions")
        for r in read_data(root / "a" / (name + ".json"))]


def test_compress_leaves_files_with_record_offsets_to_the_next_refresh(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a",), gz=False)
    big = root / "a" / "patterns.json"
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", big.stat().st_size - 1)  # only this file
    s = aml.Store(root)
    aml.MemoryIndex(s).refresh()
    aml.transcode_store(s, True, age_days=0)
    assert aml.MemoryIndex(s).stale_files() == ["a/patterns.json"]   # byte offsets are gone
    wanted = read_data(big)[3]
    assert [r.record for r in aml.get_record(s, wanted["id"]).records] == [wanted]
    offset = aml.MemoryIndex(s).locate_rows(wanted["id"])[0][2]
    assert offset is not None and not offset & aml._BYTE_OFFSET   # now a character offset


def test_gc_crash_midway_leaves_files_whole_and_rerun_finishes(store, monkeypatch):
    seed_defects(store)
    path = store / "code-reviewer" / "solutions.json"
    write_data(path, read_data(path) + [read_data(path)[0]],
               gz=path.read_bytes()[:2] == b"\x1f\x8b")
    # Archive writes (manifest, part) are not counted: the second data file's write fails.
    fail_nth_replace(monkeypatch, counts=lambda dst: ".aml" not in Path(dst).parts,
                     err=(28, "No space left on device"))
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


def test_gc_refuses_when_backup_fails_and_skips_unparseable(store, capsys, monkeypatch):
    seed_defects(store)
    (store / "code-reviewer" / "decisions.json").write_bytes(b"[1,")
    before = tree_digest(store)

    def no_backup(*args, **kwargs):
        raise aml.RefusedError("backup failed: disk full")

    monkeypatch.setattr(aml, "safety_backup", no_backup)
    code, _, err = run_cli(store, "optimize", "gc", capsys=capsys)
    assert code == 4 and "backup" in err
    monkeypatch.undo()
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


# ---- issue 11: compress takes its safety backup only when a file qualifies ----

def test_compress_takes_no_safety_backup_when_no_file_qualifies(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2"), patterns=5, gz=True)
    taken = []
    monkeypatch.setattr(aml, "safety_backup", lambda store, reason, *a, **k: taken.append(
        reason) or "full_test_%d" % len(taken))
    before = tree_digest(root, skip_state=True)
    for action in ("compress", "all"):
        code, out, err = run_cli(root, "optimize", action, "--age-days", "0", "--now", NOW_TEXT,
                                 capsys=capsys)
        assert code == 0 and taken == [] and "safety backup" not in out, (action, out, err)
    assert tree_digest(root, skip_state=True) == before
    write_data(root / "a2" / "solutions.json", read_data(root / "a2" / "solutions.json"))
    code, out, _ = run_cli(root, "optimize", "all", "--age-days", "0", "--now", NOW_TEXT,
                           capsys=capsys)
    assert code == 0 and taken == ["before optimize all"] and "safety backup full_test_1" in out
    assert read_data(root / "a2" / "solutions.json") and _is_gzip(root / "a2" / "solutions.json")


def _is_gzip(path):
    return Path(path).read_bytes()[:2] == b"\x1f\x8b"


# ---- issue 13: compress, largest file first on every worker ----

def _sized_store(root):
    root = build_store(root, agents=("a1", "a2", "a3"), patterns=5, solutions=3, decisions=2)
    write_data(root / "a2" / "patterns.json",
               [make_pattern("a2", random.Random(n)) for n in range(120)])
    write_data(root / "a3" / "decisions.json",
               [make_decision("a3", random.Random(n)) for n in range(60)])
    return root


def test_compress_starts_with_the_largest_file_and_reports_in_store_order(tmp_path,
                                                                          monkeypatch):
    root = _sized_store(tmp_path / "m")
    started, real = [], aml._transcode_one
    monkeypatch.setattr(aml, "_transcode_one", lambda path, *a: started.append(path) or
                        real(path, *a))
    store = aml.Store(root, now=NOW)
    files = [p.relative_to(root).as_posix() for p in aml._agent_data_files(store)]
    sizes = {f: (root / f).stat().st_size for f in files}
    result = aml.transcode_store(store, True, age_days=0, workers=1)
    assert [Path(p).relative_to(root).as_posix() for p in started] == sorted(
        files, key=lambda f: -sizes[f])
    assert result.files == files and started[0].endswith("a2/patterns.json")


def test_compress_on_many_workers_writes_what_one_worker_writes(tmp_path, monkeypatch):
    """Chunked deflate on threads inside threads over files: the same verified bytes."""
    monkeypatch.setattr(aml, "GZIP_PARALLEL_MIN", 2048)
    monkeypatch.setattr(aml, "_GZIP_CHUNK", 4096)
    outputs = []
    for workers in (1, 6):
        root = _sized_store(tmp_path / ("w%d" % workers))
        before = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.json")}
        result = aml.transcode_store(aml.Store(root, now=NOW), True, age_days=0,
                                     workers=workers)
        assert result.workers == min(workers, len(result.files)) and not result.unreadable
        after = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.json")}
        for name in result.files:
            assert gzip.decompress(after[name]) == before[name]
        outputs.append(after)
    assert outputs[0] == outputs[1]


# ---- issue 15: consolidation (optimize dedupe) ----

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(rng, n):
    """``n`` made-up lowercase words: texts that share nothing by chance."""
    return " ".join("".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 9)))
                    for _ in range(n))


def _distinct_pattern(agent, rng, **kw):
    rec = make_pattern(agent, rng, **kw)
    rec["pattern"]["approach"] = {"technique": _words(rng, 4), "rationale": _words(rng, 18),
                                  "steps": [_words(rng, 5), _words(rng, 5)]}
    rec["pattern"]["conditions"] = {"whenApplicable": [_words(rng, 4)],
                                    "whenNotApplicable": [_words(rng, 3)]}
    return rec


def _distinct_solution(agent, rng, **kw):
    rec = make_solution(agent, rng, **kw)
    rec["problem"]["errorMessage"] = _words(rng, 8)
    rec["solution"] = {"rootCause": _words(rng, 8), "fixApproach": _words(rng, 10),
                       "prevention": _words(rng, 5)}
    return rec


def _distinct_decision(agent, rng, **kw):
    rec = make_decision(agent, rng, **kw)
    rec["decision"]["question"] = _words(rng, 9) + "?"
    rec["decision"]["context"] = {"component": _words(rng, 1), "notes": _words(rng, 10)}
    rec["decision"]["chosenOption"] = _words(rng, 2)
    return rec


def _twin(record, rng, edit=None):
    """A near-duplicate as agents relearn it: new id, same knowledge, one wording change."""
    twin = json.loads(json.dumps(record))
    twin["id"] = str(uuid.UUID(int=rng.getrandbits(128)))
    if edit is None:
        for path in (("pattern", "approach", "rationale"), ("solution", "fixApproach"),
                     ("decision", "question")):
            holder = aml.dig(twin, *path[:-1])
            if isinstance(holder, dict) and path[-1] in holder:
                holder[path[-1]] += " again"
                break
    else:
        edit(twin)
    return twin


def dedupe_store_dir(root, gz=False, seed=15, twins=None, agent="backend-developer"):
    """One agent with distinct records of each type, plus ``twins`` {file: [records]}."""
    rng = random.Random(seed)
    root = Path(root)
    write_data(root / "config.json", CONFIG)
    files = {"patterns.json": [_distinct_pattern(agent, rng) for _ in range(12)],
             "solutions.json": [_distinct_solution(agent, rng) for _ in range(8)],
             "decisions.json": [_distinct_decision(agent, rng) for _ in range(8)]}
    for name, extra in (twins or {}).items():
        files[name].extend(extra(files[name], rng) if callable(extra) else extra)
    for name, records in files.items():
        write_data(root / agent / name, records, gz)
    return root, files


def _dedupe(root, **kw):
    return aml.dedupe_store(aml.Store(root, now=NOW), **kw)


def test_dedupe_report_finds_planted_twins_and_changes_nothing(tmp_path, capsys):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng), _twin(recs[3], rng)],
             "solutions.json": lambda recs, rng: [_twin(recs[1], rng)],
             "decisions.json": lambda recs, rng: [_twin(recs[2], rng)]}
    root, files = dedupe_store_dir(tmp_path / "m", twins=twins)
    before = tree_digest(root)
    code, out, err = run_cli(root, "optimize", "dedupe", "--now", NOW_TEXT, capsys=capsys)
    assert (code, err) == (0, "")
    assert tree_digest(root) == before and not (root / ".aml").exists()  # inert
    result = _dedupe(root)
    pairs = sorted((c.type, c.survivor_index, m["index"]) for c in result.clusters
                   for m in c.members)
    planted = [("decision", 2, 8), ("pattern", 0, 12), ("pattern", 3, 13), ("solution", 1, 8)]
    assert sorted((t, min(a, b), max(a, b)) for t, a, b in pairs) == planted
    assert result.merged == 4 and "would merge" in out and "+again" in out
    assert all(c.why for c in result.clusters)


def _plain_bytes(path):
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _merge_pair_store(tmp_path, gz):
    rng = random.Random(3)
    root, files = dedupe_store_dir(tmp_path / "m", gz=gz)
    a = files["patterns.json"][4]
    a["metrics"].update(successRate=0.75, executionCount=8)        # 6 of 8 (plain ratio)
    a["evolution"]["lastUsed"] = ts(40)
    a["tags"] = ["database", "api"]
    b = _twin(a, rng)
    b["metrics"].update(successRate=0.5, executionCount=4, errorPreventionCount=5)  # 2 of 4
    b["evolution"]["lastUsed"] = ts(2)
    b["tags"] = ["api", "retries"]
    files["patterns.json"].append(b)
    write_data(root / "backend-developer" / "patterns.json", files["patterns.json"], gz)
    return root, a, b


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_dedupe_apply_supersedes_evidence_adds_up_and_undo_is_byte_exact(tmp_path, gz):
    root, a, b = _merge_pair_store(tmp_path, gz)
    path = root / "backend-developer" / "patterns.json"
    before, content = tree_digest(root), _plain_bytes(path)
    result = _dedupe(root, dry_run=False)
    assert result.merged == 1 and result.run_id
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz           # gzip stays gzip
    records = read_data(path)
    assert [r["id"] for r in records].count(a["id"]) == 1 and b["id"] not in {
        r["id"] for r in records}
    merged = next(r for r in records if r["id"] == a["id"])
    assert merged["metrics"]["executionCount"] == 12
    assert merged["metrics"]["successRate"] == pytest.approx(8 / 12)  # from counts, not 0.625
    assert merged["metrics"]["errorPreventionCount"] == a["metrics"]["errorPreventionCount"] + 5
    assert merged["evolution"]["lastUsed"] == b["evolution"]["lastUsed"]  # latest use wins
    assert merged["tags"] == ["database", "api", "retries"]
    assert list(merged) == list(a)                                   # same layout, key order
    assert all(not aml.runtime_problems(aml.RecordType.PATTERN, r) for r in records)
    entries = aml.Archive(aml.Store(root)).load(result.run_id)["entries"]
    gone = next(e for e in entries if e["id"] == b["id"])
    assert gone["details"]["supersededBy"] == a["id"] and gone["reason"] == "near_duplicate"
    assert gone["record"] == b
    undo = aml.undo_run(aml.Store(root, now=NOW), result.run_id)
    assert (undo.restored, undo.blocked) == (2, [])
    assert _plain_bytes(path) == content and (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    rest = tree_digest(root, skip_state=True)  # the gzip member is aml's (level 6), not ours
    assert {k: v for k, v in rest.items() if k != "backend-developer/patterns.json"} == {
        k: v for k, v in before.items() if k != "backend-developer/patterns.json"}
    assert gz or rest == before
    assert aml.supersede_map(aml.Store(root)) == {}


def _hard_negative(path, value):
    def edit(twin):
        holder = aml.dig(twin, *path[:-1])
        holder[path[-1]] = value(holder[path[-1]]) if callable(value) else value
    return edit


RATIONALE = ("pattern", "approach", "rationale")
HARD_NEGATIVES = {
    "number": ("patterns.json", RATIONALE, lambda t: t + " within 30 seconds", "number",
               lambda t: t + " within 45 seconds"),
    "version": ("patterns.json", RATIONALE, lambda t: t + " on node 18.2", "version",
                lambda t: t + " on node 20.1"),
    "path": ("patterns.json", RATIONALE, lambda t: t + " in src/api/users.ts", "path",
             lambda t: t + " in src/api/orders.ts"),
    "error_code": ("solutions.json", ("problem", "errorMessage"), lambda t: t + " ECONNREFUSED",
                   "error_code", lambda t: t + " ETIMEDOUT"),
    "identifier": ("solutions.json", ("solution", "fixApproach"), lambda t: t + " userId",
                   "identifier", lambda t: t + " orderId"),
    "quoted name": ("solutions.json", ("problem", "errorMessage"), lambda t: t + " 'email'",
                    "identifier", lambda t: t + " 'token'"),
    "negation": ("patterns.json", RATIONALE, lambda t: t, "negation",
                 lambda t: "never " + t),
    "context": ("patterns.json", ("pattern", "context", "language"), lambda t: t, "context",
                lambda t: "python" if t != "python" else "typescript"),
}


@pytest.mark.parametrize("kind", sorted(HARD_NEGATIVES))
def test_dedupe_guard_never_merges_a_different_fact(tmp_path, kind):
    name, path, base, guard, other = HARD_NEGATIVES[kind]

    def plant(recs, rng):
        holder = aml.dig(recs[0], *path[:-1])
        holder[path[-1]] = base(holder[path[-1]])
        return [_twin(recs[0], rng, _hard_negative(path, lambda t: other(
            t[:len(t) - (len(base("")) if base("") else 0)] if base("") else t)))]
    root, files = dedupe_store_dir(tmp_path / "m", twins={name: plant})
    result = _dedupe(root)
    assert result.clusters == [], kind
    assert [h["guard"] for h in result.held_apart] == [guard]
    assert _dedupe(root, dry_run=False).merged == 0


@pytest.mark.parametrize("name,edit,differs", [
    ("solutions.json", lambda t: t["effectiveness"].update(worked=False), "worked"),
    ("decisions.json", lambda t: t.setdefault("outcome", {
        "successMetrics": {}, "lessonsLearned": [], "wouldRepeat": True}).update(
            wouldRepeat=not t["outcome"]["wouldRepeat"]), "wouldRepeat"),
    ("patterns.json", lambda t: t["metrics"].update(successRate=0.05, executionCount=40),
     "success"),
    ("patterns.json", lambda t: t.update(active=False), "active"),
])
def test_dedupe_guard_never_merges_disagreeing_outcomes(tmp_path, name, edit, differs):
    def plant(recs, rng):
        if name == "patterns.json":
            recs[0]["metrics"].update(successRate=0.95, executionCount=40)
        if name == "solutions.json":
            recs[0]["effectiveness"]["worked"] = True
        return [_twin(recs[0], rng, edit)]
    root, _ = dedupe_store_dir(tmp_path / "m", twins={name: plant})
    result = _dedupe(root)
    assert result.clusters == [] and len(result.held_apart) == 1
    assert differs in result.held_apart[0]["differs"]


def test_dedupe_thin_evidence_is_not_a_disagreement(tmp_path):
    # 0 of 2 and 3 of 3: the Wilson intervals overlap, so the evidence merges.
    def plant(recs, rng):
        recs[0]["metrics"].update(successRate=1, executionCount=3)
        return [_twin(recs[0], rng, lambda t: (t["metrics"].update(successRate=0,
                                                                    executionCount=2),
                                               t["pattern"]["approach"].update(
                                                   rationale=t["pattern"]["approach"]
                                                   ["rationale"] + " again")))]
    root, _ = dedupe_store_dir(tmp_path / "m", twins={"patterns.json": plant})
    assert _dedupe(root).merged == 1


def test_dedupe_swapped_conditions_are_not_duplicates(tmp_path):
    def plant(recs, rng):
        cond = recs[0]["pattern"]["conditions"]
        cond["whenApplicable"] += ["large tables"]
        cond["whenNotApplicable"] += ["small tables"]

        def swap(t):
            c = t["pattern"]["conditions"]
            c["whenApplicable"], c["whenNotApplicable"] = c["whenNotApplicable"], c[
                "whenApplicable"]
        return [_twin(recs[0], rng, swap)]
    root, _ = dedupe_store_dir(tmp_path / "m", twins={"patterns.json": plant})
    assert _dedupe(root).clusters == []


def test_dedupe_mass_deletion_guard_refuses_without_force(tmp_path, capsys):
    rng = random.Random(4)
    root = tmp_path / "m"
    write_data(root / "config.json", CONFIG)
    base = _distinct_pattern("a", rng)
    write_data(root / "a" / "patterns.json", [base, _twin(base, rng), _twin(base, rng)])
    before = tree_digest(root)
    code, _, err = run_cli(root, "optimize", "dedupe", "--apply", "--no-backup", capsys=capsys)
    assert code == int(aml.ExitCode.REFUSED) and "--force" in err
    assert tree_digest(root, skip_state=True) == before
    code, out, _ = run_cli(root, "optimize", "dedupe", "--apply", "--no-backup", "--force",
                           capsys=capsys)
    assert code == 0 and len(read_data(root / "a" / "patterns.json")) == 1


def test_dedupe_apply_takes_a_safety_backup_first(tmp_path, capsys):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    code, out, _ = run_cli(root, "optimize", "dedupe", "--apply", "--format", "json",
                           "--now", NOW_TEXT, capsys=capsys)
    doc = json.loads(out)["steps"]["dedupe"]
    assert code == 0 and doc["backup_id"] and doc["merged"] == 1
    assert aml.Store(root).last_operation("dedupe")["summary"]["run_id"] == doc["run_id"]


def test_dedupe_leaves_a_file_locked_by_the_runtime_alone(tmp_path, capsys):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng)],
             "solutions.json": lambda recs, rng: [_twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    locked = root / "backend-developer" / "patterns.json"
    before = locked.read_bytes()
    aml.lock_path_for(locked).mkdir()  # fresh: held by the runtime
    code, _, err = run_cli(root, "optimize", "dedupe", "--apply", "--no-backup",
                           "--lock-timeout", "0.2", capsys=capsys)
    assert code == int(aml.ExitCode.BUSY) and "store busy" in err
    assert locked.read_bytes() == before and aml.lock_path_for(locked).is_dir()
    assert len(read_data(root / "backend-developer" / "solutions.json")) == 8


def test_dedupe_crash_before_the_rewrite_keeps_the_file_and_undo_is_clean(tmp_path, monkeypatch):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    before = tree_digest(root)
    fail_nth_replace(monkeypatch, 1, counts=lambda dst: str(dst).endswith("patterns.json"))
    with pytest.raises(OSError):
        _dedupe(root, dry_run=False)
    monkeypatch.undo()
    assert tree_digest(root, skip_state=True) == before
    run_id = aml.Archive(aml.Store(root)).runs()[0]
    undo = aml.undo_run(aml.Store(root, now=NOW), run_id)
    assert undo.blocked == [] and undo.restored == 0
    assert tree_digest(root, skip_state=True) == before
    assert _dedupe(root, dry_run=False).merged == 1  # a rerun completes


def test_dedupe_chains_are_flattened_and_undo_goes_back_in_order(tmp_path):
    rng = random.Random(8)
    root, files = dedupe_store_dir(tmp_path / "m")
    path = root / "backend-developer" / "patterns.json"
    original = path.read_bytes()
    a = files["patterns.json"][5]
    a["metrics"].update(successRate=0.9, executionCount=10)
    b = _twin(a, rng)
    b["metrics"].update(successRate=1, executionCount=2)
    write_data(path, files["patterns.json"] + [b])
    start = path.read_bytes()
    first = _dedupe(root, dry_run=False)
    assert first.merged == 1
    after_first = path.read_bytes()
    c = _twin(a, rng)  # relearned again later, with more evidence than A
    c["metrics"].update(successRate=0.95, executionCount=100)
    write_data(path, read_data(path) + [c])
    with_c = path.read_bytes()
    second = _dedupe(root, dry_run=False)
    assert second.merged == 1 and second.repointed == 1
    chain = aml.supersede_map(aml.Store(root))
    assert chain["backend-developer/pattern/%s" % b["id"]]["superseded_by"] == c["id"]
    assert chain["backend-developer/pattern/%s" % b["id"]]["merged_into"] == a["id"]
    assert chain["backend-developer/pattern/%s" % a["id"]]["superseded_by"] == c["id"]
    early = aml.undo_run(aml.Store(root, now=NOW), first.run_id)  # A is merged away: wait
    assert early.blocked and early.restored == 0 and early.exit_code == aml.ExitCode.PARTIAL
    assert aml.undo_run(aml.Store(root, now=NOW), second.run_id).restored == 2
    assert path.read_bytes() == with_c
    chain = aml.supersede_map(aml.Store(root))
    assert chain == {"backend-developer/pattern/%s" % b["id"]: {
        "superseded_by": a["id"], "merged_into": a["id"], "run": first.run_id}}
    write_data(path, [r for r in read_data(path) if r["id"] != c["id"]])
    assert path.read_bytes() == after_first
    assert aml.undo_run(aml.Store(root, now=NOW), first.run_id).blocked == []
    assert path.read_bytes() == start != original


def test_dedupe_undo_waits_when_the_survivor_changed_since(tmp_path):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    path = root / "backend-developer" / "patterns.json"
    run = _dedupe(root, dry_run=False)
    records = read_data(path)
    records[0]["evolution"]["lastUsed"] = ts(0)  # the runtime used the survivor meanwhile
    write_data(path, records)
    changed = path.read_bytes()
    undo = aml.undo_run(aml.Store(root, now=NOW), run.run_id)
    assert len(undo.blocked) == 2 and undo.restored == 0  # the merged record waits too
    assert path.read_bytes() == changed and not aml.Archive(aml.Store(root)).manifest(
        run.run_id)["undone"]


def test_optimize_all_merges_only_when_enabled_in_config(tmp_path, capsys):
    twins = {"patterns.json": lambda recs, rng: [_twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    path = root / "backend-developer" / "patterns.json"
    code, out, _ = run_cli(root, "optimize", "all", "--no-backup", "--now", NOW_TEXT,
                           capsys=capsys)
    assert code == 0 and "dedupe" not in out and len(read_data(path)) == 13
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"optimize": {"dedupe": True, "dedupe_threshold": 0.8}}))
    code, out, _ = run_cli(root, "optimize", "all", "--no-backup", "--config", config,
                           "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and "dedupe: merged 1 records" in out and "threshold 0.80" in out
    assert len(read_data(path)) == 12
    assert [e["operation"] for e in aml.Store(root).read_state("history.json")][-5:] == [
        "gc", "dedupe", "compress", "index", "warm-cache"]


@pytest.mark.parametrize("argv", [["optimize", "gc", "--apply"],
                                  ["optimize", "dedupe", "--threshold", "1.5"],
                                  ["optimize", "dedupe", "--threshold", "0"]])
def test_dedupe_flags_are_checked(tmp_path, capsys, argv):
    root, _ = dedupe_store_dir(tmp_path / "m")
    code, _, err = run_cli(root, *argv, capsys=capsys)
    assert code == int(aml.ExitCode.USAGE) and err.startswith("aml: error:")


def test_dedupe_plans_a_file_again_when_the_runtime_changed_it_meanwhile(tmp_path, monkeypatch):
    rng = random.Random(9)
    twins = {"patterns.json": lambda recs, r: [_twin(recs[0], r)]}
    root, files = dedupe_store_dir(tmp_path / "m", twins=twins)
    path = root / "backend-developer" / "patterns.json"
    newcomer = _distinct_pattern("backend-developer", rng)
    real_plan = aml._plan_dedupe

    def plan_then_runtime_writes(*args):
        plans = real_plan(*args)
        write_data(path, [newcomer] + read_data(path))  # every position moves by one
        return plans
    monkeypatch.setattr(aml, "_plan_dedupe", plan_then_runtime_writes)
    result = _dedupe(root, dry_run=False)
    changed_by_runtime = [newcomer] + files["patterns.json"]
    records = read_data(path)
    assert result.merged == 1 and records[0] == newcomer and len(records) == 13
    assert files["patterns.json"][-1]["id"] not in {r["id"] for r in records}
    monkeypatch.undo()
    aml.undo_run(aml.Store(root, now=NOW), result.run_id)
    assert read_data(path) == changed_by_runtime


def test_dedupe_never_merges_records_that_share_an_id(tmp_path):
    # An exact copy under the same id is gc's (duplicate); dedupe leaves both copies alone.
    twins = {"patterns.json": lambda recs, rng: [json.loads(json.dumps(recs[0])),
                                                 _twin(recs[0], rng)]}
    root, _ = dedupe_store_dir(tmp_path / "m", twins=twins)
    result = _dedupe(root)
    assert [(c.survivor_index, [m["index"] for m in c.members]) for c in result.clusters] == []



# ---- issue 14: gc removes exactly the stale locks health warns about ----

def _lock_variants(root, when):
    """Lock folders of every kind, the old ones with mtime ``when``; returns the stale one."""
    stale = root / "code-reviewer" / "patterns.json.lock"
    held = root / "backend-developer" / "solutions.json.lock"
    other = root / "code-reviewer" / "notes.lock"        # no data file's lock
    fresh = root / "test-automator" / "patterns.json.lock"
    inner = root / "code-reviewer" / "x.json.tmp" / "decisions.json.lock"  # inside a transient
    for path in (stale, held, other, fresh, inner):
        path.mkdir(parents=True)
    (held / "owner").write_text("pid")
    (root / "test-automator" / "decisions.json.lock").symlink_to(other)
    state = root / ".aml" / "index.json.lock"
    state.mkdir(parents=True)
    for path in (stale, held, other, inner, state):
        os.utime(path, (when, when))
    return stale


def test_health_and_gc_agree_on_which_lock_folders_are_stale(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    stale = _lock_variants(root, 0)
    # Fresh by any clock: touched a day ahead of the wall clock. The rule at a fixed now= and
    # the CLI's runs (wall clock, as the runtime's; --now moves only the calendar) agree.
    ahead = time.time() + 86400
    os.utime(root / "test-automator" / "patterns.json.lock", (ahead, ahead))
    assert aml.stale_lock_dirs(aml.Store(root), now=1_000_000_000.0) == [stale]
    _, doc, _ = _health(root, capsys=capsys)
    warned = sorted(p["subject"] for p in _check(doc, "structure")["problems"]
                    if "stale runtime lock" in p["message"])
    code, out, _ = run_cli(root, "optimize", "gc", "--dry-run", "--format", "json", "--now",
                           NOW_TEXT, capsys=capsys)
    assert code == 0 and warned == json.loads(out)["steps"]["gc"]["stale_locks"] == [
        "code-reviewer/patterns.json.lock"]
    assert run_cli(root, "optimize", "gc", "--no-backup", "-q", "--now", NOW_TEXT) == 0
    assert not stale.exists() and (root / "backend-developer" / "solutions.json.lock").is_dir()
    assert (root / "code-reviewer" / "notes.lock").is_dir()
    assert (root / ".aml" / "index.json.lock").is_dir()
    _, doc, _ = _health(root, capsys=capsys)
    assert not [p for p in _check(doc, "structure")["problems"] if "lock" in p["subject"]]



# ---- issue 14: optimize() in the library, one step table, store.operation ----

_STEP_HISTORY = {  # what each step records in .aml/history.json (as the CLI always did)
    "gc": ("gc", {"run_id", "removed", "by_reason", "stale_locks", "temp_files",
                  "orphaned_state", "backup_id"}),
    "dedupe": ("dedupe", {"run_id", "merged", "clusters", "held_apart", "backup_id"}),
    "compress": ("compress", {"direction", "files", "bytes_before", "bytes_after", "unreadable",
                              "backup_id"}),
    "decompress": ("compress", {"direction", "files", "bytes_before", "bytes_after",
                                "unreadable", "backup_id"}),
    "index": ("index", {"files", "files_reread", "records", "bytes", "rebuilt"}),
    "warm-cache": ("warm-cache", {"records", "bytes", "budget"}),
}
_ACTION_STEPS = {"all": ["gc", "compress", "index", "warm-cache"], "index": ["index"],
                 "build-index": ["index"], "compress": ["compress"],
                 "decompress": ["decompress"], "warm-cache": ["warm-cache"], "gc": ["gc"],
                 "dedupe": ["dedupe"]}


def _maintenance(root, now):
    report = aml.MemoryMonitor(aml.Store(root, now=now)).health(False, record=False)
    return next(c for c in report.checks if c.name == "maintenance")


def test_library_optimize_writes_history_the_maintenance_check_sees(tmp_path, monkeypatch):
    root = build_store(tmp_path / "m", agents=("a1", "a2"), patterns=6)
    path = root / "a1" / "patterns.json"
    write_data(path, read_data(path) + [read_data(path)[0]])  # an exact duplicate: gc's
    age_files(root, 60)
    taken = []
    monkeypatch.setattr(aml, "safety_backup", lambda store, reason, *a, **k: taken.append(
        reason) or "full_test_%d" % len(taken))
    later = NOW + dt.timedelta(hours=2)
    assert "never run" in _maintenance(root, later).message
    result = aml.optimize(aml.Store(root, now=NOW), "all", aml.OptimizeConfig())
    assert result.order == ["gc", "compress", "index", "warm-cache"] and not result.dry_run
    assert len(result.steps["gc"].removed) == 1 and result.steps["compress"].files
    assert taken == ["before optimize all"]  # gc and compress both change files: one backup
    history = aml.Store(root).read_state("history.json")
    assert [(e["operation"], aml.parse_timestamp(e["started"])) for e in history] == [
        (op, NOW) for op in ("gc", "compress", "index", "warm-cache")]
    assert history[0]["summary"]["backup_id"] == history[1]["summary"]["backup_id"] \
        == "full_test_1"
    check = _maintenance(root, later)
    assert "never run" not in check.message
    assert aml.parse_timestamp(check.details["optimize"]["last_success"]) == NOW
    assert aml.parse_timestamp(check.details["index"]["last_success"]) == NOW
    assert check.details["optimize"]["age_hours"] == 2.0


def test_library_optimize_dry_run_takes_no_lock_and_writes_no_history(tmp_path):
    root = build_store(tmp_path / "m", agents=("a1",), patterns=6)
    age_files(root, 60)
    (root / ".aml").mkdir(mode=0o700)
    before = tree_digest(root)
    with held_by_other_process(root / ".aml"):
        store = aml.Store(root, now=NOW, lock_timeout=0)
        result = aml.optimize(store, "all", aml.OptimizeConfig(dedupe=True), dry_run=True)
        assert result.dry_run and result.order == ["gc", "dedupe", "compress", "index",
                                                   "warm-cache"]
        assert result.steps["compress"].files  # it would compress them
        with pytest.raises(aml.StoreBusyError):  # a real run takes the lock
            aml.optimize(store, "index", aml.OptimizeConfig())
    after = tree_digest(root)
    after.pop(".aml/maintenance.lock", None)
    assert after == before and not (root / ".aml" / "history.json").exists()


@pytest.mark.parametrize("action", sorted(_ACTION_STEPS))
def test_optimize_step_table_covers_every_action(tmp_path, action):
    commands = next(a.choices for a in aml.build_parser()._actions
                    if isinstance(a.choices, dict) and "optimize" in a.choices)
    parser_choices = next(a.choices for a in commands["optimize"]._actions if a.dest == "action")
    assert set(parser_choices) == set(_ACTION_STEPS) == set(aml.OPTIMIZE_ACTIONS)
    assert set(aml.OPTIMIZE_STEPS) == set(_STEP_HISTORY)
    root = build_store(tmp_path / "m", agents=("a1",), patterns=6, gz=action == "decompress")
    age_files(root, 60)
    config = aml.OptimizeConfig(create_backup=False)
    result = aml.optimize(aml.Store(root, now=NOW), action, config, force=True)
    steps = _ACTION_STEPS[action]
    assert result.order == steps == list(aml.optimize_steps(action, config))
    history = aml.Store(root).read_state("history.json")
    assert [(e["operation"], set(e["summary"])) for e in history] == [
        _STEP_HISTORY[step] for step in steps]
    if action in ("compress", "decompress"):
        assert history[0]["summary"]["direction"] == action and history[0]["summary"]["files"]


def test_all_runs_dedupe_second_only_when_the_config_enables_it():
    assert aml.optimize_steps("all", aml.OptimizeConfig(dedupe=True)) == (
        "gc", "dedupe", "compress", "index", "warm-cache")
    with pytest.raises(aml.UsageError):
        aml.optimize_steps("vacuum", aml.OptimizeConfig())


def test_store_operation_records_a_run_only_when_it_ends_with_a_summary(tmp_path):
    store = aml.Store(build_store(tmp_path / "m", agents=("a1",), patterns=2), now=NOW)
    with store.operation("index"):
        pass  # no summary (a dry run): nothing recorded
    with pytest.raises(aml.RefusedError):
        with store.operation("gc") as op:
            op.summary = {"removed": 1}
            raise aml.RefusedError("guard")
    with store.operation("prune") as op:
        op.record({"note": "first"}, "verify")
        op.summary = {"removed": 2}
    seconds = op.seconds
    assert op.seconds == seconds >= 0  # fixed once the block ended
    history = store.read_state("history.json")
    assert [(e["operation"], aml.parse_timestamp(e["started"]), e["summary"])
            for e in history] == [("verify", NOW, {"note": "first"}),
                                  ("prune", NOW, {"removed": 2})]

# ---- issue 15: dedupe recall on short records ----

def _short_decision(agent, rng, question, option, component):
    """A decision as bench_aml writes them: a short question, a short option, a flat context."""
    rec = make_decision(agent, rng, would_repeat=True)
    rec["decision"].update(type="state-management", question=question, chosenOption=option,
                           context={"component": component, "scale": "medium", "teamSize": 7,
                                    "greenfield": False, "ticket": "ARCH-4711"})
    return rec


@pytest.mark.parametrize("change", [" for this team", " for the team", " in this team"])
def test_dedupe_finds_a_short_decision_reworded_with_filler_words(tmp_path, change):
    # A short decision has about 14 shingles: three appended words ("for this team") made
    # three new ones, Jaccard 0.82 < 0.85, and the twin was missed. Words that carry no
    # knowledge are not shingled, so only "team" is new.
    rng = random.Random(7)
    first = _short_decision("backend-developer", rng, "REST or GraphQL for search?",
                            "react-query + local state", "search")
    twin = _twin(first, rng, edit=lambda t: t["decision"].update(
        question=t["decision"]["question"] + change))
    root, _ = dedupe_store_dir(tmp_path / "m", twins={"decisions.json": [first, twin]})
    result = _dedupe(root)
    assert [(c.survivor_id, [m["id"] for m in c.members]) for c in result.clusters] in (
        [(first["id"], [twin["id"]])], [(twin["id"], [first["id"]])])


def test_dedupe_filler_words_never_hide_a_different_fact(tmp_path):
    # The filler words leave the shingles only: the guard still reads every token, so the
    # twin whose question names another ticket is held apart.
    rng = random.Random(7)
    first = _short_decision("backend-developer", rng, "Which cache fits search for ENG-1042?",
                            "redis", "search")
    other = _twin(first, rng, edit=lambda t: t["decision"].update(
        question="Which cache fits search for ENG-1043?"))
    root, _ = dedupe_store_dir(tmp_path / "m", twins={"decisions.json": [first, other]})
    result = _dedupe(root)
    assert result.clusters == []
    assert [h["guard"] for h in result.held_apart] == ["error_code"]


def test_dedupe_odd_knowledge_values_still_shingle_by_field(tmp_path):
    # Words are split per record at a \x01 joining the fields; a field holding \x01 itself,
    # a list of non-strings and a nested context still find their twin, and the copy whose
    # steps moved to another field does not.
    rng = random.Random(3)
    first = _distinct_pattern("backend-developer", rng)
    first["pattern"]["approach"]["rationale"] += " \x01 split \x01 here"
    first["pattern"]["approach"]["steps"] = [3, {"run": "migrate users table"}, "then verify"]
    first["pattern"]["context"] = {"language": "python", "deploy": {"region": "eu"}}
    twin = _twin(first, rng)
    moved = _twin(first, rng, edit=lambda t: t["pattern"]["conditions"].update(
        whenNotApplicable=t["pattern"]["approach"].pop("steps")))
    root, _ = dedupe_store_dir(tmp_path / "m", twins={"patterns.json": [first, twin, moved]})
    result = _dedupe(root)
    assert [sorted([c.survivor_id] + [m["id"] for m in c.members])
            for c in result.clusters] == [sorted([first["id"], twin["id"]])]


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
    ("lifecycle", "last_used_at"): ("evolution", "lastUsed"),
    ("lifecycle", "refinement_count"): ("evolution", "refinements"),
    ("lifecycle", "confidence"): ("evolution", "confidenceScore"),
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
                          "error_prevention_count": m["errorPreventionCount"]}
    out["lifecycle"] = {"created_at": e["created"], "last_used_at": e["lastUsed"],
                        "refinement_count": e["refinements"], "confidence": e["confidenceScore"]}
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
    fail_nth_replace(monkeypatch)
    # main reports the OSError as one "aml: error:" line and exit 1
    assert run_cli(crashed, "migrate", "migrate-latest", "--no-backup", "--now", NOW_TEXT) == 1
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


# ---- issue 11: the older toolkit's real record shape ----

def test_older_toolkit_shape_reads_the_same_facts_and_migrates_to_runtime_records(tmp_path,
                                                                                  fake_backup,
                                                                                  capsys):
    root = versioned_store(tmp_path / "m", "older-tool")
    before = read_data(root / "alpha/patterns.json")
    assert "lifecycle" in before[0] and "confidence" in before[0]["lifecycle"]
    code, out, err = run_cli(root, "migrate", "migrate-latest", capsys=capsys)
    assert code == 0 and "left unchanged" not in err, err
    after = read_data(root / "alpha/patterns.json")
    for old, new in zip(before, after):
        assert runtime_valid("pattern", new) == [] and aml.runtime_problems(
            aml.RecordType.PATTERN, new) == []
        assert_values_preserved(old, new)
        assert new["lifecycle"] == {"state": "active"} and "performance" not in new
        # The one field reader sees the same values in either shape (prune, monitor, search).
        facts_old = aml.record_facts(aml.RecordType.PATTERN, old)
        facts_new = aml.record_facts(aml.RecordType.PATTERN, new)
        for field in ("created", "last_used", "success_rate", "execution_count", "confidence"):
            assert getattr(facts_old, field) is not None
            assert getattr(facts_old, field) == getattr(facts_new, field), field
    assert aml.first_value(before[0], "refinements") == after[0]["evolution"]["refinements"]


# =============================================================================
# 14. Monitoring and alerts
# =============================================================================

import html.parser
import http.server
import re
import shutil
import socket
import fcntl
import threading
import zlib


def _health(root, *extra, capsys, fmt="json"):
    """Run ``monitor health`` and return (exit code, parsed JSON or text, stderr).

    The clock is NOW unless the caller fixes another one: health's outcome depends on the date.
    """
    extra = extra if "--now" in extra else extra + ("--now", NOW_TEXT)
    code, out, err = run_cli(root, "monitor", "health", "--format", fmt, *extra, capsys=capsys)
    return code, (json.loads(out) if fmt == "json" else out), err


def _check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def _record_backup(root, when=None):
    """Record a verified backup whose manifest exists, as section 8 does."""
    manifest = root.parent / "memory-backup" / "snap" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("{}")
    aml.Store(root).record_operation("backup", when or NOW, 0.4, {
        "backup_id": "snap", "type": "full", "verified": True, "manifest": str(manifest),
        "bytes_added": 10, "files": 3})


PINNED_QUERY_MS = 600000


def _make_healthy(root, hits=90, misses=10):
    """A real verified backup, a fresh index built by ``optimize index``, a good hit rate.

    The lookup threshold is pinned high in aml's config file: the performance check times a real
    lookup, and a loaded machine must not turn a healthy store into a WARNING.
    """
    config = Path(root) / ".aml" / "config.json"
    doc = json.loads(config.read_text()) if config.exists() else {}
    doc.setdefault("monitor", {})["query_time_warning_ms"] = PINNED_QUERY_MS
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps(doc))
    assert run_cli(root, "backup", "create", "-q", "--now", NOW_TEXT) == 0
    assert run_cli(root, "optimize", "index", "-q", "--now", NOW_TEXT) == 0
    if hits or misses:
        aml.Store(root).write_state("cache-stats.json",
                                    {"hits": hits, "misses": misses, "updated": NOW_TEXT})


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


def test_metrics_times_a_real_indexed_lookup_without_counting_it(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)

    def performance():
        out = run_cli(root, "monitor", "metrics", "--format", "json", capsys=capsys)[1]
        return json.loads(out)

    assert performance()["performance"]["lookup_ms"] is None  # no index yet: unknown
    assert run_cli(root, "optimize", "index", "-q") == 0
    doc = performance()
    assert doc["performance"]["lookup_ms"] > 0 and " via " in doc["performance"]["lookup_note"]
    assert doc["index_bytes"] == aml.MemoryIndex(aml.Store(root)).size_bytes() > 0
    assert doc["performance"]["last_operations"]["index"]["seconds"] is not None
    assert aml.hot_cache_stats(aml.Store(root)) == {"hits": 0, "misses": 0}
    path = root / "code-reviewer" / "solutions.json"
    write_data(path, read_data(path)[:-1], gz=True)
    doc = performance()
    assert doc["performance"]["lookup_ms"] is None and "stale" in doc["performance"]["lookup_note"]


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


def test_backup_check_needs_a_recent_verified_snapshot_that_exists(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    assert run_cli(root, "backup", "create", "-q", "--now", NOW_TEXT) == 0
    store = aml.Store(root)
    entry = store.last_operation("backup")
    backup_id, manifest = entry["summary"]["backup_id"], Path(entry["summary"]["manifest"])

    def backup_status(*extra):
        return _check(_health(root, *extra, capsys=capsys)[1], "backup")["status"]

    assert backup_status() == "healthy"
    store.record_operation("verify", NOW, 0.1, {"backup_id": backup_id, "ok": False,
                                                  "deep": True})
    assert backup_status() == "warning"  # its latest verify failed
    store.record_operation("verify", NOW, 0.1, {"backup_id": backup_id, "ok": True,
                                                  "deep": True})
    assert backup_status() == "healthy"
    later = NOW + dt.timedelta(days=2)
    assert backup_status("--now", aml.format_timestamp(later)) == "warning"  # > 36 h
    later = NOW + dt.timedelta(days=8)
    assert backup_status("--now", aml.format_timestamp(later)) == "critical"  # > 168 h
    manifest.rename(manifest.with_name("moved"))
    assert backup_status() == "warning"  # its manifest is gone


def test_structure_check_names_stale_locks_leftovers_and_gz_files(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    stale = root / "code-reviewer" / "patterns.json.lock"
    stale.mkdir()
    os.utime(stale, (time.time() - 120, time.time() - 120))
    (root / "code-reviewer" / "solutions.json.lock").mkdir()  # fresh: a writer holds it
    (root / "test-automator" / (".decisions.json" + aml.TMP_MARKER + "1-ab")).write_text("[")
    (root / "test-automator" / "old.json.gz").write_bytes(gzip.compress(b"[]"))
    before = tree_digest(root, skip_state=True)
    code, doc, _ = _health(root, capsys=capsys)
    structure = _check(doc, "structure")
    assert structure["status"] == "warning" and _check(doc, "integrity")["status"] == "healthy"
    assert sorted(p["subject"] for p in structure["problems"]) == [
        "code-reviewer/patterns.json.lock", "test-automator/.decisions.json.aml-tmp-1-ab",
        "test-automator/old.json.gz"]
    assert tree_digest(root, skip_state=True) == before and stale.is_dir()  # reported, not fixed


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
                       r"(('[^']+'|[A-Za-z0-9_.-]+)=(U|-?[0-9.]+(B|ms|%|s|c)?"
                       r"(;[0-9.:]*){0,4}) ?)+$")


def test_nagios_line_format_and_exit_codes(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz="mixed")
    code, out, _ = _health(root, capsys=capsys, fmt="nagios")
    assert code == 1 and out.count("\n") == 1 and NAGIOS_RE.match(out.rstrip("\n")), out
    _make_healthy(root)
    code, out, _ = _health(root, capsys=capsys, fmt="nagios")
    assert code == 0 and out.startswith("AML OK - %s: 7 checks healthy | " % root), out
    assert NAGIOS_RE.match(out.rstrip("\n")) and "cache_hit_rate=90%;50:;" in out
    assert "store_bytes=" in out and ";838860800;0" in out  # critical = 800 MiB
    assert re.search(r" lookup_ms=[0-9.]+ms;%d;" % PINNED_QUERY_MS, out)
    assert "stale_index_files=0;" in out
    # An empty store: no id to look up and no lookups recorded, so performance is unknown.
    empty = build_store(tmp_path / "empty", patterns=0, solutions=0, decisions=0)
    _make_healthy(empty, hits=0, misses=0)
    code, out, _ = _health(empty, capsys=capsys, fmt="nagios")
    assert code == 3 and out.startswith("AML UNKNOWN - %s: performance: " % empty)
    assert NAGIOS_RE.match(out.rstrip("\n")) and "lookup_ms=U" in out


def test_health_that_cannot_run_is_unknown(tmp_path, capsys):
    code, out, err = run_cli(tmp_path / "missing", "monitor", "health", "--format", "nagios",
                             capsys=capsys)
    assert code == 3 and out.startswith("AML UNKNOWN - ") and "does not exist" in err


def test_health_plugin_from_cron_like_environment(tmp_path):
    root = build_store(tmp_path / "m", gz=True)
    result = subprocess.run([sys.executable, str(HERE / "aml.py"), str(root), "monitor", "health",
                             "--format", "nagios"], cwd=str(tmp_path), env=cron_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.startswith("AML WARNING - ") and result.stdout.count("\n") == 1


def test_crontab_monitor_lines_run_in_a_cron_environment(tmp_path):
    root = build_store(tmp_path / "memory", gz=True)
    _make_healthy(root)
    jobs = [j for j in _crontab_commands() if "monitor" in j]
    assert [j[j.index("monitor") + 1] for j in jobs] == ["health", "report", "report"]
    outputs = []
    for number, job in enumerate(jobs):
        _, argv = _aml_args(job)
        argv[0] = str(root)
        if "--output" in argv:
            outputs.append(tmp_path / ("out%d" % number))
            argv[argv.index("--output") + 1] = str(outputs[-1])
        # cron runs the line on the real clock; the store was made at NOW, so fix the clock.
        proc = subprocess.run([sys.executable, str(HERE / "aml.py")] + argv + ["--now", NOW_TEXT],
                              cwd=str(tmp_path), env=cron_env(), capture_output=True, timeout=120)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b""), argv
    assert 'aml_health_overall{store="%s"} 0' % root in _parse_prometheus(
        outputs[0].read_text())["aml_health_overall"]
    assert outputs[1].read_text().startswith("<!DOCTYPE html>")


def test_health_exit_code_is_the_same_for_every_format(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    codes = {fmt: _health(root, capsys=capsys, fmt=fmt)[0] for fmt in ("text", "json", "nagios")}
    assert set(codes.values()) == {1}
    code, out, _ = run_cli(root, "monitor", "health", "-q", capsys=capsys)
    # For cron: one clear line naming what is wrong, and nothing at all when healthy.
    assert code == 1 and out.startswith("AML WARNING - ") and out.count("\n") == 1
    assert "backup: no verified backup yet" in out and " | " not in out


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

    def broken(store):
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
    (root / ".aml").mkdir()
    fd = os.open(str(root / ".aml" / "maintenance.lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another aml process would (own file description)
        code, doc, err = _health(root, "--lock-timeout", "0.3", capsys=capsys)
        metrics = run_cli(root, "monitor", "metrics", "--lock-timeout", "0.3", capsys=capsys)
    finally:
        os.close(fd)
    assert metrics[0] == 0 and "not updated" in metrics[2]
    assert not (root / ".aml" / "metrics-history.json").exists()
    assert code == 1 and doc["status"] == "warning" and "not updated" in err
    assert not (root / ".aml" / "alerts.json").exists()
    assert aml.Store(root).last_operation("health") is None


def _alerts(root, capsys, *extra):
    extra = extra if "--now" in extra else extra + ("--now", NOW_TEXT)
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
    assert "backup" not in _alerts(root, capsys, "--now", "2026-11-22T06:00:00Z")
    resolved = _alerts(root, capsys, "--all", "--now", "2026-11-22T06:00:00Z")["backup"]
    assert resolved["state"] == "resolved" and resolved["resolved_by"] == "auto"
    # Retention: 7 days after resolution the alert is still listed, after 8 it is gone.
    lenient = ("--threshold", "backup_max_age_hours=1000", "--threshold",
               "backup_critical_age_hours=1000")
    _health(root, "--now", "2026-11-29T05:00:00Z", *lenient, capsys=capsys)
    assert "backup" in _alerts(root, capsys, "--all", "--now", "2026-11-29T05:00:00Z")
    _health(root, "--now", "2026-11-30T07:00:00Z", *lenient, capsys=capsys)
    stored = aml.Store(root).read_state("alerts.json")["alerts"]
    assert aml.alert_id("backup", "backup") not in stored and "index" in _alerts(
        root, capsys, "--now", "2026-11-30T07:00:00Z")


def test_manual_resolve_and_reopen(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    _health(root, capsys=capsys)
    alert_key = aml.alert_id("maintenance", "maintenance")
    code, out, _ = run_cli(root, "monitor", "alerts", "--resolve", alert_key, "--now", NOW_TEXT,
                           capsys=capsys)
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


def test_webhook_and_thresholds_from_the_aml_config_file(tmp_path, capsys, webhook):
    url, received = webhook
    root = build_store(tmp_path / "m", agents=("solo",))
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"monitor": {"webhook_url": url, "webhook_timeout": 2,
                                              "agent_memory_warning_mb": 0.001}}))
    code, doc, _ = _health(root, "--config", config, capsys=capsys)
    assert code == 1 and _check(doc, "size")["problems"][0]["subject"] == "solo"
    assert ("firing", "size", "solo") in [(p["event"], p["alert"]["check"], p["alert"]["subject"])
                                          for p in received]
    config.write_text(json.dumps({"monitor": {"agent_memory_warnign_mb": 1}}))
    code, _, err = run_cli(root, "monitor", "health", "--config", config, capsys=capsys)
    assert code == 3 and "agent_memory_warnign_mb" in err


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


def test_webhook_that_never_answers_times_out(tmp_path, capsys):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # connections queue in the kernel; nobody ever answers
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"monitor": {"webhook_timeout": 0.3}}))
    root = build_store(tmp_path / "m")
    try:
        code, doc, err = _health(root, "--config", config, "--webhook",
                                 "http://127.0.0.1:%d/" % silent.getsockname()[1], capsys=capsys)
    finally:
        silent.close()
    assert code == 1 and "timed out" in err and len(doc["alerts"]["open"]) == 3


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
    label = 'store="%s",' % root
    wanted = 'aml_records{%sagent="we\\"ird\\\\agent",type="pattern",state="active"} 40' % label
    assert code == 0 and wanted in families["aml_records"]
    assert "aml_cache_hit_ratio" not in families  # unknown is left out, never a made-up 0
    target = tmp_path / "textfile" / "aml.prom"
    target.parent.mkdir()
    code, out, _ = run_cli(root, "monitor", "report", "--format", "prometheus", "--output", target,
                           capsys=capsys)
    families = _parse_prometheus(target.read_text())
    assert code == 0 and out == "" and os.listdir(target.parent) == ["aml.prom"]
    assert families["aml_health_overall"] == ['aml_health_overall{store="%s"} 1' % root]
    assert 'aml_health_status{%scheck="backup"} 1' % label in families["aml_health_status"]


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
    # store size and records: one total line each; per agent: one line per agent (2 agents)
    assert parser.tags.count("svg") == 4 and parser.tags.count("polyline") == 6
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


# ---- issue 11: monitor metrics totals ----

def test_metrics_give_totals_per_type_agent_and_store_in_every_format(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a1", "a2"), patterns=6, solutions=4,
                       decisions=3, gz="mixed")
    path = root / "a2" / "patterns.json"
    recs = read_data(path)
    recs[0]["active"] = False
    write_data(path, recs + ["not a record", 7], gz=True)
    code, out, _ = run_cli(root, "monitor", "metrics", "--no-save", "--format", "json",
                           capsys=capsys)
    doc = json.loads(out)
    agents = {a["agent"]: a["totals"] for a in doc["agents"]}
    assert code == 0 and agents["a1"] == {"pattern": 6, "solution": 4, "decision": 3, "total": 13}
    assert agents["a2"] == {"pattern": 8, "solution": 4, "decision": 3, "total": 15}
    assert doc["totals"] == {"pattern": 14, "solution": 8, "decision": 6, "total": 28}
    code, out, _ = run_cli(root, "monitor", "metrics", "--no-save", capsys=capsys)
    assert "Records: 28 (14 patterns, 8 solutions, 6 decisions)" in out
    rows = {line.split()[0]: line.split()[3:] for line in out.splitlines()
            if line.startswith(("a1 ", "a2 ", "STORE "))}
    assert rows["a2"] == ["8", "=", "5/1/2", "4", "=", "4/0/0", "3", "=", "3/0/0", "15"]
    assert rows["STORE"] == ["14", "=", "11/1/2", "8", "=", "8/0/0", "6", "=", "6/0/0", "28"]
    code, out, _ = run_cli(root, "monitor", "metrics", "--no-save", "--format", "prometheus",
                           capsys=capsys)
    lines = [line.replace('store="%s",' % root, "") for line in out.splitlines()]
    assert 'aml_agent_records{agent="a2",type="pattern"} 8' in lines
    assert 'aml_store_records{type="decision"} 6' in lines
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("aml_store_records{")) == 28
# ---- issue 17: monitor serve and dashboard charts ----

import signal  # noqa: E402
import urllib.request  # noqa: E402

SERVE_PATHS = ("/metrics", "/api/health", "/api/metrics", "/api/alerts", "/api/dashboard")
PAGE_SECTIONS = ("summary", "health", "alerts", "growth", "sizes", "forecasts", "jobs",
                 "records", "backups")


def grown_store(root, agents, days=6, unreadable_day=None, gz=False):
    """A store measured once a day while it grows: ``monitor metrics --now`` each day, an
    ``optimize index`` every third day, one agent unreadable on ``unreadable_day``."""
    names = ["agent-%02d" % n for n in range(agents)]
    root = build_store(root, agents=names, patterns=10, solutions=3, decisions=2, gz=gz)
    rng = random.Random(7)
    rates = [random.Random(n).lognormvariate(0, 0.8) for n in range(agents)]
    for day in range(days):
        when = (NOW - dt.timedelta(days=days - 1 - day)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for n, agent in enumerate(names):
            path = root / agent / "patterns.json"
            grow = int(rates[n] * (day + 1))   # agents grow at different rates
            records = read_data(path) + [make_pattern(agent, rng) for _ in range(grow)]
            write_data(path, records, gz)
        broken = root / names[-1] / "solutions.json"
        saved = broken.read_bytes()
        if day == unreadable_day:
            broken.write_bytes(b"[{\"id\": ")
        assert run_cli(root, "monitor", "metrics", "-q", "--now", when) in (0, 3)
        broken.write_bytes(saved)
        if day % 3 == 1:
            assert run_cli(root, "optimize", "index", "-q", "--now", when) == 0
    return root


def _doc(root, *thresholds):
    """The dashboard document and page the server would serve now (read-only)."""
    store = aml.Store(root, now=NOW)
    monitor = aml.MemoryMonitor(store, dict(thresholds))
    views = aml.dashboard_views(monitor)
    return json.loads(views["/api/dashboard"][1]), views["/"][1].decode()


def _figures_of(page):
    parser = _SvgCollector()
    parser.feed(page)
    return parser.figures


class _SvgCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.ids, self.in_li = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.ids.append(attrs.get("id"))
        if tag == "figure":
            self.figures.append({"lines": [], "points": [], "legend": [], "ticks": [], "gaps": 0,
                                 "limits": 0, "maintenance": 0, "swatches": [], "bars": 0})
        figure = self.figures[-1] if self.figures else None
        if figure is None:
            return
        if tag == "polyline":
            figure["lines"].append(attrs["stroke"])
            figure["points"].append([tuple(map(float, xy.split(",")))
                                     for xy in attrs["points"].split()])
        if tag == "rect":
            figure["bars"] += 1
        if tag == "li":
            figure["legend"].append("")
            self.in_li = True
        if tag == "span" and "background:" in (attrs.get("style") or "") \
                and "gradient" not in attrs["style"]:
            figure["swatches"].append(attrs["style"].split("background:")[1])
        for kind in ("gap", "limit", "maintenance"):
            if attrs.get("class") == kind:
                figure["gaps" if kind == "gap" else "limits" if kind == "limit"
                       else kind] += 1

    def handle_endtag(self, tag):
        if tag == "li":
            self.in_li = False

    def handle_data(self, data):
        if self.figures and self.in_li:
            self.figures[-1]["legend"][-1] += data
        if self.figures and self.lasttag == "text":
            self.figures[-1]["ticks"].append(data)


@pytest.mark.parametrize("agents", [1, 5, 24, 60])
def test_charts_hold_up_from_one_to_sixty_agents(tmp_path, agents):
    root = grown_store(tmp_path / "m", agents, days=4 if agents == 60 else 6)
    doc, page = _doc(root, ("agent_memory_warning_mb", 0.03), ("agent_memory_critical_mb", 0.05))
    parser = _SvgCollector()
    parser.feed(page)
    assert set(PAGE_SECTIONS) <= set(parser.ids)
    store_size, per_agent, records, agent_records = parser.figures
    shown = min(agents, 8) if agents > 9 else agents
    for figure in (per_agent, agent_records):
        assert len(figure["lines"]) == shown + (agents > 9)       # top 8 + "others"
        assert len(set(figure["lines"])) == len(figure["lines"])  # every series its colour
        assert len(figure["swatches"]) == len(figure["lines"])    # every series in the legend
    assert per_agent["lines"][:shown] == agent_records["lines"][:shown]  # same agent, same hue
    if agents > 9:
        assert any("%d others" % (agents - 8) in item for item in per_agent["legend"])
    assert store_size["lines"] == ["#111111"] and records["lines"] == ["#111111"]  # totals
    assert [t for t in per_agent["ticks"] if re.fullmatch(r"[\d.]+ KiB", t)][1:]  # units
    assert len([t for t in records["ticks"] if re.fullmatch(r"\d+(\.\d+)?( k)?", t)]) >= 3
    assert any(re.fullmatch(r"(2026-)?11-\d\d( \d\d:00)?", t) for t in store_size["ticks"])
    assert per_agent["limits"] >= 1 and any("agent limit warning" in i
                                            for i in per_agent["legend"])
    days = 4 if agents == 60 else 6
    assert store_size["maintenance"] == len([d for d in range(days) if d % 3 == 1]) and "maintenance run" in store_size["legend"][-1]
    assert store_size["gaps"] == per_agent["gaps"] == 0


def test_unreadable_file_is_a_gap_with_a_marker_not_a_drop(tmp_path):
    root = grown_store(tmp_path / "m", 3, days=6, unreadable_day=3)
    doc, page = _doc(root)
    unreadable = [s for s in doc["samples"] if s["agents"]["agent-02"].get("unreadable")]
    assert [s["at"][:10] for s in unreadable] == ["2026-11-18"]
    _store_size, per_agent, records, agent_records = _figures_of(page)
    assert per_agent["gaps"] == 0                      # bytes stay measurable
    assert records["gaps"] == 1 and agent_records["gaps"] == 1
    assert len(agent_records["lines"]) == 4            # agent-02's line broken in two
    assert "not measurable (unreadable file)" in agent_records["legend"][-1]
    for line in agent_records["points"] + records["points"]:  # records only grow: no dip
        heights = [y for _x, y in line]
        assert len(heights) >= 2 and heights == sorted(heights, reverse=True)


def test_one_sample_draws_bars_not_overlapping_dots(tmp_path):
    root = build_store(tmp_path / "m", agents=("a1", "a2", "a3"))
    doc, page = _doc(root)
    assert len(doc["samples"]) == 1                    # only this measurement
    figures = _figures_of(page)
    assert all(f["bars"] and not f["lines"] for f in figures)
    assert figures[1]["bars"] == 3 and "one sample" in " ".join(figures[1]["ticks"])


def test_far_limits_are_named_above_the_scale_not_flattening_lines(tmp_path):
    root = grown_store(tmp_path / "m", 2, days=3)
    _doc_, page = _doc(root)                           # default limits: 600 MiB store
    store_size = _figures_of(page)[0]
    assert store_size["limits"] == 1 and any("above the scale: store limit warning 600.0 MiB"
                                             in t for t in store_size["ticks"])
    assert not any("MiB" in t for t in store_size["ticks"][:8])  # axis stays in KiB


def test_dashboard_ignores_fields_it_does_not_know(tmp_path):
    root = grown_store(tmp_path / "m", 2, days=2)
    doc, page = _doc(root)
    doc["metrics"]["totals"] = {"bytes": 1, "new": [1, 2]}
    doc["health"]["checks"].append({"name": "future", "status": "warning", "message": "m",
                                    "extra": {"x": 1}})
    doc["metrics"]["agents"][0]["records"]["lessons"] = {"active": 2, "inactive": 0,
                                                         "stale": 1}
    doc["jobs"].append({"operation": "new-job", "summary": {"nested": {"a": 1}, "ok": True}})
    doc["backups"] = {"error": "backup root unreadable"}
    page = aml.render_dashboard(doc, refresh=30)
    assert "future" in page and "lessons (active / inactive)" in page and "new-job" in page
    assert 'http-equiv="refresh" content="30"' in page and "backup root unreadable" in page
    for broken in ({}, {"metrics": None, "health": "x", "samples": [None, {"at": "bad"}]}):
        assert "<section id=\"sizes\">" in aml.render_dashboard(broken)


def test_dashboard_cache_measures_at_most_every_interval():
    clock, calls = [100.0], []

    def measure():
        calls.append(clock[0])
        if len(calls) == 3:
            raise aml.IntegrityError("history.json does not verify")
        return {"/": ("text/html", b"page %d" % len(calls))}

    cache = aml.DashboardCache(measure, 30, clock=lambda: clock[0])
    assert cache.views()["/"][1] == b"page 1"
    clock[0] += 29.9
    assert cache.views()["/"][1] == b"page 1" and len(calls) == 1
    clock[0] += 0.1
    assert cache.views()["/"][1] == b"page 2"
    clock[0] += 30
    with pytest.raises(aml.AmlError, match="history.json does not verify"):
        cache.views()
    with pytest.raises(aml.AmlError):
        cache.views()                                  # the failure is not retried at once
    assert len(calls) == 3
    clock[0] += 30
    assert cache.views()["/"][1] == b"page 4"


def _fetch(url, method="GET"):
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@contextlib.contextmanager
def _served(root, interval=60, thresholds=None):
    """The dashboard server of ``root`` in a thread, on a free port; shut down after."""
    def measure():
        store = aml.Store(root, now=NOW)
        return aml.dashboard_views(aml.MemoryMonitor(store, thresholds), None, 60)

    server = aml.dashboard_server(aml.DashboardCache(measure, interval), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1], server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        assert not thread.is_alive()


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_serve_never_writes_the_store_or_the_backups(tmp_path, capsys, gz):
    root = grown_store(tmp_path / "m", 3, days=3, gz=gz)
    assert run_cli(root, "backup", "create", "-q", "--now", NOW_TEXT) == 0
    (root / "agent-01" / "decisions.json").write_bytes(b"{broken")  # integrity finds it
    bare = build_store(tmp_path / "bare", agents=("x",), gz=gz)       # no .aml/ at all
    before = {p: tree_digest(p) for p in (root, bare, tmp_path / "memory-backup")}
    for target in (root, bare):
        with _served(target, interval=0) as (url, server):  # interval 0: measure every time
            for path in ("/",) + SERVE_PATHS + ("/", "/metrics"):
                assert _fetch(url + path)[0] == 200
    assert {p: tree_digest(p) for p in before} == before
    assert not (bare / ".aml").exists()


def test_serve_answers_match_what_the_cli_prints(tmp_path, capsys):
    root = grown_store(tmp_path / "m", 3, days=3)
    _health(root, "--now", NOW_TEXT, capsys=capsys)   # opens alerts
    capsys.readouterr()
    with _served(root) as (url, server):
        answers = {p: _fetch(url + p) for p in ("/",) + SERVE_PATHS}
        assert _fetch(url + "/nope")[0] == 404 and _fetch(url + "/", "POST")[0] == 501
        assert _fetch(url + "/api/health", "HEAD")[2] == b""
    assert all(code == 200 for code, _h, _b in answers.values())
    assert answers["/metrics"][1]["Content-Type"].startswith("text/plain; version=0.0.4")
    assert answers["/"][1]["Content-Type"] == "text/html; charset=utf-8"
    code, out, _err = run_cli(root, "monitor", "alerts", "--format", "json", "--now", NOW_TEXT,
                              capsys=capsys)
    assert json.loads(answers["/api/alerts"][2]) == json.loads(out) and json.loads(out)["alerts"]
    code, out, _err = run_cli(root, "monitor", "metrics", "--format", "json", "--no-save",
                              "--now", NOW_TEXT, capsys=capsys)
    served, printed = json.loads(answers["/api/metrics"][2]), json.loads(out)
    for doc in (served, printed):   # timings are measured anew by each run
        for key in ("full_load_ms", "lookup_ms"):
            doc["performance"][key] = None
    assert served == printed
    health = json.loads(answers["/api/health"][2])
    assert [c["name"] for c in health["checks"]] == list(aml.MemoryMonitor.CHECKS)
    assert health["alerts"] is None   # the server never evaluates alerts
    prom = answers["/metrics"][2].decode()
    assert "aml_health_overall" in prom and re.search(
        r'aml_alerts_open\{store="[^"]+",level="WARNING"\}', prom)
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=prom, text=True,
                               capture_output=True, timeout=60)
        # Exit 3 is promtool's naming lint (base units: another change's subject); 1 would be
        # text that Prometheus cannot parse.
        assert check.returncode in (0, 3) and "error" not in check.stderr, check.stderr


def test_serve_answers_503_while_the_store_cannot_be_measured(tmp_path):
    def measure():
        raise aml.IntegrityError("alerts.json does not verify")

    server = aml.dashboard_server(aml.DashboardCache(measure, 60), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = "http://127.0.0.1:%d" % server.server_address[1]
        code, _headers, body = _fetch(url + "/api/health")
        assert code == 503 and body == b"aml: measurement failed: alerts.json does not verify\n"
        assert _fetch(url + "/metrics")[0] == 503
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert aml._is_loopback("127.0.0.2") and aml._is_loopback("::1")
    assert aml._is_loopback("localhost") and not aml._is_loopback("0.0.0.0")


def _start_serve(root, *extra, env=None):
    """``aml.py monitor serve --port 0`` as a subprocess; returns (process, base URL)."""
    proc = subprocess.Popen([sys.executable, str(HERE / "aml.py"), str(root), "monitor",
                             "serve", "--port", "0", *extra], cwd=str(root.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+)/ \(measured at most every", line)
    if not match:
        proc.kill()
        raise AssertionError("no serving line: %r %r" % (line, proc.communicate(timeout=30)))
    return proc, match.group(1)


def _stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("monitor serve did not stop within 30 s of %s" % sig)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_subprocess_stops_cleanly_on_signals(tmp_path, sig):
    root = grown_store(tmp_path / "m", 2, days=2)
    before = tree_digest(root)
    proc, url = _start_serve(root, "--now", NOW_TEXT, "--interval", "5")
    try:
        assert _fetch(url + "/api/metrics")[0] == 200
    finally:
        code, err = _stop(proc, sig)
    assert code == 0 and err == ""
    assert tree_digest(root) == before
    with socket.socket() as probe:          # the port is released (TIME_WAIT aside)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        probe.listen(1)


def test_serve_options_and_config(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a",))
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text('{"monitor": {"serve_interval": 0}}')
    code, _out, err = run_cli(root, "monitor", "serve", "--port", "0", capsys=capsys)
    assert code == 2 and "serve interval must be" in err
    (root / ".aml" / "config.json").write_text('{"monitor": {"serve_interval": 7}}')
    assert aml._serve_interval(aml._finish_args(aml.build_parser().parse_args(
        [str(root), "monitor", "serve"])), aml.Store(root)) == 7
    assert aml._serve_interval(aml._finish_args(aml.build_parser().parse_args(
        [str(root), "monitor", "serve", "--interval", "2.5"])), aml.Store(root)) == 2.5
    assert run_cli(root, "monitor", "health", "-q", "--now", NOW_TEXT) in (0, 1)  # key known
    code, _out, err = run_cli(root, "monitor", "serve", "--port", "70000", capsys=capsys)
    assert code == 2 and "--port 70000" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _out, err = run_cli(root, "monitor", "serve", "--port", port, capsys=capsys)
    assert code == 1 and err.startswith("aml: error: cannot listen on 127.0.0.1 port %d" % port)


_MEASURE_JS = """<script>
(function () {
  var w = window.innerWidth, wide = [];
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (r.width > w + 0.5 || r.right > w + 0.5) {
      wide.push(el.tagName + (el.id ? '#' + el.id : '') + ':' + Math.round(r.right));
    }
  });
  var out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify({viewport: w, scroll: document.documentElement.scrollWidth,
                                    wide: wide.slice(0, 20), figures: document.querySelectorAll(
                                      'figure svg').length});
  document.body.appendChild(out);
})();
</script>"""


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(tmp_path, url, *extra, width=1280, height=2000):
    """Headless Chromium on ``url``; returns its stdout (the DOM with --dump-dom)."""
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--no-first-run", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync",
                          "--hide-scrollbars", "--user-data-dir=%s" % (tmp_path / "profile"),
                          "--window-size=%d,%d" % (width, height), *extra, url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(not _chromium(), reason="chromium not installed")
@pytest.mark.parametrize("agents", [1, 24, 60])
def test_serve_page_in_headless_chromium_fits_1280_and_700_px(tmp_path, agents):
    root = grown_store(tmp_path / "m", agents, days=4, unreadable_day=2)
    before = tree_digest(root)
    proc, url = _start_serve(root, "--now", NOW_TEXT, "--threshold",
                             "agent_memory_warning_mb=0.03")
    try:
        dom = _browser(tmp_path, url + "/", "--dump-dom")
        for section in PAGE_SECTIONS:
            assert '<section id="%s">' % section in dom
        assert dom.count("<figure") == 4 and 'name="viewport"' in dom
        for path in SERVE_PATHS:
            code, _headers, body = _fetch(url + path)
            assert code == 200 and body
        page = _fetch(url + "/")[2].decode()
    finally:
        code, err = _stop(proc)
    assert code == 0 and err == ""
    assert tree_digest(root) == before
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _MEASURE_JS + "</body>"))
    for width in (1280, 700):
        dom = _browser(tmp_path, probe.as_uri(), "--dump-dom", "--virtual-time-budget=3000",
                       width=width)
        measured = json.loads(html.unescape(re.search(r'<pre id="measured">(.*?)</pre>',
                                                       dom).group(1)))
        assert measured["viewport"] == width and measured["figures"] == 4
        assert measured["wide"] == [] and measured["scroll"] <= width, measured



def test_monitor_refuses_a_webhook_timeout_the_config_would_refuse(tmp_path):
    store = aml.Store(build_store(tmp_path / "m", agents=("a",)))
    with pytest.raises(aml.UsageError, match=r"^MemoryMonitor: webhook_timeout=0 is not a valid"):
        aml.MemoryMonitor(store, webhook_timeout=0)

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


def test_no_two_top_level_definitions_share_a_name():
    # One file, many sections: a second definition silently replaces the first.
    import ast
    tree = ast.parse((HERE / "aml.py").read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [t.id for t in targets if isinstance(t, ast.Name) and t.id != "__all__"]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_name_is_used_above_the_section_that_defines_it():
    # The section map is a reading order: each section builds only on the ones above it.
    import ast
    source = (HERE / "aml.py").read_text(encoding="utf-8")
    starts = [(number, int(m.group(1))) for number, line in enumerate(source.splitlines(), 1)
              for m in [re.match(r"^# (\d+)\. ", line)] if m]
    assert [n for _, n in starts] == list(range(1, 17))

    def section(line):
        return max(n for start, n in starts if start <= line)
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node]
        for target in targets:
            name = getattr(target, "name", None) or getattr(target, "id", None)
            if name:
                defined.setdefault(name, section(node.lineno))
    early = sorted("%s (section %d) in section %d" % (n.id, defined[n.id], section(top.lineno))
                   for top in tree.body for n in ast.walk(top)
                   if isinstance(n, ast.Name) and defined.get(n.id, 0) > section(top.lineno))
    assert early == []


# ---- issue 11: printed hints name the program as the user typed it ----

def test_undo_hint_is_the_invocation_typed_and_pastes(tmp_path):
    tool, bin_dir = tmp_path / "tool", tmp_path / "bin"
    tool.mkdir()
    bin_dir.mkdir()
    script = tool / "aml.py"
    script.write_bytes((HERE / "aml.py").read_bytes())
    script.chmod(0o755)
    (bin_dir / "aml").symlink_to(script)
    root = _prune_store(tmp_path / "my memory")
    original = _all_records(root)
    env = {"PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                                    "/usr/bin", "/bin"])}
    for typed, program in (([sys.executable, "aml.py"], os.path.basename(sys.executable) + " aml.py"),
                           (["./aml.py"], "./aml.py"), (["aml"], "aml")):
        proc = subprocess.run(typed + [str(root), "prune", "--no-backup", "--now", NOW_TEXT],
                              cwd=str(tool), env=env, capture_output=True, text=True,
                              timeout=120)
        hint = proc.stdout.strip().splitlines()[-1].split("; undo with: ", 1)
        assert proc.returncode == 0 and len(hint) == 2, proc.stdout + proc.stderr
        assert hint[1].startswith("%s '%s' prune --undo prune_" % (program, root)), hint[1]
        assert _all_records(root) != original
        pasted = subprocess.run(hint[1], shell=True, cwd=str(tool), env=env,
                                capture_output=True, text=True, timeout=120)
        assert pasted.returncode == 0, pasted.stderr
        assert _all_records(root) == original


def test_program_invocation_in_process_and_for_another_script():
    assert aml.program_invocation("/usr/bin/pytest") == "aml"
    assert aml.program_invocation("") == "aml"


# =============================================================================
# End to end: the README and a year of cron
# =============================================================================

# The README convention: in a ```sh block every line is a command; in a ```console block the
# lines starting with "$ " are. A command is an aml command when it starts with one of
# README_PROGRAMS. Optional groups in [brackets] are dropped, the command ends at the first
# shell operator (|, ;, &&, >, 2>, &), a trailing "# comment" is ignored. The first argument
# (the memory path) becomes the generated store; a path under /tmp/ goes under the test's
# tmp_path; a backup id, run id or record id (or the placeholders ID, RUN_ID) becomes one of
# the store's at that moment. Untagged ``` blocks (transcripts with other paths and clocks) are
# not run. The commands run in README order, in-process, on one store, with --now pinned to
# NOW when they do not give it (the store's record ages must not depend on today's date).
README_PROGRAMS = ("python3 aml.py ", "aml.py ", "aml ")
README_SHELL_OPERATOR = re.compile(r"\s*(?:;|&&|\|)|\s+(?:[0-9]?>|&\s*$)")
README_AGENTS = ("backend-developer", "code-reviewer", "frontend-developer", "test-automator")
BACKUP_ID = re.compile(r"^(?:full|incr)_\d{8}_\d{6}(?:_\d+)?$")
RUN_ID = re.compile(r"^(?:prune|gc|dedupe)_\d{8}_\d{6}_[0-9a-f]+$")
RECORD_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Commands that may (or must) exit non-zero on the generated store, and why. Everything else
# must exit 0. Never 2 (usage), never a traceback.
README_EXPECTED_CODES = [
    # health exits with the plugin status of its worst check: 1 (warning) while the store has
    # no index, no backup or maintenance yet, or when a runbook lowers the size threshold.
    (re.compile(r" monitor health"), {0, 1}),
    # the runbook shows the mass-deletion guard refusing an aggressive prune (exit 4); its dry
    # run exits 4 as well when the real run would refuse.
    (re.compile(r" prune --aggressive(?! --agents)"), {0, 4}),
    # migrating down refuses (4) when records hold values the older schema has no place for.
    (re.compile(r" migrate migrate (?:--version )?1\.[0-2]"), {0, 4}),
    # an unknown id or agent is an empty answer with a message: exit 1 (optimize section).
    (re.compile(r" get no-such-id| search --agent nobody"), {1}),
    # the troubleshooting example holds the maintenance lock first: store busy.
    (re.compile(r" prune -q --lock-timeout"), {5}),
]


def readme_blocks(text):
    """(language, line number of the first line, lines) of every fenced block of a README."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), number + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def readme_commands(text):
    """[(line number, command text)] of the README's sh and console blocks, in order."""
    found = []
    for lang, first, lines in readme_blocks(text):
        if lang not in ("sh", "console"):
            continue
        for offset, line in enumerate(lines):
            command = line[2:] if line.startswith("$ ") else (line if lang == "sh" else None)
            if command is not None and command.strip():
                found.append((first + offset, command.strip()))
    return found


def is_aml_command(command):
    """True for a line the README runner runs (see README_PROGRAMS)."""
    return command.startswith(README_PROGRAMS)


def readme_argv(command):
    """The argv after the program name, as the convention above reads a README line."""
    previous = None
    while previous != command:  # nested optional groups: [ID | --all] inside [...]
        previous, command = command, re.sub(r"\s*\[[^\[\]]*\]", "", command)
    command = README_SHELL_OPERATOR.split(command, maxsplit=1)[0]
    tokens = shlex.split(command, comments=True)
    return tokens[2:] if tokens[0] == "python3" else tokens[1:]


def expected_codes(command):
    """The exit codes a README command may return on the generated store."""
    for pattern, codes in README_EXPECTED_CODES:
        if pattern.search(" " + command.split(" ", 1)[1]):
            return codes
    return {0}


class ReadmeStoreState:
    """Resolves README ids and placeholders against the generated store as it is now."""

    def __init__(self, root, scratch):
        self.root, self.scratch = Path(root), Path(scratch)

    def snapshot_id(self):
        folder = self.root.parent / "memory-backup" / "aml" / "snapshots"
        names = sorted(p.name.split(".")[0] for p in folder.glob("*.json")) \
            if folder.exists() else []
        if not names:  # a restore or verify example before any backup: take one first
            assert run_cli(self.root, "backup", "create", "-q", "--now", NOW_TEXT) == 0
            return self.snapshot_id()
        return names[0]

    def run_id(self, like="RUN_ID"):
        """The newest archived run (of the same operation as ``like``, e.g. prune_...)."""
        runs = [r for r in aml.Archive(aml.Store(self.root)).runs()
                if like == "RUN_ID" or r.split("_")[0] == like.split("_")[0]]
        assert runs, "a README line undoes a run before any run was archived"
        return max(runs, key=lambda r: r.split("_", 1)[1])  # by its timestamp

    def record_id(self):
        return read_data(self.root / README_AGENTS[0] / "patterns.json")[0]["id"]

    def resolve(self, argv):
        """argv with the store, scratch paths and ids of this store."""
        out = list(argv)
        if out and not out[0].startswith("-"):
            out[0] = self.path(out[0]) if out[0].startswith("/tmp/") else str(self.root)
        for i, token in enumerate(out[1:], 1):
            if token.startswith("/tmp/"):
                out[i] = self.path(token)
            elif token == "ID" or BACKUP_ID.match(token):
                out[i] = self.snapshot_id()
            elif token == "RUN_ID" or RUN_ID.match(token):
                out[i] = self.run_id(token)
            elif RECORD_ID.match(token):
                out[i] = self.record_id()
        if out and not out[0].startswith("-") and "--now" not in out:
            out += ["--now", NOW_TEXT]
        return out

    def path(self, token):
        return str(self.scratch / token[len("/tmp/"):])


def readme_store(tmp_path):
    """The generated store the README runs on: the README's agents, mixed gzip and plain."""
    root = build_store(tmp_path / "project" / ".loom" / "memory", agents=README_AGENTS,
                       gz="mixed", patterns=24, solutions=8, decisions=6, seed=16)
    return root


def run_readme_line(argv, capsys):
    """Run one README command in-process: (exit code, stdout, stderr); argparse exits count."""
    try:
        code = aml.main(argv)
    except SystemExit as exc:  # --version, --help
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_convention_reads_lines_as_documented():
    assert readme_argv("aml.py .loom/memory backup verify [ID | --all] [--deep]") == \
        [".loom/memory", "backup", "verify"]
    assert readme_argv("aml .loom/memory prune -q --lock-timeout 2; echo \"exit $?\"") == \
        [".loom/memory", "prune", "-q", "--lock-timeout", "2"]
    assert readme_argv("python3 aml.py m backup restore ID | --backup-id ID  # x") == \
        ["m", "backup", "restore", "ID"]
    assert readme_argv("aml m backup verify --all --deep 2>&1 | tail -2") == \
        ["m", "backup", "verify", "--all", "--deep"]
    assert not is_aml_command("python3.8 aml.py .loom/memory monitor health")
    assert not is_aml_command("runuser -u nobody -- python3 aml.py .loom/memory backup create")
    state = ReadmeStoreState("/s/memory", "/scratch")
    assert state.resolve(["/tmp/r/memory", "migrate", "detect"]) == \
        ["/scratch/r/memory", "migrate", "detect", "--now", NOW_TEXT]
    assert expected_codes("aml .loom/memory monitor health -q") == {0, 1}
    assert expected_codes("aml .loom/memory prune --aggressive --dry-run") == {0, 4}
    assert expected_codes("aml .loom/memory prune --aggressive --agents a -q") == {0}


def test_readme_covers_every_capability_and_the_guide():
    commands = [c for _, c in readme_commands((HERE / "README.md").read_text())
                if is_aml_command(c)]
    verbs = {tuple(readme_argv(c)[1:3]) for c in commands}
    for verb in [("prune",), ("optimize", "index"), ("search",), ("get",),
                 ("backup", "create"), ("backup", "restore"), ("backup", "verify"),
                 ("migrate", "detect"), ("monitor", "health"), ("monitor", "metrics")]:
        assert any(v[:len(verb)] == verb for v in verbs), verb
    assert len(commands) >= 60


def test_every_readme_command_runs_on_a_generated_store(tmp_path, monkeypatch, capsys):
    root = readme_store(tmp_path)
    project = root.parent.parent
    (tmp_path / "scratch").mkdir()
    monkeypatch.chdir(project)
    state, hold_lock, ran = ReadmeStoreState(root, tmp_path / "scratch"), False, []
    for number, command in readme_commands((HERE / "README.md").read_text()):
        if command.startswith("flock ") and command.endswith("&"):
            hold_lock = True  # the next aml command runs while another aml holds the store
            continue
        if not is_aml_command(command):
            continue  # shell setup (cp, mkdir, make test): not aml's
        argv = state.resolve(readme_argv(command))
        with contextlib.ExitStack() as stack:
            if hold_lock:
                stack.enter_context(held_by_other_process(root / ".aml"))
                hold_lock = False
            code, out, err = run_readme_line(argv, capsys)
        where = "README.md:%d: %s -> %s" % (number, command, argv)
        assert "Traceback" not in err, where
        assert code in expected_codes(command), "%s: exit %s\n%s%s" % (where, code, out, err)
        ran.append(command)
    assert len(ran) >= 60


def test_readme_library_example_runs(tmp_path):
    text = (HERE / "README.md").read_text()
    examples = [lines for lang, _, lines in readme_blocks(text) if lang == "python"]
    assert len(examples) == 1 and "PruneConfig" in "\n".join(examples[0])
    code = "\n".join(examples[0]).replace('"/opt/aml"', repr(str(HERE)))
    root = readme_store(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(root.parent.parent),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    # exit 1: the health checks warn (no index yet), as in the README's output
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.split()[1:3] == ["would", "lose"]] == \
        list(README_AGENTS)
    assert "verified: True" in proc.stdout and "defaults: 60 26" in proc.stdout
    assert (tmp_path / "aml-backups" / "aml" / "snapshots").is_dir()  # ../ of the cwd
    assert re.search(r"^size +healthy .*limit 40\.0 MiB", proc.stdout, re.M)


def test_an_os_error_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "memory")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.root / ".aml"))
    monkeypatch.setattr(aml.Store, "ensure_state_dir", denied)
    code, out, err = run_cli(root, "backup", "create", capsys=capsys)
    assert (code, out) == (1, "")
    assert err == "aml: error: Permission denied: %s\n" % (root / ".aml")


# -- a year of cron in fast-forward ---------------------------------------------

YEAR_GZ_AGENTS = ("backend-developer", "code-reviewer")
YEAR_PLAIN_AGENTS = ("test-automator",)
YEAR_FILES = {"patterns.json": "pattern", "solutions.json": "solution",
              "decisions.json": "decision"}


def _rt_is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rt_is_ts(v):
    return isinstance(v, str) and aml.parse_timestamp(v) is not None


def runtime_problems(rtype, rec):
    """Why the runtime's validator (SPEC 2.1) would reject a record; [] when it accepts it."""
    if not isinstance(rec, dict):
        return ["not an object"]
    checks = [(isinstance(rec.get("id"), str) and rec["id"], "id"),
              (isinstance(rec.get("agent"), str), "agent"),
              (_rt_is_ts(rec.get("timestamp")), "timestamp"),
              (isinstance(rec.get("active", True), bool), "active"),
              (isinstance(rec.get("tags", []), list), "tags")]
    if rtype == "pattern":
        m, e, p = rec.get("metrics"), rec.get("evolution"), rec.get("pattern")
        checks += [
            (isinstance(p, dict) and isinstance(p.get("approach"), dict), "pattern"),
            (isinstance(m, dict) and _rt_is_num(m.get("successRate"))
             and 0 <= m["successRate"] <= 1 and isinstance(m.get("executionCount"), int),
             "metrics"),
            (isinstance(e, dict) and _rt_is_num(e.get("confidenceScore"))
             and 0 <= e["confidenceScore"] <= 1 and _rt_is_ts(e.get("created"))
             and _rt_is_ts(e.get("lastUsed")) and isinstance(e.get("refinements"), int),
             "evolution")]
    elif rtype == "solution":
        eff = rec.get("effectiveness")
        checks += [(isinstance(rec.get("problem"), dict), "problem"),
                   (isinstance(rec.get("solution"), dict), "solution"),
                   (isinstance(eff, dict) and isinstance(eff.get("worked"), bool),
                    "effectiveness"),
                   (isinstance(rec.get("verifiedCount", 0), int), "verifiedCount")]
    else:
        d = rec.get("decision")
        checks += [(isinstance(d, dict) and isinstance(d.get("alternativesConsidered"), list),
                    "decision"),
                   ("outcome" not in rec or isinstance(rec["outcome"], dict), "outcome")]
    return [what for ok, what in checks if not ok]


def runtime_read(path):
    """A data file as the runtime reads it: gzip by content, else UTF-8 JSON; raises if bad."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return json.loads(raw.decode("utf-8"))


class RuntimeWriter:
    """Writes like the runtime: takes <abs file>.lock with mkdir, rewrites the whole file."""

    def __init__(self, root, rng):
        self.root, self.rng = Path(root), rng

    def rewrite(self, agent, fname, change):
        path = self.root / agent / fname
        lock = Path(str(path.resolve()) + ".lock")
        if lock.is_dir() and time.time() - lock.stat().st_mtime > aml.LOCK_STALE_SECONDS:
            lock.rmdir()  # a dead process's lock: stale after 30 s, as the runtime treats it
        lock.mkdir()  # fails if aml holds it: in this single-threaded year it never does
        try:
            data = runtime_read(path) if path.exists() else []
            change(data)
            write_data(path, data, gz=agent in YEAR_GZ_AGENTS)
        finally:
            lock.rmdir()

    def day(self, agent, when):
        """One working day: 0-1 new record per file, two records used. Returns the new ids."""
        stamp, new_ids = aml.format_timestamp(when), []
        makers = {"patterns.json": make_pattern, "solutions.json": make_solution,
                  "decisions.json": make_decision}
        for fname, maker in makers.items():
            def change(data, maker=maker):
                for _ in range(self.rng.randint(0, 1)):
                    rec = maker(agent, self.rng, age=0, conf=0.6) if maker is make_pattern \
                        else maker(agent, self.rng, age=0)
                    rec["timestamp"] = stamp
                    if "evolution" in rec:
                        rec["evolution"]["created"] = rec["evolution"]["lastUsed"] = stamp
                        rec["metrics"]["successRate"] = self.rng.uniform(0.4, 1.0)
                    data.append(rec)
                    new_ids.append(rec["id"])
                for rec in self.rng.sample(data, min(len(data), 2)):
                    if "evolution" in rec:
                        rec["evolution"]["lastUsed"] = stamp
                        rec["metrics"]["executionCount"] += 1
            self.rewrite(agent, fname, change)
        return new_ids


def year_store(root, rng):
    """A young runtime store, gzip and plain agents, a third of its records still 1.0.0."""
    write_data(root / "config.json", CONFIG)
    ids = set()
    for agent in YEAR_GZ_AGENTS + YEAR_PLAIN_AGENTS:
        gz = agent in YEAR_GZ_AGENTS
        for fname, maker in (("patterns.json", make_pattern), ("solutions.json", make_solution),
                             ("decisions.json", make_decision)):
            records = [maker(agent, rng, age=rng.randint(0, 60)) for _ in range(8)]
            for rec in records[::3]:  # 1.0.0: written before tags and active existed
                rec.pop("tags"), rec.pop("active")
            ids.update(r["id"] for r in records)
            write_data(root / agent / fname, records, gz)
        write_data(root / agent / "metrics.json", {"agent": agent}, gz)
    return ids


def store_ids(root):
    """Every record id in the store's record files."""
    return {rec["id"] for agent in YEAR_GZ_AGENTS + YEAR_PLAIN_AGENTS for fname in YEAR_FILES
            for rec in runtime_read(Path(root) / agent / fname)}


def archived(root):
    """[(record id, reason)] of every record any run archived."""
    archive = aml.Archive(aml.Store(root))
    return [(entry["record"]["id"], entry["reason"]) for run in archive.runs()
            for entry in archive.load(run)["entries"]]


def file_contents(root):
    """{relative path: content} outside .aml: decompressed for gzip files, bytes for plain."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] != ".aml":
            raw = path.read_bytes()
            out[str(rel)] = ("gzip", gzip.decompress(raw)) if raw[:2] == b"\x1f\x8b" \
                else ("plain", raw)
    return out


def _year_alerts(cron, when, *flags):
    return json.loads(cron(when, "monitor", "alerts", "--format", "json", *flags))["alerts"]


class Cron:
    """Runs aml's crontab jobs in-process at a fixed clock; every run's exit code is kept."""

    def __init__(self, root, capsys):
        self.root, self.capsys, self.log = root, capsys, []

    def __call__(self, when, *argv, codes=(0,)):
        stamp = aml.format_timestamp(when)
        code = aml.main([str(self.root)] + list(argv) + ["--now", stamp])
        out, err = self.capsys.readouterr()
        self.log.append((stamp, argv, code))
        assert code in codes and "Traceback" not in err, (stamp, argv, code, out, err)
        return out


# This year backs up every sixth night and refreshes the index monthly (to stay fast): the
# job limits follow that sparser schedule.
YEAR_SPARSE = ("--threshold", "backup_max_age_hours=200", "--threshold",
               "backup_critical_age_hours=400", "--threshold", "index_max_age_hours=800",
               "--threshold", "index_critical_age_hours=1600")


def test_a_year_of_cron_on_one_store(tmp_path, capsys, monkeypatch):
    # Durability is proven by the crash tests; here fsync would only make a year take minutes
    # on a busy disk, so it is a no-op (every write is still a temp file and a rename).
    monkeypatch.setattr(aml.os, "fsync", lambda fd: None)
    rng = random.Random(2026)
    root = tmp_path / "project" / ".loom" / "memory"
    written = year_store(root, rng)
    writer, cron = RuntimeWriter(root, rng), Cron(root, capsys)
    start = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    mid_month = (start + dt.timedelta(days=182)).strftime("%Y-%m")
    mid_copy = mid_id = lock_alert = lock_resolved = None
    crashed = False
    for day in range(366):
        today = start + dt.timedelta(days=day)
        at = lambda hour, minute=0: today + dt.timedelta(hours=hour, minutes=minute)  # noqa
        tomorrow = today + dt.timedelta(days=1)
        if day % 6 == 0:  # the nightly backup, every sixth night to keep the test fast
            cron(at(2), "backup", "auto", "-q", "--keep-weekly", "8", "--keep-monthly", "12")
        if day == 1:  # the operator upgrades the schema once, after the first backup
            detect = json.loads(cron(at(8, 55), "migrate", "detect", "--format", "json"))
            assert "1.0.0" in detect["totals"]
            cron(at(9), "migrate", "migrate-latest", "-q")
            detect = json.loads(cron(at(9, 5), "migrate", "detect", "--format", "json"))
            assert set(detect["totals"]) == {"2.0.0"} and not detect["runtime_invalid"]
        if today.weekday() == 6:
            cron(at(3), "prune", "-q")
        if today.day == 1:
            cron(at(4), "optimize", "all", "-q")
            cron(at(4, 30), "optimize", "index", "-q")
        if day >= 200 and today.weekday() == 0 and not crashed:
            # a runtime process died holding a lock, before the Monday health check
            crashed = True
            crash = Path(str((root / "code-reviewer" / "patterns.json").resolve()) + ".lock")
            crash.mkdir()
            os.utime(crash, (time.time() - 3600,) * 2)
        if today.weekday() == 0:
            health = cron(at(6), "monitor", "health", "-q", *YEAR_SPARSE, codes=(0, 1))
            if crashed and lock_alert is None:
                assert "stale runtime lock" in health, health
                lock_alert = next(a["id"] for a in _year_alerts(cron, at(6, 1))
                                  if a["check"] == "structure")
            elif lock_alert is not None and lock_resolved is None:
                lock_resolved = next(a for a in _year_alerts(cron, at(6, 1), "--all")
                                     if a["id"] == lock_alert)
        if day % 3 == 0:  # the agents work every third day, after the night's cron jobs
            for agent in YEAR_GZ_AGENTS + YEAR_PLAIN_AGENTS:
                written.update(writer.day(agent, at(14)))
        if day == 100:  # a runtime bug writes one solution twice: the monthly gc must archive it
            writer.rewrite(YEAR_PLAIN_AGENTS[0], "solutions.json",
                           lambda data: data.append(json.loads(json.dumps(data[-1]))))
        if today.strftime("%Y-%m") == mid_month and tomorrow.strftime("%Y-%m") != mid_month:
            # the last day of the mid-year month: one more snapshot, the newest of its month,
            # so rotation's --keep-monthly keeps it; and a copy of the store as it is now
            out = cron(at(23), "backup", "create")
            mid_id = out.split(":")[0]
            mid_copy = file_contents(root)
    end = start + dt.timedelta(days=366, hours=12)

    # a year of cron ran: every job exited 0 (health: 0 or 1), each kind of maintenance
    # recorded itself, rotation deleted old snapshots; the health check saw the dead
    # runtime's lock, and the alert resolved itself once the runtime's next write cleared it
    jobs = [argv[:2] for _, argv, _ in cron.log]
    assert jobs.count(("prune", "-q")) == 52 and jobs.count(("optimize", "all")) == 12
    history = aml.Store(root).read_state("history.json")
    done = {entry["operation"] for entry in history}  # the newest 500 runs
    assert {"backup", "verify", "rotate", "prune", "gc", "compress", "index", "warm-cache",
            "health"} <= done, done
    assert [run["to"] for run in aml.Store(root).read_state("migrations.json")] == ["2.0.0"]
    taken = sum(1 for entry in history if entry["operation"] == "backup")
    listed = [line for line in cron(end, "backup", "list").splitlines()
              if re.match(r"(full|incr)_", line)]
    assert 12 <= len(listed) < taken
    assert lock_resolved is not None and lock_resolved["state"] == "resolved"
    assert lock_resolved["resolved_by"] == "auto"  # the runtime's next write cleared it

    # nothing lost: every record ever written is in the store or archived with a reason
    present, gone = store_ids(root), archived(root)
    assert written - present - {record_id for record_id, _ in gone} == set()
    reasons = {r.value for r in aml.PruneReason} | {r.value for r in aml.GcReason}
    assert gone and {reason for _, reason in gone} <= reasons
    assert "duplicate" in {reason for _, reason in gone}
    # an id both archived and present is only the copy gc removed while keeping the original
    assert {i for i, reason in gone if reason != "duplicate"} & present == set()

    # every file still reads as the runtime reads it, every record passes its validator
    for agent in YEAR_GZ_AGENTS + YEAR_PLAIN_AGENTS:
        for fname, rtype in YEAR_FILES.items():
            records = runtime_read(root / agent / fname)
            assert isinstance(records, list)
            assert [(r["id"], runtime_problems(rtype, r)) for r in records
                    if runtime_problems(rtype, r)] == []
        assert isinstance(runtime_read(root / agent / "metrics.json"), dict)
        encodings = {(root / agent / f).read_bytes()[:2] == b"\x1f\x8b" for f in YEAR_FILES}
        assert encodings == {agent in YEAR_GZ_AGENTS}  # each rewrite kept the runtime's choice
    # the monthly compression gzipped what the runtime no longer touches
    assert (root / YEAR_PLAIN_AGENTS[0] / "metrics.json").read_bytes()[:2] == b"\x1f\x8b"

    # the mid-year snapshot is still there and restores exactly what the store was then
    scratch = tmp_path / "restore-check"
    assert mid_id and mid_id in cron(end, "backup", "list")
    cron(end, "backup", "verify", mid_id, "--deep")
    cron(end, "backup", "restore", mid_id, "--target", str(scratch / "memory"))
    assert file_contents(scratch / "memory") == mid_copy
    assert cron(end, "monitor", "health", *YEAR_SPARSE, codes=(0, 1)).startswith("Health: ")


def test_crontab_index_line_runs_in_a_cron_environment(tmp_path):
    root = build_store(tmp_path / "memory", gz="mixed")
    jobs = [j for j in _crontab_commands() if j[-3:] == ["optimize", "index", "-q"]]
    assert len(jobs) == 1  # the monthly index rebuild
    _, argv = _aml_args(jobs[0])
    argv[0] = str(root)
    proc = subprocess.run([sys.executable, str(HERE / "aml.py")] + argv, cwd=str(tmp_path),
                          env=cron_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert aml.MemoryIndex(aml.Store(root)).stale_files() == []
    with held_by_other_process(root / ".aml"):  # on failure: non-zero and one line
        proc = subprocess.run([sys.executable, str(HERE / "aml.py")] + argv +
                              ["--lock-timeout", "0.2"], cwd=str(tmp_path),
                              env=cron_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 5 and proc.stdout == b""
    assert proc.stderr.decode().count("\n") == 1 and proc.stderr.startswith(b"aml: error: ")


def test_health_that_cannot_run_for_an_os_error_is_unknown(tmp_path, monkeypatch, capsys):
    root = build_store(tmp_path / "memory")

    # (a read-only user's permission error is not one: health then answers, see issue 12)
    def broken(self):
        raise OSError(5, "Input/output error", str(self.root / ".aml"))
    monkeypatch.setattr(aml.Store, "ensure_state_dir", broken)
    code, out, err = run_cli(root, "monitor", "health", "--format", "nagios", capsys=capsys)
    assert code == 3 and out.startswith("AML UNKNOWN - ") and "Input/output error" in out
    assert err.startswith("aml: error: ") and err.count("\n") == 1


def test_compress_reports_a_truncated_gzip_file_instead_of_counting_it_done(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)
    broken = root / "code-reviewer" / "patterns.json"
    broken.write_bytes(broken.read_bytes()[:-40])
    before = broken.read_bytes()
    code, _, err = run_cli(root, "optimize", "compress", "--age-days", "0", "--no-backup",
                           capsys=capsys)
    assert code == 3 and "code-reviewer/patterns.json" in err
    assert broken.read_bytes() == before


def test_config_file_flag_reaches_the_safety_backup(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    elsewhere = tmp_path / "vault"
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"backup": {"backup_root": str(elsewhere)},
                                  "prune": {"max_removal_share": 1.0}}))
    code, out, err = run_cli(root, "prune", "--config", config, "--now", NOW_TEXT,
                             "--format", "json", capsys=capsys)
    assert code == 0, err
    backup_id = json.loads(out)["backup_id"]
    assert (elsewhere / "aml").is_dir() and not (tmp_path / "memory-backup").exists()
    code, out, _ = run_cli(root, "backup", "list", "--config", config, capsys=capsys)
    assert backup_id in out



def test_every_readme_transcript_is_tagged_so_the_runner_runs_it():
    # An untagged fence is skipped by the README runner: a command shown there could rot.
    untagged, fence = [], None
    for number, line in enumerate((HERE / "README.md").read_text().splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip(), number)
        elif fence and fence[0] == "" and line.lstrip("$ ").startswith(("aml", "python3 aml.py")):
            untagged.append(fence[1])
    assert untagged == []


# ---- issue 18: busy files, temp files, errors that name their path ----

def test_a_full_disk_error_names_the_file_it_could_not_write(tmp_path, capsys, monkeypatch):
    root = _prune_store(tmp_path / "m")
    before = _all_records(root)

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aml.os, "fsync", full)
    code, _, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, capsys=capsys)
    monkeypatch.undo()
    assert code == 1 and err.count("\n") == 1 and "No space left on device: " in err
    assert str(root) in err.split("No space left on device: ")[1]
    assert _all_records(root) == before


@pytest.mark.parametrize("command", [["prune", "--now", NOW_TEXT], ["optimize", "gc"],
                                     ["migrate", "migrate-latest"]])
def test_a_failed_safety_backup_says_before_once(tmp_path, capsys, command):
    root = _gc_mess(tmp_path / "m", gz=False)
    write_data(root / "solo" / "solutions.json", [make_solution("solo", random.Random(1))])
    (tmp_path / "memory-backup").write_text("a file where the backup folder should be")
    before = tree_digest(root, skip_state=True)
    code, _, err = run_cli(root, *command, capsys=capsys)
    assert code == 4 and "safety backup before " in err and "before before" not in err
    assert tree_digest(root, skip_state=True) == before


def _busy_store(root, gz=False):
    """Three agents, each patterns file with an exact duplicate for gc; one file's lock held."""
    root = build_store(root, gz=gz)
    for path in root.glob("*/patterns.json"):
        records = read_data(path)
        write_data(path, records + [records[0]], gz=gz)
    busy = root / "code-reviewer" / "patterns.json"
    aml.lock_path_for(busy).mkdir()  # fresh: held by the runtime for the whole test
    return root, busy


def _count_waits(monkeypatch):
    """Record the message of every StoreBusyError a FileLock raises."""
    real, seen = aml.FileLock.acquire, []

    def acquire(self):
        try:
            return real(self)
        except aml.StoreBusyError as exc:
            seen.append(str(exc))
            raise

    monkeypatch.setattr(aml.FileLock, "acquire", acquire)
    return seen


@pytest.mark.parametrize("command,gz,done", [
    (["optimize", "gc"], False, lambda p: len(read_data(p)) == 40),
    (["optimize", "compress", "--age-days", "0"], False,
     lambda p: p.read_bytes()[:2] == b"\x1f\x8b"),
    (["optimize", "decompress"], True, lambda p: p.read_bytes()[:1] == b"["),
    (["migrate", "migrate-latest"], False, lambda p: read_data(p)[0].get("metadata") is not None),
    (["optimize", "all", "--age-days", "0"], False,
     lambda p: p.read_bytes()[:2] == b"\x1f\x8b" and len(read_data(p)) == 40),
], ids=["gc", "compress", "decompress", "migrate", "all"])
def test_a_busy_file_is_skipped_once_and_the_rest_is_done(tmp_path, capsys, monkeypatch,
                                                           command, gz, done):
    root, busy = _busy_store(tmp_path / "m", gz)
    raw = busy.read_bytes()
    waits = _count_waits(monkeypatch)
    code, out, err = run_cli(root, *command, "--lock-timeout", "0.2", capsys=capsys)
    assert code == 5 and out.strip() and "error" not in err, err  # finished, and said what it did
    assert busy.read_bytes() == raw and str(aml.lock_path_for(busy)) in err
    others = [p for p in root.glob("*/patterns.json") if p != busy]
    assert len(others) == 2 and all(done(p) for p in others), err
    assert len([w for w in waits if "(waited" in w]) == 1  # waited for once in the whole run
    assert err.count(str(aml.lock_path_for(busy))) == 1  # and named once


def test_prune_waits_for_a_busy_file_once_with_its_safety_backup(tmp_path, capsys,
                                                                 monkeypatch):
    root = _prune_store(tmp_path / "m")
    busy = root / "code-reviewer" / "patterns.json"
    raw = busy.read_bytes()
    aml.lock_path_for(busy).mkdir()
    waits = _count_waits(monkeypatch)
    code, out, err = run_cli(root, "prune", "--now", NOW_TEXT, "--lock-timeout", "0.2",
                             "--format", "json", capsys=capsys)
    assert code == 5 and busy.read_bytes() == raw
    doc = json.loads(out)
    assert doc["backup_id"] and len(doc["busy"]) == 1 and doc["removed"]
    assert len([w for w in waits if "(waited" in w]) == 1


@pytest.mark.parametrize("step,gz", [("compress", False), ("decompress", True)])
def test_compress_and_decompress_remove_the_temp_files_of_an_interrupted_run(tmp_path, capsys,
                                                                            step, gz):
    root = build_store(tmp_path / "m", gz=gz)
    data = root / "code-reviewer" / "patterns.json"
    leftover = aml._temp_path(data)  # what a kill between write and rename leaves
    leftover.write_bytes(data.read_bytes()[:100])
    assert aml.is_temp_leftover(leftover.name)
    code, _, err = run_cli(root, "optimize", step, "--age-days", "0", "--no-backup",
                           capsys=capsys)
    assert code == 0, err
    assert not leftover.exists()
    assert not [p for p in root.rglob("*") if aml.is_temp_leftover(p.name)]


@pytest.mark.parametrize("scan", [False, True], ids=["index", "scan"])
def test_get_of_an_id_that_may_be_in_an_unreadable_file_exits_3(tmp_path, capsys, scan):
    root = build_store(tmp_path / "m", gz=True)
    broken = root / "code-reviewer" / "patterns.json"
    rid = read_data(broken)[0]["id"]
    broken.write_bytes(broken.read_bytes()[:-20])  # truncated gzip
    code, out, err = run_cli(root, "get", rid, *(["--scan"] if scan else []), capsys=capsys)
    assert code == 3 and out == "" and "code-reviewer/patterns.json" in err
    assert "may be in the 1 unreadable file" in err
    code, _, err = run_cli(root, "get", "no-such-id-at-all", capsys=capsys)
    assert code == 3
    broken.unlink()
    code, _, err = run_cli(root, "get", rid, capsys=capsys)
    assert code == 1 and "no record with id" in err and "unreadable" not in err


@pytest.mark.parametrize("size", ["small", "large"])
def test_bit_rot_that_keeps_size_and_mtime_is_not_reported_healthy(tmp_path, capsys, size):
    root = build_store(tmp_path / "m", gz=True, patterns=40 if size == "small" else 2000)
    rotten = root / "code-reviewer" / "patterns.json"
    old = time.time() - 60  # older than the racy window, so the first run caches them
    for path in root.rglob("*.json"):
        os.utime(path, (old, old))
    first = _check(_health(root, capsys=capsys)[1], "integrity")
    assert first["status"] == "healthy"
    raw = bytearray(rotten.read_bytes())
    info = rotten.stat()
    raw[16384 if size == "large" else len(raw) // 2] ^= 0x40  # one bit, in a sampled block
    rotten.write_bytes(bytes(raw))
    os.utime(rotten, ns=(info.st_atime_ns, info.st_mtime_ns))  # same size, same mtime
    check = _check(_health(root, capsys=capsys)[1], "integrity")
    assert check["status"] == "critical" and "code-reviewer/patterns.json" in json.dumps(check)


def test_integrity_cache_reparses_every_file_after_the_recheck_period(tmp_path, capsys):
    root = build_store(tmp_path / "m", gz=True)
    old = time.time() - 60
    for path in root.rglob("*.json"):
        os.utime(path, (old, old))
    when = aml.format_timestamp(NOW)
    later = aml.format_timestamp(NOW + dt.timedelta(days=aml.INTEGRITY_RECHECK_DAYS + 1))
    _health(root, "--now", when, capsys=capsys)
    again = _check(_health(root, "--now", when, capsys=capsys)[1], "integrity")
    assert again["details"]["parsed"] == 0
    late = _check(_health(root, "--now", later, capsys=capsys)[1], "integrity")
    assert late["details"]["parsed"] == late["details"]["files"] > 0


@pytest.mark.parametrize("tamper", ["folder", "duplicate", "file_and_folder", "state_dir"])
def test_every_reason_restore_refuses_is_found_by_verify_and_before_any_change(
        tmp_path, capsys, tamper):
    root = build_store(tmp_path / "memory")
    manager = backup_manager(root)
    snap = manager.create()
    path = manager.manifest_path(snap.backup_id)
    payload = manager.load_manifest(snap.backup_id)
    files = payload["files"]
    last = files[-1]
    if tamper == "folder":  # a folder in the live store where the manifest has a file
        (root / "code-reviewer" / "notes.json").mkdir()
        last["path"] = "code-reviewer/notes.json"
    elif tamper == "duplicate":
        files.append(dict(files[0]))
    elif tamper == "file_and_folder":
        files.append(dict(last, path="code-reviewer"))
    else:
        files.append(dict(last, path=".aml/alerts.json"))
    aml._write_manifest(path, payload)
    code, out, err = run_cli(root, "backup", "verify", "--backup-id", snap.backup_id, "--deep",
                             capsys=capsys)
    assert code != 0 and ("notes.json" in out + err or "twice" in out + err
                          or "also the folder" in out + err or ".aml/alerts.json" in out + err)
    for rel in ("backend-developer/patterns.json", "test-automator/decisions.json"):
        write_data(root / rel, read_data(root / rel)[:-1])  # the restore has work to do
    before = tree_digest(root, skip_state=True)
    code, _, err = run_cli(root, "backup", "restore", "--backup-id", snap.backup_id,
                           capsys=capsys)
    assert code in (4, 6) and err.count("\n") == 1 and "restore-" not in err
    assert tree_digest(root, skip_state=True) == before
    assert not list((root / ".aml").glob("restore-*"))
# ---- issue 13: start-up (no import a command does not need, the cached-bytecode form) ----

def test_importing_aml_leaves_the_network_and_html_modules_unloaded(tmp_path):
    code = ("import sys; sys.argv = ['aml', '--version']; import aml; "
            "print([m for m in ('http.client', 'urllib.request', 'http.server', 'html', "
            "'email.parser', 'ssl') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(HERE), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "[]", "")


def test_the_cached_bytecode_form_of_a_cron_line_runs_as_the_script_does(tmp_path):
    """README and crontab.example offer `cd /opt/aml && python3 -m aml ...` (bytecode cached
    in __pycache__ instead of compiling aml.py on every run): same output, same exit code."""
    root = build_store(tmp_path / "memory", gz="mixed")
    pycache = tmp_path / "pycache"
    env = dict(cron_env(), PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = []
    for entry in (["-m", "aml"], [str(HERE / "aml.py")], ["-m", "aml"]):
        proc = subprocess.run([sys.executable] + entry + [str(root), "monitor", "metrics",
                                                          "--format", "json"],
                              cwd=str(HERE), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        runs.append((proc.returncode, json.loads(proc.stdout)["agents"], proc.stderr))
    assert runs[0] == runs[1] == runs[2] and runs[0][0] == 0 and runs[0][1]
    assert list(pycache.rglob("aml.*.pyc"))  # the second -m run read it instead of compiling


# ---- issue 12: unattended on a live store (crontab.example as shipped, 60 days) ----

SIM_AML = "python3 /opt/aml/aml.py"
SIM_STORE = "'/srv/project/.loom/memory'"
SIM_REPORTS = {"/var/lib/node_exporter/textfile_collector/aml.prom": "textfile/aml.prom",
               "/var/www/aml/report.html": "www/report.html"}
SIM_CONFIG = {"monitor": {"query_time_warning_ms": 100000,  # a timed lookup must not flip it
                          "agent_memory_warning_mb": 1, "agent_memory_critical_mb": 2}}


def crontab_lines():
    """[(minute, hour, day of month, day of week, command)] of crontab.example's jobs."""
    jobs = []
    for line in (HERE / "crontab.example").read_text().splitlines():
        if not line.strip() or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        minute, hour, dom, month, dow, command = line.split(None, 5)
        assert month == "*", line
        jobs.append((minute, hour, dom, dow, command))
    return jobs


def _cron_matches(field, value):
    return field == "*" or value in {int(v) for v in field.split(",")}


def cron_due(day):
    """[(time, command)] of the crontab lines cron starts on ``day``, in order."""
    due = []
    for minute, hour, dom, dow, command in crontab_lines():
        if _cron_matches(dom, day.day) and _cron_matches(dow, (day.weekday() + 1) % 7):
            due.append((day + dt.timedelta(hours=int(hour), minutes=int(minute)), command))
    return sorted(due)


class CronSim:
    """crontab.example's lines on one store at a fixed clock, with a runtime writing between.

    Each line's text is the shipped one with its paths adapted (as the README tells the user)
    and ``--now`` added after aml.py; it runs under ``sh -c`` with PATH=/usr/bin:/bin in
    another folder, or in-process (same argv, same folder) where the entry point is not what
    is being proved. Every run's output is logged: cron mails any output.
    """

    def __init__(self, base, capsys, seed=12):
        self.base, self.capsys = Path(base), capsys
        self.root = self.base / "project" / ".loom" / "memory"
        self.cwd = self.base / "elsewhere"
        self.writer = RuntimeWriter(self.root, random.Random(seed))
        self.log = []

    def command(self, text, when):
        text = text.replace(SIM_AML, "%s %s --now %s" % (
            shlex.quote(sys.executable), shlex.quote(str(HERE / "aml.py")),
            aml.format_timestamp(when)))
        text = text.replace(SIM_STORE, shlex.quote(str(self.root)))
        for path, local in SIM_REPORTS.items():
            text = text.replace("'%s'" % path, shlex.quote(str(self.base / local)))
        return text

    def run(self, when, text, real=False):
        command = self.command(text, when)
        if real:
            proc = subprocess.run(["/bin/sh", "-c", command], cwd=str(self.cwd),
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(self.cwd)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=120)
            code, output = proc.returncode, proc.stdout
        else:
            code = aml.main(shlex.split(command)[2:])
            output = "".join(self.capsys.readouterr())
        self.log.append((when, text, code, output))
        return code, output

    def day(self, day, real=False, skip=(), before=None):
        """One day: the night's jobs, a runtime write just before the health check (so the
        index is a little stale, as on a live store), the agents' day of work at 14:00."""
        wrote_early = False
        for when, text in cron_due(day):
            if "monitor health" in text and not wrote_early:
                self.writer.day(YEAR_PLAIN_AGENTS[0], when - dt.timedelta(minutes=15))
                wrote_early = True
            if before:
                before(when, text)
            if not any(word in text for word in skip):
                self.run(when, text, real)
        for agent in YEAR_GZ_AGENTS + YEAR_PLAIN_AGENTS:
            self.writer.day(agent, day + dt.timedelta(hours=14))

    def output_since(self, moment):
        return [(when, text, code, out) for when, text, code, out in self.log
                if when >= moment and out]


def sim_store(base):
    """A young runtime store, the report folders the README says to create, the pinned
    thresholds in the store's aml config file."""
    root = Path(base) / "project" / ".loom" / "memory"
    year_store(root, random.Random(2026))
    (root / ".aml").mkdir()
    (root / ".aml" / "config.json").write_text(json.dumps(SIM_CONFIG))
    for local in SIM_REPORTS.values():
        (Path(base) / local).parent.mkdir(parents=True, exist_ok=True)
    (Path(base) / "elsewhere").mkdir()
    return root


SIM_START = NOW.replace(hour=0, minute=0, second=0, microsecond=0)   # a Friday
SIM_SUNDAY = 9    # 2026-11-29: the weekly prune's day
SIM_FIRST = 11    # 2026-12-01: the monthly optimize's day


def _scenario(snapshot, base, capsys, monkeypatch, first_day):
    shutil.copytree(str(snapshot), str(base), symlinks=True)
    monkeypatch.chdir(base / "elsewhere")
    sim = CronSim(base, capsys, seed=first_day)
    return sim, SIM_START + dt.timedelta(days=first_day)


def _first_health_line(sim, since):
    lines = [(when, out) for when, text, _, out in sim.output_since(since)
             if "monitor health" in text]
    return lines[0] if lines else (None, "")


def test_crontab_is_quiet_for_60_days_on_a_healthy_live_store_and_loud_within_a_day(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aml.os, "fsync", lambda fd: None)  # durability: see the crash tests
    base = tmp_path / "healthy"
    sim_store(base)
    monkeypatch.chdir(base / "elsewhere")
    sim = CronSim(base, capsys)
    snapshots = {}
    for day in range(60):
        if day in (SIM_SUNDAY, SIM_FIRST):  # the state to fork the failure scenarios from
            snapshots[day] = tmp_path / ("at-day-%d" % day)
            shutil.copytree(str(base), str(snapshots[day]), symlinks=True)
        # the real entry point (sh -c, minimal PATH, other cwd) on the first day, a Sunday,
        # the 1st of a month and the last day; in-process (same argv) otherwise
        real = day in (0, SIM_SUNDAY, SIM_FIRST, 59)  # every line runs for real at least once
        sim.day(SIM_START + dt.timedelta(days=day), real=real)
    noisy = [(aml.format_timestamp(w), t, c, o) for w, t, c, o in sim.log if o or c]
    assert noisy == []
    jobs = {text.split("' ", 1)[1].split(" -")[0] for _, text, _, _ in sim.log}
    assert jobs == {"backup auto", "optimize index", "prune", "optimize all",
                    "monitor health", "monitor report"}
    assert sum(1 for _, t, _, _ in sim.log if " prune " in t) == 9
    prom = (base / SIM_REPORTS["/var/lib/node_exporter/textfile_collector/aml.prom"]).read_text()
    assert 'aml_health_overall{store="%s"} 0' % sim.root in prom
    history = aml.Store(sim.root).read_state("history.json")
    assert {"backup", "verify", "rotate", "prune", "index", "gc", "health"} <= \
        {e["operation"] for e in history}

    # Each failure, injected into a copy of the healthy store, shows within one day: the
    # failing job's own line at once, and the next health check names the store and cause.
    def failing(name, first_day, inject, expect, skip=(), before=None):
        sim, start = _scenario(snapshots[first_day], tmp_path / name, capsys, monkeypatch,
                               first_day)
        with monkeypatch.context() as patch:
            inject(sim, patch)
            for offset in (0, 1):  # the second day only when the first stayed quiet
                if offset == 0 or _first_health_line(sim, start)[0] is None:
                    sim.day(start + dt.timedelta(days=offset), skip=skip, before=before)
        out = sim.output_since(start)
        assert out and out[0][0] - start <= dt.timedelta(days=1), (name, out)
        when, line = _first_health_line(sim, start)
        assert when is not None and when - start <= dt.timedelta(days=1, hours=6), (name, out)
        assert line.startswith("AML ") and str(sim.root) in line and expect in line, line
        return sim

    def backup_fails(sim, patch):
        backups = sim.root.parent / "memory-backup"
        backups.rename(backups.with_name("memory-backup.moved"))
        backups.write_text("not a folder")
    failing("backup-fails", SIM_SUNDAY, backup_fails, "backup auto failed")

    def backup_does_not_verify(sim, patch):
        real = aml.BackupManager._verify_and_repair

        def bad(self, *args, **kwargs):
            result = real(self, *args, **kwargs)
            return dataclasses.replace(result, ok=False, problems=["pack 1: checksum mismatch"])
        patch.setattr(aml.BackupManager, "_verify_and_repair", bad)
    failing("backup-unverified", SIM_SUNDAY, backup_does_not_verify, "does not verify")

    def wrong_clock_agent(sim, patch):  # prune's mass-deletion guard refuses: exit 4
        rng = random.Random(4)
        write_data(sim.root / "legacy-agent" / "patterns.json",
                   [make_pattern("legacy-agent", rng, age=400 + i) for i in range(10)])
    failing("prune-fails", SIM_SUNDAY, wrong_clock_agent, "prune failed")

    def disk_full(sim, patch):
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        patch.setattr(aml, "collect_garbage", full)
    failing("optimize-fails", SIM_FIRST, disk_full, "optimize all failed")

    def index_fails(sim, patch):
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        patch.setattr(aml.MemoryIndex, "refresh", full)
    failing("index-fails", SIM_SUNDAY, index_fails, "optimize index failed")

    def truncated(sim, patch):
        path = sim.root / YEAR_GZ_AGENTS[0] / "metrics.json"  # the writer leaves it alone
        path.write_bytes(path.read_bytes()[:-30])
    failing("truncated", SIM_SUNDAY, truncated, "integrity")

    def over_limit(sim, patch):
        rng = random.Random(5)
        sim.writer.rewrite(YEAR_PLAIN_AGENTS[0], "patterns.json", lambda data: data.extend(
            dict(make_pattern(YEAR_PLAIN_AGENTS[0], rng, age=0), notes="x" * 1500)
            for _ in range(900)))
    failing("over-limit", SIM_SUNDAY, over_limit, "size")

    # maintenance stopped: the crontab lost every job but health (or only the weekly prune)
    failing("all-stopped", SIM_SUNDAY, lambda sim, patch: None, "backup",
            skip=("backup auto", "optimize", "prune"))
    failing("prune-stopped", SIM_SUNDAY, lambda sim, patch: None, "prune is 171 h old",
            skip=(" prune ",))


def _jobs_store(tmp_path, when):
    """A store whose backup, index and prune all succeeded at ``when`` (a clock text)."""
    root = _prune_store(tmp_path / "memory")
    for argv in (("backup", "create"), ("optimize", "index"), ("prune", "--no-backup")):
        assert run_cli(root, *argv, "-q", "--now", when) == 0
    return root


def _health_line(root, when, capsys, *extra):
    code, out, _ = run_cli(root, "monitor", "health", "-q", "--now", when, *extra, capsys=capsys)
    return code, out


def test_health_watches_each_job_and_shows_a_failed_run_with_its_reason(tmp_path, capsys):
    root = _jobs_store(tmp_path, "2026-11-20T03:00:00Z")
    lenient = ("--threshold", "backup_max_age_hours=1000", "--threshold",
               "backup_critical_age_hours=2000", "--threshold", "index_max_age_hours=1000",
               "--threshold", "index_critical_age_hours=2000")
    assert _health_line(root, "2026-11-20T06:00:00Z", capsys, *lenient) == (0, "")
    # a weekly prune that fails: the backup's rotation does not hide it any more
    rng = random.Random(4)
    write_data(root / "legacy-agent" / "patterns.json",
               [make_pattern("legacy-agent", rng, age=400 + i) for i in range(10)])
    code, _, err = run_cli(root, "prune", "-q", "--now", "2026-11-22T03:00:00Z", capsys=capsys)
    assert code == 4 and "mass-deletion guard" in err
    assert run_cli(root, "backup", "auto", "-q", "--now", "2026-11-22T03:30:00Z") == 0
    code, out = _health_line(root, "2026-11-22T06:00:00Z", capsys, *lenient)
    assert code == 1 and out.startswith("AML WARNING - %s: maintenance: " % root)
    assert "prune failed at 2026-11-22T03:00:00.000Z: mass-deletion guard: legacy-agent" in out
    doc = json.loads(run_cli(root, "monitor", "health", "--format", "json", "--now",
                             "2026-11-22T06:00:00Z", *lenient, capsys=capsys)[1])
    assert _check(doc, "maintenance")["details"]["prune"]["last_success"].startswith(
        "2026-11-20T03:00")
    # a later success clears it; then the job goes overdue: warning, then critical
    assert run_cli(root, "prune", "-q", "--force", "--no-backup", "--now",
                   "2026-11-22T07:00:00Z") == 0
    assert _health_line(root, "2026-11-22T08:00:00Z", capsys, *lenient) == (0, "")
    code, out = _health_line(root, "2026-11-29T10:00:00Z", capsys, *lenient)
    assert code == 1 and "last successful prune is 171 h old (limit 170 h)" in out
    code, out = _health_line(root, "2026-12-06T10:00:00Z", capsys, *lenient)
    assert code == 2 and out.startswith("AML CRITICAL - ") and "(limit 338 h)" in out


def test_a_failed_backup_is_recorded_and_shown_even_when_an_older_one_is_recent(tmp_path,
                                                                               capsys):
    root = _jobs_store(tmp_path, "2026-11-20T02:00:00Z")
    backups = root.parent / "memory-backup"
    backups.rename(tmp_path / "moved")
    backups.write_text("not a folder")
    code, _, err = run_cli(root, "backup", "auto", "-q", "--now", "2026-11-21T02:00:00Z",
                           capsys=capsys)
    assert code != 0 and err.startswith("aml: error: ")
    failures = aml.Store(root).read_state("job-failures.json")
    assert failures["backup"]["command"] == "backup auto" and failures["backup"]["reason"]
    backups.unlink()
    (tmp_path / "moved").rename(backups)
    code, out = _health_line(root, "2026-11-21T03:00:00Z", capsys)
    assert code == 1 and "backup: backup auto failed at 2026-11-21T02:00:00.000Z" in out


def test_monitor_health_usage_error_is_unknown_with_one_stdout_line(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    for argv in (("monitor", "health", "--no-such-flag"), ("monitor", "health", "--timeout",
                                                          "soon"),
                 ("monitor", "health", "--threshold", "bogus=1")):
        code, out, err = run_cli(root, *argv, capsys=capsys)
        assert code == 3 and out.startswith("AML UNKNOWN - ") and out.count("\n") == 1, argv
    # other commands keep exit 2 for a usage error
    assert run_cli(root, "monitor", "metrics", "--no-such-flag", capsys=capsys)[0] == 2


def test_monitor_health_timeout_answers_unknown_and_releases_locks(tmp_path, capsys,
                                                                   monkeypatch):
    root = build_store(tmp_path / "memory")

    def slow(self, history):
        time.sleep(30)
    monkeypatch.setattr(aml.MemoryMonitor, "_check_integrity", slow)
    started = time.monotonic()
    code, out, _ = run_cli(root, "monitor", "health", "--format", "nagios", "--timeout", "0.3",
                           capsys=capsys)
    assert time.monotonic() - started < 25  # the answer came, not the 30 s check
    assert code == 3 and out.startswith("AML UNKNOWN - %s: health checks did not finish "
                                        "within --timeout 0.3 s" % root)
    assert aml.signal.getitimer(aml.signal.ITIMER_REAL) == (0.0, 0.0)
    with aml.MaintenanceLock(root / ".aml", timeout=0):
        pass  # nothing left held


def test_health_line_puts_the_critical_cause_first_and_perfdata_uses_ranges(tmp_path, capsys):
    root = build_store(tmp_path / "memory")
    _make_healthy(root, hits=10, misses=90)  # hit rate 10 %: a warning
    broken = root / "code-reviewer" / "patterns.json"
    broken.write_bytes(broken.read_bytes()[:-20])  # critical: integrity
    code, out, _ = run_cli(root, "monitor", "health", "--format", "nagios", "--now", NOW_TEXT,
                           capsys=capsys)
    summary = out.split(" | ")[0]
    assert code == 2 and summary.startswith("AML CRITICAL - %s: integrity: " % root)
    assert summary.index("integrity:") < summary.index("performance:")
    assert "cache_hit_rate=10%;50:;;0" in out  # a lower bound: warn below 50


def test_a_folder_that_is_not_a_store_is_refused_and_nothing_is_created(tmp_path, capsys):
    root = build_store(tmp_path / "project" / ".loom" / "memory")
    loom = root.parent
    before = sorted(p.name for p in loom.iterdir())
    for argv in (("prune", "-q"), ("backup", "create", "-q"), ("search", "--text", "x"),
                 ("monitor", "metrics"), ("optimize", "index", "-q"), ("migrate", "detect")):
        code, out, err = run_cli(loom, *argv, capsys=capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, argv
        assert "%s is not a memory store: expected config.json" % loom in err
        assert "did you mean %s?" % root in err
    code, out, _ = run_cli(loom, "monitor", "health", "-q", capsys=capsys)
    assert code == 3 and out.startswith("AML UNKNOWN - ") and "not a memory store" in out
    assert sorted(p.name for p in loom.iterdir()) == before  # no .aml, no memory-backup
    fresh = tmp_path / "new" / "memory"
    fresh.mkdir(parents=True)
    (fresh / "config.json").write_text("{}")
    assert run_cli(fresh, "prune", "-q", "--now", NOW_TEXT) == 0
    assert run_cli(fresh, "backup", "create", "-q", "--now", NOW_TEXT) == 0


def test_report_output_folder_missing_or_unwritable_is_one_line_naming_it(tmp_path, capsys,
                                                                          monkeypatch):
    root = build_store(tmp_path / "memory")
    missing = tmp_path / "textfile_collector" / "aml.prom"
    code, out, err = run_cli(root, "monitor", "report", "--format", "prometheus", "--output",
                             missing, capsys=capsys)
    assert (code, out) == (1, "") and err == (
        "aml: error: output folder %s does not exist (create it, writable by this user)\n"
        % missing.parent)
    missing.parent.mkdir()
    monkeypatch.setattr(aml.os, "access", lambda path, mode: Path(path) != missing.parent)
    code, _, err = run_cli(root, "monitor", "report", "--format", "html", "--output", missing,
                           capsys=capsys)
    assert code == 1 and err == "aml: error: output folder %s is not writable by this user\n" \
        % missing.parent
    assert os.listdir(missing.parent) == []


def test_readme_scheduling_section_names_every_path_of_the_crontab():
    text = (HERE / "README.md").read_text()
    section = text[text.index("<!-- section: scheduling -->"):]
    section = section[:section.index("\n## ", 40)]
    paths = set(re.findall(r"(/[\w./-]+)", " ".join(c for *_, c in crontab_lines())))
    assert paths == {"/opt/aml/aml.py", "/srv/project/.loom/memory",
                     "/var/lib/node_exporter/textfile_collector/aml.prom",
                     "/var/www/aml/report.html"}
    for path in paths:
        assert path in section, path


def test_every_crontab_line_names_its_store_quoted_so_cron_mail_subjects_do():
    for *_, command in crontab_lines():
        assert "$" not in command and command.startswith(SIM_AML + " " + SIM_STORE + " ")


def test_prometheus_names_are_base_units_with_a_store_label_and_promtool_accepts_them(
        tmp_path, capsys):
    texts = []
    for name in ("one", "two"):
        root = build_store(tmp_path / name / "memory", gz="mixed")
        _make_healthy(root)
        run_cli(root, "prune", "-q", "--no-backup", "--force")
        code, out, _ = run_cli(root, "monitor", "report", "--format", "prometheus",
                               capsys=capsys)
        assert code == 0
        families = _parse_prometheus(out)
        assert not [f for f in families if re.search(r"_days?(_|$)|_ms$|_mb$", f)], families
        samples = [s for lines in families.values() for s in lines]
        assert all('store="%s"' % root in s for s in samples)
        stamps = families["aml_job_last_success_timestamp_seconds"]
        assert {re.search(r'job="(\w+)"', s).group(1) for s in stamps} == \
            {"backup", "index", "prune"}
        assert all(float(s.rsplit(" ", 1)[1]) > 1.7e9 for s in stamps)
        texts.append(out)
    both = "".join(texts)  # two stores in one textfile folder: no sample collides
    samples = [line.rsplit(" ", 1)[0] for line in both.splitlines() if not line.startswith("#")]
    assert len(samples) == len(set(samples))
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    for text in texts:
        proc = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert proc.returncode == 0, proc.stdout


def _as_nobody_possible():
    if os.geteuid() != 0:
        return "needs root to drop to another user (running as uid %d)" % os.geteuid()
    try:
        import pwd
        return pwd.getpwnam("nobody") and None
    except (ImportError, KeyError):
        return "no user 'nobody' to drop to"


def test_read_only_commands_work_for_a_user_who_may_only_read(tmp_path):
    reason = _as_nobody_possible()
    if reason:
        pytest.skip(reason)
    import tempfile
    # pytest's tmp_path is private to root (0700), so this store lives in a folder of its own
    # that the other user can reach; it is removed at the end.
    shared = Path(tempfile.mkdtemp(prefix="aml-test-ro-"))
    try:
        os.chmod(str(shared), 0o755)
        if not all(os.stat(str(p)).st_mode & 0o001 for p in shared.parents):
            pytest.skip("%s is not searchable by other users" % shared.parent)
        _read_only_commands_as_nobody(shared)
    finally:
        shutil.rmtree(str(shared))


def _world_usable(path):
    """True when another user may run ``path``: every folder above it searchable."""
    path = Path(path)
    return path.exists() and all(os.stat(str(p)).st_mode & 0o001 for p in path.parents) \
        and os.stat(str(path)).st_mode & 0o001


def _python_for_others():
    """This interpreter when another user can run it, else the system python3 (3.9+)."""
    if _world_usable(os.path.realpath(sys.executable)):
        return sys.executable
    system = "/usr/bin/python3"
    if _world_usable(os.path.realpath(system)) and subprocess.run(
            [system, "-c", "import sys; sys.exit(sys.version_info < (3, 9))"]).returncode == 0:
        return system
    pytest.skip("no Python 3.9+ that the user nobody may run")


def _read_only_commands_as_nobody(base):
    import pwd
    nobody = pwd.getpwnam("nobody")
    python = _python_for_others()
    root = _prune_store(base / "memory", gz="mixed")  # under the mass-deletion guard
    backup_id = run_cli_out(root, "backup", "create", "--format", "json", "--now",
                            NOW_TEXT)["backup_id"]
    assert run_cli(root, "optimize", "index", "-q", "--now", NOW_TEXT) == 0
    record_id = read_data(root / "code-reviewer" / "patterns.json")[0]["id"]
    script = base / "aml.py"
    shutil.copy(str(HERE / "aml.py"), str(script))
    for dirpath, dirnames, filenames in os.walk(str(base)):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)

    def as_nobody(*argv):
        def drop():
            os.setgid(nobody.pw_gid)
            os.setgroups([])
            os.setuid(nobody.pw_uid)
        return subprocess.run([python, str(script), str(root)] + list(argv),
                              cwd="/", env={"PATH": "/usr/bin:/bin"}, preexec_fn=drop,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=120)

    commands = [("get", record_id), ("search", "--text", "a"), ("monitor", "health"),
                ("monitor", "metrics"), ("monitor", "report"), ("backup", "list"),
                ("backup", "verify"), ("backup", "restore", backup_id, "--dry-run"),
                ("prune", "--dry-run"), ("migrate", "detect")]
    for state_mode in (0o755, 0o700):  # .aml readable, then as aml creates it: private
        os.chmod(str(root / ".aml"), state_mode)
        before = tree_digest(base)
        for argv in commands:
            proc = as_nobody(*argv, "--now", NOW_TEXT)
            assert proc.returncode in (0, 1), (argv, proc.stdout, proc.stderr)
            assert "Permission denied" not in proc.stderr and "Traceback" not in proc.stderr
            notes = [l for l in proc.stderr.splitlines() if l.startswith("aml: note: ")]
            assert len(notes) <= 1, proc.stderr
            if argv[0] == "monitor" and argv[1] in ("health", "metrics"):
                assert notes and "read-only access to %s" % root in notes[0], proc.stderr
        assert tree_digest(base) == before
        assert record_id in as_nobody("get", record_id).stdout
        assert " OK: " in as_nobody("backup", "verify").stdout
        assert "would remove" in as_nobody("prune", "--dry-run", "--list").stdout


def run_cli_out(root, *argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert aml.main([str(root)] + list(argv) + ["--now", NOW_TEXT]) == 0
    return json.loads(out.getvalue())


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_only_and_prune_leads_with_totals(tmp_path, capsys,
                                                                 monkeypatch):
    root = _prune_store(tmp_path / "memory", gz=True)
    monkeypatch.setattr(aml, "PROGRESS_DELAY", 0.0)  # the line waits 2 s on a real run
    monkeypatch.setattr(aml, "PROGRESS_EVERY", 0.0)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert aml.main([str(root), "prune", "--dry-run", "--now", NOW_TEXT]) == 0
    drawn = terminal.getvalue()
    assert "\r\x1b[Kprune: planning " in drawn and " KiB (" in drawn and "%)" in drawn
    assert drawn.endswith("\r\x1b[K")  # cleared before the run ended
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("backend-developer: would remove ")
    assert lines[3].startswith("by reason: ") and not any(
        l.startswith("would remove ") for l in lines)
    assert aml.main([str(root), "prune", "--now", NOW_TEXT, "--force"]) == 0
    drawn = terminal.getvalue()
    for phase in ("prune: scanning", "backup: reading files", "prune: archiving",
                  "prune: rewriting"):
        assert "\r\x1b[K" + phase in drawn, phase
    capsys.readouterr()
    for quiet in (["-q"], []):
        terminal.truncate(0)
        terminal.seek(0)
        if not quiet:
            monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: cron
        assert aml.main([str(root), "prune", "--dry-run", "--now", NOW_TEXT] + quiet) == 0
        assert terminal.getvalue() == ""
    assert aml.progress_text("verify --deep", 1, 4, "files", 3.0) == \
        "verify --deep 1 of 4 files (25%), ETA 0:09"


# ---- issue 18: hostile files, webhooks and repositories ----

import stat

_ODD_COMMANDS = [["prune", "--force", "--now", NOW_TEXT], ["optimize", "gc"],
                 ["optimize", "compress", "--age-days", "0"], ["optimize", "index"],
                 ["search", "--tag", "nothing"], ["backup", "create"],
                 ["migrate", "migrate-latest"], ["monitor", "metrics"],
                 ["optimize", "warm-cache"]]
# One process runs every command (aml.main in turn), so a FIFO that blocks a read shows
# as a timeout of that process instead of a hung test.
_ODD_DRIVER = ("import json, sys, aml\n"
               "codes = []\n"
               "for argv in json.loads(sys.argv[1]):\n"
               "    codes.append(aml.main(argv))\n"
               "    print(json.dumps(codes), flush=True)\n")


def _make_odd(path, kind, outside):
    path.unlink()
    if kind == "symlink":
        os.symlink(str(outside), str(path))
    elif kind == "folder":
        path.mkdir()
        (path / "inside.json").write_text("[]")
    else:
        os.mkfifo(str(path))


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_a_data_file_that_is_not_a_regular_file_is_reported_by_every_command(tmp_path, kind):
    root = build_store(tmp_path / "m", agents=("alpha", "beta"))
    outside = tmp_path / "outside.json"
    write_data(outside, [make_pattern("alpha", random.Random(7))])
    outside_bytes = outside.read_bytes()
    odd = root / "alpha" / "patterns.json"
    _make_odd(odd, kind, outside)
    argv = [[str(root)] + c + ["--format", "json"] for c in _ODD_COMMANDS]
    try:
        proc = subprocess.run([sys.executable, "-c", _ODD_DRIVER, json.dumps(argv)], cwd=str(HERE),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("blocked on the %s after %s" % (kind, (exc.stdout or b"").splitlines()[-1:]))
    codes = json.loads(proc.stdout.splitlines()[-1])
    assert codes == [3] * len(_ODD_COMMANDS), proc.stderr
    assert proc.stderr.count("alpha/patterns.json") >= len(_ODD_COMMANDS)
    assert "Traceback" not in proc.stderr
    assert outside.read_bytes() == outside_bytes   # nothing written through the link
    assert os.path.islink(str(odd)) == (kind == "symlink")
    assert odd.is_dir() == (kind == "folder")
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(str(odd)).st_mode)


def test_safety_backup_never_blocks_on_a_fifo_elsewhere_in_the_store(tmp_path):
    root = build_store(tmp_path / "m", agents=("alpha",))
    os.mkfifo(str(root / "alpha" / "pipe"))
    proc = subprocess.run([sys.executable, str(HERE / "aml.py"), str(root), "prune", "--force",
                           "--now", NOW_TEXT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr   # the pipe is no data file: only left out
    # the maintenance lock was released: the next run is not "busy"
    assert aml.main([str(root), "monitor", "metrics", "-q"]) == 0


def _deep_text(depth=10000):
    return "[" + "{\"a\":" * depth + "1" + "}" * depth + "]"


def _huge_text(root):
    text = (root / "alpha" / "patterns.json").read_text()
    return text.replace('"successRate": ', '"successRate": 1e400, "was": ', 1)


@pytest.mark.parametrize("bad", ["deep", "huge"])
def test_a_record_too_deep_or_past_the_double_range_is_one_bad_file(tmp_path, capsys, bad):
    root = build_store(tmp_path / "m", agents=("alpha", "beta"))
    path = root / "alpha" / "patterns.json"
    path.write_text(_deep_text() if bad == "deep" else _huge_text(root))
    before = path.read_bytes()
    beta_before = (root / "beta" / "patterns.json").read_bytes()
    for argv in (["backup", "create"], ["prune", "--force", "--now", NOW_TEXT],
                 ["migrate", "migrate-latest"], ["monitor", "metrics"], ["optimize", "index"],
                 ["optimize", "gc"], ["search", "--tag", "x"], ["migrate", "detect"],
                 ["optimize", "compress", "--age-days", "0"]):
        code, _, err = run_cli(root, *argv, capsys=capsys)
        assert code == 3 and "alpha/patterns.json" in err, (argv, err)
        assert ("nested too deeply" if bad == "deep" else "1e400") in err, (argv, err)
    code, out, _ = run_cli(root, "monitor", "health", capsys=capsys)
    assert code == 2 and "alpha/patterns.json" in out
    assert path.read_bytes() == before   # fail closed: never rewritten
    assert (root / "beta" / "patterns.json").read_bytes() != beta_before  # the rest went on


def test_parse_json_text_rejects_what_the_runtime_reads_differently():
    for text in ("[1e400]", "[-2.5E+999]", '{"a": [0.5, 1%s.0]}' % ("0" * 400), _deep_text()):
        with pytest.raises(ValueError):
            aml.parse_json_text(text)
    assert aml.parse_json_text('["3f2e1234-1e23", 1e300, 12345678901234567890]') == [
        "3f2e1234-1e23", 1e300, 12345678901234567890]


@pytest.mark.parametrize("linked", [".aml", ".aml/archive", ".aml/index", ".aml/maintenance.lock"])
def test_a_symlinked_state_folder_is_refused_never_followed(tmp_path, capsys, linked):
    root = build_store(tmp_path / "m", agents=("alpha", "beta"))
    assert run_cli(root, "optimize", "index", "-q") == 0
    code, out, _ = run_cli(root, "prune", "--force", "--no-backup", "--now", NOW_TEXT,
                           "--format", "json", capsys=capsys)
    assert code == 0
    run_id = json.loads(out)["run_id"]
    real, elsewhere = root / linked, tmp_path / "elsewhere"
    os.replace(str(real), str(elsewhere))
    os.symlink(str(elsewhere), str(real))
    outside = tree_digest(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()
    data = tree_digest(root, skip_state=True)
    for argv in (["prune", "--force", "--no-backup", "--now", NOW_TEXT], ["optimize", "index"],
                 ["monitor", "health"], ["prune", "--undo", run_id], ["backup", "create"]):
        code, _, err = run_cli(root, *argv, capsys=capsys)
        expected = 3 if argv[0] == "monitor" else 4   # health: UNKNOWN
        assert code == expected and str(real) in err and "symlink" in err, (argv, err)
    assert (tree_digest(elsewhere) if elsewhere.is_dir() else elsewhere.read_bytes()) == outside
    assert tree_digest(root, skip_state=True) == data


@pytest.mark.parametrize("recorded, restored", [(0o6777, 0o664), (0o4755, 0o644), (0o1666, 0o664),
                                                (0o400, 0o600), (0o640, 0o640), ("0777", 0o644)])
def test_restore_applies_only_the_permission_bits_a_data_file_can_have(tmp_path, recorded,
                                                                       restored):
    root = build_store(tmp_path / "memory", agents=("alpha",))
    manager = backup_manager(root)
    snap = manager.create()
    path = manager.manifest_path(snap.backup_id)
    payload = manager.load_manifest(snap.backup_id)
    for entry in payload["files"]:
        entry["mode"] = recorded
    aml._write_manifest(path, payload)
    target = tmp_path / "restored"
    backup_manager(root).restore(snap.backup_id, target=target)
    modes = {stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*.json")}
    assert modes == {restored}


def _zero_bomb(size, gzip_wrapped=False):
    """Compressed zeros that inflate to ``size`` bytes, built a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if gzip_wrapped else 15)
    chunk, parts = bytes(1 << 20), []
    for _ in range(size >> 20):
        parts.append(packer.compress(chunk))
    parts.append(packer.flush())
    return b"".join(parts)


def _bomb_block_zero(manager, size):
    """Point block 0 of the first pack at a zlib bomb (index checksum recomputed)."""
    idx = sorted(manager.packs.glob("*.idx"))[0]
    pack = idx.with_suffix(".pack")
    decoded = aml._decode_index(idx, idx.read_bytes())
    blocks = list(decoded.blocks)
    bomb = _zero_bomb(size)
    blocks[0] = (pack.stat().st_size, len(bomb), blocks[0][2])
    with open(str(pack), "ab") as handle:
        handle.write(bomb)
    table, row = decoded.table, aml._ROW
    entries = {table[i:i + aml.KEY_LEN]: table[i + aml.KEY_LEN:i + row]
               for i in range(0, len(table), row)}
    idx.write_bytes(aml._encode_index(blocks, entries))


# VmHWM, not ru_maxrss: the latter keeps the forking pytest process's peak across exec.
_RSS_DRIVER = ("import re, sys, aml\n"
               "code = aml.main(sys.argv[1:])\n"
               "status = open('/proc/self/status').read()\n"
               "print(code, re.search(r'VmHWM:\\s*(\\d+)', status).group(1))\n")


@pytest.mark.parametrize("where", ["block", "manifest"])
def test_a_zlib_bomb_in_the_repository_is_an_integrity_failure_in_bounded_memory(tmp_path,
                                                                                 where):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc")
    root = build_store(tmp_path / "memory", agents=("alpha",))
    manager = backup_manager(root)
    snap = manager.create()
    if where == "block":
        _bomb_block_zero(manager, 256 << 20)
    else:
        manager.manifest_path(snap.backup_id).write_bytes(_zero_bomb(256 << 20, True))
    for argv in (["backup", "verify", snap.backup_id, "--deep"],
                 ["backup", "restore", snap.backup_id, "--target", str(tmp_path / "t")]):
        proc = subprocess.run([sys.executable, "-c", _RSS_DRIVER, str(root)] + argv,
                              cwd=str(HERE), capture_output=True, text=True, timeout=120)
        code, peak_kib = map(int, proc.stdout.splitlines()[-1].split())
        assert code == 6 and "zlib bomb" in proc.stderr, (argv, proc.stdout, proc.stderr)
        assert peak_kib < 200 * 1024, argv   # the bomb inflates to 256 MiB: it never was
    assert not (tmp_path / "t").exists()


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and a Location; counts requests."""

    def _answer(self):
        self.server.requests.append((self.command, self.path))
        self.send_response(self.server.status)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler, **attrs):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirected_webhook_is_a_failure_naming_the_status_never_followed(tmp_path, capsys,
                                                                           webhook, status):
    target, received = webhook
    root = build_store(tmp_path / "m")
    with _serving(_Redirector, status=status, location=target, requests=[]) as server:
        url = "http://127.0.0.1:%d/hook" % server.server_port
        code, doc, err = _health(root, "--webhook", url, capsys=capsys)
        assert [c for c, _ in server.requests] == ["POST"]   # one try, no resend
    assert code == 1 and received == []                       # nothing followed the redirect
    assert "HTTP %d" % status in err and "redirect" in err and "not delivered" in err
    assert "3 notification(s) not delivered" in err


def test_a_redirect_to_another_scheme_is_never_followed(tmp_path, capsys):
    root = build_store(tmp_path / "m")
    with _serving(_Redirector, status=302, location="file:///etc/passwd", requests=[]) as server:
        code, _, err = _health(root, "--webhook", "http://127.0.0.1:%d/" % server.server_port,
                               capsys=capsys)
    assert code == 1 and "HTTP 302" in err and "passwd" not in err


def test_webhook_timeout_bounds_the_whole_delivery_against_a_dripping_server(tmp_path, capsys):
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.1)

    def drip():   # answers one header byte every 0.2 s, for ever (0.2 s < any socket timeout)
        conns = []
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(listener.accept()[0])
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.send(b"X" if conns else b"")
            stop.wait(0.2)
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    config = tmp_path / "aml.json"
    config.write_text(json.dumps({"monitor": {"webhook_timeout": 0.5}}))
    root = build_store(tmp_path / "m")
    done = []
    runner = threading.Thread(target=lambda: done.append(_health(
        root, "--config", config, "--webhook", "http://127.0.0.1:%d/" % listener.getsockname()[1],
        capsys=capsys)), daemon=True)
    runner.start()
    runner.join(60)   # unbounded before the fix: the drip never ends, so the run never did
    stop.set()
    thread.join(5)
    listener.close()
    assert done, "the webhook delivery outlived its timeout"
    code, doc, err = done[0]
    assert code == 1 and "timed out" in err and len(doc["alerts"]["open"]) == 3


@pytest.mark.parametrize("url, secrets", [
    ("http://alice:s3cr3t-pw@127.0.0.1:{port}/hook", ["alice", "s3cr3t-pw"]),
    ("http://127.0.0.1:{port}/hook?token=abc123&x=1", ["abc123"]),
    ("http://127.0.0.1:{port}/services/T0001/B0002/Zk8sQ2xV9pLm4NqR7tWy", ["Zk8sQ2xV9pLm4NqR7tWy"]),
])
def test_webhook_credentials_never_appear_in_messages(tmp_path, capsys, url, secrets):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()   # nothing listens: delivery fails and the warning names the URL
    url = url.format(port=port)
    root = build_store(tmp_path / "m")
    code, out, err = run_cli(root, "monitor", "health", "--webhook", url, capsys=capsys)
    assert code == 1 and "webhook" in err and "***" in err and "127.0.0.1" in err
    bad = url.replace("http://", "ftp://")
    code2, out2, err2 = run_cli(root, "monitor", "health", "--webhook", bad, capsys=capsys)
    assert code2 == 3 and "***" in err2
    state = "".join(p.read_text(errors="replace") for p in (root / ".aml").rglob("*")
                    if p.is_file())
    for secret in secrets:
        assert secret not in err + out + err2 + out2 + state


def test_redact_url_keeps_what_locates_the_endpoint():
    assert aml.redact_url("https://u:p@hooks.example.org/a/b?api_key=K&page=2") == \
        "https://***@hooks.example.org/a/b?api_key=***&page=2"
    assert aml.redact_url("http://127.0.0.1:8080/hook") == "http://127.0.0.1:8080/hook"


# ---- issue 14: one checksummed envelope (seal/unseal), older layouts still read ----

def _state_1_bytes(payload):
    """A state file exactly as aml wrote it before the sealed layout ("aml-state-1")."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"))
    return ('{"format":"aml-state-1","payload":%s,"sha256":"%s"}\n' % (
        body, hashlib.sha256(body.encode("utf-8")).hexdigest())).encode("utf-8")


def _flip_in_payload(raw, offset_from_end=3):
    """One bit of a sealed file's payload changed (close to its end, inside the payload)."""
    data = bytearray(raw)
    data[len(data) - offset_from_end] ^= 0x01
    return bytes(data)


def test_seal_verifies_raw_bytes_and_a_flipped_byte_fails_closed():
    for payload in ({"b": [1, "\u00e9"], "a": None}, b"\x00\xff}binary{"):
        sealed = aml.seal(payload, "aml-test-1")
        assert aml.is_sealed(sealed)
        assert aml.unseal(sealed, "aml-test-1", "t", parse=isinstance(payload, dict)) == payload
        with pytest.raises(aml.ChecksumError, match="t: checksum mismatch") as bad:
            aml.unseal(_flip_in_payload(sealed), "aml-test-1", "t", parse=False)
        assert bad.value.exit_code == aml.ExitCode.INTEGRITY == 6
        with pytest.raises(aml.IntegrityError, match="t: "):   # cut short
            aml.unseal(sealed[:-1], "aml-test-1", "t", "thing")
        for broken in (sealed + b"\n", sealed.replace(b"test", b"tEst", 1), b""):
            with pytest.raises(aml.IntegrityError, match="t: unreadable thing"):
                aml.unseal(broken, "aml-test-1", "t", "thing")
    assert json.loads(aml.seal({"x": 1}, "f")) == {
        "format": "f", "sha256": hashlib.sha256(b'{"x":1}').hexdigest(), "payload": {"x": 1}}


def test_state_files_of_the_older_layout_are_read_and_rewritten_sealed(tmp_path):
    s = aml.Store(build_store(tmp_path / "m"))
    s.ensure_state_dir()
    path = s.state_path("thing.json")
    path.write_bytes(_state_1_bytes({"b": "\u00e9t\u00e9", "a": [1, 2.5, None]}))
    assert s.read_state("thing.json") == {"a": [1, 2.5, None], "b": "\u00e9t\u00e9"}
    path.write_bytes(_state_1_bytes({"a": 1}).replace(b'"a":1', b'"a":2'))
    with pytest.raises(aml.ChecksumError):
        s.read_state("thing.json")
    s.write_state("thing.json", {"a": 1})
    assert path.read_bytes().startswith(b'{"format": "aml-state-2", "sha256": "')
    assert s.read_state("thing.json") == {"a": 1}
    path.write_bytes(_flip_in_payload(path.read_bytes()))
    with pytest.raises(aml.ChecksumError) as bad:
        s.read_state("thing.json")
    assert bad.value.exit_code == 6


def _write_old_archived_run(root, run_id, entry):
    """A one-part run as aml wrote it before the envelope: manifest in "aml-state-1", the part
    the gzip of '{"format": "aml-archive-part-1", "sha256": ..., "payload": ...}'."""
    folder = root / ".aml" / "archive" / run_id
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_bytes(_state_1_bytes({
        "run_id": run_id, "operation": "prune", "created": NOW_TEXT, "status": "complete",
        "counts": {"entries": 1, "parts": 1}, "undone": None}))
    body = json.dumps({"run_id": run_id, "part": 1, "entries": [entry]}, sort_keys=True,
                      ensure_ascii=False, allow_nan=False)
    text = '{"format": "%s", "sha256": "%s", "payload": %s}' % (
        "aml-archive-part-1", hashlib.sha256(body.encode("utf-8")).hexdigest(), body)
    (folder / "part-0001.json.gz").write_bytes(gzip.compress(text.encode("utf-8"), 6, mtime=0))
    return folder


def test_archived_runs_of_the_older_layout_undo_and_a_flipped_byte_exits_6(tmp_path, capsys):
    rng = random.Random(14)
    keep, lost = _pattern(rng), _pattern(rng)
    ordered = dict(reversed(list(lost.items())))  # the file's own key order, not sorted
    root = _one_agent(tmp_path / "m", patterns=[keep])
    aml.Store(root).ensure_state_dir()
    run_id = "prune_20261101_000000_aaaaaa"
    folder = _write_old_archived_run(root, run_id, {
        "agent": "solo", "file": "solo/patterns.json", "type": "pattern", "id": lost["id"],
        "index": 0, "reason": "unused_too_long", "details": {}, "copies_kept": 0,
        "record_text": json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))})
    code, out, _ = run_cli(root, "prune", "--list-runs", capsys=capsys)
    assert code == 0 and run_id + "  prune" in out and "1 records" in out
    code, out, _ = run_cli(root, "prune", "--undo", run_id, "--now", NOW_TEXT, capsys=capsys)
    assert code == 0 and "restored 1 records" in out
    assert read_data(root / "solo" / "patterns.json") == [ordered, keep]
    assert list(read_data(root / "solo" / "patterns.json")[0]) == list(ordered)
    manifest = folder / "manifest.json"
    assert manifest.read_bytes().startswith(b'{"format": "aml-state-2"')  # undone: rewritten
    # The new layout (a run written now) fails closed on one flipped byte, as before: exit 6.
    root = _prune_store(tmp_path / "m2")
    result = aml.MemoryPruner(aml.Store(root, now=NOW), aml.PruneConfig(create_backup=False)).run()
    assert result.removed
    new = root / ".aml" / "archive" / result.run_id
    pruned = tree_digest(root, skip_state=True)
    for victim in (new / "manifest.json", sorted(new.glob("part-*.json.gz"))[0]):
        good = victim.read_bytes()
        raw = gzip.decompress(good) if victim.suffix == ".gz" else good
        raw = _flip_in_payload(raw)
        victim.write_bytes(gzip.compress(raw) if victim.suffix == ".gz" else raw)
        code, _, err = run_cli(root, "prune", "--undo", result.run_id, capsys=capsys)
        assert code == 6 and "checksum mismatch" in err
        assert tree_digest(root, skip_state=True) == pruned
        victim.write_bytes(good)


def _old_pack_index(idx):
    """A pack index rewritten the way aml wrote it before the envelope (AMLIDX03)."""
    import struct
    import zlib
    pack = aml._decode_index(idx, idx.read_bytes())
    payload = b"".join([struct.pack("<I", len(pack.blocks))]
                       + [struct.pack("<QII", *b) for b in pack.blocks]
                       + [struct.pack("<I", pack.count), pack.table])
    idx.write_bytes(b"AMLIDX03" + hashlib.sha256(payload).digest() + zlib.compress(payload, 6))


def test_backup_repositories_of_the_older_layout_verify_and_restore(tmp_path, capsys):
    root = build_store(tmp_path / "memory", gz="mixed")
    expected = content_digest(root)
    manager = backup_manager(root)
    snap = manager.create()
    path = manager.manifest_path(snap.backup_id)
    sealed = gzip.decompress(path.read_bytes())
    assert sealed.startswith(b'{"format": "aml-state-2"')
    payload = aml.read_checksummed(path)
    path.write_bytes(gzip.compress(_state_1_bytes(payload), compresslevel=9, mtime=0))
    verified = manager.repo / "verified.json"
    verified.write_bytes(_state_1_bytes(aml.read_checksummed(verified)))
    for idx in manager.packs.glob("*.idx"):
        _old_pack_index(idx)
        assert idx.read_bytes()[:8] == b"AMLIDX03"
    mutate_store(root)
    code, _, err = run_cli(root, "backup", "verify", snap.backup_id, "--deep", capsys=capsys)
    assert code == 0, err
    assert run_cli(root, "backup", "restore", snap.backup_id, "-q") == 0
    assert content_digest(root) == expected
    # Written now: a flipped byte in the manifest or a pack index fails closed (exit 6).
    # new content, so this backup writes a pack of its own (the restore's safety backup wrote
    # one too, maybe in the same second: pack names do not say which is whose)
    write_data(root / "fresh-agent" / "patterns.json", [make_pattern("fresh-agent",
                                                                    random.Random(3))])
    before = set(manager.packs.glob("*.idx"))
    again = backup_manager(root).create()
    path = backup_manager(root).manifest_path(again.backup_id)
    (idx,) = set(manager.packs.glob("*.idx")) - before
    assert idx.read_bytes().startswith(b'{"format": "aml-pack-index-1"')
    for victim, gz in ((path, True), (idx, False)):
        good = victim.read_bytes()
        raw = _flip_in_payload(gzip.decompress(good) if gz else good, 40)
        victim.write_bytes(gzip.compress(raw) if gz else raw)
        code, _, err = run_cli(root, "backup", "verify", again.backup_id, capsys=capsys)
        assert code == 6 and again.backup_id in err
        code, _, err = run_cli(root, "backup", "restore", again.backup_id, capsys=capsys)
        assert code == 6 and err.startswith("aml: error:")
        victim.write_bytes(good)


def test_bloom_filters_of_the_older_layout_are_read_and_a_flipped_byte_is_refused(tmp_path):
    bloom = aml.BloomFilter(500, 0.01)
    for i in range(300):
        bloom.add("id-%d" % i)
    body = aml._BLOOM_HEADER.pack(b"AMLB", 1, bloom.m, bloom.k, len(bloom)) + bytes(bloom.bits)
    old = aml.BloomFilter.from_bytes(body + hashlib.sha256(body).digest())
    assert (old.m, old.k, len(old), old.bits) == (bloom.m, bloom.k, 300, bloom.bits)
    assert bloom.to_bytes().startswith(b'{"format": "aml-bloom-1"')
    with pytest.raises(aml.ChecksumError):
        aml.BloomFilter.from_bytes(body + hashlib.sha256(body + b"x").digest())
    # An index on disk from before: its bloom.bin with the trailer, its manifest in aml-state-1.
    root = build_store(tmp_path / "m")
    s = aml.Store(root)
    index = aml.MemoryIndex(s)
    index.refresh()
    record = read_data(root / "backend-developer" / "patterns.json")[3]
    part, manifest = index.part("bloom.bin"), index.manifest()
    new = aml.BloomFilter.from_bytes(part.read_bytes())
    body = part.read_bytes()[len(b'{"format": "aml-bloom-1", "sha256": "') + 64 + 14:-1]
    assert body == aml._BLOOM_HEADER.pack(b"AMLB", 1, new.m, new.k, len(new)) + bytes(new.bits)
    part.write_bytes(body + hashlib.sha256(body).digest())
    manifest["bloom"]["sha256"] = hashlib.sha256(part.read_bytes()).hexdigest()
    index.part("manifest.json").write_bytes(_state_1_bytes(manifest))
    assert aml.MemoryIndex(s).might_contain(record["id"]) is True
    assert aml.MemoryIndex(s).locate(record["id"])
    index = aml.MemoryIndex(s)
    assert index.refresh().files_removed == []   # nothing changed: the older index is kept
    assert part.read_bytes()[:4] == b"AMLB"
    assert aml.MemoryIndex(s).might_contain(record["id"]) is True
    new_bytes = aml.BloomFilter(10, 0.01).to_bytes()
    for raw in (_flip_in_payload(new_bytes), new_bytes[:-1]):
        with pytest.raises(aml.IntegrityError):
            aml.BloomFilter.from_bytes(raw)


# ---- issue 14: config layering (layer_config over dataclasses with per-field rules) ----

def _aml_config(root, doc):
    (root / ".aml").mkdir(exist_ok=True)
    (root / ".aml" / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("section, argv, line", [
    ({"prune": {"max_removal_share": 2}}, ("prune", "--dry-run"),
     "aml config [prune]: max_removal_share=2 is not a valid value "
     "(must be a number >= 0 and <= 1)"),
    ({"backup": {"compression_level": 12}}, ("backup", "create"),
     "aml config [backup]: compression_level=12 is not a valid value "
     "(must be an integer >= 0 and <= 9)"),
    ({}, ("backup", "create", "--compression-level", "12"),
     "command line: compression_level=12 is not a valid value"),
    ({"optimize": {"dedupe_threshold": 0}}, ("optimize", "dedupe"),
     "aml config [optimize]: dedupe_threshold=0 is not a valid value "
     "(must be a number > 0 and <= 1)"),
    ({}, ("optimize", "compress", "--workers", "-1"),
     "command line: workers=-1 is not a valid value (must be an integer >= 0)"),
    ({"monitor": {"cache_min_lookups": -1}}, ("monitor", "metrics"),
     "aml config [monitor]: cache_min_lookups=-1 is not a valid value (must be a number >= 0)"),
    ({}, ("monitor", "metrics", "--threshold", "query_time_warning_ms=-5"),
     "threshold override: query_time_warning_ms=-5.0 is not a valid value"),
    ({"monitor": {"webhook_timeout": 0}}, ("monitor", "metrics"),
     "aml config [monitor]: webhook_timeout=0 is not a valid value (must be a number > 0)"),
    ({"monitor": {"webhook_timeout": "5"}}, ("monitor", "alerts"),
     "aml config [monitor]: webhook_timeout='5' is not a valid value"),
], ids=["prune-file", "backup-file", "backup-flag", "optimize-file", "optimize-flag",
        "threshold-file", "threshold-flag", "webhook-timeout", "webhook-timeout-type"])
def test_a_bad_setting_is_refused_in_one_line_naming_field_and_layer(tmp_path, capsys, section,
                                                                     argv, line):
    root = build_store(tmp_path / "m", agents=("a",))
    _aml_config(root, section)
    before = content_digest(root)
    code, out, err = run_cli(root, *argv, capsys=capsys)
    assert code == int(aml.ExitCode.USAGE) and line in err and err.count("\n") == 1
    assert content_digest(root) == before


def test_a_bad_library_config_names_field_and_layer(tmp_path):
    store = aml.Store(build_store(tmp_path / "m", agents=("a",)))
    with pytest.raises(aml.UsageError, match=r"^backup config: max_backups=0 is not a valid"):
        aml.BackupManager(store, aml.BackupConfig(max_backups=0))
    with pytest.raises(aml.UsageError, match=r"^command line: scoring='best' is not a valid "
                       r"value \(must be one of mean, wilson\)$"):
        aml.prune_config_for(store, {}, {"scoring": "best"})
    write_data(store.root / "config.json", dict(CONFIG, pruning={"maxAgeDays": -3}))
    with pytest.raises(aml.UsageError, match=r"config\.json \(pruning\): "
                       r"pattern_max_age_days=-3 is not a valid"):
        aml.prune_config_for(store)
    with pytest.raises(aml.UsageError, match=r"^command line: create_backup='no' is not a valid"):
        aml.optimize_config_for(store, create_backup="no")
    with pytest.raises(aml.UsageError, match=r"^aml config \[monitor\]: unknown threshold\(s\) "
                       r"nope \(known: agent_memory_critical_mb, "):
        aml.resolve_thresholds(store, {"nope": 1, "webhook_url": "http://127.0.0.1:1/"})
    with pytest.raises(aml.UsageError, match=r"^command line: serve_interval=90000 is not a "):
        aml.monitor_settings_for(store, {}, serve_interval=90000)


def test_prune_settings_layer_default_store_file_flag(tmp_path):
    store = aml.Store(build_store(tmp_path / "m", agents=("a",)))
    write_data(store.root / "config.json", dict(CONFIG, pruning={"maxAgeDays": 50}))
    got = aml.prune_config_for(store)
    assert (got.pattern_max_age_days, got.scoring, got.max_removal_share) == (50, "mean", 0.5)
    _aml_config(store.root, {"prune": {"pattern_max_age_days": 40, "scoring": "wilson",
                                       "max_removal_share": 0.3}})
    got = aml.prune_config_for(store, aml.load_aml_config(store))
    assert (got.pattern_max_age_days, got.scoring, got.max_removal_share) == (40, "wilson", 0.3)
    got = aml.prune_config_for(store, aml.load_aml_config(store), {"scoring": "mean"})
    assert (got.pattern_max_age_days, got.scoring, got.max_removal_share) == (40, "mean", 0.3)


def test_backup_settings_layer_default_file_flag(tmp_path):
    store = aml.Store(build_store(tmp_path / "m", agents=("a",)))
    got = aml.backup_config_for(store)
    assert (got.retention_days, got.max_backups, got.compression_level) == (30, 100, 6)
    _aml_config(store.root, {"backup": {"retention_days": 10, "compression_level": 1}})
    got = aml.backup_config_for(store, retention_days=None)     # None: the flag is not given
    assert (got.retention_days, got.max_backups, got.compression_level) == (10, 100, 1)
    got = aml.backup_config_for(store, retention_days=5)
    assert (got.retention_days, got.max_backups, got.compression_level) == (5, 100, 1)


def test_optimize_settings_layer_default_file_flag(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a",))
    store = aml.Store(root)
    got = aml.optimize_config_for(store)
    assert (got.compress_age_days, got.workers, got.create_backup, got.dedupe) == (
        30.0, 0, True, False)
    _aml_config(root, {"optimize": {"compress_age_days": 0, "workers": 2, "dedupe": True}})
    got = aml.optimize_config_for(store)
    assert (got.compress_age_days, got.workers, got.create_backup, got.dedupe) == (0, 2, True, True)
    got = aml.optimize_config_for(store, compress_age_days=100000, workers=None,
                                  create_backup=False)
    assert (got.compress_age_days, got.workers, got.create_backup, got.dedupe) == (
        100000, 2, False, True)
    # the command line reads the same layers, on files last changed 10 days before NOW:
    # the default (30 days) compresses none, the file's 5 days all, --age-days 20 none again
    old = (NOW - dt.timedelta(days=10)).timestamp()
    for path in root.rglob("*.json"):
        os.utime(path, (old, old))

    def compressed(*flags):
        code, out, _ = run_cli(root, "--format", "json", "--now", NOW_TEXT, "optimize",
                               "compress", "--dry-run", *flags, capsys=capsys)
        assert code == 0
        return json.loads(out)["steps"]["compress"]["files"]
    _aml_config(root, {})
    assert compressed() == []
    _aml_config(root, {"optimize": {"compress_age_days": 5}})
    assert len(compressed()) == 5 and compressed("--age-days", "20") == []


def test_monitor_settings_layer_default_store_file_flag(tmp_path, capsys):
    root = build_store(tmp_path / "m", agents=("a",))
    write_data(root / "config.json", dict(CONFIG, performance={"queryTimeoutMs": 80}))
    store = aml.Store(root)
    got = aml.resolve_thresholds(store)
    assert isinstance(got, aml.MonitorThresholds)
    assert (got["agent_memory_warning_mb"], got["query_time_warning_ms"]) == (60, 80)
    section = {"agent_memory_warning_mb": 50, "query_time_warning_ms": 70, "webhook_timeout": 2}
    got = aml.resolve_thresholds(store, section)
    assert (got["agent_memory_warning_mb"], got["query_time_warning_ms"]) == (50, 70)
    got = aml.resolve_thresholds(store, section, {"agent_memory_warning_mb": 40})
    assert (got["agent_memory_warning_mb"], got["query_time_warning_ms"]) == (40, 70)
    assert dict(got) == dict(aml.DEFAULT_THRESHOLDS, agent_memory_warning_mb=40,
                             query_time_warning_ms=70)
    assert aml.monitor_settings_for(store).webhook_timeout == 5.0
    assert aml.monitor_settings_for(store, section).webhook_timeout == 2
    got = aml.monitor_settings_for(store, {"serve_interval": 7}, serve_interval=2.5)
    assert got.serve_interval == 2.5
    # what the dashboard and reports show: the same keys and values as the mapping
    thresholds = aml.MemoryMonitor(store, thresholds={"agent_memory_warning_mb": 40}).thresholds
    assert aml.to_jsonable(thresholds) == dict(thresholds) == dict(
        aml.DEFAULT_THRESHOLDS, agent_memory_warning_mb=40, query_time_warning_ms=80)
    assert list(aml.DEFAULT_THRESHOLDS)[:2] == ["agent_memory_warning_mb",
                                                "agent_memory_critical_mb"]


# ---- issue 14: results and exit codes ----

@dataclasses.dataclass
class _EveryField(aml.OperationResult):
    """A result with every field the base reads, to build each exit code by hand."""

    busy: list = dataclasses.field(default_factory=list)
    refused: object = None
    problems: list = dataclasses.field(default_factory=list)
    failure: object = None
    unreadable: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)


_WORST_FIRST = [("busy", ["store busy: x.lock"], aml.ExitCode.BUSY),
                ("refused", "mass deletion", aml.ExitCode.REFUSED),
                ("problems", ["pack damaged"], aml.ExitCode.INTEGRITY),
                ("failure", aml.ExitCode.FAILURE, aml.ExitCode.FAILURE),
                ("unreadable", ["a/patterns.json: bad"], aml.ExitCode.PARTIAL),
                ("warnings", ["note"], aml.ExitCode.PARTIAL)]


@pytest.mark.parametrize("worst", range(len(_WORST_FIRST)))
def test_operation_result_exit_code_is_the_worst_set_field_in_one_precedence(worst):
    # every field from `worst` on is set: the code is the one of `worst`
    result = _EveryField(**{name: value for name, value, _ in _WORST_FIRST[worst:]})
    assert result.exit_code is _WORST_FIRST[worst][2]
    assert _EveryField().exit_code is aml.ExitCode.OK


def test_each_result_class_keeps_its_exit_code():
    config = aml.PruneConfig()
    prune = aml.PruneResult("r", False, [], config, [], [], unreadable=["a: x"], busy=["b"],
                            refused="guard")
    assert prune.exit_code is aml.ExitCode.BUSY
    prune.busy = []
    assert prune.exit_code is aml.ExitCode.REFUSED
    prune.refused = None
    assert prune.exit_code is aml.ExitCode.PARTIAL
    undo = aml.UndoResult("r", "prune", skipped=[{"file": "a"}])
    assert undo.exit_code is aml.ExitCode.OK        # skipped records are not a failure
    undo.blocked = [{"file": "a"}]
    assert undo.exit_code is aml.ExitCode.PARTIAL
    undo.failed = aml.ExitCode.INTEGRITY
    assert undo.exit_code is aml.ExitCode.INTEGRITY
    migration = aml.MigrationResult(target="1.2.0", dry_run=True, reported=[{"file": "a"}])
    assert migration.exit_code is aml.ExitCode.PARTIAL
    migration.refused = [{"file": "a"}]
    assert migration.exit_code is aml.ExitCode.REFUSED
    lookup = aml.LookupResult([], "index", not_found=True)
    assert lookup.exit_code is aml.ExitCode.FAILURE
    lookup.unreadable = ["a: x"]                   # it may be in the unreadable file
    assert lookup.exit_code is aml.ExitCode.PARTIAL
    restore = aml.RestoreResult("b", Path("t"), False, [], [], [], 0, None, warnings=["w"])
    assert restore.exit_code is aml.ExitCode.OK     # its warnings leave exit 0
    copy = aml.CopyResult("d", False, [], [], 0, 0, True, 0, problems=["p"], warnings=["w"])
    assert copy.exit_code is aml.ExitCode.INTEGRITY
    copy.problems = []
    assert copy.exit_code is aml.ExitCode.PARTIAL
    rotate = aml.RotateResult(False, [], [], 0, 0, 0, warnings=["w"])
    auto = aml.AutoResult(None, "not due", rotate, copy=copy)
    assert auto.exit_code is aml.ExitCode.PARTIAL
    rotate.warnings = []
    assert auto.exit_code is aml.ExitCode.OK        # the copy's warnings do not count in auto
    auto.copy_error, auto.copy_exit = "copy failed", 5
    assert auto.exit_code is aml.ExitCode.BUSY
    gc = aml.GcResult(True, None, [], {}, ["agent"], [], [], [], [], 0, None, 0.0)
    assert gc.exit_code is aml.ExitCode.REFUSED


def test_output_report_prints_problem_lines_in_one_order_and_shape():
    out, err = io.StringIO(), io.StringIO()
    output = aml.Output("text", quiet=True, stdout=out, stderr=err)
    result = _EveryField(busy=["store busy: x.lock"], problems=["pack damaged"],
                         unreadable=["a/p.json: bad"], warnings=["note"])
    output.report(result, unreadable="skipped unreadable %s", busy="left: %s", errors=True)
    output.report(result, errors=None)
    assert err.getvalue().splitlines() == [
        "aml: error: pack damaged", "aml: warning: note",
        "aml: warning: skipped unreadable a/p.json: bad", "aml: warning: left: store busy: x.lock",
        "aml: warning: note", "aml: warning: skipped, unreadable: a/p.json: bad",
        "aml: warning: store busy: x.lock"]
    assert out.getvalue() == ""


def test_prune_names_an_unreadable_file_as_file_colon_problem_in_text_and_json(tmp_path,
                                                                               capsys):
    root = _prune_store(tmp_path / "m")
    (root / "code-reviewer" / "patterns.json").write_bytes(b'[{"id": "a"},')
    code, doc, err = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                             capsys=capsys)
    unreadable = json.loads(doc)["unreadable"]
    assert code == 3 and len(unreadable) == 1
    assert unreadable[0].startswith("code-reviewer/patterns.json: ")
    assert "aml: warning: skipped unreadable %s\n" % unreadable[0] in err


def test_undo_names_an_unreadable_file_as_file_colon_problem(tmp_path, capsys):
    root = _prune_store(tmp_path / "m")
    code, doc, _ = run_cli(root, "prune", "--no-backup", "--now", NOW_TEXT, "--format", "json",
                           capsys=capsys)
    run_id = json.loads(doc)["run_id"]
    bad = root / "code-reviewer" / "patterns.json"
    bad.write_bytes(b'[{"id": "a"},')
    result = aml.undo_run(aml.Store(root), run_id)
    assert result.exit_code is aml.ExitCode.PARTIAL and bad.read_bytes() == b'[{"id": "a"},'
    assert [u.split(": ")[0] for u in result.unreadable] == ["code-reviewer/patterns.json"]
    code, doc, err = run_cli(root, "prune", "--undo", run_id, "--format", "json", capsys=capsys)
    assert code == 3 and json.loads(doc)["unreadable"] == result.unreadable
    assert "not restored" in err and "code-reviewer/patterns.json" in err


# ---- issue 14: one array scanner, one field reader, one id table ----

@pytest.mark.parametrize("text", [
    '[{"a": "x\\"]", "b": [1, {"c": "}"}]}, "\\u00e9\\\\", [[]], {}]',
    ' [\n  {"id": "é", "n": [2, [3]]} ,\t"[,]" , -1.5e3, true, null ]\n',
    '[]'])
def test_scan_json_array_gives_each_element_with_its_exact_text(text):
    items, starts, ends = aml.scan_json_array(text)
    assert items == json.loads(text) and len(starts) == len(ends) == len(items)
    assert [json.loads(text[start:end]) for start, end in zip(starts, ends)] == items
    assert all(text[start:end] == text[start:end].strip() for start, end in zip(starts, ends))
    assert aml.scan_json_array(text, values=False) == ([], starts, ends)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("unicode", [False, True])
def test_index_offsets_and_backup_spans_come_from_the_same_scan(tmp_path, monkeypatch, gz,
                                                                 unicode):
    monkeypatch.setattr(aml, "_OFFSET_MIN_CHARS", 0)   # the element-wise path, as for a big file
    rng = random.Random(14)
    records = [make_pattern("backend-developer", rng) for _ in range(5)]
    if unicode:
        records[2]["tags"] = ["é\"]", "x\\y", "}{"]
    path = tmp_path / "patterns.json"
    write_data(path, records, gz=gz)
    got, offsets = aml.load_records_with_offsets(path)
    text = aml.decode_file_bytes(path, path.read_bytes())[0]
    head, sep, tail, spans = aml.split_json_array(text)
    assert got == records and len(spans) == len(offsets) == 5
    flagged = not gz and text.isascii()   # plain ASCII: byte offsets in the file as stored
    assert [at - aml._BYTE_OFFSET if flagged else at for at in offsets] == [s for s, _ in spans]
    assert [json.loads(text[start:end]) for start, end in spans] == records
    assert head + sep.join(text[s:e] for s, e in spans) + tail == text


@pytest.mark.parametrize("record", [
    {"id": "runtime", "evolution": {"confidenceScore": 0.4, "lastUsed": "2026-11-01T00:00:00Z",
                                    "created": "2026-01-01T00:00:00Z"},
     "metrics": {"successRate": 0.75, "executionCount": 4}, "tags": ["a", 1], "active": False},
    {"id": "legacy", "success_rate": 0.7, "usage_count": 4, "confidence": 0.6,
     "last_used": "2026-01-02T00:00:00Z", "tags": ["x"]},
    {"id": "nested", "performance": {"success_rate": 0.5, "usage_count": 2},
     "lifecycle": {"created_at": "2025-05-01T00:00:00Z", "state": "archived"}},
    {"id": "mixed", "evolution": {"confidenceScore": 0.3}, "lastUsed": "2026-02-02T00:00:00Z",
     "metrics": {"successRate": True, "executionCount": 2}, "timestamp": "2025-01-01T00:00:00Z"},
    {"id": "empty last use", "evolution": {"lastUsed": "", "created": "2025-03-03T00:00:00Z",
                                           "confidenceScore": 0.5},
     "metrics": {"successRate": 0.5, "executionCount": 3}, "timestamp": "2024-01-01T00:00:00Z"},
    {"id": "", "timestamp": "2024-06-01T00:00:00Z"},
    "not a record"])
def test_posting_row_reads_what_record_facts_reads(record):
    row = aml.posting_row(record, 7)
    facts = aml.record_facts(aml.RecordType.PATTERN, record)
    assert row[aml.P_ID] == facts.id and row[aml.P_POS] == 7
    assert (row[aml.P_CONF], row[aml.P_SR], row[aml.P_EXEC]) == \
        (facts.confidence, facts.success_rate, facts.execution_count)
    assert aml.parse_timestamp(row[aml.P_LAST]) == facts.last_activity
    assert row[aml.P_ACTIVE] == facts.active and tuple(row[aml.P_TAGS]) == facts.tags


def test_id_table_takes_whole_rows_only_and_refuses_a_bucket_that_does_not_verify(tmp_path):
    row = aml._ID_ROW
    digest = aml.bloom_digest("wanted")
    # A row whose bytes hold the digest across a row boundary is not a match.
    straddling = row.pack(b"\0" * 8 + digest[:8], int.from_bytes(digest[8:12], "big"),
                          int.from_bytes(digest[12:16], "big"), 9)
    chunk = straddling + row.pack(digest, 1, 2, 3) + row.pack(aml.bloom_digest("other"), 4, 5, 6)
    path = tmp_path / "ids.bin"
    path.write_bytes(b"HEAD" + chunk)
    table = aml._IdTable(path, row, header=4)
    spans = aml._IdTable.spans([b"", chunk], row.size)
    assert spans == [[0, 0, hashlib.sha256(b"").hexdigest()],
                     [0, 3, hashlib.sha256(chunk).hexdigest()]]
    assert table.bucket(spans[1]) == chunk and table.bucket(spans[0]) == b""
    assert table.find(chunk, digest) == [(digest, 1, 2, 3)]
    assert table.bucket([0, 3, hashlib.sha256(b"x").hexdigest()]) is None
