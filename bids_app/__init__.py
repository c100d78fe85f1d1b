"""mninorm: normalise T1-weighted brain MRI to MNI templates, as a BIDS App."""

__version__ = "0.1.0"
