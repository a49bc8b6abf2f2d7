"""batchscope's logging API for any PyTorch training loop, and the store it writes to.

    import collector
    with collector.start_run(db="runs.duckdb", name="b32-lr0.1", sweep="digits", config=cfg) as run:
        run.log_step(step, examples=..., loss=..., lr=..., batch_size=...)

See docs/collector-api.md for the contract and DESIGN.md for the concurrency rules behind it.
"""

from collector.run import STEP_COLUMNS, Run, start_run
from collector.store import (
    StoreError,
    StoreLockedError,
    read_connection,
    recover,
    resolve_db,
    write_connection,
)

__all__ = [
    "STEP_COLUMNS",
    "Run",
    "StoreError",
    "StoreLockedError",
    "read_connection",
    "recover",
    "resolve_db",
    "start_run",
    "write_connection",
]
