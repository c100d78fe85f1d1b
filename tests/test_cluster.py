"""--dask-scheduler (bids_app/participant/cluster.py): participants on a Dask LocalCluster of
processes give the local executor's outputs, and a worker killed mid-participant loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from conftest import E2E_SPACE, dataset_engines, logging_restored

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.scheduler import CLUSTER_CONFIG, cluster_environment


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    # The session run's threads (conftest.run): N4 sums in another order with more threads
    return [
        str(root), str(out), "participant", "--output-spaces", E2E_SPACE, f"{E2E_SPACE}:res-2",
        "--preset", "fast", "--nthreads", "2", "--omp-nthreads", "1", "--skip-bids-validation",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded workers, each in its own (non-daemonic) process."""
    dask = pytest.importorskip("dask")
    distributed = pytest.importorskip("distributed")
    # For the nannies' first workers and for the ones they start again after a kill
    with dask.config.set(CLUSTER_CONFIG):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        yield cluster
        cluster.close()


def test_without_the_extra_the_option_names_it(dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with logging_restored():
        code = main(_argv(dataset[0], tmp_path, "--dask-scheduler", "tcp://127.0.0.1:1"))
    assert code == ExitCode.USAGE
    assert "pip install 'mninorm[dask]'" in capfd.readouterr().err


def _images(out: Path) -> dict:
    return {
        p.relative_to(out).as_posix(): np.asarray(nib.load(p).dataobj)
        for p in sorted(out.rglob("*.nii.gz"))
    }


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_local_cluster_gives_the_local_executors_outputs(run, cluster, tmp_path):
    """The same command as the session's ``run`` (local executor), on the cluster instead."""
    out = tmp_path / "out"
    with logging_restored():
        code = main(
            _argv(run["root"], out, "--dask-scheduler", cluster.scheduler_address),
            engines=dataset_engines(),
        )
    assert code == run["code"] == ExitCode.PARTICIPANT_FAILED  # sub-03's 4D T1w, both ways
    assert _files(out) == _files(run["out"])
    local, remote = _images(run["out"]), _images(out)
    assert local.keys() == remote.keys()
    for name, image in local.items():
        np.testing.assert_array_equal(remote[name], image, err_msg=name)
    failed = json.loads((out / "sub-03/log/sub-03_desc-mninorm_run.json").read_text())
    assert failed["Status"] == "failed" and failed["EndTime"]


def _busy_worker(client, timeout: float = 120.0) -> str:
    """The address of a worker running a participant's task (once its process has started)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for address, keys in client.processing().items():
            if any(str(key).startswith("mninorm-sub-") for key in keys):
                return address
        time.sleep(0.2)
    raise AssertionError("no participant's task started on the cluster")


@pytest.mark.slow
def test_a_worker_killed_mid_participant_loses_nothing(dataset, cluster, tmp_path):
    """SIGKILL a worker while it runs a participant: the task is redone on a worker (the nanny
    restarts the dead one), every participant ends complete, and no temporary file is left."""
    distributed = pytest.importorskip("distributed")
    root = dataset[0]
    out = tmp_path / "out"
    result = {}

    def mninorm():
        with logging_restored():
            result["code"] = main(
                _argv(root, out, "--participant-label", "01", "02", "--dask-scheduler",
                      cluster.scheduler_address),
                engines=dataset_engines(),
            )  # fmt: skip

    command = threading.Thread(target=mninorm)
    command.start()
    with distributed.Client(cluster.scheduler_address) as client:
        victim = _busy_worker(client)
        time.sleep(5)  # its participant's own process is working by now
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
    command.join(timeout=900)
    assert not command.is_alive()
    assert result["code"] == ExitCode.OK
    for record in out.glob("sub-*/log/*_desc-mninorm_run.json"):
        content = json.loads(record.read_text())
        assert content["Status"] == "ok" and content["EndTime"], record
    assert len(list(out.glob("sub-*/log/*_desc-mninorm_run.json"))) == 3
    assert not [p for p in out.rglob(".*") if ".part" in p.name]


def _environment_of_a_spawned_process(names) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, get_context("spawn")) as pool:
        return pool.submit(_read_environment, tuple(names)).result()


def _read_environment(names) -> dict:
    return {name: os.environ.get(name) for name in names}


def test_a_participants_process_on_a_worker_gets_the_run_threads_and_no_dask_malloc_setting(
    monkeypatch,
):
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 and one thread for the
    numeric libraries; the participant's process, spawned by the worker, must start with the
    run's --omp-nthreads and glibc's default allocator instead."""
    from bids_app.participant.cluster import prepare_participant_environment
    from bids_app.settings import THREAD_VARIABLES

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    for name in THREAD_VARIABLES:
        monkeypatch.setenv(name, "1")
    prepare_participant_environment(3)
    seen = _environment_of_a_spawned_process(("MALLOC_TRIM_THRESHOLD_", *THREAD_VARIABLES))
    assert seen.pop("MALLOC_TRIM_THRESHOLD_") is None
    assert seen == dict.fromkeys(THREAD_VARIABLES, "3")


# ---- mninorm's worker settings (scheduler.CLUSTER_CONFIG) ---------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_the_worker_settings_as_environment_variables_are_what_dask_reads_back():
    dask = pytest.importorskip("dask")
    read_back = dask.config.collect_env(cluster_environment())
    with dask.config.set(read_back):
        for key, value in CLUSTER_CONFIG.items():
            assert dask.config.get(key) == value, key


@pytest.mark.parametrize("document", ["Dockerfile", "docs/scale.md"])
def test_the_image_and_the_docs_give_workers_every_setting(document):
    text = (ROOT / document).read_text()
    for name, value in cluster_environment().items():
        assert f"{name}={value}" in text, f"{document} lacks {name}={value}"


@pytest.fixture
def threads_cluster():
    """A cluster whose workers are threads of this process: they read this process's config."""
    distributed = pytest.importorskip("distributed")

    def start():
        return distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        )

    return start


def test_workers_with_dasks_defaults_are_named_and_advised(threads_cluster, caplog):
    import dask

    from bids_app.participant.cluster import run_on_cluster

    defaults = {"distributed.admin.tick.interval": "20ms", "distributed.worker.daemon": True,
                "distributed.worker.profile.enabled": True,
                "distributed.worker.memory.monitor-interval": "100ms",
                "distributed.admin.system-monitor.interval": "500ms"}  # fmt: skip
    with dask.config.set(defaults), threads_cluster() as cluster:
        settings = SimpleNamespace(dask_scheduler=cluster.scheduler_address)
        with caplog.at_level("WARNING"):
            assert run_on_cluster({}, settings, None, None, None) == []
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for name, value in cluster_environment().items():
        assert f"{name}={value}" in warning
    assert "a daemonic worker cannot start a participant's process" in warning


def test_the_advice_speaks_of_daemonic_workers_only_when_they_are():
    from bids_app.scheduler import advice

    tick_only = advice(["distributed.admin.tick.interval"])
    assert "daemonic" not in tick_only
    assert "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s" in tick_only
    assert "PROFILE" not in tick_only


def test_workers_with_mninorms_settings_or_calmer_pass(threads_cluster):
    calmer = {**CLUSTER_CONFIG, "distributed.admin.system-monitor.interval": "5s"}
    assert _differing(threads_cluster, calmer) == []
    faster = {**CLUSTER_CONFIG, "distributed.admin.tick.interval": "200ms"}
    assert _differing(threads_cluster, faster) == ["distributed.admin.tick.interval"]


def _differing(start_cluster, config: dict) -> list[str]:
    import dask

    from bids_app.scheduler import connect, settings_differing

    with (
        dask.config.set(config),
        start_cluster() as cluster,
        connect(cluster.scheduler_address) as client,
    ):
        return settings_differing(client)


def test_the_advice_for_daemonic_workers_alone_speaks_of_nothing_else():
    from bids_app.scheduler import advice

    daemon_only = advice(["distributed.worker.daemon"])
    assert "a daemonic worker cannot start a participant's process" in daemon_only
    assert "wake-ups" not in daemon_only
