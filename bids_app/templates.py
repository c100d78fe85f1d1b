"""Templates: a T1w and its brain mask on one grid, from TemplateFlow or from a custom folder.

TemplateFlow stores templates in several ways: with a ``res-`` entity (``res-01``, ``res-1``),
without one (MNI305, MNIColin27: a single grid), and per ``cohort-`` (MNIPediatricAsym). A *custom*
template is a folder in the same layout (``tpl-<Name>/tpl-<Name>[_res-XX]_T1w.nii.gz`` and
``..._desc-brain_mask.nii.gz``) that TemplateFlow does not have; it is checked when loaded.

Without a resolution asked, a template is used on its *registration grid*: ``res-1`` (TemplateFlow's
1 mm reference grid) when it is available, otherwise the single grid without ``res-``, otherwise the
finest grid available.

``templateflow`` is imported lazily: it reads ``TEMPLATEFLOW_HOME`` at import time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import TemplateError, TemplateUnavailableError

log = logging.getLogger(__name__)

_T1W = {"desc": None, "suffix": "T1w"}
_MASK = {"desc": "brain", "suffix": "mask"}
# A custom folder's files: tpl-<Name>[_res-XX]_T1w / _desc-brain_mask (.nii or .nii.gz)
_CUSTOM_FILE = r"^tpl-{name}(?:_res-(?P<res>[0-9]+))?_{ending}\.nii(?:\.gz)?$"


@dataclass(frozen=True)
class Template:
    name: str
    resolution: int | None  # TemplateFlow's res- index of these files; None: no res- entity
    t1w_path: Path
    mask_path: Path
    zooms_mm: tuple[float, float, float]
    metadata_version: str  # TemplateFlowVersion of template_description.json
    citations: tuple[str, ...]
    full_name: str
    cohort: str | None = None
    custom: bool = False  # a folder in TemplateFlow's layout that TemplateFlow does not have

    @property
    def grid_label(self) -> str:
        """'res-02', or 'its single grid' when the files have no res- entity."""
        if self.resolution is None:
            return "its single grid (no res- entity)"
        return f"res-{self.resolution:02d}"


def fetch_template(
    name: str,
    resolution: int | None = None,
    cohort: str | None = None,
    folder: str | Path | None = None,
) -> Template:
    """A template's T1w and brain mask on ``res-<resolution>`` (None: its registration grid).

    ``folder`` is a custom template's ``tpl-<Name>`` folder. Without it, a name TemplateFlow knows
    is found (or downloaded, when online) through its client; any other name must be a folder
    ``tpl-<name>`` in TEMPLATEFLOW_HOME."""
    if folder is not None:
        if not Path(folder).is_dir():
            raise TemplateUnavailableError(
                f"custom template folder {folder} does not exist (or is not a folder here): check "
                "the path (in a container, the path inside it, with the folder bound in)"
            )
        return load_custom_template(Path(folder), resolution)
    if name in templateflow_names():
        return _fetch_templateflow(name, resolution, cohort)
    in_home = templateflow_home() / f"tpl-{name}"
    if in_home.is_dir():
        if cohort is not None:
            raise TemplateError(f"custom template {in_home}: cohorts are not supported")
        return load_custom_template(in_home, resolution)
    raise TemplateUnavailableError(
        f"{name!r} is neither a TemplateFlow template ({', '.join(sorted(templateflow_names()))}) "
        f"nor a folder tpl-{name} under TEMPLATEFLOW_HOME={templateflow_home()}: give a custom "
        "template's folder by its path (e.g. --output-spaces /data/templates/tpl-MIITRA)"
    )


def templateflow_home() -> Path:
    from templateflow import conf

    return Path(conf.TF_HOME)


# ---- what TemplateFlow has ------------------------------------------------------------------


def templateflow_catalogue() -> tuple[str, ...]:
    """Every file TemplateFlow has (``tpl-X/...``), from the file list its client ships (the
    skeleton archive, read, never unpacked); () when the client has none."""
    from templateflow import conf

    skeleton = Path(conf.__file__).parent / "templateflow-skel.zip"
    try:
        with zipfile.ZipFile(skeleton) as archive:
            return tuple(n for n in archive.namelist() if n.startswith("tpl-"))
    except (OSError, zipfile.BadZipFile):
        return ()


def templateflow_names() -> set[str]:
    """Identifiers TemplateFlow has: its catalogue, or (without one) the local copy's."""
    names = {n.split("/")[0][4:] for n in templateflow_catalogue()}
    if names:
        return names
    from templateflow import api

    return set(api.templates())


def _catalogue_files(name: str, cohort: str | None, resolution, entities: dict) -> list[str]:
    """TemplateFlow's files of one kind (T1w or brain mask) for a template, cohort, resolution
    (``any``: every resolution)."""
    ending = "_T1w.nii.gz" if entities["suffix"] == "T1w" else "_desc-brain_mask.nii.gz"
    found = []
    for path in templateflow_catalogue():
        if not path.startswith(f"tpl-{name}/") or not path.endswith(ending):
            continue
        parsed = _entities(Path(path).name, ending)
        if parsed is None or set(parsed) - {"cohort", "res"}:
            continue  # another desc- (desc-SPM12_T1w, desc-brain_T1w), an atlas...
        if parsed.get("cohort") != cohort:
            continue
        res = int(parsed["res"]) if "res" in parsed else None
        if resolution == "any" or res == resolution:
            found.append(path)
    return found


def _entities(filename: str, ending: str) -> dict[str, str] | None:
    body = filename.removesuffix(ending)
    parts = body.split("_")[1:]  # after tpl-<name>
    if not all("-" in p for p in parts):
        return None
    return dict(p.split("-", 1) for p in parts)


def _available_resolutions(name: str, cohort: str | None) -> list[int | None]:
    """Resolutions of a template (and cohort) that TemplateFlow has, or the local copy has."""
    from templateflow import api

    found = {_resolution_of(Path(p).name) for p in _catalogue_files(name, cohort, "any", _T1W)}
    query = {"extension": ".nii.gz", **_T1W, **({"cohort": cohort} if cohort else {})}
    try:
        local = api.ls(name, **query) or []
    except Exception:  # noqa: BLE001 - a template absent here: the catalogue decides
        local = []
    found |= {_resolution_of(Path(p).name) for p in local}
    return list(found)


def _resolution_of(filename: str) -> int | None:
    match = re.search(r"_res-([0-9]+)_", filename)
    return int(match.group(1)) if match else None


def _registration_order(resolutions, zooms: dict) -> list[int | None]:
    """res-1 first, then the single grid without res-, then the finest first."""

    def key(res):
        if res == 1:
            return (0, 0.0)
        if res is None:
            return (1, 0.0)
        return (2, zooms.get(res, float(res)))

    return sorted(resolutions, key=key)


# ---- TemplateFlow templates -----------------------------------------------------------------


def _fetch_templateflow(name: str, resolution: int | None, cohort: str | None) -> Template:
    metadata = _metadata(name)
    cohorts = _cohorts(name, metadata)
    if cohorts and cohort is None:
        raise TemplateUnavailableError(
            f"{name} has one template per cohort: choose one, e.g. {name}:cohort-{cohorts[0]} "
            f"(cohorts: {', '.join(cohorts)}; see its template_description.json)"
        )
    if cohort is not None and cohort not in cohorts:
        raise TemplateUnavailableError(
            f"{name} has no cohort-{cohort} "
            + (f"(cohorts: {', '.join(cohorts)})" if cohorts else "(it has no cohorts)")
        )
    available = _available_resolutions(name, cohort)
    if resolution is not None:
        if available and resolution not in available:
            raise TemplateUnavailableError(
                f"{_describe(name, cohort)} has no res-{resolution} grid; TemplateFlow has "
                f"{_list_resolutions(available)}: ask for one of those"
            )
        order = [resolution]
    else:
        order = _registration_order(available, _zooms_by_resolution(metadata))
    failures = []
    for res in order or [None]:
        try:
            template = _templateflow_pair(name, res, cohort, metadata)
        except TemplateUnavailableError as err:
            failures.append((res, err))
            continue
        if resolution is None and res != 1 and len(available) > 1:
            log.warning(
                "%s: registering on %s (%s mm), the finest grid available here (res-1 is not)",
                _describe(name, cohort), template.grid_label,
                "x".join(f"{z:g}" for z in template.zooms_mm),
            )  # fmt: skip
        return template
    raise _missing(name, cohort, order[0] if order else resolution, str(failures[0][1]))


def _templateflow_pair(name, resolution, cohort, metadata) -> Template:
    import nibabel as nib

    t1w_path = _get_file(name, resolution, cohort, _T1W)
    mask_path = _get_file(name, resolution, cohort, _MASK)
    zooms = tuple(float(z) for z in nib.load(str(t1w_path)).header.get_zooms()[:3])
    return Template(
        name=name,
        resolution=resolution,
        t1w_path=t1w_path,
        mask_path=mask_path,
        zooms_mm=zooms,
        metadata_version=str(metadata.get("TemplateFlowVersion", "unknown")),
        citations=tuple(metadata.get("ReferencesAndLinks", [])),
        full_name=str(metadata.get("Name", name)),
        cohort=cohort,
    )


def _get_file(name: str, resolution, cohort, entities: dict) -> Path:
    """One non-empty local file (downloaded first when TemplateFlow can)."""
    from templateflow import api

    query = {"resolution": resolution, "extension": ".nii.gz", **entities}
    if cohort is not None:
        query["cohort"] = cohort
    try:
        found = api.get(name, **query)
    except Exception as err:  # requests/OSError/... from a download attempt without network
        raise TemplateUnavailableError(f"the download failed ({type(err).__name__})") from err
    paths = [found] if isinstance(found, (str, Path)) else list(found)
    paths = [Path(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size > 0]
    if len(paths) != 1:
        raise TemplateUnavailableError("it is not in TemplateFlow's local copy")
    return paths[0]


def _missing(name: str, cohort, resolution, reason: str) -> TemplateUnavailableError:
    """The files TemplateFlow really has for this grid, and a command that fetches them."""
    home = templateflow_home()
    files = [
        f
        for entities in (_T1W, _MASK)
        for f in _catalogue_files(name, cohort, resolution, entities)
    ]
    where = f" ({', '.join(files)})" if files else ""
    command = prefetch_command(name, resolution, cohort)
    return TemplateUnavailableError(
        f"the T1w and brain mask of {_describe(name, cohort)} on "
        f"{'res-' + str(resolution) if resolution is not None else 'its single grid'}{where} are "
        f"not under TEMPLATEFLOW_HOME={home}: {reason}. Pre-fetch them on a machine with "
        f"internet access, e.g. `TEMPLATEFLOW_HOME={home} {command}`"
        ", then copy that folder here (or point TEMPLATEFLOW_HOME at a folder that has it)"
    )


def prefetch_command(name: str, resolution: int | None, cohort: str | None = None) -> str:
    """A shell command that downloads a template's T1w and brain mask on one grid."""
    calls = []
    for entities in (_T1W, _MASK):
        arguments = [repr(name)]
        if cohort is not None:
            arguments.append(f"cohort={cohort!r}")
        arguments.append(f"resolution={resolution!r}")
        arguments += [f"{key}={value!r}" for key, value in entities.items()]
        arguments.append("extension='.nii.gz'")
        calls.append(f"api.get({', '.join(arguments)})")
    return f'python -c "from templateflow import api; {"; ".join(calls)}"'


def _describe(name: str, cohort: str | None) -> str:
    return name if cohort is None else f"{name} cohort-{cohort}"


def _list_resolutions(resolutions) -> str:
    labels = sorted("its single grid (no res-)" if r is None else f"res-{r}" for r in resolutions)
    return ", ".join(labels)


def _cohorts(name: str, metadata: dict) -> list[str]:
    found = {
        part[len("cohort-") :]
        for path in templateflow_catalogue()
        if path.startswith(f"tpl-{name}/")
        for part in Path(path).name.split("_")
        if part.startswith("cohort-")
    }
    found |= set(map(str, metadata.get("cohort", {}) or {}))
    return sorted(found, key=lambda c: (len(c), c))


def _zooms_by_resolution(metadata: dict) -> dict[int, float]:
    zooms = {}
    for key, grid in (metadata.get("res") or {}).items():
        try:
            zooms[int(key)] = min(float(z) for z in grid["zooms"])
        except (KeyError, TypeError, ValueError):
            continue
    return zooms


def _metadata(name: str) -> dict:
    try:
        from templateflow import api

        return dict(api.get_metadata(name))
    except Exception:  # metadata only decorates sidecars; a missing file must not stop a run
        log.warning("%s: no template_description.json found", name)
        return {}


# ---- custom templates -----------------------------------------------------------------------


def custom_template_name(folder: Path) -> str:
    """``<Name>`` of a ``tpl-<Name>`` folder (a clear error for any other folder name)."""
    match = re.fullmatch(r"tpl-([A-Za-z0-9]+)", Path(folder).name)
    if not match:
        raise TemplateError(
            f"custom template folder {folder}: its name must be tpl-<Name> (letters and digits), "
            "as in TemplateFlow; <Name> names the outputs (space-<Name>)"
        )
    return match.group(1)


def load_custom_template(folder: Path, resolution: int | None = None) -> Template:
    """A custom template folder's T1w and brain mask, checked: both present and non-empty, on
    the same grid, the mask binary and not empty."""
    name = custom_template_name(folder)
    t1ws = _custom_files(folder, name, "T1w")
    masks = _custom_files(folder, name, "desc-brain_mask")
    both = sorted(set(t1ws) & set(masks), key=lambda r: (r is not None, r))
    if not both:
        raise TemplateError(
            f"custom template {folder} needs tpl-{name}[_res-XX]_T1w.nii.gz and "
            f"tpl-{name}[_res-XX]_desc-brain_mask.nii.gz with the same res- "
            f"(found T1w: {_list_resolutions(t1ws) or 'none'}; "
            f"brain masks: {_list_resolutions(masks) or 'none'})"
        )
    if resolution is not None:
        if resolution not in both:
            raise TemplateError(
                f"custom template {folder} has no res-{resolution} T1w and brain mask "
                f"(it has {_list_resolutions(both)})"
            )
        chosen = resolution
    else:
        chosen = _registration_order(both, {})[0]
    t1w_path, mask_path = t1ws[chosen], masks[chosen]
    zooms = _check_custom_pair(t1w_path, mask_path)
    metadata = _custom_metadata(folder)
    return Template(
        name=name,
        resolution=chosen,
        t1w_path=t1w_path,
        mask_path=mask_path,
        zooms_mm=zooms,
        metadata_version=str(metadata.get("TemplateFlowVersion", "custom")),
        citations=tuple(metadata.get("ReferencesAndLinks", [])),
        full_name=str(metadata.get("Name", name)),
        custom=True,
    )


def _custom_files(folder: Path, name: str, ending: str) -> dict[int | None, Path]:
    pattern = re.compile(_CUSTOM_FILE.format(name=re.escape(name), ending=re.escape(ending)))
    found = {}
    for path in sorted(Path(folder).iterdir()):
        match = pattern.match(path.name)
        if match:
            found[int(match["res"]) if match["res"] else None] = path
    return found


def _check_custom_pair(t1w_path: Path, mask_path: Path) -> tuple[float, float, float]:
    import nibabel as nib
    import numpy as np

    from bids_app.measures.maskcheck import binary_problem

    for path in (t1w_path, mask_path):
        if path.stat().st_size == 0:
            raise TemplateError(
                f"{path} is a 0-byte placeholder, not an image: copy the real file there"
            )
    try:
        t1w, mask = nib.load(str(t1w_path)), nib.load(str(mask_path))
        mask_data = np.asarray(mask.dataobj)
    except Exception as err:  # nibabel raises several kinds for a corrupt file
        raise TemplateError(
            f"custom template image unreadable ({err}): check {t1w_path.parent}"
        ) from err
    if t1w.shape[:3] != mask.shape[:3] or not np.allclose(t1w.affine, mask.affine, atol=1e-3):
        raise TemplateError(
            f"{mask_path.name} is not on the grid of {t1w_path.name} (shapes {t1w.shape} and "
            f"{mask.shape}, or different affines): resample the mask onto the T1w's grid "
            "(nearest neighbour)"
        )
    problem = binary_problem(mask_data)
    if problem == "empty":
        raise TemplateError(f"{mask_path} is empty: it must mark the template's brain with 1")
    if problem:
        raise TemplateError(
            f"{mask_path} is {problem}: a mask must be 0/1; threshold it (e.g. probability > 0.5)"
        )
    return tuple(float(z) for z in t1w.header.get_zooms()[:3])


def _custom_metadata(folder: Path) -> dict:
    description = folder / "template_description.json"
    if not description.is_file():
        return {}
    try:
        return dict(json.loads(description.read_text()))
    except (OSError, ValueError) as err:
        log.warning("%s unreadable (%s): the template's name and references are left out",
                    description, err)  # fmt: skip
        return {}


# ---- TemplateFlow atlases (the group level's --atlas atlas-<Name>[_desc-<label>...]) ----------

# The entities an atlas id may carry, as they appear in TemplateFlow's file names -> the client's
# keyword (its config calls seg- "segmentation")
_ATLAS_ENTITIES = {"atlas": "atlas", "desc": "desc", "seg": "segmentation", "scale": "scale",
                   "hemi": "hemi", "label": "label", "roi": "roi"}  # fmt: skip
_ATLAS_ID = re.compile(r"^atlas-[A-Za-z0-9]+(?:_(?:desc|seg|scale|hemi|label|roi)-[A-Za-z0-9]+)*$")


@dataclass(frozen=True)
class AtlasFiles:
    """A TemplateFlow atlas (``suffix-dseg``) of one template, on the grid nearest the asked one."""

    identifier: str  # as given: atlas-Schaefer2018_desc-400Parcels7Networks
    template: str
    resolution: int | None  # the dseg image's res- (None: no res- entity)
    dseg_path: Path
    labels_path: Path | None  # its dseg.tsv (None: TemplateFlow has none for it)


def is_atlas_id(text: str) -> bool:
    """``atlas-<Name>[_desc-<label>...]``: BIDS entities, never a file name (no extension)."""
    return bool(_ATLAS_ID.match(text))


def atlas_entities(identifier: str) -> dict[str, str]:
    """'atlas-Schaefer2018_desc-400Parcels7Networks' -> {'atlas': ..., 'desc': ...}."""
    return dict(part.split("-", 1) for part in identifier.split("_"))


def fetch_atlas(
    identifier: str, template: str, resolution: int | None = None, cohort: str | None = None
) -> AtlasFiles:
    """The dseg image of a TemplateFlow atlas in ``template`` on ``res-<resolution>`` or, when
    TemplateFlow has the atlas on other grids only, the nearest one (None: res-1 is the target),
    and its ``.tsv`` labels from the same template folder; downloaded when TemplateFlow can."""
    entities = atlas_entities(identifier)
    found = _atlas_files(template, cohort, entities, "_dseg.nii.gz")
    if not found:
        raise _atlas_missing(identifier, template, None, "TemplateFlow has no such atlas for "
                             f"{_describe(template, cohort)}{_known_atlases(template, cohort)}")
    res = _nearest_resolution(sorted(found, key=lambda r: (r is None, r or 0)), resolution,
                              _zooms_by_resolution(_metadata(template)))  # fmt: skip
    if resolution is not None and res != resolution:
        log.warning("--atlas %s: %s has it on %s, not res-%s: labels are read at the nearest "
                    "atlas voxel of each peak", identifier, _describe(template, cohort),
                    "its single grid" if res is None else f"res-{res}", resolution)  # fmt: skip
    dseg = _get_atlas_file(identifier, template, cohort, res, entities, found[res])
    tables = _atlas_files(template, cohort, entities, "_dseg.tsv")
    labels = None
    if tables:  # the table of the same grid, else the one without res-, else any
        table_res = res if res in tables else None if None in tables else sorted(
            tables, key=lambda r: (r is None, r or 0))[0]  # fmt: skip
        labels = _get_atlas_file(identifier, template, cohort, table_res, entities,
                                 tables[table_res])  # fmt: skip
    else:
        log.warning("--atlas %s: TemplateFlow has no dseg.tsv for it: the table gives label "
                    "numbers, not names", identifier)  # fmt: skip
    return AtlasFiles(identifier, template, res, dseg, labels)


def _atlas_files(template, cohort, entities: dict, ending: str) -> dict[int | None, str]:
    """resolution -> file name, where TemplateFlow (its catalogue, or the local copy) has the
    atlas's file ending in ``ending`` (``_dseg.nii.gz``, ``_dseg.tsv``)."""
    from templateflow import api

    names = [Path(p).name for p in templateflow_catalogue() if p.startswith(f"tpl-{template}/")]
    query = {_ATLAS_ENTITIES[k]: v for k, v in entities.items()}
    suffix, extension = ending[1:].split(".", 1)
    with contextlib.suppress(Exception):  # a template absent here: the catalogue decides
        local = api.ls(template, suffix=suffix, extension=f".{extension}", **query) or []
        names += [Path(p).name for p in local]
    found = {}
    for name in names:
        parsed = _entities(name, ending)
        if parsed is None or parsed.get("cohort") != cohort:
            continue
        if {k: v for k, v in parsed.items() if k not in ("cohort", "res")} == entities:
            found[_resolution_of(name)] = name
    return found


def _nearest_resolution(available, resolution, zooms: dict) -> int | None:
    """``resolution`` if available, else the grid whose voxel size is nearest its (by res index
    when TemplateFlow's metadata gives no sizes)."""
    target = 1 if resolution is None else resolution
    if target in available:
        return target

    def size(res):
        if res is None:
            return zooms.get(1, 1.0)  # a single grid: as fine as the reference grid, or 1 mm
        return zooms.get(res, float(res))

    return min(available, key=lambda res: (abs(size(res) - size(target)), size(res)))


def _get_atlas_file(identifier, template, cohort, res, entities, filename) -> Path:
    """The local copy of ``filename`` (downloaded first when TemplateFlow can)."""
    from templateflow import api

    query = {_ATLAS_ENTITIES[k]: v for k, v in entities.items()}
    extension = ".tsv" if filename.endswith(".tsv") else ".nii.gz"
    query.update(suffix="dseg", extension=extension, resolution=res)
    if cohort is not None:
        query["cohort"] = cohort
    try:
        found = api.get(template, **query)
    except Exception as err:  # requests/OSError/RuntimeError from a download attempt offline
        reason = f"the download failed ({type(err).__name__})"
        raise _atlas_missing(identifier, template, filename, reason, query) from err
    paths = [found] if isinstance(found, (str, Path)) else list(found)
    paths = [Path(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size > 0]
    if len(paths) != 1:
        reason = "it is not in TemplateFlow's local copy"
        raise _atlas_missing(identifier, template, filename, reason, query)
    return paths[0]


def _atlas_missing(identifier, template, filename, reason, query=None):
    home = templateflow_home()
    if query is None:
        return TemplateUnavailableError(
            f"--atlas {identifier}: {reason}. Check the id (atlas-<Name>[_desc-<label>], as in "
            f"TemplateFlow's file names under tpl-{template}/) or give an atlas image: --atlas "
            "FILE[:LABELS.tsv]"
        )
    arguments = ", ".join([repr(template), *(f"{k}={v!r}" for k, v in query.items())])
    return TemplateUnavailableError(
        f"--atlas {identifier}: tpl-{template}/{filename} is not under "
        f"TEMPLATEFLOW_HOME={home}: {reason}. Fetch it on a machine with internet access, e.g. "
        f'`TEMPLATEFLOW_HOME={home} python -c "import templateflow.api as t; t.get({arguments})"`'
        ", then copy that folder here (or point TEMPLATEFLOW_HOME at a folder that has it)"
    )


def _known_atlases(template, cohort) -> str:
    """' (it has: atlas-A, atlas-B_desc-x ...)', from TemplateFlow's file names."""
    ids = set()
    for path in templateflow_catalogue():
        name = Path(path).name
        if not path.startswith(f"tpl-{template}/") or not name.endswith("_dseg.nii.gz"):
            continue
        parsed = _entities(name, "_dseg.nii.gz")
        if parsed and "atlas" in parsed and parsed.get("cohort") == cohort:
            ids.add("_".join(f"{k}-{v}" for k, v in parsed.items() if k not in ("cohort", "res")))
    return f" (it has: {', '.join(sorted(ids))})" if ids else " (it has no dseg atlas)"
