"""`python -m collector shell`: driven through stdin (statements, dot commands, refusals, limits) and
through a real terminal in tmux (Tab completion of column and view names, history recall and file)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboard.synthetic import make_store
from tests.dashboard_server import ROOT

N_RUNS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("shell") / "runs.duckdb"
    make_store(db, n_runs=N_RUNS, steps=100, seeds=1)
    return db


def shell(db: Path, script: str, *args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "shell", "--db", str(db), *args], input=script,
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home)})


def test_shell_from_stdin(store, tmp_path):
    script = "\n".join([
        "SELECT count(*) AS n_runs",
        "FROM runs;",  # a statement over two lines
        ".tables",
        ".schema steps",
        f"COPY runs TO '{tmp_path}/leak.csv';",
        "SELEC 1;",
        ".mode csv",
        "SELECT 1.5 AS a, 'x,y' AS b;",
        "SELECT * FROM range(100000000000);",
        ".limits",
        "SELECT 'no semicolon at the end' AS last",
    ]) + "\n"
    r = shell(store, script, "--max-rows", "3", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out, err = r.stdout, r.stderr
    assert f"│ {N_RUNS}      │" in out or f"│ {N_RUNS} " in out  # the table of the first query
    tables_line = next(ln for ln in out.splitlines() if "runs" in ln.split() and "steps" in ln.split())
    assert {"evals", "scalars", "run_summary"} <= set(tables_line.split())
    assert "steps(run_id, step," in out
    assert "rule no-files" in err and not (tmp_path / "leak.csv").exists()
    lines = err.splitlines()
    caret = lines.index(next(ln for ln in lines if ln.startswith("LINE 1: SELEC 1")))
    assert lines[caret + 1].strip().startswith("^")  # DuckDB's caret, on its own line
    assert 'a,b\n1.5,"x,y"\n' in out
    assert "range\n0\n1\n2\n" in out and "rule row-limit" in err
    assert "3 rows, 60 s" in out
    assert "last\nno semicolon at the end\n" in out
    assert not (tmp_path / ".batchscope_history").exists()  # no history without a terminal


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_shell_completion_and_history_in_a_terminal(store, tmp_path):
    session = f"batchscope-shell-{tmp_path.name}"[:60]
    history = tmp_path / "history"
    command = (f"cd {shlex.quote(str(ROOT))} && BATCHSCOPE_HISTORY={shlex.quote(str(history))} "
               f"{shlex.quote(sys.executable)} -m collector shell --db {shlex.quote(str(store))}")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session)

    def wait_for(text: str, what: str, times: int = 1) -> str:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if (s := screen()).count(text) >= times:
                return s
            time.sleep(0.2)
        raise AssertionError(f"{what}: {text!r} not on screen {times}x:\n{screen()}")

    tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50", command)
    try:
        wait_for("batchscope>", "prompt")
        tmux("send-keys", "-t", session, "-l", "SELECT batch_si")
        tmux("send-keys", "-t", session, "Tab")
        wait_for("SELECT batch_size", "column completion")
        tmux("send-keys", "-t", session, "-l", " FROM run_summ")
        tmux("send-keys", "-t", session, "Tab")
        wait_for("FROM run_summary", "view completion")
        tmux("send-keys", "-t", session, "-l", " ORDER BY 1 LIMIT 2")
        tmux("send-keys", "-t", session, "\\;", "Enter")
        wait_for("2 rows in", "result")
        tmux("send-keys", "-t", session, "Up")  # readline history recalls the statement
        wait_for("batchscope> SELECT batch_size FROM run_summary ORDER BY 1 LIMIT 2;", "history", times=2)
        tmux("send-keys", "-t", session, "C-u")
        # Ctrl-C during a runaway query cancels it (its worker is killed) and the prompt carries on
        tmux("send-keys", "-t", session, "-l", "SELECT sum(hash(a.range + b.range)) FROM range(1000000) a, range(1000000) b")
        tmux("send-keys", "-t", session, "\\;", "Enter")
        time.sleep(3.0)  # the query runs for hours: let a slow terminal hand the line over first
        tmux("send-keys", "-t", session, "C-c")
        wait_for("query cancelled", "cancel")
        tmux("send-keys", "-t", session, "-l", "SELECT 6 * 7 AS answer")
        tmux("send-keys", "-t", session, "\\;", "Enter")
        wait_for("│ 42     │", "a query after the cancel")
        assert "Traceback" not in screen()
        tmux("send-keys", "-t", session, "-l", ".quit")
        tmux("send-keys", "-t", session, "Enter")
        end = time.monotonic() + 60
        while not history.exists() and time.monotonic() < end:
            time.sleep(0.2)
        assert "SELECT batch_size FROM run_summary ORDER BY 1 LIMIT 2;" in history.read_text()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
