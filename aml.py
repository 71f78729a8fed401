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
    aml.py .loom/memory optimize dedupe                # near-duplicates (--apply merges them)
    aml.py .loom/memory search --tag database --min-confidence 0.7
    aml.py .loom/memory get RECORD_ID
    aml.py .loom/memory backup restore ID --target /tmp/check
    aml.py .loom/memory backup copy --to /mnt/usb/aml-backup   # or rclone:NAME:path
    aml.py .loom/memory backup diff ID_A ID_B           # records added, removed, changed
    aml.py .loom/memory migrate detect
    aml.py .loom/memory migrate migrate-latest --dry-run
    aml.py .loom/memory monitor report --format html --output report.html
    aml.py .loom/memory monitor serve                  # live dashboard, /metrics: 127.0.0.1:9731

Cron (see crontab.example; quiet on success, one error line and non-zero on failure)::

    0 2 * * *  python3 /path/to/aml.py '/path/to/.loom/memory' backup auto -q
    30 2 * * * python3 /path/to/aml.py '/path/to/.loom/memory' optimize index -q
    0 3 * * 0  python3 /path/to/aml.py '/path/to/.loom/memory' prune -q
    0 6 * * *  python3 /path/to/aml.py '/path/to/.loom/memory' monitor health -q

Exit codes::

    0  success
    1  the operation failed (or: nothing found for get/search of an unknown id or agent)
    2  usage error (bad arguments, missing memory path, a folder that is not a store)
    3  finished, but some files could not be read and were skipped
    4  refused by a safety guard (mass deletion, failed safety backup, ...)
    5  store busy: a lock stayed held past the wait limit
    6  integrity failure (a backup or state file does not verify)
    130 interrupted
    monitor health follows the monitoring-plugin convention instead:
    0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also for its usage errors and --timeout)

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
    "IntegrityError", "ChecksumError", "ReadOnlyError", "ExitCode", "RecordType", "RecordFacts",
    "record_facts", "wilson_interval",
    "parse_timestamp", "format_timestamp", "load_json_file", "write_json_file",
    "atomic_write_bytes", "FileLock", "MaintenanceLock", "Store", "check_is_store", "Archive",
    "load_aml_config",
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
import base64
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
import functools
import gc as _cyclic_gc
import gzip
import hashlib
import heapq
import io
import ipaddress
import itertools
import json
import math
import operator
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import (Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Set, Tuple, Union)

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
# Scheduled jobs that monitoring watches one by one: job -> the history operations whose
# entry is a successful run of it (optimize all records gc, compress, index, warm-cache).
JOB_OPERATIONS = {"backup": ("backup",), "prune": ("prune",), "index": ("index",),
                  "optimize": ("gc", "compress")}
JOB_FAILURES_FILE = "job-failures.json"
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


class ReadOnlyError(AmlError):
    """aml's state folder (or a lock in it) cannot be written by this user."""

    exit_code = ExitCode.FAILURE


# errno values meaning "this user may read but not write here"
READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


class IntegrityError(AmlError):
    """A backup, archive or state file failed verification."""

    exit_code = ExitCode.INTEGRITY


class ChecksumError(IntegrityError):
    """A checksummed file whose bytes do not match their checksum (see ``unseal``)."""


class OperationResult:
    """Base of every result a command turns into its exit code (mixed into dataclasses).

    A subclass declares the fields it has (none are declared here: a dataclass would take
    them as field defaults); one it lacks reads as empty. ``exit_code`` is the one
    precedence every command follows, worst first: ``busy`` (5: a lock stayed held past the
    wait; those files were left as they were) over ``refused`` (4: a safety guard said no)
    over ``problems`` (6: something does not verify) over ``failure`` (the code of another
    failure) over the lists named in ``PARTIAL_FIELDS`` (3: finished, but files or records
    were left out: ``unreadable`` files, ``warnings``, ...) over 0. ``unreadable`` is one
    shape everywhere: ``"<file>: <problem>"`` strings. ``Output.report`` prints these lines
    the one way every command prints them. Not one: HealthReport, whose exit code is the
    monitoring-plugin convention of its status.
    """

    PARTIAL_FIELDS: ClassVar[Tuple[str, ...]] = ("unreadable", "warnings")

    @property
    def exit_code(self) -> ExitCode:
        """BUSY over REFUSED over INTEGRITY over ``failure`` over PARTIAL over OK."""
        for name, code in (("busy", ExitCode.BUSY), ("refused", ExitCode.REFUSED),
                           ("problems", ExitCode.INTEGRITY)):
            if getattr(self, name, None):
                return code
        failure = getattr(self, "failure", None)
        if failure is not None:
            return ExitCode(failure)
        if any(getattr(self, name, None) for name in self.PARTIAL_FIELDS):
            return ExitCode.PARTIAL
        return ExitCode.OK


__all__ += ["OperationResult"]


# =============================================================================
# 4. Small utilities
# Time, sizes, JSON text and values, checksums, config layering. Pure functions; no store
# knowledge.
# =============================================================================

_TS_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?\s*$")


def first_few(items: Sequence[str], noun: str, shown: int = 3, sep: str = ", ") -> str:
    """A bounded one-line list: the first ``shown`` items, then ``and 37 more agents (40 in
    all)`` (``noun`` is the singular: agent)."""
    if len(items) <= shown:
        return sep.join(items)
    rest = len(items) - shown
    return "%s and %d more %s%s (%d in all)" % (sep.join(items[:shown]), rest, noun,
                                               "s" if rest > 1 else "", len(items))


@contextlib.contextmanager
def _naming_path(path: Any) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write hitting a full disk, an fsync) with
    ``path``, so its one-line error says which file or folder could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _os_error_text(exc: OSError, path: Any = None) -> str:
    """``<file>: <reason>`` for an OSError (``path`` when the error names none)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    return "%s: %s" % (where, reason) if where is not None else reason


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
    try:  # a ValueError: a date or offset out of range
        if match:   # the runtime's own form: the same result as below, without the general path
            y, mo, d, h, mi, s, ms = map(int, match.groups())
            return _dt.datetime(y, mo, d, h, mi, s, ms * 1000, tzinfo=_dt.timezone.utc)
        match = _TS_RE.match(value)
        if not match:
            return None
        y, mo, d, h, mi, s, frac, tz = match.groups()
        micro = int((frac or "0")[:6].ljust(6, "0"))
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


# Progress of long work: callback(phase, done, total, unit); unit "files", "records" or "B".
# Library code only calls it; the CLI renders it on a terminal (section 15).
ProgressCallback = Callable[[str, int, int, str], None]


def no_progress(phase: str, done: int, total: int, unit: str = "files") -> None:
    """The default progress callback: does nothing."""


def with_progress(progress: ProgressCallback, phase: str, items: Sequence[Any],
                  size: Optional[Callable[[Any], int]] = None) -> Iterator[Any]:
    """Yield ``items``, reporting before each and after the last: by ``size(item)`` bytes
    when given, else by count."""
    total = sum(size(i) for i in items) if size else len(items)
    done, unit = 0, "B" if size else "files"
    for item in items:
        progress(phase, done, total, unit)
        yield item
        done += size(item) if size else 1
    progress(phase, done, total, unit)


def _file_size(item: Any) -> int:
    path = getattr(item, "path", item)
    try:
        return os.stat(str(path)).st_size
    except OSError:
        return 0


def human_bytes(count: float) -> str:
    """Render a byte count for people: ``512 B``, ``1.5 KiB``, ``80.0 MiB``."""
    for unit in ("B", "KiB", "MiB"):
        if abs(count) < 1024:
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024.0
    return "%.1f GiB" % count


def _reject_constant(name: str) -> Any:
    raise ValueError("non-standard JSON constant %s" % name)


def _finite_float(token: str) -> float:
    """parse_float for every strict parse: a number past the double range is an error (the
    runtime reads it as Infinity, and aml could never write ``inf`` back as JSON). One call
    per float: on 20 MB of records a parse took 0.40-0.52 s with it, 0.43-0.48 s without.
    (An integer of 309+ digits parses exactly and is written back as it was: not refused.)"""
    value = float(token)
    if value in (math.inf, -math.inf):
        raise ValueError("number %s is past the double range (the runtime would read it as "
                         "Infinity)" % (token if len(token) < 40 else token[:37] + "..."))
    return value


def parse_json_text(text: str) -> Any:
    """Strict JSON: ``NaN``/``Infinity`` are errors, as for the runtime, and so are numbers
    past the double range and nesting too deep for Python (ValueError, never
    RecursionError: one bad file must not stop a run)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply (over %d levels)" % sys.getrecursionlimit()) from None


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
    """Hex SHA-256 of a text's UTF-8 bytes: notices any change to a decoded file.

    The one "file unchanged since it was planned" test (prune and dedupe compare it under the
    file's lock); hashing the text as read costs no re-serialising of records."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def new_run_id(operation: str, now: _dt.datetime) -> str:
    """A readable, sortable, collision-free id such as ``prune_20261125_030000_a1b2c3``."""
    return "%s_%s_%s" % (operation, compact_stamp(now), secrets.token_hex(3))


WILSON_Z = 1.959963984540054  # two-sided 95 %


def wilson_interval(successes: float, trials: float, z: float = WILSON_Z
                    ) -> Tuple[float, float]:
    """The Wilson score interval of a success rate; (0.0, 1.0) without trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / trials))
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if p == 0.0 else max(0.0, centre - spread)
    return low, 1.0 if p == 1.0 else min(1.0, centre + spread)


def dig(obj: Any, *path: str) -> Any:
    """``obj[p0][p1]...`` or None when any step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


# -- layered settings ---------------------------------------------------------
# Every config dataclass (BackupConfig, PruneConfig, OptimizeConfig, MonitorThresholds,
# MonitorSettings) declares each field with setting() and its rule; layer_config() applies
# the layers (defaults < files < flags) and check_config() checks a finished one.

def setting(default: Any, check: Callable[[Any], bool], rule: str) -> Any:
    """A dataclass field with its own rule: ``check(value)`` is true for an allowed value
    and ``rule`` says in words what is allowed (for the error)."""
    return dataclasses.field(default=default, metadata={"check": check, "rule": rule})


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def number_setting(default: Any, low: float = 0, high: Optional[float] = None,
                   integer: bool = False, above: bool = False) -> Any:
    """A numeric setting(): >= ``low`` (> with ``above``), <= ``high``, whole with ``integer``."""
    def check(value: Any) -> bool:
        return (_finite(value) and (not integer or isinstance(value, int))
                and (value > low if above else value >= low) and (high is None or value <= high))
    rule = "must be %s %s %g" % ("an integer" if integer else "a number", ">" if above else ">=",
                                 low)
    return setting(default, check, rule + ("" if high is None else " and <= %g" % high))


def flag_setting(default: bool) -> Any:
    """A true/false setting()."""
    return setting(default, lambda value: isinstance(value, bool), "must be true or false")


def choice_setting(default: str, choices: Sequence[str]) -> Any:
    """A setting() that is one of ``choices``."""
    return setting(default, lambda value: isinstance(value, str) and value in choices,
                   "must be one of %s" % ", ".join(choices))


def _check_value(field: "dataclasses.Field[Any]", value: Any, source: str) -> None:
    check = field.metadata.get("check")
    if check is not None and not check(value):
        raise UsageError("%s: %s=%r is not a valid value (%s)"
                         % (source, field.name, value, field.metadata["rule"]))


def check_config(config: Any, source: str) -> Any:
    """Return dataclass ``config`` after checking every field against its setting() rule;
    raises UsageError naming the field and ``source``."""
    for field in dataclasses.fields(config):
        _check_value(field, getattr(config, field.name), source)
    return config


def layer_config(config: Any, layers: Iterable[Tuple[str, Dict[str, Any]]]) -> Any:
    """A copy of dataclass ``config`` with each ``(source, values)`` layer applied in turn, so
    later layers win. Raises UsageError naming the layer for an unknown key (the class's
    ``SETTING_NOUN`` names what it holds) or a value its field's rule refuses."""
    fields = {field.name: field for field in dataclasses.fields(config)}
    noun = getattr(type(config), "SETTING_NOUN", "setting")
    for source, values in layers:
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UsageError("%s: unknown %s(s) %s (known: %s)"
                             % (source, noun, ", ".join(unknown), ", ".join(sorted(fields))))
        for name, value in values.items():
            _check_value(fields[name], value, source)
        config = dataclasses.replace(config, **values)
    return config


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


# =============================================================================
# 5. Storage primitives
# Crash-safe file I/O, the checksummed envelope (seal/unseal) and the runtime's
# lock protocol. Knows nothing about records; never prints.
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


# A backup manifest or pack index (digests, paths, sizes: a few times smaller gzipped) is
# never inflated past this many times its size, nor past the floor for small ones, so a
# crafted zlib bomb stops at the cap instead of filling memory. (Archive parts are not
# capped: records removed as exact duplicates may legitimately compress 1000 to 1.)
STATE_INFLATE_RATIO = 200
STATE_INFLATE_FLOOR = 64 * 1024 * 1024


def state_inflate_cap(compressed: int) -> int:
    """The most bytes a compressed state file of ``compressed`` bytes may inflate to."""
    return max(STATE_INFLATE_FLOOR, STATE_INFLATE_RATIO * compressed)


def inflate_capped(data: bytes, limit: int, what: Any, gzip_wrapped: bool = False) -> bytes:
    """zlib (or one gzip member's) data inflated to at most ``limit`` bytes, memory bounded.

    Raises IntegrityError naming ``what`` for data that is damaged, truncated, followed by
    extra bytes, or that would inflate past ``limit`` (a zlib bomb).
    """
    inflater = zlib.decompressobj(31 if gzip_wrapped else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise IntegrityError("%s: unreadable compressed data (%s)" % (what, exc)) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise IntegrityError("%s: inflates past %s, the most it can hold; refused as a "
                             "zlib bomb" % (what, human_bytes(limit)))
    if not inflater.eof or inflater.unused_data:
        raise IntegrityError("%s: unreadable compressed data (truncated, or trailing bytes)"
                             % what)
    return out


def load_json_file(path: Path, expect: Optional[type] = None, follow_symlinks: bool = False
                   ) -> Tuple[Any, FileFormat]:
    """Read a JSON file that may hold gzip bytes; raises CorruptFileError, never returns empty.

    A symlink (unless ``follow_symlinks``), folder, FIFO or device is refused unopened."""
    return load_json_text(path, expect, follow_symlinks)[:2]


def _odd_kind(mode: int) -> Optional[str]:
    """What a non-regular directory entry is, for messages; None for a regular file."""
    for test, name in ((stat.S_ISREG, None), (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "device or special file"


def odd_file_problem(kind: str) -> str:
    """Why a data file that is not a regular file is skipped (one wording everywhere)."""
    if kind == "symlink":
        return ("is a symlink, not a regular file: aml never reads or writes through a link in "
                "the store (the runtime would read its target); replace it with the file itself")
    return "is a %s, not a regular file; skipped unopened" % kind


def read_regular_file(path: Path, follow_symlinks: bool = False) -> bytes:
    """The bytes of a regular file; raises CorruptFileError for anything else, unopened.

    Checked with lstat before opening and with fstat after (opened O_NONBLOCK|O_NOFOLLOW), so
    a FIFO is never opened for a blocking read and a link swapped in meanwhile is not followed.
    """
    fd = -1
    try:
        info = os.stat(str(path)) if follow_symlinks else os.lstat(str(path))
        kind = _odd_kind(info.st_mode)
        if kind is None:
            flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
            fd = os.open(str(path), flags)
            kind = _odd_kind(os.fstat(fd).st_mode)
        if kind is not None:
            raise CorruptFileError(path, odd_file_problem(kind))
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptFileError(path, odd_file_problem("symlink")) from None
        raise CorruptFileError(path, "cannot read (%s)" % (exc.strerror or exc)) from None
    finally:
        if fd >= 0:
            os.close(fd)


def load_json_text(path: Path, expect: Optional[type] = None, follow_symlinks: bool = False
                   ) -> Tuple[Any, FileFormat, str]:
    """Like load_json_file, also returning the decoded text (for splicing rewrites)."""
    path = Path(path)
    raw = read_regular_file(path, follow_symlinks)
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
    for item in obj:
        chunks += (indented_json(item, "\n  ").encode("utf-8"), b",\n  ")
    chunks[-1] = b"\n]"   # the last separator closes the array
    return chunks


# -- JSON arrays: each record with the exact span of its text ---------------

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_COMMA = re.compile(r"[ \t\n\r]*(,)?[ \t\n\r]*")
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def scan_json_array(text: str, values: bool = True) -> Tuple[List[Any], List[int], List[int]]:
    """(elements, start of each, end of each) of JSON array ``text``: ``text[start:end]`` is an
    element's exact text. The one array scanner (backup's splitter, the index's offsets).

    The C scanner with parse_json_text's strict rules; raises ValueError for anything that is
    not exactly one JSON array (RecursionError when nested too deeply). ``values=False``
    keeps only the spans (the splitter's memory stays one file's text).
    """
    skip, comma, scan = _JSON_SPACE.match, _JSON_COMMA.match, _STRICT_DECODER.scan_once
    items: List[Any] = []
    starts: List[int] = []
    ends: List[int] = []
    keep = items.append if values else id  # id: a C call that keeps nothing
    start, stop = starts.append, ends.append
    at = skip(text, 0).end()
    if text[at:at + 1] != "[":
        raise ValueError("not an array")
    at = skip(text, at + 1).end()
    if text[at:at + 1] != "]":
        while True:
            try:
                item, end = scan(text, at)
            except StopIteration:
                raise ValueError("no JSON value at %d" % at) from None
            keep(item)
            start(at)
            stop(end)
            found = comma(text, end)
            at = found.end()
            if found.group(1) is None:
                break
        if text[at:at + 1] != "]":
            raise ValueError("array not closed")
    if skip(text, at + 1).end() != len(text):
        raise ValueError("extra data")
    return items, starts, ends


def split_json_array(text: str) -> Optional[Tuple[str, str, str, List[Tuple[int, int]]]]:
    """``(head, separator, tail, element spans)`` of a non-empty JSON array text, else None.

    Joining head, the element slices with the separator, and tail gives back ``text``
    exactly, so a restore is byte-exact without re-serializing. Arrays whose separators
    differ (hand-edited), empty arrays and invalid JSON return None (stored whole).
    """
    try:
        _, starts, ends = scan_json_array(text, values=False)
    except (ValueError, RecursionError):
        return None
    if not starts:
        return None
    sep = text[ends[0]:starts[1]] if len(starts) > 1 else ""
    if any(text[end:nxt] != sep for end, nxt in zip(ends, starts[1:])):
        return None
    return text[:starts[0]], sep, text[ends[-1]:], list(zip(starts, ends))


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
        with contextlib.suppress(OSError):
            os.fsync(fd)
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
        with _naming_path(path), os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(str(tmp), mode)
        os.replace(str(tmp), str(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(str(tmp))
        raise
    with _naming_path(path.parent):
        fsync_dir(path.parent)


def write_json_file(path: Path, obj: Any, fmt: FileFormat = FileFormat()) -> int:
    """Atomically write ``obj`` as JSON in ``fmt``; returns the bytes written."""
    data = encode_json(obj, fmt)
    atomic_write_bytes(path, data)
    return len(data)


# One checksummed envelope for the files aml writes about itself (state files, archive parts,
# backup manifests, the bloom filter). The checksum comes first and covers the payload's exact
# bytes, so a reader verifies the raw bytes before it parses anything:
#   {"format": "<name>", "sha256": "<hex of the payload bytes>", "payload": <payload>}
# and nothing after the last "}" (so a file cut short never verifies). A JSON payload makes
# the file a JSON document; a binary payload keeps the same framing.
_SEAL_HEAD = re.compile(br'\{"format": "([A-Za-z0-9._-]{1,64})", "sha256": "([0-9a-f]{64})", '
                        br'"payload": ')


def seal(payload: Any, fmt: str, compact: bool = True) -> bytes:
    """The envelope of ``payload``: bytes as they are, anything else as sorted JSON in UTF-8
    (without spaces unless ``compact`` is False)."""
    if isinstance(payload, (bytes, bytearray)):
        body = bytes(payload)
    else:
        body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":") if compact else None).encode("utf-8")
    return b'{"format": "%s", "sha256": "%s", "payload": %s}' % (
        fmt.encode("ascii"), sha256_hex(body).encode("ascii"), body)


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` starts like ``seal`` output (files of older layouts do not)."""
    return _SEAL_HEAD.match(raw) is not None


def unseal(raw: bytes, fmt: str, where: Any, what: str = "file", parse: bool = True) -> Any:
    """The payload of ``seal(payload, fmt)`` output, verified on its raw bytes: parsed JSON,
    or the bytes when ``parse`` is False. Raises ChecksumError when the bytes do not match
    their checksum, IntegrityError("<where>: unreadable <what> (...)") when not an envelope."""
    head = _SEAL_HEAD.match(raw)
    try:
        if not head or head.group(1).decode("ascii") != fmt or not raw.endswith(b"}"):
            raise ValueError("not an %s document" % fmt)
        body = memoryview(raw)[head.end():-1]
        if head.group(2).decode("ascii") != hashlib.sha256(body).hexdigest():
            raise ChecksumError("%s: checksum mismatch" % where)
        return parse_json_text(str(body, "utf-8")) if parse else bytes(body)
    except ValueError as exc:
        raise IntegrityError("%s: unreadable %s (%s)" % (where, what, exc)) from None


def is_temp_leftover(name: str) -> bool:
    """True for a temp file name that only aml's atomic writer creates."""
    return name.startswith(".") and TMP_MARKER in name


RUNTIME_TMP_SUFFIX = ".json.tmp"   # the runtime writes <file>.json.tmp, then renames it


def is_transient_entry(name: str) -> bool:
    """True for an entry that is never store content: a runtime lock (``*.lock``), the
    runtime's temp file (``<file>.json.tmp``) or aml's own temp file. Every walk of the store
    (agents, backup, restore, sizes, integrity, gc) skips these; only aml's own are removed."""
    return name.endswith(".lock") or name.endswith(RUNTIME_TMP_SUFFIX) or is_temp_leftover(name)


def _is_gzip_file(path: Path) -> bool:
    try:  # never open a FIFO (it would block) nor follow a link
        if not stat.S_ISREG(os.lstat(str(path)).st_mode):
            return False
        fd = os.open(str(path), os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            return handle.read(2) == GZIP_MAGIC
    except OSError:
        return False


def lock_path_for(path: Path) -> Path:
    """The runtime's lock directory for a data file: ``<absolute path>.lock``."""
    return Path(os.path.abspath(str(path)) + ".lock")


def wait_for_lock(attempt: Callable[[], bool], timeout: float,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic,
                  delay: float = 0.05, max_delay: float = 2.0) -> bool:
    """Every lock's wait: True once ``attempt()`` succeeds, False when ``timeout`` s of
    ``clock`` passed first (0: one attempt); sleeps ``delay``, doubling up to ``max_delay``."""
    deadline = clock() + timeout
    while not attempt():
        if clock() >= deadline:
            return False
        sleep(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 2, max_delay)
    return True


def flock_within(fd: int, mode: int, timeout: float,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> bool:
    """flock ``fd`` (LOCK_EX/LOCK_SH) within ``timeout`` s, retrying every 0.2 s; False when
    another holder keeps it or flock fails."""
    def attempt() -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
    try:
        return wait_for_lock(attempt, timeout, sleep, clock, 0.2, 0.2)
    except OSError:
        return False


def stale_lock_age(path: Path, now: Optional[float] = None) -> Optional[float]:
    """The one staleness rule (SPEC 2.2), of FileLock, gc and health: the age of the lock at
    ``path`` if it is a real, empty directory (rmdir removes only those; an entry inside means
    a holder) with an mtime over 30 s before ``now`` (wall clock, as the runtime's), else None."""
    now = time.time() if now is None else now
    try:
        info = os.lstat(str(path))
        if not stat.S_ISDIR(info.st_mode) or now - info.st_mtime <= LOCK_STALE_SECONDS:
            return None
        return None if os.listdir(str(path)) else now - info.st_mtime
    except OSError:
        return None  # released meanwhile


@dataclasses.dataclass(frozen=True)
class Leftover:
    """What scan_leftovers found: ``kind`` "lock" (stale), "temp" (aml's) or "gz" (ignored)."""

    kind: str
    path: Path
    in_state: bool = False   # under <store>/.aml, where only temp files are looked for
    age: float = 0.0         # a stale lock's age in seconds


def scan_leftovers(root: Path, now: Optional[float] = None) -> List[Leftover]:
    """The one walk for what crashed writers leave, in walk order: stale ``*.json.lock``
    folders and ``*.json.gz`` files outside ``.aml/``, aml's temp files anywhere. Never enters
    a transient entry nor a link; gc removes exactly the locks health warns about."""
    out, state = [], os.path.join(str(root), STATE_DIR_NAME)
    for dirpath, dirnames, filenames in os.walk(str(root)):
        in_state = dirpath == state or dirpath.startswith(state + os.sep)
        for name in [d for d in dirnames if is_transient_entry(d)]:
            dirnames.remove(name)  # never look inside a lock
            age = None if in_state or not name.endswith(".json.lock") else \
                stale_lock_age(Path(dirpath) / name, now)
            if age is not None:
                out.append(Leftover("lock", Path(dirpath) / name, False, age))
        for name in filenames:
            if is_temp_leftover(name):
                out.append(Leftover("temp", Path(dirpath) / name, in_state))
            elif name.endswith(".json.gz") and not in_state:
                out.append(Leftover("gz", Path(dirpath) / name))
    return out


class _HeldLock:
    """``with lock:`` acquires a lock (FileLock, MaintenanceLock) and releases it after."""

    def __enter__(self) -> Any:
        self.acquire()  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()  # type: ignore[attr-defined]


class FileLock(_HeldLock):
    """The runtime's per-file lock: a directory ``<file>.lock`` made with mkdir.

    Any entry at that path counts as held. A stale lock (stale_lock_age) is removed with
    rmdir; a fresh foreign lock is never touched. Waits with backoff (wait_for_lock) up to
    ``timeout`` seconds, then raises StoreBusyError. While held, a thread
    refreshes the mtime so the runtime never sees it as stale.
    """

    def __init__(self, path: Path, timeout: float = DEFAULT_LOCK_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep,
                 busy: Optional[Set[str]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.lock_dir = lock_path_for(self.path)
        self.timeout = timeout
        self.busy = busy  # lock paths found busy earlier in this run: not waited for again
        self._sleep, self._clock = sleep, clock
        self._held = False
        self._stop = threading.Event()
        self._refresher: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError after ``timeout`` seconds (at once for a lock
        already found busy in this run: one wait per file and run, not one per access)."""
        if self.busy is not None and str(self.lock_dir) in self.busy:
            raise StoreBusyError("store busy: %s is locked by another process (found busy "
                                 "earlier in this run; not waited for again)" % self.lock_dir)
        if not wait_for_lock(self._try_once, self.timeout, self._sleep, self._clock):
            if self.busy is not None:
                self.busy.add(str(self.lock_dir))
            raise StoreBusyError("store busy: %s is locked by another process (waited %.0f s)"
                                 % (self.lock_dir, self.timeout))
        self._held = True
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh_loop, daemon=True)
        self._refresher.start()

    def _try_once(self) -> bool:
        try:
            os.mkdir(str(self.lock_dir))
            return True
        except FileExistsError:
            if stale_lock_age(self.lock_dir) is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(str(self.lock_dir))
            return False
        except FileNotFoundError:
            raise AmlError("cannot lock %s: its folder is missing" % self.path) from None

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


class MaintenanceLock(_HeldLock):
    """Store-wide lock (flock on ``.aml/maintenance.lock``) so two aml runs never overlap.

    Re-entrant within one process: a command that holds it can call another operation that
    takes it too (a prune's safety backup), and the lock is released when the outermost
    holder releases it.
    """

    _held: Dict[str, List[int]] = {}  # path -> [fd, depth], shared by every instance
    _guard = threading.Lock()

    def __init__(self, state_dir: Path, timeout: float = DEFAULT_LOCK_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(state_dir) / "maintenance.lock"
        self.timeout = timeout
        self._sleep, self._clock = sleep, clock
        self._entered = False

    def acquire(self) -> None:
        """Take the lock or raise StoreBusyError (ReadOnlyError: no lock file, none
        creatable)."""
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

    def try_acquire(self) -> bool:
        """Take the lock within ``timeout`` (True) or give up when another aml run holds it
        (False): the try-lock of lookups and monitoring state updates. Raises ReadOnlyError
        like acquire."""
        try:
            self.acquire()
        except StoreBusyError:
            return False
        return True

    def _flock(self) -> int:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RefusedError("%s is a symlink: aml never follows a link in its state "
                                   "folder" % self.path) from None
            if exc.errno not in READ_ONLY_ERRNOS:
                raise
            try:  # a reader without write access still locks the existing file (flock needs
                # no write permission); ReadOnlyError when there is none to lock
                fd = os.open(str(self.path), os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                raise ReadOnlyError("no write access to %s (%s)" % (self.path.parent,
                                                                    exc.strerror)) from None
        if not flock_within(fd, fcntl.LOCK_EX, self.timeout, self._sleep, self._clock):
            os.close(fd)
            raise StoreBusyError("store busy: another aml run holds %s" % self.path)
        return fd

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


__all__ += ["load_json_text", "scan_json_array", "split_json_array", "remove_array_elements"]


# =============================================================================
# 6. Record model and schema versions
# One place that reads record fields from the runtime's camelCase schema and
# from legacy layouts (flat, snake_case, performance/lifecycle blocks); the runtime's
# schema check (what it would reject, SPEC 2.1).
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
        return next((rtype for rtype in cls if rtype.filename == name), None)


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
                   ("lifecycle", "confidence_score"), ("lifecycle", "confidence")),
    "last_used": (("evolution", "lastUsed"), ("evolution", "last_used"), ("lastUsed",),
                  ("last_used",), ("lifecycle", "last_used"), ("lifecycle", "lastUsed"),
                  ("lifecycle", "last_used_at")),
    "created": (("evolution", "created"), ("lifecycle", "created_at"), ("lifecycle", "created"),
                ("createdAt",), ("created_at",), ("created",)),
    "reviewed": (("reviewedAt",), ("reviewed_at",)),
    "would_repeat": (("outcome", "wouldRepeat"), ("outcome", "would_repeat")),
    "avg_time_saved": (("metrics", "avgTimeSavedMs"), ("metrics", "avg_time_saved_ms"),
                       ("avgTimeSavedMs",), ("avg_time_saved_ms",),
                       ("performance", "avg_time_saved_ms"), ("performance", "avgTimeSavedMs")),
    "error_prevention": (("metrics", "errorPreventionCount"), ("metrics", "error_prevention_count"),
                         ("errorPreventionCount",), ("error_prevention_count",),
                         ("performance", "error_prevention_count"),
                         ("performance", "errorPreventionCount")),
    "refinements": (("evolution", "refinements"), ("refinements",), ("lifecycle", "refinements"),
                    ("performance", "refinements"), ("lifecycle", "refinement_count")),
}


def first_value(record: Dict[str, Any], field: str) -> Any:
    """The first present value of a logical field across the known layouts, else None."""
    get = record.get if type(record) is dict else {}.get
    for path in FIELD_PATHS[field]:
        value = get(path[0])
        for key in path[1:]:   # dig(), inlined: this runs for every record
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


# Top-level keys where a legacy layout may keep a field; a runtime record has none of them.
_LEGACY_KEYS = frozenset(path[0] for paths in FIELD_PATHS.values() for path in paths
                         if path[0] not in ("metrics", "evolution"))


def usage_fields(record: Dict[str, Any]) -> Tuple[Any, Any, Any, Any, Any]:
    """(confidence, success rate, execution count, last used, created) of a record as stored,
    each the first_value of its field: the one reader behind record_facts and the index's
    posting_row. A runtime record holds them all in ``evolution``/``metrics`` (read directly);
    only a record with a gap and another layout's keys takes the generic lookup."""
    get = record.get
    evo, met = get("evolution"), get("metrics")
    conf = last = created = rate = count = None
    if type(evo) is dict:
        conf, last, created = evo.get("confidenceScore"), evo.get("lastUsed"), evo.get("created")
    if type(met) is dict:
        rate, count = met.get("successRate"), met.get("executionCount")
    if (conf is None or rate is None or count is None or last is None or created is None) and (
            evo or met or not _LEGACY_KEYS.isdisjoint(record)):
        conf, rate, count, last, created = (
            first_value(record, name) if value is None else value for name, value in zip(
                ("confidence", "success_rate", "execution_count", "last_used", "created"),
                (conf, rate, count, last, created)))
    return conf, rate, count, last, created


def _number(value: Any, isfinite: Callable[[float], bool] = math.isfinite) -> Optional[float]:
    kind = type(value)  # exact types: a bool is not a number here
    return float(value) if (kind is float or kind is int) and isfinite(value) else None


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
    outcome_mean: Optional[float] = None  # mean of the older toolkit's outcome.success_metrics
    # metrics.successCount/failureCount of the 2.0.0 layout, when the record has both
    explicit_counts: Optional[Tuple[int, int]] = None

    @property
    def negative_outcome(self) -> bool:
        """A decision that would not be repeated, or whose old-style success metrics average
        below 0.5 (the older toolkit's rule)."""
        return self.would_repeat is False or (self.outcome_mean is not None
                                              and self.outcome_mean < 0.5)

    @property
    def last_activity(self) -> Optional[_dt.datetime]:
        """Last use, else creation, else the record timestamp (None if none is readable)."""
        return self.last_used or self.created or self.timestamp


def _lifecycle_state(record: Dict[str, Any]) -> Optional[str]:
    state = dig(record, "lifecycle", "state")
    return state.lower() if isinstance(state, str) else None


_is_str = str.__instancecheck__  # a C-level predicate for filter()


def _tags(record: Dict[str, Any]) -> Tuple[str, ...]:
    tags = record.get("tags")
    return tuple(filter(_is_str, tags)) if type(tags) is list else ()


def _is_pinned(record: Dict[str, Any], tags: Tuple[str, ...]) -> bool:
    return (record.get("pinned") is True or dig(record, "lifecycle", "pinned") is True
            or _lifecycle_state(record) == "pinned" or "pinned" in tags)


def _is_superseded(record: Dict[str, Any]) -> bool:
    return (_lifecycle_state(record) in ("superseded", "outdated")
            or record.get("outdated") is True
            or bool(record.get("supersededBy") or dig(record, "lifecycle", "supersededBy")))


def _is_active(record: Dict[str, Any]) -> bool:
    active = record.get("active")
    return active if isinstance(active, bool) else (
        _lifecycle_state(record) not in ("inactive", "archived", "superseded"))


def _bool_or_none(value: Any) -> Optional[bool]:
    return value if isinstance(value, bool) else None


def _outcome_mean(record: Dict[str, Any]) -> Optional[float]:
    metrics = dig(record, "outcome", "success_metrics")
    values = [v for v in map(_number, metrics.values()) if v is not None] \
        if isinstance(metrics, dict) else []
    return sum(values) / len(values) if values else None


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
    agent = rec.get("agent")
    confidence, rate, count, last_used, created = usage_fields(rec)
    stamp = rec.get("timestamp")
    when = parse_timestamp(stamp)
    return RecordFacts(
        rtype=rtype,
        id=record_id(rec),
        agent=agent if isinstance(agent, str) and agent else None,
        timestamp=when,   # the same text twice (often: created) is parsed once
        created=when if _same_text(created, stamp) else parse_timestamp(created),
        last_used=when if _same_text(last_used, stamp) else parse_timestamp(last_used),
        success_rate=_number(rate),
        execution_count=_number(count),
        confidence=_number(confidence),
        worked=_bool_or_none(dig(rec, "effectiveness", "worked")),
        would_repeat=_bool_or_none(first_value(rec, "would_repeat")),
        verified_count=_number(rec.get("verifiedCount", rec.get("verified_count"))),
        active=_is_active(rec),
        pinned=_is_pinned(rec, tags),
        superseded=_is_superseded(rec),
        tags=tags,
        outcome_mean=_outcome_mean(rec),
        explicit_counts=_explicit_outcome_counts(rec),
    )


def _explicit_outcome_counts(record: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """(successes, failures) from the 2.0.0 layout's metrics, or None where it has none."""
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return None
    pair = metrics.get("successCount"), metrics.get("failureCount")
    if all(_number(v) is not None and float(v).is_integer() and v >= 0 for v in pair):
        return int(pair[0]), int(pair[1])
    return None


def outcome_counts(rate: float, count: float) -> Tuple[int, int, bool]:
    """(successes, observed outcomes, exact) behind a running mean ``rate`` over ``count``.

    The runtime creates a pattern at successRate 0.5 with executionCount 1 (a neutral prior
    counted as one execution) and keeps a running mean, so rate x count ends in .5 and the
    observed outcomes are ``count - 1``. A whole product is a plain ratio (hand-written
    records). Anything else is not a ratio of outcomes: rounded, and marked not exact.
    """
    count = int(count)
    product = rate * count
    if abs(product - round(product)) < 1e-6:
        return int(round(product)), count, True
    if abs(product - math.floor(product) - 0.5) < 1e-6:
        return int(math.floor(product)), count - 1, True
    return int(math.floor(product + 0.5)), count, False


def success_evidence(facts: RecordFacts) -> Optional[Tuple[int, int]]:
    """(successes, observed outcomes) of a pattern: exact counts of the 2.0.0 layout where
    present, else recovered from the running mean and execution count as migrate does."""
    parts = outcome_evidence(facts)
    return None if parts is None else parts[:2]


def outcome_evidence(facts: RecordFacts) -> Optional[Tuple[int, int, int, bool]]:
    """(successes, observed outcomes, prior counts, exact): success_evidence plus how many
    executions are the runtime's neutral prior (0 or 1) and whether the counts are exact."""
    count = facts.execution_count
    if facts.explicit_counts is not None:
        wins, losses = facts.explicit_counts
        # The runtime moves successRate/executionCount, never these: stale ones are not used.
        if count is None or wins + losses in (count, count - 1):
            return wins, wins + losses, int(count - wins - losses) if count else 0, True
    if facts.success_rate is None or count is None or count < 0:
        return None
    wins, observed, exact = outcome_counts(facts.success_rate, count)
    observed = max(0, observed)
    return max(0, min(wins, observed)), observed, int(count) - observed, exact


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
# The tables' type tests, C-level like _is_str (the one for str)
_IS_DICT, _IS_LIST, _IS_BOOL = (kind.__instancecheck__ for kind in (dict, list, bool))

_COMMON_RULES = (("id", lambda v: isinstance(v, str) and v != ""), ("agent", _is_str),
                 ("timestamp", _is_time), ("tags", _optional(_is_str_list)),
                 ("active", _optional(_IS_BOOL)))
_RUNTIME_RULES: Dict[RecordType, Tuple[Tuple[str, Callable[[Any], bool]], ...]] = {
    RecordType.PATTERN: (
        ("pattern.type", _is_str), ("pattern.context", _is_flat_context),
        ("pattern.approach.technique", _is_str), ("pattern.approach.rationale", _is_str),
        ("pattern.approach.codeTemplate", _optional(_is_str)),
        ("pattern.approach.steps", _optional(_IS_LIST)),
        ("pattern.conditions.whenApplicable", _IS_LIST),
        ("pattern.conditions.whenNotApplicable", _IS_LIST),
        ("metrics.successRate", _is_rate), ("metrics.executionCount", _is_int),
        ("metrics.avgTimeSavedMs", _is_num), ("metrics.errorPreventionCount", _is_int),
        ("evolution.created", _is_time), ("evolution.lastUsed", _is_time),
        ("evolution.refinements", _is_int), ("evolution.confidenceScore", _is_rate)),
    RecordType.SOLUTION: (
        ("problem.errorType", _is_str), ("problem.errorMessage", _is_str),
        ("problem.stackTraceHash", _optional(_is_str)), ("problem.context", _IS_DICT),
        ("solution.rootCause", _is_str), ("solution.fixApproach", _is_str),
        ("solution.codeFix", _optional(_is_str)), ("solution.prevention", _is_str),
        ("solution.relatedPatterns", _optional(_IS_LIST)),
        ("effectiveness.worked", _IS_BOOL), ("effectiveness.timeToFixMinutes", _is_num),
        ("effectiveness.preventedRecurrence", _is_int),
        ("effectiveness.relatedErrorsFixed", _is_int), ("verifiedCount", _is_int)),
    RecordType.DECISION: (
        ("decision.type", _is_str), ("decision.question", _is_str), ("decision.context", _IS_DICT),
        ("decision.chosenOption", _is_str), ("decision.alternativesConsidered", _IS_LIST),
        ("decision.decisionFactors.primary", _IS_LIST),
        ("decision.decisionFactors.secondary", _IS_LIST),
        ("decision.rationale", _optional(_is_str)), ("outcome", _optional(_IS_DICT)),
        ("reviewedAt", _optional(_is_time))),
}
_OUTCOME_RULES = (("outcome.successMetrics", _IS_DICT), ("outcome.lessonsLearned", _IS_LIST),
                  ("outcome.wouldRepeat", _IS_BOOL), ("outcome.improvements", _optional(_IS_LIST)))


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


# =============================================================================
# 7. Store and aml state
# Agent discovery, streaming record reads, locked read-modify-write, aml's
# hidden state folder (checksummed state files, run history, archive); disk sizes.
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
    return name.startswith(".") or name in RESERVED_DIRS or is_transient_entry(name)


def refuse_linked_state(state_dir: Path) -> None:
    """Raise RefusedError if ``.aml`` or any folder in it is a symlink or not a folder.

    Following one would put the archive, history, index or locks outside the store (and
    read state from there), so it is refused, as restore refuses links; nothing is created.
    """
    def refuse(path: str) -> None:
        raise RefusedError("%s is a symlink or not a folder: aml keeps its state only in a real "
                           "folder inside the store and never follows a link there; replace it "
                           "with a folder (or remove it)" % path)

    try:
        if not stat.S_ISDIR(os.lstat(str(state_dir)).st_mode):
            refuse(str(state_dir))
    except FileNotFoundError:
        return
    for dirpath, dirnames, _ in os.walk(str(state_dir)):  # lists linked folders, never enters
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                refuse(os.path.join(dirpath, name))


class Operation:
    """One timed run of an aml operation for the run history (``Store.operation(name)``).

    Used as a context manager it records ``summary`` when the block ends without an
    exception, if the block set it (a dry run leaves it None: nothing recorded); ``record``
    appends an entry at once (another name, several entries, a failure about to be raised).
    """

    def __init__(self, store: "Store", name: str):
        self.store, self.name, self.started = store, name, store.now
        self.summary: Optional[Dict[str, Any]] = None
        self._clock = time.monotonic()
        self._elapsed: Optional[float] = None

    @property
    def seconds(self) -> float:
        """Seconds since the run started; fixed when the ``with`` block ends."""
        return self._elapsed if self._elapsed is not None else time.monotonic() - self._clock

    def record(self, summary: Dict[str, Any], name: Optional[str] = None) -> None:
        """Append a history entry for this run (as ``name`` if given) with the time so far."""
        self.store.record_operation(name or self.name, self.started, self.seconds, summary)

    def __enter__(self) -> "Operation":
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self._elapsed = self.seconds
        if kind is None and self.summary is not None:
            self.record(self.summary)


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
        # Runtime locks that stayed held past lock_timeout in this run: every later access
        # skips the file at once (a run waits for a busy file once, and reports it once).
        self.busy_locks: Set[str] = set()
        self.progress: ProgressCallback = no_progress  # long work reports here (the CLI draws it)
        # Read-only commands set save_optional: a state write this user may not make is then
        # skipped and named in ``unsaved`` instead of failing the command.
        self.save_optional = False
        self.unsaved: List[str] = []
        refuse_linked_state(self.state_dir)

    # -- discovery ---------------------------------------------------------
    def agents(self) -> List[str]:
        """Agent folder names, sorted: not reserved and holding a known memory file."""
        # lexists: an agent whose only file is a symlink or FIFO is found, and reported
        return [entry.name for entry in sorted(os.scandir(str(self.root)), key=lambda e: e.name)
                if not is_reserved_name(entry.name) and entry.is_dir(follow_symlinks=False)
                and any(os.path.lexists(os.path.join(entry.path, f)) for f in KNOWN_AGENT_FILES)]

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
        """Every JSON data file of an agent (known names and any other ``*.json``), sorted.

        Entries that are not regular files (a symlink, folder, FIFO) are listed too, so that
        every command reports them: reading one raises CorruptFileError, unopened."""
        return [DataFile(agent, Path(entry.path))
                for entry in sorted(os.scandir(str(self.root / agent)), key=lambda e: e.name)
                if entry.name.endswith(".json") and not is_transient_entry(entry.name)]

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
        return load_json_text(path, dict, follow_symlinks=True)[0]  # never written: a link is fine

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
        """The runtime-compatible lock for one data file, with this store's wait limit
        (a file found busy earlier in this run raises StoreBusyError at once)."""
        return FileLock(path, timeout=self.lock_timeout, busy=self.busy_locks)

    def maintenance_lock(self) -> MaintenanceLock:
        """The store-wide lock that keeps two aml runs apart (creates ``.aml/``); taking it
        outermost starts a new run, so files found busy before are waited for again."""
        lock = MaintenanceLock(self.state_dir, timeout=self.lock_timeout)
        if os.path.abspath(str(lock.path)) not in MaintenanceLock._held:
            self.busy_locks.clear()
        return lock

    @contextlib.contextmanager
    def optional_write(self, what: str) -> Iterator[None]:
        """With ``save_optional``, a write refused for lack of permission is skipped and
        ``what`` noted in ``unsaved``; otherwise the error propagates."""
        try:
            yield
        except (ReadOnlyError, OSError) as exc:
            if not self.save_optional or not (isinstance(exc, ReadOnlyError)
                                              or exc.errno in READ_ONLY_ERRNOS):
                raise
            self._note_unsaved(what)

    def _note_unsaved(self, what: str) -> None:
        if what not in self.unsaved:
            self.unsaved.append(what)

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
                raw = encode_json(job.data, fmt) if spliced is None else spliced
                atomic_write_bytes(path, raw)
                job.bytes_written = len(raw)

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
        """Atomically write a checksummed state document into ``.aml/`` (see optional_write)."""
        with self.optional_write("%s/%s" % (STATE_DIR_NAME, name)):
            self.ensure_state_dir()
            write_checksummed(self.state_path(name), payload)

    def operation(self, name: str) -> Operation:
        """A run of ``name`` timed from now: ``with store.operation(name) as op:`` ... set
        ``op.summary`` and the run is recorded in the history when the block ends."""
        return Operation(self, name)

    def record_operation(self, operation: str, started: _dt.datetime, seconds: float,
                         summary: Dict[str, Any], keep: int = 500) -> None:
        """Append one entry to the bounded run history that monitoring reads."""
        history = self.read_state_lenient("history.json", [])
        history.append({"operation": operation, "started": format_timestamp(started),
                        "seconds": round(seconds, 6), "summary": summary})
        self.write_state("history.json", history[-keep:])

    def record_job_failure(self, job: str, command: str, reason: str, exit_code: int) -> None:
        """Remember the newest failed run of a scheduled job (monitoring shows it until a
        later success). Uses its own short lock: the failure may be "store busy", while
        another aml run holds the maintenance lock."""
        self.ensure_state_dir()
        fd = os.open(str(self.state_path("job-failures.lock")), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            failures = self.read_state_lenient(JOB_FAILURES_FILE, {})
            failures = failures if isinstance(failures, dict) else {}
            failures[job] = {"at": format_timestamp(self.now), "command": command,
                             "reason": reason, "exit_code": exit_code}
            self.write_state(JOB_FAILURES_FILE, failures)
        finally:
            os.close(fd)

    def last_operation(self, operation: str) -> Optional[Dict[str, Any]]:
        """The newest history entry for an operation, or None."""
        return next((entry for entry in reversed(self.read_state_lenient("history.json", []))
                     if entry.get("operation") == operation), None)

    def read_state_lenient(self, name: str, default: Any) -> Any:
        """Like read_state, but a corrupt file is set aside (``*.corrupt``) and ``default`` used."""
        try:
            return self.read_state(name, default)
        except IntegrityError:
            path = self.state_path(name)
            with contextlib.suppress(OSError):
                os.replace(str(path), str(path) + ".corrupt")
            return default

    def cleanup_temp_files(self, found: Optional[List[Path]] = None) -> List[Path]:
        """Remove temp files left by an interrupted aml write (those scan_leftovers finds, or
        the ``found`` ones of a scan just made); returns what was removed.

        Only names that aml's atomic writer creates are touched. Call with the maintenance
        lock held so no concurrent aml write is in flight.
        """
        if found is None:
            found = [e.path for e in scan_leftovers(self.root) if e.kind == "temp"]
        removed = []
        for path in found:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed


StoreLike = Union[Store, str, "os.PathLike[str]"]


def as_store(store: StoreLike, who: str) -> Store:
    """``store`` itself, or the Store at a memory path (str or os.PathLike) for the library's
    constructors; raises TypeError at once for anything else (UsageError for a bad path)."""
    if isinstance(store, Store):
        return store
    if isinstance(store, (str, os.PathLike)):
        return Store(Path(store))
    raise TypeError("%s() takes a Store or a memory path (str or os.PathLike), not %s"
                    % (who, type(store).__name__))


__all__ += ["StoreLike", "as_store"]


def check_is_store(store: Store) -> None:
    """Raise UsageError unless the folder holds config.json or at least one agent folder.

    A path one level too high (``.loom`` instead of ``.loom/memory``) would otherwise be an
    empty store on which every job succeeds forever.
    """
    if store.config_path().is_file() or store.agents():
        return
    hint = ""
    with contextlib.suppress(OSError):
        inner = [e.name for e in sorted(os.scandir(str(store.root)), key=lambda e: e.name)
                 if e.is_dir() and not e.name.startswith(".")
                 and (Store(Path(e.path)).config_path().is_file() or Store(Path(e.path)).agents())]
        if inner:
            hint = " (did you mean %s?)" % (store.root / inner[0])
    raise UsageError("%s is not a memory store: expected config.json or one folder per agent "
                     "holding patterns.json, solutions.json or decisions.json%s; for a new store "
                     "create config.json there first" % (store.root, hint))


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
    path = store.config_file if path is None else path
    if path is None:
        path = store.state_dir / "config.json"
        if not path.exists():
            return {}
    doc = load_json_text(Path(path), dict, follow_symlinks=True)[0]
    unknown = sorted(set(doc) - set(AML_CONFIG_SECTIONS))
    if unknown:
        raise UsageError("%s: unknown section(s) %s (known: %s)"
                         % (path, ", ".join(unknown), ", ".join(AML_CONFIG_SECTIONS)))
    for name, section in doc.items():
        if not isinstance(section, dict):
            raise UsageError("%s: section %r must be a JSON object" % (path, name))
    return doc


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


STATE_FORMAT = "aml-state-2"   # sealed (see seal); "aml-state-1" files are still read


def write_checksummed(path: Path, payload: Any) -> None:
    """Write ``payload`` sealed as a state document, atomically (mode 0600).

    Sorted JSON without indent: deterministic, and serialised once by the C encoder (an
    indented dump takes the pure-Python path, which dominated runs that append to the history).
    """
    atomic_write_bytes(Path(path), seal(payload, STATE_FORMAT), mode=0o600)


def read_checksummed(path: Path, default: Any = None) -> Any:
    """Read a file written by write_checksummed (or by aml before the sealed layout, gzipped
    or not), or ``default`` if absent; raises IntegrityError if it does not verify."""
    path = Path(path)
    if not path.exists():
        return default
    try:  # IntegrityError (unseal, inflate_capped, a checksum) passes through: not caught
        raw = read_regular_file(path)
        if raw[:2] == GZIP_MAGIC:   # backup manifests: inflated with a cap
            raw = inflate_capped(raw, state_inflate_cap(len(raw)), path, gzip_wrapped=True)
        if is_sealed(raw):
            return unseal(raw, STATE_FORMAT, path, "state file")
        return _read_state_1(path, raw)
    except (CorruptFileError, KeyError, ValueError, TypeError) as exc:
        raise IntegrityError("%s: unreadable state file (%s)" % (path, exc)) from None


def _read_state_1(path: Path, raw: bytes) -> Any:
    """The payload of an "aml-state-1" file: ``{"format", "payload", "sha256"}``, the checksum
    of the payload's compact sorted JSON, so it is verified by serialising it again. Raises
    ChecksumError, or KeyError/ValueError/TypeError for read_checksummed to report."""
    doc = parse_json_text(raw.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    payload = doc["payload"]
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"))
    if doc.get("sha256") != sha256_hex(body.encode("utf-8")):
        raise ChecksumError("%s: checksum mismatch" % path)
    return payload


ARCHIVE_PART_FORMAT = "aml-archive-part-1"


def archived_record_text(record: Any) -> str:
    """A record as compact JSON in its own key order: what an archive part keeps, so a put-back
    record reads exactly as it did (state files sort keys, this text does not)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class Archive:
    """Removed records of each run, written *before* they leave their data files.

    Layout: ``.aml/archive/<run_id>/manifest.json`` (checksummed: run_id, operation, created,
    status ``writing`` then ``complete``, counts, undone) and ``part-NNNN.json.gz`` files, each
    the gzip of ``{"format", "sha256" (of the payload), "payload": {"run_id", "part",
    "entries"}}`` sealed (see seal). An entry keeps its record once, as ``record_text``;
    reading gives ``record`` back in its original key order, and ``copies_kept``: how many
    records with its exact content the run left in that file. A crash between a part and its
    file's rewrite leaves a record in both places (undo counts copies by content and puts back
    only what is missing), never in neither.
    """

    def __init__(self, store: StoreLike):
        self.store = store = as_store(store, "Archive")
        self.folder = store.state_dir / "archive"

    def path_for(self, run_id: str) -> Path:
        """The folder of one run; raises UsageError for an id that is not a plain name."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id or "") or run_id.startswith("."):
            raise UsageError("invalid run id %r" % run_id)
        return self.folder / run_id

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
        path = self.path_for(run_id) / ("part-%04d.json.gz" % number)
        sealed = seal(payload, ARCHIVE_PART_FORMAT, compact=False)   # parts as they always were
        atomic_write_bytes(path, gzip.compress(sealed, 6, mtime=0), mode=0o600)
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
            raise UsageError("no archived run %r in %s" % (run_id, self.folder))
        return payload

    def part_names(self, run_id: str) -> List[str]:
        """The run's part file names in writing order."""
        folder = self.path_for(run_id)
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.glob("part-*.json.gz")]
        return sorted(names, key=lambda n: (len(n), n))  # part-10000 after part-9999

    def read_part(self, run_id: str, name: str, records: bool = True) -> List[Dict[str, Any]]:
        """The entries of one part, each with ``record`` (without it, and unparsed, when
        ``records`` is False); raises IntegrityError if the part does not verify."""
        path = self.path_for(run_id) / name
        try:  # unseal's own IntegrityError passes through: no clause here catches it
            payload = unseal(gzip.decompress(path.read_bytes()), ARCHIVE_PART_FORMAT, path,
                             "archive part")
            return [_full_entry(e) if records else e for e in payload["entries"]]
        except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError("%s: unreadable archive part (%s)" % (path, exc)) from None

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
        return sorted(p.name for p in self.folder.iterdir()
                      if not p.name.startswith(".") and (p / "manifest.json").is_file())

    def mark_undone(self, run_id: str, when: _dt.datetime) -> None:
        """Record that a run was undone (its parts stay, for the record)."""
        path = self.path_for(run_id) / "manifest.json"
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


def _dir_bytes(folder: Path, skip: Iterable[str] = ()) -> int:
    """Bytes of the regular files under ``folder`` (skipping top-level names in ``skip``, locks
    and temp files)."""
    total = 0
    skip = set(skip)
    for dirpath, dirnames, filenames in os.walk(str(folder)):
        dirnames[:] = [d for d in dirnames if not is_transient_entry(d)
                       and not (dirpath == str(folder) and d in skip)]
        for name in filter(lambda n: not is_transient_entry(n), filenames):
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


# =============================================================================
# 8. Backup and restore
# Snapshots of the store in a content-addressed repository under backup_root.
# =============================================================================


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
# A pack keeps its own layout (magic, then zlib blocks): it is appended to while a backup runs
# and read by offset one block at a time, and every object in it is checked against its SHA-256
# (from the pack index and the manifest or item list naming it), never the file as a whole.
_PACK_MAGIC = b"AMLPACK1"
_IDX_MAGIC = b"AMLIDX03"           # object rows sorted by key
_IDX_MAGIC_UNSORTED = b"AMLIDX02"  # older indexes: still read (no binary search)
_IDX_FORMAT = "aml-pack-index-1"   # sealed magic + zlib; older: magic, SHA-256, zlib
_PROBES_BEFORE_MAP = 2048          # lookups by binary search before building the full map
KEY_LEN = 12                     # bytes of SHA-256 that key an object in a pack index
_MANIFEST_FORMAT = "aml-backup-manifest-1"
_BACKUP_ID_RE = re.compile(r"(full|incr)_\d{8}_\d{6}(_\d+)?")
_BAD_ENTRY = (AmlError, ValueError, KeyError, TypeError, AttributeError)  # entry unreadable


@dataclasses.dataclass
class BackupConfig:
    """Where backups go and how they are kept; every field is used (see README)."""

    backup_root: Optional[Path] = setting(
        None, lambda value: value is None or isinstance(value, (str, os.PathLike)),
        "must be a path")
    retention_days: int = number_setting(30, integer=True)
    max_backups: int = number_setting(100, low=1, integer=True)
    compression_level: int = number_setting(6, high=9, integer=True)
    incremental_enabled: bool = flag_setting(True)
    verify_after_backup: bool = flag_setting(True)
    backup_schedule: str = choice_setting("daily", SCHEDULE_PERIODS)
    # a second repository `backup auto` copies to (see copy)
    copy_to: Optional[str] = setting(
        None, lambda value: value is None or (isinstance(value, str) and bool(value)),
        "must be a folder or rclone:NAME:path")

    def validate(self) -> "BackupConfig":
        """Return self; raises UsageError for a value out of range."""
        return check_config(self, "backup config")


@dataclasses.dataclass
class BackupResult(OperationResult):
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
class ListResult(OperationResult):
    """Snapshots (oldest first), foreign files in the backup root, and the repository size."""

    backup_root: Path
    snapshots: List[SnapshotInfo]
    foreign: List[str]
    repository_bytes: int
    problems: List[str] = dataclasses.field(default_factory=list)
    other_stores: int = 0


@dataclasses.dataclass
class VerifyResult(OperationResult):
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
class RestoreResult(OperationResult):
    """What a restore changed (or, with dry_run, would change); its warnings leave exit 0."""

    PARTIAL_FIELDS = ()

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
class RotateResult(OperationResult):
    """Snapshots deleted and kept by rotation, and the space freed."""

    dry_run: bool
    deleted: List[str]
    kept: List[str]
    objects_freed: int
    bytes_freed: int
    packs_rewritten: int
    warnings: List[str] = dataclasses.field(default_factory=list)
    reasons: Dict[str, List[str]] = dataclasses.field(default_factory=dict)  # kept: why


@dataclasses.dataclass
class AutoResult(OperationResult):
    """What ``backup auto`` did: the snapshot (or why none was due) and the rotation."""

    backup: Optional[BackupResult]
    skipped: Optional[str]
    rotate: Optional[RotateResult]
    copy: Optional["CopyResult"] = None      # with copy_to: what the copy did
    copy_error: Optional[str] = None         # with copy_to: why the copy failed
    copy_exit: int = 0                       # the copy failure's exit code
    plan: Optional["BackupPlan"] = None      # dry run: what the backup would read and add
    dry_run: bool = False

    @property
    def failure(self) -> Optional[ExitCode]:
        """The copy failure's exit code, if the copy failed."""
        return ExitCode(self.copy_exit) if self.copy_error else None

    @property
    def warnings(self) -> List[str]:
        """The backup's (or its plan's) and the rotation's warnings (the copy's do not count)."""
        parts = (self.backup, self.rotate, self.plan)
        return [w for part in parts if part is not None for w in part.warnings]


def _json_kind_of(data: bytes, problems: Optional[List[str]] = None) -> str:
    """``array``/``object``/``string``/... for JSON bytes (gzip allowed), else ``invalid``
    (and why, appended to ``problems``)."""
    try:
        text, _ = decode_file_bytes(Path("-"), data)
        obj = parse_json_text(text)
    except (CorruptFileError, ValueError, RecursionError) as exc:
        if problems is not None:
            problems.append(getattr(exc, "problem", None) or str(exc))
        return "invalid"
    if isinstance(obj, bool) or obj is None:
        return "literal"
    return {list: "array", dict: "object", str: "string"}.get(type(obj), "number")


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
        with _naming_path(self.path):
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
        with _naming_path(self.path):
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._close()
        index = _encode_index(self.blocks, self.entries)
        atomic_write_bytes(self.path.with_suffix(".idx"), index, mode=0o600)
        self.committed = True
        return self._offset + len(index)

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the pack file's bytes as written."""
        return self._sha.digest()

    def __enter__(self) -> "_PackWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:   # any exception, KeyboardInterrupt too
            self.abort()

    def abort(self) -> None:
        """Drop the pack unless committed (an uncommitted pack has no index: no reader)."""
        if self.committed:
            return
        self._pool.shutdown(cancel_futures=True)
        self._close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
    """The magic and the zlib payload (blocks and object locations), sealed (see seal).

    Objects are keyed by the first 12 bytes of their SHA-256 (the full digest lives in the
    manifest or item list that references them and is checked on every read). Rows are
    sorted by key, so a few lookups need no map (binary search in the raw table).
    """
    parts = [struct.pack("<I", len(blocks))]
    parts.extend(struct.pack("<QII", *b) for b in blocks)
    parts.append(struct.pack("<I", len(entries)))
    parts.extend(key + entries[key] for key in sorted(entries))
    payload = b"".join(parts)
    return seal(_IDX_MAGIC + zlib.compress(payload, 6), _IDX_FORMAT)


_ROW = KEY_LEN + 12   # bytes per object row in a pack index: key, block, offset, length
_unpack_loc = struct.Struct("<III").unpack_from


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
        return _unpack_loc(self.table, row * _ROW + KEY_LEN)

    def find(self, key: bytes) -> Optional[int]:
        """The row of a key by binary search (sorted indexes only), or None."""
        row = bisect.bisect_left(self, key)
        return row if row < self.count and self[row] == key else None


def _decode_index(path: Path, raw: bytes) -> _PackIndex:
    """A pack index of either layout; the sealed one is verified before it is inflated, the
    older one (magic, SHA-256 of the inflated payload, zlib) after."""
    if is_sealed(raw):
        body = unseal(raw, _IDX_FORMAT, path, "pack index", parse=False)
        magic, digest, packed = body[:8], None, body[8:]
    else:
        magic, digest, packed = raw[:8], raw[8:40], raw[40:]
    try:
        payload = inflate_capped(packed, state_inflate_cap(len(raw)), path)
    except IntegrityError as exc:
        if "bomb" in str(exc) or digest is None:
            raise
        payload = b""
    if magic not in (_IDX_MAGIC, _IDX_MAGIC_UNSORTED) \
            or (digest is not None and hashlib.sha256(payload).digest() != digest):
        raise ChecksumError("%s: pack index checksum mismatch" % path)
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
                for number, pack in enumerate(self.pack_list):
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

    def _spot(self, digest: bytes) -> Tuple[_PackIndex, int, int, int]:
        """(pack, block, offset, length) of an object; raises IntegrityError if missing."""
        found = self._locate(digest[:KEY_LEN])
        if found is None:
            raise IntegrityError("object %s is missing" % digest.hex()[:16])
        pack, row = found
        return (pack,) + pack.loc(row)

    def _located(self, digests: Iterable[bytes]
                 ) -> Iterator[Tuple[bytes, Optional[_PackIndex], int, int, int]]:
        """(digest, pack, block, offset, length) of each object (pack None: missing), for
        callers that place many: the keys are looked up in one pass at C speed."""
        packs, where, digests = self.pack_list, self.where, list(digests)
        for digest, code in zip(digests, map(where.get, [d[:KEY_LEN] for d in digests])):
            if code is None:
                yield digest, None, 0, 0, 0
            else:
                pack = packs[code >> 32]
                yield (digest, pack) + _unpack_loc(pack.table,
                                                   (code & 0xFFFFFFFF) * _ROW + KEY_LEN)

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
        pack, block_no, off, length = self._spot(digest)
        data = self._block(pack.name, block_no)[off:off + length]
        if len(data) != length or (check and hashlib.sha256(data).digest() != digest):
            raise IntegrityError("object %s in %s.pack: checksum mismatch"
                                 % (digest.hex()[:16], pack.name))
        return data

    def get_unchecked(self, digests: Sequence[bytes]) -> List[bytes]:
        """The bytes of many objects, in order, with lengths checked but not SHA-256s (for
        callers that check the SHA-256 of the whole file they make); raises IntegrityError."""
        out, last, block = [], None, b""
        for digest, pack, block_no, off, length in self._located(digests):
            if pack is None:
                raise IntegrityError("object %s is missing" % digest.hex()[:16])
            if (pack.name, block_no) != last:
                last = (pack.name, block_no)
                block = self._block(*last)
            data = block[off:off + length]
            if len(data) != length:
                raise IntegrityError("object %s in %s.pack: truncated"
                                     % (digest.hex()[:16], pack.name))
            out.append(data)
        return out

    def outside(self, digests: Iterable[bytes], name: Optional[str]) -> List[bytes]:
        """The digests whose copy is not in pack ``name`` (all of them if no pack is)."""
        fresh = next((n for n, p in enumerate(self.pack_list) if p.name == name), -1)
        where = self.where
        return [d for d in digests if fresh < 0 or where.get(d[:KEY_LEN], -1) >> 32 != fresh]

    def check_many(self, digests: Iterable[bytes]) -> Dict[bytes, str]:
        """Check objects block by block (each block read and decompressed once, the next
        ones on worker threads); returns {digest: problem}."""
        bad: Dict[bytes, str] = {}
        by_block: Dict[Tuple[str, int], List[Tuple[int, int, bytes]]] = {}
        for digest, pack, block_no, off, length in self._located(set(digests)):
            if pack is None:
                bad[digest] = "object %s is missing" % digest.hex()[:16]
            else:
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
                # the index knows the block's size: inflating stops there (memory bounded)
                data = inflate_capped(handle.read(clen), ulen, "%s: block %d" % (path, block_no))
        except (OSError, IndexError) as exc:
            raise IntegrityError("%s: block %d unreadable (%s)" % (path, block_no, exc)) from None
        if len(data) != ulen:
            raise IntegrityError("%s: block %d has the wrong size" % (path, block_no))
        return data


def _prefetched(func: Callable[[Any], Any], keys: List[Any],
                ahead: int = 2) -> Iterator[Tuple[Any, Any]]:
    """``(key, func(key))`` in order, computing up to ``ahead`` results on worker threads;
    memory holds at most ``ahead + 1`` results."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=ahead) as pool:
        todo = iter(keys)
        pending = collections.deque((key, pool.submit(func, key))
                                    for key in itertools.islice(todo, ahead))
        while pending:
            for key in itertools.islice(todo, 1):
                pending.append((key, pool.submit(func, key)))
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


def _manifest_path_problems(files: List[Any]) -> List[str]:
    """Every reason in a manifest's own paths that restore refuses: an unsafe path, one aml
    never restores (``.aml/`` other than the archive, locks, temp files, the conventional
    backup folder), a path listed twice, and a file that is also a folder of another path."""
    problems: List[str] = []
    seen: Set[str] = set()
    for entry in files:
        try:
            rel = safe_relpath(entry.get("path") if isinstance(entry, dict) else None)
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        if _skip_name(rel):
            problems.append("path %r is outside what aml restores" % rel)
        elif rel in seen:
            problems.append("path %r is listed twice" % rel)
        seen.add(rel)
    for rel in sorted(seen):
        folder = rel
        while "/" in folder:
            folder = folder.rsplit("/", 1)[0]
            if folder in seen:
                problems.append("path %r is a file and also the folder of %r" % (folder, rel))
                break
    return problems


def _target_path_problems(rels: Iterable[str], root: Path, repo: Path) -> List[str]:
    """Why restoring ``rels`` into ``root`` would be refused there: a symlink or file on
    the way, a folder where the file goes, or a path into the backup repository (each
    folder is looked at once; one lstat per file)."""
    problems: List[str] = []
    repo_text = os.path.realpath(str(repo))
    root_text = os.path.realpath(str(root))
    repo_inside = os.path.commonpath([repo_text, root_text]) == root_text
    bad_folders: Dict[str, Optional[str]] = {}
    for rel in rels:
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if folder not in bad_folders:
            try:
                _check_no_symlinks(root, rel)
                bad_folders[folder] = None
            except RefusedError as exc:
                bad_folders[folder] = str(exc)
        if bad_folders[folder] is not None:
            problems.append(bad_folders[folder])
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(str(root / rel)).st_mode):
                problems.append("refusing to restore %s: %s is a folder" % (rel, root / rel))
                continue
        if repo_inside and os.path.commonpath(
                [repo_text, os.path.realpath(str(root / rel))]) == repo_text:
            problems.append("refusing to restore %s: it is inside the backup repository %s"
                            % (rel, repo))
    return problems


def _is_safe(rel: Any) -> bool:
    try:
        safe_relpath(rel)
    except IntegrityError:
        return False
    return True


def _in_scope(rel: str, agents: Optional[Sequence[str]]) -> bool:
    return agents is None or rel.split("/", 1)[0] in agents


def _walk_files(root: Path, top: str, skip: Callable[[str], bool],
                odd: Optional[List[Tuple[str, str]]] = None) -> Iterator[str]:
    """Relative POSIX paths of the files under root/top (no symlinks, no skipped names).

    With an ``odd`` list, only regular files are yielded; every other entry (a symlink to a
    file or folder, a FIFO, a socket, a device) is appended there as (path, kind) instead.
    """
    base = root / top if top else root
    for dirpath, dirnames, filenames in os.walk(str(base)):
        rel_dir = os.path.relpath(dirpath, str(root)).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = sorted(d for d in dirnames if not skip(rel_dir + d) and d not in links)
        if odd is not None:  # a folder where a data file belongs: walked, and reported
            odd.extend((rel_dir + d, "folder") for d in dirnames if d.endswith(".json"))
        for name in sorted(filenames + links):
            rel = rel_dir + name
            if skip(rel):
                continue
            if odd is None:
                if name not in links and not os.path.islink(os.path.join(dirpath, name)):
                    yield rel
                continue
            with contextlib.suppress(FileNotFoundError):
                kind = _odd_kind(os.lstat(os.path.join(dirpath, name)).st_mode)
                if kind is None:
                    yield rel
                else:
                    odd.append((rel, kind))


def _skip_name(rel: str) -> bool:
    """Never backed up: aml state other than the archive, runtime locks, temp files."""
    name = rel.rsplit("/", 1)[-1]
    if is_transient_entry(name):
        return True
    top = rel.split("/", 1)[0]
    if top == STATE_DIR_NAME:
        return not (rel == STATE_DIR_NAME or rel == STATE_DIR_NAME + "/archive"
                    or rel.startswith(STATE_DIR_NAME + "/archive/"))
    return top.startswith(".") or top == "memory-backup"


def store_scope_files(root: Path, agents: Optional[Sequence[str]],
                      odd: Optional[List[Tuple[str, str]]] = None) -> List[str]:
    """Every file a snapshot of ``agents`` (None: the whole store) covers, sorted (with an
    ``odd`` list: regular files only, the rest listed there; see _walk_files)."""
    tops = [""] if agents is None else agents
    return [rel for top in tops for rel in _walk_files(root, top, _skip_name, odd)]


def _write_manifest(path: Path, payload: Dict[str, Any]) -> None:
    """Like write_checksummed, but gzip-compressed (read_checksummed reads it unchanged)."""
    data = seal(payload, STATE_FORMAT)
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

    def __init__(self, store: StoreLike, config: Optional[BackupConfig] = None):
        self.store = store = as_store(store, "BackupManager")
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
        self.progress: ProgressCallback = store.progress   # the CLI shows it on a TTY
        self._manifests: Dict[str, Dict[str, Any]] = {}
        self._fresh_pack: Optional[str] = None   # the pack the last create wrote
        self._trusted = _Trusted()               # what the last create may skip verifying

    def _elsewhere(self, root: Path) -> "BackupManager":
        """A manager of the repository under ``root``, with this one's store and settings."""
        return BackupManager(self.store, dataclasses.replace(self.config, backup_root=root,
                                                             copy_to=None))

    # -- repository housekeeping ------------------------------------------
    @contextlib.contextmanager
    def _repo_lock(self, exclusive: bool) -> Iterator[None]:
        # A read-only command (verify, restore --dry-run) by a user who may not write the
        # repository takes the shared lock on the existing file and creates nothing.
        reader = self.store.save_optional and not os.access(str(self.repo), os.W_OK)
        if exclusive and not reader:
            self._ensure_repo()
        elif not (self.repo / "lock").exists():
            yield
            return
        flags = os.O_RDONLY if reader else os.O_RDWR | os.O_CREAT
        fd = os.open(str(self.repo / "lock"), flags, 0o600)
        try:
            self._flock(fd, fcntl.LOCK_EX if exclusive and not reader else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _flock(self, fd: int, mode: int) -> None:
        if not flock_within(fd, mode, self.store.lock_timeout):
            raise StoreBusyError("backup repository busy: %s" % (self.repo / "lock"))

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
        if not _BACKUP_ID_RE.fullmatch(backup_id or ""):
            raise UsageError("invalid backup id %r (expected e.g. full_20261120_020000)"
                             % backup_id)
        return self.snapshots_dir / (backup_id + ".json")

    def _existing_manifest(self, backup_id: str) -> Path:
        """The manifest file of a snapshot; UsageError if the id is malformed or absent."""
        path = self.manifest_path(backup_id)
        if not path.exists():
            raise UsageError("no backup %r in %s" % (backup_id, self.repo))
        return path

    def load_manifest(self, backup_id: str) -> Dict[str, Any]:
        """A snapshot's manifest; UsageError if absent, IntegrityError if it does not verify."""
        path = self._existing_manifest(backup_id)
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
        return self._manifest_is(backup_id, "store", str(self.store.root.resolve()))

    def _manifest_is(self, backup_id: str, key: str, value: Any) -> bool:
        """True if the snapshot's manifest reads and its ``key`` is ``value``."""
        try:
            return self.load_manifest(backup_id).get(key) == value
        except AmlError:
            return False

    def snapshot_ids(self) -> List[str]:
        """Ids of every snapshot with a manifest, oldest first (by time, then sequence)."""
        if not self.snapshots_dir.is_dir():
            return []
        ids = [p.stem for p in self.snapshots_dir.glob("*.json")
               if _BACKUP_ID_RE.fullmatch(p.stem)]
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

    def _mark_verified(self, check: Optional[VerifyResult] = None) -> None:
        """Record ``check``'s outcomes (None: only drop the marks of deleted snapshots)."""
        existing = set(self.snapshot_ids())
        marks = {k: v for k, v in self._verified().items() if k in existing}
        for backup_id in check.backup_ids if check else []:
            marks[backup_id] = {"ok": backup_id not in check.failed, "deep": check.deep,
                                "when": format_timestamp(self.store.now)}
        write_checksummed(self.repo / "verified.json", marks)

    def newest_verified(self) -> Optional[str]:
        """The newest snapshot whose last verification passed, or None."""
        marks = self._verified()
        return next((i for i in reversed(self.snapshot_ids())
                     if marks.get(i, {}).get("ok") is True and self._is_own(i)), None)

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
        with self.store.operation("backup") as op:
            result = self._create_locked(btype, agents, reason)
            if not trust_baseline:
                self._trusted.entries = {}
            wanted = self.config.verify_after_backup if verify is None else verify
            # A full backup never trusts the objects it deduplicated against, verify or not.
            if wanted or result.type is BackupType.FULL:
                check = self._verify_and_repair(result, check_first=wanted)
                if wanted:
                    self._record_verify(check, op)
                    result.verified = check.ok
                if not check.ok:
                    raise IntegrityError("backup %s does not verify: %s"
                                         % (result.backup_id, "; ".join(check.problems[:3])))
            op.summary = {"backup_id": result.backup_id, "type": result.type.value,
                          "verified": result.verified, "manifest": str(result.manifest.resolve()),
                          "bytes_added": result.bytes_added, "files": result.files}
        result.seconds = op.seconds
        return result

    def _create_locked(self, btype: BackupType, agents: Optional[Sequence[str]],
                       reason: Optional[str]) -> BackupResult:
        selected, previous, btype, objects, snap = _snapshot_start(self, btype, agents)
        with _PackWriter(self.packs, self.config.compression_level, objects.has) as writer:
            odd: List[Tuple[str, str]] = []
            paths = store_scope_files(self.store.root, selected, odd)
            snap.not_regular([(rel, odd_file_problem(kind)) for rel, kind in odd])
            entries = []
            # One file is read, inflated and hashed ahead on a worker thread.
            for n, (rel, read) in enumerate(_prefetched(snap.preread, paths, ahead=1), 1):
                self.progress("backup: reading files", n - 1, len(paths), "files")
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
        return BackupResult(
            backup_id=backup_id, type=btype, created=manifest["created"], files=len(entries),
            records=sum(e.get("count", 0) for e in entries), files_reread=snap.reread,
            objects_added=len(writer.entries), bytes_added=bytes_added + path.stat().st_size,
            verified=False, manifest=path, reason=reason, warnings=snap.warnings,
            skipped=snap.skipped)

    def _record_verify(self, check: VerifyResult, op: Operation) -> None:
        with self.store.optional_write("verification marks in %s" % self.repo):
            self._mark_verified(check)
        for backup_id in check.backup_ids:
            summary = {"backup_id": backup_id, "ok": backup_id not in check.failed,
                       "deep": check.deep}
            if check.repaired:
                summary["repaired"] = check.repaired
            op.record(summary, "verify")

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
        with writer:
            for n in damaged:
                entry = snap.file_entry(files[n]["path"], writer)
                if entry is not None:   # unreadable now: the snapshot stays damaged
                    files[n] = entry
                    fixed.append(entry["path"])
            added = writer.commit()
            if files != manifest["files"]:
                _write_manifest(self.manifest_path(backup_id), dict(manifest, files=files))
                self._manifests.pop(backup_id, None)
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
        op = self.store.operation("verify")
        ids = self.snapshot_ids()
        if not ids:
            raise UsageError("no backups in %s" % self.repo)
        if not all_snapshots:
            backup_id = backup_id or (self.own_snapshot_ids() or ids)[-1]
            self._existing_manifest(backup_id)
            ids = [backup_id]
        with self._repo_lock(exclusive=True):
            result = self._verify_locked(ids, deep)
            self._record_verify(result, op)
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
        for backup_id in with_progress(self.progress, "verify%s" % (" --deep" if deep else ""),
                                       ids):
            before = len(result.problems)
            try:
                manifest = self.load_manifest(backup_id)
            except AmlError as exc:
                result.problems.append("%s: %s" % (backup_id, exc))
            else:
                problems, count = _verify_files(manifest["files"], objects, checked, deep,
                                                trusted)
                problems.extend(self._restore_refusals(manifest["files"]))
                result.problems.extend("%s: %s" % (backup_id, p) for p in problems)
                result.files_checked += len(manifest["files"])
                result.objects_checked += count
            if len(result.problems) > before:
                result.failed.append(backup_id)
        result.ok = not result.problems
        return result

    def _restore_refusals(self, files: List[Any]) -> List[str]:
        """What would make a restore of these files into the live store refuse (unsafe
        paths are already reported per file by _verify_files)."""
        problems = [p for p in _manifest_path_problems(files) if "unsafe path" not in p]
        rels = [e["path"] for e in files if isinstance(e, dict) and _is_safe(e.get("path"))]
        return problems + ["restore into %s would refuse: %s" % (self.store.root, p)
                           for p in _target_path_problems(rels, self.store.root, self.repo)]

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
        op = self.store.operation("restore")
        # The root itself may be a symlink the user chose; only folders below it are checked.
        root = (Path(target) if target is not None else self.store.root).resolve()
        hold = self.store.maintenance_lock() if not dry_run else contextlib.nullcontext()
        with op, hold, self._repo_lock(exclusive=not dry_run):
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
            if not plan.live and not force and plan.target_had_files:
                raise RefusedError("--target %s is not empty; use --force to restore into it"
                                   % root)

            def before_swap() -> None:   # every staged file is checked by now
                if plan.live:
                    safety = self._safety_snapshot(backup_id)
                    result.safety_backup = safety.backup_id
                    # e.g. a corrupt file it kept as exact bytes: the restore goes on (that
                    # file is being replaced) but the user learns what the snapshot holds.
                    notes = safety.warnings + ["repaired damaged backup data: %s" % r
                                               for r in safety.repaired]
                    result.warnings.extend("safety backup %s: %s" % (safety.backup_id, w)
                                           for w in notes)

            plan.apply(before_swap)
            op.summary = {"backup_id": backup_id, "target": str(root.resolve()),
                          "created": len(result.created), "replaced": len(result.replaced),
                          "removed": len(result.removed), "safety_backup": result.safety_backup}
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
               keep_monthly: int = 0, lock_store: bool = True, keep_last: int = 0,
               keep_hourly: int = 0, keep_yearly: int = 0, keep_within: int = 0
               ) -> RotateResult:
        """Delete snapshots past retention_days (or, when any keep_* is given, not picked by
        one of those rules instead) and past max_backups.

        Never deletes the newest snapshot nor the newest verified one; then frees the objects
        no remaining snapshot uses. ``reasons`` says why each kept one is kept. Raises
        StoreBusyError.
        """
        op = self.store.operation("rotate")
        keep = dict(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                    monthly=keep_monthly, yearly=keep_yearly, within=keep_within)
        hold = (self.store.maintenance_lock() if lock_store and not dry_run
                else contextlib.nullcontext())
        with op, hold, self._repo_lock(exclusive=not dry_run):
            result = self._rotate_locked(dry_run, keep)
            if not dry_run:
                op.summary = {"deleted": result.deleted, "kept": len(result.kept),
                              "bytes_freed": result.bytes_freed,
                              "objects_freed": result.objects_freed}
        return result

    def retained(self, ids: List[str], keep_daily: int = 0, keep_weekly: int = 0,
                 keep_monthly: int = 0, keep_last: int = 0, keep_hourly: int = 0,
                 keep_yearly: int = 0, keep_within: int = 0) -> List[str]:
        """The snapshot ids rotation keeps, oldest first."""
        keep = dict(last=keep_last, hourly=keep_hourly, daily=keep_daily, weekly=keep_weekly,
                    monthly=keep_monthly, yearly=keep_yearly, within=keep_within)
        return sorted(self.retention_reasons(ids, keep), key=_id_order)

    def retention_reasons(self, ids: List[str], keep: Dict[str, int]) -> Dict[str, List[str]]:
        """{kept id: why} for ``ids`` (oldest first) under ``keep`` ({rule: count}, rules of
        KEEP_RULES). Any count > 0 replaces the retention_days age rule; max_backups caps
        the rest; the newest and the newest verified snapshot are always kept."""
        reasons = _keep_reasons(ids, keep, self.store.now, self.config.retention_days)
        protected = {i: "newest snapshot" for i in ids[-1:]}
        verified = self.newest_verified()
        if verified in ids:
            protected.setdefault(verified, "newest verified snapshot")
        ordered = sorted(reasons, key=_id_order)
        while len(ordered) > self.config.max_backups:
            victim = next((i for i in ordered if i not in protected), None)
            if victim is None:
                break
            ordered.remove(victim)
        out = {i: reasons[i] for i in ordered}
        for backup_id, why in protected.items():
            out.setdefault(backup_id, []).append(why)
        return out

    def _rotate_locked(self, dry_run: bool, keep: Dict[str, int]) -> RotateResult:
        if not dry_run:
            self._cleanup_leftovers()
        ids = self.own_snapshot_ids()
        reasons = self.retention_reasons(ids, keep)
        kept = sorted(reasons, key=_id_order)
        deleted = [i for i in ids if i not in kept]
        result = RotateResult(dry_run=dry_run, deleted=deleted, kept=kept, objects_freed=0,
                              bytes_freed=0, packs_rewritten=0, reasons=reasons)
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
            self._mark_verified()
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
            except _BAD_ENTRY as exc:
                warnings.append("space not freed: snapshot %s cannot be read (%s)"
                                % (backup_id, exc))
                return None
        return live

    # -- auto -----------------------------------------------------------------
    def auto(self, keep_daily: int = 0, keep_weekly: int = 0, keep_monthly: int = 0,
             keep_last: int = 0, keep_hourly: int = 0, keep_yearly: int = 0,
             dry_run: bool = False, keep_within: int = 0) -> AutoResult:
        """For cron: a snapshot when one is due per backup_schedule (full every 7 periods,
        else incremental), verified per verify_after_backup, then rotation, then (with
        copy_to) a copy to the second repository. A failed copy is in ``copy_error``; a
        failed backup raises. ``dry_run`` changes nothing and says what each step would do."""
        keep = dict(keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly,
                    keep_last=keep_last, keep_hourly=keep_hourly, keep_yearly=keep_yearly,
                    keep_within=keep_within)
        if dry_run:
            return auto_plan(self, keep)
        with self.store.maintenance_lock(), self._repo_lock(exclusive=True):
            self._cleanup_leftovers()
            btype, skipped = self._auto_due()
            backup = self._snapshot_and_verify(btype, None, None) if btype else None
        result = AutoResult(backup=backup, skipped=skipped, rotate=self.rotate(**keep))
        if self.config.copy_to:
            copy_step(self, result)
        return result

    def _auto_due(self) -> Tuple[Optional[BackupType], Optional[str]]:
        """The type of snapshot ``auto`` takes now, or None and why none is due."""
        period = SCHEDULE_PERIODS[self.config.backup_schedule]
        now = self.store.now
        ids = [i for i in self.own_snapshot_ids() if self._manifest_is(i, "agents", None)]
        if ids and days_between(_id_time(ids[-1]), now) < 0.9 * period:
            return None, "%s is recent enough for the %s schedule" % (
                ids[-1], self.config.backup_schedule)
        fulls = [i for i in ids if i.startswith("full_")]
        due = not fulls or days_between(_id_time(fulls[-1]), now) >= \
            FULL_EVERY_PERIODS * period - 0.1 * period
        return (BackupType.FULL if due else BackupType.INCREMENTAL), None

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
        except _BAD_ENTRY:
            damaged.append(n)
    bad = objects.check_many(objects.outside((d for ds in needs.values() for d in ds), fresh))
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
        except _BAD_ENTRY as exc:
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
        with contextlib.suppress(*_BAD_ENTRY):
            known = set(_entry_objects(base, lists))
            digests = [d for d in digests if d not in known]
    return objects.outside(digests, trusted.pack) if trusted.pack and digests else digests


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
            problems.extend(_deep_check(entry, objects))
    return len(new)


def _deep_check(entry: Dict[str, Any], objects: _ObjectStore) -> List[str]:
    try:
        _check_parses(entry, read_file_content(entry, objects))
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
        refusals = _target_path_problems(self.entries, root, manager.repo)
        if refusals:  # found in the plan: nothing has changed yet
            raise RefusedError("; ".join(refusals[:5]) + (" (and %d more)" % (len(refusals) - 5)
                                                          if len(refusals) > 5 else ""))
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
            list(pool.map(job, list(self.entries)))

    @staticmethod
    def _entries(manifest: Dict[str, Any], scope: Optional[List[str]]) -> Dict[str, Any]:
        problems = _manifest_path_problems(manifest["files"])
        if problems:
            raise IntegrityError("backup %s: %s" % (manifest.get("id"), "; ".join(problems[:5])))
        return {e["path"]: e for e in manifest["files"] if _in_scope(e["path"], scope)}

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
                    self.manager.progress("restore: replacing files", n - 1, len(staged),
                                          "files")
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
        mode = restored_mode(entry.get("mode"))
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with _naming_path(path), os.fdopen(fd, "wb") as handle:
            handle.write(encode_restored(entry, content))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(str(path), mode)

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
        return self.manager.store.file_lock(path) if self.live else contextlib.nullcontext()

    def _remove(self, rel: str) -> None:
        _check_no_symlinks(self.root, rel)
        path = self.root / rel
        with self._lock(path), contextlib.suppress(FileNotFoundError):
            path.unlink()
        fsync_dir(path.parent)
        parent = path.parent
        while parent != self.root and parent.name != STATE_DIR_NAME:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def restored_mode(mode: Any) -> int:
    """The permission bits restore gives a file whose manifest says ``mode``.

    A data file is read and written, never run: only read and write bits are kept (no
    execute, setuid, setgid or sticky bit, and no write for others), and the owner can always
    read and write it. A manifest is input: 0o6777 is restored as 0o664. Not a number: 0o644.
    """
    if not isinstance(mode, int) or isinstance(mode, bool):
        return 0o644
    return (mode & 0o664) | 0o600


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
        with _PackWriter(self.manager.packs, self.manager.config.compression_level,
                         lambda d: False) as writer:
            for _, keep in rewrite:
                for digest in keep:
                    writer.add(digest, self.objects.get(digest))
            return writer.commit()

    def _size(self, names: Iterable[str]) -> int:
        return sum(_file_size(self.manager.packs / (name + suffix))
                   for name in names for suffix in (".pack", ".idx"))

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
    copy_to = section.get("copy_to")
    if copy_to and isinstance(copy_to, str) and not copy_to.startswith("rclone:"):
        section["copy_to"] = str(store_parent(store) / Path(os.path.expanduser(copy_to)))
    flags = {k: v for k, v in overrides.items() if v is not None}
    return layer_config(BackupConfig(), (("aml config [backup]", section),
                                         ("command line", flags)))


def store_parent(store: Store) -> Path:
    """The folder holding the store as the user named it (symlinks not resolved): the
    default backup root's parent and the base of a relative ``backup_root`` in the config."""
    return Path(os.path.abspath(str(store.root))).parent


def safety_backup(store: Store, reason: str, config: Optional[BackupConfig] = None) -> str:
    """Take and verify a snapshot before destructive work; returns its id. ``reason`` says
    what it comes before (``"before <run id>"``), as the backup list and errors show it.

    Call it with the store's maintenance lock held (it does not take it again). Raises
    RefusedError when the backup cannot be taken or does not verify, so the work stops.
    """
    try:
        config = config or backup_config_for(store)
        result = BackupManager(store, config).create(BackupType.INCREMENTAL, reason=reason,
                                                     verify=True, lock_store=False)
    except (AmlError, OSError) as exc:
        raise RefusedError("safety backup %s failed, nothing was changed (%s); "
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
        except CorruptFileError as exc:   # became a FIFO or link since the walk
            self.not_regular([(rel, exc.problem)])
            return None
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

    def not_regular(self, odd: List[Tuple[str, str]]) -> None:
        """Report (path, problem) of files left out unopened (a FIFO would block a read)."""
        for rel, problem in odd:
            self.warnings.append("%s: %s; not in this backup" % (self.store.root / rel, problem))
            self.skipped.append(rel)

    def _intact(self, prev: Dict[str, Any]) -> bool:
        ref = prev.get("list") or prev.get("object")
        return isinstance(ref, str) and self.objects.has(bytes.fromhex(ref))

    def _read(self, rel: str, path: Path) -> bytes:
        if rel.startswith(STATE_DIR_NAME + "/"):
            return read_regular_file(path)
        lock = self.store.file_lock(path)
        try:
            lock.acquire()            # the runtime may be mid-write
        except PermissionError:
            return read_regular_file(path)  # a read-only store cannot be locked, only read
        try:
            return read_regular_file(path)
        finally:
            lock.release()

    def _blob_entry(self, rel: str, raw: bytes, writer: _PackWriter) -> Dict[str, Any]:
        digest = hashlib.sha256(raw).digest()
        writer.add(digest, raw)
        problems: List[str] = []
        kind = _json_kind_of(raw, problems) if rel.endswith(".json") else "bytes"
        if kind == "invalid":
            self.warnings.append("%s: not valid JSON (%s); backed up as bytes"
                                 % (self.store.root / rel, problems[0][:200]))
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
            # A record's identity here is its exact bytes, not _canonical: a restore must
            # give back the file byte for byte, whitespace and key order included.
            digest = sha256(data).digest()
            add(digest, data)
            items.append(digest)
        ref, depth = self._store_list(items, prev, writer)
        mtime = int.from_bytes(raw[4:8], "little") if is_gzip else 0   # the gzip header's
        return {"kind": "array", "gzip": is_gzip, "gzip_mtime": mtime,
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
        data, depth = b"", 0
        if old is not None and int(prev.get("depth", 0)) < MAX_DELTA_DEPTH:
            delta = _encode_delta(bytes.fromhex(prev["list"]), old, items)
            if len(delta) < 16 * len(items):
                data, depth = delta, int(prev.get("depth", 0)) + 1
        data = data or b"L" + b"".join(items)
        digest = hashlib.sha256(data).digest()
        writer.add(digest, data, meta=True)
        return digest.hex(), depth


# -- Retention rules: which snapshots rotation keeps, and why ----------------

KEEP_RULES: Dict[str, Callable[[_dt.datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%04d-W%02d" % tuple(t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def _keep_reasons(ids: List[str], keep: Dict[str, int], now: _dt.datetime,
                  retention_days: int) -> Dict[str, List[str]]:
    """{id: reasons} picked by the keep rules (``last``, ``within`` days and KEEP_RULES) or,
    when no count is given, by the age rule (retention_days); raises UsageError for a
    negative count or an unknown rule."""
    for rule, count in keep.items():
        if rule not in ("last", "within") and rule not in KEEP_RULES:
            raise UsageError("unknown retention rule keep_%s" % rule)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UsageError("--keep-%s must be an integer >= 0, not %r" % (rule, count))
    reasons: Dict[str, List[str]] = {}
    given = any(keep.values())
    within = keep.get("within", 0) if given else retention_days
    for backup_id in ids if within or not given else []:
        if days_between(_id_time(backup_id), now) <= within:
            reasons[backup_id] = ["within %d days" % within]
    if not given:
        return reasons
    for backup_id in ids[len(ids) - keep.get("last", 0):] if keep.get("last") else []:
        reasons.setdefault(backup_id, []).append("last %d" % keep["last"])
    for rule, label in KEEP_RULES.items():
        for backup_id in _calendar_picks(ids, keep.get(rule, 0), label):
            reasons.setdefault(backup_id, []).append(
                "%s %s" % (rule, label(_id_time(backup_id))))
    return reasons


# -- Dry runs: what a backup would read and add -------------------------------

@dataclasses.dataclass
class BackupPlan(OperationResult):
    """What ``backup create --dry-run`` found: the snapshot it would take, the files it would
    read, and the objects and bytes (before compression) it would add."""

    type: BackupType
    baseline: Optional[str]
    files: int
    records: int
    files_read: int
    bytes_read: int
    files_new: int
    files_changed: int
    objects_added: int
    bytes_added: int
    warnings: List[str] = dataclasses.field(default_factory=list)


class _DryWriter:
    """Stands in for _PackWriter in a dry run: counts the objects it would add, writes none."""

    def __init__(self, known: Callable[[bytes], bool]):
        self.known = known
        self.seen: Set[bytes] = set()
        self.objects = 0
        self.bytes = 0

    def add(self, digest: bytes, data: bytes, meta: bool = False) -> bool:
        """Count one object unless the repository (or this run) has it; True if counted."""
        if digest in self.seen or self.known(digest):
            return False
        self.seen.add(digest)
        self.objects += 1
        self.bytes += len(data)
        return True


def _snapshot_start(manager: BackupManager, btype: BackupType, agents: Optional[Sequence[str]]
                    ) -> Tuple[Optional[List[str]], Optional[Dict[str, Any]], BackupType,
                               "_ObjectStore", "_SnapshotBuilder"]:
    """What a backup and its dry run start from: the selected agents, the newest readable
    snapshot (None makes it full), the type, the object lookup and the snapshot builder."""
    selected = manager.store.select_agents(agents) if agents else None
    previous = manager._newest_readable()
    if previous is None or not manager.config.incremental_enabled:
        btype = BackupType.FULL
    objects = _ObjectStore(manager.packs)
    snap = _SnapshotBuilder(manager, objects, previous,
                            incremental=btype is BackupType.INCREMENTAL)
    return selected, previous, btype, objects, snap


def plan_backup(manager: BackupManager, backup_type: BackupType = BackupType.INCREMENTAL,
                agents: Optional[Sequence[str]] = None) -> BackupPlan:
    """Read the store as ``create`` would (same files, same locks) and write nothing: no
    repository, no state. Raises UsageError for an unknown agent."""
    store = manager.store
    selected, previous, backup_type, objects, snap = _snapshot_start(manager, backup_type, agents)
    writer = _DryWriter(objects.has)
    plan = BackupPlan(type=backup_type, baseline=previous.get("id") if previous else None,
                      files=0, records=0, files_read=0, bytes_read=0, files_new=0,
                      files_changed=0, objects_added=0, bytes_added=0)
    for rel in store_scope_files(store.root, selected):
        prev, reread = snap.previous.get(rel), snap.reread
        entry = snap.file_entry(rel, writer)   # type: ignore[arg-type]
        if entry is None:
            continue
        plan.files += 1
        plan.records += entry.get("count", 0)
        if snap.reread > reread:
            plan.files_read += 1
            plan.bytes_read += entry["size"]
        if prev is None:
            plan.files_new += 1
        elif prev.get("sha256") != entry["sha256"]:
            plan.files_changed += 1
    plan.objects_added, plan.bytes_added, plan.warnings = writer.objects, writer.bytes, \
        snap.warnings
    return plan


def auto_plan(manager: BackupManager, keep: Dict[str, int]) -> AutoResult:
    """What ``auto`` would do now, changing nothing: the snapshot (planned), the rotation as
    a dry run over the snapshots there now, and (with copy_to) the copy as a dry run."""
    btype, skipped = manager._auto_due()
    plan = plan_backup(manager, btype) if btype else None
    rotated = manager.rotate(dry_run=True, **keep)
    result = AutoResult(backup=None, skipped=skipped, rotate=rotated, plan=plan, dry_run=True)
    if manager.config.copy_to:
        copy_step(manager, result, dry_run=True)
    return result


# -- Copies: a second repository, in a folder or behind rclone ---------------
RCLONE_PREFIX = "rclone:"


@dataclasses.dataclass
class CopyResult(OperationResult):
    """What ``backup copy`` wrote to the destination (or, dry run, would write), and whether
    every snapshot it copied verified there."""

    destination: str
    dry_run: bool
    copied: List[str]
    present: List[str]
    objects_copied: int
    bytes_copied: int
    verified: bool
    objects_checked: int
    problems: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@contextlib.contextmanager
def _staging_dir() -> Iterator[Path]:
    """A private temporary folder (under TMPDIR), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="aml-repo-"))
    try:
        yield path
    finally:
        shutil.rmtree(str(path), ignore_errors=True)


class _Rclone:
    """An rclone remote (``rclone:NAME:path``) holding a repository at ``NAME:path/aml``,
    driven through rclone's own subcommands (lsjson, copy, copyto, moveto, deletefile)."""

    def __init__(self, spec: str):
        remote = spec[len(RCLONE_PREFIX):]
        if ":" not in remote:
            raise UsageError("%r: expected rclone:NAME:path (or rclone::local:/path)" % spec)
        self.spec = spec
        self.base = remote + REPO_DIR_NAME if remote.endswith(":") else \
            remote.rstrip("/") + "/" + REPO_DIR_NAME
        self.exe = shutil.which("rclone")
        if self.exe is None:
            raise AmlError("%s: rclone is not installed (it is needed for rclone: "
                           "repositories)" % spec)

    def _run(self, *args: str, missing_ok: bool = False) -> bytes:
        try:
            done = subprocess.run([str(self.exe)] + list(args), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise AmlError("%s: cannot run rclone (%s)" % (self.spec, exc)) from None
        if done.returncode == 3 and missing_ok:   # rclone: directory not found
            return b"[]"
        if done.returncode:
            lines = [ln for ln in done.stderr.decode("utf-8", "replace").splitlines()
                     if ln.strip() and "NOTICE" not in ln]
            raise AmlError("%s: rclone %s failed (exit %d): %s" % (
                self.spec, args[0], done.returncode, lines[-1] if lines else "no message"))
        return done.stdout

    def url(self, rel: str) -> str:
        """The rclone path of a file of the repository."""
        return self.base + "/" + rel

    def listing(self) -> List[str]:
        """Every file of the remote repository, relative to it (empty if there is none)."""
        out = self._run("lsjson", "-R", "--files-only", "--no-mimetype", "--no-modtime",
                        self.base, missing_ok=True)
        try:
            return sorted(e["Path"] for e in json.loads(out.decode("utf-8")))
        except (ValueError, KeyError, TypeError):
            raise AmlError("%s: rclone lsjson printed something unexpected" % self.spec) \
                from None

    def fetch(self, local_repo: Path, rels: List[str]) -> None:
        """Download ``rels`` into ``local_repo`` (one rclone copy)."""
        local_repo.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not rels:
            return
        listing = local_repo.parent / "files-from"
        listing.write_text("".join(r + "\n" for r in rels), encoding="utf-8")
        try:
            self._run("copy", "--files-from-raw", str(listing), self.base, str(local_repo))
        finally:
            listing.unlink()

    def upload(self, local: Path, rel: str) -> None:
        """Put one file in place whole: upload under a temp name, then rename it (so a
        reader never sees a partly uploaded file under its final name)."""
        folder, _, name = rel.rpartition("/")
        temp = (folder + "/" if folder else "") + "%s%s-%s" % (
            TMP_MARKER, secrets.token_hex(4), name.replace(".", "_"))
        self._run("copyto", str(local), self.url(temp))
        self._run("moveto", self.url(temp), self.url(rel))

    def remove_leftovers(self, listing: List[str]) -> None:
        """Delete what an interrupted copy left: temp uploads and packs without an index."""
        present = set(listing)
        for rel in listing:
            name = rel.rsplit("/", 1)[-1]
            orphan = rel.endswith(".pack") and rel[:-5] + ".idx" not in present
            if is_temp_leftover(name) or orphan:
                self._run("deletefile", self.url(rel))


def _is_repo_metadata(rel: str) -> bool:
    """Manifests and pack indexes: what a copy needs to know what the remote holds."""
    name = rel.rsplit("/", 1)[-1]
    return not is_temp_leftover(name) and (
        (rel.startswith("snapshots/") and name.endswith(".json"))
        or (rel.startswith("packs/") and name.endswith(".idx")))


class _LocalTarget:
    """A destination repository in a folder (another disk, a mounted share)."""

    def __init__(self, source: BackupManager, root: Path):
        self.label = str(root)
        self.manager = source._elsewhere(root)
        there, here = self.manager.repo.resolve(), source.repo.resolve()
        if there.is_relative_to(here) or here.is_relative_to(there):
            raise UsageError("%s is (or holds, or is inside) the source repository %s"
                             % (root, source.repo))

    @contextlib.contextmanager
    def session(self, dry_run: bool) -> Iterator[BackupManager]:
        """The destination's manager, locked and cleaned of leftovers unless dry run."""
        if dry_run:
            yield self.manager
            return
        with self.manager._repo_lock(exclusive=True):
            self.manager._cleanup_leftovers()
            yield self.manager

    def publish(self, rel: str) -> None:
        """Files are written in place: nothing to do."""

    @contextlib.contextmanager
    def readable(self, keys: Set[bytes]) -> Iterator[BackupManager]:
        """The destination as it is on disk, for verification."""
        yield self.manager

    def mark_verified(self, check: VerifyResult) -> None:
        """Record the verification in the destination's verified.json."""
        self.manager._mark_verified(check)


class _RcloneTarget:
    """A destination behind rclone: its manifests and indexes are staged locally, new packs
    are written there and each file is uploaded (pack, index, manifest last)."""

    def __init__(self, source: BackupManager, spec: str):
        self.label = spec
        self.source = source
        self.remote = _Rclone(spec)
        self.staging: Optional[BackupManager] = None

    @contextlib.contextmanager
    def session(self, dry_run: bool) -> Iterator[BackupManager]:
        """A local staging repository mirroring the remote's manifests and indexes."""
        with _staging_dir() as tmp:
            listing = self.remote.listing()
            if not dry_run:
                self.remote.remove_leftovers(listing)
            self.remote.fetch(tmp / REPO_DIR_NAME, [r for r in listing if _is_repo_metadata(r)])
            self.staging = self.source._elsewhere(tmp)
            if not dry_run:
                self.staging._ensure_repo()
            yield self.staging

    def publish(self, rel: str) -> None:
        """Upload one file of the staging repository."""
        assert self.staging is not None
        self.remote.upload(self.staging.repo / rel, rel)

    @contextlib.contextmanager
    def readable(self, keys: Set[bytes]) -> Iterator[BackupManager]:
        """A fresh download of the manifests, the indexes and the packs holding ``keys``:
        verification reads what the remote holds, not what was staged."""
        assert self.staging is not None
        objects = _ObjectStore(self.staging.packs)
        packs = {objects.at(objects.where[k])[0].name for k in keys if k in objects.where}
        listing = self.remote.listing()
        wanted = [r for r in listing if _is_repo_metadata(r)
                  or r[len("packs/"):-len(".pack")] in packs]
        with _staging_dir() as tmp:
            self.remote.fetch(tmp / REPO_DIR_NAME, wanted)
            yield self.source._elsewhere(tmp)

    def mark_verified(self, check: VerifyResult) -> None:
        """A remote keeps no verified.json (verify --repo checks it again)."""


def _copy_target(source: BackupManager, to: str) -> Any:
    if to.startswith(RCLONE_PREFIX):
        return _RcloneTarget(source, to)
    return _LocalTarget(source, Path(os.path.abspath(os.path.expanduser(to))))


def copy_backups(manager: BackupManager, to: str, backup_ids: Optional[Sequence[str]] = None,
                 dry_run: bool = False) -> CopyResult:
    """Copy snapshots (default: every snapshot of the store) into the repository ``to`` (a
    folder, or ``rclone:NAME:path``), incrementally: only objects it lacks, each snapshot's
    objects (pack, then index) before its manifest, so an interrupted copy leaves it valid.
    Then verify the copied snapshots there. Damaged source snapshots and failed checks are
    in ``problems``; raises UsageError, StoreBusyError, AmlError (rclone failed), OSError.
    Every run but a dry run is recorded in the store's history (``copy``)."""
    with manager.store.operation("copy") as op:
        try:
            result = _copy(manager, _copy_target(manager, to), backup_ids, dry_run)
        except (AmlError, OSError) as exc:
            if not dry_run and not isinstance(exc, UsageError):
                op.record(_copy_summary(to, None, str(exc)))
            raise
        if not dry_run:
            op.summary = _copy_summary(to, result, None)
    result.seconds = op.seconds
    return result


def _copy_summary(to: str, result: Optional[CopyResult], error: Optional[str]
                  ) -> Dict[str, Any]:
    summary: Dict[str, Any] = {"to": to, "ok": error is None and bool(result)
                               and not result.problems}
    if result is not None:
        summary.update(copied=result.copied, verified=result.verified,
                       bytes_copied=result.bytes_copied)
        error = "; ".join(result.problems[:3]) or None
    if error:
        summary["error"] = error
    return summary


@contextlib.contextmanager
def _copy_lock(manager: BackupManager, dry_run: bool) -> Iterator[None]:
    """One copy out of a repository at a time (backups and rotation may go on)."""
    if dry_run or not manager.repo.is_dir():
        yield
        return
    fd = os.open(str(manager.repo / "copy.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        manager._flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _copy(manager: BackupManager, target: Any, backup_ids: Optional[Sequence[str]],
          dry_run: bool) -> CopyResult:
    ids = list(backup_ids) if backup_ids else manager.own_snapshot_ids()
    for backup_id in ids:
        manager._existing_manifest(backup_id)
    if not ids and not dry_run:
        raise UsageError("no backups of this store in %s to copy" % manager.repo)
    result = CopyResult(destination=target.label, dry_run=dry_run, copied=[], present=[],
                        objects_copied=0, bytes_copied=0, verified=False, objects_checked=0)
    with _copy_lock(manager, dry_run), manager._repo_lock(exclusive=False), \
            target.session(dry_run) as dest:
        todo = _copy_todo(manager, dest, ids, result)
        copier = _Copier(manager, dest, target)
        for n, backup_id in enumerate(todo, 1):
            manager.progress("copy: snapshots", n - 1, len(todo), "snapshots")
            try:
                objects, size = copier.copy(backup_id, dry_run)
            except (IntegrityError, ValueError, KeyError, TypeError) as exc:
                result.problems.append("%s: not copied: %s" % (backup_id, exc))
                continue
            result.copied.append(backup_id)
            result.objects_copied += objects
            result.bytes_copied += size
        if not dry_run:
            _verify_copy(target, copier.keys, result)
    return result


def _copy_todo(manager: BackupManager, dest: BackupManager, ids: List[str],
               result: CopyResult) -> List[str]:
    """The ids to copy: missing at the destination, or there with other bytes (a repaired
    manifest), unless the destination's is another store's snapshot with the same id."""
    existing = set(dest.snapshot_ids())
    todo = []
    for backup_id in ids:
        if backup_id in existing:
            raw = manager.manifest_path(backup_id).read_bytes()
            if dest.manifest_path(backup_id).read_bytes() == raw:
                result.present.append(backup_id)
                continue
            try:
                theirs = dest.load_manifest(backup_id).get("store")
                ours = manager.load_manifest(backup_id).get("store")
            except AmlError:
                theirs = ours = None   # a damaged copy (or source): replaced, or reported
            if theirs != ours:
                result.warnings.append("%s: the destination holds another store's snapshot "
                                       "with this id; not copied" % backup_id)
                continue
        todo.append(backup_id)
    return todo


class _Copier:
    """Copies one snapshot at a time: its objects the destination lacks into a new pack
    (data, fsync, index), then its manifest, byte for byte."""

    def __init__(self, manager: BackupManager, dest: BackupManager, target: Any):
        self.manager = manager
        self.dest = dest
        self.target = target
        self.source = _ObjectStore(manager.packs)
        self.lists = _Lists(self.source)
        self.there = _ObjectStore(dest.packs)
        self.landed: Set[bytes] = set()   # keys this run added at the destination
        self.keys: Set[bytes] = set()     # keys the copied snapshots need

    def _known(self, digest: bytes) -> bool:
        return digest[:KEY_LEN] in self.landed or self.there.has(digest)

    def _needs(self, manifest: Dict[str, Any]) -> Tuple[List[bytes], List[bytes]]:
        meta: Dict[bytes, None] = {}
        data: Dict[bytes, None] = {}
        for entry in manifest["files"]:
            digests = _entry_objects(entry, self.lists)
            lists = len(digests) - entry["count"] if entry["kind"] == "array" else 0
            meta.update(dict.fromkeys(digests[:lists]))
            data.update(dict.fromkeys(digests[lists:]))
        return list(meta), [d for d in data if d not in meta]

    def copy(self, backup_id: str, dry_run: bool) -> Tuple[int, int]:
        """Copy one snapshot; returns the objects and bytes written (dry run: the objects
        and their bytes before compression). Raises IntegrityError for a damaged source."""
        manifest = self.manager.load_manifest(backup_id)
        raw = self.manager.manifest_path(backup_id).read_bytes()
        meta, data = self._needs(manifest)
        self.keys.update(d[:KEY_LEN] for d in meta + data)
        if dry_run:
            missing = [d for d in meta + data if not self._known(d)]
            self.landed.update(d[:KEY_LEN] for d in missing)
            return len(missing), sum(_object_length(self.source, d) for d in missing) \
                + len(raw)
        with _PackWriter(self.dest.packs, self.dest.config.compression_level,
                         self._known) as writer:
            for digests, is_meta in ((meta, True), (data, False)):
                for digest in digests:
                    writer.add(digest, self.source.get(digest), meta=is_meta)
            added = writer.commit()
        if writer.committed:
            self.target.publish("packs/%s.pack" % writer.name)
            self.target.publish("packs/%s.idx" % writer.name)
            self.landed.update(writer.entries)
        atomic_write_bytes(self.dest.manifest_path(backup_id), raw, mode=0o600)   # commit point
        self.target.publish("snapshots/%s.json" % backup_id)
        return len(writer.entries), added + len(raw)


def _verify_copy(target: Any, keys: Set[bytes], result: CopyResult) -> None:
    """Verify the snapshots just copied by reading them back from the destination."""
    if not result.copied:
        result.verified = not result.problems
        return
    with target.readable(keys) as there:
        check = there._verify_locked(result.copied, deep=False)
    target.mark_verified(check)
    result.objects_checked = check.objects_checked
    result.problems.extend("at %s: %s" % (target.label, p) for p in check.problems)
    result.verified = check.ok


def copy_step(manager: BackupManager, result: AutoResult, dry_run: bool = False) -> None:
    """The copy ``auto`` runs with copy_to; a failure goes into ``result`` (copy_error and
    copy_exit), as the backup before it stands."""
    try:
        result.copy = copy_backups(manager, str(manager.config.copy_to), dry_run=dry_run)
    except (AmlError, OSError) as exc:
        result.copy_error = "copy to %s failed: %s" % (manager.config.copy_to, exc)
        result.copy_exit = int(getattr(exc, "exit_code", ExitCode.FAILURE))
        return
    if result.copy.problems:
        result.copy_error = "copy to %s failed: %s" % (
            manager.config.copy_to, "; ".join(result.copy.problems[:3]))
        result.copy_exit = int(ExitCode.INTEGRITY)


# -- Reading another repository (--repo): a copy, a folder or an rclone remote --

class _RepoView(BackupManager):
    """Another repository (a copy) opened to list, verify, inspect and restore from. The
    safety snapshot a restore takes still goes to the store's own repository (``home``);
    verifications are recorded as ``copy_verify``, apart from the home repository's."""

    def __init__(self, home: BackupManager, root: Path, label: str, remote: bool):
        super().__init__(home.store, dataclasses.replace(home.config, backup_root=root,
                                                         copy_to=None))
        self.home = home
        self.label = label
        self.remote = remote
        self.progress = home.progress

    def _safety_snapshot(self, backup_id: str) -> BackupResult:
        with self.home._repo_lock(exclusive=True):
            self.home._cleanup_leftovers()
            return self.home._safety_snapshot(backup_id)

    def _record_verify(self, check: VerifyResult, op: Operation) -> None:
        if not self.remote:   # a staged download is thrown away: no marks there
            self._mark_verified(check)
        for backup_id in check.backup_ids:
            op.record({"backup_id": backup_id, "ok": backup_id not in check.failed,
                       "deep": check.deep, "to": self.label}, "copy_verify")


@contextlib.contextmanager
def open_repository(manager: BackupManager, repo: Optional[str]) -> Iterator[BackupManager]:
    """``manager`` itself, or (``repo`` given) a manager reading that repository: a folder
    holding ``aml/`` or ``rclone:NAME:path`` (downloaded whole into a temporary folder for
    the duration). Raises UsageError when there is no repository there, AmlError (rclone)."""
    if not repo:
        yield manager
        return
    if repo.startswith(RCLONE_PREFIX):
        remote = _Rclone(repo)
        with _staging_dir() as tmp:
            listing = [r for r in remote.listing()
                       if not is_temp_leftover(r.rsplit("/", 1)[-1]) and r != "lock"]
            if not any(r.startswith("snapshots/") for r in listing):
                raise UsageError("no aml repository at %s" % repo)
            remote.fetch(tmp / REPO_DIR_NAME, listing)
            yield _RepoView(manager, tmp, repo, remote=True)
        return
    root = Path(os.path.abspath(os.path.expanduser(repo)))
    if not (root / REPO_DIR_NAME / "snapshots").is_dir():
        raise UsageError("no aml repository at %s (expected %s)"
                         % (repo, root / REPO_DIR_NAME / "snapshots"))
    view = _RepoView(manager, root, repo, remote=False)
    yield manager if view.repo.resolve() == manager.repo.resolve() else view


# -- Looking into a repository: ls, diff, dump, stats ------------------------

@dataclasses.dataclass
class SnapshotFile:
    """One file of a snapshot as ``backup ls`` shows it."""

    path: str
    kind: str                 # records (a JSON array), object, ..., or bytes
    gzip: Optional[bool]      # for record files: stored as gzip (None: kept as exact bytes)
    records: Optional[int]
    size: int                 # bytes of the file as it was on disk
    sha256: str


@dataclasses.dataclass
class LsResult(OperationResult):
    """The files of one snapshot."""

    backup_id: str
    type: Optional[str]
    created: Optional[str]
    files: List[SnapshotFile]
    bytes: int
    records: int


def list_snapshot(manager: BackupManager, backup_id: str) -> LsResult:
    """The files, records and sizes a snapshot holds (from its manifest, which is checked);
    raises UsageError (unknown id) or IntegrityError."""
    manifest = manager.load_manifest(backup_id)
    files = []
    for entry in manifest["files"]:
        array = entry.get("kind") == "array"
        files.append(SnapshotFile(
            path=_entry_path(entry), kind="records" if array else str(entry.get("json", "bytes")),
            gzip=bool(entry.get("gzip")) if array else None,
            records=entry.get("count") if array else None, size=int(entry.get("size", 0)),
            sha256=str(entry.get("sha256"))))
    return LsResult(backup_id=backup_id, type=manifest.get("type"),
                    created=manifest.get("created"), files=files,
                    bytes=sum(f.size for f in files), records=sum(f.records or 0 for f in files))


@dataclasses.dataclass
class RecordChange:
    """A record present in both snapshots with other content, and the fields that differ
    (dotted paths into nested objects)."""

    id: str
    fields: List[str]


@dataclasses.dataclass
class FileDiff:
    """How one file differs: ``status`` added, removed, changed (records or fields differ)
    or rewritten (same records, other bytes: order, layout or gzip)."""

    path: str
    agent: str
    status: str
    added: List[str] = dataclasses.field(default_factory=list)
    removed: List[str] = dataclasses.field(default_factory=list)
    changed: List[RecordChange] = dataclasses.field(default_factory=list)
    fields: List[str] = dataclasses.field(default_factory=list)   # JSON object files


@dataclasses.dataclass
class DiffResult(OperationResult):
    """Every file that differs between snapshots ``a`` and ``b``, and record totals."""

    a: str
    b: str
    files: List[FileDiff]
    files_unchanged: int
    records_added: int
    records_removed: int
    records_changed: int


def diff_snapshots(manager: BackupManager, a: str, b: str) -> DiffResult:
    """Per agent and file: the records added, removed and changed (by id, with the changed
    fields) from snapshot ``a`` to ``b``. Only records whose bytes differ are read. Raises
    UsageError (unknown id) or IntegrityError (damaged data)."""
    old = {_entry_path(e): e for e in manager.load_manifest(a)["files"]}
    new = {_entry_path(e): e for e in manager.load_manifest(b)["files"]}
    result = DiffResult(a=a, b=b, files=[], files_unchanged=0, records_added=0,
                        records_removed=0, records_changed=0)
    with manager._repo_lock(exclusive=False):   # rotation waits until the reading is done
        reader = _RecordReader(_ObjectStore(manager.packs))
        for path in sorted(set(old) | set(new)):
            change = reader.diff_file(path, old.get(path), new.get(path))
            if change is None:
                result.files_unchanged += 1
                continue
            result.files.append(change)
            result.records_added += len(change.added)
            result.records_removed += len(change.removed)
            result.records_changed += len(change.changed)
    return result


class _RecordReader:
    """Reads single records (item objects) and whole files of a repository, checked."""

    def __init__(self, objects: _ObjectStore):
        self.objects = objects
        self.lists = _Lists(objects)

    def items(self, entry: Optional[Dict[str, Any]]) -> List[bytes]:
        """The record digests of an array entry, in order ([] for none)."""
        if entry is None:
            return []
        digests = _entry_objects(entry, self.lists)
        return digests[len(digests) - entry["count"]:] if entry["count"] else []

    def records(self, digests: Iterable[bytes]) -> Dict[str, Any]:
        """{record key: parsed record}: the key is the id, else ``sha256:<12 hex>``."""
        out: Dict[str, Any] = {}
        for digest in digests:
            record = _parse_record(self.objects.get(digest))
            key = _record_key(record, digest)
            n = 2
            while key in out:   # the same id twice in one file: keep both apart
                key, n = "%s#%d" % (_record_key(record, digest), n), n + 1
            out[key] = record
        return out

    def diff_file(self, path: str, old: Optional[Dict[str, Any]],
                  new: Optional[Dict[str, Any]]) -> Optional[FileDiff]:
        """How one file changed, or None if its bytes are the same."""
        if old is not None and new is not None and old.get("sha256") == new.get("sha256"):
            return None
        status = "added" if old is None else "removed" if new is None else "changed"
        change = FileDiff(path=path, agent=path.split("/", 1)[0] if "/" in path else "",
                          status=status)
        if all(e is None or e.get("kind") == "array" for e in (old, new)):
            self._diff_records(change, self.items(old), self.items(new))
        elif old is not None and new is not None:
            change.fields = _changed_fields(self._json(old), self._json(new))
        if status == "changed" and not (change.added or change.removed or change.changed
                                        or change.fields):
            change.status = "rewritten"
        return change

    def _diff_records(self, change: FileDiff, old: List[bytes], new: List[bytes]) -> None:
        before, after = set(old), set(new)
        gone = self.records(d for d in dict.fromkeys(old) if d not in after)
        came = self.records(d for d in dict.fromkeys(new) if d not in before)
        change.removed = [k for k in gone if k not in came]
        change.added = [k for k in came if k not in gone]
        change.changed = [RecordChange(k, _changed_fields(gone[k], came[k]))
                          for k in gone if k in came]

    def _json(self, entry: Dict[str, Any]) -> Any:
        content = read_file_content(entry, self.objects, self.lists)
        try:
            return parse_json_text(decode_file_bytes(Path(_entry_path(entry)), content)[0])
        except (CorruptFileError, ValueError, RecursionError):
            return content   # bytes: compared whole


def _parse_record(data: bytes) -> Any:
    try:
        return parse_json_text(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return data


def _record_key(record: Any, digest: bytes) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, str) and rid or isinstance(rid, int) and not isinstance(rid, bool):
        return str(rid)
    return "sha256:" + digest.hex()[:12]


def _changed_fields(old: Any, new: Any, prefix: str = "") -> List[str]:
    """Dotted paths of the fields that differ between two JSON values."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        same = old == new and type(old) is type(new)
        return [] if same else [prefix[:-1] or "(whole value)"]
    out: List[str] = []
    for key in sorted(set(old) | set(new), key=str):
        if key not in old or key not in new:
            out.append(prefix + str(key))
        elif old[key] != new[key] or type(old[key]) is not type(new[key]):
            out.extend(_changed_fields(old[key], new[key], prefix + str(key) + "."))
    return out


@dataclasses.dataclass
class DumpResult:
    """One file (or one record) of a snapshot: ``data`` is the bytes; ``exact`` says they are
    the bytes the file (record) had on disk (False: a gzip file re-compressed, content equal)."""

    backup_id: str
    path: str
    data: bytes
    exact: bool
    record_id: Optional[str] = None
    position: Optional[int] = None


def _snapshot_entry(manager: BackupManager, backup_id: str, path: str) -> Dict[str, Any]:
    wanted = path[2:] if path.startswith("./") else path
    for entry in manager.load_manifest(backup_id)["files"]:
        if _entry_path(entry) == wanted:
            return entry
    raise UsageError("backup %s has no file %r (see: backup ls %s)" % (backup_id, path, backup_id))


def dump_file(manager: BackupManager, backup_id: str, path: str) -> DumpResult:
    """The bytes a restore would write for one file, rebuilt and checked against its
    recorded SHA-256. Raises UsageError (unknown id or file), IntegrityError."""
    entry = _snapshot_entry(manager, backup_id, path)
    try:
        with manager._repo_lock(exclusive=False):
            content = read_file_content(entry, _ObjectStore(manager.packs))
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError("backup %s: %s: %s" % (backup_id, path, exc)) from None
    data = encode_restored(entry, content)
    return DumpResult(backup_id=backup_id, path=_entry_path(entry), data=data,
                      exact=sha256_hex(data) == entry.get("sha256"))


def dump_record(manager: BackupManager, backup_id: str, record_id: str,
                path: Optional[str] = None) -> List[DumpResult]:
    """Every record with this id (in ``path``, else in any file) exactly as stored (its JSON
    text in the file), each checked. Raises UsageError, AmlError (no such record)."""
    if path is not None:
        entries = [_snapshot_entry(manager, backup_id, path)]
        if entries[0].get("kind") != "array":
            raise UsageError("%s in backup %s holds no records" % (path, backup_id))
    else:
        entries = [e for e in manager.load_manifest(backup_id)["files"]
                   if e.get("kind") == "array"]
    with manager._repo_lock(exclusive=False):
        found = _find_records(_RecordReader(_ObjectStore(manager.packs)), backup_id,
                              entries, record_id)
    if not found:
        raise AmlError("no record %r in backup %s%s"
                       % (record_id, backup_id, " file %s" % path if path else ""))
    return found


def _find_records(reader: _RecordReader, backup_id: str, entries: List[Dict[str, Any]],
                  record_id: str) -> List[DumpResult]:
    needle = json.dumps(record_id)[1:-1].encode("utf-8")
    found = []
    for entry in entries:
        digests = reader.items(entry)
        for position, (digest, data) in enumerate(
                zip(digests, reader.objects.get_unchecked(digests))):
            if needle in data and _record_key(_parse_record(data), digest) == record_id:
                if hashlib.sha256(data).digest() != digest:
                    raise IntegrityError("backup %s: %s: record %s: checksum mismatch"
                                         % (backup_id, _entry_path(entry), record_id))
                found.append(DumpResult(backup_id=backup_id, path=_entry_path(entry),
                                        data=bytes(data), exact=True, record_id=record_id,
                                        position=position))
    return found


@dataclasses.dataclass
class SnapshotStats:
    """One snapshot's size as restored and what it added to the repository: the objects
    no older snapshot uses, their bytes before compression, and its manifest."""

    backup_id: str
    created: Optional[str]
    files: int
    records: int
    logical_bytes: int
    new_objects: int
    added_bytes: int
    manifest_bytes: int


@dataclasses.dataclass
class StatsResult(OperationResult):
    """Sizes of a repository: on disk, as restored, deduplicated; and per snapshot."""

    repository: Path
    snapshots: List[SnapshotStats]
    repository_bytes: int       # every file of the repository on disk
    pack_bytes: int             # packs and their indexes
    manifest_bytes: int
    packs: int
    logical_bytes: int          # all snapshots as restored (record files decompressed)
    unique_objects: int         # objects the snapshots use
    unique_bytes: int           # ... their bytes before compression
    unreferenced_objects: int   # objects no snapshot uses (rotate frees them)
    unreferenced_bytes: int
    dedup_ratio: Optional[float]         # logical_bytes / unique_bytes
    compression_ratio: Optional[float]   # stored object bytes / pack_bytes
    problems: List[str] = dataclasses.field(default_factory=list)


def _object_length(objects: _ObjectStore, digest: bytes) -> int:
    return objects._spot(digest)[3]


def _logical_size(entry: Dict[str, Any], items: List[bytes], objects: _ObjectStore) -> int:
    if entry["kind"] != "array":
        return int(entry.get("size", 0))
    text = len(entry["head"].encode("utf-8")) + len(entry["tail"].encode("utf-8"))
    return (text + len(UTF8_BOM if entry.get("bom") else b"")
            + len(entry["sep"].encode("utf-8")) * max(len(items) - 1, 0)
            + sum(_object_length(objects, d) for d in items))


def repository_stats(manager: BackupManager) -> StatsResult:
    """Measure the repository: bytes on disk, as restored, deduplicated, and what each
    snapshot (oldest first) added. Damaged parts are in ``problems``."""
    with manager._repo_lock(exclusive=False):   # rotation waits until the counting is done
        objects = _ObjectStore(manager.packs)
        lists, seen, rows = _Lists(objects), set(), []
        problems = list(objects.problems)
        for backup_id in manager.snapshot_ids():
            try:
                manifest = manager.load_manifest(backup_id)
                rows.append(_snapshot_stats(manager, backup_id, manifest, objects, lists, seen))
            except _BAD_ENTRY as exc:
                problems.append("%s: %s" % (backup_id, exc))
        files = [p for p in manager.repo.rglob("*") if p.is_file()] \
            if manager.repo.is_dir() else []
        size = {p: p.stat().st_size for p in files}
        pack_bytes = sum(n for p, n in size.items() if p.parent == manager.packs)
        all_bytes = sum(_object_length(objects, k) for k in objects.where)
        unique = sum(r.added_bytes for r in rows)
        logical = sum(r.logical_bytes for r in rows)
        return StatsResult(
            repository=manager.repo, snapshots=rows, repository_bytes=sum(size.values()),
            pack_bytes=pack_bytes, manifest_bytes=sum(r.manifest_bytes for r in rows),
            packs=len(objects.pack_list), logical_bytes=logical, unique_objects=len(seen),
            unique_bytes=unique, unreferenced_objects=max(len(objects.where) - len(seen), 0),
            unreferenced_bytes=max(all_bytes - unique, 0),
            dedup_ratio=round(logical / unique, 2) if unique else None,
            compression_ratio=round(all_bytes / pack_bytes, 2) if pack_bytes else None,
            problems=problems)


def _snapshot_stats(manager: BackupManager, backup_id: str, manifest: Dict[str, Any],
                    objects: _ObjectStore, lists: _Lists, seen: Set[bytes]) -> SnapshotStats:
    row = SnapshotStats(backup_id=backup_id, created=manifest.get("created"),
                        files=len(manifest["files"]), records=0, logical_bytes=0,
                        new_objects=0, added_bytes=0,
                        manifest_bytes=manager.manifest_path(backup_id).stat().st_size)
    for entry in manifest["files"]:
        digests = _entry_objects(entry, lists)
        items = digests[len(digests) - entry["count"]:] if entry["kind"] == "array" \
            and entry["count"] else ([] if entry["kind"] == "array" else digests)
        row.records += entry.get("count", 0)
        row.logical_bytes += _logical_size(entry, items, objects)
        for digest in digests:
            key = digest[:KEY_LEN]
            if key not in seen:
                seen.add(key)
                row.new_objects += 1
                row.added_bytes += _object_length(objects, digest)
    return row

__all__ += ["BackupType", "BackupConfig", "BackupManager", "BackupResult", "SnapshotInfo",
            "ListResult", "VerifyResult", "RestoreResult", "RotateResult", "AutoResult",
            "safety_backup", "backup_config_for", "safe_relpath", "BackupPlan", "plan_backup",
            "CopyResult", "copy_backups", "open_repository", "LsResult", "SnapshotFile",
            "list_snapshot", "DiffResult", "FileDiff", "RecordChange", "diff_snapshots",
            "DumpResult", "dump_file", "dump_record", "StatsResult", "SnapshotStats",
            "repository_stats", "KEEP_RULES"]


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
_BLOOM_FORMAT = "aml-bloom-1"   # sealed header and bits; older files end in a SHA-256 trailer
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
        return all(bits[pos >> 3] & (1 << (pos & 7))
                   for pos in self._digest_positions(bloom_digest(key)))

    def __len__(self) -> int:
        return self.count

    @property
    def size_bytes(self) -> int:
        """Bytes of the bit array."""
        return len(self.bits)

    def to_bytes(self) -> bytes:
        """The persisted form: header and bit array, sealed (see seal)."""
        body = _BLOOM_HEADER.pack(_BLOOM_MAGIC, _BLOOM_VERSION, self.m, self.k, self.count)
        return seal(body + bytes(self.bits), _BLOOM_FORMAT)

    @classmethod
    def from_bytes(cls, data: bytes) -> "BloomFilter":
        """Rebuild from ``to_bytes`` output (or the older layout: header, bits, SHA-256 of both);
        raises IntegrityError if it does not verify."""
        head = _BLOOM_HEADER.size
        if is_sealed(data):
            data = unseal(data, _BLOOM_FORMAT, "bloom filter", "bloom filter", parse=False)
        elif len(data) < head + 32 or hashlib.sha256(data[:-32]).digest() != data[-32:]:
            raise ChecksumError("bloom filter: checksum mismatch or truncated")
        else:
            data = data[:-32]
        if len(data) < head:
            raise IntegrityError("bloom filter: unknown format")
        magic, version, m, k, count = _BLOOM_HEADER.unpack_from(data)
        size_ok = len(data) - head == (m + 7) // 8
        if magic != _BLOOM_MAGIC or version != _BLOOM_VERSION or not size_ok:
            raise IntegrityError("bloom filter: unknown format")
        bloom = cls.__new__(cls)
        bloom.m, bloom.k, bloom.count = m, k, count
        # k = m/n ln 2 and p = 2^-k at capacity, so both follow from the header.
        bloom.capacity = max(1, int(round(m * math.log(2) / max(k, 1))))
        bloom.fp_rate = 0.5 ** k
        bloom.bits = bytearray(data[head:])
        return bloom


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
        self.bytes -= self._items.pop(key, (None, 0))[1]

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
# never verifies. manifest.json (and hot.json) are sealed state files and bloom.bin is sealed;
# postings.dat, keys.dat, ids.bin, hot.dat and hot.bin keep their own layout: a lookup reads one
# byte range of them (a bucket, a file's postings, a record) and checks that range's SHA-256
# from the manifest, so a whole-file envelope would mean reading the whole file per lookup.
INDEX_FORMAT = "aml-index-2"  # 2: id rows carry the record's text offset
_IDS_MAGIC = b"AMLI"
_IDS_HEADER = struct.Struct(">4sBI")
# bloom_digest(id), file slot, array position, offset of the record in the file's JSON text
# (characters, after gzip and UTF-8 decoding), so get parses one record, not the file.
_ID_ROW = struct.Struct(">16sIIQ")
_BUCKET_COUNTS = struct.Struct(">%dI" % 256)  # heads each file's keys in keys.dat
_PARALLEL_BYTES = 8 * 1024 * 1024  # below this, forking workers costs more than it saves
_ID_BUCKETS = 256                  # by the digest's first byte; one bucket is read per lookup
DEFAULT_CACHE_BYTES = 10 * 1024 * 1024
DEFAULT_BLOOM_FP_RATE = 0.01

# One posting row per record, a compact JSON array in postings.dat.
P_ID, P_POS, P_CONF, P_SR, P_EXEC, P_LAST, P_ACTIVE, P_TAGS = range(8)


def posting_row(record: Any, position: int) -> List[Any]:
    """The facts the index keeps for one record (see P_* for the layout); never raises.

    Reads the same values as record_facts (usage_fields), the raw last-activity value kept
    as stored (last used, else created, else the record timestamp).
    """
    if not isinstance(record, dict):
        return [None, position, None, None, None, None, True, []]
    conf, rate, count, last, created = usage_fields(record)
    get = record.get
    last = last or created or get("timestamp")
    rid, active, tags = get("id"), get("active"), get("tags")
    kind = type(last)  # below: record_id, _is_active and _tags inlined (once per record)
    return [rid if type(rid) is str and rid else None, position, _number(conf),
            _number(rate), _number(count),
            last if kind is str or kind is int or kind is float else None,
            active if type(active) is bool else _is_active(record),
            list(filter(_is_str, tags)) if type(tags) is list else []]


# Record offsets are kept only for files of at least this many characters: parsing element by
# element costs about 30 % more than one json.loads (measured), which pays off only where
# parsing the whole file for one get would cost more (a 4 MB file parses in about 30 ms).
_OFFSET_MIN_CHARS = 4 * 1024 * 1024
_NO_OFFSET = 2 ** 64 - 1  # in an id row: parse the whole (small) file
_BYTE_OFFSET = 1 << 62    # flag in an id row: the offset is a byte offset in the file as stored


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
    raw = read_regular_file(path)
    text, _ = decode_file_bytes(path, raw)
    try:
        if len(text) < _OFFSET_MIN_CHARS:
            records = parse_json_text(text)
            if isinstance(records, list):
                return records, None
        else:
            try:
                records, offsets, _ = scan_json_array(text)
            except RecursionError:
                raise ValueError("nested too deeply") from None
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
    offset) sorted, hence grouped by bucket (the digest's first byte), after a header of the
    256 bucket row counts, so building the id table is a concatenation. Raises
    CorruptFileError for an unreadable file.
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


def _ticked(value: Any, tick: Callable[[int, int], None], done: int, total: int) -> Any:
    tick(done, total)
    return value


# What forked workers call: set before the pool forks, so each worker inherits it as it was
# (a bound method, its object and all) and only the jobs and results cross a pipe.
_FORKED: Dict[int, Callable[..., Any]] = {}


def _call_forked(key: int, *job: Any) -> Any:
    return _FORKED[key](*job)


def _forkable() -> bool:
    """Whether workers can find aml's functions and classes by name: not when the file runs
    through exec (as cProfile runs a script), whose ``__main__`` is another module."""
    return getattr(sys.modules.get(__name__), "_call_forked", None) is _call_forked


def parallel_map(func: Callable[..., Any], jobs: List[Tuple[Any, ...]], workers: int = 0,
                 threads: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None) -> List[Any]:
    """``func(*job)`` for every job, in order; in forked worker processes when more than one.

    ``threads`` uses a thread pool instead (for work that releases the GIL, like zlib and
    file I/O). Exceptions in a worker propagate to the caller. ``func`` may be any callable;
    in worker processes, jobs and results must pickle.
    """
    count = worker_count(workers, len(jobs))
    tick = progress or (lambda done, total: None)
    if count <= 1 or not (threads or _forkable()):
        return [_ticked(func(*job), tick, n, len(jobs)) for n, job in enumerate(jobs, 1)]
    if threads:
        pool: Any = concurrent.futures.ThreadPoolExecutor(count)
        call, lead = func, ()
    else:
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(
            count, mp_context=multiprocessing.get_context("fork"))
        call, lead = _call_forked, (id(func),)
        _FORKED[id(func)] = func
    try:
        futures = [pool.submit(call, *lead, *job) for job in jobs]
        return [_ticked(f.result(), tick, n, len(jobs)) for n, f in enumerate(futures, 1)]
    finally:
        # On an error or SIGTERM, jobs not started yet are dropped; running ones finish
        # (each is atomic), so the run stops promptly without a half-written file.
        pool.shutdown(wait=True, cancel_futures=True)
        _FORKED.pop(id(func), None)


def map_files(func: Callable[[DataFile], Any], files: List[DataFile],
              progress: ProgressCallback, phase: str) -> List[Any]:
    """``func(file)`` for every file, results in the files' order. Largest files go first,
    in one worker process per core once the files add up to _PARALLEL_BYTES; progress
    is reported in bytes."""
    sizes = [_file_size(f) for f in files]
    order = sorted(range(len(files)), key=lambda i: -sizes[i])
    reached = [0, *itertools.accumulate(sizes[i] for i in order)]  # bytes after n files
    progress(phase, 0, reached[-1], "B")
    done = parallel_map(func, [(files[i],) for i in order],
                        1 if reached[-1] < _PARALLEL_BYTES else 0,
                        progress=lambda n, _: progress(phase, reached[n], reached[-1], "B"))
    return [result for _, result in sorted(zip(order, done), key=operator.itemgetter(0))]


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

    def record_matches(self, record: Any, position: int) -> bool:
        """True if the record at this position of its file passes every filter (a scan)."""
        return self.row_matches(posting_row(record, position)) and self.text_matches(record)

    def text_matches(self, record: Any) -> bool:
        """True if every word of ``text`` occurs (case-insensitively) in the record's strings."""
        if not self.text:
            return True
        haystack = "\n".join(_strings_of(record)).lower()
        return all(word in haystack for word in self.text.lower().split())


def _strings_of(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
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
class LookupResult(OperationResult):
    """What get and search return; ``not_found`` is set for an unknown id or agent."""

    records: List[FoundRecord]
    source: str
    message: Optional[str] = None
    not_found: bool = False
    unreadable: List[str] = dataclasses.field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def failure(self) -> Optional[ExitCode]:
        """FAILURE when not found, unless an unreadable file may hold it (then PARTIAL)."""
        return ExitCode.FAILURE if self.not_found and not self.unreadable else None

    @property
    def count(self) -> int:
        """Number of records returned."""
        return len(self.records)


@dataclasses.dataclass
class IndexResult(OperationResult):
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
            try:  # a symlink, folder or FIFO is listed too: indexing reports it as unreadable
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


def _file_range(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of a file from ``offset`` (fewer at its end); raises OSError."""
    with open(str(path), "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def _check_unchanged(info: os.stat_result, entry: Dict[str, Any], name: Any) -> None:
    """IntegrityError when a file's stat differs from the size and mtime it was indexed with."""
    if (info.st_size, info.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
        raise IntegrityError("%s changed since it was indexed" % name)


def _read_unchanged(path: Path, entry: Dict[str, Any], read: Callable[[Any], Any]) -> Any:
    """``read(handle)`` of an indexed file, checked unchanged by fstat of the open file;
    IntegrityError if it changed, CorruptFileError if it cannot be read."""
    try:
        with open(str(path), "rb") as handle:
            value = read(handle)
            info = os.fstat(handle.fileno())
    except OSError as exc:
        raise CorruptFileError(path, "cannot read (%s)" % (exc.strerror or exc)) from None
    _check_unchanged(info, entry, path)
    return value


def _decode_at(text: str, offset: int, name: Any) -> Any:
    """The JSON value at a character offset of ``text``; IntegrityError if there is none."""
    try:
        return _STRICT_DECODER.raw_decode(text, offset)[0]
    except ValueError:
        raise IntegrityError("%s: no record at offset %d" % (name, offset)) from None


class _IdTable:
    """A file of fixed-size rows, each starting with bloom_digest(id), stored bucket after
    bucket (the digest's first byte) after ``header`` bytes. Its owner keeps a [first row,
    rows, SHA-256] span per bucket (the index manifest for ids.bin, hot.json for hot.bin), so
    a lookup reads and verifies one bucket: the one bucketed id table of the index and cache.
    """

    def __init__(self, path: Path, row: struct.Struct, header: int = 0):
        self.path, self.row, self.header = path, row, header

    def bucket(self, span: Sequence[Any]) -> Optional[bytes]:
        """One bucket's rows, or None when they do not match its SHA-256; raises OSError."""
        start, count, digest_sha = span
        size = self.row.size
        chunk = _file_range(self.path, self.header + start * size, count * size)
        return chunk if sha256_hex(chunk) == digest_sha else None

    def find(self, chunk: bytes, digest: bytes) -> List[Tuple[Any, ...]]:
        """The unpacked rows of a bucket's bytes that start with ``digest``, in table order."""
        size, found, at = self.row.size, [], chunk.find(digest)
        while at >= 0:
            if at % size == 0:  # a match must start a row, not straddle two
                found.append(self.row.unpack_from(chunk, at))
            at = chunk.find(digest, at + 1)
        return found

    @staticmethod
    def spans(chunks: List[bytes], row_size: int) -> List[List[Any]]:
        """The [first row, rows, SHA-256] of each bucket of a table written as ``chunks``."""
        spans, start = [], 0
        for chunk in chunks:
            spans.append([start, len(chunk) // row_size, sha256_hex(chunk)])
            start += len(chunk) // row_size
        return spans


class MemoryIndex:
    """The persisted record index in ``.aml/index/``: id -> (file, position), postings, bloom.

    Tied to each record file's size and mtime: ``refresh`` re-reads only files that changed
    and rebuilds from scratch when any part fails its checksum. Callers that write (refresh,
    warm) hold the store's maintenance lock. Lookups never trust a part that does not verify:
    they raise IntegrityError and the caller falls back to a scan.
    """

    def __init__(self, store: StoreLike, fp_rate: float = DEFAULT_BLOOM_FP_RATE):
        self.store = store = as_store(store, "MemoryIndex")
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
        return self._result(False, old is None, reason if old is None else
                            ("repaired" if rebuild else "refreshed"),
                            current, stale, self.manifest(), started, _problems(bad))

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
        free = itertools.count(max((e["slot"] for e in old_files.values()), default=-1) + 1)
        return {f.path: old_files[f.path]["slot"] if f.path in old_files else next(free)
                for f in todo}

    def _parse_files(self, todo: List[_FileStat], slots: Dict[str, int]) -> List[Tuple[Any, str]]:
        """index_file_part for each file; in one worker process per core for big batches."""
        jobs = [(str(self.store.root / f.path), slots[f.path]) for f in todo]
        small = sum(f.size for f in todo) < _PARALLEL_BYTES
        progress = lambda n, total: self.store.progress("index: reading files", n, total,  # noqa
                                                         "files")
        return parallel_map(_index_file_safe, jobs, 1 if small else 0, progress=progress)

    def _old_part(self, entry: Dict[str, Any]) -> Optional[Tuple[bytes, bytes, int]]:
        try:
            blob = _file_range(self.part("postings.dat"), entry["offset"], entry["length"])
            keys = _file_range(self.part("keys.dat"), entry["keys_offset"], entry["keys_length"])
        except (OSError, KeyError):
            return None
        if sha256_hex(blob) != entry["sha256"] or sha256_hex(keys) != entry["keys_sha256"]:
            return None
        return blob, keys, entry["records"]

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
        chunks = []
        for bucket in range(_ID_BUCKETS):
            pieces = []
            for i, keys in enumerate(file_keys):
                end = cursors[i] + heads[i][bucket] * _ID_ROW.size
                pieces.append(keys[cursors[i]:end])
                cursors[i] = end
            chunks.append(b"".join(pieces))
        buckets = _IdTable.spans(chunks, _ID_ROW.size)
        body = b"".join(chunks)
        count = len(body) // _ID_ROW.size
        atomic_write_bytes(self.part("ids.bin"), _IDS_HEADER.pack(_IDS_MAGIC, 1, count) + body,
                           mode=0o600)
        return {"count": count, "buckets": buckets}, body

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
        table = _IdTable(self.part("ids.bin"), _ID_ROW, _IDS_HEADER.size)
        chunk = table.bucket(manifest["ids"]["buckets"][digest[0]])
        if chunk is None:
            raise IntegrityError("%s: id table bucket %d does not verify"
                                 % (self.folder, digest[0]))
        slots = {e["slot"]: e for e in manifest["files"]}
        return [(slots[slot], position, None if offset == _NO_OFFSET else offset)
                for _, slot, position, offset in table.find(chunk, digest)]

    def postings(self, entry: Dict[str, Any]) -> List[List[Any]]:
        """The posting rows of one indexed file (read by seek); raises IntegrityError."""
        blob = _file_range(self.part("postings.dat"), entry["offset"], entry["length"])
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
        return _read_unchanged(path, entry, lambda handle: (
            _value_at(path, handle, offset - _BYTE_OFFSET) if offset & _BYTE_OFFSET
            else _decode_at(decode_file_bytes(path, handle.read())[0], offset, path)))

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
            _check_unchanged(path.stat(), entry, path)
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
class WarmResult(OperationResult):
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
    unreadable: List[str] = dataclasses.field(default_factory=list)  # files left out, why


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

    def __init__(self, index: Union[MemoryIndex, StoreLike]):
        self.index = index if isinstance(index, MemoryIndex) else MemoryIndex(
            as_store(index, "HotCache"))
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

    def _table(self) -> _IdTable:
        return _IdTable(self.index.part("hot.bin"), _HOT_ROW)

    def _bucket(self, number: int) -> bytes:
        span = self._load()["buckets"][number]
        try:
            return self._table().bucket(span) or b""
        except OSError:
            return b""

    def fetch(self, record_id: Optional[str], entry: Dict[str, Any], position: int) -> Any:
        """The hot record for this id at this (fresh) location, or None (a miss)."""
        if not record_id:
            return None
        digest = bloom_digest(record_id)
        rows = self._table().find(self._bucket(digest[0]), digest)
        if not rows:
            return None
        _, slot, pos, size, mtime_ns, offset, length, sha = rows[0]
        if (slot, pos, size, mtime_ns) != (entry["slot"], position, entry["size"],
                                           entry["mtime_ns"]):
            return None
        return self._record(offset, length, sha)

    def _record(self, offset: int, length: int, sha: bytes) -> Any:
        try:
            blob = _file_range(self.index.part("hot.dat"), offset, length)
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
        chunks = [b"".join(rows) for rows in by_bucket]
        buckets = _IdTable.spans(chunks, _HOT_ROW.size)
        atomic_write_bytes(self.index.part("hot.dat"), b"".join(b for _, _, b in chosen),
                           mode=0o600)
        atomic_write_bytes(self.index.part("hot.bin"), b"".join(chunks), mode=0o600)
        write_checksummed(self.index.part("hot.json"),
                          {"built": format_timestamp(now), "budget": max_bytes, "bytes": offset,
                           "records": len(chosen), "buckets": buckets})
        self._doc = None


def hot_cache_stats(store: Store) -> Dict[str, Any]:
    """Hot-cache hits and misses counted from real get/search lookups (zeros when none yet)."""
    stats = None
    if store.state_dir.is_dir():
        stats = store.read_state_lenient("cache-stats.json", None)
    return stats if isinstance(stats, dict) else {"hits": 0, "misses": 0}


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
    index = MemoryIndex(store)
    lock = MaintenanceLock(store.state_dir, timeout=0)
    try:
        held = lock.try_acquire()
    except ReadOnlyError:
        store._note_unsaved("index refresh and hot-cache counters")
        held = False
    if not held:
        usable = index.manifest() is not None and (not refresh or not index.stale_files())
        yield (index if usable else None), False
        return
    try:
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
                                 lambda: _scanned(store, lambda rec, _: _id_key(rec) == record_id))
        if writable:
            _count_cache(store, result)
    if not result.records:
        result.not_found = True
        result.message = "no record with id %r in %s" % (record_id, store.root)
        if result.unreadable:  # it may be in a file that could not be read: not a "no"
            result.message = ("no record with id %r in the readable files of %s; it may be in "
                              "the %d unreadable file(s) named above"
                              % (record_id, store.root, len(result.unreadable)))
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


def _id_key(record: Any) -> Optional[str]:
    """A record's id when it is a string (even empty), else None; identical records share it,
    so it narrows content comparisons."""
    rid = record.get("id") if isinstance(record, dict) else None
    return rid if isinstance(rid, str) else None


def _found(entry: Dict[str, Any], position: int, record: Any, source: str) -> FoundRecord:
    return FoundRecord(entry["agent"], entry["path"], entry["rtype"], position, _id_key(record),
                       record, source)


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
            _check_unchanged(os.stat(str(index.store.root / entry["path"])), entry, entry["path"])
        found = _fetch(index, hot, entry, record_id, position, result, offset)
        if found.id != record_id:
            raise IntegrityError("index points %s at a different record" % record_id)
        result.records.append(found)
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
                             lambda: _scanned(store, query.record_matches, query))
        if writable:
            _count_cache(store, result)
    return result


def _limit_reached(query: SearchQuery, result: LookupResult) -> bool:
    return query.limit is not None and len(result.records) >= query.limit


def _search_indexed(index: MemoryIndex, query: SearchQuery) -> LookupResult:
    result = LookupResult([], "index", unreadable=index.unreadable())
    hot = HotCache(index)
    for entry in index.files(query.agent, query.rtype):
        seen: Dict[str, Any] = {} if query.limit is not None else {"no offsets": True}
        for row in index.postings(entry):
            if _limit_reached(query, result):
                return result
            if query.row_matches(row):
                found = _search_fetch(index, hot, entry, row, result, seen)
                if query.text_matches(found.record):
                    result.records.append(found)
    return result


# Records a search reads by their own bytes from a plain ASCII file before it reads the
# file once (a filter most rows pass, like a rare --text, then costs one read, not many).
_SEARCH_READS = 16
# Candidates of one file a search with --limit fetches one by one before it parses the file
# whole (each costs an id-bucket read); a search without a limit parses every file it reads.
_SEARCH_ONE_BY_ONE = 4096


def _search_fetch(index: MemoryIndex, hot: HotCache, entry: Dict[str, Any], row: List[Any],
                  result: LookupResult, seen: Dict[str, Any]) -> FoundRecord:
    """One search candidate, parsing only it, as get does: from the hot cache, else at its
    offset in the id table (in a plain ASCII file the first few are read by their own bytes,
    after that and in any other file from the file's text, read and decoded once per search
    into ``seen``), else (a small file: no offsets; past _SEARCH_ONE_BY_ONE candidates, or
    no --limit) from the file parsed whole. ``seen`` is per file, in the order search reads."""
    record_id, position = row[P_ID], row[P_POS]
    offset = None
    seen["reads"] = seen.get("reads", 0) + 1
    if record_id and not seen.get("no offsets") and seen["reads"] <= _SEARCH_ONE_BY_ONE:
        offset = next((at for where, pos, at in index.locate_rows(record_id)
                       if where["slot"] == entry["slot"] and pos == position), None)
        seen["no offsets"] = offset is None
    if offset is None or (offset & _BYTE_OFFSET and seen["reads"] <= _SEARCH_READS):
        found = _fetch(index, hot, entry, record_id, position, result, offset)
    elif hot.fetch(record_id, entry, position) is not None:
        return _fetch(index, hot, entry, record_id, position, result)  # counts the hit
    else:
        result.cache_misses += 1
        if "text" not in seen:
            seen["text"], seen["bom"] = _indexed_text(index, entry)
        at = offset - _BYTE_OFFSET - seen["bom"] if offset & _BYTE_OFFSET else offset
        found = _found(entry, position, _decode_at(seen["text"], at, entry["path"]), "index")
    if offset is not None and found.id != record_id:
        raise IntegrityError("index points %s at a different record" % record_id)
    return found


def _indexed_text(index: MemoryIndex, entry: Dict[str, Any]) -> Tuple[str, int]:
    """(decoded JSON text, bytes of BOM before it) of an indexed file, if it is unchanged
    since indexing (IntegrityError if it changed, CorruptFileError if it cannot be read)."""
    path = index.store.root / entry["path"]
    raw = _read_unchanged(path, entry, lambda handle: handle.read())
    return decode_file_bytes(path, raw)[0], len(UTF8_BOM) if raw.startswith(UTF8_BOM) else 0


def _scanned(store: Store, matches: Callable[[Any, int], bool],
             query: SearchQuery = SearchQuery()) -> LookupResult:
    """A read-only scan: the records ``matches(record, position)`` takes, in the agent, type
    and limit of ``query`` (get: every file, no limit)."""
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
            if matches(record, position):
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
    result = HotCache(index).warm(max_bytes, store.now, dry_run)
    result.unreadable = index.unreadable()
    return result


__all__ += ["HotCache", "WarmResult", "warm_score", "hot_cache_stats", "get_record",
            "search_records", "warm_cache"]


# =============================================================================
# 11. Pruning
# Time, performance and space strategies; archive before removal; undo (of prune, gc and
# dedupe: undo needs dedupe's reasons and rebuilds its supersede map).
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


SCORINGS = ("mean", "wilson")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Pruning thresholds (SPEC 5). ``aggressive`` tightens to 60/120 days and a 0.30 floor."""

    pattern_max_age_days: float = number_setting(90)
    decision_max_age_days: float = number_setting(180)
    failed_pattern_max_age_days: float = number_setting(30)
    min_success_rate: float = number_setting(0.20, high=1)
    min_confidence_score: float = number_setting(0.15, high=1)
    min_execution_count: int = number_setting(3)
    agent_memory_limit: int = number_setting(80 * MIB)
    global_memory_limit: int = number_setting(800 * MIB)
    preserve_high_value: bool = flag_setting(True)
    high_value_threshold: float = number_setting(0.85, high=1)
    dry_run: bool = flag_setting(False)
    create_backup: bool = flag_setting(True)
    max_removal_share: float = number_setting(0.5, high=1)
    aggressive: bool = flag_setting(False)
    # "wilson": judge success rates by their 95 % interval
    scoring: str = choice_setting("mean", SCORINGS)

    def effective(self) -> "PruneConfig":
        """The thresholds actually applied: aggressive mode only ever tightens them."""
        if not self.aggressive:
            return self
        return dataclasses.replace(
            self,
            pattern_max_age_days=min(self.pattern_max_age_days, AGGRESSIVE_PATTERN_DAYS),
            decision_max_age_days=min(self.decision_max_age_days, AGGRESSIVE_DECISION_DAYS),
            min_success_rate=max(self.min_success_rate, AGGRESSIVE_SUCCESS_FLOOR))


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
    return layer_config(PruneConfig(), (
        ("%s (pruning)" % store.config_path(), store_prune_settings(store)),
        ("aml config [prune]", (aml_config or {}).get("prune", {})),
        ("command line", flags or {})))


# -- the value score ----------------------------------------------------------

def record_value(facts: RecordFacts, config: PruneConfig) -> float:
    """A documented 0..1 worth of a record; >= high_value_threshold is kept.

    Pattern: mean of its success rate (counted once executed min_execution_count times; with
    ``scoring="wilson"`` the lower bound of its 95 % Wilson interval) and its confidence; 0
    when neither is known. Solution: 0 if it did not work or is
    superseded, else 0.6 (worked) or 0.3 (unknown) plus 0.1 per verification, at most 1.
    Decision: 0 for a negative outcome, 0.9 if it would be repeated, 0.5 without an outcome.
    """
    if facts.rtype is RecordType.PATTERN:
        parts = [facts.confidence] if facts.confidence is not None else []
        if (facts.success_rate is not None
                and (facts.execution_count or 0) >= config.min_execution_count):
            parts.append(_rate_bounds(facts, config)[0])
        return _clamp(sum(parts) / len(parts)) if parts else 0.0
    if facts.rtype is RecordType.SOLUTION:
        if facts.worked is False or facts.superseded:
            return 0.0
        base = 0.6 if facts.worked else 0.3
        return _clamp(base + 0.1 * max(0.0, facts.verified_count or 0.0))
    return 0.0 if facts.negative_outcome else {True: 0.9, None: 0.5}[facts.would_repeat]


def _clamp(value: float) -> float:
    return max(0.0, min(1.0, value))


def _rate_bounds(facts: RecordFacts, config: PruneConfig) -> Tuple[float, float]:
    """(rate to rank and protect on, rate to prune on): the success rate twice, or with
    ``scoring="wilson"`` the lower and upper bounds of its 95 % Wilson interval."""
    rate = facts.success_rate if facts.success_rate is not None else 0.0
    evidence = success_evidence(facts) if config.scoring == "wilson" else None
    return wilson_interval(*evidence) if evidence is not None else (rate, rate)


def _wilson_details(facts: RecordFacts, config: PruneConfig) -> Dict[str, Any]:
    """The interval a wilson-scored verdict rests on, for the report."""
    evidence = success_evidence(facts) if config.scoring == "wilson" else None
    if evidence is None:
        return {}
    low, high = wilson_interval(*evidence)
    return {"successes": evidence[0], "trials": evidence[1], "wilson_low": round(low, 4),
            "wilson_high": round(high, 4)}


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
                           execution_count=_json_number(facts.execution_count),
                           **_wilson_details(facts, config))
            return PruneReason.FAILED_PATTERN_UNUSED, details
        if age > config.pattern_max_age_days:
            return PruneReason.UNUSED_TOO_LONG, _age_details(facts, now,
                                                              config.pattern_max_age_days)
    if facts.rtype is RecordType.DECISION and age > config.decision_max_age_days:
        return PruneReason.DECISION_TOO_OLD, _age_details(facts, now, config.decision_max_age_days)
    return None


def _json_number(value: Optional[float]) -> Any:
    """A number as the runtime writes it: integral ones (a count read as 1.0) as ints."""
    return int(value) if value is not None and float(value).is_integer() else value


def _is_failed_pattern(facts: RecordFacts, config: PruneConfig, runs: float = 1) -> bool:
    """Executed at least ``runs`` times and succeeding less often than min_success_rate."""
    return ((facts.execution_count or 0) >= runs and facts.success_rate is not None
            and _rate_bounds(facts, config)[1] < config.min_success_rate)


def performance_verdict(facts: RecordFacts, config: PruneConfig) -> Optional[Verdict]:
    """performance_based: failing patterns, low confidence, failed/outdated solutions, regrets."""
    if (facts.rtype is RecordType.PATTERN
            and _is_failed_pattern(facts, config, config.min_execution_count)):
        return PruneReason.LOW_SUCCESS_RATE, dict({
            "success_rate": facts.success_rate, "min_success_rate": config.min_success_rate,
            "execution_count": _json_number(facts.execution_count),
            "min_execution_count": config.min_execution_count}, **_wilson_details(facts, config))
    if facts.confidence is not None and facts.confidence < config.min_confidence_score:
        return PruneReason.LOW_CONFIDENCE, {"confidence": facts.confidence,
                                            "min_confidence_score": config.min_confidence_score}
    if facts.rtype is RecordType.SOLUTION and facts.worked is False:
        return PruneReason.FAILED_SOLUTION, {"worked": False}
    if facts.rtype is RecordType.SOLUTION and facts.superseded:
        return PruneReason.OUTDATED_SOLUTION, {"superseded": True}
    if facts.rtype is RecordType.DECISION and facts.negative_outcome:
        if facts.would_repeat is False:
            return PruneReason.NEGATIVE_OUTCOME, {"would_repeat": False}
        return PruneReason.NEGATIVE_OUTCOME, {"success_metrics_mean": facts.outcome_mean}
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
class PruneResult(OperationResult):
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
    unreadable: List[str] = dataclasses.field(default_factory=list)
    busy: List[str] = dataclasses.field(default_factory=list)
    findings: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: Optional[str] = None
    backup_id: Optional[str] = None
    archive: Optional[str] = None
    space_iterations: int = 0


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
    # 8 bytes a record: blake2b of its compact JSON in key order, to find a pick again after
    # the runtime changed the file. Not _canonical: this text is already made for the sizes
    # (a sorted one would serialise every record again), and a record whose keys were only
    # reordered is at worst not picked again this run: never a wrong record removed.
    marks: bytearray

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

    def __init__(self, store: StoreLike, config: Optional[PruneConfig] = None):
        self.store = store = as_store(store, "MemoryPruner")
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
        op = self.store.operation("prune")
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
        op.record(self._history_summary(run.result))
        return run.result

    def _apply(self, run: _Run) -> None:
        """Archive every file's planned removals (a part each), then rewrite the files."""
        todo = [p for p in run.plans if p.removals]
        if not todo:
            return
        if not run.parts:
            run.result.archive = str(Archive(self.store).begin(run.result.run_id, "prune"))
        for plan in with_progress(self.store.progress, "prune: archiving", todo):
            self._archive_file(run, plan)
        if any(r.reason is PruneReason.MEMORY_LIMIT_EXCEEDED
               for p in todo for r in p.removals.values()):
            run.result.space_iterations += 1
        for plan in with_progress(self.store.progress, "prune: rewriting", todo):
            if plan.removals:
                self._apply_file(run, plan)

    def _archive_file(self, run: _Run, plan: _FilePlan) -> None:
        """Write the archive part of one file's removals, from its current content."""
        try:
            records, digest = self.store.load_records_digest(plan.data_file)
        except CorruptFileError as exc:
            self._drop_file(run, plan, exc)
            return
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
                # changed since it was archived?
                if self._replan_file(run, plan, job.data, text_digest(job.text)):
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
        self._write_part(run, plan, [])  # drops its part
        if isinstance(exc, StoreBusyError):
            run.result.busy.append(str(exc))
        else:
            run.result.unreadable.append("%s: %s" % (plan.rel, getattr(exc, "problem", exc)))

    def _replan_file(self, run: _Run, plan: _FilePlan, fresh: List[Any], digest: str) -> bool:
        """If the runtime changed the file since planning, decide again from its fresh content
        (whose text has SHA-256 ``digest``), keeping the space_based picks that are still
        there (found by content digest); returns whether it did."""
        if digest == plan.digest:
            return False
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
        return True

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
        """Plan every readable file (map_files); only each file's compact plan is kept, and
        only that crosses back from a worker process."""
        files = [f for agent in agents for f in self.store.record_files(agent)]
        planned = map_files(functools.partial(self._plan_file, strategies=strategies,
                                              findings=result.findings is not None),
                            files, self.store.progress,
                            "prune: planning" if result.dry_run else "prune: scanning")
        plans = []
        for plan, findings in planned:
            if isinstance(plan, str):
                result.unreadable.append(plan)
                continue
            if result.findings is not None:
                result.findings.extend(findings)
            plans.append(plan)
        return plans

    def _plan_file(self, data_file: DataFile, strategies: List[PruneStrategy],
                   findings: bool) -> Tuple[Union[_FilePlan, str], List[Dict[str, Any]]]:
        """One file's plan and findings, or its "file: problem" line if it is unreadable."""
        plan = _FilePlan(data_file, data_file.path.relative_to(self.store.root).as_posix())
        try:
            records, plan.digest = self.store.load_records_digest(data_file)
        except CorruptFileError as exc:
            return "%s: %s" % (plan.rel, exc.problem), []
        found: Optional[List[Dict[str, Any]]] = [] if findings else None
        self._plan_content(plan, records, strategies, found)
        return plan, found or []

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
        self._replan_file(run, plan, records, digest)
        for i, removal in plan.removals.items():
            removal.id, removal.id_known = record_id(records[i]), True

    def _entries(self, plan: _FilePlan, records: List[Any]) -> List[Dict[str, Any]]:
        """Archive entries (contracts.md schema, the record kept once as its exact text)."""
        rtype = plan.data_file.rtype
        kept = copies_kept(records, plan.removals)
        return [{"agent": plan.data_file.agent, "file": plan.rel, "type": rtype.value,
                 "id": record_id(records[i]), "index": plan.positions[i],
                 "reason": removal.reason.value, "details": removal.details,
                 "copies_kept": kept[i], "record_text": archived_record_text(records[i])}
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
                "and thresholds, or pass --force" % (first_few(over, "agent", sep="; "),
                                                     100 * share))

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
    """Order-independent text of a record, to recognise the same content again: the one record
    identity of gc's duplicates, undo's copies and dedupe's exact matches (a record the
    runtime re-wrote with its keys in another order is still the same record). Backup keys
    records by their exact bytes instead (see _SnapshotBuilder._array_entry), prune's space
    picks by a short digest of their compact text (see _SpaceFacts.marks)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)


def copies_kept(records: List[Any], removed: Iterable[int]) -> Dict[int, int]:
    """{removed position: how many records with its exact content the file keeps}.

    Stored in each archive entry (``copies_kept``) so undo knows how many copies the file
    held once the removal was written (a gc duplicate keeps one, most removals none), and so
    tells a file the run rewrote from one a crash left untouched. Only records sharing an id
    with a removed one are serialised.
    """
    removed = set(removed)
    keys = {_id_key(records[i]) for i in removed}
    peers = [r for j, r in enumerate(records) if j not in removed and _id_key(r) in keys]
    shared = {_id_key(r) for r in peers}  # ids no kept record has need no serialising
    left: Dict[str, int] = collections.Counter(_canonical(r) for r in peers)
    return {i: left.get(_canonical(records[i]), 0) if _id_key(records[i]) in shared else 0
            for i in removed}


# -- undo -----------------------------------------------------------------------

@dataclasses.dataclass
class UndoResult(OperationResult):
    """What ``prune --undo`` put back, and what it could not (the run then stays not undone)."""

    run_id: str
    operation: str
    already_undone: Optional[str] = None
    restored: int = 0
    skipped: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    unreadable: List[str] = dataclasses.field(default_factory=list)
    busy: List[str] = dataclasses.field(default_factory=list)
    # {"file", "records", "why"} for every file whose records were not put back.
    not_restored: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    failed: Optional[ExitCode] = None  # the worst non-busy, non-unreadable failure seen
    # dedupe survivors whose original could not go back yet (changed or merged again since)
    blocked: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    PARTIAL_FIELDS = ("unreadable", "blocked")  # a run left not undone can be undone again
    failure = property(lambda self: self.failed, doc="The worst failure seen (``failed``).")


def _archived_file(store: Store, rel: Any) -> Path:
    """The data file an archive entry names, confined to ``<agent>/<record file>``."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (len(parts) != 2 or is_reserved_name(parts[0]) or parts[0] in ("", "..")
            or parts[1] not in RECORD_FILES):
        raise IntegrityError("archive entry names an unexpected file %r" % (rel,))
    return store.root / parts[0] / parts[1]


def undo_run(store: Store, run_id: str) -> UndoResult:
    """Return the files of an archived run (prune, gc, dedupe or any other) to their pre-run
    content.

    Per file and per distinct record content, the file must hold as many copies as it did
    before the run: the copies the run kept (``copies_kept`` of its last entry) plus the
    copies it archived. Only what is missing is inserted, at its original position, so an
    undo after a crash mid-run, or a second undo after a partial one, puts back exactly what
    the file lacks. Every archive part is verified before anything changes; then files are
    restored one at a time. A dedupe run's merged survivors are taken out first and their
    originals put back (``blocked`` lists clusters that must wait; see _unmerge_survivors).
    A file that is busy, unreadable, or cannot be written is listed in ``not_restored`` with
    why, and the run is marked undone only when nothing was left out or blocked.
    Raises UsageError (no such run), IntegrityError (corrupt archive), StoreBusyError.
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
        if not result.not_restored and not result.blocked:
            archive.mark_undone(run_id, store.now)
        if manifest.get("operation") == "dedupe":  # its merged records point nowhere now
            rebuild_supersede_map(store)
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
    """Insert what one file lacks of its archived records, lowest original index first."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with store.file_lock(path):
                if not path.exists():
                    write_json_file(path, [])
        with store.rewrite(path) as job:
            # Dedupe runs archive each survivor's pre-merge version: its merged version
            # leaves first, so the original goes back in its place (no-op for other runs).
            entries, unmerged = _unmerge_survivors(job.data, entries, result)
            job.changed = _insert_entries(job.data, entries, result) + unmerged > 0
        return
    except StoreBusyError as exc:
        result.busy.append(str(exc))
        why = str(exc)
    except CorruptFileError as exc:
        result.unreadable.append("%s: %s" % (rel, exc.problem))
        why = "unreadable: %s" % exc.problem
    except (IntegrityError, OSError) as exc:
        code = ExitCode.INTEGRITY if isinstance(exc, IntegrityError) else ExitCode.FAILURE
        result.failed = max(result.failed or code, code)
        why = str(exc) if isinstance(exc, IntegrityError) else _os_error_text(exc, path)
    result.not_restored.append({"file": rel, "records": len(entries), "why": why})


def _insert_entries(data: List[Any], entries: List[Dict[str, Any]], result: UndoResult) -> int:
    """Insert, per distinct content, the archived copies the file lacks (a multiset, so
    identical records and records sharing an id are each counted); returns how many."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for entry in entries:  # in part order: the last entry of a group is the run's last word
        groups.setdefault(_canonical(_entry_record(entry)), []).append(entry)
    keys = {_id_key(e["record"]) for e in entries}
    present = collections.Counter(_canonical(r) for r in data if _id_key(r) in keys)
    chosen = []
    for canon, group in groups.items():
        before = _copies_kept_of(group[-1]) + len(group)  # copies the file held before the run
        missing = max(0, min(len(group), before - present.get(canon, 0)))
        chosen.extend(group[:missing])
        result.skipped.extend({"file": e.get("file"), "id": e.get("id"), "index": e.get("index"),
                               "why": "present again"} for e in group[missing:])
    for entry in sorted(chosen, key=lambda e: e.get("index") or 0):
        data.insert(min(max(0, int(entry.get("index") or 0)), len(data)), entry["record"])
    result.restored += len(chosen)
    return len(chosen)


def _copies_kept_of(entry: Dict[str, Any]) -> int:
    """How many identical copies the run left in the file; entries archived before aml
    stored ``copies_kept`` only keep a copy when gc removed an exact duplicate."""
    kept = entry.get("copies_kept")
    if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 0:
        return kept
    return 1 if entry.get("reason") == "duplicate" else 0  # GcReason.DUPLICATE


def _unmerge_survivors(data: List[Any], entries: List[Dict[str, Any]], result: UndoResult
                       ) -> Tuple[List[Dict[str, Any]], int]:
    """Take each dedupe survivor's merged version out of ``data``; returns the entries still
    to insert and how many were taken out.

    A survivor entry (reason ``merge_survivor``) names the sha256 of the merged text aml
    wrote. Found: it leaves, and the original is inserted with the merged records. The
    original itself present (a crash before the rewrite): nothing to do. Anything else (the
    survivor changed since, or a later run merged it away): the original stays in the
    archive, the run stays not undone (``blocked``) and the undo can be rerun later.
    """
    keep, removed = [], 0
    for entry in entries:
        if entry.get("reason") != SURVIVOR_REASON:
            keep.append(entry)
            continue
        rid, wanted = entry.get("id"), (entry.get("details") or {}).get("merged_sha256")
        at = [i for i, r in enumerate(data) if isinstance(r, dict) and r.get("id") == rid]
        texts = {i: archived_record_text(data[i]) for i in at}
        merged = [i for i in at if sha256_hex(texts[i].encode("utf-8")) == wanted]
        if merged:
            del data[merged[0]]
            removed += 1
            keep.append(entry)
        elif any(_canonical(data[i]) == _canonical(_entry_record(entry)) for i in at):
            result.skipped.append({"file": entry.get("file"), "id": rid,
                                   "index": entry.get("index"), "why": "present again"})
        else:
            result.blocked.append({"file": entry.get("file"), "id": rid, "why": (
                "survivor changed since the merge; its original stays archived" if at else
                "survivor is gone (merged or removed by a later run: undo that run first)")})
    held = {b["id"] for b in result.blocked}  # its merged records wait with it
    for entry in [e for e in keep if (e.get("details") or {}).get("supersededBy") in held]:
        keep.remove(entry)
        result.blocked.append({"file": entry.get("file"), "id": entry.get("id"), "why":
                               "waits for its survivor %s" % entry["details"]["supersededBy"]})
    return keep, removed


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
            if count is None:  # an interrupted run: count its parts
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
            "copies_kept",
            "prune_config_for", "record_value", "is_protected", "time_verdict",
            "performance_verdict", "agent_disk_bytes", "store_disk_bytes"]


# -- what undo needs of dedupe: the reasons it archives under and the supersede map --

DEDUPE_REASON = "near_duplicate"
SURVIVOR_REASON = "merge_survivor"
SUPERSEDE_STATE = "superseded.json"


def rebuild_supersede_map(store: Store) -> int:
    """Rewrite ``.aml/superseded.json`` from the archives of dedupe runs not undone.

    Maps ``agent/type/id`` of every merged record to its final survivor (no chains: a record
    merged into a survivor that a later run merged points at the last one), its direct
    survivor and the run. Returns how many records point past their direct survivor. A
    run whose archive does not verify is left out (``prune --list-runs`` shows it).
    """
    archive, direct = Archive(store), {}
    for run_id in archive.runs():
        try:
            manifest = archive.manifest(run_id)
            if manifest.get("operation") != "dedupe" or manifest.get("undone"):
                continue
            entries = [e for n in archive.part_names(run_id)
                       for e in archive.read_part(run_id, n, records=False)]
        except IntegrityError:
            continue
        for entry in entries:
            if entry.get("reason") == DEDUPE_REASON:
                key = (entry["agent"], entry["type"], entry["id"])
                direct[key] = (entry["details"]["supersededBy"], run_id)
    flat, repointed = {}, 0
    for (agent, rtype, rid), (by, run_id) in sorted(direct.items()):
        final, seen = by, {rid}
        while (agent, rtype, final) in direct and final not in seen:
            seen.add(final)
            final = direct[(agent, rtype, final)][0]
        flat["%s/%s/%s" % (agent, rtype, rid)] = {"superseded_by": final, "merged_into": by,
                                                  "run": run_id}
        repointed += final != by
    store.write_state(SUPERSEDE_STATE, flat)
    return repointed


# =============================================================================
# 12. Compression and garbage collection
# In-place gzip of cold files, decompress, gc of broken and duplicate records; optimize().
# =============================================================================


@dataclasses.dataclass
class OptimizeConfig:
    """Settings of ``optimize`` (aml config file section ``optimize``; flags win)."""

    compress_age_days: float = number_setting(30.0)
    cache_max_bytes: int = number_setting(DEFAULT_CACHE_BYTES, low=1)
    workers: int = number_setting(0, integer=True)  # compress/decompress threads; 0 = 2 per core
    create_backup: bool = flag_setting(True)
    dedupe: bool = flag_setting(False)  # make dedupe (merging) a step of ``optimize all``
    # Jaccard of the knowledge shingles to call a near-duplicate
    dedupe_threshold: float = number_setting(0.85, high=1, above=True)


def optimize_config_for(store: Store, config_file: Optional[Path] = None,
                        **overrides: Any) -> OptimizeConfig:
    """OptimizeConfig from defaults < aml config section ``optimize`` < ``overrides`` (flags;
    None means unset). Raises UsageError naming the field and layer of a bad value."""
    section = load_aml_config(store, config_file).get("optimize", {})
    flags = {k: v for k, v in overrides.items() if v is not None}
    return layer_config(OptimizeConfig(), (("aml config [optimize]", section),
                                           ("command line", flags)))


@dataclasses.dataclass
class TranscodeResult(OperationResult):
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
    backup_id: Optional[str] = None  # the safety backup taken before the first change
    busy: List[str] = dataclasses.field(default_factory=list)  # locks held: left as they were

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
                   indexed: Optional[Tuple[int, int]] = None,
                   busy: Optional[Set[str]] = None) -> Tuple[Any, ...]:
    """Compress or decompress one file in place under its lock; runs in a worker thread.

    Returns (path, outcome, bytes before, bytes after, problem, (size, mtime_ns) before,
    (size, mtime_ns) after; both None unless done) with outcome ``done``,
    ``skipped`` (already in the wanted form), ``changed`` (modified meanwhile), ``busy``
    (its lock stayed held; ``busy`` is the run's set of such locks) or ``unreadable``. The
    file's mtime is kept so ``--age-days`` stays meaningful.
    ``indexed`` is the (size, mtime_ns) at which the index parsed the file successfully;
    if the file still matches, it is not parsed again.
    """
    path = Path(path_text)
    lock = FileLock(path, timeout=lock_timeout, busy=busy)
    try:
        lock.acquire()
    except StoreBusyError as exc:  # left as it was; the other files go on
        return path_text, "busy", 0, 0, str(exc), None, None
    try:
        return _transcode_locked(path, to_gzip, dry_run, indexed)
    finally:
        lock.release()


def _transcode_locked(path: Path, to_gzip: bool, dry_run: bool,
                      indexed: Optional[Tuple[int, int]]) -> Tuple[Any, ...]:
    """_transcode_one's work, with the file's lock held."""
    path_text = str(path)
    try:
        raw = read_regular_file(path)   # a symlink, folder or FIFO: unreadable, unopened
        before = path.stat()
        stamp = (before.st_size, before.st_mtime_ns)
        parsed_ok = indexed == stamp and len(raw) == before.st_size
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
    if (after.st_size, after.st_mtime_ns) != stamp:
        return path_text, "changed", len(raw), len(raw), "", None, None
    if not dry_run:  # write errors propagate: the old file is intact (atomic write)
        atomic_write_bytes(path, new)
        os.utime(str(path), ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()  # still under the lock: exactly the file as we left it
    return path_text, "done", len(raw), len(new), "", stamp, (after.st_size, after.st_mtime_ns)


def _indexed_stats(index: MemoryIndex) -> Dict[Path, Tuple[int, int]]:
    """(size, mtime_ns) of every file a verified index parsed successfully."""
    manifest = index.manifest() if index.store.state_dir.is_dir() else None
    return {index.store.root / e["path"]: (e["size"], e["mtime_ns"])
            for e in (manifest or {}).get("files", [])}


def _agent_data_files(store: Store) -> List[Path]:
    """Every agent's JSON data files (never config.json, global/ or aml's state)."""
    return [f.path for agent in store.agents() for f in store.agent_files(agent)]


def _transcode_files(store: Store, paths: List[Path], sizes: Dict[Path, int], to_gzip: bool,
                     dry_run: bool, todo: Set[Path], indexed: Dict[Path, Tuple[int, int]],
                     count: int) -> List[Tuple[Any, ...]]:
    """_transcode_one of every path on ``count`` threads, largest file first (so no big file
    starts last while the other threads idle); outcomes in the order of ``paths``."""
    order = sorted(paths, key=lambda p: -sizes[p])
    with paused_cyclic_gc():  # the parses of files the index did not vouch for
        done = parallel_map(_transcode_one, [(str(p), to_gzip, store.lock_timeout,
                                              dry_run or p not in todo, indexed.get(p),
                                              store.busy_locks) for p in order], count,
                            threads=True, progress=lambda n, total: store.progress(
                                "compress" if to_gzip else "decompress", n, total, "files"))
    by_path = {o[0]: o for o in done}
    return [by_path[str(p)] for p in paths]


def transcode_store(store: Store, to_gzip: bool, age_days: float = 30.0, dry_run: bool = False,
                    workers: int = 0, backup: Optional[Callable[[], str]] = None
                    ) -> TranscodeResult:
    """Gzip (``to_gzip``) or un-gzip every agent data file in place, under the same name.

    Compression takes files unchanged for ``age_days`` (0 = all); decompression takes all.
    Each file is locked, parsed (an unparseable file is listed, never written), converted,
    verified and replaced atomically with its mtime kept; files run in parallel threads.
    ``backup`` (e.g. a safety_backup call) runs first, only when some file needs converting;
    a file that seemed done then is never written (reported as changed if it no longer is).
    A file whose lock stays held is left as it was and listed in ``busy``. Call with the
    maintenance lock held (a real run first removes temp files an interrupted one left).
    """
    started = time.monotonic()
    if not dry_run:
        store.cleanup_temp_files()
    cutoff = store.now.timestamp() - age_days * 86400.0
    paths, recent, sizes = [], [], {}
    for path in _agent_data_files(store):
        info = os.lstat(str(path))   # a symlink, folder or FIFO goes on, to be reported
        if to_gzip and age_days > 0 and stat.S_ISREG(info.st_mode) and info.st_mtime > cutoff:
            recent.append(path)
        else:
            paths.append(path)
            sizes[path] = info.st_size
    # Threads, two per core: zlib, reads and fsync release the GIL, and a file's fsync wait
    # overlaps another's compression (measured faster than one process per core).
    count = worker_count(workers or 2 * (os.cpu_count() or 1), len(paths))
    index = MemoryIndex(store)
    indexed = _indexed_stats(index)
    todo = {p for p in paths if _is_gzip_file(p) != to_gzip}
    backup_id = backup() if backup is not None and todo and not dry_run else None
    outcomes = _transcode_files(store, paths, sizes, to_gzip, dry_run, todo, indexed, count)
    outcomes = [o[:1] + ("changed",) + o[2:] if o[1] == "done" and Path(o[0]) not in todo
                else o for o in outcomes]
    rel = lambda p: Path(p).relative_to(store.root).as_posix()  # noqa: E731
    by = {kind: [o for o in outcomes if o[1] == kind] for kind in ("done", "skipped", "changed",
                                                                     "unreadable", "busy")}
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
        workers=count, seconds=time.monotonic() - started, backup_id=backup_id,
        busy=[o[4] for o in by["busy"]])


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
    for key, reason in (("id", GcReason.MISSING_ID), ("agent", GcReason.MISSING_AGENT)):
        if not (isinstance(record.get(key), str) and record[key]):
            return reason, {key: record.get(key)}
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


@contextlib.contextmanager
def _left_alone(busy: List[str], unreadable: List[str]) -> Iterator[None]:
    """A file whose lock stays held or that is unreadable is left as it was and listed in
    ``busy`` / ``unreadable``; the other files go on."""
    try:
        yield
    except StoreBusyError as exc:
        busy.append(str(exc))
    except CorruptFileError as exc:
        unreadable.append(str(exc))


_REFUSED_AGENTS = property(lambda self: self.refused_agents,
                           doc="Agents the mass-removal guard refused (a real run raises).")


@dataclasses.dataclass
class GcResult(OperationResult):
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
    busy: List[str] = dataclasses.field(default_factory=list)

    refused = _REFUSED_AGENTS


class GarbageCollector:
    """Finds and removes unusable, duplicate and conflicting records, and cleans leftovers.

    Records go to the Archive (undo with ``prune --undo RUN_ID``) before leaving their file.
    Never deletes a data file, never writes a file it cannot parse, and treats the same id in
    two agents as two records. Refuses (RefusedError) to remove more than half of an agent's
    records unless ``force``.
    """

    def __init__(self, store: StoreLike, force: bool = False):
        self.store = store = as_store(store, "GarbageCollector")
        self.force = force
        self.busy: List[str] = []        # files apply left alone: their lock stayed held
        self.unreadable: List[str] = []  # files apply left alone: unreadable since planning

    def plan_with_total(self, agent: str, errors: List[CorruptFileError]
              ) -> Tuple[List[Dict[str, Any]], int]:
        """(entries, records in the agent's readable files), each file parsed once."""
        entries, kept_ids, total = [], {}, 0
        for data_file, records, _ in self.store.iter_record_files([agent], errors=errors):
            total += len(records)
            flaws = {i: bad for i, bad in enumerate(_incomplete(data_file.rtype, r)
                                                    for r in records) if bad}
            good = [i for i in range(len(records)) if i not in flaws]
            for index, first in _exact_duplicates(records, good).items():
                flaws[index] = GcReason.DUPLICATE, {"duplicate_of_index": first}
            entries.extend(self._entry(data_file, i, records[i], *flaws[i]) for i in sorted(flaws))
            for i in good:
                if i not in flaws:  # not the later copy of an identical record
                    kept_ids.setdefault(records[i]["id"], []).append((data_file, i, records[i]))
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
                return _moment(record_facts(item[0].rtype, item[2]).last_activity)
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
        """Remove ``entries`` from their files, each file under the runtime's lock, its
        archive part written (with ``copies_kept``) before the file is replaced.

        A record is removed only if the file still holds it unchanged; returns the entries
        actually removed and how many were skipped as changed. A file whose lock stays held
        or that turned unreadable is left alone and listed in ``busy`` / ``unreadable``.
        """
        archive = Archive(self.store)
        archive.begin(run_id, "gc")
        removed: List[Dict[str, Any]] = []
        skipped, parts = 0, 0
        by_file: Dict[str, List[Dict[str, Any]]] = {}
        for entry in entries:
            by_file.setdefault(entry["file"], []).append(entry)
        for rel, file_entries in by_file.items():
            with _left_alone(self.busy, self.unreadable):
                done = self._remove_from(self.store.root / rel, file_entries,
                                         lambda d, n=parts + 1: archive.write_part(run_id, n, d))
                parts += bool(done)
                removed.extend(done)
                skipped += len(file_entries) - len(done)
        archive.finish(run_id, {"entries": len(removed), "parts": parts})
        return removed, skipped

    def _remove_from(self, path: Path, entries: List[Dict[str, Any]],
                     write_part: Callable[[List[Dict[str, Any]]], Any]) -> List[Dict[str, Any]]:
        with self.store.rewrite(path) as job:
            positions: Dict[int, Dict[str, Any]] = {}
            for entry in entries:
                canon = _canonical(entry["record"])
                i = entry["index"]
                if i >= len(job.data) or _canonical(job.data[i]) != canon or i in positions:
                    i = next((j for j, r in enumerate(job.data)
                              if j not in positions and _canonical(r) == canon), None)
                if i is not None:
                    positions[i] = entry
            if positions:
                kept = copies_kept(job.data, positions)
                for i, entry in positions.items():
                    entry.update(index=i, copies_kept=kept[i])
                write_part(list(positions.values()))  # archived before the file changes
                job.data = [r for j, r in enumerate(job.data) if j not in positions]
                job.changed = True
                job.removed = set(positions)  # pure deletion: splice, do not re-encode
        return list(positions.values())


def stale_lock_dirs(store: Store, now: Optional[float] = None) -> List[Path]:
    """Stale ``*.json.lock`` directories in the store (stale_lock_age at ``now``): what gc
    removes and health warns about."""
    return [e.path for e in scan_leftovers(store.root, now) if e.kind == "lock"]


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


@paused_cyclic_gc()
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
    for agent in with_progress(store.progress, "gc: planning", store.agents()):
        entries, total = gc.plan_with_total(agent, errors)
        if not gc.guard(agent, entries, total):
            refused.append(agent)
        plan.extend(entries)
    leftovers = scan_leftovers(store.root)
    locks, temps = ([e.path for e in leftovers if e.kind == kind] for kind in ("lock", "temp"))
    orphans, index_gone = _orphaned_state(store)
    if refused and not dry_run:
        raise RefusedError("gc would remove more than half of the records of %s; check the "
                           "store, then rerun with --force" % first_few(refused, "agent"))
    run_id, backup_id, removed, skipped = None, None, plan, 0
    if not dry_run:
        if plan:
            backup_id = backup() if backup is not None else None
            run_id = new_run_id("gc", store.now)
            removed, skipped = gc.apply(run_id, plan)
        _clean_leftovers(store, locks, temps, orphans, index_gone)
    rel = lambda p: p.relative_to(store.root).as_posix()  # noqa: E731
    reasons = dict(collections.Counter(e["reason"] for e in removed))
    return GcResult(dry_run, run_id, removed, reasons, refused, [rel(p) for p in locks],
                    [rel(p) for p in temps], orphans, [str(e) for e in errors] + gc.unreadable,
                    skipped, backup_id, time.monotonic() - started, gc.busy)


def _clean_leftovers(store: Store, locks: List[Path], temps: List[Path], orphans: List[str],
                     index_gone: bool) -> None:
    for path in locks:
        if stale_lock_age(path) is not None:  # still stale right now
            with contextlib.suppress(OSError):
                os.rmdir(str(path))
    store.cleanup_temp_files(temps)
    index = MemoryIndex(store)
    for name in orphans:
        if "/" not in name:
            with contextlib.suppress(OSError):
                (index.folder / name).unlink()
    if index_gone:
        index.refresh()


# -- consolidation: optimize dedupe ---------------------------------------------
# Near-duplicates within one agent and one record type (one file): the knowledge fields'
# text, normalised, in word 3-gram shingles labelled by field; a one-permutation MinHash
# (blake2b of every word, 64 bins) with LSH banding (8 bands of 8 bins) proposes candidates,
# so no pair is compared unless it shares a band; then the exact Jaccard of the shingle sets
# and the false-merge guard decide. A merge supersedes: the survivor keeps its id and absorbs
# the evidence; each merged record and the survivor's old version go to the archive first.

_BIN_BITS = 6
_BINS = 1 << _BIN_BITS  # 64 bins in 8 bands of 8: pairs at Jaccard 0.85 meet in a band with
_BAND_ROWS = 8          # p = 0.92, at 0.9 with 0.99, at 0.6 with 0.13 (1 - (1 - J^8)^8)
_BUCKET_WINDOW = 32  # a record is compared with at most this many earlier bucket mates
_BIN_MASK = _BINS - 1

# The fields that carry the knowledge, per type (SPEC 2.1); stack trace hashes and related
# pattern ids are references, not knowledge.
_KNOWLEDGE = {
    RecordType.PATTERN: (("pattern", "type"), ("pattern", "context"),
                         ("pattern", "approach", "technique"),
                         ("pattern", "approach", "codeTemplate"),
                         ("pattern", "approach", "rationale"), ("pattern", "approach", "steps"),
                         ("pattern", "conditions", "whenApplicable"),
                         ("pattern", "conditions", "whenNotApplicable")),
    RecordType.SOLUTION: (("problem", "errorType"), ("problem", "errorMessage"),
                          ("problem", "context"), ("solution", "rootCause"),
                          ("solution", "fixApproach"), ("solution", "codeFix"),
                          ("solution", "prevention")),
    RecordType.DECISION: (("decision", "type"), ("decision", "question"),
                          ("decision", "chosenOption"), ("decision", "context")),
}
_NOT_KNOWLEDGE = frozenset({"stackTraceHash", "relatedPatterns"})
_WORD_RE = re.compile(r"\w+")
# Words that carry no knowledge are left out of the shingles (not out of the guard's facts):
# "... for this team" appended to a short decision's question then changes one shingle, not
# three (it fell under the threshold at 0.84). Negations are not among them.
_STOP_WORDS = ("a", "an", "the", "this", "that", "these", "those", "for", "of", "to", "in",
               "on", "at", "by", "with", "from", "as", "into", "and", "or", "is", "are", "was",
               "be", "it", "its", "we", "our", "us", "you", "your", "they", "their")
_STOP_WORD_BYTES = tuple(w.encode("ascii") for w in _STOP_WORDS)
_TOKEN_RE = re.compile(r"[^\s,;()\[\]{}<>\"'`=]+")
_QUOTED_RE = re.compile(r"'([^'\n]{1,80})'|\"([^\"\n]{1,80})\"|`([^`\n]{1,80})`")
_VERSION_RE = re.compile(r"v?\d+(?:\.\d+)+\w*", re.IGNORECASE)
_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{2,}|[A-Z]{1,5}-?\d+|0x[0-9a-fA-F]+")
_IDENT_RE = re.compile(r"[a-z]+[A-Z]\w*|[A-Z][a-z0-9]+[A-Z]\w*|\w+_\w+|\w+(?:\.\w+)+|\w+\(\)")
_NEGATIONS = frozenset({"not", "no", "never", "don't", "doesn't", "isn't", "can't", "cannot",
                        "won't", "shouldn't", "without", "avoid", "nor"})
# Guard classes in the order they are reported.
FACT_CLASSES = ("context", "path", "version", "error_code", "number", "identifier", "negation")


def knowledge_fragments(rtype: RecordType, record: Any) -> List[Tuple[str, str]]:
    """(field label, text) of every scalar in a record's knowledge fields, in record order."""
    out: List[Tuple[str, str]] = []
    for path in _KNOWLEDGE[rtype]:
        _walk_fragments(dig(record, *path), ".".join(path), out)
    return out


def _walk_fragments(value: Any, label: str, out: List[Tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in _NOT_KNOWLEDGE:
                _walk_fragments(item, "%s.%s" % (label, key), out)
    elif isinstance(value, list):
        for item in value:
            _walk_fragments(item, label, out)
    elif isinstance(value, str):
        out.append((label, value))
    elif value is not None:
        out.append((label, json.dumps(value)))


def knowledge_units(rtype: RecordType, record: Any) -> List[Tuple[int, str]]:
    """(field number, text) of each knowledge field present: strings as they are, other
    values as their compact JSON (an object's keys then read as words too)."""
    out = []
    for number, path in enumerate(_KNOWLEDGE[rtype]):
        value = record
        for key in path:  # dig(), inlined: this runs for every record of the store
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            continue
        if value.__class__ is str:
            out.append((number, value))
        elif value.__class__ is list:
            try:
                out.append((number, " ".join(value)))
            except TypeError:  # not all strings: their words as Python writes them
                out.append((number, str(value)))
        elif value.__class__ is dict:
            out.append((number, " ".join(map(str, itertools.chain.from_iterable(
                value.items())))))
        else:
            out.append((number, str(value)))
    return out


# Shingle words: lowercased UTF-8 with every ASCII byte that is not a letter, digit, "_" or
# \x01 (the field separator of _Shingler.shingles) turned into a space (bytes.translate and
# split run at C speed; a regex per field cost more than parsing the record). Bytes of other
# characters stay part of their word.
_WORD_BYTES = bytes(b if (chr(b).isalnum() or b in (0x01, 0x5F) or b >= 0x80) else 0x20
                    for b in range(256)).lower()


class _Shingler:
    """Word hashes (blake2b, cached per file) and the field-tagged 3-gram shingles of a record."""

    def __init__(self) -> None:
        self.words: Dict[bytes, int] = dict.fromkeys(_STOP_WORD_BYTES, 0)

    def _hashes(self, words: List[bytes]) -> List[int]:
        """A stable non-zero 64-bit hash per word (stop words 0, then left out)."""
        cache = self.words
        ids = list(map(cache.get, words))
        if None in ids:
            for n, word in enumerate(words):
                if ids[n] is None:
                    ids[n] = cache[word] = int.from_bytes(hashlib.blake2b(
                        word, digest_size=8).digest(), "little") | 1
        return list(filter(None, ids)) if 0 in ids else ids

    def shingles(self, units: List[Tuple[int, str]]) -> Set[int]:
        """Hashes of (field, w1, w2, w3) for every 3 words in a row of each field (a shorter
        field is one shingle): every shingle knows its field, so moving words between fields
        (``whenApplicable`` to ``whenNotApplicable``) changes them."""
        out: Set[int] = set()
        # One lower/encode/translate for the whole record, cut back into its fields at the
        # \x01 that joined them (a field holding \x01 itself: each field on its own).
        fields = "\x01".join([text for _, text in units]).lower().encode(
            "utf-8", "surrogatepass").translate(_WORD_BYTES).split(b"\x01")
        if len(fields) != len(units):
            fields = [text.lower().encode("utf-8", "surrogatepass").translate(_WORD_BYTES)
                      for _, text in units]
        for (number, _), field in zip(units, fields):
            ids = self._hashes(field.split())
            if len(ids) < 3:
                out.add(hash((number, *ids)))
            else:
                out.update(map(hash, zip(itertools.repeat(number), ids, ids[1:], ids[2:])))
        return out


def minhash_bands(shingles: Set[int]) -> List[Optional[int]]:
    """One-permutation MinHash (the least hash in each of _BINS bins by its low bits; a
    descending sort lets dict() keep the least per bin at C speed), folded into one key per
    LSH band of _BAND_ROWS bins, plus two sketch keys for short records (None: no key)."""
    ordered = sorted(shingles, reverse=True)
    least = dict(zip(map(_BIN_MASK.__and__, ordered), ordered))
    bands = list(zip(*[iter(map(least.get, range(_BINS)))] * _BAND_ROWS))
    # A band of fewer than two filled bins says too little (short records have many; one
    # shingle such as a decision's type would put a tenth of the file in one bucket).
    keys: List[Optional[int]] = [
        hash(rows) if empty <= _BAND_ROWS - 2 else None
        for rows, empty in zip(bands, map(tuple.count, bands, itertools.repeat(None)))]
    # A short record keys few bands, so it also gets its 3 least and 3 greatest hashes
    # (bottom-k and top-k sketches: two copies at Jaccard 0.94 share one with p = 0.97).
    short = len(ordered) < _BINS // 2
    keys.append(hash(("least",) + tuple(ordered[-3:])) if short else None)
    keys.append(hash(("greatest",) + tuple(ordered[:3])) if short else None)
    return keys


def jaccard(a: Set[int], b: Set[int]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def record_facts_for_guard(fragments: List[Tuple[str, str]]) -> Dict[str, "collections.Counter"]:
    """Per guard class, the (field, token) multiset of context values (a pattern's, problem's
    or decision's context, each value whole), numbers, versions, paths, error codes,
    identifiers and negations in the knowledge text: two records merge only if all agree."""
    found: Dict[str, collections.Counter] = {name: collections.Counter() for name in FACT_CLASSES}
    for label, text in fragments:
        if ".context" in label:  # where the knowledge applies: typescript/nestjs is not python
            found["context"][(label, " ".join(text.lower().split()))] += 1
        for match in _QUOTED_RE.finditer(text):
            found["identifier"][(label, next(g for g in match.groups() if g is not None))] += 1
        for token in (t.strip(".:!?") for t in _TOKEN_RE.findall(text)):
            kind = _fact_class(token)
            if kind is not None:
                found[kind][(label, token.lower() if kind == "negation" else token)] += 1
    return found


def _fact_class(token: str) -> Optional[str]:
    if not token:
        return None
    if token.isalpha() and (token.islower() or token.istitle()):  # most words: no fact
        return "negation" if token.lower() in _NEGATIONS else None
    if "/" in token or "\\" in token:
        return "path"
    if _VERSION_RE.fullmatch(token):
        return "version"
    if _CODE_RE.fullmatch(token):
        return "error_code"
    if any(ch.isdigit() for ch in token):
        return "number"
    if _IDENT_RE.fullmatch(token):
        return "identifier"
    return "negation" if token.lower() in _NEGATIONS else None


class _Candidate:
    """What dedupe knows about one record of a file while it looks for its near-duplicates."""

    __slots__ = ("index", "id", "record", "rtype", "_facts", "_fragments", "shingles",
                 "guard")

    def __init__(self, index: int, record: Dict[str, Any], rtype: RecordType,
                 shingles: Set[int]):
        self.index, self.id, self.record, self.rtype = index, record["id"], record, rtype
        self.shingles = shingles
        self._facts: Optional[RecordFacts] = None  # these three on first use: most
        self._fragments: Optional[List[Tuple[str, str]]] = None  # candidates fall below
        self.guard: Optional[Dict[str, collections.Counter]] = None  # the threshold

    @property
    def facts(self) -> RecordFacts:
        if self._facts is None:
            self._facts = record_facts(self.rtype, self.record)
        return self._facts

    @property
    def fragments(self) -> List[Tuple[str, str]]:
        if self._fragments is None:
            self._fragments = knowledge_fragments(self.rtype, self.record)
        return self._fragments

    def guard_facts(self) -> Dict[str, "collections.Counter"]:
        """The guard's fact multisets, computed on first use (only candidates need them)."""
        if self.guard is None:
            self.guard = record_facts_for_guard(self.fragments)
        return self.guard

    def evidence(self) -> float:
        """How much evidence the record carries: observed outcomes, verifications, outcome."""
        facts = self.facts
        if facts.rtype is RecordType.PATTERN:
            seen = success_evidence(facts)
            return float(seen[1]) if seen else 0.0
        if facts.rtype is RecordType.SOLUTION:
            return max(0.0, facts.verified_count or 0.0) + (facts.worked is not None)
        return float(facts.would_repeat is not None)

    def rank(self) -> Tuple[bool, float, float, int]:
        """Survivor order: pinned, most evidence, then most recent use, then first in file."""
        return self.facts.pinned, self.evidence(), _moment(self.facts.last_activity), -self.index


def outcome_conflict(a: RecordFacts, b: RecordFacts) -> Optional[str]:
    """Why two records' outcomes disagree, or None: a solution that worked and one that did
    not, a decision repeated and one regretted, or patterns whose 95 % Wilson intervals of
    success do not overlap (their evidence cannot be one rate)."""
    if a.rtype is RecordType.SOLUTION and a.worked != b.worked:
        return "worked %s vs %s" % (_flag(a.worked), _flag(b.worked))
    if a.rtype is RecordType.DECISION and a.would_repeat != b.would_repeat:
        return "wouldRepeat %s vs %s" % (_flag(a.would_repeat), _flag(b.would_repeat))
    if a.rtype is RecordType.PATTERN:
        ea, eb = success_evidence(a), success_evidence(b)
        if ea and eb and ea[1] and eb[1]:
            la, ha = wilson_interval(*ea)
            lb, hb = wilson_interval(*eb)
            if ha < lb or hb < la:
                return "success %d/%d vs %d/%d" % (ea + eb)
    return None


def _flag(value: Optional[bool]) -> str:
    return {True: "true", False: "false", None: "absent"}[value]


def guard_conflict(a: _Candidate, b: _Candidate) -> Optional[Tuple[str, str]]:
    """(guard class, what differs) when two similar records must not merge, else None."""
    if a.facts.active != b.facts.active:
        return "state", "active %s vs %s" % (_flag(a.facts.active), _flag(b.facts.active))
    outcome = outcome_conflict(a.facts, b.facts)
    if outcome:
        return "outcome", outcome
    fa, fb = a.guard_facts(), b.guard_facts()
    for kind in FACT_CLASSES:
        if fa[kind] != fb[kind]:
            only_a = sorted(t for _, t in (fa[kind] - fb[kind]))
            only_b = sorted(t for _, t in (fb[kind] - fa[kind]))
            return kind, "%s vs %s" % (", ".join(only_a) or "-", ", ".join(only_b) or "-")
    return None


def text_differences(a: _Candidate, b: _Candidate, limit: int = 6) -> List[str]:
    """Words one record's knowledge has and the other's lacks, per field (``-`` a, ``+`` b)."""
    words = lambda c: collections.Counter(  # noqa: E731
        (label, w) for label, text in c.fragments for w in _WORD_RE.findall(text.lower()))
    wa, wb = words(a), words(b)
    fields: Dict[str, List[str]] = {}
    for sign, extra in (("-", wa - wb), ("+", wb - wa)):
        for label, word in sorted(extra):
            fields.setdefault(label, []).append(sign + word)
    diffs = ["%s: %s" % (label, " ".join(changes[:limit]) + (
        " ... %d more" % (len(changes) - limit) if len(changes) > limit else ""))
             for label, changes in sorted(fields.items())]
    if not diffs and a.fragments != b.fragments:
        diffs = ["punctuation or case only"]
    return diffs[:limit]


def _eligible(record: Any) -> bool:
    """Whether dedupe may consider a record: an object with an id, not superseded."""
    return (isinstance(record, dict) and isinstance(record.get("id"), str) and bool(record["id"])
            and not _is_superseded(record))


class _FileDedupe:
    """Finds the clusters of one record file. For every record only its LSH band keys and its
    shingle hashes packed 8 bytes each are kept (a tenth of the parsed record or less); sets,
    record facts and guard facts are built for the records that meet a candidate."""

    def __init__(self, rtype: RecordType, records: List[Any], threshold: float):
        self.rtype, self.records, self.threshold = rtype, records, threshold
        self.shingler = _Shingler()
        self.cache: Dict[int, Optional[_Candidate]] = {}
        self.packed: Dict[int, "array.array"] = {}  # shingle hashes, from buckets()
        self.held: Dict[Tuple[int, int], Dict[str, Any]] = {}  # similar pairs the guard kept apart
        # An id held by two records is gc's business (exact duplicate or id conflict).
        ids = collections.Counter(r.get("id") for r in records if isinstance(r, dict))
        self.shared_ids = {rid for rid, n in ids.items() if n > 1}

    def _shingles(self, record: Any) -> Optional[Set[int]]:
        """The record's shingles; None when it cannot take part or has no knowledge text."""
        if not (_eligible(record) and record["id"] not in self.shared_ids):
            return None
        units = knowledge_units(self.rtype, record)
        return self.shingler.shingles(units) if units else None

    def candidate(self, index: int) -> Optional[_Candidate]:
        """The record at ``index`` ready for comparison (None if it cannot take part)."""
        if index not in self.cache:
            record, packed = self.records[index], self.packed.get(index)
            shingles = set(packed) if packed is not None else self._shingles(record)
            self.cache[index] = (None if shingles is None
                                 else _Candidate(index, record, self.rtype, shingles))
        return self.cache[index]

    def buckets(self) -> List[Dict[int, List[int]]]:
        """Per LSH band, band key -> record positions (every eligible record, one pass)."""
        bands: List[Dict[int, List[int]]] = [{} for _ in range(_BINS // _BAND_ROWS + 2)]
        for index, record in enumerate(self.records):
            shingles = self._shingles(record)
            if shingles is None:
                continue
            self.packed[index] = array.array("q", shingles)
            for band, key in zip(bands, minhash_bands(shingles)):
                if key is not None:
                    band.setdefault(key, []).append(index)
        return bands

    def similarity(self, a: _Candidate, b: _Candidate) -> Optional[float]:
        """The Jaccard of two records when they may merge; None when below the threshold, the
        same id (gc's business) or kept apart by the guard (counted per guard class)."""
        if a.id == b.id:
            return None
        score = jaccard(a.shingles, b.shingles)
        if score < self.threshold:
            return None
        conflict = guard_conflict(a, b)
        if conflict is not None:
            first, second = (a, b) if a.index < b.index else (b, a)
            self.held[(first.index, second.index)] = {
                "ids": [first.id, second.id], "indexes": [first.index, second.index],
                "guard": conflict[0], "differs": conflict[1], "similarity": round(score, 4)}
            return None
        return score

    def clusters(self) -> List[Tuple[_Candidate, List[Tuple[_Candidate, float]]]]:
        """(survivor, [(merged record, similarity)]) for each cluster, in file order."""
        parent: Dict[int, int] = {}

        def find(x: int) -> int:
            while parent.get(x, x) != x:
                parent[x] = parent.get(parent[x], parent[x])
                x = parent[x]
            return x
        checked: Set[Tuple[int, int]] = set()
        for band in self.buckets():
            for members in band.values():
                for n in range(1, len(members)):
                    b = members[n]
                    for a in members[max(0, n - _BUCKET_WINDOW):n]:
                        if (a, b) in checked or find(a) == find(b):
                            continue
                        checked.add((a, b))
                        ca, cb = self.candidate(a), self.candidate(b)
                        if ca and cb and self.similarity(ca, cb) is not None:
                            parent[find(b)] = find(a)
        groups: Dict[int, List[int]] = {}
        for index in parent:
            groups.setdefault(find(index), []).append(index)
        found = []
        for group in sorted(groups.values(), key=min):
            found.extend(self._split(sorted(set(group) | {find(group[0])})))
        return found

    def _split(self, group: List[int]) -> List[Tuple[_Candidate, List[Tuple[_Candidate, float]]]]:
        """Clusters of one connected group, each member compared with its survivor directly
        (similarity is not transitive: A~B and B~C do not make A~C)."""
        remaining = [c for c in (self.candidate(i) for i in group) if c is not None]
        out = []
        while len(remaining) > 1:
            survivor = max(remaining, key=_Candidate.rank)
            members = []
            for cand in remaining:
                if cand is not survivor and not cand.facts.pinned:
                    score = self.similarity(survivor, cand)
                    if score is not None:
                        members.append((cand, score))
            if members:
                out.append((survivor, members))
            taken = {survivor.index} | {c.index for c, _ in members}
            remaining = [c for c in remaining if c.index not in taken]
        return out


# -- the merge: evidence adds up -----------------------------------------------

def _set_present(record: Dict[str, Any], field: str, value: Any) -> None:
    """Set a logical field where the record keeps it (first layout present); else nowhere."""
    for path in FIELD_PATHS[field]:
        holder = dig(record, *path[:-1])
        if isinstance(holder, dict) and holder.get(path[-1]) is not None:
            holder[path[-1]] = value
            return


def _sum_field(out: Dict[str, Any], records: List[Dict[str, Any]], field: str) -> None:
    values = [_number(first_value(r, field)) for r in records]
    if _number(first_value(out, field)) is not None:
        _set_present(out, field, _json_number(sum(v for v in values if v is not None)))


def _merge_pattern_evidence(out: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    """Outcomes add (one neutral prior at most, as if one record had seen them all); the rate
    is recomputed from the counts; time saved is weighted by executions."""
    facts = [record_facts(RecordType.PATTERN, r) for r in records]
    parts = [outcome_evidence(f) for f in facts]
    if parts[0] is not None:
        known = [p for p in parts if p is not None]
        wins, seen = sum(p[0] for p in known), sum(p[1] for p in known)
        prior = 1 if any(p[2] for p in known) else 0
        count = seen + prior
        if count:
            _set_present(out, "execution_count", count)
            _set_present(out, "success_rate", _json_number((wins + 0.5 * prior) / count))
        metrics = out.get("metrics")
        if isinstance(metrics, dict) and "successCount" in metrics and "failureCount" in metrics:
            metrics["successCount"], metrics["failureCount"] = wins, seen - wins
            if not all(p[3] for p in known):
                metrics["countsApproximate"] = True
    weights = [(f.execution_count or 0, _number(first_value(r, "avg_time_saved")))
               for f, r in zip(facts, records)]
    total = sum(w for w, v in weights if v is not None)
    if total > 0 and _number(first_value(out, "avg_time_saved")) is not None:
        saved = sum(w * v for w, v in weights if v is not None) / total
        _set_present(out, "avg_time_saved", _json_number(round(saved, 2)))
    for field in ("error_prevention", "refinements"):
        _sum_field(out, records, field)


def _latest(records: List[Dict[str, Any]], field: str, earliest: bool = False) -> Any:
    """The raw value of ``field`` from the record where it is latest (or earliest)."""
    stamped = [(parse_timestamp(first_value(r, field)), first_value(r, field)) for r in records]
    stamped = [(t, raw) for t, raw in stamped if t is not None]
    return (min if earliest else max)(stamped, key=lambda item: item[0], default=(0, None))[1]


def _union(lists: Iterable[Any]) -> List[Any]:
    out: List[Any] = []
    seen: Set[str] = set()
    for items in lists:
        for item in items if isinstance(items, list) else ():
            key = _canonical(item)
            if key not in seen:
                seen.add(key)
                out.append(item)
    return out


def merge_records(rtype: RecordType, survivor: Dict[str, Any],
                  others: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The survivor after absorbing ``others``: same id, key order and layout; counts add,
    rates are recomputed from counts, the latest use wins, tags (and a solution's related
    patterns) are the union. The inputs are not changed."""
    out = parse_json_text(archived_record_text(survivor))
    records = [survivor] + list(others)
    if rtype is RecordType.PATTERN:
        _merge_pattern_evidence(out, records)
    elif rtype is RecordType.SOLUTION:
        for path in (("verifiedCount",), ("verified_count",),
                     ("effectiveness", "preventedRecurrence"),
                     ("effectiveness", "relatedErrorsFixed")):
            holder = dig(out, *path[:-1])
            if isinstance(holder, dict) and _number(holder.get(path[-1])) is not None:
                holder[path[-1]] = _json_number(sum(_number(dig(r, *path)) or 0 for r in records))
        if isinstance(dig(out, "solution", "relatedPatterns"), list):
            out["solution"]["relatedPatterns"] = _union(dig(r, "solution", "relatedPatterns")
                                                        for r in records)
    for field, earliest in (("last_used", False), ("created", True), ("reviewed", False)):
        value = _latest(records, field, earliest)
        if value is not None:
            _set_present(out, field, value)
    if isinstance(out.get("tags"), list) or any(isinstance(r.get("tags"), list) for r in others):
        tags = _union(r.get("tags") for r in records)
        if tags or "tags" in out:
            out["tags"] = tags
    return out


# -- planning and applying a dedupe run ------------------------------------------

@dataclasses.dataclass
class DedupeCluster:
    """One cluster: the record that survives (and why) and those it absorbs."""

    agent: str
    file: str
    type: str
    survivor_id: str
    survivor_index: int
    why: str
    members: List[Dict[str, Any]]  # id, index, similarity, differs


@dataclasses.dataclass
class DedupeResult(OperationResult):
    """What ``optimize dedupe`` found and, with ``apply``, merged."""

    dry_run: bool
    threshold: float
    run_id: Optional[str] = None
    clusters: List[DedupeCluster] = dataclasses.field(default_factory=list)
    held_apart: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    files: int = 0
    records: int = 0
    merged: int = 0
    refused_agents: List[str] = dataclasses.field(default_factory=list)
    unreadable: List[str] = dataclasses.field(default_factory=list)
    busy: List[str] = dataclasses.field(default_factory=list)
    backup_id: Optional[str] = None
    repointed: int = 0
    seconds: float = 0.0

    refused = _REFUSED_AGENTS

    @property
    def guarded(self) -> Dict[str, int]:
        """Similar pairs the guard kept apart, per guard class."""
        return dict(collections.Counter(h["guard"] for h in self.held_apart))


@dataclasses.dataclass
class _DedupeFile:
    """One file's plan: its content digest as planned and the clusters found in it."""

    data_file: DataFile
    rel: str
    digest: str
    clusters: List[Tuple[_Candidate, List[Tuple[_Candidate, float]]]]


def _survivor_why(survivor: _Candidate, members: List[Tuple[_Candidate, float]]) -> str:
    best = max((c for c, _ in members), key=_Candidate.rank)
    if survivor.facts.pinned:
        return "pinned"
    if survivor.evidence() != best.evidence():
        return "most evidence (%g vs %g)" % (survivor.evidence(), best.evidence())
    if _moment(survivor.facts.last_activity) != _moment(best.facts.last_activity):
        return "same evidence, most recent use (%s)" % format_timestamp(
            survivor.facts.last_activity)
    return "same evidence and use, first in the file"


def _plan_dedupe_file(store: Store, data_file: DataFile, records: List[Any], threshold: float,
                      result: Optional[DedupeResult], digest: str = "") -> _DedupeFile:
    """Find one file's clusters and describe them in ``result`` (when given); ``digest`` is
    the text_digest of the file as read."""
    finder = _FileDedupe(data_file.rtype, records, threshold)
    clusters = finder.clusters()
    rel = data_file.path.relative_to(store.root).as_posix()
    if result is not None:
        for survivor, members in clusters:
            result.clusters.append(DedupeCluster(
                data_file.agent, rel, data_file.rtype.value, survivor.id, survivor.index,
                _survivor_why(survivor, members),
                [{"id": c.id, "index": c.index, "similarity": round(score, 4),
                  "differs": text_differences(survivor, c)} for c, score in members]))
        result.held_apart.extend(dict(h, file=rel) for _, h in sorted(finder.held.items()))
    return _DedupeFile(data_file, rel, digest, clusters)


def _merged_survivors(plan: _DedupeFile, records: List[Any]
                      ) -> Dict[int, Tuple[Dict[str, Any], List[int]]]:
    """{survivor index: (merged survivor, merged positions)} for the clusters whose merged
    record the runtime would accept (a merge never makes a valid record invalid)."""
    rtype, out = plan.data_file.rtype, {}
    for survivor, members in plan.clusters:
        original = records[survivor.index]
        merged = merge_records(rtype, original, [records[c.index] for c, _ in members])
        if runtime_problems(rtype, merged) and not runtime_problems(rtype, original):
            continue
        out[survivor.index] = (merged, [c.index for c, _ in members])
    return out


def _dedupe_entries(plan: _DedupeFile, records: List[Any],
                    merges: Dict[int, Tuple[Dict[str, Any], List[int]]],
                    similarity: Dict[int, float]) -> List[Dict[str, Any]]:
    """Archive entries: every merged record (supersededBy, similarity) and each survivor's
    pre-merge version (with the digest of its merged text, so undo can recognise it)."""
    base = {"agent": plan.data_file.agent, "file": plan.rel, "type": plan.data_file.rtype.value}
    entries = []
    for index, (merged, positions) in sorted(merges.items()):
        survivor_id = records[index]["id"]
        entries.append(dict(base, id=survivor_id, index=index, reason=SURVIVOR_REASON, details={
            "merged": [records[i]["id"] for i in positions],
            "merged_sha256": sha256_hex(archived_record_text(merged).encode("utf-8"))},
            record_text=archived_record_text(records[index])))
        entries.extend(dict(base, id=records[i]["id"], index=i, reason=DEDUPE_REASON, details={
            "supersededBy": survivor_id, "similarity": round(similarity[i], 4),
            "reason": "near-duplicate of %s (Jaccard %.3f)" % (survivor_id, similarity[i])},
            record_text=archived_record_text(records[i])) for i in positions)
    return sorted(entries, key=lambda e: e["index"])


def dedupe_store(store: Store, threshold: float = 0.85, dry_run: bool = True,
                 force: bool = False, backup: Optional[Callable[[], str]] = None,
                 agents: Optional[Sequence[str]] = None) -> DedupeResult:
    """Find near-duplicate clusters in every agent file and, unless ``dry_run``, merge them.

    A dry run (the default) reads and reports only: it creates nothing. A real run takes the
    maintenance lock, refuses (RefusedError, naming the agents) when it would merge away more
    than half of an agent's records unless ``force``, runs ``backup`` before the first change,
    archives every merged record and each survivor's old version (undo: ``prune --undo RUN``),
    then rewrites each file under the runtime's lock, keeping its gzip or plain encoding.
    Raises UsageError for a threshold outside (0, 1], StoreBusyError.
    """
    if not (_number(threshold) is not None and 0 < threshold <= 1):
        raise UsageError("dedupe threshold %r must be in (0, 1]" % (threshold,))
    lock = contextlib.nullcontext() if dry_run else store.maintenance_lock()
    with lock, paused_cyclic_gc():
        clock = time.monotonic()
        result = DedupeResult(dry_run=dry_run, threshold=threshold)
        plans = _plan_dedupe(store, threshold, force, agents, result)
        if not dry_run and plans:
            if result.refused_agents:
                raise RefusedError("dedupe would merge away more than half of the records of "
                                   "%s; check the threshold, then rerun with --force"
                                   % ", ".join(result.refused_agents))
            _apply_dedupe(store, plans, backup, result)
        result.seconds = time.monotonic() - clock
    return result


def _plan_dedupe(store: Store, threshold: float, force: bool, agents: Optional[Sequence[str]],
                 result: DedupeResult) -> List[_DedupeFile]:
    """Plan every readable file (one in memory at a time); mark agents the guard refuses."""
    plans = []
    for agent in store.select_agents(agents):
        mine, total = [], 0
        for data_file in store.record_files(agent):
            try:
                records, digest = store.load_records_digest(data_file)
            except CorruptFileError as exc:
                result.unreadable.append(str(exc))
                continue
            result.files += 1
            result.records += len(records)
            total += len(records)
            plan = _plan_dedupe_file(store, data_file, records, threshold, result, digest)
            if plan.clusters:
                mine.append(plan)
            del records
        merged = sum(len(members) for p in mine for _, members in p.clusters)
        if merged * 2 > total and not force:
            result.refused_agents.append(agent)
        plans.extend(mine)
    result.merged = sum(len(c.members) for c in result.clusters)
    return plans


def _apply_dedupe(store: Store, plans: List[_DedupeFile], backup: Optional[Callable[[], str]],
                  result: DedupeResult) -> None:
    """Back up, archive and rewrite each planned file; then refresh the supersede map."""
    result.run_id = new_run_id("dedupe", store.now)
    if backup is not None:
        result.backup_id = backup()
    archive = Archive(store)
    archive.begin(result.run_id, "dedupe")
    result.merged = 0
    for part, plan in enumerate(plans, 1):
        result.merged += _apply_dedupe_file(store, archive, result, plan, part)
    entries = sum(len(archive.read_part(result.run_id, n, records=False))
                  for n in archive.part_names(result.run_id))
    archive.finish(result.run_id, {"entries": entries,
                                   "parts": len(archive.part_names(result.run_id))})
    result.repointed = rebuild_supersede_map(store)


def _apply_dedupe_file(store: Store, archive: Archive, result: DedupeResult, plan: _DedupeFile,
                       part: int) -> int:
    """Merge one file's clusters under its lock: archive part first, then the rewrite.
    A file the runtime changed since planning is planned again from what is there now."""
    with _left_alone(result.busy, result.unreadable):
        with store.rewrite(plan.data_file.path) as job:
            if text_digest(job.text) != plan.digest:
                plan = _plan_dedupe_file(store, plan.data_file, job.data, result.threshold, None)
            merges = _merged_survivors(plan, job.data)
            if not merges:
                return 0
            similarity = {c.index: score for _, members in plan.clusters for c, score in members}
            archive.write_part(result.run_id, part,
                               _dedupe_entries(plan, job.data, merges, similarity))
            gone = {i for _, positions in merges.values() for i in positions}
            job.data = [merges[i][0] if i in merges else record
                        for i, record in enumerate(job.data) if i not in gone]
            job.changed = True
        return len(gone)
    return 0  # left alone: busy or unreadable


def supersede_map(store: Store) -> Dict[str, Dict[str, str]]:
    """``agent/type/id`` -> {superseded_by, merged_into, run} of merged records; read-only."""
    return store.read_state_lenient(SUPERSEDE_STATE, {}) if store.state_dir.is_dir() else {}


# -- optimize: the steps, in order, under one lock, with one safety backup --

@dataclasses.dataclass
class OptimizeRun:
    """What a step of ``optimize`` is given: ``backup()`` takes the run's one safety backup
    (the first step about to change something calls it) and returns its id; None: no backup."""

    store: Store
    config: OptimizeConfig
    dry_run: bool
    force: bool
    backup: Optional[Callable[[], str]]


@dataclasses.dataclass(frozen=True)
class OptimizeStep:
    """One step of ``optimize``: its runner, the history operation it is recorded as, and
    the summary of its result that the history keeps."""

    run: Callable[[OptimizeRun], Any]
    operation: str
    summary: Callable[[Any], Dict[str, Any]]


@dataclasses.dataclass
class OptimizeResult(OperationResult):
    """What ``optimize`` ran: each step's result, by step name, in the order run. Its exit
    code is the one precedence over what the steps left: busy files, refused agents (only a
    dry run gets here), unreadable files."""

    action: str
    dry_run: bool
    order: List[str]
    steps: Dict[str, Any]
    PARTIAL_FIELDS: ClassVar[Tuple[str, ...]] = ("unreadable",)

    def _of_steps(self, name: str) -> List[Any]:
        return [item for result in self.steps.values()
                for item in getattr(result, name, None) or []]

    busy = property(lambda self: self._of_steps("busy"))
    refused = property(lambda self: self._of_steps("refused"))
    unreadable = property(lambda self: self._of_steps("unreadable"))


def _transcode_summary(result: TranscodeResult) -> Dict[str, Any]:
    return {"direction": result.operation, "files": len(result.files),
            "bytes_before": result.bytes_before, "bytes_after": result.bytes_after,
            "unreadable": len(result.unreadable), "backup_id": result.backup_id}


def _transcode(run: OptimizeRun, to_gzip: bool) -> TranscodeResult:
    return transcode_store(run.store, to_gzip, run.config.compress_age_days, run.dry_run,
                           run.config.workers, run.backup if to_gzip else None)


OPTIMIZE_STEPS: Dict[str, OptimizeStep] = {
    "gc": OptimizeStep(
        lambda run: collect_garbage(run.store, run.dry_run, run.force, run.backup), "gc",
        lambda r: {"run_id": r.run_id, "removed": len(r.removed), "by_reason": r.by_reason,
                   "stale_locks": len(r.stale_locks), "temp_files": len(r.temp_files),
                   "orphaned_state": len(r.orphaned_state), "backup_id": r.backup_id}),
    "dedupe": OptimizeStep(
        lambda run: dedupe_store(run.store, run.config.dedupe_threshold, run.dry_run,
                                 run.force, run.backup), "dedupe",
        lambda r: {"run_id": r.run_id, "merged": r.merged, "clusters": len(r.clusters),
                   "held_apart": len(r.held_apart), "backup_id": r.backup_id}),
    "compress": OptimizeStep(lambda run: _transcode(run, True), "compress", _transcode_summary),
    "decompress": OptimizeStep(lambda run: _transcode(run, False), "compress",
                               _transcode_summary),
    "index": OptimizeStep(
        lambda run: MemoryIndex(run.store).refresh(dry_run=run.dry_run), "index",
        lambda r: {"files": r.files, "files_reread": len(r.files_reread), "records": r.records,
                   "bytes": r.index_bytes, "rebuilt": r.rebuilt}),
    "warm-cache": OptimizeStep(
        lambda run: warm_cache(run.store, run.config.cache_max_bytes, run.dry_run),
        "warm-cache", lambda r: {"records": r.records, "bytes": r.bytes, "budget": r.budget}),
}
OPTIMIZE_ACTIONS = ("all", "index", "build-index", "compress", "decompress", "warm-cache", "gc",
                    "dedupe")
_OPTIMIZE_ORDER = ("gc", "compress", "index", "warm-cache")


def optimize_steps(action: str, config: OptimizeConfig) -> Tuple[str, ...]:
    """The steps ``action`` runs, in order: ``all`` is gc, [dedupe,] compress, index,
    warm-cache (dedupe only when ``config.dedupe``); ``build-index`` is ``index``."""
    if action not in OPTIMIZE_ACTIONS:
        raise UsageError("unknown optimize action %r (one of: %s)"
                         % (action, ", ".join(OPTIMIZE_ACTIONS)))
    if action != "all":
        return ("index" if action == "build-index" else action,)
    return ("gc", "dedupe") + _OPTIMIZE_ORDER[1:] if config.dedupe else _OPTIMIZE_ORDER


def optimize(store: StoreLike, action: str, config: Optional[OptimizeConfig] = None,
             dry_run: bool = False, force: bool = False) -> OptimizeResult:
    """Run optimize ``action`` (see ``optimize_steps``) on the store.

    A real run holds the maintenance lock throughout, takes at most one safety backup (before
    the first step that changes something; none when ``config.create_backup`` is False) and
    records each step in the run history that monitoring reads (``decompress`` as
    ``compress``). A dry run takes no lock and writes nothing, history included. ``force``
    lets gc and dedupe remove more than half of an agent's records. Raises UsageError,
    RefusedError, StoreBusyError; a step's error stops the run (earlier steps stay recorded).
    """
    store = as_store(store, "optimize")
    config = config or OptimizeConfig()
    steps = optimize_steps(action, config)
    action = "index" if action == "build-index" else action
    # functools.cache: the first step that calls backup() takes it, the others get its id.
    backup = (functools.cache(lambda: safety_backup(store, "before optimize %s" % action))
              if config.create_backup else None)
    run = OptimizeRun(store, config, dry_run, force, backup)
    results: Dict[str, Any] = {}
    with contextlib.nullcontext() if dry_run else store.maintenance_lock():
        for name in steps:
            step = OPTIMIZE_STEPS[name]
            with store.operation(step.operation) as op:
                results[name] = step.run(run)
                if not dry_run:
                    op.summary = step.summary(results[name])
    return OptimizeResult(action=action, dry_run=dry_run, order=list(results), steps=results)


__all__ += ["OptimizeConfig", "optimize_config_for", "TranscodeResult", "transcode_store",
            "GcReason", "GcResult", "GarbageCollector", "collect_garbage", "stale_lock_dirs",
            "DedupeCluster", "DedupeResult", "dedupe_store", "merge_records",
            "rebuild_supersede_map", "supersede_map", "knowledge_fragments", "outcome_conflict",
            "guard_conflict", "jaccard", "success_evidence", "outcome_evidence", "outcome_counts",
            "OptimizeRun", "OptimizeStep", "OptimizeResult", "OPTIMIZE_STEPS", "OPTIMIZE_ACTIONS",
            "optimize_steps", "optimize"]


# =============================================================================
# 13. Migration
# Schema detection per record and step-by-step migration to 2.0.0.
# =============================================================================


@functools.total_ordering
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

    @classmethod
    def from_stamp(cls, value: Any) -> Optional["SchemaVersion"]:
        """The version a stamp such as ``"1.2.0"`` or ``"v1.2"`` names, else None."""
        if not isinstance(value, str):
            return None
        text = value.strip().lstrip("vV")
        text = text + ".0" if text.count(".") == 1 else text
        return next((version for version in cls if version.value == text), None)

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
    return {**record, **{key: defaults[key]() for key in missing}} if missing else record


def _without_defaults(record: Dict[str, Any], defaults: Dict[str, Any], step: str,
                      same: Callable[[Any, Any], bool] = operator.eq, label: str = ""
                      ) -> Dict[str, Any]:
    if not any(key in record for key in defaults):
        return record
    for key, empty in defaults.items():
        if key in record and not same(record[key], empty):
            raise LossyStepError("step %s would drop %s%s = %s"
                                 % (step, label, key, _short(record[key])))
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
    successes, observed, exact = outcome_counts(metrics["successRate"],
                                                metrics["executionCount"])
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
            out["metrics"] = _without_defaults(metrics, {k: derived.get(k) for k in _COUNT_KEYS},
                                               self.down_name, _same, "metrics.")
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


def _walk(rtype: RecordType, record: Dict[str, Any], version: SchemaVersion,
          target: SchemaVersion) -> List[Tuple[str, Any, Any]]:
    """(step name, before, after) of every step that changes the record on its way to
    ``target``, the stamp of a pre-2.0.0 target last."""
    if version > target:
        moves = [(step.down_name, step.down) for step in reversed(MIGRATION_STEPS)
                 if step.target <= version and step.source >= target]
    else:
        # Every step up to the target runs: each only fills what is missing, so a record that
        # claims a version but lacks one of its fields (e.g. runtime-dropped tags) is repaired.
        moves = [(step.name, step.up) for step in MIGRATION_STEPS if step.target <= target]
    changes = []
    for name, move in moves + [("stamp", functools.partial(_restamp, target=target))]:
        after = move(rtype, record)
        if after is not record:
            changes.append((name, record, after))
            record = after
    return changes


def _restamp(rtype: RecordType, record: Dict[str, Any], target: SchemaVersion
             ) -> Dict[str, Any]:
    if target is SchemaVersion.V2_0_0 or record.get(VERSION_STAMP, target.value) == target.value:
        return record
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
        changes = _walk(rtype, record, version, target)
    except LossyStepError as exc:
        return RecordMigration(record, version, [], str(exc), lossy=True)
    except UnmigratableRecordError as exc:
        return RecordMigration(record, version, [], str(exc))
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
    records: List[Any]  # emptied by a worker process: only the counts cross back
    count: int = 0
    changed: int = 0
    versions: Dict[str, int] = dataclasses.field(default_factory=dict)
    steps: Dict[str, int] = dataclasses.field(default_factory=dict)
    samples: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    reported: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    refused: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, index: int, outcome: RecordMigration) -> None:
        """Account for one record's outcome."""
        self.records.append(outcome.record)
        self.count += 1
        _add_counts(self.versions, outcome.version.value if outcome.version else "unplaceable")
        if outcome.problem:
            where = {"file": self.file, "index": index, "id": _id_key(outcome.record),
                     "problem": outcome.problem}
            (self.refused if outcome.lossy else self.reported).append(where)
        self.changed += bool(outcome.changes)
        for name, before, after in outcome.changes:
            _add_counts(self.steps, name)
            if not any(s["step"] == name for s in self.samples):
                self.samples.append({"step": name, "file": self.file, "index": index,
                                     "id": _id_key(before), "diff": record_diff(before, after)})


def migrate_records(rel: str, rtype: RecordType, records: List[Any], target: SchemaVersion
                    ) -> FileMigration:
    """Migrate the records of one file (in memory); the caller writes ``records`` back."""
    outcome = FileMigration(file=rel, records=[])
    for index, record in enumerate(records):
        outcome.add(index, migrate_record(rtype, record, target))
    return outcome


# -- results ------------------------------------------------------------------

@dataclasses.dataclass
class MigrationResult(OperationResult):
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
    busy: List[str] = dataclasses.field(default_factory=list)  # files left as they were

    def absorb(self, outcome: FileMigration) -> None:
        """Add one file's outcome."""
        self.records += outcome.count
        self.changed += outcome.changed
        for into, counts in ((self.from_versions, outcome.versions), (self.steps, outcome.steps)):
            for name, count in counts.items():
                _add_counts(into, name, count)
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

    PARTIAL_FIELDS = ("unreadable", "reported")  # files or records skipped


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
class DetectionReport(OperationResult):
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

    def __init__(self, store: StoreLike, agents: Optional[Sequence[str]] = None,
                 progress: Optional[ProgressCallback] = None):
        self.store = store = as_store(store, "MigrationManager")
        self.agents = agents
        self.progress = progress or store.progress
        self.program = "aml"  # how hints name the program (the CLI sets what the user typed)

    def _record_files(self) -> List[DataFile]:
        return [f for agent in self.store.select_agents(self.agents)
                for f in self.store.record_files(agent)]

    def history(self) -> List[Dict[str, Any]]:
        """Recorded migration runs, oldest first; raises IntegrityError if the file is corrupt."""
        return self.store.read_state(MIGRATIONS_STATE, [])

    def detect(self) -> DetectionReport:
        """Versions of every record, per file and agent; read-only, creates nothing."""
        report = DetectionReport()
        for part in map_files(self._detect_file, self._record_files(), self.progress, "migrate"):
            report.unreadable.extend(part.unreadable)
            report.unplaced.extend(part.unplaced)
            report.runtime_invalid.extend(part.runtime_invalid)
            for entry in part.files:
                report.add_file(entry)
        try:
            report.history = self.history()
        except IntegrityError as exc:
            report.history_error = str(exc)
        return report

    def _detect_file(self, data_file: DataFile) -> DetectionReport:
        """One file's part of the report (detect adds the parts up)."""
        report, rtype = DetectionReport(), data_file.rtype
        rel = data_file.path.relative_to(self.store.root).as_posix()
        try:
            records, _ = self.store.load_records(data_file)
        except CorruptFileError as exc:
            report.unreadable.append(str(exc))
            return report
        entry = FileVersions(rel, data_file.agent, rtype.value, {})
        for index, record in enumerate(records):
            version, why = place_record(rtype, record)
            _add_counts(entry.versions, version.value if version else "unplaceable")
            where = {"file": rel, "index": index, "id": _id_key(record)}
            if version is None:
                report.unplaced.append(dict(where, problem=why))
                continue
            problems = runtime_problems(rtype, record)
            if problems:
                entry.runtime_invalid += 1
                report.runtime_invalid.append(dict(where, problem="; ".join(problems)))
        entry.versions = sorted_versions(entry.versions)
        report.files.append(entry)
        return report

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
        with self.store.operation("migrate") as op, self.store.maintenance_lock():
            self.store.cleanup_temp_files()
            if target is not SchemaVersion.latest():
                plan = self._scan(target)
                if plan.refused:  # nothing is written when a step down would lose information
                    raise RefusedError(self.refusal_message(plan))
            result = self._apply(target, backup)
            result.seconds = op.seconds
            op.record(self._record(result))
        return result

    def _scan(self, target: SchemaVersion) -> MigrationResult:
        result = MigrationResult(target=target.value, dry_run=True)
        self._migrate_files(self._record_files(), target, False, result)
        return result

    def _apply(self, target: SchemaVersion, backup: bool) -> MigrationResult:
        result = MigrationResult(target=target.value, dry_run=False,
                                 run_id=new_run_id("migrate", self.store.now))
        files = self._record_files()
        while backup and files:  # until the backup exists nothing may be written
            data_file = files[0]
            with _left_alone(result.busy, result.unreadable):
                if self._has_changes(data_file, target, result):
                    result.backup_id = self._safety_backup(target)
                    break
            files.pop(0)  # unchanged and counted, or left alone
        self._migrate_files(files, target, True, result)
        return result

    def _migrate_files(self, files: List[DataFile], target: SchemaVersion, write: bool,
                       result: MigrationResult) -> None:
        """Migrate (or, without ``write``, plan) each file through map_files, into ``result``."""
        done = map_files(functools.partial(self._migrate_file, target=target, write=write),
                         files, self.progress, "migrate")
        for outcome, busy, unreadable in done:
            result.busy.extend(busy)
            result.unreadable.extend(unreadable)
            if outcome is not None:
                result.absorb(outcome)

    def _migrate_file(self, data_file: DataFile, target: SchemaVersion, write: bool
                      ) -> Tuple[Optional[FileMigration], List[str], List[str]]:
        """(outcome, busy, unreadable) of one file, rewritten under its lock when ``write``."""
        rel = data_file.path.relative_to(self.store.root).as_posix()
        outcome: Optional[FileMigration] = None
        busy: List[str] = []
        unreadable: List[str] = []
        with _left_alone(busy, unreadable):
            if write:
                outcome = self._rewrite(data_file, rel, target)
            else:
                records, _ = self.store.load_records(data_file)
                outcome = migrate_records(rel, data_file.rtype, records, target)
        if outcome is not None:
            outcome.records = []
        return outcome, busy, unreadable

    def _safety_backup(self, target: SchemaVersion) -> str:
        try:
            return safety_backup(self.store, "before migrate to %s" % target.value)
        except RefusedError as exc:
            raise RefusedError("migrate refused, nothing was changed: the safety backup failed "
                               "(%s); fix it or pass --no-backup" % exc) from None

    def _has_changes(self, data_file: DataFile, target: SchemaVersion,
                     result: MigrationResult) -> bool:
        # Until the backup exists nothing may be written: peek without locks first.
        records, _ = self.store.load_records(data_file)
        rel = data_file.path.relative_to(self.store.root).as_posix()
        outcome = migrate_records(rel, data_file.rtype, records, target)
        if outcome.changed:
            return True
        result.absorb(outcome)
        return False

    def _rewrite(self, data_file: DataFile, rel: str, target: SchemaVersion) -> FileMigration:
        with self.store.rewrite(data_file.path) as job:
            outcome = migrate_records(rel, data_file.rtype, job.data, target)
            if outcome.changed:
                job.data = outcome.records
                job.changed = True
        return outcome

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
                "whose records were %s): %s %s backup restore %s"
                % (run["backup_id"], run.get("when"), versions_text(run.get("from", {})),
                   self.program, shlex.quote(str(self.store.root)), run["backup_id"]))

    def _record(self, result: MigrationResult) -> Dict[str, Any]:
        """Append the run to ``.aml/migrations.json``; its summary for the run history."""
        counts = {"records": result.records, "changed": result.changed,
                  "files_changed": len(result.files_changed), "reported": len(result.reported),
                  "unreadable_files": len(result.unreadable), "steps": result.steps}
        entry = {"run_id": result.run_id, "when": format_timestamp(self.store.now),
                 "from": sorted_versions(result.from_versions), "to": result.target,
                 "counts": counts, "backup_id": result.backup_id}
        runs = self.store.read_state_lenient(MIGRATIONS_STATE, [])
        self.store.write_state(MIGRATIONS_STATE, (runs + [entry])[-200:])
        return dict(counts, run_id=result.run_id, to=result.target, backup_id=result.backup_id)


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

_LIMIT = number_setting  # a threshold: a non-negative number


@dataclasses.dataclass(frozen=True)
class MonitorThresholds(collections.abc.Mapping):
    """The health and metrics thresholds; read like a dict (``t["backup_max_age_hours"]``)."""

    SETTING_NOUN = "threshold"
    # SPEC 5
    agent_memory_warning_mb: float = _LIMIT(60)
    agent_memory_critical_mb: float = _LIMIT(80)
    global_memory_warning_mb: float = _LIMIT(600)
    global_memory_critical_mb: float = _LIMIT(800)
    cache_hit_rate_warning: float = _LIMIT(0.5)
    query_time_warning_ms: float = _LIMIT(100)
    alert_retention_days: float = _LIMIT(7)
    # aml's own: backup and maintenance recency, and how many lookups a hit rate needs.
    # Each scheduled job warns when its last success is older than one period of the
    # crontab.example schedule plus two hours (so the 06:00 check sees a missed 02:00 backup
    # the same morning), and goes critical after two periods.
    backup_max_age_hours: float = _LIMIT(26)
    backup_critical_age_hours: float = _LIMIT(50)
    index_max_age_hours: float = _LIMIT(26)
    index_critical_age_hours: float = _LIMIT(50)
    prune_max_age_hours: float = _LIMIT(170)
    prune_critical_age_hours: float = _LIMIT(338)
    optimize_max_age_hours: float = _LIMIT(746)
    optimize_critical_age_hours: float = _LIMIT(1490)
    cache_min_lookups: float = _LIMIT(20)

    def __getitem__(self, key: str) -> float:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def checked(self) -> "MonitorThresholds":
        """Return self; raises UsageError when a warning level is above its critical one."""
        pairs = [(s + "_memory_warning_mb", s + "_memory_critical_mb") for s in ("agent", "global")]
        pairs += [(j + "_max_age_hours", j + "_critical_age_hours") for j in JOB_OPERATIONS]
        for warn, crit in pairs:
            if self[warn] > self[crit]:
                raise UsageError("%s (%g) is above %s (%g)" % (warn, self[warn], crit, self[crit]))
        return self


DEFAULT_THRESHOLDS = MonitorThresholds()
DEFAULT_SERVE_INTERVAL = 60.0


@dataclasses.dataclass(frozen=True)
class MonitorSettings:
    """The aml config ``monitor`` keys that are not thresholds (flags win)."""

    webhook_url: Optional[str] = setting(
        None, lambda value: value is None or isinstance(value, str), "must be a URL")
    webhook_timeout: float = number_setting(5.0, above=True)
    serve_interval: float = setting(
        DEFAULT_SERVE_INTERVAL, lambda value: _finite(value) and 0 < value <= 86400,
        "the serve interval must be a number of seconds above 0 (at most a day)")


METRICS_HISTORY_MAX = 1000
GROWTH_WINDOW_DAYS = 30.0
MAINTENANCE_OPERATIONS = ("prune", "gc", "compress", "index", "warm-cache", "rotate", "migrate")
TIMED_OPERATIONS = ("prune", "backup", "index", "migrate")
STATE_LOCK_WAIT = 5.0  # under the 10 s after which Nagios kills a plugin by default
# A file modified this recently is re-parsed next time even if size and mtime match, because
# a second write within the same mtime tick would otherwise hide from the cache.
INTEGRITY_RACY_SECONDS = 2.0
# A cached "parses" also needs the same content sample: the first and last 16 KiB and 16
# blocks of 4 KiB spread between (a file up to 96 KiB is hashed whole), so bit rot that keeps
# size and mtime is caught where it hits a sampled byte; every cached file is parsed in full
# again at least every INTEGRITY_RECHECK_DAYS, which catches the rest.
INTEGRITY_EDGE_BYTES = 16 * 1024
INTEGRITY_SAMPLE_BYTES = 4096
INTEGRITY_SAMPLES = 16
INTEGRITY_RECHECK_DAYS = 7.0
_MB = 1024 * 1024
_DAY_SECONDS = 86400.0


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


def _monitor_layer(config_section: Optional[Dict[str, Any]], other: type
                   ) -> Tuple[str, Dict[str, Any]]:
    # The aml config ``monitor`` section holds thresholds and settings side by side: each
    # reader takes it without the other's keys (anything else is an unknown key).
    return ("aml config [monitor]", {k: v for k, v in (config_section or {}).items()
                                     if k not in other.__dataclass_fields__})


def resolve_thresholds(store: Store, config_section: Optional[Dict[str, Any]] = None,
                       flags: Optional["collections.abc.Mapping[str, Any]"] = None
                       ) -> MonitorThresholds:
    """Thresholds: defaults < store config.json < aml config ``monitor`` < flags.

    Raises UsageError for an unknown key, a negative value or a warning above its critical.
    """
    layers = [("%s (storage, performance)" % store.config_path(),
               _store_config_thresholds(store)),
              _monitor_layer(config_section, MonitorSettings),
              ("threshold override", dict(flags or {}))]
    # a valid number is held as a float, as the store's and the flags' are (a bad one is
    # left as given, for the error)
    layers = [(source, {k: float(v) if _finite(v) and v >= 0 else v for k, v in values.items()})
              for source, values in layers]
    return layer_config(MonitorThresholds(), layers).checked()


def monitor_settings_for(store: Store, config_section: Optional[Dict[str, Any]] = None,
                         **overrides: Any) -> MonitorSettings:
    """MonitorSettings: defaults < aml config ``monitor`` < ``overrides`` (flags; None means
    unset). Raises UsageError naming the field and layer of a bad value."""
    flags = {k: v for k, v in overrides.items() if v is not None}
    return layer_config(MonitorSettings(), (_monitor_layer(config_section, MonitorThresholds),
                                            ("command line", flags)))


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
    totals: Dict[str, int] = dataclasses.field(default_factory=dict)  # per type and "total"

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
class MetricsReport(OperationResult):
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
    totals: Dict[str, int] = dataclasses.field(default_factory=dict)  # per type and "total"
    # per scheduled job (JOB_OPERATIONS): {"last_success": ts or None, "last_failure": ...}
    jobs: Dict[str, Dict[str, Optional[str]]] = dataclasses.field(default_factory=dict)

    PARTIAL_FIELDS = ("unreadable",)  # its warnings leave exit 0


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
class AlertChanges(OperationResult):
    """What one alert evaluation changed, and webhook delivery problems (never fatal)."""

    fired: List[Alert] = dataclasses.field(default_factory=list)
    resolved: List[Alert] = dataclasses.field(default_factory=list)
    purged: int = 0
    open: List[Alert] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)

    PARTIAL_FIELDS = ()


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
    return next((e for e in reversed(history) if e.get("operation") in wanted), None)


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


def _copy_problems(store: Store, history: List[Dict[str, Any]],
                   thresholds: Dict[str, Any]) -> List[Problem]:
    """The off-machine copy (``backup copy``, ``auto`` with copy_to): a WARNING when the
    last copy (or verify --repo) failed, or the last good copy is older than
    backup_max_age_hours. Nothing when no copy was ever made."""
    last = _last_entry(history, ["copy", "copy_verify"])
    if last is None:
        return []
    summary = last.get("summary") if isinstance(last.get("summary"), dict) else {}
    if summary.get("ok") is False:
        what = "copy to" if last.get("operation") == "copy" else "verify of the copy at"
        return [Problem("backup-copy", HealthStatus.WARNING, "last %s %s failed: %s" % (
            what, summary.get("to"), summary.get("error") or "verification failed"))]
    good = next((e for e in reversed(history) if e.get("operation") == "copy"
                 and isinstance(e.get("summary"), dict) and e["summary"].get("ok")), None)
    started = parse_timestamp(good.get("started")) if good else None
    if started is None:
        return []
    hours = days_between(started, store.now) * 24
    if hours <= thresholds["backup_max_age_hours"]:
        return []
    return [Problem("backup-copy", HealthStatus.WARNING, "last copy to %s is %.0f h old "
                    "(limit %g h)" % (good["summary"].get("to"), hours,
                                      thresholds["backup_max_age_hours"]))]


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

def _record_totals(records: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """Records per type over every state (active, inactive, invalid), and their ``total``."""
    totals = {rtype: sum(states.values()) for rtype, states in records.items()}
    totals["total"] = sum(totals.values())
    return totals


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
    metrics.totals = _record_totals(metrics.records)
    return metrics, loaded, seconds


def _sum_counts(agents: List[AgentMetrics]) -> Dict[str, Dict[str, int]]:
    return {rtype: {state: sum(a.records[rtype][state] for a in agents) for state in states}
            for rtype, states in _empty_counts().items()}


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
    limit_bytes, days = int(limit_mb * _MB), None
    if current >= limit_bytes:
        days, note = 0.0, "already reached"
    elif rate is None:
        note = "no growth data: no sample an hour or more before this run"
    elif rate <= 0:
        note = "not growing"
    else:
        days, note = round((limit_bytes - current) / rate, 1), "at the current growth"
    return LimitForecast(limit, subject, limit_bytes, current, rate, days, note)


def _new_sample(report: MetricsReport) -> Dict[str, Any]:
    return {"at": format_timestamp(report.taken_at), "total_bytes": report.total_bytes,
            "records": sum(a.record_total for a in report.agents),
            "agents": {a.agent: _sample_agent(a) for a in report.agents}}


def _sample_agent(agent: AgentMetrics) -> Dict[str, Any]:
    # "unreadable" marks a record count that misses files, so charts draw a gap, not a drop.
    entry: Dict[str, Any] = {"bytes": agent.bytes, "records": agent.record_total}
    if agent.unreadable:
        entry["unreadable"] = len(agent.unreadable)
    return entry


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
                       if p.is_file() and not is_transient_entry(p.name))
    return targets


def _parse_problem(path: Path, expect: Optional[type], objects: bool) -> Optional[str]:
    """None when the file parses as the runtime needs it, else the problem."""
    try:
        # the runtime's own config.json may be a link (aml never writes it); data files not
        if path.name == "config.json":
            data = load_json_text(path, expect, follow_symlinks=True)[0]
        else:
            data, _fmt = load_json_file(path, expect=expect)
    except CorruptFileError as exc:
        return exc.problem
    if objects:
        for position, element in enumerate(data):
            if not isinstance(element, dict):
                return "element %d is not a JSON object (the runtime rejects the agent)" % position
    return None


def _content_sample(path: Path, size: int) -> str:
    """A cheap content fingerprint (blake2b of sampled ranges, see INTEGRITY_SAMPLES); raises
    OSError."""
    digest = hashlib.blake2b(digest_size=16)
    edge, block = INTEGRITY_EDGE_BYTES, INTEGRITY_SAMPLE_BYTES
    ranges = [(0, -1)]  # a small file is hashed whole
    if size > 2 * edge + INTEGRITY_SAMPLES * block:
        span = size - 2 * edge - block
        ranges = [(0, edge)] + [(edge + span * k // (INTEGRITY_SAMPLES - 1), block)
                                for k in range(INTEGRITY_SAMPLES)] + [(size - edge, edge)]
    with open(str(path), "rb") as handle:
        for offset, length in ranges:
            handle.seek(offset)
            digest.update(handle.read(length))
    return digest.hexdigest()


def _check_one_file(path: Path, expect: Optional[type], objects: bool) -> Optional[str]:
    """Parse a file; a failure is retried once if the file changed meanwhile (live writer)."""
    before = os.lstat(str(path))
    problem = _parse_problem(path, expect, objects)
    if problem is not None:
        after = os.lstat(str(path))
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


class WebhookAnswerError(OSError):
    """The webhook answered, but not with 2xx (a redirect is not a delivery)."""


# Query keys whose values are secrets, and what a token looks like in a value or path segment.
_SECRET_KEY_RE = re.compile(r"token|key|secret|sig|pass|pwd|auth|cred|session|code", re.I)
_SECRET_TOKEN_RE = re.compile(r"(?=[^/]*\d)(?=[^/]*[A-Za-z])[A-Za-z0-9_\-.~+=%]{16,}")


def _url_secrets(url: str) -> List[str]:
    """The parts of a URL that are credentials: userinfo, secret-looking query values and
    token-looking path segments (longest first, for replacing)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]
    found = []
    if "@" in parts.netloc:
        found.append(parts.netloc.rsplit("@", 1)[0])
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if value and (_SECRET_KEY_RE.search(key) or _SECRET_TOKEN_RE.fullmatch(value)):
            found.append(value)
    found.extend(s for s in parts.path.split("/") if _SECRET_TOKEN_RE.fullmatch(s))
    return sorted(set(found), key=len, reverse=True)


def redact_url(text: str, url: Optional[str] = None) -> str:
    """``text`` with the credentials of ``url`` (default: ``text`` itself) replaced by ``***``,
    so a webhook's user:password, token query values and path tokens never reach a cron
    mail or a state file."""
    for secret in _url_secrets(text if url is None else url):
        text = text.replace(secret, "***")
    return text


class _Deadline:
    """One time limit over a whole HTTP exchange (connect, send, read), however slowly a
    server drips bytes: at the limit a timer shuts the socket down, which ends any read."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._watch: List[Tuple[threading.Timer, Any]] = []

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise OSError(errno.ETIMEDOUT, "timed out")
        return left

    def watch(self, sock: Any) -> Any:
        """Arm the timer on a fresh socket (a dup: TLS wrapping detaches the original)."""
        twin = sock.dup()
        timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._expire, (twin,))
        timer.daemon = True
        self._watch.append((timer, twin))
        timer.start()
        return sock

    def _expire(self, twin: Any) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            twin.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for timer, twin in self._watch:
            timer.cancel()
            twin.close()


def _deadline_connection(base: type, deadline: _Deadline) -> type:
    class _Connection(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["timeout"] = deadline.remaining()
            super().__init__(*args, **kwargs)
            create = self._create_connection
            self._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))
    return _Connection


@functools.lru_cache(maxsize=None)
def _webhook_handlers() -> List[type]:
    """[no-redirect, HTTP, HTTPS] urllib handlers of send_webhook, made on first use: urllib's
    HTTP modules cost every command that sends no webhook ~20 ms of start-up to import."""
    import http.client
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        """A 3xx answer is reported, never followed (urllib would resend a POST as a
        body-less GET, possibly to another scheme or host)."""

        def _refuse(self, *args: Any) -> None:
            return None   # the default handler then raises HTTPError for the 3xx status

        http_error_301 = http_error_302 = http_error_303 = http_error_307 = _refuse
        http_error_308 = _refuse

    class _WithDeadline:
        def __init__(self, deadline: _Deadline):
            super().__init__()
            self.deadline = deadline

    class _DeadlineHTTP(_WithDeadline, urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(_deadline_connection(http.client.HTTPConnection,
                                                     self.deadline), req)

    class _DeadlineHTTPS(_WithDeadline, urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(_deadline_connection(http.client.HTTPSConnection,
                                                     self.deadline), req, context=self._context)

    return [_NoRedirect, _DeadlineHTTP, _DeadlineHTTPS]


def send_webhook(url: str, event: str, alert: Alert, store: Store, timeout: float) -> None:
    """POST one alert event as JSON within ``timeout`` seconds in all; raises OSError
    (WebhookAnswerError for an answer other than 2xx, a redirect included) when it fails."""
    import http.client
    import urllib.error
    import urllib.request
    body = json.dumps({"source": "aml", "version": __version__, "event": event,
                       "store": str(store.root.resolve()), "alert": to_jsonable(alert)},
                      sort_keys=True).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "aml/%s" % __version__})
    deadline = _Deadline(timeout)
    no_redirect, plain, tls = _webhook_handlers()
    opener = urllib.request.build_opener(no_redirect, plain(deadline), tls(deadline))
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        redirect = " (a redirect: not followed, the alert was not delivered)" \
            if 300 <= exc.code < 400 else ""
        raise WebhookAnswerError("answered HTTP %d %s%s" % (exc.code, exc.reason, redirect)) \
            from None
    except (OSError, http.client.HTTPException):
        if deadline.expired:
            raise OSError(errno.ETIMEDOUT, "timed out after %g s (the limit is on the whole "
                          "delivery)" % timeout) from None
        raise
    finally:
        deadline.close()


def _check_webhook_url(url: Optional[str]) -> Optional[str]:
    if url and not re.match(r"^https?://", url, re.IGNORECASE):
        raise UsageError("webhook URL %r must start with http:// or https://" % redact_url(url))
    return url or None


# -- the monitor ------------------------------------------------------------------

class MemoryMonitor:
    """Metrics, health checks, alerts and reports for one store.

    ``thresholds`` override the defaults and the store's config.json (see resolve_thresholds).
    Writes only inside ``.aml/`` (metrics history, integrity cache, alerts, run history),
    never into agent data. Raises UsageError for bad thresholds or webhook timeout.
    """

    def __init__(self, store: StoreLike, thresholds: Optional[Dict[str, float]] = None,
                 webhook_url: Optional[str] = None, webhook_timeout: float = 5.0):
        self.store = store = as_store(store, "MemoryMonitor")
        self.thresholds = resolve_thresholds(store, flags=thresholds)
        self.webhook_url = _check_webhook_url(webhook_url)
        self.webhook_timeout = layer_config(MonitorSettings(), [
            ("MemoryMonitor", {"webhook_timeout": webhook_timeout})]).webhook_timeout
        self._integrity_fresh: Optional[Dict[str, Any]] = None

    # -- metrics ------------------------------------------------------------------
    def metrics(self, save: bool = True) -> MetricsReport:
        """Measure the store now; with ``save`` append one sample to the metrics history."""
        store = self.store
        history = self._read_history()[0]  # a history that does not verify: health says so
        agents, loaded, load_ms = [], 0, 0.0
        for name in store.agents():
            agent, count, seconds = _agent_metrics(store, name)
            agents.append(agent)
            loaded, load_ms = loaded + count, load_ms + seconds * 1000.0
        report = self._assemble_metrics(agents, history, load_ms, loaded)
        if save:
            report.warnings.extend(self._save_sample(report))
        return report

    def _assemble_metrics(self, agents: List[AgentMetrics], history: List[Dict[str, Any]],
                          load_ms: float, loaded: int) -> MetricsReport:
        store = self.store
        total, state = store_disk_bytes(store), _dir_bytes(store.state_dir)  # as pruning measures
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
        report.totals = _record_totals(counts)
        report.forecasts = self._forecasts(report, samples)
        report.jobs = self._job_times(history)
        return report

    def _job_times(self, history: List[Dict[str, Any]]) -> Dict[str, Dict[str, Optional[str]]]:
        failures = self._job_failures()
        jobs = {}
        for job, operations in JOB_OPERATIONS.items():
            entry = _last_entry(history, operations)
            failure = failures.get(job)
            jobs[job] = {"last_success": entry.get("started") if entry else None,
                         "last_failure": failure.get("at") if isinstance(failure, dict)
                         else None}
        return jobs

    def _performance(self, history: List[Dict[str, Any]], index: IndexState, load_ms: float,
                     loaded: int, records: int) -> PerformanceMetrics:
        lookup = _indexed_lookup_ms(self.store, index)
        stats = hot_cache_stats(self.store)
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
        growth = report.growth
        subjects = [("global", "store", report.total_bytes, growth.bytes_per_day)]
        subjects += [("agent", a.agent, a.bytes, _agent_rate(self.store, samples, a.agent,
                                                            a.bytes, growth.baseline_at))
                     for a in report.agents]
        return [_forecast(key, subject, self.thresholds[key], current, rate)
                for scope, subject, current, rate in subjects
                for key in (scope + "_memory_warning_mb", scope + "_memory_critical_mb")]

    def _state_doc(self, name: str) -> Dict[str, Any]:
        """A state file's object; {} when it is missing, not an object or does not verify (an
        unverifiable history, cache or failure record only costs what it remembered)."""
        try:
            doc = self.store.read_state(name, {})
        except IntegrityError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _samples(self) -> List[Dict[str, Any]]:
        samples = self._state_doc("metrics-history.json").get("samples", [])
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
        lock = MaintenanceLock(self.store.state_dir,
                               timeout=min(self.store.lock_timeout, STATE_LOCK_WAIT))
        with self.store.optional_write("monitoring state"):
            if not lock.try_acquire():
                return ["another aml run holds the store; monitoring state was not updated"]
            try:
                action()
            finally:
                lock.release()
        return []

    # -- health -------------------------------------------------------------------
    def health(self, evaluate_alerts: bool = True, record: bool = True) -> HealthReport:
        """Run every check; then, under one short lock, save the integrity cache, update
        alerts and record the run (skipped with a warning while another aml run holds the
        store). Webhooks are sent after the lock is released."""
        op = self.store.operation("health")
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
                op.record(summary)

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
    def _finish(name: str, found: List[Optional[Problem]], ok_message: str,
                details: Optional[Dict[str, Any]] = None) -> HealthCheck:
        """The check's result from what it found (None: nothing found there)."""
        problems = [p for p in found if p is not None]
        status = worst_status(p.status for p in problems)
        problems.sort(key=lambda p: -_STATUS_RANK[p.status])  # worst first
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
        """Stale lock folders (exactly those gc removes), aml temp leftovers and ``*.json.gz``
        files the runtime ignores, outside ``.aml/``."""
        messages = {"lock": "stale runtime lock %s (%.0f s old; a crashed writer?)",
                    "temp": "leftover temp file %s (the next aml maintenance run removes it)",
                    "gz": "%s: the runtime never reads *.json.gz files"}
        problems = []
        for entry in scan_leftovers(self.store.root):
            if not entry.in_state:
                rel = _rel(self.store, entry.path)
                text = messages[entry.kind] % ((rel, entry.age) if entry.kind == "lock" else rel)
                problems.append(Problem(rel, HealthStatus.WARNING, text))
        return problems

    def _check_size(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Per-agent and whole-store bytes against the warning and critical thresholds."""
        t, total = self.thresholds, store_disk_bytes(self.store)
        sizes = {a: agent_disk_bytes(self.store, a) for a in self.store.agents()}
        problems = [self._size_problem("store", total, "global")]
        problems += [self._size_problem(a, size, "agent") for a, size in sorted(sizes.items())]
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
        problems, ok = [], "index covers every data file (%s)" % human_bytes(index.size_bytes)
        # The runtime writes all day; files changed since a recent refresh are expected (the
        # scheduled `optimize index` re-reads them, get/search scan what is stale).
        entry = _last_entry(history, JOB_OPERATIONS["index"])
        refreshed = parse_timestamp(entry.get("started")) if entry else None
        hours = days_between(refreshed, self.store.now) * 24 if refreshed else None
        recent = hours is not None and hours <= self.thresholds["index_max_age_hours"]
        if index.stale and recent:
            ok = "index refreshed %.1f h ago; %d file(s) changed since" % (hours,
                                                                           len(index.stale))
        elif index.stale:
            names = ", ".join(index.stale[:3]) + (", ..." if len(index.stale) > 3 else "")
            problems.append(Problem("index", HealthStatus.WARNING, "index is stale for %d "
                                    "file(s) (%s) (run: optimize index)"
                                    % (len(index.stale), names)))
        return self._finish("index", problems, ok, details)

    def _check_backup(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """A verified backup whose manifest exists, recent enough; the last run did not fail."""
        entry = _last_verified_backup(self.store, history)
        failed = self._failure_note("backup", entry)
        copies = _copy_problems(self.store, history, self.thresholds)
        if entry is None:
            problem = Problem("backup", HealthStatus.WARNING, (failed or "no verified backup "
                              "yet") + " (run: backup create)")
            return self._finish("backup", [problem] + copies, "", {"failed": failed})
        started = parse_timestamp(entry.get("started")) or self.store.now
        hours = days_between(started, self.store.now) * 24
        details = {"backup_id": entry["summary"].get("backup_id"), "age_hours": round(hours, 2),
                   "failed": failed}
        problem = self._overdue("backup", "last verified backup", hours, failed)
        return self._finish("backup", [problem] + copies,
                            "verified backup %s, %.1f h old" % (details["backup_id"], hours),
                            details)

    def _job_failures(self) -> Dict[str, Any]:
        return self._state_doc(JOB_FAILURES_FILE)

    def _failure_note(self, job: str, success: Optional[Dict[str, Any]]) -> Optional[str]:
        """"<job> failed at T: reason" when the job's newest run failed, else None."""
        failure = self._job_failures().get(job)
        failed_at = parse_timestamp(failure.get("at")) if isinstance(failure, dict) else None
        succeeded = parse_timestamp(success.get("started")) if success else None
        if failed_at is None or (succeeded is not None and succeeded > failed_at):
            return None
        return "%s failed at %s: %s" % (failure.get("command") or job, failure["at"],
                                        failure.get("reason"))

    def _overdue(self, job: str, what: str, hours: float, failed: Optional[str]
                 ) -> Optional[Problem]:
        """One problem for a job: its failure and/or its last success past the limits."""
        t, notes, status = self.thresholds, [failed] if failed else [], HealthStatus.WARNING
        for level, key in ((HealthStatus.CRITICAL, job + "_critical_age_hours"),
                           (HealthStatus.WARNING, job + "_max_age_hours")):
            if hours > t[key]:
                notes.append("%s is %.0f h old (limit %g h)" % (what, hours, t[key]))
                status = level
                break
        return Problem(job, status, "; ".join(notes)) if notes else None

    def _check_integrity(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Parse every data file (cached by size, mtime and a content sample, and re-parsed
        every INTEGRITY_RECHECK_DAYS); any failure is critical."""
        cache = self._integrity_cache()
        targets = _integrity_targets(self.store)
        fresh, problems, parsed = {}, [], 0
        for path, expect, objects in targets:
            rel = _rel(self.store, path)
            try:
                info = path.stat()
                sample = _content_sample(path, info.st_size)
            except FileNotFoundError:
                continue  # removed since listing (a live writer); nothing left to check
            except OSError as exc:
                problems.append(Problem(rel, HealthStatus.CRITICAL,
                                        "%s: cannot read (%s)" % (rel, exc.strerror or exc)))
                continue
            key = [info.st_size, info.st_mtime_ns]
            cached = cache.get(rel)
            if cached and self._still_good(cached, key, sample):
                fresh[rel] = cached
                continue
            problem = _check_one_file(path, expect, objects)
            parsed += 1
            if problem is not None:
                problems.append(Problem(rel, HealthStatus.CRITICAL, "%s: %s" % (rel, problem)))
            elif time.time() - info.st_mtime >= INTEGRITY_RACY_SECONDS:
                fresh[rel] = {"key": key, "ok": True, "sample": sample,
                              "checked": format_timestamp(self.store.now)}
        self._integrity_fresh = fresh  # saved by health() under the state lock
        return self._finish("integrity", problems,
                            "%d files parse (%d parsed now, %d unchanged since the last check)"
                            % (len(targets), parsed, len(targets) - parsed),
                            {"files": len(targets), "parsed": parsed})

    def _still_good(self, cached: Dict[str, Any], key: List[int], sample: str) -> bool:
        """A cached parse still counts: same size, mtime and sample, parsed recently enough."""
        checked = parse_timestamp(cached.get("checked"))
        return (cached.get("key") == key and cached.get("ok") is True
                and cached.get("sample") == sample and checked is not None
                and (self.store.now - checked).total_seconds()
                < INTEGRITY_RECHECK_DAYS * 86400.0)

    def _integrity_cache(self) -> Dict[str, Any]:
        files = self._state_doc("integrity.json").get("files")
        return files if isinstance(files, dict) else {}

    def _check_performance(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Indexed lookup time measured now and the recorded hot-cache hit rate."""
        t, problems, known = self.thresholds, [], []
        index = _index_staleness(self.store)
        lookup = _indexed_lookup_ms(self.store, index)
        if lookup.failed:
            problems.append(Problem("lookup", HealthStatus.WARNING, lookup.note))
        if lookup.ms is not None:
            known.append("indexed lookup %.2f ms" % lookup.ms)
            if lookup.ms > t["query_time_warning_ms"]:
                problems.append(Problem("lookup", HealthStatus.WARNING, "indexed lookup took "
                                        "%.1f ms (limit %g ms)" % (lookup.ms,
                                                                   t["query_time_warning_ms"])))
        stats = hot_cache_stats(self.store)
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
            # a built index with files the runtime changed since the last refresh is normal
            # on a live store: not measured this time, nothing unknown about the store
            status = HealthStatus.HEALTHY if index.built and index.stale else \
                HealthStatus.UNKNOWN
            return HealthCheck("performance", status, "nothing to measure: %s; "
                               "fewer than %d cached lookups recorded"
                               % (lookup.note, t["cache_min_lookups"]), [], details)
        return self._finish("performance", problems, ", ".join(known), details)

    def _check_maintenance(self, history: List[Dict[str, Any]]) -> HealthCheck:
        """Each scheduled job (prune, index, optimize) succeeded within its own limit and its
        newest run did not fail; a job that never ran warns once aml has watched the store
        for longer than the job's limit."""
        if (_last_entry(history, MAINTENANCE_OPERATIONS) is None
                and not self._job_failures()):
            return self._finish("maintenance", [Problem(
                "maintenance", HealthStatus.WARNING, "aml maintenance has never run on this "
                "store (see crontab.example)")], "")
        starts = [parse_timestamp(e.get("started")) for e in history]
        since = min((s for s in starts if s is not None), default=self.store.now)
        problems, known, details = [], [], {}
        for job in ("prune", "index", "optimize"):
            entry = _last_entry(history, JOB_OPERATIONS[job])
            started = parse_timestamp(entry.get("started")) if entry else None
            hours = days_between(started or since, self.store.now) * 24
            details[job] = {"last_success": entry.get("started") if entry else None,
                            "age_hours": round(hours, 2) if started else None}
            what = "last successful %s" % job if started else \
                "%s never ran; aml's first run here" % job
            problems.append(self._overdue(job, what, hours, self._failure_note(job, entry)))
            if started:
                known.append("%s %.1f days ago" % (job, hours / 24))
        return self._finish("maintenance", problems, "last success: " + (", ".join(known)
                            or "none yet"), details)

    def _perfdata(self, checks: List[HealthCheck]) -> Dict[str, Any]:
        """Numbers for the plugin's performance data: {label: [value, uom, warn, crit]}."""
        t = self.thresholds
        by_name = {c.name: c.details for c in checks}
        size = by_name.get("size", {})

        def in_bytes(value: Any, scope: str) -> List[Any]:
            return [value, "B"] + [int(t["%s_memory_%s_mb" % (scope, level)] * _MB)
                                   for level in ("warning", "critical")]
        perf: Dict[str, Any] = {
            "store_bytes": in_bytes(size.get("total_bytes"), "global"),
            "agents": [len(by_name.get("structure", {}).get("agents", [])), "", None, None],
        }
        for agent, agent_bytes in sorted(size.get("agent_bytes", {}).items()):
            perf["agent_%s_bytes" % agent] = in_bytes(agent_bytes, "agent")
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
        # a lower bound: range syntax "50:" means "warn below 50"
        perf["cache_hit_rate"] = [round(rate * 100, 1) if rate is not None else None, "%",
                                  "%s:" % _perf_number(t["cache_hit_rate_warning"] * 100), None]
        return perf

    # -- alerts -------------------------------------------------------------------
    def load_alerts(self) -> Dict[str, Alert]:
        """Every stored alert by id ({} when none); raises IntegrityError if the file is corrupt."""
        doc = self.store.read_state("alerts.json", {})
        entries = doc.get("alerts", {}) if isinstance(doc, dict) else {}
        alerts = ((k, _alert_from_dict(v)) for k, v in entries.items() if isinstance(v, dict))
        return {key: alert for key, alert in alerts if alert is not None}

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

    def _save_alerts(self, alerts: Dict[str, Alert], changes: AlertChanges) -> None:
        """Drop the alerts past retention (counted in ``changes.purged``), save the rest."""
        expired = [key for key, alert in alerts.items() if self._expired(alert)]
        for key in expired:
            del alerts[key]
        changes.purged = len(expired)
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
        self._save_alerts(alerts, changes)

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
            self._save_alerts(alerts, changes)
        self._finish_alerts(changes, [])
        return changes

    def _deliver(self, changes: AlertChanges) -> None:
        """POST fired and resolved alerts to the webhook; stop at the first failure, warn."""
        if not self.webhook_url:
            return
        import http.client  # only a webhook needs it (start-up cost of every other command)
        events = ([("firing", a) for a in changes.fired]
                  + [("resolved", a) for a in changes.resolved])
        for position, (event, alert) in enumerate(events):
            try:
                send_webhook(self.webhook_url, event, alert, self.store, self.webhook_timeout)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                how = "failed" if isinstance(exc, WebhookAnswerError) else "unreachable"
                changes.warnings.append(redact_url(
                    "webhook %s %s (%s); %d notification(s) not delivered"
                    % (self.webhook_url, how, exc, len(events) - position), self.webhook_url))
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
class MonitorReport(OperationResult):
    """What ``monitor report`` publishes: metrics, health, open alerts and the size history."""

    generated: _dt.datetime
    metrics: MetricsReport
    health: HealthReport
    alerts: List[Alert]
    history: List[Dict[str, Any]]
    warnings: List[str] = dataclasses.field(default_factory=list)

    PARTIAL_FIELDS = ("unreadable",)  # the exit code of its metrics

    @property
    def unreadable(self) -> List[str]:
        """The files its metrics could not read (not counted)."""
        return self.metrics.unreadable


# -- the one-line health summary (plugin output, cron mail) and its perfdata numbers --

def _perf_label(label: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        return label
    return "'%s'" % label.replace("'", "''").replace("=", "_")


def _perf_number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value  # already a range ("50:")
    if isinstance(value, float) and not value.is_integer():
        return ("%.4f" % value).rstrip("0").rstrip(".")
    return "%d" % value


def health_summary(report: HealthReport) -> str:
    """One line: ``AML WARNING - STORE: check: message; ...`` naming the store and every check
    that is not healthy, the most severe first (a critical cause is never cut off)."""
    bad = sorted((c for c in report.checks if c.status is not HealthStatus.HEALTHY),
                 key=lambda c: -_STATUS_RANK[c.status])
    if bad:
        summary = "; ".join("%s: %s" % (c.name, c.message) for c in bad)
    else:
        summary = "%d checks healthy" % len(report.checks)
    return "AML %s - %s: %s" % (report.status.nagios, report.store,
                                summary.replace("|", "/").replace("\n", " "))


# -- the live dashboard: monitor serve ------------------------------------------------

DEFAULT_SERVE_PORT = 9731
DASHBOARD_BACKUPS = 5
_HTML_TYPE = "text/html; charset=utf-8"
_JSON_TYPE = "application/json"
_PROM_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DASHBOARD_PATHS = ("/", "/metrics", "/api/health", "/api/metrics", "/api/alerts",
                   "/api/dashboard")


class _ReadOnlyMonitor(MemoryMonitor):
    """A MemoryMonitor that never writes: the state updates of health() (integrity cache,
    alerts, run history) are skipped, so it takes no maintenance lock and creates nothing."""

    def _under_state_lock(self, action: Callable[[], None]) -> List[str]:
        return []

    def snapshot(self) -> MonitorReport:
        """What ``report()`` gives, written nowhere (its sample and every state update go
        through _under_state_lock), with this measurement as the size history's last point;
        raises AmlError or OSError."""
        report = self.report()
        samples = report.history
        if not samples or parse_timestamp(samples[-1]["at"]) < report.metrics.taken_at:
            samples.append(_new_sample(report.metrics))
        return report


def _last_runs(history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The newest history entry of every operation, with how many runs the history holds."""
    last: Dict[str, Dict[str, Any]] = {}
    runs: Dict[str, int] = collections.Counter()
    for entry in history:
        operation = entry.get("operation")
        if isinstance(operation, str):
            last[operation], runs[operation] = entry, runs[operation] + 1
    return [dict(last[op], runs=runs[op]) for op in sorted(last)]


def backup_summary(store: Store, config_file: Optional[Path] = None,
                   latest: int = DASHBOARD_BACKUPS) -> Dict[str, Any]:
    """The newest snapshots of the store (read-only); ``error`` says why there are none."""
    try:
        listing = BackupManager(store, backup_config_for(store, config_file)).list()
    except (AmlError, OSError) as exc:
        return {"error": str(exc), "count": 0, "latest": []}
    return {"root": str(listing.backup_root), "count": len(listing.snapshots),
            "repository_bytes": listing.repository_bytes, "problems": listing.problems,
            "latest": to_jsonable(listing.snapshots[::-1][:latest])}


def dashboard_document(report: MonitorReport, thresholds: Dict[str, float],
                       history: List[Dict[str, Any]], backups: Dict[str, Any]
                       ) -> Dict[str, Any]:
    """The one JSON document the dashboard page is drawn from (served at /api/dashboard)."""
    maintenance = [{"operation": e.get("operation"), "started": e.get("started")}
                   for e in history if e.get("operation") in MAINTENANCE_OPERATIONS]
    return {"store": report.metrics.store, "generated": format_timestamp(report.generated),
            "version": __version__, "metrics": to_jsonable(report.metrics),
            "health": to_jsonable(report.health), "alerts": to_jsonable(report.alerts),
            "samples": report.history, "thresholds": dict(thresholds),
            "jobs": _last_runs(history), "maintenance": maintenance, "backups": backups,
            "warnings": list(report.warnings)}


def _history_for_display(store: Store, warnings: List[str]) -> List[Dict[str, Any]]:
    try:
        return _history(store)
    except IntegrityError as exc:
        warnings.append(str(exc))
        return []


def _json_view(payload: Any) -> Tuple[str, bytes]:
    text = json.dumps(to_jsonable(payload), indent=2, sort_keys=True) + "\n"
    return _JSON_TYPE, text.encode("utf-8")


class DashboardCache:
    """The latest views, measured again at most every ``interval`` seconds (thread-safe).

    A failed measurement is kept as the answer until the next one is due, so a broken
    store is not re-read on every request either.
    """

    def __init__(self, measure: Callable[[], Dict[str, Tuple[str, bytes]]], interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.measure, self.interval, self.clock = measure, interval, clock
        self.measurements = 0
        self._lock = threading.Lock()
        self._taken: Optional[float] = None
        self._views: Optional[Dict[str, Tuple[str, bytes]]] = None
        self._error: Optional[str] = None

    def views(self) -> Dict[str, Tuple[str, bytes]]:
        """The cached views; raises AmlError when the last measurement failed."""
        with self._lock:
            now = self.clock()
            if self._taken is None or now - self._taken >= self.interval:
                self._taken, self.measurements = now, self.measurements + 1
                try:
                    self._views, self._error = self.measure(), None
                except (AmlError, OSError) as exc:
                    self._views, self._error = None, str(exc)
            if self._views is None:
                raise AmlError("measurement failed: %s" % self._error)
            return self._views


@functools.lru_cache(maxsize=None)
def _dashboard_classes() -> List[type]:
    """[request handler, IPv4 server, IPv6 server] of the dashboard, made on first use:
    http.server costs every command that serves nothing ~6 ms of start-up to import."""
    import http.server

    class _DashboardHandler(http.server.BaseHTTPRequestHandler):
        """GET and HEAD of the dashboard paths; anything else 404 (501 for other methods)."""

        server_version = "aml/" + __version__

        def do_GET(self, with_body: bool = True) -> None:  # noqa: N802 (http.server calls it)
            path = urllib.parse.urlsplit(self.path).path
            path = "/" if path == "/index.html" else path
            code, content_type, body = 404, "text/plain; charset=utf-8", b"not found\n"
            if path in DASHBOARD_PATHS:
                try:
                    views = self.server.cache.views()  # type: ignore[attr-defined]
                except AmlError as exc:
                    code, body = 503, ("aml: %s\n" % exc).encode("utf-8")
                else:
                    code, (content_type, body) = 200, views[path]
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'none'; "
                             "style-src 'unsafe-inline'; img-src data:")
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET(with_body=False)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # no access log: under cron or systemd it would be noise

    class _DashboardServer(http.server.ThreadingHTTPServer):
        daemon_threads = True   # a stuck client never delays the shutdown
        allow_reuse_address = True

    class _DashboardServer6(_DashboardServer):
        address_family = socket.AF_INET6

    return [_DashboardHandler, _DashboardServer, _DashboardServer6]


def dashboard_server(cache: DashboardCache, bind: str = "127.0.0.1", port: int = 0
                     ) -> "http.server.ThreadingHTTPServer":
    """A bound (not yet serving) HTTP server for ``cache``; port 0 picks a free one.

    Raises AmlError when the address cannot be bound.
    """
    handler, server4, server6 = _dashboard_classes()
    try:
        server = (server6 if ":" in bind else server4)((bind, port), handler)
    except OSError as exc:
        raise AmlError("cannot listen on %s port %d: %s" % (bind, port, exc.strerror or exc))
    server.cache = cache  # type: ignore[attr-defined]
    return server


__all__ += ["HealthStatus", "AlertLevel", "DEFAULT_THRESHOLDS", "resolve_thresholds",
            "MonitorThresholds", "MonitorSettings", "monitor_settings_for",
            "AgentMetrics", "OperationStat", "PerformanceMetrics", "GrowthMetrics",
            "LimitForecast", "MetricsReport", "Problem", "HealthCheck", "HealthReport", "Alert",
            "AlertChanges", "MonitorReport", "MemoryMonitor", "alert_id", "send_webhook",
            "redact_url", "WebhookAnswerError",
            "nagios_line", "health_summary", "prometheus_text", "html_report", "worst_status",
            "DashboardCache", "dashboard_views", "dashboard_server", "dashboard_document",
            "backup_summary", "render_dashboard", "svg_chart"]


# =============================================================================
# 15. Output formatting
# Results to text, JSON, nagios, Prometheus and HTML (the dashboard's views too);
# progress on a terminal. The only section that prints (besides main's last words).
# =============================================================================


class ProgressReporter:
    """The one progress line of a run, on a terminal's stderr: ``phase: done/total (pct),
    ETA m:ss``. Drawn only once the run has taken PROGRESS_DELAY seconds, at most every
    PROGRESS_EVERY seconds; never when stderr is not a terminal or with --quiet. Pass it
    (or its ``update``) wherever library code takes a ProgressCallback."""

    def __init__(self, stream: Any, enabled: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.enabled, self.clock = stream, enabled, clock
        self.started = clock()
        self.phase: Optional[str] = None
        self.phase_started = self.last = self.started
        self.drawn = False

    def update(self, phase: str, done: int, total: int, unit: str = "files") -> None:
        """A ProgressCallback."""
        if not self.enabled:
            return
        now = self.clock()
        if phase != self.phase:
            self.phase, self.phase_started = phase, now
        elif now - self.last < PROGRESS_EVERY:
            return
        if now - self.started < PROGRESS_DELAY:
            return
        self.last = now
        self.stream.write("\r\033[K" + progress_text(phase, done, total, unit,
                                                     now - self.phase_started))
        self.stream.flush()
        self.drawn = True

    __call__ = update

    def clear(self) -> None:
        """Erase the line (before other output, and at the end of the run)."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


PROGRESS_DELAY = 2.0
PROGRESS_EVERY = 0.25


def progress_text(phase: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``prune: scanning 12.0 MiB of 50.0 MiB (24%), ETA 0:42`` (no ETA before any progress)."""
    done = min(done, total)
    if unit == "B":
        amount = "%s of %s" % (human_bytes(done), human_bytes(total))
    else:
        amount = "%d of %d %s" % (done, total, unit)
    text = "%s %s" % (phase, amount)
    if total > 0:
        text += " (%d%%)" % (100 * done // total)
    if 0 < done < total and elapsed > 0:
        left = int(elapsed * (total - done) / done)
        text += ", ETA %d:%02d" % (left // 60, left % 60)
    return text


class Output:
    """Where a command's results go: text or one JSON document on stdout, diagnostics on stderr."""

    def __init__(self, fmt: str = "text", quiet: bool = False,
                 stdout: Optional[io.TextIOBase] = None, stderr: Optional[io.TextIOBase] = None,
                 reporter: Optional[ProgressReporter] = None):
        self.format = fmt
        self.quiet = quiet
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.reporter = reporter or ProgressReporter(self.stderr, not quiet and getattr(
            self.stderr, "isatty", lambda: False)())

    def _print(self, stream: Any, text: str) -> None:
        self.reporter.clear()   # the progress line goes before any other output
        print(text, file=stream)

    def line(self, text: str = "") -> None:
        """A line of the text report (suppressed by --quiet and in JSON mode)."""
        if self.format == "text" and not self.quiet:
            self._print(self.stdout, text)

    def always(self, text: str) -> None:
        """A text line printed even with --quiet (used for results the user asked to see)."""
        if self.format == "text":
            self._print(self.stdout, text)

    def verbatim(self, text: str) -> None:
        """A stdout line in any format but JSON, --quiet or not (the nagios plugin line)."""
        if self.format != "json":
            self._print(self.stdout, text)

    def document(self, payload: Any) -> None:
        """The JSON document of a run (only in --format json)."""
        if self.format == "json":
            json.dump(to_jsonable(payload), self.stdout, indent=2, sort_keys=True)
            self.stdout.write("\n")

    def warn(self, text: str) -> None:
        """A warning on stderr (shown even with --quiet: cron should mail problems)."""
        self._print(self.stderr, "aml: warning: %s" % text)

    def error(self, text: str) -> None:
        """An error line on stderr for a run that still reports its result."""
        self._print(self.stderr, "aml: error: %s" % text)

    def report(self, result: Any, unreadable: str = "skipped, unreadable: %s",
               busy: str = "%s", errors: Optional[bool] = False) -> None:
        """The problem lines of a result (an OperationResult), the one way every command
        prints them, on stderr and even with --quiet: what does not verify (as errors with
        ``errors``, as warnings without, not at all with None: the caller sums it up), the
        warnings, each unreadable file through the ``unreadable`` template, each busy lock
        through ``busy``."""
        for problem in getattr(result, "problems", ()) if errors is not None else ():
            (self.error if errors else self.warn)(problem)
        for warning in getattr(result, "warnings", ()):
            self.warn(warning)
        for problem in getattr(result, "unreadable", ()):
            self.warn(unreadable % problem)
        for message in getattr(result, "busy", ()):
            self.warn(busy % message)

    def progress(self, phase: str, done: int, total: int, unit: str = "files") -> None:
        """A ProgressCallback: drawn on a terminal only (see ProgressReporter)."""
        self.reporter.update(phase, done, total, unit)

    def progress_done(self) -> None:
        """Clear the progress line if one was drawn."""
        self.reporter.clear()


# -- the dashboard page: monitor serve and monitor report --format html ---------------
# Drawn from the JSON document of dashboard_document(), read with .get() everywhere so
# fields other commands add later do not break it. No script, no external asset.

CHART_TOP_N = 8
# Tableau 10 without its grey (kept for "others"): nine hues told apart, also in print.
_SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                  "#e377c2", "#bcbd22", "#17becf")
_OTHERS_COLOR, _TOTAL_COLOR = "#7f7f7f", "#111111"
_LIMIT_COLORS = {"warning": "#d08700", "critical": "#c00000"}
_PLOT = {"width": 640, "height": 280, "left": 66, "right": 14, "top": 26, "bottom": 46}
_TIME_STEPS = (3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400, 14 * 86400,
               30 * 86400, 91 * 86400, 365 * 86400)
_HTML_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;
color:#222;background:#fafafa;max-width:1600px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
table.compact{width:auto;min-width:min(100%,360px)}
td,th{border:1px solid #ddd;padding:4px 6px;text-align:left;vertical-align:top;
overflow-wrap:anywhere}th{background:#f0f0f0;overflow-wrap:normal}
.num,.nw,.status{white-space:nowrap}.num{text-align:right}p{overflow-wrap:anywhere}
.muted{color:#666;font-size:12px}.status{padding:1px 8px;border-radius:4px}
.s-healthy{background:#d9f2d9}.s-warning{background:#fff2c6}.s-critical{background:#f9d0d0}
.s-unknown{background:#e4e4e4}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:16px}
figure{margin:0;background:#fff;border:1px solid #ddd;padding:8px;min-width:0}
figure svg{display:block;width:100%;height:auto}
figcaption{font-weight:bold;font-size:14px;margin-bottom:4px}
.legend{display:flex;flex-wrap:wrap;gap:2px 14px;list-style:none;margin:6px 0 0;padding:0;
font-size:12px}.legend li{display:flex;align-items:center;gap:4px;min-width:0;
overflow-wrap:anywhere}.sw{display:inline-block;width:14px;height:4px;flex:none}
.bar{background:#e8e8e8;height:10px;min-width:60px;position:relative}
.bar span{display:block;height:10px;background:#4e79a7}
.bar.s-warning span{background:#d08700}.bar.s-critical span{background:#c00000}
"""


def _esc(value: Any) -> str:
    import html as _html  # only HTML reports need it (start-up cost of every other command)
    return _html.escape("unknown" if value is None else str(value), quote=True)


def _unit_or_unknown(value: Any, fmt: str, times: float = 1) -> str:
    number = _number(value)
    return "unknown" if number is None else fmt % (number * times)


def _scaled(value: Optional[float], times: float = 1, per: float = 1) -> Optional[float]:
    return None if value is None else value * times / per


def _bytes_or_unknown(value: Any) -> str:
    number = _number(value)
    return "unknown" if number is None else human_bytes(number)


def _html_table(headers: Sequence[str], rows: Iterable[Sequence[str]],
                row_classes: Optional[Sequence[str]] = None, numeric: Sequence[int] = (),
                nowrap: Sequence[int] = ()) -> str:
    """A table from already-escaped cells; ``numeric`` columns align right, ``nowrap`` ones
    (short words) never break."""
    head = "".join("<th>%s</th>" % _esc(h) for h in headers)
    body = []
    for number, row in enumerate(rows):
        css = ' class="%s"' % row_classes[number] if row_classes else ""
        cells = "".join('<td class="num">%s</td>' % c if i in numeric else
                        '<td class="nw">%s</td>' % c if i in nowrap else "<td>%s</td>" % c
                        for i, c in enumerate(row))
        body.append("<tr%s>%s</tr>" % (css, cells))
    if not body:
        body.append('<tr><td colspan="%d" class="muted">none</td></tr>' % len(headers))
    return "<table><tr>%s</tr>%s</table>" % (head, "".join(body))


# -- chart data ----------------------------------------------------------------------

_Point = Tuple[_dt.datetime, Optional[float]]   # value None: not measurable (unreadable file)


def _agent_value(values: Any, key: str) -> Optional[float]:
    if not isinstance(values, dict):
        return None
    if key == "records" and values.get("unreadable"):
        return None   # a count without its unreadable files would look like a drop
    return _number(values.get(key))


def _sample_series(samples: List[Dict[str, Any]], key: str
                   ) -> Tuple[Dict[str, List[_Point]], List[_Point]]:
    """({agent: points}, store total points) of one sample field, oldest first."""
    agents: Dict[str, List[_Point]] = {}
    total: List[_Point] = []
    for sample in samples:
        moment = parse_timestamp(sample.get("at"))
        if moment is None:
            continue
        per_agent = sample.get("agents") if isinstance(sample.get("agents"), dict) else {}
        for agent, values in sorted(per_agent.items()):
            agents.setdefault(agent, []).append((moment, _agent_value(values, key)))
        field = "total_bytes" if key == "bytes" else key
        value = _number(sample.get(field))
        if key == "records" and any(isinstance(v, dict) and v.get("unreadable")
                                    for v in per_agent.values()):
            value = None
        total.append((moment, value))
    return agents, total


def _size_ranking(agents: Dict[str, List[_Point]]) -> List[str]:
    """Agents largest first by their latest known value, 0 when none (ties by name)."""
    return sorted(agents, key=lambda a: (-next((v for _, v in reversed(agents[a])
                                                 if v is not None), 0.0), a))


def _top_series(agents: Dict[str, List[_Point]], ranking: List[str], top: int = CHART_TOP_N
                ) -> List[Tuple[str, str, List[_Point]]]:
    """(label, colour, points): the first ``top`` agents of ``ranking`` (so every chart gives
    an agent the same colour), then the largest of the rest at each time."""
    ranked = [a for a in ranking if a in agents] + sorted(set(agents) - set(ranking))
    if len(ranked) <= top + 1:
        top = len(ranked)
    shown = [(a, _SERIES_COLORS[n % len(_SERIES_COLORS)], agents[a])
             for n, a in enumerate(ranked[:top])]
    rest = ranked[top:]
    if rest:
        by_time: Dict[_dt.datetime, List[Optional[float]]] = {}
        for agent in rest:
            for moment, value in agents[agent]:
                by_time.setdefault(moment, []).append(value)
        # One unknown value among them makes their largest unknown too: a gap, not a guess.
        points = [(m, None if None in v else max(v)) for m, v in  # type: ignore[type-var]
                  sorted(by_time.items())]
        shown.append(("%d others (largest of them)" % len(rest), _OTHERS_COLOR, points))
    return shown


# -- chart drawing -------------------------------------------------------------------

def _axis_unit(kind: str, vmax: float) -> Tuple[float, str]:
    """(divisor, unit) for tick labels: binary units for bytes, k/M for counts."""
    steps = ((1024 ** 3, "GiB"), (_MB, "MiB"), (1024, "KiB"), (1, "B")) if kind == "bytes" \
        else ((1e6, "M"), (1e3, "k"), (1, ""))
    for divisor, unit in steps:
        if vmax >= divisor:
            return divisor, unit
    return steps[-1]


def _nice_ticks(vmax: float, count: int = 5) -> List[float]:
    """0 and round steps (1, 2 or 5 times a power of ten) up to at least ``vmax``."""
    if vmax <= 0:
        return [0.0, 1.0]
    raw = vmax / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.ceil(vmax / step - 1e-9)) + 1)]


def _tick_text(value: float, divisor: float, unit: str) -> str:
    if value == 0 and unit in ("k", "M"):
        return "0"
    text = ("%.2f" % (value / divisor)).rstrip("0").rstrip(".")
    return "%s %s" % (text, unit) if unit else text


def _time_ticks(t0: _dt.datetime, t1: _dt.datetime) -> List[Tuple[_dt.datetime, str]]:
    """Calendar-aligned UTC ticks, at most six, labelled with the date (and hour if needed)."""
    span = (t1 - t0).total_seconds()
    step = next((s for s in _TIME_STEPS if span / s <= 6), _TIME_STEPS[-1])
    first = math.ceil(t0.timestamp() / step) * step
    fmt = "%Y-%m-%d" if step >= 86400 else "%m-%d %H:%M"
    ticks, at = [], first
    while at <= t1.timestamp() + 1e-6:
        moment = _dt.datetime.fromtimestamp(at, _dt.timezone.utc)
        ticks.append((moment, moment.strftime(fmt)))
        at += step
    return ticks


class _Frame:
    """Maps time and value to SVG coordinates of one plot."""

    def __init__(self, t0: _dt.datetime, t1: _dt.datetime, vtop: float):
        p = _PLOT
        self.t0, self.t1, self.vtop = t0, t1, vtop
        self.x0, self.x1 = p["left"], p["width"] - p["right"]
        self.y0, self.y1 = p["top"], p["height"] - p["bottom"]

    def x(self, moment: _dt.datetime) -> float:
        span = (self.t1 - self.t0).total_seconds()
        share = (moment - self.t0).total_seconds() / span if span > 0 else 0.5
        return self.x0 + share * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        return self.y1 - min(value / self.vtop, 1.0) * (self.y1 - self.y0)


def _svg_grid(frame: _Frame, ticks: List[float], divisor: float, unit: str) -> List[str]:
    parts = []
    for value in ticks:
        y = frame.y(value)
        parts.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s"/>'
                     % (frame.x0, y, frame.x1, y, "#999" if value == 0 else "#eee"))
        parts.append('<text x="%d" y="%.1f" font-size="11" text-anchor="end">%s</text>'
                     % (frame.x0 - 5, y + 4, _esc(_tick_text(value, divisor, unit))))
    for moment, label in _time_ticks(frame.t0, frame.t1):
        x = frame.x(moment)
        parts.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#999"/>'
                     % (x, frame.y1, x, frame.y1 + 4))
        parts.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%s</text>'
                     % (x, frame.y1 + 16, _esc(label)))
    parts.append('<text x="%d" y="%d" font-size="10" text-anchor="end" fill="#666">time '
                 '(UTC)</text>' % (frame.x1, _PLOT["height"] - 4))
    return parts


def _svg_line(frame: _Frame, label: str, color: str, points: List[_Point], width: float
              ) -> List[str]:
    """Polylines broken where a value is unknown, dots where a point stands alone, and a
    red cross on the time axis at each unknown value."""
    parts, run = [], []
    for moment, value in points + [(frame.t1, None)]:
        if value is not None:
            run.append((frame.x(moment), frame.y(value)))
            continue
        if len(run) > 1:
            parts.append('<polyline fill="none" stroke="%s" stroke-width="%g" points="%s">'
                         '<title>%s</title></polyline>' % (color, width, " ".join(
                             "%.1f,%.1f" % p for p in run), _esc(label)))
        elif run:
            parts.append('<circle cx="%.1f" cy="%.1f" r="3" fill="%s"><title>%s</title>'
                         '</circle>' % (run[0][0], run[0][1], color, _esc(label)))
        run = []
    for moment, value in points:
        if value is None:
            x, y = frame.x(moment), frame.y1 - 6
            parts.append('<path class="gap" d="M%.1f %.1fl8 8m0 -8l-8 8" stroke="#c00000" '
                         'stroke-width="2"><title>%s: not measurable at %s (unreadable '
                         'file)</title></path>' % (x - 4, y - 4, _esc(label),
                                                   _esc(format_timestamp(moment))))
    return parts


def _value_text(kind: str, value: float) -> str:
    return human_bytes(value) if kind == "bytes" else "%g" % value


def _svg_limits(frame: _Frame, limits: List[Tuple[str, float]], kind: str) -> List[str]:
    parts, above = [], []
    for number, (name, value) in enumerate(limits):
        color, text = _limit_color(name), "%s %s" % (name, _value_text(kind, value))
        if value > frame.vtop:
            above.append(text)
            continue
        y = frame.y(value)
        # Labels alternate left and right so two close limits stay readable.
        x, anchor = (frame.x0 + 4, "start") if number % 2 == 0 else (frame.x1 - 2, "end")
        parts.append('<line class="limit" x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="%s" '
                     'stroke-width="1.5" stroke-dasharray="6 4"/><text x="%d" y="%.1f" '
                     'font-size="10" text-anchor="%s" fill="%s">%s</text>'
                     % (frame.x0, y, frame.x1, y, color, x, y - 3, anchor, color, _esc(text)))
    if above:
        parts.append('<text class="limit" x="%d" y="%d" font-size="10" text-anchor="end" '
                     'fill="#666">above the scale: %s</text>'
                     % (frame.x1, _PLOT["top"] - 10, _esc(", ".join(above))))
    return parts


def _svg_markers(frame: _Frame, runs: List[Tuple[_dt.datetime, str]]) -> List[str]:
    return ['<path class="maintenance" d="M%.1f %dl-4 7h8z" fill="#555"><title>%s</title>'
            '</path>' % (frame.x(m), frame.y1 + 23, _esc("%s at %s" % (op, format_timestamp(m))))
            for m, op in runs if frame.t0 <= m <= frame.t1]


def _chart_range(series: List[Tuple[str, str, List[_Point]]], limits: List[Tuple[str, float]]
                 ) -> Tuple[_dt.datetime, _dt.datetime, float]:
    moments = [m for _, _, pts in series for m, _ in pts]
    vmax = max([v for _, _, pts in series for _, v in pts if v is not None] or [0.0])
    # A limit near the data is drawn inside the plot; one far above would flatten every
    # line, so it is named at the top instead.
    near = [v for _, v in limits if v <= max(vmax, 1.0) * 2.5]
    return min(moments), max(moments), max([vmax] + near)


def svg_chart(title: str, kind: str, series: List[Tuple[str, str, List[_Point]]],
              limits: Sequence[Tuple[str, float]] = (),
              runs: Sequence[Tuple[_dt.datetime, str]] = ()) -> str:
    """A self-contained, responsive SVG line chart with its HTML legend (a <figure>).

    ``kind`` is "bytes" or "count"; ``series`` holds (label, colour, points) drawn in
    order; ``limits`` (name, value) become dashed lines; ``runs`` mark the time axis.
    """
    series = [s for s in series if s[2]]
    if not series:
        return '<figure><figcaption>%s</figcaption><p class="muted">no samples yet</p>' \
               '</figure>' % _esc(title)
    t0, t1, vmax = _chart_range(series, list(limits))
    divisor, unit = _axis_unit(kind, vmax)
    ticks = _nice_ticks(vmax / divisor)
    if t0 == t1:   # one sample: lines would be dots on top of each other
        return _svg_bars(title, kind, series, list(limits), ticks[-1] * divisor or 1.0)
    frame = _Frame(t0, t1, ticks[-1] * divisor)
    parts = _svg_grid(frame, [t * divisor for t in ticks], divisor, unit)
    parts += _svg_limits(frame, list(limits), kind)
    for label, color, points in reversed(series):   # the first (largest, total) on top
        parts += _svg_line(frame, label, color, points, 3 if color == _TOTAL_COLOR else 2)
    parts += _svg_markers(frame, list(runs))
    return _chart_figure(title, _PLOT["height"], parts,
                         _chart_legend(series, limits, frame.vtop, runs, t0, t1))


def _svg_bars(title: str, kind: str, series: List[Tuple[str, str, List[_Point]]],
              limits: List[Tuple[str, float]], scale: float) -> str:
    """One horizontal bar per series up to ``scale``: the chart of a single sample."""
    row, left, right, top = 22, 170, 90, 26
    height, span = top + row * len(series) + 8, _PLOT["width"] - left - right
    moment = series[0][2][0][0]
    parts = ['<text x="%d" y="16" font-size="11" fill="#666">one sample, %s</text>'
             % (left, _esc(format_timestamp(moment)))]
    for number, (label, color, points) in enumerate(series):
        value, y = points[-1][1], top + number * row
        shown = label if len(label) <= 26 else label[:25] + "\u2026"
        parts.append('<text x="%d" y="%d" font-size="11" text-anchor="end">%s<title>%s'
                     '</title></text>' % (left - 6, y + 13, _esc(shown), _esc(label)))
        if value is None:
            parts.append('<text class="gap" x="%d" y="%d" font-size="11" fill="#c00000">'
                         '&#10005; not measurable (unreadable file)</text>' % (left, y + 13))
            continue
        bar = min(value / scale, 1.0) * span
        parts.append('<rect x="%d" y="%d" width="%.1f" height="14" fill="%s"/><text x="%.1f" '
                     'y="%d" font-size="11">%s</text>' % (left, y + 2, bar, color, left + bar + 4,
                                                         y + 13, _esc(_value_text(kind, value))))
    for name, value in limits:
        if value <= scale:
            x = left + value / scale * span
            parts.append('<line class="limit" x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" '
                         'stroke-dasharray="6 4"><title>%s</title></line>'
                         % (x, top - 4, x, height - 4, _limit_color(name), _esc(name)))
    return _chart_figure(title, height, parts,
                         _chart_legend(series, limits, scale, [], moment, moment))


def _chart_figure(title: str, height: int, parts: List[str], legend: str) -> str:
    """The <figure> of a chart: caption, the SVG of ``parts`` (plot width), legend."""
    return ('<figure class="chart"><figcaption>%s</figcaption><svg xmlns="http://www.w3.org/'
            '2000/svg" viewBox="0 0 %d %d" role="img" aria-label="%s">%s</svg>%s</figure>'
            % (_esc(title), _PLOT["width"], height, _esc(title), "".join(parts), legend))


def _limit_color(name: str) -> str:
    return _LIMIT_COLORS.get(name.split()[-1], "#c00000")


def _chart_legend(series: List[Tuple[str, str, List[_Point]]],
                  limits: Sequence[Tuple[str, float]], vtop: float,
                  runs: Sequence[Tuple[_dt.datetime, str]],
                  t0: _dt.datetime, t1: _dt.datetime) -> str:
    """The legend of the series, of the limits up to ``vtop`` (those drawn) and of the marks."""
    items = ['<li><span class="sw" style="background:%s"></span>%s</li>' % (c, _esc(label))
             for label, c, _ in series]
    items += ['<li><span class="sw" style="background:repeating-linear-gradient(90deg,%s 0 6px,'
              'transparent 6px 10px)"></span>%s</li>' % (_limit_color(name), _esc(name))
              for name, value in limits if value <= vtop]
    if any(t0 <= m <= t1 for m, _ in runs):
        items.append('<li><span style="color:#555">&#9650;</span>maintenance run</li>')
    if any(v is None for _, _, pts in series for _, v in pts):
        items.append('<li><span style="color:#c00000">&#10005;</span>not measurable '
                     '(unreadable file)</li>')
    return '<ul class="legend">%s</ul>' % "".join(items)


# -- page sections -------------------------------------------------------------------

def _part(doc: Any, key: str) -> Dict[str, Any]:
    """``doc[key]`` when both are JSON objects, else {} (the page never trusts a shape)."""
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, dict) else {}


def _doc_list(doc: Dict[str, Any], *keys: str) -> List[Any]:
    value: Any = doc
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, list) else []


def _doc_dicts(doc: Dict[str, Any], *keys: str) -> List[Dict[str, Any]]:
    """The JSON objects of the list at ``doc[key][key]...`` (anything else in it skipped)."""
    return [item for item in _doc_list(doc, *keys) if isinstance(item, dict)]


def _status_cell(status: Any) -> str:
    return '<span class="status s-%s">%s</span>' % (_esc(status), _esc(status))


def _summary_section(doc: Dict[str, Any]) -> str:
    metrics = _part(doc, "metrics")
    perf = _part(metrics, "performance")
    growth = _part(metrics, "growth")
    agents = _doc_list(metrics, "agents")
    records = sum(_agent_records(a) for a in agents)
    rows = [("store size", _bytes_or_unknown(metrics.get("total_bytes"))),
            ("agents", str(len(agents))), ("records", str(records)),
            ("unreadable files", str(len(_doc_list(metrics, "unreadable")))),
            ("index", _bytes_or_unknown(metrics.get("index_bytes"))
             if metrics.get("index_bytes") else "none"),
            ("growth per day", _bytes_or_unknown(growth.get("bytes_per_day"))),
            ("full load now", _unit_or_unknown(perf.get("full_load_ms"), "%.1f ms")),
            ("indexed lookup now", _unit_or_unknown(perf.get("lookup_ms"), "%.2f ms")),
            ("hot-cache hit rate", _unit_or_unknown(perf.get("cache_hit_rate"), "%.0f%%", 100))]
    return _html_table(["measure", "value"], [[_esc(k), _esc(v)] for k, v in rows],
                       numeric=(1,)).replace("<table>", '<table class="compact">', 1)


def _agent_records(agent: Dict[str, Any]) -> int:
    return int(sum(_number(n) or 0 for states in _part(agent, "records").values()
                   if isinstance(states, dict) for n in states.values()))


def _health_section(doc: Dict[str, Any]) -> str:
    return _html_table(["check", "status", "finding"],
                       [[_esc(c.get("name")), _status_cell(c.get("status")), _esc(c.get("message"))]
                        for c in _doc_dicts(doc, "health", "checks")], nowrap=(0, 1))


def _alerts_section(doc: Dict[str, Any]) -> str:
    # The page only reads alerts: they change when ``monitor health`` runs (cron), so an
    # alert may lag a check above that has since recovered.
    note = ('<p class="muted">As raised and resolved by the last <code>monitor health</code> '
            'run; this page reads them and never changes them.</p>')
    return note + _html_table(
        ["level", "check / subject", "since", "last seen", "count", "message", "id"],
        [[_esc(a.get("level")), _esc("%s / %s" % (a.get("check"), a.get("subject")))]
         + [_esc(a.get(k)) for k in ("first_seen", "last_seen", "count", "message", "id")]
         for a in _doc_dicts(doc, "alerts")], numeric=(4,), nowrap=(0,))


def _limit(doc: Dict[str, Any], scope: str, level: str) -> Optional[float]:
    value = _number(_part(doc, "thresholds").get("%s_memory_%s_mb" % (scope, level)))
    return None if value is None else value * _MB


def _limits(doc: Dict[str, Any], scope: str) -> List[Tuple[str, float]]:
    found = []
    for level in ("warning", "critical"):
        value = _limit(doc, scope, level)
        if value is not None:
            found.append(("%s limit %s" % (scope.replace("global", "store"), level), value))
    return found


def _maintenance_runs(doc: Dict[str, Any]) -> List[Tuple[_dt.datetime, str]]:
    runs = []
    for entry in _doc_dicts(doc, "maintenance"):
        moment = parse_timestamp(entry.get("started"))
        if moment is not None:
            runs.append((moment, str(entry.get("operation"))))
    return runs


def _charts_section(doc: Dict[str, Any]) -> str:
    samples = _doc_dicts(doc, "samples")
    runs = _maintenance_runs(doc)
    sizes, size_total = _sample_series(samples, "bytes")
    counts, count_total = _sample_series(samples, "records")
    ranking = _size_ranking(sizes)
    charts = [
        svg_chart("Store size", "bytes", [("store total", _TOTAL_COLOR, size_total)],
                  _limits(doc, "global"), runs),
        svg_chart(_per_agent_title("Size per agent", sizes), "bytes",
                  _top_series(sizes, ranking), _limits(doc, "agent"), runs),
        svg_chart("Records in the store", "count", [("all records", _TOTAL_COLOR,
                                                     count_total)], (), runs),
        svg_chart(_per_agent_title("Records per agent", counts), "count",
                  _top_series(counts, ranking), (), runs)]
    return '<div class="charts">%s</div><p class="muted">%d sample%s (one per monitor metrics ' \
           'or report run, and this measurement)</p>' % ("".join(charts), len(samples),
                                                         "" if len(samples) == 1 else "s")


def _per_agent_title(title: str, agents: Dict[str, List[_Point]]) -> str:
    if len(agents) > CHART_TOP_N + 1:
        return "%s: the %d largest of %d" % (title, CHART_TOP_N, len(agents))
    return title


def _share_bar(share: float, css: str) -> str:
    return '<div class="bar %s"><span style="width:%.1f%%"></span></div>' % (
        css, min(max(share, 0.0), 1.0) * 100)


def _size_row(doc: Dict[str, Any], scope: str, subject: str, size: Any
              ) -> Tuple[List[str], str]:
    """One sizes row against the ``scope`` (global or agent) limits: cells, row class."""
    warn, crit = (_limit(doc, scope, level) for level in ("warning", "critical"))
    value = _number(size) or 0.0
    css = "s-critical" if crit is not None and value >= crit else \
        "s-warning" if warn is not None and value >= warn else ""
    share = value / warn if warn else 0.0
    return ([_esc(subject), _esc(human_bytes(value)), _bytes_or_unknown(warn),
             _bytes_or_unknown(crit), "%.0f%%" % (share * 100), _share_bar(share, css)], css)


def _sizes_section(doc: Dict[str, Any]) -> str:
    metrics = _part(doc, "metrics")
    rows = [_size_row(doc, "global", "store (all agents)", metrics.get("total_bytes"))]
    agents = sorted(_doc_dicts(metrics, "agents"),
                    key=lambda a: (-(_number(a.get("bytes")) or 0), str(a.get("agent"))))
    rows += [_size_row(doc, "agent", str(a.get("agent")), a.get("bytes")) for a in agents]
    return _html_table(["subject", "size", "warning limit", "critical limit",
                        "of warning", "share of the warning limit"],
                       [r for r, _ in rows], [c for _, c in rows], numeric=(1, 2, 3, 4))


_QUIET_FORECASTS = "%d agent limit(s) not approaching: no growth or no growth data"


def _forecasts_section(doc: Dict[str, Any]) -> str:
    forecasts = _doc_dicts(doc, "metrics", "forecasts")
    shown = [f for f in forecasts if f.get("subject") == "store"
             or _number(f.get("days_until")) is not None]
    shown.sort(key=lambda f: (f.get("subject") != "store",
                              _number(f.get("days_until")) or 0.0, str(f.get("subject"))))
    rows = [[_esc(f.get("subject")), _esc(f.get("limit"))]
            + [_bytes_or_unknown(f.get(k)) for k in ("limit_bytes", "current_bytes",
                                                     "bytes_per_day")]
            + [_unit_or_unknown(f.get("days_until"), "%.1f"), _esc(f.get("note"))] for f in shown]
    quiet = len(forecasts) - len(shown)
    note = '<p class="muted">%s</p>' % (_QUIET_FORECASTS % quiet) if quiet else ""
    return _html_table(["subject", "limit", "limit size", "now", "growth per day",
                        "days until", "note"], rows, numeric=(2, 3, 4, 5)) + note


def _summary_text(summary: Any) -> str:
    """The scalar fields of a run summary, shortened: ``key=value, ...``."""
    if not isinstance(summary, dict):
        return ""
    items = ["%s=%s" % (k, v) for k, v in sorted(summary.items())
             if isinstance(v, (str, int, float, bool)) or v is None]
    text = ", ".join(items)
    return text if len(text) <= 160 else text[:157] + "..."


def _jobs_section(doc: Dict[str, Any]) -> str:
    now = parse_timestamp(doc.get("generated"))
    rows = []
    for job in _doc_dicts(doc, "jobs"):
        started = parse_timestamp(job.get("started"))
        age = days_between(started, now) if started and now else None
        rows.append([_esc(job.get("operation")), _esc(job.get("started")),
                     _unit_or_unknown(age, "%.1f h ago", 24),
                     _unit_or_unknown(job.get("seconds"), "%.2f s"),
                     _esc(job.get("runs")), _esc(_summary_text(job.get("summary")))])
    return _html_table(["job", "last run", "age", "took", "runs kept", "outcome"], rows,
                       numeric=(2, 3, 4), nowrap=(0,))


def _records_section(doc: Dict[str, Any]) -> str:
    agents = _doc_dicts(doc, "metrics", "agents")
    types: List[str] = []
    for agent in agents:
        types += [t for t in _part(agent, "records") if t not in types]
    rows = []
    for agent in agents:
        records = _part(agent, "records")
        counts = ["%s / %s" % (_part(records, t).get("active", 0),
                               _part(records, t).get("inactive", 0)) for t in types]
        rows.append([_esc(agent.get("agent"))] + [_esc(c) for c in counts] + [
            _esc(_agent_records(agent)), _esc("%s gzip, %s plain" % (
                agent.get("gzip_files"), agent.get("plain_files"))),
            _esc(", ".join(str(u) for u in agent.get("unreadable") or []) or "-")])
    return _html_table(["agent"] + ["%s (active / inactive)" % t for t in types]
                       + ["total", "files", "unreadable"], rows,
                       numeric=tuple(range(1, len(types) + 2)))


def _backups_section(doc: Dict[str, Any]) -> str:
    backups = _part(doc, "backups")
    if backups.get("error"):
        return '<p class="muted">backups unavailable: %s</p>' % _esc(backups["error"])
    mark = {True: "verified", False: "FAILED", None: "not verified"}
    rows = [[_esc(s.get(k)) for k in ("backup_id", "type", "created", "files", "records")]
            + [_bytes_or_unknown(s.get("logical_bytes")), _esc(mark.get(s.get("verified"), "?"))]
            for s in backups.get("latest") or [] if isinstance(s, dict)]
    problems = "".join('<p class="muted">%s</p>' % _esc(p) for p in backups.get("problems") or [])
    return (_html_table(["backup", "type", "created", "files", "records", "size", "verified"],
                        rows, numeric=(3, 4, 5))
            + '<p class="muted">%s snapshot(s) in %s, repository %s</p>' % (
                _esc(backups.get("count")), _esc(backups.get("root")),
                _bytes_or_unknown(backups.get("repository_bytes"))) + problems)


_DASHBOARD_SECTIONS = (
    ("summary", "Summary", _summary_section), ("health", "Health checks", _health_section),
    ("alerts", "Open alerts", _alerts_section), ("growth", "Growth over time", _charts_section),
    ("sizes", "Sizes against limits", _sizes_section),
    ("forecasts", "Forecasts", _forecasts_section),
    ("jobs", "Last run of every job", _jobs_section),
    ("records", "Record counts", _records_section),
    ("backups", "Latest backups", _backups_section))


def render_dashboard(doc: Dict[str, Any], refresh: Optional[int] = None) -> str:
    """The self-contained HTML page of a dashboard document; ``refresh`` seconds reloads it."""
    status = str(_part(doc, "health").get("status", "unknown"))
    meta = '<meta http-equiv="refresh" content="%d">' % refresh if refresh else ""
    body = "".join('<section id="%s"><h2>%s</h2>%s</section>' % (key, _esc(title), draw(doc))
                   for key, title, draw in _DASHBOARD_SECTIONS)
    warnings = "".join("<li>%s</li>" % _esc(w) for w in doc.get("warnings") or [])
    if warnings:
        body += '<section id="warnings"><h2>Warnings</h2><ul>%s</ul></section>' % warnings
    note = " &middot; refreshes every %d s" % refresh if refresh else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">%s"
            "<title>aml: %s</title><style>%s</style></head><body>"
            "<h1>aml <span class=\"status s-%s\">%s</span></h1>"
            "<p class=\"muted\">%s &middot; measured %s &middot; aml %s%s</p>%s"
            "</body></html>\n" % (meta, _esc(doc.get("store")), _HTML_STYLE, _esc(status),
                                 _esc(status.upper()), _esc(doc.get("store")),
                                 _esc(doc.get("generated")), _esc(doc.get("version")), note,
                                 body))


def html_report(report: MonitorReport, thresholds: Optional[Dict[str, float]] = None,
                history: Sequence[Dict[str, Any]] = (),
                backups: Optional[Dict[str, Any]] = None) -> str:
    """The static page of ``monitor report --format html``: the dashboard, not refreshing."""
    return render_dashboard(dashboard_document(
        report, thresholds if thresholds is not None else DEFAULT_THRESHOLDS, list(history),
        backups if backups is not None else {"error": "not listed", "latest": []}))


# -- text, nagios and prometheus renderers of the command results; the dashboard views --

def _unix_time(text: Optional[str]) -> Optional[float]:
    moment = parse_timestamp(text) if text else None
    return round(moment.timestamp(), 3) if moment else None


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
    """Collects metric families in the Prometheus text exposition format (version 0.0.4).

    ``labels`` (the ``store`` label) are added to every sample, so two stores on one host
    do not collide in one textfile collector.
    """

    def __init__(self, labels: Optional[Dict[str, str]] = None) -> None:
        self.lines: List[str] = []
        self.labels = dict(labels or {})

    def family(self, name: str, help_text: str,
               samples: Iterable[Tuple[Dict[str, str], Optional[float]]]) -> None:
        """One gauge family; samples whose value is None (not measured) are left out."""
        known = [(labels, value) for labels, value in samples if value is not None]
        if not known:
            return
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\")))
        self.lines.append("# TYPE %s gauge" % name)
        for labels, value in known:
            labels = dict(self.labels, **labels)
            text = ",".join('%s="%s"' % (k, _prom_escape(str(v))) for k, v in labels.items())
            self.lines.append("%s%s %s" % (name, "{%s}" % text if text else "", _prom_value(value)))

    def gauge(self, name: str, help_text: str, value: Optional[float]) -> None:
        """A family of one unlabelled sample (none when ``value`` is None)."""
        self.family(name, help_text, [({}, value)])

    def text(self) -> str:
        """The exposition text, newline-terminated."""
        return "\n".join(self.lines) + "\n"


def prometheus_text(metrics: MetricsReport, health: Optional[HealthReport] = None,
                    alerts: Optional[List[Alert]] = None) -> str:
    """Metrics (and health and alert counts when given) in the Prometheus text format,
    base units (bytes, seconds), every sample labelled with its ``store``."""
    w = _PromWriter({"store": os.path.abspath(metrics.store)})
    w.gauge("aml_store_bytes", "Bytes of the memory store on disk, aml state excluded.",
            metrics.total_bytes)
    w.gauge("aml_state_bytes", "Bytes of aml's own state folder .aml.", metrics.state_bytes)
    w.gauge("aml_index_bytes", "Bytes of the persisted index.", metrics.index_bytes)
    w.family("aml_agent_bytes", "Bytes on disk per agent folder.",
             [({"agent": a.agent}, a.bytes) for a in metrics.agents])
    w.family("aml_agent_files", "JSON files per agent by encoding.",
             [({"agent": a.agent, "encoding": enc}, n) for a in metrics.agents
              for enc, n in (("gzip", a.gzip_files), ("plain", a.plain_files))])
    w.family("aml_records", "Records per agent, type and state (unreadable files excluded).",
             [({"agent": a.agent, "type": t, "state": s}, n) for a in metrics.agents
              for t, states in sorted(a.records.items()) for s, n in sorted(states.items())])
    w.family("aml_agent_records", "Records per agent and type, every state (unreadable files "
             "excluded).", [({"agent": a.agent, "type": t.value}, a.totals.get(t.value, 0))
                            for a in metrics.agents for t in RecordType])
    w.family("aml_store_records", "Records of the store per type, every state; sum() is the "
             "store's total.", [({"type": t.value}, metrics.totals.get(t.value, 0))
                                for t in RecordType])
    w.family("aml_unreadable_files", "Record files that could not be read or parsed.",
             [({"agent": a.agent}, len(a.unreadable)) for a in metrics.agents])
    _prom_performance(w, metrics)
    if health is not None:
        _prom_health(w, health, alerts or [])
    return w.text()


def _prom_performance(w: _PromWriter, metrics: MetricsReport) -> None:
    perf = metrics.performance
    w.gauge("aml_growth_bytes_per_second", "Store growth rate over the last 30 days.",
            _scaled(metrics.growth.bytes_per_day, per=_DAY_SECONDS))
    w.family("aml_limit_eta_seconds", "Time until a size limit at the current growth.",
             [({"limit": f.limit, "subject": f.subject}, _scaled(f.days_until, _DAY_SECONDS))
              for f in metrics.forecasts])
    w.gauge("aml_full_load_seconds", "Time to read and parse every record file, now.",
            _scaled(perf.full_load_ms, per=1000.0))
    w.gauge("aml_lookup_seconds", "Time of one indexed lookup, measured now.",
            _scaled(perf.lookup_ms, per=1000.0))
    w.gauge("aml_cache_hit_ratio", "Hot-cache hit ratio recorded by real lookups.",
            perf.cache_hit_rate)
    ops = sorted(perf.last_operations.values(), key=lambda o: o.operation)
    w.family("aml_last_operation_duration_seconds", "Duration of the last run.",
             [({"operation": o.operation}, o.seconds) for o in ops])
    w.family("aml_last_operation_age_seconds", "Time since the last run started.",
             [({"operation": o.operation}, _scaled(o.age_days, _DAY_SECONDS)) for o in ops])
    w.family("aml_last_operation_timestamp_seconds", "Start of the last run (Unix time).",
             [({"operation": o.operation}, _unix_time(o.started)) for o in ops])
    for kind, run in (("success", "successful run"), ("failure", "failed run")):
        w.family("aml_job_last_%s_timestamp_seconds" % kind, "Start of the last %s of each "
                 "scheduled job (Unix time)." % run,
                 [({"job": job}, _unix_time(times.get("last_" + kind)))
                  for job, times in sorted(metrics.jobs.items())])


def _prom_health(w: _PromWriter, health: HealthReport, alerts: List[Alert]) -> None:
    w.family("aml_health_status", "Health per check: 0 ok, 1 warning, 2 critical, 3 unknown.",
             [({"check": c.name}, c.status.exit_code) for c in health.checks])
    w.gauge("aml_health_overall", "Overall health: 0 ok, 1 warning, 2 critical, 3 unknown.",
            health.status.exit_code)
    w.family("aml_alerts_open", "Open alerts by level.",
             [({"level": level.value}, sum(1 for a in alerts if a.level is level))
              for level in AlertLevel])


def dashboard_views(monitor: MemoryMonitor, config_file: Optional[Path] = None,
                    refresh: Optional[int] = None) -> Dict[str, Tuple[str, bytes]]:
    """Measure once without writing; {path: (content type, body)} of every served path.

    The JSON bodies are what ``monitor health|metrics|alerts --format json`` print (health
    without alert changes: the server never evaluates alerts). Raises AmlError or OSError.
    """
    reader = monitor if isinstance(monitor, _ReadOnlyMonitor) else _ReadOnlyMonitor(
        monitor.store, monitor.thresholds)
    report = reader.snapshot()
    history = _history_for_display(reader.store, report.warnings)
    doc = dashboard_document(report, reader.thresholds, history,
                             backup_summary(reader.store, config_file))
    prom = prometheus_text(report.metrics, report.health, report.alerts)
    return {"/": (_HTML_TYPE, render_dashboard(doc, refresh).encode("utf-8")),
            "/metrics": (_PROM_TYPE, prom.encode("utf-8")),
            "/api/health": _json_view(report.health), "/api/metrics": _json_view(report.metrics),
            "/api/alerts": _json_view({"alerts": report.alerts}),
            "/api/dashboard": _json_view(doc)}


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


def _record_line(found: FoundRecord) -> str:
    facts = record_facts(RecordType(found.type), found.record)
    rec = found.record if isinstance(found.record, dict) else {}
    summary = (dig(rec, "pattern", "approach", "technique") or dig(rec, "problem", "errorType")
               or dig(rec, "decision", "question") or "")
    score = lambda v: "-" if v is None else "%.2f" % v  # noqa: E731
    return "%s[%d]  %s  conf=%s sr=%s  tags=%s  %s" % (
        found.file, found.index, found.id or "-", score(facts.confidence),
        score(facts.success_rate), ",".join(facts.tags) or "-", summary)


def _metrics_lines(report: MetricsReport) -> List[str]:
    """The text form of a metrics report."""
    lines = ["Store %s: %s in %d agents (aml state %s, index %s)" % (
        report.store, human_bytes(report.total_bytes), len(report.agents),
        human_bytes(report.state_bytes),
        human_bytes(report.index_bytes) if report.index_bytes else "none"),
        "Files: %d gzip, %d plain; largest agent: %s" % (report.gzip_files, report.plain_files,
                                                         report.largest_agent or "none"),
        "Records: %d (%s); per type: all = active/inactive/invalid" % (
            report.totals.get("total", 0), ", ".join(
                "%d %ss" % (report.totals.get(t.value, 0), t.value) for t in RecordType)),
        "%-24s %10s  %-20s  %-20s  %-20s  %s" % ("AGENT", "SIZE", "PATTERNS", "SOLUTIONS",
                                                  "DECISIONS", "RECORDS")]
    rows = [(a.agent, a.bytes, a.records, a.totals) for a in report.agents]
    rows.append(("STORE", report.total_bytes, report.records, report.totals))
    for name, size, records, totals in rows:
        lines.append("%-24s %10s  %s  %d" % (name, human_bytes(size), "  ".join(
            "%-20s" % ("%d = %d/%d/%d" % ((totals.get(t.value, 0),) + tuple(
                records[t.value][state] for state in ("active", "inactive", "invalid"))))
            for t in RecordType), totals.get("total", 0)))
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
            _bytes_or_unknown(growth.bytes_per_day))]
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
        lines.append("  " + _QUIET_FORECASTS % quiet)
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


def _health_lines(report: HealthReport) -> List[str]:
    lines = ["Health: %s (%s)" % (report.status.nagios, report.store)] + [
        "  %-9s %-12s %s" % (check.status.value, check.name, check.message)
        for check in report.checks]
    changes = report.alerts
    if changes is not None and (changes.fired or changes.resolved):
        lines.append("Alerts: %d fired, %d resolved, %d open (see: monitor alerts)"
                     % (len(changes.fired), len(changes.resolved), len(changes.open)))
    return lines


def _alert_lines(alerts: List[Alert], include_resolved: bool) -> List[str]:
    row = "%-22s %-8s %-15s %5s  %-24s %-24s %s"
    lines = [row % ("ID", "LEVEL", "STATE", "COUNT", "FIRST SEEN", "LAST SEEN", "MESSAGE")]
    for alert in alerts:
        state = alert.state if alert.state == "firing" else "%s (%s)" % (alert.state,
                                                                          alert.resolved_by)
        lines.append(row % (alert.id, alert.level.value, state, "%d" % alert.count,
                            alert.first_seen, alert.last_seen, alert.message))
    return lines if alerts else ["No %salerts." % ("" if include_resolved else "open ")]


def _shown(value: Any, unit: str = "") -> str:
    return "unknown" if value is None else ("%.2f" % value if isinstance(value, float)
                                            else str(value)) + unit


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
    # No defaults (_finish_args sets them): a subcommand's would undo the option given before it.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--format", choices=("text", "json"), help="output format (default: text)")
    common.add_argument("-q", "--quiet", action="store_true",
                        help="print nothing on success (for cron)")
    common.add_argument("--now", metavar="TIMESTAMP",
                        help="fix the clock (ISO 8601) for reproducible runs and previews")
    common.add_argument("--config", metavar="FILE", type=Path,
                        help="aml config file (default: <memory_path>/.aml/config.json if present)")
    common.add_argument("--lock-timeout", metavar="SECONDS", type=float,
                        help="how long to wait for a busy lock (default: %d)"
                        % DEFAULT_LOCK_TIMEOUT)
    return common


COMMON = _common_options()
_COMMON_DEFAULTS = {"format": "text", "quiet": False, "now": None, "config": None,
                    "lock_timeout": DEFAULT_LOCK_TIMEOUT}


def subparser(subparsers: Any, name: str, help_text: str, epilog: Optional[str] = None,
              common: argparse.ArgumentParser = COMMON, **defaults: Any) -> argparse.ArgumentParser:
    """Add a (sub)command that accepts the ``common`` options and raises UsageError on bad
    input; ``defaults`` (its handler ``func``, ...) are set on what it parses."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                   parents=[common],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(**defaults)
    return parser


def _subcommands(parser: argparse.ArgumentParser, dest: str, metavar: str = "ACTION") -> Any:
    """The required (sub)commands of ``parser``; theirs too raise UsageError."""
    return parser.add_subparsers(dest=dest, metavar=metavar, parser_class=_Parser, required=True)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line parser."""
    doc = (__doc__ or "").split("\n\n")
    parser = _Parser(prog="aml", description=doc[0] + "\n\n" + doc[1],
                     epilog="\n\n".join(doc[2:]), parents=[COMMON],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="aml %s" % __version__)
    parser.add_argument("memory_path", type=Path, help="the memory store (e.g. .loom/memory)")
    subparsers = _subcommands(parser, "command", "COMMAND")
    for builder in _COMMAND_BUILDERS:
        builder(subparsers)
    return parser


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in _COMMON_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    args.reporter = ProgressReporter(sys.stderr, not args.quiet and sys.stderr.isatty())
    args.now = _time_flag("--now", args.now)
    return args


def _time_flag(flag: str, value: Optional[str]) -> Optional[_dt.datetime]:
    """What ``flag`` was given (None: not given) as a time; UsageError if not ISO 8601."""
    moment = None if value is None else parse_timestamp(value)
    if value is not None and moment is None:
        raise UsageError("%s %r is not an ISO 8601 timestamp" % (flag, value))
    return moment


def program_invocation(argv0: Optional[str] = None) -> str:
    """How the user ran aml, quoted so a printed hint can be pasted: ``aml`` (found on the
    PATH), ``./aml.py`` (an executable path), ``python3 aml.py`` (through the interpreter);
    ``aml`` when this file is not the running script (imported, main() called in-process)."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    here = os.path.realpath(__file__)
    if not argv0 or os.path.realpath(argv0) != here:
        return "aml"
    found = shutil.which(os.path.basename(argv0)) if os.sep in argv0 else None
    if found and os.path.realpath(found) == here:
        return shlex.quote(os.path.basename(argv0))
    if os.sep in argv0 and os.access(argv0, os.X_OK):
        return shlex.quote(argv0)
    return "%s %s" % (_interpreter(), shlex.quote(argv0))


def _interpreter() -> str:
    """The running Python by a name the PATH knows (``python3``), else its full path."""
    typed = (getattr(sys, "orig_argv", None) or [sys.executable])[0] or sys.executable
    for name in (os.path.basename(typed), os.path.basename(sys.executable)):
        if name and shutil.which(name):
            return shlex.quote(name)
    return shlex.quote(sys.executable)


def open_store(args: argparse.Namespace) -> Store:
    """The Store named on the command line, with the run's clock and lock wait.

    Raises UsageError for a folder that is not a store (see check_is_store), so no command
    creates ``.aml/`` in a wrong folder; restoring into an empty folder is allowed.
    """
    store = Store(args.memory_path, now=args.now, lock_timeout=args.lock_timeout,
                  config_file=args.config)
    store.progress = args.reporter.update
    store.save_optional = _reads_only(args)
    args.store = store  # main() names what a read-only user's run could not save
    if store.save_optional and store.state_dir.is_dir() and not os.access(
            str(store.state_dir), os.R_OK | os.X_OK):
        _use_scratch_state(args, store)
    restoring = getattr(args, "backup_command", None) == "restore"
    if not (restoring and not any(os.scandir(str(store.root)))):
        check_is_store(store)
    return store


# What a handler returns: its exit code, or the result it reported (see _exit_code).
Outcome = Union[int, OperationResult, HealthReport]


def output_for(args: argparse.Namespace) -> Output:
    """The Output object for a parsed command line (sharing the run's progress line)."""
    return Output(args.format, args.quiet, reporter=args.reporter)


# --- prune command (section 11) ---

@command_builder
def _build_prune(subparsers: Any) -> None:
    parser = subparser(
        subparsers, "prune",
        "remove stale and low-value records; every removal is archived (undo with --undo)",
        epilog="strategies: time_based, performance_based, space_based (default: all three).\n"
               "The original spelling 'prune time_based performance_based' works too.",
        func=cmd_prune)
    parser.add_argument("strategy_words", nargs="*", metavar="STRATEGY",
                        help="strategies to run (same as --strategies)")
    parser.add_argument("--strategies", nargs="+", metavar="STRATEGY", default=[],
                        help="time_based, performance_based and/or space_based")
    parser.add_argument("--aggressive", action="store_true",
                        help="tighten to 60/120 days and a 0.30 success floor")
    parser.add_argument("--scoring", choices=SCORINGS,
                        help="mean (default) or wilson: protect and rank on the lower bound "
                        "of the 95%% Wilson interval of a success rate, prune on its upper bound")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would go; change nothing at all")
    parser.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents")
    parser.add_argument("--force", action="store_true",
                        help="override the mass-deletion guard and pruning.enabled=false")
    parser.add_argument("--no-backup", action="store_true",
                        help="skip the safety backup taken before the first change")
    parser.add_argument("--undo", metavar="RUN_ID",
                        help="put back the records of an archived prune, gc or dedupe run")
    parser.add_argument("--list-runs", action="store_true",
                        help="list archived runs that --undo accepts")
    parser.add_argument("-v", "--list", action="store_true", dest="list_records",
                        help="also list every record removed (or that would be), with its "
                        "reason (always in --format json)")


def _prune_flags(args: argparse.Namespace) -> Dict[str, Any]:
    given = (("aggressive", args.aggressive, True), ("scoring", args.scoring, args.scoring),
             ("dry_run", args.dry_run, True), ("create_backup", args.no_backup, False))
    return {key: value for key, flag, value in given if flag}


def cmd_prune(args: argparse.Namespace) -> Outcome:
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
    _print_prune(out, result, args.memory_path, args.list_records)
    return result


def _print_prune(out: Output, result: PruneResult, memory_path: Path,
                 list_records: bool = False) -> None:
    out.report(result, unreadable="skipped unreadable %s")
    if result.refused:
        out.warn("a real run would refuse: " + result.refused)
    verb = "would remove" if result.dry_run else "removed"
    estimate = " (estimate)" if result.bytes_estimated else ""
    for summary in result.agents:  # totals first: per agent, then per reason
        out.line("%s: %s %d of %d records (%d patterns, %d solutions, %d decisions), "
                 "%s -> %s%s" % (summary.agent, verb, summary.removed_total,
                                 summary.records_before, summary.removed["pattern"],
                                 summary.removed["solution"], summary.removed["decision"],
                                 human_bytes(summary.bytes_before),
                                 human_bytes(summary.bytes_after), estimate))
    reasons = collections.Counter(rec.reason.value for rec in result.removed)
    out.line("by reason: %s" % (", ".join("%s %d" % kv for kv in sorted(reasons.items()))
                                or "nothing to remove"))
    if list_records:  # asked for: shown even with --quiet
        for rec in result.removed:
            out.always("%s %s %s %s %s (%s)" % (verb, rec.agent, rec.type, rec.id or
                                               "#%d" % rec.index, rec.reason.value,
                                               _details_text(rec.details)))
    for finding in result.findings:
        out.line("finding: %s%s" % ("%s: " % finding["file"] if "file" in finding else "",
                                    finding["problem"]))
    if result.dry_run:
        out.line("dry run: nothing was changed")
    elif result.removed:
        backup = "; safety backup %s" % result.backup_id if result.backup_id else ""
        out.line("run %s%s; undo with: %s %s prune --undo %s"
                 % (result.run_id, backup, program_invocation(), shlex.quote(str(memory_path)),
                    result.run_id))


def _print_undo(out: Output, result: UndoResult) -> int:
    for item in result.not_restored:
        out.warn("not restored: %d records of %s (%s)" % (item["records"], item["file"],
                                                          item["why"]))
    out.document(result)
    if result.already_undone:
        out.always("run %s was already undone at %s; nothing to do"
                   % (result.run_id, result.already_undone))
        return int(ExitCode.OK)
    for skip in result.skipped:
        out.line("skipped %s %s: %s" % (skip["file"], skip["id"] or "#%s" % skip["index"],
                                        skip["why"]))
    for block in result.blocked:
        out.warn("not undone yet: %s %s: %s" % (block["file"], block["id"], block["why"]))
    out.line("run %s (%s): restored %d records, skipped %d"
             % (result.run_id, result.operation, result.restored, len(result.skipped)))
    if result.not_restored:
        out.warn("run %s is not marked undone: %d files were not restored; rerun the undo "
                 "(it puts back only what is still missing)"
                 % (result.run_id, len(result.not_restored)))
    return int(result.exit_code)


# --- optimize, search and get commands (sections 9, 10, 12) ---

_OPTIMIZE_EPILOG = """actions:
  index (or build-index)  build or refresh the index in .aml/index/ (re-reads changed files only)
  compress                gzip agent files unchanged for --age-days, in place, same names
  decompress              turn gzip agent files back into plain JSON
  warm-cache              persist the highest-value records (up to --cache-bytes) for get/search
  gc                      archive unusable, duplicate and same-id records; clean stale locks,
                          temp files and orphaned index state
  dedupe                  report near-duplicate records (same agent and type) and what differs;
                          --apply merges each cluster into its survivor (archived: undo with
                          prune --undo RUN); --threshold sets the Jaccard (default 0.85)
  all                     gc, [dedupe,] compress, index, warm-cache (in that order: each step
                          changes the files the next one reads, and the index is built last so
                          it is fresh for the cache and for get/search); dedupe runs, merging,
                          only when the aml config sets "optimize": {"dedupe": true}"""


@command_builder
def _build_optimize(subparsers: Any) -> None:
    parser = subparser(subparsers, "optimize", "index, compress, warm the cache, collect garbage",
                       epilog=_OPTIMIZE_EPILOG, func=cmd_optimize)
    parser.add_argument("action", choices=OPTIMIZE_ACTIONS)
    parser.add_argument("--apply", action="store_true",
                        help="dedupe: merge the clusters (default: report only)")
    parser.add_argument("--threshold", type=float, metavar="J",
                        help="dedupe: Jaccard similarity to call records near-duplicates "
                        "(default 0.85)")
    parser.add_argument("--dry-run", action="store_true", help="change nothing; report the plan")
    parser.add_argument("--age-days", type=float, metavar="N",
                        help="compress files unchanged for N days (default 30; 0 = all)")
    parser.add_argument("--cache-bytes", type=int, metavar="BYTES",
                        help="hot cache budget (default %d)" % DEFAULT_CACHE_BYTES)
    parser.add_argument("--workers", type=int, metavar="N",
                        help="compress/decompress threads (default: two per CPU core)")
    parser.add_argument("--no-backup", action="store_true",
                        help="skip the safety backup before gc/dedupe/compress")
    parser.add_argument("--force", action="store_true",
                        help="let gc or dedupe remove more than half of an agent's records")


def cmd_optimize(args: argparse.Namespace) -> Outcome:
    """optimize ACTION: run one step or all of them under the maintenance lock."""
    store, out = open_store(args), output_for(args)
    config = optimize_config_for(  # defaults < aml config section "optimize" < flags
        store, args.config, compress_age_days=args.age_days, cache_max_bytes=args.cache_bytes,
        workers=args.workers, dedupe_threshold=args.threshold,
        create_backup=False if args.no_backup else None)
    if (args.apply or args.threshold is not None) and args.action != "dedupe":
        raise UsageError("--apply and --threshold belong to optimize dedupe")
    dry_run = args.dry_run or (args.action == "dedupe" and not args.apply)  # report only
    result = optimize(store, args.action, config, dry_run=dry_run, force=args.force)
    named: Set[str] = set()  # each busy file named once, by its first step
    for step, outcome in result.steps.items():
        _print_step(out, step, outcome, named)
    return result


def _print_step(out: Output, step: str, result: Any, named: Set[str]) -> None:
    for problem in getattr(result, "unreadable", []):
        out.warn("%s: skipped, unreadable: %s" % (step, problem))
    for message in getattr(result, "busy", []):
        lock = message.split(" (")[0]  # "store busy: <lock> is locked by another process"
        if lock not in named:
            named.add(lock)
            out.warn("%s: skipped, left as it was: %s" % (step, message))
    _STEP_PRINTERS[type(result)](out, result, "would " if result.dry_run else "")


def _print_index(out: Output, result: IndexResult, would: str) -> None:
    out.line("index: %s%s; %d files, %d re-read, %d records, %d ids, %s on disk (bloom %s)"
             % (would, "rebuild" if result.rebuilt else "refresh", result.files,
                len(result.files_reread), result.records, result.ids,
                human_bytes(result.index_bytes), human_bytes(result.bloom_bytes)))


def _print_transcode(out: Output, result: TranscodeResult, would: str) -> None:
    step = result.operation
    out.line("%s: %s%s %d files, %s -> %s; skipped %d recent, %d already done, %d changed%s"
             % (step, would, step, len(result.files), human_bytes(result.bytes_before),
                human_bytes(result.bytes_after), len(result.skipped_recent),
                len(result.skipped_done), len(result.skipped_changed),
                "; safety backup %s" % result.backup_id if result.backup_id else ""))


def _print_warm(out: Output, result: WarmResult, would: str) -> None:
    out.line("warm-cache: %skeep %d records hot, %s of %s (%d ranked, %d files read)%s"
             % (would, result.records, human_bytes(result.bytes), human_bytes(result.budget),
                result.candidates, result.files_read,
                ("; " + result.note) if result.note else ""))


def _print_dedupe(out: Output, result: DedupeResult, would: str) -> None:
    verb = would + "merge" if result.dry_run else "merged"
    for cluster in result.clusters:
        out.line("cluster %s %s: keep %s [%d] (%s)" % (
            cluster.file, cluster.type, cluster.survivor_id, cluster.survivor_index, cluster.why))
        for member in cluster.members:
            out.line("  %s %s [%d] similarity %.3f; differs: %s" % (
                verb, member["id"], member["index"], member["similarity"],
                "; ".join(member["differs"]) or "nothing"))
    for held in result.held_apart:
        out.line("kept apart %s %s [%d] ~ %s [%d] (similarity %.3f): %s differ: %s" % (
            held["file"], held["ids"][0], held["indexes"][0], held["ids"][1],
            held["indexes"][1], held["similarity"], held["guard"], held["differs"]))
    guarded = ", ".join("%s %d" % kv for kv in sorted(result.guarded.items())) or "none"
    out.line("dedupe: %s %d records into %d survivors; %d files, %d records read; kept apart "
             "by the guard: %s; threshold %.2f%s" % (
                 verb, result.merged, len(result.clusters), result.files, result.records,
                 guarded, result.threshold,
                 "; run %s (undo: prune --undo %s)" % (result.run_id, result.run_id)
                 if result.run_id else ""))
    for agent in result.refused_agents:
        out.warn("dedupe: more than half of the records of %s would be merged away: refused "
                 "without --force" % agent)
    for message in result.busy:
        out.warn(message)


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
                 % first_few(result.refused_agents, "agent"))
    if result.skipped_changed:
        out.warn("gc: %d records changed meanwhile and were left in place"
                 % result.skipped_changed)


# How each step's result is printed (the steps themselves: OPTIMIZE_STEPS).
_STEP_PRINTERS: Dict[type, Callable[[Output, Any, str], None]] = {
    IndexResult: _print_index, TranscodeResult: _print_transcode, WarmResult: _print_warm,
    DedupeResult: _print_dedupe, GcResult: _print_gc}


def _add_lookup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scan", action="store_true",
                        help="read-only scan of every file; no index, nothing written")


@command_builder
def _build_search(subparsers: Any) -> None:
    parser = subparser(subparsers, "search", "find records by agent, type, tags, text, scores",
                       func=cmd_search)
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


def cmd_search(args: argparse.Namespace) -> int:
    """search: print matching records (text: one line each; json: the records)."""
    store, out = open_store(args), output_for(args)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    query = SearchQuery(args.agent, args.rtype, tuple(args.tags),
                        " ".join(args.text) if args.text else None, args.min_confidence,
                        args.min_success_rate, args.limit)
    result = search_records(store, query, use_index=not args.scan)
    return _print_lookup(out, result, map(_record_line, result.records), "%d record%s (%s)"
                         % (result.count, "" if result.count == 1 else "s", result.source))


def _print_lookup(out: Output, result: LookupResult, texts: Iterable[str],
                  summary: str = "") -> int:
    """The document, each record's text (even with -q), ``summary``, problems; the exit code."""
    out.document(dict(dataclasses.asdict(result), count=result.count))
    for text in texts:
        out.always(text)
    if summary:
        out.line(summary)
    out.report(result)
    if result.not_found:
        out.warn(result.message or "not found")
    return result.exit_code


@command_builder
def _build_get(subparsers: Any) -> None:
    parser = subparser(subparsers, "get", "print the record(s) with this id", func=cmd_get)
    parser.add_argument("record_id", metavar="RECORD_ID")
    _add_lookup_options(parser)


def cmd_get(args: argparse.Namespace) -> int:
    """get ID: print the record as JSON (with a location line when several agents hold it)."""
    store, out = open_store(args), output_for(args)
    result = get_record(store, args.record_id, use_index=not args.scan)
    return _print_lookup(out, result, (
        ("# %s [%d]\n" % (found.file, found.index) if result.count > 1 else "")
        + runtime_json(found.record) for found in result.records))


# --- backup command (section 8) ---

def _backup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backup-root", metavar="DIR", type=Path, default=None,
                        help="backup folder (default: the store's sibling memory-backup/)")


def _keep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention-days", type=int, metavar="N", default=None,
                        help="delete snapshots older than N days (default 30; not "
                        "applied when a --keep-* is given)")
    parser.add_argument("--max-backups", type=int, metavar="N", default=None,
                        help="keep at most N snapshots (default 100)")
    parser.add_argument("--keep-last", type=int, metavar="N", default=0,
                        help="keep the N newest snapshots (any --keep-* replaces the "
                        "--retention-days age rule)")
    parser.add_argument("--keep-within", type=int, metavar="DAYS", default=0,
                        help="keep every snapshot younger than DAYS")
    for unit in KEEP_RULES:
        parser.add_argument("--keep-%s" % unit, type=int, metavar="N", default=0,
                            help="keep the newest snapshot of each of the last N %s"
                            % {"hourly": "hours", "daily": "days", "weekly": "weeks",
                               "monthly": "months", "yearly": "years"}[unit])


def _keep_args(args: argparse.Namespace) -> Dict[str, int]:
    return {"keep_" + rule: getattr(args, "keep_" + rule) for rule in ("last", "within") +
            tuple(KEEP_RULES)}


def _repo_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", metavar="DEST", default=None,
                        help="read another repository (a copy): a folder holding aml/, or "
                        "rclone:NAME:path")


def _create_options(parser: argparse.ArgumentParser, incremental_flag: bool) -> None:
    if incremental_flag:
        parser.add_argument("--incremental", action="store_true",
                            help="trust unchanged size/mtime of files (default: full re-read)")
    parser.add_argument("--agents", nargs="+", metavar="A", help="only these agents")
    parser.add_argument("--compression-level", type=int, metavar="0-9", default=None)
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the verification after the backup")
    parser.add_argument("--dry-run", action="store_true",
                        help="read the store as the backup would; say what it would read and "
                        "add; write nothing")


def _backup_manager(args: argparse.Namespace) -> BackupManager:
    store = open_store(args)
    overrides = {key: getattr(args, key, None) for key in ("backup_root", "retention_days",
                                                           "max_backups", "compression_level")}
    if getattr(args, "no_verify", False):
        overrides["verify_after_backup"] = False
    manager = BackupManager(store, backup_config_for(store, args.config, **overrides))
    manager.progress = output_for(args).progress
    return manager


def _in_repository(args: argparse.Namespace, read: Callable[..., Any], *params: Any) -> Any:
    """``read(manager, *params)`` on the repository of --repo (default: the store's own)."""
    with open_repository(_backup_manager(args), args.repo) as manager:
        return read(manager, *params)


def _print_backup(out: Output, result: BackupResult) -> None:
    out.progress_done()
    out.report(result)
    for repair in result.repaired:   # the repository was damaged: say so even with -q
        out.warn("repaired damaged backup data: %s" % repair)
    out.line("%s: %d files, %d records, %d files read, %d new objects, %s added%s"
             % (result.backup_id, result.files, result.records, result.files_reread,
                result.objects_added, human_bytes(result.bytes_added),
                ", verified" if result.verified else ""))


def cmd_backup_create(args: argparse.Namespace) -> Outcome:
    """backup create/full/incremental: take a snapshot."""
    out = output_for(args)
    incremental = args.kind == "incremental" or getattr(args, "incremental", False)
    btype = BackupType.INCREMENTAL if incremental else BackupType.FULL
    if args.dry_run:
        result = plan_backup(_backup_manager(args), btype, agents=args.agents)
        _print_plan(out, result)
    else:
        result = _backup_manager(args).create(btype, agents=args.agents)
        _print_backup(out, result)
    return result


def cmd_backup_list(args: argparse.Namespace) -> Outcome:
    """backup list: snapshots, foreign files, repository size."""
    out, result = output_for(args), _in_repository(args, lambda manager: manager.list())
    out.report(result)
    mark = {True: "verified", False: "FAILED", None: "unverified"}
    for snap in result.snapshots:
        out.line("%-26s %-11s %s %5d files %7d records %10s  %s%s" % (
            snap.backup_id, snap.type, snap.created, snap.files, snap.records,
            human_bytes(snap.logical_bytes), mark[snap.verified],
            "  (%s)" % snap.reason if snap.reason else ""))
    for name in result.foreign:
        out.line("%-26s foreign (not aml's; left alone)" % name)
    out.line("repository %s: %d snapshots, %s%s" % (
        args.repo or result.backup_root / REPO_DIR_NAME, len(result.snapshots),
        human_bytes(result.repository_bytes),
        " (and %d of other stores)" % result.other_stores if result.other_stores else ""))
    return result


def _one_backup_id(args: argparse.Namespace) -> Optional[str]:
    if args.backup_id and args.backup_id_flag and args.backup_id != args.backup_id_flag:
        raise UsageError("two different backup ids given")
    return args.backup_id or args.backup_id_flag


def cmd_backup_verify(args: argparse.Namespace) -> Outcome:
    """backup verify: check snapshots; exit 6 naming what is wrong."""
    out, result = output_for(args), _in_repository(args, lambda manager: manager.verify(
        _one_backup_id(args), deep=args.deep, all_snapshots=args.all))
    out.progress_done()
    out.report(result, errors=True)
    out.line("%s %s: %d files, %d objects checked%s" % (
        ", ".join(result.backup_ids), "OK" if result.ok else "FAILED", result.files_checked,
        result.objects_checked, " (deep)" if result.deep else ""))
    return result


def cmd_backup_restore(args: argparse.Namespace) -> Outcome:
    """backup restore: put a snapshot back (or preview it with --dry-run)."""
    out = output_for(args)
    at = _time_flag("--at", args.at or None)
    result = _in_repository(args, lambda manager: manager.restore(
        _one_backup_id(args), at=at, agents=args.agents, target=args.target,
        dry_run=args.dry_run, force=args.force))
    out.progress_done()
    out.report(result)
    for label, paths in (("create", result.created), ("replace", result.replaced),
                         ("remove", result.removed)):
        for rel in paths if result.dry_run else []:
            out.always("would %s %s" % (label, rel))
    out.line("%s into %s: %d created, %d replaced, %d removed, %d unchanged%s%s" % (
        result.backup_id, result.target, len(result.created), len(result.replaced),
        len(result.removed), result.unchanged, " (dry run)" if result.dry_run else "",
        "; safety backup %s" % result.safety_backup if result.safety_backup else ""))
    return result


def cmd_backup_rotate(args: argparse.Namespace) -> Outcome:
    """backup rotate: apply retention and free unused space."""
    result = _backup_manager(args).rotate(dry_run=args.dry_run, **_keep_args(args))
    _print_rotate(output_for(args), result)
    return result


def _print_rotate(out: Output, result: RotateResult) -> None:
    out.report(result)
    verb = "would delete" if result.dry_run else "deleted"
    for backup_id in result.deleted:
        (out.always if result.dry_run else out.line)("%s %s" % (verb, backup_id))
    for backup_id in result.kept if result.dry_run else []:
        out.always("would keep %s: %s" % (backup_id, ", ".join(result.reasons.get(backup_id,
                                                                                  []))))
    out.line("%s %d, kept %d snapshots; %d objects, %s freed%s" % (
        verb, len(result.deleted), len(result.kept), result.objects_freed,
        human_bytes(result.bytes_freed), " (dry run)" if result.dry_run else ""))


def cmd_backup_auto(args: argparse.Namespace) -> Outcome:
    """backup auto: snapshot when due, verify, rotate (for cron)."""
    out = output_for(args)
    result = _backup_manager(args).auto(dry_run=args.dry_run, **_keep_args(args))
    if result.backup:
        _print_backup(out, result.backup)
    elif result.plan:
        _print_plan(out, result.plan)
    else:
        out.line("no backup due: %s" % result.skipped)
    _print_rotate(out, result.rotate)
    if result.copy:
        _print_copy(out, result.copy)
    if result.copy_error:
        out.error(result.copy_error)
    return result


@command_builder
def _build_backup(subparsers: Any) -> None:
    parser = subparser(subparsers, "backup", "snapshots of the store: create, list, verify, "
                       "restore, rotate, auto, copy, ls, diff, dump, stats")
    sub = _subcommands(parser, "backup_command")
    for name, help_text in (("create", "take a snapshot (full unless --incremental)"),
                            ("full", "take a full snapshot (re-reads every file)"),
                            ("incremental", "take an incremental snapshot")):
        p = subparser(sub, name, help_text, func=cmd_backup_create, kind=name)
        _backup_options(p)
        _create_options(p, incremental_flag=name == "create")
    subparser(sub, "list", "list snapshots (and foreign files in the backup folder)",
              func=cmd_backup_list)
    p = subparser(sub, "verify", "check a snapshot's manifest and objects (exit 6 if bad)",
                  func=cmd_backup_verify)
    _backup_options(p)
    p.add_argument("backup_id", nargs="?", help="snapshot id (default: the newest)")
    p.add_argument("--backup-id", dest="backup_id_flag", metavar="ID", help="snapshot id")
    p.add_argument("--all", action="store_true", help="verify every snapshot")
    p.add_argument("--deep", action="store_true", help="also rebuild and parse every file")
    _repo_option(p)
    _build_restore(sub)
    for name, help_text, func in (
            ("rotate", "delete old snapshots and free their space", cmd_backup_rotate),
            ("auto", "for cron: snapshot when due, verify, rotate", cmd_backup_auto)):
        p = subparser(sub, name, help_text, func=func)
        _backup_options(p)
        _keep_options(p)
        p.add_argument("--dry-run", action="store_true",
                       help="change nothing; say what would be %sdeleted, and why each kept "
                       "snapshot is kept" % ("taken, copied and " if name == "auto" else ""))
    _build_backup_inspection(sub)


def _print_plan(out: Output, plan: BackupPlan) -> None:
    out.report(plan)
    out.always("would take %s backup%s: %d files, %d records; would read %d files (%s); "
               "%d new, %d changed; would add about %d objects, %s before compression "
               "(dry run)" % ("a full" if plan.type is BackupType.FULL else "an incremental",
                              " on %s" % plan.baseline if plan.baseline
                              else "", plan.files, plan.records, plan.files_read,
                              human_bytes(plan.bytes_read), plan.files_new, plan.files_changed,
                              plan.objects_added, human_bytes(plan.bytes_added)))


def _print_copy(out: Output, result: CopyResult, errors: Optional[bool] = None) -> None:
    out.progress_done()
    out.report(result, errors=errors)
    verb = "would copy" if result.dry_run else "copied"
    for backup_id in result.copied:
        (out.always if result.dry_run else out.line)("%s %s" % (verb, backup_id))
    if result.dry_run:
        out.always("to %s: would copy %d snapshots (%d there already), %d objects, %s before "
                   "compression (dry run)" % (result.destination, len(result.copied),
                                             len(result.present), result.objects_copied,
                                             human_bytes(result.bytes_copied)))
        return
    if not result.copied and not result.problems:
        out.line("to %s: nothing to copy (%d snapshots there already)"
                 % (result.destination, len(result.present)))
        return
    out.line("to %s: %d snapshots copied (%d there already), %d objects, %s written; %s" % (
        result.destination, len(result.copied), len(result.present), result.objects_copied,
        human_bytes(result.bytes_copied), "verified there (%d objects checked)"
        % result.objects_checked if result.verified else "NOT verified"))


def cmd_backup_copy(args: argparse.Namespace) -> Outcome:
    """backup copy: snapshots into a second repository (folder or rclone remote), verified."""
    manager = _backup_manager(args)
    to = args.to or manager.config.copy_to
    if not to:
        raise UsageError("name the destination: --to DEST (or [backup] copy_to in the config)")
    result = copy_backups(manager, to, args.backup_ids, dry_run=args.dry_run)
    _print_copy(output_for(args), result, errors=True)
    return result


def cmd_backup_ls(args: argparse.Namespace) -> Outcome:
    """backup ls: the files of a snapshot, with records and sizes."""
    out, result = output_for(args), _in_repository(args, list_snapshot, args.backup_id)
    out.line("%s (%s, %s): %d files, %d records, %s" % (
        result.backup_id, result.type, result.created, len(result.files), result.records,
        human_bytes(result.bytes)))
    for item in result.files:
        out.line("  %7s  %-7s %-4s %10s  %s" % (
            "-" if item.records is None else item.records, item.kind,
            "gzip" if item.gzip else "", human_bytes(item.size), item.path))
    return result


def cmd_backup_diff(args: argparse.Namespace) -> Outcome:
    """backup diff: records added, removed and changed between two snapshots."""
    out, result = output_for(args), _in_repository(args, diff_snapshots, args.a, args.b)
    mark = {"added": "+", "removed": "-", "changed": "M", "rewritten": "="}
    for change in result.files:
        counts = (change.added, change.removed, change.changed)
        out.line("%s %s%s%s" % (
            mark[change.status], change.path, "  (+%d -%d ~%d records)"
            % tuple(map(len, counts)) if any(counts) else "",
            "  fields: " + ", ".join(change.fields) if change.fields else ""))
        for sign, rids in (("+", change.added), ("-", change.removed)):
            for rid in rids:
                out.line("    %s %s" % (sign, rid))
        for record in change.changed:
            out.line("    ~ %s: %s" % (record.id, ", ".join(record.fields) or "layout only"))
    out.line("%s -> %s: %d files differ, %d unchanged; records +%d -%d ~%d" % (
        result.a, result.b, len(result.files), result.files_unchanged, result.records_added,
        result.records_removed, result.records_changed))
    return result


def cmd_backup_dump(args: argparse.Namespace) -> int:
    """backup dump: a file's bytes, or one record as stored, on stdout."""
    out = output_for(args)
    if args.file is None and args.record is None:
        raise UsageError("name a FILE or --record RID (see backup ls ID)")
    if args.record is None:
        found = [_in_repository(args, dump_file, args.backup_id, args.file)]
    else:
        found = _in_repository(args, dump_record, args.backup_id, args.record, args.file)
    if len(found) > 1:
        raise UsageError("record %s is in %d files (%s); name one: backup dump %s FILE "
                         "--record %s" % (args.record, len(found), ", ".join(
                             d.path for d in found), args.backup_id, args.record))
    dumped = found[0]
    if not dumped.exact:
        out.warn("%s: gzip file re-compressed by aml; its content is exact, its gzip bytes "
                 "may differ from the original" % dumped.path)
    if out.format == "json":
        doc = dataclasses.asdict(dumped)
        data = doc.pop("data")
        doc["size"], doc["sha256"] = len(data), sha256_hex(data)
        if args.record is not None:
            doc["record"] = _parse_record(data)
        else:
            doc["base64"] = base64.b64encode(data).decode("ascii")
        out.document(doc)
        return ExitCode.OK
    data = dumped.data + (b"\n" if args.record is not None else b"")
    stream = getattr(out.stdout, "buffer", None)
    if stream is None:   # a text-only stdout (tests): the bytes as text
        out.stdout.write(data.decode("utf-8", "replace"))
    else:
        out.stdout.flush()
        stream.write(data)
    (stream or out.stdout).flush()
    return ExitCode.OK


def cmd_backup_stats(args: argparse.Namespace) -> Outcome:
    """backup stats: repository size, deduplication, what each snapshot added."""
    out, result = output_for(args), _in_repository(args, repository_stats)
    out.report(result)
    out.line("%-26s %-24s %6s %8s %10s %8s %10s" % (
        "snapshot", "created", "files", "records", "restored", "new obj", "added"))
    for row in result.snapshots:
        out.line("%-26s %-24s %6d %8d %10s %8d %10s" % (
            row.backup_id, row.created, row.files, row.records,
            human_bytes(row.logical_bytes), row.new_objects,
            human_bytes(row.added_bytes + row.manifest_bytes)))

    def ratio(value: Optional[float]) -> str:
        return "-" if value is None else "%.2fx" % value

    out.line("repository %s: %d snapshots, %s on disk (%d packs %s, manifests %s)" % (
        args.repo or result.repository, len(result.snapshots),
        human_bytes(result.repository_bytes), result.packs, human_bytes(result.pack_bytes),
        human_bytes(result.manifest_bytes)))
    out.line("restored size %s; unique data %s in %d objects: deduplication %s, compression "
             "%s; unreferenced %d objects (%s, rotate frees them)" % (
                 human_bytes(result.logical_bytes), human_bytes(result.unique_bytes),
                 result.unique_objects, ratio(result.dedup_ratio),
                 ratio(result.compression_ratio), result.unreferenced_objects,
                 human_bytes(result.unreferenced_bytes)))
    return result


def _build_backup_inspection(sub: Any) -> None:
    p = subparser(sub, "copy", "copy snapshots into a second repository (a folder or "
                  "rclone:NAME:path), incrementally, then verify them there", func=cmd_backup_copy)
    _backup_options(p)
    p.add_argument("backup_ids", nargs="*", metavar="ID",
                   help="snapshots to copy (default: every snapshot of the store)")
    p.add_argument("--to", metavar="DEST", default=None,
                   help="the destination (default: [backup] copy_to of the config)")
    p.add_argument("--dry-run", action="store_true", help="say what would be copied")
    p = subparser(sub, "ls", "list a snapshot's files with records and sizes", func=cmd_backup_ls)
    p.add_argument("backup_id", metavar="ID")
    p = subparser(sub, "diff", "records added, removed and changed between two snapshots",
                  func=cmd_backup_diff)
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p = subparser(sub, "dump", "print a file of a snapshot (or one record) exactly as stored",
                  func=cmd_backup_dump)
    p.add_argument("backup_id", metavar="ID")
    p.add_argument("file", metavar="FILE", nargs="?", help="path in the snapshot (see ls)")
    p.add_argument("--record", metavar="RID", help="only the record with this id")
    subparser(sub, "stats", "repository size, deduplication, what each snapshot added",
              func=cmd_backup_stats)
    for name in ("list", "ls", "diff", "dump", "stats"):
        _backup_options(sub.choices[name])
        _repo_option(sub.choices[name])


def _build_restore(sub: Any) -> None:
    p = subparser(sub, "restore", "restore a snapshot exactly (verifies first)",
                  func=cmd_backup_restore)
    _backup_options(p)
    p.add_argument("backup_id", nargs="?", help="snapshot id")
    p.add_argument("--backup-id", dest="backup_id_flag", metavar="ID", help="snapshot id")
    p.add_argument("--at", metavar="TIMESTAMP", help="the newest snapshot not after this time")
    p.add_argument("--agents", nargs="+", metavar="A", help="only these agents")
    p.add_argument("--target", type=Path, metavar="DIR",
                   help="restore into DIR instead of the store (the store is left alone)")
    p.add_argument("--dry-run", action="store_true", help="list what would change")
    p.add_argument("--force", action="store_true", help="allow a non-empty --target")
    _repo_option(p)


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
    actions = _subcommands(parser, "migrate_action")
    detect = subparser(actions, "detect", "versions per file and agent, unplaceable records, "
                       "migration history (read-only)", func=cmd_migrate_detect)
    detect.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents")
    to_version = subparser(actions, "migrate", "migrate every record to VERSION (up, or down "
                           "where lossless)", func=cmd_migrate)
    to_version.add_argument("version", nargs="?", metavar="VERSION",
                            help="target version (original spelling: migrate migrate 1.2.0)")
    to_version.add_argument("--version", dest="version_option", metavar="VERSION",
                            help="target version: 1.0.0, 1.1.0, 1.2.0 or 2.0.0")
    _migrate_write_options(to_version)
    latest = subparser(actions, "migrate-latest", "migrate every record to %s"
                       % SchemaVersion.latest().value, func=cmd_migrate,
                       version=SchemaVersion.latest().value, version_option=None)
    _migrate_write_options(latest)


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
    for items, shown, head in (
            (report.unplaced, 20, "Cannot place %d record(s):"),
            (report.runtime_invalid, 5, "%d record(s) the runtime would reject (migrate-latest "
             "repairs those whose information exists), e.g.:")):
        if items:
            out.line(head % len(items))
        for item in items[:shown]:
            out.line("  " + _item_text(item))


def _item_text(item: Dict[str, Any]) -> str:
    return "%s[%d] id=%s: %s" % (item["file"], item["index"], item["id"], item["problem"])


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
    out.report(report, unreadable="skipped unreadable file %s")
    out.document(dict(to_jsonable(report), mixed=report.mixed, mixed_agents=report.mixed_agents))
    _print_detection(out, report, store.root)
    return int(report.exit_code)


def _target_version(args: argparse.Namespace) -> SchemaVersion:
    given = [v for v in (args.version, args.version_option) if v]
    if not given:
        raise UsageError("migrate: name the target version (migrate --version 1.2.0, "
                         "or migrate-latest)")
    versions = {SchemaVersion.parse(v) for v in given}
    if len(versions) > 1:
        raise UsageError("migrate: two different target versions given: %s" % " and ".join(given))
    return versions.pop()


def cmd_migrate(args: argparse.Namespace) -> Outcome:
    """``migrate migrate VERSION`` / ``migrate-latest``: migrate, report, return the exit code."""
    target = _target_version(args)
    store, out = open_store(args), output_for(args)
    manager = MigrationManager(store, args.agents, progress=out.progress)
    manager.program = program_invocation()
    try:
        result = manager.migrate(target, dry_run=args.dry_run, backup=not args.no_backup)
    finally:
        out.progress_done()
    out.report(result, unreadable="skipped unreadable file %s",
               busy="skipped, left as it was: %s")
    for item in result.reported[:20]:
        out.warn("left unchanged " + _item_text(item))
    if len(result.reported) > 20:
        out.warn("... and %d more record(s) left unchanged" % (len(result.reported) - 20))
    if result.refused:
        out.warn(manager.refusal_message(result))
    _print_migration(out, result)
    return result


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
                    default: str, func: Callable[[argparse.Namespace], Outcome]
                    ) -> argparse.ArgumentParser:
    return subparser(sub, name, help_text, common=_monitor_common(formats, default), func=func,
                     default_format=default)


def _threshold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                        help="override a threshold (repeatable), e.g. agent_memory_warning_mb=50;"
                        " keys: " + ", ".join(sorted(DEFAULT_THRESHOLDS)))


@command_builder
def _build_monitor(subparsers: Any) -> None:
    parser = subparser(subparsers, "monitor", "metrics, health checks, alerts and reports")
    sub = _subcommands(parser, "monitor_command")
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
    health.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="answer UNKNOWN (exit 3) when the checks take longer "
                        "(default: no limit; Nagios kills a plugin after 10 s)")
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
    serve = _monitor_action(sub, "serve", "serve a live dashboard, /metrics and /api/health,"
                            " /api/metrics, /api/alerts over HTTP; read-only",
                            ("text",), "text", cmd_monitor_serve)
    _threshold_option(serve)
    serve.add_argument("--bind", metavar="ADDRESS", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", metavar="N", type=int, default=DEFAULT_SERVE_PORT,
                       help="TCP port (default: %d; 0 picks a free one)" % DEFAULT_SERVE_PORT)
    serve.add_argument("--interval", metavar="SECONDS", type=float,
                       help="measure at most this often (default: the config's monitor "
                       "serve_interval, else %g)" % DEFAULT_SERVE_INTERVAL)


def _open_monitor(args: argparse.Namespace, cls: Callable[..., MemoryMonitor] = MemoryMonitor
                  ) -> MemoryMonitor:
    """Store, thresholds and webhook from defaults, config files and flags."""
    store = open_store(args)
    section = load_aml_config(store, args.config).get("monitor", {})
    thresholds = resolve_thresholds(store, section, parse_threshold_flags(
        getattr(args, "threshold", None)))
    webhook = getattr(args, "webhook", None) or None
    settings = monitor_settings_for(store, section, webhook_url=webhook)
    return cls(store, thresholds, settings.webhook_url, settings.webhook_timeout)


def _monitor_output(args: argparse.Namespace) -> Output:
    """Output for text/json; other formats are written by the handler itself."""
    if args.format == "text" and args.default_format != "text":
        args.format = args.default_format
    return Output(args.format if args.format in ("text", "json") else "text", args.quiet,
                  reporter=args.reporter)


def cmd_monitor_metrics(args: argparse.Namespace) -> Outcome:
    """``monitor metrics``: exit 3 when a record file could not be read."""
    out, report = _monitor_output(args), _open_monitor(args).metrics(save=not args.no_save)
    out.report(report, unreadable="unreadable, not counted: %s")
    if args.format == "prometheus":
        out.stdout.write(prometheus_text(report))
    else:
        for line in _metrics_lines(report):
            out.line(line)
    return report


def cmd_monitor_health(args: argparse.Namespace) -> Outcome:
    """``monitor health``: exit code 0/1/2/3 by the plugin convention, whatever the format."""
    out = _monitor_output(args)
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    try:
        with _deadline(args.timeout):
            report = _open_monitor(args).health()
    except (AmlError, OSError, _HealthTimeout) as exc:  # health could not run: UNKNOWN
        out.verbatim("AML UNKNOWN - %s: %s" % (args.memory_path, str(exc).replace("|", "/")))
        raise HealthUnknownError(str(exc)) from None
    out.report(report)
    if args.format == "nagios":
        out.verbatim(nagios_line(report))
    elif out.quiet:
        if report.status is not HealthStatus.HEALTHY:
            out.always(health_summary(report))  # cron mails one clear line
    else:
        for line in _health_lines(report):
            out.line(line)
    return report


class _HealthTimeout(BaseException):
    """Raised by the --timeout alarm; a BaseException so no check's error handling (which
    turns an AmlError into an UNKNOWN check and goes on) swallows it."""


@contextlib.contextmanager
def _deadline(seconds: Optional[float]) -> Iterator[None]:
    """Raise _HealthTimeout in the main thread after ``seconds`` (SIGALRM); the
    exception unwinds every ``with``, so locks are released. No limit when None."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise _HealthTimeout("health checks did not finish within --timeout %g s" % seconds)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cmd_monitor_alerts(args: argparse.Namespace) -> int:
    """``monitor alerts``: list (read-only) or ``--resolve`` one alert by hand."""
    out, monitor = _monitor_output(args), _open_monitor(args)
    if args.resolve:
        changes = monitor.resolve_alert(args.resolve)
        out.report(changes)
        out.line("%s resolved." % args.resolve if changes.resolved
                 else "%s was already resolved." % args.resolve)
        return changes
    alerts = monitor.alerts(include_resolved=args.all)
    for line in _alert_lines(alerts, args.all):
        out.line(line)
    out.document({"alerts": alerts})
    return int(ExitCode.OK)


def cmd_monitor_report(args: argparse.Namespace) -> int:
    """``monitor report``: JSON, Prometheus text or HTML, to stdout or atomically to a file."""
    _monitor_output(args)
    monitor = _open_monitor(args)
    report = monitor.report()
    out = Output("text", args.quiet)
    out.report(report, unreadable="unreadable, not counted: %s")
    if args.format == "html":
        history = _history_for_display(monitor.store, report.warnings)
        text = html_report(report, monitor.thresholds, history,
                           backup_summary(monitor.store, args.config))
    elif args.format == "prometheus":
        text = prometheus_text(report.metrics, report.health, report.alerts)
    else:
        text = json.dumps(to_jsonable(report), indent=2, sort_keys=True) + "\n"
    if args.output is None:
        out.stdout.write(text)
    else:
        write_report_file(args.output, text)
    return int(report.exit_code)


def _serve_interval(args: argparse.Namespace, store: Store) -> float:
    """--interval, else the config's monitor serve_interval, else the default; UsageError."""
    section = load_aml_config(store, args.config).get("monitor", {})
    return monitor_settings_for(store, section, serve_interval=args.interval).serve_interval


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def cmd_monitor_serve(args: argparse.Namespace) -> int:
    """``monitor serve``: HTTP until SIGINT or SIGTERM, then exit 0; never writes the store."""
    out = _monitor_output(args)
    if not 0 <= args.port <= 65535:
        raise UsageError("--port %d: expected 0 to 65535" % args.port)
    monitor = _open_monitor(args, _ReadOnlyMonitor)   # bad thresholds or config fail now
    interval = _serve_interval(args, monitor.store)
    refresh = max(5, int(math.ceil(interval)))
    cache = DashboardCache(lambda: dashboard_views(_open_monitor(args, _ReadOnlyMonitor),
                                                   args.config, refresh), interval)
    server = dashboard_server(cache, args.bind, args.port)
    if not _is_loopback(args.bind):
        out.warn("listening on %s: anyone who can reach this port can read the store's "
                 "health and metrics" % args.bind)
    host, port = server.server_address[:2]
    out.line("aml: serving %s on http://%s:%d/ (measured at most every %g s)"
               % (monitor.store.root, "[%s]" % host if ":" in host else host, port, interval))
    out.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, _Terminated):
        pass   # a requested stop, not a failure: systemd and the shell see exit 0
    finally:
        server.server_close()
    return int(ExitCode.OK)


def write_report_file(path: Path, text: str) -> None:
    """Write a report atomically; raises AmlError naming the output folder when it is
    missing or not writable (not aml's temp file inside it)."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise AmlError("output folder %s does not exist (create it, writable by this user)"
                       % folder)
    if not os.access(str(folder), os.W_OK | os.X_OK):
        raise AmlError("output folder %s is not writable by this user" % folder)
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except PermissionError:
        raise AmlError("output folder %s is not writable by this user" % folder) from None


def _job_of(args: Optional[argparse.Namespace]) -> Optional[str]:
    """The scheduled job (JOB_OPERATIONS) a command line runs, or None (previews, reads)."""
    if args is None or getattr(args, "dry_run", False):
        return None
    command = getattr(args, "command", None)
    if command == "prune" and not (args.undo or args.list_runs):
        return "prune"
    if command == "backup" and args.backup_command in ("create", "full", "incremental",
                                                       "auto"):
        return "backup"
    if command == "optimize" and args.action in ("index", "build-index"):
        return "index"
    if command == "optimize" and args.action in ("all", "gc", "compress"):
        return "optimize"
    return None


def _record_job(args: Optional[argparse.Namespace], code: int,
                error: Optional[Any] = None) -> int:
    """Record a failed scheduled job (exit code not 0) for monitoring; returns ``code``."""
    job = _job_of(args)
    if job is None or code in (ExitCode.OK, ExitCode.USAGE) or args is None:
        return code  # a usage error may name a folder that is not a store: write nothing
    reason = str(error) if error is not None else "exit %d (see the job's output)" % code
    command = " ".join(w for w in (args.command, getattr(args, "backup_command", None),
                                   getattr(args, "action", None)) if w)
    # A store aml cannot write (the very error being reported, often) keeps the failure
    # unrecorded: the job's own error line, already printed, is what cron mails.
    with contextlib.suppress(AmlError, OSError):
        Store(args.memory_path, now=args.now).record_job_failure(job, command, reason, code)
    return code


def _use_scratch_state(args: argparse.Namespace, store: Store) -> None:
    """``.aml/`` (mode 0700) of another user: work from the files alone, as on a store aml
    never touched, with a private scratch folder for this run's state (removed at exit)."""
    args.scratch = Path(tempfile.mkdtemp(prefix="aml-readonly-"))
    args.hidden_state = store.state_dir
    store.state_dir = args.scratch


def _remove_scratch(args: Optional[argparse.Namespace]) -> None:
    scratch = getattr(args, "scratch", None)
    if scratch is not None:
        shutil.rmtree(str(scratch))


def _reads_only(args: argparse.Namespace) -> bool:
    """True for commands that only read the store: their state writes (caches, history,
    alerts) are optional, so a user with read permission only can run them."""
    command, dry = args.command, getattr(args, "dry_run", False)
    if command in ("get", "search") or (command in ("prune", "optimize", "migrate") and dry):
        return not getattr(args, "undo", None)
    if command == "migrate":
        return args.migrate_action == "detect"
    if command == "backup":
        return args.backup_command in ("list", "verify") or (
            args.backup_command == "restore" and dry)
    if command == "monitor":
        return not getattr(args, "resolve", None)
    return False


def _note_unsaved(args: Optional[argparse.Namespace]) -> None:
    store, hidden = getattr(args, "store", None), getattr(args, "hidden_state", None)
    if store is None or args.quiet or not (store.unsaved or hidden):
        return
    parts = ["%s is not readable by this user: its index, caches, history and config.json "
             "were not used, and nothing was saved in it" % hidden] if hidden else []
    if store.unsaved:
        parts.append("not saved: " + ", ".join(store.unsaved))
    _clear_progress(args)
    print("aml: note: read-only access to %s: %s" % (store.root, "; ".join(parts)),
          file=sys.stderr)


def _clear_progress(args: Optional[argparse.Namespace]) -> None:
    if args is not None:
        args.reporter.clear()


def _is_health_command(argv: Sequence[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return any(a == "monitor" and b == "health" for a, b in zip(words, words[1:]))


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so every ``finally`` (lock release) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _exit_code(args: argparse.Namespace, outcome: Outcome) -> int:
    """A handler returns an exit code, or the result it reported, which is then the run's
    JSON document (with --format json) and gives the exit code."""
    if not isinstance(outcome, int):
        output_for(args).document(outcome)
        outcome = outcome.exit_code
    return int(outcome)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = _finish_args(build_parser().parse_args(argv))
        code = _record_job(args, _exit_code(args, args.func(args)))
        _note_unsaved(args)
        return code
    except AmlError as exc:
        _clear_progress(args)
        print("aml: error: %s" % exc, file=sys.stderr)
        if isinstance(exc, UsageError) and _is_health_command(argv):
            # The plugin convention: a usage error is UNKNOWN (3), never CRITICAL (2).
            print("AML UNKNOWN - %s" % str(exc).replace("|", "/"))
            return int(ExitCode.PARTIAL)
        return _record_job(args, int(exc.exit_code), exc)
    except (KeyboardInterrupt, _Terminated):
        _clear_progress(args)
        print("aml: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)
    except OSError as exc:
        # Permission denied, disk full, ...: one clear line, not a traceback (cron mails it).
        where = exc.filename if exc.filename is not None else ""
        message = "%s%s" % (exc.strerror or exc, ": %s" % where if where else "")
        _clear_progress(args)
        print("aml: error: %s" % message, file=sys.stderr)
        return _record_job(args, int(ExitCode.FAILURE), message)
    finally:
        _clear_progress(args)
        _remove_scratch(args)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
