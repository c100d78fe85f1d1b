"""The connection to a running Dask scheduler (``--dask-scheduler ADDRESS``), shared by the
participant level (one task per participant) and the group level (reading maps on the cluster).

Dask is the optional 'dask' extra: without it, a clear error naming the extra.
"""

from __future__ import annotations

from bids_app.errors import MissingExtraError, UsageError

EXTRA = "pip install 'mninorm[dask]'"
_CONNECT_SECONDS = 30


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
