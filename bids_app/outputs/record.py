"""The run record of one T1w (``sub-X/log/<source>_desc-mninorm_run.json``): one frozen dataclass.

The participant pipeline builds it (success or failure) and writes it; QC, the report, the
methods text and the group level read it back from disk and use its attributes, never its keys.
Each field names its JSON key once (``_key``), so writer and readers cannot drift apart.

Reading an older record: a key this version does not know is kept aside (``extra``, written back
unchanged) and logged at debug level; an optional key it lacks reads as None (or empty); a key
every record has had since the first version (``Source``, ``Status``, ``OutputSpaces``) missing
raises ``RunRecordError`` naming the file: a renamed key fails loudly instead of reading as n/a.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from bids_app.errors import RunRecordError
from bids_app.outputs.derivatives import write_json

log = logging.getLogger(__name__)


def _key(
    name: str, *, required: bool = False, load: Callable | None = None, null: bool = False,
    default=None, default_factory=None,
):  # fmt: skip
    """A field stored under JSON key ``name``. ``load`` converts the JSON value (lists to tuples,
    nested records); ``null``: written as null when None (else left out, as the pipeline always
    did for what it did not learn)."""
    metadata = {"key": name, "required": required, "load": load, "null": null}
    if required:
        return field(metadata=metadata)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata, hash=False)
    return field(default=default, metadata=metadata)


def _extra():
    """Unknown keys of an older or newer record, kept aside as they were."""
    return field(default_factory=dict, compare=False, hash=False, repr=False)


def _tuple(value, where: str) -> tuple:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{where} must be a list, not {type(value).__name__}")
    return tuple(value)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be an object, not {type(value).__name__}")
    return dict(value)


def _nested(cls) -> Callable:
    def load(value, where: str):
        return cls.from_json(_mapping(value, where), where)

    return load


def _nested_tuple(cls) -> Callable:
    def load(value, where: str):
        return tuple(cls.from_json(_mapping(v, f"{where}[{i}]"), f"{where}[{i}]")
                     for i, v in enumerate(_tuple(value, where)))  # fmt: skip

    return load


class _JsonRecord:
    """``to_json``/``from_json`` over the ``_key`` fields of a frozen dataclass."""

    extra: dict

    def to_json(self) -> dict:
        content = {}
        for spec in fields(self):
            if "key" not in spec.metadata:
                continue
            value = getattr(self, spec.name)
            if value is None and not spec.metadata["null"]:
                continue
            content[spec.metadata["key"]] = _dump(value)
        return {**content, **self.extra}

    @classmethod
    def from_json(cls, content: dict, where: str = "the run record"):
        """Raises ``KeyError`` naming the missing required keys, ``TypeError`` a malformed value
        (``read_run_record`` names the file)."""
        specs = [spec for spec in fields(cls) if "key" in spec.metadata]
        known = {spec.metadata["key"] for spec in specs}
        required = [spec.metadata["key"] for spec in specs if spec.metadata["required"]]
        missing = [key for key in required if content.get(key) is None]
        extra = {key: value for key, value in content.items() if key not in known}
        if missing:
            unknown = f" (keys it has that this version does not know: {', '.join(extra)})"
            raise KeyError(f"{where} lacks {', '.join(missing)}" + (unknown if extra else ""))
        if extra:
            log.debug("%s: keys kept aside, unknown to this version: %s", where, ", ".join(extra))
        values = {}
        for spec in specs:
            key = spec.metadata["key"]
            if key not in content or content[key] is None:
                continue  # the field's default: None, or empty
            load = spec.metadata["load"]
            values[spec.name] = load(content[key], f"{where}: {key}") if load else content[key]
        return cls(**values, extra=extra)


def _dump(value):
    if isinstance(value, _JsonRecord):
        return value.to_json()
    if isinstance(value, tuple):
        return [_dump(item) for item in value]
    return value


@dataclass(frozen=True, kw_only=True)
class ExtractionAttempt(_JsonRecord):
    """One brain-extraction attempt (``participant.brain.Attempt``), with its mask's checks."""

    number: int = _key("Attempt", required=True)
    why: str | None = _key("Why")
    template: str | None = _key("Template")
    engine: str | None = _key("Engine")
    start: str | None = _key("Start")
    start_score: float | None = _key("StartScore")
    head_volume_ratio: float | None = _key("HeadVolumeRatio")
    problems: tuple[str, ...] = _key("Problems", load=_tuple, default=())
    seconds: float | None = _key("Seconds")
    # The mask's checks (measures.maskcheck.MaskCheck); absent when the attempt made no mask
    brain_volume_ml: float | None = _key("BrainVolumeML")
    template_mask_dice: float | None = _key("TemplateMaskDice")
    min_sector_coverage: float | None = _key("MinSectorCoverage")
    worst_sector: str | None = _key("WorstSector")
    outside_fraction: float | None = _key("OutsideFraction")
    volume_ratio: float | None = _key("VolumeRatio")
    extra: dict = _extra()


@dataclass(frozen=True, kw_only=True)
class BrainExtractionRecord(_JsonRecord):
    fallback: bool = _key("Fallback", default=True)
    kept_attempt: int | None = _key("KeptAttempt")
    attempts: tuple[ExtractionAttempt, ...] = _key(
        "Attempts", load=_nested_tuple(ExtractionAttempt), default=()
    )
    extra: dict = _extra()


@dataclass(frozen=True, kw_only=True)
class RegistrationRecord(_JsonRecord):
    """What the methods text says about the registration, recorded when it ran (so reports need
    not know the engines: a preset renamed or retired later is still described as it ran)."""

    engine_label: str | None = _key("Engine")  # as sidecars name it
    engine_package: str | None = _key("EnginePackage")  # its distribution
    engine_version: str | None = _key("EngineVersion")
    preset: str | None = _key("Preset")
    stages: str | None = _key("Stages")  # the preset's one line
    methods: tuple[str, ...] = _key("Methods", load=_tuple, default=())  # cite [key]s
    references: dict = _key("References", load=_mapping, default_factory=dict)  # key -> text
    extra: dict = _extra()


@dataclass(frozen=True, kw_only=True)
class RunRecord(_JsonRecord):
    """What happened to one T1w, in the key order the pipeline has always written."""

    source: str = _key("Source", required=True)  # BIDS URI of the input T1w
    step_seconds: dict = _key("StepSeconds", load=_mapping, default_factory=dict)
    # What the header check found (absent when the image could not be loaded)
    source_orientation: str | None = _key("SourceOrientation")
    source_shape: tuple[int, ...] | None = _key("SourceShape", load=_tuple)
    source_zooms_mm: tuple[float, ...] | None = _key("SourceZoomsMM", load=_tuple)
    header_fixes: tuple[str, ...] | None = _key("HeaderFixes", load=_tuple)
    skull_strip_decision: str | None = _key("SkullStripDecision")
    lesion_mask: dict | None = _key("LesionMask", load=_mapping)  # file, volume, resampled
    brain_extraction: BrainExtractionRecord | None = _key(
        "BrainExtraction", load=_nested(BrainExtractionRecord)
    )  # None: the input was already skull-stripped (or the run stopped before)
    status: str = _key("Status", required=True)  # "ok" or "failed"
    error: str | None = _key("Error", null=True)
    total_seconds: float | None = _key("TotalSeconds")
    output_spaces: tuple[str, ...] = _key("OutputSpaces", required=True, load=_tuple)
    preset: str | None = _key("Preset")
    engine: str | None = _key("Engine")  # the --engine name
    random_seed: int | None = _key("RandomSeed")
    threads: int | None = _key("Threads")
    outputs: tuple[str, ...] = _key("Outputs", load=_tuple, default=())  # derivative URIs
    software: dict = _key("Software", load=_mapping, default_factory=dict)  # package -> version
    registration: RegistrationRecord | None = _key("Registration", load=_nested(RegistrationRecord))
    # The invocation (outputs.provenance.RunInfo), the same for all its participants
    run_uuid: str | None = _key("RunUUID")
    command_line: str | None = _key("CommandLine")
    run_start_time: str | None = _key("RunStartTime")
    cpu_count: int | None = _key("CPUCount", null=True)
    cpu_affinity_count: int | None = _key("CPUAffinityCount", null=True)
    # This T1w's times (UTC) and the run's parallelism
    start_time: str | None = _key("StartTime")
    end_time: str | None = _key("EndTime")
    threads_total: int | None = _key("ThreadsTotal")
    parallel_participants: int | None = _key("ParallelParticipants")
    # What resume compares (participant/resume.py): the inputs' hashes, the output settings
    resume: dict | None = _key("Resume", load=_mapping)
    extra: dict = _extra()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def read_run_record(path: Path) -> RunRecord:
    """The record in ``path``; ``RunRecordError`` naming the file if it cannot be one."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunRecordError(f"{path}: unreadable run record ({err})") from err
    if not isinstance(content, dict):
        raise RunRecordError(f"{path}: a run record is a JSON object, not {type(content).__name__}")
    try:
        return RunRecord.from_json(content, str(path))
    except (KeyError, TypeError) as err:
        reason = err.args[0] if err.args else str(err)
        raise RunRecordError(
            f"{reason}: not a run record this version can read (run the participant level again "
            "for this T1w to rewrite it)"
        ) from err


def write_run_record(record: RunRecord, path: Path) -> Path:
    """Atomically, as every output."""
    return write_json(record.to_json(), path)
