"""A run's spool: append-only Arrow segment files, written atomically, next to the store.

A row is durable once its segment is renamed into place, before any DuckDB lock is taken. The owning
process holds an flock on `owner.lock` for its whole life; the kernel drops it when the process dies,
so any other process can tell a dead run's spool from a live one without trusting PIDs or clocks.

A live run keeps its ingested segments in `ingested/` until it ends (or, past a size limit, until
they have been checked against the store), so that it can check the store against what it logged and
put back anything missing (see Run.finish); recovery of a dead run's spool replays them too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

TABLES = ("steps", "evals", "scalars")
RUN_FILE = "run.json"
LOCK_FILE = "owner.lock"
INGESTED = "ingested"


QUARANTINE = "quarantine"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp name, fsync, rename: the file is whole or absent. On any error (a full disk) the
    temp file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def quarantine(root: Path, path: Path, reason: str, run_id: str | None = None,
               consequence: str = "its rows are not in the store") -> Path:
    """Move an unreadable spool file aside to <spool root>/quarantine/<run_id>/ and say so in one line."""
    dest_dir = root / QUARANTINE / (run_id or path.parent.name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / path.name
    n = 1
    while dest.exists():
        n += 1
        dest = dest_dir / f"{path.name}.{n}"
    os.replace(path, dest)
    print(f"batchscope: quarantined {path} -> {dest} ({reason}); {consequence}",
          file=sys.stderr, flush=True)
    return dest


@dataclass
class Segment:
    path: Path
    table: str

    def read(self) -> pa.Table:
        with pa.memory_map(str(self.path)) as src:
            return ipc.open_file(src).read_all()


class Spool:
    """One run's folder of segments plus its run.json (the `runs` row as last known)."""

    def __init__(self, root: Path, run_id: str, keep_ingested: bool = False):
        self.dir = root / run_id
        self.run_id = run_id
        self.keep_ingested = keep_ingested
        self.rows_written = dict.fromkeys(TABLES, 0)  # by this process, for Run's end-of-run check
        self.rows_dropped = dict.fromkeys(TABLES, 0)  # of those, in kept segments checked and dropped
        self.kept_bytes = 0  # size of the segments under ingested/ kept by this process
        self.pruned = False  # some kept segments were checked against the store and dropped
        self.bytes_written = self.bytes_dropped = 0  # segment bytes written / dropped after a check, by this process
        self._seq = 0
        self._lock_fd: int | None = None

    # --- ownership -------------------------------------------------------------------------------
    def create_and_own(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.try_own():
            raise RuntimeError(f"spool {self.dir} is owned by another live process")

    def try_own(self) -> bool:
        """Take the owner lock without waiting; False if a live process holds it."""
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- contents --------------------------------------------------------------------------------
    def write_run(self, row: dict) -> None:
        atomic_write(self.dir / RUN_FILE, json.dumps(row, default=str).encode())

    def read_run(self) -> dict | None:
        """The run row; None if there is no run.json (yet). Raises ValueError if it is unreadable."""
        try:
            row = json.loads((self.dir / RUN_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (UnicodeDecodeError, json.JSONDecodeError, OSError) as exc:
            raise ValueError(f"unreadable run.json: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"run.json holds a {type(row).__name__}, not a run row")
        return row

    def write_segment(self, table: str, data: pa.Table) -> Path:
        self._seq += 1
        path = self.dir / f"{os.getpid()}-{self._seq:09d}.{table}.arrow"
        sink = pa.BufferOutputStream()
        # zstd: segments shrink ~3x and serialise faster than raw buffers; fsync then costs little.
        with ipc.new_file(sink, data.schema, options=ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(data)
        data_bytes = sink.getvalue().to_pybytes()
        atomic_write(path, data_bytes)
        self.rows_written[table] += data.num_rows
        self.bytes_written += len(data_bytes)
        return path

    def segments(self, ingested: bool = False) -> list[Segment]:
        """Segments waiting for ingest, or (ingested=True) those already ingested and kept."""
        out = []
        for p in sorted((self.dir / INGESTED if ingested else self.dir).glob("*.arrow")):
            table = p.name.rsplit(".", 2)[-2]
            if table in TABLES:
                out.append(Segment(p, table))
        return out

    def kept_bytes_on_disk(self) -> int:
        """Size of the kept segments, whichever process moved them there."""
        total = 0
        for seg in self.segments(ingested=True):
            with contextlib.suppress(FileNotFoundError):
                total += seg.path.stat().st_size
        return total

    def remove_temp_files(self) -> int:
        """Delete temp files a dead writer left behind (killed or out of space mid-write)."""
        n = 0
        for folder in (self.dir, self.dir / INGESTED):
            for p in folder.glob(".*.tmp") if folder.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n

    def mark_ingested(self, segments: list[Segment]) -> None:
        """After COMMIT: keep the segments under ingested/ (keep_ingested) or delete them."""
        if self.keep_ingested:
            (self.dir / INGESTED).mkdir(exist_ok=True)
        for seg in segments:
            if self.keep_ingested and seg.path.parent == self.dir:
                with contextlib.suppress(FileNotFoundError):
                    size = seg.path.stat().st_size
                    os.replace(seg.path, self.dir / INGESTED / seg.path.name)
                    self.kept_bytes += size
            elif not self.keep_ingested:
                seg.path.unlink(missing_ok=True)

    def drop_kept(self, segments: list[Segment], rows: dict[str, int] | None = None) -> None:
        """Delete kept segments whose rows (`rows` per table) were found in the store (the size limit of
        keep_ingested)."""
        for table, n in (rows or {}).items():
            self.rows_dropped[table] += n
        for seg in segments:
            with contextlib.suppress(FileNotFoundError):
                size = seg.path.stat().st_size
                seg.path.unlink()
                self.kept_bytes -= size
                self.bytes_dropped += size
        self.pruned = True

    def remove(self) -> None:
        """Delete the spool folder (call only after everything in it was ingested)."""
        for folder in (self.dir / INGESTED, self.dir):
            if folder.is_dir():
                for p in folder.iterdir():
                    if p.is_file():
                        p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
