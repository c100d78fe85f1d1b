"""``mninorm-transform``: coordinates and images between a participant's T1w space and a template
space, using the transforms in an mninorm output folder. Coordinates are RAS+ millimetres.

Exit codes are ``errors.ExitCode``'s; ``EXIT_CODES`` says which this command returns (its --help
prints them); ``console.run_command`` turns errors into them, as for ``mninorm``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np

from bids_app import __version__
from bids_app.cli import UsageExitParser, configure_logging
from bids_app.console import run_command
from bids_app.errors import ExitCode, MissingInputError, UsageError
from bids_app.spaces import NATIVE_SPACE, OutputSpace, is_native_space, parse_output_space

log = logging.getLogger("bids_app")
DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"

EXIT_CODES = (
    (ExitCode.OK, "success"),
    (ExitCode.PARTICIPANT_FAILED, "any other error (an unexpected one shows a traceback: please "
     "report it)"),
    (ExitCode.NOTHING_MATCHED, "no such participant in output_dir (the message lists those there)"),
    (ExitCode.USAGE, "usage error: an unknown option or value, --from-space and --to-space not "
     "one T1w and one template, several T1ws match (choose with --session-label / --run), a "
     "table without the needed columns, an image that is not 3D"),
    (ExitCode.MISSING_INPUT, "a file is missing: the input table or image, output_dir's "
     "dataset_description.json, the participant's transform or native T1w for this template, a "
     "TemplateFlow atlas"),
    (ExitCode.TEMPLATE_UNAVAILABLE, "the template grid is not in TEMPLATEFLOW_HOME and cannot be "
     "downloaded"),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C)"),
)  # fmt: skip


def _exit_code_table() -> str:
    rows = [
        # break_on_hyphens=False keeps option names such as --session-label whole
        textwrap.fill(meaning, width=79, initial_indent=f"  {int(code):>3}  ",
                      subsequent_indent=" " * 7, break_on_hyphens=False)
        for code, meaning in EXIT_CODES
    ]  # fmt: skip
    return "\n".join(["exit codes:", *rows])


def build_parser() -> argparse.ArgumentParser:
    parser = UsageExitParser(
        prog="mninorm-transform",
        description=textwrap.fill(
            "Map coordinates and images between a participant's T1w space and a template space "
            "with the transforms mninorm wrote. Coordinates are RAS+ mm (scanner/NIfTI/MNI "
            "convention). Run 'mninorm-transform COMMAND --help' for a command's options.",
            width=79,
        ),
        epilog=_exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the table's lines
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages")
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="fewer messages (-qq: errors only)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=UsageExitParser, metavar="COMMAND",
        title="commands",
    )  # fmt: skip

    points = commands.add_parser("points", help="map a table of coordinates (x, y, z columns)")
    _participant_options(points)
    points.add_argument("input", type=Path, help="TSV/CSV with columns x, y, z (or i, j, k)")
    points.add_argument("output", type=Path, help="TSV: the input columns plus the mapped ones")
    points.add_argument(
        "--voxels-in", type=Path, metavar="IMAGE",
        help="the input holds voxel indices i, j, k of IMAGE instead of x, y, z",
    )  # fmt: skip
    points.add_argument(
        "--voxels-out", type=Path, metavar="IMAGE",
        help="also write the mapped points' voxel indices in IMAGE (columns i_out, j_out, k_out)",
    )  # fmt: skip

    coords = commands.add_parser("coords", help="voxel indices <-> world coordinates of an image")
    coords.add_argument("image", type=Path, help="the NIfTI whose voxel grid is meant")
    coords.add_argument("input", type=Path, help="TSV/CSV with columns i, j, k (or x, y, z)")
    coords.add_argument("output", type=Path, help="TSV: the input columns plus the converted ones")
    coords.add_argument(
        "--to", choices=("world", "voxels"), required=True,
        help="world: i, j, k -> x, y, z (RAS+ mm); voxels: x, y, z -> i, j, k",
    )  # fmt: skip

    image = commands.add_parser("image", help="warp an image into a template or onto the T1w")
    _participant_options(image)
    image.add_argument("input", type=Path, help="a 3D NIfTI in the --from-space")
    image.add_argument("output", type=Path, help="the warped NIfTI")
    image.add_argument(
        "--res", type=int, default=None,
        help="TemplateFlow resolution index of the template grid (not mm; default: the grid the "
        "registration used: res-1, or the template's only grid, or the finest one available)",
    )  # fmt: skip
    image.add_argument(
        "--interpolation", default="auto",
        choices=("auto", "label", "nearest", "linear", "bspline", "lanczos"),
        help="auto (default): 'label' for integer label images (no new values), else 'linear'",
    )  # fmt: skip

    rois = commands.add_parser(
        "rois", help="volume (mm^3) of each atlas label in the participant's native space"
    )
    _participant_options(rois, spaces=False)
    rois.add_argument(
        "atlas", help="a label image in template space, or tf:<atlas>[:<desc>] (TemplateFlow dseg)"
    )
    rois.add_argument("output", type=Path, help="TSV: label, name, voxels, volume_mm3")
    rois.add_argument("--labels", type=Path, help="TSV/CSV with columns index and name")
    return parser


def _space(text: str):
    """T1w in any spelling (t1w, T1W) is the native space; a template identifier
    (``Template[:cohort-N]``, TemplateFlow's identifiers are case-sensitive) or a custom
    template's folder is parsed as --output-spaces reads it."""
    if is_native_space(text):
        return NATIVE_SPACE
    try:
        return parse_output_space(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


# The BIDS entities that pick one T1w's transforms: options, label prefix, what, required.
_ENTITY_OPTIONS = (
    (("--participant-label", "--participant_label"), "sub", "the participant", True),
    (("--session-label", "--session_label"), "ses", "the session (if there are several)", False),
    (("--run",), "run", "the run (if there are several)", False),
)


def _participant_options(parser, spaces: bool = True) -> None:
    parser.add_argument("output_dir", type=Path, help="an mninorm output folder")
    for flags, prefix, what, required in _ENTITY_OPTIONS:
        parser.add_argument(
            *flags, required=required, metavar="LABEL", help=f"{what}, with or without '{prefix}-'"
        )
    if spaces:
        for option, what in (("--from-space", "the input's"), ("--to-space", "the output's")):
            parser.add_argument(
                option, required=True, type=_space, metavar="SPACE",
                help=f"{what} space: T1w (the participant's native space; any case) or a "
                "template identifier such as MNI152NLin2009cAsym; one of the two must be T1w",
            )  # fmt: skip
    else:
        parser.add_argument(
            "--template", default=DEFAULT_TEMPLATE, type=_space,
            help=f"the template the atlas is in (default {DEFAULT_TEMPLATE})",
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    run = {"points": run_points, "coords": run_coords, "image": run_image, "rois": run_rois}
    return run_command(lambda: run[args.command](args), debug=args.debug)


# ---- subcommands ------------------------------------------------------------------------------


def run_points(args) -> None:
    from bids_app.transforms import mapping

    template, to = _template_and_target(args.from_space, args.to_space)
    transforms = _transforms(args, template)
    table = read_table(args.input)
    if args.voxels_in:
        points = mapping.voxels_to_world(_columns(table, "ijk", args.input), args.voxels_in)
        table["x"], table["y"], table["z"] = points.T
    else:
        points = _columns(table, "xyz", args.input)
    mapped = mapping.map_points(points, transforms, to)
    for axis, values in zip("xyz", mapped.T, strict=True):
        table[f"{axis}_{_space_name(args.to_space)}"] = np.round(values, 3)
    if args.voxels_out:
        ijk = mapping.world_to_voxels(mapped, args.voxels_out)
        for axis, values in zip("ijk", ijk.T, strict=True):
            table[f"{axis}_out"] = np.round(values, 3)
    write_table(table, args.output)
    log.info("%d point(s) %s -> %s: %s", len(table), args.from_space, args.to_space, args.output)


def run_coords(args) -> None:
    from bids_app.transforms import mapping

    table = read_table(args.input)
    if args.to == "world":
        values = mapping.voxels_to_world(_columns(table, "ijk", args.input), args.image)
        names = "xyz"
    else:
        values = mapping.world_to_voxels(_columns(table, "xyz", args.input), args.image)
        names = "ijk"
    for axis, column in zip(names, values.T, strict=True):
        table[axis] = np.round(column, 3)
    write_table(table, args.output)
    log.info("%d point(s) -> %s coordinates of %s: %s", len(table), args.to, args.image,
             args.output)  # fmt: skip


def run_image(args) -> None:
    from bids_app.outputs import derivatives
    from bids_app.transforms import mapping

    template, to = _template_and_target(args.from_space, args.to_space)
    transforms = _transforms(args, template)
    if to == mapping.NATIVE:
        reference = transforms.native_t1w
    else:
        from bids_app.templates import fetch_template

        space = OutputSpace(template.template, args.res, template.cohort, template.folder)
        reference = space.find_grid(fetch_template).t1w_path
    warped, used = mapping.warp_image(args.input, reference, transforms, to, args.interpolation)
    derivatives.write_nifti(warped, args.output)
    log.info("%s -> %s (%s interpolation): %s", args.from_space, args.to_space, used, args.output)


def run_rois(args) -> None:
    import pandas as pd

    from bids_app.outputs import derivatives
    from bids_app.transforms import mapping

    transforms = _transforms(args, args.template)
    atlas_path, labels_path = _atlas(args.atlas, args.template.template, args.labels)
    native_labels, _ = mapping.warp_image(
        atlas_path, transforms.native_t1w, transforms, mapping.NATIVE, "label"
    )
    names = _label_names(labels_path) if labels_path else {}
    volumes = mapping.label_volumes(native_labels)
    rows = [
        {"label": label, "name": names.get(label, ""), "voxels": voxels,
         "volume_mm3": round(volume, 2)}
        for label, (voxels, volume) in sorted(volumes.items())
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=["label", "name", "voxels", "volume_mm3"])
    with derivatives.atomic_path(args.output) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    log.info("%d label(s) measured in native space: %s", len(rows), args.output)


# ---- helpers ----------------------------------------------------------------------------------


def _template_and_target(source, target):
    from bids_app.transforms.mapping import NATIVE

    if (source == NATIVE) == (target == NATIVE):
        raise UsageError(
            f"--from-space {source} --to-space {target}: exactly one of them must be T1w "
            "(the participant's space), the other a template"
        )
    template = target if source == NATIVE else source
    return template, (NATIVE if target == NATIVE else template.key)


def _space_name(space) -> str:
    return space if space == NATIVE_SPACE else space.label


def _transforms(args, template: OutputSpace):
    from bids_app.transforms.mapping import find_transforms

    return find_transforms(
        args.output_dir, args.participant_label, template.key, args.session_label, args.run
    )


def read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        raise MissingInputError(f"{path} does not exist")
    separator = "," if path.suffix.lower() == ".csv" else "\t"
    table = pd.read_csv(path, sep=separator)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def write_table(table, path: Path) -> None:
    from bids_app.outputs.derivatives import atomic_path

    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def _columns(table, names: str, path: Path) -> np.ndarray:
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise UsageError(
            f"{path}: columns {', '.join(names)} are needed, {', '.join(missing)} missing "
            f"(it has: {', '.join(table.columns)})"
        )
    return table[list(names)].to_numpy(dtype=float)


def _atlas(atlas: str, template: str, labels: Path | None) -> tuple[Path, Path | None]:
    if not atlas.startswith("tf:"):
        return Path(atlas), labels
    name, _, desc = atlas[3:].partition(":")
    try:
        from templateflow import api

        query = {"atlas": name, "desc": desc or None, "resolution": 1}
        image = api.get(template, suffix="dseg", extension=".nii.gz", **query)
        table = api.get(template, suffix="dseg", extension=".tsv", atlas=name, desc=desc or None)
    except Exception as err:  # a download attempt without network
        raise MissingInputError(
            f"TemplateFlow atlas {atlas} of {template} is unavailable here ({err})"
        ) from err
    if not image or isinstance(image, list):
        raise MissingInputError(
            f"TemplateFlow has no single dseg image for {atlas} of {template} here "
            "(offline? pre-fetch it, or give the atlas file itself)"
        )
    return Path(image), labels or (Path(table) if table and not isinstance(table, list) else None)


def _label_names(path: Path) -> dict[int, str]:
    table = read_table(path)
    if not {"index", "name"} <= set(table.columns):
        raise UsageError(f"{path}: a label table needs columns index and name")
    return {int(i): str(n) for i, n in zip(table["index"], table["name"], strict=True)}


if __name__ == "__main__":
    sys.exit(main())
