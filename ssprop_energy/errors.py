"""The package's exceptions.

Every error a user can cause (bad flag, corrupt dataset, missing meter, malformed record) is an
``SSPropEnergyError``; the CLI turns it into one line on stderr and exit code 2. Anything else is a bug
and exits 1 with a log file holding the traceback.
"""

from __future__ import annotations


class SSPropEnergyError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SSPropEnergyError, ValueError):
    """A value given by the user is invalid (drop rate, schedule name, model name, ...).

    The message uses the domain's words ("drop rate must be in [0, 1)"); ``field`` names the configuration
    field when there is one, so that a front end can say which of its own flags or keys to fix.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DataError(SSPropEnergyError):
    """A dataset is missing, unreadable, truncated or corrupt."""


class ChecksumError(DataError):
    """A downloaded or cached file does not match its published checksum."""


class DownloadError(DataError):
    """A dataset file could not be fetched."""


class MeterError(SSPropEnergyError):
    """An energy source failed while measuring."""


class MeterUnavailableError(MeterError):
    """The energy source that was asked for does not exist or cannot be read on this machine."""


class RecordError(SSPropEnergyError):
    """A run record is missing, malformed or of an unknown schema version."""


class LedgerError(SSPropEnergyError):
    """The audit ledger cannot be opened, is locked, or is corrupt."""


class RunInterrupted(SSPropEnergyError):
    """A run was stopped by SIGINT/SIGTERM; its record was saved as ``interrupted``."""
