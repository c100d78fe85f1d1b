# ruff: noqa: F811  (pytest fixtures imported from test_group are arguments here)
"""The group level's model and inference (group/model.py, inference.py, clusters.py): tiny
synthetic cohorts on the test template's 6 mm grid where the answer is known.

Arrays are written as the participant level lays its files out (``test_group``'s helpers, i.e.
``benchmarks/synth_group.py``); the group level runs end to end on them with a few hundred
permutations (a second or two each).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats
from test_group import LABEL, NOISE, SPACE, fetch, grid, load, synth, write_bids  # noqa: F401

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.group import GroupSettings, run_group
from bids_app.group.clusters import load_atlas, read_labels
from bids_app.group.inference import fit_glm, smooth_in_mask
from bids_app.group.model import ModelSpec
from bids_app.outputs import derivatives as drv

CENTRE_MM = (-30.0, -10.0, 5.0)
FWE = -math.log10(0.05)


def blob(grid, centre_mm, fwhm_mm: float) -> np.ndarray:
    """A Gaussian bump (1 at ``centre_mm``) on the grid: its maximum is at one known voxel."""
    ijk = np.indices(grid.shape).reshape(3, -1)
    world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:4]
    distance2 = ((world - np.asarray(centre_mm)[:, None]) ** 2).sum(0).reshape(grid.shape)
    sigma = fwhm_mm / math.sqrt(8 * math.log(2))
    return np.exp(-distance2 / (2 * sigma**2)) * (grid.mask > 0)


def write_participants(out: Path, grid, logjacs: dict[str, np.ndarray], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, logjac in logjacs.items():
        images = synth.SpaceImages(grid.affine, grid.head, grid.mask, logjac, logjac)
        synth.write_t1w(out, label, {SPACE: images}, metrics=synth.typical_metrics(rng))


def noise(grid, rng) -> np.ndarray:
    return rng.normal(0, NOISE, grid.shape).astype(np.float32)


def write_tsv(root: Path, rows: dict[str, dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    columns = list(next(iter(rows.values())))
    lines = ["\t".join(["participant_id", *columns])]
    lines += ["\t".join([f"sub-{k}", *(str(v[c]) for c in columns)]) for k, v in rows.items()]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root


def run(out, bids, column, fetch, **spec):  # noqa: F811
    spec = {"n_permutations": 100, "seed": 3, "jacobians": ("total",), **spec}
    return run_group(
        GroupSettings(out, bids, column, model=ModelSpec(**spec)), fetch_template=fetch
    )


def model_map(out, kind, contrast="group", jacobian="total") -> np.ndarray:
    return load(drv.group_space_path(out, kind, LABEL, jacobian, contrast))


def clusters(out, contrast="group", jacobian="total") -> list[dict]:
    path = drv.group_space_path(out, "model_clusters", LABEL, jacobian, contrast)
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# ---- the arithmetic --------------------------------------------------------------------------


def test_glm_t_of_a_group_indicator_is_scipys_two_sample_t():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(11, 50))
    group = np.array([1.0] * 5 + [0.0] * 6)
    fit = fit_glm(data, np.column_stack([np.ones(11), group]), (1,))
    expected = stats.ttest_ind(data[:5], data[5:], axis=0)
    assert np.allclose(fit.statistic, expected.statistic)
    assert np.allclose(10**-fit.logp, expected.pvalue)
    assert np.allclose(fit.effect, data[:5].mean(0) - data[5:].mean(0))


def _design_rows(item):
    x, y = item
    yield "logjac", (x, y)


@pytest.mark.parametrize("tested", [(1,), (1, 2)], ids=["t", "F"])
def test_the_fit_streamed_participant_by_participant_is_the_stacked_fit(tested):
    """X^T Y and the sum of y^2, summed one participant at a time in 3 blocks and merged, give
    fit_glm's t (or F) of a design with a numeric and a categorical covariate."""
    from bids_app.group.accumulate import GlmSums, accumulate_keyed, keyed_block_stats, split_blocks
    from bids_app.group.accumulate import _merge_keyed as merge_keyed
    from bids_app.group.inference import fit_glm_sums

    rng = np.random.default_rng(4)
    n, voxels = 37, 300
    group = (np.arange(n) % 2).astype(float)
    age = rng.uniform(20, 80, n)
    site = (np.arange(n) % 3 == 0).astype(float)
    matrix = np.column_stack([np.ones(n), group, age - age.mean(), site])
    # a mean far from 0 beside a small spread: what a subtraction of sums could lose
    data = 0.3 + 0.01 * age[:, None] * rng.normal(0, 0.2, voxels) + rng.normal(0, 0.02, (n, voxels))
    data[:, 0] += 0.05 * group  # one voxel with an effect
    expected = fit_glm(data, matrix, tested)
    items = list(zip(matrix, data, strict=True))
    blocks = [keyed_block_stats(b, _design_rows, GlmSums) for b in split_blocks(items, 3)]
    merged = merge_keyed(blocks, GlmSums)["logjac"]
    one_block = accumulate_keyed(items, _design_rows, workers=1, new=GlmSums)["logjac"]
    for sums in (merged, one_block):
        fit = fit_glm_sums(sums, matrix, tested)
        np.testing.assert_allclose(fit.statistic, expected.statistic, rtol=1e-8)
        np.testing.assert_allclose(fit.logp, expected.logp, rtol=1e-8, atol=1e-12)
        assert fit.df == expected.df
        if len(tested) == 1:
            np.testing.assert_allclose(fit.effect, expected.effect, rtol=1e-8)
    assert np.isfinite(expected.statistic).all() and (expected.statistic != 0).all()
    with pytest.raises(ValueError, match="36 participants' maps summed for a model of 37"):
        fit_glm_sums(accumulate_keyed(items[1:], _design_rows, new=GlmSums)["logjac"], matrix,
                     tested)  # fmt: skip


def test_masked_smoothing_keeps_a_constant_constant_to_the_edge_and_zero_outside():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 4:16, 6:14] = True
    smoothed = smooth_in_mask(np.where(mask, 2.5, 100.0), mask, 8.0, (2.0, 2.0, 2.0))
    assert np.allclose(smoothed[mask], 2.5, atol=1e-5)  # no dilution by the outside's values
    assert not smoothed[~mask].any()


def test_masked_smoothing_has_the_asked_fwhm():
    mask = np.ones((41, 41, 41), bool)
    impulse = np.zeros(mask.shape, np.float32)
    impulse[20, 20, 20] = 1
    profile = smooth_in_mask(impulse, mask, 10.0, (2.0, 2.0, 2.0))[:, 20, 20]
    half = profile.max() / 2
    above = np.flatnonzero(profile >= half)
    # linear interpolation of the two half-maximum crossings, in mm (2 mm voxels)
    left = above[0] - (profile[above[0]] - half) / (profile[above[0]] - profile[above[0] - 1])
    right = above[-1] + (profile[above[-1]] - half) / (profile[above[-1]] - profile[above[-1] + 1])
    assert abs((right - left) * 2.0 - 10.0) < 0.3


# ---- end to end on tiny cohorts --------------------------------------------------------------


def test_parametric_model_t_map_equals_scipys_ttest_ind_voxel_by_voxel(tmp_path, grid, fetch):
    rng = np.random.default_rng(1)
    groups = {f"{i:02d}": "A" if i <= 4 else "B" for i in range(1, 10)}
    logjacs = {k: noise(grid, rng) for k in groups}
    write_participants(tmp_path / "out", grid, logjacs)
    bids = write_bids(tmp_path / "bids", "group", groups)
    run(tmp_path / "out", bids, "group", fetch, smoothing_fwhm=0.0, n_permutations=0)
    t = model_map(tmp_path / "out", "model_t")
    brain = load(drv.group_space_path(tmp_path / "out", "brain_probseg", LABEL)) >= 0.5
    a = np.stack([logjacs[k] for k in groups if groups[k] == "A"])[:, brain]
    b = np.stack([logjacs[k] for k in groups if groups[k] == "B"])[:, brain]
    assert np.allclose(t[brain], stats.ttest_ind(a, b, axis=0).statistic, atol=1e-4)
    assert not list(drv.group_dir(tmp_path / "out").glob("*logpFWE*"))  # no permutations asked


@pytest.fixture(scope="module")
def planted(tmp_path_factory, grid, fetch):  # noqa: F811
    """16 participants; group A has a Gaussian bump (0.15 at its centre) in its log-Jacobians."""
    root = tmp_path_factory.mktemp("stats-planted")
    rng = np.random.default_rng(7)
    bump = blob(grid, CENTRE_MM, 14.0)
    groups = {f"{i:02d}": "A" if i <= 8 else "B" for i in range(1, 17)}
    logjacs = {k: noise(grid, rng) + 0.15 * bump * (groups[k] == "A") for k in groups}
    write_participants(root / "out", grid, logjacs)
    atlas = root / "atlas.nii.gz"
    labels = np.where(bump > 0.5, 7, np.where(grid.mask > 0, 1, 0)).astype(np.uint8)
    nib.Nifti1Image(labels, grid.affine).to_filename(atlas)
    (root / "atlas.tsv").write_text("index\tname\n1\tElsewhere\n7\tPlanted_L\n")
    bids = write_bids(root / "bids", "group", groups)
    outcome = run(root / "out", bids, "group", fetch, smoothing_fwhm=6.0, tfce=True,
                  atlas=f"{atlas}")  # fmt: skip
    return {"out": root / "out", "bump": bump, "outcome": outcome}


def test_a_planted_effect_is_found_with_its_peak_within_one_voxel(planted, grid):
    out, bump = planted["out"], planted["bump"]
    truth = np.unravel_index(np.argmax(bump), bump.shape)
    for correction in ("voxel", "tfce"):
        found = [r for r in clusters(out) if r["correction"] == correction]
        assert found and found[0]["sign"] == "positive", correction
        peak_mm = [float(found[0][f"peak_{a}_mm"]) for a in "xyz"]
        peak = np.rint(np.linalg.inv(grid.affine) @ [*peak_mm, 1])[:3]
        assert np.abs(peak - truth).max() <= 1, (correction, peak, truth)
        assert found[0]["peak_label"] == "Planted_L"  # the atlas .tsv next to the image
    assert model_map(out, "model_logp_tfce_fwe")[truth] > FWE
    effect = model_map(out, "model_effect")
    assert 0.08 < effect[truth] < 0.16  # 0.15, a little flattened by the smoothing


def test_sidecars_state_model_contrast_counts_smoothing_permutations_and_seed(planted):
    path = drv.group_space_path(planted["out"], "model_logp_fwe", LABEL, "total", "group")
    sidecar = json.loads(drv.sidecar_path(path).read_text())
    assert sidecar["Model"]["Contrast"].startswith("A minus B")
    assert sidecar["Model"]["Counts"] == {"A": 8, "B": 8}
    assert sidecar["Smoothing"]["FWHMmm"] == 6.0
    assert sidecar["Permutations"]["Count"] == 100
    assert sidecar["Permutations"]["Seed"] == 3
    assert sidecar["MultipleComparisonCorrection"].startswith("FWE")
    assert "group" in (planted["out"] / ".bidsignore").read_text().split()


def test_the_streamed_model_in_two_processes_gives_the_permutation_runs_parametric_maps(
    planted, fetch, tmp_path, monkeypatch, caplog
):
    """--n-permutations 0 fits the model from sums read in 2 processes; the planted run (100
    permutations) fitted the stacked data in one: the same t, effect and -log10 p maps."""
    import shutil

    from bids_app.group import maps as maps_module

    out = tmp_path / "out"
    shutil.copytree(planted["out"], out)
    monkeypatch.setattr(maps_module, "MIN_PARTICIPANTS_PER_WORKER", 1)  # 16 participants: 2
    spec = ModelSpec(n_permutations=0, seed=3, smoothing_fwhm=6.0, jacobians=("total",))
    settings = GroupSettings(out, planted["out"].parent / "bids", "group", model=spec, workers=2)
    with caplog.at_level("INFO", logger="bids_app.group.inference"):
        run_group(settings, fetch_template=fetch)
    assert "the model's fit streams over 16 participants' maps (2 process(es))" in caplog.text
    for kind in ("model_t", "model_effect", "model_logp"):
        streamed, stacked = model_map(out, kind), model_map(planted["out"], kind)
        assert np.abs(stacked).max() > 0, kind
        np.testing.assert_allclose(streamed, stacked, rtol=1e-5, atol=1e-6, err_msg=kind)
    assert not list(drv.group_dir(out).glob("*logpFWE*"))  # the permutation maps are gone


def test_the_group_report_shows_the_results_table(planted):
    page = (planted["out"] / "group.html").read_text()
    assert "Planted_L" in page and "FWE" in page


def test_a_null_cohort_gives_no_fwe_significant_voxel(tmp_path, grid, fetch):
    rng = np.random.default_rng(11)
    groups = {f"{i:02d}": "A" if i <= 6 else "B" for i in range(1, 13)}
    write_participants(tmp_path / "out", grid, {k: noise(grid, rng) for k in groups})
    run(tmp_path / "out", write_bids(tmp_path / "bids", "group", groups), "group", fetch,
        tfce=True)  # fmt: skip
    assert model_map(tmp_path / "out", "model_logp_fwe").max() < FWE
    assert model_map(tmp_path / "out", "model_logp_tfce_fwe").max() < FWE
    assert clusters(tmp_path / "out") == []


def test_a_covariate_removes_an_effect_that_is_only_in_the_covariate(tmp_path, grid, fetch):
    """Log-Jacobians depend on age only; group A is older: the group 'effect' is age's."""
    rng = np.random.default_rng(5)
    bump = blob(grid, CENTRE_MM, 14.0)
    rows, logjacs = {}, {}
    for i in range(1, 17):
        label, older = f"{i:02d}", i <= 8
        age = float(rng.uniform(60, 75) if older else rng.uniform(40, 55))
        rows[label] = {"group": "A" if older else "B", "age": round(age, 1)}
        logjacs[label] = noise(grid, rng) + 0.01 * (age - 57.5) * bump
    write_participants(tmp_path / "out", grid, logjacs)
    bids = write_tsv(tmp_path / "bids", rows)
    run(tmp_path / "out", bids, "group", fetch)
    assert model_map(tmp_path / "out", "model_logp_fwe").max() > FWE  # confounded by age
    run(tmp_path / "out", bids, "group", fetch, covariates=("age",))
    assert model_map(tmp_path / "out", "model_logp_fwe").max() < FWE
    sidecar = json.loads(
        drv.sidecar_path(
            drv.group_space_path(tmp_path / "out", "model_t", LABEL, "total", "group")
        ).read_text()
    )
    assert sidecar["Model"]["Covariates"] == ["age"] and "age" in sidecar["Model"]["Formula"]


def test_a_numeric_column_is_a_correlation_with_a_slope(tmp_path, grid, fetch):
    rng = np.random.default_rng(2)
    bump = blob(grid, CENTRE_MM, 14.0)
    rows, logjacs = {}, {}
    for i in range(1, 17):
        score = float(i)
        rows[f"{i:02d}"] = {"score": score}
        logjacs[f"{i:02d}"] = noise(grid, rng) + 0.03 * score * bump
    write_participants(tmp_path / "out", grid, logjacs)
    run(tmp_path / "out", write_tsv(tmp_path / "bids", rows), "score", fetch, n_permutations=100)
    truth = np.unravel_index(np.argmax(bump), bump.shape)
    assert abs(model_map(tmp_path / "out", "model_effect", "score")[truth] - 0.03) < 0.008
    assert model_map(tmp_path / "out", "model_logp_fwe", "score")[truth] > FWE


def test_na_rows_are_left_out_and_a_rank_deficient_design_is_exit_65(tmp_path, grid, capfd):
    rng = np.random.default_rng(3)
    rows = {f"{i:02d}": {"group": "A" if i <= 4 else "B", "site": "x" if i <= 4 else "y",
                         "age": "n/a" if i == 1 else 30 + i} for i in range(1, 9)}  # fmt: skip
    write_participants(tmp_path / "out", grid, {k: noise(grid, rng) for k in rows})
    bids = write_tsv(tmp_path / "bids", rows)
    base = [str(bids), str(tmp_path / "out"), "group", "--group-by", "group", "--n-permutations"]
    assert main([*base, "0", "--covariates", "age"]) == ExitCode.OK
    path = drv.group_space_path(tmp_path / "out", "model_t", LABEL, "total", "group")
    model = json.loads(drv.sidecar_path(path).read_text())["Model"]
    assert model["Counts"] == {"A": 3, "B": 4} and "sub-01" in model["LeftOut"]
    capfd.readouterr()
    code = main([*base, "0", "--covariates", "site"])  # site duplicates the groups
    err = capfd.readouterr().err
    assert code == ExitCode.GROUP_BY_UNUSABLE
    assert "rank deficient" in err and "Traceback" not in err
    assert not path.exists()  # the stale model maps are gone ...
    assert drv.group_space_path(tmp_path / "out", "t", LABEL, "total", "group").is_file()  # rest
    assert main([*base, "0", "--covariates", "height"]) == ExitCode.GROUP_BY_UNUSABLE
    assert "has no column 'height'" in capfd.readouterr().err


def test_brain_volume_is_a_covariate_mninorm_measured(tmp_path, grid, fetch):
    rng = np.random.default_rng(4)
    groups = {f"{i:02d}": "A" if i <= 4 else "B" for i in range(1, 10)}
    write_participants(tmp_path / "out", grid, {k: noise(grid, rng) for k in groups})
    run(tmp_path / "out", write_bids(tmp_path / "bids", "group", groups), "group", fetch,
        covariates=("brain_volume",), n_permutations=0)  # fmt: skip
    path = drv.group_space_path(tmp_path / "out", "model_t", LABEL, "total", "group")
    assert "brain_volume" in json.loads(drv.sidecar_path(path).read_text())["Model"]["Formula"]


def test_atlas_labels_from_a_tsv_or_index_name_lines(tmp_path):
    (tmp_path / "a.tsv").write_text("index\tname\tcolor\n1\tLeft\t#fff\n2\tRight\t#000\n")
    assert read_labels(tmp_path / "a.tsv") == {1: "Left", 2: "Right"}
    (tmp_path / "b.txt").write_text("1 Precentral_L 2001\n2 Precentral_R 2002\n")
    assert read_labels(tmp_path / "b.txt") == {1: "Precentral_L", 2: "Precentral_R"}


def test_the_aal_atlas_of_the_shared_data_names_a_known_coordinate(shared_data):
    aal = shared_data / "atlases" / "aal.nii.gz"
    if not aal.is_file():
        pytest.skip("no AAL atlas in the shared data")
    atlas = load_atlas(str(aal))  # its labels: aal.nii.txt, found next to it
    assert atlas.label_at((-40.0, -20.0, 55.0)) in ("Precentral_L", "Postcentral_L")
    assert atlas.label_at((40.0, -20.0, 55.0)).endswith("_R")


def test_three_groups_give_the_models_f_map_equal_to_scipys_anova(tmp_path, grid, fetch):
    rng = np.random.default_rng(6)
    groups = {f"{i:02d}": "ABC"[(i - 1) % 3] for i in range(1, 10)}
    logjacs = {k: noise(grid, rng) for k in groups}
    write_participants(tmp_path / "out", grid, logjacs)
    run(tmp_path / "out", write_bids(tmp_path / "bids", "site", groups), "site", fetch,
        smoothing_fwhm=0.0, n_permutations=0)  # fmt: skip
    f = model_map(tmp_path / "out", "model_F", "site")
    brain = load(drv.group_space_path(tmp_path / "out", "brain_probseg", LABEL)) >= 0.5
    samples = [np.stack([logjacs[k] for k in groups if groups[k] == g])[:, brain] for g in "ABC"]
    assert np.allclose(f[brain], stats.f_oneway(*samples, axis=0).statistic, rtol=1e-4)
    assert not list(drv.group_dir(tmp_path / "out").glob("*logpFWE*"))  # no permutations asked


def test_a_planted_three_group_effect_gets_fwe_maps_and_an_f_results_table(tmp_path, grid,
                                                                           fetch):  # fmt: skip
    """Site C has the bump: the F model's permutations find it, peak within one voxel."""
    rng = np.random.default_rng(8)
    bump = blob(grid, CENTRE_MM, 14.0)
    groups = {f"{i:02d}": "ABC"[(i - 1) % 3] for i in range(1, 19)}
    logjacs = {k: noise(grid, rng) + 0.2 * bump * (groups[k] == "C") for k in groups}
    write_participants(tmp_path / "out", grid, logjacs)
    run(tmp_path / "out", write_bids(tmp_path / "bids", "site", groups), "site", fetch,
        smoothing_fwhm=6.0, tfce=True)  # fmt: skip
    out, truth = tmp_path / "out", np.unravel_index(np.argmax(bump), bump.shape)
    for correction in ("voxel", "tfce"):
        found = [r for r in clusters(out, "site") if r["correction"] == correction]
        assert found and found[0]["sign"] == "n/a" and found[0]["peak_effect"] == "n/a"
        peak = np.rint(np.linalg.inv(grid.affine) @ [*(float(found[0][f"peak_{a}_mm"])
                                                       for a in "xyz"), 1])[:3]  # fmt: skip
        assert np.abs(peak - truth).max() <= 1, (correction, peak, truth)
        assert float(found[0]["peak_F"]) > 0
    assert model_map(out, "model_logp_tfce_fwe", "site")[truth] > FWE
    assert model_map(out, "model_tfce", "site").min() >= 0  # F: one-sided
    path = drv.group_space_path(out, "model_logp_fwe", LABEL, "total", "site")
    sidecar = json.loads(drv.sidecar_path(path).read_text())
    assert sidecar["Permutations"]["Count"] == 100 and sidecar["Permutations"]["TFCE"]
    assert sidecar["Permutations"]["TFCEParameters"]["Map"] == "sqrt(F)"
    assert "one-sided" in sidecar["Permutations"]["Method"]
    page = (out / "group.html").read_text()
    assert "peak_F" in page and "max-F" in page


def test_the_model_leaves_out_the_voxels_a_participants_lesion_covers(tmp_path, grid, fetch):
    """A lesion that gives sub-01 a huge log-Jacobian inside it: with its label-lesion_roi in
    template space, those voxels leave the analysis mask (model t = 0) and the rest is scipy's."""
    from bids_app.group.lesions import lesion_path

    rng = np.random.default_rng(4)
    groups = {f"{i:02d}": "A" if i <= 4 else "B" for i in range(1, 10)}
    logjacs = {k: noise(grid, rng) for k in groups}
    lesion = (blob(grid, CENTRE_MM, 12.0) > 0.3) & (grid.mask > 0)
    logjacs["01"][lesion] = 3.0  # the regulariser's guess inside a lesion: not a measurement
    write_participants(tmp_path / "out", grid, logjacs)
    t1w_map = next((tmp_path / "out" / "sub-01" / "anat").glob("*_desc-preproc_T1w.nii.gz"))
    nib.Nifti1Image(lesion.astype(np.uint8), grid.affine).to_filename(lesion_path(t1w_map))
    bids = write_bids(tmp_path / "bids", "group", groups)
    run(tmp_path / "out", bids, "group", fetch, smoothing_fwhm=0.0, n_permutations=0)
    t = model_map(tmp_path / "out", "model_t")
    assert lesion.sum() > 5 and not t[lesion].any()
    brain = (load(drv.group_space_path(tmp_path / "out", "brain_probseg", LABEL)) >= 0.5) & ~lesion
    a = np.stack([logjacs[k] for k in groups if groups[k] == "A"])[:, brain]
    b = np.stack([logjacs[k] for k in groups if groups[k] == "B"])[:, brain]
    assert np.allclose(t[brain], stats.ttest_ind(a, b, axis=0).statistic, atol=1e-4)
    sidecar = json.loads(
        drv.sidecar_path(
            drv.group_space_path(tmp_path / "out", "model_t", LABEL, "total", "group")
        ).read_text()
    )
    assert "lesion mask" in sidecar["AnalysisMask"] and "sub-01" in sidecar["AnalysisMask"]
