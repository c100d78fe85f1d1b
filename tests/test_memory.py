"""The memory estimate and the plan of ``--mem-mb`` (bids_app/memory.py)."""

from __future__ import annotations

import threading
import time

import nibabel as nib
import numpy as np
import pytest

from bids_app.memory import (
    DEFAULT_MODEL,
    MIB,
    MemoryBudget,
    MemoryModel,
    MemoryPlan,
    image_voxels,
    participant_estimate_mib,
    template_voxels,
)

# The default run's template grids: MNI152NLin2009cAsym res-1 and OASIS30ANTs (the calibration's)
DEFAULT_TEMPLATE_VOXELS = 193 * 229 * 193 + 200 * 230 * 232


def _nifti(path, shape):
    nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)).to_filename(path)
    return path


def test_image_voxels_reads_the_header_only(tmp_path):
    path = _nifti(tmp_path / "t1w.nii.gz", (10, 11, 12, 1))
    assert image_voxels(path) == 10 * 11 * 12
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    assert image_voxels(broken) == 0  # the T1w's loading says what is wrong with it


def test_template_voxels_counts_each_grid_once(tmp_path):
    a = _nifti(tmp_path / "a.nii.gz", (4, 5, 6))
    b = _nifti(tmp_path / "b.nii.gz", (2, 2, 2))
    assert template_voxels([a, b, a]) == 4 * 5 * 6 + 8


def test_the_estimate_is_linear_in_both_voxel_counts():
    model = MemoryModel(fixed_mib=100.0, t1w_bytes_per_voxel=50.0, template_bytes_per_voxel=8.0)
    base = model.estimate_mib(0, 0)
    assert base == 100.0
    assert model.estimate_mib(2 * MIB, 0) - base == pytest.approx(100.0)  # 2 Mi voxels x 50 B
    assert model.estimate_mib(0, MIB) - base == pytest.approx(8.0)


def test_a_participant_needs_what_its_largest_t1w_needs(tmp_path):
    small = _nifti(tmp_path / "run-1.nii.gz", (10, 10, 10))
    large = _nifti(tmp_path / "run-2.nii.gz", (40, 40, 40))
    both = participant_estimate_mib([small, large], DEFAULT_TEMPLATE_VOXELS)
    assert both == DEFAULT_MODEL.estimate_mib(40**3, DEFAULT_TEMPLATE_VOXELS)


# Measured peaks (MiB) of whole runs, docs/benchmark.md (setting default) and issue 18:
# (T1w voxels, peak). The model must not under-estimate any, nor over-estimate by much.
MEASURED = [
    (96 * 128 * 128, 1315),  # heads sub-01, 2 mm
    (256**3, 1919),  # heads sub-02, 1 mm
    (256**3, 1972),  # labelled-heads sub-02, 1 mm
    (170 * 256 * 256, 1606),  # heads sub-05
    (274 * 384 * 384, 3189),  # heads sub-04, 0.7 mm
    (320 * 320 * 197, 2093),  # labelled-heads sub-01 at 0.8 x 0.8 x 1.3 mm
    (512 * 512 * 120, 2700),  # issue 18's 512x512x120 scan, "2.7 GB"
]


@pytest.mark.parametrize(("voxels", "peak_mib"), MEASURED)
def test_the_calibrated_model_covers_the_measured_peaks(voxels, peak_mib):
    estimate = DEFAULT_MODEL.estimate_mib(voxels, DEFAULT_TEMPLATE_VOXELS)
    assert peak_mib <= estimate + 1  # rounding of the calibration figures
    assert estimate < 1.15 * peak_mib


def _plan(budget, slots=4, **estimates):
    return MemoryPlan(budget, {k.removeprefix("s"): v for k, v in estimates.items()}, slots)


@pytest.mark.parametrize(
    ("budget", "slots", "estimates", "most", "alone", "too_large"),
    [
        (4000, 2, {"s01": 1400, "s02": 2100, "s04": 3190}, 2, ("04",), ()),
        (4000, 4, {"s01": 1400, "s02": 1400, "s03": 1400}, 2, (), ()),
        (10000, 2, {"s01": 1400, "s02": 1400, "s03": 1400}, 2, (), ()),  # the threads limit
        (3000, 2, {"s01": 1400, "s04": 3190}, 1, (), ("04",)),
        (1000, 2, {"s01": 1400, "s02": 2100}, 0, (), ("01", "02")),
        (4000, 1, {"s01": 1400, "s02": 2100}, 1, (), ()),  # one slot: nobody runs "alone" more
    ],
)
def test_plan(budget, slots, estimates, most, alone, too_large):
    plan = _plan(budget, slots, **estimates)
    assert plan.most_at_once == most
    assert plan.alone == alone
    assert plan.too_large == too_large
    text = plan.describe()
    assert f"--mem-mb {budget}" in text and f"up to {most} at a time" in text
    for subject in too_large:
        assert f"sub-{subject}" in text.split("too large to start:")[1]
        reason = plan.refusal(subject)
        assert f"more than --mem-mb {budget}" in reason
        assert f"{plan.estimates_mib[subject]:.0f} MiB" in reason


def test_budget_holds_back_a_participant_until_the_memory_is_free():
    """Two threads reserve 600 and 500 of 1000: the second waits until the first is done."""
    budget = MemoryBudget(1000)
    in_use, peak, lock = [0], [0], threading.Lock()

    def participant(mib, seconds):
        with budget.reserve(mib):
            with lock:
                in_use[0] += mib
                peak[0] = max(peak[0], in_use[0])
            time.sleep(seconds)
            with lock:
                in_use[0] -= mib

    threads = [threading.Thread(target=participant, args=a) for a in ((600, 0.3), (500, 0.1))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert peak[0] == 600  # never both
    assert time.perf_counter() - start >= 0.4
    # and two that fit run together
    small = [threading.Thread(target=participant, args=(400, 0.2)) for _ in range(2)]
    peak[0] = 0
    for thread in small:
        thread.start()
    for thread in small:
        thread.join()
    assert peak[0] == 800


def test_budget_refuses_a_reservation_larger_than_itself():
    with (
        pytest.raises(ValueError, match="more than the whole budget"),
        MemoryBudget(1000).reserve(1001),
    ):
        pass
