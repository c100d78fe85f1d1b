"""The participant level: find each T1w, then the steps in order (header, bias, brain, registration,
outputs). ``pipeline.py`` is the only module here that calls the others."""
