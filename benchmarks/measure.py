"""Run one child process and measure it from outside: wall time, CPU time, peak memory.

* wall: a monotonic clock around the process's life;
* CPU: user + system time from ``os.wait4``'s rusage, which includes every descendant the child
  waited for (mninorm's per-participant worker processes, for instance);
* peak memory: the largest sum of RSS over the whole process tree, polled every ``poll_s``, or
  the largest single process's own high-water mark (``VmHWM``: catches a peak between polls) if
  larger. RSS sums count pages shared by forked processes more than once: an upper bound, as a
  scheduler would see it. (Not rusage's ``ru_maxrss``: Linux carries the *parent's* peak into a
  child across fork and exec, so it would report this benchmark's own memory.)

A process over its time limit is stopped with its whole process group (it runs in a session of
its own), SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    timed_out: bool


def run_measured(
    argv, *, env: dict, log_path: Path, timeout_s: float, poll_s: float = 0.2
) -> Measurement:
    import psutil

    with open(log_path, "wb") as output:
        start = time.monotonic()
        child = subprocess.Popen(
            list(argv), env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        tree = psutil.Process(child.pid)
        peak_bytes, single_peak, timed_out, stop_sent = 0, 0, False, None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            total, largest = tree_memory_bytes(tree)
            peak_bytes, single_peak = max(peak_bytes, total), max(single_peak, largest)
            now = time.monotonic()
            if not timed_out and now - start > timeout_s:
                timed_out, stop_sent = True, now
                _signal_group(child.pid, signal.SIGTERM)
            elif stop_sent is not None and now - stop_sent > 10:
                _signal_group(child.pid, signal.SIGKILL)
                stop_sent = float("inf")  # once
            time.sleep(poll_s)
        wall = time.monotonic() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if timed_out:
        _signal_group(child.pid, signal.SIGKILL)  # leftovers of the group, if any
    peak_mb = max(peak_bytes, single_peak) / 2**20
    return Measurement(
        returncode=child.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak_mb,
        timed_out=timed_out,
    )


def tree_memory_bytes(root) -> tuple[int, int]:
    """(sum of RSS now, largest high-water mark of one process) over ``root`` and descendants."""
    import psutil

    total, largest = 0, 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for process in processes:
        try:
            rss = process.memory_info().rss
        except psutil.Error:  # ended between the listing and the reading
            continue
        total += rss
        largest = max(largest, rss, _high_water_mark(process.pid))
    return total, largest


def _high_water_mark(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)  # the group the child leads (start_new_session): nothing else
