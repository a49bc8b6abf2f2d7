"""Suite-wide hooks.

DuckDB's Python bindings (nanobind) print "nanobind: leaked N instances" at interpreter exit when
DuckDB objects are still referenced by module globals of other libraries; it is shutdown noise, not
a failure, but after pytest's summary line it reads like one. The suite therefore ends the process
right after pytest has finished reporting, with pytest's own exit status.
"""

from __future__ import annotations

import os
import sys

_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config) -> None:
    # Only for a whole run from the command line (not pytest.main() inside another program).
    if _exit_status is None or os.environ.get("BATCHSCOPE_KEEP_INTERPRETER") == "1":
        return
    if getattr(config, "workerinput", None) is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
