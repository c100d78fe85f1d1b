"""How both commands end (``console.run_command``): the one map of errors to exit codes, one line
per reported error, tracebacks only for the unexpected (or with --debug). The console handler and
its views are tested in test_progress.py and test_logs.py."""

from __future__ import annotations

import logging
import re

import pytest

from bids_app import cli, transform_cli
from bids_app.console import exit_code_for, run_command
from bids_app.errors import (
    BrainExtractionError,
    ImageError,
    InvalidBIDSError,
    MissingInputError,
    MninormError,
    NothingMatchedError,
    RegistrationError,
    TemplateUnavailableError,
    UsageError,
)

# Each error a command reports, and the exit code documented for it (mninorm --help's epilog,
# the BIDS execution spec's codes where it has one).
REPORTED = [
    (MninormError("a participant failed"), 1),
    (ImageError("sub-01_T1w.nii.gz is 4D"), 1),
    (BrainExtractionError("no mask passed its checks"), 1),
    (RegistrationError("the transform is unusable"), 1),
    (InvalidBIDSError("not a BIDS dataset"), 16),
    (cli._UnknownLevel("sideways"), 17),
    (NothingMatchedError("no T1w for sub-99"), 18),
    (UsageError("--nthreads must be at least 1"), 64),
    (MissingInputError("bids_dir /nowhere does not exist"), 66),
    (TemplateUnavailableError("MNI152NLin6Asym is not in TEMPLATEFLOW_HOME"), 69),
]
UNEXPECTED = [ValueError("a bug"), OSError("disk full"), SystemExit(3), RuntimeError("ITK")]


def _name(value):
    """Test ids: the error's class."""
    return type(value).__name__ if isinstance(value, BaseException) else None


def _raising(error: BaseException):
    def command():
        raise error

    return command


@pytest.mark.parametrize(("error", "code"), REPORTED, ids=_name)
def test_a_reported_error_exits_with_its_code_and_one_line(error, code, caplog):
    assert exit_code_for(error) == code
    with caplog.at_level(logging.ERROR):
        assert run_command(_raising(error)) == code
    assert [r.getMessage() for r in caplog.records] == [str(error)]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_exits_130_with_one_line_even_with_debug(debug, caplog):
    assert exit_code_for(KeyboardInterrupt()) == 130
    with caplog.at_level(logging.ERROR):
        assert run_command(_raising(KeyboardInterrupt()), debug=debug) == 130
        assert run_command(_raising(KeyboardInterrupt()), interrupted="stopped: run again") == 130
    assert [r.getMessage() for r in caplog.records] == ["interrupted", "stopped: run again"]


@pytest.mark.parametrize("error", UNEXPECTED, ids=_name)
def test_an_unexpected_error_keeps_its_traceback(error, caplog):
    assert exit_code_for(error) is None
    with pytest.raises(type(error)) as raised:
        run_command(_raising(error))
    assert raised.value is error
    assert caplog.records == []  # the traceback says it; no second message


@pytest.mark.parametrize(("error", "code"), REPORTED[:3] + REPORTED[-3:], ids=_name)
def test_debug_shows_the_traceback_of_a_reported_error(error, code):
    with pytest.raises(type(error)):
        run_command(_raising(error), debug=True)


@pytest.mark.parametrize(("returned", "code"), [(None, 0), (0, 0), (1, 1), (65, 65)])
def test_a_command_that_returns_exits_with_what_it_returned(returned, code):
    assert run_command(lambda: returned) == code


def test_both_commands_document_the_codes_they_can_return():
    """mninorm's --help epilog and mninorm-transform's table name the codes of the errors each
    command raises."""
    epilog = cli.build_parser().epilog
    documented = {int(n) for n in re.findall(r"(?:codes:|;) (\d+) ", epilog)}
    assert documented == {0, 65} | {code for _, code in REPORTED} | {130}
    table = {int(code) for code, _ in transform_cli.EXIT_CODES}
    assert {1, 18, 64, 66, 69, 130} <= table
