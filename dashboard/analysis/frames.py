"""Input handling shared by the analysis functions: accept frames, check columns, attach run metadata.

No SQL and no store access here: the analysis library is frames in, results out. Frames can come from
dashboard/queries.py, from DuckDB directly (``con.sql(...).pl()``), from the SQL macros in
schema/sql/20_analysis.sql, or be built by hand in a notebook.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import polars as pl

# Columns of `runs` that the fits use, with the dtype they are coerced to.
RUN_COLUMNS: dict[str, pl.DataType] = {
    "run_id": pl.String,
    "sweep": pl.String,
    "status": pl.String,
    "optimizer": pl.String,
    "lr": pl.Float64,
    "momentum": pl.Float64,
    "batch_size": pl.Float64,
    "train_size": pl.Float64,
}


def as_frame(data: Any, what: str) -> pl.DataFrame:
    """A polars DataFrame from polars, pandas, pyarrow or a dict of columns."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if data is None:
        raise TypeError(f"{what}: expected a frame, got None")
    try:
        out = pl.from_pandas(data) if type(data).__module__.startswith("pandas") else pl.DataFrame(data)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TypeError(f"{what}: cannot make a polars DataFrame from {type(data).__name__}: {exc}") from exc
    return out


def require(frame: pl.DataFrame, columns: Iterable[str], what: str) -> None:
    """Raise a ValueError naming the missing columns (a wrong frame is a caller bug, not a fit failure)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has {frame.columns}")


def floats(frame: pl.DataFrame, columns: Iterable[str]) -> pl.DataFrame:
    """Cast the given columns (where present) to Float64, so NULL/NaN/int inputs all behave the same."""
    return frame.with_columns([pl.col(c).cast(pl.Float64, strict=False) for c in columns if c in frame.columns])


def run_meta(runs: Any | None) -> pl.DataFrame | None:
    """The subset of `runs` columns the fits use, typed; missing optional columns are filled with NULL."""
    if runs is None:
        return None
    runs = as_frame(runs, "runs")
    require(runs, ["run_id"], "runs")
    cols = []
    for name, dtype in RUN_COLUMNS.items():
        if name in runs.columns:
            cols.append(pl.col(name).cast(dtype, strict=False))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    return runs.select(cols).unique("run_id", keep="first", maintain_order=True)


def attach_runs(frame: pl.DataFrame, runs: Any | None, needed: Sequence[str] = ()) -> pl.DataFrame:
    """Left-join run metadata onto a per-run frame, without overwriting columns the frame already has."""
    meta = run_meta(runs)
    if meta is not None:
        extra = [c for c in meta.columns if c != "run_id" and c not in frame.columns]
        if extra:
            frame = frame.join(meta.select(["run_id", *extra]), on="run_id", how="left")
    require(frame, needed, "frame (pass runs= to attach run metadata)")
    return frame


def column(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A column as a float numpy array, NULL -> NaN (all NaN when the column is absent)."""
    if name not in frame.columns:
        return np.full(frame.height, np.nan)
    return frame[name].cast(pl.Float64, strict=False).fill_null(np.nan).to_numpy().astype(float)


def flag(frame: pl.DataFrame, name: str, default: bool = False) -> np.ndarray:
    """A boolean column as a numpy array, NULL -> False (`default` everywhere when absent)."""
    if name not in frame.columns:
        return np.full(frame.height, default)
    return frame[name].cast(pl.Boolean, strict=False).fill_null(False).to_numpy().astype(bool)


def by_batch(b: np.ndarray, y: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """One value per distinct batch size (sorted): the minimum, or the geometric mean, of y.

    Plain numpy on purpose: the fits see a handful of rows, where a dataframe's per-call overhead
    would dominate (tens of fits per page view, bootstrap included).
    """
    keys, inv = np.unique(b, return_inverse=True)
    if how == "min":
        out = np.full(len(keys), np.inf)
        np.minimum.at(out, inv, y)
    elif how == "geomean":
        out = np.zeros(len(keys))
        np.add.at(out, inv, np.log(y))
        out = np.exp(out / np.bincount(inv, minlength=len(keys)))
    else:
        raise ValueError(how)
    return keys, out
