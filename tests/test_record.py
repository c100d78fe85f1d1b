"""The run record (``outputs/record.py``): one frozen dataclass, the JSON keys the pipeline has
always written, and explicit handling of older records (issue 14: "a renamed key silently turns
into n/a")."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from bids_app.errors import RunRecordError
from bids_app.outputs.record import (
    BrainExtractionRecord,
    ExtractionAttempt,
    RunRecord,
    read_run_record,
    write_run_record,
)

# A record as the pipeline wrote it before the dataclass existed (key for key, in its order),
# plus the "Registration" entry the methods text now reads.
WRITTEN = {
    "Source": "bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
    "StepSeconds": {"load": 0.2, "bias": 12.5, "brain_mask": 40.1, "register_MNI": 80.0},
    "SourceOrientation": "LIA",
    "SourceShape": [176, 256, 256],
    "SourceZoomsMM": [1.0, 1.0, 1.2],
    "HeaderFixes": ["reoriented LIA -> RAS"],
    "SkullStripDecision": "auto: brain extracted",
    "BrainExtraction": {
        "Fallback": True,
        "KeptAttempt": 2,
        "Attempts": [
            {
                "Attempt": 1,
                "Why": "first attempt",
                "Template": "OASIS30ANTs",
                "Engine": "greedy",
                "Start": "centre of mass",
                "StartScore": 0.51,
                "HeadVolumeRatio": 1.9,
                "Problems": ["brain mask of 2900 ml (plausible 700-2300)"],
                "Seconds": 30.2,
            },
            {
                "Attempt": 2,
                "Why": "the first mask failed",
                "Template": "MNI",
                "Engine": "ants",
                "Start": "centre of mass",
                "StartScore": 0.62,
                "HeadVolumeRatio": 1.1,
                "Problems": [],
                "Seconds": 55.0,
                "BrainVolumeML": 1310.5,
                "TemplateMaskDice": 0.93,
                "MinSectorCoverage": 0.91,
                "WorstSector": "inferior-left-posterior",
                "OutsideFraction": 0.012,
                "VolumeRatio": 1.02,
            },
        ],
    },  # fmt: skip
    "Status": "ok",
    "Error": None,
    "TotalSeconds": 190.3,
    "OutputSpaces": ["MNI", "MNI:res-2"],
    "Preset": "fast",
    "Engine": "greedy",
    "RandomSeed": 7,
    "Threads": 2,
    "Outputs": ["bids::sub-01/anat/sub-01_desc-preproc_T1w.nii.gz"],
    "Software": {"mninorm": "0.2", "antspyx": "0.5.4"},
    "Registration": {
        "Engine": "Greedy (picsl-greedy)",
        "EnginePackage": "picsl-greedy",
        "EngineVersion": "1.4",
        "Preset": "fast",
        "Stages": "affine -> deformable",
        "Methods": ["Registration used Greedy [Greedy]."],
        "References": {"Greedy": "Yushkevich"},
    },  # fmt: skip
    "RunUUID": "0f6c",
    "CommandLine": "mninorm bids out participant",
    "RunStartTime": "2026-12-01T05:00:00+00:00",
    "CPUCount": 2,
    "CPUAffinityCount": None,
    "StartTime": "2026-12-01T05:00:01+00:00",
    "EndTime": "2026-12-01T05:03:11+00:00",
    "ThreadsTotal": 2,
    "ParallelParticipants": 1,
}


def test_a_written_record_reads_back_to_the_same_json_key_for_key_and_in_order():
    record = RunRecord.from_json(copy.deepcopy(WRITTEN))
    assert json.dumps(record.to_json()) == json.dumps(WRITTEN)
    assert RunRecord.from_json(record.to_json()) == record
    assert record.extra == {}


def test_attributes_carry_the_values_and_nested_parts_are_frozen_records():
    record = RunRecord.from_json(copy.deepcopy(WRITTEN))
    assert record.ok and record.output_spaces == ("MNI", "MNI:res-2")
    assert record.source_shape == (176, 256, 256)
    extraction = record.brain_extraction
    assert isinstance(extraction, BrainExtractionRecord) and extraction.kept_attempt == 2
    first, second = extraction.attempts
    assert isinstance(second, ExtractionAttempt) and second.worst_sector.startswith("inferior")
    assert first.brain_volume_ml is None and first.problems[0].startswith("brain mask of")
    assert record.registration.methods == ("Registration used Greedy [Greedy].",)
    with pytest.raises(AttributeError):  # frozen
        record.status = "failed"


def test_write_and_read_go_through_the_disk_atomically(tmp_path):
    record = RunRecord.from_json(copy.deepcopy(WRITTEN))
    path = tmp_path / "sub-01" / "log" / "sub-01_desc-mninorm_run.json"
    write_run_record(record, path)
    assert json.loads(path.read_text()) == WRITTEN
    assert read_run_record(path) == record
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize(
    "missing, attribute, expected",
    [
        ("BrainExtraction", "brain_extraction", None),  # a skull-stripped input
        ("Registration", "registration", None),  # a record from before the methods entry
        ("RunUUID", "run_uuid", None),  # from before the invocation was recorded
        ("StepSeconds", "step_seconds", {}),
        ("Outputs", "outputs", ()),
        ("Error", "error", None),
    ],
)
def test_an_older_record_without_an_optional_key_reads_it_as_none_or_empty(
    tmp_path, missing, attribute, expected
):
    content = copy.deepcopy(WRITTEN)
    del content[missing]
    path = tmp_path / "old_run.json"
    path.write_text(json.dumps(content))
    record = read_run_record(path)
    assert getattr(record, attribute) == expected
    if expected is None and missing != "Error":  # Error is written even when null
        assert missing not in record.to_json()  # a key unknown stays unwritten


def test_an_unknown_key_is_kept_aside_logged_and_written_back(tmp_path, caplog):
    content = {**copy.deepcopy(WRITTEN), "FutureMeasure": {"x": 1}}
    content["BrainExtraction"]["Attempts"][0]["Novelty"] = 3
    path = tmp_path / "new_run.json"
    path.write_text(json.dumps(content))
    with caplog.at_level(logging.DEBUG, logger="bids_app.outputs.record"):
        record = read_run_record(path)
    assert record.extra == {"FutureMeasure": {"x": 1}}
    assert record.brain_extraction.attempts[0].extra == {"Novelty": 3}
    assert "FutureMeasure" in caplog.text and str(path) in caplog.text
    assert record.to_json() == content


@pytest.mark.parametrize(
    "old, new", [("Status", "RunStatus"), ("OutputSpaces", "Spaces"), ("Source", "Input")]
)
def test_a_renamed_required_key_fails_loudly_naming_the_file_and_the_keys(tmp_path, old, new):
    content = copy.deepcopy(WRITTEN)
    content[new] = content.pop(old)
    path = tmp_path / "renamed_run.json"
    path.write_text(json.dumps(content))
    with pytest.raises(RunRecordError) as caught:
        read_run_record(path)
    message = str(caught.value)
    assert str(path) in message and old in message and new in message


def test_a_nested_record_missing_its_required_key_names_where(tmp_path):
    content = copy.deepcopy(WRITTEN)
    del content["BrainExtraction"]["Attempts"][1]["Attempt"]
    path = tmp_path / "nested_run.json"
    path.write_text(json.dumps(content))
    with pytest.raises(RunRecordError, match=r"BrainExtraction: Attempts\[1\] lacks Attempt"):
        read_run_record(path)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", json.dumps({**WRITTEN, "OutputSpaces": "MNI"}),
     json.dumps({**WRITTEN, "Status": None})],
)  # fmt: skip
def test_a_malformed_record_is_an_error_naming_the_file(tmp_path, text):
    path = tmp_path / "bad_run.json"
    path.write_text(text)
    with pytest.raises(RunRecordError, match=str(path)):
        read_run_record(path)
