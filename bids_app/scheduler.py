"""The connection to a running Dask scheduler (``--dask-scheduler ADDRESS``), shared by the
participant level (one task per participant) and the group level (reading maps on the cluster).

Dask is the optional 'dask' extra: without it, a clear error naming the extra.

``CLUSTER_CONFIG`` is the Dask configuration mninorm's workers (and a scheduler on the same
machines) should run with; the container image sets it, and docs/scale.md shows how elsewhere.
"""

from __future__ import annotations

from bids_app.errors import MissingExtraError, UsageError

EXTRA = "pip install 'mninorm[dask]'"
_CONNECT_SECONDS = 30

# A participant's task only waits, for minutes, on the process it started, while that process
# uses the node's cores. Dask's defaults suit short tasks: each worker samples its busy threads'
# stacks every 10 ms and its loops wake every 20 ms (tick), 100 ms (memory) and 500 ms (system
# monitor), CPU taken from the participants (docs/scale.md). A daemonic worker may not start
# the participant's process at all.
CLUSTER_CONFIG = {
    "distributed.worker.daemon": False,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
}


def cluster_environment(config: dict = CLUSTER_CONFIG) -> dict[str, str]:
    """``config`` as the environment variables Dask reads when it starts (``DASK_A__B_C``)."""
    return {
        "DASK_" + key.upper().replace(".", "__").replace("-", "_"): str(value)
        for key, value in config.items()
    }


def settings_differing(client, config: dict = CLUSTER_CONFIG) -> list[str]:
    """The settings of ``config`` that some worker of ``client``'s cluster does not run with
    (a longer interval than advised counts as advised)."""

    def own_settings():
        import dask

        return {key: dask.config.get(key, None) for key in config}

    found = client.run(own_settings).values()
    return [key for key in config if any(not _as_calm(w[key], config[key]) for w in found)]


def advice(keys: list[str]) -> str:
    """What to tell the user whose workers run without ``keys`` of ``CLUSTER_CONFIG``."""
    variables = cluster_environment({key: CLUSTER_CONFIG[key] for key in keys})
    settings = " ".join(f"{name}={value}" for name, value in variables.items())
    reasons = []
    if "distributed.worker.daemon" in keys:
        reasons.append("a daemonic worker cannot start a participant's process (its task fails)")
    if set(keys) - {"distributed.worker.daemon"}:
        reasons.append("the others leave the participants the CPU Dask's frequent wake-ups take")
    return (
        f"the Dask workers run without mninorm's settings {settings}: start them with these in "
        f"their environment (docs/scale.md; the container image has them): {'; '.join(reasons)}"
    )


def _as_calm(value, advised) -> bool:
    if isinstance(advised, str):  # an interval: as long as advised or longer
        import dask.utils

        try:
            return dask.utils.parse_timedelta(value) >= dask.utils.parse_timedelta(advised)
        except (TypeError, ValueError):
            return False
    return value == advised


def import_distributed():
    try:
        import distributed
    except ImportError as err:
        raise MissingExtraError(
            f"--dask-scheduler needs Dask's distributed scheduler, which is not installed: {EXTRA} "
            "(the 'dask' extra: dask[distributed] and dask-jobqueue)"
        ) from err
    return distributed


def connect(address: str):
    """A client of the scheduler at ``address``; a clear error when there is none."""
    distributed = import_distributed()
    try:
        return distributed.Client(address, timeout=_CONNECT_SECONDS)
    except (OSError, TimeoutError) as err:
        raise UsageError(
            f"no Dask scheduler answered at {address} within {_CONNECT_SECONDS} s ({err}): start "
            "one (`dask scheduler`, or a dask-jobqueue cluster; see docs/scale.md) and give its "
            "address, e.g. tcp://10.0.0.5:8786"
        ) from err
