"""The methods paragraph (``logs/CITATION.md``), written from what the run records and sidecars say
ran, never from what a run usually does.

* the registration: the sentences and references each run record keeps of the engine's preset it
  ran (``RunRecord.registration``, written by the pipeline from the registry: stages, metrics,
  iterations, grid); a record older than those is named with the one-line stages its sidecar
  recorded;
* the brain mask and the interpolation of the outputs: the text the run recorded in its sidecars;
* the references: those of the software the text names (each engine's as its records keep them),
  and each template's from its ``template_description.json``.

It reads the output folder only: neither the registration package nor the participant steps.

A reference is listed only if the paragraph cites its ``[key]``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from bids_app import __version__
from bids_app.outputs import derivatives as drv
from bids_app.outputs.record import RunRecord
from bids_app.reports import qc

log = logging.getLogger(__name__)

# Software every run uses, whatever the engine (ANTsPy: N4 and the resampling of the outputs).
REFERENCES = {
    "ANTsX": "Tustison NJ, Cook PA, Holbrook AJ, Johnson HJ, Muschelli J, Devenyi GA, Duda JT, "
    "Das SR, Cullen NC, Gillen DL, Yassa MA, Stone JR, Gee JC, Avants BB (2021). The ANTsX "
    "ecosystem for quantitative biological and medical imaging. Scientific Reports 11:9068. "
    "https://doi.org/10.1038/s41598-021-87564-6",
    "N4": "Tustison NJ, Avants BB, Cook PA, Zheng Y, Egan A, Yushkevich PA, Gee JC (2010). N4ITK: "
    "improved N3 bias correction. IEEE Transactions on Medical Imaging 29(6):1310-1320. "
    "https://doi.org/10.1109/TMI.2010.2046908",
    "TemplateFlow": "Ciric R, Thompson WH, Lorenz R, et al. (2022). TemplateFlow: FAIR-sharing of "
    "multi-scale, multi-species brain models. Nature Methods 19:1568-1571. "
    "https://doi.org/10.1038/s41592-022-01681-2",
}

# Templates' papers, by the DOI their template_description.json lists in ReferencesAndLinks; other
# entries are listed as they are written there.
TEMPLATE_PAPERS = {
    "10.1016/j.neuroimage.2010.07.033": "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, "
    "Collins DL, Brain Development Cooperative Group (2011). Unbiased average age-appropriate "
    "atlases for pediatric studies. NeuroImage 54(1):313-327. "
    "https://doi.org/10.1016/j.neuroimage.2010.07.033",
    "10.1016/s1053-8119(09)70884-5": "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL "
    "(2009). Unbiased nonlinear average age-appropriate brain templates from birth to adulthood. "
    "NeuroImage 47(Suppl 1):S102. https://doi.org/10.1016/S1053-8119(09)70884-5",
    "10.1016/j.neuroimage.2012.01.024": "Evans AC, Janke AL, Collins DL, Baillet S (2012). Brain "
    "templates and atlases. NeuroImage 62(2):911-922. "
    "https://doi.org/10.1016/j.neuroimage.2012.01.024",
}

# package (as in the records' "Software") -> how the text names it, and its reference key
_SOFTWARE = {
    "picsl-greedy": ("Greedy (picsl-greedy {version})", "Greedy"),
    "antspyx": ("ANTsPy {version}", "ANTsX"),
    "nibabel": ("NiBabel {version}", None),
    "templateflow": ("TemplateFlow {version}", "TemplateFlow"),
}

# keys of the recorded "OutputInterpolation" -> what they resample
_OUTPUT_WORDS = {
    "T1w": "the T1w",
    "BrainMask": "the brain mask",
    "LogJacobian": "log-Jacobian maps",
}


@dataclass(frozen=True)
class RecordedRegistration:
    """What one T1w's run record (and, for an older record, its template-space sidecar) says
    about its registration."""

    engine: str | None  # the --engine name; None: not recorded
    engine_label: str | None  # as the sidecars name it
    package: str | None  # the engine's distribution; None: not recorded
    preset: str | None
    stages: str | None  # the preset's one line
    recorded_sentences: tuple[str, ...] = ()  # the preset's methods sentences, as it ran
    cited: dict = field(default_factory=dict, hash=False, compare=False)  # key -> reference

    def summary(self) -> str:
        """One line for the report: engine, preset and its stages."""
        engine = self.engine_label or self.engine or "engine not recorded"
        return f"{engine}, preset {self.preset}" + (f": {self.stages}" if self.stages else "")

    def sentences(self) -> tuple[str, ...]:
        if self.recorded_sentences:
            return self.recorded_sentences
        stages = f" ({self.stages})" if self.stages else ""
        engine = self.engine_label or "a registration engine that was not recorded"
        return (f"Registration used {engine}, preset `{self.preset}`{stages}.",)

    def references(self) -> dict[str, str]:
        return dict(self.cited)


def recorded_registration(content: RunRecord, sidecar: dict | None = None) -> RecordedRegistration:
    """The registration a run record (``content``) says ran; a record older than its
    ``Registration`` entry is completed from its space sidecar (``sidecar``), and claims nothing
    more than those two say."""
    recorded = content.registration
    if recorded is not None:
        return RecordedRegistration(
            engine=content.engine,
            engine_label=recorded.engine_label,
            package=recorded.engine_package,
            preset=recorded.preset or content.preset,
            stages=recorded.stages,
            recorded_sentences=recorded.methods,
            cited=dict(recorded.references),
        )
    registration = (sidecar or {}).get("Registration") or {}
    return RecordedRegistration(
        engine=content.engine,
        engine_label=registration.get("Engine"),
        package=None,
        preset=content.preset or registration.get("Preset"),
        stages=registration.get("Stages"),
    )


def methods_text(output_dir: Path, records: list[qc.T1wRecord], fetch_template) -> str:
    """``logs/CITATION.md``: paragraphs to paste into a paper, with their references."""
    ok = [r for r in records if r.ok] or records
    sidecars = {r: _space_sidecar(output_dir, r) for r in ok}
    registrations = {r: recorded_registration(r.content, sidecars[r]) for r in ok}
    software = ok[0].content.software
    template_texts, template_refs = _templates(ok, fetch_template)
    references = dict(REFERENCES)
    for registration in registrations.values():
        references.update(registration.references())

    packages = [reg.package for reg in registrations.values() if reg.package is not None]
    tools = [
        _software(package, software.get(package, "unknown"))
        for package in dict.fromkeys([*packages, "antspyx", "nibabel", "templateflow"])
    ]
    preprocessing = (
        "T1-weighted images were normalised to standard space with mninorm "
        f"{software.get('mninorm', __version__)} ({drv.CODE_URL}), which uses {_join(tools)}. "
        "Each image's header was checked and the image reoriented to RAS. Intensity "
        "non-uniformity was corrected with N4 [N4] after truncating intensities to their "
        "0.01-0.999 quantiles. " + _brain_mask_sentence(output_dir, ok)
    )
    registration = (
        "The bias-corrected T1w, masked by its brain mask, was registered to the brain (T1w "
        f"masked by its brain mask) of {_join(template_texts)} [Template]. "
        + _registration_sentences(registrations)
        + _lesion_sentence(ok)
        + _seed_sentence(ok)
    )
    outputs = _outputs_sentence(sidecars) + (
        "Log-Jacobian-determinant maps were computed from the transform's displacement field and "
        "its affine part."
    )
    paragraphs = [preprocessing, registration, outputs]
    listed = [*references.items(), *(("Template", ref) for ref in dict.fromkeys(template_refs))]
    body = " ".join(paragraphs)
    cited = {key: body.index(f"[{key}]") for key in re.findall(r"\[([A-Za-z0-9]+)\]", body)}
    lines = [
        "# Methods",
        "",
        *[line for paragraph in paragraphs for line in (paragraph, "")],
        "## References",
        "",
        *[
            f"- [{key}] {text}"
            for key, text in sorted(listed, key=lambda item: cited.get(item[0], -1))
            if key in cited
        ],  # in the order the text first cites them
        "",
    ]
    return "\n".join(lines)


def _software(package: str, version: str) -> str:
    name, key = _SOFTWARE.get(package, (f"{package} {{version}}", None))
    return name.format(version=version) + (f" [{key}]" if key else "")


def _registration_sentences(registrations: dict) -> str:
    """The registration's sentences; one group per engine and preset when the records differ."""
    groups: dict[tuple, list] = {}
    for record, registration in registrations.items():
        groups.setdefault((registration.engine, registration.preset), []).append(
            (record, registration)
        )
    if len(groups) == 1:
        (members,) = groups.values()
        return " ".join(members[0][1].sentences())
    texts = []
    for members in groups.values():
        names = ", ".join(record.t1w.path.name for record, _ in members)
        texts.append(f"For {names}: " + " ".join(members[0][1].sentences()))
    return " ".join(texts)


def _seed_sentence(records: list[qc.T1wRecord]) -> str:
    seeds = list(
        dict.fromkeys(
            str(r.content.random_seed) for r in records if r.content.random_seed is not None
        )
    )
    if not seeds:
        return ""
    return f" The random seed was {_join(seeds)}."


def _brain_mask_sentence(output_dir: Path, records: list[qc.T1wRecord]) -> str:
    """The brain-mask method each T1w's sidecars recorded, as recorded."""
    methods: dict[str, list[str]] = {}
    for record in records:
        method = _recorded_brain_mask(output_dir, record)
        if method:
            methods.setdefault(method, []).append(record.t1w.path.name)
    if not methods:
        return "The brain-mask method was not recorded."
    if len(methods) == 1:
        return f"Brain mask: {next(iter(methods))}."
    return (
        "Brain masks: "
        + "; ".join(f"{method} ({', '.join(names)})" for method, names in methods.items())
        + "."
    )


def _recorded_brain_mask(output_dir: Path, record: qc.T1wRecord) -> str | None:
    native_t1w = drv.native_path(output_dir, record.t1w, "t1w")
    native_mask = drv.native_path(output_dir, record.t1w, "mask")
    method = _read_json(drv.sidecar_path(native_t1w)).get("BrainMaskMethod")
    return method or _read_json(drv.sidecar_path(native_mask)).get("Method")


def _outputs_sentence(sidecars: dict) -> str:
    recorded = {}
    for sidecar in sidecars.values():
        recorded = (sidecar.get("Registration") or {}).get("OutputInterpolation") or {}
        if recorded:
            break
    if not recorded:
        return (
            "The T1w and its brain mask were resampled into template space in one step with the "
            "composite transform. "
        )
    how = "; ".join(f"{_OUTPUT_WORDS.get(key, key)}: {text}" for key, text in recorded.items())
    return (
        "The outputs were resampled into template space in one step with the composite "
        f"transform (interpolation of {how}). "
    )


def _templates(records: list[qc.T1wRecord], fetch_template) -> tuple[list[str], list[str]]:
    """How the text names each template, and the template references."""
    spaces = {
        key: spaces[0] for r in records for key, spaces in qc.spaces_by_template(r).items()
    }
    texts, references = [], []
    for name, space in spaces.items():
        try:
            template = space.find_registration_grid(fetch_template)
        except Exception:  # noqa: BLE001 - metadata decorates the text; its absence must not stop it
            texts.append(f"{name} (TemplateFlow identifier `{name}`)")
            references.append(_unlisted_template(name, name))  # its metadata could not be read
            continue
        texts.append(_template_text(name, template))
        references += template_references(template)
    return texts, references


def _lesion_sentence(records: list[qc.RunRecord]) -> str:
    """Cost-function masking, said when any T1w had a lesion mask."""
    with_lesion = [r for r in records if r.content.lesion_mask]
    if not with_lesion:
        return ""
    which = "The" if len(with_lesion) == len(records) else f"For {len(with_lesion)} image(s), the"
    return (
        f"{which} lesion mask given with the T1w (label-lesion_roi) was left out of the "
        "similarity metric of brain extraction and of every registration stage (cost-function "
        "masking; in template space, the lesion carried there by the starting transform and "
        "dilated by 2 voxels), and kept inside the brain mask. "
    )


def _template_text(name: str, template) -> str:
    if template.custom:
        text = f"the {template.full_name} template (a custom template, `{name}`"
    else:
        cohort = f", cohort {template.cohort}" if template.cohort else ""
        text = (
            f"the {template.full_name} template (TemplateFlow identifier `{template.name}`"
            f"{cohort}, TemplateFlow version {template.metadata_version}"
        )
    if template.resolution != 1:  # the registration grid is said when it is not res-1
        grid = "x".join(f"{z:g}" for z in template.zooms_mm)
        text += f"; registered on {template.grid_label}, {grid} mm"
    return text + ")"


def template_references(template) -> list[str]:
    """A template's ``ReferencesAndLinks``, known papers written out in full."""
    found = [TEMPLATE_PAPERS.get(_doi(link), link) for link in template.citations]
    return found or [_unlisted_template(template.full_name, template.name)]


def _unlisted_template(full_name: str, name: str) -> str:
    return (
        f"{full_name} (TemplateFlow identifier {name}): no reference found with the template; "
        "see https://www.templateflow.org for the publication to cite."
    )


def _doi(link: str) -> str:
    """The DOI in a link ("https://doi.org/10...", "doi:10...", "10..."), lower case."""
    text = link.strip().lower()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "doi:"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _space_sidecar(output_dir: Path, record: qc.T1wRecord) -> dict:
    for template, spaces in qc.spaces_by_template(record).items():
        path = drv.sidecar_path(drv.space_path(output_dir, record.t1w, "t1w", spaces[0]))
        sidecar = _read_json(path)
        if sidecar:
            return sidecar
        log.debug("no sidecar for %s in %s", template, path)
    return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
