"""A run's configuration, its validation, and the LR and batch-size schedules.

Everything is checked here, before a run is started, so bad input costs one clear line and leaves no
run row behind (`ConfigError`). Schedules are functions of the examples seen, so "epoch 10" means the
same thing whatever the batch size is.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

from trainer.tasks import TASKS

OPTIMIZERS = ("sgd", "adam", "adamw")
# per-example: per-example gradient norms (B_small = 1) for the layers with a rule, micro-batches for the
# rest; micro-batch: each micro-batch's norm (B_small = B/K; at K = 1 the batch is run as 2 micro-batches);
# auto: per-example at K = 1, micro-batch with --accum K >= 2 (a dot product per parameter and micro-batch,
# the cheapest; the online B_simple tracks as well with it on digits, tests/test_trainer_noise_tracking.py)
GNS_METHODS = ("auto", "per-example", "micro-batch")
# Budget when none is given: digits trains to a useful loss in a few seconds; the streams are cheap.
DEFAULT_BUDGET = {"digits": ("epochs", 30), "mnist": ("epochs", 2), "cifar10": ("epochs", 2),
                  "linreg": ("steps", 1000), "teacher": ("examples", 200_000), "charlm": ("steps", 1000)}
TARGET_BUDGET_FACTOR = 10  # with --target-loss and no budget, allow this many times the default
GNS_WINDOW_MEASUREMENTS = 50  # window of a fixed-EMA consumer (Adam's log), in measurements' worth of examples
# GNS_EVERY_WHY: every step by default. At K = 1 per-example gradient norms come from the layer inputs and
# output gradients in the same single pass (trainer/noise.py), and with --accum K >= 2 each micro-batch's
# norm is one dot product per parameter as autograd produces it, so measuring costs little (see
# bench/trainer.md). Measuring less often starves the online B_simple: it needs many measurements while
# the noise scale is large and must not reach far back while it grows (docs/DESIGN.md).


class ConfigError(ValueError):
    """Bad user input: reported as one line, exit code 2, before any run is written."""


@dataclass
class TrainConfig:
    """Every option of a run; stored as JSON in runs.config."""

    task: str = "digits"
    batch: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float | None = None  # None: 0 for sgd, 0.9 (beta1) for adam
    weight_decay: float = 0.0
    seed: int = 0
    steps: int | None = None
    examples: int | None = None
    epochs: float | None = None
    target_loss: float | None = None
    accum: int = 1
    lr_schedule: str = "constant"
    batch_schedule: str | None = None
    eval_every: int | None = None  # steps; None: about 20 evaluations per run
    device: str = "auto"
    name: str | None = None
    sweep: str | None = None
    db: str | None = None
    gns_every: int = 1  # measure the noise scale every N steps when accum == 1 (0: never); see GNS_EVERY_WHY
    gns_window: float | None = None  # examples: a fixed EMA for steps.b_simple; None: the tracking rule
    gns_method: str = "auto"  # or "per-example", "micro-batch"; see GNS_METHODS
    gns_sketch: int = 0  # k > 0: sequence Linear / conv weights' per-example norms from k random projections
    dim: int | None = None
    noise: float = 1.0
    data_dir: str | None = None
    clip_grad: float | None = None
    diverge_factor: float = 100.0  # also diverged: smoothed loss above this x the first loss (0: off)
    threads: int | None = None
    # --- charlm, AdamW, warm-up schedules and curvature (issue 13) ---
    context: int | None = None  # charlm characters per example (None: the task's default)
    layers: int | None = None
    width: int | None = None
    beta1: float | None = None  # adam/adamw; None: --momentum if given, else 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: str = "0.05"  # warmup-cosine / wsd: a fraction of the budget, or '2000ex', '1ep'
    curvature: bool = False  # sharpness and B_noise at every evaluation (trainer/curvature.py)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "extra"} | self.extra


@dataclass
class Schedule:
    """Piecewise-constant multipliers at milestones (in examples), or a cosine decay over `total`."""

    kind: str  # constant | steps | cosine | warmup-cosine | wsd
    factor: float = 1.0
    milestones: tuple[int, ...] = ()
    total: int | None = None
    warmup: int = 0  # examples of linear warm-up (warmup-cosine, wsd)
    decay: float = 0.0  # wsd: fraction of the budget spent in the final linear decay to 0

    def next_change(self, examples: int) -> float:
        """Examples count at which the multiplier next changes (so the loop need not ask every step)."""
        if self.kind in ("cosine", "warmup-cosine", "wsd"):
            return examples + 1
        if self.kind == "steps":
            return next((m for m in self.milestones if m > examples), math.inf)
        return math.inf

    def multiplier(self, examples: int) -> float:
        if self.kind in ("warmup-cosine", "wsd"):
            return warmup_multiplier(self.kind, examples, self.total, self.warmup, self.decay)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(examples / self.total, 1.0)))
        if self.kind == "steps":
            return self.factor ** sum(examples >= m for m in self.milestones)
        return 1.0


def warmup_multiplier(kind: str, examples: float, total: int, warmup: int, decay: float) -> float:
    """LR multiplier of the warm-up schedules, as a function of examples seen (batch-size independent).

    Both ramp linearly from 1/warmup-th of the peak to the peak over `warmup` examples (the step at
    examples = 0 must not have LR 0, or it would be wasted). warmup-cosine then follows a half cosine to 0
    at `total`; wsd (warm-up, stable, decay; Hu et al. 2024 "MiniCPM") holds the peak and decays linearly
    to 0 over the last `decay` fraction of the budget, so a run can be branched off the stable phase.
    """
    e = min(max(float(examples), 0.0), float(total))
    if warmup > 0 and e < warmup:
        return (e + 1.0) / (warmup + 1.0)
    if kind == "warmup-cosine":
        span = max(total - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((e - warmup) / span, 1.0)))
    start = total * (1.0 - decay)
    if e <= start or decay <= 0:
        return 1.0
    return max(0.0, (total - e) / (total - start))


def parse_warmup(spec: str, train_size: int | None, total: int) -> int:
    """--warmup as examples: a fraction of the budget ('0.05'), examples ('2000ex') or epochs ('1ep')."""
    text = str(spec).strip()
    try:
        if text.endswith("ex"):
            value = int(float(text[:-2]))
        elif text.endswith("ep"):
            if train_size is None:
                raise ConfigError(f"--warmup {spec!r}: a stream task has no epochs; use examples, e.g. 20000ex")
            value = int(round(float(text[:-2]) * train_size))
        else:
            frac = float(text)
            if not 0 <= frac < 1:
                raise ConfigError(f"--warmup {spec!r}: a fraction of the budget must be in [0, 1); "
                                  "use 2000ex for examples or 1ep for epochs")
            value = int(round(frac * total))
    except ValueError:
        raise ConfigError(f"--warmup {spec!r}: expected a fraction (0.05), examples (2000ex) or epochs (1ep)") from None
    if not 0 <= value < total:
        raise ConfigError(f"--warmup {spec!r} is {value} examples, not within the budget of {total}")
    return value


_MULT = re.compile(r"^x(?P<f>[0-9.eE+-]+)@(?P<m>[^@]+)$")


def parse_schedule(spec: str | None, what: str, train_size: int | None, total: int | None,
                   warmup: str = "0.05") -> Schedule:
    """Parse 'constant', 'cosine' or 'xF@M1,M2,...' (multiply by F at each milestone).

    Milestones are epochs ('10', '2.5ep') on a finite dataset, or examples with an 'ex' suffix
    ('50000ex'), the only unit a stream task has.
    """
    if spec is None or spec in ("", "constant", "none"):
        return Schedule("constant")
    if spec == "cosine":
        if what == "batch":
            raise ConfigError("--batch-schedule cosine makes no sense; use xF@M1,M2 (e.g. x5@10,20)")
        if total is None:
            raise ConfigError("--lr-schedule cosine needs a finite budget (--steps, --examples or --epochs)")
        return Schedule("cosine", total=total)
    if spec == "warmup-cosine" or spec == "wsd" or spec.startswith("wsd:"):
        if what == "batch":
            raise ConfigError(f"--batch-schedule {spec} makes no sense; use xF@M1,M2 (e.g. x5@10,20)")
        if total is None:
            raise ConfigError(f"--lr-schedule {spec} needs a finite budget (--steps, --examples or --epochs)")
        decay = 0.0
        if spec.startswith("wsd"):
            try:
                decay = float(spec[4:]) if spec.startswith("wsd:") else 0.2
            except ValueError:
                raise ConfigError(f"--lr-schedule {spec!r}: expected wsd or wsd:F with F the decay fraction") from None
            if not 0 < decay <= 1:
                raise ConfigError(f"--lr-schedule {spec!r}: the decay fraction must be in (0, 1]")
        return Schedule("wsd" if decay else "warmup-cosine", total=total,
                        warmup=parse_warmup(warmup, train_size, total), decay=decay)
    m = _MULT.match(spec)
    if not m:
        raise ConfigError(f"--{what}-schedule {spec!r}: expected constant, cosine, warmup-cosine, wsd[:F] or xF@M1,M2,... "
                          "(e.g. x0.1@10,20 for epochs 10 and 20, or x5@50000ex)")
    try:
        factor = float(m["f"])
    except ValueError:
        raise ConfigError(f"--{what}-schedule {spec!r}: bad factor {m['f']!r}") from None
    if not factor > 0:
        raise ConfigError(f"--{what}-schedule {spec!r}: the factor must be positive")
    milestones = []
    for tok in m["m"].split(","):
        tok = tok.strip()
        unit_ex = tok.endswith("ex")
        num = tok[:-2] if unit_ex else tok.removesuffix("ep")
        try:
            value = float(num)
        except ValueError:
            raise ConfigError(f"--{what}-schedule {spec!r}: bad milestone {tok!r}") from None
        if value <= 0:
            raise ConfigError(f"--{what}-schedule {spec!r}: milestones must be positive")
        if not unit_ex and train_size is None:
            raise ConfigError(f"--{what}-schedule {spec!r}: a stream task has no epochs; give milestones "
                              "in examples, e.g. x5@50000ex")
        milestones.append(int(value if unit_ex else round(value * train_size)))
    return Schedule("steps", factor=factor, milestones=tuple(sorted(milestones)))


def resolve_device(spec: str) -> torch.device:
    """'auto' is CUDA when present, else the CPU; an explicit device must exist."""
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use --device cpu or auto")
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: Apple MPS is not available on this machine")
        return dev
    raise ConfigError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def validate(cfg: TrainConfig, world: int = 1) -> None:
    """Check the options that need no data (world: DDP ranks); raises ConfigError with a one-line message."""
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose sgd, adam or adamw")
    if cfg.batch <= 0:
        raise ConfigError(f"--batch must be a positive integer, got {cfg.batch}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.accum <= 0:
        raise ConfigError(f"--accum must be a positive integer, got {cfg.accum}")
    if cfg.batch % cfg.accum:
        raise ConfigError(f"--batch {cfg.batch} is not divisible by --accum {cfg.accum} "
                          f"(each of the {cfg.accum} micro-batches must hold the same number of examples)")
    if world > 1 and cfg.batch % (world * cfg.accum):
        raise ConfigError(f"--batch {cfg.batch} (the global batch) is not divisible by {world} ranks x --accum "
                          f"{cfg.accum}: every rank's micro-batches must hold the same number of examples")
    if cfg.momentum is not None and not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    if sum(x is not None for x in (cfg.steps, cfg.examples, cfg.epochs)) > 1:
        raise ConfigError("give at most one of --steps, --examples, --epochs")
    for opt in ("steps", "examples", "epochs", "eval_every", "gns_window", "clip_grad", "threads", "dim"):
        value = getattr(cfg, opt)
        if value is not None and not value > 0:
            raise ConfigError(f"--{opt.replace('_', '-')} must be positive, got {value}")
    if cfg.gns_method not in GNS_METHODS:
        raise ConfigError(f"unknown --gns-method {cfg.gns_method!r}; choose {' or '.join(GNS_METHODS)}")
    if cfg.gns_sketch < 0:
        raise ConfigError(f"--gns-sketch must be >= 0 (0: exact per-example norms), got {cfg.gns_sketch}")
    if cfg.gns_every < 0:
        raise ConfigError(f"--gns-every must be >= 0 (0 turns measurement off at --accum 1), got {cfg.gns_every}")
    if not cfg.diverge_factor >= 0:
        raise ConfigError(f"--diverge-factor must be >= 0 (0 turns it off), got {cfg.diverge_factor}")
    if cfg.noise < 0:
        raise ConfigError(f"--noise must be >= 0, got {cfg.noise}")
    if cfg.target_loss is not None and not math.isfinite(cfg.target_loss):
        raise ConfigError("--target-loss must be a finite number")
    if cfg.name is not None and not cfg.name.strip():
        raise ConfigError("--name must not be empty")
    if cfg.task in ("linreg", "teacher") and cfg.epochs is not None:
        raise ConfigError(f"--task {cfg.task} is an infinite stream: use --steps or --examples, not --epochs")
    if cfg.task in ("mnist", "cifar10") and not cfg.data_dir:
        raise ConfigError(f"--task {cfg.task} needs --data-dir DIR with the standard {cfg.task} files")
    validate_lm_options(cfg)
    resolve_device(cfg.device)


def validate_lm_options(cfg: TrainConfig) -> None:
    """The charlm, Adam and curvature options (issue 13)."""
    for opt in ("context", "layers", "width"):
        value = getattr(cfg, opt)
        if value is not None and not value > 0:
            raise ConfigError(f"--{opt} must be a positive integer, got {value}")
        if value is not None and cfg.task != "charlm":
            raise ConfigError(f"--{opt} is an option of --task charlm only")
    for opt in ("beta1", "beta2"):
        value = getattr(cfg, opt)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"--{opt} must be in [0, 1), got {value}")
    if not cfg.eps > 0:
        raise ConfigError(f"--eps must be positive, got {cfg.eps}")
    if cfg.optimizer == "sgd" and (cfg.beta1 is not None or cfg.beta2 != 0.999 or cfg.eps != 1e-8):
        raise ConfigError("--beta1/--beta2/--eps are Adam options; add --optimizer adamw (or adam)")
    if cfg.beta1 is not None and cfg.momentum is not None and cfg.beta1 != cfg.momentum:
        raise ConfigError("--beta1 and --momentum both set Adam's beta1: give one of them")


def adam_betas(cfg: TrainConfig) -> tuple[float, float]:
    """(beta1, beta2) of an Adam run: --beta1, else --momentum, else 0.9."""
    beta1 = cfg.beta1 if cfg.beta1 is not None else (cfg.momentum if cfg.momentum is not None else 0.9)
    return beta1, cfg.beta2


@dataclass
class Plan:
    """The resolved run: budget in steps and/or examples, schedules, eval and GNS cadence."""

    max_steps: int | None
    max_examples: int | None
    lr: Schedule
    batch: Schedule
    eval_every: int
    gns_every: int  # 0: never; accumulation measures on every step
    gns_window: float

    def batch_at(self, base: int, examples: int, accum: int) -> int:
        b = max(accum, int(round(base * self.batch.multiplier(examples))))
        return b - b % accum

    def next_change(self, examples: int) -> float:
        """The loop recomputes batch size and LR only when `examples` reaches this."""
        return min(self.lr.next_change(examples), self.batch.next_change(examples))


def plan(cfg: TrainConfig, train_size: int | None, world: int = 1) -> Plan:
    """Resolve defaults that depend on the task (budget, eval cadence, GNS window) and check schedules
    (under DDP every batch must split into `world` ranks x --accum micro-batches)."""
    steps, examples = cfg.steps, cfg.examples
    if cfg.epochs is not None:
        examples = int(math.ceil(cfg.epochs * train_size))
    if steps is None and examples is None:
        unit, value = DEFAULT_BUDGET[cfg.task]
        value *= TARGET_BUDGET_FACTOR if cfg.target_loss is not None else 1
        if unit == "steps":
            steps = value
        else:
            examples = int(value * (train_size if unit == "epochs" else 1))
    total = examples if examples is not None else steps * cfg.batch
    lr_s = parse_schedule(cfg.lr_schedule, "lr", train_size, total, cfg.warmup)
    batch_s = parse_schedule(cfg.batch_schedule, "batch", train_size, total)
    if batch_s.kind == "steps":
        for k in range(len(batch_s.milestones) + 1):
            b = cfg.batch * batch_s.factor**k
            smallest = cfg.accum * world  # a step of 1 example is simply not measured
            if b < smallest or abs(b - round(b)) > 1e-9 or round(b) % smallest:
                what = f"--accum {cfg.accum}" + (f" x {world} ranks" if world > 1 else "")
                raise ConfigError(f"--batch-schedule {cfg.batch_schedule!r} gives batch {b:g}, which is not a whole "
                                  f"multiple of {what} (and at least {smallest})")
    approx_steps = steps if steps is not None else max(1, examples // cfg.batch)
    eval_every = cfg.eval_every or max(1, approx_steps // 20)
    gns_every = 1 if cfg.accum > 1 else cfg.gns_every
    window = cfg.gns_window or GNS_WINDOW_MEASUREMENTS * cfg.batch * max(gns_every, 1)
    return Plan(steps, examples, lr_s, batch_s, eval_every, gns_every, float(window))
