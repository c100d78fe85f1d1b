"""The Boutiques descriptor ``boutiques/mninorm.json`` (what CBRAIN and the BIDS execution spec run
the command from) says exactly what ``build_parser()`` accepts.

The sync tests need only the standard library; the last ones run boutiques' own validator and
command-line renderer, and are skipped where ``boutiques`` is not installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from bids_app import __version__
from bids_app.cli import build_parser, settings_from_args
from bids_app.errors import ExitCode, MninormError, UsageError

DESCRIPTOR = Path(__file__).resolve().parents[1] / "boutiques" / "mninorm.json"
IMAGE = "ghcr.io/mninorm/mninorm"
# argparse has no choices for these: settings_from_args checks them (test below), so that an unknown
# analysis level exits 17 as the BIDS execution spec asks, not 64.
CHECKED_AFTER_PARSING = {"analysis_level"}
# argparse's own groups; every other group of the parser is a Boutiques group. (argparse lists its
# arguments and groups only in private attributes, _actions and _action_groups: used as they are.)
ARGPARSE_GROUPS = {"positional arguments", "options", "optional arguments"}


@pytest.fixture(scope="module")
def descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def _inputs(descriptor: dict) -> dict[str, dict]:
    return {item["id"]: item for item in descriptor["inputs"]}


def _described_actions(descriptor: dict, parser) -> list[argparse.Action]:
    """The parser's arguments that the descriptor must describe: all but the ones it lists, with a
    reason, as deliberately not described (--help, --version, ...)."""
    left_out = descriptor["custom"]["mninorm:not-described"]
    return [a for a in parser._actions if not set(a.option_strings) & set(left_out)]


def _expected_default(action: argparse.Action, descriptor: dict):
    """The descriptor's default-value for an argument, or None where it must have none: Boutiques
    puts a default-value on every command line, so "absent" defaults (None, [], False, a count of
    0) and defaults that depend on the machine are left to the command itself."""
    default = action.default
    if action.dest in descriptor["custom"]["mninorm:machine-dependent-defaults"]:
        return None
    if default is None or default is False or default == [] or action.nargs == 0:
        return None
    if isinstance(default, Path):
        return str(default)
    if isinstance(default, (list, tuple)):
        return [str(v) if isinstance(v, Path) else v for v in default]
    return default


def test_tool_version_and_image_are_the_package_version(descriptor):
    assert descriptor["schema-version"] == "0.5"
    assert descriptor["tool-version"] == __version__
    image = descriptor["container-image"]
    assert image["type"] == "docker"
    assert image["image"] == f"{IMAGE}:{__version__}"
    # No "index": the registry is already in the image name, and boutiques puts the index in front
    # of it when it pulls with Singularity/Apptainer (docker://ghcr.io/ghcr.io/mninorm/...).
    assert "index" not in image


def test_every_argument_is_described_and_nothing_else(descriptor, parser):
    actions = {a.dest: a for a in _described_actions(descriptor, parser)}
    assert set(_inputs(descriptor)) == set(actions)
    # What is left out must exist: a stale entry would hide an option that was renamed.
    flags = {f for a in parser._actions for f in a.option_strings}
    assert set(descriptor["custom"]["mninorm:not-described"]) <= flags
    assert set(descriptor["custom"]["mninorm:machine-dependent-defaults"]) <= set(actions)


def test_flags_and_aliases_are_the_parsers(descriptor, parser):
    inputs = _inputs(descriptor)
    aliases = descriptor["custom"]["mninorm:flag-aliases"]
    assert set(aliases) <= set(inputs)
    for action in _described_actions(descriptor, parser):
        item = inputs[action.dest]
        if not action.option_strings:
            assert "command-line-flag" not in item, action.dest
            assert action.dest not in aliases
            continue
        flag = item["command-line-flag"]
        assert flag.startswith("--"), f"{action.dest}: describe the long spelling"
        spellings = [flag, *aliases.get(action.dest, [])]
        assert len(spellings) == len(set(spellings)), action.dest
        assert set(spellings) == set(action.option_strings), action.dest


def test_types_lists_choices_and_defaults_match(descriptor, parser):
    inputs = _inputs(descriptor)
    for action in _described_actions(descriptor, parser):
        item, name = inputs[action.dest], action.dest
        assert item["value-key"] == f"[{name.upper()}]", name
        assert item["description"].strip(), name
        assert item.get("optional", False) == bool(action.option_strings), name
        assert not action.required or not action.option_strings, f"{name}: a required option"

        # type
        if action.nargs == 0:  # store_true, count: a switch
            assert item["type"] == "Flag", name
        elif action.type is int:
            assert (item["type"], item.get("integer")) == ("Number", True), name
        elif action.type is float:
            assert item["type"] == "Number" and not item.get("integer"), name
        elif action.type is Path:  # File only where it must exist: boutiques mounts it
            assert item["type"] in ("File", "String"), name
        else:
            assert action.type is None, f"{name}: add its type to this test"
            assert item["type"] == "String", name

        # list-ness
        if action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1:
            assert item.get("list") is True, name
            minimum = {"+": 1, "*": None}.get(action.nargs, action.nargs)
            assert item.get("min-list-entries") == minimum, name
            if isinstance(action.nargs, int):
                assert item.get("max-list-entries") == action.nargs, name
        else:
            assert action.nargs in (None, 0), f"{name}: nargs {action.nargs!r} not described"
            assert not item.get("list"), name

        # choices
        if action.choices is not None:
            assert item.get("value-choices") == list(action.choices), name
        elif "value-choices" in item:
            assert name in CHECKED_AFTER_PARSING, f"{name}: choices the parser does not check"

        # default
        assert item.get("default-value") == _expected_default(action, descriptor), name


def test_positionals_come_first_in_the_parsers_order(descriptor, parser):
    tokens = descriptor["command-line"].split()
    assert tokens[0] == parser.prog
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    assert tokens[1 : 1 + len(positionals)] == [f"[{p.upper()}]" for p in positionals]
    # every input once on the command line, nothing else
    assert sorted(tokens[1:]) == sorted(i["value-key"] for i in descriptor["inputs"])


def test_groups_are_the_parsers_argument_groups(descriptor, parser):
    described = {a.dest for a in _described_actions(descriptor, parser)}
    expected = {
        group.title.lower(): [a.dest for a in group._group_actions if a.dest in described]
        for group in parser._action_groups
        if group.title not in ARGPARSE_GROUPS
    }
    assert {g["name"].lower(): g["members"] for g in descriptor["groups"]} == expected


def test_analysis_level_choices_are_what_the_command_accepts(descriptor, parser, tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    choices = _inputs(descriptor)["analysis_level"]["value-choices"]
    for level in choices:
        args = parser.parse_args([str(bids), str(tmp_path / "out"), level])
        assert settings_from_args(args).analysis_level == level
    for level in ("session", "Participant"):
        args = parser.parse_args([str(bids), str(tmp_path / "out"), level])
        with pytest.raises(MninormError) as err:
            settings_from_args(args)
        assert err.value.exit_code == ExitCode.UNKNOWN_LEVEL


def test_number_minimums_are_what_the_command_accepts(descriptor, parser, tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    bounded = [i for i in descriptor["inputs"] if "minimum" in i]
    assert bounded
    argv = [str(bids), str(tmp_path / "out"), "participant"]
    for item in bounded:
        lowest = [*argv, item["command-line-flag"], str(item["minimum"])]
        settings_from_args(parser.parse_args(lowest))
        too_low = [*argv, item["command-line-flag"], str(item["minimum"] - 1)]
        with pytest.raises(UsageError):
            settings_from_args(parser.parse_args(too_low))


def test_error_codes_are_the_exit_codes(descriptor, parser):
    codes = [e["code"] for e in descriptor["error-codes"]]
    assert len(codes) == len(set(codes))
    assert set(codes) == {int(c) for c in ExitCode if c != ExitCode.OK}
    epilog = parser.epilog.split("Exit codes:", 1)[1]
    documented = {int(c) for c in re.findall(r"(?:^|;)\s*(\d+)\s", epilog)}
    assert documented and documented - {0} <= set(codes)


def test_outputs_are_in_the_output_folder(descriptor):
    output_key = _inputs(descriptor)["output_dir"]["value-key"]
    templates = {o["id"]: o["path-template"] for o in descriptor["output-files"]}
    assert templates["derivatives"] == output_key
    assert templates["dataset_description"] == f"{output_key}/dataset_description.json"
    assert all(t.startswith(output_key) for t in templates.values())


# ---- with boutiques ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bosh():
    return pytest.importorskip("boutiques.bosh").bosh


def test_bosh_validates_the_descriptor(bosh, descriptor):
    from boutiques.invocationSchemaHandler import generateInvocationSchema

    bosh(["validate", str(DESCRIPTOR)])  # raises DescriptorValidationError when invalid
    # The invocation schema kept in the descriptor is the one boutiques derives from its inputs.
    without = {k: v for k, v in descriptor.items() if k != "invocation-schema"}
    assert descriptor["invocation-schema"] == generateInvocationSchema(without)


def _render(bosh, invocation: dict | None, folder: Path) -> list[str]:
    """The command line boutiques makes from an invocation, split as a shell would."""
    args = ["exec", "simulate", str(DESCRIPTOR)]
    if invocation is not None:
        path = folder / "invocation.json"
        path.write_text(json.dumps(invocation))
        args += ["-i", str(path)]
    tokens = shlex.split(bosh(args).shell_command)
    assert tokens[0] == "mninorm"
    return tokens[1:]


def test_a_full_invocation_renders_the_command_line_it_means(bosh, parser, tmp_path):
    invocation = {
        "bids_dir": "/data/my study/bids",
        "output_dir": "derivatives/mninorm",
        "analysis_level": "participant",
        "participant_label": ["01", "sub-02"],
        "session_label": ["pre"],
        "bids_filter_file": "filters.json",
        "skip_bids_validation": True,
        "reports_only": False,
        "rerun": True,
        "bids_database_dir": "index",
        "output_spaces": ["MNI152NLin2009cAsym", "MNI152NLin6Asym:res-2"],
        "preset": "fast",
        "engine": "greedy",
        "skull_strip": "force",
        "brain_template": "MNI152NLin6Asym",
        "no_fallback": True,
        "random_seed": 7,
        "work_dir": "work",
        "nthreads": 4,
        "omp_nthreads": 2,
        "mem_mb": 8000,
        "dask_scheduler": "tcp://10.0.0.5:8786",
        "group_by": "diagnosis",
        "covariates": ["age", "sex"],
        "smoothing_fwhm": 8.0,
        "n_permutations": 500,
        "no_tfce": True,
        "atlas": "atlas.nii.gz:labels.tsv",
        "verbose": True,
        "quiet": False,
        "debug": True,
    }
    assert set(invocation) == {i["id"] for i in json.loads(DESCRIPTOR.read_text())["inputs"]}
    args = parser.parse_args(_render(bosh, invocation, tmp_path))
    expected = {**invocation, "verbose": 1, "quiet": 0}
    for name in ("bids_dir", "output_dir", "bids_filter_file", "work_dir", "bids_database_dir"):
        expected[name] = Path(invocation[name])
    assert {name: getattr(args, name) for name in invocation} == expected


def test_an_empty_invocation_renders_the_commands_defaults(bosh, parser, tmp_path):
    required = {"bids_dir": "bids", "output_dir": "out", "analysis_level": "group"}
    rendered = parser.parse_args(_render(bosh, required, tmp_path))
    plain = parser.parse_args(list(required.values()))
    assert vars(rendered) == vars(plain)


def test_random_invocations_render_command_lines_the_parser_takes(bosh, parser, tmp_path):
    for _ in range(3):
        invocation = json.loads(bosh(["example", "--complete", str(DESCRIPTOR)]))
        argv = _render(bosh, invocation, tmp_path)
        args = parser.parse_args(argv)  # exits 64 on a command line it does not take
        assert args.analysis_level == invocation["analysis_level"]
        assert args.participant_label == invocation["participant_label"]
