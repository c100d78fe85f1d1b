"""TemplateFlow templates: the T1w and brain mask of a template at one resolution index.

``templateflow`` is imported lazily: it reads ``TEMPLATEFLOW_HOME`` at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import TemplateUnavailableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Template:
    name: str
    resolution: int  # TemplateFlow's res- index
    t1w_path: Path
    mask_path: Path
    zooms_mm: tuple[float, float, float]
    metadata_version: str  # TemplateFlowVersion of template_description.json
    citations: tuple[str, ...]
    full_name: str


def fetch_template(name: str, resolution: int = 1) -> Template:
    """Find (or download, when online) a template's T1w and brain mask at ``res-<resolution>``."""
    import nibabel as nib

    t1w_path = _get_file(name, resolution, desc=None, suffix="T1w")
    mask_path = _get_file(name, resolution, desc="brain", suffix="mask")
    zooms = tuple(float(z) for z in nib.load(str(t1w_path)).header.get_zooms()[:3])
    metadata = _metadata(name)
    return Template(
        name=name,
        resolution=resolution,
        t1w_path=t1w_path,
        mask_path=mask_path,
        zooms_mm=zooms,
        metadata_version=str(metadata.get("TemplateFlowVersion", "unknown")),
        citations=tuple(metadata.get("ReferencesAndLinks", [])),
        full_name=str(metadata.get("Name", name)),
    )


def templateflow_home() -> Path:
    from templateflow import conf

    return Path(conf.TF_HOME)


def _get_file(name: str, resolution: int, desc: str | None, suffix: str) -> Path:
    entities = f"res-{resolution:02d}" + (f"_desc-{desc}" if desc else "")
    wanted = f"tpl-{name}/tpl-{name}_{entities}_{suffix}.nii.gz"
    try:
        from templateflow import api

        known = api.templates()
        if name not in known:
            raise TemplateUnavailableError(
                f"{name!r} is not a TemplateFlow template (known here: {', '.join(sorted(known))})"
            )
        found = api.get(name, resolution=resolution, desc=desc, suffix=suffix, extension=".nii.gz")
    except TemplateUnavailableError:
        raise
    except Exception as err:  # requests/OSError/... from a download attempt without network
        raise _missing(wanted, reason=f"the download failed ({type(err).__name__})") from err
    paths = [found] if isinstance(found, (str, Path)) else list(found)
    paths = [Path(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size > 0]
    if len(paths) != 1:
        raise _missing(wanted, reason="it is not in TemplateFlow's local copy")
    return paths[0]


def _missing(wanted: str, reason: str) -> TemplateUnavailableError:
    home = templateflow_home()
    name = wanted.split("/")[0][4:]
    return TemplateUnavailableError(
        f"template file {wanted} is missing under TEMPLATEFLOW_HOME={home}: {reason}. "
        "Pre-fetch it on a machine with internet access, e.g. "
        f'`TEMPLATEFLOW_HOME={home} python -c "from templateflow import api; '
        f"api.get('{name}', suffix=['T1w', 'mask'])\"`, then copy that folder here "
        "(or point TEMPLATEFLOW_HOME at a folder that has it)"
    )


def _metadata(name: str) -> dict:
    try:
        from templateflow import api

        return dict(api.get_metadata(name))
    except Exception:  # metadata only decorates sidecars; a missing file must not stop a run
        log.warning("%s: no template_description.json found", name)
        return {}
