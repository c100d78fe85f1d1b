"""Template spaces as the command lines name them: ``MNI152NLin2009cAsym``, ``MNI152Lin:res-2``,
``MNIPediatricAsym:cohort-2``, a custom ``/path/tpl-Name``; and the participant's own, ``T1w``.

The names every level shares (the participant level writes them, reports and the group level read
them back from file names and run records), so this module depends on nothing but the errors."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_SPACE = "MNI152NLin2009cAsym"
# The participant's own (native) space, as fMRIPrep and our transform names spell it
# (from-T1w_to-<TPL>); accepted in any case on the command lines.
NATIVE_SPACE = "T1w"

_SPACE_RE = re.compile(
    r"^(?P<template>[A-Za-z][A-Za-z0-9]*)(?P<entities>(?::[a-z]+-[A-Za-z0-9]+)*)$"
)
# A custom template given by path: .../tpl-<Name>, optionally followed by :res-N
_FOLDER_RE = re.compile(
    r"^(?P<folder>.*tpl-(?P<template>[A-Za-z0-9]+))/?(?P<entities>(?::res-[0-9]+)?)$"
)
_SPACE_ENTITIES = ("cohort", "res")


@dataclass(frozen=True, order=True)
class OutputSpace:
    """A template, optionally one of its cohorts and one of its resolution indices (``res-N``).

    ``folder`` is a custom template's ``tpl-<Name>`` folder when it was given by path."""

    template: str
    # TemplateFlow's index, not millimetres; None = the template's registration grid (res-1, or
    # its single grid, or the finest one available)
    resolution: int | None = None
    cohort: str | None = None
    folder: str | None = None

    @property
    def key(self) -> str:
        """One registration per key: the template and cohort ('MNIPediatricAsym_cohort-2'), as
        the transforms are named (from-T1w_to-<key>)."""
        return self.template if self.cohort is None else f"{self.template}_cohort-{self.cohort}"

    @property
    def label(self) -> str:
        """The space in file names: '<template>[_cohort-N][_res-N]'."""
        return self.key if self.resolution is None else f"{self.key}_res-{self.resolution}"

    def find_grid(self, fetch_template):
        """This space's grid (a ``templates.Template``), found by ``fetch_template``."""
        return fetch_template(self.template, self.resolution, self.cohort, self.folder)

    def find_registration_grid(self, fetch_template):
        return fetch_template(self.template, None, self.cohort, self.folder)

    def __str__(self) -> str:
        """As written on the command line (a custom template: its folder); parse_output_space
        reads it back."""
        text = self.folder if self.folder is not None else self.template
        if self.cohort is not None:
            text += f":cohort-{self.cohort}"
        return text if self.resolution is None else f"{text}:res-{self.resolution}"


def is_native_space(text: str) -> bool:
    """``T1w`` in any spelling (t1w, T1W): the participant's own space, not a template."""
    return text.strip().lower() == NATIVE_SPACE.lower()


def parse_output_space(text: str) -> OutputSpace:
    """Parse ``Template[:cohort-N][:res-N]`` (for example ``MNI152NLin6Asym:res-2`` or
    ``MNIPediatricAsym:cohort-2``), or a custom template's folder ``path/tpl-<Name>[:res-N]``."""
    text = text.strip()
    folder_match = _FOLDER_RE.match(text) if ("/" in text or text.startswith("tpl-")) else None
    match = folder_match or _SPACE_RE.match(text)
    entities = _space_entities(match["entities"]) if match else None
    if entities is None:
        raise UsageError(
            f"malformed output space {text!r}: expected a TemplateFlow identifier with an optional "
            "cohort and resolution index (MNI152NLin2009cAsym, MNI152NLin6Asym:res-2, "
            "MNIPediatricAsym:cohort-2:res-1) or a custom template's folder (path/to/tpl-<Name>)"
        )
    if entities and is_native_space(match.group("template")):
        raise UsageError(
            f"output space {text!r}: {NATIVE_SPACE} takes no resolution index (the native outputs "
            "are on the T1w's own grid); write just T1w, or leave it out"
        )
    res = entities.get("res")
    return OutputSpace(
        match.group("template"),
        int(res) if res is not None else None,
        entities.get("cohort"),
        str(Path(folder_match["folder"]).expanduser().absolute()) if folder_match else None,
    )


def _space_entities(text: str) -> dict[str, str] | None:
    """{'cohort': '2', 'res': '1'} from ':cohort-2:res-1'; None when malformed or repeated."""
    parts = [p.split("-", 1) for p in text.split(":")[1:]]
    entities = dict(parts)
    if len(entities) != len(parts) or set(entities) - set(_SPACE_ENTITIES):
        return None
    if "res" in entities and not entities["res"].isdigit():
        return None
    return entities


def parse_output_spaces(texts) -> tuple[OutputSpace, ...]:
    """The template spaces of ``--output-spaces``, each once, in the order given.

    ``T1w`` (fMRIPrep's name for the native space) is accepted and adds no space: the native
    outputs are always written. When it is the only one, the default template is used.
    """
    spaces = tuple(dict.fromkeys(parse_output_space(t) for t in texts if not is_native_space(t)))
    if spaces:
        return spaces
    log.info(
        "--output-spaces names no template: %s is used (the %s outputs are always written)",
        DEFAULT_SPACE, NATIVE_SPACE,
    )  # fmt: skip
    return (OutputSpace(DEFAULT_SPACE),)
