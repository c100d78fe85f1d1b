"""The participants on a running Dask cluster (``--dask-scheduler ADDRESS``): one task each.

The semantics of the local loop stay: each participant runs in a fresh process of its own (here
spawned by the worker that took the task), a failing T1w never stops the others, outputs are
written atomically, and the outcomes come back for the same summary and exit code.

A worker that dies mid-participant: the scheduler gives the task to another worker (up to its
``distributed.scheduler.allowed-failures``, 3 by default), which redoes the participant from the
start; past that, the participant is reported failed. Its process notices that the worker is gone
and stops, so it never writes next to the retry. What it wrote is either complete files (atomic
writes) or a run record without an end time, which resume redoes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from bids_app import logs, progress
from bids_app.errors import UsageError
from bids_app.outputs.provenance import RunInfo
from bids_app.scheduler import advice, connect, import_distributed, settings_differing
from bids_app.settings import Settings, set_thread_environment

log = logging.getLogger(__name__)

_PARENT_CHECK_SECONDS = 1.0


def run_on_cluster(
    by_subject: dict, settings: Settings, templates, run: RunInfo, verbosity: logs.Verbosity
) -> list:
    """Every participant as one task on the cluster; their outcomes, in the participants' order.

    The work folder is ``settings.work_dir`` (it must then be on a filesystem the workers share)
    or a temporary folder on the worker, removed after its participant.
    """
    distributed = import_distributed()
    client = connect(settings.dask_scheduler)
    try:
        _check_workers(client)
        futures = {
            client.submit(
                participant_task, subject, t1ws, settings, templates, run, verbosity,
                key=f"mninorm-sub-{subject}-{run.run_uuid}", pure=False,
            ): subject
            for subject, t1ws in by_subject.items()
        }  # fmt: skip
        outcomes = {}
        for future in distributed.as_completed(futures):
            subject = futures.pop(future)
            outcomes[subject] = _outcomes_of(future, subject, by_subject[subject])
            # Forget the result on the cluster: a worker that dies later would otherwise have
            # its finished participants recomputed elsewhere (their results lived in it).
            future.release()
    finally:
        client.close()
    return [outcome for subject in by_subject for outcome in outcomes[subject]]


def _check_workers(client) -> None:
    """A warning when some worker runs without mninorm's worker settings (they are advice: a
    check that fails is only logged)."""
    try:
        differing = settings_differing(client)
    except Exception as err:  # noqa: BLE001 - e.g. a worker that cannot run the check
        log.info("could not read the Dask workers' settings: %s", err)
        return
    if differing:
        log.warning("%s", advice(differing))


def _outcomes_of(future, subject: str, t1ws) -> list:
    from bids_app.participant.pipeline import failed_outcome

    try:
        outcomes = future.result()
    except Exception as err:  # KilledWorker (its workers died too often) or the task's own error
        message = f"its Dask task failed ({type(err).__name__}: {err})"
        outcomes = [failed_outcome(t1w, message, time.perf_counter()) for t1w in t1ws]
    ok = sum(outcome.ok for outcome in outcomes)
    seconds = sum(outcome.seconds for outcome in outcomes)
    event = progress.ParticipantEnded(subject, ok, len(outcomes) - ok, seconds)
    progress.announce(log, event, "sub-%s: %d T1w ok, %d failed", subject, ok, event.failed)
    return outcomes


# ---- on the worker ----------------------------------------------------------------------------


def participant_task(subject, t1ws, settings, templates, run, verbosity) -> list:
    """One participant, in a fresh process spawned by this worker (as the local loop does)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        raise UsageError(
            "this Dask worker is a daemonic process, which may not start the participant's own "
            "process: start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False in their "
            "environment (see docs/scale.md)"
        )
    from bids_app.participant.pipeline import WorkFolder, failed_outcome, run_participant

    prepare_participant_environment(settings.omp_nthreads)
    spawn = get_context("spawn")
    child = (_start_child, (settings.omp_nthreads, verbosity, os.getpid()))
    with WorkFolder(settings.work_dir) as work_dir, ProcessPoolExecutor(1, spawn, *child) as pool:
        try:
            return pool.submit(
                run_participant, subject, t1ws, settings, templates, work_dir, run, verbosity
            ).result()
        except Exception as err:  # the process died (memory, segfault): report, go on
            message = f"the participant's process died ({type(err).__name__}: {err})"
            return [failed_outcome(t1w, message, time.perf_counter()) for t1w in t1ws]


def prepare_participant_environment(threads: int) -> None:
    """The environment the participant's process starts with (it inherits this worker's).

    Thread counts before the process imports numpy and ITK. And no MALLOC_TRIM_THRESHOLD_,
    which Dask's nanny gives its workers (``distributed.nanny.pre-spawn-environ``): with it, glibc
    hands memory back at nearly every free, and ITK's large image allocations made a Greedy
    registration of ds002748 about 20% slower (12.4-13.3 s -> 15.0-15.5 s, docs/scale.md).
    """
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    set_thread_environment(threads)


def _start_child(threads: int, verbosity: logs.Verbosity, worker_pid: int) -> None:
    """A participant's process on a worker: thread counts before ITK is imported, messages to the
    T1w log files only (the worker has no console), and an end when the worker dies."""
    set_thread_environment(threads)
    root = logging.getLogger()
    root.handlers[:] = []
    root.setLevel(verbosity.record_level)
    logs.quiet_libraries(verbosity)
    logging.captureWarnings(True)
    threading.Thread(target=_end_with, args=(worker_pid,), daemon=True).start()


def _end_with(worker_pid: int) -> None:
    # A killed worker does not take its children with it: stop, rather than write next to the
    # retry on another worker.
    while os.getppid() == worker_pid:
        time.sleep(_PARENT_CHECK_SECONDS)
    os._exit(70)
