"""The methods text (``logs/CITATION.md``, the report's Methods and its Summary row) says what ran.

Regression tests for the issue "the methods text is wrong for every default run": after Greedy
runs it described antsRegistration (Mattes MI, SyN, Lanczos interpolation, histogram matching) and
did not cite Greedy, because the text was fixed and the ANTs preset was looked up whatever the
engine. The outputs here are synthetic (``qc_cases.write_synthetic_outputs``) but their sidecars
are what ``pipeline._provenance`` records for the engine and preset named.
"""

from __future__ import annotations

import html
import inspect
import json
from pathlib import Path

import pytest
from conftest import TEST_TEMPLATE
from qc_cases import recorded_extraction, recorded_provenance, write_synthetic_outputs

from bids_app.outputs import derivatives as drv
from bids_app.registration.base import by_level
from bids_app.registration.registry import get_preset
from bids_app.reports import qc
from bids_app.reports.methods import methods_text, recorded_registration, template_references
from bids_app.reports.participant import write_participant_report
from bids_app.templates import Template

ENGINE_PRESETS = [
    (engine, preset) for engine in ("greedy", "ants") for preset in ("precise", "fast")
]

# What each engine's text must say, and what only the other engine's may say.
NAMED = {
    "greedy": [
        "Greedy [Greedy]",
        "picsl-greedy",
        "affine (12 degrees of freedom) with normalised mutual information",
        "normalised cross-correlation in a 5x5x5-voxel window",
        "restricted to the template's brain mask",
        "Yushkevich PA, Pluta J, Wang H, Wisse LEM, Das S, Wolk D (2016)",
        "https://doi.org/10.1016/j.jalz.2016.06.205",
    ],
    "ants": [
        "antsRegistration (ANTs)",
        "rigid (gradient step 0.1) with Mattes mutual information, 32 bins",
        "then affine (gradient step 0.1) with Mattes mutual information",
        "then SyN (gradient step",
        "neighbourhood cross-correlation, radius 2 voxels",
        "winsorised to their 0.5%-99.5% quantiles, histogram matching was used",
        "restricted to the brain masks of both images",
        "[SyN] Avants BB, Epstein CL, Grossman M, Gee JC (2008)",
        "https://doi.org/10.1016/j.media.2007.06.004",
    ],
}
NEVER = ["Lanczos"]  # no engine's outputs are resampled with it
FOREIGN = {
    "greedy": ["antsRegistration", "Mattes", "histogram matching", "winsorised", "SyN",
               "Avants BB, Epstein CL", "10.1016/j.media.2007.06.004"],
    "ants": ["Greedy", "greedy", "picsl", "Yushkevich PA, Pluta J", "10.1016/j.jalz.2016.06.205"],
}  # fmt: skip
# Every run, whatever the engine
ALWAYS = [
    "[N4] Tustison NJ, Avants BB, Cook PA",
    "[ANTsX] Tustison NJ, Cook PA, Holbrook AJ",
    "https://doi.org/10.1038/s41598-021-87564-6",
    "[TemplateFlow] Ciric R",
    "https://doi.org/10.1038/s41592-022-01681-2",
    f"TemplateFlow identifier `{TEST_TEMPLATE}`",
    "[Template] Fonov V, Evans AC, Botteron K",  # from the template's ReferencesAndLinks
    "Brain mask: the OASIS30ANTs template's brain mask brought back onto the T1w by a "
    "head-to-template registration",
    "the T1w: cubic B-spline, negative values set to 0",
    "the brain mask: linear, thresholded at 0.5",
    "The random seed was 1.",
]


@pytest.fixture
def fetch_template(templateflow_home):
    from bids_app.templates import fetch_template

    return fetch_template


def _methods(output_dir: Path, subject: str, fetch_template) -> str:
    return methods_text(output_dir, qc.collect_records(output_dir, subject), fetch_template)


@pytest.mark.parametrize("engine, preset", ENGINE_PRESETS)
def test_methods_describe_the_engine_and_preset_that_ran(tmp_path, fetch_template, engine, preset):
    write_synthetic_outputs(tmp_path, fetch_template(TEST_TEMPLATE), engine=engine, preset=preset)
    text = _methods(tmp_path, "01", fetch_template)

    chosen = get_preset(engine, preset)
    for expected in [*NAMED[engine], *ALWAYS, f"preset `{preset}`", f"{chosen.grid_mm:g} mm grid"]:
        assert expected in text, expected
    for stage in chosen.stages:  # each stage's iterations per level, as the preset holds them
        assert f"{by_level(stage.iterations)} iterations at shrink factors" in text
    for unexpected in [*FOREIGN[engine], *NEVER]:
        assert unexpected not in text, unexpected
    cited = {line.split("]")[0][3:] for line in text.splitlines() if line.startswith("- [")}
    in_text = text.split("## References")[0]
    assert all(f"[{key}]" in in_text for key in cited)  # no reference the text does not cite


def _all_presets():
    from bids_app.registration import ants, greedy

    return [("ants", name) for name in ants.PRESETS] + [("greedy", name) for name in greedy.PRESETS]


@pytest.mark.parametrize("engine, preset", _all_presets())
def test_every_preset_describes_its_own_stages_and_nothing_of_the_other_engine(engine, preset):
    chosen = get_preset(engine, preset)
    text = " ".join(chosen.methods())
    assert f"preset `{preset}`" in text and f"{chosen.grid_mm:g} mm grid" in text
    assert text.count("; then ") == len(chosen.stages) - 1
    for stage in chosen.stages:
        assert f"{by_level(stage.iterations)} iterations" in text
        assert stage.summary() in chosen.description
    for unexpected in FOREIGN[engine]:
        assert unexpected not in text and unexpected not in chosen.description, unexpected
    assert set(chosen.references) == {"ants": {"SyN"}, "greedy": {"Greedy"}}[engine]


@pytest.mark.parametrize(
    "preset, warp",
    [
        ("precise", "the warp composed of small greedy updates"),  # plain greedy: no -sv
        ("fast", "the warp being the exponential of a stationary velocity field"),  # -sv
    ],
)
def test_greedy_text_says_how_the_warp_was_modelled(tmp_path, fetch_template, preset, warp):
    assert get_preset("greedy", preset).deformable.stationary_velocity == ("stationary" in warp)
    write_synthetic_outputs(tmp_path, fetch_template(TEST_TEMPLATE), engine="greedy", preset=preset)
    assert warp in _methods(tmp_path, "01", fetch_template)


@pytest.mark.parametrize("engine", ["greedy", "ants"])
def test_report_summary_and_methods_name_the_engine_that_ran(tmp_path, fetch_template, engine):
    write_synthetic_outputs(tmp_path, fetch_template(TEST_TEMPLATE), engine=engine, preset="fast")
    report = write_participant_report(tmp_path, "01", fetch_template)
    page = report.report.read_text()
    summary = page.split("<h3>Summary</h3>")[1].split("</table>")[0]
    row = summary.split("<th>Registration</th>")[1].split("</tr>")[0]
    label = {"greedy": "Greedy (picsl-greedy)", "ants": "ANTsPy antsRegistration"}[engine]
    assert html.escape(f"{label}, preset fast: {get_preset(engine, 'fast').description}") in row
    methods = page.split('<section id="methods">')[1]
    for expected in NAMED[engine]:
        assert html.escape(expected) in methods, expected
    for unexpected in [*FOREIGN[engine], *NEVER, "SyN part"]:  # the whole page, QC labels too
        assert unexpected not in page, unexpected
    citation = (tmp_path / drv.CITATION).read_text()
    assert html.escape(citation.splitlines()[2]) in page


def test_a_participant_whose_runs_all_failed_keeps_the_methods_text_of_one_that_ran(
    tmp_path, fetch_template
):
    """Seen on the end-to-end run: sub-03 (a 4D T1w, failed) was reported last and its text,
    with no sidecar to read, replaced the one written from sub-01's."""
    template = fetch_template(TEST_TEMPLATE)
    write_synthetic_outputs(tmp_path, template, subject="01")
    write_synthetic_outputs(tmp_path, template, subject="02", status="failed")
    write_participant_report(tmp_path, "01", fetch_template)
    written = (tmp_path / drv.CITATION).read_text()
    assert "Brain mask: the OASIS30ANTs template's brain mask brought back" in written
    write_participant_report(tmp_path, "02", fetch_template)
    assert (tmp_path / drv.CITATION).read_text() == written


def test_the_brain_mask_sentence_is_what_the_sidecars_recorded(tmp_path, fetch_template):
    template = fetch_template(TEST_TEMPLATE)
    write_synthetic_outputs(tmp_path, template, subject="01", run="1")
    write_synthetic_outputs(tmp_path, template, subject="01", run="2")
    sidecar = drv.sidecar_path(tmp_path / "sub-01/anat/sub-01_run-2_desc-preproc_T1w.nii.gz")
    recorded = json.loads(sidecar.read_text())
    recorded["BrainMaskMethod"] = "a method another version records (test)"
    sidecar.write_text(json.dumps(recorded))
    text = _methods(tmp_path, "01", fetch_template)
    first = recorded_extraction("greedy").method
    assert (
        f"Brain masks: {first} (sub-01_run-1_T1w.nii.gz); a method another version records "
        "(test) (sub-01_run-2_T1w.nii.gz)."
    ) in text


def test_records_of_different_engines_are_described_each(tmp_path, fetch_template):
    template = fetch_template(TEST_TEMPLATE)
    write_synthetic_outputs(tmp_path, template, run="1", engine="greedy", preset="precise")
    write_synthetic_outputs(tmp_path, template, run="2", engine="ants", preset="fast")
    text = _methods(tmp_path, "01", fetch_template)
    assert "For sub-01_run-1_T1w.nii.gz: Registration used Greedy [Greedy]" in text
    assert "For sub-01_run-2_T1w.nii.gz: Registration used antsRegistration (ANTs)" in text
    assert "[Greedy] Yushkevich PA" in text and "[SyN] Avants BB" in text


def test_an_older_record_is_read_through_its_sidecar(tmp_path, fetch_template):
    """Records written before the engine and its methods text were recorded: the sidecar's engine
    label names it; the preset is described by the stages its sidecar recorded, and nothing more
    is claimed."""
    template = fetch_template(TEST_TEMPLATE)
    write_synthetic_outputs(tmp_path, template, engine="ants", preset="fast")
    (record,) = qc.collect_records(tmp_path, "01")
    content = json.loads(record.path.read_text())
    del content["Engine"], content["Registration"]
    record.path.write_text(json.dumps(content))
    (record,) = qc.collect_records(tmp_path, "01")
    (spaces,) = qc.spaces_by_template(record).values()
    sidecar_path = drv.sidecar_path(drv.space_path(tmp_path, record.t1w, "t1w", spaces[0]))
    sidecar = json.loads(sidecar_path.read_text())
    registration = recorded_registration(record.content, sidecar)
    assert registration.engine_label == "ANTsPy antsRegistration"
    assert registration.stages == get_preset("ants", "fast").description

    content["Preset"] = "retired"
    record.path.write_text(json.dumps(content))
    sidecar["Registration"].update(Stages="rigid -> affine -> SyN (an old preset)")
    del sidecar["Registration"]["OutputInterpolation"]
    sidecar_path.write_text(json.dumps(sidecar))
    text = _methods(tmp_path, "01", fetch_template)
    assert (
        "Registration used ANTsPy antsRegistration, preset `retired` "
        "(rigid -> affine -> SyN (an old preset))."
    ) in text
    assert "[SyN]" not in text and "histogram matching" not in text
    assert "cubic B-spline" not in text  # the interpolation was not recorded: not claimed


def _template(name: str, citations: tuple[str, ...]) -> Template:
    return Template(name, 1, Path("t1w.nii.gz"), Path("mask.nii.gz"), (1.0, 1.0, 1.0), "1.0.0",
                    citations, f"{name} full name")  # fmt: skip


@pytest.mark.parametrize(
    "name, citations, expected",
    [
        (
            "MNI152NLin2009cAsym",  # as in its template_description.json
            ("https://doi.org/10.1016/j.neuroimage.2010.07.033",
             "https://doi.org/10.1016/S1053-8119(09)70884-5", "http://nist.mni.mcgill.ca/?p=904"),
            ["Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL",
             "NeuroImage 54(1):313-327", "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL "
             "(2009)", "http://nist.mni.mcgill.ca/?p=904"],
        ),
        (
            "MNI152NLin6Asym",
            ("https://doi.org/10.1016/j.neuroimage.2012.01.024",
             "https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Atlases"),
            ["Evans AC, Janke AL, Collins DL, Baillet S (2012). Brain templates and atlases",
             "https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Atlases"],
        ),
        (
            "MNIColin27",  # no paper known here: its links as TemplateFlow lists them
            ("https://doi.org/10.1097/00004728-199803000-00032",),
            ["https://doi.org/10.1097/00004728-199803000-00032"],
        ),
        ("Unlisted", (), ["Unlisted full name (TemplateFlow identifier Unlisted): no reference"]),
    ],
)  # fmt: skip
def test_template_references_come_from_its_description(name, citations, expected):
    references = template_references(_template(name, citations))
    assert len(references) == max(1, len(citations))
    for text in expected:
        assert any(text in reference for reference in references), text


def test_the_recorded_interpolation_is_what_the_outputs_are_written_with():
    """A tripwire: ``_provenance`` records by hand what ``_write_template_outputs`` does."""
    from bids_app.participant import pipeline
    from bids_app.participant.discovery import T1wInput

    t1w = T1wInput("01", Path("sub-01_T1w.nii.gz"), "sub-01/anat/sub-01_T1w.nii.gz", {})
    recorded = recorded_provenance(t1w, "greedy", "fast")["Registration"]["OutputInterpolation"]
    source = inspect.getsource(pipeline._write_template_outputs)
    assert "B-spline" in recorded["T1w"] and 'interpolator="bSpline"' in source
    assert "negative values set to 0" in recorded["T1w"] and "_clip_negative(" in source
    assert recorded["BrainMask"] == "linear, thresholded at 0.5"
    assert 'interpolator="linear"' in source and "0.5, 1e9, 1, 0" in source
    assert "linear" in recorded["LogJacobian"] and 'interp_type="linear"' in source
