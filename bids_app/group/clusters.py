"""Group level, step 4c: the results table: clusters surviving FWE correction, with atlas labels.

A cluster is a 26-connected set of significant voxels whose effects share a sign (an increase
next to a decrease is two findings; an F test has no direction, so its clusters are the
significant voxels' components, ``sign`` n/a). Its peak is its voxel of largest |t| (or F); the
peak's label is read from a template-space atlas (``--atlas FILE[:LABELS]``) at the peak's world
coordinate, nearest atlas voxel, so the atlas may be on any grid of the same template space.

Labels files: a BIDS ``dseg.tsv`` (columns ``index`` and ``name``), or lines ``INDEX NAME ...``
(e.g. AAL's ``aal.nii.txt``). Without ``:LABELS``, ``FILE``'s ``.tsv`` or ``.txt`` sibling is
used if there is one (``atlas.nii.gz`` -> ``atlas.tsv``, ``atlas.nii.txt`` or ``atlas.txt``).

``--atlas atlas-<Name>[_desc-<label>]`` (BIDS entities, no extension: never a file name) is a
TemplateFlow atlas instead, in each group space's template (``templates.fetch_atlas``: its
``dseg`` image on the nearest grid TemplateFlow has, and its ``dseg.tsv``).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.errors import MissingInputError, UsageError
from bids_app.outputs import derivatives as drv

COLUMNS = {
    "cluster": "cluster number (largest first, per correction)",
    "correction": "voxel: voxel-wise max-t FWE; tfce: threshold-free cluster enhancement FWE",
    "sign": "positive: effect > 0 (more tissue in the first group, or with the variable); "
    "negative: effect < 0; n/a: an F test (any difference between the groups)",
    "voxels": "significant voxels in the cluster",
    "extent_mm3": "cluster volume (mm^3)",
    "peak_x_mm": "peak (largest |t|) world coordinate, template space (mm)",
    "peak_y_mm": "as peak_x_mm",
    "peak_z_mm": "as peak_x_mm",
    "peak_t": "t at the peak",
    "peak_effect": "effect at the peak (log volume ratio, or its slope; n/a for an F test)",
    "peak_logp_fwe": "FWE-corrected -log10 p at the peak (of this correction)",
    "peak_label": "atlas label at the peak (n/a: no atlas given; unlabelled: atlas value 0)",
}


def columns_for(statistic: str) -> dict[str, str]:
    """The table's columns for a t or an F model (``peak_t`` or ``peak_F``)."""
    if statistic == "t":
        return dict(COLUMNS)
    return {
        (f"peak_{statistic}" if name == "peak_t" else name): (
            f"{statistic} at the peak" if name == "peak_t" else description
        )
        .replace("largest |t|", f"largest {statistic}")
        .replace("max-t", f"max-{statistic}")
        for name, description in COLUMNS.items()
    }


@dataclass(frozen=True)
class Atlas:
    path: Path
    labels_path: Path | None
    data: np.ndarray = field(compare=False, hash=False, repr=False)
    affine: np.ndarray = field(compare=False, hash=False, repr=False)
    names: dict = field(compare=False, hash=False, repr=False)  # index -> name
    templateflow_id: str | None = None  # atlas-<Name>[_desc-...] when TemplateFlow's

    def label_at(self, world_mm) -> str:
        ijk = np.rint(np.linalg.inv(self.affine) @ np.append(np.asarray(world_mm, float), 1.0))
        ijk = ijk[:3].astype(int)
        if np.any(ijk < 0) or np.any(ijk >= self.data.shape[:3]):
            return "outside the atlas"
        index = int(self.data[tuple(ijk)])
        if index == 0:
            return "unlabelled"
        return self.names.get(index, str(index))

    def record(self) -> dict:
        return {
            **({"TemplateFlowAtlas": self.templateflow_id} if self.templateflow_id else {}),
            "File": str(self.path),
            "Labels": str(self.labels_path) if self.labels_path else None,
            "Lookup": "nearest atlas voxel to the peak's world coordinate",
        }


@dataclass(frozen=True)
class Cluster:
    index: int
    correction: str
    sign: str
    voxels: int
    extent_mm3: float
    peak_mm: tuple[float, float, float]
    peak_ijk: tuple[int, int, int]
    peak_t: float  # the peak's statistic: t, or F (``statistic``)
    peak_effect: float | None  # None: an F test
    peak_logp_fwe: float
    peak_label: str
    statistic: str = "t"

    def row(self) -> dict:
        x, y, z = self.peak_mm
        effect = "n/a" if self.peak_effect is None else round(self.peak_effect, 5)
        return {
            "cluster": self.index, "correction": self.correction, "sign": self.sign,
            "voxels": self.voxels, "extent_mm3": round(self.extent_mm3, 1),
            "peak_x_mm": round(x, 1), "peak_y_mm": round(y, 1), "peak_z_mm": round(z, 1),
            f"peak_{self.statistic}": round(self.peak_t, 3), "peak_effect": effect,
            "peak_logp_fwe": round(self.peak_logp_fwe, 3), "peak_label": self.peak_label,
        }  # fmt: skip


def parse_atlas_argument(text: str) -> tuple[Path, Path | None]:
    """``FILE[:LABELS]`` -> (image, labels file or None)."""
    image, _, labels = text.rpartition(":") if ":" in text else (text, "", "")
    if not image:  # "C:..." style or a single path with a colon: take it whole
        image, labels = text, ""
    return Path(image), Path(labels) if labels else None


def load_atlases(text: str, spaces) -> dict:
    """OutputSpace -> Atlas for each of ``spaces``: one image for all (``FILE[:LABELS]``), or a
    TemplateFlow atlas id found in each space's template."""
    from bids_app.templates import is_atlas_id

    if not is_atlas_id(text):
        atlas = load_atlas(text)
        return {space: atlas for space in spaces}
    return {space: load_templateflow_atlas(text, space) for space in spaces}


def load_templateflow_atlas(identifier: str, space) -> Atlas:
    """The TemplateFlow atlas ``identifier`` in ``space``'s template (an ``OutputSpace``)."""
    from dataclasses import replace

    from bids_app.templates import fetch_atlas

    if space.folder is not None:
        raise UsageError(
            f"--atlas {identifier}: {space} is a custom template folder, not a TemplateFlow "
            "template; give an atlas image in its space: --atlas FILE[:LABELS.tsv]"
        )
    found = fetch_atlas(identifier, space.template, space.resolution, space.cohort)
    return replace(_read_atlas(found.dseg_path, found.labels_path), templateflow_id=identifier)


def load_atlas(text: str) -> Atlas:
    image, labels = parse_atlas_argument(text)
    if not image.is_file():
        raise MissingInputError(
            f"--atlas: {image} does not exist; give a template-space atlas image (or a "
            "TemplateFlow atlas id, atlas-<Name>[_desc-<label>])"
        )
    if labels is not None and not labels.is_file():
        raise MissingInputError(f"--atlas: the labels file {labels} does not exist")
    return _read_atlas(image, labels or _sibling_labels(image))


def _read_atlas(image: Path, labels: Path | None) -> Atlas:
    import nibabel as nib

    try:
        img = nib.load(str(image))
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises several kinds for unreadable files
        raise UsageError(f"--atlas: {image} cannot be read as an image ({err})") from err
    integral = np.issubdtype(data.dtype, np.integer) or np.all(data == np.rint(data))
    if data.ndim != 3 or not integral:
        raise UsageError(f"--atlas: {image} is not a 3D image of integer labels (a dseg image)")
    names = read_labels(labels) if labels else {}
    return Atlas(image, labels, data.astype(np.int64), img.affine, names)


def _sibling_labels(image: Path) -> Path | None:
    stem = image.name.removesuffix(".gz").removesuffix(".nii")
    for candidate in (stem + ".tsv", image.name.removesuffix(".gz") + ".txt", stem + ".txt"):
        if (image.parent / candidate).is_file():
            return image.parent / candidate
    return None


def read_labels(path: Path) -> dict[int, str]:
    """index -> name from a BIDS dseg.tsv (``index``, ``name``) or ``INDEX NAME ...`` lines."""
    text = path.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0].split("\t") if text.strip() else []
    if "index" in first and "name" in first:
        return {
            int(row["index"]): row["name"]
            for row in csv.DictReader(io.StringIO(text), delimiter="\t")
            if (row.get("index") or "").strip().lstrip("-").isdigit()
        }
    names = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    if not names:
        raise UsageError(
            f"--atlas: no labels in {path}: write a TSV with columns index and name, or lines "
            "'INDEX NAME'"
        )
    return names


def find_clusters(
    significant: np.ndarray, statistic: np.ndarray, logp: np.ndarray, effect: np.ndarray | None,
    affine: np.ndarray, atlas: Atlas | None, correction: str,
) -> list[Cluster]:  # fmt: skip
    """The clusters of ``significant`` voxels, positive and negative apart, largest first.
    ``effect`` None: ``statistic`` is an F map (no direction; one set of clusters, sign n/a)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    kind = "t" if effect is not None else "F"
    sides = ((1, "positive"), (-1, "negative")) if effect is not None else ((0, "n/a"),)
    found = []
    for sign, name in sides:
        side = significant & (sign * effect > 0) if effect is not None else significant
        labels, count = ndimage.label(side, structure)
        for index in range(1, count + 1):
            voxels = np.argwhere(labels == index)
            values = np.abs(statistic[tuple(voxels.T)])
            peak = tuple(int(v) for v in voxels[int(np.argmax(values))])
            world = tuple(float(v) for v in (affine @ np.append(peak, 1.0))[:3])
            found.append(Cluster(
                0, correction, name, len(voxels), len(voxels) * voxel_mm3, world, peak,
                float(statistic[peak]), None if effect is None else float(effect[peak]),
                float(logp[peak]), atlas.label_at(world) if atlas else "n/a", kind,
            ))  # fmt: skip
    found.sort(key=lambda c: (-c.voxels, -abs(c.peak_t)))
    return [_numbered(c, i + 1) for i, c in enumerate(found)]


def _numbered(cluster: Cluster, index: int) -> Cluster:
    from dataclasses import replace

    return replace(cluster, index=index)


def write_clusters(path: Path, clusters, statistic: str, sidecar: dict) -> Path:
    """The table of a t or F model (a header line even when no cluster survives) and its
    sidecar."""
    columns = columns_for(statistic)
    lines = ["\t".join(columns)]
    for cluster in clusters:
        lines.append("\t".join(str(v) for v in cluster.row().values()))
    drv.write_text("\n".join(lines) + "\n", path)
    drv.write_json({**sidecar, **{name: {"Description": d} for name, d in columns.items()}},
                   path.with_name(path.name.removesuffix(".tsv") + ".json"))  # fmt: skip
    return path
