"""Shift the calendar of every Python process that starts with this folder on PYTHONPATH.

CI runs the suite with AML_CLOCK_SHIFT_DAYS set (365, then -182) to prove that no test reads the
real date. datetime's now/utcnow/today move; time.time() and file mtimes stay real, so lock ages
measured against mtimes stay consistent (faketime would move one and not the other).
"""
import datetime as _dt
import os

_days = float(os.environ.get("AML_CLOCK_SHIFT_DAYS", "0") or 0)

if _days:
    _shift = _dt.timedelta(days=_days)
    _real_datetime, _real_date = _dt.datetime, _dt.date

    class _Real(type):
        # isinstance(x, datetime.datetime) stays true for values made before the swap or by C code.
        def __instancecheck__(cls, obj):
            return isinstance(obj, cls.__mro__[1])

        def __subclasscheck__(cls, sub):
            return issubclass(sub, cls.__mro__[1])

    def _as(cls, value):
        if isinstance(value, _real_datetime):
            return cls.combine(value.date(), value.timetz())
        return cls.fromordinal(value.toordinal())

    class _ShiftedDatetime(_real_datetime, metaclass=_Real):
        @classmethod
        def now(cls, tz=None):
            return _as(cls, _real_datetime.now(tz) + _shift)

        @classmethod
        def utcnow(cls):
            return _as(cls, _real_datetime.utcnow() + _shift)

        @classmethod
        def today(cls):
            return _as(cls, _real_datetime.today() + _shift)

    class _ShiftedDate(_real_date, metaclass=_Real):
        @classmethod
        def today(cls):
            return _as(cls, _real_date.today() + _shift)

    _dt.datetime = _ShiftedDatetime
    _dt.date = _ShiftedDate
