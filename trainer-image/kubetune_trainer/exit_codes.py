"""Process exit codes of the trainer: the operator decides from them whether to retry a pod.

Config, data and hardware errors are deterministic, so retrying would fail the same way;
the operator marks the FineTuneJob Failed at once. Unexpected errors and preemption are
retried (up to ``runPolicy.maxRestarts``) and resume from the newest checkpoint.
"""

from __future__ import annotations

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0
    UNEXPECTED = 1  # retryable
    BAD_CONFIG = 2  # not retried
    BAD_DATA = 3  # not retried
    UNSUPPORTED_HARDWARE = 4  # not retried (e.g. QLoRA without CUDA / bitsandbytes)
    PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was saved; retryable

    @property
    def retryable(self) -> bool:
        return self in (ExitCode.UNEXPECTED, ExitCode.PREEMPTED)


class TrainerError(Exception):
    """An error with a known exit code and a message meant for the user (no stack trace)."""

    exit_code: ExitCode = ExitCode.UNEXPECTED

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TrainerError, ValueError):
    """The configuration is invalid; the message names the field and the fix."""

    exit_code = ExitCode.BAD_CONFIG


class UnsupportedHardwareError(TrainerError, RuntimeError):
    """The requested method cannot run on this machine (checked before any work starts)."""

    exit_code = ExitCode.UNSUPPORTED_HARDWARE


class PreemptedError(TrainerError):
    """Training stopped on SIGTERM after saving (and uploading) a checkpoint."""

    exit_code = ExitCode.PREEMPTED


def exit_code_for(exc: BaseException) -> ExitCode:
    """Map an exception to the process exit code the operator understands."""
    if isinstance(exc, TrainerError):
        return exc.exit_code
    data_mod = sys.modules.get("kubetune_trainer.data")  # only when already imported (no torch here)
    data_error = getattr(data_mod, "DataError", None)
    if data_error is not None and isinstance(exc, data_error):
        return ExitCode.BAD_DATA
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - pydantic is a core dependency
        return ExitCode.UNEXPECTED
    if isinstance(exc, ValidationError):
        return ExitCode.BAD_CONFIG
    return ExitCode.UNEXPECTED
