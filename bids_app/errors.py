"""The exception hierarchy and the exit codes the command returns.

Exit codes follow the draft BIDS execution spec where it has one; ``console.run_command`` is the
only place that turns exceptions into them (for both commands).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    PARTICIPANT_FAILED = 1  # at least one T1w failed; the others were still processed
    INVALID_BIDS = 16  # the input is not a (valid) BIDS dataset
    UNKNOWN_LEVEL = 17  # analysis level is neither participant nor group
    NOTHING_MATCHED = 18  # labels / filters selected no T1w
    USAGE = 64  # malformed command line
    GROUP_BY_UNUSABLE = 65  # group level: --group-by gave no comparison; the rest is written
    MISSING_INPUT = 66  # bids_dir (or a file named on the command line) does not exist
    TEMPLATE_UNAVAILABLE = 69  # template not in TEMPLATEFLOW_HOME and cannot be downloaded
    INTERRUPTED = 130


class MninormError(Exception):
    """Base of every error the command reports without a traceback."""

    exit_code: ExitCode = ExitCode.PARTICIPANT_FAILED


class UsageError(MninormError):
    exit_code = ExitCode.USAGE


class MissingExtraError(UsageError):
    """An option whose optional dependencies (a pip extra) are not installed."""


class MissingInputError(MninormError):
    exit_code = ExitCode.MISSING_INPUT


class InvalidBIDSError(MninormError):
    exit_code = ExitCode.INVALID_BIDS


class NothingMatchedError(MninormError):
    exit_code = ExitCode.NOTHING_MATCHED


class TemplateUnavailableError(MninormError):
    exit_code = ExitCode.TEMPLATE_UNAVAILABLE


class TemplateError(TemplateUnavailableError):
    """A custom template folder that cannot be used as it is (missing file, grids differ...)."""


class ImageError(MninormError):
    """A T1w image that cannot be used as it is (unreadable, 4D, empty...)."""


class BrainExtractionError(MninormError):
    """No brain-extraction attempt gave a mask that passes its checks."""


class RegistrationError(MninormError):
    """ANTs failed or produced an unusable transform."""


class RunRecordError(MninormError):
    """A run record (``sub-X/log/*_desc-mninorm_run.json``) that cannot be read as one: not JSON,
    or without a key every record has. Reports and the group level skip its T1w with a warning."""


class MemoryBudgetError(MninormError):
    """A participant alone needs more memory than ``--mem-mb`` allows: it is not started."""
