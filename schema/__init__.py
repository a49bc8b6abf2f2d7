"""The store's schema: tables (tables.py), forward migrations (migrations.py), views and macros (sql/).

`ensure_schema(con)` brings any store, new or written by an older release, to the current version.
"""

from schema.migrations import ensure_schema, refresh_run_stats, store_version
from schema.tables import (
    DATA_TABLES,
    DERIVED_TABLES,
    RUN_STATUSES,
    SCHEMA_VERSION,
    evals,
    metadata,
    runs,
    scalars,
    steps,
)

__all__ = [
    "DATA_TABLES",
    "DERIVED_TABLES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "ensure_schema",
    "evals",
    "metadata",
    "refresh_run_stats",
    "runs",
    "scalars",
    "steps",
    "store_version",
]
