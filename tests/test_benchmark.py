"""The benchmark (benchmarks/) in miniature, so that it cannot rot: a 6 mm synthetic case built
from nilearn's brain, the oracle and identity settings that check the scorer, and two real
settings (Greedy, whose file conventions are checked against its own resampling, and, slow,
mninorm --preset fast through its command line). The geometry underneath is checked
analytically."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("psutil")
from benchmarks import cases, measure, report, score, settings  # noqa: E402
from benchmarks.truth import Bumps, KnownTransform, random_affine  # noqa: E402

# ---- the known transform ------------------------------------------------------------------------


def _bumps(seed=0) -> Bumps:
    rng = np.random.default_rng(seed)
    return Bumps(
        centres=rng.uniform(-40, 40, (4, 3)),
        sigmas=rng.uniform(15, 25, 4),
        amplitudes=rng.uniform(-3, 3, (4, 3)),
    )


def test_bump_gradient_matches_finite_differences():
    bumps = _bumps()
    points = np.random.default_rng(1).uniform(-50, 50, (50, 3))
    step = 1e-4
    numeric = np.stack(
        [
            (bumps.displacement(points + step * e) - bumps.displacement(points - step * e))
            / (2 * step)
            for e in np.eye(3)
        ],
        axis=-1,
    )  # (N, component, axis)
    np.testing.assert_allclose(bumps.gradient(points), numeric, atol=1e-7)


def test_inverse_undoes_forward_and_determinant_is_analytic():
    affine = random_affine(np.random.default_rng(3), np.array([0.0, -10.0, 5.0]))
    truth = KnownTransform(affine, _bumps())
    points = np.random.default_rng(2).uniform(-60, 60, (500, 3))
    back, residual = truth.inverse(truth.forward(points))
    assert residual < 1e-3
    np.testing.assert_allclose(back, points, atol=1e-3)
    # det of the numerical Jacobian of Phi, against det(A) det(I + Du)
    step = 1e-3
    jac = np.stack(
        [(truth.forward(points + step * e) - truth.forward(points - step * e)) / (2 * step)
         for e in np.eye(3)], axis=-1,
    )  # fmt: skip
    np.testing.assert_allclose(truth.jacobian_determinant(points), np.linalg.det(jac), rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_random_affine_stays_within_the_issue_limits(seed):
    centre = np.array([10.0, -20.0, 15.0])
    affine = random_affine(np.random.default_rng(seed), centre)
    moved_centre = affine[:3, :3] @ centre + affine[:3, 3]
    assert np.all(np.abs(moved_centre - centre) <= 20.0)
    assert 0.85**3 <= np.linalg.det(affine[:3, :3]) <= 1.15**3
    assert np.linalg.det(affine[:3, :3]) > 0  # never a reflection


# ---- scoring pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("axes", ["RAS", "LIA", "PSR"])
@pytest.mark.parametrize(
    "gradient, expected_fold_share",
    [
        (np.diag([0.1, -0.2, 0.05]), 0.0),
        (np.array([[-1.5, 0.2, 0], [0, 0, 0], [0.1, 0, 0.3]]), 1.0),
    ],
)
def test_field_jacobian_is_exact_for_linear_fields_on_any_grid(axes, gradient, expected_fold_share):
    """u(x) = G x has det(I + G) everywhere, whatever the voxel axes and tilt of the grid."""
    affine, shape = cases.oriented_grid(
        np.array([[-20, -25, -15], [22, 18, 25]]), (2.0, 2.5, 3.0), axes, (7, -5, 3)
    )
    world = nib.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T)
    field = (world @ gradient.T).reshape(*shape, 3)
    det = score.field_jacobian(field, affine)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + gradient), rtol=1e-6)
    assert np.mean(det <= 0) == expected_fold_share


def test_label_overlap_merges_cortex_across_parcellations():
    a = np.zeros((20, 20, 20), np.int32)
    b = np.zeros_like(a)
    a[2:10, 2:10, 2:10] = 17  # left hippocampus, 512 voxels
    b[4:10, 2:10, 2:10] = 17  # 384 voxels, all inside a's
    a[12:18, 2:6, 2:6] = 1024  # left cortex (Desikan)
    a[12:18, 6:10, 2:6] = 1030
    b[12:18, 2:10, 2:6] = 11150  # the same voxels, one Destrieux label
    a[2:6, 12:18, 2:6] = 2  # left cerebral white matter: no overlap
    b[2:6, 12:18, 8:12] = 2
    overlap = score.label_overlap(a, b)
    assert overlap.per_structure["sub:left-hippocampus"] == pytest.approx(2 * 384 / (512 + 384))
    assert overlap.per_structure["ctx:left-cortex"] == 1.0
    assert overlap.per_structure["wm:left-cerebral-white-matter"] == 0.0
    assert np.isnan(overlap.per_structure["sub:right-putamen"])  # absent from both: not a zero
    assert overlap.subcortical_mean == pytest.approx(2 * 384 / (512 + 384))
    assert overlap.cortical_mean == 1.0  # the right hemisphere is absent, not counted


# ---- measuring a process from outside -----------------------------------------------------------

_ALLOCATE = textwrap.dedent(
    """
    import subprocess, sys, time
    block = bytearray({child_mb} * 2**20)  # touched: counted in RSS
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import time; b = bytearray({grandchild_mb} * 2**20); time.sleep(1.5)"])
    end = time.process_time() + 0.6
    while time.process_time() < end:
        pass
    grandchild.wait()
    """
)


def test_measure_counts_the_whole_process_tree(tmp_path):
    code = _ALLOCATE.format(child_mb=150, grandchild_mb=200)
    result = measure.run_measured(
        [sys.executable, "-c", code], env=dict(os.environ), log_path=tmp_path / "log.txt",
        timeout_s=60, poll_s=0.05,
    )  # fmt: skip
    assert result.returncode == 0 and not result.timed_out
    assert result.peak_rss_mb > 150 + 200  # both at once: only the tree sum sees that
    assert result.cpu_s >= 0.5  # the busy loop, and the grandchild's own time
    assert result.wall_s >= 1.5


def test_measure_does_not_count_the_parents_memory(tmp_path):
    """Regression: rusage's ru_maxrss of a child reports the parent's peak after fork + exec."""
    ballast = bytearray(600 * 2**20)  # this process (the parent) gets big
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))  # touch every page
    result = measure.run_measured(
        [sys.executable, "-c", "import time; time.sleep(0.5)"], env=dict(os.environ),
        log_path=tmp_path / "log.txt", timeout_s=60, poll_s=0.05,
    )  # fmt: skip
    del ballast
    assert result.peak_rss_mb < 200


def test_measure_stops_a_process_over_its_time_limit(tmp_path):
    result = measure.run_measured(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=dict(os.environ),
        log_path=tmp_path / "log.txt", timeout_s=1.0, poll_s=0.05,
    )  # fmt: skip
    assert result.timed_out
    assert result.wall_s < 15
    assert result.returncode != 0


# ---- report -------------------------------------------------------------------------------------


def test_markdown_ratios_are_against_the_reference_of_the_same_case(tmp_path):
    ref, other = settings.REFERENCE, "greedy"
    rows = {
        r.key: r
        for r in (
            report.Row("a", "synthetic", ref, "ok", wall_s=100, cpu_s=180, peak_rss_mb=500,
                       landmark_mean_mm=0.5, folding_share=0.0),
            report.Row("a", "synthetic", other, "ok", wall_s=20, cpu_s=36, peak_rss_mb=250,
                       landmark_mean_mm=0.75, folding_share=0.0),
            report.Row("b", "synthetic", ref, "ok", wall_s=400, cpu_s=700, peak_rss_mb=500,
                       landmark_mean_mm=1.0, folding_share=0.0),
            report.Row("b", "synthetic", other, "ok", wall_s=20, cpu_s=30, peak_rss_mb=500,
                       landmark_mean_mm=3.0, folding_share=0.001),
        )
    }  # fmt: skip
    report.write_rows(tmp_path, rows)
    assert report.read_rows(tmp_path) == rows  # the CSV round-trips
    text = report.render_markdown(rows, ref, {}, {})
    summary = next(line for line in text.splitlines() if line.startswith(f"| `{other}`"))
    cells = [c.strip() for c in summary.strip("|").split("|")]
    assert cells[3] == f"{(0.2 * 0.05) ** 0.5:.2f}"  # wall: geometric mean of 0.2 and 0.05
    assert cells[8] == f"{(1.5 * 3.0) ** 0.5:.2f}"  # error ratio
    assert cells[11] == "0.1"  # folding max, in %


# ---- the whole benchmark, tiny ------------------------------------------------------------------

TINY_GREEDY = settings.Setting(
    "greedy-tiny", "greedy", "Greedy with one level per stage (6 mm images are too small for 3)",
    (("affine_iterations", "100"), ("deformable_iterations", "50")), ("test",), 5,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from benchmarks.runner import run_benchmark, write_report

    out = tmp_path_factory.mktemp("bench")
    # mninorm itself (most of the time): test_mninorm_in_the_tiny_benchmark_beats_no_registration
    chosen = [settings.get_setting(n) for n in ("oracle", "identity")]
    chosen.append(TINY_GREEDY)
    rows = run_benchmark([cases.CASES["tiny-6mm"]], chosen, out, threads=1)
    write_report(out, rows)
    return out, rows


def _independent_truth(case_folder):
    """Phi from the case's parameters, with this test's own formula."""
    data = json.loads((case_folder / "case.json").read_text())["truth"]
    affine = np.asarray(data["affine_ras"])
    bumps = data["bumps"]
    landmarks = np.load(case_folder / "landmarks.npz")
    x = landmarks["fixed_ras"]
    u = np.zeros_like(x)
    for c, s, a in zip(bumps["centres_mm"], bumps["sigmas_mm"], bumps["amplitudes_mm"],
                       strict=True):  # fmt: skip
        u += np.exp(-((x - c) ** 2).sum(1) / (2 * s**2))[:, None] * np.asarray(a)
    return x, (x + u) @ affine[:3, :3].T + affine[:3, 3], landmarks["moving_ras"]


def test_tiny_benchmark_writes_its_table(tiny_run):
    out, rows = tiny_run
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header == report.COLUMNS
    assert {(r.setting, r.status) for r in rows.values()} == {
        ("oracle", "ok"), ("identity", "ok"), ("greedy-tiny", "ok")
    }  # fmt: skip
    markdown = (out / "results.md").read_text()
    assert "| tiny-6mm | `greedy-tiny` | ok |" in markdown
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cpus_usable"] >= 1 and "antspyx" in machine["versions"]
    for row in rows.values():
        assert row.wall_s > 0 and row.cpu_s > 0 and row.peak_rss_mb > 50


def test_tiny_case_is_built_as_specified(tiny_run):
    out, _ = tiny_run
    folder = out / "cases" / "tiny-6mm"
    checks = json.loads((folder / "case.json").read_text())["checks"]
    assert checks["inversion_residual_max_mm"] < 0.01
    x, y, stored = _independent_truth(folder)
    np.testing.assert_allclose(stored, y, atol=1e-6)
    moving = nib.load(folder / "moving.nii.gz")
    assert "".join(nib.aff2axcodes(moving.affine)) == "LIA"
    assert moving.header.get_zooms()[:3] == pytest.approx((6.5, 7.0, 6.0))
    data = np.asarray(moving.dataobj)
    support = np.asarray(nib.load(folder / "moving_mask.nii.gz").dataobj) > 0
    assert np.all(data[~support] == 0)  # a skull-stripped source stays skull-stripped
    # Direction: the moving image at Phi(x) shows what the fixed image shows at x.
    fixed = nib.load(folder / "fixed.nii.gz")
    mask = np.asarray(nib.load(folder / "fixed_mask.nii.gz").dataobj) > 0
    points = cases.world_points(fixed.affine, fixed.shape)[mask.ravel()].astype(float)
    truth = KnownTransform.from_json(json.loads((folder / "case.json").read_text())["truth"])
    values = fixed.get_fdata()[mask]

    def correlation(where):
        sampled = cases.sample(data.astype(np.float32), moving.affine, where, order=1)
        return np.corrcoef(values, sampled)[0, 1]

    assert correlation(truth.forward(points)) > 0.85
    assert correlation(truth.forward(points)) > correlation(truth.inverse(points)[0]) + 0.3


def test_oracle_recovers_the_truth_and_identity_scores_the_displacement(tiny_run):
    out, rows = tiny_run
    oracle, identity = rows[("tiny-6mm", "oracle")], rows[("tiny-6mm", "identity")]
    assert oracle.landmark_mean_mm < 0.05 and oracle.landmark_max_mm < 0.05
    assert oracle.folding_share == 0.0
    x, y, _ = _independent_truth(out / "cases" / "tiny-6mm")
    distance = np.linalg.norm(y - x, axis=1)
    assert identity.landmark_mean_mm == pytest.approx(distance.mean(), rel=1e-4)
    assert identity.landmark_p95_mm == pytest.approx(np.percentile(distance, 95), rel=1e-4)
    assert identity.landmark_max_mm == pytest.approx(distance.max(), rel=1e-4)
    assert identity.jacobian_min == pytest.approx(1.0, abs=1e-4)


def test_oracle_field_jacobian_matches_the_analytic_one(tiny_run):
    out, _ = tiny_run
    folder = out / "cases" / "tiny-6mm"
    transforms = json.loads((out / "runs" / "tiny-6mm" / "oracle" / "transforms.json")
                            .read_text())["transforms"]  # fmt: skip
    field = score.composed_field(transforms, folder / "fixed.nii.gz", out / "oracle_check_")
    vectors, affine = score.read_displacement_field(field)
    mask = np.asarray(nib.load(folder / "fixed_mask.nii.gz").dataobj) > 0
    # interior voxels only: central differences need both neighbours inside the field
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask)
    numeric = score.field_jacobian(vectors, affine)[inner]
    truth = KnownTransform.from_json(json.loads((folder / "case.json").read_text())["truth"])
    points = cases.world_points(affine, vectors.shape[:3])[inner.ravel()].astype(float)
    analytic = truth.jacobian_determinant(points)
    assert np.median(np.abs(numeric - analytic)) < 0.01
    assert np.abs(numeric - analytic).max() < 0.05


def _assert_beats_no_registration(rows, name):
    identity = rows[("tiny-6mm", "identity")].landmark_mean_mm
    row = rows[("tiny-6mm", name)]
    assert row.landmark_mean_mm < min(5.0, identity / 3), name
    assert row.folding_share < 0.01, name


def test_real_settings_beat_no_registration(tiny_run):
    _assert_beats_no_registration(tiny_run[1], "greedy-tiny")


@pytest.mark.slow
def test_mninorm_in_the_tiny_benchmark_beats_no_registration(tiny_run, tmp_path):
    """mninorm --preset fast as a benchmark setting: its command built and run, its transforms
    read from its outputs and scored, its row in the table. (Slow: four fifths of the tiny run.)"""
    from benchmarks.runner import run_benchmark, write_report

    out = tmp_path / "bench"
    shutil.copytree(tiny_run[0], out)  # the case and the other rows, kept as they are
    rows = run_benchmark([cases.CASES["tiny-6mm"]], [settings.get_setting("mninorm-fast")], out,
                         threads=1)  # fmt: skip
    write_report(out, rows)
    assert rows[("tiny-6mm", "mninorm-fast")].status == "ok"
    _assert_beats_no_registration(rows, "mninorm-fast")
    assert "| tiny-6mm | `mninorm-fast` | ok |" in (out / "results.md").read_text()


def test_greedy_files_convert_to_what_greedy_itself_does(tiny_run):
    """Greedy resamples the moving image with its own (RAS .mat, warp) files; ANTs, given the
    converted list the benchmark scores, must produce the same image."""
    import ants
    from picsl_greedy import Greedy3D

    out, _ = tiny_run
    folder = out / "cases" / "tiny-6mm"
    run = out / "runs" / "tiny-6mm" / "greedy-tiny"
    transforms = json.loads((run / "transforms.json").read_text())["transforms"]
    resliced = run / "greedy_resliced.nii.gz"
    Greedy3D().execute(
        f"-d 3 -threads 1 -rf {folder / 'fixed.nii.gz'} -rm {folder / 'moving.nii.gz'} {resliced} "
        f"-r {run / 'greedy_warp.nii.gz'} {run / 'greedy_affine_ras.mat'}"
    )
    fixed = ants.image_read(str(folder / "fixed.nii.gz"))
    moving = ants.image_read(str(folder / "moving.nii.gz"))
    by_ants = ants.apply_transforms(fixed, moving, transforms, whichtoinvert=[False] * 2).numpy()
    by_greedy = ants.image_read(str(resliced)).numpy()
    assert np.abs(by_ants - by_greedy).max() < 1e-3 * by_greedy.max()


def test_a_second_run_resumes_from_the_csv(tiny_run):
    from benchmarks.runner import run_benchmark

    out, _ = tiny_run
    before = report.read_rows(out)[("tiny-6mm", "identity")]
    again = run_benchmark([cases.CASES["tiny-6mm"]], [settings.get_setting("identity")], out)
    assert again[("tiny-6mm", "identity")] == before  # not re-run: same times, same start


def test_a_case_that_cannot_be_built_fails_only_the_rows_to_run(tmp_path):
    from benchmarks.runner import run_benchmark

    broken = cases.CaseDef("broken-2mm", "synthetic", "ds002748/sub-99", 2.0)  # no such scan
    kept = report.Row("broken-2mm", "synthetic", "identity", "ok", wall_s=1.5)
    report.write_rows(tmp_path, {kept.key: kept})
    chosen = [settings.get_setting("identity"), settings.get_setting("oracle")]
    rows = run_benchmark([broken], chosen, tmp_path)
    assert rows[kept.key] == kept  # an earlier result is not overwritten by the failure
    failed = rows[("broken-2mm", "oracle")]
    assert failed.status == "failed" and failed.reason.startswith("case not built")
    assert report.read_rows(tmp_path)[failed.key].status == "failed"


# ---- command line -------------------------------------------------------------------------------


def test_selection_filters_and_names():
    assert [c.name for c in cases.select_cases("quick")] == ["ds01-2mm"]
    assert "tiny-6mm" not in [c.name for c in cases.select_cases("full")]
    full = settings.select_settings("full")
    assert full[0].name == settings.REFERENCE
    assert {"oracle", "identity"}.isdisjoint(s.name for s in full)
    quick = {s.name for s in settings.select_settings("quick")}
    assert {"smriprep-precise000", "greedy", settings.REFERENCE} <= quick
    chosen = settings.select_settings("full", ["greedy", settings.REFERENCE])
    assert [s.name for s in chosen] == [settings.REFERENCE, "greedy"]
    generic = settings.get_setting("mninorm-fast-greedy2")
    assert generic.option == {"preset": "fast", "engine": "greedy2"}
    with pytest.raises(ValueError, match="unknown setting"):
        settings.get_setting("elastix")
    with pytest.raises(ValueError, match="unknown case"):
        cases.select_cases("full", ["nope"])


def test_command_line_lists_and_rejects_unknown_names(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(settings.REPOSITORY)}
    listed = subprocess.run([sys.executable, "-m", "benchmarks", "list"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0 and "ds01-2mm" in listed.stdout and "ants-syn-s" in listed.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--cases", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown case" in bad.stderr


# ---- on real data (slow) ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared
def test_real_case_has_an_exact_truth(shared_data, tmp_path):
    """The quick subset's case, built from ds002748: the scorer's oracle and identity on it."""
    from benchmarks.runner import run_benchmark

    chosen = [settings.get_setting(n) for n in ("oracle", "identity")]
    rows = run_benchmark([cases.CASES["ds01-2mm"]], chosen, tmp_path, threads=2)
    assert rows[("ds01-2mm", "oracle")].landmark_max_mm < 0.05
    identity = rows[("ds01-2mm", "identity")]
    x, y, stored = _independent_truth(tmp_path / "cases" / "ds01-2mm")
    np.testing.assert_allclose(stored, y, atol=1e-6)
    assert identity.landmark_mean_mm == pytest.approx(np.linalg.norm(y - x, axis=1).mean(), 1e-4)
