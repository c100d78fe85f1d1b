"""QC metrics and grading, on synthetic outputs whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TEST_TEMPLATE
from qc_cases import write_affine_xfm, write_itk_composite, write_synthetic_outputs

from bids_app.measures import similarity
from bids_app.reports import qc


@pytest.fixture
def template(templateflow_home):
    from bids_app.templates import fetch_template

    return fetch_template(TEST_TEMPLATE, 1)


def _fetch(template):
    return lambda *query: template  # any grid of any template: this one


# ---- metrics ---------------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_A = _RNG.normal(size=5000)
_NOISE = _RNG.normal(size=5000)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (_A, _A, 1.0),
        (_A, 3 * _A + 7, 1.0),  # brightness and contrast do not matter
        (_A, -_A, -1.0),
        (_A, _NOISE, 0.0),
    ],
)
def test_correlation(a, b, expected):
    assert similarity.correlation(a, b) == pytest.approx(expected, abs=0.05)


def test_mutual_information_is_high_for_a_function_of_the_image_and_low_for_noise():
    same, same_nmi = similarity.mutual_information(_A, np.exp(_A))  # nonlinear, one-to-one
    noise, noise_nmi = similarity.mutual_information(_A, _NOISE)
    assert same > 2.0 and noise < 0.2
    assert 1.0 <= noise_nmi < 1.05 < 1.5 < same_nmi <= 2.0


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0),
        ([1, 1, 1, 0], [1, 0, 0, 0], 0.5),
        ([0, 0], [0, 0], math.nan),
    ],
)
def test_dice(a, b, expected):
    value = similarity.dice(np.array(a), np.array(b))
    assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected)


# ---- grading ---------------------------------------------------------------------------------

_GOOD = {
    "ncc": 0.85,
    "dice": 0.98,
    "folding_fraction": 0.0,
    "logjac_iqr": 0.3,
    "affine_volume_ratio": 0.9,
    "brain_volume_ml": 1400.0,
}


@pytest.mark.parametrize(
    ("change", "status", "culprit"),
    [
        ({}, "pass", None),
        ({"ncc": 0.67}, "warn", "ncc"),
        ({"ncc": 0.3}, "fail", "ncc"),
        ({"dice": 0.9}, "warn", "dice"),
        ({"dice": 0.5}, "fail", "dice"),
        ({"folding_fraction": 0.001}, "warn", "folding_fraction"),
        ({"folding_fraction": 0.05}, "fail", "folding_fraction"),
        ({"affine_volume_ratio": 3.4}, "fail", "affine_volume_ratio"),  # 1.5 mm labelled 1 mm
        ({"affine_volume_ratio": -1.0}, "fail", "affine_volume_ratio"),  # a mirrored brain
        ({"brain_volume_ml": 4200.0}, "fail", "brain_volume_ml"),  # the whole head as "brain"
        ({"ncc": math.nan}, "pass", None),  # not measured: n/a, not graded
        ({"ncc": 0.67, "dice": 0.5}, "fail", "dice"),  # the worst verdict wins
    ],
)
def test_grade_by_documented_thresholds(change, status, culprit):
    verdict, reasons = qc.grade({**_GOOD, **change})
    assert verdict == status
    if culprit:
        assert any(reason.startswith(f"{culprit} = ") for reason in reasons)
    else:
        assert reasons == ()


def test_worst_status_of_several():
    assert qc.worst(["pass", "warn", "pass"]) == "warn"
    assert qc.worst(["pass", "fail", "warn"]) == "fail"
    assert qc.worst([]) == "fail"


# ---- Jacobians from the transform file -------------------------------------------------------


def _all_brain(shape, spacing, origin_lps):
    import nibabel as nib

    affine = np.diag([-spacing, -spacing, spacing, 1.0])  # the LPS grid, in RAS
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return nib.Nifti1Image(np.ones(shape, np.uint8), affine)


def test_folding_is_counted_exactly_from_the_transform(tmp_path):
    # u_z = -2 (z - z0) in a slab of 3 slices: det(I + du/dp) = 1 - 2 < 0 there, 1 elsewhere
    shape, spacing, origin = (10, 12, 14), 2.0, np.array([-10.0, -12.0, -14.0])
    k = np.arange(shape[2])
    vectors = np.zeros((*shape, 3), np.float32)
    vectors[..., 2] = -2 * spacing * (np.clip(k, 5, 7) - 5)
    path = write_itk_composite(
        tmp_path / "xfm.h5", np.diag([1.1, 1.0, 1.0, 1.0]), (vectors, origin, spacing)
    )
    from bids_app.transforms import read_composite

    summary = qc.jacobian_summary(read_composite(path), _all_brain(shape, spacing, origin))
    assert summary["folding_fraction"] == pytest.approx(3 / 14)
    assert summary["jacobian_min"] == pytest.approx(-1.0, abs=1e-5)
    assert summary["jacobian_max"] == pytest.approx(1.0, abs=1e-5)
    assert summary["affine_volume_ratio"] == pytest.approx(1.1)


def test_an_affine_only_transform_has_no_local_volume_change(tmp_path):
    path = write_affine_xfm(np.diag([1.2, 0.9, 1.0, 1.0]), tmp_path / "affine.h5")
    from bids_app.transforms import read_composite

    summary = qc.jacobian_summary(read_composite(path), _all_brain((4, 4, 4), 2.0, np.zeros(3)))
    assert summary == pytest.approx(
        {
            "affine_volume_ratio": 1.08,
            "jacobian_min": 1.0,
            "jacobian_max": 1.0,
            "folding_fraction": 0.0,
        }
    )


# ---- one T1w on disk -------------------------------------------------------------------------


def test_a_perfect_normalisation_passes_and_its_table_is_documented(tmp_path, template):
    write_synthetic_outputs(tmp_path, template)
    (record,) = qc.collect_records(tmp_path, "01")
    result = qc.measure_t1w(tmp_path, record, _fetch(template))
    (space_qc,) = result.spaces
    assert space_qc.metrics["ncc"] == pytest.approx(1.0)
    assert space_qc.metrics["dice"] == pytest.approx(1.0)
    assert space_qc.metrics["folding_fraction"] == 0.0
    assert result.status == "pass", space_qc.reasons

    table = qc.write_qc(tmp_path, result, result.status)
    assert table.name == "sub-01_desc-mninorm_qc.tsv"
    (row,) = qc.read_qc_table(table)
    assert list(row) == list(qc.COLUMNS)
    assert row["status"] == row["participant_status"] == "pass"
    assert row["header_fixes"] == "reoriented LIA -> RAS"
    assert row["session_id"] == "n/a"
    sidecar = json.loads(table.with_suffix(".json").read_text())
    assert set(sidecar["Thresholds"]) == {rule.column for rule in qc.RULES}
    assert all(column in sidecar for column in qc.COLUMNS)


def test_a_misaligned_normalisation_fails(tmp_path, template):
    write_synthetic_outputs(tmp_path, template, shift_voxels=4)  # 12 mm off
    (record,) = qc.collect_records(tmp_path, "01")
    result = qc.measure_t1w(tmp_path, record, _fetch(template))
    assert result.status == "fail"
    assert any(reason.startswith("ncc = ") for reason in result.spaces[0].reasons)


def test_a_failed_run_is_graded_fail_with_its_error(tmp_path, template):
    write_synthetic_outputs(tmp_path, template, status="failed")
    (record,) = qc.collect_records(tmp_path, "01")
    result = qc.measure_t1w(tmp_path, record, _fetch(template))
    assert result.status == "fail"
    assert result.spaces[0].reasons == ("the run failed: a T1w must be a 3D image",)


def test_a_missing_output_is_graded_fail_and_named(tmp_path, template):
    write_synthetic_outputs(tmp_path, template)
    (mask,) = tmp_path.glob(f"sub-01/anat/*space-{TEST_TEMPLATE}_desc-brain_mask.nii.gz")
    mask.unlink()
    (record,) = qc.collect_records(tmp_path, "01")
    result = qc.measure_t1w(tmp_path, record, _fetch(template))
    assert result.status == "fail"
    assert mask.name in result.spaces[0].reasons[0]


def test_a_record_with_a_renamed_required_key_is_skipped_with_a_warning(tmp_path, template, caplog):
    """Issue 14: a renamed key used to read as n/a silently; now the record is named and skipped
    (as an unreadable one always was)."""
    kept = write_synthetic_outputs(tmp_path, template, run="1")
    renamed = write_synthetic_outputs(tmp_path, template, run="2")
    content = json.loads(renamed.read_text())
    content["RunStatus"] = content.pop("Status")
    renamed.write_text(json.dumps(content))
    with caplog.at_level("WARNING", logger="bids_app.reports.qc"):
        records = qc.collect_records(tmp_path, "01")
    assert [record.path for record in records] == [kept]
    assert str(renamed) in caplog.text and "lacks Status" in caplog.text
    assert "RunStatus" in caplog.text
