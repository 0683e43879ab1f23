"""GGUF support: import (weights, config, tokenizer) and in-place export."""


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported (unsupported architecture, type or layout)."""
