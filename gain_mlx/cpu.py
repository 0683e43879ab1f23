"""CPU mechanics: an optimized BLAS for MLX on Linux, CPU streams, float copies of quantized
models. Whether to use any of them is decided by :mod:`gain_mlx.policy`.

The Linux ``mlx[cpu]`` wheel links the netlib reference BLAS (``mlx_cpu.libs/libblas-*.so``),
20-40x slower than an optimized one. ``LD_PRELOAD`` of a library that exports the standard
``cblas_sgemm`` / ``sgemm_`` symbols replaces it, but only if set before the process starts,
so :func:`ensure_fast_blas` re-executes the running CLI once with ``LD_PRELOAD`` set.

Quantized matmuls do not use BLAS at all on CPU; :func:`dequantize_model` gives a float
copy to train on (gains are still folded into the original quantized model afterwards).

Threads: MLX runs each CPU op on one thread (its stream's), so a multithreaded BLAS
leaves all cores but one idle outside matmuls (softmax, activations, norms, the loss:
half of a training step's time on 2 cores). :func:`step_parallelism` splits a training
batch into one micro-batch per core, each on its own CPU stream with a single-threaded
BLAS (:func:`blas_threads`), so every core works all the time.
"""

import contextlib
import copy
import ctypes
import functools
import glob
import os
import platform
import sys
import sysconfig
from importlib.util import find_spec

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

ENV_SWITCH = "GAIN_MLX_FAST_BLAS"  # "0" turns the fast path off
ENV_GUARD = "GAIN_MLX_FAST_BLAS_EXEC"  # set in the re-executed process
# MLX orders an evaluation breadth-first, at most this many arrays wide (its default is
# 20). Wider lets the micro-batches of a split training step (step_parallelism) run side
# by side on their streams instead of mostly one after the other. Read once, at the
# first evaluation of the process: set by policy.start, first thing in every CLI.
BFS_WIDTH = ("MLX_BFS_MAX_WIDTH", "200")
INSTALL_HINT = "pip install mkl (no root needed; gain-mlx installs it on Linux x86-64), or apt-get install libopenblas0-pthread"

# Optimized BLAS libraries exporting the standard symbols, best first. Each entry is a
# glob; "{arch}" is the Debian multiarch triple, "{site}" the site-packages folder and
# "{prefix}" sys.prefix (pip wheels installing under the environment).
CANDIDATES = (
    ("OpenBLAS (system)", "/usr/lib/{arch}/openblas-pthread/libblas.so.3"),
    ("OpenBLAS (system)", "/usr/lib/{arch}/openblas-pthread/libopenblas.so.0"),
    ("OpenBLAS (system)", "/usr/lib/{arch}/libopenblas.so.0"),
    ("OpenBLAS (system)", "/usr/lib64/libopenblasp.so.0"),
    ("OpenBLAS (system)", "/usr/lib64/libopenblas.so.0"),
    ("OpenBLAS (pip cmeel-openblas)", "{site}/cmeel.prefix/lib/libopenblas.so.0"),
    ("MKL (pip mkl)", "{prefix}/lib/libmkl_rt.so.[0-9]*"),
)


def stock_blas():
    """Path of the reference BLAS shipped in the mlx[cpu] wheel, or None."""
    spec = find_spec("mlx")
    if sys.platform != "linux" or spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    found = sorted(glob.glob(os.path.join(site, "mlx_cpu.libs", "libblas-*.so*")))
    return found[0] if found else None


def _exports_cblas(path):
    try:
        return hasattr(ctypes.CDLL(path), "cblas_sgemm")
    except OSError:  # missing dependency (e.g. libgfortran5) or wrong architecture
        return False


def blas_candidates():
    """(name, path) of every optimized BLAS installed here, best first (loadable or not)."""
    fields = {
        "arch": sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu",
        "site": sysconfig.get_paths()["purelib"],
        "prefix": sys.prefix,
    }
    for name, pattern in CANDIDATES:
        for path in sorted(glob.glob(pattern.format(**fields))):
            yield name, path


def find_fast_blas():
    """(name, path) of the first usable optimized BLAS on this machine, or None."""
    return next(((n, p) for n, p in blas_candidates() if _exports_cblas(p)), None)


def preloaded_blas():
    """Path of a BLAS preloaded into this process (``LD_PRELOAD``), or None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    preload = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    mapped = (p for p in preload if os.path.realpath(p) in maps or p in maps)
    return next((p for p in mapped if _exports_cblas(p)), None)


def add_fast_blas_argument(parser):
    """Add ``--no-fast-blas`` to a CLI's argparse parser (dest ``fast_blas``)."""
    parser.add_argument(
        "--no-fast-blas",
        dest="fast_blas",
        action="store_false",
        help=f"Linux CPU: keep mlx's reference BLAS instead of preloading an optimized "
        f"one (same as {ENV_SWITCH}=0)",
    )


def ensure_fast_blas(enabled: bool, from_main: bool):
    """Make MLX on a Linux CPU use an optimized BLAS; returns what the matmuls use, for the
    policy line (:func:`gain_mlx.policy.start`, which decides whether to call this).

    Re-executes the running command once (``sys.orig_argv``) with ``LD_PRELOAD`` set when
    an optimized BLAS is installed. Does nothing off Linux, without the stock mlx[cpu]
    BLAS, or unless ``from_main`` (the caller is the program's ``__main__``, not a test
    or a library user), so it never replaces a process that did not ask for it.
    """
    if stock_blas() is None:
        return None
    if os.environ.get(ENV_GUARD):
        if path := preloaded_blas():
            return f"MLX CPU matmuls use {path} ({ENV_SWITCH}=0 or --no-fast-blas: off)"
        return "preloading the optimized BLAS failed; MLX uses its slow reference BLAS"
    if not enabled or os.environ.get(ENV_SWITCH) == "0":
        return "fast BLAS off: MLX CPU matmuls use the slow reference BLAS"
    if path := preloaded_blas():
        return f"MLX CPU matmuls use {path} (preloaded)"
    found = find_fast_blas()
    if found is None:
        return f"MLX CPU training is 20-40x faster with an optimized BLAS: {INSTALL_HINT}"
    if not from_main:
        return None
    env = dict(os.environ, **{ENV_GUARD: "1"})
    env["LD_PRELOAD"] = " ".join(filter(None, [found[1], os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _blas_library():
    """ctypes handle of the BLAS MLX's matmuls call (the preloaded one), or None."""
    path = preloaded_blas()
    return ctypes.CDLL(path) if path else None


# (get, set) thread-count functions of the BLAS libraries that have them
_THREAD_API = (
    ("openblas_get_num_threads", "openblas_set_num_threads"),
    ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
)


@functools.lru_cache(maxsize=None)
def _thread_api():
    lib = _blas_library()
    for get, put in _THREAD_API:
        if lib is not None and hasattr(lib, get) and hasattr(lib, put):
            return getattr(lib, get), getattr(lib, put)
    return None


@contextlib.contextmanager
def blas_threads(n):
    """Run the block with the BLAS using ``n`` threads (OpenBLAS or MKL); no-op for None,
    or where the BLAS has no thread setting (the stock reference BLAS has one thread)."""
    api = _thread_api() if n else None
    if api is None:
        yield
        return
    get, put = api
    old = get()
    put(n)
    try:
        yield
    finally:
        put(old)


def cpu_cores():
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def step_parallelism(batch_size, cores=None):
    """``(micro_batches, blas_threads)`` for a training step on this machine's CPU: one
    micro-batch per core (at most one sequence each), each with ``cores // micro_batches``
    BLAS threads; ``(1, None)`` (no split, BLAS untouched) with one core or for a batch
    of one. Whether to split at all is the policy's choice (:mod:`gain_mlx.policy`).
    """
    cores = cores or cpu_cores()
    if cores < 2 or batch_size < 2:
        return 1, None
    n = min(cores, batch_size)
    return n, max(1, cores // n)


@functools.lru_cache(maxsize=None)
def streams(n) -> tuple:
    """``n`` CPU streams for micro-batches side by side (none for ``n <= 1``), made once per
    process: MLX gives each stream its own thread and never frees it."""
    return tuple(mx.new_stream(mx.cpu) for _ in range(n)) if n > 1 else ()


def copy_model(value):
    """A copy of a model's module structure sharing its arrays (no weight memory).

    Wrapping or replacing layers in the copy (gains, LoRA, float layers) leaves the
    original untouched; MLX arrays are never changed in place, so sharing them is safe.
    """
    if isinstance(value, nn.Module):
        new = copy.copy(value)
        object.__setattr__(new, "_no_grad", set(value._no_grad))
        for key, child in value.items():
            dict.__setitem__(new, key, copy_model(child))
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(copy_model(v) for v in value)
    if isinstance(value, dict):
        return {k: copy_model(v) for k, v in value.items()}
    return value


def dequantized_weight(layer, dtype=mx.float32):
    """A quantized layer's weight in ``dtype``, ``(out, in)`` or ``(E, out, in)``."""
    # mx.dequantize computes in the scales' dtype: lift float scales to the target dtype
    # first, or bf16 scales would round the float32 copy (E8M0 uint8 scales stay as they are).
    scales, biases = layer["scales"], layer.get("biases")
    if mx.issubdtype(scales.dtype, mx.floating):
        scales = scales.astype(dtype)
        biases = biases.astype(dtype) if biases is not None else None
    return mx.dequantize(
        layer["weight"],
        scales,
        biases,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        global_scale=layer.get("global_scale"),
        dtype=dtype,
    )


def _float_linear(layer, dtype):
    out_dims = layer["weight"].shape[0]
    new = nn.Linear(1, out_dims, bias="bias" in layer)
    new.weight = dequantized_weight(layer, dtype)
    return new


def _float_switch_linear(layer, dtype):
    new = SwitchLinear(1, layer.output_dims, layer.num_experts, bias="bias" in layer)
    new.weight = dequantized_weight(layer, dtype)
    return new


def _float_embedding(layer, dtype):
    new = nn.Embedding(1, 1)
    new.weight = dequantized_weight(layer, dtype)
    return new


# quantized layer type -> builder of the float layer holding the dequantized weight
FLOAT_LAYERS = (
    (QuantizedSwitchLinear, _float_switch_linear),
    (nn.QuantizedLinear, _float_linear),
    (nn.QuantizedEmbedding, _float_embedding),
)


def dequantize_model(model, dtype=mx.float32):
    """A copy of ``model`` whose quantized layers are float layers (dequantized once).

    On CPU, quantized and half-precision matmuls bypass BLAS and run at a few GFLOP/s;
    the float32 copy trains many times faster. ``model`` is not changed: train gains on
    the copy, then fold them into the original quantized model (same module paths).
    Layer biases are kept as they are; new layers are frozen like the quantized ones.
    """
    new = copy_model(model)
    replaced = []
    for path, layer in new.named_modules():
        for qtype, build in FLOAT_LAYERS:
            if isinstance(layer, qtype):
                float_layer = build(layer, dtype)
                if "bias" in float_layer:
                    float_layer.bias = layer["bias"]
                float_layer.freeze()
                replaced.append((path, float_layer))
                break
    if replaced:
        new.update_modules(tree_unflatten(replaced))
        mx.eval(new.parameters())
    return new
