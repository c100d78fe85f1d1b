"""The console of ``mninorm`` and ``mninorm-transform``: how both commands end (``run_command``,
the one map of exceptions to exit codes), and the one log handler ``mninorm`` puts on the root
logger.

It shows log records as lines and draws the progress events (``progress``) of a participant-level
run in one of two views, chosen by where stderr goes:

* a terminal: a live view (rich), redrawn in place: participants done / total with an estimate of
  the time left, and one row per running participant with the step it is at. Lines that stay
  (messages, a participant done) are printed above it.
* anything else (a log file, a cluster job): plain timestamped lines, one per step::

    2025-06-01 10:02:31 INFO sub-01 [1/8] registration to MNI152NLin2009cAsym (Greedy, 1.5 mm
    grid)... 31 s

  (on one line); ``[1/8]``: the participant's place in the run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from bids_app.errors import ExitCode, MninormError
from bids_app.logs import DATE_FORMAT, Verbosity
from bids_app.progress import (
    PROGRESS_ATTRIBUTE,
    ParticipantEnded,
    RunEnded,
    RunStarted,
    RunState,
    StepEnded,
    T1wEnded,
    T1wStarted,
    format_duration,
)

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"

log = logging.getLogger(__name__)


# ---- how a command ends -----------------------------------------------------------------------


def exit_code_for(error: BaseException) -> ExitCode | None:
    """The exit code of an error a command reports as one line; None for an unexpected error,
    which keeps its traceback (a bug to report)."""
    if isinstance(error, MninormError):
        return error.exit_code  # each error class carries its code (errors.py)
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return None


def run_command(
    command: Callable[[], int | None], *, debug: bool = False, interrupted: str = "interrupted"
) -> int:
    """Run a command's body and return its exit code: its own, or OK when it returns None.

    An error with an exit code (``exit_code_for``) is logged as one line, ``interrupted`` for
    Ctrl-C; with ``debug`` the command's errors propagate with their traceback (not Ctrl-C: it
    always stops quietly).
    """
    try:
        code = command()
    except BaseException as err:  # Ctrl-C is no Exception
        exit_code = exit_code_for(err)
        stopped = isinstance(err, KeyboardInterrupt)
        if exit_code is None or (debug and not stopped):
            raise
        log.error("%s", interrupted if stopped else err)
        return int(exit_code)
    return int(ExitCode.OK if code is None else code)


class ConsoleHandler(logging.Handler):
    """Log records as lines (those ``verbosity`` shows); progress events to the view."""

    def __init__(self, view, verbosity: Verbosity, stream_to_close=None):
        super().__init__()
        self.view = view
        self.verbosity = verbosity
        self._stream_to_close = stream_to_close
        self.setFormatter(logging.Formatter(CONSOLE_FORMAT, DATE_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, PROGRESS_ATTRIBUTE, None)
            if event is None:
                if self.verbosity.shows(record):
                    self.view.print(self.format(record), record.levelno)
                return
            if not self.verbosity.progress:
                return
            line = self.view.show(event)
            if line:
                self.view.print(self.format(_with_message(record, line)), record.levelno)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        try:
            self.view.close()
            if self._stream_to_close is not None:
                self._stream_to_close.close()
        finally:
            super().close()


def open_console(verbosity: Verbosity, stream=None) -> ConsoleHandler:
    """The console handler on ``stream`` (default: ``console_stream()``): the live view on a
    terminal, plain lines elsewhere."""
    owned = None
    if stream is None:
        stream = owned = console_stream()
    if verbosity.progress and _isatty(stream):
        console = Console(file=stream)
        if console.is_terminal and not console.is_dumb_terminal:
            return ConsoleHandler(LiveView(console), verbosity, owned)
    return ConsoleHandler(PlainView(stream), verbosity, owned)


def console_stream():
    """A text stream to where stderr goes now, that stays there while a T1w's log file takes file
    descriptor 2 (``logs.output_to``, around each T1w run in this process with --in-process).

    A duplicate of stderr's descriptor; the caller closes it. Where stderr is no file (a test's
    ``capsys``, a StringIO), stderr itself: no descriptor swap reaches it.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no descriptor
        return _Unclosable(sys.stderr)
    sys.stderr.flush()
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    # Closed by ConsoleHandler.close
    return open(os.dup(fd), "w", encoding=encoding, errors="backslashreplace", buffering=1)  # noqa: SIM115


class _Unclosable:
    """A stream the console writes to but does not own."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def close(self) -> None:
        pass


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _with_message(record: logging.LogRecord, message: str) -> logging.LogRecord:
    """A copy of ``record`` saying ``message`` (the record also goes to other handlers)."""
    fields = {**record.__dict__, "msg": message, "args": None, "exc_info": None, "exc_text": None}
    return logging.makeLogRecord(fields)


# ---- the views -------------------------------------------------------------------------------


class PlainView:
    """A line per T1w started, per step ended, per T1w and per participant done."""

    def __init__(self, stream):
        self.stream = stream
        self.state: RunState | None = None
        self._lock = threading.Lock()

    def show(self, event) -> str | None:
        if isinstance(event, RunStarted):
            self.state = RunState(event)
            return None
        if self.state is None or isinstance(event, RunEnded):
            return None
        state = self.state
        state.apply(event)
        place = state.place(event.subject)
        match event:
            case T1wStarted():
                return f"{event.t1w} {place} started: {event.source}"
            case StepEnded():
                took = format_duration(event.seconds)
                return f"{event.t1w} {place} {event.label}... " + (
                    took if event.ok else f"failed after {took}"
                )
            case T1wEnded():
                verdict = "done" if event.ok else "FAILED"
                return f"{event.t1w} {place} {verdict} in {format_duration(event.seconds)}"
            case ParticipantEnded():
                return f"{participant_done(event, state)}; {state.time_left()}"
        return None

    def print(self, text: str, levelno: int) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.state = None


def participant_done(event: ParticipantEnded, state: RunState) -> str:
    """'sub-01 [1/8] finished in 3 min 2 s (1 T1w ok); 1/8 participants done'."""
    counts = f"{event.ok} T1w ok" + (f", {event.failed} failed" if event.failed else "")
    return (
        f"sub-{event.subject} {state.place(event.subject)} finished in "
        f"{format_duration(event.seconds)} ({counts}); "
        f"{len(state.finished)}/{state.total} participants done"
    )


_LEVEL_STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red", logging.CRITICAL: "bold red"}


class LiveView:
    """On a terminal: a row for the run (participants done / total, time elapsed and left) and a
    row per running participant (its T1w, the step it is at, how far it is), redrawn in place."""

    def __init__(self, console: Console, auto_refresh: bool = True):
        self.console = console
        self.state: RunState | None = None
        self._rows: dict[str, object] = {}  # participant -> its task
        self.run_row = None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}", markup=False),
            TimeElapsedColumn(),
            _TimeLeftColumn(self),
            console=console,
            transient=True,  # the lines printed above stay; the view goes at the end
            auto_refresh=auto_refresh,
            redirect_stdout=False,  # the descriptors are the T1w log files' business
            redirect_stderr=False,
        )

    def show(self, event) -> str | None:
        if isinstance(event, RunStarted):
            self.state = RunState(event)
            self.run_row = self.progress.add_task(
                "participants", total=self.state.total, count=f"0/{self.state.total} done"
            )
            self.progress.start()
            return None
        if isinstance(event, RunEnded):
            self.close()
            return None
        if self.state is None:
            return None
        state = self.state
        state.apply(event)
        subject = event.subject
        if isinstance(event, ParticipantEnded):
            row = self._rows.pop(subject, None)
            if row is not None:
                self.progress.remove_task(row)
            done = len(state.finished)
            self.progress.update(self.run_row, completed=done, count=f"{done}/{state.total} done")
            return participant_done(event, state)
        if subject in state.finished:
            return None
        if subject not in self._rows:
            self._rows[subject] = self.progress.add_task("", total=1.0, count="")
        self.progress.update(
            self._rows[subject],
            description=f"{event.t1w} {state.place(subject)} {state.current.get(subject, '')}",
            completed=state.fraction(subject),
        )
        if isinstance(event, T1wEnded) and not event.ok:
            took = format_duration(event.seconds)
            return f"{event.t1w} {state.place(subject)} FAILED after {took}"
        return None

    def print(self, text: str, levelno: int) -> None:
        self.console.print(Text(text, style=_LEVEL_STYLES.get(levelno, "")), soft_wrap=True)

    def refresh(self) -> None:
        self.progress.refresh()

    def close(self) -> None:
        self.progress.stop()


class _TimeLeftColumn(ProgressColumn):
    """The estimate of the time left, on the run's row."""

    def __init__(self, view: LiveView):
        super().__init__()
        self.view = view

    def render(self, task) -> Text:
        state = self.view.state
        if state is None or task.id != self.view.run_row:
            return Text("")
        return Text(state.time_left(), style="progress.remaining")
