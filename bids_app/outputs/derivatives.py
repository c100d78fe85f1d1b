"""Everything about what is written: the one table of output names, atomic writes, sidecars,
``dataset_description.json`` and ``.bidsignore``.

Names follow sMRIPrep. BIDS has no entity or suffix for Jacobian maps: they are
``desc-nonlinear_logjacobian`` / ``desc-total_logjacobian`` and listed in ``.bidsignore``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bids_app import __version__
from bids_app.outputs.source import T1wInput
from bids_app.spaces import OutputSpace

CODE_URL = "https://github.com/mninorm/mninorm"
BIDS_VERSION = "1.10.0"

# A space in file names: "<template>[_cohort-N][_res-N]" (OutputSpace.label)
SPACE_LABEL_PATTERN = r"[A-Za-z0-9]+(?:_cohort-[A-Za-z0-9]+)?(?:_res-[0-9]+)?"
# kind -> file name after the source entities ({space}: "<template>[_cohort-N][_res-N]")
NATIVE_OUTPUTS = {
    "t1w": "desc-preproc_T1w.nii.gz",
    "mask": "desc-brain_mask.nii.gz",
}
SPACE_OUTPUTS = {
    "t1w": "space-{space}_desc-preproc_T1w.nii.gz",
    "mask": "space-{space}_desc-brain_mask.nii.gz",
    "logjac_nonlinear": "space-{space}_desc-nonlinear_logjacobian.nii.gz",
    "logjac_total": "space-{space}_desc-total_logjacobian.nii.gz",
    "lesion": "space-{space}_label-lesion_roi.nii.gz",  # only for a T1w with a lesion mask
}
TRANSFORM_OUTPUTS = {
    "t1w2std_xfm": "from-T1w_to-{template}_mode-image_xfm.h5",
    "std2t1w_xfm": "from-{template}_to-T1w_mode-image_xfm.h5",
}
# QC and report (qc.py, report.py): per T1w (after the source entities), per participant, dataset
QC_OUTPUTS = {
    "table": "desc-mninorm_qc.tsv",
    "sidecar": "desc-mninorm_qc.json",
}
FIGURE_OUTPUTS = {
    "brain_mask": "desc-brain_mask.png",
    "space_t1w": "space-{space}_desc-preproc_T1w.png",
    "space_template": "space-{space}_desc-template_T1w.png",
    "logjac_nonlinear": "space-{space}_desc-nonlinear_logjacobian.png",
}
REPORT = "sub-{subject}.html"
CITATION = "logs/CITATION.md"
RUN_RECORD = "desc-mninorm_run.json"
T1W_LOG = "desc-mninorm_log.txt"  # what was said and printed while the T1w ran (logs.t1w_log)
# Folder names carry no trailing slash: bids-validator-deno (3.0) does not ignore a folder itself
# with "figures/" (it reports "sub-01/figures/" as NOT_INCLUDED); "figures" matches the folder and
# everything in it, with every gitignore-style matcher.
# "*_label-lesion_roi.*": fMRIPrep's name for a lesion mask, which BIDS derivatives do not define
BIDSIGNORE = (
    "*_xfm.*", "*_logjacobian.*", "*_qc.*", "figures", "log", "logs", "*.html", "group",
    "*_label-lesion_roi.*",
)  # fmt: skip

# Group level (bids_app/group/): everything in output_dir/group/ (ignored by the validator: BIDS has
# no group-level names), plus output_dir/group.html. {space}: "<template>[_res-N]"; {jacobian}:
# "total" or "nonlinear"; {contrast}: the --group-by column, alphanumerics only.
# No group output shares a suffix with a participant output (T1w, mask, logjacobian, xfm, qc), so
# that a pybids query such as get(suffix="T1w") on output_dir finds participants' files only:
# voxel-wise statistics are "statmap"s whose desc- names the maps they summarise.
GROUP_DIR = "group"
GROUP_REPORT = "group.html"
GROUP_TABLES = {
    "qc": "desc-mninorm_groupqc.tsv",
    "qc_sidecar": "desc-mninorm_groupqc.json",
}
GROUP_SPACE_OUTPUTS = {
    "t1w_mean": "space-{space}_stat-mean_desc-T1w_statmap.nii.gz",
    "t1w_sd": "space-{space}_stat-sd_desc-T1w_statmap.nii.gz",
    "brain_probseg": "space-{space}_label-brain_probseg.nii.gz",
    "logjac_mean": "space-{space}_stat-mean_desc-{jacobian}_statmap.nii.gz",
    "logjac_sd": "space-{space}_stat-sd_desc-{jacobian}_statmap.nii.gz",
    # only when some participant has a lesion mask (group/lesions.py)
    "lesion_free_count": "space-{space}_stat-count_desc-lesionfree_statmap.nii.gz",
    "t": "space-{space}_contrast-{contrast}_stat-t_desc-{jacobian}_statmap.nii.gz",
    "effect": "space-{space}_contrast-{contrast}_stat-effect_desc-{jacobian}_statmap.nii.gz",
    "F": "space-{space}_contrast-{contrast}_stat-F_desc-{jacobian}_statmap.nii.gz",
    # The model (group/model.py, group/inference.py): smoothed maps, covariates, permutations.
    # desc-{jacobian}Model tells them from the unsmoothed, covariate-free maps above; p values
    # are -log10 p ("logp"): uncorrected (parametric), FWE voxel-wise (max-t), FWE with TFCE.
    "model_t": "space-{space}_contrast-{contrast}_stat-t_desc-{jacobian}Model_statmap.nii.gz",
    "model_F": "space-{space}_contrast-{contrast}_stat-F_desc-{jacobian}Model_statmap.nii.gz",
    "model_effect": (
        "space-{space}_contrast-{contrast}_stat-effect_desc-{jacobian}Model_statmap.nii.gz"
    ),
    "model_logp": "space-{space}_contrast-{contrast}_stat-logp_desc-{jacobian}Model_statmap.nii.gz",
    "model_logp_fwe": (
        "space-{space}_contrast-{contrast}_stat-logpFWE_desc-{jacobian}Model_statmap.nii.gz"
    ),
    "model_tfce": "space-{space}_contrast-{contrast}_stat-tfce_desc-{jacobian}Model_statmap.nii.gz",
    "model_logp_tfce_fwe": (
        "space-{space}_contrast-{contrast}_stat-logpTFCEFWE_desc-{jacobian}Model_statmap.nii.gz"
    ),
    "model_clusters": "space-{space}_contrast-{contrast}_desc-{jacobian}Model_clusters.tsv",
}
# Names of mninorm 0.1's group outputs, which pybids took for participants' T1w, logjacobian and qc
# files: the group level removes them (it rewrites their content under the names above).
LEGACY_GROUP_SPACE_OUTPUTS = {
    "t1w_mean": "space-{space}_stat-mean_T1w.nii.gz",
    "t1w_sd": "space-{space}_stat-sd_T1w.nii.gz",
    "logjac_mean": "space-{space}_stat-mean_desc-{jacobian}_logjacobian.nii.gz",
    "logjac_sd": "space-{space}_stat-sd_desc-{jacobian}_logjacobian.nii.gz",
}
LEGACY_GROUP_TABLES = ("desc-mninorm_qc.tsv", "desc-mninorm_qc.json")


def source_prefix(t1w: T1wInput) -> str:
    """The source's entities, e.g. ``sub-01_ses-1_run-2`` for ``sub-01_ses-1_run-2_T1w.nii.gz``."""
    name = t1w.path.name
    for ending in ("_T1w.nii.gz", "_T1w.nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    raise ValueError(f"{t1w.path} is not named like a BIDS T1w (..._T1w.nii[.gz])")


def anat_dir(output_dir: Path, t1w: T1wInput) -> Path:
    folder = output_dir / f"sub-{t1w.subject}"
    if t1w.session:
        folder = folder / f"ses-{t1w.session}"
    return folder / "anat"


def space_label(space: OutputSpace) -> str:
    return space.label


def native_path(output_dir: Path, t1w: T1wInput, kind: str) -> Path:
    return anat_dir(output_dir, t1w) / f"{source_prefix(t1w)}_{NATIVE_OUTPUTS[kind]}"


def space_path(output_dir: Path, t1w: T1wInput, kind: str, space: OutputSpace) -> Path:
    name = SPACE_OUTPUTS[kind].format(space=space_label(space))
    return anat_dir(output_dir, t1w) / f"{source_prefix(t1w)}_{name}"


def transform_path(output_dir: Path, t1w: T1wInput, kind: str, template: str) -> Path:
    name = TRANSFORM_OUTPUTS[kind].format(template=template)
    return anat_dir(output_dir, t1w) / f"{source_prefix(t1w)}_{name}"


def run_record_dir(output_dir: Path, subject: str) -> Path:
    return output_dir / f"sub-{subject}" / "log"


def run_record_path(output_dir: Path, t1w: T1wInput) -> Path:
    """Per-T1w record of what was done (``sub-X/log/``, as fMRIPrep keeps its logs)."""
    return run_record_dir(output_dir, t1w.subject) / f"{source_prefix(t1w)}_{RUN_RECORD}"


def t1w_log_path(output_dir: Path, t1w: T1wInput) -> Path:
    """Per-T1w log, next to its run record."""
    return run_record_dir(output_dir, t1w.subject) / f"{source_prefix(t1w)}_{T1W_LOG}"


def qc_path(output_dir: Path, t1w: T1wInput, kind: str) -> Path:
    return anat_dir(output_dir, t1w) / f"{source_prefix(t1w)}_{QC_OUTPUTS[kind]}"


def figure_path(output_dir: Path, t1w: T1wInput, kind: str, space: OutputSpace | None = None):
    name = FIGURE_OUTPUTS[kind].format(space=space_label(space) if space else "")
    return output_dir / f"sub-{t1w.subject}" / "figures" / f"{source_prefix(t1w)}_{name}"


def report_path(output_dir: Path, subject: str) -> Path:
    return output_dir / REPORT.format(subject=subject)


def group_dir(output_dir: Path) -> Path:
    return output_dir / GROUP_DIR


def group_report_path(output_dir: Path) -> Path:
    return output_dir / GROUP_REPORT


def group_table_path(output_dir: Path, kind: str) -> Path:
    return group_dir(output_dir) / GROUP_TABLES[kind]


def group_space_path(
    output_dir: Path, kind: str, space: str, jacobian: str = "", contrast: str = ""
) -> Path:
    """A group map of one space (``space``: a ``space_label``)."""
    name = GROUP_SPACE_OUTPUTS[kind].format(space=space, jacobian=jacobian, contrast=contrast)
    return group_dir(output_dir) / name


def _group_name_pattern(template: str) -> re.Pattern:
    fields = {
        "space": rf"(?P<space>{SPACE_LABEL_PATTERN})",
        "jacobian": r"(?:total|nonlinear)",
        "contrast": r"(?P<contrast>[A-Za-z0-9]+)",
    }
    parts = re.split(r"(\{[a-z]+\})", template.removesuffix(".nii.gz").removesuffix(".tsv"))
    body = "".join(fields[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(rf"^{body}\.(?:nii\.gz|tsv|json)$")


_GROUP_PATTERNS = {kind: _group_name_pattern(t) for kind, t in GROUP_SPACE_OUTPUTS.items()}
_LEGACY_GROUP_PATTERNS = [_group_name_pattern(t) for t in LEGACY_GROUP_SPACE_OUTPUTS.values()]


def is_legacy_group_output(name: str) -> bool:
    """True for a group map, sidecar or table under a name an older mninorm used (see
    ``LEGACY_GROUP_SPACE_OUTPUTS``)."""
    return name in LEGACY_GROUP_TABLES or any(p.match(name) for p in _LEGACY_GROUP_PATTERNS)


def parse_group_output(name: str) -> tuple[str, str, str | None] | None:
    """(kind, space label, contrast or None) if ``name`` is one of our group maps or its sidecar,
    else None: files of other origin in ``group/`` are never touched."""
    for kind, pattern in _GROUP_PATTERNS.items():
        match = pattern.match(name)
        if match:
            return kind, match["space"], match.groupdict().get("contrast")
    return None


def sidecar_path(image_path: Path) -> Path:
    name = image_path.name
    for ending in (".nii.gz", ".nii", ".h5"):
        if name.endswith(ending):
            return image_path.with_name(name[: -len(ending)] + ".json")
    raise ValueError(f"no sidecar naming rule for {image_path}")


def bids_uri(relpath: str) -> str:
    """A BIDS URI of an input file (``raw`` is declared in DatasetLinks)."""
    return f"bids:raw:{relpath}"


def derivative_uri(output_dir: Path, path: Path) -> str:
    return f"bids::{path.relative_to(output_dir).as_posix()}"


# ---- atomic writes: a temporary file in the same folder, then one rename ----------------------


_PARTIAL_MARK = ".part"  # in the names of atomic_path's temporary files


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temporary name keeps the extension (nibabel chooses the format from it) and starts with a
    dot, so a crash leaves no file that looks like an output.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f"{_PARTIAL_MARK}{suffix}", dir=path.parent
    )
    os.close(handle)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_partial_files(folder: Path) -> list[Path]:
    """Remove the temporary files of ``atomic_path`` left in ``folder`` (and below) by a process
    killed while writing (SIGKILL, the out-of-memory killer: no ``finally`` runs then)."""
    found = sorted(p for p in folder.rglob(f".*{_PARTIAL_MARK}*") if p.is_file())
    for path in found:
        path.unlink(missing_ok=True)
    return found


def write_nifti(img, path: Path) -> Path:
    """Write ``img`` atomically, its spatial units set to millimetres (in ``img``'s header too).

    Every image mninorm writes is on a grid in RAS millimetres; left "unknown", viewers guess and
    the BIDS validator warns (NIFTI_UNIT). The time unit is kept as it is.
    """
    header = img.header
    if hasattr(header, "set_xyzt_units"):  # NIfTI-1 and NIfTI-2
        header.set_xyzt_units(xyz="mm", t=header.get_xyzt_units()[1])
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return path


def write_json(content: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
    return path


def copy_file(source: Path, path: Path) -> Path:
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return path


def write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


# ---- dataset-level files: identical whoever writes them, so concurrent jobs agree -----------


def dataset_description(bids_dir: Path, container: dict | None = None) -> dict:
    source = _read_json(bids_dir / "dataset_description.json")
    source_dataset = {"URL": bids_dir.resolve().as_uri()}
    if source.get("DatasetDOI"):
        source_dataset["DOI"] = source["DatasetDOI"]
    generated_by = {
        "Name": "mninorm",
        "Version": __version__,
        # Which invocation wrote which T1w's outputs is per T1w: this file is shared by every run
        # into the folder (one job per participant on a cluster) and must not change between them.
        "Description": "Normalisation of T1w images to MNI templates. Each T1w's run record, "
        f"sub-<label>/log/<source entities>_{RUN_RECORD}, names the invocation that wrote its "
        "outputs: command line, run identifier (RunUUID), start and end times (UTC), CPUs and "
        f"threads; its log, <source entities>_{T1W_LOG}, what was said and printed meanwhile.",
        "CodeURL": CODE_URL,
    }
    if container:
        generated_by["Container"] = container
    return {
        "Name": f"mninorm: {source.get('Name', bids_dir.name)} in MNI space",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source_dataset],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
    }


def write_dataset_files(output_dir: Path, bids_dir: Path) -> None:
    """``dataset_description.json`` and ``.bidsignore``, written only when changed."""
    container = _container_info()
    _write_if_changed(
        output_dir / "dataset_description.json",
        json.dumps(dataset_description(bids_dir, container), indent=2) + "\n",
    )
    _write_if_changed(output_dir / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


def add_to_bidsignore(output_dir: Path) -> None:
    """Add the missing ``BIDSIGNORE`` lines to ``.bidsignore``, keeping any other line in it (the
    group level may run on outputs of an older version, or on a folder a user has annotated)."""
    path = output_dir / ".bidsignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    missing = [line for line in BIDSIGNORE if line not in lines]
    if missing:
        write_text("\n".join([*lines, *missing]) + "\n", path)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    write_text(text, path)


def _container_info() -> dict | None:
    image = os.environ.get("MNINORM_CONTAINER_IMAGE")  # set in the Dockerfile
    return {"Type": "docker", "Tag": image} if image else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
