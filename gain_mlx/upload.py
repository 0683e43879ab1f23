"""python -m gain_mlx.upload: push a gain adapter or a fused model to the Hugging Face Hub,
with a generated model card.

``--path`` is an adapter folder (``gain_config.json`` + ``gains.safetensors``) or a model
folder written by ``gain_mlx.fuse`` (``config.json`` + weights, ``fold_plan.json``). The
card (README.md) names the base model, the variant, the training data and metrics
(``history.json``, ``trainer_state.json`` when present), the fold plan, and how to run
it in mlx-lm and llama.cpp. ``--dry-run`` writes the folder as it would be uploaded
(card included) to ``--out`` and sends nothing. The folder given is never modified.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError, UserError, cli
from .provenance import adapter_card, fused_card

ADAPTER_FILES = ("gain_config.json", "gains.safetensors", "history.json", "history.png", "trainer_state.json")
SKIPPED = (".tmp-", ".")


def detect(path: Path) -> str:
    """``"adapter"`` or ``"fused"`` (any mlx-lm model folder), else a ``UserError``."""
    if not path.is_dir():
        raise UserError(f"--path {path}: not a folder (an adapter folder or a fused model folder)")
    if (path / "gain_config.json").is_file():
        if not (path / "gains.safetensors").is_file():
            raise UserError(f"--path {path}: gain_config.json without gains.safetensors: re-save the adapter")
        return "adapter"
    if (path / "config.json").is_file() and (list(path.glob("*.safetensors")) or list(path.glob("*.gguf"))):
        return "fused"
    raise UserError(f"--path {path}: neither an adapter folder (gain_config.json) nor a model folder (config.json + weights)")


def stage(path: Path, kind: str, card: str, out: Path) -> Path:
    """The folder as uploaded: ``path``'s files (temporary files left out) and the card."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name.startswith(SKIPPED) or f.name == "README.md":
            continue
        if kind == "adapter" and f.name not in ADAPTER_FILES and f.suffix not in (".json", ".md", ".png"):
            continue
        shutil.copy2(f, out / f.name)
    (out / "README.md").write_text(card)
    return out


def upload(folder: Path, repo_id: str, private: bool = False, token=None, message=None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=message or "Upload with gain_mlx.upload")
    return str(getattr(info, "commit_url", info))


def _saved_token():
    """HF_TOKEN or the saved login, read locally (no request)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise UserError("huggingface_hub is not installed: pip install huggingface-hub") from None
    return get_token()


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.upload", description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="adapter folder or fused model folder")
    p.add_argument("--repo-id", required=True, help="Hub repo to create or update: user/name")
    p.add_argument("--base-model", help="the base's Hub id for the card (default: from the adapter or fold plan)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="write the upload folder to --out; send nothing")
    p.add_argument("--out", help="with --dry-run: where to write it (default: a new temporary folder)")
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        raise UsageError(f"--repo-id {args.repo_id}: expected user/name")
    if args.out and not args.dry_run:
        raise UsageError("--out goes with --dry-run")
    path = Path(args.path)
    kind = detect(path)
    card = (adapter_card if kind == "adapter" else fused_card)(path, args.repo_id, args.base_model)
    if args.dry_run:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gain_upload-"))
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty: choose a new folder")
        stage(path, kind, card, out)
        print(f"dry run: {kind} folder for {args.repo_id} written to {out} (card: {out / 'README.md'}); nothing sent")
        return out
    token = args.token or _saved_token()
    if not token:
        raise UserError("no Hub token: pass --token, set HF_TOKEN or run 'hf auth login' (nothing was sent)")
    with tempfile.TemporaryDirectory(prefix="gain_upload-") as tmp:
        folder = stage(path, kind, card, Path(tmp))
        try:
            url = upload(folder, args.repo_id, args.private, token, args.message)
        except ImportError:
            raise UserError("huggingface_hub is not installed: pip install huggingface-hub") from None
        except Exception as e:  # huggingface_hub's HTTP/auth errors
            raise UserError(f"upload to {args.repo_id} failed: {type(e).__name__}: {e}") from None
    print(f"uploaded {kind} {path} to {args.repo_id}: {url}")
    return url


if __name__ == "__main__":
    main()
