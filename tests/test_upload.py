"""gain_mlx.upload: the model card and the upload folder, up to the huggingface_hub call
(HfApi is replaced: no Hub is reachable here)."""

import json

import pytest

from test_serve import make_adapter


class FakeApi:
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeApi.calls.append(("upload_folder", repo_id, files, kw))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")  # upload refuses to start without a token
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


@pytest.fixture
def adapter(tmp_path, tiny_model_dir):
    from mlx_lm import load

    path = make_adapter(tmp_path / "legal", lambda: load(str(tiny_model_dir))[0], "gain-ffn", 3, tie_kv=True)
    cfg = json.loads((path / "gain_config.json").read_text())
    cfg["base_model"] = "someone/tiny-llama"
    (path / "gain_config.json").write_text(json.dumps(cfg))
    history = {"base": {"val_ppl": 40.0, "retain_ppl": 30.0}, "retain_budget_pct": 5, "keep": "best", "kept_step": 20,
               "history": [{"step": 10, "val_ppl": 35.0, "val_change": -0.125},
                           {"step": 20, "val_ppl": 30.0, "val_change": -0.25, "retain_ppl": 30.6, "retain_change": 0.02}]}
    (path / "history.json").write_text(json.dumps(history))
    (path / ".tmp-123-gains.safetensors").write_text("partial")
    return path


def test_adapter_card_and_upload(adapter, fake_hub, capsys):
    from gain_mlx import upload

    url = upload.main(["--path", str(adapter), "--repo-id", "me/legal-gain", "--private"])
    assert url.endswith("/me/legal-gain/commit/1")
    (c1, repo, kw), (c2, repo2, files, kw2) = fake_hub.calls
    assert (c1, repo, kw["private"], kw["exist_ok"]) == ("create_repo", "me/legal-gain", True, True)
    assert (c2, repo2) == ("upload_folder", "me/legal-gain")
    assert set(files) == {"gain_config.json", "gains.safetensors", "history.json", "README.md"}
    assert files["gains.safetensors"] == (adapter / "gains.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: mlx\n") and "base_model: someone/tiny-llama\n" in card
    for want in ("`gain-ffn`", "attention gains tied per KV head", "30.00 (-25.0%)", "30.60 (+2.0%)", "| base | 0 | 40.00",
                 "rows of `mlp.up_proj`", "mlx_lm.generate", "llama-cli -m adapted.gguf",
                 "python -m gain_mlx.serve --model someone/tiny-llama --adapters mine=me/legal-gain"):
        assert want in card, want
    assert not (adapter / "README.md").exists()  # the folder given is not modified


def test_fused_card_dry_run(adapter, tiny_model_dir, tmp_path, fake_hub, capsys):
    from gain_mlx import upload
    from gain_mlx.fuse import fuse

    fused = tmp_path / "fused"
    fuse(str(tiny_model_dir), adapter, fused, verbose=False)
    out = upload.main(["--path", str(fused), "--repo-id", "me/legal-fused", "--dry-run", "--out", str(tmp_path / "up"),
                       "--base-model", "someone/tiny-llama"])
    assert fake_hub.calls == []  # nothing sent
    assert "nothing sent" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card and "| float |" in card and "mlx_lm.generate --model me/legal-fused" in card
    assert "30.00 (-25.0%)" in card  # the adapter's metrics, found through the fold plan
    assert {"config.json", "model.safetensors", "fold_plan.json", "README.md"} <= {p.name for p in out.iterdir()}


def test_upload_refusals(adapter, tmp_path, fake_hub, capsys, monkeypatch):
    from gain_mlx import upload

    for argv, code, msg in [
        (["--path", str(tmp_path / "none"), "--repo-id", "me/x"], 1, "not a folder"),
        (["--path", str(tmp_path), "--repo-id", "me/x"], 1, "neither an adapter folder"),
        (["--path", str(adapter), "--repo-id", "no-slash"], 2, "expected user/name"),
        (["--path", str(adapter), "--repo-id", "me/x", "--out", str(tmp_path / "o")], 2, "--dry-run"),
    ]:
        with pytest.raises(SystemExit) as e:
            upload.main(argv)
        assert e.value.code == code and msg in capsys.readouterr().err, argv

    def refuse(self, *a, **k):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(FakeApi, "create_repo", refuse)
    with pytest.raises(SystemExit) as e:
        upload.main(["--path", str(adapter), "--repo-id", "me/x"])
    assert e.value.code == 1 and "upload to me/x failed: RuntimeError: 401" in capsys.readouterr().err
