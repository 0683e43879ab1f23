"""Resolve an adapter given as a local folder or a Hugging Face Hub repo id.

A repo id (``owner/name``) that is not a local folder is fetched with
``huggingface_hub.snapshot_download`` into the Hub cache; ``HF_HUB_OFFLINE=1`` uses the
cache only.
"""

from pathlib import Path

from .adapter import CONFIG_FILE, GAINS_FILE
from .errors import UserError


def resolve_adapter(spec) -> Path:
    """A local adapter folder for ``spec`` (a folder, or a Hub repo id)."""
    path = Path(spec)
    if path.exists() or str(spec).count("/") != 1 or str(spec).startswith((".", "/")):
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(spec), allow_patterns=[CONFIG_FILE, GAINS_FILE, "*.md"]))
    except ImportError:
        raise UserError(f"{spec} is not a local folder and huggingface_hub is not installed") from None
    except Exception as e:  # huggingface_hub raises many types for a missing repo/offline cache
        raise UserError(f"adapter {spec}: not a local folder and not found on the Hub or in its cache ({type(e).__name__})") from None
