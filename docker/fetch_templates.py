#!/usr/bin/env python3
"""Gather the TemplateFlow files mninorm uses by default into one folder (an image build step).

The destination becomes the image's read-only ``TEMPLATEFLOW_HOME``. Only real files end up there:
never the 0-byte placeholders of TemplateFlow's skeleton, which the client would later try (and, on
a compute node without internet, fail) to download.

Two sources:

* ``--local DIR``: an existing TemplateFlow home (air-gapped builds). Files are copied, nothing is
  downloaded; the files DIR does not hold are listed and skipped.
* otherwise TemplateFlow's servers, through the templateflow client, into a scratch home.

Exit status: 0 when every template has at least one T1w image with its brain mask, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Files that describe a template rather than an image of it.
TEMPLATE_EXTRAS = ("template_description.json", "LICENSE")


@dataclass(frozen=True)
class Wanted:
    """One image file of one template, as TemplateFlow names and queries it."""

    template: str
    resolution: int
    suffix: str
    desc: str | None

    @property
    def name(self) -> str:
        desc = f"_desc-{self.desc}" if self.desc else ""
        return f"tpl-{self.template}_res-{self.resolution:02d}{desc}_{self.suffix}.nii.gz"


def list_wanted(templates: Iterable[str], resolutions: Iterable[int]) -> Iterator[Wanted]:
    for template in templates:
        for resolution in resolutions:
            yield Wanted(template, resolution, "T1w", None)
            yield Wanted(template, resolution, "mask", "brain")


def is_real(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def collect_local(source: Path, wanted: list[Wanted]) -> dict[Path, Path]:
    """Map each file to copy (relative to the destination) to where it is under ``source``."""
    found: dict[Path, Path] = {}
    for item in wanted:
        rel = Path(f"tpl-{item.template}") / item.name
        if is_real(source / rel):
            found[rel] = source / rel
    return found


def collect_remote(wanted: list[Wanted], scratch: Path) -> dict[Path, Path]:
    """Download through the templateflow client into ``scratch``, used as its home."""
    os.environ["TEMPLATEFLOW_HOME"] = str(scratch)
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    from templateflow import api  # imported late: it reads TEMPLATEFLOW_HOME at import

    found: dict[Path, Path] = {}
    for item in wanted:
        # [] when the template has no such file (e.g. a resolution it does not come in);
        # a RuntimeError when the file exists but cannot be downloaded: that stops the build.
        result = api.get(
            item.template,
            resolution=item.resolution,
            suffix=item.suffix,
            desc=item.desc,
            extension=".nii.gz",
        )
        paths = result if isinstance(result, list) else [result]
        for path in map(Path, paths):
            if is_real(path):
                found[path.relative_to(scratch)] = path
    return found


def add_extras(source: Path, templates: Iterable[str], found: dict[Path, Path]) -> None:
    for template in templates:
        for extra in TEMPLATE_EXTRAS:
            rel = Path(f"tpl-{template}") / extra
            if is_real(source / rel):
                found[rel] = source / rel


def install(found: dict[Path, Path], dest: Path) -> None:
    """Copy into ``dest``, readable by every uid the container may run as."""
    for rel, src in sorted(found.items()):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        target.chmod(0o644)
    for folder in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        folder.chmod(0o755)


def report(wanted: list[Wanted], found: dict[Path, Path]) -> int:
    names = {rel.name for rel in found}
    for rel in sorted(found):
        print(f"  {rel}  ({found[rel].stat().st_size} bytes)")
    missing = [item.name for item in wanted if item.name not in names]
    for name in missing:
        print(f"  not available, skipped: {name}")
    status = 0
    for template in sorted({item.template for item in wanted}):
        usable = [
            res
            for res in sorted({item.resolution for item in wanted})
            if all(
                item.name in names
                for item in wanted
                if (item.template, item.resolution) == (template, res)
            )
        ]
        if usable:
            print(f"  {template}: complete at res-{', res-'.join(map(str, usable))}")
        else:
            print(
                f"error: no resolution of {template} has both its T1w and its brain mask",
                file=sys.stderr,
            )
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="the folder that becomes TEMPLATEFLOW_HOME")
    parser.add_argument("--templates", nargs="+", required=True, metavar="NAME")
    parser.add_argument(
        "--resolutions",
        nargs="+",
        type=int,
        default=[1, 2],
        metavar="N",
        help="TemplateFlow resolution indices (res-N), not millimetres",
    )
    parser.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="take the files from this TemplateFlow home instead of downloading",
    )
    args = parser.parse_args(argv)

    wanted = list(list_wanted(args.templates, args.resolutions))
    if args.local is not None:
        print(f"TemplateFlow files from the local folder {args.local} (no download):")
        found = collect_local(args.local, wanted)
        add_extras(args.local, args.templates, found)
        status = report(wanted, found)
        install(found, args.dest)
        return status

    print("TemplateFlow files from TemplateFlow's servers:")
    with tempfile.TemporaryDirectory(prefix="templateflow-") as scratch:
        found = collect_remote(wanted, Path(scratch))
        add_extras(Path(scratch), args.templates, found)
        status = report(wanted, found)
        install(found, args.dest)
    return status


if __name__ == "__main__":
    sys.exit(main())
