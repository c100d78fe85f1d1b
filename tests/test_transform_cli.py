"""The ``mninorm-transform`` command line: options, help, version, messages and exit codes. What
the subcommands compute is tested on a real run in test_mapping.py."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import logging_restored

import bids_app
from bids_app import __version__
from bids_app.errors import ExitCode
from bids_app.transform_cli import EXIT_CODES, build_parser, main

DOCUMENTED = {int(code) for code, _ in EXIT_CODES}
TEMPLATE = "MNI152NLin2009cAsym"


@pytest.fixture(autouse=True)
def _keep_logging():
    with logging_restored():
        yield


def _parsers(parser: argparse.ArgumentParser):
    """The parser and every subcommand's (argparse keeps them in private attributes)."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_argument_and_command_has_help():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [c.dest for c in action._choices_actions if not c.help]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_version_is_one_line_with_the_command_and_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"mninorm-transform {__version__}\n"


def test_help_ends_with_the_exit_code_table(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    table = text[text.index("exit codes:") :]
    listed = [int(m) for m in (line.split()[0] for line in table.splitlines()[1:]) if m.isdigit()]
    assert listed == [int(code) for code, _ in EXIT_CODES]
    assert {ExitCode(code) for code in listed}  # every one is an ExitCode
    assert "--session-label" in table  # not cut at its hyphen


@pytest.mark.parametrize("spelling", ["T1w", "t1w", "T1W", "t1W"])
@pytest.mark.parametrize("option", ["--from-space", "--to-space"])
def test_t1w_is_the_native_space_in_any_case(option, spelling):
    other = "--to-space" if option == "--from-space" else "--from-space"
    args = build_parser().parse_args(
        ["points", "out", "in.tsv", "out.tsv", "--participant-label", "01",
         option, spelling, other, TEMPLATE]
    )  # fmt: skip
    assert getattr(args, option[2:].replace("-", "_")) == "T1w"
    assert getattr(args, other[2:].replace("-", "_")).template == TEMPLATE


def test_template_identifiers_keep_their_case():
    # TemplateFlow identifiers are case-sensitive: only T1w is folded.
    args = build_parser().parse_args(
        ["image", "out", "in.nii.gz", "o.nii.gz", "--participant-label", "01",
         "--from-space", "mni152nlin2009casym", "--to-space", "t1w"]
    )  # fmt: skip
    assert (args.from_space.template, args.to_space) == ("mni152nlin2009casym", "T1w")


# ---- messages ----------------------------------------------------------------------------------


@pytest.fixture
def voxels(tmp_path):
    image = tmp_path / "image.nii.gz"
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(
        image
    )
    table = tmp_path / "ijk.tsv"
    table.write_text("i\tj\tk\n1\t2\t3\n")
    return ["coords", str(image), str(table), str(tmp_path / "xyz.tsv"), "--to", "world"]


@pytest.mark.parametrize(
    ("flags", "info_shown"), [([], True), (["-q"], False), (["-v"], True), (["-qq"], False)]
)
def test_verbose_and_quiet_move_the_message_level(voxels, capsys, flags, info_shown):
    assert main([*flags, *voxels]) == ExitCode.OK
    err = capsys.readouterr().err
    assert ("1 point(s) -> world coordinates" in err) == info_shown
    expected = {(): logging.INFO, ("-q",): logging.WARNING, ("-v",): logging.DEBUG,
                ("-qq",): logging.ERROR}[tuple(flags)]  # fmt: skip
    assert logging.getLogger().level == expected


# ---- exit codes: each one in the --help table ---------------------------------------------------


def _output_dir(tmp_path):
    """An output folder pybids can read, with one participant (sub-01)."""
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (out / "dataset_description.json").write_text(
        json.dumps({"Name": "t", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                    "GeneratedBy": [{"Name": "mninorm"}]})
    )  # fmt: skip
    (anat / "sub-01_desc-preproc_T1w.nii.gz").write_bytes(b"")
    return out


def _points(tmp_path, out, *spaces, label="01"):
    table = tmp_path / "p.tsv"
    table.write_text("x\ty\tz\n0\t0\t0\n")
    return ["points", str(out), str(table), str(tmp_path / "o.tsv"), "--participant-label", label,
            "--from-space", spaces[0], "--to-space", spaces[1]]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (lambda t: _points(t, _output_dir(t), "t1w", "T1W"), ExitCode.USAGE,
         "exactly one of them must be T1w"),
        (lambda t: _points(t, _output_dir(t), TEMPLATE, TEMPLATE), ExitCode.USAGE,
         "exactly one of them must be T1w"),
        (lambda t: _points(t, _output_dir(t), "t1w", TEMPLATE, label="99"),
         ExitCode.NOTHING_MATCHED, "there are: 01"),
        (lambda t: _points(t, _output_dir(t), "t1w", TEMPLATE),
         ExitCode.MISSING_INPUT, "no forward transform"),
        (lambda t: _points(t, t, "T1w", TEMPLATE), ExitCode.MISSING_INPUT,
         "not an mninorm output folder"),
        (lambda t: ["coords", str(t / "none.nii.gz"), str(t / "in.tsv"), str(t / "o.tsv"),
                    "--to", "world"], ExitCode.MISSING_INPUT, "does not exist"),
    ],
)  # fmt: skip
def test_errors_exit_with_a_documented_code_and_a_message(tmp_path, capsys, args, code, message):
    assert main(args(tmp_path)) == code
    assert int(code) in DOCUMENTED
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["points"],
        ["image", "o", "i", "j", "--participant-label", "01", "--from-space", "T1w",
         "--to-space", TEMPLATE, "--interpolation", "cubic"],
        ["image", "o", "i", "j", "--participant-label", "01", "--from-space", "T1w",
         "--to-space", TEMPLATE, "--res", "2mm"],
    ],
)  # fmt: skip
def test_command_line_mistakes_exit_64(args, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == ExitCode.USAGE
    assert int(ExitCode.USAGE) in DOCUMENTED
    assert "mninorm-transform" in capsys.readouterr().err


# ---- Ctrl-C -------------------------------------------------------------------------------------

# mninorm-transform in a process of its own, whose reading of the input table waits (as a large
# table on a slow disk would) after saying so in the file given first: Ctrl-C comes while it runs.
_WAITING_COMMAND = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bids_app import transform_cli

    def slow_read(path):
        Path(sys.argv[1]).touch()
        time.sleep(120)

    transform_cli.read_table = slow_read
    sys.exit(transform_cli.main(sys.argv[2:]))
    """
)


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(voxels, tmp_path):
    waiting = tmp_path / "reading"
    repository = Path(bids_app.__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-c", _WAITING_COMMAND, str(waiting), *voxels],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(repository)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not waiting.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting.exists(), process.communicate(timeout=10)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == ExitCode.INTERRUPTED == 130
    assert int(ExitCode.INTERRUPTED) in DOCUMENTED
    assert err.splitlines() == [err.strip()] and err.strip().endswith(" ERROR interrupted")
    assert out == ""
    assert not (tmp_path / "xyz.tsv").exists()
