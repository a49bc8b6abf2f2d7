"""The charlm task's data and model: a small GPT-style decoder learning the bytes of Python's own sources.

Data: a fixed list of standard-library modules (found through `sysconfig`), so nothing is downloaded and
every install has the text. The split is by file: whole modules are held out for the test split, so the
test loss measures generalisation to unseen files rather than to unseen windows of seen files. The list
names modules present as plain .py files in every CPython from 3.10 on; a module missing on some
install is skipped, and if too few remain every top-level stdlib .py file is used instead (sorted, so
still deterministic). The bytes differ between Python versions, so `info` records the files and a digest.

Vocabulary: the 256 byte values (no tokenizer to ship or fit). Loss: mean cross-entropy per character,
in nats. An example is a window of `context` bytes with its next-byte targets; windows are cut without
overlap, so an epoch is one pass over the training text.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
# Plain modules (not packages) in CPython 3.10 to 3.13. Every fifth one (by position) is a test file.
FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "colorsys.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py",
    "inspect.py", "ipaddress.py", "keyword.py", "linecache.py", "locale.py", "mimetypes.py", "numbers.py",
    "operator.py", "optparse.py", "os.py", "pickle.py", "pprint.py", "queue.py", "random.py", "secrets.py",
    "selectors.py", "shlex.py", "shutil.py", "socket.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "types.py",
    "typing.py", "uuid.py", "warnings.py", "weakref.py",
)
TEST_EVERY = 5
MIN_FILES = 20  # fewer of FILES present than this: fall back to every top-level stdlib module
SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class CharCorpus:
    """The training and test bytes, and where they came from."""

    train: np.ndarray  # uint8
    test: np.ndarray  # uint8
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    source: str  # the stdlib folder
    digest: str  # sha256 of both texts (prefix): runs on different Pythons differ here

    def unigram_entropy(self) -> float:
        """Entropy (nats per character) of the training text's byte frequencies: the loss to beat."""
        counts = np.bincount(self.train, minlength=VOCAB).astype(float)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def split_files(names: list[str]) -> tuple[list[str], list[str]]:
    """Train/test split by file: every TEST_EVERY-th name (1-based) of the given order is a test file."""
    test = [n for i, n in enumerate(names) if (i + 1) % TEST_EVERY == 0]
    return [n for n in names if n not in test], test


def load_corpus(stdlib: str | Path | None = None) -> CharCorpus:
    """Read the fixed file list from the standard library (or the fallback list); no network."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    names = [n for n in FILES if (root / n).is_file()]
    if len(names) < MIN_FILES:
        names = sorted(p.name for p in root.glob("*.py") if p.is_file())
    if len(names) < 2 * TEST_EVERY:
        raise ValueError(f"charlm needs Python source files; found only {len(names)} .py files in {root}")
    train_names, test_names = split_files(names)

    def read(files: list[str]) -> np.ndarray:
        raw = SEPARATOR.join((root / n).read_bytes() for n in files)
        return np.frombuffer(raw, dtype=np.uint8).copy()

    train, test = read(train_names), read(test_names)
    digest = hashlib.sha256(train.tobytes() + b"\0" + test.tobytes()).hexdigest()[:16]
    return CharCorpus(train, test, tuple(train_names), tuple(test_names), str(root), digest)


def windows(data: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, next-byte target) windows, shape (n, context) uint8 each."""
    n = (len(data) - 1) // context
    if n < 1:
        raise ValueError(f"text of {len(data)} bytes is shorter than one window of {context}")
    t = torch.from_numpy(data[: n * context + 1].astype(np.uint8))
    return t[:-1].reshape(n, context).clone(), t[1:].reshape(n, context).clone()


def char_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per character in nats (every window has the same length, so this is also the
    mean over examples of each window's mean: the noise-scale estimators see i.i.d. examples)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long())


class SelfAttention(nn.Module):
    """Causal multi-head self-attention from two nn.Linear layers around scaled_dot_product_attention.

    Plain Linear layers (not nn.MultiheadAttention's fused parameter) so per-example-norm hooks on
    Linear modules cover attention too.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"--width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Token embedding + learned positions, `layers` blocks, final LayerNorm and a linear head (untied).

    Every layer is an nn.Linear, nn.Embedding or nn.LayerNorm with its own parameters, so GradientNoise
    measures all of them by per-example norms (no micro-batch split; tests/test_charlm.py checks it).
    """

    def __init__(self, context: int, layers: int, width: int, heads: int, vocab: int = VOCAB):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual projections scaled
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape
        if t > self.context:
            raise ValueError(f"input of {t} characters is longer than the context {self.context}")
        # positions as (N, T) ids, like the tokens (an expand: no copy): the per-example-norm rule of
        # nn.Embedding then covers them, where a (T,) lookup broadcast over the batch would need a split
        h = self.tok(x.long()) + self.pos(self.positions[:t].expand(n, t))
        return self.head(self.ln_f(self.blocks(h)))


def heads_for(width: int) -> int:
    """Heads of width 32 (at least one): 128 -> 4 heads, 64 -> 2."""
    return max(1, width // 32) if width % 32 == 0 else 1
