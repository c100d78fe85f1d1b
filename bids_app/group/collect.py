"""Group level, step 1: find what the participant level left in ``output_dir``, space by space
(template + resolution), and check that each normalised T1w's files can be used.

A T1w is found through its run record (written for failures too) or, when a job died before
writing one, through its normalised T1w. Every file is read in full once: a truncated ``.nii.gz``
fails only when its data are decompressed. Files that are missing, unreadable, not finite or on
another grid than the space's make that T1w unusable in that space, with the reason; they never
stop the group level. Results come out sorted by participant, session and source, whatever order
the participants were processed (or listed by the file system) in.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.errors import MissingInputError, MninormError, NothingMatchedError
from bids_app.outputs import derivatives as drv
from bids_app.outputs.source import T1wInput, strip_prefix
from bids_app.reports import qc
from bids_app.reports.figures import VIEWS
from bids_app.spaces import OutputSpace, parse_output_space

log = logging.getLogger(__name__)

KINDS = ("t1w", "mask", "logjac_nonlinear", "logjac_total")  # the per-T1w maps the group uses
PREVIEW_VIEWS = VIEWS  # thumbnail panels: sagittal, coronal, axial (a RAS array's x, y, z cut)
_AFFINE_TOLERANCE_MM = 1e-3
_NORMALISED_T1W = re.compile(
    r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_space-"
    rf"(?P<space>{drv.SPACE_LABEL_PATTERN})_desc-preproc_T1w\.nii(?:\.gz)?$"
)


@dataclass(frozen=True)
class Grid:
    """The voxel grid every map of a space must be on."""

    shape: tuple[int, int, int]
    affine: np.ndarray = field(compare=False, hash=False)
    origin: str  # where it comes from, for the report

    def matches(self, shape, affine) -> bool:
        return tuple(shape) == self.shape and np.allclose(
            affine, self.affine, atol=_AFFINE_TOLERANCE_MM
        )

    @property
    def zooms(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


@dataclass(frozen=True)
class T1wResult:
    """One T1w in one space, as found on disk."""

    t1w: T1wInput
    space: OutputSpace
    source: str  # BIDS URI of the input T1w
    paths: dict = field(compare=False, hash=False)  # kind (KINDS, "qc") -> Path
    run_ok: bool  # its run record says it was processed
    problem: str | None = None  # why its files cannot be used; None: they all can
    preview: tuple | None = field(default=None, compare=False, hash=False)  # 2D slices

    @property
    def subject(self) -> str:
        return self.t1w.subject

    @property
    def session(self) -> str | None:
        return self.t1w.session

    @property
    def prefix(self) -> str:
        return drv.source_prefix(self.t1w)

    @property
    def run(self) -> str | None:
        return _entities(self.prefix).get("run")

    @property
    def usable(self) -> bool:
        return self.problem is None

    def sort_key(self) -> tuple:
        return (self.subject, self.session or "", self.prefix)


@dataclass(frozen=True)
class SpaceResults:
    """Every T1w found in one space, and the space's grid and template."""

    space: OutputSpace
    grid: Grid | None  # None: not one file of this space could be read
    template: object | None  # templates.Template, None when TemplateFlow does not have it
    cuts: tuple[int, int, int] | None  # thumbnail slices (x, y, z) on the RAS-reoriented grid
    outline: tuple | None  # the template brain mask at ``cuts`` (None: no template)
    results: tuple[T1wResult, ...]
    notes: tuple[str, ...] = ()  # what the report must say (no template, ...)

    @property
    def label(self) -> str:
        return drv.space_label(self.space)

    @property
    def usable(self) -> tuple[T1wResult, ...]:
        return tuple(r for r in self.results if r.usable)


@dataclass(frozen=True)
class Collection:
    output_dir: Path
    spaces: tuple[SpaceResults, ...]

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(sorted({r.subject for s in self.spaces for r in s.results}))


# ---- finding ---------------------------------------------------------------------------------


def find_results(
    output_dir: Path, participant_labels: Iterable[str] = (), session_labels: Iterable[str] = ()
) -> list[T1wResult]:
    """Every (T1w, space) the participant level wrote or tried to write, unchecked, sorted."""
    output_dir = Path(output_dir)
    subjects = _subject_folders(output_dir)
    wanted = [strip_prefix(label, "sub-") for label in participant_labels]
    unknown = sorted(set(wanted) - set(subjects))
    if unknown:
        raise NothingMatchedError(
            f"no participant-level results of {', '.join('sub-' + u for u in unknown)} in "
            f"{output_dir} (found: {', '.join('sub-' + s for s in subjects) or 'none'})"
        )
    sessions = {strip_prefix(label, "ses-") for label in session_labels}
    found = []
    for subject in wanted or subjects:
        mine = _found_with_records(output_dir, subject)
        mine += _found_without_records(output_dir, subject, {r.prefix for r in mine})
        if not mine and wanted:
            raise NothingMatchedError(
                f"sub-{subject} has no participant-level results in {output_dir}: leave it out of "
                "--participant-label, or run the participant level for it first"
            )
        found += mine
    if sessions:
        found = [r for r in found if r.session in sessions]
    if not found:
        raise MissingInputError(
            f"no participant-level results in {output_dir}"
            + (f" for session(s) {', '.join(sorted(sessions))}" if sessions else "")
            + ": run `mninorm bids_dir output_dir participant` first (the group level reads "
            "only what it wrote there)"
        )
    return sorted(found, key=T1wResult.sort_key)


def _subject_folders(output_dir: Path) -> list[str]:
    if not output_dir.is_dir():
        return []
    return sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())


def _found_with_records(output_dir: Path, subject: str) -> list[T1wResult]:
    found = []
    for record in qc.collect_records(output_dir, subject):
        spaces = [parse_output_space(text) for text in record.content.output_spaces]
        for space in spaces:
            found.append(
                T1wResult(
                    t1w=record.t1w,
                    space=space,
                    source=record.content.source or drv.bids_uri(record.t1w.relpath),
                    paths=_paths(output_dir, record.t1w, space),
                    run_ok=record.ok,
                    problem=None
                    if record.ok
                    else f"the participant level failed: {record.content.error or '?'}",
                )
            )
    return found


def _found_without_records(output_dir: Path, subject: str, known: set[str]) -> list[T1wResult]:
    """Normalised T1w images without a (readable) run record: a job that died or was killed."""
    found = []
    for path in sorted((output_dir / f"sub-{subject}").glob("**/anat/*_desc-preproc_T1w.nii*")):
        match = _NORMALISED_T1W.match(path.name)
        if not match or match["prefix"] in known:
            continue
        t1w = _t1w_from_prefix(subject, match["prefix"])
        space = parse_output_space(match["space"].replace("_", ":"))
        found.append(
            T1wResult(
                t1w=t1w,
                space=space,
                source=drv.bids_uri(t1w.relpath),
                paths=_paths(output_dir, t1w, space),
                run_ok=False,
                problem="no run record: the participant level did not finish this T1w "
                "(run it again for this participant)",
            )
        )
    return found


def _t1w_from_prefix(subject: str, prefix: str) -> T1wInput:
    entities = _entities(prefix)
    folder = f"sub-{subject}/" + (f"ses-{entities['ses']}/" if "ses" in entities else "")
    relpath = f"{folder}anat/{prefix}_T1w.nii.gz"
    session = {"session": entities["ses"]} if "ses" in entities else {}
    return T1wInput(subject=subject, path=Path(relpath), relpath=relpath, entities=session)


def _entities(prefix: str) -> dict[str, str]:
    return dict(part.split("-", 1) for part in prefix.split("_") if "-" in part)


def _paths(output_dir: Path, t1w: T1wInput, space: OutputSpace) -> dict[str, Path]:
    paths = {kind: drv.space_path(output_dir, t1w, kind, space) for kind in KINDS}
    paths["qc"] = drv.qc_path(output_dir, t1w, "table")
    return paths


# ---- checking, space by space ----------------------------------------------------------------


def collect(
    output_dir: Path,
    fetch_template: Callable,
    participant_labels: Iterable[str] = (),
    session_labels: Iterable[str] = (),
    workers: int = 1,
    client=None,
) -> Collection:
    """Find, group by space and check everything; each space's grid is the template's (or, when
    TemplateFlow does not have the template, the grid most of the cohort's images are on). The
    files are checked in ``workers`` threads, or on the Dask ``client``'s cluster."""
    found = find_results(output_dir, participant_labels, session_labels)
    by_space: dict[OutputSpace, list[T1wResult]] = {}
    for result in found:
        by_space.setdefault(result.space, []).append(result)
    spaces = sorted(by_space, key=lambda s: (s.key, s.resolution or 0))
    grids = {space: _space_grid(space, by_space[space], fetch_template) for space in spaces}
    previewed = _finest_per_template(grids)
    checked = []
    for space in spaces:
        grid, template, notes = grids[space]
        for note in notes:
            log.warning("%s", note)
        cuts = outline = None
        if grid is not None and space in previewed:
            cuts, outline = _preview_cuts(grid, template)
        results = check_all(by_space[space], grid, cuts, workers, client)
        for result in results:
            if result.run_ok and result.problem:
                log.warning("sub-%s: %s (%s) not used: %s", result.subject, result.prefix,
                            space, result.problem)  # fmt: skip
        checked.append(SpaceResults(space, grid, template, cuts, outline, results, notes))
    return Collection(Path(output_dir), tuple(checked))


def _space_grid(space: OutputSpace, results: list[T1wResult], fetch_template):
    """(grid, template or None, notes). The grid is the one most of the space's normalised T1w are
    on (ties: the template's, then the first participant's): the cohort decides, so a template
    folder that changed since the participant level cannot make every image "wrong". The template
    draws the outlines when it is on that grid."""
    import nibabel as nib

    template, template_grid, notes = None, None, []
    try:
        template = space.find_grid(fetch_template)
        mask = nib.load(str(template.mask_path))
        template_grid = Grid(tuple(mask.shape[:3]), mask.affine, "the template's")
    except (MninormError, OSError, ValueError) as err:
        notes.append(
            f"{space}: the template is not available here ({err}); the space's grid is the one "
            "most of the cohort's images are on, and outlines are the cohort's mean brain mask"
        )
    headers = []
    for result in results:
        if not result.run_ok:
            continue
        try:
            img = nib.load(str(result.paths["t1w"]))
            headers.append((tuple(img.shape[:3]), np.round(img.affine, 3).tobytes()))
        except Exception:  # noqa: BLE001 - missing or corrupt: _check says which, later
            continue
    if not headers:
        return template_grid, template, tuple(notes)
    counts = Counter(headers)
    order = {key: i for i, key in enumerate(counts)}

    def on_template(key) -> bool:
        shape, affine = key
        return template_grid is not None and template_grid.matches(
            shape, np.frombuffer(affine, dtype=np.float64).reshape(4, 4)
        )

    shape, affine = max(counts, key=lambda key: (counts[key], on_template(key), -order[key]))
    grid = Grid(
        shape, np.frombuffer(affine, dtype=np.float64).reshape(4, 4), "the cohort's most common"
    )
    if template_grid is not None and on_template((shape, affine)):
        return Grid(shape, template_grid.affine, "the template's"), template, tuple(notes)
    if template is not None:
        notes.append(
            f"{space}: the template's grid here ({'x'.join(map(str, template_grid.shape))}) is "
            "not the one the participants' images are on (was TEMPLATEFLOW_HOME changed?); the "
            "space's grid is theirs, and outlines are the cohort's mean brain mask"
        )
    return grid, None, tuple(notes)


def _finest_per_template(grids: dict) -> set[OutputSpace]:
    """Thumbnails are drawn once per template, on its finest grid."""
    finest: dict[str, OutputSpace] = {}
    for space, (grid, _, _) in grids.items():
        if grid is None:
            continue
        best = finest.get(space.key)
        if best is None or np.prod(grid.zooms) < np.prod(grids[best][0].zooms):
            finest[space.key] = space
    return set(finest.values())


def _preview_cuts(grid: Grid, template) -> tuple[tuple[int, int, int], tuple | None]:
    """Slices through the template brain's centre of mass (or the grid's centre)."""
    import nibabel as nib

    if template is None:
        return tuple(int(s) // 2 for s in _canonical_shape(grid)), None
    mask = canonical_array(np.asarray(nib.load(str(template.mask_path)).dataobj) > 0, grid.affine)
    inside = np.argwhere(mask)
    centre = inside.mean(0) if inside.size else (np.array(mask.shape) - 1) / 2
    cuts = tuple(int(round(c)) for c in centre)
    return cuts, take_preview(mask.astype(np.float32), cuts)


def _canonical_shape(grid: Grid) -> tuple[int, int, int]:
    return tuple(int(grid.shape[axis]) for axis in _canonical_axes(grid))


def canonical_zooms(grid: Grid) -> tuple[float, float, float]:
    """Voxel sizes along the RAS-reoriented grid's axes."""
    return tuple(grid.zooms[axis] for axis in _canonical_axes(grid))


def _canonical_axes(grid: Grid) -> list[int]:
    """For each RAS axis, the grid's axis that becomes it."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(grid.affine)
    return [int(axis) for axis in ornt[:, 0].argsort()]


def canonical_array(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` with its axes reordered and flipped to RAS (what the figures expect)."""
    import nibabel as nib

    current = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(
        data, nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt("RAS"))
    )


def take_preview(canonical: np.ndarray, cuts: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """One 2D section per view through ``cuts``, rows going up (superior or anterior)."""
    from bids_app.reports.figures import take_slice

    return tuple(
        np.array(take_slice(canonical, view, cut), dtype=np.float32)
        for view, cut in zip(PREVIEW_VIEWS, cuts, strict=True)
    )


def split_blocks(items: list, count: int) -> list[list]:
    """``count`` contiguous blocks of near-equal size (fewer when there are fewer items)."""
    count = max(1, min(count, len(items)))
    edges = np.linspace(0, len(items), count + 1).round().astype(int)
    return [items[start:end] for start, end in zip(edges[:-1], edges[1:], strict=True)]


# Fewer T1w than this per thread: check them in this thread (a pool costs more than it saves)
MIN_CHECKS_PER_WORKER = 8


def check_all(
    results: list[T1wResult], grid: Grid | None, cuts, workers: int = 1, client=None
) -> tuple[T1wResult, ...]:
    """``_check`` of every result, in their order. Reading a map is decompression (zlib) and
    array work (numpy), both of which release the GIL, so threads of this process spread it
    over the cores as well as processes do, without pickling the results' thumbnails back; on
    a Dask cluster, one task per block of results (per worker thread)."""
    started = time.monotonic()
    if client is not None:
        blocks = split_blocks(list(results), max(1, sum(client.nthreads().values())))
        futures = [client.submit(_check_block, block, grid, cuts, pure=False) for block in blocks]
        checked = tuple(result for future in futures for result in future.result())
        where = "on the Dask cluster"
    else:
        workers = max(1, min(workers, len(results) // MIN_CHECKS_PER_WORKER))
        where = f"in {workers} thread(s)"
        if workers == 1:
            checked = _check_block(results, grid, cuts)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="mninorm-check") as pool:
                checked = tuple(pool.map(lambda result: _check(result, grid, cuts), results))
    log.info("checked the files of %d T1w %s in %.1f s", len(results), where,
             time.monotonic() - started)  # fmt: skip
    return checked


def _check_block(results: list[T1wResult], grid: Grid | None, cuts) -> tuple[T1wResult, ...]:
    return tuple(_check(result, grid, cuts) for result in results)


def _check(result: T1wResult, grid: Grid | None, cuts) -> T1wResult:
    """``result`` with ``problem`` set if any of its files cannot be used (and with its
    thumbnail slices when ``cuts`` is given and the normalised T1w could be read)."""
    from dataclasses import replace

    if not result.run_ok:
        return result
    if grid is None:
        return replace(result, problem="no image of this space could be read")
    preview, problems = None, []
    for kind in KINDS:
        data, problem = read_map(result.paths[kind], grid)
        if problem:
            problems.append(problem)
            continue
        if kind == "t1w" and cuts is not None:
            preview = take_preview(canonical_array(data, grid.affine), cuts)
        if kind in ("t1w", "mask") and not np.any(data):
            problems.append(f"{result.paths[kind].name} is empty (all zeros)")
        del data
    return replace(result, problem="; ".join(problems) or None, preview=preview)


def read_map(path: Path, grid: Grid) -> tuple[np.ndarray | None, str | None]:
    """(the data as float32, None), or (None, why it cannot be used)."""
    import nibabel as nib

    if not path.is_file():
        return None, f"{path.name} is missing"
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - EOFError, zlib.error, ImageFileError...: all corrupt
        return None, f"{path.name} cannot be read ({type(err).__name__}: {err})"
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or not grid.matches(data.shape, img.affine):
        return None, (
            f"{path.name} is on another grid ({'x'.join(map(str, data.shape))}) than the space's "
            f"({'x'.join(map(str, grid.shape))}, {grid.origin} grid)"
        )
    if not np.isfinite(data).all():
        return None, f"{path.name} has NaN or infinite values"
    return data, None
