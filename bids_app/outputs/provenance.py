"""One ``mninorm`` invocation: made once in the parent process, passed down to every participant
explicitly, and written into each T1w's run record (``pipeline._write_run_record``), from which
the report's "About this run" reads it."""

from __future__ import annotations

import os
import shlex
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class RunInfo:
    run_uuid: str  # the same for every participant of one invocation
    command_line: str  # shell-quoted, as it was typed
    start_time: str  # UTC, ISO 8601
    cpu_count: int | None  # os.cpu_count(): the machine's CPUs
    cpu_affinity: int | None  # the CPUs this process may use (taskset, cgroups, a scheduler)


def start_run(argv: list[str]) -> RunInfo:
    """The invocation that ``argv`` (``sys.argv``, or the command and its arguments) started."""
    return RunInfo(
        run_uuid=str(uuid.uuid4()),
        command_line=shlex.join(argv),
        start_time=utc_now(),
        cpu_count=os.cpu_count(),
        cpu_affinity=_affinity(),
    )


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second: '2025-06-01T10:02:31+00:00'."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS or Windows
        return None
