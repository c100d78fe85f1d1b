"""What a run leaves on disk: the one table of output names, atomic writes, sidecars and
provenance."""
