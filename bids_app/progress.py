"""The progress of a participant-level run, as events: what happened, and how far the run is.

Each step of a T1w (timed by ``pipeline._StepTimer``), each T1w and each participant is announced
as a log record that carries one of the events below in its ``progress`` attribute (``announce``).
Participants' processes send their log records to the parent through a queue, so the events reach
the parent's console (``console.ConsoleHandler``), which alone draws them; ``RunState`` is the
bookkeeping it draws from. Nothing here draws or imports rich: participants' processes import it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

PROGRESS_ATTRIBUTE = "progress"  # the LogRecord attribute that carries an event


@dataclass(frozen=True)
class RunStarted:
    participants: tuple[str, ...]  # labels, in the order the run takes them
    t1w_counts: tuple[int, ...]  # T1w images of each
    templates: tuple[str, ...]  # one registration each, per T1w
    parallel: int  # participants at a time


@dataclass(frozen=True)
class T1wStarted:
    subject: str
    t1w: str  # the source's entities, e.g. sub-01_ses-1_run-2 (drv.source_prefix)
    source: str  # its path in bids_dir


@dataclass(frozen=True)
class StepStarted:
    subject: str
    t1w: str
    step: str  # as in the run record's StepSeconds: load, bias, brain_mask, register_<tpl>, ...
    label: str  # for people (describe_step)


@dataclass(frozen=True)
class StepEnded:
    subject: str
    t1w: str
    step: str
    label: str
    seconds: float
    ok: bool = True


@dataclass(frozen=True)
class T1wEnded:
    subject: str
    t1w: str
    ok: bool
    seconds: float


@dataclass(frozen=True)
class ParticipantEnded:
    subject: str
    ok: int  # T1w images done
    failed: int
    seconds: float


@dataclass(frozen=True)
class RunEnded:
    pass


def announce(logger: logging.Logger, event, message: str, *args) -> None:
    """Log ``message`` (for the log files) carrying ``event`` (for the console)."""
    logger.info(message, *args, extra={PROGRESS_ATTRIBUTE: event})


# ---- steps -----------------------------------------------------------------------------------

_STEP_LABELS = {
    "load": "load and check the header",
    "bias": "bias correction (N4)",
    "brain_mask": "brain extraction",
}
# Rough shares of one T1w's time (heads sub-01, 2 mm, --preset precise, Greedy: load 0 s, bias
# 17 s, brain extraction 16 s, registration 37 s, outputs 11 s). They only shape the estimate of
# the time left while the first T1w images run; a step not listed weighs 5.
_STEP_WEIGHTS = {"load": 1, "bias": 15, "brain_mask": 15, "register": 35, "outputs": 10}
# The share of one participant done before the time left is estimated: a bias correction's worth
_LEAST_DONE = 0.15


def t1w_steps(templates: tuple[str, ...]) -> tuple[str, ...]:
    """The steps ``pipeline.process_t1w`` times for one T1w."""
    per_template = tuple(f"{kind}_{name}" for name in templates for kind in ("register", "outputs"))
    return ("load", "bias", "brain_mask", *per_template)


def describe_step(step: str, registration: str = "") -> str:
    """A step's name for people; ``registration`` says how, e.g. 'Greedy, 1.5 mm grid'."""
    if step.startswith("register_"):
        how = f" ({registration})" if registration else ""
        return f"registration to {step.removeprefix('register_')}{how}"
    if step.startswith("outputs_"):
        return f"outputs in {step.removeprefix('outputs_')}"
    return _STEP_LABELS.get(step, step.replace("_", " "))


def step_weight(step: str) -> float:
    kind = step.split("_", 1)[0] if step.startswith(("register_", "outputs_")) else step
    return _STEP_WEIGHTS.get(kind, 5)


# ---- where the run is ------------------------------------------------------------------------


class RunState:
    """Who is done, which step each running participant is at, and the time left."""

    def __init__(self, start: RunStarted, clock=time.monotonic):
        self._clock = clock
        self._started = clock()
        self.total = len(start.participants)
        self._places = {subject: i for i, subject in enumerate(start.participants, 1)}
        self._t1w_weight = sum(step_weight(step) for step in t1w_steps(start.templates))
        self._weights = {
            subject: max(count, 1) * self._t1w_weight
            for subject, count in zip(start.participants, start.t1w_counts, strict=True)
        }
        self._done_weight = dict.fromkeys(start.participants, 0.0)
        self._t1w_start_weight: dict[str, float] = {}
        self.finished: list[str] = []
        self.current: dict[str, str] = {}  # running participant -> what it does now
        self.t1w_ok = self.t1w_failed = 0

    def place(self, subject: str) -> str:
        """'[k/N]': the participant's place in the run."""
        return f"[{self._places.get(subject, '?')}/{self.total}]"

    def apply(self, event) -> None:
        subject = getattr(event, "subject", None)
        if subject in self.finished:
            return  # a late message of a participant already counted
        match event:
            case T1wStarted():
                self._t1w_start_weight[subject] = self._done_weight.get(subject, 0.0)
                self.current[subject] = f"{event.source}: starting"
            case StepStarted():
                self.current[subject] = event.label
            case StepEnded():
                self._done_weight[subject] = self._done_weight.get(subject, 0.0) + step_weight(
                    event.step
                )
            case T1wEnded():
                # What a failed T1w did not run counts as done: nothing is left to do for it.
                start = self._t1w_start_weight.get(subject, 0.0)
                self._done_weight[subject] = start + self._t1w_weight
                self.t1w_ok += event.ok
                self.t1w_failed += not event.ok
            case ParticipantEnded():
                self.finished.append(subject)
                self.current.pop(subject, None)

    def fraction(self, subject: str) -> float:
        """How much of the participant is done (0 to 1)."""
        if subject in self.finished:
            return 1.0
        weight = self._weights.get(subject)
        return min(self._done_weight.get(subject, 0.0) / weight, 1.0) if weight else 0.0

    def elapsed(self) -> float:
        return self._clock() - self._started

    def seconds_left(self) -> float | None:
        """The time left at the pace so far, running participants counted by their steps done;
        None until a first long step has ended (loading alone says nothing of the pace)."""
        done = sum(self.fraction(subject) for subject in self._places)
        if done >= self.total:
            return 0.0
        if done < _LEAST_DONE:
            return None
        return self.elapsed() * (self.total - done) / done

    def time_left(self) -> str:
        """'about 3 min left', 'estimating the time left' or 'all done'."""
        seconds = self.seconds_left()
        if seconds is None:
            return "estimating the time left"
        if seconds == 0:
            return "all done"
        return f"about {format_duration(_round_estimate(seconds))} left"


def format_duration(seconds: float) -> str:
    """'31 s', '4 min 5 s', '2 h 10 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _round_estimate(seconds: float) -> float:
    """An estimate shows no more precision than it has: 10 s steps, then whole minutes."""
    if seconds < 600:
        return max(10.0, round(seconds / 10) * 10)
    return round(seconds / 60) * 60
