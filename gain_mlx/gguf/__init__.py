"""GGUF support: import (weights, config, tokenizer) and in-place export."""

from ..errors import UserError


class GGUFImportError(UserError, ValueError):
    """A GGUF file that cannot be imported (unsupported architecture, type or layout)."""


class ExportError(UserError, ValueError):
    """A one-line problem with the inputs of an export."""
