"""Geometry: the composite transform model, ITK .h5 files, the one LPS/RAS convention, Jacobians,
and applying transforms to images and points (``mapping``)."""

from bids_app.transforms.itk import read_composite, write_composite
from bids_app.transforms.model import CompositeTransform, DisplacementField

__all__ = ["CompositeTransform", "DisplacementField", "read_composite", "write_composite"]
