"""GGUF file -> mlx-lm model folder, and a cache of such conversions."""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np
from gguf import GGUFReader

from ..files import atomic_dir, remove, save_safetensors, temp_path
from ..progress import progress
from . import GGUFImportError
from .affine import GROUP_SIZE
from .config import arch_spec, gguf_config
from .tokenizer import write_tokenizer_files
from .weights import gguf_weights

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# A conversion's form: a float copy in a dtype, or "quantized-<dtype>": ggml's quantized
# matrices kept as MLX affine quantization (gguf/affine.py), scales, biases and float
# tensors in that dtype (the compute dtype: MLX then makes no copies of the scales).
FORMS = {**{name: (name, False) for name in DTYPES},
         **{f"quantized-{name}": (name, True) for name in ("float16", "float32")}}
MAX_SHARD_BYTES = 1 << 30  # a shard is held in memory until written: small keeps conversion peaks low


def open_gguf(path) -> GGUFReader:
    """Open a GGUF file read-only, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path, "r")
    except ValueError as e:
        raise GGUFImportError(f"{path} is not a readable GGUF file ({e})") from None


def _to_mlx(dtype: str):
    def cast(w):
        a = mx.array(w).astype(DTYPES[dtype])
        if dtype != "float32" and bool(mx.isinf(a).any()) and np.isfinite(w).all():
            raise GGUFImportError(f"the GGUF holds values beyond {dtype}'s range; convert to float32 "
                                  "(--dtype float32 / quantized-float32) instead")
        mx.eval(a)
        return a

    return cast


def _quantized(arrays, q_bits: Optional[int], q_group_size: int) -> Iterator[Tuple[str, mx.array]]:
    """Matrices (2-D ``*.weight`` whose input size the group size divides) as MLX affine
    quantized triples, the layers mlx-lm's own quantization picks; the rest unchanged."""
    for name, a in arrays:
        if q_bits and name.endswith(".weight") and a.ndim == 2 and a.shape[-1] % q_group_size == 0:
            wq, scales, biases = mx.quantize(a, group_size=q_group_size, bits=q_bits)
            mx.eval(wq, scales, biases)
            del a
            prefix = name[: -len("weight")]
            yield name, wq
            yield prefix + "scales", scales
            yield prefix + "biases", biases
        else:
            yield name, a


def _write_shards(out_dir: Path, arrays) -> None:
    """Write safetensors shards as the stream fills them; only one shard is ever held."""
    shards, shard, size, total = [], {}, 0, 0

    def flush():
        path = out_dir / f"shard-{len(shards):05d}.safetensors"
        save_safetensors(path, shard, metadata={"format": "mlx"})
        shards.append((path, list(shard)))

    for name, a in arrays:
        if shard and size + a.nbytes > MAX_SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[name] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    if len(shards) == 1:
        shards[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_form(form: str) -> None:
    if form not in FORMS:
        raise GGUFImportError(f"conversion form {form!r} is not one of {', '.join(FORMS)}")


def write_model(
    reader: GGUFReader,
    out_dir: Path,
    form: str = "float32",
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
) -> dict:
    """Write config.json and the safetensors weights of ``reader`` into ``out_dir``.

    ``q_bits`` requantizes a float form's matrices (lossy); a ``quantized-*`` form keeps
    the file's own quantization instead."""
    check_form(form)
    dtype, keep_quantization = FORMS[form]
    if keep_quantization and q_bits:
        raise GGUFImportError(f"form {form} keeps the GGUF's quantization: it cannot be requantized")
    config = gguf_config(reader)
    weights = gguf_weights(reader, config, arch_spec(reader), cast=_to_mlx(dtype), quantized=keep_quantization)
    stream = progress(weights, total=len(weights), desc="Converting tensors", unit="tensor")
    _write_shards(Path(out_dir), _quantized(stream, q_bits, q_group_size))
    if q_bits:
        quant = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        config["quantization"] = config["quantization_config"] = quant
    elif weights.quantization:
        config["quantization"] = config["quantization_config"] = layer_quantization(weights.quantization)
    config["torch_dtype"] = dtype
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def layer_quantization(bits_by_path: dict) -> dict:
    """mlx-lm's ``quantization`` config for per-layer bits at group size 32: the most
    common bits as the default, and every quantized module by path."""
    bits = max(set(bits_by_path.values()), key=list(bits_by_path.values()).count)
    config = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for path, b in sorted(bits_by_path.items()):
        config[path] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return config


def convert_gguf(
    gguf_path,
    out_dir,
    form: str = "float32",
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
) -> Path:
    """Convert a GGUF file into an mlx-lm model folder (weights, config, tokenizer).

    The folder is built next to ``out_dir`` and renamed into place only when
    complete; an existing non-empty ``out_dir`` is never touched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another --out")
    reader = open_gguf(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:  # .tmp-<pid>-<name>, removed on errors and by later runs
        write_model(reader, tmp, form, q_bits, q_group_size)
        write_tokenizer_files(reader, tmp)
    return out_dir


def cache_root() -> Path:
    root = os.environ.get("GAIN_MLX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "gain_mlx") / "gguf"


CONVERTER_SOURCES = ("affine.py", "config.py", "weights.py", "tokenizer.py", "convert.py")
COMPLETE_FILE = ".gain_mlx-complete.json"  # written last: a cache folder without it is never used


def _converter_fingerprint() -> str:
    """The converter's source and library versions: a changed converter converts anew."""
    here = Path(__file__).parent
    ident = b"".join((here / name).read_bytes() for name in CONVERTER_SOURCES)
    versions = "|".join(metadata.version(p) for p in ("gguf", "mlx", "mlx-lm", "tokenizers"))
    return hashlib.sha256(ident + versions.encode()).hexdigest()


def cache_key(gguf_path, form: str) -> str:
    """Folder name for a conversion: the file's resolved path, size, mtime and form
    (and the converter's fingerprint)."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    ident = f"{path}|{st.st_size}|{st.st_mtime_ns}|{form}|{_converter_fingerprint()}"
    return f"{path.stem}-{form}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _complete(out: Path) -> bool:
    return (out / COMPLETE_FILE).is_file() and (out / "config.json").is_file()


@contextmanager
def _cache_lock(lock_file: Path, gguf_path):
    """Hold an exclusive lock on ``lock_file`` (the kernel drops it if the holder dies):
    a second process converting the same file waits for the first, then uses its result."""
    try:
        import fcntl
    except ImportError:  # no flock: the rename in cached_convert still keeps results whole
        yield
        return
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[gain_mlx] waiting for another process converting {gguf_path} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            pass
        yield


def cached_convert(gguf_path, form: str = "float32") -> Path:
    """Return an mlx-lm folder for ``gguf_path`` in ``form`` (FORMS), converting it only
    on first use. The cache keeps one conversion per file and form: converting anew
    (the file or the converter changed) removes the older ones.

    A conversion is built in a temporary folder, marked complete (``COMPLETE_FILE``) and
    renamed into the cache in one step; only marked folders are served. A run killed
    mid-way leaves at most its temporary folder, which the next conversion removes;
    concurrent runs of the same file convert once (a lock) and never see a partial folder.
    """
    if not Path(gguf_path).is_file():
        raise GGUFImportError(f"GGUF file not found: {gguf_path}")
    check_form(form)
    root = cache_root()
    key = cache_key(gguf_path, form)
    out = root / key
    if not _complete(out):
        (root / "locks").mkdir(parents=True, exist_ok=True)  # lock files stay: removing one races
        with _cache_lock(root / "locks" / f"{key}.lock", gguf_path):
            if not _complete(out):
                _remove_stale(root, gguf_path, form, keep=key)
                _convert_into_cache(gguf_path, form, out)
                return out
    print(f"[gain_mlx] using cached conversion of {gguf_path}: {out}", file=sys.stderr)
    return out


def _record(folder: Path) -> dict:
    try:
        return json.loads((folder / COMPLETE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _remove_stale(root: Path, gguf_path, form: str, keep: str) -> None:
    """Remove the cached conversions that ``keep`` replaces (same file and form, older
    file or converter), and those whose GGUF file is gone."""
    source = str(Path(gguf_path).resolve())
    for folder in sorted(root.iterdir()):
        record = _record(folder)
        if folder.name == keep or not record:
            continue
        replaced = record.get("gguf") == source and record.get("form", record.get("dtype")) == form
        if replaced or not Path(record.get("gguf", "")).exists():
            print(f"[gain_mlx] removing stale cached conversion {folder}", file=sys.stderr)
            aside = temp_path(folder)
            os.rename(folder, aside)
            remove(aside)


def _convert_into_cache(gguf_path, form: str, out: Path) -> None:
    if os.path.lexists(out):  # unmarked: left by an older version or put there by hand
        print(f"[gain_mlx] removing incomplete cached conversion {out}", file=sys.stderr)
        aside = temp_path(out)
        os.rename(out, aside)
        remove(aside)
    print(f"[gain_mlx] converting {gguf_path} ({form}) -> {out}", file=sys.stderr)
    reader = open_gguf(gguf_path)
    st = Path(gguf_path).resolve().stat()
    record = {"gguf": str(Path(gguf_path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "form": form, "converter": _converter_fingerprint()}
    try:
        with atomic_dir(out) as tmp:  # the marker is inside the folder when it is renamed in
            write_model(reader, tmp, form)
            write_tokenizer_files(reader, tmp)
            (tmp / COMPLETE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    except OSError:  # without a lock, another process may have published the same conversion
        if not _complete(out):
            raise
