"""The group level: synthetic participant folders with known answers (a planted volume change, a
planted QC outlier, bad files), the real end-to-end run of ``conftest.run``, and (slow) real scans.

Synthetic cohorts live on the test template's 6 mm (res-2) grid; they are written with
``benchmarks/synth_group.py``'s ``write_t1w``, as the participant level lays its files out.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from browser import open_report
from conftest import TEST_TEMPLATE, logging_restored
from qc_cases import templates_in
from scipy import stats

from bids_app.cli import main
from bids_app.errors import ExitCode, MissingInputError, MninormError
from bids_app.group import GroupSettings, run_group
from bids_app.group import maps as maps_module
from bids_app.group.accumulate import RunningStats
from bids_app.group.cohort import robust_z
from bids_app.outputs import derivatives as drv
from bids_app.spaces import OutputSpace

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "synth_group", ROOT / "benchmarks" / "synth_group.py"
)
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

SPACE = OutputSpace(TEST_TEMPLATE, 2)  # the test template's 6 mm grid: small and quick
OTHER = OutputSpace(TEST_TEMPLATE)  # its 3 mm grid, for runs with two spaces
LABEL = drv.space_label(SPACE)
CENTRE_MM, RADIUS_MM = (-30.0, -10.0, 5.0), 12.0
EFFECT, NOISE = 0.15, 0.05


# ---- a small synthetic cohort ----------------------------------------------------------------


class Grid:
    """The test template's grid, brain and mask (what the maps of a perfect normalisation are)."""

    def __init__(self, template):
        head = nib.load(str(template.t1w_path))
        self.affine = head.affine
        self.head = np.asarray(head.dataobj, dtype=np.float32)
        self.mask = (np.asarray(nib.load(str(template.mask_path)).dataobj) > 0).astype(np.uint8)
        self.shape = self.head.shape
        self.planted = synth.sphere(self.shape, self.affine, CENTRE_MM, RADIUS_MM) & (self.mask > 0)


@pytest.fixture(scope="module")
def fetch(templateflow_home):
    return templates_in(templateflow_home)


@pytest.fixture(scope="module")
def grid(fetch) -> Grid:
    return Grid(fetch(TEST_TEMPLATE, 2))


@pytest.fixture(scope="module")
def other_grid(fetch) -> Grid:
    return Grid(fetch(TEST_TEMPLATE, 1))


@pytest.fixture(autouse=True)
def _keep_logging():
    with logging_restored():
        yield


def images(grid: Grid, rng, effect: float = 0.0, gain: float = 1.0) -> synth.SpaceImages:
    t1w = grid.head * gain + rng.normal(0, 2.0, grid.shape).astype(np.float32)
    logjacs = []
    for _ in range(2):
        logjac = rng.normal(0, NOISE, grid.shape).astype(np.float32)
        logjac[grid.planted] += effect
        logjacs.append(logjac)
    return synth.SpaceImages(grid.affine, t1w, grid.mask, *logjacs)


def write_cohort(out: Path, grid: Grid, groups: dict[str, str], seed=0, order=None, **extra):
    """One T1w per participant; group 'A' has the planted effect. Returns the images written."""
    rng = np.random.default_rng(seed)
    written = {}
    for label in sorted(groups):  # random draws in label order: the same images whatever ``order``
        written[label] = images(
            grid, rng, EFFECT if groups[label] == "A" else 0.0, rng.uniform(0.8, 1.2)
        )
    metrics = {label: synth.typical_metrics(rng) for label in sorted(groups)}
    for label in order or sorted(groups):
        synth.write_t1w(out, label, {SPACE: written[label]}, metrics=metrics[label], **extra)
    return written


def write_bids(root: Path, column: str, values: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    lines = [f"participant_id\t{column}\tage", *(f"sub-{k}\t{v}\t30" for k, v in values.items())]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root


def group(out: Path, fetch, bids: Path | None = None, column: str | None = None):
    return run_group(GroupSettings(out, bids, column), fetch_template=fetch)


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def table(out: Path) -> list[dict]:
    from bids_app.reports.qc import read_qc_table

    return read_qc_table(drv.group_table_path(out, "qc"))


def t_map(out: Path, jacobian="total", contrast="group") -> np.ndarray:
    return load(drv.group_space_path(out, "t", LABEL, jacobian, contrast))


GROUPS = {f"{i:02d}": ("A" if i <= 6 else "B") for i in range(1, 13)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, grid, fetch):
    """Twelve participants, six with +EFFECT in the sphere; the group level run once."""
    root = tmp_path_factory.mktemp("planted")
    out = root / "out"
    written = write_cohort(out, grid, GROUPS)
    bids = write_bids(root / "bids", "group", GROUPS)
    outcome = group(out, fetch, bids, "group")
    return {"out": out, "bids": bids, "images": written, "outcome": outcome, "root": root}


# ---- the planted effect ----------------------------------------------------------------------


@pytest.mark.parametrize("jacobian", ["total", "nonlinear"])
def test_t_map_is_strongly_positive_where_the_effect_was_planted(planted, grid, jacobian):
    t = t_map(planted["out"], jacobian)
    inside, outside = grid.planted, (grid.mask > 0) & ~grid.planted
    # expected t ~ EFFECT / NOISE * sqrt(6 * 6 / 12) = 5.2 in the sphere
    assert t[inside].mean() > 4.0
    assert np.median(t[inside]) > 4.0
    assert np.abs(t[outside]).mean() < 1.0  # E|t| of a t(10) variable: 0.86
    effect = load(drv.group_space_path(planted["out"], "effect", LABEL, jacobian, "group"))
    assert abs(effect[inside].mean() - EFFECT) < 0.01
    assert abs(effect[outside].mean()) < 0.005


def test_t_values_are_scipys_pooled_two_sample_t(planted, grid):
    t = t_map(planted["out"])
    a = np.stack([planted["images"][k].logjac_total for k in sorted(GROUPS) if GROUPS[k] == "A"])
    b = np.stack([planted["images"][k].logjac_total for k in sorted(GROUPS) if GROUPS[k] == "B"])
    voxels = np.argwhere(grid.mask > 0)[::997]
    expected = stats.ttest_ind(a[(slice(None), *voxels.T)], b[(slice(None), *voxels.T)], axis=0)
    assert np.allclose(t[tuple(voxels.T)], expected.statistic, rtol=1e-4, atol=1e-4)


def test_swapping_the_groups_flips_the_sign(planted, fetch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(planted["out"], out)
    before = t_map(out)
    swapped = {k: "B" if v == "A" else "A" for k, v in GROUPS.items()}
    group(out, fetch, write_bids(tmp_path / "swapped", "group", swapped), "group")
    after = t_map(out)
    assert np.allclose(after, -before, atol=1e-5)
    assert (before != 0).mean() > 0.5


def test_t_map_sidecar_names_groups_counts_df_and_that_it_is_uncorrected(planted):
    path = drv.group_space_path(planted["out"], "t", LABEL, "total", "group")
    sidecar = json.loads(drv.sidecar_path(path).read_text())
    assert sidecar["GroupBy"]["Levels"] == ["A", "B"]
    assert sidecar["GroupBy"]["Counts"] == {"A": 6, "B": 6}
    assert sidecar["GroupBy"]["Contrast"] == "A minus B"
    assert sidecar["DegreesOfFreedom"] == [10]
    assert sidecar["Jacobian"]["Kind"] == "total"
    assert "uncorrected" in sidecar["MultipleComparisonCorrection"]
    assert len(sidecar["Included"]) == len(sidecar["Sources"]) == 12
    assert sidecar["Sources"][0] == (
        f"bids::sub-01/anat/sub-01_space-{LABEL}_desc-total_logjacobian.nii.gz"
    )
    assert sidecar["Excluded"] == []


def test_group_report_is_self_contained_and_links_every_participant(planted):
    page = (planted["out"] / "group.html").read_text()
    assert (
        "<script src" not in page and "<link" not in page and "http" not in page.split("<body")[1]
    )
    assert page.count('<figure class="thumb') == 12
    assert page.count("data:image/png;base64,") >= 12 + 1 + 2  # thumbnails, mean T1w, t maps
    assert f"the outline of the {TEST_TEMPLATE} brain mask" in page
    assert 'class="sortable cohort"' in page
    # participant reports do not exist here: names, not dangling links
    assert 'href="sub-01.html"' not in page and "sub-01" in page


def test_group_report_in_a_browser_shows_every_picture_and_sorts(planted, browser):
    out = planted["out"]
    page, log = open_report(browser, out / "group.html")
    try:
        pictures = page.eval_on_selector_all(
            "img", "all => all.map(i => [i.complete, i.naturalWidth])"
        )
        assert len(pictures) == 12 + 3 and all(done and width > 0 for done, width in pictures)

        def first_column():
            return page.eval_on_selector_all(
                "table.cohort tbody tr td:first-child", "all => all.map(td => td.textContent)"
            )

        page.click("table.cohort thead th:text-is('robust z')")
        by_z = sorted(table(out), key=lambda row: -float(row["robust_z_max"]))
        assert first_column() == [row["participant_id"] for row in by_z]
        page.click("table.cohort thead th:text-is('participant')")
        page.click("table.cohort thead th:text-is('participant')")
        assert first_column() == [f"sub-{label}" for label in sorted(GROUPS, reverse=True)]
        assert log.console_errors == [] and log.outside_requests == []
    finally:
        page.context.close()


# ---- the average maps are numpy's ------------------------------------------------------------


def test_mean_and_sd_maps_are_numpys_over_the_included_participants(tmp_path, grid, fetch):
    out = tmp_path / "out"
    rng = np.random.default_rng(3)
    kept = {label: images(grid, rng, gain=rng.uniform(0.5, 2.0)) for label in ("01", "02", "03")}
    for label in ("01", "02"):
        synth.write_t1w(out, label, {SPACE: kept[label]}, metrics=synth.typical_metrics(rng))
    second_run = images(grid, rng, gain=1.7)  # sub-03 has two runs: their mean counts once
    synth.write_t1w(out, "03", {SPACE: kept["03"]}, run="1", metrics=synth.typical_metrics(rng))
    synth.write_t1w(out, "03", {SPACE: second_run}, run="2", metrics=synth.typical_metrics(rng))
    failed = images(grid, rng)
    synth.write_t1w(out, "04", {SPACE: failed}, metrics=synth.typical_metrics(rng), status="fail")
    group(out, fetch)

    def scaled(maps):
        return maps.t1w.astype(np.float64) / np.median(maps.t1w[maps.mask > 0])

    per_participant = {
        "t1w": [
            scaled(kept["01"]), scaled(kept["02"]), (scaled(kept["03"]) + scaled(second_run)) / 2,
        ],
        "logjac_total": [
            kept["01"].logjac_total, kept["02"].logjac_total,
            (kept["03"].logjac_total.astype(np.float64) + second_run.logjac_total) / 2,
        ],
    }  # fmt: skip
    for kind, stack in per_participant.items():
        stack = np.stack(stack).astype(np.float64)
        prefix = "t1w" if kind == "t1w" else "logjac"
        jacobian = "" if kind == "t1w" else "total"
        mean = load(drv.group_space_path(out, f"{prefix}_mean", LABEL, jacobian))
        sd = load(drv.group_space_path(out, f"{prefix}_sd", LABEL, jacobian))
        assert np.allclose(mean, stack.mean(0), rtol=1e-5, atol=1e-6)
        assert np.allclose(sd, stack.std(0, ddof=1), rtol=1e-4, atol=1e-6)
    probseg = load(drv.group_space_path(out, "brain_probseg", LABEL))
    assert set(np.unique(probseg)) <= {0.0, 1.0}
    sidecar = json.loads(drv.sidecar_path(drv.group_space_path(out, "t1w_mean", LABEL)).read_text())
    assert sidecar["ParticipantCount"] == 3 and sidecar["T1wCount"] == 4
    assert [e["Participant"] for e in sidecar["Excluded"]] == ["sub-04"]
    assert sidecar["Excluded"][0]["Reason"].startswith("QC fail")
    rows = {(r["participant_id"], r["run"]): r for r in table(out)}
    assert rows["sub-04", "n/a"]["included"] == "no"
    assert rows["sub-03", "2"]["included"] == "yes"


def test_running_stats_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    samples = rng.normal(3, 2, (9, 4, 5))
    one, parts = RunningStats(), [RunningStats(), RunningStats()]
    for i, sample in enumerate(samples):
        one.add(sample.copy())
        parts[i % 2].add(sample.copy())
    merged = RunningStats()
    for part in parts:
        merged.absorb(part)
    for stats_ in (one, merged):
        assert stats_.count == 9
        assert np.allclose(stats_.mean, samples.mean(0))
        assert np.allclose(stats_.sd(), samples.std(0, ddof=1))


# ---- order independence ----------------------------------------------------------------------


def test_results_do_not_depend_on_the_order_participants_were_processed(tmp_path, grid, fetch):
    labels = {f"{i:02d}": ("A" if i % 2 else "B") for i in range(1, 7)}
    bids = write_bids(tmp_path / "bids", "group", labels)
    outs = []
    for name, order in (("forward", sorted(labels)), ("backward", sorted(labels)[::-1])):
        out = tmp_path / name
        write_cohort(out, grid, labels, seed=5, order=order)
        group(out, fetch, bids, "group")
        outs.append(drv.group_dir(out))
    first, second = outs
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert any(name.endswith("_statmap.nii.gz") for name in names)
    for name in names:
        if name.endswith(".nii.gz"):
            assert np.array_equal(load(first / name), load(second / name)), name
        else:
            assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _same_group_outputs(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        if name.endswith(".nii.gz"):  # merged partial sums: equal to float32 precision
            assert np.allclose(load(first / name), load(second / name), rtol=1e-6, atol=1e-7), name
        elif name.endswith(".json"):
            assert json.loads((first / name).read_text()) == json.loads(
                (second / name).read_text()
            ), name


@pytest.mark.parametrize("reader", ["processes", "dask"])
def test_maps_read_in_parallel_blocks_equal_one_process(planted, fetch, tmp_path, monkeypatch,
                                                        caplog, reader):  # fmt: skip
    caplog.set_level("INFO", logger="bids_app.group.maps")
    out = tmp_path / "out"
    shutil.copytree(planted["out"], out)
    shutil.rmtree(drv.group_dir(out))
    monkeypatch.setattr(maps_module, "MIN_PARTICIPANTS_PER_WORKER", 1)  # 12 participants: 2 blocks
    settings = GroupSettings(out, planted["bids"], "group", workers=2)
    if reader == "dask":
        distributed = pytest.importorskip("distributed")
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        )
        settings = replace(settings, workers=1, dask_scheduler=cluster.scheduler_address)
    try:
        outcome = run_group(settings, fetch_template=fetch)
    finally:
        if reader == "dask":
            cluster.close()
    assert len(outcome.written) == len(planted["outcome"].written)
    expected = "on the Dask cluster" if reader == "dask" else "in 2 process(es)"
    assert f"reading 12 participants' maps {expected}" in caplog.text
    _same_group_outputs(drv.group_dir(planted["out"]), drv.group_dir(out))


# ---- robust outliers -------------------------------------------------------------------------


def test_robust_outlier_flags_a_normalisation_that_passes_every_fixed_threshold(
    tmp_path, grid, fetch
):
    out = tmp_path / "out"
    rng = np.random.default_rng(1)
    same = synth.typical_metrics(rng)  # every other metric equal: no robust z-score but ncc's
    for i in range(1, 13):
        metrics = {**same, "ncc": 0.71 if i == 7 else 0.80 + 0.004 * rng.standard_normal()}
        synth.write_t1w(out, f"{i:02d}", {SPACE: images(grid, rng)}, metrics=metrics)
    group(out, fetch)
    rows = {r["participant_id"]: r for r in table(out)}
    flagged = [p for p, r in rows.items() if r["outlier"] == "yes"]
    assert flagged == ["sub-07"]
    assert rows["sub-07"]["status"] == "pass" and rows["sub-07"]["included"] == "yes"
    assert "ncc = 0.71" in rows["sub-07"]["outlier_reasons"]
    assert float(rows["sub-07"]["robust_z_max"]) > 3.5
    page = (out / "group.html").read_text()
    assert page.count('class="thumb pass outlier"') == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0], [-1.349, -0.674, 0.0, 0.674, 1.349]),  # MAD 1
        ([0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 3.990]),  # MAD 0: mean AD 0.2
        ([2.0, 2.0, 2.0], [0.0, 0.0, 0.0]),  # no spread at all
    ],
)
def test_robust_z_scores(values, expected):
    assert np.allclose(robust_z(np.array(values)), expected, atol=1e-3)


def test_too_few_rows_are_not_judged(tmp_path, grid, fetch):
    out = tmp_path / "out"
    write_cohort(out, grid, {"01": "A", "02": "B", "03": "A"})
    group(out, fetch)
    assert {r["outlier"] for r in table(out)} == {"n/a"}
    assert "outliers not judged: 3 T1w" in (out / "group.html").read_text()


# ---- bad input -------------------------------------------------------------------------------


def test_no_participant_results_is_exit_66_with_a_message(tmp_path, capfd):
    bids = write_bids(tmp_path / "bids", "group", {})
    out = tmp_path / "out"
    (out / "sub-01").mkdir(parents=True)  # a folder, but nothing the participant level wrote
    code = main([str(bids), str(out), "group"])
    err = capfd.readouterr().err
    assert code == ExitCode.MISSING_INPUT
    assert "no participant-level results in" in err and "participant` first" in err
    assert "Traceback" not in err
    assert not drv.group_dir(out).exists() and not (out / "group.html").exists()
    with pytest.raises(MissingInputError):
        run_group(GroupSettings(tmp_path / "nowhere"))


def test_participant_labels_restrict_the_group_and_unknown_ones_are_exit_18(
    planted, tmp_path, capfd
):
    out = tmp_path / "out"
    shutil.copytree(planted["out"], out)
    code = main([str(planted["bids"]), str(out), "group", "--participant-label", "99"])
    assert code == ExitCode.NOTHING_MATCHED
    assert "sub-99" in capfd.readouterr().err
    code = main([str(planted["bids"]), str(out), "group", "--participant-label", "01", "sub-12"])
    assert code == ExitCode.OK
    assert [row["participant_id"] for row in table(out)] == ["sub-01", "sub-12"]


def test_participants_on_another_grid_than_the_templates_keep_theirs(tmp_path, other_grid, fetch):
    out = tmp_path / "out"  # 3 mm images filed under the 6 mm space: a changed template folder
    write_cohort(out, other_grid, {"01": "A", "02": "B", "03": "A"})
    group(out, fetch)
    mean = drv.group_space_path(out, "t1w_mean", LABEL)
    assert load(mean).shape == other_grid.shape
    assert json.loads(drv.sidecar_path(mean).read_text())["Grid"].startswith("the cohort's most")
    assert all(row["included"] == "yes" for row in table(out))
    assert "is not the one the participants&#x27; images are on" in (out / "group.html").read_text()


def test_spaces_of_other_templates_and_resolutions_are_handled_apart(
    tmp_path, grid, other_grid, fetch
):
    out = tmp_path / "out"
    rng = np.random.default_rng(2)
    unknown = OutputSpace("NoSuchTemplate")  # not in TemplateFlow: grid and outline from the cohort
    for i in range(1, 4):
        both = {SPACE: images(grid, rng), OTHER: images(other_grid, rng)}
        synth.write_t1w(out, f"{i:02d}", both, metrics=synth.typical_metrics(rng))
    for i in range(4, 6):
        synth.write_t1w(
            out, f"{i:02d}", {unknown: images(grid, rng)}, metrics=synth.typical_metrics(rng)
        )
    outcome = group(out, fetch)
    assert set(outcome.spaces) == {str(SPACE), str(OTHER), str(unknown)}
    counts = {}
    for space in (SPACE, OTHER, unknown):
        path = drv.group_space_path(out, "t1w_mean", drv.space_label(space))
        sidecar = json.loads(drv.sidecar_path(path).read_text())
        counts[str(space)] = sidecar["ParticipantCount"]
        assert load(path).shape == (other_grid if space == OTHER else grid).shape
    assert counts == {str(SPACE): 3, str(OTHER): 3, str(unknown): 2}
    unknown_sidecar = json.loads(drv.sidecar_path(
        drv.group_space_path(out, "t1w_mean", "NoSuchTemplate")).read_text())  # fmt: skip
    assert unknown_sidecar["Grid"].startswith("the cohort's most common grid")
    assert "SpatialReference" not in unknown_sidecar
    spaces_in_table = [r["space"] for r in table(out)]
    assert spaces_in_table.count(str(OTHER)) == 3 and spaces_in_table.count("NoSuchTemplate") == 2
    page = (out / "group.html").read_text()
    assert "the outline of the cohort&#x27;s mean brain mask" in page
    assert "NoSuchTemplate: the template is not available here" in page
    # thumbnails on the finest grid of each template only
    assert page.count('<figure class="thumb') == 3 + 2


def _corrupt(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated gzip: the header still reads


# participant -> (how its files are damaged, what the table must say)
DAMAGES = {
    "02": (lambda out: _corrupt(_map(out, "02", "desc-total_logjacobian")),
           "desc-total_logjacobian.nii.gz cannot be read"),
    "03": (lambda out: _map(out, "03", "desc-brain_mask").unlink(),
           "desc-brain_mask.nii.gz is missing"),
    "04": (lambda out: (_anat(out, "04") / "sub-04_desc-mninorm_qc.tsv").unlink(),
           "--reports-only --participant-label 04"),
    "05": (lambda out: (out / "sub-05" / "log" / "sub-05_desc-mninorm_run.json").unlink(),
           "no run record"),
    "06": (lambda out: _nan_in(_map(out, "06", "desc-preproc_T1w")), "has NaN or infinite values"),
    "07": (lambda out: _regrid(_map(out, "07", "desc-nonlinear_logjacobian")),
           "is on another grid"),
}  # fmt: skip


def test_partial_or_corrupt_participants_are_skipped_and_the_table_says_why(
    tmp_path, grid, fetch, capfd
):
    out = tmp_path / "out"
    labels = {f"{i:02d}": ("A" if i % 2 else "B") for i in range(1, 12)}
    write_cohort(out, grid, labels)
    for damage, _ in DAMAGES.values():
        damage(out)
    bids = write_bids(tmp_path / "bids", "group", labels)
    # (no permutations: what is checked here is who is left out, not the model's inference)
    code = main([str(bids), str(out), "group", "--group-by", "group", "--n-permutations", "0"])
    err = capfd.readouterr().err
    assert code == ExitCode.OK, err
    assert "Traceback" not in err
    rows = {r["participant_id"]: r for r in table(out)}
    page = (out / "group.html").read_text().replace("&#x27;", "'")
    for label, (_, reason) in DAMAGES.items():
        row = rows[f"sub-{label}"]
        assert row["included"] == "no" and reason in row["exclusion_reason"], label
        assert reason in page
    assert all(
        rows[f"sub-{label}"]["included"] == "yes" for label in ("01", "08", "09", "10", "11")
    )
    t_path = drv.group_space_path(out, "t", LABEL, "total", "group")
    sidecar = json.loads(drv.sidecar_path(t_path).read_text())
    assert sidecar["GroupBy"]["Counts"] == {"A": 3, "B": 2}  # 01, 09, 11 / 08, 10
    assert sorted(e["Participant"] for e in sidecar["Excluded"]) == [f"sub-{k}" for k in DAMAGES]


@pytest.mark.parametrize("checker", ["threads", "dask"])
def test_files_checked_in_parallel_keep_the_order_and_the_reasons(
    tmp_path, grid, fetch, monkeypatch, caplog, checker
):
    from bids_app.group import collect as collect_module

    caplog.set_level("INFO", logger="bids_app.group.collect")

    out = tmp_path / "out"
    write_cohort(out, grid, {f"{i:02d}": ("A" if i % 2 else "B") for i in range(1, 12)})
    for damage, _ in DAMAGES.values():
        damage(out)
    serial = collect_module.collect(out, fetch)
    monkeypatch.setattr(collect_module, "MIN_CHECKS_PER_WORKER", 1)  # 11 T1w: 3 threads
    if checker == "threads":
        seen = set()
        original = collect_module._check

        def watched(result, grid, cuts):
            seen.add(threading.current_thread().name)
            return original(result, grid, cuts)

        monkeypatch.setattr(collect_module, "_check", watched)
        parallel = collect_module.collect(out, fetch, workers=3)
        assert len({name for name in seen if name.startswith("mninorm-check")}) >= 2, seen
        assert "checked the files of 11 T1w in 3 thread(s)" in caplog.text
    else:
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:  # fmt: skip
            parallel = collect_module.collect(out, fetch, client=client)
        assert "checked the files of 11 T1w on the Dask cluster" in caplog.text
    (first,), (second,) = serial.spaces, parallel.spaces
    assert [r.sort_key() for r in second.results] == [r.sort_key() for r in first.results]
    assert [r.problem for r in second.results] == [r.problem for r in first.results]
    for label, (_, reason) in DAMAGES.items():
        (found,) = [r for r in second.results if r.subject == label]
        assert reason in (found.problem or "") or label == "04", label  # 04: the QC table
    for a, b in zip(first.results, second.results, strict=True):
        assert (a.preview is None) == (b.preview is None)
        if a.preview is not None:
            assert all(np.array_equal(x, y) for x, y in zip(a.preview, b.preview, strict=True))


def test_a_record_this_version_cannot_read_excludes_its_t1w_with_a_warning(tmp_path, grid, caplog):
    from bids_app.group.collect import find_results

    out = tmp_path / "out"
    write_cohort(out, grid, {"01": "A", "02": "B"})
    record = out / "sub-02" / "log" / "sub-02_desc-mninorm_run.json"
    content = json.loads(record.read_text())
    content["Spaces"] = content.pop("OutputSpaces")
    record.write_text(json.dumps(content))
    with caplog.at_level("WARNING"):
        first, second = find_results(out)
    assert first.usable and first.run_ok
    assert not second.run_ok and "no run record" in second.problem
    assert str(record) in caplog.text and "lacks OutputSpaces" in caplog.text


def _anat(out: Path, label: str) -> Path:
    return out / f"sub-{label}" / "anat"


def _map(out: Path, label: str, name: str) -> Path:
    return _anat(out, label) / f"sub-{label}_space-{LABEL}_{name}.nii.gz"


def _nan_in(path: Path) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    data[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _regrid(path: Path) -> None:
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine), str(path))


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("diagnosis", None, "has no column 'diagnosis' (its columns: group, age)"),
        ("group", {f"{i:02d}": "A" for i in range(1, 7)}, "only 1 level"),
        ("group", {"01": "A", "02": "A", "03": "B", "04": "n/a", "05": "n/a", "06": "n/a"},
         "fewer than 2 participants"),
    ],
    ids=["missing-column", "one-level", "one-participant-level"],
)  # fmt: skip
def test_an_unusable_group_by_still_writes_the_rest_and_exits_65(
    tmp_path, grid, fetch, capfd, column, values, message
):
    out = tmp_path / "out"
    labels = {f"{i:02d}": ("A" if i <= 3 else "B") for i in range(1, 7)}
    write_cohort(out, grid, labels)
    bids = write_bids(tmp_path / "bids", "group", values or labels)
    code = main([str(bids), str(out), "group", "--group-by", column])
    err = capfd.readouterr().err
    assert code == ExitCode.GROUP_BY_UNUSABLE
    assert message in err and "Traceback" not in err
    assert drv.group_space_path(out, "t1w_mean", LABEL).is_file()
    assert drv.group_space_path(out, "logjac_mean", LABEL, "total").is_file()
    assert not list(drv.group_dir(out).glob("*_contrast-*"))  # no t, F or effect maps
    assert message in (out / "group.html").read_text().replace("&#x27;", "'")
    assert len(table(out)) == 6


def test_group_by_without_participants_tsv_or_bids_dir(tmp_path, grid, capfd):
    out = tmp_path / "out"
    write_cohort(out, grid, {f"{i:02d}": "A" for i in range(1, 4)})
    missing = tmp_path / "moved-away"
    assert main([str(missing), str(out), "group"]) == ExitCode.OK  # bids_dir is optional
    code = main([str(missing), str(out), "group", "--group-by", "group"])
    err = capfd.readouterr().err
    assert code == ExitCode.GROUP_BY_UNUSABLE
    assert f"bids_dir {missing} is not here to read participants.tsv from" in err
    empty_bids = tmp_path / "bids"
    empty_bids.mkdir()
    assert main([str(empty_bids), str(out), "group", "--group-by", "group"]) == 65
    assert "participants.tsv does not exist" in capfd.readouterr().err


def test_three_levels_give_an_f_map(tmp_path, grid, fetch):
    out = tmp_path / "out"
    labels = {f"{i:02d}": "ABC"[(i - 1) % 3] for i in range(1, 10)}
    written = write_cohort(out, grid, labels)
    group(out, fetch, write_bids(tmp_path / "bids", "site", labels), "site")
    f = load(drv.group_space_path(out, "F", LABEL, "total", "site"))
    voxels = tuple(np.argwhere(grid.mask > 0)[::501].T)
    samples = [
        np.stack([written[k].logjac_total for k in labels if labels[k] == level])[
            (slice(None), *voxels)
        ]
        for level in "ABC"
    ]
    assert np.allclose(f[voxels], stats.f_oneway(*samples, axis=0).statistic, rtol=1e-4)
    assert not list(drv.group_dir(out).glob("*stat-t*"))


# ---- re-runs ---------------------------------------------------------------------------------


def test_rerun_after_adding_a_participant_updates_everything(tmp_path, grid, other_grid, fetch):
    out = tmp_path / "out"
    labels = {f"{i:02d}": ("A" if i <= 3 else "B") for i in range(1, 7)}
    rng = np.random.default_rng(4)
    for label in labels:
        synth.write_t1w(out, label, {SPACE: images(grid, rng), OTHER: images(other_grid, rng)},
                        metrics=synth.typical_metrics(rng))  # fmt: skip
    bids = write_bids(tmp_path / "bids", "group", {**labels, "07": "B"})
    group(out, fetch, bids, "group")
    foreign = drv.group_dir(out) / f"space-{LABEL}_desc-mine_notes.txt"
    foreign.write_text("a user's file")
    t_path = drv.group_space_path(out, "t", LABEL, "total", "group")
    assert json.loads(drv.sidecar_path(t_path).read_text())["GroupBy"]["Counts"] == {"A": 3, "B": 3}

    synth.write_t1w(out, "07", {SPACE: images(grid, rng)}, metrics=synth.typical_metrics(rng))
    for label in labels:  # res-2 outputs gone from every participant: that space no longer exists
        relpath = f"sub-{label}/anat/sub-{label}_T1w.nii.gz"
        t1w = synth.T1wInput(label, Path(relpath), relpath, {})
        for kind in ("t1w", "mask", "logjac_total", "logjac_nonlinear"):
            drv.space_path(out, t1w, kind, OTHER).unlink()
        record = out / f"sub-{label}" / "log" / f"sub-{label}_desc-mninorm_run.json"
        content = json.loads(record.read_text())
        record.write_text(json.dumps({**content, "OutputSpaces": [str(SPACE)]}))
    outcome = group(out, fetch, bids, "group")
    assert json.loads(drv.sidecar_path(t_path).read_text())["GroupBy"]["Counts"] == {"A": 3, "B": 4}
    assert len(table(out)) == 7
    spaces_left = {drv.parse_group_output(p.name)[1] for p in drv.group_dir(out).glob("space-*_*.*")
                   if drv.parse_group_output(p.name)}  # fmt: skip
    assert spaces_left == {LABEL}
    assert len(outcome.removed) == 2 * (7 + 4)  # res-1's maps and statistics, with sidecars
    assert {drv.parse_group_output(p.name)[1] for p in outcome.removed} == {drv.space_label(OTHER)}
    assert foreign.read_text() == "a user's file"
    leftovers = [p for p in out.rglob(".*") if ".part" in p.name]
    assert leftovers == []
    assert "group" in (out / ".bidsignore").read_text().split()


def test_outputs_under_an_older_versions_names_are_replaced(tmp_path, grid, fetch):
    """Issue: pybids took group/space-X_stat-mean_T1w.nii.gz for a participant's T1w. A re-run
    writes the maps under their new names and removes the old files, never a user's file."""
    out = tmp_path / "out"
    write_cohort(out, grid, {"01": "A", "02": "B", "03": "B"})
    folder = drv.group_dir(out)
    folder.mkdir(parents=True)
    exts = (".nii.gz", ".json")
    legacy = [
        *(f"space-{LABEL}_stat-{stat}_T1w{ext}" for stat in ("mean", "sd") for ext in exts),
        *(f"space-{LABEL}_stat-mean_desc-{jacobian}_logjacobian{ext}"
          for jacobian in ("total", "nonlinear") for ext in exts),
        "desc-mninorm_qc.tsv", "desc-mninorm_qc.json",
    ]  # fmt: skip
    for name in legacy:
        (folder / name).write_text("from mninorm 0.1")
    foreign = folder / f"space-{LABEL}_stat-mean_desc-mine_T1w.nii.gz"
    foreign.write_text("a user's file")
    outcome = group(out, fetch)
    assert sorted(p.name for p in outcome.removed) == sorted(legacy)
    assert not [name for name in legacy if (folder / name).exists()]
    assert foreign.read_text() == "a user's file"
    assert drv.group_space_path(out, "t1w_mean", LABEL).is_file()
    assert drv.group_table_path(out, "qc").is_file()


def test_a_failing_write_leaves_the_previous_outputs_whole(planted, fetch, monkeypatch):
    out = planted["out"]
    t_path = drv.group_space_path(out, "t", LABEL, "total", "group")
    before = t_path.read_bytes()

    def broken(img, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", broken)
    with pytest.raises(MninormError, match="disk full"):
        group(out, fetch, planted["bids"], "group")
    monkeypatch.undo()
    assert t_path.read_bytes() == before
    assert not [p for p in drv.group_dir(out).iterdir() if ".part" in p.name]


# ---- the real participant-level run ----------------------------------------------------------


def test_group_level_on_the_real_participant_run(run, tmp_path, capfd):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)  # the session's run is shared with the golden-list test
    code = main([str(run["root"]), str(out), "group"])
    err = capfd.readouterr().err
    assert code == ExitCode.OK, err
    page = (out / "group.html").read_text()
    for subject in ("01", "02", "03"):
        assert f'href="sub-{subject}.html"' in page
    rows = table(out)
    ids = [(r["participant_id"], r["run"], r["space"]) for r in rows]
    assert ids == sorted(ids, key=lambda i: (i[2], i[0], i[1]))  # by space, then participant
    assert len(rows) == 2 * (2 + 1 + 1)  # 2 spaces x 4 T1w
    included = {r["participant_id"] for r in rows if r["included"] == "yes"}
    assert included == {"sub-01", "sub-02"}
    failed = [r for r in rows if r["participant_id"] == "sub-03"]
    assert all("a T1w must be a 3D image" in r["exclusion_reason"] for r in failed)
    for space in (SPACE, OTHER):
        sidecar = json.loads(drv.sidecar_path(
            drv.group_space_path(out, "t1w_sd", drv.space_label(space))).read_text())  # fmt: skip
        assert sidecar["ParticipantCount"] == 2 and sidecar["T1wCount"] == 3


# ---- real scans (slow) -----------------------------------------------------------------------

DS002748 = ("01", "02", "03", "04")  # gender m, m, f, f; group: all 'depr'


@pytest.mark.slow
@pytest.mark.shared
def test_group_level_on_real_ds002748_participants(shared_data, tmp_path):
    """ds002748's ``group`` column has one level ('depr') in this copy: it must give the one-level
    message and exit 65 with everything else written; ``gender`` has two levels and gives t maps."""
    bids, out = shared_data / "ds002748", tmp_path / "out"
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(shared_data / "templateflow"),
           "TEMPLATEFLOW_AUTOUPDATE": "0"}  # fmt: skip

    def mninorm(*args):
        return subprocess.run([sys.executable, "-m", "bids_app", str(bids), str(out), *args],
                              capture_output=True, text=True, env=env, timeout=3600)  # fmt: skip

    participant = mninorm(
        "participant", "--participant-label", *DS002748, "--preset", "fast",
        "--skip-bids-validation", "--nthreads", "2", "--omp-nthreads", "1",
    )  # fmt: skip
    assert participant.returncode == 0, participant.stderr[-3000:]
    # The model's permutations are tested in test_group_stats.py and test_tfce.py: here the
    # parametric maps on real outputs (1,000 TFCE permutations at 1 mm take tens of minutes)
    one_level = mninorm("group", "--group-by", "group", "--n-permutations", "0")
    assert one_level.returncode == ExitCode.GROUP_BY_UNUSABLE, one_level.stderr[-3000:]
    assert "only 1 level" in one_level.stderr and "'depr': 4" in one_level.stderr
    assert "Traceback" not in one_level.stderr
    by_gender = mninorm("group", "--group-by", "gender", "--n-permutations", "0")
    assert by_gender.returncode == 0, by_gender.stderr[-3000:]
    label = "MNI152NLin2009cAsym"
    t_path = drv.group_space_path(out, "t", label, "total", "gender")
    sidecar = json.loads(drv.sidecar_path(t_path).read_text())
    assert sidecar["GroupBy"]["Counts"] == {"f": 2, "m": 2}
    assert load(t_path).shape == (193, 229, 193)
    rows = table(out)
    assert [r["participant_id"] for r in rows] == [f"sub-{s}" for s in DS002748]
    summary = {r["participant_id"]: {k: r[k] for k in ("status", "ncc", "dice", "included")}
               for r in rows}  # fmt: skip
    # The fast preset may grade a normalisation 'warn' (e.g. ncc just under 0.70): still used.
    assert all(r["status"] in ("pass", "warn") and r["included"] == "yes" for r in rows), summary
    assert all(math.isfinite(float(r["ncc"])) for r in rows), summary
    page = (out / "group.html").read_text()
    assert page.count('<figure class="thumb') == 4
    assert all(f'href="sub-{s}.html"' in page for s in DS002748)


# ---- lesions (group/lesions.py) ---------------------------------------------------------------


def test_lesion_voxels_are_left_out_of_the_jacobian_statistics(tmp_path, grid, fetch):
    """Two participants with template-space lesion masks: per voxel, the mean and SD are numpy's
    over the participants whose lesion is elsewhere, the count map says how many, and the t map
    (which needs every participant) is 0 wherever a lesion lies."""
    out = tmp_path / "out"
    groups = {f"{i:02d}": ("A" if i <= 3 else "B") for i in range(1, 7)}
    written = write_cohort(out, grid, groups, seed=5)
    brain = grid.mask > 0
    lesions = {
        "01": synth.sphere(grid.shape, grid.affine, CENTRE_MM, 10.0) & brain,
        "05": synth.sphere(grid.shape, grid.affine, (-25.0, -5.0, 10.0), 12.0) & brain,
    }
    for subject, lesion in lesions.items():
        t1w_map = drv.space_path(out, synth_t1w(subject), "t1w", SPACE)
        assert t1w_map.is_file()
        nib.Nifti1Image(lesion.astype(np.uint8), grid.affine).to_filename(
            drv.space_path(out, synth_t1w(subject), "lesion", SPACE)
        )
    assert (lesions["01"] & lesions["05"]).any() and (lesions["01"] & ~lesions["05"]).any()
    bids = write_bids(tmp_path / "bids", "group", groups)
    group(out, fetch, bids, "group")

    stack = np.stack([written[s].logjac_total for s in sorted(groups)]).astype(np.float64)
    for index, subject in enumerate(sorted(groups)):
        if subject in lesions:
            stack[index][lesions[subject]] = np.nan
    expected_count = np.sum(~np.isnan(stack), axis=0)
    count = load(drv.group_space_path(out, "lesion_free_count", LABEL))
    assert np.array_equal(count, expected_count) and count.min() == 4
    mean = load(drv.group_space_path(out, "logjac_mean", LABEL, "total"))
    sd = load(drv.group_space_path(out, "logjac_sd", LABEL, "total"))
    assert np.allclose(mean, np.nanmean(stack, axis=0), atol=1e-6)
    assert np.allclose(sd, np.nanstd(stack, axis=0, ddof=1), atol=1e-5)
    t = t_map(out)
    covered = lesions["01"] | lesions["05"]
    assert np.all(t[covered] == 0)
    full = np.stack([written[s].logjac_total for s in sorted(groups)]).astype(np.float64)
    expected_t = stats.ttest_ind(full[:3], full[3:], axis=0).statistic
    assert np.allclose(t[~covered], expected_t[~covered], rtol=1e-4, atol=1e-4)
    sidecar = json.loads(
        drv.sidecar_path(drv.group_space_path(out, "lesion_free_count", LABEL)).read_text()
    )
    assert sidecar["LesionMasks"]["Participants"] == ["sub-01", "sub-05"]


def test_without_lesion_masks_no_count_map_is_written(planted):
    assert not drv.group_space_path(planted["out"], "lesion_free_count", LABEL).exists()


def synth_t1w(subject: str):
    from bids_app.participant.discovery import T1wInput

    relpath = f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz"
    return T1wInput(subject=subject, path=Path(relpath), relpath=relpath, entities={})
