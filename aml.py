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

def safety_backup(store, reason, config=None):  # STUB until backup lands
    """Placeholder for section 8's safety backup; always raises RefusedError."""
    raise RefusedError("backup is not available")


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

class PruneStrategy(enum.Enum):
    """The three pruning strategies (the original toolkit's names)."""

    TIME_BASED = "time_based"
    PERFORMANCE_BASED = "performance_based"
    SPACE_BASED = "space_based"


class PruneReason(enum.Enum):
    """Why a record was removed; stored in the archive and shown in every report."""

    UNUSED_TOO_LONG = "unused_too_long"
    FAILED_PATTERN_UNUSED = "failed_pattern_unused"
    DECISION_TOO_OLD = "decision_too_old"
    LOW_SUCCESS_RATE = "low_success_rate"
    LOW_CONFIDENCE = "low_confidence"
    NEGATIVE_OUTCOME = "negative_outcome"
    OUTDATED_SOLUTION = "outdated_solution"
    FAILED_SOLUTION = "failed_solution"
    MEMORY_LIMIT_EXCEEDED = "memory_limit_exceeded"


MIB = 1024 * 1024
AGGRESSIVE_PATTERN_DAYS = 60
AGGRESSIVE_DECISION_DAYS = 120
AGGRESSIVE_SUCCESS_FLOOR = 0.30
MAX_SPACE_ITERATIONS = 5
# The runtime's config.json keys (section "pruning") that map onto PruneConfig fields.
STORE_PRUNE_KEYS = {"maxAgeDays": "pattern_max_age_days",
                    "minConfidence": "min_confidence_score",
                    "aggressiveMode": "aggressive"}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Pruning thresholds (SPEC 5). ``aggressive`` tightens to 60/120 days and a 0.30 floor."""

    pattern_max_age_days: float = 90
    decision_max_age_days: float = 180
    failed_pattern_max_age_days: float = 30
    min_success_rate: float = 0.20
    min_confidence_score: float = 0.15
    min_execution_count: int = 3
    agent_memory_limit: int = 80 * MIB
    global_memory_limit: int = 800 * MIB
    preserve_high_value: bool = True
    high_value_threshold: float = 0.85
    dry_run: bool = False
    create_backup: bool = True
    max_removal_share: float = 0.5
    aggressive: bool = False

    def effective(self) -> "PruneConfig":
        """The thresholds actually applied: aggressive mode only ever tightens them."""
        if not self.aggressive:
            return self
        return dataclasses.replace(
            self,
            pattern_max_age_days=min(self.pattern_max_age_days, AGGRESSIVE_PATTERN_DAYS),
            decision_max_age_days=min(self.decision_max_age_days, AGGRESSIVE_DECISION_DAYS),
            min_success_rate=max(self.min_success_rate, AGGRESSIVE_SUCCESS_FLOOR))


_BOOL_FIELDS = ("preserve_high_value", "dry_run", "create_backup", "aggressive")
_SHARE_FIELDS = ("min_success_rate", "min_confidence_score", "high_value_threshold",
                 "max_removal_share")


def _check_prune_config(config: PruneConfig, source: str) -> PruneConfig:
    """Reject wrong types and ranges, naming where the bad value came from; raises UsageError."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _BOOL_FIELDS:
            ok = isinstance(value, bool)
        else:
            ok = _number(value) is not None and value >= 0
            ok = ok and (field.name not in _SHARE_FIELDS or value <= 1)
        if not ok:
            raise UsageError("%s: %s=%r is not a valid value" % (source, field.name, value))
    return config


def store_prune_settings(store: Store) -> Dict[str, Any]:
    """The PruneConfig fields that the store's config.json sets (its ``pruning`` section)."""
    section = store.runtime_config().get("pruning")
    if not isinstance(section, dict):
        return {}
    return {field: section[key] for key, field in STORE_PRUNE_KEYS.items() if key in section}


def pruning_enabled(store: Store) -> bool:
    """False only when the store's config.json says ``pruning.enabled: false``."""
    return dig(store.runtime_config(), "pruning", "enabled") is not False


def prune_config_for(store: Store, aml_config: Optional[Dict[str, Any]] = None,
                     flags: Optional[Dict[str, Any]] = None) -> PruneConfig:
    """Defaults < store config.json < aml config ``prune`` section < flags; raises UsageError."""
    config = PruneConfig()
    layers = (("%s (pruning)" % store.config_path(), store_prune_settings(store)),
              ("aml config [prune]", (aml_config or {}).get("prune", {})),
              ("command line", flags or {}))
    for source, values in layers:
        config = _check_prune_config(apply_config_fields(config, values, source), source)
    return config


# -- the value score ----------------------------------------------------------

def record_value(facts: RecordFacts, config: PruneConfig) -> float:
    """A documented 0..1 worth of a record; >= high_value_threshold is kept.

    Pattern: mean of its success rate (counted once executed min_execution_count times) and
    its confidence; 0 when neither is known. Solution: 0 if it did not work or is
    superseded, else 0.6 (worked) or 0.3 (unknown) plus 0.1 per verification, at most 1.
    Decision: 0 if it would not be repeated, 0.9 if it would, 0.5 without an outcome.
    """
    if facts.rtype is RecordType.PATTERN:
        parts = [facts.confidence] if facts.confidence is not None else []
        if (facts.success_rate is not None
                and (facts.execution_count or 0) >= config.min_execution_count):
            parts.append(facts.success_rate)
        return _clamp(sum(parts) / len(parts)) if parts else 0.0
    if facts.rtype is RecordType.SOLUTION:
        if facts.worked is False or facts.superseded:
            return 0.0
        base = 0.6 if facts.worked else 0.3
        return _clamp(base + 0.1 * max(0.0, facts.verified_count or 0.0))
    return {False: 0.0, True: 0.9, None: 0.5}[facts.would_repeat]


def _clamp(value: float) -> float:
    return max(0.0, min(1.0, value))


def is_protected(facts: RecordFacts, config: PruneConfig) -> bool:
    """Pinned records, and high-value ones while preserve_high_value is on, are never pruned."""
    return facts.pinned or (config.preserve_high_value
                            and record_value(facts, config) >= config.high_value_threshold)


# -- reasons ------------------------------------------------------------------

Verdict = Tuple[PruneReason, Dict[str, Any]]


def _age_details(facts: RecordFacts, now: _dt.datetime, limit: float) -> Dict[str, Any]:
    source = ("lastUsed" if facts.last_used else "created" if facts.created else "timestamp")
    return {"age_days": round(days_between(facts.last_activity, now), 1),
            "max_age_days": limit, "age_from": source,
            "last_activity": format_timestamp(facts.last_activity)}


def time_verdict(facts: RecordFacts, config: PruneConfig, now: _dt.datetime) -> Optional[Verdict]:
    """time_based: stale patterns and decisions (age from last use, else creation, else timestamp).

    Records without a readable time, or with one in the future, are never time-pruned.
    """
    moment = facts.last_activity
    if moment is None or moment > now:
        return None
    age = days_between(moment, now)
    if facts.rtype is RecordType.PATTERN:
        if _is_failed_pattern(facts, config) and age > config.failed_pattern_max_age_days:
            details = _age_details(facts, now, config.failed_pattern_max_age_days)
            details.update(success_rate=facts.success_rate,
                           execution_count=_whole(facts.execution_count))
            return PruneReason.FAILED_PATTERN_UNUSED, details
        if age > config.pattern_max_age_days:
            return PruneReason.UNUSED_TOO_LONG, _age_details(facts, now,
                                                              config.pattern_max_age_days)
    if facts.rtype is RecordType.DECISION and age > config.decision_max_age_days:
        return PruneReason.DECISION_TOO_OLD, _age_details(facts, now, config.decision_max_age_days)
    return None


def _whole(value: Optional[float]) -> Any:
    """Show a count read as float (1.0) as the integer it is."""
    return int(value) if value is not None and float(value).is_integer() else value


def _is_failed_pattern(facts: RecordFacts, config: PruneConfig) -> bool:
    """Executed at least once and succeeding less often than min_success_rate."""
    return ((facts.execution_count or 0) >= 1 and facts.success_rate is not None
            and facts.success_rate < config.min_success_rate)


def performance_verdict(facts: RecordFacts, config: PruneConfig) -> Optional[Verdict]:
    """performance_based: failing patterns, low confidence, failed/outdated solutions, regrets."""
    if (facts.rtype is RecordType.PATTERN and facts.success_rate is not None
            and (facts.execution_count or 0) >= config.min_execution_count
            and facts.success_rate < config.min_success_rate):
        return PruneReason.LOW_SUCCESS_RATE, {
            "success_rate": facts.success_rate, "min_success_rate": config.min_success_rate,
            "execution_count": _whole(facts.execution_count),
            "min_execution_count": config.min_execution_count}
    if facts.confidence is not None and facts.confidence < config.min_confidence_score:
        return PruneReason.LOW_CONFIDENCE, {"confidence": facts.confidence,
                                            "min_confidence_score": config.min_confidence_score}
    if facts.rtype is RecordType.SOLUTION and facts.worked is False:
        return PruneReason.FAILED_SOLUTION, {"worked": False}
    if facts.rtype is RecordType.SOLUTION and facts.superseded:
        return PruneReason.OUTDATED_SOLUTION, {"superseded": True}
    if facts.rtype is RecordType.DECISION and facts.would_repeat is False:
        return PruneReason.NEGATIVE_OUTCOME, {"would_repeat": False}
    return None


# -- result ---------------------------------------------------------------------

@dataclasses.dataclass
class PrunedRecord:
    """One record a run removed (or, in a dry run, would remove)."""

    agent: str
    file: str
    type: str
    id: Optional[str]
    index: int
    reason: PruneReason
    details: Dict[str, Any]


@dataclasses.dataclass
class AgentPruneSummary:
    """Per-agent counts and on-disk bytes of one run."""

    agent: str
    records_before: int = 0
    removed: Dict[str, int] = dataclasses.field(
        default_factory=lambda: {"pattern": 0, "solution": 0, "decision": 0})
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def removed_total(self) -> int:
        """Records removed from this agent, all types."""
        return sum(self.removed.values())


@dataclasses.dataclass
class PruneResult:
    """What a prune run did or, with ``dry_run``, would do."""

    run_id: Optional[str]
    dry_run: bool
    strategies: List[str]
    config: PruneConfig
    agents: List[AgentPruneSummary]
    removed: List[PrunedRecord]
    bytes_before: int = 0
    bytes_after: int = 0
    bytes_estimated: bool = False
    unreadable: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    busy: List[str] = dataclasses.field(default_factory=list)
    findings: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: Optional[str] = None
    backup_id: Optional[str] = None
    archive: Optional[str] = None
    space_iterations: int = 0

    @property
    def exit_code(self) -> ExitCode:
        """BUSY over REFUSED over PARTIAL over OK."""
        if self.busy:
            return ExitCode.BUSY
        if self.refused:
            return ExitCode.REFUSED
        return ExitCode.PARTIAL if self.unreadable else ExitCode.OK


# -- planning -------------------------------------------------------------------

@dataclasses.dataclass
class _FilePlan:
    """One record file as planned: its content, facts and the positions chosen for removal."""

    data_file: DataFile
    rel: str
    records: List[Any]
    fmt: FileFormat
    disk_bytes: int
    facts: List[RecordFacts] = dataclasses.field(default_factory=list)
    positions: List[int] = dataclasses.field(default_factory=list)
    removals: Dict[int, Verdict] = dataclasses.field(default_factory=dict)
    ratio: Optional[float] = None

    def estimate(self, index: int) -> float:
        """Estimated on-disk bytes of one record: its compact JSON size times the file's
        bytes-on-disk per compact byte (which covers both indentation and gzip)."""
        if self.ratio is None:  # computed on first use: it serializes the whole file
            compact = len(_ordered_text(self.records).encode("utf-8")) or 1
            self.ratio = self.disk_bytes / compact
        return len(_ordered_text(self.records[index]).encode("utf-8")) * self.ratio

    def removed_estimate(self) -> float:
        """Estimated bytes the planned removals free."""
        return sum(self.estimate(i) for i in self.removals)


def _new_file_plan(store: Store, data_file: DataFile, records: List[Any],
                   fmt: FileFormat) -> _FilePlan:
    plan = _FilePlan(data_file=data_file, rel=data_file.path.relative_to(store.root).as_posix(),
                     records=records, fmt=fmt, disk_bytes=data_file.path.stat().st_size)
    _refresh_plan(plan, records, list(range(len(records))))
    return plan


def _refresh_plan(plan: _FilePlan, records: List[Any], positions: List[int]) -> None:
    """Point a plan at new content (after a write or a change by the runtime)."""
    plan.records, plan.positions, plan.removals = records, positions, {}
    rtype = plan.data_file.rtype
    plan.facts = [record_facts(rtype, r) for r in records]
    plan.ratio = None
    with contextlib.suppress(OSError):
        plan.disk_bytes = plan.data_file.path.stat().st_size


def _keep_only(plan: _FilePlan, kept: List[int]) -> None:
    """After a write: the plan holds just the kept records (their facts are unchanged)."""
    plan.records = [plan.records[i] for i in kept]
    plan.facts = [plan.facts[i] for i in kept]
    plan.positions = [plan.positions[i] for i in kept]
    plan.removals, plan.ratio = {}, None
    with contextlib.suppress(OSError):
        plan.disk_bytes = plan.data_file.path.stat().st_size


def _dir_bytes(folder: Path, skip: Iterable[str] = ()) -> int:
    """Bytes of the regular files under ``folder`` (skipping top-level names in ``skip``)."""
    total = 0
    skip = set(skip)
    for dirpath, dirnames, filenames in os.walk(str(folder)):
        if dirpath == str(folder):
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
    return total


def agent_disk_bytes(store: Store, agent: str) -> int:
    """Measured bytes of one agent's folder on disk."""
    return _dir_bytes(store.root / agent)


def store_disk_bytes(store: Store) -> int:
    """Measured bytes of the store on disk, aml's own ``.aml/`` state excluded."""
    return _dir_bytes(store.root, skip=(STATE_DIR_NAME,))


def _strategies(names: Optional[Iterable[Any]]) -> List[PruneStrategy]:
    """Strategy names or members to members (all three when none given); raises UsageError."""
    if not names:
        return list(PruneStrategy)
    chosen = []
    for name in names:
        try:
            chosen.append(PruneStrategy(getattr(name, "value", name)))
        except ValueError:
            raise UsageError("unknown strategy %r (known: %s)" % (
                name, ", ".join(s.value for s in PruneStrategy))) from None
    return list(dict.fromkeys(chosen))


_EPOCH = _dt.datetime(1, 1, 1, tzinfo=_dt.timezone.utc)


@dataclasses.dataclass
class _Run:
    """The state of one run: its plans, archive entries written and pending, and its result."""

    result: PruneResult
    plans: List[_FilePlan]
    strategies: List[PruneStrategy]
    force: bool = False
    applied: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    pending: Dict[str, List[Dict[str, Any]]] = dataclasses.field(default_factory=dict)


class MemoryPruner:
    """Plans and runs pruning of a store with the thresholds of a PruneConfig."""

    def __init__(self, store: Store, config: Optional[PruneConfig] = None):
        self.store = store
        self.config = config or PruneConfig()
        self.rules = self.config.effective()

    # -- public API ------------------------------------------------------------
    def plan(self, strategies: Optional[Iterable[Any]] = None,
             agents: Optional[Sequence[str]] = None) -> PruneResult:
        """What a run would remove; touches nothing on disk (bytes after are an estimate).

        A plan the mass-deletion guard would refuse has ``refused`` set. Raises UsageError.
        """
        run = self._prepare(_strategies(strategies), agents, dry_run=True)
        run.result.refused = self._guard_message(run)
        if not pruning_enabled(self.store):
            run.result.findings.append({"problem": "%s says pruning.enabled=false: a real run "
                                        "refuses without --force" % self.store.config_path()})
        return run.result

    def run(self, strategies: Optional[Iterable[Any]] = None,
            agents: Optional[Sequence[str]] = None, force: bool = False) -> PruneResult:
        """Prune for real (or plan, when config.dry_run): archive first, then rewrite each file.

        Raises RefusedError (mass-deletion guard without ``force``, pruning disabled in the
        store's config.json without ``force``, failed safety backup), StoreBusyError when
        another aml run holds the store, UsageError for bad arguments.
        """
        if self.config.dry_run:
            return self.plan(strategies, agents)
        chosen = _strategies(strategies)
        if not force and not pruning_enabled(self.store):
            raise RefusedError("%s says pruning.enabled=false; pass --force to prune anyway"
                               % self.store.config_path())
        with self.store.maintenance_lock():
            self.store.cleanup_temp_files()
            return self._run_locked(chosen, agents, force)

    # -- the real run ------------------------------------------------------------
    def _run_locked(self, strategies: List[PruneStrategy], agents: Optional[Sequence[str]],
                    force: bool) -> PruneResult:
        started, clock = self.store.now, time.monotonic()
        run = self._prepare(strategies, agents, dry_run=False)
        run.force = force
        message = self._guard_message(run)
        if message and not force:
            raise RefusedError(message)
        run.result.removed = []
        if any(p.removals for p in run.plans):
            if self.config.create_backup:
                run.result.backup_id = safety_backup(self.store, "before %s" % run.result.run_id)
            self._apply(run)
            if PruneStrategy.SPACE_BASED in strategies:
                self._space_rounds(run)
        self._measure_after(run)
        self.store.record_operation("prune", started, time.monotonic() - clock,
                                    self._history_summary(run.result))
        return run.result

    def _apply(self, run: _Run) -> None:
        """Archive every planned removal, then rewrite each file without those records."""
        todo = [p for p in run.plans if p.removals]
        if not todo:
            return
        for plan in todo:
            run.pending[plan.rel] = self._entries(plan)
        self._save_archive(run)
        if any(r == PruneReason.MEMORY_LIMIT_EXCEEDED for p in todo for r, _ in p.removals.values()):
            run.result.space_iterations += 1
        for plan in todo:
            self._apply_file(run, plan)

    def _apply_file(self, run: _Run, plan: _FilePlan) -> None:
        try:
            with self.store.rewrite(plan.data_file.path) as job:
                if job.data != plan.records:
                    self._replan_file(run, plan, job.data)
                kept = [i for i in range(len(plan.records)) if i not in plan.removals]
                job.data = [plan.records[i] for i in kept]
                job.changed = bool(plan.removals)
        except (StoreBusyError, CorruptFileError) as exc:
            run.plans.remove(plan)  # left alone for the rest of the run, space rounds included
            self._drop_file(run, plan, exc)
            return
        plan.fmt = job.fmt
        entries = run.pending.pop(plan.rel, [])
        run.applied.extend(entries)
        run.result.removed.extend(_pruned_record(e) for e in entries)
        _keep_only(plan, kept)

    def _drop_file(self, run: _Run, plan: _FilePlan, exc: AmlError) -> None:
        """A file went busy or unreadable since planning: keep it untouched, fix the archive."""
        run.pending.pop(plan.rel, None)
        plan.removals = {}
        if isinstance(exc, StoreBusyError):
            run.result.busy.append(str(exc))
        else:
            run.result.unreadable.append({"file": plan.rel, "problem": getattr(exc, "problem",
                                                                                 str(exc))})
        self._save_archive(run)

    def _replan_file(self, run: _Run, plan: _FilePlan, fresh: List[Any]) -> None:
        """The runtime changed the file since planning: decide again from its fresh content."""
        space_picked = [_canonical(plan.records[i]) for i, (reason, _) in plan.removals.items()
                        if reason is PruneReason.MEMORY_LIMIT_EXCEEDED]
        space_details = [d for r, d in plan.removals.values()
                         if r is PruneReason.MEMORY_LIMIT_EXCEEDED]
        _refresh_plan(plan, fresh, list(range(len(fresh))))
        self._choose_file(plan, run.strategies, findings=None)
        for i, record in enumerate(fresh):
            if i not in plan.removals and _canonical(record) in space_picked:
                plan.removals[i] = (PruneReason.MEMORY_LIMIT_EXCEEDED, space_details[0])
        entries = self._entries(plan)
        if entries != run.pending.get(plan.rel):
            run.pending[plan.rel] = entries
            self._save_archive(run)

    def _save_archive(self, run: _Run) -> None:
        entries = run.applied + [e for es in run.pending.values() for e in es]
        path = Archive(self.store).save(run.result.run_id, "prune", entries)
        run.result.archive = str(path)

    def _space_rounds(self, run: _Run) -> None:
        """Measure on disk after writing; while still over a limit, remove more and rewrite."""
        for _ in range(MAX_SPACE_ITERATIONS):
            if not self._choose_space(run.plans, run.result):
                return
            message = self._guard_message(run)
            if message and not run.force:
                for plan in run.plans:
                    plan.removals = {}
                run.result.findings.append({"problem": "space_based stopped: " + message})
                return
            self._apply(run)

    def _measure_after(self, run: _Run) -> None:
        result = run.result
        for summary in result.agents:
            summary.bytes_after = agent_disk_bytes(self.store, summary.agent)
            over = summary.bytes_after - self.rules.agent_memory_limit
            if PruneStrategy.SPACE_BASED in run.strategies and over > 0:
                result.findings.append({"agent": summary.agent, "problem": (
                    "still over agent_memory_limit by %d bytes (what is left is pinned, "
                    "high value or unreadable)" % over)})
        _count_removed(result.agents, result.removed)
        result.bytes_after = store_disk_bytes(self.store)

    # -- planning ----------------------------------------------------------------
    def _prepare(self, strategies: List[PruneStrategy], agents: Optional[Sequence[str]],
                 dry_run: bool) -> _Run:
        chosen_agents = self.store.select_agents(agents)
        result = PruneResult(
            run_id=None if dry_run else new_run_id("prune", self.store.now), dry_run=dry_run,
            strategies=[s.value for s in strategies], config=self.rules,
            agents=[AgentPruneSummary(a, bytes_before=agent_disk_bytes(self.store, a))
                    for a in chosen_agents],
            removed=[], bytes_before=store_disk_bytes(self.store), bytes_estimated=dry_run)
        run = _Run(result=result, plans=self._load(chosen_agents, result), strategies=strategies)
        for plan in run.plans:
            self._choose_file(plan, strategies, result.findings)
        if PruneStrategy.SPACE_BASED in strategies:
            self._choose_space(run.plans, result)
        result.removed = [_pruned_record(e) for p in run.plans for e in self._entries(p)]
        _count_removed(result.agents, result.removed)
        for summary in result.agents:
            summary.records_before = sum(len(p.records) for p in run.plans
                                         if p.data_file.agent == summary.agent)
            freed = sum(p.removed_estimate() for p in run.plans if p.data_file.agent == summary.agent)
            summary.bytes_after = int(summary.bytes_before - freed)
        result.bytes_after = result.bytes_before - sum(
            s.bytes_before - s.bytes_after for s in result.agents)
        return run

    def _load(self, agents: List[str], result: PruneResult) -> List[_FilePlan]:
        errors: List[CorruptFileError] = []
        plans = [_new_file_plan(self.store, data_file, records, fmt)
                 for data_file, records, fmt in self.store.iter_record_files(agents, errors)]
        for exc in errors:
            rel = exc.path.relative_to(self.store.root).as_posix()
            result.unreadable.append({"file": rel, "problem": exc.problem})
        return plans

    def _choose_file(self, plan: _FilePlan, strategies: List[PruneStrategy],
                     findings: Optional[List[Dict[str, Any]]]) -> None:
        """Mark the time and performance removals of one file (protected records are skipped)."""
        for i, facts in enumerate(plan.facts):
            if findings is not None and facts.last_activity and facts.last_activity > self.store.now:
                findings.append({"agent": plan.data_file.agent, "file": plan.rel, "index": i,
                                 "id": facts.id, "problem": "timestamp in the future (%s)"
                                 % format_timestamp(facts.last_activity)})
            if is_protected(facts, self.rules):
                continue
            verdict = None
            if PruneStrategy.TIME_BASED in strategies:
                verdict = time_verdict(facts, self.rules, self.store.now)
            if verdict is None and PruneStrategy.PERFORMANCE_BASED in strategies:
                verdict = performance_verdict(facts, self.rules)
            if verdict is not None:
                plan.removals[i] = verdict

    def _choose_space(self, plans: List[_FilePlan], result: PruneResult) -> int:
        """Add memory_limit_exceeded removals, lowest value first, until the estimate fits."""
        added = 0
        for summary in result.agents:
            mine = [p for p in plans if p.data_file.agent == summary.agent]
            size = agent_disk_bytes(self.store, summary.agent) - sum(
                p.removed_estimate() for p in mine)
            added += self._take_lowest(mine, size, self.rules.agent_memory_limit, "agent")
        size = store_disk_bytes(self.store) - sum(p.removed_estimate() for p in plans)
        return added + self._take_lowest(plans, size, self.rules.global_memory_limit, "store")

    def _take_lowest(self, plans: List[_FilePlan], size: float, limit: int, scope: str) -> int:
        if size <= limit:
            return 0
        candidates = [(record_value(f, self.rules), f.last_activity or _EPOCH, n, i)
                      for n, plan in enumerate(plans) for i, f in enumerate(plan.facts)
                      if i not in plan.removals and not is_protected(f, self.rules)]
        candidates.sort(key=lambda c: (c[0], c[1]))
        added = 0
        for value, _, n, i in candidates:
            if size <= limit:
                break
            plans[n].removals[i] = (PruneReason.MEMORY_LIMIT_EXCEEDED, {
                "scope": scope, "value": round(value, 3), "size_bytes": int(size),
                "limit_bytes": limit})
            size -= plans[n].estimate(i)
            added += 1
        return added

    def _entries(self, plan: _FilePlan) -> List[Dict[str, Any]]:
        """Archive entries (contracts.md schema) of a file's planned removals."""
        return [{"agent": plan.data_file.agent, "file": plan.rel,
                 "type": plan.data_file.rtype.value, "id": plan.facts[i].id,
                 "index": plan.positions[i], "reason": reason.value, "details": details,
                 "record": plan.records[i], "record_text": _ordered_text(plan.records[i])}
                for i, (reason, details) in sorted(plan.removals.items())]

    def _guard_message(self, run: _Run) -> Optional[str]:
        """The mass-deletion guard: None, or which agents the run would strip too far."""
        share = self.rules.max_removal_share
        over = []
        for summary in run.result.agents:
            count = sum(len(p.removals) for p in run.plans if p.data_file.agent == summary.agent)
            count += sum(1 for e in run.applied if e["agent"] == summary.agent)
            if summary.records_before and count / summary.records_before > share:
                over.append("%s would lose %d of %d records (%.0f%%)" % (
                    summary.agent, count, summary.records_before,
                    100.0 * count / summary.records_before))
        if not over:
            return None
        return ("mass-deletion guard: %s, more than max_removal_share %.0f%%; check the clock "
                "and thresholds, or pass --force" % ("; ".join(over), 100 * share))

    def _history_summary(self, result: PruneResult) -> Dict[str, Any]:
        return {"run_id": result.run_id, "removed": len(result.removed),
                "bytes_before": result.bytes_before, "bytes_after": result.bytes_after,
                "unreadable": len(result.unreadable), "busy": len(result.busy),
                "backup_id": result.backup_id, "strategies": result.strategies}


def _pruned_record(entry: Dict[str, Any]) -> PrunedRecord:
    return PrunedRecord(agent=entry["agent"], file=entry["file"], type=entry["type"],
                        id=entry["id"], index=entry["index"], reason=PruneReason(entry["reason"]),
                        details=entry["details"])


def _count_removed(summaries: List[AgentPruneSummary], removed: List[PrunedRecord]) -> None:
    for summary in summaries:
        summary.removed = {"pattern": 0, "solution": 0, "decision": 0}
        for record in removed:
            if record.agent == summary.agent:
                summary.removed[record.type] += 1


def _ordered_text(record: Any) -> str:
    """The record as compact JSON in its own key order (state files sort keys; undo restores
    this text so a put-back record reads exactly as before)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _archived_record(entry: Dict[str, Any]) -> Any:
    """The record of an archive entry, in its original key order when ``record_text`` agrees."""
    text = entry.get("record_text")
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            ordered = parse_json_text(text)
            if ordered == entry["record"]:
                return ordered
    return entry["record"]


def _canonical(record: Any) -> str:
    """Order-independent text of a record, to recognise the same content again."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)


# -- undo -----------------------------------------------------------------------

@dataclasses.dataclass
class UndoResult:
    """What ``prune --undo`` put back."""

    run_id: str
    operation: str
    already_undone: Optional[str] = None
    restored: int = 0
    skipped: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    unreadable: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    busy: List[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """BUSY over PARTIAL over OK (a run left not undone can be undone again)."""
        if self.busy:
            return ExitCode.BUSY
        return ExitCode.PARTIAL if self.unreadable else ExitCode.OK


def _archived_file(store: Store, rel: Any) -> Path:
    """The data file an archive entry names, confined to ``<agent>/<record file>``."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (len(parts) != 2 or is_reserved_name(parts[0]) or parts[0] in ("", "..")
            or parts[1] not in RECORD_FILES):
        raise IntegrityError("archive entry names an unexpected file %r" % (rel,))
    return store.root / parts[0] / parts[1]


def undo_run(store: Store, run_id: str) -> UndoResult:
    """Put the records of an archived run (prune or gc) back where they were.

    Each record goes back at its original position when the file allows it; a record whose
    id (or, without an id, whose exact content) is present again is skipped. The run is marked
    undone once every file was handled; a second undo is a no-op that says so. Raises
    UsageError (no such run), IntegrityError (corrupt archive), StoreBusyError.
    """
    archive = Archive(store)
    payload = archive.load(run_id)
    if payload.get("undone"):
        return UndoResult(run_id, payload.get("operation", "?"), already_undone=payload["undone"])
    with store.maintenance_lock():
        store.cleanup_temp_files()
        payload = archive.load(run_id)
        result = UndoResult(run_id, payload.get("operation", "?"),
                            already_undone=payload.get("undone"))
        if result.already_undone:
            return result
        grouped = _entries_by_file(payload.get("entries", []))
        paths = {rel: _archived_file(store, rel) for rel in grouped}
        for rel, entries in grouped.items():
            _restore_file(store, paths[rel], rel, entries, result)
        if not result.unreadable and not result.busy:
            archive.mark_undone(run_id, store.now)
    return result


def _entries_by_file(entries: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    grouped: Dict[str, List[Dict[str, Any]]] = {}
    for entry in entries:
        grouped.setdefault(entry.get("file"), []).append(entry)
    return grouped


def _restore_file(store: Store, path: Path, rel: str, entries: List[Dict[str, Any]],
                  result: UndoResult) -> None:
    """Insert one file's archived records back, lowest original index first."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.file_lock(path):
            if not path.exists():
                write_json_file(path, [])
    try:
        with store.rewrite(path) as job:
            job.changed = _insert_entries(job.data, entries, result) > 0
    except StoreBusyError as exc:
        result.busy.append(str(exc))
    except CorruptFileError as exc:
        result.unreadable.append({"file": rel, "problem": exc.problem})


def _insert_entries(data: List[Any], entries: List[Dict[str, Any]], result: UndoResult) -> int:
    ids = {r.get("id") for r in data if isinstance(r, dict) and r.get("id")}
    contents = {_canonical(r) for r in data}
    restored = 0
    for entry in sorted(entries, key=lambda e: e.get("index") or 0):
        record, rid = _archived_record(entry), entry.get("id")
        if (rid in ids) if rid else (_canonical(record) in contents):
            result.skipped.append({"file": entry.get("file"), "id": rid,
                                   "index": entry.get("index"), "why": "present again"})
            continue
        data.insert(min(max(0, int(entry.get("index") or 0)), len(data)), record)
        ids.add(rid)
        contents.add(_canonical(record))
        restored += 1
    result.restored += restored
    return restored


def list_runs(store: Store) -> List[Dict[str, Any]]:
    """Every archived run (prune and gc), oldest first; read-only. Corrupt ones say so."""
    archive = Archive(store)
    runs = []
    for run_id in archive.runs():
        try:
            payload = archive.load(run_id)
        except IntegrityError as exc:
            runs.append({"run_id": run_id, "problem": str(exc)})
            continue
        runs.append({"run_id": run_id, "operation": payload.get("operation"),
                     "created": payload.get("created"), "undone": payload.get("undone"),
                     "records": len(payload.get("entries", []))})
    return runs


__all__ += ["PruneConfig", "PruneStrategy", "PruneReason", "MemoryPruner", "PruneResult",
            "PrunedRecord", "AgentPruneSummary", "UndoResult", "undo_run", "list_runs",
            "prune_config_for", "record_value", "is_protected", "time_verdict",
            "performance_verdict", "agent_disk_bytes", "store_disk_bytes"]


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

@command_builder
def _build_prune(subparsers: Any) -> None:
    parser = subparser(
        subparsers, "prune",
        "remove stale and low-value records; every removal is archived (undo with --undo)",
        epilog="strategies: time_based, performance_based, space_based (default: all three).\n"
               "The original spelling 'prune time_based performance_based' works too.")
    parser.add_argument("strategy_words", nargs="*", metavar="STRATEGY",
                        help="strategies to run (same as --strategies)")
    parser.add_argument("--strategies", nargs="+", metavar="STRATEGY", default=[],
                        help="time_based, performance_based and/or space_based")
    parser.add_argument("--aggressive", action="store_true",
                        help="tighten to 60/120 days and a 0.30 success floor")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would go; change nothing at all")
    parser.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents")
    parser.add_argument("--force", action="store_true",
                        help="override the mass-deletion guard and pruning.enabled=false")
    parser.add_argument("--no-backup", action="store_true",
                        help="skip the safety backup taken before the first change")
    parser.add_argument("--undo", metavar="RUN_ID",
                        help="put back the records of an archived prune or gc run")
    parser.add_argument("--list-runs", action="store_true",
                        help="list archived runs that --undo accepts")
    parser.set_defaults(func=cmd_prune)


def _prune_flags(args: argparse.Namespace) -> Dict[str, Any]:
    flags: Dict[str, Any] = {}
    if args.aggressive:
        flags["aggressive"] = True
    if args.dry_run:
        flags["dry_run"] = True
    if args.no_backup:
        flags["create_backup"] = False
    return flags


def cmd_prune(args: argparse.Namespace) -> int:
    """``aml STORE prune ...``: plan or run pruning, undo a run, or list archived runs."""
    strategies = list(args.strategy_words) + list(args.strategies)
    if (args.undo or args.list_runs) and (strategies or args.dry_run or args.agents):
        raise UsageError("--undo and --list-runs take no strategies, --agents or --dry-run")
    out, store = output_for(args), open_store(args)
    if args.list_runs:
        runs = list_runs(store)
        out.document({"runs": runs})
        for run in runs:
            out.always(_run_line(run))
        return int(ExitCode.OK)
    if args.undo:
        return _print_undo(out, undo_run(store, args.undo))
    config = prune_config_for(store, load_aml_config(store, args.config), _prune_flags(args))
    result = MemoryPruner(store, config).run(_strategies(strategies), args.agents,
                                             force=args.force)
    _print_prune(out, result, args.memory_path)
    return int(result.exit_code)


def _run_line(run: Dict[str, Any]) -> str:
    if "problem" in run:
        return "%s  CORRUPT: %s" % (run["run_id"], run["problem"])
    return "%s  %s  %s  %d records%s" % (run["run_id"], run["operation"], run["created"],
                                         run["records"], "  (undone %s)" % run["undone"]
                                         if run["undone"] else "")


def _details_text(details: Dict[str, Any]) -> str:
    return ", ".join("%s=%s" % (k, round(v, 3) if isinstance(v, float) else v)
                     for k, v in sorted(details.items()))


def _print_prune(out: Output, result: PruneResult, memory_path: Path) -> None:
    for problem in result.unreadable:
        out.warn("skipped unreadable %s: %s" % (problem["file"], problem["problem"]))
    for message in result.busy:
        out.warn(message)
    if result.refused:
        out.warn("a real run would refuse: " + result.refused)
    out.document(result)
    verb = "would remove" if result.dry_run else "removed"
    if result.dry_run or not out.quiet:
        for rec in result.removed:
            out.always("%s %s %s %s %s (%s)" % (verb, rec.agent, rec.type, rec.id or
                                               "#%d" % rec.index, rec.reason.value,
                                               _details_text(rec.details)))
    for finding in result.findings:
        out.line("finding: %s%s" % ("%s: " % finding["file"] if "file" in finding else "",
                                    finding["problem"]))
    estimate = " (estimate)" if result.bytes_estimated else ""
    for summary in result.agents:
        out.line("%s: %s %d of %d records (%d patterns, %d solutions, %d decisions), "
                 "%s -> %s%s" % (summary.agent, verb, summary.removed_total,
                                 summary.records_before, summary.removed["pattern"],
                                 summary.removed["solution"], summary.removed["decision"],
                                 human_bytes(summary.bytes_before),
                                 human_bytes(summary.bytes_after), estimate))
    if result.dry_run:
        out.line("dry run: nothing was changed")
    elif result.removed:
        out.line("run %s; undo with: aml.py %s prune --undo %s"
                 % (result.run_id, memory_path, result.run_id))


def _print_undo(out: Output, result: UndoResult) -> int:
    for problem in result.unreadable:
        out.warn("skipped unreadable %s: %s" % (problem["file"], problem["problem"]))
    for message in result.busy:
        out.warn(message)
    out.document(result)
    if result.already_undone:
        out.always("run %s was already undone at %s; nothing to do"
                   % (result.run_id, result.already_undone))
        return int(ExitCode.OK)
    for skip in result.skipped:
        out.line("skipped %s %s: %s" % (skip["file"], skip["id"] or "#%s" % skip["index"],
                                        skip["why"]))
    out.line("run %s (%s): restored %d records, skipped %d"
             % (result.run_id, result.operation, result.restored, len(result.skipped)))
    return int(result.exit_code)


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
