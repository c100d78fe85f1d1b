"""Templates as TemplateFlow stores them (with or without res-, only res-02, cohorts), custom
template folders, and the missing-template message.

The templateflow client binds TEMPLATEFLOW_HOME when first imported (the session's miniature), so
whatever needs another TemplateFlow folder runs in a child process pointed at one built here from
nilearn's brain (the same brain as the session's test template: the fake engine's poses hold).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import DATASET_POSES, TEST_TEMPLATE

from bids_app.errors import TemplateError, UsageError
from bids_app.spaces import parse_output_space
from bids_app.templates import load_custom_template

TESTS = Path(__file__).resolve().parent
PROJECT = TESTS.parent


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "template", "resolution", "cohort", "label"),
    [
        ("MNI305", "MNI305", None, None, "MNI305"),
        ("MNI152Lin:res-2", "MNI152Lin", 2, None, "MNI152Lin_res-2"),
        ("MNIPediatricAsym:cohort-2", "MNIPediatricAsym", None, "2", "MNIPediatricAsym_cohort-2"),
        ("MNIPediatricAsym:cohort-2:res-1", "MNIPediatricAsym", 1, "2",
         "MNIPediatricAsym_cohort-2_res-1"),
        ("MNIPediatricAsym:res-1:cohort-2", "MNIPediatricAsym", 1, "2",
         "MNIPediatricAsym_cohort-2_res-1"),
    ],
)  # fmt: skip
def test_output_spaces_with_cohort_and_resolution(text, template, resolution, cohort, label):
    space = parse_output_space(text)
    assert (space.template, space.resolution, space.cohort, space.folder) == (
        template, resolution, cohort, None
    )  # fmt: skip
    assert space.label == label
    assert parse_output_space(str(space)) == space  # run records store str(space)


def test_a_custom_template_folder_is_named_by_its_tpl_name(tmp_path):
    space = parse_output_space(f"{tmp_path}/templates/tpl-MIITRA/:res-2")
    assert (space.template, space.resolution, space.label) == ("MIITRA", 2, "MIITRA_res-2")
    assert space.folder == str(tmp_path / "templates" / "tpl-MIITRA")
    assert parse_output_space(str(space)) == space
    relative = parse_output_space("tpl-MIITRA")
    assert Path(relative.folder).is_absolute() and relative.template == "MIITRA"


@pytest.mark.parametrize(
    "text", ["MNI152Lin:res-two", "MNI152Lin:res-1:res-2", "MNI152Lin:den-2", "/data/MIITRA"]
)
def test_malformed_spaces_are_usage_errors(text):
    with pytest.raises(UsageError, match="malformed output space"):
        parse_output_space(text)


# ---- template folders built here ----------------------------------------------------------------


def _copy_grid(source_home: Path, res: int, target: Path, stem: str) -> None:
    """The session template's res-<res> T1w and mask, as ``<stem>_T1w``, ``_desc-brain_mask``."""
    source = source_home / f"tpl-{TEST_TEMPLATE}" / f"tpl-{TEST_TEMPLATE}_res-{res:02d}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(f"{source}_T1w.nii.gz", target / f"{stem}_T1w.nii.gz")
    shutil.copy(f"{source}_desc-brain_mask.nii.gz", target / f"{stem}_desc-brain_mask.nii.gz")


@pytest.fixture(scope="module")
def other_home(templateflow_home, tmp_path_factory) -> Path:
    """A TemplateFlow folder as TemplateFlow stores these templates: MNIColin27 without res-,
    MNI152Lin with only res-02 (as offline here), MNIPediatricAsym cohort-2 (res-1, res-2), and a
    custom template MIITRA found in it."""
    home = tmp_path_factory.mktemp("tf-other")
    _copy_grid(templateflow_home, 1, home / "tpl-MNIColin27", "tpl-MNIColin27")
    _copy_grid(templateflow_home, 2, home / "tpl-MNI152Lin", "tpl-MNI152Lin_res-02")
    folder = home / "tpl-MNIPediatricAsym" / "cohort-2"
    _copy_grid(templateflow_home, 1, folder, "tpl-MNIPediatricAsym_cohort-2_res-1")
    _copy_grid(templateflow_home, 2, folder, "tpl-MNIPediatricAsym_cohort-2_res-2")
    _copy_grid(templateflow_home, 1, home / "tpl-MIITRA", "tpl-MIITRA")
    for name in ("MNIColin27", "MNI152Lin", "MNIPediatricAsym", "MIITRA"):
        (home / f"tpl-{name}" / "template_description.json").write_text(
            json.dumps({"Identifier": name, "Name": f"{name} (test stand-in)"})
        )
    return home


def _in_home(
    home: Path, code: str, timeout: int = 300, proxy: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``code`` in a child process whose TEMPLATEFLOW_HOME is ``home`` (offline); ``proxy``:
    every HTTP(S) request goes there (a closed port: downloads fail at once)."""
    env = {
        **os.environ,
        "TEMPLATEFLOW_HOME": str(home),
        "TEMPLATEFLOW_AUTOUPDATE": "0",
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(TESTS)]),
        **({"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NO_PROXY": ""} if proxy else {}),
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
    )


_FETCH_ALL = """
import json
from bids_app.templates import fetch_template
found = {}
for key, query in QUERIES.items():
    try:
        t = fetch_template(*query)
        found[key] = [t.name, t.resolution, t.cohort, t.custom, t.t1w_path.name, t.mask_path.name,
                      list(t.zooms_mm)]
    except Exception as err:
        found[key] = [type(err).__name__, str(err)]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def fetched(other_home) -> tuple[dict, str]:
    queries = {
        "colin": ("MNIColin27",),
        "colin_res2": ("MNIColin27", 2),
        "lin": ("MNI152Lin",),
        "lin_res2": ("MNI152Lin", 2),
        "lin_res1": ("MNI152Lin", 1),
        "cohort": ("MNIPediatricAsym", None, "2"),
        "cohort_res2": ("MNIPediatricAsym", 2, "2"),
        "no_cohort": ("MNIPediatricAsym",),
        "bad_cohort": ("MNIPediatricAsym", None, "9"),
        "custom_in_home": ("MIITRA",),
        "unknown": ("NoSuchTemplate",),
    }
    result = _in_home(other_home, f"QUERIES = {queries!r}\n{_FETCH_ALL}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_a_template_without_res_is_used_on_its_single_grid(fetched):
    found, _ = fetched
    assert found["colin"][:6] == [
        "MNIColin27", None, None, False, "tpl-MNIColin27_T1w.nii.gz",
        "tpl-MNIColin27_desc-brain_mask.nii.gz",
    ]  # fmt: skip
    assert found["colin_res2"][0] == "TemplateUnavailableError"
    assert "no res-2 grid" in found["colin_res2"][1] and "single grid" in found["colin_res2"][1]


def test_a_template_with_only_res_02_registers_there_and_says_so(fetched):
    found, log = fetched
    assert found["lin"][1] == 2 and found["lin"][4] == "tpl-MNI152Lin_res-02_T1w.nii.gz"
    assert found["lin_res2"][:5] == found["lin"][:5]
    assert "MNI152Lin: registering on res-02" in log and "res-1 is not" in log
    # res-1 asked for, absent here: TemplateFlow's real file names and a command that fetches them
    kind, message = found["lin_res1"]
    assert kind == "TemplateUnavailableError"
    assert "tpl-MNI152Lin/tpl-MNI152Lin_res-01_T1w.nii.gz" in message
    assert "tpl-MNI152Lin/tpl-MNI152Lin_res-01_desc-brain_mask.nii.gz" in message
    assert "api.get('MNI152Lin', resolution=1, desc=None, suffix='T1w'" in message


def test_a_cohort_template(fetched):
    found, _ = fetched
    assert found["cohort"][:5] == [
        "MNIPediatricAsym", 1, "2", False, "tpl-MNIPediatricAsym_cohort-2_res-1_T1w.nii.gz"
    ]  # fmt: skip
    assert found["cohort_res2"][1] == 2 and found["cohort_res2"][6] == [6.0, 6.0, 6.0]
    assert found["no_cohort"][0] == "TemplateUnavailableError"
    assert "MNIPediatricAsym:cohort-1" in found["no_cohort"][1]
    assert "no cohort-9" in found["bad_cohort"][1]


def test_a_custom_template_in_templateflow_home_and_an_unknown_name(fetched):
    found, _ = fetched
    assert found["custom_in_home"][:5] == ["MIITRA", None, None, True, "tpl-MIITRA_T1w.nii.gz"]
    kind, message = found["unknown"]
    assert kind == "TemplateUnavailableError" and "--output-spaces /data/templates/tpl-" in message


@pytest.mark.parametrize(
    ("name", "resolution", "cohort"),
    [("MNI305", None, None), ("MNIColin27", None, None), ("MNI152Lin", 1, None),
     ("MNI152Lin", 2, None), ("MNI152NLin6Asym", 2, None), ("MNI152NLin2009cAsym", 1, None),
     ("MNIPediatricAsym", 1, "2")],
)  # fmt: skip
def test_the_prefetch_command_names_exactly_the_files_templateflow_has(
    tmp_path, name, resolution, cohort
):
    """The command the message suggests, run as api.ls against TemplateFlow's own file list (an
    empty TEMPLATEFLOW_HOME: the client fills it with its placeholders), finds one T1w and one
    brain mask, the files the message names."""
    code = f"""
import json, re
from bids_app.templates import prefetch_command, _catalogue_files, _T1W, _MASK
from templateflow import api
command = prefetch_command({name!r}, {resolution!r}, {cohort!r})
calls = re.findall(r"api\\.get\\(([^)]*)\\)", command)
found = [[str(p.relative_to(api.TF_LAYOUT.root)) for p in eval("api.ls(" + c + ")")]
         for c in calls]
named = [_catalogue_files({name!r}, {cohort!r}, {resolution!r}, e) for e in (_T1W, _MASK)]
print(json.dumps([found, named]))
"""
    home = tmp_path / "empty"
    home.mkdir()
    result = _in_home(home, code)
    assert result.returncode == 0, result.stderr
    found, named = json.loads(result.stdout.strip().splitlines()[-1])
    assert found == named and all(len(files) == 1 for files in found)
    assert found[0][0].endswith("_T1w.nii.gz") and found[1][0].endswith("_desc-brain_mask.nii.gz")


# ---- custom templates: the checks ---------------------------------------------------------------


@pytest.fixture
def custom(templateflow_home, tmp_path) -> Path:
    folder = tmp_path / "tpl-MIITRA"
    _copy_grid(templateflow_home, 1, folder, "tpl-MIITRA")
    return folder


def test_a_good_custom_template_loads(custom):
    template = load_custom_template(custom)
    assert (template.name, template.resolution, template.custom) == ("MIITRA", None, True)
    assert template.zooms_mm == (3.0, 3.0, 3.0)


def _mask_path(folder: Path) -> Path:
    return folder / "tpl-MIITRA_desc-brain_mask.nii.gz"


def _rewrite_mask(folder: Path, change) -> None:
    mask = nib.load(_mask_path(folder))
    data, affine = change(np.asarray(mask.dataobj).astype(np.float32), mask.affine.copy())
    nib.Nifti1Image(data, affine).to_filename(_mask_path(folder))


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: _mask_path(f).unlink(), "needs tpl-MIITRA"),
        (lambda f: _mask_path(f).write_bytes(b""), "0-byte placeholder"),
        (lambda f: _rewrite_mask(f, lambda d, a: (d[1:], a)), "not on the grid"),
        (lambda f: _rewrite_mask(f, lambda d, a: (d, a @ np.diag([1, 1, 1.1, 1]))),
         "not on the grid"),
        (lambda f: _rewrite_mask(f, lambda d, a: (d * 0.7, a)), "is not binary"),
        (lambda f: _rewrite_mask(f, lambda d, a: (d * 0, a)), "is empty"),
        (lambda f: (f / "tpl-MIITRA_T1w.nii.gz").rename(f / "tpl-MIITRA_res-01_T1w.nii.gz"),
         "with the same res-"),
    ],
)  # fmt: skip
def test_a_bad_custom_template_is_a_clear_error(custom, breakage, message):
    breakage(custom)
    with pytest.raises(TemplateError, match=message):
        load_custom_template(custom)


def test_a_custom_folder_must_be_named_tpl_name(custom, tmp_path):
    renamed = custom.rename(tmp_path / "MIITRA")
    with pytest.raises(TemplateError, match="tpl-<Name>"):
        load_custom_template(renamed)


# ---- end to end on these spaces: participant, transform, group ----------------------------------

_RUN = """
import sys
import numpy as np
from bids_app.cli import main
from fakes import FakeEngines
POSES = {poses!r}
engines = FakeEngines({{s: np.linalg.inv(np.array(p)) for s, p in POSES.items()}})
sys.exit(main({argv!r}, engines=engines))
"""


@pytest.mark.slow  # ~2 min: three child processes run the whole chain
def test_participant_transform_and_group_levels_on_these_spaces(
    other_home, dataset, custom, tmp_path
):
    """Participant level on a template without res-, one with only res-02, a cohort and a custom
    folder (fake engine), then mninorm-transform and the group level on those outputs."""
    root, _ = dataset
    out = tmp_path / "out"
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t1w": {"session": "1", "run": 1}}))
    spaces = ["MNIColin27", "MNI152Lin", "MNIPediatricAsym:cohort-2:res-2", str(custom)]
    argv = [str(root), str(out), "participant", "--participant-label", "01", "--bids-filter-file",
            str(filters), "--output-spaces", *spaces, "--preset", "fast", "--skull-strip", "skip",
            "--skip-bids-validation", "--in-process"]  # fmt: skip
    poses = {"sub-01": DATASET_POSES["sub-01"].tolist()}
    result = _in_home(other_home, _RUN.format(poses=poses, argv=argv), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    anat = out / "sub-01" / "ses-1" / "anat"
    prefix = "sub-01_ses-1_run-1"
    for label in ("MNIColin27", "MNI152Lin", "MNIPediatricAsym_cohort-2_res-2", "MIITRA"):
        assert (anat / f"{prefix}_space-{label}_desc-preproc_T1w.nii.gz").is_file(), label
    for key in ("MNIColin27", "MNI152Lin", "MNIPediatricAsym_cohort-2", "MIITRA"):
        assert (anat / f"{prefix}_from-T1w_to-{key}_mode-image_xfm.h5").is_file(), key
    # grids: Colin27's single 3 mm grid; MNI152Lin's only res-02 (6 mm); the cohort's res-2
    shapes = {
        label: nib.load(anat / f"{prefix}_space-{label}_desc-preproc_T1w.nii.gz").header.get_zooms()
        for label in ("MNIColin27", "MNI152Lin", "MNIPediatricAsym_cohort-2_res-2", "MIITRA")
    }
    assert shapes == {
        "MNIColin27": (3.0, 3.0, 3.0), "MNI152Lin": (6.0, 6.0, 6.0),
        "MNIPediatricAsym_cohort-2_res-2": (6.0, 6.0, 6.0), "MIITRA": (3.0, 3.0, 3.0),
    }  # fmt: skip
    sidecar = json.loads((anat / f"{prefix}_space-MNI152Lin_desc-preproc_T1w.json").read_text())
    assert "res-02" in sidecar["Template"]["RegistrationGrid"]
    assert "res-01 was not" in sidecar["Resolution"]
    colin = json.loads((anat / f"{prefix}_space-MNIColin27_desc-preproc_T1w.json").read_text())
    assert "no res- entity" in colin["Resolution"]
    assert colin["SpatialReference"].endswith("tpl-MNIColin27/tpl-MNIColin27_T1w.nii.gz")
    cohort = json.loads(
        (anat / f"{prefix}_space-MNIPediatricAsym_cohort-2_res-2_desc-preproc_T1w.json").read_text()
    )
    assert cohort["Template"]["Cohort"] == "2" and "/cohort-2/" in cohort["SpatialReference"]
    miitra = json.loads((anat / f"{prefix}_space-MIITRA_desc-preproc_T1w.json").read_text())
    assert miitra["Template"]["Folder"] == str(custom) and miitra["Template"]["Custom"] is True

    # mninorm-transform: a point through each space and back lands where it started
    start = tmp_path / "start.tsv"
    start.write_text("x\ty\tz\n10\t-20\t15\n")
    for space in ("MNIColin27", "MNI152Lin", "MNIPediatricAsym:cohort-2", str(custom)):
        there = _transform_points(other_home, out, start, tmp_path / "there.tsv", "T1w", space)
        assert np.linalg.norm(there - [10, -20, 15]) > 1.0  # the pose moved it
        back = _transform_points(
            other_home, out, tmp_path / "there.tsv", tmp_path / "back.tsv", space, "T1w"
        )
        assert np.allclose(back, [10, -20, 15], atol=0.2), (space, back)

    # the group level finds every space and its template (the custom one by its folder)
    group = _in_home(
        other_home,
        f"import sys\nfrom bids_app.cli import main\n"
        f"sys.exit(main([{str(root)!r}, {str(out)!r}, 'group', '--skip-bids-validation']))",
    )
    assert group.returncode in (0, 1), group.stderr[-3000:]
    assert "the template is not available here" not in group.stderr
    import pandas as pd

    table = pd.read_csv(out / "group" / "desc-mninorm_groupqc.tsv", sep="\t")
    assert sorted(table["space"]) == sorted(
        ["MNIColin27", "MNI152Lin", "MNIPediatricAsym:cohort-2:res-2", str(custom)]
    )
    assert table["ncc"].notna().all()  # each space's outputs were read and measured
    for row in table[table["included"] == "yes"].itertuples():
        label = parse_output_space(row.space).label
        assert list((out / "group").glob(f"space-{label}_*_statmap.nii.gz")), label
    # a 6 mm registration grid is too coarse for the QC thresholds; the others pass
    assert set(table[table["included"] == "yes"]["template"]) >= {
        "MNIColin27", "MNIPediatricAsym_cohort-2", "MIITRA"
    }  # fmt: skip


def _transform_points(home, out, source, target, from_space, to_space) -> np.ndarray:
    """``mninorm-transform points`` in a child process; the mapped point, written back as the
    x, y, z columns of ``target`` (so that it can be mapped again)."""
    import pandas as pd

    argv = ["points", str(out), str(source), str(target), "--participant-label", "01",
            "--session-label", "1", "--run", "1", "--from-space", from_space,
            "--to-space", to_space]  # fmt: skip
    code = f"import sys\nfrom bids_app.transform_cli import main\nsys.exit(main({argv!r}))"
    result = _in_home(home, code)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(target, sep="\t")
    mapped = table.filter(regex="^[xyz]_").to_numpy()[0]
    pd.DataFrame([mapped], columns=["x", "y", "z"]).to_csv(target, sep="\t", index=False)
    return mapped


# ---- the offline stand-ins in ../shared/data/templateflow ---------------------------------------


@pytest.mark.shared
def test_shared_templates_as_templateflow_stores_them(shared_data):
    """MNIColin27 and MNI305 without res-, MNI152Lin with only res-02 (issue 17: all three
    stopped with exit 69 asking for res-01 files that do not exist)."""
    queries = {
        "colin": ("MNIColin27",),
        "mni305": ("MNI305",),
        "lin": ("MNI152Lin",),
        "lin_res2": ("MNI152Lin", 2),
    }
    result = _in_home(shared_data / "templateflow", f"QUERIES = {queries!r}\n{_FETCH_ALL}")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["colin"][1] is None and found["colin"][4] == "tpl-MNIColin27_T1w.nii.gz"
    assert found["mni305"][1] is None and found["mni305"][6] == [2.0, 2.0, 2.0]
    assert found["lin"][1] == 2 and found["lin_res2"][4] == "tpl-MNI152Lin_res-02_T1w.nii.gz"
    for key in queries:  # each a real image pair on one grid
        folder = shared_data / "templateflow" / f"tpl-{found[key][0]}"
        t1w, mask = nib.load(folder / found[key][4]), nib.load(folder / found[key][5])
        assert t1w.shape == mask.shape and np.allclose(t1w.affine, mask.affine, atol=1e-3)


@pytest.mark.slow
@pytest.mark.shared
def test_a_real_head_on_the_shared_templates(shared_data, tmp_path):
    """heads sub-01 (2 mm whole head) on the three spaces issue 17 found unusable, real engine."""
    out = tmp_path / "out"
    code = (
        "import sys\nfrom bids_app.cli import main\n"
        f"sys.exit(main([{str(shared_data / 'heads')!r}, {str(out)!r}, 'participant', "
        "'--participant-label', '01', '--output-spaces', 'MNIColin27', 'MNI305', "
        "'MNI152Lin:res-2', '--preset', 'fast', '--skip-bids-validation', '--nthreads', '2', "
        "'--omp-nthreads', '2']))"
    )
    result = _in_home(shared_data / "templateflow", code, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    anat = out / "sub-01" / "anat"
    for label in ("MNIColin27", "MNI305", "MNI152Lin_res-2"):
        assert list(anat.glob(f"sub-01*_space-{label}_desc-preproc_T1w.nii.gz")), label


def test_a_custom_folder_that_is_not_there_is_an_error_not_a_templateflow_lookalike(tmp_path):
    from bids_app.errors import TemplateUnavailableError
    from bids_app.templates import fetch_template

    space = parse_output_space(str(tmp_path / "tpl-MNI305"))  # TemplateFlow has an MNI305
    with pytest.raises(TemplateUnavailableError, match="does not exist"):
        space.find_grid(fetch_template)


# ---- TemplateFlow atlases (--atlas atlas-<Name>[_desc-<label>]) ---------------------------------


@pytest.mark.parametrize(
    ("text", "is_id"),
    [("atlas-Schaefer2018_desc-400Parcels7Networks", True), ("atlas-AAL", True),
     ("atlas-HOCPA_desc-th25", True), ("atlas-Tiny_seg-x_scale-2", True),
     ("atlas.nii.gz", False), ("/data/atlas-AAL_dseg.nii.gz", False),
     ("atlas-AAL.nii.gz:labels.tsv", False), ("tpl-X_atlas-Y_dseg.nii.gz", False),
     ("atlas-AAL_res-2", False)],
)  # fmt: skip
def test_an_atlas_id_is_bids_entities_never_a_file(text, is_id):
    from bids_app.templates import is_atlas_id

    assert is_atlas_id(text) is is_id


_ATLAS = """
import json
from bids_app.group.clusters import load_atlases
from bids_app.spaces import OutputSpace
found = {}
for key, (identifier, template, res, point) in QUERIES.items():
    space = OutputSpace(template, res)
    try:
        atlas = load_atlases(identifier, [space])[space]
        found[key] = [atlas.path.name, atlas.labels_path and atlas.labels_path.name,
                      atlas.label_at(point), atlas.record()]
    except Exception as err:
        found[key] = [type(err).__name__, str(err), getattr(err, "exit_code", None)]
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def atlas_home(templateflow_home, tmp_path_factory) -> tuple[Path, list]:
    """A TemplateFlow folder with the session's template on res-01 and res-02, an atlas on res-02
    only (label 7 in the left half of the brain, 3 in the right) with its dseg.tsv (no res-, as
    TemplateFlow stores Schaefer's), and a placeholder (empty file, as TemplateFlow's skeleton)
    of an atlas not downloaded."""
    home = tmp_path_factory.mktemp("tf-atlas")
    folder = home / f"tpl-{TEST_TEMPLATE}"
    stem = f"tpl-{TEST_TEMPLATE}"
    for res in (1, 2):
        _copy_grid(templateflow_home, res, folder, f"{stem}_res-{res:02d}")
    shutil.copy(templateflow_home / f"tpl-{TEST_TEMPLATE}" / "template_description.json", folder)
    mask = nib.load(folder / f"{stem}_res-02_desc-brain_mask.nii.gz")
    world_x = (mask.affine @ np.vstack([np.indices(mask.shape).reshape(3, -1),
                                        np.ones((1, mask.get_fdata().size))]))[0]  # fmt: skip
    labels = np.where(world_x.reshape(mask.shape) < 0, 7, 3) * (mask.get_fdata() > 0)
    nib.Nifti1Image(labels.astype(np.int16), mask.affine).to_filename(
        folder / f"{stem}_res-02_atlas-Tiny_desc-test_dseg.nii.gz"
    )
    (folder / f"{stem}_atlas-Tiny_desc-test_dseg.tsv").write_text(
        "index\tname\n3\tRight_half\n7\tLeft_half\n"
    )
    (folder / f"{stem}_res-02_atlas-Gone_dseg.nii.gz").touch()  # listed, not downloaded
    inside = np.argwhere(mask.get_fdata() > 0)
    left = inside[np.argmin(world_x.reshape(mask.shape)[tuple(inside.T)])]
    point = [float(v) for v in (mask.affine @ np.append(left, 1))[:3]]
    return home, point


@pytest.fixture(scope="module")
def atlases(atlas_home) -> dict:
    home, point = atlas_home
    queries = {
        "res2": ("atlas-Tiny_desc-test", TEST_TEMPLATE, 2, point),
        "res1": ("atlas-Tiny_desc-test", TEST_TEMPLATE, 1, point),
        "registration_grid": ("atlas-Tiny_desc-test", TEST_TEMPLATE, None, point),
        "unknown": ("atlas-Nothing", TEST_TEMPLATE, 2, point),
        "offline": ("atlas-Gone", TEST_TEMPLATE, 2, point),
    }
    # offline: any download attempt meets a closed port at once (no network wait)
    proxy = "http://127.0.0.1:9"
    result = _in_home(home, f"QUERIES = {queries!r}\n{_ATLAS}", proxy=proxy)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_templateflow_atlas_is_found_in_the_spaces_template_with_its_labels(atlases):
    name, labels, label, record = atlases["res2"]
    assert name == f"tpl-{TEST_TEMPLATE}_res-02_atlas-Tiny_desc-test_dseg.nii.gz"
    assert labels == f"tpl-{TEST_TEMPLATE}_atlas-Tiny_desc-test_dseg.tsv"
    assert label == "Left_half"
    assert record["TemplateFlowAtlas"] == "atlas-Tiny_desc-test"


def test_a_templateflow_atlas_on_another_grid_is_taken_from_the_nearest(atlases):
    for key in ("res1", "registration_grid"):  # res-01 asked (or implied): only res-02 here
        name, _, label, _ = atlases[key]
        assert "_res-02_" in name and label == "Left_half", key


def test_a_templateflow_atlas_not_here_is_an_exit_69_error_naming_the_file_and_the_fix(atlases):
    kind, message, code = atlases["offline"]
    assert kind == "TemplateUnavailableError" and code == 69
    assert f"tpl-{TEST_TEMPLATE}/tpl-{TEST_TEMPLATE}_res-02_atlas-Gone_dseg.nii.gz" in message
    assert "TEMPLATEFLOW_HOME=" in message
    assert "import templateflow.api as t; t.get(" in message and "atlas='Gone'" in message
    assert "download failed" in message  # the client tried, met no network: no traceback
    kind, message, code = atlases["unknown"]
    assert kind == "TemplateUnavailableError" and code == 69
    assert "no such atlas" in message and "--atlas FILE" in message
