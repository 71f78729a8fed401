#!/usr/bin/env python3
"""aml - keep AI agents' memory stores healthy.

aml maintains the memory store that learning agents and the Loom AML runtime
write (by convention ``.loom/memory/``): one folder per agent holding JSON
arrays of learned patterns, error solutions and design decisions. It prunes
stale and failed knowledge, optimizes lookups, backs the store up, migrates
its schema and watches its health, from the command line and from cron.
One file, standard library only, CPython 3.9 to 3.13.

Store layout (a ``.json`` file may hold gzip bytes; aml decides by content)::

    .loom/memory/                 <- the memory path given on the command line
      config.json                 runtime configuration (never compressed or moved)
      <agent>/patterns.json       JSON array of pattern records
      <agent>/solutions.json      JSON array of solution records
      <agent>/decisions.json      JSON array of decision records
      <agent>/metrics.json        one JSON object (optional)
      <agent>/context.json        one JSON object (optional)
      global/                     shared data written by the runtime
      .aml/                       aml's own state (archive, index, history)

Typical commands::

    aml.py .loom/memory prune --dry-run
    aml.py .loom/memory prune time_based performance_based
    aml.py .loom/memory prune --undo RUN_ID

Cron (weekly prune, Sunday 3 a.m.; quiet on success)::

    0 3 * * 0  python3 /path/to/aml.py /path/to/.loom/memory prune --quiet

Exit codes::

    0  success
    1  the operation failed
    2  usage error (bad arguments, missing memory path)
    3  finished, but some files could not be read and were skipped
    4  refused by a safety guard (mass deletion, missing backup, ...)
    5  store busy: a lock stayed held past the wait limit
    6  integrity failure (a backup or state file does not verify)
    130 interrupted

Section map (``grep -n '^# [0-9]*\\. ' aml.py``)::

    1. Header            5. Storage primitives    9. Bloom filter, LRU cache   13. Migration
    2. Imports           6. Record model          10. Index and search         14. Monitoring
    3. Constants, errors 7. Store and state       11. Pruning                  15. Output
    4. Utilities         8. Backup and restore    12. Compression and gc       16. CLI
"""

# =============================================================================
# 1. Header
# Version and the public API (``__all__``).
# =============================================================================

__version__ = "0.1.0"

__all__ = [
    "AmlError", "UsageError", "CorruptFileError", "RefusedError", "StoreBusyError",
    "IntegrityError", "ExitCode", "RecordType", "RecordFacts", "record_facts",
    "parse_timestamp", "format_timestamp", "load_json_file", "write_json_file",
    "atomic_write_bytes", "FileLock", "MaintenanceLock", "Store", "Archive", "load_aml_config",
    "main",
]

# =============================================================================
# 2. Imports and version guard
# Standard library only.
# =============================================================================

import sys

if sys.version_info < (3, 9):  # pragma: no cover - the guard itself
    sys.exit("aml: error: Python 3.9 or newer is required (found %d.%d)" % sys.version_info[:2])

import argparse
import contextlib
import dataclasses
import datetime as _dt
import enum
import errno
import fcntl
import gzip
import hashlib
import io
import json
import math
import os
import re
import secrets
import signal
import stat
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

# =============================================================================
# 3. Constants, exit codes, errors
# Names every later section shares. No I/O.
# =============================================================================

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
STATE_DIR_NAME = ".aml"
TMP_MARKER = ".aml-tmp-"
RECORD_FILES = ("patterns.json", "solutions.json", "decisions.json")
OBJECT_FILES = ("metrics.json", "context.json")
KNOWN_AGENT_FILES = RECORD_FILES + OBJECT_FILES
RESERVED_DIRS = frozenset({"global", "config", "audit", "backup", "backups", "monitoring",
                           "memory-backup"})
LOCK_STALE_SECONDS = 30.0
LOCK_REFRESH_SECONDS = 10.0
DEFAULT_LOCK_TIMEOUT = 60.0
GZIP_LEVEL = 6


class ExitCode(enum.IntEnum):
    """The documented, stable exit codes."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    PARTIAL = 3
    REFUSED = 4
    BUSY = 5
    INTEGRITY = 6
    INTERRUPTED = 130


class AmlError(Exception):
    """Base of every error aml raises on purpose; carries its exit code."""

    exit_code = ExitCode.FAILURE


class UsageError(AmlError):
    """Bad arguments or a memory path that is not a store."""

    exit_code = ExitCode.USAGE


class CorruptFileError(AmlError):
    """A file could not be read or parsed; it is never treated as empty."""

    exit_code = ExitCode.PARTIAL

    def __init__(self, path: Path, problem: str):
        super().__init__("%s: %s" % (path, problem))
        self.path = Path(path)
        self.problem = problem


class RefusedError(AmlError):
    """A safety guard refused the operation (override flags are named in the message)."""

    exit_code = ExitCode.REFUSED


class StoreBusyError(AmlError):
    """A lock stayed held by someone else past the wait limit."""

    exit_code = ExitCode.BUSY


class IntegrityError(AmlError):
    """A backup, archive or state file failed verification."""

    exit_code = ExitCode.INTEGRITY


# =============================================================================
# 4. Small utilities
# Time, sizes, JSON text, checksums. Pure functions; no store knowledge.
# =============================================================================

_TS_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?\s*$")


def utcnow() -> _dt.datetime:
    """The current time, timezone-aware UTC."""
    return _dt.datetime.now(_dt.timezone.utc)


def _tz_from_text(text: Optional[str]) -> _dt.timezone:
    if not text or text in ("Z", "z"):
        return _dt.timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    minutes = int(digits[:2]) * 60 + (int(digits[2:4]) if len(digits) > 2 else 0)
    return _dt.timezone(sign * _dt.timedelta(minutes=minutes))


def parse_timestamp(value: Any) -> Optional[_dt.datetime]:
    """Parse an ISO 8601 text (``Z``, offset or naive = UTC) or epoch number; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return None
        seconds = value / 1000.0 if abs(value) > 1e11 else float(value)
        try:
            return _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    match = _TS_RE.match(value)
    if not match:
        return None
    y, mo, d, h, mi, s, frac, tz = match.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        return _dt.datetime(int(y), int(mo), int(d), int(h or 0), int(mi or 0), int(s or 0),
                            micro, tzinfo=_tz_from_text(tz)).astimezone(_dt.timezone.utc)
    except ValueError:
        return None


def format_timestamp(moment: _dt.datetime) -> str:
    """Format as the runtime does: ``YYYY-MM-DDTHH:MM:SS.sssZ`` in UTC."""
    moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def compact_stamp(moment: _dt.datetime) -> str:
    """A sortable stamp for ids and file names: ``YYYYMMDD_HHMMSS``."""
    return moment.astimezone(_dt.timezone.utc).strftime("%Y%m%d_%H%M%S")


def days_between(earlier: _dt.datetime, later: _dt.datetime) -> float:
    """Whole and fractional days from ``earlier`` to ``later`` (negative if in the future)."""
    return (later - earlier).total_seconds() / 86400.0


def human_bytes(count: float) -> str:
    """Render a byte count for people: ``512 B``, ``1.5 KiB``, ``80.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024.0
    return "%.1f TiB" % count  # pragma: no cover - loop always returns


def _reject_constant(name: str) -> Any:
    raise ValueError("non-standard JSON constant %s" % name)


def parse_json_text(text: str) -> Any:
    """Strict JSON: ``NaN``/``Infinity`` are errors, as for the runtime."""
    return json.loads(text, parse_constant=_reject_constant)


def runtime_json(obj: Any) -> str:
    """JSON text as the runtime writes it: 2-space indent, UTF-8, no NaN."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)


def state_json(obj: Any) -> str:
    """Deterministic JSON for aml's own state files (sorted keys, trailing newline)."""
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def new_run_id(operation: str, now: _dt.datetime) -> str:
    """A readable, sortable, collision-free id such as ``prune_20261125_030000_a1b2c3``."""
    return "%s_%s_%s" % (operation, compact_stamp(now), secrets.token_hex(3))


def dig(obj: Any, *path: str) -> Any:
    """``obj[p0][p1]...`` or None when any step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


# =============================================================================
# 5. Storage primitives
# Crash-safe file I/O and the runtime's lock protocol. Knows nothing about
# records; never prints.
# =============================================================================

@dataclasses.dataclass(frozen=True)
class FileFormat:
    """How a data file was encoded, so a rewrite keeps it: gzip or plain, BOM, final newline."""

    gzip: bool = False
    bom: bool = False
    trailing_newline: bool = False


def decode_file_bytes(path: Path, raw: bytes) -> Tuple[str, FileFormat]:
    """Turn raw file bytes into JSON text and its format; raises CorruptFileError."""
    is_gzip = raw[:2] == GZIP_MAGIC
    if is_gzip:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptFileError(path, "unreadable gzip data (%s)" % exc) from None
    bom = raw.startswith(UTF8_BOM)
    if bom:
        raw = raw[len(UTF8_BOM):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(path, "not UTF-8 (%s)" % exc) from None
    return text, FileFormat(gzip=is_gzip, bom=bom, trailing_newline=text.endswith("\n"))


def load_json_file(path: Path, expect: Optional[type] = None) -> Tuple[Any, FileFormat]:
    """Read a JSON file that may hold gzip bytes; raises CorruptFileError, never returns empty."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(path, "cannot read (%s)" % (exc.strerror or exc)) from None
    text, fmt = decode_file_bytes(path, raw)
    try:
        obj = parse_json_text(text)
    except ValueError as exc:
        raise CorruptFileError(path, "invalid JSON (%s)" % exc) from None
    if expect is not None and not isinstance(obj, expect):
        raise CorruptFileError(path, "expected a JSON %s, found %s"
                               % (_json_kind(expect), _json_kind(type(obj))))
    return obj, fmt


def _json_kind(kind: type) -> str:
    return {list: "array", dict: "object", str: "string"}.get(kind, kind.__name__)


def encode_json(obj: Any, fmt: FileFormat) -> bytes:
    """Serialize ``obj`` in the given format (gzip stays gzip, plain stays plain)."""
    text = runtime_json(obj) + ("\n" if fmt.trailing_newline else "")
    data = (UTF8_BOM if fmt.bom else b"") + text.encode("utf-8")
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if fmt.gzip else data


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it is durable (best effort where unsupported)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(".%s%s%d-%s" % (path.name, TMP_MARKER, os.getpid(), secrets.token_hex(4)))


def atomic_write_bytes(path: Path, data: bytes, mode: Optional[int] = None) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file, fsync, replace, fsync dir.

    The existing file's permission bits are kept unless ``mode`` is given. On any failure the
    temp file is removed and the old file is untouched. Raises OSError.
    """
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o644
    tmp = _temp_path(path)
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(str(tmp), mode)
        os.replace(str(tmp), str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(str(tmp))
        raise
    fsync_dir(path.parent)


def write_json_file(path: Path, obj: Any, fmt: FileFormat = FileFormat()) -> int:
    """Atomically write ``obj`` as JSON in ``fmt``; returns the bytes written."""
    data = encode_json(obj, fmt)
    atomic_write_bytes(path, data)
    return len(data)


def is_temp_leftover(name: str) -> bool:
    """True for a temp file name that only aml's atomic writer creates."""
    return name.startswith(".") and TMP_MARKER in name


def lock_path_for(path: Path) -> Path:
    """The runtime's lock directory for a data file: ``<absolute path>.lock``."""
    return Path(os.path.abspath(str(path)) + ".lock")


class FileLock:
    """The runtime's per-file lock: a directory ``<file>.lock`` made with mkdir.

    Any entry at that path counts as held. A lock directory whose mtime is older than
    30 s is stale and removed with rmdir; a fresh foreign lock is never touched. Waits with
    backoff up to ``timeout`` seconds, then raises StoreBusyError. While held, a thread
    refreshes the mtime so the runtime never sees it as stale.
    """

    def __init__(self, path: Path, timeout: float = DEFAULT_LOCK_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep):
        self.path = Path(path)
        self.lock_dir = lock_path_for(self.path)
        self.timeout = timeout
        self._sleep = sleep
        self._held = False
        self._stop = threading.Event()
        self._refresher: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while not self._try_once():
            if time.monotonic() >= deadline:
                raise StoreBusyError("store busy: %s is locked by another process (waited %.0f s)"
                                     % (self.lock_dir, self.timeout))
            self._sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        self._held = True
        self._start_refresher()

    def _try_once(self) -> bool:
        try:
            os.mkdir(str(self.lock_dir))
            return True
        except FileExistsError:
            self._remove_if_stale()
            return False
        except FileNotFoundError:
            raise AmlError("cannot lock %s: its folder is missing" % self.path) from None

    def _remove_if_stale(self) -> None:
        try:
            info = os.lstat(str(self.lock_dir))
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode) or time.time() - info.st_mtime <= LOCK_STALE_SECONDS:
            return
        with contextlib.suppress(OSError):
            os.rmdir(str(self.lock_dir))

    def _start_refresher(self) -> None:
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh_loop, daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(LOCK_REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(str(self.lock_dir))

    def release(self) -> None:
        """Release the lock if held (safe to call twice)."""
        if not self._held:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        self._held = False
        with contextlib.suppress(OSError):
            os.rmdir(str(self.lock_dir))

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class MaintenanceLock:
    """Store-wide lock (flock on ``.aml/maintenance.lock``) so two aml runs never overlap.

    Re-entrant within one process: a command that holds it can call another operation that
    takes it too (a prune's safety backup), and the lock is released when the outermost
    holder releases it.
    """

    _held: Dict[str, List[int]] = {}  # path -> [fd, depth], shared by every instance
    _guard = threading.Lock()

    def __init__(self, state_dir: Path, timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.path = Path(state_dir) / "maintenance.lock"
        self.timeout = timeout
        self._entered = False

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError."""
        key = os.path.abspath(str(self.path))
        with self._guard:
            if key in self._held:
                self._held[key][1] += 1
                self._entered = True
                return
        fd = self._flock()
        with self._guard:
            self._held[key] = [fd, 1]
        self._entered = True

    def _flock(self) -> int:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusyError("store busy: another aml run holds %s" % self.path) from None
                time.sleep(0.2)

    def release(self) -> None:
        """Release this holder's share of the lock (safe to call twice)."""
        if not self._entered:
            return
        self._entered = False
        key = os.path.abspath(str(self.path))
        with self._guard:
            entry = self._held[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._held[key]
        fcntl.flock(entry[0], fcntl.LOCK_UN)
        os.close(entry[0])

    def __enter__(self) -> "MaintenanceLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# =============================================================================
# 6. Record model and schema versions
# One place that reads record fields from the runtime's camelCase schema and
# from legacy layouts (flat, snake_case, performance/lifecycle blocks).
# =============================================================================

class RecordType(enum.Enum):
    """The three record kinds and the file each lives in."""

    PATTERN = "pattern"
    SOLUTION = "solution"
    DECISION = "decision"

    @property
    def filename(self) -> str:
        """``patterns.json``, ``solutions.json`` or ``decisions.json``."""
        return self.value + "s.json"

    @classmethod
    def from_filename(cls, name: str) -> Optional["RecordType"]:
        """The record type a file name holds, or None for other files."""
        for rtype in cls:
            if rtype.filename == name:
                return rtype
        return None


# Where each logical field may live, first match wins: runtime camelCase first, then
# the legacy layouts. Adding a layout means adding a path here, nowhere else.
FIELD_PATHS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "success_rate": (("metrics", "successRate"), ("metrics", "success_rate"), ("successRate",),
                     ("success_rate",), ("performance", "success_rate"),
                     ("performance", "successRate")),
    "execution_count": (("metrics", "executionCount"), ("metrics", "execution_count"),
                        ("executionCount",), ("execution_count",), ("usage_count",),
                        ("usageCount",), ("performance", "execution_count"),
                        ("performance", "executionCount"), ("performance", "usage_count")),
    "confidence": (("evolution", "confidenceScore"), ("evolution", "confidence_score"),
                   ("confidenceScore",), ("confidence_score",), ("confidence",),
                   ("performance", "confidence"), ("performance", "confidence_score"),
                   ("lifecycle", "confidence_score")),
    "last_used": (("evolution", "lastUsed"), ("evolution", "last_used"), ("lastUsed",),
                  ("last_used",), ("lifecycle", "last_used"), ("lifecycle", "lastUsed")),
    "created": (("evolution", "created"), ("lifecycle", "created_at"), ("lifecycle", "created"),
                ("createdAt",), ("created_at",), ("created",)),
    "reviewed": (("reviewedAt",), ("reviewed_at",)),
}


def first_value(record: Dict[str, Any], field: str) -> Any:
    """The first present value of a logical field across the known layouts, else None."""
    for path in FIELD_PATHS[field]:
        value = dig(record, *path)
        if value is not None:
            return value
    return None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclasses.dataclass
class RecordFacts:
    """What maintenance needs to know about one record; None means 'not recorded'."""

    rtype: RecordType
    id: Optional[str]
    agent: Optional[str]
    timestamp: Optional[_dt.datetime]
    created: Optional[_dt.datetime]
    last_used: Optional[_dt.datetime]
    success_rate: Optional[float]
    execution_count: Optional[float]
    confidence: Optional[float]
    worked: Optional[bool]
    would_repeat: Optional[bool]
    verified_count: Optional[float]
    active: bool
    pinned: bool
    superseded: bool
    tags: Tuple[str, ...]

    @property
    def last_activity(self) -> Optional[_dt.datetime]:
        """Last use, else creation, else the record timestamp (None if none is readable)."""
        return self.last_used or self.created or self.timestamp


def _lifecycle_state(record: Dict[str, Any]) -> Optional[str]:
    state = dig(record, "lifecycle", "state")
    return state.lower() if isinstance(state, str) else None


def _tags(record: Dict[str, Any]) -> Tuple[str, ...]:
    tags = record.get("tags")
    if not isinstance(tags, list):
        return ()
    return tuple(t for t in tags if isinstance(t, str))


def _is_pinned(record: Dict[str, Any], tags: Tuple[str, ...]) -> bool:
    return (record.get("pinned") is True or dig(record, "lifecycle", "pinned") is True
            or _lifecycle_state(record) == "pinned" or "pinned" in tags)


def _is_superseded(record: Dict[str, Any]) -> bool:
    return (_lifecycle_state(record) in ("superseded", "outdated")
            or record.get("outdated") is True
            or bool(record.get("supersededBy") or dig(record, "lifecycle", "supersededBy")))


def _is_active(record: Dict[str, Any]) -> bool:
    active = record.get("active")
    if isinstance(active, bool):
        return active
    return _lifecycle_state(record) not in ("inactive", "archived", "superseded")


def _bool_or_none(value: Any) -> Optional[bool]:
    return value if isinstance(value, bool) else None


def record_facts(rtype: RecordType, record: Any) -> RecordFacts:
    """Read the maintenance-relevant facts of a record of any known layout; never raises."""
    rec = record if isinstance(record, dict) else {}
    tags = _tags(rec)
    rid = rec.get("id")
    agent = rec.get("agent")
    return RecordFacts(
        rtype=rtype,
        id=rid if isinstance(rid, str) and rid else None,
        agent=agent if isinstance(agent, str) and agent else None,
        timestamp=parse_timestamp(rec.get("timestamp")),
        created=parse_timestamp(first_value(rec, "created")),
        last_used=parse_timestamp(first_value(rec, "last_used")),
        success_rate=_number(first_value(rec, "success_rate")),
        execution_count=_number(first_value(rec, "execution_count")),
        confidence=_number(first_value(rec, "confidence")),
        worked=_bool_or_none(dig(rec, "effectiveness", "worked")),
        would_repeat=_bool_or_none(dig(rec, "outcome", "wouldRepeat")),
        verified_count=_number(rec.get("verifiedCount", rec.get("verified_count"))),
        active=_is_active(rec),
        pinned=_is_pinned(rec, tags),
        superseded=_is_superseded(rec),
        tags=tags,
    )


# =============================================================================
# 7. Store and aml state
# Agent discovery, streaming record reads, locked read-modify-write, aml's
# hidden state folder (checksummed state files, run history, archive).
# =============================================================================

@dataclasses.dataclass
class DataFile:
    """One agent data file on disk."""

    agent: str
    path: Path

    @property
    def rtype(self) -> Optional[RecordType]:
        """The record type it holds, or None for metrics/context/other files."""
        return RecordType.from_filename(self.path.name)


def is_reserved_name(name: str) -> bool:
    """True for folder names that are never agents (SPEC 2)."""
    return name.startswith(".") or name in RESERVED_DIRS or name.endswith(".lock")


class Store:
    """A memory store on disk: agents, their files, and aml's state folder.

    Construction checks the path; read-only use creates nothing. Raises UsageError for a
    path that does not exist or is not a folder.
    """

    def __init__(self, root: Path, now: Optional[_dt.datetime] = None,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.root = Path(root)
        if not self.root.exists():
            raise UsageError("memory path %s does not exist" % self.root)
        if not self.root.is_dir():
            raise UsageError("memory path %s is not a folder" % self.root)
        self.now = now or utcnow()
        self.lock_timeout = lock_timeout
        self.state_dir = self.root / STATE_DIR_NAME

    # -- discovery ---------------------------------------------------------
    def agents(self) -> List[str]:
        """Agent folder names, sorted: not reserved and holding a known memory file."""
        found = []
        for entry in sorted(os.scandir(str(self.root)), key=lambda e: e.name):
            if is_reserved_name(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            if any(os.path.isfile(os.path.join(entry.path, f)) for f in KNOWN_AGENT_FILES):
                found.append(entry.name)
        return found

    def select_agents(self, wanted: Optional[Sequence[str]]) -> List[str]:
        """The agents to work on; raises UsageError naming an unknown agent."""
        known = self.agents()
        if not wanted:
            return known
        unknown = [a for a in wanted if a not in known]
        if unknown:
            raise UsageError("unknown agent(s): %s (known: %s)"
                             % (", ".join(unknown), ", ".join(known) or "none"))
        return list(dict.fromkeys(wanted))

    def agent_files(self, agent: str) -> List[DataFile]:
        """Every JSON data file of an agent (known names and any other ``*.json``), sorted."""
        folder = self.root / agent
        files = []
        for entry in sorted(os.scandir(str(folder)), key=lambda e: e.name):
            if (entry.name.endswith(".json") and not is_temp_leftover(entry.name)
                    and entry.is_file(follow_symlinks=False)):
                files.append(DataFile(agent, Path(entry.path)))
        return files

    def record_files(self, agent: str) -> List[DataFile]:
        """The agent's patterns/solutions/decisions files that exist."""
        return [f for f in self.agent_files(agent) if f.rtype is not None]

    def config_path(self) -> Path:
        """The runtime's ``config.json``."""
        return self.root / "config.json"

    def runtime_config(self) -> Dict[str, Any]:
        """The store's config.json as a dict ({} when absent); raises CorruptFileError."""
        path = self.config_path()
        if not path.exists():
            return {}
        return load_json_file(path, expect=dict)[0]

    # -- reading records -----------------------------------------------------
    def load_records(self, data_file: DataFile) -> Tuple[List[Any], FileFormat]:
        """The JSON array of a record file; raises CorruptFileError (never returns [] on error)."""
        return load_json_file(data_file.path, expect=list)

    def iter_record_files(self, agents: Optional[Sequence[str]] = None,
                          errors: Optional[List[CorruptFileError]] = None
                          ) -> Iterator[Tuple[DataFile, List[Any], FileFormat]]:
        """Stream (file, records, format) one file at a time; unreadable files go to ``errors``.

        Memory stays bounded by the largest file. Without an ``errors`` list the first
        unreadable file raises CorruptFileError.
        """
        for agent in self.select_agents(agents):
            for data_file in self.record_files(agent):
                try:
                    records, fmt = self.load_records(data_file)
                except CorruptFileError as exc:
                    if errors is None:
                        raise
                    errors.append(exc)
                    continue
                yield data_file, records, fmt

    # -- locked writes -------------------------------------------------------
    def file_lock(self, path: Path) -> FileLock:
        """The runtime-compatible lock for one data file, with this store's wait limit."""
        return FileLock(path, timeout=self.lock_timeout)

    def maintenance_lock(self) -> MaintenanceLock:
        """The store-wide lock that keeps two aml runs apart (creates ``.aml/``)."""
        return MaintenanceLock(self.ensure_state_dir(), timeout=self.lock_timeout)

    @contextlib.contextmanager
    def rewrite(self, path: Path, expect: type = list) -> Iterator["Rewrite"]:
        """Locked read-modify-write of one data file, keeping its format.

        Yields a Rewrite whose ``data`` may be changed; set ``changed = True`` to write it
        back atomically before the lock is released. Raises CorruptFileError or StoreBusyError.
        """
        with self.file_lock(path):
            data, fmt = load_json_file(path, expect=expect)
            job = Rewrite(path=Path(path), data=data, fmt=fmt)
            yield job
            if job.changed:
                job.bytes_written = write_json_file(path, job.data, fmt)

    # -- aml state -----------------------------------------------------------
    def ensure_state_dir(self) -> Path:
        """Create ``.aml/`` (mode 0700) if needed and return it."""
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        return self.state_dir

    def state_path(self, name: str) -> Path:
        """Path of a state file inside ``.aml/``."""
        return self.state_dir / name

    def read_state(self, name: str, default: Any = None) -> Any:
        """A checksummed state document, or ``default`` if absent; raises IntegrityError."""
        return read_checksummed(self.state_path(name), default)

    def write_state(self, name: str, payload: Any) -> None:
        """Atomically write a checksummed state document into ``.aml/``."""
        self.ensure_state_dir()
        write_checksummed(self.state_path(name), payload)

    def record_operation(self, operation: str, started: _dt.datetime, seconds: float,
                         summary: Dict[str, Any], keep: int = 500) -> None:
        """Append one entry to the bounded run history that monitoring reads."""
        history = self.read_state_lenient("history.json", [])
        history.append({"operation": operation, "started": format_timestamp(started),
                        "seconds": round(seconds, 6), "summary": summary})
        self.write_state("history.json", history[-keep:])

    def last_operation(self, operation: str) -> Optional[Dict[str, Any]]:
        """The newest history entry for an operation, or None."""
        for entry in reversed(self.read_state_lenient("history.json", [])):
            if entry.get("operation") == operation:
                return entry
        return None

    def read_state_lenient(self, name: str, default: Any) -> Any:
        """Like read_state, but a corrupt file is set aside (``*.corrupt``) and ``default`` used."""
        try:
            return self.read_state(name, default)
        except IntegrityError:
            path = self.state_path(name)
            with contextlib.suppress(OSError):
                os.replace(str(path), str(path) + ".corrupt")
            return default

    def cleanup_temp_files(self) -> List[Path]:
        """Remove temp files left by an interrupted aml write; returns what was removed.

        Only names that aml's atomic writer creates are touched. Call with the maintenance
        lock held so no concurrent aml write is in flight.
        """
        removed = []
        for dirpath, dirnames, filenames in os.walk(str(self.root)):
            dirnames[:] = [d for d in dirnames if not d.endswith(".lock")]
            for name in filenames:
                if is_temp_leftover(name):
                    path = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed.append(path)
        return removed


AML_CONFIG_SECTIONS = ("prune", "backup", "optimize", "monitor")


def load_aml_config(store: Store, path: Optional[Path] = None) -> Dict[str, Dict[str, Any]]:
    """aml's own config file: ``path`` if given, else ``<store>/.aml/config.json`` if present.

    A JSON object whose keys are sections (``prune``, ``backup``, ``optimize``, ``monitor``),
    each mapping config field names to values. Returns {} when there is no file. Raises
    UsageError for an unknown section, CorruptFileError for an unreadable file. Each section's
    consumer rejects unknown field names. Precedence everywhere: built-in defaults < the
    store's ``config.json`` (where a key matches) < this file < command-line flags.
    """
    if path is None:
        path = store.state_dir / "config.json"
        if not path.exists():
            return {}
    doc, _ = load_json_file(Path(path), expect=dict)
    unknown = sorted(set(doc) - set(AML_CONFIG_SECTIONS))
    if unknown:
        raise UsageError("%s: unknown section(s) %s (known: %s)"
                         % (path, ", ".join(unknown), ", ".join(AML_CONFIG_SECTIONS)))
    for name, section in doc.items():
        if not isinstance(section, dict):
            raise UsageError("%s: section %r must be a JSON object" % (path, name))
    return doc


def apply_config_fields(config: Any, values: Dict[str, Any], source: str) -> Any:
    """A copy of dataclass ``config`` with ``values`` applied; raises UsageError on unknown keys."""
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError("%s: unknown setting(s) %s (known: %s)"
                         % (source, ", ".join(unknown), ", ".join(sorted(names))))
    return dataclasses.replace(config, **values)


@dataclasses.dataclass
class Rewrite:
    """The in-flight content of a locked read-modify-write (see Store.rewrite)."""

    path: Path
    data: Any
    fmt: FileFormat
    changed: bool = False
    bytes_written: int = 0


def write_checksummed(path: Path, payload: Any) -> None:
    """Write ``{"sha256": ..., "payload": ...}`` atomically (mode 0600)."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False)
    doc = {"format": "aml-state-1", "sha256": sha256_hex(body.encode("utf-8")), "payload": payload}
    atomic_write_bytes(Path(path), state_json(doc).encode("utf-8"), mode=0o600)


def read_checksummed(path: Path, default: Any = None) -> Any:
    """Read a file written by write_checksummed; raises IntegrityError if it does not verify."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        doc, _ = load_json_file(path, expect=dict)
        payload = doc["payload"]
        body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False)
        ok = doc.get("sha256") == sha256_hex(body.encode("utf-8"))
    except (CorruptFileError, KeyError, ValueError) as exc:
        raise IntegrityError("%s: unreadable state file (%s)" % (path, exc)) from None
    if not ok:
        raise IntegrityError("%s: checksum mismatch" % path)
    return payload


class Archive:
    """Removed records, one checksummed file per run in ``.aml/archive/``; undo puts them back.

    Entries are written *before* records leave their data files, so a crash between the two
    leaves a record in both places (undo skips ids that are present), never in neither.
    """

    def __init__(self, store: Store):
        self.store = store
        self.folder = store.state_dir / "archive"

    def path_for(self, run_id: str) -> Path:
        """The archive file of one run; raises UsageError for an id that is not a plain name."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id or "") or run_id.startswith("."):
            raise UsageError("invalid run id %r" % run_id)
        return self.folder / (run_id + ".json")

    def save(self, run_id: str, operation: str, entries: List[Dict[str, Any]]) -> Path:
        """Persist the removed records of one run (each entry: agent, file, reason, record...)."""
        self.store.ensure_state_dir()
        self.folder.mkdir(mode=0o700, exist_ok=True)
        path = self.path_for(run_id)
        write_checksummed(path, {"run_id": run_id, "operation": operation,
                                 "created": format_timestamp(self.store.now),
                                 "entries": entries, "undone": None})
        return path

    def load(self, run_id: str) -> Dict[str, Any]:
        """One run's archive; raises UsageError if absent, IntegrityError if corrupt."""
        payload = read_checksummed(self.path_for(run_id))
        if payload is None:
            raise UsageError("no archived run %r in %s" % (run_id, self.folder))
        return payload

    def runs(self) -> List[str]:
        """Archived run ids, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if not p.name.startswith("."))

    def mark_undone(self, run_id: str, when: _dt.datetime) -> None:
        """Record that a run was undone (its entries stay, for the record)."""
        payload = self.load(run_id)
        payload["undone"] = format_timestamp(when)
        write_checksummed(self.path_for(run_id), payload)


# =============================================================================
# 8. Backup and restore
# Snapshots of the store in a content-addressed repository under backup_root.
# =============================================================================


# =============================================================================
# 9. Bloom filter and LRU cache
# In-memory structures with byte-exact, checksummed persistence.
# =============================================================================


# =============================================================================
# 10. Index and search
# Persisted record index tied to file size and mtime; search and get.
# =============================================================================


# =============================================================================
# 11. Pruning
# Time, performance and space strategies; archive before removal; undo.
# =============================================================================


# =============================================================================
# 12. Compression and garbage collection
# In-place gzip of cold files, decompress, gc of broken and duplicate records.
# =============================================================================


# =============================================================================
# 13. Migration
# Schema detection per record and step-by-step migration to 2.0.0.
# =============================================================================


# =============================================================================
# 14. Monitoring and alerts
# Measured metrics, health checks, alert lifecycle, reports.
# =============================================================================


# =============================================================================
# 15. Output formatting
# Results to text or JSON; progress on a terminal. The only section that prints
# (besides main).
# =============================================================================

def to_jsonable(value: Any) -> Any:
    """Convert dataclasses, enums, paths and datetimes into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, _dt.datetime):
        return format_timestamp(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Output:
    """Where a command's results go: text or one JSON document on stdout, diagnostics on stderr."""

    def __init__(self, fmt: str = "text", quiet: bool = False,
                 stdout: Optional[io.TextIOBase] = None, stderr: Optional[io.TextIOBase] = None):
        self.format = fmt
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    def line(self, text: str = "") -> None:
        """A line of the text report (suppressed by --quiet and in JSON mode)."""
        if self.format == "text" and not self.quiet:
            print(text, file=self.stdout)

    def always(self, text: str) -> None:
        """A text line printed even with --quiet (used for results the user asked to see)."""
        if self.format == "text":
            print(text, file=self.stdout)

    def document(self, payload: Any) -> None:
        """The JSON document of a run (only in --format json)."""
        if self.format == "json":
            json.dump(to_jsonable(payload), self.stdout, indent=2, sort_keys=True)
            self.stdout.write("\n")

    def warn(self, text: str) -> None:
        """A warning on stderr (shown even with --quiet: cron should mail problems)."""
        print("aml: warning: %s" % text, file=self.stderr)

    def progress(self, text: str) -> None:
        """Progress on a terminal only (stderr is a TTY, not quiet); silent under cron."""
        if not self.quiet and getattr(self.stderr, "isatty", lambda: False)():
            self.stderr.write("\r\033[K" + text)
            self.stderr.flush()

    def progress_done(self) -> None:
        """Clear the progress line if one was drawn."""
        if not self.quiet and getattr(self.stderr, "isatty", lambda: False)():
            self.stderr.write("\r\033[K")
            self.stderr.flush()


# =============================================================================
# 16. Command line
# Parsers, one builder per command; handlers parse, call one library function,
# print. main() is the only place that turns errors into exit codes.
# =============================================================================

_COMMAND_BUILDERS: List[Callable[[Any], None]] = []


def command_builder(func: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a function that adds one top-level command to the subparsers."""
    _COMMAND_BUILDERS.append(func)
    return func


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise UsageError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError("%s (see %s --help)" % (message, self.prog))


def _common_options() -> argparse.ArgumentParser:
    """Options every command accepts, before or after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--format", choices=("text", "json"), default=argparse.SUPPRESS,
                        help="output format (default: text)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print nothing on success (for cron)")
    common.add_argument("--now", metavar="TIMESTAMP", default=argparse.SUPPRESS,
                        help="fix the clock (ISO 8601) for reproducible runs and previews")
    common.add_argument("--config", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                        help="aml config file (default: <memory_path>/.aml/config.json if present)")
    common.add_argument("--lock-timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                        help="how long to wait for a busy lock (default: %d)"
                        % DEFAULT_LOCK_TIMEOUT)
    return common


COMMON = _common_options()
_COMMON_DEFAULTS = {"format": "text", "quiet": False, "now": None, "config": None,
                    "lock_timeout": DEFAULT_LOCK_TIMEOUT}


def subparser(subparsers: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add a (sub)command that accepts the common options and raises UsageError on bad input."""
    return subparsers.add_parser(name, help=help_text, description=help_text, parents=[COMMON],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line parser."""
    doc = (__doc__ or "").split("\n\n")
    parser = _Parser(prog="aml", description=doc[0] + "\n\n" + doc[1],
                     epilog="\n\n".join(doc[2:]), parents=[COMMON],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="aml %s" % __version__)
    parser.add_argument("memory_path", type=Path, help="the memory store (e.g. .loom/memory)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=_Parser)
    subparsers.required = True
    for builder in _COMMAND_BUILDERS:
        builder(subparsers)
    return parser


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in _COMMON_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.now is not None:
        moment = parse_timestamp(args.now)
        if moment is None:
            raise UsageError("--now %r is not an ISO 8601 timestamp" % args.now)
        args.now = moment
    return args


def open_store(args: argparse.Namespace) -> Store:
    """The Store named on the command line, with the run's clock and lock wait."""
    return Store(args.memory_path, now=args.now, lock_timeout=args.lock_timeout)


def output_for(args: argparse.Namespace) -> Output:
    """The Output object for a parsed command line."""
    return Output(args.format, args.quiet)


# --- prune command (section 11) ---


# --- optimize, search and get commands (sections 9, 10, 12) ---


# --- backup command (section 8) ---


# --- migrate command (section 13) ---


# --- monitor command (section 14) ---


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so every ``finally`` (lock release) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = _finish_args(build_parser().parse_args(argv))
        return int(args.func(args))
    except AmlError as exc:
        print("aml: error: %s" % exc, file=sys.stderr)
        return int(exc.exit_code)
    except (KeyboardInterrupt, _Terminated):
        print("aml: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
