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
import collections
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
import struct
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
    """Store-wide lock (flock on ``.aml/maintenance.lock``) so two aml runs never overlap."""

    def __init__(self, state_dir: Path, timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.path = Path(state_dir) / "maintenance.lock"
        self.timeout = timeout
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusyError("store busy: another aml run holds %s" % self.path) from None
                time.sleep(0.2)

    def release(self) -> None:
        """Release the lock (safe to call twice)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

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

def safety_backup(store, reason, config=None):  # STUB until backup lands
    """Stub: raises RefusedError until the backup engineer's section 8 lands."""
    raise RefusedError("backup is not available")


# =============================================================================
# 9. Bloom filter and LRU cache
# In-memory structures with byte-exact, checksummed persistence.
# =============================================================================

# A Bloom filter file: magic, version, bits m, hash count k, items added, then the bit array,
# then the SHA-256 of everything before it.
_BLOOM_MAGIC = b"AMLB"
_BLOOM_VERSION = 1
_BLOOM_HEADER = struct.Struct(">4sBQBQ")


def bloom_digest(key: str) -> bytes:
    """The 16-byte BLAKE2b digest a key is hashed by (two 64-bit halves for double hashing)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def optimal_bloom_bits(capacity: int, fp_rate: float) -> int:
    """Bits m = ceil(-n ln p / (ln 2)^2) for ``capacity`` items at false-positive rate p."""
    n = max(1, int(capacity))
    return max(8, int(math.ceil(-n * math.log(fp_rate) / (math.log(2) ** 2))))


def bloom_fp_rate(bits: int, hashes: int, items: int) -> float:
    """The expected false-positive rate (1 - e^(-k n / m))^k."""
    return (1.0 - math.exp(-hashes * items / float(bits))) ** hashes


def _bloom_shape(capacity: int, fp_rate: float) -> Tuple[int, int]:
    # The optimum assumes a real-valued k; with k rounded to an integer the rate at capacity
    # can land just above the target (1.003 % at 1 %), so grow m in 0.5 % steps until it holds.
    m = optimal_bloom_bits(capacity, fp_rate)
    while True:
        k = max(1, int(round(m / capacity * math.log(2))))
        if bloom_fp_rate(m, k, capacity) <= fp_rate:
            return m, k
        m = int(math.ceil(m * 1.005))


class BloomFilter:
    """A Bloom filter over strings: a real bit array with double hashing from one digest.

    Sized from ``capacity`` and ``fp_rate`` (1 % needs about 9.6 bits, 1.2 bytes, per item).
    Never a false negative; false positives at about ``fp_rate`` while at most ``capacity``
    items were added. Raises ValueError for a capacity below 1 or a rate outside (0, 1).
    """

    def __init__(self, capacity: int, fp_rate: float = 0.01):
        if capacity < 1 or not 0.0 < fp_rate < 1.0:
            raise ValueError("capacity must be >= 1 and fp_rate in (0, 1)")
        self.capacity = int(capacity)
        self.fp_rate = fp_rate
        self.m, self.k = _bloom_shape(self.capacity, fp_rate)
        self.count = 0
        self.bits = bytearray((self.m + 7) // 8)

    def _positions(self, key: str) -> Iterator[int]:
        return self._digest_positions(bloom_digest(key))

    def _digest_positions(self, digest: bytes) -> Iterator[int]:
        # Kirsch-Mitzenmacher double hashing: g_i = h1 + i*h2 (mod m); h2 odd so it never sticks.
        h1 = int.from_bytes(digest[:8], "big")
        h2 = int.from_bytes(digest[8:], "big") | 1
        m = self.m
        for i in range(self.k):
            yield (h1 + i * h2) % m

    def add(self, key: str) -> None:
        """Add one key."""
        self.add_digest(bloom_digest(key))

    def add_digest(self, digest: bytes) -> None:
        """Add a key by its ``bloom_digest`` (the index reuses the digest it keys ids by)."""
        bits = self.bits
        for pos in self._digest_positions(digest):
            bits[pos >> 3] |= 1 << (pos & 7)
        self.count += 1

    def add_digests(self, digests: bytes) -> None:
        """Add many keys given as concatenated 16-byte digests (the index build's fast path).

        The same double hashing as ``add``, computed position round by position round
        in comprehensions, which is several times faster than per-key calls.
        """
        count = len(digests) // 16
        halves = struct.unpack(">%dQ" % (2 * count), digests[:count * 16])
        h1s, h2s = halves[0::2], [h | 1 for h in halves[1::2]]
        bits, m = self.bits, self.m
        for i in range(self.k):
            for pos in [(a + i * b) % m for a, b in zip(h1s, h2s)]:
                bits[pos >> 3] |= 1 << (pos & 7)
        self.count += count

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        bits = self.bits
        return all(bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(key))

    def __len__(self) -> int:
        return self.count

    @property
    def size_bytes(self) -> int:
        """Bytes of the bit array."""
        return len(self.bits)

    def to_bytes(self) -> bytes:
        """The persisted form: header, bit array, SHA-256 trailer."""
        body = _BLOOM_HEADER.pack(_BLOOM_MAGIC, _BLOOM_VERSION, self.m, self.k, self.count)
        body += bytes(self.bits)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> "BloomFilter":
        """Rebuild from ``to_bytes`` output; raises IntegrityError if it does not verify."""
        head = _BLOOM_HEADER.size
        if len(data) < head + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise IntegrityError("bloom filter: checksum mismatch or truncated")
        magic, version, m, k, count = _BLOOM_HEADER.unpack_from(data)
        size_ok = len(data) - head - 32 == (m + 7) // 8
        if magic != _BLOOM_MAGIC or version != _BLOOM_VERSION or not size_ok:
            raise IntegrityError("bloom filter: unknown format")
        bloom = cls.__new__(cls)
        bloom.m, bloom.k, bloom.count = m, k, count
        # k = m/n ln 2 and p = 2^-k at capacity, so both follow from the header.
        bloom.capacity = max(1, int(round(m * math.log(2) / max(k, 1))))
        bloom.fp_rate = 0.5 ** k
        bloom.bits = bytearray(data[head:-32])
        return bloom

    def save(self, path: Path) -> None:
        """Write atomically (mode 0600)."""
        atomic_write_bytes(Path(path), self.to_bytes(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> "BloomFilter":
        """Read a saved filter; raises IntegrityError if missing, unreadable or corrupt."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IntegrityError("%s: cannot read bloom filter (%s)" % (path, exc)) from None
        return cls.from_bytes(data)


@dataclasses.dataclass
class CacheStats:
    """Counters of an LRUCache."""

    hits: int
    misses: int
    evictions: int
    refused: int
    items: int
    bytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> Optional[float]:
        """hits / (hits + misses), or None before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else None


def value_size(value: Any) -> int:
    """The bytes a cached value is charged: bytes/str length, else its compact UTF-8 JSON length.

    This is the size of the value as data (what it takes on disk), not Python's in-memory
    footprint, which is several times larger and varies by interpreter version.
    """
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8"))
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                          default=str).encode("utf-8"))


class LRUCache:
    """A least-recently-used cache bounded in bytes (default 10 MiB), O(1) get and put.

    Each value is charged ``value_size(value)`` unless ``put`` is given an explicit size. An
    item larger than the whole budget is refused (``put`` returns False), never cached.
    """

    def __init__(self, max_bytes: int = 10 * 1024 * 1024):
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = int(max_bytes)
        self._items: "collections.OrderedDict[Any, Tuple[Any, int]]" = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.refused = 0

    def get(self, key: Any, default: Any = None) -> Any:
        """The cached value (now most recently used) or ``default``; counts a hit or a miss."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return default
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Any, value: Any, size: Optional[int] = None) -> bool:
        """Cache ``value`` as most recently used, evicting the least recent; False if refused."""
        size = value_size(value) if size is None else int(size)
        self.discard(key)
        if size > self.max_bytes:
            self.refused += 1
            return False
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old_size) = self._items.popitem(last=False)
            self.bytes -= old_size
            self.evictions += 1
        return True

    def discard(self, key: Any) -> None:
        """Forget ``key`` if cached (not counted as an eviction)."""
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> List[Any]:
        """Keys from least to most recently used."""
        return list(self._items)

    def items(self) -> List[Tuple[Any, Any]]:
        """(key, value) pairs from least to most recently used."""
        return [(k, v[0]) for k, v in self._items.items()]

    def stats(self) -> CacheStats:
        """The current counters."""
        return CacheStats(self.hits, self.misses, self.evictions, self.refused,
                          len(self._items), self.bytes, self.max_bytes)


__all__ += ["BloomFilter", "LRUCache", "CacheStats", "bloom_digest", "bloom_fp_rate",
            "optimal_bloom_bits", "value_size"]


# =============================================================================
# 10. Index and search
# Persisted record index tied to file size and mtime; search and get.
# =============================================================================

# Files of the index in .aml/index/ (see README "optimize"): manifest.json is the commit point
# and carries the checksum of every other part, so a set of parts from two different builds
# never verifies.
INDEX_FORMAT = "aml-index-1"
_IDS_MAGIC = b"AMLI"
_IDS_HEADER = struct.Struct(">4sBI")
_ID_ROW = struct.Struct(">16sII")  # bloom_digest(id), file slot, array position
_BUCKET_COUNTS = struct.Struct(">%dI" % 256)  # heads each file's keys in keys.dat
_PARALLEL_INDEX_BYTES = 8 * 1024 * 1024  # below this, forking workers costs more than it saves
_PARALLEL_BLOOM_IDS = 50000
_ID_BUCKETS = 256                  # by the digest's first byte; one bucket is read per lookup
DEFAULT_CACHE_BYTES = 10 * 1024 * 1024
DEFAULT_BLOOM_FP_RATE = 0.01

# One posting row per record, a compact JSON array in postings.dat.
P_ID, P_POS, P_CONF, P_SR, P_EXEC, P_LAST, P_ACTIVE, P_TAGS = range(8)


# Top-level keys where a legacy layout may keep a field; a runtime record has none of them.
_LEGACY_KEYS = frozenset(path[0] for paths in FIELD_PATHS.values() for path in paths
                         if path[0] not in ("metrics", "evolution"))


def _field(record: Dict[str, Any], field: str) -> Any:
    # first_value without the generic dig(): the index build calls this per record.
    for path in FIELD_PATHS[field]:
        value = record.get(path[0])
        for key in path[1:]:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _num(value: Any) -> Optional[float]:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def posting_row(record: Any, position: int) -> List[Any]:
    """The facts the index keeps for one record (see P_* for the layout); never raises.

    Reads the same values as record_facts (runtime camelCase first, then legacy layouts).
    """
    if not isinstance(record, dict):
        return [None, position, None, None, None, None, True, []]
    get = record.get
    evo, met = get("evolution"), get("metrics")
    evo = evo if isinstance(evo, dict) else {}
    met = met if isinstance(met, dict) else {}
    conf, last = evo.get("confidenceScore"), evo.get("lastUsed")
    rate, count = met.get("successRate"), met.get("executionCount")
    if (evo or met or not _LEGACY_KEYS.isdisjoint(record)) and None in (conf, rate, count, last):
        # Only then can a later layout path hold a value (the generic, slower lookup).
        conf = _field(record, "confidence") if conf is None else conf
        rate = _field(record, "success_rate") if rate is None else rate
        count = _field(record, "execution_count") if count is None else count
        last = _field(record, "last_used") if last is None else last
        last = last or _field(record, "created")
    last = last or get("timestamp")
    rid, active, tags = get("id"), get("active"), get("tags")
    return [rid if isinstance(rid, str) and rid else None, position, _num(conf), _num(rate),
            _num(count),
            last if isinstance(last, (str, int, float)) and not isinstance(last, bool) else None,
            active if isinstance(active, bool) else _is_active(record),
            [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []]


def index_file_part(path: str, slot: int) -> Tuple[bytes, bytes, int]:
    """Parse one record file into (postings JSON, id keys, records); may run in a worker.

    The id keys are the file's id-table rows (bloom_digest(id), ``slot``, position) grouped
    by bucket, after a header of the 256 bucket row counts, so building the id table is a
    concatenation. Raises CorruptFileError for an unreadable file.
    """
    records, _ = load_json_file(Path(path), expect=list)
    rows = [posting_row(rec, pos) for pos, rec in enumerate(records)]
    buckets: List[List[bytes]] = [[] for _ in range(_ID_BUCKETS)]
    tag = struct.pack(">I", slot)
    for row in rows:
        if row[P_ID]:
            digest = bloom_digest(row[P_ID])
            buckets[digest[0]].append(digest + tag + struct.pack(">I", row[P_POS]))
    keys = _BUCKET_COUNTS.pack(*map(len, buckets)) + b"".join(map(b"".join, buckets))
    blob = json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return blob, keys, len(rows)


def _bloom_bits(digests: bytes, bits: int, hashes: int) -> bytes:
    """The bit array of a BloomFilter(m=bits, k=hashes) holding these digests (worker job)."""
    bloom = BloomFilter.__new__(BloomFilter)
    bloom.m, bloom.k, bloom.count, bloom.bits = bits, hashes, 0, bytearray((bits + 7) // 8)
    bloom.add_digests(digests)
    return bytes(bloom.bits)


def worker_count(workers: int, jobs: int) -> int:
    """Processes to use: ``workers`` (0 = one per CPU core), at most one per job, at least 1."""
    return max(1, min(jobs, workers or os.cpu_count() or 1))


def parallel_map(func: Callable[..., Any], jobs: List[Tuple[Any, ...]], workers: int = 0,
                 threads: bool = False) -> List[Any]:
    """``func(*job)`` for every job, in order; in forked worker processes when more than one.

    ``threads`` uses a thread pool instead (for work that releases the GIL, like zlib and
    file I/O). Exceptions in a worker propagate to the caller. ``func`` must be a
    module-level function.
    """
    count = worker_count(workers, len(jobs))
    if count <= 1:
        return [func(*job) for job in jobs]
    import concurrent.futures  # only here: it costs import time every other command would pay
    if threads:
        pool: Any = concurrent.futures.ThreadPoolExecutor(count)
    else:
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(
            count, mp_context=multiprocessing.get_context("fork"))
    try:
        futures = [pool.submit(func, *job) for job in jobs]
        return [future.result() for future in futures]
    finally:
        # On an error or SIGTERM, jobs not started yet are dropped; running ones finish
        # (each is atomic), so the run stops promptly without a half-written file.
        pool.shutdown(wait=True, cancel_futures=True)


def _index_file_safe(path: str, slot: int) -> Tuple[Optional[Tuple[bytes, bytes, int]], str]:
    try:
        return index_file_part(path, slot), ""
    except CorruptFileError as exc:
        return None, exc.problem


@dataclasses.dataclass
class SearchQuery:
    """Filters of a search; every given filter must hold (tags: all of them)."""

    agent: Optional[str] = None
    rtype: Optional[str] = None
    tags: Tuple[str, ...] = ()
    text: Optional[str] = None
    min_confidence: Optional[float] = None
    min_success_rate: Optional[float] = None
    limit: Optional[int] = None

    def row_matches(self, row: List[Any]) -> bool:
        """True if a posting row passes the indexed filters (tags, confidence, success rate)."""
        if self.tags and not set(self.tags).issubset(row[P_TAGS]):
            return False
        if self.min_confidence is not None and (row[P_CONF] is None
                                                or row[P_CONF] < self.min_confidence):
            return False
        return self.min_success_rate is None or (row[P_SR] is not None
                                                 and row[P_SR] >= self.min_success_rate)

    def text_matches(self, record: Any) -> bool:
        """True if every word of ``text`` occurs (case-insensitively) in the record's strings."""
        if not self.text:
            return True
        haystack = "\n".join(_strings_of(record)).lower()
        return all(word in haystack for word in self.text.lower().split())


def _strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_of(item)


@dataclasses.dataclass
class FoundRecord:
    """One record returned by get or search, with where it lives."""

    agent: str
    file: str
    type: str
    index: int
    id: Optional[str]
    record: Any
    source: str  # "hot-cache", "index" or "scan"


@dataclasses.dataclass
class LookupResult:
    """What get and search return; ``not_found`` is set for an unknown id or agent."""

    records: List[FoundRecord]
    source: str
    message: Optional[str] = None
    not_found: bool = False
    unreadable: List[str] = dataclasses.field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def count(self) -> int:
        """Number of records returned."""
        return len(self.records)


@dataclasses.dataclass
class IndexResult:
    """What an index refresh did (or, in a dry run, would do)."""

    dry_run: bool
    rebuilt: bool
    reason: str
    files: int
    files_reread: List[str]
    files_removed: List[str]
    records: int
    ids: int
    index_bytes: int
    bloom_bytes: int
    seconds: float
    unreadable: List[str]


@dataclasses.dataclass
class _FileStat:
    path: str
    agent: str
    rtype: str
    size: int
    mtime_ns: int

    def same(self, entry: Dict[str, Any]) -> bool:
        return entry.get("size") == self.size and entry.get("mtime_ns") == self.mtime_ns


def _file_stats(store: Store) -> List[_FileStat]:
    """Every record file of the store in store order, with size and mtime (no parsing).

    The same files as Store.record_files, found with one scandir per agent because every
    get and search runs this to check freshness.
    """
    out = []
    for agent in store.agents():
        with os.scandir(str(store.root / agent)) as entries:
            found = sorted((e.name, e) for e in entries if e.name in RECORD_FILES)
        for name, entry in found:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            out.append(_FileStat("%s/%s" % (agent, name), agent, name[:-6],
                                 info.st_size, info.st_mtime_ns))
    return out


def _stale(current: List[_FileStat], manifest: Optional[Dict[str, Any]]) -> List[str]:
    known: Dict[str, Dict[str, Any]] = {}
    if manifest is not None:
        known = {e["path"]: e for e in manifest["files"] + manifest["unreadable"]}
    stale = [f.path for f in current if f.path not in known or not f.same(known[f.path])]
    seen = {f.path for f in current}
    return stale + sorted(p for p in known if p not in seen)


def _problems(entries: Iterable[Dict[str, Any]]) -> List[str]:
    return ["%s: %s" % (e["path"], e["problem"]) for e in entries]


class MemoryIndex:
    """The persisted record index in ``.aml/index/``: id -> (file, position), postings, bloom.

    Tied to each record file's size and mtime: ``refresh`` re-reads only files that changed
    and rebuilds from scratch when any part fails its checksum. Callers that write (refresh,
    warm) hold the store's maintenance lock. Lookups never trust a part that does not verify:
    they raise IntegrityError and the caller falls back to a scan.
    """

    def __init__(self, store: Store, fp_rate: float = DEFAULT_BLOOM_FP_RATE):
        self.store = store
        self.fp_rate = fp_rate
        self.folder = store.state_dir / "index"
        self._manifest: Optional[Dict[str, Any]] = None
        self._files = LRUCache(64 * 1024 * 1024)  # parsed data files, charged their raw size

    # -- paths and manifest ----------------------------------------------------
    def part(self, name: str) -> Path:
        """Path of one index file (manifest.json, postings.dat, keys.dat, ids.bin, bloom.bin...)."""
        return self.folder / name

    def manifest(self) -> Optional[Dict[str, Any]]:
        """The verified manifest, or None if absent, corrupt or of another format."""
        if self._manifest is None:
            try:
                doc = read_checksummed(self.part("manifest.json"))
            except IntegrityError:
                return None
            if isinstance(doc, dict) and doc.get("format") == INDEX_FORMAT:
                self._manifest = doc
        return self._manifest

    def stale_files(self) -> List[str]:
        """Relative paths of record files new, changed or removed since the build; never raises."""
        try:
            return _stale(_file_stats(self.store), self.manifest())
        except OSError:
            return []

    def size_bytes(self) -> int:
        """Bytes of the persisted index on disk (all its files), 0 if none."""
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    # -- building --------------------------------------------------------------
    def refresh(self, dry_run: bool = False, rebuild: bool = False) -> IndexResult:
        """Bring the index up to date, re-reading only changed files; rebuild if corrupt.

        Call with the maintenance lock held. A dry run reports what would be re-read and
        writes nothing. ``rebuild`` rewrites the id table and bloom filter even when no file
        changed, reusing only postings that verify (how a corrupt part is repaired).
        Unreadable files are left out and listed (their size and mtime are kept so they are
        not re-read until they change).
        """
        started = time.monotonic()
        old = self.manifest()
        reason = "up to date" if old else ("corrupt" if self.part("manifest.json").exists()
                                           else "missing")
        current = _file_stats(self.store)
        old_files = {e["path"]: e for e in old["files"]} if old else {}
        old_bad = {e["path"]: e for e in old["unreadable"]} if old else {}
        stale = _stale(current, old)
        if dry_run or (old and not stale and not rebuild):
            return self._result(dry_run, old is None, reason, current, stale, old,
                                started, _problems(old_bad.values()))
        parts, bad = self._collect_parts(current, old_files, old_bad)
        self._write(parts, bad)
        removed = sorted((set(old_files) | set(old_bad)) - {f.path for f in current})
        return self._result(False, old is None, reason if old is None else
                            ("repaired" if rebuild else "refreshed"),
                            current, [p for p in stale if p not in removed] + removed,
                            self.manifest(), started, _problems(bad))

    def _result(self, dry_run: bool, rebuilt: bool, reason: str, current: List[_FileStat],
                stale: List[str], manifest: Optional[Dict[str, Any]], started: float,
                unreadable: List[str]) -> IndexResult:
        seen = {f.path for f in current}
        return IndexResult(
            dry_run=dry_run, rebuilt=rebuilt, reason=reason, files=len(current),
            files_reread=[p for p in stale if p in seen],
            files_removed=[p for p in stale if p not in seen],
            records=sum(e["records"] for e in manifest["files"]) if manifest else 0,
            ids=manifest["ids"]["count"] if manifest else 0,
            index_bytes=self.size_bytes(),
            bloom_bytes=manifest["bloom"]["bytes"] if manifest else 0,
            seconds=time.monotonic() - started, unreadable=unreadable)

    def _collect_parts(self, current: List[_FileStat], old_files: Dict[str, Any],
                       old_bad: Dict[str, Any]
                       ) -> Tuple[List[Tuple[_FileStat, int, bytes, bytes, int]],
                                  List[Dict[str, Any]]]:
        reused: Dict[str, Tuple[bytes, bytes, int]] = {}
        todo, bad = [], []
        for fstat in current:
            if fstat.path in old_bad and fstat.same(old_bad[fstat.path]):
                bad.append(old_bad[fstat.path])
                continue
            entry = old_files.get(fstat.path)
            part = self._old_part(entry) if entry and fstat.same(entry) else None
            if part is not None:
                reused[fstat.path] = part
            else:
                todo.append(fstat)
        slots = self._slots(todo, old_files)
        fresh = dict(zip((f.path for f in todo), self._parse_files(todo, slots)))
        parts = []
        for fstat in current:
            part, problem = (reused[fstat.path], "") if fstat.path in reused \
                else fresh.get(fstat.path, (None, None))
            if part is not None:
                slot = old_files[fstat.path]["slot"] if fstat.path in reused else slots[fstat.path]
                parts.append((fstat, slot) + part)
            elif problem is not None:
                bad.append({"path": fstat.path, "size": fstat.size, "mtime_ns": fstat.mtime_ns,
                            "problem": problem})
        return parts, bad

    @staticmethod
    def _slots(todo: List[_FileStat], old_files: Dict[str, Any]) -> Dict[str, int]:
        """Stable file numbers: a file keeps its slot, so unchanged files' id rows stay valid."""
        next_slot = max((e["slot"] for e in old_files.values()), default=-1) + 1
        slots = {}
        for fstat in todo:
            if fstat.path in old_files:
                slots[fstat.path] = old_files[fstat.path]["slot"]
            else:
                slots[fstat.path], next_slot = next_slot, next_slot + 1
        return slots

    def _parse_files(self, todo: List[_FileStat], slots: Dict[str, int]) -> List[Tuple[Any, str]]:
        """index_file_part for each file; in one worker process per core for big batches."""
        jobs = [(str(self.store.root / f.path), slots[f.path]) for f in todo]
        small = sum(f.size for f in todo) < _PARALLEL_INDEX_BYTES
        return parallel_map(_index_file_safe, jobs, 1 if small else 0)

    def _old_part(self, entry: Dict[str, Any]) -> Optional[Tuple[bytes, bytes, int]]:
        try:
            blob = self._read_range("postings.dat", entry["offset"], entry["length"])
            keys = self._read_range("keys.dat", entry["keys_offset"], entry["keys_length"])
        except (OSError, KeyError):
            return None
        if sha256_hex(blob) != entry["sha256"] or sha256_hex(keys) != entry["keys_sha256"]:
            return None
        return blob, keys, entry["records"]

    def _read_range(self, name: str, offset: int, length: int) -> bytes:
        with open(str(self.part(name)), "rb") as handle:
            handle.seek(offset)
            return handle.read(length)

    def _write(self, parts: List[Tuple[_FileStat, int, bytes, bytes, int]],
               bad: List[Dict[str, Any]]) -> None:
        self.store.ensure_state_dir()
        self.folder.mkdir(mode=0o700, exist_ok=True)
        files, offset, key_offset = [], 0, 0
        for fstat, slot, blob, keys, count in parts:
            files.append(dict(dataclasses.asdict(fstat), slot=slot, offset=offset,
                              length=len(blob), sha256=sha256_hex(blob), keys_offset=key_offset,
                              keys_length=len(keys), keys_sha256=sha256_hex(keys), records=count))
            offset += len(blob)
            key_offset += len(keys)
        atomic_write_bytes(self.part("postings.dat"), b"".join(p[2] for p in parts), mode=0o600)
        atomic_write_bytes(self.part("keys.dat"), b"".join(p[3] for p in parts), mode=0o600)
        ids_doc, body = self._write_ids([p[3] for p in parts])
        bloom_bytes, bloom = self._build_bloom(body, ids_doc["count"])
        atomic_write_bytes(self.part("bloom.bin"), bloom_bytes, mode=0o600)
        manifest = {"format": INDEX_FORMAT, "built": format_timestamp(utcnow()), "files": files,
                    "unreadable": bad, "ids": ids_doc,
                    "bloom": {"sha256": sha256_hex(bloom_bytes), "bytes": bloom.size_bytes,
                              "bits": bloom.m, "hashes": bloom.k, "fp_rate": self.fp_rate}}
        write_checksummed(self.part("manifest.json"), manifest)  # last: the commit point
        self._manifest = manifest

    def _write_ids(self, file_keys: List[bytes]) -> Tuple[Dict[str, Any], bytes]:
        """ids.bin: all files' rows of bucket 0, then of bucket 1, ...; a checksum per bucket."""
        heads = [_BUCKET_COUNTS.unpack_from(keys) for keys in file_keys]
        cursors = [_BUCKET_COUNTS.size] * len(file_keys)
        chunks, buckets, start = [], [], 0
        for bucket in range(_ID_BUCKETS):
            pieces = []
            for i, keys in enumerate(file_keys):
                end = cursors[i] + heads[i][bucket] * _ID_ROW.size
                pieces.append(keys[cursors[i]:end])
                cursors[i] = end
            chunk = b"".join(pieces)
            buckets.append([start, len(chunk) // _ID_ROW.size, sha256_hex(chunk)])
            start += len(chunk) // _ID_ROW.size
            chunks.append(chunk)
        body = b"".join(chunks)
        atomic_write_bytes(self.part("ids.bin"), _IDS_HEADER.pack(_IDS_MAGIC, 1, start) + body,
                           mode=0o600)
        return {"count": start, "buckets": buckets}, body

    def _build_bloom(self, body: bytes, count: int) -> Tuple[bytes, BloomFilter]:
        """The bloom filter over every id; its bits are set in worker processes for big stores."""
        bloom = BloomFilter(max(count, 1000), self.fp_rate)
        rows = memoryview(body)
        digests = b"".join([rows[i:i + 16] for i in range(0, len(body), _ID_ROW.size)])
        halves = [(digests[:count // 2 * 16], bloom.m, bloom.k),
                  (digests[count // 2 * 16:], bloom.m, bloom.k)]
        arrays = parallel_map(_bloom_bits, halves, 1 if count < _PARALLEL_BLOOM_IDS else 2)
        merged = int.from_bytes(arrays[0], "little") | int.from_bytes(arrays[1], "little")
        bloom.bits = bytearray(merged.to_bytes(len(bloom.bits), "little"))
        bloom.count = count
        return bloom.to_bytes(), bloom

    # -- lookups ---------------------------------------------------------------
    def _verified(self) -> Dict[str, Any]:
        manifest = self.manifest()
        if manifest is None:
            raise IntegrityError("%s: index missing or corrupt" % self.folder)
        return manifest

    def might_contain(self, record_id: str) -> bool:
        """The bloom filter's answer (False is certain); raises IntegrityError if it is corrupt."""
        manifest = self._verified()
        data = self.part("bloom.bin").read_bytes() if self.part("bloom.bin").exists() else b""
        if sha256_hex(data) != manifest["bloom"]["sha256"]:
            raise IntegrityError("%s: bloom filter does not match the index" % self.folder)
        return record_id in BloomFilter.from_bytes(data)

    def locate(self, record_id: str) -> List[Tuple[Dict[str, Any], int]]:
        """(file entry, position) of every record with this id; reads one id bucket only."""
        manifest = self._verified()
        digest = bloom_digest(record_id)
        start, count, digest_sha = manifest["ids"]["buckets"][digest[0]]
        size = _ID_ROW.size
        chunk = self._read_range("ids.bin", _IDS_HEADER.size + start * size, count * size)
        if sha256_hex(chunk) != digest_sha:
            raise IntegrityError("%s: id table bucket %d does not verify"
                                 % (self.folder, digest[0]))
        slots = {e["slot"]: e for e in manifest["files"]}
        found, at = [], chunk.find(digest)
        while at >= 0:
            if at % size == 0:  # a match must start a row, not straddle two
                _, slot, position = _ID_ROW.unpack_from(chunk, at)
                found.append((slots[slot], position))
            at = chunk.find(digest, at + 1)
        return found

    def postings(self, entry: Dict[str, Any]) -> List[List[Any]]:
        """The posting rows of one indexed file (read by seek); raises IntegrityError."""
        blob = self._read_range("postings.dat", entry["offset"], entry["length"])
        if sha256_hex(blob) != entry["sha256"]:
            raise IntegrityError("%s: postings of %s do not verify" % (self.folder, entry["path"]))
        return json.loads(blob.decode("utf-8"))

    def files(self, agent: Optional[str] = None, rtype: Optional[str] = None
              ) -> List[Dict[str, Any]]:
        """Indexed file entries in store order, optionally of one agent and/or type."""
        return [e for e in self._verified()["files"]
                if agent in (None, e["agent"]) and rtype in (None, e["rtype"])]

    def unreadable(self) -> List[str]:
        """'path: problem' of the files the index could not read."""
        return _problems((self.manifest() or {}).get("unreadable", []))

    def load_file(self, entry: Dict[str, Any]) -> List[Any]:
        """The records of one indexed file, if it is unchanged since indexing (LRU of parsed files).

        Raises IntegrityError when the file changed (the index is stale) and CorruptFileError
        when it cannot be read.
        """
        key = (entry["path"], entry["size"], entry["mtime_ns"])
        records = self._files.get(key)
        if records is None:
            path = self.store.root / entry["path"]
            records, _ = load_json_file(path, expect=list)
            info = path.stat()
            if (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                raise IntegrityError("%s changed since it was indexed" % path)
            self._files.put(key, records, size=entry["size"])
        return records


__all__ += ["worker_count", "parallel_map", "index_file_part", "MemoryIndex", "SearchQuery",
            "FoundRecord", "LookupResult", "IndexResult",
            "posting_row"]


def warm_score(row: List[Any], now: _dt.datetime) -> float:
    """How valuable a record is to keep hot (0..1), from its posting row.

    ``(0.4 * confidence + 0.4 * success rate + 0.2 * usage) * recency``, where usage is
    ``log1p(executions) / log1p(100)`` capped at 1, recency halves every 30 days since last
    activity, a missing figure counts 0.5, and inactive records count a tenth.
    """
    conf = 0.5 if row[P_CONF] is None else min(max(row[P_CONF], 0.0), 1.0)
    rate = 0.5 if row[P_SR] is None else min(max(row[P_SR], 0.0), 1.0)
    usage = 0.5 if row[P_EXEC] is None else min(1.0, math.log1p(max(row[P_EXEC], 0.0))
                                               / math.log1p(100))
    last = parse_timestamp(row[P_LAST])
    age = max(0.0, days_between(last, now)) if last else 365.0
    score = (0.4 * conf + 0.4 * rate + 0.2 * usage) * 0.5 ** (age / 30.0)
    return score if row[P_ACTIVE] else score / 10.0


@dataclasses.dataclass
class WarmResult:
    """What warm-cache selected (or, in a dry run, would select)."""

    dry_run: bool
    records: int
    bytes: int
    budget: int
    candidates: int
    files_read: int
    min_score: Optional[float]
    seconds: float
    note: str = ""


# A hot.bin row: bloom_digest(id), file slot, position, file size and mtime_ns when warmed,
# offset and length of the record in hot.dat, SHA-256 of those bytes.
_HOT_ROW = struct.Struct(">16sIIQQQI32s")


class HotCache:
    """The persisted hot set: ``hot.dat`` (records), ``hot.bin`` (rows by id bucket) and
    ``hot.json`` (checksummed: per-bucket row range and SHA-256; written last).

    A lookup reads one bucket of ``hot.bin`` and one slice of ``hot.dat``. A row answers only
    while its data file still has the size and mtime it had when warmed and the index still
    places the id there; otherwise, or if anything fails to verify, it is a miss.
    """

    def __init__(self, index: MemoryIndex):
        self.index = index
        self._doc: Optional[Dict[str, Any]] = None

    def _load(self) -> Dict[str, Any]:
        if self._doc is None:
            try:
                doc = read_checksummed(self.index.part("hot.json"), {}) or {}
            except IntegrityError:
                doc = {}
            ok = isinstance(doc.get("buckets"), list) and len(doc["buckets"]) == _ID_BUCKETS
            self._doc = doc if ok else {"buckets": [[0, 0, sha256_hex(b"")]] * _ID_BUCKETS}
        return self._doc

    def _bucket(self, number: int) -> bytes:
        start, count, digest_sha = self._load()["buckets"][number]
        try:
            chunk = self.index._read_range("hot.bin", start * _HOT_ROW.size, count * _HOT_ROW.size)
        except OSError:
            return b""
        return chunk if sha256_hex(chunk) == digest_sha else b""

    def fetch(self, record_id: Optional[str], entry: Dict[str, Any], position: int) -> Any:
        """The hot record for this id at this (fresh) location, or None (a miss)."""
        if not record_id:
            return None
        digest = bloom_digest(record_id)
        chunk = self._bucket(digest[0])
        at = chunk.find(digest)
        while at >= 0 and at % _HOT_ROW.size:
            at = chunk.find(digest, at + 1)
        if at < 0:
            return None
        _, slot, pos, size, mtime_ns, offset, length, sha = _HOT_ROW.unpack_from(chunk, at)
        if (slot, pos, size, mtime_ns) != (entry["slot"], position, entry["size"],
                                           entry["mtime_ns"]):
            return None
        return self._record(offset, length, sha)

    def _record(self, offset: int, length: int, sha: bytes) -> Any:
        try:
            blob = self.index._read_range("hot.dat", offset, length)
        except OSError:
            return None
        return json.loads(blob.decode("utf-8")) if hashlib.sha256(blob).digest() == sha else None

    def records(self) -> Iterator[Any]:
        """Every hot record that still verifies (for inspection and tests)."""
        for number in range(_ID_BUCKETS):
            for row in _HOT_ROW.iter_unpack(self._bucket(number)):
                record = self._record(row[5], row[6], row[7])
                if record is not None:
                    yield record

    def warm(self, max_bytes: int, now: _dt.datetime, dry_run: bool = False) -> WarmResult:
        """Select the highest-scoring unique-id records up to ``max_bytes`` and persist them."""
        started = time.monotonic()
        ranked = self._ranked(now)
        chosen, used, files_read, min_score = [], 0, set(), None
        for start in range(0, len(ranked), 2000):
            chunk = ranked[start:start + 2000]
            blobs = self._chunk_blobs(chunk, files_read)
            for (score, entry, row), blob in zip(chunk, blobs):
                if blob is not None and used + len(blob) <= max_bytes:
                    chosen.append((entry, row, blob))
                    used += len(blob)
                    min_score = score
            if max_bytes - used < 256:
                break
        if not dry_run:
            self._persist(chosen, max_bytes, now)
        return WarmResult(dry_run, len(chosen), used, max_bytes, len(ranked), len(files_read),
                          None if min_score is None else round(min_score, 6),
                          time.monotonic() - started)

    def _ranked(self, now: _dt.datetime) -> List[Tuple[float, Dict[str, Any], List[Any]]]:
        rows = [(entry, row) for entry in self.index.files() for row in self.index.postings(entry)
                if row[P_ID]]
        seen: Dict[str, int] = collections.Counter(row[P_ID] for _, row in rows)
        ranked = [(warm_score(row, now), entry, row) for entry, row in rows
                  if seen[row[P_ID]] == 1]
        ranked.sort(key=lambda item: -item[0])
        return ranked

    def _chunk_blobs(self, chunk: List[Tuple[float, Dict[str, Any], List[Any]]],
                     files_read: set) -> List[Optional[bytes]]:
        out: List[Optional[bytes]] = [None] * len(chunk)
        by_file: Dict[str, List[int]] = {}
        for i, (_, entry, _) in enumerate(chunk):
            by_file.setdefault(entry["path"], []).append(i)
        for path, slots in by_file.items():
            try:
                records = self.index.load_file(chunk[slots[0]][1])
            except (CorruptFileError, IntegrityError):
                continue  # changed or unreadable since indexing: not warmed this time
            files_read.add(path)
            for i in slots:
                record = records[chunk[i][2][P_POS]]
                out[i] = json.dumps(record, ensure_ascii=False,
                                    separators=(",", ":")).encode("utf-8")
        return out

    def _persist(self, chosen: List[Tuple[Dict[str, Any], List[Any], bytes]], max_bytes: int,
                 now: _dt.datetime) -> None:
        by_bucket: List[List[bytes]] = [[] for _ in range(_ID_BUCKETS)]
        offset = 0
        for entry, row, blob in chosen:
            digest = bloom_digest(row[P_ID])
            by_bucket[digest[0]].append(_HOT_ROW.pack(
                digest, entry["slot"], row[P_POS], entry["size"], entry["mtime_ns"], offset,
                len(blob), hashlib.sha256(blob).digest()))
            offset += len(blob)
        buckets, start = [], 0
        for rows in by_bucket:
            buckets.append([start, len(rows), sha256_hex(b"".join(rows))])
            start += len(rows)
        atomic_write_bytes(self.index.part("hot.dat"), b"".join(b for _, _, b in chosen),
                           mode=0o600)
        atomic_write_bytes(self.index.part("hot.bin"), b"".join(map(b"".join, by_bucket)),
                           mode=0o600)
        write_checksummed(self.index.part("hot.json"),
                          {"built": format_timestamp(now), "budget": max_bytes, "bytes": offset,
                           "records": len(chosen), "buckets": buckets})
        self._doc = None


def hot_cache_stats(store: Store) -> Dict[str, Any]:
    """Hot-cache hits and misses counted from real get/search lookups (zeros when none yet)."""
    stats = None
    if store.state_dir.is_dir():
        stats = store.read_state_lenient("cache-stats.json", None)
    if not isinstance(stats, dict):
        return {"hits": 0, "misses": 0}
    return stats


def _count_cache(store: Store, result: LookupResult) -> None:
    if not (result.cache_hits or result.cache_misses):
        return
    stats = hot_cache_stats(store)
    store.write_state("cache-stats.json",
                      {"hits": int(stats.get("hits", 0)) + result.cache_hits,
                       "misses": int(stats.get("misses", 0)) + result.cache_misses,
                       "updated": format_timestamp(store.now)})


@contextlib.contextmanager
def _query_index(store: Store, use_index: bool) -> Iterator[Tuple[Optional[MemoryIndex], bool]]:
    """(index or None for a scan, writable) for one get/search.

    Takes the maintenance lock without waiting: when held, the index is refreshed (only
    changed files re-read) and counters are written; when another aml run holds it, a fresh
    verified index is used read-only, else the lookup falls back to a read-only scan.
    """
    if not use_index:
        yield None, False
        return
    lock = MaintenanceLock(store.ensure_state_dir(), timeout=0)
    try:
        lock.acquire()
    except StoreBusyError:
        index = MemoryIndex(store)
        yield (index if index.manifest() and not index.stale_files() else None), False
        return
    try:
        index = MemoryIndex(store)
        index.refresh()
        yield index, True
    finally:
        lock.release()


def _with_index(index: Optional[MemoryIndex], writable: bool,
                indexed: Callable[[MemoryIndex], LookupResult],
                scanned: Callable[[], LookupResult]) -> LookupResult:
    """Answer from the index; a part that fails verification is rebuilt (when we may write)
    and the lookup retried once, else the answer comes from a read-only scan."""
    if index is not None:
        try:
            return indexed(index)
        except IntegrityError:
            if writable:
                index.refresh(rebuild=True)
                with contextlib.suppress(IntegrityError):
                    return indexed(MemoryIndex(index.store, index.fp_rate))
    return scanned()


def get_record(store: Store, record_id: str, use_index: bool = True) -> LookupResult:
    """Every record with this id (one per agent that has it); ``not_found`` if none.

    Reads the bloom filter, one id bucket and one data file (or the hot cache) - never the
    whole store - unless the index cannot be used, then scans read-only.
    """
    with _query_index(store, use_index) as (index, writable):
        result = _with_index(index, writable, lambda ix: _get_indexed(ix, record_id),
                             lambda: _get_scanned(store, record_id))
        if writable:
            _count_cache(store, result)
    if not result.records:
        result.not_found = True
        result.message = "no record with id %r in %s" % (record_id, store.root)
    return result


def _found(entry: Dict[str, Any], position: int, record: Any, source: str) -> FoundRecord:
    rid = record.get("id") if isinstance(record, dict) else None
    return FoundRecord(entry["agent"], entry["path"], entry["rtype"], position,
                       rid if isinstance(rid, str) else None, record, source)


def _fetch(index: MemoryIndex, hot: HotCache, entry: Dict[str, Any], row_id: Optional[str],
           position: int, result: LookupResult) -> FoundRecord:
    record = hot.fetch(row_id, entry, position)
    if record is not None:
        result.cache_hits += 1
        return _found(entry, position, record, "hot-cache")
    result.cache_misses += 1
    return _found(entry, position, index.load_file(entry)[position], "index")


def _get_indexed(index: MemoryIndex, record_id: str) -> LookupResult:
    result = LookupResult([], "index", unreadable=index.unreadable())
    if not index.might_contain(record_id):
        result.source = "bloom"
        return result
    hot = HotCache(index)
    for entry, position in index.locate(record_id):
        found = _fetch(index, hot, entry, record_id, position, result)
        if found.id != record_id:
            raise IntegrityError("index points %s at a different record" % record_id)
        result.records.append(found)
    return result


def _get_scanned(store: Store, record_id: str) -> LookupResult:
    errors: List[CorruptFileError] = []
    result = LookupResult([], "scan")
    for data_file, records, _ in store.iter_record_files(errors=errors):
        entry = {"agent": data_file.agent, "rtype": data_file.rtype.value,
                 "path": "%s/%s" % (data_file.agent, data_file.path.name)}
        for position, record in enumerate(records):
            if isinstance(record, dict) and record.get("id") == record_id:
                result.records.append(_found(entry, position, record, "scan"))
    result.unreadable = [str(e) for e in errors]
    return result


def search_records(store: Store, query: SearchQuery, use_index: bool = True) -> LookupResult:
    """Records matching every filter of ``query``, in store order (agent, file, position).

    An unknown agent gives an empty result with ``not_found`` set, never every record.
    Indexed filters are answered from the postings; only files holding candidates are read.
    """
    if query.agent is not None and query.agent not in store.agents():
        return LookupResult([], "none", not_found=True,
                            message="no agent named %r in %s (known: %s)"
                            % (query.agent, store.root, ", ".join(store.agents()) or "none"))
    with _query_index(store, use_index) as (index, writable):
        result = _with_index(index, writable, lambda ix: _search_indexed(ix, query),
                             lambda: _search_scanned(store, query))
        if writable:
            _count_cache(store, result)
    return result


def _limit_reached(query: SearchQuery, result: LookupResult) -> bool:
    return query.limit is not None and len(result.records) >= query.limit


def _search_indexed(index: MemoryIndex, query: SearchQuery) -> LookupResult:
    result = LookupResult([], "index", unreadable=index.unreadable())
    hot = HotCache(index)
    for entry in index.files(query.agent, query.rtype):
        for row in index.postings(entry):
            if _limit_reached(query, result):
                return result
            if query.row_matches(row):
                found = _fetch(index, hot, entry, row[P_ID], row[P_POS], result)
                if query.text_matches(found.record):
                    result.records.append(found)
    return result


def _search_scanned(store: Store, query: SearchQuery) -> LookupResult:
    errors: List[CorruptFileError] = []
    result = LookupResult([], "scan")
    agents = [query.agent] if query.agent else None
    for data_file, records, _ in store.iter_record_files(agents, errors=errors):
        if query.rtype and data_file.rtype.value != query.rtype:
            continue
        entry = {"agent": data_file.agent, "rtype": data_file.rtype.value,
                 "path": "%s/%s" % (data_file.agent, data_file.path.name)}
        for position, record in enumerate(records):
            if _limit_reached(query, result):
                break
            if query.row_matches(posting_row(record, position)) and query.text_matches(record):
                result.records.append(_found(entry, position, record, "scan"))
    result.unreadable = [str(e) for e in errors]
    return result


def warm_cache(store: Store, max_bytes: int = DEFAULT_CACHE_BYTES,
               dry_run: bool = False) -> WarmResult:
    """Refresh the index, then persist the highest-value records up to ``max_bytes``.

    Call with the maintenance lock held. A dry run refreshes nothing and writes nothing: it
    ranks from the existing index (IntegrityError if there is none usable).
    """
    index = MemoryIndex(store)
    if not dry_run:
        index.refresh()
    elif index.manifest() is None:
        return WarmResult(True, 0, 0, max_bytes, 0, 0, None, 0.0,
                          note="no index yet: a real run builds it first, then ranks")
    return HotCache(index).warm(max_bytes, store.now, dry_run)


__all__ += ["HotCache", "WarmResult", "warm_score", "hot_cache_stats", "get_record",
            "search_records", "warm_cache"]


# =============================================================================
# 11. Pruning
# Time, performance and space strategies; archive before removal; undo.
# =============================================================================


# =============================================================================
# 12. Compression and garbage collection
# In-place gzip of cold files, decompress, gc of broken and duplicate records.
# =============================================================================

@dataclasses.dataclass
class OptimizeConfig:
    """Settings of ``optimize`` (aml config file section ``optimize``; flags win)."""

    compress_age_days: float = 30.0
    cache_max_bytes: int = DEFAULT_CACHE_BYTES
    workers: int = 0  # compress/decompress threads; 0 = two per CPU core
    create_backup: bool = True


@dataclasses.dataclass
class TranscodeResult:
    """What compress or decompress did (or, in a dry run, would do)."""

    operation: str
    dry_run: bool
    files: List[str]
    bytes_before: int
    bytes_after: int
    skipped_recent: List[str]
    skipped_done: List[str]
    skipped_changed: List[str]
    unreadable: List[str]
    workers: int
    seconds: float

    @property
    def ratio(self) -> Optional[float]:
        """bytes_after / bytes_before, or None when nothing was done."""
        return self.bytes_after / self.bytes_before if self.bytes_before else None


def _transcode_bytes(raw: bytes, to_gzip: bool, parsed_ok: bool = False) -> bytes:
    """The new file content; raises ValueError if the input is not valid JSON as the runtime reads.

    ``parsed_ok`` (the index parsed this exact file) skips the parse when compressing.
    """
    if to_gzip and parsed_ok:
        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    text, fmt = decode_file_bytes(Path("-"), raw)
    obj = parse_json_text(text)
    if to_gzip:
        # Compress the exact plain bytes: after decompression the content is byte-identical.
        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    if "\n" in text.strip():
        return raw if raw[:2] != GZIP_MAGIC else gzip.decompress(raw)
    return encode_json(obj, dataclasses.replace(fmt, gzip=False))


def _transcode_one(path_text: str, to_gzip: bool, lock_timeout: float, dry_run: bool,
                   indexed: Optional[Tuple[int, int]] = None) -> Tuple[str, str, int, int, str]:
    """Compress or decompress one file in place under its lock; runs in a worker process.

    Returns (path, outcome, bytes before, bytes after, problem) with outcome ``done``,
    ``skipped`` (already in the wanted form), ``changed`` (modified meanwhile) or
    ``unreadable``. The file's mtime is kept so ``--age-days`` stays meaningful.
    ``indexed`` is the (size, mtime_ns) at which the index parsed the file successfully;
    if the file still matches, it is not parsed again.
    """
    path = Path(path_text)
    with FileLock(path, timeout=lock_timeout):
        try:
            before = path.stat()
            raw = path.read_bytes()
            if (raw[:2] == GZIP_MAGIC) == to_gzip:
                return path_text, "skipped", len(raw), len(raw), ""
            parsed_ok = (indexed == (before.st_size, before.st_mtime_ns)
                         and len(raw) == before.st_size)
            new = _transcode_bytes(raw, to_gzip, parsed_ok)
        except (CorruptFileError, ValueError, OSError, EOFError, zlib.error) as exc:
            return path_text, "unreadable", 0, 0, str(getattr(exc, "problem", exc))
        if to_gzip and gzip.decompress(new) != raw:  # pragma: no cover - zlib self-check
            raise IntegrityError("%s: gzip round trip differs; file left as it was" % path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return path_text, "changed", len(raw), len(raw), ""
        if not dry_run:  # write errors propagate: the old file is intact (atomic write)
            atomic_write_bytes(path, new)
            os.utime(str(path), ns=(before.st_atime_ns, before.st_mtime_ns))
        return path_text, "done", len(raw), len(new), ""


def _indexed_stats(store: Store) -> Dict[Path, Tuple[int, int]]:
    """(size, mtime_ns) of every file a verified index parsed successfully."""
    manifest = MemoryIndex(store).manifest() if store.state_dir.is_dir() else None
    return {store.root / e["path"]: (e["size"], e["mtime_ns"])
            for e in (manifest or {}).get("files", [])}


def _agent_data_files(store: Store) -> List[Path]:
    """Every agent's JSON data files (never config.json, global/ or aml's state)."""
    return [f.path for agent in store.agents() for f in store.agent_files(agent)]


def transcode_store(store: Store, to_gzip: bool, age_days: float = 30.0, dry_run: bool = False,
                    workers: int = 0) -> TranscodeResult:
    """Gzip (``to_gzip``) or un-gzip every agent data file in place, under the same name.

    Compression takes files unchanged for ``age_days`` (0 = all); decompression takes all.
    Each file is locked, parsed (an unparseable file is listed, never written), converted,
    verified and replaced atomically with its mtime kept; files run in parallel threads.
    Call with the maintenance lock held.
    """
    started = time.monotonic()
    cutoff = store.now.timestamp() - age_days * 86400.0
    paths, recent = [], []
    for path in _agent_data_files(store):
        if to_gzip and age_days > 0 and path.stat().st_mtime > cutoff:
            recent.append(path)
        else:
            paths.append(path)
    # Threads, two per core: zlib, reads and fsync release the GIL, and a file's fsync wait
    # overlaps another's compression (measured faster than one process per core).
    count = worker_count(workers or 2 * (os.cpu_count() or 1), len(paths))
    indexed = _indexed_stats(store)
    outcomes = parallel_map(_transcode_one, [(str(p), to_gzip, store.lock_timeout, dry_run,
                                              indexed.get(p)) for p in paths], count, threads=True)
    rel = lambda p: Path(p).relative_to(store.root).as_posix()  # noqa: E731
    by = {kind: [o for o in outcomes if o[1] == kind] for kind in ("done", "skipped", "changed",
                                                                     "unreadable")}
    return TranscodeResult(
        operation="compress" if to_gzip else "decompress", dry_run=dry_run,
        files=[rel(o[0]) for o in by["done"]], bytes_before=sum(o[2] for o in by["done"]),
        bytes_after=sum(o[3] for o in by["done"]), skipped_recent=[rel(p) for p in recent],
        skipped_done=[rel(o[0]) for o in by["skipped"]],
        skipped_changed=[rel(o[0]) for o in by["changed"]],
        unreadable=["%s: %s" % (rel(o[0]), o[4]) for o in by["unreadable"]],
        workers=count, seconds=time.monotonic() - started)


class GcReason(enum.Enum):
    """Why garbage collection removed a record."""

    NOT_AN_OBJECT = "not_an_object"
    MISSING_ID = "missing_id"
    MISSING_AGENT = "missing_agent"
    MISSING_TIMESTAMP = "missing_timestamp"
    MISSING_BODY = "missing_body"
    DUPLICATE = "duplicate"
    ID_CONFLICT = "id_conflict"


# The body a record is useless without, per type (SPEC 2.1).
_BODY_KEYS = {RecordType.PATTERN: ("pattern",), RecordType.SOLUTION: ("problem", "solution"),
              RecordType.DECISION: ("decision",)}


def _incomplete(rtype: RecordType, record: Any) -> Optional[Tuple[GcReason, Dict[str, Any]]]:
    if not isinstance(record, dict):
        return GcReason.NOT_AN_OBJECT, {"value_type": type(record).__name__}
    if not (isinstance(record.get("id"), str) and record["id"]):
        return GcReason.MISSING_ID, {"id": record.get("id")}
    if not (isinstance(record.get("agent"), str) and record["agent"]):
        return GcReason.MISSING_AGENT, {"agent": record.get("agent")}
    if parse_timestamp(record.get("timestamp")) is None:
        return GcReason.MISSING_TIMESTAMP, {"timestamp": record.get("timestamp")}
    missing = [k for k in _BODY_KEYS[rtype] if not isinstance(record.get(k), dict)]
    if missing:
        return GcReason.MISSING_BODY, {"missing": missing}
    return None


def _canonical(record: Any) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclasses.dataclass
class GcResult:
    """What gc removed and cleaned (or, in a dry run, would)."""

    dry_run: bool
    run_id: Optional[str]
    removed: List[Dict[str, Any]]
    by_reason: Dict[str, int]
    refused_agents: List[str]
    stale_locks: List[str]
    temp_files: List[str]
    orphaned_state: List[str]
    unreadable: List[str]
    skipped_changed: int
    backup_id: Optional[str]
    seconds: float


class GarbageCollector:
    """Finds and removes unusable, duplicate and conflicting records, and cleans leftovers.

    Records go to the Archive (undo with ``prune --undo RUN_ID``) before leaving their file.
    Never deletes a data file, never writes a file it cannot parse, and treats the same id in
    two agents as two records. Refuses (RefusedError) to remove more than half of an agent's
    records unless ``force``.
    """

    def __init__(self, store: Store, force: bool = False):
        self.store = store
        self.force = force

    def plan_agent(self, agent: str, errors: List[CorruptFileError]) -> List[Dict[str, Any]]:
        """Archive entries for the agent's defective records, reading its files (no writes)."""
        loaded = []
        for data_file, records, _ in self.store.iter_record_files([agent], errors=errors):
            loaded.append((data_file, records))
        entries, kept_ids = [], {}
        for data_file, records in loaded:
            seen: Dict[str, int] = {}
            for index, record in enumerate(records):
                bad = _incomplete(data_file.rtype, record)
                if bad is None:
                    canon = _canonical(record)
                    if canon in seen:
                        bad = GcReason.DUPLICATE, {"duplicate_of_index": seen[canon]}
                    else:
                        seen[canon] = index
                        kept_ids.setdefault(record["id"], []).append((data_file, index, record))
                if bad is not None:
                    entries.append(self._entry(data_file, index, record, *bad))
        return entries + self._conflicts(kept_ids)

    def _entry(self, data_file: DataFile, index: int, record: Any, reason: GcReason,
               details: Dict[str, Any]) -> Dict[str, Any]:
        rid = record.get("id") if isinstance(record, dict) else None
        return {"agent": data_file.agent,
                "file": data_file.path.relative_to(self.store.root).as_posix(),
                "type": data_file.rtype.value, "id": rid if isinstance(rid, str) else None,
                "index": index, "reason": reason.value, "details": details, "record": record}

    def _conflicts(self, by_id: Dict[str, List[Tuple[DataFile, int, Any]]]
                   ) -> List[Dict[str, Any]]:
        entries = []
        for copies in by_id.values():
            if len(copies) < 2:
                continue
            def recency(item: Tuple[DataFile, int, Any]) -> float:
                last = record_facts(item[0].rtype, item[2]).last_activity
                return last.timestamp() if last else float("-inf")
            keep = max(copies, key=recency)  # ties: the first in store order
            for copy in copies:
                if copy is keep:
                    continue
                details = {"kept_file": keep[0].path.relative_to(self.store.root).as_posix(),
                           "kept_index": keep[1], "kept_last_activity": recency(keep),
                           "last_activity": recency(copy)}
                entries.append(self._entry(copy[0], copy[1], copy[2], GcReason.ID_CONFLICT,
                                           {k: (None if v == float("-inf") else v)
                                            for k, v in details.items()}))
        return entries

    def guard(self, agent: str, entries: List[Dict[str, Any]]) -> bool:
        """True if removing ``entries`` is within the mass-deletion limit for the agent."""
        if self.force or not entries:
            return True
        total = 0
        for data_file in self.store.record_files(agent):
            with contextlib.suppress(CorruptFileError):
                total += len(self.store.load_records(data_file)[0])
        return len(entries) * 2 <= total

    def apply(self, run_id: str, entries: List[Dict[str, Any]]
              ) -> Tuple[List[Dict[str, Any]], int]:
        """Archive, then remove ``entries`` from their files under the runtime's lock.

        A record is removed only if the file still holds it unchanged; returns the entries
        actually removed (the archive is rewritten to match) and how many were skipped.
        """
        archive = Archive(self.store)
        archive.save(run_id, "gc", entries)
        removed, skipped = [], 0
        by_file: Dict[str, List[Dict[str, Any]]] = {}
        for entry in entries:
            by_file.setdefault(entry["file"], []).append(entry)
        for rel, file_entries in by_file.items():
            done = self._remove_from(self.store.root / rel, file_entries)
            removed.extend(done)
            skipped += len(file_entries) - len(done)
        if skipped:
            archive.save(run_id, "gc", removed)
        return removed, skipped

    def _remove_from(self, path: Path, entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        with self.store.rewrite(path) as job:
            positions, done = set(), []
            for entry in entries:
                canon = _canonical(entry["record"])
                i = entry["index"]
                if i >= len(job.data) or _canonical(job.data[i]) != canon or i in positions:
                    i = next((j for j, r in enumerate(job.data)
                              if j not in positions and _canonical(r) == canon), None)
                if i is not None:
                    positions.add(i)
                    done.append(entry)
            if positions:
                job.data = [r for j, r in enumerate(job.data) if j not in positions]
                job.changed = True
        return done


def stale_lock_dirs(store: Store, now: Optional[float] = None) -> List[Path]:
    """Empty ``*.json.lock`` directories in the store older than 30 s (the runtime's rule)."""
    now = time.time() if now is None else now
    found = []
    for dirpath, dirnames, _ in os.walk(str(store.root)):
        if Path(dirpath) == store.root:
            dirnames[:] = [d for d in dirnames if d != STATE_DIR_NAME]
        for name in list(dirnames):
            if not name.endswith(".json.lock"):
                continue
            dirnames.remove(name)
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                info = os.lstat(str(path))
                if (stat.S_ISDIR(info.st_mode) and now - info.st_mtime > LOCK_STALE_SECONDS
                        and not os.listdir(str(path))):
                    found.append(path)
    return found


def _temp_leftovers(store: Store) -> List[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(str(store.root)):
        dirnames[:] = [d for d in dirnames if not d.endswith(".lock")]
        out.extend(Path(dirpath) / n for n in filenames if is_temp_leftover(n))
    return out


_INDEX_FILES = frozenset({"manifest.json", "postings.dat", "keys.dat", "ids.bin", "bloom.bin",
                          "hot.json", "hot.dat", "hot.bin"})


def _orphaned_state(store: Store) -> Tuple[List[str], bool]:
    """Foreign files in ``.aml/index/`` and whether the index lists files that are gone."""
    index = MemoryIndex(store)
    strays = []
    if index.folder.is_dir():
        strays = sorted(p.name for p in index.folder.iterdir()
                        if p.name not in _INDEX_FILES and not is_temp_leftover(p.name))
    manifest = index.manifest()
    gone = [e["path"] for e in (manifest or {}).get("files", [])
            if not (store.root / e["path"]).exists()]
    return strays + gone, bool(gone)


def collect_garbage(store: Store, dry_run: bool = False, force: bool = False,
                    backup: Optional[Callable[[], str]] = None) -> GcResult:
    """Run gc over every agent; call with the maintenance lock held (except dry runs).

    ``backup`` (e.g. a safety_backup call) runs before the first change, only when records
    will be removed. Agents over the mass-deletion limit are refused and listed; if any is,
    nothing at all is removed and RefusedError names them.
    """
    started = time.monotonic()
    gc = GarbageCollector(store, force)
    errors: List[CorruptFileError] = []
    plan, refused = [], []
    for agent in store.agents():
        entries = gc.plan_agent(agent, errors)
        if not gc.guard(agent, entries):
            refused.append(agent)
        plan.extend(entries)
    locks, temps = stale_lock_dirs(store), _temp_leftovers(store)
    orphans, index_gone = _orphaned_state(store)
    if refused and not dry_run:
        raise RefusedError("gc would remove more than half of the records of %s; check the "
                           "store, then rerun with --force" % ", ".join(refused))
    run_id, backup_id, removed, skipped = None, None, plan, 0
    if not dry_run:
        if plan and backup is not None:
            backup_id = backup()
        if plan:
            run_id = new_run_id("gc", store.now)
            removed, skipped = gc.apply(run_id, plan)
        _clean_leftovers(store, locks, temps, orphans, index_gone)
    rel = lambda p: p.relative_to(store.root).as_posix()  # noqa: E731
    reasons = dict(collections.Counter(e["reason"] for e in removed))
    return GcResult(dry_run, run_id, removed, reasons, refused, [rel(p) for p in locks],
                    [rel(p) for p in temps], orphans, [str(e) for e in errors], skipped,
                    backup_id, time.monotonic() - started)


def _clean_leftovers(store: Store, locks: List[Path], temps: List[Path], orphans: List[str],
                     index_gone: bool) -> None:
    for path in locks:
        with contextlib.suppress(OSError):
            info = os.lstat(str(path))
            if time.time() - info.st_mtime > LOCK_STALE_SECONDS:  # still stale right now
                os.rmdir(str(path))
    store.cleanup_temp_files()
    index = MemoryIndex(store)
    for name in orphans:
        if "/" not in name:
            with contextlib.suppress(OSError):
                (index.folder / name).unlink()
    if index_gone:
        index.refresh()


__all__ += ["OptimizeConfig", "TranscodeResult", "transcode_store", "GcReason", "GcResult",
            "GarbageCollector", "collect_garbage", "stale_lock_dirs"]


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

def _optimize_config(store: Store, args: argparse.Namespace) -> OptimizeConfig:
    """Defaults < aml config file section ``optimize`` < flags."""
    section = load_aml_config(store, args.config).get("optimize", {})
    config = apply_config_fields(OptimizeConfig(), section, "aml config [optimize]")
    flags = {"compress_age_days": getattr(args, "age_days", None),
             "cache_max_bytes": getattr(args, "cache_bytes", None),
             "workers": getattr(args, "workers", None)}
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    if getattr(args, "no_backup", False):
        config = dataclasses.replace(config, create_backup=False)
    if config.compress_age_days < 0 or config.cache_max_bytes < 1 or config.workers < 0:
        raise UsageError("--age-days, --cache-bytes and --workers must not be negative")
    return config


_OPTIMIZE_ORDER = ("gc", "compress", "index", "warm-cache")
_OPTIMIZE_EPILOG = """actions:
  index (or build-index)  build or refresh the index in .aml/index/ (re-reads changed files only)
  compress                gzip agent files unchanged for --age-days, in place, same names
  decompress              turn gzip agent files back into plain JSON
  warm-cache              persist the highest-value records (up to --cache-bytes) for get/search
  gc                      archive unusable, duplicate and same-id records; clean stale locks,
                          temp files and orphaned index state
  all                     gc, compress, index, warm-cache (in that order: each step changes
                          the files the next one reads, and the index is built last so it is
                          fresh for the cache and for get/search)"""


@command_builder
def _build_optimize(subparsers: Any) -> None:
    parser = subparser(subparsers, "optimize", "index, compress, warm the cache, collect garbage",
                       epilog=_OPTIMIZE_EPILOG)
    parser.add_argument("action", choices=("all", "index", "build-index", "compress",
                                           "decompress", "warm-cache", "gc"))
    parser.add_argument("--dry-run", action="store_true", help="change nothing; report the plan")
    parser.add_argument("--age-days", type=float, metavar="N",
                        help="compress files unchanged for N days (default 30; 0 = all)")
    parser.add_argument("--cache-bytes", type=int, metavar="BYTES",
                        help="hot cache budget (default %d)" % DEFAULT_CACHE_BYTES)
    parser.add_argument("--workers", type=int, metavar="N",
                        help="compress/decompress threads (default: two per CPU core)")
    parser.add_argument("--no-backup", action="store_true",
                        help="skip the safety backup before gc/compress")
    parser.add_argument("--force", action="store_true",
                        help="let gc remove more than half of an agent's records")
    parser.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    """optimize ACTION: run one step or all of them under the maintenance lock."""
    store, out = open_store(args), output_for(args)
    config = _optimize_config(store, args)
    action = "index" if args.action == "build-index" else args.action
    steps = _OPTIMIZE_ORDER if action == "all" else (action,)
    lock = contextlib.nullcontext() if args.dry_run else store.maintenance_lock()
    with lock:
        results = _run_optimize_steps(store, steps, config, args)
    out.document({"action": action, "dry_run": args.dry_run, "order": list(results),
                  "steps": results})
    code = ExitCode.OK
    for step, result in results.items():
        _print_step(out, step, result)
        if getattr(result, "unreadable", None):
            code = ExitCode.PARTIAL
        if getattr(result, "refused_agents", None):  # only a dry run gets here: say it would
            code = ExitCode.REFUSED
    return code


def _run_optimize_steps(store: Store, steps: Sequence[str], config: OptimizeConfig,
                        args: argparse.Namespace) -> Dict[str, Any]:
    backup_id = None
    if not args.dry_run and config.create_backup and "compress" in steps:
        backup_id = safety_backup(store, "optimize %s" % args.action)
    gc_backup = None
    if config.create_backup and backup_id is None:
        gc_backup = lambda: safety_backup(store, "optimize gc")  # noqa: E731
    results: Dict[str, Any] = {}
    for step in steps:
        started, clock = store.now, time.monotonic()
        result = _optimize_step(store, step, config, args, gc_backup)
        results[step] = result
        if not args.dry_run:
            store.record_operation("compress" if step == "decompress" else step, started,
                                   time.monotonic() - clock, _step_summary(step, result))
    return results


def _optimize_step(store: Store, step: str, config: OptimizeConfig, args: argparse.Namespace,
                   gc_backup: Optional[Callable[[], str]]) -> Any:
    if step == "index":
        return MemoryIndex(store).refresh(dry_run=args.dry_run)
    if step in ("compress", "decompress"):
        return transcode_store(store, step == "compress", config.compress_age_days,
                               args.dry_run, config.workers)
    if step == "warm-cache":
        return warm_cache(store, config.cache_max_bytes, args.dry_run)
    return collect_garbage(store, args.dry_run, args.force, gc_backup)


def _step_summary(step: str, result: Any) -> Dict[str, Any]:
    if step == "index":
        return {"files": result.files, "files_reread": len(result.files_reread),
                "records": result.records, "bytes": result.index_bytes, "rebuilt": result.rebuilt}
    if step in ("compress", "decompress"):
        return {"direction": step, "files": len(result.files), "bytes_before": result.bytes_before,
                "bytes_after": result.bytes_after, "unreadable": len(result.unreadable)}
    if step == "warm-cache":
        return {"records": result.records, "bytes": result.bytes, "budget": result.budget}
    return {"run_id": result.run_id, "removed": len(result.removed), "by_reason": result.by_reason,
            "stale_locks": len(result.stale_locks), "temp_files": len(result.temp_files),
            "orphaned_state": len(result.orphaned_state), "backup_id": result.backup_id}


def _print_step(out: Output, step: str, result: Any) -> None:
    would = "would " if result.dry_run else ""
    for problem in getattr(result, "unreadable", []):
        out.warn("%s: skipped, unreadable: %s" % (step, problem))
    if step == "index":
        out.line("index: %s%s; %d files, %d re-read, %d records, %d ids, %s on disk (bloom %s)"
                 % (would, "rebuild" if result.rebuilt else "refresh", result.files,
                    len(result.files_reread), result.records, result.ids,
                    human_bytes(result.index_bytes), human_bytes(result.bloom_bytes)))
    elif step in ("compress", "decompress"):
        out.line("%s: %s%s %d files, %s -> %s; skipped %d recent, %d already done, %d changed"
                 % (step, would, step, len(result.files), human_bytes(result.bytes_before),
                    human_bytes(result.bytes_after), len(result.skipped_recent),
                    len(result.skipped_done), len(result.skipped_changed)))
    elif step == "warm-cache":
        out.line("warm-cache: %skeep %d records hot, %s of %s (%d ranked, %d files read)%s"
                 % (would, result.records, human_bytes(result.bytes), human_bytes(result.budget),
                    result.candidates, result.files_read,
                    ("; " + result.note) if result.note else ""))
    else:
        _print_gc(out, result, would)


def _print_gc(out: Output, result: GcResult, would: str) -> None:
    reasons = ", ".join("%s %d" % kv for kv in sorted(result.by_reason.items())) or "none"
    out.line("gc: %sremove %d records (%s)%s" % (would, len(result.removed), reasons,
                                                 ("; archived as run " + result.run_id)
                                                 if result.run_id else ""))
    for entry in result.removed:
        out.line("  %s [%d] %s %s" % (entry["file"], entry["index"], entry["reason"],
                                      entry["id"] or "-"))
    out.line("gc: %sclean %d stale locks, %d temp files, %d orphaned index entries"
             % (would, len(result.stale_locks), len(result.temp_files),
                len(result.orphaned_state)))
    if result.refused_agents:
        out.warn("gc: more than half of the records of %s would go: refused without --force"
                 % ", ".join(result.refused_agents))
    if result.skipped_changed:
        out.warn("gc: %d records changed meanwhile and were left in place"
                 % result.skipped_changed)


def _add_lookup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", action="store_true",
                        help="read-only scan of every file; no index, nothing written")


@command_builder
def _build_search(subparsers: Any) -> None:
    parser = subparser(subparsers, "search", "find records by agent, type, tags, text, scores")
    parser.add_argument("--agent", metavar="A")
    parser.add_argument("--type", dest="rtype", choices=[t.value for t in RecordType])
    parser.add_argument("--tag", dest="tags", action="extend", nargs="+", default=[],
                        metavar="T", help="record has every given tag")
    parser.add_argument("--text", nargs="+", metavar="WORDS",
                        help="every word occurs in the record's text (case-insensitive)")
    parser.add_argument("--min-confidence", type=float, metavar="X")
    parser.add_argument("--min-success-rate", type=float, metavar="Y")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N records")
    _add_lookup_options(parser)
    parser.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    """search: print matching records (text: one line each; json: the records)."""
    store, out = open_store(args), output_for(args)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    query = SearchQuery(args.agent, args.rtype, tuple(args.tags),
                        " ".join(args.text) if args.text else None, args.min_confidence,
                        args.min_success_rate, args.limit)
    result = search_records(store, query, use_index=not args.scan)
    out.document(dict(dataclasses.asdict(result), count=result.count))
    for found in result.records:
        out.always(_record_line(found))
    out.line("%d record%s (%s)" % (result.count, "" if result.count == 1 else "s", result.source))
    return _lookup_exit(out, result)


def _record_line(found: FoundRecord) -> str:
    facts = record_facts(RecordType(found.type), found.record)
    rec = found.record if isinstance(found.record, dict) else {}
    summary = (dig(rec, "pattern", "approach", "technique") or dig(rec, "problem", "errorType")
               or dig(rec, "decision", "question") or "")
    score = lambda v: "-" if v is None else "%.2f" % v  # noqa: E731
    return "%s[%d]  %s  conf=%s sr=%s  tags=%s  %s" % (
        found.file, found.index, found.id or "-", score(facts.confidence),
        score(facts.success_rate), ",".join(facts.tags) or "-", summary)


def _lookup_exit(out: Output, result: LookupResult) -> int:
    for problem in result.unreadable:
        out.warn("skipped, unreadable: %s" % problem)
    if result.not_found:
        out.warn(result.message or "not found")
        return ExitCode.FAILURE
    return ExitCode.PARTIAL if result.unreadable else ExitCode.OK


@command_builder
def _build_get(subparsers: Any) -> None:
    parser = subparser(subparsers, "get", "print the record(s) with this id")
    parser.add_argument("record_id", metavar="RECORD_ID")
    _add_lookup_options(parser)
    parser.set_defaults(func=cmd_get)


def cmd_get(args: argparse.Namespace) -> int:
    """get ID: print the record as JSON (with a location line when several agents hold it)."""
    store, out = open_store(args), output_for(args)
    result = get_record(store, args.record_id, use_index=not args.scan)
    out.document(dict(dataclasses.asdict(result), count=result.count))
    for found in result.records:
        if result.count > 1:
            out.always("# %s [%d]" % (found.file, found.index))
        out.always(runtime_json(found.record))
    return _lookup_exit(out, result)


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
