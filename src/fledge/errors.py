"""User-facing errors.

Every failure a user can cause (a bad recipe, a missing file, a malformed row) raises a
`FledgeError` subclass whose message says what went wrong, where, and what to do next.
The CLI prints the message without a traceback and exits non-zero (`--debug` shows it).
"""

from __future__ import annotations


class FledgeError(Exception):
    """Base class: the message is shown to the user as it is."""

    exit_code = 1


class RecipeError(FledgeError):
    """A recipe key has a bad value, is unknown, or contradicts another key."""

    exit_code = 2


class DataError(FledgeError):
    """Input data is missing or malformed. Carries the file and line (or byte offset)."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 offset: int | None = None):
        self.path, self.line, self.offset = path, line, offset
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            elif offset is not None:
                where += f" (byte {offset})"
            where += ": "
        super().__init__(where + message)


class CheckpointError(FledgeError):
    """A checkpoint is missing, incomplete, or belongs to another recipe."""


class StorageError(FledgeError):
    """The file system refused a write or read: disk full, read-only, a folder where a file belongs."""


class TokenizerError(FledgeError):
    """A tokenizer file is missing, unreadable, or does not match the data or checkpoint."""


class DependencyError(FledgeError):
    """An optional package a feature needs is not installed; the message names the pip command."""


class InternalError(FledgeError):
    """A bug in fledge rather than in the input: the message says where to report it."""

    exit_code = 70


class TemplateError(FledgeError):
    """A chat template cannot render trainable or promptable conversations with this tokenizer."""


class ExportError(FledgeError):
    """A model cannot be exported in the format asked (an architecture llama.cpp cannot load, an
    unknown quantization), or the export does not behave like the trained model."""
