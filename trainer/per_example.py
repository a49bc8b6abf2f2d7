"""Per-example squared gradient norms of one layer from its input and output gradient ("ghost" norms).

For a layer whose output row i depends only on input row i (no batch norm), the gradient of the
batch loss with respect to its parameters is a sum of per-example terms, and the squared norm of
each term follows from the layer input a and the output gradient delta alone, without ever forming
the per-example gradients (Goodfellow 2015; Li et al. 2022; Gray et al. 2024):

- Linear on (N, d) inputs: |a_i|^2 |delta_i|^2 for the weight, |delta_i|^2 for the bias (also Hugging
  Face's GPT-2 `Conv1D`, a Linear with its weight stored transposed: the norms are the same);
- Linear on sequences (N, T, d): sum_tt' (a_t . a_t')(delta_t . delta_t') (the Gram form), or the
  per-example gradient itself when that is smaller (T (d_in + d_out) > d_in d_out);
- Embedding: sum_tt' [idx_t == idx_t'] (delta_t . delta_t');
- LayerNorm / RMSNorm: the per-example gradients are only of the size of the normalised shape, so
  they are formed (sum over positions of delta * x_hat, and of delta); also a model's own norm classes
  (Hugging Face's LlamaRMSNorm, T5LayerNorm, Gemma's (1 + w) form, nanoGPT's LayerNorm): a module named
  *Norm* with a 1-d weight (and bias) whose first output is checked against w * x_hat + b for layer or
  RMS normalisation (`custom_norm_fits`) before it is covered;
- Conv1d / Conv2d (groups = 1, zero padding): Linear on the unfolded input, Gram or direct;
- optionally (sketch = k), for sequences and convolutions, an unbiased estimate from k random
  projections per example, O(T (d_in + d_out) k) instead of the Gram form's O(T^2 (d_in + d_out)).

Each rule returns sum over the examples of the squared norms, as a 0-d tensor (the noise scale only
needs their mean), or None when the call does not fit (e.g. an input without the batch dimension):
the caller then falls back to the micro-batch method for that layer's parameters.
Pure tensor math: no hooks, no state.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


_MISSING = object()


def _wants(m: nn.Module, name: str) -> bool:
    """Whether the layer's parameter `name` exists and takes a gradient. Read from `_parameters` first:
    `m.weight` goes through Module.__getattr__, ~1 us of Python per call (a parametrized weight is not in
    `_parameters`, and is still found by getattr)."""
    p = m._parameters.get(name, _MISSING)
    if p is _MISSING:
        p = getattr(m, name, None)
    return p is not None and p.requires_grad


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype the sums are taken in: float32 for half-precision gradients (autocast), else their own."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _sq(t: torch.Tensor) -> torch.Tensor:
    """|t|^2 as one BLAS dot (square().sum() runs pow over every element first: 10x slower on big tensors)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def _row_norms(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=None if x.dtype == acc else acc)


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _one(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d 1 on `like`'s device and dtype (no allocation per call)."""
    key = (like.device, like.dtype)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), device=like.device, dtype=like.dtype)
    return one


def _seq_sq(a: torch.Tensor, d: torch.Tensor, with_bias: bool, with_weight: bool = True,
            sketch: int = 0) -> torch.Tensor:
    """Sum over n of |sum_t delta_nt a_nt^T|^2 (+ |sum_t delta_nt|^2) for a (N, T, i) and d (N, T, o);
    with `sketch` = k > 0, the weight's part is estimated without bias from k random projections per
    example when that is cheaper than both exact forms (`sketch_sq`)."""
    acc = _acc(d)
    a, d = a.to(acc), d.to(acc)  # no-ops in float32; under autocast the products need the range
    t, d_in, d_out = a.shape[1], a.shape[2], d.shape[2]
    total = _sq(d.sum(1)) if with_bias else None
    if with_weight:
        if sketch and sketch < t and sketch * (d_in + d_out) < d_in * d_out:
            w = sketch_sq(a, d, sketch)
        elif t * (d_in + d_out) < d_in * d_out:  # Gram form: O(N T^2 (d_in + d_out))
            w = torch.dot(torch.bmm(a, a.transpose(1, 2)).view(-1), torch.bmm(d, d.transpose(1, 2)).view(-1))
        else:  # the per-example gradients are smaller than the Gram matrices: form them
            w = _sq(torch.bmm(d.transpose(1, 2), a))
        total = w if total is None else total + w
    return total


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    """The projections' own random stream (seeded, per device): measuring never moves the user's RNG, so
    a run's data order and dropout are the same with and without it."""
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device=device)
        gen.manual_seed(0x6E5)
    return gen


def sketch_sq(a: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """An unbiased estimate of sum_n |G_n|_F^2, G_n = sum_t delta_nt a_nt^T, from k Gaussian projections per
    example: E_v |G_n v|^2 = |G_n|_F^2 for v ~ N(0, I), and G_n v = D_n^T (A_n v) costs O(T (d_in + d_out))
    per projection, against O(T^2 (d_in + d_out)) for the Gram form. Its relative variance per example is
    2 |G^T G|_F^2 / (k |G|_F^4) <= 2 / k (rank 1) and shrinks with the rank and over the N examples."""
    n, _, d_in = a.shape
    v = torch.randn(n, k, d_in, device=a.device, dtype=a.dtype, generator=_generator(a.device))
    # (v^T A^T) D = (G v)^T, (N, k, d_out): both products in the orientation BLAS runs fast (5x the other)
    return _sq(torch.bmm(torch.bmm(v, a.transpose(1, 2)), d)).div_(k)


def linear_fits(m: nn.Linear, a: torch.Tensor, out: torch.Tensor) -> bool:
    return a.dim() >= 2 and out.shape[:-1] == a.shape[:-1]


def linear_sq(m: nn.Linear, a: torch.Tensor, d: torch.Tensor, sketch: int = 0) -> torch.Tensor | None:
    dims = a.dim()
    if dims == 2:  # sum_i (|a_i|^2 + 1) |d_i|^2: two fused row norms, sqrt(|a_i|^2 + 1) by hypot, a dot
        if d.dim() != 2 or d.shape[0] != a.shape[0]:
            return None
        acc = _acc(d)
        d_n = _row_norms(d, acc)
        if not _wants(m, "weight"):
            return torch.dot(d_n, d_n)
        a_n = _row_norms(a, acc)
        if _wants(m, "bias"):
            a_n.hypot_(_one(a_n))
        x = a_n.mul_(d_n)
        return torch.dot(x, x)
    if dims < 2 or d.shape[:-1] != a.shape[:-1]:
        return None
    n = a.shape[0]
    return _seq_sq(a.reshape(n, -1, a.shape[-1]), d.reshape(n, -1, d.shape[-1]), _wants(m, "bias"),
                   _wants(m, "weight"), sketch)


def embedding_fits(m: nn.Embedding, idx: torch.Tensor, out: torch.Tensor) -> bool:
    return idx.dim() > 0 and out.shape[:-1] == idx.shape


def embedding_sq(m: nn.Embedding, idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    if idx.dim() == 0 or d.shape[:-1] != idx.shape or not _wants(m, "weight"):
        return None
    n = idx.shape[0]
    acc = _acc(d)
    idx, d = idx.reshape(n, -1), d.reshape(n, -1, d.shape[-1]).to(acc)
    if m.padding_idx is not None:  # the padding row gets no gradient
        d = d * (idx != m.padding_idx).unsqueeze(-1).to(d.dtype)
    t, width, rows = idx.shape[1], d.shape[2], m.num_embeddings
    if t == 1:
        return _sq(d)
    if rows < t * t // 2 and n * rows * width <= EMBEDDING_DIRECT_MAX:
        # the per-example gradients (N, rows, width), scattered from d, are cheaper than the (N, T, T) match
        # matrix and Gram form (charlm: 256 bytes or 64 positions vs T^2 = 4,096)
        g = d.new_zeros(n, rows, width).scatter_add_(1, idx.unsqueeze(-1).expand(n, t, width), d)
        return _sq(g)
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)
    return torch.dot(same.view(-1), torch.bmm(d, d.transpose(1, 2)).view(-1))


def tied_pairs(model: nn.Module, owners: dict[int, int], sketch: int = 0) -> dict[int, tuple[nn.Module, nn.Module]]:
    """Weights shared by exactly one Embedding (its table) and one Linear (its weight: the output head), both
    with a rule: weight id -> (embedding, head). Their per-example gradient is E_i + H_i, whose squared norm
    is the two rules' terms plus 2 <E_i, H_i> (`embedding_rows`, `head_rows`)."""
    users: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is not None and owners.get(id(w)) == 2 and isinstance(m, (nn.Embedding, nn.Linear)):
            users.setdefault(id(w), []).append(m)
    pairs = {}
    for pid, ms in users.items():
        emb = [m for m in ms if isinstance(m, nn.Embedding)]
        head = [m for m in ms if isinstance(m, nn.Linear)]
        if len(emb) == 1 and len(head) == 1 and rule_for(emb[0]) and rule_for(head[0], sketch):
            pairs[pid] = (emb[0], head[0])
    return pairs


def embedding_rows(m: nn.Embedding, idx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The tied Embedding's side of the cross term: its output gradient as (N, T, C), padding rows zeroed."""
    n = idx.shape[0]
    d = d.reshape(n, -1, d.shape[-1]).to(_acc(d))
    if m.padding_idx is not None:
        d = d * (idx.reshape(n, -1) != m.padding_idx).unsqueeze(-1).to(d.dtype)
    return d


def head_rows(idx: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    """The tied head's side: R_nt = sum_s d[n, s, idx_nt] a_ns, its per-example gradient's rows at the example's
    own token ids, (N, T, C), so that <E_n, H_n> = sum_t R_nt . e_nt. O(N S T C), never (N, V, C)."""
    n = idx.shape[0]
    if a.shape[0] != n or d.shape[0] != n or a.shape[:-1] != d.shape[:-1]:
        return None
    acc = _acc(d)
    idx = idx.reshape(n, -1)
    a, d = a.reshape(n, -1, a.shape[-1]).to(acc), d.reshape(n, -1, d.shape[-1]).to(acc)
    picked = torch.gather(d, 2, idx.unsqueeze(1).expand(n, d.shape[1], idx.shape[1]))  # (N, S, T): d[s, idx_t]
    return torch.bmm(picked.transpose(1, 2), a)


EMBEDDING_DIRECT_MAX = 1 << 24  # elements of the per-example embedding gradients formed at once (64 MiB)


def norm_fits(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> bool:
    return a.shape == out.shape and a.dim() > len(tuple(m.normalized_shape))


def _norm_sq(m: nn.Module, x_hat: torch.Tensor, d: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    k = len(shape)
    if x_hat.dim() - k < 1:
        return None
    dims = tuple(range(1, d.dim() - k))  # positions between the batch and the normalised dims
    total = None
    if _wants(m, "weight"):
        gw = (d * x_hat).sum(dims) if dims else d * x_hat
        total = _sq(gw)
    if _wants(m, "bias"):
        gb = d.sum(dims) if dims else d
        b = _sq(gb)
        total = b if total is None else total + b
    return total


def layer_norm_sq(m: nn.LayerNorm, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    shape = tuple(m.normalized_shape)
    if a.shape != d.shape or a.dim() <= len(shape):
        return None
    acc = _acc(d)
    x_hat = F.layer_norm(a.to(acc), shape, None, None, m.eps)
    return _norm_sq(m, x_hat, d.to(acc), shape)


def rms_norm_sq(m: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    shape = tuple(m.normalized_shape)
    if a.shape != d.shape or a.dim() <= len(shape):
        return None
    acc = _acc(d)
    x_hat = F.rms_norm(a.to(acc), shape, None, m.eps)
    return _norm_sq(m, x_hat, d.to(acc), shape)


_NORM_FORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (kind, eps) or None
_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (kind, eps) fitting the last call
_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm")
                                                                               else ())


def is_custom_norm(m: nn.Module) -> bool:
    """A candidate for `custom_norm_sq`: named *Norm*, not a torch norm class, its own parameters a 1-d weight
    and at most a bias of the same shape. Whether it really normalises is checked on its first output."""
    if "Norm" not in type(m).__name__ or isinstance(m, _TORCH_NORMS):
        return False
    params = m._parameters
    w, b = params.get("weight"), params.get("bias")
    return (w is not None and w.dim() == 1 and set(params) <= {"weight", "bias"}
            and (b is None or tuple(b.shape) == tuple(w.shape))
            and not any(True for c in m.children() for _ in c.parameters()))  # a sub-layer could change it later


def _norm_forms(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> list[tuple[str, float]]:
    """Every (kind, eps) with which out == s * x_hat(a) + b, s = w or 1 + w (Gemma), for layer or RMS
    normalisation over the last dim (none: the layer is not covered; both kinds: the input rows had mean
    ~0, where they agree)."""
    w, b = m._parameters["weight"], m._parameters.get("bias")
    if a.shape != out.shape or a.shape[-1:] != w.shape or not a.is_floating_point():
        return []
    found = []
    eps_attr = next((getattr(m, k) for k in ("variance_epsilon", "eps", "epsilon")
                     if isinstance(getattr(m, k, None), float)), None)
    half = out.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad():
        x, got, wf = a.detach().float(), out.detach().float(), w.detach().float()
        tol = 2e-2 if half else 1e-4
        for kind in ("rms", "layer"):
            for eps in dict.fromkeys(e for e in (eps_attr, 1e-5, 1e-6) if e is not None):
                shape = (w.shape[0],)
                x_hat = F.rms_norm(x, shape, None, eps) if kind == "rms" else F.layer_norm(x, shape, None, None, eps)
                for scale in (wf, wf + 1):
                    want = x_hat * scale + (b.detach().float() if b is not None else 0)
                    if torch.allclose(want, got, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1))):
                        found.append((kind, eps))
                        break
                if found and found[-1][0] == kind:
                    break
    return found


def custom_norm_fits(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> bool:
    form = _NORM_FORMS.get(m, _MISSING)
    if form is _MISSING:  # decided for good on the first call whose input tells the kinds apart
        forms = _norm_forms(m, a, out)
        form = forms[0] if forms else None
        if len(forms) < 2:
            _NORM_FORMS[m] = form
        else:  # both kinds fit this input (same x_hat here): measured with either, asked again next call
            _PENDING[m] = form
    elif form is None:
        return False
    return a.shape == out.shape and a.dim() > 1 and form is not None


def custom_norm_sq(m: nn.Module, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor | None:
    form = _NORM_FORMS.get(m) or _PENDING.get(m)
    if form is None or a.shape != d.shape or a.dim() < 2:
        return None
    kind, eps = form
    shape = (a.shape[-1],)
    acc = _acc(d)
    x = a.to(acc)
    x_hat = F.rms_norm(x, shape, None, eps) if kind == "rms" else F.layer_norm(x, shape, None, None, eps)
    return _norm_sq(m, x_hat, d.to(acc), shape)


def _conv_sq(m: nn.Module, a: torch.Tensor, d: torch.Tensor, two_d: bool, sketch: int = 0) -> torch.Tensor | None:
    if not two_d:  # Conv1d as a Conv2d of height 1
        a, d = a.unsqueeze(2), d.unsqueeze(2)
    k = m.kernel_size if two_d else (1, m.kernel_size[0])
    pad = m.padding if two_d else (0, m.padding[0])
    stride = m.stride if two_d else (1, m.stride[0])
    dil = m.dilation if two_d else (1, m.dilation[0])
    if a.dim() != 4 or d.dim() != 4 or isinstance(pad, str):
        return None
    cols = F.unfold(a.to(_acc(d)), k, dilation=dil, padding=pad, stride=stride)  # (N, C_in k k, L)
    n = a.shape[0]
    dd = d.reshape(n, d.shape[1], -1).to(cols.dtype)  # (N, C_out, L)
    if cols.shape[2] != dd.shape[2]:
        return None
    return _seq_sq(cols.transpose(1, 2), dd.transpose(1, 2), _wants(m, "bias"), _wants(m, "weight"), sketch)


def conv1d_sq(m: nn.Conv1d, a: torch.Tensor, d: torch.Tensor, sketch: int = 0) -> torch.Tensor | None:
    return _conv_sq(m, a, d, two_d=False, sketch=sketch)


def conv2d_sq(m: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, sketch: int = 0) -> torch.Tensor | None:
    return _conv_sq(m, a, d, two_d=True, sketch=sketch)


def conv_fits(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> bool:
    dims = 4 if isinstance(m, nn.Conv2d) else 3
    return a.dim() == dims and out.dim() == dims


def _always(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> bool:
    return True


_FITS = {linear_sq: linear_fits, embedding_sq: embedding_fits, layer_norm_sq: norm_fits, rms_norm_sq: norm_fits,
         conv1d_sq: conv_fits, conv2d_sq: conv_fits, custom_norm_sq: custom_norm_fits}
Fits = Callable[[nn.Module, torch.Tensor, torch.Tensor], bool]


def fits_for(rule: Rule) -> Fits:
    """The forward-time check of a rule (layer input and output shapes): a call that fails it is measured
    by micro-batches, decided before its backward, so its parameters can still get their hooks in time."""
    return _FITS.get(getattr(rule, "func", rule), _always)


def is_hf_conv1d(m: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2, GPT, ...), recognised without importing transformers: y = x W + b
    with W of shape (nx, nf), a Linear whose weight is stored transposed."""
    w = m._parameters.get("weight")
    return (type(m).__name__ == "Conv1D" and not isinstance(m, nn.Conv1d) and w is not None and w.dim() == 2
            and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None)))


_REGISTERED: dict[type, Rule] = {}


def register_rule(layer_type: type, rule: Rule, fits: Fits | None = None) -> None:
    """Cover a layer type of your own (or replace a built-in rule), before `GradientNoise` is built.

    rule(module, input, output_grad) -> sum over the batch (dim 0) of the squared norms of each example's
    gradient of the module's own parameters, as a 0-d tensor, or None when a call does not fit (that step
    then has no small batch for them). fits(module, input, output) -> bool runs in the forward; False makes
    the layer fall back to micro-batches for good. Subclasses are covered too. Test yours against
    torch.func (tests/test_gradient_noise.py shows how)."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_rule: layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not callable(rule) or (fits is not None and not callable(fits)):
        raise TypeError("register_rule: rule (and fits) must be callable")
    _REGISTERED[layer_type] = rule
    _FITS[rule] = fits or _always


def rule_for(m: nn.Module, sketch: int = 0) -> Rule | None:
    """The per-example rule for this layer type and configuration, or None (then: micro-batch fallback).
    sketch = k > 0: Linear on sequences and convolutions estimate their weights' part from k random
    projections per example where that is cheaper than the exact forms (`sketch_sq`). A rule registered
    for the layer's type (or a base class) comes first."""
    for cls in type(m).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    if sketch and (isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or is_hf_conv1d(m)):
        rule = rule_for(m)
        return None if rule is None else functools.partial(rule, sketch=sketch)
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        return linear_sq
    if isinstance(m, nn.Embedding):
        return None if m.sparse or m.scale_grad_by_freq or m.max_norm is not None else embedding_sq
    if isinstance(m, nn.LayerNorm):
        return layer_norm_sq if m.elementwise_affine else None
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return rms_norm_sq if m.elementwise_affine else None
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        ok = m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        if not ok:
            return None
        return conv2d_sq if isinstance(m, nn.Conv2d) else conv1d_sq
    if is_custom_norm(m):
        return custom_norm_sq
    return None
