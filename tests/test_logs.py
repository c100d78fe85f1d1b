"""Where messages go: -v/-q, the per-T1w log file and its capture of file descriptors 1 and 2."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import pytest

from bids_app.console import console_stream
from bids_app.logs import T1W_ATTRIBUTE, Verbosity, output_to, t1w_log

LINE_SEARCH = " IFLAG= -1  LINE SEARCH FAILED. SEE DOCUMENTATION OF ROUTINE MCSRCH"

PIPELINE = "bids_app.participant.pipeline"


def _print_from_c(text: str) -> None:
    """As Greedy's optimiser does: C's printf, buffered by the C library, past sys.stdout."""
    ctypes.CDLL(None).printf(text.replace("%", "%%").encode())


def test_output_to_takes_what_compiled_code_prints_and_gives_the_descriptors_back(tmp_path, capfd):
    path = tmp_path / "t1w_log.txt"
    with output_to(path):
        _print_from_c(LINE_SEARCH)  # no newline: stays in C's buffer until flushed
        os.write(2, b"itk warning\n")
    os.write(1, b"after\n")
    captured = capfd.readouterr()
    assert "IFLAG" not in captured.out + captured.err
    assert "itk warning" not in captured.err
    assert captured.out == "after\n"  # descriptor 1 is back where it was
    assert path.read_text() == f"{LINE_SEARCH}itk warning\n"


def test_the_console_stays_on_stderr_while_a_t1w_log_takes_descriptor_2(
    tmp_path, capfd, monkeypatch
):
    # As outside pytest: sys.stderr writes to descriptor 2 (pytest's own writes elsewhere)
    with open(2, "w", closefd=False) as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        stream = console_stream()
    try:
        with output_to(tmp_path / "log.txt"):
            stream.write("progress line\n")
            os.write(2, b"tool chatter\n")
        stream.flush()
    finally:
        stream.close()
    err = capfd.readouterr().err
    assert "progress line" in err and "tool chatter" not in err
    assert (tmp_path / "log.txt").read_text() == "tool chatter\n"


def test_t1w_log_keeps_the_records_and_the_printed_text_apart_on_lines(tmp_path, capfd):
    root = logging.getLogger()
    seen = []

    class _Other(logging.Handler):
        def emit(self, record):
            seen.append((record.name, getattr(record, T1W_ATTRIBUTE, None)))

    other = _Other()
    root.addHandler(other)
    level = root.level
    root.setLevel(logging.INFO)  # as the command sets it
    path = tmp_path / "sub-01" / "log" / "sub-01_desc-mninorm_log.txt"
    path.parent.mkdir(parents=True)
    path.write_text("the last run's log\n")
    try:
        with t1w_log(path, "sub-01", Verbosity(0)):
            logging.getLogger(PIPELINE).info("sub-01: bias correction (N4)...")
            _print_from_c(LINE_SEARCH)
            logging.getLogger(PIPELINE).info("sub-01: registration done")
            logging.getLogger(PIPELINE).debug("not kept without -vv")
        logging.getLogger(PIPELINE).info("after the T1w")
    finally:
        root.removeHandler(other)
        root.setLevel(level)
    lines = path.read_text().splitlines()
    assert "the last run's log" not in path.read_text()  # rewritten for each run
    assert [line.split(": ", 1)[-1] for line in lines if PIPELINE in line] == [
        "sub-01: bias correction (N4)...",
        "sub-01: registration done",
    ]
    assert lines[1] == LINE_SEARCH  # on a line of its own
    assert "not kept" not in path.read_text()
    assert (PIPELINE, "sub-01") in seen and (PIPELINE, None) in seen
    assert "IFLAG" not in "".join(capfd.readouterr())
    assert not any(isinstance(f, logging.Filter) for f in other.filters)  # the mark is removed


def _record(name: str, level: int, t1w: str | None = None) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    if t1w:
        setattr(record, T1W_ATTRIBUTE, t1w)
    return record


INFO, W, E, D = logging.INFO, logging.WARNING, logging.ERROR, logging.DEBUG


@pytest.mark.parametrize(
    ("count", "name", "level", "t1w", "shown"),
    [
        (0, "bids_app.cli", INFO, None, True),  # what was found, the QC verdict
        (0, PIPELINE, INFO, "sub-01", False),  # a T1w's details: its log file
        (1, "bids_app.participant.pipeline", INFO, "sub-01", True),
        (0, "bids_app.participant.brain", W, "sub-01", True),
        (0, "bids_app.participant.pipeline", D, None, False),
        (2, "bids_app.participant.pipeline", D, "sub-01", True),
        (0, "bidsschematools", INFO, None, False),  # its schema line on every command
        (0, "py.warnings", W, None, True),
        (0, "py.warnings", W, "sub-01", False),  # other packages about a T1w: its log file
        (2, "picsl_greedy", D, "sub-01", False),  # Greedy's iterations: never on the console
        (0, "picsl_greedy", E, "sub-01", True),
        (2, "matplotlib.font_manager", D, None, True),  # -vv: debugging
        (-1, "bids_app.cli", INFO, None, False),
        (-1, "bids_app.cli", W, None, True),
        (-2, "bids_app.cli", W, None, False),
    ],
)
def test_verbosity_says_what_the_console_shows(count, name, level, t1w, shown):
    assert Verbosity(count).shows(_record(name, level, t1w)) == shown
