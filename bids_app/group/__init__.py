"""The group level (``mninorm bids_dir output_dir group``): the reduce step after the participant
level's map step. One module per step, data flowing top to bottom:

``collect`` (what is on disk, space by space, checked) -> ``cohort`` (QC table, robust outliers,
who enters the maps) -> ``design`` (groups from participants.tsv) -> ``maps`` (mean/SD maps, t or F
maps) -> ``report`` (group.html); ``run`` strings them together.
"""

from bids_app.group.run import GroupOutcome, GroupSettings, run_group

__all__ = ["GroupOutcome", "GroupSettings", "run_group"]
