"""Figures, the HTML report and ``--reports-only``: on synthetic outputs, on the end-to-end run of
``conftest.run``, and opened in a real headless Chromium as a person would."""

from __future__ import annotations

import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from browser import open_report
from conftest import TEST_TEMPLATE, save_t1w, write_dataset_description
from fakes import FakeEngines
from PIL import Image
from qc_cases import write_synthetic_outputs

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.reports import qc
from bids_app.reports.participant import write_participant_report

SPACE = TEST_TEMPLATE


class _Links(HTMLParser):
    """Every src/href of a page, with the tag it is on."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append((tag, name, value))


def _links(page: Path) -> list[tuple[str, str, str]]:
    parser = _Links()
    parser.feed(page.read_text())
    return parser.links


def _assert_self_contained(page: Path) -> None:
    links = _links(page)
    assert not [link for link in links if link[0] in ("script", "link")], "no external code/style"
    for tag, _, value in links:
        if value.startswith("#"):
            continue
        assert "://" not in value and not value.startswith("//"), f"{tag} -> {value}"
        if tag == "img":
            assert (page.parent / value).is_file(), value


def _status(out: Path, subject: str) -> str:
    rows = [row for table in out.glob(f"sub-{subject}/**/*_qc.tsv") for row in _rows(table)]
    statuses = {row["participant_status"] for row in rows}
    assert len(statuses) == 1
    return statuses.pop()


def _rows(table: Path) -> list[dict]:
    return qc.read_qc_table(table)


# ---- on synthetic outputs (fast) -------------------------------------------------------------


@pytest.fixture
def synthetic(tmp_path, templateflow_home):
    from bids_app.templates import fetch_template

    template = fetch_template(TEST_TEMPLATE, 1)
    write_synthetic_outputs(tmp_path, template, subject="01")
    write_synthetic_outputs(tmp_path, template, subject="02", shift_voxels=4)
    return tmp_path


def test_report_figures_and_methods_are_written_from_disk(synthetic):
    report = write_participant_report(synthetic, "01")
    assert report.status == "pass"
    assert report.report == synthetic / "sub-01.html"
    _assert_self_contained(report.report)
    names = sorted(p.name for p in report.figures)
    assert names == sorted(
        [
            "sub-01_desc-brain_mask.png",
            f"sub-01_space-{SPACE}_desc-preproc_T1w.png",
            f"sub-01_space-{SPACE}_desc-template_T1w.png",
            f"sub-01_space-{SPACE}_desc-nonlinear_logjacobian.png",
        ]
    )
    assert all(p.parent == synthetic / "sub-01" / "figures" for p in report.figures)
    citation = (synthetic / "logs" / "CITATION.md").read_text()
    assert f"TemplateFlow identifier `{SPACE}`" in citation
    assert "https://doi.org/10.1016/j.neuroimage.2010.07.033" in citation  # template metadata
    assert "Registration used Greedy [Greedy]" in citation  # the engine the run record names
    assert "N4" in citation and "10.1038/s41592-022-01681-2" in citation
    page = report.report.read_text()
    assert "reoriented LIA -&gt; RAS" in page  # header fixes in the summary
    assert citation.splitlines()[2][:40] in page  # the methods paragraph is shown too


def test_flicker_pair_has_identical_geometry_and_shows_images(synthetic):
    report = write_participant_report(synthetic, "01")
    figures = {p.name: p for p in report.figures}
    pair = [
        figures[f"sub-01_space-{SPACE}_desc-preproc_T1w.png"],
        figures[f"sub-01_space-{SPACE}_desc-template_T1w.png"],
    ]
    sizes = {Image.open(p).size for p in pair}
    assert len(sizes) == 1
    width, height = sizes.pop()
    assert width / height == pytest.approx(7 / 3, rel=0.02)  # 7 slices across, 3 views down
    for path in report.figures:
        pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert pixels.std() > 10, f"{path.name} looks blank"


def test_misaligned_participant_is_reported_as_failing(synthetic):
    report = write_participant_report(synthetic, "02")
    assert report.status == "fail"
    page = report.report.read_text()
    assert '<span class="badge fail">fail</span>' in page
    assert "ncc = " in page


def test_a_report_failure_never_fails_the_participant(monkeypatch, caplog, tmp_path):
    from bids_app.participant import pipeline
    from bids_app.reports import participant as report
    from bids_app.settings import Settings

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "write_participant_report", broken)
    settings = Settings(bids_dir=tmp_path, output_dir=tmp_path, analysis_level="participant")
    with caplog.at_level(logging.WARNING):
        pipeline.write_report("01", settings)
    assert "sub-01: QC and report not written (RuntimeError: disk on fire)" in caplog.text


# ---- on the end-to-end run -------------------------------------------------------------------


def test_every_processed_participant_gets_qc_figures_and_a_report(run):
    out = run["out"]
    assert _status(out, "01") == "pass"
    assert _status(out, "02") == "pass"
    assert _status(out, "03") == "fail"
    (failed,) = _rows(out / "sub-03" / "anat" / "sub-03_desc-mninorm_qc.tsv")
    assert "a T1w must be a 3D image" in failed["status_reasons"]
    for subject in ("01", "02", "03"):
        _assert_self_contained(out / f"sub-{subject}.html")
    assert "a T1w must be a 3D image" in (out / "sub-03.html").read_text()
    assert not (out / "sub-04.html").exists()  # no T1w, no run record, nothing to report
    page = (out / "sub-01.html").read_text()
    assert page.count('<section class="t1w"') == 2  # run-1 and run-2
    assert "reoriented LAS -&gt; RAS" in page


def test_reports_only_rebuilds_qc_and_reports_without_rerunning(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    tables = {p.relative_to(out): p.read_text() for p in out.rglob("*_qc.tsv")}
    expected = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for generated in [*out.glob("sub-*.html"), *out.rglob("*_qc.*")]:
        generated.unlink()
    for folder in [*out.glob("sub-*/figures"), out / "logs"]:
        shutil.rmtree(folder)
    images = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    code = main([str(run["root"]), str(out), "participant", "--reports-only"])
    assert code == ExitCode.OK
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == expected
    assert {p.relative_to(out): p.read_text() for p in out.rglob("*_qc.tsv")} == tables
    assert {p: p.stat().st_mtime_ns for p in images} == images  # nothing was re-run


def test_reports_only_of_an_unprocessed_participant_is_an_error(run, capfd):
    code = main(
        [str(run["root"]), str(run["out"]), "participant", "--reports-only",
         "--participant-label", "04"]
    )  # fmt: skip
    assert code == ExitCode.NOTHING_MATCHED
    message = capfd.readouterr().err
    assert "no run record of participant(s) 04" in message
    assert "(01, 02, 03)" in message  # the ones that can be rebuilt
    assert "Traceback" not in message


def test_a_front_back_flipped_header_gets_a_worse_status_than_the_good_run(dataset, run, tmp_path):
    """A bad normalisation: the header of sub-01's run-1 claims the voxel rows run back to front.
    The fake engine (tests/fakes.py) stays at the start search's pose, which, as a rigid stage,
    cannot undo a mirror image, so the normalisation ends up wrong, and QC must say so. (A
    left-right flip is invisible to image similarity on this symmetric test template.) QC of a real
    bad registration: test_real_scan_passes_and_its_affine_only_registration_does_not (slow)."""
    root, _ = dataset
    good = root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_run-1_T1w.nii.gz"
    img = nib.load(good)
    mirror = np.diag([1.0, -1.0, 1.0, 1.0])
    mirror[1, 3] = img.shape[1] - 1
    bids = tmp_path / "bids"
    write_dataset_description(bids)
    save_t1w(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ mirror), bids, "01", "1", "1")
    out = tmp_path / "out"
    code = main(
        [str(bids), str(out), "participant", "--output-spaces", SPACE, "--preset", "fast",
         "--nthreads", "2", "--skip-bids-validation", "--in-process"],
        engines=FakeEngines(),
    )  # fmt: skip
    assert code == ExitCode.OK  # the run itself succeeds: only QC can tell
    table = "sub-01/ses-1/anat/sub-01_ses-1_run-1_desc-mninorm_qc.tsv"
    (good_row,) = _rows(run["out"] / table)
    (bad_row,) = _rows(out / table)
    assert good_row["status"] == "pass"
    assert bad_row["status"] == "fail", bad_row["status_reasons"]
    assert float(bad_row["ncc"]) < float(good_row["ncc"]) - 0.2
    assert (out / "sub-01.html").is_file()


# ---- in a real browser -----------------------------------------------------------------------


def test_report_loads_offline_with_no_errors_and_every_figure_shown(browser, run):
    page, log = open_report(browser, run["out"] / "sub-01.html")
    try:
        images = page.eval_on_selector_all(
            "img", "all => all.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        )
        assert len(images) == 2 * 4  # per T1w: brain mask, the flicker pair, log-Jacobian
        assert all(complete and width > 0 for _, complete, width in images), images
        for img in page.query_selector_all("img:not(.template)"):
            box = img.bounding_box()
            assert img.is_visible() and box["width"] > 300 and box["height"] > 100
        assert log.console_errors == []
        assert log.failed_requests == []
        assert log.outside_requests == []
        assert all(url.startswith("file://") for url in log.requests)
    finally:
        page.context.close()


def test_before_after_toggle_changes_what_is_displayed(browser, run):
    page, log = open_report(browser, run["out"] / "sub-02.html")
    try:
        figure = page.locator("figure.flicker").first
        stack, button = figure.locator(".stack"), figure.locator("button")
        template_img = figure.locator("img.template")
        stack.scroll_into_view_if_needed()
        page.mouse.move(0, 0)
        assert not template_img.is_visible()
        before = stack.screenshot()
        button.click()
        page.mouse.move(0, 0)
        assert template_img.is_visible()
        assert "the template" in figure.locator("figcaption b:visible").inner_text()
        assert button.get_attribute("aria-pressed") == "true"
        after = stack.screenshot()
        assert after != before
        button.click()  # and back
        page.mouse.move(0, 0)
        assert not template_img.is_visible()
        stack.hover()  # hovering flicks too
        assert template_img.is_visible()
        assert log.console_errors == []
    finally:
        page.context.close()


def test_report_screenshot(browser, run, tmp_path):
    page, _ = open_report(browser, run["out"] / "sub-02.html", width=1300, height=900)
    try:
        path = tmp_path / "sub-02.png"
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.context.close()
    shot = Image.open(path)
    assert shot.width == 1300 and shot.height > 2000  # summary, four figures, tables, methods
    pixels = np.asarray(shot.convert("L"), dtype=float)
    assert (pixels < 30).mean() > 0.1  # the black figure panels are there
    assert (pixels > 230).mean() > 0.2  # and the page around them


# ---- on a real 1 mm whole-head scan (../shared/data/heads sub-02) ----------------------------


@pytest.fixture(scope="module")
def heads_sub02(shared_data, tmp_path_factory):
    """sub-02 of ../shared/data/heads normalised with the fast preset, as a user runs it."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("heads")
    env = {
        **os.environ,
        "TEMPLATEFLOW_HOME": str(shared_data / "templateflow"),
        "TEMPLATEFLOW_AUTOUPDATE": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bids_app", str(shared_data / "heads"), str(out), "participant",
         "--participant-label", "02", "--preset", "fast"],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out, env


@pytest.mark.slow
@pytest.mark.shared
def test_real_scan_passes_and_its_affine_only_registration_does_not(heads_sub02, tmp_path):
    from qc_cases import drop_nonlinear_stage, templates_in

    out, env = heads_sub02
    good_table = out / "sub-02" / "anat" / "sub-02_desc-mninorm_qc.tsv"
    (good,) = _rows(good_table)
    assert good["status"] == "pass", good["status_reasons"]
    assert (out / "sub-02.html").is_file()
    _assert_self_contained(out / "sub-02.html")

    # the same registration with its SyN stage dropped: the affine stage only
    bad_out = tmp_path / "affine-only"
    shutil.copytree(out, bad_out)
    fetch_template = templates_in(Path(env["TEMPLATEFLOW_HOME"]))
    (record,) = qc.collect_records(bad_out, "02")
    spaces = [s for group in qc.spaces_by_template(record).values() for s in group]
    drop_nonlinear_stage(bad_out, record, spaces, fetch_template)
    report = write_participant_report(bad_out, "02", fetch_template)
    (bad,) = _rows(bad_out / "sub-02" / "anat" / "sub-02_desc-mninorm_qc.tsv")
    assert report.status == bad["status"] == "fail", bad["status_reasons"]
    assert float(bad["ncc"]) < float(good["ncc"]) - 0.1
    assert float(bad["dice"]) < float(good["dice"])


@pytest.mark.slow
@pytest.mark.shared
def test_real_scan_report_in_a_browser(heads_sub02, browser, tmp_path):
    out, _ = heads_sub02
    page, log = open_report(browser, out / "sub-02.html")
    try:
        images = page.eval_on_selector_all("img", "all => all.map(i => i.naturalWidth)")
        assert len(images) == 4 and min(images) > 1000
        page.screenshot(path=str(tmp_path / "sub-02.png"), full_page=True)
        assert log.console_errors == log.failed_requests == log.outside_requests == []
    finally:
        page.context.close()
