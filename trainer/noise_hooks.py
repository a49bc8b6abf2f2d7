"""GradientNoise's hooks (trainer/noise.py): the root pre-hook that counts micro-batches, each covered
layer's forward hook and output-gradient hook that turn (input, output gradient) into per-example terms,
the tied-weight cross term, the fall-back to micro-batch hooks, and the checks that keep the count honest
when autograd does more than one plain backward (compile, checkpointing, penalties, functional ties).

A mixin: the state lives on GradientNoise (`_cur`, `_module_params`, `_partner`, ...), set in its __init__.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from trainer.noise_stats import _Step
from trainer.per_example import Rule, embedding_rows, fits_for, head_rows

_grad_enabled, _func_stack = torch.is_grad_enabled, torch._C._functorch.peek_interpreter_stack
_graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # -1 outside a backward pass


def _tensors(out) -> list[torch.Tensor]:
    """The tensors in a model output: a tensor, or tuples, lists and dicts of them (HF's ModelOutput is one)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _recording() -> bool:
    """Grad enabled and not inside a torch.func transform (whose forwards are someone else's)."""
    return _grad_enabled() and _func_stack() is None


class LayerHooks:
    """The hook half of GradientNoise."""

    def _root_hook(self, module, args, kwargs):
        if not (self.active and _recording()):
            return
        cur = self._cur
        task = _graph_task()
        if cur.micro and cur.root_task == -1 and task != -1:  # a whole-model checkpoint recomputing the forward
            return
        cur.micro += 1
        cur.root_task = task
        cur.calls.clear()
        cur.first_task.clear()
        first = args[0] if args and isinstance(args[0], torch.Tensor) else next(
            (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if first is None or first.dim() == 0:
            cur.sizes.append(0)
            cur.shape = None
        else:
            cur.shape = shape = first.shape
            cur.sizes.append(shape[0])

    def _audit_uses(self, module, args, output) -> None:
        """Walk the first recorded forward's autograd graph from the model output and count the edges into
        each parameter: a covered weight with more uses than layers owning it is also used elsewhere
        (`logits = F.linear(h, self.emb.weight)`), which its layer's rule cannot see; that layer falls back
        before this step's backward. (Uses outside the model's forward, e.g. in the loss, are not seen.)"""
        if not (self.active and _recording()):
            return
        self._audit.remove()
        self._audit = None
        edges: dict[int, int] = {}
        seen: set = set()
        todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    edges[id(var)] = edges.get(id(var), 0) + 1
                elif nxt not in seen:
                    todo.append(nxt)
        cur = self._cur
        for mid, own in list(self._module_params.items()):
            if mid in self._module_params and any(edges.get(i, 0) > self._owners.get(i, 1) for i in own):
                self._fall_back(mid, cur)

    def _forward_hook(self, rule: Rule):
        fits = fits_for(rule)

        def hook(module, inputs, output):
            if not (self.active and _recording()):
                return
            mid = id(module)
            if mid not in self._module_params:  # fell back earlier: its parameters have hooks now
                return
            cur = self._cur
            calls = cur.calls
            n_calls = calls.get(mid, 0)
            if n_calls and cur.first_task.get(mid) == -1 and _graph_task() != -1:
                # a forward inside backward after a first call outside it: activation checkpointing
                # (use_reentrant=False) recomputing the layer, whose output-gradient hook fires before the
                # recompute. (Reentrant checkpointing runs every recorded call inside backward: a layer used
                # twice there is a second call.)
                return
            calls[mid] = n_calls = n_calls + 1
            if n_calls == 1:
                cur.first_task[mid] = _graph_task()
            a = inputs[0] if inputs else None
            if (n_calls > 1 or not isinstance(output, torch.Tensor) or not isinstance(a, torch.Tensor)
                    or not self._has_batch_dim(module, a, cur) or not fits(module, a, output)):
                # called twice in one forward (the per-example terms would miss cross terms), or an
                # input without the batch dimension (e.g. positions embedded once and broadcast)
                self._fall_back(mid, cur)
                return
            if not output.requires_grad:
                return
            micro = cur.micro
            tied = mid in self._partner
            if tied and isinstance(module, nn.Embedding):  # the tied head's backward needs these ids
                cur.tied[("idx", mid, micro)] = a

            def on_grad(grads) -> None:
                d = grads[0]
                if d is None or cur is not self._cur or calls.get(mid, 0) != 1 or mid not in self._module_params:
                    return
                key = (mid, micro)
                if key in cur.fired:  # a second backward through this forward (a gradient penalty's double backward)
                    self._fall_back(mid, cur, lost=True)
                    return
                cur.fired.add(key)
                # autograd runs hooks in grad mode only under backward(create_graph=True): there the rule takes
                # detached aliases (its arithmetic records no graph), elsewhere the tensors (~1 us less each)
                sq = rule(module, a.detach(), d.detach()) if _grad_enabled() else rule(module, a, d)
                if sq is None:  # a shape the forward check let through: this step has no small batch for it
                    self._fall_back(mid, cur, lost=True)
                    return
                cur.pe.append(sq)
                cur.pe_micro.append(micro)
                cur.pe_mod.append(mid)
                if tied:
                    self._tied_term(module, mid, a, d, cur, micro)

            cur.hooked.add((mid, micro))
            node = output.grad_fn  # a pre-hook on the node that consumes d costs less than a tensor hook
            if node is None:
                output.register_hook(lambda d: on_grad((d,)))
            else:
                node.register_prehook(on_grad)
        return hook

    def _tied_term(self, module: nn.Module, mid: int, a: torch.Tensor, d: torch.Tensor, cur: _Step, micro: int) -> None:
        """The cross term 2 sum_i <E_i, H_i> of a weight tied between an Embedding and a Linear head (the two
        rules' terms are |E_i|^2 and |H_i|^2): each side leaves its piece, the later one adds the term."""
        partner = self._partner[mid]
        if isinstance(module, nn.Embedding):
            piece = embedding_rows(module, a.detach(), d.detach())
        else:
            idx = cur.tied.get(("idx", partner, micro))
            piece = None if idx is None else head_rows(idx, a.detach(), d.detach())
        if piece is None:  # shapes the pair cannot join (e.g. the head saw other examples): no small batch
            self._fall_back(mid, cur, lost=True)
            return
        other = cur.tied.pop(("piece", partner, micro), None)
        if other is None:
            cur.tied[("piece", mid, micro)] = piece
            return
        cur.pe.append(2 * torch.dot(piece.reshape(-1), other.reshape(-1)))
        cur.pe_micro.append(micro)
        cur.pe_mod.append(mid)

    def _fall_back(self, mid: int, cur: _Step, lost: bool = False) -> None:
        """From now on measure this layer's parameters by micro-batches (sticky). Hooked during the
        step's first forward, they are measured this step too; later, this step has no small batch for them.
        A layer whose weight is tied to another's takes that layer with it."""
        own = self._module_params.pop(mid)
        partner = self._partner.pop(mid, None)
        if partner is not None:
            self._partner.pop(partner, None)
            if partner in self._module_params:
                self._fall_back(partner, cur, lost)
        lost = lost or cur.micro > 1 or mid in cur.pe_mod
        for pid in own:
            self._pe_ids.discard(pid)
            if lost and self._by_bucket:  # this step's buckets hold its gradient but not its g_big: next step
                self._rk_next.add(pid)
            else:
                self._hook_param(pid)
        self.covered.pop(self._module_names.pop(mid), None)
        self._plans.clear()
        if lost:
            cur.lost.update(own)
            keep = [j for j, m in enumerate(cur.pe_mod) if m != mid]  # its terms so far leave the sum too
            if len(keep) < len(cur.pe_mod):
                for c in (cur.pe, cur.pe_micro, cur.pe_mod):
                    c[:] = [c[j] for j in keep]

    @staticmethod
    def _has_batch_dim(module: nn.Module, a: torch.Tensor, cur: _Step) -> bool:
        """dim 0 of the layer input is the batch. Embeddings must see the model input's own shape (token
        ids (N, T) or class ids (N,)), so positions (T,) with T == N are not taken for T examples."""
        sizes = cur.sizes
        if not sizes or not sizes[-1]:
            return True
        if isinstance(module, nn.Embedding) and cur.shape is not None:
            return a.shape == cur.shape
        return a.dim() > 0 and a.shape[0] == sizes[-1]

    def _hook_param(self, pid: int) -> None:
        if pid in self._mb_ids or pid in self._rk_ids:
            return
        if self.sharded:  # the sharded parameter is not in the graph (its all-gathered copy is): no small batch
            self._unhooked.add(pid)
            self._plans.clear()
            return
        if self._by_bucket:
            self._rk_ids.add(pid)
            self.bucket_plans.clear()
            return
        self._mb_ids.add(pid)
        p = self._by_id[pid]
        acc = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else None  # accumulate, no copy

        def hook(g: torch.Tensor) -> None:
            cur = self._cur
            if self.active and pid not in cur.lost:
                cur.mb.append(torch.linalg.vector_norm(g.detach() if g.requires_grad else g, dtype=acc))
                cur.mb_micro.append(cur.micro)

        self._handles.append(p.register_hook(hook))

    def _silent_layers(self, cur: _Step) -> bool:
        """Covered layers whose parameters got a gradient but whose per-example hook never ran in the whole
        step: among the layers whose forward hook ran, or all of them when no forward hook ran at all, as in a
        torch.compile'd model (its graph keeps neither the forward hooks' effects nor the gradient hooks they
        register). They fall back to micro-batches for good (no small batch this step), with one warning. A
        layer the forward did not call is not silent (a zeroed `.grad` from zero_grad(set_to_none=False)),
        nor is one whose output got no gradient in some micro-batch (its examples' gradients there are 0)."""
        fired = {mid for mid, _ in cur.fired}
        called = dict.fromkeys(mid for mid, _ in cur.hooked) if cur.hooked else self._module_params
        silent = [mid for mid in list(called)
                  if mid not in fired and mid in self._module_params
                  and any(self._by_id[i].grad is not None for i in self._module_params[mid])]
        if not silent:
            return False
        names = [self._module_names[mid] for mid in silent]
        for mid in silent:
            self._fall_back(mid, cur, lost=True)
        if "silent" not in self._warned:
            self._warned.update(("silent", "missing"))
            warnings.warn(f"GradientNoise: the per-example hooks of {len(names)} layer(s) did not run ({names[:3]}); a "
                          "torch.compile'd model traces them away. They are measured by micro-batches from the next "
                          "step on, which needs 2+ micro-batches or DDP for a small batch", RuntimeWarning, stacklevel=4)
        return True
