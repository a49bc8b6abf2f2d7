"""Grouping runs and their aggregate curves with bands (as Aim's and W&B's run grouping): pure functions,
no I/O, shared by the Curves and Noise scale pages.

Runs are grouped by the values of chosen configuration keys; REPLICAS groups by every hyperparameter but
the seed (seed replicas). A group's curve is the mean or median of its members' curves, with a min-max,
95 % confidence or ±1 standard deviation band. Runs log at different x values (batch sizes differ in
examples per step; evaluations fall on different steps), so members are interpolated linearly onto one
grid first: the x values of the members that lie in the range ALL members cover (their overlap). Outside
it some member has no data, and a mean of fewer runs would jump, so nothing is drawn there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REPLICAS = "__replicas__"
# configuration keys that are not hyperparameters: where, how and under which name a run was started
NOT_HYPERPARAMETERS = frozenset({
    "seed", "name", "db", "sweep", "device", "threads", "data_dir", "torch", "task_info", "plan", "run_id",
    "status", "started_at", "ended_at", "heartbeat_at", "host", "cell_id", "attempt", "launcher", "job_id",
    "array_job_id", "array_task_id", "rank", "git_commit", "status_reason",
})
# run columns used when a run has no config JSON (runs logged through the collector API)
RUN_KEYS = ("task", "model", "optimizer", "lr", "momentum", "weight_decay", "batch_size", "accum_steps",
            "train_size", "seed", "sweep")
STATS = ("mean", "median")
BANDS = ("minmax", "ci95", "std", "none")


def run_config(run: dict) -> dict:
    """One run's flat configuration: its config JSON's top-level keys (nested values as JSON text) over
    the run columns in RUN_KEYS."""
    cfg = run.get("config")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = None
    flat = {k: run.get(k) for k in RUN_KEYS if k in run}
    for k, v in (cfg if isinstance(cfg, dict) else {}).items():
        flat[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
    return flat


def group_keys(configs: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """The keys a grouping means: REPLICAS -> every hyperparameter but the seed; others as given."""
    if REPLICAS in keys:
        every = sorted({k for c in configs for k in c})
        return [k for k in every if k not in NOT_HYPERPARAMETERS]
    return [k for k in keys if k]


def varying_keys(configs: Sequence[dict]) -> list[str]:
    """Keys whose values differ between the runs (the ones worth grouping by), sorted."""
    every = sorted({k for c in configs for k in c})
    return [k for k in every if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def group_runs(configs: dict[str, dict], keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(label, run ids)] grouping runs by the values of `keys` (group_keys); the label names only the
    keys whose values differ between groups ("all runs" when none do). Groups in order of first run."""
    use = group_keys(list(configs.values()), keys)
    groups: dict[str, list[str]] = {}
    values: dict[str, dict] = {}
    for rid, cfg in configs.items():
        key = json.dumps([cfg.get(k) for k in use], default=str)
        groups.setdefault(key, []).append(rid)
        values.setdefault(key, {k: cfg.get(k) for k in use})
    shown = _label_keys(list(values.values())) if len(values) > 1 else []
    out = []
    for key, ids in groups.items():
        label = " ".join(f"{k}={_short(values[key][k])}" for k in shown) or "all runs"
        out.append((label, ids))
    return out


LABEL_FIRST = ("batch_size", "batch", "lr", "optimizer", "task")


def _label_keys(values: list[dict]) -> list[str]:
    """Keys that tell the groups apart, the familiar ones first; a key that splits the groups exactly as an
    earlier one does (config 'batch' and column 'batch_size', eval_every set per batch size) is left out."""
    keys = varying_keys(values)
    keys.sort(key=lambda k: (LABEL_FIRST.index(k) if k in LABEL_FIRST else len(LABEL_FIRST), k))
    shown, partitions = [], set()
    for k in keys:
        codes: dict[str, int] = {}
        part = tuple(codes.setdefault(json.dumps(v.get(k), default=str), len(codes)) for v in values)
        if part not in partitions:
            partitions.add(part)
            shown.append(k)
    return shown


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class Band:
    """A group's aggregate curve on its common grid: x, center (mean or median), lower/upper (the band;
    None without one), n members, the overlap [lo, hi], and why there is no band when there is none."""

    x: np.ndarray
    center: np.ndarray
    lower: np.ndarray | None
    upper: np.ndarray | None
    n: int
    lo: float
    hi: float
    note: str = ""


def common_grid(xs: Sequence[np.ndarray], max_points: int = 600) -> np.ndarray:
    """The members' own x values inside the range every member covers (at most max_points of them,
    evenly thinned, the ends kept); empty when the members do not overlap."""
    lo = max(float(np.min(x)) for x in xs)
    hi = min(float(np.max(x)) for x in xs)
    if not lo <= hi:
        return np.array([])
    union = np.unique(np.concatenate([x[(x >= lo) & (x <= hi)] for x in xs]))
    if len(union) > max_points:
        union = union[np.unique(np.linspace(0, len(union) - 1, max_points).round().astype(int))]
    return union


def aggregate(members: Sequence[tuple[Sequence[float], Sequence[float]]], stat: str = "mean",
              band: str = "minmax", max_points: int = 600) -> Band | None:
    """The group curve of `members` ([(x, y)] per run); None when no member has data or they do not overlap."""
    if stat not in STATS or band not in BANDS:
        raise ValueError(f"unknown stat/band {stat!r}/{band!r}")
    clean = []
    for x, y in members:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            order = np.argsort(x[ok], kind="stable")
            clean.append((x[ok][order], y[ok][order]))
    if not clean:
        return None
    grid = common_grid([c[0] for c in clean], max_points)
    if grid.size == 0:
        return None
    ys = np.vstack([np.interp(grid, x, y) for x, y in clean])
    n = ys.shape[0]
    center = ys.mean(axis=0) if stat == "mean" else np.median(ys, axis=0)
    lower, upper, note = _band(ys, center, stat, band)
    return Band(grid, center, lower, upper, n, float(grid[0]), float(grid[-1]), note)


def _band(ys: np.ndarray, center: np.ndarray, stat: str, band: str):
    n = ys.shape[0]
    if band == "none":
        return None, None, ""
    if n < 2:
        return None, None, "one run: no band"
    if band == "minmax":
        return ys.min(axis=0), ys.max(axis=0), ""
    if band == "std":
        sd = ys.std(axis=0, ddof=1)
        return center - sd, center + sd, ""
    if stat == "mean":  # Student-t interval of the mean
        from scipy.stats import t

        half = t.ppf(0.975, n - 1) * ys.std(axis=0, ddof=1) / math.sqrt(n)
        return center - half, center + half, ""
    k = median_ci_rank(n)
    if k is None:
        return None, None, f"{n} runs: too few for a 95 % interval of the median (needs 6)"
    s = np.sort(ys, axis=0)
    return s[k - 1], s[n - k], ""


def median_ci_rank(n: int, level: float = 0.95) -> int | None:
    """The largest k with P(Binomial(n, 1/2) < k) <= (1 - level)/2: [x_(k), x_(n+1-k)] (order statistics)
    covers the median with probability >= level, whatever the distribution. None when n is too small."""
    from scipy.stats import binom

    best = None
    for k in range(1, n // 2 + 1):
        if binom.cdf(k - 1, n, 0.5) <= (1 - level) / 2:
            best = k
    return best


# ---------------------------------------------------------------------------------------------------
# traces (plain plotly dicts): a group's band and centre line


def band_traces(band: Band, name: str, color: str, members: Sequence[str], stat: str, band_kind: str,
                x_label: str, y_label: str, legendgroup: str, showlegend: bool = True) -> list[dict]:
    """The lower edge, the upper edge filled down to it, then the centre line (mean or median)."""
    what = {"minmax": "min", "ci95": "95 % CI low", "std": "−1 sd"}.get(band_kind, "")
    what_hi = {"minmax": "max", "ci95": "95 % CI high", "std": "+1 sd"}.get(band_kind, "")
    meta = {"members": list(members)}
    common = {"type": "scatter", "mode": "lines", "legendgroup": legendgroup, "showlegend": False}
    out = []
    if band.lower is not None and band.upper is not None:
        for edge, label, fill in ((band.lower, what, None), (band.upper, what_hi, "tonexty")):
            out.append({**common, "x": _list(band.x), "y": _list(edge), "name": f"{name} · {label}",
                        "line": {"width": 0, "color": color}, "fill": fill, "fillcolor": rgba(color, 0.18),
                        "meta": {**meta, "role": label},
                        "hovertemplate": f"{name}<br>{label} of {band.n} runs: %{{y:.4~g}}<extra></extra>"})
    out.append({**common, "x": _list(band.x), "y": _list(band.center), "name": f"{name} · {stat}",
                "line": {"width": 2.4, "color": color}, "showlegend": showlegend, "meta": {**meta, "role": stat},
                "hovertemplate": f"<b>{name}</b> ({band.n} runs)<br>{x_label} %{{x:,.4~g}}<br>{stat} {y_label} "
                                 "%{y:.4~g}<extra></extra>"})
    return out


def rgba(color: str, alpha: float) -> str:
    """'#rrggbb' or 'rgb(r, g, b)' as 'rgba(r, g, b, alpha)'."""
    c = color.strip()
    if c.startswith("#") and len(c) == 7:
        r, g, b = (int(c[i:i + 2], 16) for i in (1, 3, 5))
    elif c.startswith("rgb"):
        r, g, b = (int(float(v)) for v in c[c.index("(") + 1:c.index(")")].split(",")[:3])
    else:
        return c
    return f"rgba({r}, {g}, {b}, {alpha})"


def _list(a: np.ndarray) -> list:
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=float).tolist()]


def alignment_note(bands: Sequence[Band], x_label: str, stat: str, band_kind: str) -> str:
    """What a grouped plot shows, in one sentence (how members were aligned)."""
    if not bands:
        return ""
    sizes = sorted({b.n for b in bands})
    size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    kind = {"minmax": "min–max band", "ci95": "95 % confidence band", "std": "±1 sd band", "none": "no band"}[band_kind]
    return (f"{len(bands)} groups of {size} runs: {stat} with a {kind}, members interpolated linearly onto their "
            f"own {x_label} values within the range every member covers (beyond the shortest member nothing is drawn)")
