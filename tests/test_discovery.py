"""pybids discovery: participants, sessions, runs, filters, and what is reported as missing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import save_t1w, write_dataset_description

from bids_app.errors import InvalidBIDSError, NothingMatchedError, UsageError
from bids_app.participant.discovery import collect_t1w, load_filter_file


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "bids"
    write_dataset_description(root)
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    save_t1w(img, root, "01", session="1", run="1")
    save_t1w(img, root, "01", session="1", run="2")
    save_t1w(img, root, "01", session="2")
    save_t1w(img, root, "02")
    (root / "sub-02" / "anat" / "sub-02_acq-fast_T1w.nii.gz").write_bytes(
        (root / "sub-02" / "anat" / "sub-02_T1w.nii.gz").read_bytes()
    )
    (root / "sub-03" / "anat").mkdir(parents=True)
    img.to_filename(root / "sub-03" / "anat" / "sub-03_T2w.nii.gz")
    return root


def _names(selection):
    return sorted(t.path.name for inputs in selection.t1w_by_subject.values() for t in inputs)


def test_every_run_and_session_is_found_and_kept_apart(dataset):
    selection = collect_t1w(dataset, ("01",), validate=False)
    assert _names(selection) == [
        "sub-01_ses-1_run-1_T1w.nii.gz",
        "sub-01_ses-1_run-2_T1w.nii.gz",
        "sub-01_ses-2_T1w.nii.gz",
    ]
    sessions = {t.session for t in selection.t1w_by_subject["01"]}
    assert sessions == {"1", "2"}


@pytest.mark.parametrize("labels", [("sub-01",), ("01",)])
def test_labels_work_with_or_without_prefix(dataset, labels):
    selection = collect_t1w(dataset, labels, ("ses-2",), validate=False)
    assert _names(selection) == ["sub-01_ses-2_T1w.nii.gz"]


def test_unknown_label_is_an_error_listing_the_existing_ones(dataset):
    with pytest.raises(NothingMatchedError, match="01, 02, 03"):
        collect_t1w(dataset, ("99",), validate=False)


def test_participant_without_t1w_is_reported_not_fatal(dataset):
    selection = collect_t1w(dataset, validate=False)
    assert selection.subjects_without_t1w == ("03",)
    assert set(selection.t1w_by_subject) == {"01", "02"}


def test_null_in_filters_means_entity_absent(dataset, tmp_path):
    path = tmp_path / "filters.json"
    path.write_text(json.dumps({"t1w": {"acquisition": None}}))
    selection = collect_t1w(dataset, ("02",), filters=load_filter_file(path), validate=False)
    assert _names(selection) == ["sub-02_T1w.nii.gz"]
    path.write_text(json.dumps({"acquisition": "fast"}))
    selection = collect_t1w(dataset, ("02",), filters=load_filter_file(path), validate=False)
    assert _names(selection) == ["sub-02_acq-fast_T1w.nii.gz"]


def test_filters_matching_nothing_is_an_error(dataset):
    with pytest.raises(NothingMatchedError):
        collect_t1w(dataset, filters={"acquisition": "nope"}, validate=False)


def test_malformed_filter_file_is_a_usage_error(tmp_path):
    path = tmp_path / "filters.json"
    path.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        load_filter_file(path)


def test_folder_without_dataset_description_is_not_bids(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InvalidBIDSError, match="dataset_description.json"):
        collect_t1w(tmp_path)
