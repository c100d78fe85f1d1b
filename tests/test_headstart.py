"""The start search: a head tilted by 30 degrees, far from the scanner origin, with a neck dragging
its centre of mass down, must start within a few millimetres of the truth."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import brain_mask_of, known_affine, participant_brain, with_skull

from bids_app.participant.headstart import _difference_mm, distinct_starts, search_head_starts


def _with_neck(head: nib.Nifti1Image, length_mm: float = 150.0) -> nib.Nifti1Image:
    """The head with a neck and shoulders: the grid extended downwards, a bright column under the
    brain and a wide slab at its bottom (they drag the centre of mass ~50 mm below the brain)."""
    head = nib.as_closest_canonical(head)  # voxel axis 2 points up
    data = np.asarray(head.dataobj, dtype=np.float32)
    zoom = float(head.header.get_zooms()[2])
    extra = int(round(length_mm / zoom))
    grown = np.concatenate([np.zeros(data.shape[:2] + (extra,), np.float32), data], axis=2)
    inside = np.argwhere(data > 0.5 * data.max())
    centre = inside.mean(axis=0)
    i, j = np.indices(grown.shape[:2])
    column = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 <= (35.0 / zoom) ** 2
    low = int(inside[:, 2].min()) + extra
    neck = grown[..., : low + 4]
    neck[column] = np.maximum(neck[column], 0.6 * data.max())
    shoulders = grown[..., : int(round(50.0 / zoom))]
    shoulders[...] = np.maximum(shoulders, 0.5 * data.max())
    affine = head.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * extra
    return nib.Nifti1Image(grown, affine)


def _ants(img: nib.Nifti1Image):
    from bids_app.transforms.orientation import nifti_to_ants

    return nifti_to_ants(nib.as_closest_canonical(img))


@pytest.mark.parametrize(
    "rotation_deg, origin_shift_mm, neck",
    [
        ((30.0, 0.0, 0.0), (0.0, 0.0, 0.0), False),  # a strong nod
        ((-25.0, 10.0, 8.0), (60.0, -70.0, 40.0), False),  # tilted, origin 100 mm away
        ((20.0, -8.0, 0.0), (-40.0, 50.0, -60.0), True),  # tilted, far origin, and a neck
        ((-30.0, 0.0, 10.0), (0.0, 0.0, 0.0), True),  # a strong nod and a neck
    ],
)
def test_search_starts_near_the_true_head_pose(template_brain, rotation_deg, origin_shift_mm, neck):
    template_head = with_skull(template_brain, seed=1)
    template_mask = brain_mask_of(template_brain)
    to_template = known_affine(rot_deg=rotation_deg, shift=(3.0, -4.0, 2.0), scale=(1, 1, 1))
    head = with_skull(participant_brain(template_brain, to_template, "LIA", (3, 3, 3)), seed=3)
    if neck:
        head = _with_neck(head)
    moved = head.affine.copy()
    moved[:3, 3] += origin_shift_mm  # scanner coordinates: the origin far from the head
    head = nib.Nifti1Image(np.asarray(head.dataobj), moved)
    shift = np.eye(4)
    shift[:3, 3] = origin_shift_mm
    truth = shift @ np.linalg.inv(to_template)  # template points -> participant points

    starts = search_head_starts(_ants(template_head), _ants(template_mask), _ants(head))

    error = _difference_mm(starts[0].affine, truth, radius=60.0)
    assert error < 8.0, f"best start {starts[0].label} is {error:.1f} mm off at the brain's edge"
    assert starts[0].score > 0.5


def test_distinct_starts_drop_repeats():
    base = np.eye(4)
    near = np.eye(4)
    near[:3, 3] = (2.0, 0.0, 0.0)
    far = np.eye(4)
    far[:3, 3] = (30.0, 0.0, 0.0)
    from bids_app.participant.headstart import HeadStart

    starts = [HeadStart("a", base, 0.9), HeadStart("b", near, 0.8), HeadStart("c", far, 0.7)]
    assert [s.label for s in distinct_starts(starts)] == ["a", "c"]
