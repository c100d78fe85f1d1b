"""Where messages go: what ``-v``/``-q`` change, the per-T1w log file, and the logging of a
participant's process.

The console (``progress.ConsoleHandler``, put on the root logger by the CLI) shows mninorm's own
messages and the progress of a run. Everything said while one T1w is processed, including what
compiled code prints straight to file descriptors 1 and 2 (Greedy's optimiser, ITK, ANTs), goes to
that T1w's log file ``sub-<label>/log/<source>_desc-mninorm_log.txt`` (``t1w_log``); what other
packages log there never reaches the console below ERROR.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from logging.handlers import QueueHandler
from pathlib import Path

# Packages whose INFO and DEBUG messages are noise around a run (bidsschematools says which schema
# it loads on every pybids query; matplotlib logs every font lookup): WARNING unless -vv.
LIBRARY_LOGGERS = ("bids", "bidsschematools", "templateflow", "matplotlib", "PIL", "h5py")
# The LogRecord attribute that names the T1w being processed when the record was made
T1W_ATTRIBUTE = "mninorm_t1w"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class Verbosity:
    """``-v`` minus ``-q``: what the console shows and what the log files keep.

    -qq errors; -q warnings; default: the progress of the run and mninorm's INFO messages outside
    a T1w (what was found, the QC verdict); -v adds the INFO messages of each T1w (header fixes,
    brain-extraction attempts); -vv debugging (DEBUG messages, Greedy's and ANTs' iterations in
    the T1w's log file, other packages' messages).
    """

    count: int = 0

    @property
    def console_level(self) -> int:
        if self.count >= 2:
            return logging.DEBUG
        if self.count >= 0:
            return logging.INFO
        return logging.WARNING if self.count == -1 else logging.ERROR

    @property
    def record_level(self) -> int:
        """The root logger's level, and the T1w log files': at least INFO whatever -q says."""
        return logging.DEBUG if self.count >= 2 else logging.INFO

    @property
    def library_level(self) -> int:
        return logging.DEBUG if self.count >= 2 else logging.WARNING

    @property
    def progress(self) -> bool:
        return self.count >= 0

    def shows(self, record: logging.LogRecord) -> bool:
        """Whether the console shows ``record`` (not a progress event)."""
        if record.levelno < self.console_level:
            return False
        ours = record.name == "bids_app" or record.name.startswith("bids_app.")
        if getattr(record, T1W_ATTRIBUTE, None) is not None:
            if not ours:  # other packages' chatter about a T1w: its log file
                return record.levelno >= logging.ERROR
            return record.levelno >= logging.WARNING or self.count >= 1
        return ours or record.levelno >= max(self.library_level, self.console_level)


def quiet_libraries(verbosity: Verbosity) -> None:
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(verbosity.library_level)


# ---- one T1w's log file ----------------------------------------------------------------------


@contextmanager
def t1w_log(path: Path, t1w: str, verbosity: Verbosity):
    """While one T1w is processed: every log record (``verbosity.record_level`` and up) and all
    output to file descriptors 1 and 2 go to ``path``, rewritten for each run.

    The records also go on to the root logger's other handlers, marked with the T1w (see
    ``Verbosity.shows``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    handler = _T1wLogHandler(path)
    handler.setLevel(verbosity.record_level)
    handler.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
    mark = _MarkT1w(t1w)
    root = logging.getLogger()
    others = list(root.handlers)
    for other in others:
        other.addFilter(mark)
    root.addHandler(handler)
    try:
        with output_to(path):
            yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for other in others:
            other.removeFilter(mark)


class _T1wLogHandler(logging.FileHandler):
    """Appends, as the descriptors do, so the two writers never overwrite each other. What
    compiled code printed before a record is flushed first, so the file keeps the order; a record
    starts on a line of its own after printed text that did not end one (Greedy's line search)."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a+", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        _flush_streams()
        if self.stream is not None and hasattr(os, "pread"):
            self.stream.flush()
            fd = self.stream.fileno()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                self.stream.write("\n")
        super().emit(record)


class _MarkT1w(logging.Filter):
    def __init__(self, t1w: str):
        super().__init__()
        self.t1w = t1w

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, T1W_ATTRIBUTE, None) is None:
            setattr(record, T1W_ATTRIBUTE, self.t1w)
        return True


@contextmanager
def output_to(path: Path):
    """Send this process's file descriptors 1 and 2 to ``path`` (appended), then put them back.

    Compiled code writes to the descriptors directly, past ``sys.stdout`` and ``sys.stderr``
    (Greedy's line search: "IFLAG= -1 LINE SEARCH FAILED ..."): only swapping the descriptors
    catches it. The console handler writes to a duplicate of the original descriptor 2
    (``progress.console_stream``), so it stays on the terminal meanwhile.
    """
    _flush_streams()
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        _flush_streams()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _flush_streams() -> None:
    """Flush Python's and the C library's buffered output: what is written before a swap of the
    descriptors must land where it was meant to."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):  # None, closed, or not a file
            stream.flush()
    with suppress(OSError, AttributeError, TypeError):  # no C library to ask (Windows)
        ctypes.CDLL(None).fflush(None)


# ---- a participant's process -----------------------------------------------------------------


def configure_child(queue, verbosity: Verbosity) -> None:
    """Logging in a participant's process (its pool's initializer): every record goes to the
    parent through ``queue``, where the console decides what to show."""
    root = logging.getLogger()
    root.handlers[:] = [QueueHandler(queue)]
    root.setLevel(verbosity.record_level)
    quiet_libraries(verbosity)
    logging.captureWarnings(True)


class Relay(logging.Handler):
    """In the parent, for the records of participants' processes: each goes to the logger of its
    name here, so that the parent's handlers (the console) take it as one of their own."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)


def flush_child() -> None:
    """Before a participant's process hands back its result: push its last records into the pipe
    so that the parent shows them before what it does with the result."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, QueueHandler)]:
        root.removeHandler(handler)
        handler.queue.close()
        handler.queue.join_thread()
