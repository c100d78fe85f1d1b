"""The progress of a run: its bookkeeping (progress.py) and the two views of it (console.py)."""

from __future__ import annotations

import io
import logging
import re

import pytest

from bids_app.console import ConsoleHandler, LiveView, PlainView
from bids_app.logs import Verbosity
from bids_app.progress import (
    ParticipantEnded,
    RunEnded,
    RunStarted,
    RunState,
    StepEnded,
    StepStarted,
    T1wEnded,
    T1wStarted,
    announce,
    describe_step,
    format_duration,
    t1w_steps,
)

TEMPLATE = "MNI152NLin2009cAsym"
HOW = "Greedy, 1.5 mm grid"
START = RunStarted(("01", "02"), (1, 1), (TEMPLATE,), 2)


def _t1w_events(subject: str, failing_step: str | None = None):
    """The events of one participant with one T1w; the steps take 31 s each."""
    t1w = f"sub-{subject}"
    yield T1wStarted(subject, t1w, f"{t1w}/anat/{t1w}_T1w.nii.gz")
    for step in t1w_steps((TEMPLATE,)):
        label = describe_step(step, HOW)
        yield StepStarted(subject, t1w, step, label)
        yield StepEnded(subject, t1w, step, label, 31.0, ok=step != failing_step)
        if step == failing_step:
            break
    yield T1wEnded(subject, t1w, failing_step is None, 155.0)
    yield ParticipantEnded(subject, int(failing_step is None), int(failing_step is not None), 160.0)


@pytest.mark.parametrize(
    ("step", "label"),
    [
        ("load", "load and check the header"),
        ("bias", "bias correction (N4)"),
        ("brain_mask", "brain extraction"),
        (f"register_{TEMPLATE}", f"registration to {TEMPLATE} ({HOW})"),
        (f"outputs_{TEMPLATE}", f"outputs in {TEMPLATE}"),
        ("something_new", "something new"),
    ],
)
def test_steps_are_named_for_people(step, label):
    assert describe_step(step, HOW) == label


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (31, "31 s"), (60, "1 min"), (245, "4 min 5 s"), (7800, "2 h 10 min")],
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_left_follows_the_pace_of_the_steps_done():
    clock = _Clock()
    state = RunState(START, clock)
    assert state.seconds_left() is None  # nothing done yet: no pace to go by
    assert state.time_left() == "estimating the time left"
    events = list(_t1w_events("01"))
    for event in events[:3]:  # started, loading started and ended
        state.apply(event)
    clock.now += 1
    assert state.seconds_left() is None  # a second's loading says nothing of the pace
    for event in events[3:-1]:
        state.apply(event)
    clock.now += 99
    # sub-01's steps all ended (its report is still to come): half the run in 100 s
    assert state.fraction("01") == 1.0
    assert state.seconds_left() == pytest.approx(100)
    assert state.time_left() == "about 1 min 40 s left"
    state.apply(events[-1])
    assert state.finished == ["01"] and "01" not in state.current
    for event in _t1w_events("02"):
        state.apply(event)
    assert state.seconds_left() == 0 and state.time_left() == "all done"


def test_a_failed_t1w_counts_as_done_and_late_messages_are_ignored():
    state = RunState(START, _Clock())
    for event in _t1w_events("02", failing_step="load"):
        state.apply(event)
    assert state.fraction("02") == 1.0
    assert (state.t1w_ok, state.t1w_failed) == (0, 1)
    state.apply(StepStarted("02", "sub-02", "bias", "bias correction (N4)"))  # late, from a queue
    assert "02" not in state.current
    assert state.place("02") == "[2/2]" and state.place("99") == "[?/2]"


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("bids_app.tests.progress")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_plain_view_prints_a_timestamped_line_per_step_with_the_participant_place():
    stream = io.StringIO()
    logger = _logger(ConsoleHandler(PlainView(stream), Verbosity(0)))
    announce(logger, START, "run")
    for event in [*_t1w_events("01"), *_t1w_events("02", failing_step="bias")]:
        announce(logger, event, "event")
    announce(logger, RunEnded(), "end")
    lines = stream.getvalue().splitlines()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO "
    assert all(re.match(stamp, line) for line in lines), lines
    text = "\n".join(line.split(" INFO ", 1)[1] for line in lines)
    assert "sub-01 [1/2] started: sub-01/anat/sub-01_T1w.nii.gz" in text
    assert f"sub-01 [1/2] registration to {TEMPLATE} (Greedy, 1.5 mm grid)... 31 s" in text
    assert f"sub-01 [1/2] outputs in {TEMPLATE}... 31 s" in text
    assert "sub-01 [1/2] finished in 2 min 40 s (1 T1w ok); 1/2 participants done; about" in text
    assert "sub-02 [2/2] bias correction (N4)... failed after 31 s" in text
    assert "sub-02 [2/2] FAILED in 2 min 35 s" in text
    assert "sub-02 [2/2] finished in 2 min 40 s (0 T1w ok, 1 failed); 2/2 participants done" in text
    assert "brain extraction" not in text.split("sub-02 [2/2] started")[1]  # never reached
    # Per participant: started, its T1w done or failed, finished; sub-01's 5 steps, sub-02's 2
    assert len(lines) == 2 * 3 + 5 + 2


@pytest.mark.parametrize("count", [-1, -2])
def test_quiet_hides_the_progress(count):
    stream = io.StringIO()
    logger = _logger(ConsoleHandler(PlainView(stream), Verbosity(count)))
    announce(logger, START, "run")
    for event in _t1w_events("01"):
        announce(logger, event, "event")
    logger.error("sub-01: something broke")
    assert stream.getvalue().count("\n") == 1 and "something broke" in stream.getvalue()


def test_live_view_shows_participants_done_and_the_step_of_each_running_one():
    from rich.console import Console

    stream = io.StringIO()
    view = LiveView(Console(file=stream, force_terminal=True, width=200), auto_refresh=False)
    logger = _logger(ConsoleHandler(view, Verbosity(0)))
    announce(logger, START, "run")
    for event in _t1w_events("01"):
        announce(logger, event, "event")
    second = list(_t1w_events("02"))
    for event in second[:7]:  # T1w started, load and bias done, brain extraction started
        announce(logger, event, "event")
    logger.warning("sub-02: a warning above the view")
    view.refresh()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())  # no colours or cursor
    assert "1/2 done" in screen  # the run's row
    assert "sub-02 [2/2] brain extraction" in screen  # the running participant's row
    assert "sub-01 [1/2] finished in 2 min 40 s (1 T1w ok); 1/2 participants done" in screen
    assert "WARNING sub-02: a warning above the view" in screen
    assert re.search(r"about \d+ s left|about \d+ min( \d+ s)? left", screen)
    announce(logger, RunEnded(), "end")
    assert not view.progress.live.is_started
