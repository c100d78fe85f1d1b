"""The group level (``mninorm bids_dir output_dir group``): the reduce step after the participant
level's map step. One module per step, data flowing top to bottom:

``collect`` (what is on disk, space by space, checked) -> ``cohort`` (QC table, robust outliers,
who enters the maps) -> ``design`` (groups from participants.tsv) -> ``maps`` (mean/SD maps, t or F
maps) -> ``report`` (group.html); ``run`` strings them together.
"""

__all__ = ["GroupOutcome", "GroupSettings", "run_group"]


def __getattr__(name: str):
    # Loaded on first use, so that the command line can read the model's defaults
    # (group.model) without importing the whole group level.
    if name in __all__:
        from bids_app.group import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
