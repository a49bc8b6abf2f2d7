"""Values checked or converted at the call, against the store's column types (schema/tables.py).

A value the logging API accepts must be storable as it is, later, by any process: a run's finish(), an
ingest, another run's recovery. So every value is turned here into the plain Python value its column
stores (int in range for BIGINT/INTEGER, float for DOUBLE, valid UTF-8 str for VARCHAR, JSON text for
JSON), or refused at once with TypeError (wrong kind) / ValueError (right kind, unstorable value).

Conversions: bool and NumPy scalars to their number; zero-dim arrays and zero-dim torch tensors (one
element, on the CPU; a device tensor is refused in the logging calls, where converting it would wait for
the device at every call) to their item; a float with an integral value to an int column; an int to a
DOUBLE as float(v), exactly what DuckDB would store. Nothing else.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from decimal import Decimal
from numbers import Integral, Real

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from schema.tables import evals, runs, scalars, steps

INT_RANGES = {"BIGINT": (-(2**63), 2**63 - 1), "INTEGER": (-(2**31), 2**31 - 1)}
ARROW_TYPES = {"BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(), "VARCHAR": pa.string()}


def kind_of(column: sa.Column) -> str:
    """The storage kind of a declared column: BIGINT, INTEGER, DOUBLE, VARCHAR, JSON or TIMESTAMP."""
    t = column.type
    if isinstance(t, sa.BigInteger):
        return "BIGINT"
    if isinstance(t, sa.Integer):
        return "INTEGER"
    if isinstance(t, sa.Float):  # sa.Double is a Float
        return "DOUBLE"
    if isinstance(t, sa.JSON):
        return "JSON"
    if isinstance(t, sa.DateTime):
        return "TIMESTAMP"
    if isinstance(t, sa.String):
        return "VARCHAR"
    raise TypeError(f"no value rule for column {column} of type {t}")


def kinds(table: sa.Table, skip: tuple[str, ...] = ("run_id",)) -> dict[str, str]:
    return {c.name: kind_of(c) for c in table.columns if c.name not in skip}


STEP_KINDS = kinds(steps)
EVAL_KINDS = kinds(evals)
SCALAR_KINDS = kinds(scalars)
RUN_KINDS = kinds(runs, skip=("run_id", "heartbeat_at", "started_at", "ended_at", "status", "host"))


def _tensor_item(v, what: str, device_ok: bool):
    if v.ndim != 0:
        raise TypeError(f"{what} must be a single number, got a tensor of shape {tuple(v.shape)}"
                        " (use log_steps for blocks of steps)")
    if v.device.type != "cpu" and not device_ok:
        raise TypeError(f"{what} is a tensor on {v.device}: converting it here would wait for the device at every "
                        "call; pass float(t) once it is on the host, or hand blocks of steps to log_steps")
    if v.dtype.is_complex:
        raise TypeError(f"{what} must be a real number, got a complex tensor")
    return v.item()


def _unwrap(v, what: str, device_ok: bool):
    """Zero-dim arrays, tensors and NumPy scalars as plain Python values; anything else unchanged."""
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise TypeError(f"{what} must be a single number, got an array of shape {v.shape}"
                            " (use log_steps for blocks of steps)")
        v = v[()]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):
        return _tensor_item(v, what, device_ok)
    if isinstance(v, np.generic):
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, np.integer) and not isinstance(v, np.timedelta64):
            return int(v)
        if isinstance(v, np.floating):
            f = float(v)
            if math.isinf(f) and not np.isinf(v):
                raise ValueError(f"{what}={v!r} is outside the DOUBLE range")
            return f
        if isinstance(v, np.str_):
            return str(v)
        raise TypeError(f"{what} must be a real number, got numpy {type(v).__name__}: {v!r:.60}")
    return v


def _bad_type(what: str, v, expected: str) -> TypeError:
    return TypeError(f"{what} must be {expected}, got {type(v).__name__}: {v!r:.60}")


def to_int(v, what: str, kind: str = "BIGINT", device_ok: bool = False) -> int:
    v = _unwrap(v, what, device_ok)
    if isinstance(v, Integral):  # bool, int, IntEnum, ...
        v = int(v)
    elif isinstance(v, (float, Real, Decimal)) and not isinstance(v, complex):
        try:
            integral = math.isfinite(v) and v == int(v)
        except (OverflowError, ValueError, TypeError):
            integral = False
        if not integral:
            raise ValueError(f"{what} must be an integer ({kind}), got {v!r:.60}")
        v = int(v)
    else:
        raise _bad_type(what, v, f"an integer ({kind})")
    lo, hi = INT_RANGES[kind]
    if not lo <= v <= hi:
        raise ValueError(f"{what}={v} is outside the {kind} range [{lo}, {hi}]")
    return v


def to_float(v, what: str, device_ok: bool = False) -> float:
    v = _unwrap(v, what, device_ok)
    if v.__class__ is float:
        return v
    if isinstance(v, complex) or not isinstance(v, (Real, Decimal)):
        raise _bad_type(what, v, "a real number")
    try:
        f = float(v)
    except (OverflowError, ValueError) as exc:
        raise ValueError(f"{what}={v!r:.60} is outside the DOUBLE range") from exc
    if math.isinf(f) and not (v == f):  # e.g. Decimal('1e400') becomes inf without an error
        raise ValueError(f"{what}={v!r:.60} is outside the DOUBLE range")
    return f


def to_text(v, what: str) -> str:
    if not isinstance(v, str):
        raise _bad_type(what, v, "a string")
    v = str(v)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid text ({exc.reason} at position {exc.start})") from None
    return v


def to_json(v, what: str = "config") -> str:
    """JSON text of a config mapping. Objects JSON has no form for are stored as str(obj)."""
    if not isinstance(v, Mapping):
        raise _bad_type(what, v, "a mapping (dict)")
    try:
        text = json.dumps(dict(v), default=str, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None
    return to_text(text, what)


def converter(kind: str, what: str, device_ok: bool = False) -> Callable:
    """A function value -> stored value (None stays NULL) for one column."""
    if kind in INT_RANGES:
        return lambda v: None if v is None else to_int(v, what, kind, device_ok)
    if kind == "DOUBLE":
        return lambda v: None if v is None else to_float(v, what, device_ok)
    if kind == "VARCHAR":
        return lambda v: None if v is None else to_text(v, what)
    if kind == "JSON":
        return lambda v: None if v is None else to_json(v, what)
    raise TypeError(f"no converter for {kind}")


def run_fields(fields: Mapping, device_ok: bool = True) -> dict:
    """Run fields (start_run keywords) as stored values; raises on the first bad one."""
    return {k: converter(RUN_KINDS[k], k, device_ok)(v) for k, v in fields.items()}


def clean_run_row(row: Mapping) -> tuple[dict, list[str]]:
    """A run row read back from a spool (perhaps written by an older release), with every field the
    store could not take set to NULL; and one note per field dropped."""
    out, notes = dict(row), []
    for k, kind in RUN_KINDS.items():
        if out.get(k) is None:
            continue
        try:
            out[k] = converter(kind, k)(json.loads(out[k]) if kind == "JSON" and isinstance(out[k], str) else out[k])
        except (TypeError, ValueError) as exc:
            notes.append(str(exc))
            out[k] = None
    for k in ("name", "status"):
        if not isinstance(out.get(k), str) or not out[k]:
            notes.append(f"{k}={out.get(k)!r:.60} is not a non-empty string")
            out[k] = {"name": "(unnamed)", "status": "stale"}[k]
    return out, notes


# --- columns (log_steps) ---------------------------------------------------------------------------

def _as_array(v, what: str):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(v, torch.Tensor):  # a block: one device transfer is the point
        v = v.detach().cpu()
        if v.dtype in (torch.bfloat16,):
            v = v.float()
        v = v.numpy()
    try:
        return np.asarray(v)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"log_steps column {what!r} is not an array of numbers: {exc}") from None


def column(v, what: str, kind: str, n: int | None) -> pa.Array:
    """One log_steps column as an Arrow array of its column's type, or TypeError/ValueError."""
    a = _as_array(v, what)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"log_steps column {what!r} has shape {a.shape}, expected ({n if n is not None else 'n'},)")
    if a.dtype.kind == "O":  # Python objects (e.g. None for NULL): each one through the scalar rule
        conv = converter(kind, f"log_steps column {what!r}")
        return pa.array([conv(x) for x in a.tolist()], type=ARROW_TYPES[kind])
    if a.dtype.kind not in "biuf":
        raise TypeError(f"log_steps column {what!r} must be numeric, got dtype {a.dtype}")
    if kind == "DOUBLE":
        out = a.astype(np.float64)
        if a.dtype.kind == "f" and a.dtype.itemsize > 8 and (np.isinf(out) & ~np.isinf(a)).any():
            raise ValueError(f"log_steps column {what!r} has values outside the DOUBLE range")
        return pa.array(out, type=pa.float64())
    lo, hi = INT_RANGES[kind]
    if a.dtype.kind == "f":
        if not (np.isfinite(a).all() and (a == np.floor(a)).all()):
            raise ValueError(f"log_steps column {what!r} must hold integers ({kind})")
        if len(a) and not (lo <= a.min() and a.max() <= hi):  # compared as floats: exact at these bounds
            raise ValueError(f"log_steps column {what!r} has values outside the {kind} range [{lo}, {hi}]")
        return pa.array(a.astype(np.int64), type=ARROW_TYPES[kind])
    if len(a) and a.dtype.kind != "b" and (int(a.min()) < lo or int(a.max()) > hi):
        raise ValueError(f"log_steps column {what!r} has values outside the {kind} range [{lo}, {hi}]")
    return pa.array(a.astype(np.int64), type=ARROW_TYPES[kind])
