"""The one error root of mcpl, and the exit code each kind of error means on the command line.

Every error a user can cause or fix (bad input, a model that does not load, an unreachable
MLflow) is an `MCPLError`; the CLI prints its message without a traceback and exits with
its `exit_code`. Anything else reaching the CLI is a bug and keeps its traceback.
Subclasses also derive from the built-in they replaced (ValueError, RuntimeError), so
callers that caught those keep working.
"""

from __future__ import annotations

# Exit codes of every `mcpl` command (docs/ARCHITECTURE.md):
EXIT_OK = 0
EXIT_PARTIAL = 1  # the command ran, but some rows were rejected or some jobs failed
EXIT_USAGE = 2  # bad arguments or unusable input: nothing was done
EXIT_UNAVAILABLE = 3  # a service (MLflow) could not be reached
EXIT_INTERRUPTED = 130


class MCPLError(Exception):
    """Root of every error mcpl raises on purpose; the message says what to do."""

    exit_code = EXIT_USAGE


class ConfigError(MCPLError, ValueError):
    """A training setting is unknown or out of its documented bounds."""


class SentenceError(MCPLError, ValueError):
    """A concept sentence that cannot be used, with the reason in the message."""


class DatasetError(MCPLError, ValueError):
    """The dataset as a whole cannot be read (no table, unreadable table, no rows)."""


class FileCheckError(MCPLError, ValueError):
    """A file of the dataset cannot be used; the message says why and what to do."""


class StaleInputError(DatasetError):
    """An image changed after validation: its pixels no longer match the manifest."""


class ModelLoadError(MCPLError, RuntimeError):
    """The base model cannot be loaded; the message says what is missing and what to do."""


class BundleError(MCPLError, RuntimeError):
    """A job folder is missing, incomplete, tampered with or belongs to another job."""


class RegistryError(MCPLError, ValueError):
    """A registry request that cannot be served (unknown concept, clashing token, bad path)."""


class TrackingUnavailable(MCPLError, RuntimeError):
    """MLflow cannot be reached; nothing was read or written there."""

    exit_code = EXIT_UNAVAILABLE
