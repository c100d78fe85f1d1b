"""Numbers computed from images, shared by the brain-extraction checks and quality control."""
