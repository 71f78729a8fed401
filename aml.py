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
# Only this section needs these; importing them here keeps the shared import block stable.
import concurrent.futures  # noqa: E402
import difflib  # noqa: E402
import struct  # noqa: E402


class BackupType(enum.Enum):
    """A full snapshot re-reads every file; an incremental skips files whose stat is unchanged."""

    FULL = "full"
    INCREMENTAL = "incremental"

    @property
    def prefix(self) -> str:
        """The id prefix: ``full`` or ``incr``."""
        return "full" if self is BackupType.FULL else "incr"


# How often `backup auto` is expected to run (days), and every how many periods it takes a full.
SCHEDULE_PERIODS = {"hourly": 1.0 / 24, "daily": 1.0, "weekly": 7.0, "monthly": 30.0}
FULL_EVERY_PERIODS = 7
REPO_DIR_NAME = "aml"
BLOCK_SIZE = 256 * 1024          # uncompressed bytes per zlib block inside a pack
MAX_DELTA_DEPTH = 64             # item lists chain at most this many deltas before a full list
BLOCK_CACHE_BYTES = 32 * 1024 * 1024  # decompressed blocks kept while reading a repository
PACK_REWRITE_DEAD_SHARE = 0.2    # rotate rewrites a pack once this share of its bytes is garbage
_PACK_MAGIC = b"AMLPACK1"
_IDX_MAGIC = b"AMLIDX02"
KEY_LEN = 12                     # bytes of SHA-256 that key an object in a pack index
_MANIFEST_FORMAT = "aml-backup-manifest-1"


@dataclasses.dataclass
class BackupConfig:
    """Where backups go and how they are kept; every field is used (see README)."""

    backup_root: Optional[Path] = None
    retention_days: int = 30
    max_backups: int = 100
    compression_level: int = 6
    incremental_enabled: bool = True
    verify_after_backup: bool = True
    backup_schedule: str = "daily"

    def validate(self) -> "BackupConfig":
        """Return self; raises UsageError for a value out of range."""
        if self.backup_schedule not in SCHEDULE_PERIODS:
            raise UsageError("backup_schedule must be one of %s, not %r"
                             % (", ".join(SCHEDULE_PERIODS), self.backup_schedule))
        checks = (("retention_days", 0), ("max_backups", 1), ("compression_level", 0))
        for name, low in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError("%s must be an integer >= %d, not %r" % (name, low, value))
        if self.compression_level > 9:
            raise UsageError("compression_level must be 0..9, not %r" % self.compression_level)
        return self


@dataclasses.dataclass
class BackupResult:
    """One snapshot taken by BackupManager.create."""

    backup_id: str
    type: BackupType
    created: str
    files: int
    records: int
    files_reread: int
    objects_added: int
    bytes_added: int
    verified: bool
    manifest: Path
    reason: Optional[str] = None
    warnings: List[str] = dataclasses.field(default_factory=list)
    skipped: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@dataclasses.dataclass
class SnapshotInfo:
    """One row of ``backup list``."""

    backup_id: str
    type: str
    created: str
    files: int
    records: int
    logical_bytes: int
    agents: Optional[List[str]]
    reason: Optional[str]
    verified: Optional[bool]


@dataclasses.dataclass
class ListResult:
    """Snapshots (oldest first), foreign files in the backup root, and the repository size."""

    backup_root: Path
    snapshots: List[SnapshotInfo]
    foreign: List[str]
    repository_bytes: int
    problems: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class VerifyResult:
    """Outcome of verifying one or more snapshots; ``problems`` names everything wrong."""

    backup_ids: List[str]
    deep: bool
    ok: bool
    files_checked: int
    objects_checked: int
    problems: List[str]
    failed: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RestoreResult:
    """What a restore changed (or, with dry_run, would change)."""

    backup_id: str
    target: Path
    dry_run: bool
    created: List[str]
    replaced: List[str]
    removed: List[str]
    unchanged: int
    safety_backup: Optional[str]


@dataclasses.dataclass
class RotateResult:
    """Snapshots deleted and kept by rotation, and the space freed."""

    dry_run: bool
    deleted: List[str]
    kept: List[str]
    objects_freed: int
    bytes_freed: int
    packs_rewritten: int
    warnings: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class AutoResult:
    """What ``backup auto`` did: the snapshot (or why none was due) and the rotation."""

    backup: Optional[BackupResult]
    skipped: Optional[str]
    rotate: Optional[RotateResult]


# -- JSON array splitting: records as exact byte slices ---------------------

_WS_RE = re.compile(r"[ \t\n\r]*")
_SCAN_ONCE = json.JSONDecoder(parse_constant=_reject_constant).scan_once


def split_json_array(text: str) -> Optional[Tuple[str, str, str, List[Tuple[int, int]]]]:
    """``(head, separator, tail, element spans)`` of a non-empty JSON array text, else None.

    Joining head, the element slices with the separator, and tail gives back ``text``
    exactly, so a restore is byte-exact without re-serializing. Arrays whose separators
    differ (hand-edited), empty arrays and invalid JSON return None (stored whole).
    """
    try:
        return _split_array(text)
    except (StopIteration, ValueError, RecursionError, IndexError):
        return None


def _split_array(text: str) -> Optional[Tuple[str, str, str, List[Tuple[int, int]]]]:
    pos = _WS_RE.match(text).end()
    if not text.startswith("[", pos):
        return None
    start = cur = _WS_RE.match(text, pos + 1).end()
    spans: List[Tuple[int, int]] = []
    sep = None
    while True:
        end = _SCAN_ONCE(text, cur)[1]
        spans.append((cur, end))
        nxt = _WS_RE.match(text, end).end()
        if text.startswith(",", nxt):
            cur = _WS_RE.match(text, nxt + 1).end()
            if sep is None:
                sep = text[end:cur]
            elif text[end:cur] != sep:
                return None
        elif text.startswith("]", nxt) and not text[nxt + 1:].strip(" \t\n\r"):
            return text[:start], sep or "", text[end:], spans
        else:
            return None


def _json_kind_of(data: bytes) -> str:
    """``array``/``object``/``string``/... for JSON bytes (gzip allowed), else ``invalid``."""
    try:
        text, _ = decode_file_bytes(Path("-"), data)
        return _kind_name(parse_json_text(text))
    except (CorruptFileError, ValueError, RecursionError):
        return "invalid"


def _kind_name(obj: Any) -> str:
    if isinstance(obj, bool) or obj is None:
        return "literal"
    return {list: "array", dict: "object", str: "string"}.get(type(obj), "number")


def _gzip_mtime(raw: bytes) -> int:
    return int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else 0


# -- Pack files: content-addressed objects in zlib blocks -------------------

class _PackWriter:
    """Appends new objects to one new pack, compressing 256 KiB blocks on worker threads.

    The pack is written under its final name but stays invisible until ``commit`` writes
    its index (after fsync of the pack); a pack without an index is a leftover.
    """

    def __init__(self, packs_dir: Path, level: int, known: Callable[[bytes], bool]):
        self.name = "pack-%s-%s" % (time.strftime("%Y%m%d%H%M%S"), secrets.token_hex(4))
        self.path = packs_dir / (self.name + ".pack")
        self.level = level
        self.known = known
        self.entries: Dict[bytes, Tuple[int, int, int]] = {}
        self.blocks: List[Tuple[int, int, int]] = []
        self.bytes_written = 0
        self.committed = False
        self._bufs: Dict[bool, List[Tuple[bytes, bytes]]] = {False: [], True: []}
        self._buf_len = {False: 0, True: 0}
        self._queued: set = set()
        self._next_block = 0
        self._pending: List[Any] = []
        self._fh: Optional[Any] = None
        self._offset = len(_PACK_MAGIC)
        # zlib releases the GIL: compressing blocks on threads overlaps with JSON scanning.
        workers = max(1, min(4, os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def add(self, digest: bytes, data: bytes, meta: bool = False) -> bool:
        """Queue one object unless the repository or this pack has it; True if added.

        ``meta`` objects (item lists) go to their own blocks, so reading a snapshot's lists
        does not decompress record blocks.
        """
        if digest in self.entries or digest in self._queued or self.known(digest):
            return False
        buf = self._bufs[meta]
        buf.append((digest, data))
        self._queued.add(digest)
        self._buf_len[meta] += len(data)
        if self._buf_len[meta] >= BLOCK_SIZE:
            self._seal(meta)
        return True

    def _seal(self, meta: bool) -> None:
        buf = self._bufs[meta]
        if not buf:
            return
        block_no, offset = self._next_block, 0
        self._next_block += 1
        for digest, data in buf:
            self.entries[digest] = (block_no, offset, len(data))
            offset += len(data)
        block = b"".join(data for _, data in buf)
        self._pending.append((self._pool.submit(zlib.compress, block, self.level), len(block)))
        self._bufs[meta], self._buf_len[meta] = [], 0
        self._queued.difference_update(d for d, _ in buf)
        while len(self._pending) > 4:
            self._write_oldest()

    def _write_oldest(self) -> None:
        future, ulen = self._pending.pop(0)
        data = future.result()
        if self._fh is None:
            self._fh = open(str(self.path), "xb")
            os.chmod(str(self.path), 0o600)
            self._fh.write(_PACK_MAGIC)
        self._fh.write(data)
        self.blocks.append((self._offset, len(data), ulen))
        self._offset += len(data)

    def commit(self) -> int:
        """Write out every block, fsync, then the index; returns bytes added (0 if none)."""
        self._seal(False)
        self._seal(True)
        while self._pending:
            self._write_oldest()
        self._pool.shutdown()
        if self._fh is None:
            return 0
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        index = _encode_index(self.blocks, self.entries)
        atomic_write_bytes(self.path.with_suffix(".idx"), index, mode=0o600)
        self.committed = True
        self.bytes_written = self._offset + len(index)
        return self.bytes_written

    def abort(self) -> None:
        """Drop the pack unless committed (an uncommitted pack has no index: no reader)."""
        if self.committed:
            return
        self._pool.shutdown(cancel_futures=True)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _encode_index(blocks: List[Tuple[int, int, int]],
                  entries: Dict[bytes, Tuple[int, int, int]]) -> bytes:
    """Magic, SHA-256 of the payload, then the zlib payload: blocks and object locations.

    Objects are keyed by the first 12 bytes of their SHA-256 (the full digest lives in the
    manifest or item list that references them and is checked on every read).
    """
    parts = [struct.pack("<I", len(blocks))]
    parts.extend(struct.pack("<QII", *b) for b in blocks)
    parts.append(struct.pack("<I", len(entries)))
    parts.extend(d[:KEY_LEN] + struct.pack("<III", *loc) for d, loc in entries.items())
    payload = b"".join(parts)
    return _IDX_MAGIC + hashlib.sha256(payload).digest() + zlib.compress(payload, 6)


def _decode_index(path: Path, raw: bytes) -> Tuple[List[Tuple[int, int, int]],
                                                     Dict[bytes, Tuple[int, int, int]]]:
    try:
        payload = zlib.decompress(raw[40:])
    except zlib.error:
        payload = b""
    if not raw.startswith(_IDX_MAGIC) or hashlib.sha256(payload).digest() != raw[8:40]:
        raise IntegrityError("%s: pack index checksum mismatch" % path)
    try:
        nblocks = struct.unpack_from("<I", payload, 0)[0]
        pos = 4 + 16 * nblocks
        blocks = list(struct.iter_unpack("<QII", payload[4:pos]))
        nobj = struct.unpack_from("<I", payload, pos)[0]
        table = payload[pos + 4:]
        width = KEY_LEN + 12
        if len(table) != width * nobj:
            raise ValueError("size")
        entries = {table[i:i + KEY_LEN]: struct.unpack_from("<III", table, i + KEY_LEN)
                   for i in range(0, len(table), width)}
    except (struct.error, ValueError):
        raise IntegrityError("%s: malformed pack index" % path) from None
    return blocks, entries


class _ObjectStore:
    """Read side of the repository: every committed pack's objects, checked on every read."""

    def __init__(self, packs_dir: Path):
        self.packs_dir = packs_dir
        self.where: Dict[bytes, Tuple[str, int, int, int]] = {}
        self.blocks: Dict[str, List[Tuple[int, int, int]]] = {}
        self.entries: Dict[str, Dict[bytes, Tuple[int, int, int]]] = {}
        self.problems: List[str] = []
        self._cache: Dict[Tuple[str, int], bytes] = {}
        self._cached = 0
        for idx in sorted(packs_dir.glob("pack-*.idx")) if packs_dir.is_dir() else []:
            self._load(idx)

    def _load(self, idx: Path) -> None:
        try:
            blocks, entries = _decode_index(idx, idx.read_bytes())
        except (OSError, IntegrityError) as exc:
            self.problems.append(str(exc))
            return
        name = idx.stem
        self.blocks[name] = blocks
        self.entries[name] = entries
        for digest, (block, off, length) in entries.items():
            self.where.setdefault(digest, (name, block, off, length))

    def has(self, digest: bytes) -> bool:
        """True if a committed pack indexes this object."""
        return digest[:KEY_LEN] in self.where

    def get(self, digest: bytes, check: bool = True) -> bytes:
        """The object's bytes; raises IntegrityError if missing, unreadable or not matching.

        ``check=False`` skips the per-object SHA-256 (the length is still checked) for
        callers that verify the SHA-256 of the whole rebuilt file instead.
        """
        loc = self.where.get(digest[:KEY_LEN])
        if loc is None:
            raise IntegrityError("object %s is missing" % digest.hex()[:16])
        name, block_no, off, length = loc
        data = self._block(name, block_no)[off:off + length]
        if len(data) != length or (check and hashlib.sha256(data).digest() != digest):
            raise IntegrityError("object %s in %s.pack: checksum mismatch"
                                 % (digest.hex()[:16], name))
        return data

    def _order(self, digest: bytes) -> Tuple[str, int, int]:
        loc = self.where.get(digest[:KEY_LEN])
        return (loc[0], loc[1], loc[2]) if loc else ("", -1, 0)

    def check_many(self, digests: Iterable[bytes]) -> Dict[bytes, str]:
        """Check objects in pack order (each block read once); returns {digest: problem}."""
        bad = {}
        for digest in sorted(set(digests), key=self._order):
            try:
                self.get(digest)
            except IntegrityError as exc:
                bad[digest] = str(exc)
        return bad

    def fetch_many(self, digests: Iterable[bytes], check: bool = True) -> Dict[bytes, bytes]:
        """The bytes of many objects, read in pack order; raises IntegrityError."""
        return {d: self.get(d, check) for d in sorted(set(digests), key=self._order)}

    def _block(self, name: str, block_no: int) -> bytes:
        key = (name, block_no)
        if key not in self._cache:
            data = self._read_block(name, block_no)
            while self._cache and self._cached + len(data) > BLOCK_CACHE_BYTES:
                self._cached -= len(self._cache.pop(next(iter(self._cache))))
            self._cache[key] = data
            self._cached += len(data)
        return self._cache[key]

    def _read_block(self, name: str, block_no: int) -> bytes:
        path = self.packs_dir / (name + ".pack")
        try:
            offset, clen, ulen = self.blocks[name][block_no]
            with open(str(path), "rb") as handle:
                handle.seek(offset)
                data = zlib.decompress(handle.read(clen))
        except (OSError, IndexError, zlib.error) as exc:
            raise IntegrityError("%s: block %d unreadable (%s)" % (path, block_no, exc)) from None
        if len(data) != ulen:
            raise IntegrityError("%s: block %d has the wrong size" % (path, block_no))
        return data


# -- Item lists: a file's records as digests, stored whole or as deltas -----

def _encode_delta(base: bytes, old: List[bytes], new: List[bytes]) -> bytes:
    """``D`` + base digest + the edits that turn ``old`` into ``new``."""
    ops = [op for op in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
           if op[0] != "equal"]
    parts = [b"D", base, struct.pack("<I", len(ops))]
    for _, i1, i2, j1, j2 in ops:
        parts.append(struct.pack("<III", i1, i2, j2 - j1))
        parts.extend(new[j1:j2])
    return b"".join(parts)


def _apply_delta(data: bytes, old: List[bytes]) -> List[bytes]:
    count = struct.unpack_from("<I", data, 33)[0]
    pos, done, out = 37, 0, []
    for _ in range(count):
        i1, i2, n = struct.unpack_from("<III", data, pos)
        pos += 12
        if not done <= i1 <= i2 <= len(old):
            raise ValueError("delta out of range")
        out.extend(old[done:i1])
        out.extend(data[pos + 32 * k:pos + 32 * k + 32] for k in range(n))
        pos += 32 * n
        done = i2
    if pos != len(data):
        raise ValueError("delta has trailing bytes")
    out.extend(old[done:])
    return out


def _split_digests(data: bytes) -> List[bytes]:
    if len(data) % 32:
        raise ValueError("list object has a partial digest")
    return [data[i:i + 32] for i in range(0, len(data), 32)]


class _Lists:
    """Resolves item-list objects (full ``L`` or delta ``D`` chains), caching the results."""

    def __init__(self, objects: _ObjectStore):
        self.objects = objects
        self.cache: Dict[bytes, List[bytes]] = {}

    def resolve(self, digest: bytes, chain: Optional[List[bytes]] = None) -> List[bytes]:
        """The digests listed by a list object; raises IntegrityError."""
        todo = []
        while digest not in self.cache:
            if len(todo) > MAX_DELTA_DEPTH + 1:
                raise IntegrityError("list %s: delta chain too long" % digest.hex()[:16])
            data = self.objects.get(digest)
            todo.append((digest, data))
            if data[:1] != b"D":
                break
            digest = data[1:33]
        if chain is not None:
            chain.extend(d for d, _ in todo)
        for digest, data in reversed(todo):
            self.cache[digest] = self._decode(digest, data)
        return self.cache[todo[0][0]] if todo else self.cache[digest]

    def _decode(self, digest: bytes, data: bytes) -> List[bytes]:
        try:
            if data[:1] == b"L":
                return _split_digests(data[1:])
            if data[:1] == b"D":
                return _apply_delta(data, self.cache[data[1:33]])
            raise ValueError("unknown list kind")
        except (ValueError, KeyError, IndexError) as exc:
            raise IntegrityError("list %s malformed (%s)" % (digest.hex()[:16], exc)) from None


# -- Paths: what a snapshot covers, and refusing hostile ones ----------------

def safe_relpath(rel: Any) -> str:
    """``rel`` if it is a plain relative POSIX path inside a target; raises IntegrityError."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel
            or "\x00" in rel or any(p in ("", ".", "..") for p in rel.split("/"))):
        raise IntegrityError("unsafe path in manifest: %r" % (rel,))
    return rel


def _check_no_symlinks(root: Path, rel: str) -> None:
    """Refuse if any existing folder between ``root`` and ``rel`` is a symlink (or a file)."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            info = os.lstat(str(current))
        except FileNotFoundError:
            return
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise RefusedError("refusing to restore %s: %s is a symlink or not a folder"
                               % (rel, current))


def _in_scope(rel: str, agents: Optional[Sequence[str]]) -> bool:
    return agents is None or rel.split("/", 1)[0] in agents


def _walk_files(root: Path, top: str, skip: Callable[[str], bool]) -> Iterator[str]:
    """Relative POSIX paths of the regular files under root/top (no symlinks, no skipped names)."""
    base = root / top if top else root
    for dirpath, dirnames, filenames in os.walk(str(base)):
        rel_dir = os.path.relpath(dirpath, str(root)).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not skip(rel_dir + d)
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            rel = rel_dir + name
            if not skip(rel) and not os.path.islink(os.path.join(dirpath, name)):
                yield rel


def _skip_name(rel: str) -> bool:
    """Never backed up: aml state other than the archive, runtime locks, temp files."""
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".lock") or is_temp_leftover(name):
        return True
    top = rel.split("/", 1)[0]
    if top == STATE_DIR_NAME:
        return not (rel == STATE_DIR_NAME or rel == STATE_DIR_NAME + "/archive"
                    or rel.startswith(STATE_DIR_NAME + "/archive/"))
    return top.startswith(".") or top == "memory-backup"


def store_scope_files(root: Path, agents: Optional[Sequence[str]]) -> List[str]:
    """Every file a snapshot of ``agents`` (None: the whole store) covers, sorted."""
    if agents is None:
        return list(_walk_files(root, "", _skip_name))
    found: List[str] = []
    for agent in agents:
        found.extend(_walk_files(root, agent, _skip_name))
    return found


def _write_manifest(path: Path, payload: Dict[str, Any]) -> None:
    """Like write_checksummed, but gzip-compressed (read_checksummed reads it unchanged)."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False)
    doc = {"format": "aml-state-1", "sha256": sha256_hex(body.encode("utf-8")), "payload": payload}
    data = json.dumps(doc, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    atomic_write_bytes(path, gzip.compress(data, compresslevel=9, mtime=0), mode=0o600)


def _id_order(backup_id: str) -> Tuple[str, int]:
    parts = backup_id.split("_")
    return parts[1] + parts[2], int(parts[3]) if len(parts) > 3 else 1


def _id_time(backup_id: str) -> _dt.datetime:
    stamp = "".join(backup_id.split("_")[1:3])
    return _dt.datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=_dt.timezone.utc)


# -- The manager ------------------------------------------------------------

class BackupManager:
    """Snapshots of a store in a content-addressed repository at ``<backup_root>/aml/``.

    Records of JSON-array files are stored once per distinct content, so an unchanged record
    costs nothing in later snapshots even when the runtime rewrote (or re-gzipped) its file.
    Every snapshot's manifest lists every file, so each restores on its own.
    """

    def __init__(self, store: Store, config: Optional[BackupConfig] = None):
        self.store = store
        self.config = (config or BackupConfig()).validate()
        root = self.config.backup_root
        sibling = Path(os.path.abspath(str(store.root))).parent / "memory-backup"
        self.root = Path(root) if root else sibling
        if self.root.resolve().is_relative_to(store.root.resolve()):
            raise UsageError("backup root %s is inside the store; it would back itself up"
                             % self.root)
        self.repo = self.root / REPO_DIR_NAME
        self.packs = self.repo / "packs"
        self.snapshots_dir = self.repo / "snapshots"
        self.progress: Callable[[str], None] = lambda text: None   # the CLI shows it on a TTY

    # -- repository housekeeping ------------------------------------------
    @contextlib.contextmanager
    def _repo_lock(self, exclusive: bool) -> Iterator[None]:
        if exclusive:
            self._ensure_repo()
        elif not (self.repo / "lock").exists():
            yield
            return
        fd = os.open(str(self.repo / "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _flock(self, fd: int, mode: int) -> None:
        deadline = time.monotonic() + self.store.lock_timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    raise StoreBusyError("backup repository busy: %s" % (self.repo / "lock"))
                time.sleep(0.2)

    def _ensure_repo(self) -> None:
        for folder in (self.root, self.repo, self.packs, self.snapshots_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.repo, self.packs, self.snapshots_dir):
            os.chmod(str(folder), 0o700)

    def _cleanup_leftovers(self) -> None:
        """Remove what an interrupted run left: packs without an index, temp files."""
        if not self.packs.is_dir():
            return
        for pack in self.packs.glob("pack-*.pack"):
            if not pack.with_suffix(".idx").exists():
                pack.unlink()
        for folder in (self.packs, self.snapshots_dir, self.repo):
            for leftover in folder.iterdir():
                if is_temp_leftover(leftover.name):
                    leftover.unlink()

    # -- manifests ----------------------------------------------------------
    def manifest_path(self, backup_id: str) -> Path:
        """The manifest file of a snapshot; raises UsageError for a malformed id."""
        if not re.fullmatch(r"(full|incr)_\d{8}_\d{6}(_\d+)?", backup_id or ""):
            raise UsageError("invalid backup id %r (expected e.g. full_20261120_020000)"
                             % backup_id)
        return self.snapshots_dir / (backup_id + ".json")

    def load_manifest(self, backup_id: str) -> Dict[str, Any]:
        """A snapshot's manifest; UsageError if absent, IntegrityError if it does not verify."""
        path = self.manifest_path(backup_id)
        if not path.exists():
            raise UsageError("no backup %r in %s" % (backup_id, self.repo))
        payload = read_checksummed(path)
        if not isinstance(payload, dict) or payload.get("format") != _MANIFEST_FORMAT \
                or not isinstance(payload.get("files"), list):
            raise IntegrityError("%s: not an aml backup manifest" % path)
        return payload

    def snapshot_ids(self) -> List[str]:
        """Ids of every snapshot with a manifest, oldest first (by time, then sequence)."""
        if not self.snapshots_dir.is_dir():
            return []
        ids = [p.stem for p in self.snapshots_dir.glob("*.json")
               if re.fullmatch(r"(full|incr)_\d{8}_\d{6}(_\d+)?", p.stem)]
        return sorted(ids, key=_id_order)

    def _new_id(self, btype: BackupType) -> str:
        # The suffix is shared by both prefixes so (stamp, suffix) orders every snapshot.
        stamp, n, suffix = compact_stamp(self.store.now), 1, ""
        while any((self.snapshots_dir / ("%s_%s%s.json" % (p, stamp, suffix))).exists()
                  for p in ("full", "incr")):
            n += 1
            suffix = "_%d" % n
        return "%s_%s%s" % (btype.prefix, stamp, suffix)

    def _newest_readable(self) -> Optional[Dict[str, Any]]:
        for backup_id in reversed(self.snapshot_ids()):
            try:
                return self.load_manifest(backup_id)
            except AmlError:
                continue
        return None

    # -- verified marks -----------------------------------------------------
    def _verified(self) -> Dict[str, Any]:
        try:
            marks = read_checksummed(self.repo / "verified.json", {})
        except IntegrityError:
            return {}
        return marks if isinstance(marks, dict) else {}

    def _mark_verified(self, results: Dict[str, bool], deep: bool) -> None:
        marks = self._verified()
        existing = set(self.snapshot_ids())
        marks = {k: v for k, v in marks.items() if k in existing}
        for backup_id, ok in results.items():
            marks[backup_id] = {"ok": ok, "deep": deep, "when": format_timestamp(self.store.now)}
        write_checksummed(self.repo / "verified.json", marks)

    def newest_verified(self) -> Optional[str]:
        """The newest snapshot whose last verification passed, or None."""
        marks = self._verified()
        for backup_id in reversed(self.snapshot_ids()):
            if marks.get(backup_id, {}).get("ok") is True:
                return backup_id
        return None

    # -- create ---------------------------------------------------------------
    def create(self, backup_type: BackupType = BackupType.INCREMENTAL,
               agents: Optional[Sequence[str]] = None, reason: Optional[str] = None,
               verify: Optional[bool] = None, lock_store: bool = True) -> BackupResult:
        """Take a snapshot (full, or incremental when enabled and a previous one exists).

        Pass ``lock_store=False`` when the caller already holds the store's maintenance
        lock. Raises StoreBusyError, IntegrityError (verification failed) or OSError.
        """
        hold = self.store.maintenance_lock() if lock_store else contextlib.nullcontext()
        with hold, self._repo_lock(exclusive=True):
            self._cleanup_leftovers()
            return self._snapshot_and_verify(backup_type, agents, reason, verify)

    def _snapshot_and_verify(self, btype: BackupType, agents: Optional[Sequence[str]],
                             reason: Optional[str], verify: Optional[bool] = None) -> BackupResult:
        started, clock = self.store.now, time.monotonic()
        result = self._create_locked(btype, agents, reason)
        if self.config.verify_after_backup if verify is None else verify:
            check = self._verify_locked([result.backup_id], deep=False)
            self._record_verify(check, started, clock)
            result.verified = check.ok
            if not check.ok:
                raise IntegrityError("backup %s does not verify: %s"
                                     % (result.backup_id, "; ".join(check.problems[:3])))
        result.seconds = time.monotonic() - clock
        self.store.record_operation("backup", started, result.seconds, {
            "backup_id": result.backup_id, "type": result.type.value, "verified": result.verified,
            "manifest": str(result.manifest.resolve()), "bytes_added": result.bytes_added,
            "files": result.files})
        return result

    def _create_locked(self, btype: BackupType, agents: Optional[Sequence[str]],
                       reason: Optional[str]) -> BackupResult:
        selected = self.store.select_agents(agents) if agents else None
        previous = self._newest_readable()
        if previous is None or not self.config.incremental_enabled:
            btype = BackupType.FULL
        objects = _ObjectStore(self.packs)
        snap = _SnapshotBuilder(self, objects, previous,
                                incremental=btype is BackupType.INCREMENTAL)
        writer = _PackWriter(self.packs, self.config.compression_level, objects.has)
        try:
            paths = store_scope_files(self.store.root, selected)
            entries = []
            for n, rel in enumerate(paths, 1):
                self.progress("backup: file %d of %d" % (n, len(paths)))
                entries.append(snap.file_entry(rel, writer))
            entries = [e for e in entries if e]
            bytes_added = writer.commit()
            backup_id = self._new_id(btype)
            manifest = {"format": _MANIFEST_FORMAT, "id": backup_id, "type": btype.value,
                        "created": format_timestamp(self.store.now),
                        "store": str(self.store.root.resolve()), "agents": selected,
                        "reason": reason, "files": entries}
            path = self.manifest_path(backup_id)
            _write_manifest(path, manifest)   # the commit point
        except BaseException:
            writer.abort()
            raise
        return BackupResult(
            backup_id=backup_id, type=btype, created=manifest["created"], files=len(entries),
            records=sum(e.get("count", 0) for e in entries), files_reread=snap.reread,
            objects_added=len(writer.entries), bytes_added=bytes_added + path.stat().st_size,
            verified=False, manifest=path, reason=reason, warnings=snap.warnings,
            skipped=snap.skipped)

    def _record_verify(self, check: VerifyResult, started: _dt.datetime, clock: float) -> None:
        self._mark_verified({i: i not in check.failed for i in check.backup_ids}, check.deep)
        for backup_id in check.backup_ids:
            self.store.record_operation("verify", started, time.monotonic() - clock, {
                "backup_id": backup_id, "ok": backup_id not in check.failed, "deep": check.deep})

    # -- verify ---------------------------------------------------------------
    def verify(self, backup_id: Optional[str] = None, deep: bool = False,
               all_snapshots: bool = False) -> VerifyResult:
        """Check manifests and every object's SHA-256 (``deep``: rebuild and parse each file).

        Returns a VerifyResult whose ``problems`` name what is wrong (the CLI exits 6);
        raises UsageError for an unknown id or an empty repository.
        """
        started, clock = self.store.now, time.monotonic()
        ids = self.snapshot_ids()
        if not ids:
            raise UsageError("no backups in %s" % self.repo)
        if not all_snapshots:
            backup_id = backup_id or ids[-1]
            if not self.manifest_path(backup_id).exists():
                raise UsageError("no backup %r in %s" % (backup_id, self.repo))
            ids = [backup_id]
        with self._repo_lock(exclusive=True):
            result = self._verify_locked(ids, deep)
            self._record_verify(result, started, clock)
        return result

    def _verify_locked(self, ids: List[str], deep: bool) -> VerifyResult:
        objects = _ObjectStore(self.packs)
        lists = _Lists(objects)
        checked: Dict[bytes, Optional[str]] = {}
        result = VerifyResult(backup_ids=list(ids), deep=deep, ok=True, files_checked=0,
                              objects_checked=0, problems=list(objects.problems))
        for backup_id in ids:
            before = len(result.problems)
            try:
                manifest = self.load_manifest(backup_id)
            except AmlError as exc:
                result.problems.append("%s: %s" % (backup_id, exc))
            else:
                result.problems.extend("%s: %s" % (backup_id, p) for p in self._verify_files(
                    manifest["files"], objects, lists, checked, deep))
                result.files_checked += len(manifest["files"])
            if len(result.problems) > before:
                result.failed.append(backup_id)
        result.objects_checked = len(checked)
        result.ok = not result.problems
        return result

    def _verify_files(self, entries: List[Any], objects: _ObjectStore, lists: _Lists,
                      checked: Dict[bytes, Optional[str]], deep: bool) -> List[str]:
        """Problems of one manifest's files: objects checked once each, in pack order."""
        problems, needs = [], []
        for entry in entries:
            try:
                safe_relpath(entry.get("path"))
                needs.append((entry, _entry_objects(entry, lists)))
            except (AmlError, ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append("%s: %s" % (_entry_path(entry), exc))
        todo = {d for _, ds in needs for d in ds if d not in checked}
        checked.update(dict.fromkeys(todo))
        checked.update(objects.check_many(todo))
        good = []
        for entry, digests in needs:
            bad = next((checked[d] for d in digests if checked[d]), None)
            if bad:
                problems.append("%s: %s" % (_entry_path(entry), bad))
            else:
                good.append(entry)
        if deep:
            data = objects.fetch_many(d for _, ds in needs for d in ds if not checked[d])
            problems.extend(p for e in good for p in _deep_check(e, lists, data))
        return problems

    # -- restore --------------------------------------------------------------
    def snapshot_at(self, moment: _dt.datetime, agents: Optional[Sequence[str]] = None) -> str:
        """The newest snapshot taken at or before ``moment`` covering ``agents``; UsageError."""
        for backup_id in reversed(self.snapshot_ids()):
            if _id_time(backup_id) > moment:
                continue
            with contextlib.suppress(AmlError):
                covered = self.load_manifest(backup_id).get("agents")
                if covered is None or (agents and set(agents) <= set(covered)):
                    return backup_id
        raise UsageError("no backup taken at or before %s" % format_timestamp(moment))

    def restore(self, backup_id: Optional[str] = None, at: Optional[_dt.datetime] = None,
                agents: Optional[Sequence[str]] = None, target: Optional[Path] = None,
                dry_run: bool = False, force: bool = False) -> RestoreResult:
        """Put the store (or ``target``) back exactly as a snapshot recorded it.

        Verifies everything it needs before touching anything, takes a safety snapshot of
        the live store first, swaps each file in atomically under the runtime's lock, and
        removes files that did not exist then. Raises IntegrityError (corrupt backup, nothing
        changed), RefusedError (symlink in the target, non-empty --target without force),
        UsageError, StoreBusyError.
        """
        started, clock = self.store.now, time.monotonic()
        # The root itself may be a symlink the user chose; only folders below it are checked.
        root = (Path(target) if target is not None else self.store.root).resolve()
        live = root == self.store.root.resolve()
        hold = self.store.maintenance_lock() if not dry_run else contextlib.nullcontext()
        with hold, self._repo_lock(exclusive=not dry_run):
            if backup_id is None:
                if at is None:
                    raise UsageError("name a backup id or --at TIMESTAMP")
                backup_id = self.snapshot_at(at, agents)
            manifest = self.load_manifest(backup_id)
            scope = _restore_scope(manifest, agents)
            plan = _RestorePlan(self, manifest, scope, root)
            result = RestoreResult(backup_id=backup_id, target=root, dry_run=dry_run,
                                   created=plan.created, replaced=plan.replaced,
                                   removed=plan.removed, unchanged=plan.unchanged,
                                   safety_backup=None)
            if dry_run or not plan.changes():
                return result
            if not live and not force and plan.target_had_files:
                raise RefusedError("--target %s is not empty; use --force to restore into it"
                                   % root)
            if live:
                result.safety_backup = self._safety_snapshot(backup_id)
            plan.apply()
        self.store.record_operation("restore", started, time.monotonic() - clock, {
            "backup_id": backup_id, "target": str(root.resolve()),
            "created": len(result.created), "replaced": len(result.replaced),
            "removed": len(result.removed), "safety_backup": result.safety_backup})
        return result

    def _safety_snapshot(self, backup_id: str) -> str:
        """A verified snapshot of the live store before a restore; RefusedError if incomplete."""
        safety = self._snapshot_and_verify(BackupType.INCREMENTAL, None,
                                           "before restore of %s" % backup_id)
        if safety.skipped:
            raise RefusedError("nothing restored: the safety backup %s could not read %s"
                               % (safety.backup_id, ", ".join(safety.skipped)))
        return safety.backup_id

    # -- rotate ---------------------------------------------------------------
    def rotate(self, dry_run: bool = False, keep_daily: int = 0, keep_weekly: int = 0,
               keep_monthly: int = 0, lock_store: bool = True) -> RotateResult:
        """Delete snapshots past retention_days/max_backups (calendar rules keep some longer).

        Never deletes the newest snapshot nor the newest verified one; then frees the objects
        no remaining snapshot uses. Raises StoreBusyError.
        """
        started, clock = self.store.now, time.monotonic()
        hold = (self.store.maintenance_lock() if lock_store and not dry_run
                else contextlib.nullcontext())
        with hold, self._repo_lock(exclusive=not dry_run):
            result = self._rotate_locked(dry_run, keep_daily, keep_weekly, keep_monthly)
        if not dry_run:
            self.store.record_operation("rotate", started, time.monotonic() - clock, {
                "deleted": result.deleted, "kept": len(result.kept),
                "bytes_freed": result.bytes_freed, "objects_freed": result.objects_freed})
        return result

    def retained(self, ids: List[str], keep_daily: int = 0, keep_weekly: int = 0,
                 keep_monthly: int = 0) -> List[str]:
        """The snapshot ids rotation keeps, oldest first."""
        now = self.store.now
        keep = {i for i in ids if days_between(_id_time(i), now) <= self.config.retention_days}
        for count, key in ((keep_daily, lambda t: t.date()),
                           (keep_weekly, lambda t: t.isocalendar()[:2]),
                           (keep_monthly, lambda t: (t.year, t.month))):
            keep.update(_calendar_picks(ids, count, key))
        protected = set(ids[-1:])
        protected.update([self.newest_verified()] if self.newest_verified() else [])
        ordered = sorted(keep, key=_id_order)
        while len(ordered) > self.config.max_backups:
            victim = next((i for i in ordered if i not in protected), None)
            if victim is None:
                break
            ordered.remove(victim)
        return sorted(set(ordered) | protected, key=_id_order)

    def _rotate_locked(self, dry_run: bool, keep_daily: int, keep_weekly: int,
                       keep_monthly: int) -> RotateResult:
        if not dry_run:
            self._cleanup_leftovers()
        ids = self.snapshot_ids()
        kept = self.retained(ids, keep_daily, keep_weekly, keep_monthly)
        deleted = [i for i in ids if i not in kept]
        result = RotateResult(dry_run=dry_run, deleted=deleted, kept=kept, objects_freed=0,
                              bytes_freed=0, packs_rewritten=0)
        objects = _ObjectStore(self.packs)
        live = self._reachable(kept, objects, result.warnings)
        if not dry_run:
            for backup_id in deleted:
                self.manifest_path(backup_id).unlink()
            fsync_dir(self.snapshots_dir)
        if live is not None:
            _GarbageCollector(self, objects, live, result).run(dry_run)
        if not dry_run and deleted:
            self._mark_verified({}, False)
        return result

    def _reachable(self, ids: List[str], objects: _ObjectStore,
                   warnings: List[str]) -> Optional[set]:
        """Every object the given snapshots need, or None (no gc) if any cannot be read."""
        lists = _Lists(objects)
        live: set = set()
        for backup_id in ids:
            try:
                for entry in self.load_manifest(backup_id)["files"]:
                    live.update(_entry_objects(entry, lists))
            except (AmlError, ValueError, KeyError, TypeError, AttributeError) as exc:
                warnings.append("space not freed: snapshot %s cannot be read (%s)"
                                % (backup_id, exc))
                return None
        return live

    # -- auto -----------------------------------------------------------------
    def auto(self, keep_daily: int = 0, keep_weekly: int = 0,
             keep_monthly: int = 0) -> AutoResult:
        """For cron: a snapshot when one is due per backup_schedule (full every 7 periods,
        else incremental), verified per verify_after_backup, then rotation."""
        period = SCHEDULE_PERIODS[self.config.backup_schedule]
        now = self.store.now
        with self.store.maintenance_lock(), self._repo_lock(exclusive=True):
            self._cleanup_leftovers()
            ids = [i for i in self.snapshot_ids() if self._whole_store(i)]
            backup, skipped = None, None
            if ids and days_between(_id_time(ids[-1]), now) < 0.9 * period:
                skipped = "%s is recent enough for the %s schedule" % (
                    ids[-1], self.config.backup_schedule)
            else:
                fulls = [i for i in ids if i.startswith("full_")]
                due = not fulls or days_between(_id_time(fulls[-1]), now) >= \
                    FULL_EVERY_PERIODS * period - 0.1 * period
                btype = BackupType.FULL if due else BackupType.INCREMENTAL
                backup = self._snapshot_and_verify(btype, None, None)
        rotated = self.rotate(keep_daily=keep_daily, keep_weekly=keep_weekly,
                              keep_monthly=keep_monthly)
        return AutoResult(backup=backup, skipped=skipped, rotate=rotated)

    def _whole_store(self, backup_id: str) -> bool:
        try:
            return self.load_manifest(backup_id).get("agents") is None
        except AmlError:
            return False

    # -- list -----------------------------------------------------------------
    def list(self) -> ListResult:
        """Every snapshot with its verification state, foreign files in the root, total size."""
        result = ListResult(backup_root=self.root, snapshots=[], foreign=[], repository_bytes=0)
        marks = self._verified()
        for backup_id in self.snapshot_ids():
            try:
                m = self.load_manifest(backup_id)
            except AmlError as exc:
                result.problems.append("%s: %s" % (backup_id, exc))
                continue
            files = m["files"]
            result.snapshots.append(SnapshotInfo(
                backup_id=backup_id, type=m.get("type"), created=m.get("created"),
                files=len(files), records=sum(e.get("count", 0) for e in files),
                logical_bytes=sum(e.get("size", 0) for e in files), agents=m.get("agents"),
                reason=m.get("reason"), verified=marks.get(backup_id, {}).get("ok")))
        if self.root.is_dir():
            result.foreign = sorted(p.name for p in self.root.iterdir()
                                    if p.name != REPO_DIR_NAME)
        if self.repo.is_dir():
            result.repository_bytes = sum(p.stat().st_size for p in self.repo.rglob("*")
                                          if p.is_file())
        return result


def _calendar_picks(ids: List[str], count: int, key: Callable[[_dt.datetime], Any]) -> List[str]:
    """The newest snapshot of each of the ``count`` most recent calendar periods."""
    seen: Dict[Any, str] = {}
    for backup_id in reversed(ids):
        period = key(_id_time(backup_id))
        if period not in seen:
            if len(seen) >= count:
                break
            seen[period] = backup_id
    return list(seen.values())


def _deep_check(entry: Dict[str, Any], lists: _Lists, data: Dict[bytes, bytes]) -> List[str]:
    try:
        _check_parses(entry, rebuild_content(entry, lists, data))
    except (AmlError, ValueError, KeyError, TypeError) as exc:
        return ["%s: %s" % (_entry_path(entry), exc)]
    return []


def _entry_path(entry: Any) -> str:
    return str(entry.get("path")) if isinstance(entry, dict) else "<bad entry>"


def _entry_objects(entry: Dict[str, Any], lists: _Lists) -> List[bytes]:
    """Every object a manifest entry needs (delta bases included); raises IntegrityError."""
    if entry["kind"] == "blob":
        return [bytes.fromhex(entry["object"])]
    chain: List[bytes] = []
    items = lists.resolve(bytes.fromhex(entry["list"]), chain)
    if len(items) != entry["count"]:
        raise IntegrityError("item list has %d records, manifest says %d"
                             % (len(items), entry["count"]))
    return chain + items


def rebuild_content(entry: Dict[str, Any], lists: _Lists, data: Dict[bytes, bytes]) -> bytes:
    """A file's content (decompressed for gzip files) from fetched objects, checked against
    its recorded SHA-256; raises IntegrityError or KeyError (object not fetched)."""
    if entry["kind"] == "blob":
        content = data[bytes.fromhex(entry["object"])]
        expected = entry["sha256"]
    else:
        items = _entry_objects(entry, lists)[-entry["count"]:] if entry["count"] else []
        body = entry["sep"].encode("utf-8").join(data[d] for d in items)
        content = b"".join([UTF8_BOM if entry["bom"] else b"", entry["head"].encode("utf-8"),
                            body, entry["tail"].encode("utf-8")])
        expected = entry["content_sha256"]
    if sha256_hex(content) != expected:
        raise IntegrityError("rebuilt content does not match its recorded SHA-256")
    return content


def encode_restored(entry: Dict[str, Any], content: bytes) -> bytes:
    """The bytes to write for a rebuilt file: gzip files are gzip again (same content)."""
    if entry.get("kind") == "array" and entry.get("gzip"):
        return gzip.compress(content, compresslevel=GZIP_LEVEL, mtime=entry.get("gzip_mtime", 0))
    return content


def _check_parses(entry: Dict[str, Any], content: bytes) -> None:
    if entry["kind"] == "array":
        kind, expected = _json_kind_of(content), "array"
        if kind == "array" and len(parse_json_text(
                content.decode("utf-8-sig"))) != entry["count"]:
            raise IntegrityError("rebuilt array has the wrong number of records")
    else:
        expected = entry.get("json", "bytes")
        kind = _json_kind_of(content) if expected != "bytes" else "bytes"
    if kind != expected:
        raise IntegrityError("rebuilt file parses as %s, was %s" % (kind, expected))


def _restore_scope(manifest: Dict[str, Any],
                   agents: Optional[Sequence[str]]) -> Optional[List[str]]:
    covered = manifest.get("agents")
    if not agents:
        return covered
    for agent in agents:
        if "/" in agent or is_reserved_name(agent) or (covered is not None
                                                      and agent not in covered):
            raise UsageError("backup %s does not cover agent %r" % (manifest.get("id"), agent))
    return list(dict.fromkeys(agents))


class _RestorePlan:
    """What a restore will create, replace and remove, with every file rebuilt and verified."""

    def __init__(self, manager: BackupManager, manifest: Dict[str, Any],
                 scope: Optional[List[str]], root: Path):
        self.manager = manager
        self.root = root
        self.live = root == manager.store.root.resolve()
        self.entries = self._entries(manifest, scope)
        self.content = self._rebuild(manifest["id"], _ObjectStore(manager.packs))
        self.created: List[str] = []
        self.replaced: List[str] = []
        self.unchanged = 0
        for rel in self.entries:
            self._classify(rel)
        existing = store_scope_files(root, scope) if root.is_dir() else []
        self.target_had_files = bool(existing)
        self.removed = [rel for rel in existing if rel not in self.entries]

    def _rebuild(self, backup_id: str, objects: _ObjectStore) -> Dict[str, bytes]:
        """Every file's content, verified, before anything is touched; raises IntegrityError."""
        lists = _Lists(objects)
        needs, content = {}, {}
        for rel, entry in self.entries.items():
            try:
                needs[rel] = _entry_objects(entry, lists)
            except (IntegrityError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise IntegrityError("backup %s: %s: %s" % (backup_id, rel, exc)) from None
        try:
            # Each rebuilt file is checked against its full SHA-256 below, which covers
            # every object in it, so hashing each object again would only cost time.
            data = objects.fetch_many((d for ds in needs.values() for d in ds), check=False)
        except IntegrityError as exc:
            raise IntegrityError("backup %s: %s" % (backup_id, exc)) from None
        for rel, entry in self.entries.items():
            try:
                content[rel] = rebuild_content(entry, lists, data)
            except (IntegrityError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise IntegrityError("backup %s: %s: %s" % (backup_id, rel, exc)) from None
        return content

    @staticmethod
    def _entries(manifest: Dict[str, Any], scope: Optional[List[str]]) -> Dict[str, Any]:
        entries = {}
        for entry in manifest["files"]:
            rel = safe_relpath(_entry_path(entry))
            if _skip_name(rel):
                raise IntegrityError("backup %s: path %r is outside what aml restores"
                                     % (manifest.get("id"), rel))
            if _in_scope(rel, scope):
                entries[rel] = entry
        return entries

    def _classify(self, rel: str) -> None:
        _check_no_symlinks(self.root, rel)
        path = self.root / rel
        if not os.path.lexists(str(path)):
            self.created.append(rel)
        elif self._same(path, self.entries[rel]):
            self.unchanged += 1
        else:
            self.replaced.append(rel)

    def _same(self, path: Path, entry: Dict[str, Any]) -> bool:
        try:
            if path.is_symlink() or not path.is_file():
                return False
            raw = path.read_bytes()
        except OSError:
            return False
        if entry.get("kind") == "array" and entry.get("gzip"):
            if raw[:2] != GZIP_MAGIC:
                return False
            with contextlib.suppress(OSError, EOFError, zlib.error):
                return sha256_hex(gzip.decompress(raw)) == entry["content_sha256"]
            return False
        return sha256_hex(raw) == entry.get("sha256")

    def changes(self) -> bool:
        """True if the restore would change anything."""
        return bool(self.created or self.replaced or self.removed)

    def apply(self) -> None:
        """Stage every file, then swap each in (runtime lock, os.replace) and remove extras."""
        state = self.root / STATE_DIR_NAME
        _check_no_symlinks(self.root, STATE_DIR_NAME + "/x")
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in state.glob("restore-*"):
            _remove_tree(old)
        staging = state / ("restore-%s" % secrets.token_hex(4))
        staging.mkdir(mode=0o700)
        try:
            staged = self._stage(staging)
            for n, rel in enumerate(self.created + self.replaced, 1):
                self.manager.progress("restore: file %d of %d" % (n, len(staged)))
                self._swap(rel, staged[rel])
            for rel in self.removed:
                self._remove(rel)
        finally:
            _remove_tree(staging)
            with contextlib.suppress(OSError):
                state.rmdir()   # only if empty: a --target restore leaves no aml folder

    def _stage(self, staging: Path) -> Dict[str, Path]:
        """Write every file to be swapped in under ``staging``, fsynced; gzip on threads."""
        names = self.created + self.replaced
        jobs = [(rel, staging / str(n)) for n, rel in enumerate(names)]
        workers = max(1, min(4, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda job: self._stage_one(*job), jobs))
        return dict(jobs)

    def _stage_one(self, rel: str, path: Path) -> None:
        entry = self.entries[rel]
        mode = entry.get("mode") if isinstance(entry.get("mode"), int) else 0o644
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode_restored(entry, self.content[rel]))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(str(path), mode & 0o777)

    def _swap(self, rel: str, staged: Path) -> None:
        _check_no_symlinks(self.root, rel)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_no_symlinks(self.root, rel)
        with self._lock(path):
            os.replace(str(staged), str(path))
        fsync_dir(path.parent)

    def _lock(self, path: Path) -> Any:
        """The runtime's lock for a file of the live store; a --target has no runtime."""
        if self.live:
            return self.manager.store.file_lock(path)
        return contextlib.nullcontext()

    def _remove(self, rel: str) -> None:
        _check_no_symlinks(self.root, rel)
        path = self.root / rel
        with self._lock(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_dir(path.parent)
        parent = path.parent
        while parent != self.root and parent.name != STATE_DIR_NAME:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _remove_tree(folder: Path) -> None:
    """Remove a staging folder aml created (regular files only, no symlink following)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for child in folder.iterdir():
        with contextlib.suppress(OSError):
            child.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


class _GarbageCollector:
    """Frees objects no kept snapshot needs: deletes dead packs, rewrites mostly-dead ones.

    New packs are committed (with their index) before old ones go, and the index goes before
    its pack, so a crash leaves duplicates or an index-less leftover, never a lost object.
    """

    def __init__(self, manager: BackupManager, objects: _ObjectStore, live: set,
                 result: RotateResult):
        self.manager = manager
        self.objects = objects
        self.live = live
        self.result = result

    def run(self, dry_run: bool) -> None:
        """Plan per pack, then (unless dry_run) rewrite and delete."""
        drop, rewrite = [], []
        live = {d[:KEY_LEN]: d for d in self.live}
        for name, entries in self.objects.entries.items():
            keep = [live[k] for k in entries if k in live and self.objects.where[k][0] == name]
            kept = {d[:KEY_LEN] for d in keep}
            dead = [entries[k][2] for k in entries if k not in kept]
            if not dead:
                continue
            total = sum(e[2] for e in entries.values())
            if not keep:
                drop.append(name)
            elif sum(dead) >= PACK_REWRITE_DEAD_SHARE * total:
                rewrite.append((name, sorted(keep, key=lambda d: entries[d[:KEY_LEN]][:2])))
            else:
                continue   # little garbage: left until more of the pack is unused
            self.result.objects_freed += len(dead)
        before = self._size(n for n, _ in rewrite) + self._size(drop)
        if dry_run:
            self.result.bytes_freed = self._size(drop) + sum(
                int(self._size([n]) * (1 - len(k) / len(self.objects.entries[n])))
                for n, k in rewrite)
            return
        added = self._rewrite(rewrite)
        for name in drop + [n for n, _ in rewrite]:
            self._delete(name)
        self.result.packs_rewritten = len(rewrite)
        self.result.bytes_freed = before - added

    def _rewrite(self, rewrite: List[Tuple[str, List[bytes]]]) -> int:
        if not rewrite:
            return 0
        writer = _PackWriter(self.manager.packs, self.manager.config.compression_level,
                             lambda d: False)
        try:
            for _, keep in rewrite:
                for digest in keep:
                    writer.add(digest, self.objects.get(digest))
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def _size(self, names: Iterable[str]) -> int:
        total = 0
        for name in names:
            for suffix in (".pack", ".idx"):
                with contextlib.suppress(OSError):
                    total += (self.manager.packs / (name + suffix)).stat().st_size
        return total

    def _delete(self, name: str) -> None:
        (self.manager.packs / (name + ".idx")).unlink()
        fsync_dir(self.manager.packs)
        with contextlib.suppress(FileNotFoundError):
            (self.manager.packs / (name + ".pack")).unlink()


def backup_config_for(store: Store, config_file: Optional[Path] = None,
                      **overrides: Any) -> BackupConfig:
    """BackupConfig from defaults < aml config section ``backup`` < ``overrides`` (flags).

    A relative ``backup_root`` in the config file is taken from the store's parent folder.
    Raises UsageError for unknown keys or bad values.
    """
    section = dict(load_aml_config(store, config_file).get("backup", {}))
    if section.get("backup_root"):
        section["backup_root"] = store.root.resolve().parent / Path(section["backup_root"])
    config = apply_config_fields(BackupConfig(), section, "aml config [backup]")
    values = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **values).validate()


def safety_backup(store: Store, reason: str, config: Optional[BackupConfig] = None) -> str:
    """Take and verify a snapshot before destructive work; returns its id.

    Call it with the store's maintenance lock held (it does not take it again). Raises
    RefusedError when the backup cannot be taken or does not verify, so the work stops.
    """
    try:
        config = config or backup_config_for(store)
        result = BackupManager(store, config).create(BackupType.INCREMENTAL, reason=reason,
                                                     verify=True, lock_store=False)
    except (AmlError, OSError) as exc:
        raise RefusedError("safety backup before %s failed, nothing was changed (%s); "
                           "--no-backup skips it" % (reason, exc)) from None
    return result.backup_id



class _SnapshotBuilder:
    """Turns store files into manifest entries, writing only objects the repository lacks."""

    def __init__(self, manager: BackupManager, objects: _ObjectStore,
                 previous: Optional[Dict[str, Any]], incremental: bool):
        self.manager = manager
        self.store = manager.store
        self.objects = objects
        self.lists = _Lists(objects)
        self.previous = {e.get("path"): e for e in (previous or {}).get("files", [])
                         if isinstance(e, dict)}
        self.incremental = incremental
        self.reread = 0
        self.warnings: List[str] = []
        self.skipped: List[str] = []

    def file_entry(self, rel: str, writer: _PackWriter) -> Optional[Dict[str, Any]]:
        """The manifest entry of one file; None (with a warning) if it cannot be read."""
        path = self.store.root / rel
        try:
            info = os.lstat(str(path))
            key = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
            prev = self.previous.get(rel)
            if self.incremental and prev and prev.get("stat") == key and self._intact(prev):
                return prev
            raw = self._read(rel, path)
        except (OSError, StoreBusyError) as exc:
            self.warnings.append("%s: cannot read (%s); not in this backup"
                                 % (path, getattr(exc, "strerror", None) or exc))
            self.skipped.append(rel)
            return None
        self.reread += 1
        entry = {"path": rel, "mode": stat.S_IMODE(info.st_mode), "size": len(raw),
                 "sha256": sha256_hex(raw), "stat": key}
        if prev and prev.get("sha256") == entry["sha256"] and self._intact(prev):
            return dict(prev, **entry)   # byte-identical: no need to split it again
        entry.update(self._array_entry(raw, prev, writer) or self._blob_entry(rel, raw, writer))
        return entry

    def _intact(self, prev: Dict[str, Any]) -> bool:
        ref = prev.get("list") or prev.get("object")
        return isinstance(ref, str) and self.objects.has(bytes.fromhex(ref))

    def _read(self, rel: str, path: Path) -> bytes:
        if rel.startswith(STATE_DIR_NAME + "/"):
            return path.read_bytes()
        lock = self.store.file_lock(path)
        try:
            lock.acquire()            # the runtime may be mid-write
        except PermissionError:
            return path.read_bytes()  # a read-only store cannot be locked, only read
        try:
            return path.read_bytes()
        finally:
            lock.release()

    def _blob_entry(self, rel: str, raw: bytes, writer: _PackWriter) -> Dict[str, Any]:
        digest = hashlib.sha256(raw).digest()
        writer.add(digest, raw)
        kind = _json_kind_of(raw) if rel.endswith(".json") else "bytes"
        if kind == "invalid":
            self.warnings.append("%s: not valid JSON; backed up as bytes"
                                 % (self.store.root / rel))
        return {"kind": "blob", "object": digest.hex(), "json": kind}

    def _array_entry(self, raw: bytes, prev: Optional[Dict[str, Any]],
                     writer: _PackWriter) -> Optional[Dict[str, Any]]:
        is_gzip = raw[:2] == GZIP_MAGIC
        try:
            content = gzip.decompress(raw) if is_gzip else raw
            bom = content.startswith(UTF8_BOM)
            text = content[len(UTF8_BOM):].decode("utf-8") if bom else content.decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            return None
        parts = split_json_array(text)
        if parts is None:
            return None
        head, sep, tail, spans = parts
        items = []
        for start, end in spans:
            data = text[start:end].encode("utf-8")
            digest = hashlib.sha256(data).digest()
            writer.add(digest, data)
            items.append(digest)
        ref, depth = self._store_list(items, prev, writer)
        return {"kind": "array", "gzip": is_gzip, "gzip_mtime": _gzip_mtime(raw) if is_gzip else 0,
                "bom": bom, "head": head, "sep": sep, "tail": tail, "count": len(items),
                "content_sha256": sha256_hex(content), "list": ref, "depth": depth}

    def _store_list(self, items: List[bytes], prev: Optional[Dict[str, Any]],
                    writer: _PackWriter) -> Tuple[str, int]:
        old = None
        if prev and prev.get("kind") == "array":
            with contextlib.suppress(IntegrityError, ValueError, TypeError):
                old = self.lists.resolve(bytes.fromhex(prev["list"]))
        if old == items:
            return prev["list"], int(prev.get("depth", 0))
        if old is not None and int(prev.get("depth", 0)) < MAX_DELTA_DEPTH:
            delta = _encode_delta(bytes.fromhex(prev["list"]), old, items)
            if len(delta) < 16 * len(items):
                digest = hashlib.sha256(delta).digest()
                writer.add(digest, delta, meta=True)
                return digest.hex(), int(prev.get("depth", 0)) + 1
        data = b"L" + b"".join(items)
        digest = hashlib.sha256(data).digest()
        writer.add(digest, data, meta=True)
        return digest.hex(), 0

__all__ += ["BackupType", "BackupConfig", "BackupManager", "BackupResult", "SnapshotInfo",
            "ListResult", "VerifyResult", "RestoreResult", "RotateResult", "AutoResult",
            "safety_backup", "backup_config_for", "split_json_array", "safe_relpath"]


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

def _backup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backup-root", metavar="DIR", type=Path, default=None,
                        help="backup folder (default: the store's sibling memory-backup/)")


def _keep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention-days", type=int, metavar="N", default=None,
                        help="delete snapshots older than N days (default 30)")
    parser.add_argument("--max-backups", type=int, metavar="N", default=None,
                        help="keep at most N snapshots (default 100)")
    for unit in ("daily", "weekly", "monthly"):
        parser.add_argument("--keep-%s" % unit, type=int, metavar="N", default=0,
                            help="also keep the newest snapshot of each of the last N %s "
                            "periods" % {"daily": "days", "weekly": "weeks",
                                         "monthly": "months"}[unit])


def _create_options(parser: argparse.ArgumentParser, incremental_flag: bool) -> None:
    if incremental_flag:
        parser.add_argument("--incremental", action="store_true",
                            help="trust unchanged size/mtime of files (default: full re-read)")
    parser.add_argument("--agents", nargs="+", metavar="A", help="only these agents")
    parser.add_argument("--compression-level", type=int, metavar="0-9", default=None)
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the verification after the backup")


def _backup_manager(args: argparse.Namespace) -> BackupManager:
    store = open_store(args)
    overrides = {"backup_root": getattr(args, "backup_root", None),
                 "retention_days": getattr(args, "retention_days", None),
                 "max_backups": getattr(args, "max_backups", None),
                 "compression_level": getattr(args, "compression_level", None)}
    if getattr(args, "no_verify", False):
        overrides["verify_after_backup"] = False
    manager = BackupManager(store, backup_config_for(store, args.config, **overrides))
    manager.progress = output_for(args).progress
    return manager


def _print_backup(out: Output, result: BackupResult) -> None:
    out.progress_done()
    for warning in result.warnings:
        out.warn(warning)
    out.line("%s: %d files, %d records, %d files read, %d new objects, %s added%s"
             % (result.backup_id, result.files, result.records, result.files_reread,
                result.objects_added, human_bytes(result.bytes_added),
                ", verified" if result.verified else ""))


def cmd_backup_create(args: argparse.Namespace) -> int:
    """backup create/full/incremental: take a snapshot."""
    out = output_for(args)
    incremental = args.kind == "incremental" or getattr(args, "incremental", False)
    btype = BackupType.INCREMENTAL if incremental else BackupType.FULL
    result = _backup_manager(args).create(btype, agents=args.agents)
    _print_backup(out, result)
    out.document(result)
    return ExitCode.PARTIAL if result.warnings else ExitCode.OK


def cmd_backup_list(args: argparse.Namespace) -> int:
    """backup list: snapshots, foreign files, repository size."""
    out = output_for(args)
    result = _backup_manager(args).list()
    for problem in result.problems:
        out.warn(problem)
    mark = {True: "verified", False: "FAILED", None: "unverified"}
    for snap in result.snapshots:
        out.line("%-26s %-11s %s %5d files %7d records %10s  %s%s" % (
            snap.backup_id, snap.type, snap.created, snap.files, snap.records,
            human_bytes(snap.logical_bytes), mark[snap.verified],
            "  (%s)" % snap.reason if snap.reason else ""))
    for name in result.foreign:
        out.line("%-26s foreign (not aml's; left alone)" % name)
    out.line("repository %s: %d snapshots, %s" % (result.backup_root / REPO_DIR_NAME,
                                                 len(result.snapshots),
                                                 human_bytes(result.repository_bytes)))
    out.document(result)
    return ExitCode.INTEGRITY if result.problems else ExitCode.OK


def cmd_backup_verify(args: argparse.Namespace) -> int:
    """backup verify: check snapshots; exit 6 naming what is wrong."""
    out = output_for(args)
    result = _backup_manager(args).verify(args.backup_id, deep=args.deep,
                                          all_snapshots=args.all)
    for problem in result.problems:
        print("aml: error: %s" % problem, file=sys.stderr)
    out.line("%s %s: %d files, %d objects checked%s" % (
        ", ".join(result.backup_ids), "OK" if result.ok else "FAILED", result.files_checked,
        result.objects_checked, " (deep)" if result.deep else ""))
    out.document(result)
    return ExitCode.OK if result.ok else ExitCode.INTEGRITY


def cmd_backup_restore(args: argparse.Namespace) -> int:
    """backup restore: put a snapshot back (or preview it with --dry-run)."""
    out = output_for(args)
    if args.backup_id and args.backup_id_flag and args.backup_id != args.backup_id_flag:
        raise UsageError("two different backup ids given")
    at = None
    if args.at:
        at = parse_timestamp(args.at)
        if at is None:
            raise UsageError("--at %r is not an ISO 8601 timestamp" % args.at)
    result = _backup_manager(args).restore(args.backup_id or args.backup_id_flag, at=at,
                                           agents=args.agents, target=args.target,
                                           dry_run=args.dry_run, force=args.force)
    out.progress_done()
    verb = "would " if result.dry_run else ""
    for label, paths in (("create", result.created), ("replace", result.replaced),
                         ("remove", result.removed)):
        for rel in paths if result.dry_run else []:
            out.always("%s%s %s" % (verb, label, rel))
    out.line("%s into %s: %d created, %d replaced, %d removed, %d unchanged%s%s" % (
        result.backup_id, result.target, len(result.created), len(result.replaced),
        len(result.removed), result.unchanged, " (dry run)" if result.dry_run else "",
        "; safety backup %s" % result.safety_backup if result.safety_backup else ""))
    out.document(result)
    return ExitCode.OK


def cmd_backup_rotate(args: argparse.Namespace) -> int:
    """backup rotate: apply retention and free unused space."""
    out = output_for(args)
    result = _backup_manager(args).rotate(dry_run=args.dry_run, keep_daily=args.keep_daily,
                                          keep_weekly=args.keep_weekly,
                                          keep_monthly=args.keep_monthly)
    _print_rotate(out, result)
    out.document(result)
    return ExitCode.PARTIAL if result.warnings else ExitCode.OK


def _print_rotate(out: Output, result: RotateResult) -> None:
    for warning in result.warnings:
        out.warn(warning)
    verb = "would delete" if result.dry_run else "deleted"
    for backup_id in result.deleted:
        (out.always if result.dry_run else out.line)("%s %s" % (verb, backup_id))
    out.line("%s %d, kept %d snapshots; %d objects, %s freed%s" % (
        verb, len(result.deleted), len(result.kept), result.objects_freed,
        human_bytes(result.bytes_freed), " (dry run)" if result.dry_run else ""))


def cmd_backup_auto(args: argparse.Namespace) -> int:
    """backup auto: snapshot when due, verify, rotate (for cron)."""
    out = output_for(args)
    result = _backup_manager(args).auto(keep_daily=args.keep_daily,
                                        keep_weekly=args.keep_weekly,
                                        keep_monthly=args.keep_monthly)
    if result.backup:
        _print_backup(out, result.backup)
    else:
        out.line("no backup due: %s" % result.skipped)
    _print_rotate(out, result.rotate)
    out.document(result)
    warned = (result.backup and result.backup.warnings) or result.rotate.warnings
    return ExitCode.PARTIAL if warned else ExitCode.OK


@command_builder
def _build_backup(subparsers: Any) -> None:
    parser = subparser(subparsers, "backup", "snapshots of the store: create, list, verify, "
                       "restore, rotate, auto")
    sub = parser.add_subparsers(dest="backup_command", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    for name, help_text in (("create", "take a snapshot (full unless --incremental)"),
                            ("full", "take a full snapshot (re-reads every file)"),
                            ("incremental", "take an incremental snapshot")):
        p = subparser(sub, name, help_text)
        _backup_options(p)
        _create_options(p, incremental_flag=name == "create")
        p.set_defaults(func=cmd_backup_create, kind=name)
    p = subparser(sub, "list", "list snapshots (and foreign files in the backup folder)")
    _backup_options(p)
    p.set_defaults(func=cmd_backup_list)
    p = subparser(sub, "verify", "check a snapshot's manifest and objects (exit 6 if bad)")
    _backup_options(p)
    p.add_argument("backup_id", nargs="?", help="snapshot id (default: the newest)")
    p.add_argument("--all", action="store_true", help="verify every snapshot")
    p.add_argument("--deep", action="store_true", help="also rebuild and parse every file")
    p.set_defaults(func=cmd_backup_verify)
    _build_restore(sub)
    for name, help_text, func in (
            ("rotate", "delete old snapshots and free their space", cmd_backup_rotate),
            ("auto", "for cron: snapshot when due, verify, rotate", cmd_backup_auto)):
        p = subparser(sub, name, help_text)
        _backup_options(p)
        _keep_options(p)
        if name == "rotate":
            p.add_argument("--dry-run", action="store_true", help="only list what would go")
        p.set_defaults(func=func)


def _build_restore(sub: Any) -> None:
    p = subparser(sub, "restore", "restore a snapshot exactly (verifies first)")
    _backup_options(p)
    p.add_argument("backup_id", nargs="?", help="snapshot id")
    p.add_argument("--backup-id", dest="backup_id_flag", metavar="ID", help="snapshot id")
    p.add_argument("--at", metavar="TIMESTAMP", help="the newest snapshot not after this time")
    p.add_argument("--agents", nargs="+", metavar="A", help="only these agents")
    p.add_argument("--target", type=Path, metavar="DIR",
                   help="restore into DIR instead of the store (the store is left alone)")
    p.add_argument("--dry-run", action="store_true", help="list what would change")
    p.add_argument("--force", action="store_true", help="allow a non-empty --target")
    p.set_defaults(func=cmd_backup_restore)


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
