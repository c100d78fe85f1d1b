"""Indexing at scale (bids_app/participant/indexing.py): only the requested participants' folders,
and a saved index reused by the next call with the same selection."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dataset_description

from bids_app.errors import NothingMatchedError
from bids_app.participant.discovery import collect_t1w
from bids_app.participant.indexing import (
    DATABASE_FILE,
    ignore_other_subjects,
    selection_folder,
    selection_key,
)

LABELS = ["01", "010", "02", "1", "10", "ab"]


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "bids"
    write_dataset_description(root)
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.int16), np.eye(4))
    for label in LABELS:
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        img.to_filename(anat / f"sub-{label}_T1w.nii.gz")
    return root


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("/sub-01", False),
        ("/sub-01/anat/sub-01_T1w.nii.gz", False),
        ("/sub-1", False),
        ("/sub-010", True),  # a label that starts like a wanted one is another participant
        ("/sub-010/anat/sub-010_T1w.nii.gz", True),
        ("/sub-10", True),
        ("/sub-02", True),
        ("/dataset_description.json", False),
        ("/participants.tsv", False),
    ],
)
def test_the_ignore_pattern_keeps_exactly_the_wanted_folders(path, ignored):
    assert bool(ignore_other_subjects(("01", "1")).search(path)) == ignored


def test_only_the_requested_participants_are_indexed(tiny):
    from bids_app.participant.indexing import open_layout

    layout = open_layout(tiny, ("01", "1"), False, None)
    assert sorted(layout.get_subjects()) == ["01", "1"]
    selection = collect_t1w(tiny, ("sub-01", "1"), validate=False)
    assert sorted(selection.t1w_by_subject) == ["01", "1"]


def test_an_unknown_label_names_it(tiny):
    with pytest.raises(NothingMatchedError, match=r"participant label\(s\) 03 not found"):
        collect_t1w(tiny, ("01", "03"), validate=False)


def test_a_saved_index_is_reused_by_the_same_selection_only(tiny, tmp_path):
    database = tmp_path / "index"
    first = collect_t1w(tiny, ("01",), validate=False, database_dir=database)
    key = selection_key(tiny.resolve(), ("01",), False)
    folder = selection_folder(database, key)
    assert (folder / DATABASE_FILE).is_file()
    assert json.loads((folder / "mninorm_selection.json").read_text()) == key
    assert not [p for p in database.iterdir() if p.name.startswith(".")]  # no temporary left
    # A file added after the index was saved is not seen by the same selection (documented: remove
    # the folder when the dataset changes), which shows the index was read, not rebuilt.
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.int16), np.eye(4))
    img.to_filename(tiny / "sub-01" / "anat" / "sub-01_run-2_T1w.nii.gz")
    again = collect_t1w(tiny, ("01",), validate=False, database_dir=database)
    assert [t.relpath for t in again.t1w_by_subject["01"]] == [
        t.relpath for t in first.t1w_by_subject["01"]
    ]
    # Another selection gets its own index, which sees the file.
    both = collect_t1w(tiny, ("01", "02"), validate=False, database_dir=database)
    assert len(both.t1w_by_subject["01"]) == 2
    assert len([p for p in database.iterdir() if (p / DATABASE_FILE).is_file()]) == 2
