"""The device policy: every device-dependent choice of gain_mlx, made here and nowhere else.

Two policies. **gpu** (Metal, CUDA): the plain MLX path everywhere; a GGUF loads as its
quantized conversion and trains on quantized matmuls, as QLoRA does in mlx-lm; evaluation
computes its loss in chunks, so no full-vocabulary float32 logits of a whole batch ever
exist. **cpu** (MLX on a CPU, DESIGN.md section 6): an optimized BLAS preloaded (the CLI
re-executes itself once), steps and evaluations split into one micro-batch per core on
CPU streams, the one-exponential cross entropy for training and numpy's for evaluation,
and quantized bases computed through a float copy when one fits in memory (MLX's CPU
quantized and half-precision matmuls run at a few GFLOP/s).

``GAIN_MLX_POLICY=gpu|cpu`` forces a policy (default: from the device MLX runs on), so
the GPU path runs and is tested on a CPU too. The compute dtype, the dtype of every
float parameter of the model computed on, is a separate choice: float16 on a GPU,
float32 on a CPU, ``GAIN_MLX_DTYPE=float32|float16|bfloat16`` to override (the GPU
policy's tests here force float32: fp16 matmuls are ~100x slower on this CPU).
"""

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import cpu
from .errors import UsageError

ENV_POLICY = "GAIN_MLX_POLICY"
ENV_DTYPE = "GAIN_MLX_DTYPE"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# What each policy does. fast_blas: preload an optimized BLAS (Linux mlx[cpu] wheel).
# cpu_streams: one micro-batch per core, each on its own CPU stream. cpu_loss: the
# one-exponential cross entropy in training, numpy's in evaluation (else mlx's, in
# chunks). float_copies: compute on a float copy of a quantized base when it fits.
POLICIES = {
    "cpu": dict(fast_blas=True, cpu_streams=True, cpu_loss=True, float_copies=True, dtype="float32"),
    "gpu": dict(fast_blas=False, cpu_streams=False, cpu_loss=False, float_copies=False, dtype="float16"),
}

# A float copy is made only when it takes at most this share of the available memory:
# the rest is for activations, the optimizer, the tokenizer and the process itself.
MEMORY_SHARE = 0.7
# Evaluation under the gpu policy holds at most this many bytes of float32 logits at once.
LOGITS_BYTES = 256 << 20
# Scales' dtype of a quantized GGUF conversion per compute dtype: the compute dtype itself
# (MLX then keeps no cast copies of them); bf16 scales would round ggml's d*sc by ~2.5e-3.
QUANTIZED_SCALES = {"float32": "float32", "float16": "float16", "bfloat16": "float16"}


@dataclass(frozen=True)
class Policy:
    name: str  # "cpu" or "gpu"
    device: str  # what MLX computes on: "cpu", "gpu (Metal)", "gpu (CUDA)"
    dtype: str  # compute dtype, a key of DTYPES
    why: str  # how the name and dtype were chosen, for the policy line
    fast_blas: bool
    cpu_streams: bool
    cpu_loss: bool
    float_copies: bool

    @property
    def compute_dtype(self) -> mx.Dtype:
        return DTYPES[self.dtype]


def _device() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "gpu (Metal)"
    cuda = getattr(mx, "cuda", None)
    return "gpu (CUDA)" if cuda is not None and cuda.is_available() else "gpu"


@functools.lru_cache(maxsize=None)
def _build(forced: str, dtype: str, device: str) -> Policy:
    if forced and forced not in POLICIES:
        raise UsageError(f"{ENV_POLICY}={forced}: expected one of {', '.join(POLICIES)}")
    if dtype and dtype not in DTYPES:
        raise UsageError(f"{ENV_DTYPE}={dtype}: expected one of {', '.join(DTYPES)}")
    name = forced or device.split()[0]
    choices = dict(POLICIES[name])
    why = [f"{ENV_POLICY}={forced}" if forced else "", f"MLX on {device}",
           f"{dtype or choices['dtype']} compute" + (f" ({ENV_DTYPE})" if dtype else "")]
    choices["dtype"] = dtype or choices["dtype"]
    return Policy(name, device, why="; ".join(filter(None, why)), **choices)


def current() -> Policy:
    """The policy of this process, read from the environment and MLX's default device."""
    return _build(os.environ.get(ENV_POLICY, "").strip().lower(),
                  os.environ.get(ENV_DTYPE, "").strip().lower(), _device())


def start(fast_blas: bool = True) -> Policy:
    """First thing in every CLI's ``main()``: apply the policy to this process and say it
    in one line on stderr. Under the cpu policy this may re-execute the command once with
    an optimized BLAS preloaded (only when called from the program's ``__main__``)."""
    p = current()
    notes = [p.why]
    if p.cpu_streams:
        os.environ.setdefault(*cpu.BFS_WIDTH)  # read at the first evaluation: set it before any
    if p.fast_blas:
        from_main = sys._getframe(1).f_globals.get("__name__") == "__main__"
        notes.append(cpu.ensure_fast_blas(fast_blas, from_main))  # may not return (re-exec)
    else:
        notes.append("plain MLX path")
    print(f"[gain_mlx] policy: {p.name} ({'; '.join(filter(None, notes))})", file=sys.stderr, flush=True)
    return p


def step_parallelism(batch_size: int, cores=None) -> tuple:
    """``(micro_batches, blas_threads)`` of a training step or an evaluation batch: one
    micro-batch per core under the cpu policy (:func:`gain_mlx.cpu.step_parallelism`),
    ``(1, None)`` (no split, BLAS untouched) under the gpu policy."""
    if not current().cpu_streams:
        return 1, None
    return cpu.step_parallelism(batch_size, cores)


def logit_chunk(tokens_per_unit: int, vocab: int) -> int:
    """How many units (positions of a batch, or rows) of ``tokens_per_unit`` tokens each an
    evaluation takes at once, so that their float32 logits stay within ``LOGITS_BYTES``."""
    return max(1, LOGITS_BYTES // (4 * max(1, tokens_per_unit) * max(1, vocab)))


# ----------------------------------------------------------------------- memory and base form


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _cgroup_free():
    """Bytes left under this process's cgroup (v2) memory limit, or None without one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable (Linux, capped by a cgroup
    limit), else the machine's physical memory (macOS: unified memory)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free = int(fields["MemAvailable"].split()[0]) * 1024
        cgroup = _cgroup_free()
        return min(free, cgroup) if cgroup is not None else free
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_form(policy: str, float_bytes: int, available: int) -> tuple:
    """``(form, why)``: "float" or "quantized", the base a quantized model is computed on.

    gpu: quantized (MLX's quantized matmuls, as QLoRA). cpu: a float copy when it takes
    at most ``MEMORY_SHARE`` of the available memory, else quantized.
    """
    if not POLICIES[policy]["float_copies"]:
        return "quantized", f"{policy} policy: quantized matmuls, as QLoRA"
    need = f"{_gb(float_bytes)} as float against {_gb(available)} available"
    if float_bytes <= MEMORY_SHARE * available:
        return "float", f"{policy} policy: float matmuls are far faster on a CPU; {need}"
    return "quantized", f"{policy} policy, but a float copy does not fit ({need}): quantized matmuls, slow on a CPU"


def gguf_form(gguf_path) -> tuple:
    """``(form, why)``: the conversion form (``gguf.convert.FORMS``) a ``.gguf`` ``--model``
    loads as, by :func:`choose_form` on its parameter count x the compute dtype's size:
    the compute dtype ("float32" on a CPU), or "quantized-<QUANTIZED_SCALES dtype>"."""
    from .gguf.header import GGUFFile

    p = current()
    n = sum(t.n_elements for t in GGUFFile(gguf_path).tensors) if p.float_copies else 0
    kind, why = choose_form(p.name, p.compute_dtype.size * n, available_memory())
    return (p.dtype if kind == "float" else f"quantized-{QUANTIZED_SCALES[p.dtype]}"), why


def _float_size(model) -> int:
    """Parameters of ``model`` once every quantized layer is dequantized."""
    total = 0
    for _, layer in model.named_modules():
        if hasattr(layer, "scales") and hasattr(layer, "bits"):
            total += layer["weight"].size * 32 // layer.bits
        else:
            total += sum(v.size for v in layer.values() if isinstance(v, mx.array))
    return total


def is_quantized(model) -> bool:
    return any(hasattr(m, "scales") for _, m in model.named_modules())


def compute_model(model, dequantize: str = "auto") -> tuple:
    """``(model, note)``: the model to train or score on, its float parameters in the
    compute dtype (unless that copy does not fit in memory); ``model`` itself is not
    changed (arrays are shared where unchanged).

    A quantized ``model`` becomes a float copy (:func:`gain_mlx.cpu.dequantize_model`)
    when ``dequantize`` is "on", or "auto" and :func:`choose_form` says so; ``note``
    says which base and why (None for a float model that is cast, or left as it is).
    Gains trained on the copy fold into the original by the same module paths.
    """
    p = current()
    dtype, note = p.compute_dtype, None
    if is_quantized(model):
        if dequantize == "auto":
            form, why = choose_form(p.name, dtype.size * _float_size(model), available_memory())
        else:
            form, why = ("float" if dequantize == "on" else "quantized"), f"--dequantize {dequantize}"
        if form == "quantized":
            note = f"the quantized base ({why})"
        else:
            model = cpu.dequantize_model(model, dtype)
            note = f"a {p.dtype} copy of the quantized base ({why})"
    floats = (v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    need = sum(v.size for v in floats if v.dtype != dtype) * dtype.size
    available = available_memory()
    if need > MEMORY_SHARE * available:  # the cast copy is made beside the model
        kept = f"kept as stored: a {p.dtype} copy does not fit ({_gb(need)} against {_gb(available)} available)"
        return model, f"{note}; {kept}" if note else f"the model {kept}"
    model = cpu.copy_model(model)
    model.set_dtype(dtype)
    return model, note
