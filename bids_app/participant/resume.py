"""Resume: which T1w a run can skip because its outputs are already there, complete, and made from
the same input with the same output-affecting settings.

The proof is the T1w's run record: its ``"Resume"`` object (``Fingerprint.as_record``, the
record's ``resume`` field) holds the input's content hash and the settings that change the
outputs. A record without an end time is a run that was killed (the pipeline writes one before
the first output): it is redone.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import RunRecordError
from bids_app.outputs import derivatives as drv
from bids_app.outputs.record import read_run_record
from bids_app.outputs.source import T1wInput
from bids_app.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB: hashing streams the file, whatever its size
_NO_RECORD = "no run record"
# The outputs in a template space that every successful run writes (a lesion's are optional)
_ALWAYS_IN_SPACE = ("t1w", "mask", "logjac_nonlinear", "logjac_total")


@dataclass(frozen=True)
class Fingerprint:
    """What one T1w's outputs are made from: its content and the settings that change them."""

    inputs: tuple[tuple[str, str], ...]  # (role, sha256 of the file's bytes)
    settings: tuple[tuple[str, object], ...]  # (name, value), JSON-compatible values

    def as_record(self) -> dict:
        return {
            "InputSHA256": dict(self.inputs),
            "Settings": {name: value for name, value in self.settings},
        }


@dataclass(frozen=True)
class Decision:
    skip: bool
    reason: str  # why it is redone (or "unchanged")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def output_settings(settings: Settings) -> tuple[tuple[str, object], ...]:
    """The settings that change a T1w's outputs (threads, folders and messages do not)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mninorm_version = version("mninorm")
    except PackageNotFoundError:
        mninorm_version = "unknown"
    return (
        ("OutputSpaces", [str(space) for space in settings.output_spaces]),
        ("Engine", settings.engine),
        ("Preset", settings.preset),
        ("RandomSeed", settings.random_seed),
        ("SkullStrip", settings.skull_strip),
        ("BrainTemplate", settings.brain_template),
        ("Fallback", settings.fallback),
        ("MninormVersion", mninorm_version),
    )


def fingerprint(t1w: T1wInput, settings: Settings) -> Fingerprint:
    """The T1w's hash and, when it has one, its lesion mask's (a mask added, changed or removed
    changes the outputs)."""
    from bids_app.participant.lesion import find_lesion

    inputs = [("T1w", file_sha256(t1w.path))]
    lesion = find_lesion(t1w.path, {**t1w.entities, "subject": t1w.subject})
    if lesion is not None:
        inputs.append(("LesionMask", file_sha256(lesion)))
    return Fingerprint(tuple(inputs), output_settings(settings))


def decide(t1w: T1wInput, settings: Settings, print_: Fingerprint) -> Decision:
    """Skip only a T1w whose record ended well, with the same fingerprint, and whose outputs are
    all there and loadable."""
    record_path = drv.run_record_path(settings.output_dir, t1w)
    if not record_path.exists():
        return Decision(False, _NO_RECORD)
    try:
        record = read_run_record(record_path)
    except RunRecordError as err:
        return Decision(False, f"unreadable run record ({err})")
    if not record.end_time:
        return Decision(False, "its last run did not end (killed?)")
    if not record.ok:
        return Decision(False, "its last run failed")
    if record.resume != print_.as_record():
        return Decision(False, _what_changed(record.resume, print_.as_record()))
    for path in expected_outputs(t1w, settings, list(record.outputs)):
        problem = _output_problem(path)
        if problem:
            return Decision(False, f"{drv.derivative_uri(settings.output_dir, path)} {problem}")
    return Decision(True, "unchanged")


def expected_outputs(t1w: T1wInput, settings: Settings, listed: list[str]) -> list[Path]:
    """Every file a successful run of ``t1w`` wrote: the images and transforms its record lists
    (optional ones, as a lesion's, only when made), never fewer than the table's own for these
    settings, and their sidecars."""
    out = settings.output_dir
    images = [drv.native_path(out, t1w, kind) for kind in drv.NATIVE_OUTPUTS]
    for template in settings.templates:
        images += [drv.transform_path(out, t1w, kind, template) for kind in drv.TRANSFORM_OUTPUTS]
    for space in settings.output_spaces:
        images += [drv.space_path(out, t1w, kind, space) for kind in _ALWAYS_IN_SPACE]
    images += [out / uri.removeprefix("bids::") for uri in listed if uri.startswith("bids::")]
    images = list(dict.fromkeys(images))
    return images + [drv.sidecar_path(path) for path in images]


def _what_changed(previous: dict | None, current: dict) -> str:
    if not previous:
        return "its run record has no resume fingerprint"
    if previous.get("InputSHA256") != current["InputSHA256"]:
        return "the input file changed"
    old, new = previous.get("Settings", {}), current["Settings"]
    changed = [name for name in new if old.get(name) != new[name]]
    return f"changed setting(s): {', '.join(changed) or 'unknown'}"


def _output_problem(path: Path) -> str | None:
    """Why ``path`` cannot be trusted (None: it can). Cheap checks, no full decompression: a
    NIfTI's header and its gzip length, an HDF5 file opening, a JSON parsing."""
    if not path.is_file():
        return "is missing"
    name = path.name
    try:
        if name.endswith((".nii", ".nii.gz")):
            return _nifti_problem(path)
        if name.endswith(".h5"):
            import h5py

            with h5py.File(path, "r") as h5:
                if not list(h5.keys()):
                    return "is an empty HDF5 file"
        elif name.endswith(".json"):
            json.loads(path.read_text())
    except (OSError, ValueError, EOFError, gzip.BadGzipFile) as err:
        return f"is not loadable ({err})"
    return None


def _nifti_problem(path: Path) -> str | None:
    import nibabel as nib
    import numpy as np

    img = nib.load(str(path))
    header = img.header
    # Where the data really start (a header's vox_offset of 0 means 'right after it')
    offset = int(img.dataobj.offset)
    expected = offset + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
    if path.name.endswith(".gz"):
        # gzip's trailer holds the uncompressed size (mod 2**32): a truncated file fails this.
        with open(path, "rb") as stream:
            stream.seek(-4, 2)
            size = struct.unpack("<I", stream.read(4))[0]
        if size != expected % (1 << 32):
            return f"is truncated ({size} bytes uncompressed, {expected} expected)"
    elif path.stat().st_size < expected:
        return f"is truncated ({path.stat().st_size} bytes, {expected} expected)"
    return None


def split_done(
    by_subject: dict, settings: Settings
) -> tuple[dict, list[tuple[T1wInput, Decision]]]:
    """The T1ws still to run (by participant) and the ones skipped, each said in one line."""
    todo: dict[str, tuple[T1wInput, ...]] = {}
    skipped: list[tuple[T1wInput, Decision]] = []
    for subject, t1ws in by_subject.items():
        remaining = []
        for t1w in t1ws:
            if settings.rerun:
                remaining.append(t1w)
                continue
            decision = decide(t1w, settings, fingerprint(t1w, settings))
            if decision.skip:
                log.info("sub-%s: %s unchanged since its last run: skipped", subject, t1w.relpath)
                skipped.append((t1w, decision))
            else:
                # A first run (no record) is not news; anything else says why it is redone.
                level = logging.DEBUG if decision.reason == _NO_RECORD else logging.INFO
                log.log(level, "sub-%s: %s is run again: %s", subject, t1w.relpath, decision.reason)
                remaining.append(t1w)
        if remaining:
            todo[subject] = tuple(remaining)
    return todo, skipped
