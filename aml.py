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

    aml.py .loom/memory monitor health                 # first look: 0 ok, 1 warn, 2 crit, 3 unknown
    aml.py .loom/memory backup create                  # verified snapshot in .loom/memory-backup/
    aml.py .loom/memory prune --dry-run                # what would go, and why
    aml.py .loom/memory prune time_based performance_based
    aml.py .loom/memory prune --undo RUN_ID            # put a run's removed records back
    aml.py .loom/memory optimize all                   # gc, compress cold files, index, warm cache
    aml.py .loom/memory search --tag database --min-confidence 0.7
    aml.py .loom/memory get RECORD_ID
    aml.py .loom/memory backup restore ID --target /tmp/check
    aml.py .loom/memory migrate detect
    aml.py .loom/memory migrate migrate-latest --dry-run
    aml.py .loom/memory monitor report --format html --output report.html

Cron (see crontab.example; quiet on success, one error line and non-zero on failure)::

    0 2 * * *  python3 /path/to/aml.py /path/to/.loom/memory backup auto -q
    0 3 * * 0  python3 /path/to/aml.py /path/to/.loom/memory prune -q
    0 6 * * *  python3 /path/to/aml.py /path/to/.loom/memory monitor health -q

Exit codes::

    0  success
    1  the operation failed (or: nothing found for get/search of an unknown id or agent)
    2  usage error (bad arguments, missing memory path)
    3  finished, but some files could not be read and were skipped
    4  refused by a safety guard (mass deletion, failed safety backup, ...)
    5  store busy: a lock stayed held past the wait limit
    6  integrity failure (a backup or state file does not verify)
    130 interrupted
    monitor health follows the monitoring-plugin convention instead:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN

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
import array
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import difflib
import enum
import errno
import fcntl
import gc as _cyclic_gc
import gzip
import hashlib
import heapq
import html as _html
import http.client
import io
import itertools
import json
import math
import operator
import os
import re
import secrets
import signal
import stat
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

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


_RUNTIME_TS_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})\.(\d{3})Z\Z")


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
    match = _RUNTIME_TS_RE.match(value) if len(value) == 24 else None
    if match:   # the runtime's own form: the same result as below, without the general path
        try:
            y, mo, d, h, mi, s, ms = map(int, match.groups())
            return _dt.datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=_dt.timezone.utc)
        except ValueError:
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
    return indented_json(obj, "\n")


class _NotPlainJson(Exception):
    """A value _indent does not write itself (json.dumps then decides)."""


_JSON_STR = json.encoder.encode_basestring   # the C function when available
_JSON_CONST = {None: "null", True: "true", False: "false"}


def indented_json(obj: Any, pad: str) -> str:
    """Exactly ``json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)`` with every
    newline followed by ``pad[1:]``, written without the pure-Python encoder's generators
    (json.dumps has no C path for indented output; it dominated migrate's rewrites).
    Anything but plain JSON values (NaN, subclasses, non-string keys, cycles) is left
    to json.dumps, errors included."""
    out: List[str] = []
    try:
        _indent(obj, pad, out)
    except (_NotPlainJson, RecursionError):
        text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
        return text.replace("\n", pad) if pad != "\n" else text
    return "".join(out)


def _indent(obj: Any, pad: str, out: List[str]) -> None:
    kind = type(obj)
    if kind is str:
        out.append(_JSON_STR(obj))
    elif kind is dict:
        if not obj:
            out.append("{}")
            return
        inner, sep = pad + "  ", "{"
        for key, value in obj.items():
            if type(key) is not str:
                raise _NotPlainJson()
            out.append(sep + inner + _JSON_STR(key) + ": ")
            sep = ","
            _indent(value, inner, out)
        out.append(pad + "}")
    elif kind is list:
        if not obj:
            out.append("[]")
            return
        inner, sep = pad + "  ", "["
        for value in obj:
            out.append(sep + inner)
            sep = ","
            _indent(value, inner, out)
        out.append(pad + "]")
    elif kind is int:
        out.append(int.__repr__(obj))
    elif kind is float and math.isfinite(obj):
        out.append(float.__repr__(obj))
    elif obj is None or kind is bool:
        out.append(_JSON_CONST[obj])
    else:
        raise _NotPlainJson()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    """Hex SHA-256 of a text's UTF-8 bytes: notices any change to a decoded file."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
    obj, fmt, _ = load_json_text(path, expect)
    return obj, fmt


def load_json_text(path: Path, expect: Optional[type] = None) -> Tuple[Any, FileFormat, str]:
    """Like load_json_file, also returning the decoded text (for splicing rewrites)."""
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
    return obj, fmt, text


def _json_kind(kind: type) -> str:
    return {list: "array", dict: "object", str: "string"}.get(kind, kind.__name__)


def encode_json(obj: Any, fmt: FileFormat) -> bytes:
    """Serialize ``obj`` in the given format (gzip stays gzip, plain stays plain)."""
    chunks = [UTF8_BOM] if fmt.bom else []
    chunks.extend(_runtime_json_chunks(obj))
    if fmt.trailing_newline:
        chunks.append(b"\n")
    data = b"".join(chunks)
    del chunks
    return gzip_bytes(data) if fmt.gzip else data


# Inputs at least this large are deflated in chunks on worker threads (zlib releases the GIL).
GZIP_PARALLEL_MIN = 4 * 1024 * 1024
_GZIP_CHUNK = 1024 * 1024
_GZIP_WINDOW = 32 * 1024
_DEFLATE_WORKERS = max(1, min(4, os.cpu_count() or 1))


def gzip_bytes(data: bytes, level: int = GZIP_LEVEL, mtime: int = 0) -> bytes:
    """One gzip member holding ``data``, as ``gzip.compress`` makes, on every core.

    Large inputs are deflated as pigz does: 1 MiB chunks on worker threads, each primed
    with the 32 KiB before it (so the ratio stays within a fraction of a percent) and
    ended on a byte boundary; the chunks form one deflate stream any gunzip reads.
    """
    if len(data) < GZIP_PARALLEL_MIN or _DEFLATE_WORKERS < 2:
        return gzip.compress(data, compresslevel=level, mtime=mtime)
    view, total = memoryview(data), len(data)

    def deflate(start: int) -> bytes:
        end = min(start + _GZIP_CHUNK, total)
        primer = bytes(view[max(0, start - _GZIP_WINDOW):start])
        packer = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY,
                                  primer) if primer else \
            zlib.compressobj(level, zlib.DEFLATED, -15, 8)
        out = packer.compress(view[start:end])
        return out + packer.flush(zlib.Z_FINISH if end == total else zlib.Z_SYNC_FLUSH)

    with concurrent.futures.ThreadPoolExecutor(max_workers=_DEFLATE_WORKERS) as pool:
        crc = pool.submit(zlib.crc32, view)
        parts = list(pool.map(deflate, range(0, total, _GZIP_CHUNK)))
        xfl = b"\x02" if level == 9 else b"\x04" if level == 1 else b"\x00"
        parts.insert(0, b"\x1f\x8b\x08\x00" + struct.pack("<I", mtime & 0xFFFFFFFF) + xfl
                     + b"\xff")
        parts.append(struct.pack("<II", crc.result(), total & 0xFFFFFFFF))
    return b"".join(parts)


def _runtime_json_chunks(obj: Any) -> List[bytes]:
    """runtime_json(obj) as UTF-8, an array one element at a time: the same bytes, without
    the whole-document chunk list json.dumps(indent=2) builds (about 6x the file's size).
    Every newline in JSON text is structural (strings escape theirs), so indenting an
    element's own text by two spaces gives exactly its text inside the array."""
    if not isinstance(obj, list) or not obj:
        return [runtime_json(obj).encode("utf-8")]
    chunks = [b"[\n  "]
    for n, item in enumerate(obj):
        if n:
            chunks.append(b",\n  ")
        chunks.append(indented_json(item, "\n  ").encode("utf-8"))
    chunks.append(b"\n]")
    return chunks


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


def remove_array_elements(text: str, fmt: FileFormat, positions: Iterable[int]
                          ) -> Optional[bytes]:
    """The file bytes for JSON array ``text`` without the elements at ``positions``, or None.

    Splices the kept elements' original text (no re-serialising: the pure-Python indented
    encoder dominated prune and gc), so a runtime-formatted file comes out byte-identical to
    ``encode_json`` of the kept records. None when the array cannot be split exactly
    (hand-edited separators, empty, invalid) or a position is out of range: encode instead.
    """
    parts = split_json_array(text)
    if parts is None:
        return None
    head, sep, tail, spans = parts
    positions = set(positions)
    if any(not 0 <= i < len(spans) for i in positions):
        return None
    kept = [text[start:end] for n, (start, end) in enumerate(spans) if n not in positions]
    if not kept:
        return encode_json([], fmt)
    data = b"".join([UTF8_BOM if fmt.bom else b"", head.encode("utf-8"),
                     sep.join(kept).encode("utf-8"), tail.encode("utf-8")])
    del kept
    return gzip_bytes(data) if fmt.gzip else data


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


__all__ += ["load_json_text", "split_json_array", "remove_array_elements"]


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
    "avg_time_saved": (("metrics", "avgTimeSavedMs"), ("metrics", "avg_time_saved_ms"),
                       ("avgTimeSavedMs",), ("avg_time_saved_ms",),
                       ("performance", "avg_time_saved_ms"), ("performance", "avgTimeSavedMs")),
    "error_prevention": (("metrics", "errorPreventionCount"), ("metrics", "error_prevention_count"),
                         ("errorPreventionCount",), ("error_prevention_count",),
                         ("performance", "error_prevention_count"),
                         ("performance", "errorPreventionCount")),
    "refinements": (("evolution", "refinements"), ("refinements",), ("lifecycle", "refinements"),
                    ("performance", "refinements")),
}


def first_value(record: Dict[str, Any], field: str) -> Any:
    """The first present value of a logical field across the known layouts, else None."""
    for path in FIELD_PATHS[field]:
        value = record
        for key in path:   # dig(record, *path), inlined: this runs for every record
            if not isinstance(value, dict):
                value = None
                break
            value = value.get(key)
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


def record_id(record: Any) -> Optional[str]:
    """A record's id as record_facts reads it (a non-empty string), else None."""
    rid = record.get("id") if isinstance(record, dict) else None
    return rid if isinstance(rid, str) and rid else None


def _same_text(a: Any, b: Any) -> bool:
    return type(a) is str and type(b) is str and a == b


def record_facts(rtype: RecordType, record: Any) -> RecordFacts:
    """Read the maintenance-relevant facts of a record of any known layout; never raises."""
    rec = record if isinstance(record, dict) else {}
    tags = _tags(rec)
    rid = rec.get("id")
    agent = rec.get("agent")
    stamp, created, last_used = (rec.get("timestamp"), first_value(rec, "created"),
                                 first_value(rec, "last_used"))
    when = parse_timestamp(stamp)
    return RecordFacts(
        rtype=rtype,
        id=rid if isinstance(rid, str) and rid else None,
        agent=agent if isinstance(agent, str) and agent else None,
        timestamp=when,   # the same text twice (often: created) is parsed once
        created=when if _same_text(created, stamp) else parse_timestamp(created),
        last_used=when if _same_text(last_used, stamp) else parse_timestamp(last_used),
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
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, config_file: Optional[Path] = None):
        self.root = Path(root)
        if not self.root.exists():
            raise UsageError("memory path %s does not exist" % self.root)
        if not self.root.is_dir():
            raise UsageError("memory path %s is not a folder" % self.root)
        self.now = now or utcnow()
        self.lock_timeout = lock_timeout
        self.config_file = config_file  # aml config file named on the command line, if any
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

    def load_records_digest(self, data_file: DataFile) -> Tuple[List[Any], str]:
        """Like load_records, with the SHA-256 of the file's decoded text (to notice later
        whether it changed without serialising every record again)."""
        records, _, text = load_json_text(data_file.path, expect=list)
        return records, text_digest(text)

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
        back atomically before the lock is released. When the only change is deleting array
        elements, also set ``removed`` to their original positions: the kept elements' text
        is then spliced from the file instead of re-encoded (same bytes for a runtime-written
        file, several times faster). Raises CorruptFileError or StoreBusyError.
        """
        with self.file_lock(path):
            data, fmt, text = load_json_text(path, expect=expect)
            job = Rewrite(path=Path(path), data=data, fmt=fmt, text=text)
            original = list(data) if isinstance(data, list) else None
            yield job
            if job.changed:
                spliced = _spliced_rewrite(job, text, original)
                job.text = ""
                del text, original
                if spliced is None:
                    job.bytes_written = write_json_file(path, job.data, fmt)
                else:
                    atomic_write_bytes(path, spliced)
                    job.bytes_written = len(spliced)

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
    """aml's own config file: ``path``, else the store's ``config_file`` (``--config``), else
    ``<store>/.aml/config.json`` if present.

    A JSON object whose keys are sections (``prune``, ``backup``, ``optimize``, ``monitor``),
    each mapping config field names to values. Returns {} when there is no file. Raises
    UsageError for an unknown section, CorruptFileError for an unreadable file. Each section's
    consumer rejects unknown field names. Precedence everywhere: built-in defaults < the
    store's ``config.json`` (where a key matches) < this file < command-line flags.
    """
    if path is None:
        path = store.config_file
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
    removed: Optional[Set[int]] = None  # positions deleted, when that is the only change
    text: str = dataclasses.field(default="", repr=False)  # the decoded text as read


def _spliced_rewrite(job: Rewrite, text: str, original: Optional[List[Any]]) -> Optional[bytes]:
    """The spliced bytes for a pure-deletion rewrite, or None to encode ``job.data``.

    Splices only when ``job.data`` is exactly the original elements minus ``removed``
    (checked by identity, so a caller that edits or reorders records is re-encoded)."""
    if job.removed is None or original is None or not isinstance(job.data, list):
        return None
    kept = [r for i, r in enumerate(original) if i not in job.removed]
    if len(kept) != len(job.data) or any(a is not b for a, b in zip(kept, job.data)):
        return None
    return remove_array_elements(text, job.fmt, job.removed)


def _state_body(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"))


def write_checksummed(path: Path, payload: Any) -> None:
    """Write ``{"format", "payload", "sha256"}`` atomically (mode 0600).

    Compact, sorted JSON: deterministic, and serialised once by the C encoder (an indented
    dump takes the pure-Python path, which dominated runs that append to the history).
    """
    atomic_write_bytes(Path(path), checksummed_bytes(payload), mode=0o600)


def checksummed_bytes(payload: Any) -> bytes:
    """The bytes of a checksummed state document (what write_checksummed writes)."""
    body = _state_body(payload)
    text = '{"format":"aml-state-1","payload":%s,"sha256":"%s"}\n' % (
        body, sha256_hex(body.encode("utf-8")))
    return text.encode("utf-8")


def read_checksummed(path: Path, default: Any = None) -> Any:
    """Read a file written by write_checksummed; raises IntegrityError if it does not verify."""
    path = Path(path)
    if not path.exists():
        return default
    try:
        doc, _ = load_json_file(path, expect=dict)
        payload = doc["payload"]
        ok = doc.get("sha256") == sha256_hex(_state_body(payload).encode("utf-8"))
    except (CorruptFileError, KeyError, ValueError) as exc:
        raise IntegrityError("%s: unreadable state file (%s)" % (path, exc)) from None
    if not ok:
        raise IntegrityError("%s: checksum mismatch" % path)
    return payload


ARCHIVE_PART_FORMAT = "aml-archive-part-1"
# A part is this head, then the payload exactly as its sha256 was computed, then "}".
_PART_HEAD = re.compile(br'\{"format": "%s", "sha256": "([0-9a-f]{64})", "payload": '
                        % ARCHIVE_PART_FORMAT.encode("ascii"))


def archived_record_text(record: Any) -> str:
    """A record as compact JSON in its own key order: what an archive part keeps, so a put-back
    record reads exactly as it did (state files sort keys, this text does not)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class Archive:
    """Removed records of each run, written *before* they leave their data files.

    Layout: ``.aml/archive/<run_id>/manifest.json`` (checksummed: run_id, operation, created,
    status ``writing`` then ``complete``, counts, undone) and ``part-NNNN.json.gz`` files, each
    the gzip of ``{"format", "sha256" (of the payload), "payload": {"run_id", "part",
    "entries"}}``. An entry keeps its record once, as ``record_text``; reading gives ``record``
    back in its original key order. Runs of the old layout (``<run_id>.json``) are still read.
    A crash between a part and its file's rewrite leaves a record in both places (undo skips
    ids that are present), never in neither.
    """

    def __init__(self, store: Store):
        self.store = store
        self.folder = store.state_dir / "archive"

    def path_for(self, run_id: str) -> Path:
        """The folder of one run; raises UsageError for an id that is not a plain name."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id or "") or run_id.startswith("."):
            raise UsageError("invalid run id %r" % run_id)
        return self.folder / run_id

    def _legacy_path(self, run_id: str) -> Path:
        return self.path_for(run_id).with_name(run_id + ".json")

    def begin(self, run_id: str, operation: str) -> Path:
        """Create the run's folder and its manifest (status ``writing``)."""
        self.store.ensure_state_dir()
        self.folder.mkdir(mode=0o700, exist_ok=True)
        folder = self.path_for(run_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        write_checksummed(folder / "manifest.json", {
            "run_id": run_id, "operation": operation, "created": format_timestamp(self.store.now),
            "status": "writing", "counts": {}, "undone": None})
        return folder

    def write_part(self, run_id: str, number: int, entries: List[Dict[str, Any]]) -> Path:
        """Write (or atomically replace) part ``number`` of a run begun with ``begin``."""
        payload = {"run_id": run_id, "part": number,
                   "entries": [_compact_entry(e) for e in entries]}
        body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False)
        text = '{"format": "%s", "sha256": "%s", "payload": %s}' % (
            ARCHIVE_PART_FORMAT, sha256_hex(body.encode("utf-8")), body)
        path = self.path_for(run_id) / ("part-%04d.json.gz" % number)
        atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), 6, mtime=0), mode=0o600)
        return path

    def drop_part(self, run_id: str, number: int) -> None:
        """Remove a part whose records stayed in their file after all."""
        folder = self.path_for(run_id)
        with contextlib.suppress(FileNotFoundError):
            (folder / ("part-%04d.json.gz" % number)).unlink()
            fsync_dir(folder)

    def finish(self, run_id: str, counts: Dict[str, int]) -> None:
        """Mark a run's archive complete, with its counts."""
        manifest = self.manifest(run_id)
        manifest.update(status="complete", counts=counts)
        write_checksummed(self.path_for(run_id) / "manifest.json", manifest)

    def save(self, run_id: str, operation: str, entries: List[Dict[str, Any]]) -> Path:
        """Persist the removed records of a small run as one part (entries per contracts.md)."""
        folder = self.begin(run_id, operation)
        self.write_part(run_id, 1, entries)
        self.finish(run_id, {"entries": len(entries), "parts": 1})
        return folder

    def manifest(self, run_id: str) -> Dict[str, Any]:
        """A run's manifest (entries not included); raises UsageError/IntegrityError."""
        payload = read_checksummed(self.path_for(run_id) / "manifest.json")
        if payload is None:
            payload = read_checksummed(self._legacy_path(run_id))
            if payload is None:
                raise UsageError("no archived run %r in %s" % (run_id, self.folder))
            payload = {k: v for k, v in payload.items() if k != "entries"}
            payload.update(status="complete", legacy=True)
        return payload

    def part_names(self, run_id: str) -> List[str]:
        """The run's part file names in writing order (``""`` names an old single-file run)."""
        folder = self.path_for(run_id)
        if not folder.is_dir():
            return [""] if self._legacy_path(run_id).exists() else []
        names = [p.name for p in folder.glob("part-*.json.gz")]
        return sorted(names, key=lambda n: (len(n), n))  # part-10000 after part-9999

    def read_part(self, run_id: str, name: str, records: bool = True) -> List[Dict[str, Any]]:
        """The entries of one part, each with ``record`` (without it, and unparsed, when
        ``records`` is False); raises IntegrityError if the part does not verify."""
        if name == "":
            entries = read_checksummed(self._legacy_path(run_id), {}).get("entries", [])
            return [_legacy_entry(e) for e in entries]
        path = self.path_for(run_id) / name
        try:
            data = gzip.decompress(path.read_bytes())
            head = _PART_HEAD.match(data)
            if not head or not data.endswith(b"}"):
                raise ValueError("not an %s document" % ARCHIVE_PART_FORMAT)
            body = memoryview(data)[head.end():-1]
            ok = head.group(1).decode("ascii") == hashlib.sha256(body).hexdigest()
            entries = parse_json_text(str(body, "utf-8"))["entries"] if ok else []
            del body, data
            entries = [_full_entry(e) if records else e for e in entries]
        except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError("%s: unreadable archive part (%s)" % (path, exc)) from None
        if not ok:
            raise IntegrityError("%s: checksum mismatch" % path)
        return entries

    def load(self, run_id: str) -> Dict[str, Any]:
        """A run's manifest plus all its ``entries`` (for small runs; big ones: read_part)."""
        payload = self.manifest(run_id)
        payload["entries"] = [e for name in self.part_names(run_id)
                              for e in self.read_part(run_id, name)]
        return payload

    def runs(self) -> List[str]:
        """Archived run ids, oldest first."""
        if not self.folder.is_dir():
            return []
        names = {p.name for p in self.folder.iterdir() if (p / "manifest.json").is_file()}
        names.update(p.stem for p in self.folder.glob("*.json"))
        return sorted(n for n in names if not n.startswith("."))

    def mark_undone(self, run_id: str, when: _dt.datetime) -> None:
        """Record that a run was undone (its parts stay, for the record)."""
        path = self.path_for(run_id) / "manifest.json"
        if not path.exists():
            path = self._legacy_path(run_id)
        payload = read_checksummed(path)
        payload["undone"] = format_timestamp(when)
        write_checksummed(path, payload)


def _compact_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """An entry as a part stores it: the record once, as text in its own key order."""
    if "record_text" in entry and "record" not in entry:
        return entry
    compact = {k: v for k, v in entry.items() if k != "record"}
    compact["record_text"] = archived_record_text(entry.get("record"))
    return compact


def _full_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A stored entry with ``record`` parsed back from its text (key order kept)."""
    full = {k: v for k, v in entry.items() if k != "record_text"}
    full["record"] = parse_json_text(entry["record_text"])
    return full


def _legacy_entry(entry: Dict[str, Any]) -> Dict[str, Any]:
    """An old-layout entry (``record``, maybe ``record_text``) with its record in original
    key order when the text agrees."""
    full = {k: v for k, v in entry.items() if k != "record_text"}
    text = entry.get("record_text")
    if isinstance(text, str):
        with contextlib.suppress(ValueError):
            ordered = parse_json_text(text)
            if ordered == entry.get("record"):
                full["record"] = ordered
    return full

# =============================================================================
# 8. Backup and restore
# Snapshots of the store in a content-addressed repository under backup_root.
# =============================================================================
# Only this section needs these; importing them here keeps the shared import block stable.


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
BLOCK_SIZE = 1024 * 1024         # uncompressed bytes per zlib block inside a pack
MAX_DELTA_DEPTH = 64             # item lists chain at most this many deltas before a full list
BLOCK_CACHE_BYTES = 32 * 1024 * 1024  # decompressed blocks kept while reading a repository
VERIFY_BATCH_OBJECTS = 65536     # objects verify checks together (bounds its memory)
RESTORE_WORKERS = 2              # files rebuilt, checked and written at once by restore
PACK_REWRITE_DEAD_SHARE = 0.2    # rotate rewrites a pack once this share of its bytes is garbage
_PACK_MAGIC = b"AMLPACK1"
_IDX_MAGIC = b"AMLIDX03"           # object rows sorted by key
_IDX_MAGIC_UNSORTED = b"AMLIDX02"  # older indexes: still read (no binary search)
_PROBES_BEFORE_MAP = 2048          # lookups by binary search before building the full map
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
        if self.backup_root is not None and not isinstance(self.backup_root, (str, os.PathLike)):
            raise UsageError("backup_root must be a path, not %r" % (self.backup_root,))
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
    repaired: List[str] = dataclasses.field(default_factory=list)


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
    other_stores: int = 0


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
    repaired: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Trusted:
    """What the verification right after a backup need not read again (packs are immutable).

    ``pack``: the pack this backup just wrote, once its bytes on disk match the SHA-256
    computed while writing them (its objects were hashed from the bytes read from the
    store). ``entries``: path -> entry of the verified snapshot an incremental builds on;
    an identical entry is skipped, and a changed one's objects that the verified entry
    also used are not read again. ``backup verify`` trusts nothing.
    """

    pack: Optional[str] = None
    pack_sha256: bytes = b""
    entries: Dict[str, Any] = dataclasses.field(default_factory=dict)


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
    warnings: List[str] = dataclasses.field(default_factory=list)


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
    """Appends new objects to one new pack, compressing 1 MiB blocks on worker threads.

    The pack is written under its final name but stays invisible until ``commit`` writes
    its index (after fsync of the pack); a pack without an index is a leftover.
    """

    def __init__(self, packs_dir: Path, level: int, known: Callable[[bytes], bool]):
        self.name = _new_pack_name(packs_dir)
        self.path = packs_dir / (self.name + ".pack")
        self.level = level
        self.known = known
        # key (first KEY_LEN bytes of the SHA-256) -> packed (block, offset, length): compact,
        # as a first full backup holds one per record until the index is written.
        self.entries: Dict[bytes, bytes] = {}
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
        self._sha = hashlib.sha256(_PACK_MAGIC)   # of the pack's bytes, for a cheap re-check
        # zlib releases the GIL: compressing blocks on threads overlaps with JSON scanning.
        workers = max(1, min(4, os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def add(self, digest: bytes, data: bytes, meta: bool = False) -> bool:
        """Queue one object unless the repository or this pack has it; True if added.

        ``meta`` objects (item lists) go to their own blocks, so reading a snapshot's lists
        does not decompress record blocks.
        """
        if digest[:KEY_LEN] in self.entries or digest in self._queued or self.known(digest):
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
            self.entries[digest[:KEY_LEN]] = struct.pack("<III", block_no, offset, len(data))
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
        self._sha.update(data)
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

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the pack file's bytes as written."""
        return self._sha.digest()

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


def _new_pack_name(packs_dir: Path) -> str:
    """``pack-<14 digits>-<random>``, sorting after every existing pack.

    The last pack holding a key wins a lookup (a repaired copy must beat the damaged one),
    so when the clock is behind the newest pack's stamp (set back, or a pack written in the
    same second) the stamp is the newest one's plus one: fixed length, still ordered.
    """
    stamp = int(time.strftime("%Y%m%d%H%M%S"))
    newest = max((p.stem for p in packs_dir.glob("pack-*.idx")), default="")
    match = re.match(r"pack-(\d{14})-", newest)
    if match:
        stamp = max(stamp, int(match.group(1)) + 1)
    return "pack-%014d-%s" % (stamp, secrets.token_hex(4))


def _encode_index(blocks: List[Tuple[int, int, int]], entries: Dict[bytes, bytes]) -> bytes:
    """Magic, SHA-256 of the payload, then the zlib payload: blocks and object locations.

    Objects are keyed by the first 12 bytes of their SHA-256 (the full digest lives in the
    manifest or item list that references them and is checked on every read). Rows are
    sorted by key, so a few lookups need no map (binary search in the raw table).
    """
    parts = [struct.pack("<I", len(blocks))]
    parts.extend(struct.pack("<QII", *b) for b in blocks)
    parts.append(struct.pack("<I", len(entries)))
    parts.extend(key + entries[key] for key in sorted(entries))
    payload = b"".join(parts)
    return _IDX_MAGIC + hashlib.sha256(payload).digest() + zlib.compress(payload, 6)


_ROW = KEY_LEN + 12   # bytes per object row in a pack index: key, block, offset, length


class _PackIndex:
    """One pack's decoded index: its block table and its object rows (raw bytes)."""

    def __init__(self, name: str, blocks: List[Tuple[int, int, int]], table: bytes,
                 sorted_keys: bool):
        self.name = name
        self.blocks = blocks
        self.table = table
        self.count = len(table) // _ROW
        self.sorted_keys = sorted_keys

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, row: int) -> bytes:
        """The key of a row (lets ``bisect`` search the raw table)."""
        if not 0 <= row < self.count:
            raise IndexError(row)
        return self.table[row * _ROW:row * _ROW + KEY_LEN]

    def keys(self) -> List[bytes]:
        """Every key, in row order."""
        table = self.table
        return [table[i:i + KEY_LEN] for i in range(0, len(table), _ROW)]

    def loc(self, row: int) -> Tuple[int, int, int]:
        """(block, offset, length) of a row."""
        return struct.unpack_from("<III", self.table, row * _ROW + KEY_LEN)

    def find(self, key: bytes) -> Optional[int]:
        """The row of a key by binary search (sorted indexes only), or None."""
        row = bisect.bisect_left(self, key)
        return row if row < self.count and self[row] == key else None


def _decode_index(path: Path, raw: bytes) -> _PackIndex:
    try:
        payload = zlib.decompress(raw[40:])
    except zlib.error:
        payload = b""
    magic = raw[:8]
    if magic not in (_IDX_MAGIC, _IDX_MAGIC_UNSORTED) \
            or hashlib.sha256(payload).digest() != raw[8:40]:
        raise IntegrityError("%s: pack index checksum mismatch" % path)
    try:
        nblocks = struct.unpack_from("<I", payload, 0)[0]
        pos = 4 + 16 * nblocks
        blocks = list(struct.iter_unpack("<QII", payload[4:pos]))
        nobj = struct.unpack_from("<I", payload, pos)[0]
        table = payload[pos + 4:]
        if len(blocks) != nblocks or len(table) != _ROW * nobj:
            raise ValueError("size")
    except (struct.error, ValueError):
        raise IntegrityError("%s: malformed pack index" % path) from None
    return _PackIndex(path.stem, blocks, table, magic == _IDX_MAGIC)


class _ObjectStore:
    """Read side of the repository: every committed pack's objects, checked on every read.

    Indexes are decoded to raw sorted tables; the key-to-location map over all packs is
    built only when many objects are looked up (a no-change incremental looks up a few).
    """

    def __init__(self, packs_dir: Path):
        self.packs_dir = packs_dir
        self.packs: Dict[str, _PackIndex] = {}
        self.problems: List[str] = []
        self._where: Optional[Dict[bytes, int]] = None
        self._probes = 0
        self._cache: Dict[Tuple[str, int], bytes] = {}
        self._cached = 0
        self._cache_lock = threading.Lock()   # restore reads files on worker threads
        self._map_lock = threading.Lock()
        # By stem, not file name: "pack-X-1.idx" sorts after "pack-X.idx" (see where).
        found = sorted(packs_dir.glob("pack-*.idx"), key=lambda p: p.stem) \
            if packs_dir.is_dir() else []
        for idx in found:
            try:
                self.packs[idx.stem] = _decode_index(idx, idx.read_bytes())
            except (OSError, IntegrityError) as exc:
                self.problems.append(str(exc))
        self.pack_list = list(self.packs.values())

    @property
    def where(self) -> Dict[bytes, int]:
        """{key: pack number << 32 | row} over every pack (one int per object keeps it
        small); the last pack (by name, so the newest) holding a key wins: a copy written
        by a repair replaces a damaged one. See ``at``."""
        if self._where is not None:
            return self._where
        with self._map_lock:   # restore's worker threads may all ask at once
            if self._where is None:
                where: Dict[bytes, int] = {}
                for number in range(len(self.pack_list)):
                    pack = self.pack_list[number]
                    where.update(zip(pack.keys(), range(number << 32,
                                                        (number << 32) + pack.count)))
                self._where = where
        return self._where

    def at(self, code: int) -> Tuple[_PackIndex, int]:
        """The (pack, row) a ``where`` value names."""
        return self.pack_list[code >> 32], code & 0xFFFFFFFF

    def _locate(self, key: bytes) -> Optional[Tuple[_PackIndex, int]]:
        """(pack, row) of a key, or None."""
        if self._where is None and self._probes < _PROBES_BEFORE_MAP:
            self._probes += 1
            if all(p.sorted_keys for p in self.packs.values()):
                for pack in reversed(self.pack_list):
                    row = pack.find(key)
                    if row is not None:
                        return pack, row
                return None
        code = self.where.get(key)
        return None if code is None else self.at(code)

    def has(self, digest: bytes) -> bool:
        """True if a committed pack indexes this object."""
        return self._locate(digest[:KEY_LEN]) is not None

    def intact(self, digest: bytes) -> bool:
        """True if a committed pack holds this object and it reads back with its SHA-256."""
        try:
            self.get(digest)
        except IntegrityError:
            return False
        return True

    def get(self, digest: bytes, check: bool = True) -> bytes:
        """The object's bytes; raises IntegrityError if missing, unreadable or not matching.

        ``check=False`` skips the per-object SHA-256 (the length is still checked) for
        callers that verify the SHA-256 of the whole rebuilt file instead.
        """
        found = self._locate(digest[:KEY_LEN])
        if found is None:
            raise IntegrityError("object %s is missing" % digest.hex()[:16])
        pack, row = found
        block_no, off, length = pack.loc(row)
        data = self._block(pack.name, block_no)[off:off + length]
        if len(data) != length or (check and hashlib.sha256(data).digest() != digest):
            raise IntegrityError("object %s in %s.pack: checksum mismatch"
                                 % (digest.hex()[:16], pack.name))
        return data

    def get_unchecked(self, digests: Sequence[bytes]) -> List[bytes]:
        """The bytes of many objects, in order, with lengths checked but not SHA-256s (for
        callers that check the SHA-256 of the whole file they make); raises IntegrityError."""
        where, out, last, block = self.where, [], None, b""
        for digest in digests:
            code = where.get(digest[:KEY_LEN])
            if code is None:
                raise IntegrityError("object %s is missing" % digest.hex()[:16])
            pack, row = self.at(code)
            block_no, off, length = struct.unpack_from("<III", pack.table,
                                                       row * _ROW + KEY_LEN)
            if (pack.name, block_no) != last:
                last = (pack.name, block_no)
                block = self._block(*last)
            data = block[off:off + length]
            if len(data) != length:
                raise IntegrityError("object %s in %s.pack: truncated"
                                     % (digest.hex()[:16], pack.name))
            out.append(data)
        return out

    def check_many(self, digests: Iterable[bytes]) -> Dict[bytes, str]:
        """Check objects block by block (each block read and decompressed once, the next
        ones on worker threads); returns {digest: problem}."""
        bad: Dict[bytes, str] = {}
        by_block: Dict[Tuple[str, int], List[Tuple[int, int, bytes]]] = {}
        where = self.where
        for digest in set(digests):
            code = where.get(digest[:KEY_LEN])
            if code is None:
                bad[digest] = "object %s is missing" % digest.hex()[:16]
                continue
            pack, row = self.at(code)
            block_no, off, length = pack.loc(row)
            by_block.setdefault((pack.name, block_no), []).append((off, length, digest))
        sha256 = hashlib.sha256
        for key, block in _prefetched(self._read_block_safe, sorted(by_block)):
            for off, length, digest in by_block[key]:
                if isinstance(block, IntegrityError):
                    bad[digest] = str(block)
                elif length > len(block) - off or sha256(block[off:off + length]).digest() \
                        != digest:
                    bad[digest] = "object %s in %s.pack: checksum mismatch" % (
                        digest.hex()[:16], key[0])
        return bad

    def _read_block_safe(self, key: Tuple[str, int]) -> Any:
        """A block's bytes (as a memoryview), or the IntegrityError reading it raised."""
        try:
            return memoryview(self._read_block(*key))
        except IntegrityError as exc:
            return exc

    def _block(self, name: str, block_no: int) -> bytes:
        key = (name, block_no)
        data = self._cache.get(key)
        if data is None:
            # Decompressed outside the lock (zlib releases the GIL); a block two threads
            # read at once is decompressed twice, which is harmless.
            data = self._read_block(name, block_no)
            with self._cache_lock:
                if key not in self._cache:
                    while self._cache and self._cached + len(data) > BLOCK_CACHE_BYTES:
                        self._cached -= len(self._cache.pop(next(iter(self._cache))))
                    self._cache[key] = data
                    self._cached += len(data)
        return data

    def _read_block(self, name: str, block_no: int) -> bytes:
        path = self.packs_dir / (name + ".pack")
        try:
            offset, clen, ulen = self.packs[name].blocks[block_no]
            with open(str(path), "rb") as handle:
                handle.seek(offset)
                data = zlib.decompress(handle.read(clen))
        except (OSError, IndexError, zlib.error) as exc:
            raise IntegrityError("%s: block %d unreadable (%s)" % (path, block_no, exc)) from None
        if len(data) != ulen:
            raise IntegrityError("%s: block %d has the wrong size" % (path, block_no))
        return data


def _prefetched(func: Callable[[Any], Any], keys: List[Any],
                ahead: int = 2) -> Iterator[Tuple[Any, Any]]:
    """``(key, func(key))`` in order, computing up to ``ahead`` results on worker threads;
    memory holds at most ``ahead + 1`` results."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=ahead) as pool:
        pending: collections.deque = collections.deque()
        for key in keys:
            pending.append((key, pool.submit(func, key)))
            if len(pending) > ahead:
                done_key, future = pending.popleft()
                yield done_key, future.result()
        while pending:
            done_key, future = pending.popleft()
            yield done_key, future.result()


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
    data = checksummed_bytes(payload)
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
        # A relative backup_root is taken from the working directory now, once (as any path
        # a library caller passes); the config file's are made absolute by backup_config_for.
        self.root = Path(os.path.abspath(str(root))) if root else \
            store_parent(store) / "memory-backup"
        if self.root.resolve().is_relative_to(store.root.resolve()):
            raise UsageError("backup root %s is inside the store; it would back itself up"
                             % self.root)
        self.repo = self.root / REPO_DIR_NAME
        self.packs = self.repo / "packs"
        self.snapshots_dir = self.repo / "snapshots"
        self.progress: Callable[[str], None] = lambda text: None   # the CLI shows it on a TTY
        self._manifests: Dict[str, Dict[str, Any]] = {}
        self._fresh_pack: Optional[str] = None   # the pack the last create wrote
        self._trusted = _Trusted()               # what the last create may skip verifying

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
        if backup_id not in self._manifests:   # manifests never change once written
            payload = read_checksummed(path)
            if not isinstance(payload, dict) or payload.get("format") != _MANIFEST_FORMAT \
                    or not isinstance(payload.get("files"), list):
                raise IntegrityError("%s: not an aml backup manifest" % path)
            self._manifests[backup_id] = payload
        return self._manifests[backup_id]

    def own_snapshot_ids(self) -> List[str]:
        """Ids of this store's readable snapshots, oldest first.

        A backup root may be shared by several stores; rotation, ``--at``, ``auto`` and the
        incremental baseline only ever use the store's own snapshots.
        """
        return [i for i in self.snapshot_ids() if self._is_own(i)]

    def _is_own(self, backup_id: str) -> bool:
        try:
            return self.load_manifest(backup_id).get("store") == str(self.store.root.resolve())
        except AmlError:
            return False

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
        newest = next((i for i in reversed(self.snapshot_ids()) if self._is_own(i)), None)
        return self.load_manifest(newest) if newest else None

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
            if marks.get(backup_id, {}).get("ok") is True and self._is_own(backup_id):
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
                             reason: Optional[str], verify: Optional[bool] = None,
                             trust_baseline: bool = True) -> BackupResult:
        """``trust_baseline=False``: verify every object the snapshot uses, even those of
        the verified snapshot it builds on (the safety copy before a restore)."""
        started, clock = self.store.now, time.monotonic()
        result = self._create_locked(btype, agents, reason)
        if not trust_baseline:
            self._trusted.entries = {}
        wanted = self.config.verify_after_backup if verify is None else verify
        # A full backup never trusts the objects it deduplicated against, verify or not.
        if wanted or result.type is BackupType.FULL:
            check = self._verify_and_repair(result, check_first=wanted)
            if wanted:
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
            # One file is read, inflated and hashed ahead on a worker thread.
            for n, (rel, read) in enumerate(_prefetched(snap.preread, paths, ahead=1), 1):
                self.progress("backup: file %d of %d" % (n, len(paths)))
                entries.append(snap.file_entry(rel, writer, read))
            entries = [e for e in entries if e]
            bytes_added = writer.commit()
            self._fresh_pack = writer.name if writer.committed else None
            self._trusted = self._trust_after_create(btype, previous, writer)
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
            summary = {"backup_id": backup_id, "ok": backup_id not in check.failed,
                       "deep": check.deep}
            if check.repaired:
                summary["repaired"] = check.repaired
            self.store.record_operation("verify", started, time.monotonic() - clock, summary)

    # -- repair ---------------------------------------------------------------
    def _verify_and_repair(self, result: BackupResult, check_first: bool = True) -> VerifyResult:
        """Verify a new snapshot; if objects it uses are damaged or missing, write fresh
        copies from the store's files (which the backup just read) and verify again.

        ``check_first=False`` (a full backup not asked to verify) checks only the objects it
        reused, not those it has just written, and verifies only after a repair.
        """
        if check_first:
            check = self._verify_locked([result.backup_id], deep=False, trusted=self._trusted)
            if check.ok:
                return check
        fresh = None if check_first else self._fresh_pack
        repaired, objects_added, bytes_added = self._repair(result.backup_id, fresh)
        if not repaired:
            if check_first or objects_added < 0:   # damaged beyond repair: say what
                return check if check_first else self._verify_locked([result.backup_id], False)
            return VerifyResult(backup_ids=[result.backup_id], deep=False, ok=True,
                                files_checked=0, objects_checked=0, problems=[])
        result.repaired = repaired
        result.objects_added += objects_added
        result.bytes_added += bytes_added
        check = self._verify_locked([result.backup_id], deep=False, trusted=self._trusted)
        check.repaired = repaired
        return check

    def _repair(self, backup_id: str, fresh: Optional[str] = None) -> Tuple[List[str], int, int]:
        """Re-read each file of the snapshot whose objects do not check (those in pack
        ``fresh``, just written, are trusted) and store its objects again in a new pack (data,
        index, then the manifest if an entry changed, as any backup). Returns what was
        repaired, the objects and the bytes added (objects -1: damage left unrepaired)."""
        manifest = self.load_manifest(backup_id)
        objects = _ObjectStore(self.packs)
        damaged = _damaged_entries(manifest["files"], objects, fresh)
        if not damaged:
            return [], 0, 0
        snap = _SnapshotBuilder(self, objects, None, incremental=False)
        # Only objects that read back intact count as present: damaged ones are written anew.
        writer = _PackWriter(self.packs, self.config.compression_level, objects.intact)
        files, fixed = list(manifest["files"]), []
        try:
            for n in damaged:
                entry = snap.file_entry(files[n]["path"], writer)
                if entry is not None:   # unreadable now: the snapshot stays damaged
                    files[n] = entry
                    fixed.append(entry["path"])
            added = writer.commit()
            if files != manifest["files"]:
                _write_manifest(self.manifest_path(backup_id), dict(manifest, files=files))
                self._manifests.pop(backup_id, None)
        except BaseException:
            writer.abort()
            raise
        if not writer.entries:
            return [], -1, 0
        names = ", ".join(fixed[:5]) + (" and %d more file(s)" % (len(fixed) - 5)
                                        if len(fixed) > 5 else "")
        return ["%d object(s) of %s written again to %s.pack"
                % (len(writer.entries), names, writer.name)], len(writer.entries), added

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
            backup_id = backup_id or (self.own_snapshot_ids() or ids)[-1]
            if not self.manifest_path(backup_id).exists():
                raise UsageError("no backup %r in %s" % (backup_id, self.repo))
            ids = [backup_id]
        with self._repo_lock(exclusive=True):
            result = self._verify_locked(ids, deep)
            self._record_verify(result, started, clock)
        return result

    def _trust_after_create(self, btype: BackupType, previous: Optional[Dict[str, Any]],
                            writer: _PackWriter) -> _Trusted:
        """What verifying the snapshot just made may skip: its fresh pack and, for an
        incremental on a snapshot whose last verification passed, that snapshot's entries.
        A full backup never trusts objects it deduplicated against."""
        trusted = _Trusted()
        if writer.committed:
            trusted.pack, trusted.pack_sha256 = writer.name, writer.sha256
        marks = self._verified() if btype is BackupType.INCREMENTAL and previous else {}
        mark = marks.get(str(previous.get("id"))) if previous else None
        if isinstance(mark, dict) and mark.get("ok") is True:
            trusted.entries = {e.get("path"): e for e in previous["files"]
                               if isinstance(e, dict)}
        return trusted

    def _verify_locked(self, ids: List[str], deep: bool,
                       trusted: Optional[_Trusted] = None) -> VerifyResult:
        objects = _ObjectStore(self.packs)
        if trusted is not None and trusted.pack and not _pack_matches(
                self.packs / (trusted.pack + ".pack"), trusted.pack_sha256):
            trusted = dataclasses.replace(trusted, pack=None)   # read every object of it
        # Objects shared by several snapshots are checked once; one snapshot keeps no set.
        checked: Optional[Dict[bytes, Optional[str]]] = {} if len(ids) > 1 else None
        result = VerifyResult(backup_ids=list(ids), deep=deep, ok=True, files_checked=0,
                              objects_checked=0, problems=list(objects.problems))
        for backup_id in ids:
            before = len(result.problems)
            try:
                manifest = self.load_manifest(backup_id)
            except AmlError as exc:
                result.problems.append("%s: %s" % (backup_id, exc))
            else:
                problems, count = _verify_files(manifest["files"], objects, checked, deep,
                                                trusted)
                result.problems.extend("%s: %s" % (backup_id, p) for p in problems)
                result.files_checked += len(manifest["files"])
                result.objects_checked += count
            if len(result.problems) > before:
                result.failed.append(backup_id)
        result.ok = not result.problems
        return result

    # -- restore --------------------------------------------------------------
    def snapshot_at(self, moment: _dt.datetime, agents: Optional[Sequence[str]] = None) -> str:
        """The newest snapshot taken at or before ``moment`` covering ``agents``; UsageError."""
        for backup_id in reversed(self.own_snapshot_ids()):
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
                plan.check()   # a corrupt backup fails even when nothing would change
                return result
            if not live and not force and plan.target_had_files:
                raise RefusedError("--target %s is not empty; use --force to restore into it"
                                   % root)

            def before_swap() -> None:   # every staged file is checked by now
                if live:
                    safety = self._safety_snapshot(backup_id)
                    result.safety_backup = safety.backup_id
                    # e.g. a corrupt file it kept as exact bytes: the restore goes on (that
                    # file is being replaced) but the user learns what the snapshot holds.
                    result.warnings.extend("safety backup %s: %s" % (safety.backup_id, w)
                                           for w in safety.warnings)
                    result.warnings.extend(
                        "safety backup %s: repaired damaged backup data: %s"
                        % (safety.backup_id, r) for r in safety.repaired)

            plan.apply(before_swap)
        self.store.record_operation("restore", started, time.monotonic() - clock, {
            "backup_id": backup_id, "target": str(root.resolve()),
            "created": len(result.created), "replaced": len(result.replaced),
            "removed": len(result.removed), "safety_backup": result.safety_backup})
        return result

    def _safety_snapshot(self, backup_id: str) -> BackupResult:
        """A verified snapshot of the live store before a restore; RefusedError if incomplete."""
        safety = self._snapshot_and_verify(BackupType.INCREMENTAL, None,
                                           "before restore of %s" % backup_id,
                                           trust_baseline=False)
        if safety.skipped:
            raise RefusedError("nothing restored: the safety backup %s could not read %s"
                               % (safety.backup_id, ", ".join(safety.skipped)))
        return safety

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
        ids = self.own_snapshot_ids()
        kept = self.retained(ids, keep_daily, keep_weekly, keep_monthly)
        deleted = [i for i in ids if i not in kept]
        result = RotateResult(dry_run=dry_run, deleted=deleted, kept=kept, objects_freed=0,
                              bytes_freed=0, packs_rewritten=0)
        objects = _ObjectStore(self.packs)
        # Space is freed against every remaining snapshot, other stores' included.
        remaining = [i for i in self.snapshot_ids() if i not in deleted]
        live = self._reachable(remaining, objects, result.warnings)
        if not dry_run:
            for backup_id in deleted:
                self.manifest_path(backup_id).unlink()
                self._manifests.pop(backup_id, None)
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
            ids = [i for i in self.own_snapshot_ids() if self._whole_store(i)]
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
        own = set(self.own_snapshot_ids())
        for backup_id in self.snapshot_ids():
            try:
                m = self.load_manifest(backup_id)
            except AmlError as exc:
                result.problems.append("%s: %s" % (backup_id, exc))
                continue
            if backup_id not in own:
                result.other_stores += 1
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


def _damaged_entries(entries: List[Any], objects: _ObjectStore,
                     fresh: Optional[str] = None) -> List[int]:
    """Positions of the manifest entries with an object (or item list) that does not check;
    objects whose copy is in pack ``fresh`` are not checked."""
    lists, needs, damaged = _Lists(objects), {}, []
    for n, entry in enumerate(entries):
        try:
            needs[n] = _entry_objects(entry, lists)
        except (AmlError, ValueError, KeyError, TypeError, AttributeError):
            damaged.append(n)
    where = objects.where
    skip = next((n for n, p in enumerate(objects.pack_list) if p.name == fresh), -1)
    bad = objects.check_many(d for ds in needs.values() for d in ds
                             if (where.get(d[:KEY_LEN], -1) >> 32) != skip or skip < 0)
    damaged.extend(n for n, ds in needs.items() if any(d in bad for d in ds))
    return sorted(damaged)


def _verify_files(entries: List[Any], objects: _ObjectStore,
                  checked: Optional[Dict[bytes, Optional[str]]],
                  deep: bool, trusted: Optional[_Trusted] = None) -> Tuple[List[str], int]:
    """Problems of one manifest's files and the number of objects checked. Files go in
    batches of about VERIFY_BATCH_OBJECTS objects, so memory does not grow with the store.
    ``trusted`` (right after a backup, not deep) names what need not be read again."""
    problems: List[str] = []
    batch: List[Tuple[Dict[str, Any], List[bytes]]] = []
    size = count = 0
    for n, entry in enumerate(entries, 1):
        try:
            safe_relpath(entry.get("path"))
            digests = _untrusted_objects(entry, objects, trusted)
        except (AmlError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append("%s: %s" % (_entry_path(entry), exc))
        else:
            batch.append((entry, digests))
            size += len(digests)
        if batch and (size >= VERIFY_BATCH_OBJECTS or n == len(entries)):
            count += _verify_batch(batch, objects, checked, deep, problems)
            batch, size = [], 0
    return problems, count


def _untrusted_objects(entry: Dict[str, Any], objects: _ObjectStore,
                       trusted: Optional[_Trusted]) -> List[bytes]:
    """The objects of an entry a verification must read (all of them unless ``trusted``)."""
    if trusted is None:
        return _entry_objects(entry, _Lists(objects))
    base = trusted.entries.get(entry.get("path"))
    if base is not None and base == entry:
        return []
    lists = _Lists(objects)
    digests = _entry_objects(entry, lists)
    if base is not None:
        with contextlib.suppress(AmlError, ValueError, KeyError, TypeError, AttributeError):
            known = set(_entry_objects(base, lists))
            digests = [d for d in digests if d not in known]
    if trusted.pack and digests:
        where = objects.where
        fresh = next((n for n, p in enumerate(objects.pack_list) if p.name == trusted.pack), -1)
        digests = [d for d in digests if (where.get(d[:KEY_LEN], -1) >> 32) != fresh
                   or fresh < 0]
    return digests


def _pack_matches(path: Path, digest: bytes) -> bool:
    """True if a pack file's bytes have this SHA-256 (read in 1 MiB blocks)."""
    sha = hashlib.sha256()
    try:
        with open(str(path), "rb") as handle:
            for block in iter(lambda: handle.read(BLOCK_SIZE), b""):
                sha.update(block)
    except OSError:
        return False
    return sha.digest() == digest


def _verify_batch(batch: List[Tuple[Dict[str, Any], List[bytes]]], objects: _ObjectStore,
                  checked: Optional[Dict[bytes, Optional[str]]], deep: bool,
                  problems: List[str]) -> int:
    """Check a batch's objects block by block, then (deep) rebuild and parse each good file."""
    todo = {d for _, ds in batch for d in ds}
    new = todo if checked is None else {d for d in todo if d not in checked}
    bad = objects.check_many(new)
    if checked is not None:   # remember each result, problems included, for later snapshots
        checked.update(dict.fromkeys(new))
        checked.update(bad)
        bad = {d: checked[d] for d in todo if checked[d]}
    for entry, digests in batch:
        wrong = next((bad[d] for d in digests if d in bad), None)
        if wrong:
            problems.append("%s: %s" % (_entry_path(entry), wrong))
        elif deep:   # one file at a time: memory is bounded by the largest file
            problems.extend(_deep_check(entry, objects, None))
    return len(new)


def _deep_check(entry: Dict[str, Any], objects: _ObjectStore,
                lists: Optional[_Lists]) -> List[str]:
    try:
        _check_parses(entry, read_file_content(entry, objects, lists))
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


def read_file_content(entry: Dict[str, Any], objects: _ObjectStore,
                      lists: Optional[_Lists] = None) -> bytes:
    """One file's content (decompressed for gzip files) read from the repository and checked
    against its recorded SHA-256; holds only that file. Raises IntegrityError, KeyError..."""
    digests = _entry_objects(entry, lists or _Lists(objects))
    # Objects are not hashed one by one: the SHA-256 of the whole file covers them all.
    if entry["kind"] == "blob":
        content = objects.get_unchecked(digests[:1])[0]
        expected = entry["sha256"]
    else:
        items = digests[len(digests) - entry["count"]:] if entry["count"] else []
        parts = objects.get_unchecked(items)
        # One join (separators interleaved) so the file is copied once, not twice.
        sep = entry["sep"].encode("utf-8")
        framed = [sep] * max(2 * len(parts) - 1, 0)
        framed[0::2] = parts
        del parts
        head = (UTF8_BOM if entry["bom"] else b"") + entry["head"].encode("utf-8")
        content = b"".join([head] + framed + [entry["tail"].encode("utf-8")])
        expected = entry["content_sha256"]
    if sha256_hex(content) != expected:
        raise IntegrityError("rebuilt content does not match its recorded SHA-256")
    return content


def encode_restored(entry: Dict[str, Any], content: bytes) -> bytes:
    """The bytes to write for a rebuilt file: gzip files are gzip again (same content).

    One zlib stream, not gzip_bytes' chunks: its bytes are those the file had when it was
    written by this same zlib at this level (restore already rebuilds files two at a time)."""
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
        self.backup_id = manifest["id"]
        self.entries = self._entries(manifest, scope)
        self.objects = _ObjectStore(manager.packs)
        self.created: List[str] = []
        self.replaced: List[str] = []
        self.unchanged = 0
        for rel in self.entries:
            self._classify(rel)
        existing = store_scope_files(root, scope) if root.is_dir() else []
        self.target_had_files = bool(existing)
        self.removed = [rel for rel in existing if rel not in self.entries]

    def check(self) -> None:
        """Rebuild and check every file of the scope, writing nothing; raises IntegrityError."""
        self._each_file(lambda rel, content: None)

    def _each_file(self, use: Callable[[str, bytes], None]) -> None:
        """Rebuild every file of the scope on worker threads, check its SHA-256, pass it to
        ``use``; one file per worker in memory. Raises IntegrityError naming the file."""
        def job(rel: str) -> None:
            try:
                content = read_file_content(self.entries[rel], self.objects)
            except (IntegrityError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise IntegrityError("backup %s: %s: %s" % (self.backup_id, rel, exc)) from None
            use(rel, content)

        # zlib, SHA-256, gzip and fsync release the GIL, so files overlap on both cores.
        with concurrent.futures.ThreadPoolExecutor(max_workers=RESTORE_WORKERS) as pool:
            for _ in pool.map(job, list(self.entries)):
                pass

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

    def apply(self, before_swap: Callable[[], None]) -> None:
        """Stage every file (each rebuilt and checked; nothing is swapped if any fails), call
        ``before_swap`` (the safety snapshot), then swap each in and remove extras."""
        state = self.root / STATE_DIR_NAME
        made_root = not self.root.exists()
        _check_no_symlinks(self.root, STATE_DIR_NAME + "/x")
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in state.glob("restore-*"):
            _remove_tree(old)
        staging = state / ("restore-%s" % secrets.token_hex(4))
        staging.mkdir(mode=0o700)
        try:
            staged = self._stage(staging)
            before_swap()
            swapped: Dict[Path, None] = {}
            try:
                for n, rel in enumerate(self.created + self.replaced, 1):
                    self.manager.progress("restore: file %d of %d" % (n, len(staged)))
                    swapped.update(dict.fromkeys(self._swap(rel, staged[rel])))
            finally:
                # Each file is whole at every moment; the renames are made durable once per
                # folder (also after a failure), before anything is removed or recorded.
                for folder in swapped:
                    fsync_dir(folder)
            for rel in self.removed:
                self._remove(rel)
        finally:
            _remove_tree(staging)
            with contextlib.suppress(OSError):
                state.rmdir()   # only if empty: a --target restore leaves no aml folder
                if made_root:
                    self.root.rmdir()   # a failed --target restore leaves no empty folder

    def _stage(self, staging: Path) -> Dict[str, Path]:
        """Check every file of the scope; write (fsynced) those to be swapped in."""
        staged = {rel: staging / str(n) for n, rel in enumerate(self.created + self.replaced)}

        def use(rel: str, content: bytes) -> None:
            if rel in staged:
                self._stage_one(rel, staged[rel], content)

        self._each_file(use)
        return staged

    def _stage_one(self, rel: str, path: Path, content: bytes) -> None:
        entry = self.entries[rel]
        mode = entry.get("mode") if isinstance(entry.get("mode"), int) else 0o644
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode_restored(entry, content))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(str(path), mode & 0o777)

    def _swap(self, rel: str, staged: Path) -> List[Path]:
        """Move one staged file into place; returns the folders whose entries changed."""
        _check_no_symlinks(self.root, rel)
        path = self.root / rel
        made, folder = [], path.parent
        while not folder.exists():
            made.append(folder.parent)
            folder = folder.parent
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_no_symlinks(self.root, rel)
        with self._lock(path):
            os.replace(str(staged), str(path))
        return [path.parent] + made

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
        where = self.objects.where
        for number, pack in enumerate(self.objects.pack_list):
            name = pack.name
            entries = dict(zip(pack.keys(), map(pack.loc, range(pack.count))))
            keep = [live[k] for k in entries if k in live and where[k] >> 32 == number]
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
                int(self._size([n]) * (1 - len(k) / self.objects.packs[n].count))
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

    A relative ``backup_root`` in the config file is taken from the store's parent folder
    (where the default ``memory-backup`` sibling is), not from the working directory, as
    cron's differs from a shell's; a flag's (in ``overrides``) is relative to the working
    directory, as any command-line path. Raises UsageError for unknown keys or bad values.
    """
    section = dict(load_aml_config(store, config_file).get("backup", {}))
    root = section.get("backup_root")
    if root and isinstance(root, str):
        section["backup_root"] = store_parent(store) / Path(os.path.expanduser(root))
    config = apply_config_fields(BackupConfig(), section, "aml config [backup]")
    values = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **values).validate()


def store_parent(store: Store) -> Path:
    """The folder holding the store as the user named it (symlinks not resolved): the
    default backup root's parent and the base of a relative ``backup_root`` in the config."""
    return Path(os.path.abspath(str(store.root))).parent


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



@dataclasses.dataclass
class _FileRead:
    """One store file as _SnapshotBuilder.preread found it (``raw`` None: not read, as an
    incremental may keep the previous entry; ``error``: it could not be read)."""

    info: Optional[os.stat_result]
    key: Optional[List[int]]
    raw: Optional[bytes] = None
    sha256: str = ""
    content: Optional[bytes] = None   # a gzip file's inflated bytes, when they inflate
    content_sha256: str = ""
    error: Optional[BaseException] = None


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

    def preread(self, rel: str, force: bool = False) -> "_FileRead":
        """The I/O half of file_entry, safe on a worker thread (reading, inflating and
        hashing release the GIL, so the next file loads while this one is split): the
        stat, then the bytes unless an incremental may keep the previous entry."""
        path = self.store.root / rel
        try:
            info = os.lstat(str(path))
            key = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
            prev = self.previous.get(rel)
            if not force and self.incremental and prev and prev.get("stat") == key:
                return _FileRead(info, key)
            raw = self._read(rel, path)
        except (OSError, StoreBusyError) as exc:
            return _FileRead(None, None, error=exc)
        read = _FileRead(info, key, raw, sha256_hex(raw))
        if raw[:2] == GZIP_MAGIC:
            with contextlib.suppress(OSError, EOFError, zlib.error):
                read.content = gzip.decompress(raw)
                read.content_sha256 = sha256_hex(read.content)
        return read

    def file_entry(self, rel: str, writer: _PackWriter,
                   read: Optional["_FileRead"] = None) -> Optional[Dict[str, Any]]:
        """The manifest entry of one file (from its ``preread`` when given); None (with a
        warning) if it cannot be read."""
        read = read or self.preread(rel)
        prev = self.previous.get(rel)
        if read.error is None and read.raw is None:
            if self._intact(prev):
                return prev
            read = self.preread(rel, force=True)
        if read.error is not None:
            self.warnings.append("%s: cannot read (%s); not in this backup" % (
                self.store.root / rel, getattr(read.error, "strerror", None) or read.error))
            self.skipped.append(rel)
            return None
        self.reread += 1
        raw = read.raw
        entry = {"path": rel, "mode": stat.S_IMODE(read.info.st_mode), "size": len(raw),
                 "sha256": read.sha256, "stat": read.key}
        if prev and prev.get("sha256") == entry["sha256"] and self._intact(prev):
            return dict(prev, **entry)   # byte-identical: no need to split it again
        entry.update(self._array_entry(raw, entry["sha256"], prev, writer, read)
                     or self._blob_entry(rel, raw, writer))
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

    def _array_entry(self, raw: bytes, raw_sha256: str, prev: Optional[Dict[str, Any]],
                     writer: _PackWriter, read: Optional["_FileRead"] = None
                     ) -> Optional[Dict[str, Any]]:
        is_gzip = raw[:2] == GZIP_MAGIC
        inflated = read.content if read is not None else None
        try:
            content = inflated if inflated is not None else \
                gzip.decompress(raw) if is_gzip else raw
            bom = content.startswith(UTF8_BOM)
            text = content[len(UTF8_BOM):].decode("utf-8") if bom else content.decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            return None
        parts = split_json_array(text)
        if parts is None:
            return None
        head, sep, tail, spans = parts
        body = content[len(UTF8_BOM):] if bom else content
        # In ASCII text, character offsets are byte offsets: slice the bytes, no re-encoding.
        ascii_text = body.isascii()
        sha256, add, items = hashlib.sha256, writer.add, []
        for start, end in spans:
            data = body[start:end] if ascii_text else text[start:end].encode("utf-8")
            digest = sha256(data).digest()
            add(digest, data)
            items.append(digest)
        ref, depth = self._store_list(items, prev, writer)
        return {"kind": "array", "gzip": is_gzip, "gzip_mtime": _gzip_mtime(raw) if is_gzip else 0,
                "bom": bom, "head": head, "sep": sep, "tail": tail, "count": len(items),
                "content_sha256": (read.content_sha256 if inflated is not None
                                   else sha256_hex(content)) if is_gzip else raw_sha256,
                "list": ref, "depth": depth}

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
            "safety_backup", "backup_config_for", "safe_relpath"]



# =============================================================================
# 9. Bloom filter and LRU cache
# In-memory structures with byte-exact, checksummed persistence.
# =============================================================================


@contextlib.contextmanager
def paused_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector around bulk JSON work (nests; restores state).

    Parsed JSON holds no reference cycles, so reference counting frees all of it; left on,
    the collector rescans the growing heap of parsed records again and again (measured: about
    two thirds of the index build's per-record work, and part of every parse).
    """
    was_enabled = _cyclic_gc.isenabled()
    _cyclic_gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            _cyclic_gc.enable()


# A Bloom filter file: magic, version, bits m, hash count k, items added, then the bit array,
# then the SHA-256 of everything before it.
_BLOOM_MAGIC = b"AMLB"
_BLOOM_VERSION = 1
_BLOOM_HEADER = struct.Struct(">4sBQBQ")
_BIT_DIGITS = bytes.maketrans(b"\x00\x01", b"01")


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

    def add_digests(self, digests: bytes, stride: int = 16) -> None:
        """Add many keys given as 16-byte digests, one every ``stride`` bytes (the fast path).

        The same double hashing as ``add``, but every step runs in C-level ``map`` calls: the
        positions are marked in a byte-per-bit scratch array, which is then packed into bits
        through one base-2 integer parse. Several times faster than per-key calls.
        """
        count = len(digests) // stride
        if count == 0:
            return
        words = array.array("Q", digests[:count * stride])  # stride is a multiple of 8
        if sys.byteorder == "little":
            words.byteswap()  # the digest halves are big-endian, as in _digest_positions
        step = stride // 8
        m, marks = self.m, bytearray(self.m)
        repeat, mark = itertools.repeat, marks.__setitem__
        # (h1 + i*h2) mod m == (g + i*(h2 mod m)) mod m: stepping g by the reduced h2 keeps
        # every number below 2m, which is much cheaper than 64-bit-and-wider arithmetic.
        g = list(map(operator.mod, words[0::step], repeat(m)))
        h2s = list(map(operator.mod, map(operator.or_, words[1::step], repeat(1)), repeat(m)))
        for i in range(self.k):
            if i:
                g = list(map(operator.mod, map(operator.add, g, h2s), repeat(m)))
            collections.deque(map(mark, g, repeat(1)), maxlen=0)
        # Bit ``pos`` of the array is bit ``pos`` of a little-endian integer: reverse the marks
        # so position 0 is the last (least significant) digit of a base-2 numeral.
        numeral = marks[::-1].translate(_BIT_DIGITS)
        added = int(numeral, 2).to_bytes(len(self.bits), "little")
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(added, "little")
        self.bits = bytearray(merged.to_bytes(len(self.bits), "little"))
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
            "optimal_bloom_bits", "value_size", "paused_cyclic_gc"]


# =============================================================================
# 10. Index and search
# Persisted record index tied to file size and mtime; search and get.
# =============================================================================

# Files of the index in .aml/index/ (see README "optimize"): manifest.json is the commit point
# and carries the checksum of every other part, so a set of parts from two different builds
# never verifies.
INDEX_FORMAT = "aml-index-2"  # 2: id rows carry the record's text offset
_IDS_MAGIC = b"AMLI"
_IDS_HEADER = struct.Struct(">4sBI")
# bloom_digest(id), file slot, array position, offset of the record in the file's JSON text
# (characters, after gzip and UTF-8 decoding), so get parses one record, not the file.
_ID_ROW = struct.Struct(">16sIIQ")
_BUCKET_COUNTS = struct.Struct(">%dI" % 256)  # heads each file's keys in keys.dat
_PARALLEL_INDEX_BYTES = 8 * 1024 * 1024  # below this, forking workers costs more than it saves
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


def _num(value: Any, isfinite: Callable[[float], bool] = math.isfinite) -> Optional[float]:
    kind = type(value)  # exact types: a bool is not a number here
    return float(value) if (kind is float or kind is int) and isfinite(value) else None


_is_str = str.__instancecheck__  # a C-level predicate for filter()


def posting_row(record: Any, position: int) -> List[Any]:
    """The facts the index keeps for one record (see P_* for the layout); never raises.

    Reads the same values as record_facts (runtime camelCase first, then legacy layouts).
    The index build calls this once per record, so it avoids per-field helper calls.
    """
    if not isinstance(record, dict):
        return [None, position, None, None, None, None, True, []]
    get = record.get
    evo, met = get("evolution"), get("metrics")
    conf = last = rate = count = None
    if type(evo) is dict:
        conf, last = evo.get("confidenceScore"), evo.get("lastUsed")
    if type(met) is dict:
        rate, count = met.get("successRate"), met.get("executionCount")
    if (evo or met or not _LEGACY_KEYS.isdisjoint(record)) and (
            conf is None or rate is None or count is None or last is None):
        # Only then can a later layout path hold a value (the generic, slower lookup).
        conf = _field(record, "confidence") if conf is None else conf
        rate = _field(record, "success_rate") if rate is None else rate
        count = _field(record, "execution_count") if count is None else count
        last = _field(record, "last_used") if last is None else last
        last = last or _field(record, "created")
    last = last or get("timestamp")
    rid, active, tags = get("id"), get("active"), get("tags")
    kind = type(last)
    return [rid if type(rid) is str and rid else None, position, _num(conf), _num(rate),
            _num(count), last if kind is str or kind is int or kind is float else None,
            active if type(active) is bool else _is_active(record),
            list(filter(_is_str, tags)) if type(tags) is list else []]


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_COMMA = re.compile(r"[ \t\n\r]*(,)?[ \t\n\r]*")
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# Record offsets are kept only for files of at least this many characters: parsing element by
# element costs about 30 % more than one json.loads (measured), which pays off only where
# parsing the whole file for one get would cost more (a 4 MB file parses in about 30 ms).
_OFFSET_MIN_CHARS = 4 * 1024 * 1024
_NO_OFFSET = 2 ** 64 - 1  # in an id row: parse the whole (small) file
_BYTE_OFFSET = 1 << 62    # flag in an id row: the offset is a byte offset in the file as stored


def _array_with_offsets(text: str) -> Tuple[List[Any], List[int]]:
    """Parse a JSON array element by element: (elements, offset of each in ``text``).

    The same C scanner and strict rules as parse_json_text; raises ValueError for anything
    that is not exactly one JSON array (the caller then reports json.loads' own error).
    """
    skip, comma, decode = _JSON_SPACE.match, _JSON_COMMA.match, _STRICT_DECODER.raw_decode
    at = skip(text, 0).end()
    if text[at:at + 1] != "[":
        raise ValueError("not an array")
    at = skip(text, at + 1).end()
    items: List[Any] = []
    offsets: List[int] = []
    if text[at:at + 1] != "]":
        while True:
            item, end = decode(text, at)
            items.append(item)
            offsets.append(at)
            found = comma(text, end)
            at = found.end()
            if found.group(1) is None:
                break
        if text[at:at + 1] != "]":
            raise ValueError("array not closed")
    if skip(text, at + 1).end() != len(text):
        raise ValueError("extra data")
    return items, offsets


def _value_at(path: Path, handle: Any, offset: int) -> Any:
    """The JSON value at a byte offset of an ASCII file, reading a growing window, not the file.

    A window that ends inside the value fails to parse (an object needs its closing brace),
    so the window grows until the value fits; IntegrityError if there is none.
    """
    size = 64 * 1024
    while True:
        handle.seek(offset)
        chunk = handle.read(size)
        try:
            return _STRICT_DECODER.raw_decode(chunk.decode("ascii"))[0]
        except ValueError:  # includes a non-ASCII byte: the file is not what was indexed
            if len(chunk) < size:
                raise IntegrityError("%s: no record at offset %d" % (path, offset)) from None
            size *= 4


def load_records_with_offsets(path: Path) -> Tuple[List[Any], Optional[List[int]]]:
    """A record file's array and, for a big file, each record's offset in its decoded text.

    Offsets are None below _OFFSET_MIN_CHARS. In a plain ASCII file, where characters are
    bytes, they are byte offsets in the file as stored, flagged with _BYTE_OFFSET, so a get
    reads only that record. Raises CorruptFileError as load_json_file does.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(path, "cannot read (%s)" % (exc.strerror or exc)) from None
    text, _ = decode_file_bytes(path, raw)
    try:
        if len(text) < _OFFSET_MIN_CHARS:
            records = parse_json_text(text)
            if isinstance(records, list):
                return records, None
        else:
            records, offsets = _array_with_offsets(text)
            if raw[:2] != GZIP_MAGIC and text.isascii():
                shift = _BYTE_OFFSET + (len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0)
                offsets = [at + shift for at in offsets]
            return records, offsets
    except ValueError:
        pass
    load_json_file(path, expect=list)  # raises with the same message as everywhere else
    raise CorruptFileError(path, "invalid JSON array")  # pragma: no cover - the file changed


def index_file_part(path: str, slot: int) -> Tuple[bytes, bytes, int]:
    """Parse one record file into (postings JSON, id keys, records); may run in a worker.

    The id keys are the file's id-table rows (bloom_digest(id), ``slot``, position, text
    offset) sorted,
    hence grouped by bucket (the digest's first byte), after a header of the 256 bucket row
    counts, so building the id table is a concatenation. Raises CorruptFileError for an
    unreadable file.
    """
    with paused_cyclic_gc():  # also in worker processes
        records, offsets = load_records_with_offsets(Path(path))
        rows = [posting_row(rec, pos) for pos, rec in enumerate(records)]
    pack, blake2b = _ID_ROW.pack, hashlib.blake2b
    offsets = offsets or [_NO_OFFSET] * len(rows)
    body = b"".join(sorted([pack(blake2b(row[P_ID].encode("utf-8"), digest_size=16).digest(),
                                 slot, row[P_POS], offsets[row[P_POS]])
                            for row in rows if row[P_ID]]))
    firsts = body[0::_ID_ROW.size]  # each row's bucket number, one byte per row
    keys = _BUCKET_COUNTS.pack(*map(firsts.count, range(_ID_BUCKETS))) + body
    blob = json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return blob, keys, len(rows)


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
        self._bloom: Optional[Tuple[str, BloomFilter]] = None  # (its SHA-256, the filter)
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
        """The bloom filter over every id, hashed straight from the id table's rows."""
        bloom = BloomFilter(max(count, 1000), self.fp_rate)
        bloom.add_digests(body, _ID_ROW.size)  # each row starts with bloom_digest(id)
        return bloom.to_bytes(), bloom

    def note_transcoded(self, moves: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]]) -> int:
        """Keep the index fresh across compress/decompress; returns the entries moved.

        ``moves`` maps a record file to its (size, mtime_ns) before and after a rewrite that
        kept the same JSON value (gzip of the same bytes, or plain text of the same array),
        so its postings and id rows still hold (callers pass only files too small to have
        record offsets, which such a rewrite can shift). Only an entry that matched the file before
        the rewrite moves; any other stays as it is and is re-read at the next refresh. Call
        with the maintenance lock held; nothing is written when no index exists or no entry
        moves. The hot cache keeps the old figures: its rows for those files become misses.
        """
        manifest = self.manifest()
        if manifest is None:
            return 0
        moved = 0
        for entry in manifest["files"]:
            change = moves.get(entry["path"])
            if change and (entry["size"], entry["mtime_ns"]) == tuple(change[0]):
                entry["size"], entry["mtime_ns"] = change[1]
                moved += 1
        if moved:
            write_checksummed(self.part("manifest.json"), manifest)
        self._manifest = None if not moved else manifest
        return moved

    # -- lookups ---------------------------------------------------------------
    def _verified(self) -> Dict[str, Any]:
        manifest = self.manifest()
        if manifest is None:
            raise IntegrityError("%s: index missing or corrupt" % self.folder)
        return manifest

    def might_contain(self, record_id: str) -> bool:
        """The bloom filter's answer (False is certain); raises IntegrityError if it is corrupt."""
        expected = self._verified()["bloom"]["sha256"]
        if self._bloom is None or self._bloom[0] != expected:  # read once per build
            path = self.part("bloom.bin")
            data = path.read_bytes() if path.exists() else b""
            if sha256_hex(data) != expected:
                raise IntegrityError("%s: bloom filter does not match the index" % self.folder)
            self._bloom = expected, BloomFilter.from_bytes(data)
        return record_id in self._bloom[1]

    def locate(self, record_id: str) -> List[Tuple[Dict[str, Any], int]]:
        """(file entry, position) of every record with this id; reads one id bucket only."""
        return [(entry, position) for entry, position, _ in self.locate_rows(record_id)]

    def locate_rows(self, record_id: str) -> List[Tuple[Dict[str, Any], int, Optional[int]]]:
        """(file entry, position, text offset or None for a small file) of every record with
        this id (one bucket read)."""
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
                _, slot, position, offset = _ID_ROW.unpack_from(chunk, at)
                found.append((slots[slot], position, None if offset == _NO_OFFSET else offset))
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

    def load_record(self, entry: Dict[str, Any], position: int, offset: int) -> Any:
        """The record at this position and offset of an indexed file, parsing only it.

        A byte offset (plain ASCII file) reads just that record's bytes; a character offset
        reads and decodes the file but parses only the record. Raises IntegrityError when
        the file changed since indexing or the offset does not hold a JSON value, and
        CorruptFileError when the file cannot be read.
        """
        records = self._files.get((entry["path"], entry["size"], entry["mtime_ns"]))
        if records is not None:  # already parsed whole for an earlier lookup
            return records[position]
        path = self.store.root / entry["path"]
        try:
            with open(str(path), "rb") as handle:
                if offset & _BYTE_OFFSET:
                    value = _value_at(path, handle, offset - _BYTE_OFFSET)
                else:
                    value = self._value_in_text(path, handle.read(), offset)
                info = os.fstat(handle.fileno())
        except OSError as exc:
            raise CorruptFileError(path, "cannot read (%s)" % (exc.strerror or exc)) from None
        if (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
            raise IntegrityError("%s changed since it was indexed" % path)
        return value

    @staticmethod
    def _value_in_text(path: Path, raw: bytes, offset: int) -> Any:
        text, _ = decode_file_bytes(path, raw)
        try:
            return _STRICT_DECODER.raw_decode(text, offset)[0]
        except ValueError:
            raise IntegrityError("%s: no record at offset %d" % (path, offset)) from None

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
            "posting_row", "load_records_with_offsets"]


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
def _query_index(store: Store, use_index: bool, refresh: bool = True
                 ) -> Iterator[Tuple[Optional[MemoryIndex], bool]]:
    """(index or None for a scan, writable) for one get/search.

    Takes the maintenance lock without waiting: when held, the index is refreshed (only
    changed files re-read; with ``refresh`` False only built if missing, the caller checks
    freshness itself) and counters are written; when another aml run holds it, a verified
    index is used read-only (fresh, unless ``refresh`` is False), else the lookup falls back
    to a read-only scan.
    """
    if not use_index:
        yield None, False
        return
    lock = MaintenanceLock(store.ensure_state_dir(), timeout=0)
    try:
        lock.acquire()
    except StoreBusyError:
        index = MemoryIndex(store)
        usable = index.manifest() is not None and (not refresh or not index.stale_files())
        yield (index if usable else None), False
        return
    try:
        index = MemoryIndex(store)
        if refresh or index.manifest() is None:
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

    First asks the index as it is, checking only the files that hold the id (one id bucket,
    one stat and one data file or hot-cache record: no stat of every file). If the id is not
    in the index or one of its files changed, refreshes the index (stat of every file,
    changed files re-read) and looks again; if the index cannot be used, scans read-only.
    """
    with _query_index(store, use_index, refresh=False) as (index, writable):
        result = _get_quick(index, record_id) if index is not None else None
        if result is None:
            if index is not None and writable:
                index.refresh()
            elif index is not None and index.stale_files():
                index = None  # read-only and stale: only a scan is sure
            result = _with_index(index, writable, lambda ix: _get_indexed(ix, record_id),
                                 lambda: _get_scanned(store, record_id))
        if writable:
            _count_cache(store, result)
    if not result.records:
        result.not_found = True
        result.message = "no record with id %r in %s" % (record_id, store.root)
    return result


def _get_quick(index: MemoryIndex, record_id: str) -> Optional[LookupResult]:
    """The answer of the index as it is, or None when it cannot be trusted without a refresh.

    Trusted only when the id table places the id somewhere and every file it points to still
    has the size and mtime it was indexed with (so the record read there is current). What
    this can miss: a copy of the id written into another file since the last refresh (a
    record moved away changes its old file, which the stat catches). ``get`` accepts that for
    constant cost; any lookup that refreshes (search, an unknown id, optimize) catches up.
    """
    try:
        if index.manifest() is None:
            return None
        result = _get_indexed(index, record_id, check_files=True)
    except (IntegrityError, OSError):
        return None
    return result if result.records else None


def _found(entry: Dict[str, Any], position: int, record: Any, source: str) -> FoundRecord:
    rid = record.get("id") if isinstance(record, dict) else None
    return FoundRecord(entry["agent"], entry["path"], entry["rtype"], position,
                       rid if isinstance(rid, str) else None, record, source)


def _fetch(index: MemoryIndex, hot: HotCache, entry: Dict[str, Any], row_id: Optional[str],
           position: int, result: LookupResult, offset: Optional[int] = None) -> FoundRecord:
    record = hot.fetch(row_id, entry, position)
    if record is not None:
        result.cache_hits += 1
        return _found(entry, position, record, "hot-cache")
    result.cache_misses += 1
    if offset is not None:  # get: parse just this record
        return _found(entry, position, index.load_record(entry, position, offset), "index")
    return _found(entry, position, index.load_file(entry)[position], "index")


def _get_indexed(index: MemoryIndex, record_id: str, check_files: bool = False) -> LookupResult:
    result = LookupResult([], "index", unreadable=index.unreadable())
    if not index.might_contain(record_id):
        result.source = "bloom"
        return result
    hot = HotCache(index)
    for entry, position, offset in index.locate_rows(record_id):
        if check_files:
            info = os.stat(str(index.store.root / entry["path"]))
            if (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                raise IntegrityError("%s changed since it was indexed" % entry["path"])
        found = _fetch(index, hot, entry, record_id, position, result, offset)
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

    __slots__ = ("agent", "file", "type", "id", "index", "reason", "details")  # one per removal
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
# A plan keeps compact per-record facts (sizes, positions and, for space_based, value,
# activity, protection and a short content digest), never the records: memory is bounded by
# the largest file plus a few bytes per record, however many files the store has.



@dataclasses.dataclass
class _Removal:
    """One planned removal: why, the values that triggered it, and the id seen at planning
    (``id_known`` is False for space_based picks until the file is read again)."""

    __slots__ = ("reason", "details", "id", "id_known")
    reason: PruneReason
    details: Dict[str, Any]
    id: Optional[str]
    id_known: bool


@dataclasses.dataclass
class _SpaceFacts:
    """What space_based ranks a file's records by: value, last activity, protection, digest."""

    values: "array.array[float]"
    activity: "array.array[float]"
    protected: bytearray
    marks: bytearray  # 8 bytes a record: blake2b of its compact JSON, to find it again

    def mark(self, index: int) -> bytes:
        """The content digest of one record."""
        return bytes(self.marks[8 * index:8 * index + 8])

    def keep(self, kept: List[int]) -> "_SpaceFacts":
        """The facts of the kept records only."""
        return _SpaceFacts(array.array("d", (self.values[i] for i in kept)),
                           array.array("d", (self.activity[i] for i in kept)),
                           bytearray(self.protected[i] for i in kept),
                           bytearray(b"".join(self.mark(i) for i in kept)))


@dataclasses.dataclass
class _FilePlan:
    """One record file as planned: compact facts per record and the removals chosen."""

    data_file: DataFile
    rel: str
    disk_bytes: int = 0
    digest: str = ""  # sha256 of the file's decoded text as planned, to notice changes
    sizes: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("q"))
    positions: "array.array[int]" = dataclasses.field(default_factory=lambda: array.array("q"))
    removals: Dict[int, _Removal] = dataclasses.field(default_factory=dict)
    space: Optional[_SpaceFacts] = None
    part: int = 0  # archive part holding this round's removals (0: none yet)
    pending: List[PrunedRecord] = dataclasses.field(default_factory=list)
    ratio: Optional[float] = None

    @property
    def count(self) -> int:
        """Records in the file as planned."""
        return len(self.sizes)

    def estimate(self, index: int) -> float:
        """Estimated on-disk bytes of one record: its compact JSON size times the file's
        bytes-on-disk per compact byte (which covers both indentation and gzip)."""
        if self.ratio is None:
            compact = (sum(self.sizes) + max(self.count - 1, 0) + 2) or 1
            self.ratio = self.disk_bytes / compact
        return self.sizes[index] * self.ratio

    def removed_estimate(self) -> float:
        """Estimated bytes the planned removals free."""
        return sum(self.estimate(i) for i in self.removals)

    def keep_only(self, kept: List[int]) -> None:
        """After a write: the plan describes just the kept records."""
        self.sizes = array.array("q", (self.sizes[i] for i in kept))
        self.positions = array.array("q", (self.positions[i] for i in kept))
        self.space = self.space.keep(kept) if self.space is not None else None
        self.removals, self.ratio, self.part, self.pending = {}, None, 0, []
        with contextlib.suppress(OSError):
            self.disk_bytes = self.data_file.path.stat().st_size


def _measure(records: List[Any], marks: Optional[bytearray] = None) -> "array.array[int]":
    """Compact JSON size of each record; appends each record's 8-byte digest to ``marks``
    when given. (A file's change is noticed by the SHA-256 of its text, see text_digest.)"""
    sizes, blake2b = array.array("q"), hashlib.blake2b
    for record in records:
        text = archived_record_text(record).encode("utf-8")
        sizes.append(len(text))
        if marks is not None:
            marks += blake2b(text, digest_size=8).digest()
    return sizes


def _moment(when: Optional[_dt.datetime]) -> float:
    return when.timestamp() if when is not None else float("-inf")


def _space_order(plan: _FilePlan, n: int) -> Iterator[Tuple[float, float, int, int]]:
    """A file's space candidates, lowest value (then oldest) first, as (value, time, n, i)."""
    facts = plan.space
    order = array.array("q", sorted(
        (i for i in range(plan.count) if i not in plan.removals and not facts.protected[i]),
        key=lambda i: (facts.values[i], facts.activity[i])))
    return ((facts.values[i], facts.activity[i], n, i) for i in order)


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


@dataclasses.dataclass
class _Run:
    """The state of one run: its plans, what was applied per agent, and its result."""

    result: PruneResult
    plans: List[_FilePlan]
    strategies: List[PruneStrategy]
    force: bool = False
    applied: Dict[str, int] = dataclasses.field(default_factory=dict)
    parts: int = 0  # archive parts numbered so far

    @property
    def space(self) -> bool:
        """Whether space_based is one of the run's strategies."""
        return PruneStrategy.SPACE_BASED in self.strategies


class MemoryPruner:
    """Plans and runs pruning of a store with the thresholds of a PruneConfig.

    Planning streams the store one file at a time and keeps compact facts; a real run then
    archives every file's removals (one archive part per file), and only then rewrites the
    files one by one under their locks, re-planning a file the runtime changed meanwhile.
    """

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
        self._describe(run)
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
        if any(p.removals for p in run.plans):
            if self.config.create_backup:
                run.result.backup_id = safety_backup(self.store, "before %s" % run.result.run_id)
            self._apply(run)
            if run.space:
                self._space_rounds(run)
        if run.parts:
            archive = Archive(self.store)
            archive.finish(run.result.run_id, {"entries": len(run.result.removed),
                                               "parts": len(archive.part_names(run.result.run_id))})
        self._measure_after(run)
        self.store.record_operation("prune", started, time.monotonic() - clock,
                                    self._history_summary(run.result))
        return run.result

    def _apply(self, run: _Run) -> None:
        """Archive every file's planned removals (a part each), then rewrite the files."""
        todo = [p for p in run.plans if p.removals]
        if not todo:
            return
        if not run.parts:
            run.result.archive = str(Archive(self.store).begin(run.result.run_id, "prune"))
        for plan in todo:
            self._archive_file(run, plan)
        if any(r.reason is PruneReason.MEMORY_LIMIT_EXCEEDED
               for p in todo for r in p.removals.values()):
            run.result.space_iterations += 1
        for plan in todo:
            if plan.removals:
                self._apply_file(run, plan)

    def _archive_file(self, run: _Run, plan: _FilePlan) -> None:
        """Write the archive part of one file's removals, from its current content."""
        try:
            records, digest = self.store.load_records_digest(plan.data_file)
        except CorruptFileError as exc:
            self._drop_file(run, plan, exc)
            return
        if digest != plan.digest:
            self._replan_file(run, plan, records, digest)
        self._write_part(run, plan, records)

    def _write_part(self, run: _Run, plan: _FilePlan, records: List[Any]) -> None:
        """(Re)write the file's archive part for its current removals (drop it when none)."""
        archive = Archive(self.store)
        if not plan.removals:
            if plan.part:
                archive.drop_part(run.result.run_id, plan.part)
            plan.part, plan.pending = 0, []
            return
        if not plan.part:
            run.parts += 1
            plan.part = run.parts
        entries = self._entries(plan, records)
        archive.write_part(run.result.run_id, plan.part, entries)
        plan.pending = [_pruned_record(e) for e in entries]

    def _apply_file(self, run: _Run, plan: _FilePlan) -> None:
        """Rewrite one file without its archived removals, under its lock."""
        try:
            with self.store.rewrite(plan.data_file.path) as job:
                digest = text_digest(job.text)
                if digest != plan.digest:  # changed since it was archived
                    self._replan_file(run, plan, job.data, digest)
                    self._write_part(run, plan, job.data)
                kept = [i for i in range(len(job.data)) if i not in plan.removals]
                job.data = [job.data[i] for i in kept]
                job.changed = bool(plan.removals)
                job.removed = set(plan.removals)  # pure deletion: splice, do not re-encode
        except (StoreBusyError, CorruptFileError) as exc:
            self._drop_file(run, plan, exc)
            return
        run.result.removed.extend(plan.pending)
        agent = plan.data_file.agent
        run.applied[agent] = run.applied.get(agent, 0) + len(plan.pending)
        # What is left is not hashed again: a later space round re-plans it from the file.
        plan.keep_only(kept)
        plan.digest = ""

    def _drop_file(self, run: _Run, plan: _FilePlan, exc: AmlError) -> None:
        """A file went busy or unreadable since planning: keep it untouched, fix the archive."""
        if plan in run.plans:
            run.plans.remove(plan)  # left alone for the rest of the run, space rounds included
        plan.removals = {}
        if plan.part:
            Archive(self.store).drop_part(run.result.run_id, plan.part)
        plan.part, plan.pending = 0, []
        if isinstance(exc, StoreBusyError):
            run.result.busy.append(str(exc))
        else:
            run.result.unreadable.append({"file": plan.rel, "problem": getattr(exc, "problem",
                                                                                 str(exc))})

    def _replan_file(self, run: _Run, plan: _FilePlan, fresh: List[Any], digest: str) -> None:
        """The runtime changed the file since planning: decide again from its fresh content
        (whose text has SHA-256 ``digest``), keeping the space_based picks that are still
        there (found by content digest)."""
        picked: Dict[bytes, Dict[str, Any]] = {}
        if plan.space is not None:
            picked = {plan.space.mark(i): r.details for i, r in plan.removals.items()
                      if r.reason is PruneReason.MEMORY_LIMIT_EXCEEDED}
        self._plan_content(plan, fresh, run.strategies, findings=None)
        plan.digest = digest
        for i in range(plan.count if picked else 0):
            if i not in plan.removals and plan.space.mark(i) in picked:
                plan.removals[i] = _Removal(PruneReason.MEMORY_LIMIT_EXCEEDED,
                                            picked[plan.space.mark(i)], None, False)

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
            if run.space and over > 0:
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
        run = _Run(result=result, plans=self._load(chosen_agents, strategies, result),
                   strategies=strategies)
        if run.space:
            self._choose_space(run.plans, result)
        for summary in result.agents:
            mine = [p for p in run.plans if p.data_file.agent == summary.agent]
            summary.records_before = sum(p.count for p in mine)
            summary.bytes_after = int(summary.bytes_before
                                      - sum(p.removed_estimate() for p in mine))
        result.bytes_after = result.bytes_before - sum(
            s.bytes_before - s.bytes_after for s in result.agents)
        return run

    def _load(self, agents: List[str], strategies: List[PruneStrategy],
              result: PruneResult) -> List[_FilePlan]:
        """Plan each readable file as it streams by; only its compact plan is kept."""
        plans = []
        for data_file in (f for agent in agents for f in self.store.record_files(agent)):
            plan = _FilePlan(data_file, data_file.path.relative_to(self.store.root).as_posix())
            try:  # not iter_record_files: its generator would hold this file while the next loads
                records, digest = self.store.load_records_digest(data_file)
            except CorruptFileError as exc:
                result.unreadable.append({"file": plan.rel, "problem": exc.problem})
                continue
            self._plan_content(plan, records, strategies, result.findings)
            plan.digest = digest
            plans.append(plan)
            del records
        return plans

    def _plan_content(self, plan: _FilePlan, records: List[Any],
                      strategies: List[PruneStrategy],
                      findings: Optional[List[Dict[str, Any]]]) -> None:
        """(Re)plan one file from its content: compact facts, then time/performance removals."""
        rtype = plan.data_file.rtype
        facts = [record_facts(rtype, r) for r in records]
        marks = bytearray() if PruneStrategy.SPACE_BASED in strategies else None
        plan.sizes = _measure(records, marks)
        plan.positions = array.array("q", range(len(records)))
        plan.removals, plan.ratio = {}, None
        plan.space = None if marks is None else _SpaceFacts(
            array.array("d", (record_value(f, self.rules) for f in facts)),
            array.array("d", (_moment(f.last_activity) for f in facts)),
            bytearray(is_protected(f, self.rules) for f in facts), marks)
        with contextlib.suppress(OSError):
            plan.disk_bytes = plan.data_file.path.stat().st_size
        self._choose_file(plan, facts, strategies, findings)

    def _choose_file(self, plan: _FilePlan, facts: List[RecordFacts],
                     strategies: List[PruneStrategy],
                     findings: Optional[List[Dict[str, Any]]]) -> None:
        """Mark the time and performance removals of one file (protected records are skipped)."""
        for i, fact in enumerate(facts):
            if findings is not None and fact.last_activity and fact.last_activity > self.store.now:
                findings.append({"agent": plan.data_file.agent, "file": plan.rel, "index": i,
                                 "id": fact.id, "problem": "timestamp in the future (%s)"
                                 % format_timestamp(fact.last_activity)})
            if is_protected(fact, self.rules):
                continue
            verdict = None
            if PruneStrategy.TIME_BASED in strategies:
                verdict = time_verdict(fact, self.rules, self.store.now)
            if verdict is None and PruneStrategy.PERFORMANCE_BASED in strategies:
                verdict = performance_verdict(fact, self.rules)
            if verdict is not None:
                plan.removals[i] = _Removal(verdict[0], verdict[1], fact.id, True)

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
        added = 0
        # Each file's candidates are sorted on their own; merging keeps one per file at hand.
        for value, _, n, i in heapq.merge(*(_space_order(p, n) for n, p in enumerate(plans))):
            if size <= limit:
                break
            plans[n].removals[i] = _Removal(PruneReason.MEMORY_LIMIT_EXCEEDED, {
                "scope": scope, "value": round(value, 3), "size_bytes": int(size),
                "limit_bytes": limit}, None, False)
            size -= plans[n].estimate(i)
            added += 1
        return added

    def _describe(self, run: _Run) -> None:
        """The dry run's list of every record that would go (space picks' ids read again)."""
        for plan in list(run.plans):
            if any(not r.id_known for r in plan.removals.values()):
                self._learn_ids(run, plan)
            run.result.removed.extend(
                PrunedRecord(agent=plan.data_file.agent, file=plan.rel,
                             type=plan.data_file.rtype.value, id=r.id,
                             index=plan.positions[i], reason=r.reason, details=r.details)
                for i, r in sorted(plan.removals.items()))
        _count_removed(run.result.agents, run.result.removed)

    def _learn_ids(self, run: _Run, plan: _FilePlan) -> None:
        try:
            records, digest = self.store.load_records_digest(plan.data_file)
        except CorruptFileError:
            return  # it turned unreadable since planning: listed without ids
        if digest != plan.digest:
            self._replan_file(run, plan, records, digest)
        rtype = plan.data_file.rtype
        for i, removal in plan.removals.items():
            removal.id, removal.id_known = record_facts(rtype, records[i]).id, True

    def _entries(self, plan: _FilePlan, records: List[Any]) -> List[Dict[str, Any]]:
        """Archive entries (contracts.md schema, the record kept once as its exact text)."""
        rtype = plan.data_file.rtype
        return [{"agent": plan.data_file.agent, "file": plan.rel, "type": rtype.value,
                 "id": record_id(records[i]), "index": plan.positions[i],
                 "reason": removal.reason.value, "details": removal.details,
                 "record_text": archived_record_text(records[i])}
                for i, removal in sorted(plan.removals.items())]

    def _guard_message(self, run: _Run) -> Optional[str]:
        """The mass-deletion guard: None, or which agents the run would strip too far."""
        share = self.rules.max_removal_share
        over = []
        for summary in run.result.agents:
            count = sum(len(p.removals) for p in run.plans if p.data_file.agent == summary.agent)
            count += run.applied.get(summary.agent, 0)
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
    counts = {s.agent: s.removed for s in summaries}
    for record in removed:
        if record.agent in counts:
            counts[record.agent][record.type] += 1


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
    id (or, without an id, whose exact content) is present again is skipped. Every archive
    part is verified before anything changes; then files are restored one at a time (memory:
    one part and one file). The run is marked undone once every file was handled; a second
    undo is a no-op that says so. Raises UsageError (no such run), IntegrityError (corrupt
    archive), StoreBusyError.
    """
    archive = Archive(store)
    manifest = archive.manifest(run_id)
    if manifest.get("undone"):
        return UndoResult(run_id, manifest.get("operation", "?"),
                          already_undone=manifest["undone"])
    with store.maintenance_lock():
        store.cleanup_temp_files()
        manifest = archive.manifest(run_id)
        result = UndoResult(run_id, manifest.get("operation", "?"),
                            already_undone=manifest.get("undone"))
        if result.already_undone:
            return result
        files = _parts_by_file(archive, run_id)
        paths = {rel: _archived_file(store, rel) for rel in files}
        read = _part_reader(archive, run_id)
        for rel, names in files.items():  # records stay text until they are put back
            entries = [e for name in names for e in read(name) if e.get("file") == rel]
            _restore_file(store, paths[rel], rel, entries, result)
        if not result.unreadable and not result.busy:
            archive.mark_undone(run_id, store.now)
    return result


def _parts_by_file(archive: Archive, run_id: str) -> Dict[Any, List[str]]:
    """Which parts hold entries of which file; reads (and so verifies) every part once."""
    files: Dict[Any, List[str]] = {}
    for name in archive.part_names(run_id):
        for entry in archive.read_part(run_id, name, records=False):
            rel = entry.get("file")
            names = files.setdefault(rel if isinstance(rel, str) else None, [])
            if not names or names[-1] != name:
                names.append(name)
    return files


def _part_reader(archive: Archive, run_id: str) -> Callable[[str], List[Dict[str, Any]]]:
    """read_part with the last part kept, so a part holding many files is read once."""
    last: Dict[str, List[Dict[str, Any]]] = {}

    def read(name: str) -> List[Dict[str, Any]]:
        if name not in last:
            last.clear()
            last[name] = archive.read_part(run_id, name, records=False)
        return last[name]
    return read


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
    # Whole-record texts are only needed to recognise records without an id.
    contents = ({_canonical(r) for r in data} if any(not e.get("id") for e in entries)
                else set())
    restored = 0
    for entry in sorted(entries, key=lambda e: e.get("index") or 0):
        record, rid = _entry_record(entry), entry.get("id")
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


def _entry_record(entry: Dict[str, Any]) -> Any:
    """An entry's record, parsed from its text (in its original key order) on first use."""
    if "record" not in entry:
        try:
            entry["record"] = parse_json_text(entry.pop("record_text"))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError("archive entry %s of %s has no readable record (%s)"
                                 % (entry.get("id"), entry.get("file"), exc)) from None
    return entry["record"]


def list_runs(store: Store) -> List[Dict[str, Any]]:
    """Every archived run (prune and gc), oldest first; read-only. Corrupt ones say so."""
    archive = Archive(store)
    runs = []
    for run_id in archive.runs():
        try:
            manifest = archive.manifest(run_id)
            count = manifest.get("counts", {}).get("entries")
            if count is None:  # interrupted or old-layout run: count its parts
                count = sum(len(archive.read_part(run_id, name, records=False))
                            for name in archive.part_names(run_id))
        except IntegrityError as exc:
            runs.append({"run_id": run_id, "problem": str(exc)})
            continue
        runs.append({"run_id": run_id, "operation": manifest.get("operation"),
                     "created": manifest.get("created"), "undone": manifest.get("undone"),
                     "status": manifest.get("status"), "records": count})
    return runs


__all__ += ["PruneConfig", "PruneStrategy", "PruneReason", "MemoryPruner", "PruneResult",
            "PrunedRecord", "AgentPruneSummary", "UndoResult", "undo_run", "list_runs",
            "prune_config_for", "record_value", "is_protected", "time_verdict",
            "performance_verdict", "agent_disk_bytes", "store_disk_bytes"]


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
        return gzip_bytes(raw)
    text, fmt = decode_file_bytes(Path("-"), raw)
    obj = parse_json_text(text)
    if to_gzip:
        # Compress the exact plain bytes: after decompression the content is byte-identical.
        return gzip_bytes(raw)
    if "\n" in text.strip():
        return raw if raw[:2] != GZIP_MAGIC else gzip.decompress(raw)
    return encode_json(obj, dataclasses.replace(fmt, gzip=False))


def _transcode_one(path_text: str, to_gzip: bool, lock_timeout: float, dry_run: bool,
                   indexed: Optional[Tuple[int, int]] = None) -> Tuple[Any, ...]:
    """Compress or decompress one file in place under its lock; runs in a worker thread.

    Returns (path, outcome, bytes before, bytes after, problem, (size, mtime_ns) before,
    (size, mtime_ns) after; both None unless done) with outcome ``done``,
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
            parsed_ok = (indexed == (before.st_size, before.st_mtime_ns)
                         and len(raw) == before.st_size)
            if (raw[:2] == GZIP_MAGIC) == to_gzip:
                if not parsed_ok:  # already in form, but a truncated gzip is not "done"
                    parse_json_text(decode_file_bytes(path, raw)[0])
                return path_text, "skipped", len(raw), len(raw), "", None, None
            new = _transcode_bytes(raw, to_gzip, parsed_ok)
        except (CorruptFileError, ValueError, OSError, EOFError, zlib.error) as exc:
            return path_text, "unreadable", 0, 0, str(getattr(exc, "problem", exc)), None, None
        if to_gzip and gzip.decompress(new) != raw:  # pragma: no cover - zlib self-check
            raise IntegrityError("%s: gzip round trip differs; file left as it was" % path)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return path_text, "changed", len(raw), len(raw), "", None, None
        if not dry_run:  # write errors propagate: the old file is intact (atomic write)
            atomic_write_bytes(path, new)
            os.utime(str(path), ns=(before.st_atime_ns, before.st_mtime_ns))
            after = path.stat()  # still under the lock: exactly the file as we left it
        return (path_text, "done", len(raw), len(new), "", (before.st_size, before.st_mtime_ns),
                (after.st_size, after.st_mtime_ns))


def _indexed_stats(index: MemoryIndex) -> Dict[Path, Tuple[int, int]]:
    """(size, mtime_ns) of every file a verified index parsed successfully."""
    manifest = index.manifest() if index.store.state_dir.is_dir() else None
    return {index.store.root / e["path"]: (e["size"], e["mtime_ns"])
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
    index = MemoryIndex(store)
    indexed = _indexed_stats(index)
    with paused_cyclic_gc():  # the parses of files the index did not vouch for
        outcomes = parallel_map(_transcode_one, [(str(p), to_gzip, store.lock_timeout, dry_run,
                                                  indexed.get(p)) for p in paths], count,
                                threads=True)
    rel = lambda p: Path(p).relative_to(store.root).as_posix()  # noqa: E731
    by = {kind: [o for o in outcomes if o[1] == kind] for kind in ("done", "skipped", "changed",
                                                                     "unreadable")}
    if not dry_run and by["done"]:
        # A file big enough to have record offsets in the id table is left to the next refresh:
        # its byte offsets do not hold in gzip bytes, nor character offsets in re-indented text.
        plain = 2 if to_gzip else 3  # which byte count is the plain JSON
        index.note_transcoded({rel(o[0]): (o[5], o[6]) for o in by["done"]
                               if o[plain] < _OFFSET_MIN_CHARS})
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


def _exact_duplicates(records: List[Any], candidates: List[int]) -> Dict[int, int]:
    """{index: index of the earlier identical copy} among the ``candidates`` positions.

    Candidates all have an id, and identical records share it, so only records whose id
    repeats in the file are serialised and compared (most files have none).
    """
    by_id: Dict[str, List[int]] = {}
    for index in candidates:
        by_id.setdefault(records[index]["id"], []).append(index)
    found: Dict[int, int] = {}
    for group in by_id.values():
        seen: Dict[str, int] = {}
        for index in group if len(group) > 1 else ():
            first = seen.setdefault(_canonical(records[index]), index)
            if first != index:
                found[index] = first
    return found


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
        return self.plan_with_total(agent, errors)[0]

    def plan_with_total(self, agent: str, errors: List[CorruptFileError]
              ) -> Tuple[List[Dict[str, Any]], int]:
        """(entries, records in the agent's readable files), each file parsed once."""
        entries, kept_ids, total = [], {}, 0
        for data_file, records, _ in self.store.iter_record_files([agent], errors=errors):
            total += len(records)
            flaws, good, rtype = {}, [], data_file.rtype
            for index, record in enumerate(records):
                bad = _incomplete(rtype, record)
                if bad is None:
                    good.append(index)
                else:
                    flaws[index] = bad
            duplicates = _exact_duplicates(records, good)
            for index, first in duplicates.items():
                flaws[index] = GcReason.DUPLICATE, {"duplicate_of_index": first}
            for index in sorted(flaws):
                entries.append(self._entry(data_file, index, records[index], *flaws[index]))
            for index in good:
                if index not in duplicates:
                    kept_ids.setdefault(records[index]["id"], []).append(
                        (data_file, index, records[index]))
        return entries + self._conflicts(kept_ids), total

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

    def guard(self, agent: str, entries: List[Dict[str, Any]],
              total: Optional[int] = None) -> bool:
        """True if removing ``entries`` is within the mass-deletion limit for the agent.

        ``total`` is the agent's record count when the caller has it (gc's plan counted it
        while parsing); else the agent's readable files are read to count.
        """
        if self.force or not entries:
            return True
        if total is None:
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
                job.removed = positions  # pure deletion: splice, do not re-encode
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
    with paused_cyclic_gc():
        return _collect_garbage(store, dry_run, force, backup)


def _collect_garbage(store: Store, dry_run: bool, force: bool,
                     backup: Optional[Callable[[], str]]) -> GcResult:
    started = time.monotonic()
    gc = GarbageCollector(store, force)
    errors: List[CorruptFileError] = []
    plan, refused = [], []
    for agent in store.agents():
        entries, total = gc.plan_with_total(agent, errors)
        if not gc.guard(agent, entries, total):
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

class SchemaVersion(enum.Enum):
    """Record schema versions in chain order; members compare with ``<`` and ``>``."""

    V1_0_0 = "1.0.0"
    V1_1_0 = "1.1.0"
    V1_2_0 = "1.2.0"
    V2_0_0 = "2.0.0"

    @property
    def rank(self) -> int:
        """Position in the chain (1.0.0 is 0)."""
        return _MEMBER_RANK[self]

    def __lt__(self, other: "SchemaVersion") -> bool:
        return _MEMBER_RANK[self] < _MEMBER_RANK[other]

    def __le__(self, other: "SchemaVersion") -> bool:
        return _MEMBER_RANK[self] <= _MEMBER_RANK[other]

    def __gt__(self, other: "SchemaVersion") -> bool:
        return _MEMBER_RANK[self] > _MEMBER_RANK[other]

    def __ge__(self, other: "SchemaVersion") -> bool:
        return _MEMBER_RANK[self] >= _MEMBER_RANK[other]

    @classmethod
    def from_stamp(cls, value: Any) -> Optional["SchemaVersion"]:
        """The version a stamp such as ``"1.2.0"`` or ``"v1.2"`` names, else None."""
        if not isinstance(value, str):
            return None
        text = value.strip().lstrip("vV")
        text = text + ".0" if text.count(".") == 1 else text
        for version in cls:
            if version.value == text:
                return version
        return None

    @classmethod
    def parse(cls, text: str) -> "SchemaVersion":
        """The version named on a command line; raises UsageError for an unknown one."""
        version = cls.from_stamp(text)
        if version is None:
            raise UsageError("unknown schema version %r (known: %s)"
                             % (text, ", ".join(v.value for v in cls)))
        return version

    @classmethod
    def latest(cls) -> "SchemaVersion":
        """The newest version (2.0.0)."""
        return list(cls)[-1]


_MEMBER_RANK = {version: rank for rank, version in enumerate(SchemaVersion)}
_VERSION_RANK = {version.value: rank for version, rank in _MEMBER_RANK.items()}
VERSION_STAMP = "schemaVersion"
LIFECYCLE_STATES = ("active", "inactive", "pinned", "superseded", "archived")
_MIGRATION_BODY_KEY = {RecordType.PATTERN: "pattern", RecordType.SOLUTION: "problem",
              RecordType.DECISION: "decision"}
_SUPERSEDED_WORDS = ("superseded", "outdated", "deprecated", "replaced")


class LossyStepError(RefusedError):
    """A step down would lose information held by one record."""


# -- detection ----------------------------------------------------------------

def _has_v2_shape(rtype: RecordType, record: Dict[str, Any]) -> bool:
    if dig(record, "lifecycle", "state") not in LIFECYCLE_STATES:
        return False
    if rtype is RecordType.PATTERN:
        return isinstance(record.get("metrics"), dict) and isinstance(record.get("evolution"), dict)
    return True


def place_record(rtype: RecordType, record: Any) -> Tuple[Optional[SchemaVersion], Optional[str]]:
    """(version, None) for a record aml can place, else (None, why it cannot)."""
    if not isinstance(record, dict):
        return None, "not a JSON object (%s)" % type(record).__name__
    if "id" not in record and _MIGRATION_BODY_KEY[rtype] not in record:
        return None, "neither an id nor a %r body: not a %s record" % (_MIGRATION_BODY_KEY[rtype],
                                                                      rtype.value)
    if VERSION_STAMP in record:
        version = SchemaVersion.from_stamp(record[VERSION_STAMP])
        if version is None:
            return None, "unknown %s %r" % (VERSION_STAMP, record[VERSION_STAMP])
        # An older tool stamped 2.0.0 on records it had broken; only aml's shape counts.
        if version is not SchemaVersion.V2_0_0 or _has_v2_shape(rtype, record):
            return version, None
    return _version_by_fields(rtype, record), None


def _version_by_fields(rtype: RecordType, record: Dict[str, Any]) -> SchemaVersion:
    if "metadata" in record or (rtype is RecordType.PATTERN and "variations" in record):
        return SchemaVersion.V1_2_0
    # The runtime persists `active` but drops an empty `tags`: either marks 1.1.0.
    if "tags" in record or "active" in record:
        return SchemaVersion.V1_1_0
    return SchemaVersion.V1_0_0


def detect_record_version(rtype: RecordType, record: Any) -> Optional[SchemaVersion]:
    """The schema version of one record (a valid stamp wins); None if it cannot be placed."""
    return place_record(rtype, record)[0]


# -- runtime schema check (SPEC 2.1) -------------------------------------------

def _is_num(value: Any) -> bool:
    return _number(value) is not None


def _is_int(value: Any) -> bool:
    # JSON has one number type: the runtime reads 7.0 as the integer 7.
    return _is_num(value) and float(value).is_integer()


def _is_rate(value: Any) -> bool:
    return _is_num(value) and 0.0 <= value <= 1.0


# The runtime's own form, with field ranges: most values match and skip the full parse.
_RUNTIME_TIME = re.compile(r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
                           r"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z\Z")


def _is_time(value: Any) -> bool:
    return isinstance(value, str) and (_RUNTIME_TIME.match(value) is not None
                                       or parse_timestamp(value) is not None)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_flat_context(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, (str, bool)) or _is_num(v) for v in value.values())


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is _ABSENT or check(value)


_ABSENT = object()
_IS_STR = lambda value: isinstance(value, str)  # noqa: E731 - a table entry
_IS_DICT = lambda value: isinstance(value, dict)  # noqa: E731
_IS_LIST = lambda value: isinstance(value, list)  # noqa: E731

_COMMON_RULES = (("id", lambda v: isinstance(v, str) and v != ""), ("agent", _IS_STR),
                 ("timestamp", _is_time), ("tags", _optional(_is_str_list)),
                 ("active", _optional(lambda v: isinstance(v, bool))))
_RUNTIME_RULES: Dict[RecordType, Tuple[Tuple[str, Callable[[Any], bool]], ...]] = {
    RecordType.PATTERN: (
        ("pattern.type", _IS_STR), ("pattern.context", _is_flat_context),
        ("pattern.approach.technique", _IS_STR), ("pattern.approach.rationale", _IS_STR),
        ("pattern.approach.codeTemplate", _optional(_IS_STR)),
        ("pattern.approach.steps", _optional(_IS_LIST)),
        ("pattern.conditions.whenApplicable", _IS_LIST),
        ("pattern.conditions.whenNotApplicable", _IS_LIST),
        ("metrics.successRate", _is_rate), ("metrics.executionCount", _is_int),
        ("metrics.avgTimeSavedMs", _is_num), ("metrics.errorPreventionCount", _is_int),
        ("evolution.created", _is_time), ("evolution.lastUsed", _is_time),
        ("evolution.refinements", _is_int), ("evolution.confidenceScore", _is_rate)),
    RecordType.SOLUTION: (
        ("problem.errorType", _IS_STR), ("problem.errorMessage", _IS_STR),
        ("problem.stackTraceHash", _optional(_IS_STR)), ("problem.context", _IS_DICT),
        ("solution.rootCause", _IS_STR), ("solution.fixApproach", _IS_STR),
        ("solution.codeFix", _optional(_IS_STR)), ("solution.prevention", _IS_STR),
        ("solution.relatedPatterns", _optional(_IS_LIST)),
        ("effectiveness.worked", lambda v: isinstance(v, bool)),
        ("effectiveness.timeToFixMinutes", _is_num),
        ("effectiveness.preventedRecurrence", _is_int),
        ("effectiveness.relatedErrorsFixed", _is_int), ("verifiedCount", _is_int)),
    RecordType.DECISION: (
        ("decision.type", _IS_STR), ("decision.question", _IS_STR), ("decision.context", _IS_DICT),
        ("decision.chosenOption", _IS_STR), ("decision.alternativesConsidered", _IS_LIST),
        ("decision.decisionFactors.primary", _IS_LIST),
        ("decision.decisionFactors.secondary", _IS_LIST),
        ("decision.rationale", _optional(_IS_STR)), ("outcome", _optional(_IS_DICT)),
        ("reviewedAt", _optional(_is_time))),
}
_OUTCOME_RULES = (("outcome.successMetrics", _IS_DICT), ("outcome.lessonsLearned", _IS_LIST),
                  ("outcome.wouldRepeat", lambda v: isinstance(v, bool)),
                  ("outcome.improvements", _optional(_IS_LIST)))


def _lookup(record: Dict[str, Any], path: Tuple[str, ...]) -> Any:
    obj: Any = record
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _ABSENT
        obj = obj[key]
    return obj


_PATHS = {dotted: tuple(dotted.split(".")) for rules in (_COMMON_RULES, _OUTCOME_RULES,
                                                          *_RUNTIME_RULES.values())
          for dotted, _ in rules}


def runtime_problems(rtype: RecordType, record: Any) -> List[str]:
    """Why the runtime would reject ``record`` (required fields and types of SPEC 2.1); [] if none.

    Ids are checked to be non-empty strings, not UUIDs: agent-written stores use other ids.
    """
    if not isinstance(record, dict):
        return ["not a JSON object"]
    rules = _COMMON_RULES + _RUNTIME_RULES[rtype]
    if rtype is RecordType.DECISION and isinstance(record.get("outcome"), dict):
        rules = rules + _OUTCOME_RULES
    problems = []
    for dotted, check in rules:
        value = _lookup(record, _PATHS[dotted])
        if not check(value):
            problems.append("%s %s" % (dotted, "is missing" if value is _ABSENT
                                       else "has an unusable value %s" % _short(value)))
    return problems


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= width else text[:width - 3] + "..."


# -- steps --------------------------------------------------------------------
# Each step maps a record to a record and never mutates its input: it returns the same
# object when nothing changes, else a copy (only the containers it edits are copied).

class MigrationStep:
    """One link of the chain: ``migrate_<type>`` goes up, ``revert_<type>`` comes back down.

    ``revert_*`` raises LossyStepError when the step down would lose information.
    """

    source = SchemaVersion.V1_0_0
    target = SchemaVersion.V1_0_0

    @property
    def name(self) -> str:
        """``1.0.0->1.1.0``."""
        return "%s->%s" % (self.source.value, self.target.value)

    @property
    def down_name(self) -> str:
        """``1.1.0->1.0.0``."""
        return "%s->%s" % (self.target.value, self.source.value)

    def up(self, rtype: RecordType, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record one step up (the same object when already there)."""
        return getattr(self, "migrate_" + rtype.value)(record)

    def down(self, rtype: RecordType, record: Dict[str, Any]) -> Dict[str, Any]:
        """The record one step down; raises LossyStepError if that would lose information."""
        return getattr(self, "revert_" + rtype.value)(record)


def _with_defaults(record: Dict[str, Any], defaults: Dict[str, Callable[[], Any]]
                   ) -> Dict[str, Any]:
    missing = [key for key in defaults if key not in record]
    if not missing:
        return record
    out = dict(record)
    for key in missing:
        out[key] = defaults[key]()
    return out


def _without_defaults(record: Dict[str, Any], defaults: Dict[str, Any], step: str
                      ) -> Dict[str, Any]:
    if not any(key in record for key in defaults):
        return record
    for key, empty in defaults.items():
        if key in record and record[key] != empty:
            raise LossyStepError("step %s would drop %s = %s"
                                 % (step, key, _short(record[key])))
    return {k: v for k, v in record.items() if k not in defaults}


class AddTagsAndActive(MigrationStep):
    """1.0.0 -> 1.1.0: add ``tags`` [] and ``active`` (legacy ``is_active``, else true)."""

    source, target = SchemaVersion.V1_0_0, SchemaVersion.V1_1_0

    def migrate_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Add the two fields where absent; existing values are never overridden."""
        legacy = record.get("is_active")
        active = legacy if isinstance(legacy, bool) else True
        return _with_defaults(record, {"tags": list, "active": lambda: active})

    migrate_solution = migrate_decision = migrate_pattern

    def revert_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Drop ``tags``/``active`` when they hold only their defaults ([] and true)."""
        return _without_defaults(record, {"tags": [], "active": True}, self.down_name)

    revert_solution = revert_decision = revert_pattern


class AddMetadataAndVariations(MigrationStep):
    """1.1.0 -> 1.2.0: add ``metadata`` {} and, on patterns, ``variations`` []."""

    source, target = SchemaVersion.V1_1_0, SchemaVersion.V1_2_0

    def migrate_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Add ``metadata`` and ``variations`` where absent."""
        return _with_defaults(record, {"metadata": dict, "variations": list})

    def migrate_solution(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Add ``metadata`` where absent."""
        return _with_defaults(record, {"metadata": dict})

    migrate_decision = migrate_solution

    def revert_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Drop ``metadata``/``variations`` when both are empty."""
        return _without_defaults(record, {"metadata": {}, "variations": []}, self.down_name)

    def revert_solution(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Drop ``metadata`` when it is empty."""
        return _without_defaults(record, {"metadata": {}}, self.down_name)

    revert_decision = revert_solution


class UnmigratableRecordError(AmlError):
    """A record cannot reach 2.0.0: information the runtime needs is missing or unusable."""

    exit_code = ExitCode.PARTIAL


def _same(a: Any, b: Any) -> bool:
    # 1 == True in Python; a moved value must keep its JSON type to count as "the same".
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _accept(check: Callable[[Any], bool]) -> Callable[[Any], Any]:
    return lambda value: value if check(value) else _ABSENT


def _as_time(value: Any) -> Any:
    if _is_time(value):
        return value
    if _is_num(value) and parse_timestamp(value) is not None:
        return format_timestamp(parse_timestamp(value))  # epoch numbers become runtime text
    return _ABSENT


# (paths, first = canonical; runtime check of the canonical value; converter for a legacy
#  value; default: None = essential, "timestamp"/"created" = copy that field, else a value)
_Slot = Tuple[Tuple[Tuple[str, ...], ...], Callable[[Any], bool], Callable[[Any], Any], Any]
_OPTIONAL = object()
_ACTIVE_SLOT: _Slot = ((("active",), ("is_active",)), lambda v: isinstance(v, bool),
                       _accept(lambda v: isinstance(v, bool)), True)
_SLOTS: Dict[RecordType, Tuple[_Slot, ...]] = {
    RecordType.PATTERN: (
        (FIELD_PATHS["success_rate"], _is_rate, _accept(_is_rate), None),
        (FIELD_PATHS["execution_count"], _is_int, _accept(_is_int), None),
        (FIELD_PATHS["avg_time_saved"], _is_num, _accept(_is_num), 0),
        (FIELD_PATHS["error_prevention"], _is_int, _accept(_is_int), 0),
        (FIELD_PATHS["created"], _is_time, _as_time, "timestamp"),
        (FIELD_PATHS["last_used"], _is_time, _as_time, "created"),
        (FIELD_PATHS["refinements"], _is_int, _accept(_is_int), 0),
        (FIELD_PATHS["confidence"], _is_rate, _accept(_is_rate), None),
        _ACTIVE_SLOT),
    RecordType.SOLUTION: (
        ((("verifiedCount",), ("verified_count",)), _is_int, _accept(_is_int), 0),
        _ACTIVE_SLOT),
    RecordType.DECISION: (
        (FIELD_PATHS["reviewed"], _is_time, _as_time, _OPTIONAL),
        _ACTIVE_SLOT),
}
# Top-level lifecycle markers and where they move inside ``lifecycle``.
_LIFECYCLE_MOVES = (("pinned", "pinned"), ("supersededBy", "supersededBy"),
                    ("superseded_by", "supersededBy"), ("superseded", "superseded"),
                    ("outdated", "outdated"), ("archived", "archived"))
_TOP_ORDER = ("id", "agent", "timestamp", "pattern", "problem", "solution", "effectiveness",
              "decision", "outcome", "metrics", "evolution", "tags", "active", "verifiedCount",
              "reviewedAt", "metadata", "variations", "lifecycle", VERSION_STAMP)


class _Draft:
    """Copy-on-write working copy of one record: only containers it edits are copied."""

    def __init__(self, record: Dict[str, Any]):
        self.original = record
        self.out = dict(record)
        self.copied: set = set()
        self.defaulted: List[str] = []

    def container(self, key: str) -> Dict[str, Any]:
        """``out[key]`` as a private dict (created when absent or null)."""
        value = self.out.get(key)
        if key in self.copied:
            return value
        if value is not None and not isinstance(value, dict):
            raise UnmigratableRecordError("%s is not an object: %s" % (key, _short(value)))
        self.out[key] = dict(value or {})
        self.copied.add(key)
        return self.out[key]

    def get(self, path: Tuple[str, ...]) -> Any:
        """The value at ``path`` or _ABSENT."""
        return _lookup(self.out, path)

    def put(self, path: Tuple[str, ...], value: Any) -> None:
        """Set ``path`` (one or two keys deep)."""
        target = self.out if len(path) == 1 else self.container(path[0])
        target[path[-1]] = value

    def delete(self, path: Tuple[str, ...]) -> None:
        """Remove ``path``; an emptied legacy ``performance`` block goes too."""
        if len(path) == 1:
            del self.out[path[0]]
            return
        holder = self.container(path[0])
        del holder[path[1]]
        if not holder and path[0] == "performance":
            del self.out["performance"]

    def fill(self, slot: _Slot) -> None:
        """Put a field's value in its canonical place; drop legacy copies holding that value."""
        paths, check, convert, default = slot
        value = self.get(paths[0])
        if value is not _ABSENT and value is not None:
            if not check(value):
                raise UnmigratableRecordError("%s has an unusable value %s"
                                              % (".".join(paths[0]), _short(value)))
        else:
            value = self._legacy_value(paths, convert, default)
            if value is _OPTIONAL:
                return
            self.put(paths[0], value)
        for path in paths[1:]:
            if path[0] in self.out and _same(self.get(path), value):
                self.delete(path)

    def _legacy_value(self, paths: Tuple[Tuple[str, ...], ...], convert: Callable[[Any], Any],
                      default: Any) -> Any:
        for path in paths[1:]:
            value = self.get(path) if path[0] in self.out else _ABSENT
            if value is not _ABSENT and convert(value) is not _ABSENT:
                return convert(value)
        if default is None:
            raise UnmigratableRecordError("no usable %s anywhere (looked at %s)" % (
                ".".join(paths[0]), ", ".join(".".join(p) for p in paths[1:])))
        if default is _OPTIONAL:
            return default
        self.defaulted.append(".".join(paths[0]))
        if default == "timestamp":
            if not _is_time(self.out.get("timestamp")):
                raise UnmigratableRecordError("no usable creation time (evolution.created, "
                                              "lifecycle.created_at or timestamp)")
            return self.out["timestamp"]
        return self.get(("evolution", "created")) if default == "created" else default


def _derived_counts(metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Exact success/failure counts behind ``successRate`` x ``executionCount``.

    The runtime creates a pattern at successRate 0.5 with executionCount 1 (a neutral prior
    counted as one execution) and keeps a running mean, so rate x count ends in .5 and the
    observed outcomes are ``count - 1``. A whole product is a plain ratio (hand-written
    records). Anything else is not a ratio of outcomes: rounded, and marked approximate.
    """
    count = int(metrics["executionCount"])
    product = metrics["successRate"] * count
    if abs(product - round(product)) < 1e-6:
        successes, observed, exact = int(round(product)), count, True
    elif abs(product - math.floor(product) - 0.5) < 1e-6:
        successes, observed, exact = int(math.floor(product)), count - 1, True
    else:
        successes, observed, exact = int(math.floor(product + 0.5)), count, False
    counts: Dict[str, Any] = {"successCount": successes, "failureCount": observed - successes}
    if not exact:
        counts["countsApproximate"] = True
    return counts


_COUNT_KEYS = ("successCount", "failureCount", "countsApproximate")


def _explicit_counts(draft: _Draft) -> None:
    metrics = draft.container("metrics")
    stamped = draft.original.get(VERSION_STAMP) == SchemaVersion.V2_0_0.value
    derived = _derived_counts(metrics)
    for key in _COUNT_KEYS:
        old, value = metrics.get(key), derived.get(key)
        # Counts aml wrote are refreshed (the runtime moves successRate); foreign ones are kept.
        if old is not None and not _same(old, value) and not stamped:
            raise UnmigratableRecordError("metrics.%s = %s disagrees with successRate and "
                                          "executionCount (%s)" % (key, _short(old), value))
        if value is None:
            metrics.pop(key, None)
        else:
            metrics[key] = value


def _derive_state(record: Dict[str, Any], lifecycle: Dict[str, Any]) -> str:
    legacy = str(lifecycle.get("legacyState", "")).lower()
    if (lifecycle.get("supersededBy") or lifecycle.get("outdated") is True
            or lifecycle.get("superseded") is True or legacy in _SUPERSEDED_WORDS):
        return "superseded"
    if lifecycle.get("archived") is True or legacy == "archived":
        return "archived"
    if record.get("active") is False:
        return "inactive"
    if lifecycle.get("pinned") is True or "pinned" in _tags(record):
        return "pinned"
    return "active"


def _state_agrees(state: str, active: Any) -> bool:
    if state in ("active", "pinned"):
        return active is not False
    return active is False if state == "inactive" else True


def _restructure_lifecycle(draft: _Draft) -> None:
    out = draft.out
    lifecycle = draft.container("lifecycle")
    for old, new in _LIFECYCLE_MOVES:
        if old in out:
            lifecycle.setdefault(new, out[old])
            if _same(lifecycle[new], out[old]):
                del out[old]
    state = lifecycle.get("state")
    if state is not None and state not in LIFECYCLE_STATES:
        lifecycle.setdefault("legacyState", state)
        if not _same(lifecycle["legacyState"], state):
            raise UnmigratableRecordError("lifecycle.state %s and lifecycle.legacyState %s "
                                          "disagree" % (_short(state), _short(
                                              lifecycle["legacyState"])))
        state = None
    if state is None or not _state_agrees(state, out.get("active")):
        lifecycle["state"] = _derive_state(out, lifecycle)


def _note_defaults(draft: _Draft) -> None:
    if not draft.defaulted:
        return
    metadata = draft.container("metadata")
    note = metadata.get("amlMigration")
    old = note.get("defaulted", []) if isinstance(note, dict) else []
    note = dict(note) if isinstance(note, dict) else {}
    note["defaulted"] = sorted(set(old) | set(draft.defaulted))
    metadata["amlMigration"] = note


def _ordered(record: Dict[str, Any]) -> Dict[str, Any]:
    out = {key: record[key] for key in _TOP_ORDER if key in record}
    out.update((key, value) for key, value in record.items() if key not in out)
    return out


class RestructureMetricsAndLifecycle(MigrationStep):
    """1.2.0 -> 2.0.0: legacy metric/lifecycle layouts into canonical places, counts, state, stamp.

    Raises UnmigratableRecordError (record left as it was) when the result would not be a
    record the runtime accepts, e.g. when no success rate exists anywhere.
    """

    source, target = SchemaVersion.V1_2_0, SchemaVersion.V2_0_0

    def migrate_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Restructure a pattern (metrics, evolution, counts, lifecycle, stamp)."""
        return self._migrate(RecordType.PATTERN, record)

    def migrate_solution(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Restructure a solution (snake_case fields, lifecycle, stamp)."""
        return self._migrate(RecordType.SOLUTION, record)

    def migrate_decision(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Restructure a decision (snake_case fields, null outcome, lifecycle, stamp)."""
        return self._migrate(RecordType.DECISION, record)

    def _migrate(self, rtype: RecordType, record: Dict[str, Any]) -> Dict[str, Any]:
        draft = _Draft(record)
        for slot in _SLOTS[rtype]:
            draft.fill(slot)
        if rtype is RecordType.PATTERN:
            _explicit_counts(draft)
        if rtype is RecordType.DECISION and "outcome" in draft.out and draft.out["outcome"] is None:
            del draft.out["outcome"]  # null means absent; the runtime rejects null
        _restructure_lifecycle(draft)
        _note_defaults(draft)
        draft.out[VERSION_STAMP] = self.target.value
        problems = runtime_problems(rtype, draft.out)
        if problems:
            raise UnmigratableRecordError("; ".join(problems))
        out = _ordered(draft.out)
        return record if out == record else out

    def revert_pattern(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Back to 1.2.0 when counts and lifecycle hold only what metrics/active imply."""
        out = self._revert(record)
        metrics = record.get("metrics")
        if isinstance(metrics, dict) and any(key in metrics for key in _COUNT_KEYS):
            derived = _derived_counts(metrics) if not runtime_problems(
                RecordType.PATTERN, record) else {}
            for key in _COUNT_KEYS:
                if key in metrics and not _same(metrics[key], derived.get(key)):
                    raise LossyStepError("step %s would drop metrics.%s = %s"
                                         % (self.down_name, key, _short(metrics[key])))
            out["metrics"] = {k: v for k, v in metrics.items() if k not in _COUNT_KEYS}
        return out

    def revert_solution(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Back to 1.2.0 when the lifecycle holds only what ``active`` implies."""
        return self._revert(record)

    revert_decision = revert_solution

    def _revert(self, record: Dict[str, Any]) -> Dict[str, Any]:
        lifecycle = record.get("lifecycle")
        if lifecycle is not None:
            if not isinstance(lifecycle, dict) or set(lifecycle) - {"state"}:
                raise LossyStepError("step %s would drop lifecycle %s"
                                     % (self.down_name, _short(lifecycle)))
            if lifecycle.get("state") != _derive_state(record, {}):
                raise LossyStepError("step %s would drop lifecycle.state %s (not implied by "
                                     "active/tags)" % (self.down_name,
                                                       _short(lifecycle.get("state"))))
        return {k: v for k, v in record.items() if k not in ("lifecycle", VERSION_STAMP)}


MIGRATION_STEPS: Tuple[MigrationStep, ...] = (AddTagsAndActive(), AddMetadataAndVariations(),
                                               RestructureMetricsAndLifecycle())


# -- one record, one file -----------------------------------------------------

@dataclasses.dataclass
class RecordMigration:
    """Migrating one record: the record after, its version before, the steps that changed it."""

    record: Any
    version: Optional[SchemaVersion]
    changes: List[Tuple[str, Any, Any]]
    problem: Optional[str] = None
    lossy: bool = False


def _walk_up(rtype: RecordType, record: Dict[str, Any], target: SchemaVersion
             ) -> List[Tuple[str, Any, Any]]:
    # Every step up to the target runs: each only fills what is missing, so a record that
    # claims a version but lacks one of its fields (e.g. runtime-dropped tags) is repaired.
    changes = []
    for step in MIGRATION_STEPS:
        if step.target > target:
            break
        after = step.up(rtype, record)
        if after is not record:
            changes.append((step.name, record, after))
            record = after
    return changes


def _walk_down(rtype: RecordType, record: Dict[str, Any], version: SchemaVersion,
               target: SchemaVersion) -> List[Tuple[str, Any, Any]]:
    changes = []
    for step in reversed(MIGRATION_STEPS):
        if step.target <= version and step.source >= target:
            after = step.down(rtype, record)
            if after is not record:
                changes.append((step.down_name, record, after))
                record = after
    return changes


def _restamp(record: Dict[str, Any], target: SchemaVersion) -> Optional[Dict[str, Any]]:
    if target is SchemaVersion.V2_0_0 or record.get(VERSION_STAMP, target.value) == target.value:
        return None
    out = dict(record)
    out[VERSION_STAMP] = target.value  # a hand-written stamp follows its record
    return out


def migrate_record(rtype: RecordType, record: Any, target: SchemaVersion) -> RecordMigration:
    """Migrate one record up or down to ``target``; never raises for a bad record.

    A record that cannot be placed, cannot reach 2.0.0, or would lose information on the
    way down comes back unchanged with ``problem`` set (and ``lossy`` for the last case).
    """
    version, why = place_record(rtype, record)
    if version is None:
        return RecordMigration(record, None, [], "cannot place: %s" % why)
    try:
        if version > target:
            changes = _walk_down(rtype, record, version, target)
        else:
            changes = _walk_up(rtype, record, target)
    except LossyStepError as exc:
        return RecordMigration(record, version, [], str(exc), lossy=True)
    except UnmigratableRecordError as exc:
        return RecordMigration(record, version, [], str(exc))
    final = changes[-1][2] if changes else record
    restamped = _restamp(final, target)
    if restamped is not None:
        changes.append(("stamp", final, restamped))
    return RecordMigration(changes[-1][2] if changes else record, version, changes)


def _leaves(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(obj, dict) or not obj:
        return {prefix: obj}
    out: Dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_leaves(value, "%s.%s" % (prefix, key) if prefix else str(key)))
    return out


def record_diff(before: Any, after: Any, limit: int = 12) -> List[str]:
    """Leaf-level differences, moves first: ``> old -> new: value``, ``-``, ``+``, ``~`` lines."""
    old, new = _leaves(before), _leaves(after)
    removed = {p: v for p, v in old.items() if p not in new}
    added = {p: v for p, v in new.items() if p not in old}
    lines = []
    for path, value in sorted(removed.items()):
        target = next((p for p, v in sorted(added.items()) if _same(v, value)), None)
        if target is not None:
            lines.append("> %s -> %s: %s" % (path, target, _short(value)))
            del added[target]
        else:
            lines.append("- %s: %s" % (path, _short(value)))
    lines.extend("+ %s: %s" % (p, _short(v)) for p, v in sorted(added.items()))
    lines.extend("~ %s: %s -> %s" % (p, _short(old[p]), _short(new[p])) for p in sorted(old)
                 if p in new and not _same(old[p], new[p]))
    return lines[:limit] + (["... %d more" % (len(lines) - limit)] if len(lines) > limit else [])


def _version_key(name: str) -> Tuple[int, str]:
    return (_VERSION_RANK.get(name, len(_VERSION_RANK)), name)


def _add_counts(into: Dict[str, int], key: str, count: int = 1) -> None:
    into[key] = into.get(key, 0) + count


@dataclasses.dataclass
class FileMigration:
    """What migrating one file did (or would do)."""

    file: str
    records: List[Any]
    changed: int = 0
    versions: Dict[str, int] = dataclasses.field(default_factory=dict)
    steps: Dict[str, int] = dataclasses.field(default_factory=dict)
    samples: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    reported: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, index: int, outcome: RecordMigration) -> None:
        """Account for one record's outcome."""
        self.records.append(outcome.record)
        _add_counts(self.versions, outcome.version.value if outcome.version else "unplaceable")
        if outcome.problem:
            where = {"file": self.file, "index": index, "id": _record_id(outcome.record),
                     "problem": outcome.problem}
            (self.refused if outcome.lossy else self.reported).append(where)
        self.changed += bool(outcome.changes)
        for name, before, after in outcome.changes:
            _add_counts(self.steps, name)
            if not any(s["step"] == name for s in self.samples):
                self.samples.append({"step": name, "file": self.file, "index": index,
                                     "id": _record_id(before), "diff": record_diff(before, after)})


def _record_id(record: Any) -> Optional[str]:
    rid = record.get("id") if isinstance(record, dict) else None
    return rid if isinstance(rid, str) else None


def migrate_records(rel: str, rtype: RecordType, records: List[Any], target: SchemaVersion
                    ) -> FileMigration:
    """Migrate the records of one file (in memory); the caller writes ``records`` back."""
    outcome = FileMigration(file=rel, records=[])
    for index, record in enumerate(records):
        outcome.add(index, migrate_record(rtype, record, target))
    return outcome


# -- results ------------------------------------------------------------------

@dataclasses.dataclass
class MigrationResult:
    """One migration run or dry run: versions found, per-step changes, samples, problems."""

    target: str
    dry_run: bool
    records: int = 0
    changed: int = 0
    from_versions: Dict[str, int] = dataclasses.field(default_factory=dict)
    steps: Dict[str, int] = dataclasses.field(default_factory=dict)
    samples: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    reported: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    files_changed: List[str] = dataclasses.field(default_factory=list)
    unreadable: List[str] = dataclasses.field(default_factory=list)
    backup_id: Optional[str] = None
    run_id: Optional[str] = None
    seconds: float = 0.0

    def absorb(self, outcome: FileMigration) -> None:
        """Add one file's outcome."""
        self.records += len(outcome.records)
        self.changed += outcome.changed
        for name, count in outcome.versions.items():
            _add_counts(self.from_versions, name, count)
        for name, count in outcome.steps.items():
            _add_counts(self.steps, name, count)
        for sample in outcome.samples:
            self._keep_sample(sample)
        self.reported.extend(outcome.reported)
        self.refused.extend(outcome.refused)
        if outcome.changed:
            self.files_changed.append(outcome.file)

    def _keep_sample(self, sample: Dict[str, Any]) -> None:
        # One sample per step: the most telling one (longest diff) of the files' first ones.
        for index, kept in enumerate(self.samples):
            if kept["step"] == sample["step"]:
                if len(sample["diff"]) > len(kept["diff"]):
                    self.samples[index] = sample
                return
        self.samples.append(sample)

    def exit_code(self) -> ExitCode:
        """4 if a step down was refused, 3 if files or records were skipped, else 0."""
        if self.refused:
            return ExitCode.REFUSED
        return ExitCode.PARTIAL if (self.unreadable or self.reported) else ExitCode.OK


@dataclasses.dataclass
class FileVersions:
    """Versions found in one record file."""

    file: str
    agent: str
    type: str
    versions: Dict[str, int]
    runtime_invalid: int = 0

    @property
    def mixed(self) -> bool:
        """True when the file holds more than one version (or unplaceable records)."""
        return len(self.versions) > 1


@dataclasses.dataclass
class DetectionReport:
    """Schema versions per file, per agent and for the store; what cannot be placed; history."""

    files: List[FileVersions] = dataclasses.field(default_factory=list)
    agents: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    totals: Dict[str, int] = dataclasses.field(default_factory=dict)
    unplaced: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    runtime_invalid: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    unreadable: List[str] = dataclasses.field(default_factory=list)
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    history_error: Optional[str] = None

    @property
    def mixed(self) -> bool:
        """True when the store holds more than one version."""
        return len(self.totals) > 1

    @property
    def mixed_agents(self) -> List[str]:
        """Agents whose records are of more than one version."""
        return [agent for agent, counts in self.agents.items() if len(counts) > 1]

    def add_file(self, entry: FileVersions) -> None:
        """Account for one file's counts."""
        self.files.append(entry)
        per_agent = self.agents.setdefault(entry.agent, {})
        for name, count in entry.versions.items():
            _add_counts(per_agent, name, count)
            _add_counts(self.totals, name, count)


def sorted_versions(counts: Dict[str, int]) -> Dict[str, int]:
    """Version counts in chain order, ``unplaceable`` last."""
    return {name: counts[name] for name in sorted(counts, key=_version_key)}


def versions_text(counts: Dict[str, int]) -> str:
    """``1.1.0: 12, 2.0.0: 3`` in chain order."""
    return ", ".join("%s: %d" % (name, count) for name, count in sorted_versions(counts).items())


# -- the manager --------------------------------------------------------------

MIGRATIONS_STATE = "migrations.json"


class MigrationManager:
    """Detects schema versions and migrates a store's records, one locked file at a time."""

    def __init__(self, store: Store, agents: Optional[Sequence[str]] = None,
                 progress: Optional[Callable[[str], None]] = None):
        self.store = store
        self.agents = agents
        self.progress = progress or (lambda text: None)

    def _files(self) -> Iterator[Tuple[DataFile, str]]:
        for agent in self.store.select_agents(self.agents):
            for data_file in self.store.record_files(agent):
                rel = data_file.path.relative_to(self.store.root).as_posix()
                self.progress("migrate: %s" % rel)
                yield data_file, rel

    def history(self) -> List[Dict[str, Any]]:
        """Recorded migration runs, oldest first; raises IntegrityError if the file is corrupt."""
        return self.store.read_state(MIGRATIONS_STATE, [])

    def detect(self) -> DetectionReport:
        """Versions of every record, per file and agent; read-only, creates nothing."""
        report = DetectionReport()
        for data_file, rel in self._files():
            try:
                records, _ = self.store.load_records(data_file)
            except CorruptFileError as exc:
                report.unreadable.append(str(exc))
                continue
            report.add_file(self._detect_file(data_file, rel, records, report))
        try:
            report.history = self.history()
        except IntegrityError as exc:
            report.history_error = str(exc)
        return report

    def _detect_file(self, data_file: DataFile, rel: str, records: List[Any],
                     report: DetectionReport) -> FileVersions:
        rtype = data_file.rtype
        entry = FileVersions(rel, data_file.agent, rtype.value, {})
        for index, record in enumerate(records):
            version, why = place_record(rtype, record)
            _add_counts(entry.versions, version.value if version else "unplaceable")
            where = {"file": rel, "index": index, "id": _record_id(record)}
            if version is None:
                report.unplaced.append(dict(where, problem=why))
                continue
            problems = runtime_problems(rtype, record)
            if problems:
                entry.runtime_invalid += 1
                report.runtime_invalid.append(dict(where, problem="; ".join(problems)))
        entry.versions = sorted_versions(entry.versions)
        return entry

    def migrate_latest(self, dry_run: bool = False, backup: bool = True) -> MigrationResult:
        """Migrate every record to 2.0.0 (see ``migrate``)."""
        return self.migrate(SchemaVersion.latest(), dry_run=dry_run, backup=backup)

    def migrate(self, target: Any, dry_run: bool = False, backup: bool = True
                ) -> MigrationResult:
        """Migrate every record to ``target`` (up, or down where lossless).

        A dry run reads only. A real run holds the maintenance lock, takes a verified safety
        backup before the first write (unless ``backup`` is False), rewrites each changed file
        atomically under the runtime's lock and records the run. Raises RefusedError (backup
        failed, or a step down would lose information: nothing is written), StoreBusyError.
        """
        target = target if isinstance(target, SchemaVersion) else SchemaVersion.parse(target)
        if dry_run:
            return self._scan(target)
        started = time.monotonic()
        with self.store.maintenance_lock():
            self.store.cleanup_temp_files()
            if target is not SchemaVersion.latest():
                self._refuse_if_lossy(self._scan(target))
            result = self._apply(target, backup)
            result.seconds = time.monotonic() - started
            self._record(result)
        return result

    def _scan(self, target: SchemaVersion) -> MigrationResult:
        result = MigrationResult(target=target.value, dry_run=True)
        for data_file, rel in self._files():
            try:
                records, _ = self.store.load_records(data_file)
            except CorruptFileError as exc:
                result.unreadable.append(str(exc))
                continue
            result.absorb(migrate_records(rel, data_file.rtype, records, target))
        return result

    def _apply(self, target: SchemaVersion, backup: bool) -> MigrationResult:
        result = MigrationResult(target=target.value, dry_run=False,
                                 run_id=new_run_id("migrate", self.store.now))
        need_backup = backup
        for data_file, rel in self._files():
            try:
                if need_backup and self._has_changes(data_file, rel, target, result):
                    result.backup_id = self._safety_backup(target)
                    need_backup = False
                if need_backup:
                    continue  # unchanged and already counted by _has_changes
                self._rewrite(data_file, rel, target, result)
            except CorruptFileError as exc:
                result.unreadable.append(str(exc))
        return result

    def _safety_backup(self, target: SchemaVersion) -> str:
        try:
            return safety_backup(self.store, "before migrate to %s" % target.value)
        except RefusedError as exc:
            raise RefusedError("migrate refused, nothing was changed: the safety backup failed "
                               "(%s); fix it or pass --no-backup" % exc) from None

    def _has_changes(self, data_file: DataFile, rel: str, target: SchemaVersion,
                     result: MigrationResult) -> bool:
        # Until the backup exists nothing may be written: peek without locks first.
        records, _ = self.store.load_records(data_file)
        outcome = migrate_records(rel, data_file.rtype, records, target)
        if outcome.changed:
            return True
        result.absorb(outcome)
        return False

    def _rewrite(self, data_file: DataFile, rel: str, target: SchemaVersion,
                 result: MigrationResult) -> None:
        with self.store.rewrite(data_file.path) as job:
            outcome = migrate_records(rel, data_file.rtype, job.data, target)
            if outcome.changed:
                job.data = outcome.records
                job.changed = True
        result.absorb(outcome)

    def _refuse_if_lossy(self, plan: MigrationResult) -> None:
        if not plan.refused:
            return
        raise RefusedError(self.refusal_message(plan))

    def refusal_message(self, plan: MigrationResult) -> str:
        """Why a step down is refused, naming the pre-migration backup to restore instead."""
        first = plan.refused[0]
        return ("migrating down to %s would lose information in %d record(s) (first: %s[%d] "
                "%s); nothing was changed. %s" % (
                    plan.target, len(plan.refused), first["file"], first["index"],
                    first["problem"], self._backup_hint(plan.target)))

    def _backup_hint(self, target: str) -> str:
        try:
            runs = [run for run in self.history() if run.get("backup_id")]
        except IntegrityError:
            runs = []
        if not runs:
            return "No pre-migration backup is recorded in .aml/%s." % MIGRATIONS_STATE
        # Prefer a backup of the store as it was when all its records were at or below target.
        exact = [run for run in runs if run.get("from") and all(
            _version_key(v) <= _version_key(target) for v in run["from"])]
        run = (exact or runs)[-1]
        return ("To go back, restore the pre-migration backup %s (taken before the run of %s, "
                "whose records were %s): aml <memory_path> backup restore %s"
                % (run["backup_id"], run.get("when"), versions_text(run.get("from", {})),
                   run["backup_id"]))

    def _record(self, result: MigrationResult) -> None:
        counts = {"records": result.records, "changed": result.changed,
                  "files_changed": len(result.files_changed), "reported": len(result.reported),
                  "unreadable_files": len(result.unreadable), "steps": result.steps}
        entry = {"run_id": result.run_id, "when": format_timestamp(self.store.now),
                 "from": sorted_versions(result.from_versions), "to": result.target,
                 "counts": counts, "backup_id": result.backup_id}
        runs = self.store.read_state_lenient(MIGRATIONS_STATE, [])
        self.store.write_state(MIGRATIONS_STATE, (runs + [entry])[-200:])
        self.store.record_operation("migrate", self.store.now, result.seconds,
                                    dict(counts, run_id=result.run_id, to=result.target,
                                         backup_id=result.backup_id))


__all__ += ["SchemaVersion", "MigrationStep", "AddTagsAndActive", "AddMetadataAndVariations",
            "RestructureMetricsAndLifecycle", "MIGRATION_STEPS", "MigrationManager",
            "MigrationResult", "DetectionReport", "FileVersions", "RecordMigration",
            "detect_record_version", "place_record", "runtime_problems", "migrate_record",
            "migrate_records", "record_diff", "LossyStepError", "UnmigratableRecordError",
            "LIFECYCLE_STATES", "VERSION_STAMP"]



# =============================================================================
# 14. Monitoring and alerts
# Measured metrics, health checks, alert lifecycle, reports.
# =============================================================================

# Imported here rather than in section 2 so that the parallel branches merge cleanly.


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


def _non_negative_number(key: str, value: Any, source: str) -> float:
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
        result.update({k: _non_negative_number(k, v, source) for k, v in values.items()})
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
    warnings: List[str] = dataclasses.field(default_factory=list)

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
    """The newest verified backup whose manifest still exists and whose latest verify passed."""
    latest_verify: Dict[Any, bool] = {}
    for entry in reversed(history):
        summary = entry.get("summary") if isinstance(entry.get("summary"), dict) else {}
        backup_id = summary.get("backup_id")
        if entry.get("operation") == "verify" and backup_id not in latest_verify:
            latest_verify[backup_id] = summary.get("ok") is not False
        if (entry.get("operation") == "backup" and summary.get("verified") is True
                and latest_verify.get(backup_id, True)
                and isinstance(summary.get("manifest"), str)
                and os.path.isfile(summary["manifest"])):
            return entry
    return None


def _cache_stats(store: Store) -> Dict[str, Any]:
    """The hot-cache counters that real get/search lookups recorded (zeros when none)."""
    stats = hot_cache_stats(store)
    return stats if isinstance(stats, dict) else {}


@dataclasses.dataclass
class IndexState:
    """What monitoring knows about the persisted index (section 10)."""

    built: bool
    corrupt: bool
    stale: List[str]
    size_bytes: int


def _index_staleness(store: Store) -> IndexState:
    """Whether the index exists and verifies, and which data files changed since its build."""
    index = MemoryIndex(store)
    built = index.manifest() is not None
    corrupt = not built and index.part("manifest.json").exists()
    return IndexState(built, corrupt, index.stale_files() if built else [], index.size_bytes())


def _rel(store: Store, path: Path) -> str:
    return Path(path).relative_to(store.root).as_posix()


@dataclasses.dataclass
class LookupTiming:
    """One indexed lookup measured now; ``ms`` is None when it could not be measured."""

    ms: Optional[float]
    note: str
    failed: bool = False


def _sample_record_id(index: MemoryIndex) -> Optional[str]:
    """A deterministic id to look up: the middle record of the largest indexed file."""
    entries = sorted(index.files(), key=lambda e: (-e["size"], e["path"]))
    for entry in entries:
        ids = [row[P_ID] for row in index.postings(entry) if row[P_ID]]
        if ids:
            return ids[len(ids) // 2]
    return None


def _indexed_lookup_ms(store: Store, state: IndexState) -> LookupTiming:
    """Time one real ``get`` through the index (bloom, id bucket, hot cache or one data file).

    It excludes the freshness check a ``get`` does first and records no cache counters, so
    monitoring never inflates the hit rate it reports.
    """
    if not state.built:
        return LookupTiming(None, "no usable index (run: optimize index)")
    if state.stale:
        return LookupTiming(None, "the index is stale (run: optimize index)")
    try:
        record_id = _sample_record_id(MemoryIndex(store))
        if record_id is None:
            return LookupTiming(None, "the index holds no record ids")
        started = time.perf_counter()
        result = _get_indexed(MemoryIndex(store), record_id)  # fresh: nothing parsed yet
        elapsed = (time.perf_counter() - started) * 1000.0
    except (IntegrityError, CorruptFileError, OSError) as exc:
        return LookupTiming(None, "indexed lookup failed: %s" % exc, failed=True)
    if not result.records:
        return LookupTiming(None, "id %s is indexed but was not found" % record_id, failed=True)
    found = result.records[0]
    return LookupTiming(round(elapsed, 3), "get %s in %s via %s" % (record_id, found.file,
                                                                    found.source))


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
    metrics = AgentMetrics(agent, agent_disk_bytes(store, agent), len(files), gz,
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
    """(bytes of everything but ``.aml/``, bytes of ``.aml/``), as space-based pruning measures."""
    return store_disk_bytes(store), _dir_bytes(store.state_dir)


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
            report.warnings.extend(self._save_sample(report))
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
        index = _index_staleness(store)
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
        lookup = _indexed_lookup_ms(self.store, index)
        stats = _cache_stats(self.store)
        hits, misses = _number(stats.get("hits")), _number(stats.get("misses"))
        rate = None
        if hits is not None and misses is not None and hits + misses > 0:
            rate = round(hits / (hits + misses), 4)
        return PerformanceMetrics(
            lookup.ms, lookup.note, round(load_ms, 3) if loaded else None, loaded, records,
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
            out.extend(_forecast(key, agent.agent, t[key], agent.bytes, agent_rate)
                       for key in ("agent_memory_warning_mb", "agent_memory_critical_mb"))
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
        sizes = {a: agent_disk_bytes(self.store, a) for a in self.store.agents()}
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
        """The persisted index exists, verifies and covers every data file as it is now."""
        index = _index_staleness(self.store)
        details = {"built": index.built, "corrupt": index.corrupt, "stale_files": index.stale,
                   "size_bytes": index.size_bytes}
        if not index.built:
            what = "index does not verify" if index.corrupt else "no index built"
            problem = Problem("index", HealthStatus.WARNING, what + " (run: optimize index)")
            return self._finish("index", [problem], "", details)
        problems = []
        if index.stale:
            names = ", ".join(index.stale[:3]) + (", ..." if len(index.stale) > 3 else "")
            problems.append(Problem("index", HealthStatus.WARNING, "index is stale for %d "
                                    "file(s) (%s) (run: optimize index)"
                                    % (len(index.stale), names)))
        return self._finish("index", problems, "index covers every data file (%s)"
                            % human_bytes(index.size_bytes), details)

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
        lookup = _indexed_lookup_ms(self.store, _index_staleness(self.store))
        if lookup.failed:
            problems.append(Problem("lookup", HealthStatus.WARNING, lookup.note))
        if lookup.ms is not None:
            known.append("indexed lookup %.2f ms" % lookup.ms)
            if lookup.ms > t["query_time_warning_ms"]:
                problems.append(Problem("lookup", HealthStatus.WARNING, "indexed lookup took "
                                        "%.1f ms (limit %g ms)" % (lookup.ms,
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
        details = {"lookup_ms": lookup.ms, "lookup_note": lookup.note, "cache_hit_rate": rate,
                   "cache_lookups": int(hits + misses)}
        if not known and not problems:
            return HealthCheck("performance", HealthStatus.UNKNOWN, "nothing to measure: %s; "
                               "fewer than %d cached lookups recorded"
                               % (lookup.note, t["cache_min_lookups"]), [], details)
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
                             metrics.warnings + health.warnings)


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


def health_summary(report: HealthReport) -> str:
    """One line: ``AML WARNING - check: message; ...`` naming every check that is not healthy."""
    bad = [c for c in report.checks if c.status is not HealthStatus.HEALTHY]
    if bad:
        summary = "; ".join("%s: %s" % (c.name, c.message) for c in bad)
    else:
        summary = "%d checks healthy" % len(report.checks)
    return "AML %s - %s" % (report.status.nagios, summary.replace("|", "/").replace("\n", " "))


def nagios_line(report: HealthReport) -> str:
    """The one-line plugin output: ``AML OK - summary | 'label'=value[UOM];warn;crit;min``."""
    perf = []
    for label, (value, uom, warn, crit) in report.perfdata.items():
        shown = "U" if value is None else _perf_number(value) + uom
        text = "%s=%s;%s;%s;0" % (_perf_label(label), shown, _perf_number(warn),
                                  _perf_number(crit))
        perf.append(re.sub(r";+$", "", text) if value is not None else text.split(";")[0])
    return "%s | %s" % (health_summary(report), " ".join(perf))


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
            "nagios_line", "health_summary", "prometheus_text", "html_report", "worst_status"]


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
    return Store(args.memory_path, now=args.now, lock_timeout=args.lock_timeout,
                 config_file=args.config)


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
    note = ("  (undone %s)" % run["undone"] if run["undone"] else
            "  (interrupted: archive incomplete; undo puts back what is missing)"
            if run.get("status") == "writing" else "")
    return "%s  %s  %s  %d records%s" % (run["run_id"], run["operation"], run["created"],
                                         run["records"], note)


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
        backup = "; safety backup %s" % result.backup_id if result.backup_id else ""
        out.line("run %s%s; undo with: aml.py %s prune --undo %s"
                 % (result.run_id, backup, memory_path, result.run_id))


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
    for repair in result.repaired:   # the repository was damaged: say so even with -q
        out.warn("repaired damaged backup data: %s" % repair)
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
    out.line("repository %s: %d snapshots, %s%s" % (
        result.backup_root / REPO_DIR_NAME, len(result.snapshots),
        human_bytes(result.repository_bytes),
        " (and %d of other stores)" % result.other_stores if result.other_stores else ""))
    out.document(result)
    return ExitCode.INTEGRITY if result.problems else ExitCode.OK


def _one_backup_id(args: argparse.Namespace) -> Optional[str]:
    if args.backup_id and args.backup_id_flag and args.backup_id != args.backup_id_flag:
        raise UsageError("two different backup ids given")
    return args.backup_id or args.backup_id_flag


def cmd_backup_verify(args: argparse.Namespace) -> int:
    """backup verify: check snapshots; exit 6 naming what is wrong."""
    out = output_for(args)
    result = _backup_manager(args).verify(_one_backup_id(args), deep=args.deep,
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
    at = None
    if args.at:
        at = parse_timestamp(args.at)
        if at is None:
            raise UsageError("--at %r is not an ISO 8601 timestamp" % args.at)
    result = _backup_manager(args).restore(_one_backup_id(args), at=at,
                                           agents=args.agents, target=args.target,
                                           dry_run=args.dry_run, force=args.force)
    out.progress_done()
    for warning in result.warnings:
        out.warn(warning)
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
    p.add_argument("--backup-id", dest="backup_id_flag", metavar="ID", help="snapshot id")
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

def _migrate_write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="report per step what would change, with a sample diff; write nothing")
    parser.add_argument("--no-backup", action="store_true",
                        help="skip the verified safety backup taken before the first write")
    parser.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents")


@command_builder
def _build_migrate(subparsers: Any) -> None:
    parser = subparser(subparsers, "migrate", "detect schema versions and migrate records "
                       "(1.0.0 -> 1.1.0 -> 1.2.0 -> 2.0.0)")
    actions = parser.add_subparsers(dest="migrate_action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    detect = subparser(actions, "detect", "versions per file and agent, unplaceable records, "
                       "migration history (read-only)")
    detect.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents")
    detect.set_defaults(func=cmd_migrate_detect)
    to_version = subparser(actions, "migrate", "migrate every record to VERSION (up, or down "
                           "where lossless)")
    to_version.add_argument("version", nargs="?", metavar="VERSION",
                            help="target version (original spelling: migrate migrate 1.2.0)")
    to_version.add_argument("--version", dest="version_option", metavar="VERSION",
                            help="target version: 1.0.0, 1.1.0, 1.2.0 or 2.0.0")
    _migrate_write_options(to_version)
    to_version.set_defaults(func=cmd_migrate)
    latest = subparser(actions, "migrate-latest", "migrate every record to %s"
                       % SchemaVersion.latest().value)
    _migrate_write_options(latest)
    latest.set_defaults(func=cmd_migrate, version=SchemaVersion.latest().value,
                        version_option=None)


def _print_detection(out: Output, report: DetectionReport, root: Path) -> None:
    records = sum(report.totals.values())
    out.line("Schema versions in %s (%d agents, %d files, %d records)"
             % (root, len(report.agents), len(report.files), records))
    for entry in report.files:
        invalid = ("  [%d rejected by the runtime]" % entry.runtime_invalid
                   if entry.runtime_invalid else "")
        out.line("  %-40s %s%s%s" % (entry.file, versions_text(entry.versions),
                                     "  MIXED" if entry.mixed else "", invalid))
    out.line("Per agent:")
    for agent, counts in report.agents.items():
        out.line("  %-28s %s%s" % (agent, versions_text(counts),
                                   "  MIXED" if len(counts) > 1 else ""))
    out.line("Store: %s (%s)" % (versions_text(report.totals) or "no records",
                                 "MIXED" if report.mixed else "uniform"))
    _print_detection_problems(out, report)
    _print_history(out, report)


def _print_detection_problems(out: Output, report: DetectionReport) -> None:
    if report.unplaced:
        out.line("Cannot place %d record(s):" % len(report.unplaced))
        for item in report.unplaced[:20]:
            out.line("  %s[%d] id=%s: %s" % (item["file"], item["index"], item["id"],
                                             item["problem"]))
    if report.runtime_invalid:
        out.line("%d record(s) the runtime would reject (migrate-latest repairs those whose "
                 "information exists), e.g.:" % len(report.runtime_invalid))
        for item in report.runtime_invalid[:5]:
            out.line("  %s[%d] id=%s: %s" % (item["file"], item["index"], item["id"],
                                             item["problem"]))


def _print_history(out: Output, report: DetectionReport) -> None:
    if report.history_error:
        out.warn("migration history unreadable: %s" % report.history_error)
    out.line("Migration history: %s" % ("none" if not report.history else
                                        "%d run(s)" % len(report.history)))
    for run in report.history[-10:]:
        counts = run.get("counts", {})
        out.line("  %s  %s -> %s  changed %s of %s records  backup %s" % (
            run.get("when"), versions_text(run.get("from", {})) or "-", run.get("to"),
            counts.get("changed"), counts.get("records"), run.get("backup_id") or "none"))


def cmd_migrate_detect(args: argparse.Namespace) -> int:
    """``migrate detect``: print versions found; exit 3 if a file was unreadable."""
    store, out = open_store(args), output_for(args)
    report = MigrationManager(store, args.agents).detect()
    for problem in report.unreadable:
        out.warn("skipped unreadable file %s" % problem)
    out.document(dict(to_jsonable(report), mixed=report.mixed, mixed_agents=report.mixed_agents))
    _print_detection(out, report, store.root)
    return int(ExitCode.PARTIAL if report.unreadable else ExitCode.OK)


def _target_version(args: argparse.Namespace) -> SchemaVersion:
    given = [v for v in (args.version, args.version_option) if v]
    if not given:
        raise UsageError("migrate: name the target version (migrate --version 1.2.0, "
                         "or migrate-latest)")
    versions = {SchemaVersion.parse(v) for v in given}
    if len(versions) > 1:
        raise UsageError("migrate: two different target versions given: %s" % " and ".join(given))
    return versions.pop()


def cmd_migrate(args: argparse.Namespace) -> int:
    """``migrate migrate VERSION`` / ``migrate-latest``: migrate, report, return the exit code."""
    target = _target_version(args)
    store, out = open_store(args), output_for(args)
    manager = MigrationManager(store, args.agents, progress=out.progress)
    try:
        result = manager.migrate(target, dry_run=args.dry_run, backup=not args.no_backup)
    finally:
        out.progress_done()
    for problem in result.unreadable:
        out.warn("skipped unreadable file %s" % problem)
    for item in result.reported[:20]:
        out.warn("left unchanged %s[%d] id=%s: %s" % (item["file"], item["index"], item["id"],
                                                     item["problem"]))
    if len(result.reported) > 20:
        out.warn("... and %d more record(s) left unchanged" % (len(result.reported) - 20))
    if result.refused:
        out.warn(manager.refusal_message(result))
    out.document(result)
    _print_migration(out, result)
    return int(result.exit_code())


def _print_migration(out: Output, result: MigrationResult) -> None:
    verb = "would change" if result.dry_run else "changed"
    out.line("%s to %s: %s %d of %d records in %s file(s)%s" % (
        "Dry run: migrate" if result.dry_run else "Migrated", result.target, verb,
        result.changed, result.records,
        len(result.files_changed),
        "" if result.dry_run else "; backup %s" % (result.backup_id or "none")))
    out.line("Versions before: %s" % (versions_text(result.from_versions) or "no records"))
    for name, count in sorted(result.steps.items()):
        out.line("  step %-22s %d record(s)" % (name, count))
    for sample in sorted(result.samples, key=lambda s: s["step"]):
        out.line("Sample (%s) %s[%d] id=%s:" % (sample["step"], sample["file"], sample["index"],
                                               sample["id"]))
        for line in sample["diff"]:
            out.line("    " + line)
    if result.reported:
        out.line("%d record(s) left unchanged (see warnings)" % len(result.reported))


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
    quiet = 0
    for forecast in report.forecasts:
        if forecast.subject != "store" and forecast.days_until is None:
            quiet += 1  # agents that are not growing: counted, listed in --format json
            continue
        when = forecast.note if forecast.days_until is None else "%.1f days, %s" % (
            forecast.days_until, forecast.note)
        lines.append("  %s %s (%s): %s" % (forecast.subject, forecast.limit,
                                           human_bytes(forecast.limit_bytes), when))
    if quiet:
        lines.append("  %d agent limit(s) not approaching: no growth or no growth data" % quiet)
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
    for problem in report.warnings:
        out.warn(problem)
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
    except (AmlError, OSError) as exc:  # e.g. permission denied: health could not run, UNKNOWN
        if args.format == "nagios":
            print("AML UNKNOWN - %s" % str(exc).replace("|", "/"), file=out.stdout)
        raise HealthUnknownError(str(exc)) from None
    for warning in report.warnings:
        out.warn(warning)
    if args.format == "nagios":
        print(nagios_line(report), file=out.stdout)
    elif out.quiet:
        if report.status is not HealthStatus.HEALTHY:
            out.always(health_summary(report))  # cron mails one clear line
    else:
        for line in _health_lines(report):
            out.line(line)
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
    except OSError as exc:
        # Permission denied, disk full, ...: one clear line, not a traceback (cron mails it).
        where = exc.filename if exc.filename is not None else ""
        print("aml: error: %s%s" % (exc.strerror or exc, ": %s" % where if where else ""),
              file=sys.stderr)
        return int(ExitCode.FAILURE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
