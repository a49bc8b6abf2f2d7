"""GradientNoise under FSDP2 (`fully_shard`) on 2 gloo processes, against one process at the same global batch.

Each rank measures its own half of a 16-example batch; the per-example sums are all-reduced, and |g_big|^2
comes from the ranks' gradient shards. Both must equal GradientNoise on an unsharded copy that sees the whole
batch (itself checked against torch.func in tests/test_gradient_noise.py), on every step, and the sharded
parameters must get the same updates. FSDP1 is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from tests.trainer_helpers import small_models, spawn_two
from trainer.noise import GradientNoise

MODELS = small_models()
# (model, micro-batches, mesh shape, what is sharded): HSDP (2, 1) replicates every shard over the 2 ranks;
# "first" shards only the first layer, the loop averages the other gradients itself (after another model of
# the same shapes in this process: equal meshes that are distinct objects)
CASES = [("mlp", 1, (2,), "all"), ("transformer", 1, (2,), "all"), ("transformer", 2, (2,), "all"),
         ("mha", 1, (2,), "all"), ("mlp", 1, (2, 1), "all"), ("mlp", 1, (2,), "first")]


def _key(case) -> str:
    return case if isinstance(case, str) else "-".join(map(str, (*case[:2], *case[2], *case[3:])))


def _shard(model: torch.nn.Module, mesh, what: str) -> None:
    from torch.distributed.fsdp import fully_shard

    if what == "first":
        fully_shard(next(iter(model.children())), mesh=mesh)
        return
    for child in model.children():  # each layer or block its own FSDP unit, then the root
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _case(rank: int, world: int, name: str, k: int, shape: tuple[int, ...], what: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    make, data, loss_fn = MODELS[name]
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
    _shard(model, mesh, what)
    plain = [p for p in model.parameters() if not hasattr(p, "full_tensor")]  # left out of FSDP: averaged here
    gns, ref_gns = GradientNoise(model, warn=False), GradientNoise(ref, warn=False)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    steps = []
    for step in range(2):
        x, y = data(torch.Generator().manual_seed(10 + step), 16)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for j, (xk, yk) in enumerate(zip(xs.chunk(k), ys.chunk(k), strict=True)):
            if k > 1:
                model.set_requires_gradient_sync(j == k - 1)  # reduce-scatter once, after the last micro-batch
            (loss_fn(model(xk), yk) / k).backward()
        for p in plain:
            dist.all_reduce(p.grad)
            p.grad /= world
        s = gns.step()
        loss_fn(ref(x), y).backward()
        r = ref_gns.step()
        steps.append({"got": s.as_dict(), "want": r.as_dict(), "complete": (s.complete, r.complete),
                      "missing": (s.missing, r.missing), "b_big": s.b_big})
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)
    params = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
              for n, p in model.named_parameters()}
    gap = max(float((params[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    return {"steps": steps, "param_gap": gap, "sharded": gns.sharded, "world": gns.world}


def _fsdp1_case(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    make, _, _ = MODELS["mlp"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation notes, where this torch has them
        model = FSDP(make(), device_id=torch.device("cpu"))
    try:
        GradientNoise(model)
    except ValueError as e:
        return {"refused": str(e)}
    return {"refused": None}


def _sweep_case(rank: int, world: int) -> dict:
    """Two models sharded one after the other in one process (a sweep), sharing a layer shape: the second's
    parameters hold a mesh equal to, but not the same object as, the one it was sharded over."""
    from torch.distributed.device_mesh import init_device_mesh

    refused = []
    for width in (1, 4):
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, width))
        _shard(model, init_device_mesh("cpu", (world,)), "all")
        try:
            GradientNoise(model)
        except ValueError as e:
            refused.append(str(e))
    return {"refused": refused}


def _cases(rank: int, world: int, rdzv: str, out: str) -> None:
    """Every case in one pair of processes (a spawn costs seconds). A case that raises saves its traceback."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        special = {"fsdp1": _fsdp1_case, "sweep": _sweep_case}
        for case in [*CASES, *special]:
            path = f"{out}.{_key(case)}.{rank}"
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # FSDP2, 3-d Linear
                    res = special[case](rank, world) if isinstance(case, str) else _case(rank, world, *case)
            except Exception:
                res = {"error": traceback.format_exc()}
            torch.save(res, path)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory) -> str:
    return spawn_two(_cases, tmp_path_factory.mktemp("fsdp"))


def _load(out: str, case: str) -> list[dict]:
    res = [torch.load(f"{out}.{case}.{r}", weights_only=False) for r in range(2)]
    for r in res:
        assert "error" not in r, r["error"]
    return res


@pytest.mark.parametrize(("name", "k", "shape", "what"), CASES)
def test_fsdp2_ingredients_and_updates_match_one_process_at_the_same_global_batch(fsdp_out, name, k, shape, what):
    """Per-example sums all-reduced, |g_big|^2 from the shards (HSDP's replicas, and parameters left out of
    FSDP, counted once), on both ranks and both steps: the one-process values to float32 rounding; the sharded
    SGD updates match too. With nn.MultiheadAttention (no rule) both sides leave its parameters out and say so
    (complete = False)."""
    r0, r1 = _load(fsdp_out, _key((name, k, shape, what)))
    assert r0["sharded"] and r0["world"] == 2
    for a, b in zip(r0["steps"], r1["steps"], strict=True):
        assert a["got"] == pytest.approx(b["got"], rel=1e-6)  # the ranks agree
        assert a["got"] == pytest.approx(a["want"], rel=2e-5)
        assert a["b_big"] == 16 and a["got"]["b_small"] == 1.0
        got_complete, want_complete = a["complete"]
        assert got_complete == want_complete == (name != "mha")
        assert a["missing"][0] == a["missing"][1]
        if name == "mha":
            assert a["missing"][0] and all(n.startswith("mha.") for n in a["missing"][0])
    assert r0["param_gap"] < 1e-5 and r1["param_gap"] < 1e-5


def test_fsdp1_is_refused_with_what_to_use_instead_and_a_sweeps_models_are_not(fsdp_out):
    for r in _load(fsdp_out, "fsdp1"):
        assert r["refused"] and "fully_shard" in r["refused"]
    for r in _load(fsdp_out, "sweep"):
        assert r["refused"] == []


def test_parameters_replaced_after_attaching_are_reported_not_silently_unmeasured():
    """fully_shard (or any wrapper that swaps parameters) applied after GradientNoise: the hooks still run
    but its parameters never get a gradient. The step says nothing was measured and warns once."""
    make, data, loss_fn = MODELS["mlp"]
    torch.manual_seed(0)
    model = make()
    gns = GradientNoise(model)
    for m in model:
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(p.detach().clone()))
    x, y = data(torch.Generator().manual_seed(1), 8)
    with pytest.warns(RuntimeWarning, match="Attach GradientNoise after wrapping"):
        loss_fn(model(x), y).backward()
        s = gns.step()
    assert not s.measured
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        assert not gns.step().measured
