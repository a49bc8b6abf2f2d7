"""The cost of measuring the noise scale on every step under DDP, vs a bare DDP loop in the same run.

    python bench/bench_ddp.py                        # 2 gloo ranks on the CPU, digits b32 and b512
    python bench/bench_ddp.py --world 2 --configs digits:32,charlm:32 --steps 400 --repeats 5
    python bench/bench_ddp.py --fsdp                 # FSDP2 (fully_shard per layer and the root) instead

Each rank trains its shard (B / world) of the same task's batches under DistributedDataParallel, one
torch thread per rank. Variants (time per step relative to the bare DDP loop of the same repeat):
  pe        + GradientNoise(ddp) on every step: per-example norms where a layer has a rule, the rank's
            local gradient (the small batch) vs the all-reduced one; the sums ride in the last gradient
            bucket (GradientNoise's DDP communication hook, trainer/noise_comm.py)
  pe_sep    pe with comm_hook=False: DDP's built-in hook, and the sums all-reduced in step()
  ranks     + GradientNoise(ddp, per_example=False): every parameter by its rank's local gradient, read
            off DDP's buckets in the comm hook (one norm per bucket, no hook per parameter)
  ranks_hk  ranks with accumulation=True: a gradient hook per parameter instead (the path before the
            buckets were read)
  callback  pe + what the Lightning / HF callbacks add per step (trainer/integrations/_common.py's
            StepRecorder): the ingredients to the host, the online B_simple, and a background all-reduce
            of the step's loss and counts (the row is logged a step late), no run attached
With --fsdp the model is sharded with FSDP2 and only bare and pe run (pe: the per-example sums and the
shards' |g_big|^2 in one all-reduce in step(); the other variants are DDP's).
The variants are interleaved and repeated; each ratio is the median over repeats of (variant / bare of
the same repeat), on rank 0's clock; wall-clock and process CPU time are both reported.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.integrations._common import StepRecorder  # noqa: E402
from trainer.noise import GradientNoise  # noqa: E402
from trainer.tasks import TaskOptions, make_task  # noqa: E402

VARIANTS = ("bare", "pe", "pe_sep", "ranks", "ranks_hk", "callback")


def timed_steps(task, model: nn.Module, micro: int, steps: int, variant: str) -> tuple[float, float]:
    """Seconds per step (wall, CPU) of `steps` DDP steps of `variant`; the ingredients stay on the device,
    as a loop that logs them in blocks keeps them."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gns = (GradientNoise(model, per_example=not variant.startswith("ranks"), warn=False, comm_hook=variant != "pe_sep",
                         accumulation=variant == "ranks_hk") if variant != "bare" else None)
    rec = StepRecorder(None, "examples", dist.get_world_size()) if variant == "callback" else None
    kept = []
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        x, y = task.next_batch(micro)
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        if gns is not None:
            s = gns.step()
            kept.append((s.g_small_sq, s.g_big_sq))
        if rec is not None:
            rec.micro_batch(micro)
            rec.loss(loss.detach())
            rec.step(i + 1, 0.01, s)
        opt.step()
    if rec is not None:
        rec.flush()
    out = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    if gns is not None:
        gns.close()
    return out


def sharded(model: nn.Module) -> nn.Module:
    """FSDP2 over all ranks: each child with parameters its own unit, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def rank_main(rank: int, world: int, port: int, configs: list[tuple[str, int]], steps: int, repeats: int,
              out: str, fsdp: bool = False) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2 on Linear over sequences
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for name, batch in configs:
        task = make_task(name, TaskOptions(), torch.device("cpu"), seed=rank)

        def fresh(task=task) -> nn.Module:  # a DDP model per timed run: DDP takes one comm hook per model
            torch.manual_seed(0)
            return sharded(task.build_model()) if fsdp else nn.parallel.DistributedDataParallel(task.build_model())

        variants = VARIANTS[:2] if fsdp else VARIANTS
        timed_steps(task, fresh(), batch // world, max(10, steps // 10), "pe")  # warm-up
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]  # no variant always runs first
            for v in order:
                times[v].append(timed_steps(task, fresh(), batch // world, steps, v))
        row = {"config": f"{name}:{batch}", "world": world, "micro_per_rank": batch // world,
               "bare_ms": 1e3 * statistics.median(w for w, _ in times["bare"]),
               "bare_cpu_ms": 1e3 * statistics.median(c for _, c in times["bare"])}
        for v in variants[1:]:
            row[v] = statistics.median(t[0] / b[0] for t, b in zip(times[v], times["bare"], strict=True))
            row[v + "_cpu"] = statistics.median(t[1] / b[1] for t, b in zip(times[v], times["bare"], strict=True))
            row[v + "_range"] = (min(t[0] / b[0] for t, b in zip(times[v], times["bare"], strict=True)),
                                 max(t[0] / b[0] for t, b in zip(times[v], times["bare"], strict=True)))
        results.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="digits:32,digits:512", help="task:global batch,...")
    ap.add_argument("--world", type=int, default=2, help="gloo ranks (processes)")
    ap.add_argument("--steps", type=int, default=300, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP: bare and pe only")
    args = ap.parse_args()
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    out = Path(args.json or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_ddp_{os.getpid()}.json")
    mp.spawn(rank_main, args=(args.world, free_port(), configs, args.steps, args.repeats, str(out), args.fsdp),
             nprocs=args.world, join=True)
    results = json.loads(out.read_text())
    if not args.json:
        out.unlink()
    mode = "FSDP2" if args.fsdp else "DDP"
    print(f"{mode}, {args.world} gloo ranks on the CPU, 1 thread each, {args.steps} steps x {args.repeats} repeats; "
          f"time per step / bare {mode} step (median, [min-max]), CPU-time ratio:")
    for r in results:
        cells = "  ".join(f"{v} {r[v]:.2f}x [{r[v + '_range'][0]:.2f}-{r[v + '_range'][1]:.2f}] cpu {r[v + '_cpu']:.2f}x"
                          for v in (VARIANTS[:2] if args.fsdp else VARIANTS)[1:])
        print(f"  {r['config']:<12} ({r['micro_per_rank']}/rank) bare {r['bare_ms']:.2f} ms  {cells}")


if __name__ == "__main__":
    main()
