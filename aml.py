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

# Imported here rather than in section 2 so that the parallel branches merge cleanly.
import html as _html
import http.client
import urllib.error
import urllib.request


class HealthStatus(enum.Enum):
    """Outcome of a health check; ``exit_code`` follows the monitoring-plugin convention."""

    HEALTHY = "healthy"
    WARNING = "warning"
    CRITICAL = "critical"
    UNKNOWN = "unknown"

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 warning, 2 critical, 3 unknown (Nagios/Icinga plugin codes)."""
        return {"healthy": 0, "warning": 1, "critical": 2, "unknown": 3}[self.value]

    @property
    def nagios(self) -> str:
        """The plugin status word: OK, WARNING, CRITICAL or UNKNOWN."""
        return {"healthy": "OK"}.get(self.value, self.value.upper())


class AlertLevel(enum.Enum):
    """How loud an alert is. ERROR means a check could not run at all."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


# Worst first when combining check results: a known problem outranks "could not tell".
_STATUS_RANK = {HealthStatus.CRITICAL: 3, HealthStatus.WARNING: 2, HealthStatus.UNKNOWN: 1,
                HealthStatus.HEALTHY: 0}
_LEVEL_FOR_STATUS = {HealthStatus.CRITICAL: AlertLevel.CRITICAL,
                     HealthStatus.WARNING: AlertLevel.WARNING,
                     HealthStatus.UNKNOWN: AlertLevel.INFO}

DEFAULT_THRESHOLDS: Dict[str, float] = {
    # SPEC 5
    "agent_memory_warning_mb": 60, "agent_memory_critical_mb": 80,
    "global_memory_warning_mb": 600, "global_memory_critical_mb": 800,
    "cache_hit_rate_warning": 0.5, "query_time_warning_ms": 100, "alert_retention_days": 7,
    # aml's own: backup and maintenance recency, and how many lookups a hit rate needs.
    "backup_max_age_hours": 36, "backup_critical_age_hours": 168,
    "maintenance_max_age_days": 8, "cache_min_lookups": 20,
}
MONITOR_SETTINGS = ("webhook_url", "webhook_timeout")
METRICS_HISTORY_MAX = 1000
GROWTH_WINDOW_DAYS = 30.0
MAINTENANCE_OPERATIONS = ("prune", "gc", "compress", "index", "warm-cache", "rotate", "migrate")
TIMED_OPERATIONS = ("prune", "backup", "index", "migrate")
STATE_LOCK_WAIT = 5.0  # under the 10 s after which Nagios kills a plugin by default
# A file modified this recently is re-parsed next time even if size and mtime match, because
# a second write within the same mtime tick would otherwise hide from the cache.
INTEGRITY_RACY_SECONDS = 2.0
_MB = 1024 * 1024


def _positive_number(key: str, value: Any, source: str) -> float:
    number = _number(value)
    if number is None or number < 0:
        raise UsageError("%s: threshold %s must be a non-negative number, got %r"
                         % (source, key, value))
    return number


def _store_config_thresholds(store: Store) -> Dict[str, float]:
    """Thresholds implied by the runtime's config.json (storage.maxSizeGb, queryTimeoutMs)."""
    try:
        config = store.runtime_config()
    except CorruptFileError:
        return {}  # the structure/integrity checks report it; defaults apply meanwhile
    found: Dict[str, float] = {}
    max_gb = _number(dig(config, "storage", "maxSizeGb"))
    if max_gb is not None and max_gb > 0:
        found["global_memory_critical_mb"] = max_gb * 1024
        found["global_memory_warning_mb"] = max_gb * 1024 * 0.75
    query_ms = _number(dig(config, "performance", "queryTimeoutMs"))
    if query_ms is not None and query_ms > 0:
        found["query_time_warning_ms"] = query_ms
    return found


def _check_threshold_keys(values: Dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise UsageError("%s: unknown threshold(s) %s (known: %s)"
                         % (source, ", ".join(unknown), ", ".join(sorted(DEFAULT_THRESHOLDS))))


def resolve_thresholds(store: Store, config_section: Optional[Dict[str, Any]] = None,
                       flags: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Thresholds: defaults < store config.json < aml config ``monitor`` < flags.

    Raises UsageError for an unknown key, a negative value or a warning above its critical.
    """
    result = dict(DEFAULT_THRESHOLDS)
    result.update(_store_config_thresholds(store))
    layers = (({k: v for k, v in (config_section or {}).items() if k not in MONITOR_SETTINGS},
               "aml config [monitor]"), (flags or {}, "threshold override"))
    for values, source in layers:
        _check_threshold_keys(values, source)
        result.update({k: _positive_number(k, v, source) for k, v in values.items()})
    for scope in ("agent", "global"):
        warn, crit = result[scope + "_memory_warning_mb"], result[scope + "_memory_critical_mb"]
        if warn > crit:
            raise UsageError("%s_memory_warning_mb (%g) is above %s_memory_critical_mb (%g)"
                             % (scope, warn, scope, crit))
    return result


def parse_threshold_flags(items: Optional[Sequence[str]]) -> Dict[str, float]:
    """``["key=value", ...]`` from ``--threshold`` into a dict; raises UsageError."""
    parsed: Dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        try:
            parsed[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError("--threshold %r: expected KEY=NUMBER" % item)
    return parsed


# -- result dataclasses -------------------------------------------------------

@dataclasses.dataclass
class AgentMetrics:
    """Size and record counts of one agent; ``unreadable`` files are not counted."""

    agent: str
    bytes: int
    files: int
    gzip_files: int
    plain_files: int
    records: Dict[str, Dict[str, int]]
    unreadable: List[str]

    @property
    def record_total(self) -> int:
        """Records of every type and state."""
        return sum(sum(states.values()) for states in self.records.values())


@dataclasses.dataclass
class OperationStat:
    """The last recorded run of an aml operation (all None when it never ran)."""

    operation: str
    started: Optional[str] = None
    seconds: Optional[float] = None
    age_days: Optional[float] = None


@dataclasses.dataclass
class PerformanceMetrics:
    """Timings measured in this run and figures recorded by earlier runs; None = unknown."""

    lookup_ms: Optional[float]
    lookup_note: str
    full_load_ms: Optional[float]
    full_load_files: int
    full_load_records: int
    cache_hits: Optional[int]
    cache_misses: Optional[int]
    cache_hit_rate: Optional[float]
    last_operations: Dict[str, OperationStat]


@dataclasses.dataclass
class GrowthMetrics:
    """Growth against the samples earlier runs kept in ``.aml/metrics-history.json``."""

    samples: int
    previous_at: Optional[str] = None
    bytes_since_previous: Optional[int] = None
    records_since_previous: Optional[int] = None
    baseline_at: Optional[str] = None
    bytes_per_day: Optional[float] = None


@dataclasses.dataclass
class LimitForecast:
    """Days until a size limit is reached at the current growth (None when not computable)."""

    limit: str
    subject: str
    limit_bytes: int
    current_bytes: int
    bytes_per_day: Optional[float]
    days_until: Optional[float]
    note: str


@dataclasses.dataclass
class MetricsReport:
    """Everything ``monitor metrics`` measured in one run."""

    store: str
    taken_at: _dt.datetime
    total_bytes: int
    state_bytes: int
    index_bytes: Optional[int]
    agents: List[AgentMetrics]
    largest_agent: Optional[str]
    gzip_files: int
    plain_files: int
    records: Dict[str, Dict[str, int]]
    unreadable: List[str]
    growth: GrowthMetrics
    forecasts: List[LimitForecast]
    performance: PerformanceMetrics

    @property
    def exit_code(self) -> ExitCode:
        """PARTIAL when some file could not be read, else OK."""
        return ExitCode.PARTIAL if self.unreadable else ExitCode.OK


@dataclasses.dataclass
class Problem:
    """One condition a check found; (check name, subject) is the alert identity."""

    subject: str
    status: HealthStatus
    message: str
    level: Optional[AlertLevel] = None

    @property
    def alert_level(self) -> AlertLevel:
        """The explicit level, else the one that matches the status."""
        return self.level or _LEVEL_FOR_STATUS.get(self.status, AlertLevel.INFO)


@dataclasses.dataclass
class HealthCheck:
    """Result of one health check. ``ran`` is False when the check itself failed."""

    name: str
    status: HealthStatus
    message: str
    problems: List[Problem] = dataclasses.field(default_factory=list)
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    ran: bool = True


@dataclasses.dataclass
class Alert:
    """One alert: a condition with a stable id, counted while it persists."""

    id: str
    check: str
    subject: str
    level: AlertLevel
    message: str
    state: str
    first_seen: str
    last_seen: str
    count: int = 1
    occurrences: int = 1
    resolved_at: Optional[str] = None
    resolved_by: Optional[str] = None


@dataclasses.dataclass
class AlertChanges:
    """What one alert evaluation changed, and webhook delivery problems (never fatal)."""

    fired: List[Alert] = dataclasses.field(default_factory=list)
    resolved: List[Alert] = dataclasses.field(default_factory=list)
    purged: int = 0
    open: List[Alert] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HealthReport:
    """Every check of one ``monitor health`` run and the overall status."""

    store: str
    checked_at: _dt.datetime
    status: HealthStatus
    checks: List[HealthCheck]
    perfdata: Dict[str, Any]
    alerts: Optional[AlertChanges] = None
    warnings: List[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The plugin exit code of the overall status."""
        return self.status.exit_code


def worst_status(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """The most severe status (critical > warning > unknown > healthy); healthy when empty."""
    return max(statuses, key=_STATUS_RANK.__getitem__, default=HealthStatus.HEALTHY)


# -- reading what other commands recorded ----------------------------------------

def _history(store: Store) -> List[Dict[str, Any]]:
    """The run history without side effects; raises IntegrityError when it does not verify."""
    history = store.read_state("history.json", [])
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def _last_entry(history: List[Dict[str, Any]], operations: Iterable[str]
                ) -> Optional[Dict[str, Any]]:
    wanted = set(operations)
    for entry in reversed(history):
        if entry.get("operation") in wanted:
            return entry
    return None


def _operation_stat(store: Store, history: List[Dict[str, Any]], operation: str
                    ) -> OperationStat:
    entry = _last_entry(history, [operation])
    if entry is None:
        return OperationStat(operation)
    started = parse_timestamp(entry.get("started"))
    return OperationStat(operation, entry.get("started"), _number(entry.get("seconds")),
                         round(days_between(started, store.now), 3) if started else None)


def _last_verified_backup(store: Store, history: List[Dict[str, Any]]
                          ) -> Optional[Dict[str, Any]]:
    """The newest verified backup whose manifest still exists and no later verify failed."""
    failed = set()
    for entry in reversed(history):
        summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
        backup_id = summary.get("backup_id")
        if entry.get("operation") == "verify" and summary.get("ok") is False:
            failed.add(backup_id)
        if (entry.get("operation") == "backup" and summary.get("verified") is True
                and backup_id not in failed and isinstance(summary.get("manifest"), str)
                and os.path.isfile(summary["manifest"])):
            return entry
    return None


def _cache_stats(store: Store) -> Dict[str, Any]:
    """The hot-cache counters that real lookups record ({} when absent or unreadable)."""
    func = globals().get("hot_cache_stats")
    try:
        stats = func(store) if func else store.read_state("cache-stats.json", {})
    except IntegrityError:
        return {}
    return stats if isinstance(stats, dict) else {}


@dataclasses.dataclass
class IndexState:
    """What monitoring knows about the persisted index."""

    built: bool
    stale: List[str]
    size_bytes: Optional[int]
    source: str


def _dir_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(str(folder)):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _index_staleness(store: Store, history: List[Dict[str, Any]]) -> IndexState:
    """Index freshness from MemoryIndex when this build has it, else from the index history."""
    index_class = globals().get("MemoryIndex")
    if index_class is not None:
        index = index_class(store)
        size = index.size_bytes()
        return IndexState(size > 0, list(index.stale_files()), size, "MemoryIndex")
    entry = _last_entry(history, ["index"])
    size = _dir_bytes(store.state_dir / "index") if (store.state_dir / "index").is_dir() else 0
    if entry is None:
        return IndexState(False, [], size, "history")
    started = parse_timestamp(entry.get("started"))
    built_ns = int(started.timestamp() * 1e9) if started else 0
    stale = [rel for rel, info in _data_file_stats(store).items() if info[1] > built_ns]
    return IndexState(True, stale, size, "history")


def _data_file_stats(store: Store) -> Dict[str, Tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every agent JSON file."""
    stats = {}
    for agent in store.agents():
        for data_file in store.agent_files(agent):
            with contextlib.suppress(OSError):
                info = data_file.path.stat()
                stats[_rel(store, data_file.path)] = (info.st_size, info.st_mtime_ns)
    return stats


def _rel(store: Store, path: Path) -> str:
    return Path(path).relative_to(store.root).as_posix()


def _indexed_lookup_ms(store: Store, index: IndexState) -> Tuple[Optional[float], str]:
    """Time one real lookup through the persisted index; (None, reason) when impossible."""
    index_class = globals().get("MemoryIndex")
    if index_class is None:
        return None, "this build of aml has no index support"
    if not index.built:
        return None, "no index built (run: optimize index)"
    lookup = getattr(index_class(store), "lookup_timing", None)
    if lookup is None:
        return None, "the index offers no timed lookup"
    return lookup(), "one indexed lookup"


# -- metrics --------------------------------------------------------------------

def _empty_counts() -> Dict[str, Dict[str, int]]:
    return {t.value: {"active": 0, "inactive": 0, "invalid": 0} for t in RecordType}


def _count_records(counts: Dict[str, Dict[str, int]], rtype: Optional[RecordType],
                   records: List[Any]) -> None:
    bucket = counts[rtype.value]
    for record in records:
        if not isinstance(record, dict):
            bucket["invalid"] += 1
        elif _is_active(record):  # the same rule as record_facts(...).active, without the rest
            bucket["active"] += 1
        else:
            bucket["inactive"] += 1


def _is_gzip_file(path: Path) -> bool:
    try:
        with open(str(path), "rb") as handle:
            return handle.read(2) == GZIP_MAGIC
    except OSError:
        return False


def _agent_metrics(store: Store, agent: str) -> Tuple[AgentMetrics, int, float]:
    """One agent's sizes and counts (parsing every record file); files loaded, load seconds."""
    files = store.agent_files(agent)
    gz = sum(1 for f in files if _is_gzip_file(f.path))
    metrics = AgentMetrics(agent, _dir_bytes(store.root / agent), len(files), gz,
                           len(files) - gz, _empty_counts(), [])
    loaded, seconds = 0, 0.0
    for data_file in store.record_files(agent):
        started = time.perf_counter()
        try:
            records, _fmt = store.load_records(data_file)
        except CorruptFileError as exc:
            metrics.unreadable.append("%s: %s" % (_rel(store, data_file.path), exc.problem))
            continue
        seconds += time.perf_counter() - started  # reading and parsing only, not counting
        _count_records(metrics.records, data_file.rtype, records)
        loaded += 1
    return metrics, loaded, seconds


def _store_bytes(store: Store) -> Tuple[int, int]:
    """(bytes of everything but ``.aml/``, bytes of ``.aml/``)."""
    total = 0
    for entry in os.scandir(str(store.root)):
        if entry.name == STATE_DIR_NAME:
            continue
        if entry.is_dir(follow_symlinks=False):
            total += _dir_bytes(Path(entry.path))
        else:
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
    return total, _dir_bytes(store.state_dir)


def _sum_counts(agents: List[AgentMetrics]) -> Dict[str, Dict[str, int]]:
    total = _empty_counts()
    for agent in agents:
        for rtype, states in agent.records.items():
            for state, count in states.items():
                total[rtype][state] += count
    return total


def _growth(store: Store, samples: List[Dict[str, Any]], total: int, records: int
            ) -> GrowthMetrics:
    """Growth since the previous sample and the daily rate over the last 30 days."""
    earlier = [s for s in samples if (parse_timestamp(s.get("at")) or store.now) < store.now]
    growth = GrowthMetrics(samples=len(earlier))
    if not earlier:
        return growth
    previous = earlier[-1]
    growth.previous_at = previous.get("at")
    growth.bytes_since_previous = total - int(previous.get("total_bytes", 0))
    growth.records_since_previous = records - int(previous.get("records", 0))
    window_start = store.now - _dt.timedelta(days=GROWTH_WINDOW_DAYS)
    in_window = [s for s in earlier if parse_timestamp(s.get("at")) >= window_start]
    baseline = in_window[0] if in_window else previous
    span = days_between(parse_timestamp(baseline.get("at")), store.now)
    if span >= 1.0 / 24:  # under an hour apart the rate is noise
        growth.baseline_at = baseline.get("at")
        growth.bytes_per_day = (total - int(baseline.get("total_bytes", 0))) / span
    return growth


def _agent_rate(store: Store, samples: List[Dict[str, Any]], agent: str, current: int,
                baseline_at: Optional[str]) -> Optional[float]:
    for sample in samples:
        if sample.get("at") == baseline_at and agent in sample.get("agents", {}):
            span = days_between(parse_timestamp(baseline_at), store.now)
            return (current - int(sample["agents"][agent].get("bytes", 0))) / span
    return None


def _forecast(limit: str, subject: str, limit_mb: float, current: int,
              rate: Optional[float]) -> LimitForecast:
    limit_bytes = int(limit_mb * _MB)
    if current >= limit_bytes:
        return LimitForecast(limit, subject, limit_bytes, current, rate, 0.0, "already reached")
    if rate is None:
        return LimitForecast(limit, subject, limit_bytes, current, None, None,
                             "no growth data: no sample an hour or more before this run")
    if rate <= 0:
        return LimitForecast(limit, subject, limit_bytes, current, rate, None, "not growing")
    return LimitForecast(limit, subject, limit_bytes, current, rate,
                         round((limit_bytes - current) / rate, 1), "at the current growth")


def _new_sample(report: MetricsReport) -> Dict[str, Any]:
    return {"at": format_timestamp(report.taken_at), "total_bytes": report.total_bytes,
            "records": sum(a.record_total for a in report.agents),
            "agents": {a.agent: {"bytes": a.bytes, "records": a.record_total}
                       for a in report.agents}}


# -- integrity ------------------------------------------------------------------

def _integrity_targets(store: Store) -> List[Tuple[Path, Optional[type], bool]]:
    """(path, expected JSON kind, elements must be objects) of every file the runtime reads."""
    targets: List[Tuple[Path, Optional[type], bool]] = []
    if store.config_path().is_file():
        targets.append((store.config_path(), dict, False))
    for agent in store.agents():
        for data_file in store.agent_files(agent):
            if data_file.rtype is not None:
                targets.append((data_file.path, list, True))
            else:
                is_object = data_file.path.name in OBJECT_FILES
                targets.append((data_file.path, dict if is_object else None, False))
    global_dir = store.root / "global"
    if global_dir.is_dir():
        targets.extend((p, None, False) for p in sorted(global_dir.glob("*.json"))
                       if p.is_file() and not is_temp_leftover(p.name))
    return targets


def _parse_problem(path: Path, expect: Optional[type], objects: bool) -> Optional[str]:
    """None when the file parses as the runtime needs it, else the problem."""
    try:
        data, _fmt = load_json_file(path, expect=expect)
    except CorruptFileError as exc:
        return exc.problem
    if objects:
        for position, element in enumerate(data):
            if not isinstance(element, dict):
                return "element %d is not a JSON object (the runtime rejects the agent)" % position
    return None


def _check_one_file(path: Path, expect: Optional[type], objects: bool) -> Optional[str]:
    """Parse a file; a failure is retried once if the file changed meanwhile (live writer)."""
    before = path.stat()
    problem = _parse_problem(path, expect, objects)
    if problem is not None:
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            problem = _parse_problem(path, expect, objects)
    return problem


# -- alert identity and webhook ---------------------------------------------------

def alert_id(check: str, subject: str) -> str:
    """The stable id of the condition (check, subject), e.g. ``integrity-3f2a9c1b``."""
    digest = sha256_hex(("%s\0%s" % (check, subject)).encode("utf-8"))[:8]
    return "%s-%s" % (check, digest)


def _alert_from_dict(doc: Dict[str, Any]) -> Optional[Alert]:
    try:
        fields = {f.name: doc[f.name] for f in dataclasses.fields(Alert) if f.name in doc}
        fields["level"] = AlertLevel(fields["level"])
        return Alert(**fields)
    except (KeyError, TypeError, ValueError):
        return None  # an entry we cannot read is dropped rather than trusted


def send_webhook(url: str, event: str, alert: Alert, store: Store, timeout: float) -> None:
    """POST one alert event as JSON; raises OSError (including URLError) when delivery fails."""
    body = json.dumps({"source": "aml", "version": __version__, "event": event,
                       "store": str(store.root.resolve()), "alert": to_jsonable(alert)},
                      sort_keys=True).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "aml/%s" % __version__})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read(65536)


def _check_webhook_url(url: Optional[str]) -> Optional[str]:
    if url and not re.match(r"^https?://", url, re.IGNORECASE):
        raise UsageError("webhook URL %r must start with http:// or https://" % url)
    return url or None


# -- the monitor ------------------------------------------------------------------

class MemoryMonitor:
    """Metrics, health checks, alerts and reports for one store.

    ``thresholds`` override the defaults and the store's config.json (see resolve_thresholds).
    Writes only inside ``.aml/`` (metrics history, integrity cache, alerts, run history),
    never into agent data. Raises UsageError for bad thresholds.
    """

    def __init__(self, store: Store, thresholds: Optional[Dict[str, float]] = None,
                 webhook_url: Optional[str] = None, webhook_timeout: float = 5.0):
        self.store = store
        self.thresholds = resolve_thresholds(store, flags=thresholds)
        self.webhook_url = _check_webhook_url(webhook_url)
        self.webhook_timeout = webhook_timeout
        self._integrity_fresh: Optional[Dict[str, Any]] = None

    # -- metrics ------------------------------------------------------------------
    def metrics(self, save: bool = True) -> MetricsReport:
        """Measure the store now; with ``save`` append one sample to the metrics history."""
        store = self.store
        history = self._history_or_empty()
        agents, loaded, load_ms = [], 0, 0.0
        for name in store.agents():
            agent, count, seconds = _agent_metrics(store, name)
            agents.append(agent)
            loaded, load_ms = loaded + count, load_ms + seconds * 1000.0
        report = self._assemble_metrics(agents, history, load_ms, loaded)
        if save:
            self._save_sample(report)
        return report

    def _history_or_empty(self) -> List[Dict[str, Any]]:
        try:
            return _history(self.store)
        except IntegrityError:
            return []

    def _assemble_metrics(self, agents: List[AgentMetrics], history: List[Dict[str, Any]],
                          load_ms: float, loaded: int) -> MetricsReport:
        store = self.store
        total, state = _store_bytes(store)
        index = _index_staleness(store, history)
        samples = self._samples()
        counts = _sum_counts(agents)
        record_total = sum(a.record_total for a in agents)
        growth = _growth(store, samples, total, record_total)
        unreadable = [u for a in agents for u in a.unreadable]
        largest = max(agents, key=lambda a: a.bytes).agent if agents else None
        report = MetricsReport(
            str(store.root), store.now, total, state, index.size_bytes, agents, largest,
            sum(a.gzip_files for a in agents), sum(a.plain_files for a in agents), counts,
            unreadable, growth, [], self._performance(history, index, load_ms, loaded,
                                                      record_total))
        report.forecasts = self._forecasts(report, samples)
        return report

    def _performance(self, history: List[Dict[str, Any]], index: IndexState, load_ms: float,
                     loaded: int, records: int) -> PerformanceMetrics:
        lookup_ms, note = _indexed_lookup_ms(self.store, index)
        stats = _cache_stats(self.store)
        hits, misses = _number(stats.get("hits")), _number(stats.get("misses"))
        rate = None
        if hits is not None and misses is not None and hits + misses > 0:
            rate = round(hits / (hits + misses), 4)
        return PerformanceMetrics(
            lookup_ms, note, round(load_ms, 3) if loaded else None, loaded, records,
            int(hits) if hits is not None else None, int(misses) if misses is not None else None,
            rate, {op: _operation_stat(self.store, history, op) for op in TIMED_OPERATIONS})

    def _forecasts(self, report: MetricsReport, samples: List[Dict[str, Any]]
                   ) -> List[LimitForecast]:
        t, rate = self.thresholds, report.growth.bytes_per_day
        out = [_forecast("global_memory_warning_mb", "store", t["global_memory_warning_mb"],
                         report.total_bytes, rate),
               _forecast("global_memory_critical_mb", "store", t["global_memory_critical_mb"],
                         report.total_bytes, rate)]
        for agent in report.agents:
            agent_rate = _agent_rate(self.store, samples, agent.agent, agent.bytes,
                                     report.growth.baseline_at)
            out.append(_forecast("agent_memory_critical_mb", agent.agent,
                                 t["agent_memory_critical_mb"], agent.bytes, agent_rate))
        return out

    def _samples(self) -> List[Dict[str, Any]]:
        try:
            doc = self.store.read_state("metrics-history.json", {})
        except IntegrityError:
            return []
        samples = doc.get("samples", []) if isinstance(doc, dict) else []
        return [s for s in samples if isinstance(s, dict) and parse_timestamp(s.get("at"))]

    def _save_sample(self, report: MetricsReport) -> List[str]:
        """Append this run's sample (one per run, capped); returns warnings."""
        def update() -> None:
            sample = _new_sample(report)
            samples = [s for s in self._samples() if s.get("at") != sample["at"]]
            samples.append(sample)
            samples.sort(key=lambda s: parse_timestamp(s["at"]))
            self.store.write_state("metrics-history.json",
                                   {"samples": samples[-METRICS_HISTORY_MAX:]})
        return self._under_state_lock(update)

    def _under_state_lock(self, action: Callable[[], None]) -> List[str]:
        """Run a state update under the maintenance lock; if another run holds it, skip."""
        lock = MaintenanceLock(self.store.ensure_state_dir(),
                               timeout=min(self.store.lock_timeout, STATE_LOCK_WAIT))
        try:
            with lock:
                action()
        except StoreBusyError:
            return ["another aml run holds the store; monitoring state was not updated"]
        return []

    # -- health -------------------------------------------------------------------
    def health(self, evaluate_alerts: bool = True, record: bool = True) -> HealthReport:
        """Run every check; then, under one short lock, save the integrity cache, update
        alerts and record the run (skipped with a warning while another aml run holds the
        store). Webhooks are sent after the lock is released."""
        started_at, started = self.store.now, time.perf_counter()
        self._integrity_fresh = None
        history, history_problem = self._read_history()
        checks = [self._run_check(name, history) for name in self.CHECKS]
        if history_problem:
            checks[0].problems.append(history_problem)
            checks[0].status = worst_status([checks[0].status, history_problem.status])
        report = HealthReport(str(self.store.root), self.store.now,
                              worst_status(c.status for c in checks), checks,
                              self._perfdata(checks))
        changes = AlertChanges() if evaluate_alerts else None
        summary = {"status": report.status.value,
                   "checks": {c.name: c.status.value for c in checks}}

        def update() -> None:
            if self._integrity_fresh is not None:
                self.store.write_state("integrity.json", {"files": self._integrity_fresh})
            if changes is not None:
                self._update_alerts(checks, changes)
            if record:
                self.store.record_operation("health", started_at, time.perf_counter() - started,
                                            summary)

        busy = self._under_state_lock(update)
        report.warnings.extend(busy)
        if changes is not None:
            self._finish_alerts(changes, busy)
            report.alerts = changes
            report.warnings.extend(changes.warnings)
        return report

    CHECKS = ("structure", "size", "index", "backup", "integrity", "performance", "maintenance")

    def _read_history(self) -> Tuple[List[Dict[str, Any]], Optional[Problem]]:
        try:
            return _history(self.store), None
        except IntegrityError as exc:
            return [], Problem("history", HealthStatus.WARNING,
                               "aml's run history does not verify (%s); the next aml run sets "
                               "it aside" % exc)

    def _run_check(self, name: str, history: List[Dict[str, Any]]) -> HealthCheck:
        """Run one check; a check that fails to run is UNKNOWN with an ERROR-level problem."""
        try:
            return getattr(self, "_check_" + name)(history)
        except (AmlError, OSError) as exc:
            problem = Problem("check", HealthStatus.UNKNOWN, "check failed: %s" % exc,
                              AlertLevel.ERROR)
            return HealthCheck(name, HealthStatus.UNKNOWN, problem.message, [problem], ran=False)

    @staticmethod
    def _finish(name: str, problems: List[Problem], ok_message: str,
                details: Optional[Dict[str, Any]] = None) -> HealthCheck:
        status = worst_status(p.status for p in problems)
        message = "; ".join(p.message for p in problems[:3]) if problems else ok_message
        if len(problems) > 3:
            message += "; and %d more" % (len(problems) - 3)
        return HealthCheck(name, status, message, problems, details or {})

    def _check_structure(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """config.json present, agents found, no leftovers, stale locks or *.json.gz files."""
        store, problems = self.store, []
        agents = store.agents()
        if not store.config_path().is_file():
            problems.append(Problem("config.json", HealthStatus.WARNING,
                                    "no config.json (not written by the runtime?)"))
        if not agents:
            problems.append(Problem("agents", HealthStatus.WARNING, "no agent folders found"))
        problems.extend(self._stray_entries())
        return self._finish("structure", problems, "%d agents, config.json present"
                            % len(agents), {"agents": agents})

    def _stray_entries(self) -> List[Problem]:
        """Stale lock folders, aml temp leftovers and ``*.json.gz`` files the runtime ignores."""
        problems: List[Problem] = []
        root = str(self.store.root)
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath == root and STATE_DIR_NAME in dirnames:
                dirnames.remove(STATE_DIR_NAME)
            for name in [d for d in dirnames if d.endswith(".lock")]:
                dirnames.remove(name)  # never look inside a lock
                problems.extend(self._stale_lock(Path(dirpath) / name))
            for name in filenames:
                rel = _rel(self.store, Path(dirpath) / name)
                if is_temp_leftover(name):
                    problems.append(Problem(rel, HealthStatus.WARNING, "leftover temp file %s "
                                            "(the next aml maintenance run removes it)" % rel))
                elif name.endswith(".json.gz"):
                    problems.append(Problem(rel, HealthStatus.WARNING, "%s: the runtime never "
                                            "reads *.json.gz files" % rel))
        return problems

    def _stale_lock(self, path: Path) -> List[Problem]:
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            return []  # released meanwhile
        if age <= LOCK_STALE_SECONDS:
            return []
        rel = _rel(self.store, path)
        return [Problem(rel, HealthStatus.WARNING, "stale runtime lock %s (%.0f s old; a "
                        "crashed writer?)" % (rel, age))]

    def _check_size(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Per-agent and whole-store bytes against the warning and critical thresholds."""
        t, problems = self.thresholds, []
        total, _state = _store_bytes(self.store)
        sizes = {a: _dir_bytes(self.store.root / a) for a in self.store.agents()}
        for subject, size, scope in ([("store", total, "global")]
                                     + [(a, s, "agent") for a, s in sorted(sizes.items())]):
            problem = self._size_problem(subject, size, scope)
            if problem:
                problems.append(problem)
        largest = max(sizes.values(), default=0)
        return self._finish("size", problems, "store %s (limit %s), largest agent %s (limit %s)"
                            % (human_bytes(total),
                               human_bytes(t["global_memory_warning_mb"] * _MB),
                               human_bytes(largest),
                               human_bytes(t["agent_memory_warning_mb"] * _MB)),
                            {"total_bytes": total, "agent_bytes": sizes})

    def _size_problem(self, subject: str, size: int, scope: str) -> Optional[Problem]:
        for status in (HealthStatus.CRITICAL, HealthStatus.WARNING):
            limit = self.thresholds["%s_memory_%s_mb" % (scope, status.value)] * _MB
            if size >= limit:
                return Problem(subject, status, "%s is %s, at or above the %s limit %s"
                               % (subject, human_bytes(size), status.value, human_bytes(limit)))
        return None

    def _check_index(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """The persisted index exists and covers every data file as it is now."""
        index = _index_staleness(self.store, history)
        details = {"built": index.built, "stale_files": index.stale,
                   "size_bytes": index.size_bytes, "source": index.source}
        if not index.built:
            problem = Problem("index", HealthStatus.WARNING,
                              "no index built (run: optimize index)")
            return self._finish("index", [problem], "", details)
        problems = []
        if index.stale:
            problems.append(Problem("index", HealthStatus.WARNING, "index is stale for %d file(s)"
                                    " (%s) (run: optimize index)" % (len(index.stale), ", ".join(
                                        index.stale[:3]) + (", ..." if len(index.stale) > 3
                                                            else ""))))
        return self._finish("index", problems, "index covers every data file", details)

    def _check_backup(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """A verified backup whose manifest exists, recent enough."""
        t = self.thresholds
        entry = _last_verified_backup(self.store, history)
        if entry is None:
            problem = Problem("backup", HealthStatus.WARNING,
                              "no verified backup yet (run: backup create)")
            return self._finish("backup", [problem], "")
        started = parse_timestamp(entry.get("started")) or self.store.now
        hours = days_between(started, self.store.now) * 24
        details = {"backup_id": entry["summary"].get("backup_id"), "age_hours": round(hours, 2)}
        problems = []
        for status, key in ((HealthStatus.CRITICAL, "backup_critical_age_hours"),
                            (HealthStatus.WARNING, "backup_max_age_hours")):
            if hours > t[key]:
                problems.append(Problem("backup", status, "last verified backup is %.0f h old "
                                        "(limit %g h)" % (hours, t[key])))
                break
        return self._finish("backup", problems, "verified backup %s, %.1f h old"
                            % (details["backup_id"], hours), details)

    def _check_integrity(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Parse every data file (cached by size and mtime); any failure is critical."""
        cache = self._integrity_cache()
        targets = _integrity_targets(self.store)
        fresh, problems, parsed = {}, [], 0
        for path, expect, objects in targets:
            rel = _rel(self.store, path)
            try:
                info = path.stat()
            except FileNotFoundError:
                continue  # removed since listing (a live writer); nothing left to check
            key = [info.st_size, info.st_mtime_ns]
            cached = cache.get(rel)
            if cached and cached.get("key") == key and cached.get("ok") is True:
                fresh[rel] = cached
                continue
            problem = _check_one_file(path, expect, objects)
            parsed += 1
            if problem is not None:
                problems.append(Problem(rel, HealthStatus.CRITICAL, "%s: %s" % (rel, problem)))
            elif time.time() - info.st_mtime >= INTEGRITY_RACY_SECONDS:
                fresh[rel] = {"key": key, "ok": True}
        self._integrity_fresh = fresh  # saved by health() under the state lock
        return self._finish("integrity", problems,
                            "%d files parse (%d parsed now, %d unchanged since the last check)"
                            % (len(targets), parsed, len(targets) - parsed),
                            {"files": len(targets), "parsed": parsed})

    def _integrity_cache(self) -> Dict[str, Any]:
        try:
            doc = self.store.read_state("integrity.json", {})
        except IntegrityError:
            return {}  # an unverifiable cache only costs a full re-parse
        files = doc.get("files") if isinstance(doc, dict) else None
        return files if isinstance(files, dict) else {}

    def _check_performance(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Indexed lookup time measured now and the recorded hot-cache hit rate."""
        t, problems, known = self.thresholds, [], []
        lookup_ms, note = _indexed_lookup_ms(self.store, _index_staleness(self.store, history))
        if lookup_ms is not None:
            known.append("lookup %.2f ms" % lookup_ms)
            if lookup_ms > t["query_time_warning_ms"]:
                problems.append(Problem("lookup", HealthStatus.WARNING, "indexed lookup took "
                                        "%.1f ms (limit %g ms)" % (lookup_ms,
                                                                   t["query_time_warning_ms"])))
        stats = _cache_stats(self.store)
        hits, misses = _number(stats.get("hits")) or 0, _number(stats.get("misses")) or 0
        rate = hits / (hits + misses) if hits + misses >= t["cache_min_lookups"] else None
        if rate is not None:
            known.append("hit rate %.0f%%" % (rate * 100))
            if rate < t["cache_hit_rate_warning"]:
                problems.append(Problem("cache", HealthStatus.WARNING, "hot-cache hit rate %.0f%% "
                                        "is below %.0f%%" % (rate * 100,
                                                             t["cache_hit_rate_warning"] * 100)))
        details = {"lookup_ms": lookup_ms, "lookup_note": note, "cache_hit_rate": rate,
                   "cache_lookups": int(hits + misses)}
        if not known:
            return HealthCheck("performance", HealthStatus.UNKNOWN, "nothing to measure: %s; "
                               "fewer than %d cached lookups recorded"
                               % (note, t["cache_min_lookups"]), [], details)
        return self._finish("performance", problems, ", ".join(known), details)

    def _check_maintenance(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """aml's scheduled maintenance (prune, gc, index, ...) ran within the limit."""
        limit = self.thresholds["maintenance_max_age_days"]
        entry = _last_entry(history, MAINTENANCE_OPERATIONS)
        if entry is None:
            return self._finish("maintenance", [Problem(
                "maintenance", HealthStatus.WARNING, "aml maintenance has never run on this "
                "store (see crontab.example)")], "")
        started = parse_timestamp(entry.get("started")) or self.store.now
        age = days_between(started, self.store.now)
        problems = []
        if age > limit:
            problems.append(Problem("maintenance", HealthStatus.WARNING, "last maintenance (%s) "
                                    "ran %.1f days ago (limit %g)"
                                    % (entry.get("operation"), age, limit)))
        return self._finish("maintenance", problems, "last maintenance: %s %.1f days ago"
                            % (entry.get("operation"), age),
                            {"operation": entry.get("operation"), "age_days": round(age, 3)})

    def _perfdata(self, checks: List[HealthCheck]) -> Dict[str, Any]:
        """Numbers for the plugin's performance data: {label: [value, uom, warn, crit]}."""
        t = self.thresholds
        by_name = {c.name: c.details for c in checks}
        size = by_name.get("size", {})
        perf: Dict[str, Any] = {
            "store_bytes": [size.get("total_bytes"), "B", int(t["global_memory_warning_mb"] * _MB),
                            int(t["global_memory_critical_mb"] * _MB)],
            "agents": [len(by_name.get("structure", {}).get("agents", [])), "", None, None],
        }
        for agent, agent_bytes in sorted(size.get("agent_bytes", {}).items()):
            perf["agent_%s_bytes" % agent] = [agent_bytes, "B",
                                              int(t["agent_memory_warning_mb"] * _MB),
                                              int(t["agent_memory_critical_mb"] * _MB)]
        integrity = next((c for c in checks if c.name == "integrity"), None)
        perf["unreadable_files"] = [len(integrity.problems) if integrity and integrity.ran
                                    else None, "", None, 0]
        index = by_name.get("index", {})
        perf["stale_index_files"] = [len(index["stale_files"]) if index.get("built") else None,
                                     "", None, None]
        perf["backup_age_hours"] = [by_name.get("backup", {}).get("age_hours"), "",
                                    t["backup_max_age_hours"], t["backup_critical_age_hours"]]
        perf["lookup_ms"] = [by_name.get("performance", {}).get("lookup_ms"), "ms",
                             t["query_time_warning_ms"], None]
        rate = by_name.get("performance", {}).get("cache_hit_rate")
        perf["cache_hit_rate"] = [round(rate * 100, 1) if rate is not None else None, "%",
                                  None, None]
        return perf

    # -- alerts -------------------------------------------------------------------
    def load_alerts(self) -> Dict[str, Alert]:
        """Every stored alert by id ({} when none); raises IntegrityError if the file is corrupt."""
        doc = self.store.read_state("alerts.json", {})
        entries = doc.get("alerts", {}) if isinstance(doc, dict) else {}
        alerts = {}
        for key, value in entries.items():
            alert = _alert_from_dict(value) if isinstance(value, dict) else None
            if alert is not None:
                alerts[key] = alert
        return alerts

    def alerts(self, include_resolved: bool = False) -> List[Alert]:
        """Open alerts (and resolved ones still within retention), most severe first."""
        keep = [a for a in self.load_alerts().values()
                if a.state == "firing" or (include_resolved and not self._expired(a))]
        order = {level: rank for rank, level in enumerate(reversed(list(AlertLevel)))}
        return sorted(keep, key=lambda a: (a.state != "firing", order[a.level], a.id))

    def _expired(self, alert: Alert) -> bool:
        resolved = parse_timestamp(alert.resolved_at)
        return (alert.state == "resolved" and resolved is not None and days_between(
            resolved, self.store.now) > self.thresholds["alert_retention_days"])

    def _save_alerts(self, alerts: Dict[str, Alert]) -> None:
        self.store.write_state("alerts.json", {"alerts": {k: to_jsonable(v)
                                                          for k, v in sorted(alerts.items())}})

    def evaluate_alerts(self, checks: List[HealthCheck]) -> AlertChanges:
        """Fire, count, auto-resolve and expire alerts from check results; then notify."""
        changes = AlertChanges()
        busy = self._under_state_lock(lambda: self._update_alerts(checks, changes))
        self._finish_alerts(changes, busy)
        return changes

    def _update_alerts(self, checks: List[HealthCheck], changes: AlertChanges) -> None:
        """The alert state change itself; call with the maintenance lock held."""
        alerts = self._load_alerts_or_reset(changes)
        current = {alert_id(c.name, p.subject): (c, p) for c in checks for p in c.problems}
        for key, (check, problem) in sorted(current.items()):
            self._observe(alerts, key, check.name, problem, changes)
        ran = {c.name for c in checks if c.ran}
        for key, alert in sorted(alerts.items()):
            if alert.state == "firing" and key not in current and alert.check in ran:
                self._resolve(alert, "auto")
                changes.resolved.append(alert)
        changes.purged = self._purge(alerts)
        self._save_alerts(alerts)

    def _finish_alerts(self, changes: AlertChanges, busy: List[str]) -> None:
        changes.warnings.extend(busy)
        changes.open = [] if busy else self.alerts()
        self._deliver(changes)

    def _load_alerts_or_reset(self, changes: AlertChanges) -> Dict[str, Alert]:
        try:
            return self.load_alerts()
        except IntegrityError as exc:
            path = self.store.state_path("alerts.json")
            os.replace(str(path), str(path) + ".corrupt")
            changes.warnings.append("%s; set aside as alerts.json.corrupt, alerts start afresh"
                                    % exc)
            return {}

    def _observe(self, alerts: Dict[str, Alert], key: str, check: str, problem: Problem,
                 changes: AlertChanges) -> None:
        """Count a condition seen now: new or re-opened alerts fire, escalations notify again."""
        now = format_timestamp(self.store.now)
        alert = alerts.get(key)
        if alert is None:
            alert = Alert(key, check, problem.subject, problem.alert_level, problem.message,
                          "firing", now, now)
            alerts[key] = alert
            changes.fired.append(alert)
            return
        escalated = alert.state == "firing" and _LEVEL_RANK[problem.alert_level] > _LEVEL_RANK[
            alert.level]
        if alert.state == "resolved":
            alert.state, alert.first_seen, alert.count = "firing", now, 0
            alert.occurrences += 1
            alert.resolved_at = alert.resolved_by = None
            escalated = True
        alert.last_seen, alert.count = now, alert.count + 1
        alert.level, alert.message = problem.alert_level, problem.message
        if escalated:
            changes.fired.append(alert)

    def _resolve(self, alert: Alert, by: str) -> None:
        alert.state, alert.resolved_by = "resolved", by
        alert.resolved_at = format_timestamp(self.store.now)

    def _purge(self, alerts: Dict[str, Alert]) -> int:
        expired = [key for key, alert in alerts.items() if self._expired(alert)]
        for key in expired:
            del alerts[key]
        return len(expired)

    def resolve_alert(self, key: str) -> AlertChanges:
        """Resolve one alert by hand; raises UsageError for an unknown id, StoreBusyError."""
        changes = AlertChanges()
        with self.store.maintenance_lock():
            alerts = self.load_alerts()
            alert = alerts.get(key)
            if alert is None:
                raise UsageError("no alert %r (list them with: monitor alerts --all)" % key)
            if alert.state == "firing":
                self._resolve(alert, "manual")
                changes.resolved.append(alert)
            changes.purged = self._purge(alerts)
            self._save_alerts(alerts)
        changes.open = self.alerts()
        self._deliver(changes)
        return changes

    def _deliver(self, changes: AlertChanges) -> None:
        """POST fired and resolved alerts to the webhook; stop at the first failure, warn."""
        if not self.webhook_url:
            return
        events = ([("firing", a) for a in changes.fired]
                  + [("resolved", a) for a in changes.resolved])
        for position, (event, alert) in enumerate(events):
            try:
                send_webhook(self.webhook_url, event, alert, self.store, self.webhook_timeout)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                changes.warnings.append("webhook %s unreachable (%s); %d notification(s) not "
                                        "delivered" % (self.webhook_url, exc,
                                                       len(events) - position))
                return

    # -- report -------------------------------------------------------------------
    def report(self) -> "MonitorReport":
        """Metrics (saved as a sample), health checks (alerts not re-evaluated), open alerts."""
        metrics = self.metrics(save=True)
        health = self.health(evaluate_alerts=False, record=False)
        try:
            open_alerts = self.alerts()
        except IntegrityError as exc:
            open_alerts = []
            health.warnings.append(str(exc))
        return MonitorReport(self.store.now, metrics, health, open_alerts, self._samples(),
                             health.warnings)


_LEVEL_RANK = {level: rank for rank, level in enumerate(AlertLevel)}


@dataclasses.dataclass
class MonitorReport:
    """What ``monitor report`` publishes: metrics, health, open alerts and the size history."""

    generated: _dt.datetime
    metrics: MetricsReport
    health: HealthReport
    alerts: List[Alert]
    history: List[Dict[str, Any]]
    warnings: List[str] = dataclasses.field(default_factory=list)


# -- renderers: nagios, prometheus, html ---------------------------------------------

def _perf_label(label: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        return label
    return "'%s'" % label.replace("'", "''").replace("=", "_")


def _perf_number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return ("%.4f" % value).rstrip("0").rstrip(".")
    return "%d" % value


def nagios_line(report: HealthReport) -> str:
    """The one-line plugin output: ``AML OK - summary | 'label'=value[UOM];warn;crit;min``."""
    bad = [c for c in report.checks if c.status is not HealthStatus.HEALTHY]
    if bad:
        summary = "; ".join("%s: %s" % (c.name, c.message) for c in bad)
    else:
        summary = "%d checks healthy" % len(report.checks)
    perf = []
    for label, (value, uom, warn, crit) in report.perfdata.items():
        shown = "U" if value is None else _perf_number(value) + uom
        text = "%s=%s;%s;%s;0" % (_perf_label(label), shown, _perf_number(warn),
                                  _perf_number(crit))
        perf.append(re.sub(r";+$", "", text) if value is not None else text.split(";")[0])
    summary = summary.replace("|", "/").replace("\n", " ")
    return "AML %s - %s | %s" % (report.status.nagios, summary, " ".join(perf))


def _prom_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _prom_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return "%d" % value
    return repr(float(value))


class _PromWriter:
    """Collects metric families in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[Tuple[Dict[str, str], Optional[float]]]) -> None:
        """One family; samples whose value is None (not measured) are left out."""
        known = [(labels, value) for labels, value in samples if value is not None]
        if not known:
            return
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\")))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in known:
            text = ",".join('%s="%s"' % (k, _prom_escape(str(v))) for k, v in labels.items())
            self.lines.append("%s%s %s" % (name, "{%s}" % text if text else "", _prom_value(value)))

    def text(self) -> str:
        """The exposition text, newline-terminated."""
        return "\n".join(self.lines) + "\n"


def prometheus_text(metrics: MetricsReport, health: Optional[HealthReport] = None,
                    alerts: Optional[List[Alert]] = None) -> str:
    """Metrics (and health and alert counts when given) in the Prometheus text format."""
    w = _PromWriter()
    w.family("aml_store_bytes", "gauge", "Bytes of the memory store on disk, aml state excluded.",
             [({}, metrics.total_bytes)])
    w.family("aml_state_bytes", "gauge", "Bytes of aml's own state folder .aml.",
             [({}, metrics.state_bytes)])
    w.family("aml_index_bytes", "gauge", "Bytes of the persisted index.",
             [({}, metrics.index_bytes)])
    w.family("aml_agent_bytes", "gauge", "Bytes on disk per agent folder.",
             [({"agent": a.agent}, a.bytes) for a in metrics.agents])
    w.family("aml_agent_files", "gauge", "JSON files per agent by encoding.",
             [({"agent": a.agent, "encoding": enc}, n) for a in metrics.agents
              for enc, n in (("gzip", a.gzip_files), ("plain", a.plain_files))])
    w.family("aml_records", "gauge",
             "Records per agent, type and state (unreadable files excluded).",
             [({"agent": a.agent, "type": t, "state": s}, n) for a in metrics.agents
              for t, states in sorted(a.records.items()) for s, n in sorted(states.items())])
    w.family("aml_unreadable_files", "gauge", "Record files that could not be read or parsed.",
             [({"agent": a.agent}, len(a.unreadable)) for a in metrics.agents])
    _prom_performance(w, metrics)
    if health is not None:
        _prom_health(w, health, alerts or [])
    return w.text()


def _prom_performance(w: _PromWriter, metrics: MetricsReport) -> None:
    perf = metrics.performance
    w.family("aml_growth_bytes_per_day", "gauge", "Store growth per day over the last 30 days.",
             [({}, metrics.growth.bytes_per_day)])
    w.family("aml_days_until_limit", "gauge", "Days until a size limit at the current growth.",
             [({"limit": f.limit, "subject": f.subject}, f.days_until) for f in metrics.forecasts])
    w.family("aml_full_load_seconds", "gauge", "Time to read and parse every record file, now.",
             [({}, perf.full_load_ms / 1000.0 if perf.full_load_ms is not None else None)])
    w.family("aml_lookup_seconds", "gauge", "Time of one indexed lookup, measured now.",
             [({}, perf.lookup_ms / 1000.0 if perf.lookup_ms is not None else None)])
    w.family("aml_cache_hit_ratio", "gauge", "Hot-cache hit ratio recorded by real lookups.",
             [({}, perf.cache_hit_rate)])
    ops = sorted(perf.last_operations.values(), key=lambda o: o.operation)
    w.family("aml_last_operation_duration_seconds", "gauge", "Duration of the last run.",
             [({"operation": o.operation}, o.seconds) for o in ops])
    w.family("aml_last_operation_age_days", "gauge", "Days since the last run started.",
             [({"operation": o.operation}, o.age_days) for o in ops])


def _prom_health(w: _PromWriter, health: HealthReport, alerts: List[Alert]) -> None:
    w.family("aml_health_status", "gauge", "Health per check: 0 ok, 1 warning, 2 critical, "
             "3 unknown.", [({"check": c.name}, c.status.exit_code) for c in health.checks])
    w.family("aml_health_overall", "gauge", "Overall health: 0 ok, 1 warning, 2 critical, "
             "3 unknown.", [({}, health.status.exit_code)])
    w.family("aml_alerts_open", "gauge", "Open alerts by level.",
             [({"level": level.value}, sum(1 for a in alerts if a.level is level))
              for level in AlertLevel])


_CHART_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
                 "#e377c2")
_HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;background:#fafafa}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}.num{text-align:right}.muted{color:#777;font-size:12px}
.s-healthy{background:#d9f2d9}.s-warning{background:#fff2c6}.s-critical{background:#f9d0d0}
.s-unknown{background:#e4e4e4}.charts{display:flex;flex-wrap:wrap;gap:16px}
svg{background:#fff;border:1px solid #ddd}td:not(:last-child){white-space:nowrap}
"""


def _unit_or_unknown(value: Optional[float], fmt: str) -> str:
    return "unknown" if value is None else fmt % value


def _esc(value: Any) -> str:
    return _html.escape("unknown" if value is None else str(value), quote=True)


def _chart_series(samples: List[Dict[str, Any]], key: str
                  ) -> Dict[str, List[Tuple[_dt.datetime, float]]]:
    """{agent: [(time, value), ...]} of one per-agent sample field."""
    series: Dict[str, List[Tuple[_dt.datetime, float]]] = {}
    for sample in samples:
        moment = parse_timestamp(sample.get("at"))
        for agent, values in sorted((sample.get("agents") or {}).items()):
            value = _number(values.get(key)) if isinstance(values, dict) else None
            if moment is not None and value is not None:
                series.setdefault(agent, []).append((moment, value))
    return series


_CHART = {"width": 560, "height": 260, "left": 70, "right": 150, "top": 30, "bottom": 40}


def _svg_axes(title: str, t0: _dt.datetime, t1: _dt.datetime, top_label: str) -> List[str]:
    """Title, the two axes and their end labels of a chart."""
    c = _CHART
    x0, x1 = c["left"], c["width"] - c["right"]
    y0, y1 = c["top"], c["height"] - c["bottom"]
    return ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" role="img" '
            'aria-label="%s">' % (c["width"], c["height"], _esc(title)),
            '<text x="%d" y="18" font-size="14" font-weight="bold">%s</text>' % (x0, _esc(title)),
            '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>' % (x0, y1, x1, y1),
            '<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>' % (x0, y0, x0, y1),
            '<text x="%d" y="%d" font-size="11" text-anchor="end">%s</text>'
            % (x0 - 4, y0 + 4, _esc(top_label)),
            '<text x="%d" y="%d" font-size="11" text-anchor="end">0</text>' % (x0 - 4, y1),
            '<text x="%d" y="%d" font-size="11">%s</text>'
            % (x0, c["height"] - 12, _esc(t0.strftime("%Y-%m-%d %H:%M"))),
            '<text x="%d" y="%d" font-size="11" text-anchor="end">%s</text>'
            % (x1, c["height"] - 12, _esc(t1.strftime("%Y-%m-%d %H:%M")))]


def _svg_chart(title: str, series: Dict[str, List[Tuple[_dt.datetime, float]]],
               fmt: Callable[[float], str]) -> str:
    """A self-contained SVG line chart, one line and legend entry per agent."""
    points = [p for values in series.values() for p in values]
    if not points:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="60" role="img">'
                '<text x="10" y="35">%s: no samples yet</text></svg>' % (_CHART["width"],
                                                                          _esc(title)))
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    vmax = max(p[1] for p in points) or 1.0
    c = _CHART
    plot_w, plot_h = c["width"] - c["left"] - c["right"], c["height"] - c["top"] - c["bottom"]

    def xy(moment: _dt.datetime, value: float) -> Tuple[float, float]:
        share = (moment - t0).total_seconds() / (t1 - t0).total_seconds() if t1 > t0 else 0.5
        return c["left"] + share * plot_w, c["top"] + plot_h - value / vmax * plot_h

    parts = _svg_axes(title, t0, t1, fmt(vmax))
    for number, (agent, values) in enumerate(sorted(series.items())):
        color = _CHART_COLORS[number % len(_CHART_COLORS)]
        coords = [xy(m, v) for m, v in values]
        parts.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>'
                     % (color, " ".join("%.1f,%.1f" % p for p in coords)))
        parts.extend('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>' % (x, y, color)
                     for x, y in coords)
        legend_x, legend_y = c["left"] + plot_w + 12, c["top"] + 12 + number * 16
        parts.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d" '
                     'font-size="12">%s</text>' % (legend_x, legend_y - 9, color, legend_x + 14,
                                                   legend_y, _esc(agent)))
    parts.append("</svg>")
    return "".join(parts)


def _html_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                row_classes: Optional[Sequence[str]] = None) -> str:
    """A table from already-escaped cells."""
    head = "".join("<th>%s</th>" % _esc(h) for h in headers)
    body = []
    for number, row in enumerate(rows):
        css = ' class="%s"' % row_classes[number] if row_classes else ""
        body.append("<tr%s>%s</tr>" % (css, "".join("<td>%s</td>" % cell for cell in row)))
    if not body:
        body.append('<tr><td colspan="%d" class="muted">none</td></tr>' % len(headers))
    return "<table><tr>%s</tr>%s</table>" % (head, "".join(body))


def _html_agents(metrics: MetricsReport) -> str:
    rows = []
    for agent in metrics.agents:
        counts = ["%d / %d" % (agent.records[t.value]["active"], agent.records[t.value]["inactive"])
                  for t in RecordType]
        rows.append([_esc(agent.agent), _esc(human_bytes(agent.bytes))] + counts
                    + [_esc("%d gzip, %d plain" % (agent.gzip_files, agent.plain_files)),
                       _esc(", ".join(agent.unreadable) or "-")])
    return _html_table(["agent", "size", "patterns (active / inactive)", "solutions",
                        "decisions", "files", "unreadable"], rows)


def html_report(report: MonitorReport) -> str:
    """A self-contained HTML page: summary, charts over time, checks and open alerts."""
    metrics, health = report.metrics, report.health
    perf = metrics.performance
    checks = _html_table(["check", "status", "finding"],
                         [[_esc(c.name), _esc(c.status.value), _esc(c.message)]
                          for c in health.checks],
                         ["s-" + c.status.value for c in health.checks])
    alerts = _html_table(["id", "level", "check / subject", "first seen", "last seen", "count",
                          "message"],
                         [[_esc(a.id), _esc(a.level.value), _esc("%s / %s" % (a.check, a.subject)),
                           _esc(a.first_seen), _esc(a.last_seen), _esc(a.count), _esc(a.message)]
                          for a in report.alerts])
    charts = (_svg_chart("Size per agent", _chart_series(report.history, "bytes"), human_bytes)
              + _svg_chart("Records per agent", _chart_series(report.history, "records"),
                           lambda v: "%d" % v))
    summary = "%s in %d agents; %d records; index %s; full load %s; indexed lookup %s; " \
        "hot-cache hit rate %s" % (
            human_bytes(metrics.total_bytes), len(metrics.agents),
            sum(a.record_total for a in metrics.agents),
            "none" if not metrics.index_bytes else human_bytes(metrics.index_bytes),
            _unit_or_unknown(perf.full_load_ms, "%.1f ms"), _unit_or_unknown(perf.lookup_ms,
                                                                            "%.2f ms"),
            _unit_or_unknown(None if perf.cache_hit_rate is None else perf.cache_hit_rate * 100,
                             "%.0f%%"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>aml report: %s</title><style>%s</style></head><body>"
            "<h1>aml report <span class=\"s-%s\">%s</span></h1>"
            "<p class=\"muted\">%s &middot; generated %s &middot; aml %s</p><p>%s</p>"
            "<h2>Size and records over time</h2><div class=\"charts\">%s</div>"
            "<h2>Health checks</h2>%s<h2>Open alerts</h2>%s<h2>Agents</h2>%s"
            "</body></html>\n" % (_esc(metrics.store), _HTML_STYLE, health.status.value,
                                 _esc(health.status.nagios), _esc(metrics.store),
                                 _esc(format_timestamp(report.generated)), __version__,
                                 _esc(summary), charts, checks, alerts, _html_agents(metrics)))


__all__ += ["HealthStatus", "AlertLevel", "DEFAULT_THRESHOLDS", "resolve_thresholds",
            "AgentMetrics", "OperationStat", "PerformanceMetrics", "GrowthMetrics",
            "LimitForecast", "MetricsReport", "Problem", "HealthCheck", "HealthReport", "Alert",
            "AlertChanges", "MonitorReport", "MemoryMonitor", "alert_id", "send_webhook",
            "nagios_line", "prometheus_text", "html_report", "worst_status"]


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


class HealthUnknownError(AmlError):
    """``monitor health`` could not run at all: UNKNOWN (3) by the plugin convention."""

    exit_code = ExitCode.PARTIAL


def _monitor_common(formats: Sequence[str], default: str) -> argparse.ArgumentParser:
    """The common options with this action's own ``--format`` choices (a fresh copy)."""
    # A fresh copy of the common options, so "resolve" replaces --format here only.
    common = argparse.ArgumentParser(add_help=False, conflict_handler="resolve",
                                     parents=[_common_options()])
    common.add_argument("--format", choices=formats, default=argparse.SUPPRESS,
                        help="output format: %s (default: %s)" % (", ".join(formats), default))
    return common


def _monitor_action(sub: Any, name: str, help_text: str, formats: Sequence[str],
                    default: str, func: Callable[[argparse.Namespace], int]
                    ) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            parents=[_monitor_common(formats, default)],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func, default_format=default)
    return parser


def _threshold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                        help="override a threshold (repeatable), e.g. agent_memory_warning_mb=50;"
                        " keys: " + ", ".join(sorted(DEFAULT_THRESHOLDS)))


@command_builder
def _build_monitor(subparsers: Any) -> None:
    parser = subparser(subparsers, "monitor", "metrics, health checks, alerts and reports")
    sub = parser.add_subparsers(dest="monitor_command", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    metrics = _monitor_action(sub, "metrics", "measure sizes, record counts, growth and timings",
                              ("text", "json", "prometheus"), "text", cmd_monitor_metrics)
    _threshold_option(metrics)
    metrics.add_argument("--no-save", action="store_true",
                         help="do not add this run's sample to .aml/metrics-history.json")
    health = _monitor_action(sub, "health", "run the health checks; exit 0 ok, 1 warning, "
                             "2 critical, 3 unknown; updates alerts",
                             ("text", "json", "nagios"), "text", cmd_monitor_health)
    _threshold_option(health)
    health.add_argument("--webhook", metavar="URL", help="POST alert changes here as JSON")
    alerts = _monitor_action(sub, "alerts", "list open alerts, or resolve one by hand",
                             ("text", "json"), "text", cmd_monitor_alerts)
    alerts.add_argument("--all", action="store_true", help="include resolved alerts")
    alerts.add_argument("--resolve", metavar="ALERT_ID", help="resolve this alert by hand")
    alerts.add_argument("--webhook", metavar="URL", help="POST the resolution here as JSON")
    _threshold_option(alerts)
    report = _monitor_action(sub, "report", "write the JSON, Prometheus or HTML report",
                             ("json", "html", "prometheus"), "json", cmd_monitor_report)
    _threshold_option(report)
    report.add_argument("--output", metavar="FILE", type=Path,
                        help="write to FILE atomically instead of stdout")


def _open_monitor(args: argparse.Namespace) -> MemoryMonitor:
    """Store, thresholds and webhook from defaults, config files and flags."""
    store = open_store(args)
    section = dict(load_aml_config(store, args.config).get("monitor", {}))
    thresholds = resolve_thresholds(store, section, parse_threshold_flags(
        getattr(args, "threshold", None)))
    timeout = _number(section.get("webhook_timeout", 5.0))
    if timeout is None or timeout <= 0:
        raise UsageError("monitor.webhook_timeout must be a positive number of seconds")
    return MemoryMonitor(store, thresholds, getattr(args, "webhook", None)
                         or section.get("webhook_url"), timeout)


def _monitor_output(args: argparse.Namespace) -> Output:
    """Output for text/json; other formats are written by the handler itself."""
    if args.format == "text" and args.default_format != "text":
        args.format = args.default_format
    return Output(args.format if args.format in ("text", "json") else "text", args.quiet)


def _shown(value: Any, unit: str = "") -> str:
    return "unknown" if value is None else ("%.2f" % value if isinstance(value, float)
                                            else str(value)) + unit


def _metrics_lines(report: MetricsReport) -> List[str]:
    """The text form of a metrics report."""
    lines = ["Store %s: %s in %d agents (aml state %s, index %s)" % (
        report.store, human_bytes(report.total_bytes), len(report.agents),
        human_bytes(report.state_bytes),
        human_bytes(report.index_bytes) if report.index_bytes else "none"),
        "Files: %d gzip, %d plain; largest agent: %s" % (report.gzip_files, report.plain_files,
                                                         report.largest_agent or "none"),
        "%-24s %10s  %-17s  %-17s  %s" % ("AGENT", "SIZE", "PATTERNS act/inact",
                                              "SOLUTIONS", "DECISIONS")]
    for agent in report.agents:
        lines.append(("%-24s %10s  %s" % (agent.agent, human_bytes(agent.bytes), "  ".join(
            "%-17s" % ("%d / %d" % (agent.records[t.value]["active"],
                                    agent.records[t.value]["inactive"])) for t in RecordType)
        )).rstrip())
    lines.extend(_growth_lines(report))
    lines.extend(_performance_lines(report.performance))
    return lines


def _growth_lines(report: MetricsReport) -> List[str]:
    growth = report.growth
    if growth.previous_at is None:
        lines = ["Growth: unknown (no earlier sample; every run adds one)"]
    else:
        lines = ["Growth: %+d bytes, %+d records since %s; %s/day" % (
            growth.bytes_since_previous, growth.records_since_previous, growth.previous_at,
            "unknown" if growth.bytes_per_day is None else human_bytes(growth.bytes_per_day))]
    for forecast in report.forecasts:
        when = forecast.note if forecast.days_until is None else "%.1f days, %s" % (
            forecast.days_until, forecast.note)
        lines.append("  %s %s (%s): %s" % (forecast.subject, forecast.limit,
                                           human_bytes(forecast.limit_bytes), when))
    return lines


def _performance_lines(perf: PerformanceMetrics) -> List[str]:
    lines = ["Full load now: %s (%d files, %d records)" % (
        _shown(perf.full_load_ms, " ms"), perf.full_load_files, perf.full_load_records),
        "Indexed lookup now: %s (%s)" % (_shown(perf.lookup_ms, " ms"), perf.lookup_note),
        "Hot-cache hit rate: %s (%s hits, %s misses)" % (
            _shown(perf.cache_hit_rate), _shown(perf.cache_hits), _shown(perf.cache_misses))]
    for op in perf.last_operations.values():
        lines.append("Last %s: %s" % (op.operation, "never ran" if op.started is None else
                                      "%s, took %s" % (op.started, _shown(op.seconds, " s"))))
    return lines


def cmd_monitor_metrics(args: argparse.Namespace) -> int:
    """``monitor metrics``: exit 3 when a record file could not be read."""
    out = _monitor_output(args)
    monitor = _open_monitor(args)
    report = monitor.metrics(save=not args.no_save)
    for problem in report.unreadable:
        out.warn("unreadable, not counted: %s" % problem)
    if args.format == "prometheus":
        out.stdout.write(prometheus_text(report))
    else:
        for line in _metrics_lines(report):
            out.line(line)
        out.document(report)
    return int(report.exit_code)


def _health_lines(report: HealthReport) -> List[str]:
    lines = ["Health: %s (%s)" % (report.status.nagios, report.store)]
    for check in report.checks:
        lines.append("  %-9s %-12s %s" % (check.status.value, check.name, check.message))
    changes = report.alerts
    if changes is not None and (changes.fired or changes.resolved):
        lines.append("Alerts: %d fired, %d resolved, %d open (see: monitor alerts)"
                     % (len(changes.fired), len(changes.resolved), len(changes.open)))
    return lines


def cmd_monitor_health(args: argparse.Namespace) -> int:
    """``monitor health``: exit code 0/1/2/3 by the plugin convention, whatever the format."""
    out = _monitor_output(args)
    try:
        report = _open_monitor(args).health()
    except AmlError as exc:
        if args.format == "nagios":
            print("AML UNKNOWN - %s" % str(exc).replace("|", "/"), file=out.stdout)
        raise HealthUnknownError(str(exc)) from None
    for warning in report.warnings:
        out.warn(warning)
    if args.format == "nagios":
        print(nagios_line(report), file=out.stdout)
    elif report.status is HealthStatus.HEALTHY:
        for line in _health_lines(report):
            out.line(line)
    else:
        for line in _health_lines(report):
            out.always(line)  # cron mails a problem even with -q
    out.document(report)
    return report.exit_code


def _alert_lines(alerts: List[Alert], include_resolved: bool) -> List[str]:
    lines = ["%-22s %-8s %-15s %5s  %-24s %-24s %s" % ("ID", "LEVEL", "STATE", "COUNT",
                                                      "FIRST SEEN", "LAST SEEN", "MESSAGE")]
    for alert in alerts:
        state = alert.state if alert.state == "firing" else "%s (%s)" % (alert.state,
                                                                          alert.resolved_by)
        lines.append("%-22s %-8s %-15s %5d  %-24s %-24s %s" % (
            alert.id, alert.level.value, state, alert.count, alert.first_seen, alert.last_seen,
            alert.message))
    return lines if alerts else ["No %salerts." % ("" if include_resolved else "open ")]


def cmd_monitor_alerts(args: argparse.Namespace) -> int:
    """``monitor alerts``: list (read-only) or ``--resolve`` one alert by hand."""
    out = _monitor_output(args)
    monitor = _open_monitor(args)
    if args.resolve:
        changes = monitor.resolve_alert(args.resolve)
        for warning in changes.warnings:
            out.warn(warning)
        out.line("%s resolved." % args.resolve if changes.resolved
                 else "%s was already resolved." % args.resolve)
        out.document(changes)
        return int(ExitCode.OK)
    alerts = monitor.alerts(include_resolved=args.all)
    for line in _alert_lines(alerts, args.all):
        out.line(line)
    out.document({"alerts": alerts})
    return int(ExitCode.OK)


def cmd_monitor_report(args: argparse.Namespace) -> int:
    """``monitor report``: JSON, Prometheus text or HTML, to stdout or atomically to a file."""
    _monitor_output(args)
    report = _open_monitor(args).report()
    out = Output("text", args.quiet)
    for warning in report.warnings:
        out.warn(warning)
    for problem in report.metrics.unreadable:
        out.warn("unreadable, not counted: %s" % problem)
    if args.format == "html":
        text = html_report(report)
    elif args.format == "prometheus":
        text = prometheus_text(report.metrics, report.health, report.alerts)
    else:
        text = json.dumps(to_jsonable(report), indent=2, sort_keys=True) + "\n"
    if args.output is None:
        out.stdout.write(text)
    else:
        atomic_write_bytes(args.output, text.encode("utf-8"))
    return int(report.metrics.exit_code)


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
