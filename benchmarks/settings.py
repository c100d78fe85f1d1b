"""The settings compared: a table of names -> how to run each one as a child process.

Every setting gets the same fixed image, fixed brain mask and moving image of a case, the same
seed and the same thread count, and must leave a list of transforms (ANTs order, fixed -> moving
points, readable by ``ants.apply_transforms``) in ``<run>/transforms.json``:

* mninorm settings run the ``mninorm`` command itself on a one-participant BIDS dataset, with the
  case's fixed image exposed as a private TemplateFlow template ``Bench<case>``; its
  ``from-T1w_to-Bench<case>_mode-image_xfm.h5`` is the answer;
* the others run ``python -m benchmarks.child <spec.json>`` (``child.py``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.cases import Case

REFERENCE = "ants-syn-s"
THREAD_VARIABLES = (
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


@dataclass(frozen=True)
class Setting:
    name: str
    runner: str  # "mninorm", "ants", "smriprep", "greedy", "oracle", "identity"
    what: str  # for the report
    options: tuple[tuple[str, str], ...] = ()
    groups: tuple[str, ...] = ("full",)  # "quick", "full", "diagnostic"
    timeout_min_2mm: float = 30.0  # scaled by (2 / grid_mm)^3 on finer grids
    # wall on ds01-2mm, 2 threads (the full run of commit 2d78dc7; ~: DOMAIN.md)
    estimate_2mm: str = ""

    @property
    def option(self) -> dict[str, str]:
        return dict(self.options)

    def timeout_s(self, grid_mm: float) -> float:
        return 60.0 * self.timeout_min_2mm * max(1.0, (2.0 / grid_mm) ** 3)


_QUICK = ("quick", "full")

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(REFERENCE, "ants", "ANTsPy antsRegistrationSyN[s] (the reference)",
                (("type_of_transform", "antsRegistrationSyN[s]"),), _QUICK, 45, "110 s"),
        Setting("ants-synquick-s", "ants", "ANTsPy antsRegistrationSyNQuick[s]",
                (("type_of_transform", "antsRegistrationSyNQuick[s]"),), _QUICK, 20, "13 s"),
        Setting("ants-syn", "ants", "ANTsPy SyN (its defaults)",
                (("type_of_transform", "SyN"),), _QUICK, 20, "12 s"),
        Setting("smriprep-precise000", "smriprep",
                "sMRIPrep precise_000 (antsRegistration re-implemented)", (), _QUICK, 60,
                "172 s"),
        Setting("greedy", "greedy", "Greedy (affine NMI, then NCC 2x2x2, 100x50x10)", (), _QUICK,
                20, "7 s"),
        Setting("mninorm-precise", "mninorm",
                "mninorm --preset precise (whole command, default engine: Greedy)",
                (("preset", "precise"),), _QUICK, 30, "19 s"),
        Setting("mninorm-fast", "mninorm",
                "mninorm --preset fast (whole command, default engine: Greedy)",
                (("preset", "fast"),), _QUICK, 15, "16 s"),
        Setting("mninorm-precise-ants", "mninorm", "mninorm --preset precise --engine ants",
                (("preset", "precise"), ("engine", "ants")), _QUICK, 30, "136 s"),
        Setting("mninorm-fast-ants", "mninorm", "mninorm --preset fast --engine ants",
                (("preset", "fast"), ("engine", "ants")), _QUICK, 15, "41 s"),
        Setting("oracle", "oracle", "the true transform (checks the scorer: error ~ 0)", (),
                ("diagnostic",), 5, "s"),
        Setting("identity", "identity", "no registration (error = the case's displacement)", (),
                ("diagnostic",), 5, "s"),
    )
}  # fmt: skip

_MNINORM_NAME = re.compile(r"^mninorm-(?P<preset>[a-z0-9]+)(?:-(?P<engine>[a-z0-9]+))?$")


def get_setting(name: str) -> Setting:
    """A setting of the table, or any ``mninorm-<preset>[-<engine>]``."""
    if name in SETTINGS:
        return SETTINGS[name]
    match = _MNINORM_NAME.match(name)
    if match:
        options = (("preset", match["preset"]),)
        if match["engine"]:
            options += (("engine", match["engine"]),)
        flags = " ".join(f"--{k} {v}" for k, v in options)
        return Setting(name, "mninorm", f"mninorm {flags}", options, ("full",), 30, "?")
    raise ValueError(
        f"unknown setting {name!r}; known: {', '.join(SETTINGS)} (or mninorm-<preset>[-<engine>])"
    )


def select_settings(group: str, names: list[str] | None = None) -> list[Setting]:
    chosen = [get_setting(n) for n in names] if names else [
        s for s in SETTINGS.values() if group in s.groups
    ]  # fmt: skip
    # The reference first: every ratio needs it, and a run cut short still has it.
    return sorted(chosen, key=lambda s: s.name != REFERENCE)


# ---- how a setting runs -----------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: dict
    skip_reason: str = ""  # non-empty: do not run (e.g. the installed mninorm lacks an option)


REPOSITORY = Path(__file__).resolve().parents[1]


def thread_environment(threads: int) -> dict:
    env = dict(os.environ)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    # `python -m benchmarks.child` must find this package from any working folder
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    return env


def build_command(setting: Setting, case: Case, run_dir: Path, seed: int, threads: int) -> Command:
    env = thread_environment(threads)
    if setting.runner == "mninorm":
        return _mninorm_command(setting, case, run_dir, seed, threads, env)
    if setting.runner in ("oracle", "identity") and case.kind != "synthetic":
        return Command((), env, f"{setting.runner} needs a known transform (synthetic case)")
    spec = {
        "runner": setting.runner,
        "options": setting.option,
        "fixed": str(case.fixed),
        "fixed_mask": str(case.fixed_mask),
        "moving": str(case.moving),
        "case_folder": str(case.folder),
        "out_dir": str(run_dir),
        "seed": seed,
        "threads": threads,
    }
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    return Command((sys.executable, "-m", "benchmarks.child", str(spec_path)), env)


def mninorm_executable() -> list[str]:
    script = Path(sys.executable).with_name("mninorm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bids_app"]


@functools.cache
def mninorm_help() -> str:
    done = subprocess.run([*mninorm_executable(), "--help"], capture_output=True, text=True)
    return done.stdout


def _mninorm_command(setting, case: Case, run_dir: Path, seed, threads, env) -> Command:
    options = setting.option
    if "engine" in options:
        offered = re.search(r"--engine \{([^}]*)\}", mninorm_help())
        if offered is None:
            return Command((), env, "the installed mninorm has no --engine option")
        if options["engine"] not in offered.group(1).split(","):
            return Command((), env, f"the installed mninorm's --engine has no {options['engine']}")
    label = case.definition.label
    bids = run_dir / "bids"
    out = run_dir / "out"
    for folder in (bids, out):
        if folder.exists():
            shutil.rmtree(folder)
    anat = bids / f"sub-{label}" / "anat"
    anat.mkdir(parents=True)
    shutil.copyfile(case.moving, anat / f"sub-{label}_T1w.nii.gz")
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": f"benchmark case {case.name}", "BIDSVersion": "1.9.0"})
    )
    # inside the case's folder: a rebuilt case cannot leave a stale template behind
    env["TEMPLATEFLOW_HOME"] = str(private_templateflow(case, case.folder / "templateflow"))
    env["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    argv = [
        *mninorm_executable(), str(bids), str(out), "participant",
        "--output-spaces", template_name(case), "--preset", options["preset"],
        "--random-seed", str(seed), "--nthreads", str(threads), "--omp-nthreads", str(threads),
        "--skip-bids-validation",
    ]  # fmt: skip
    if "engine" in options:
        argv += ["--engine", options["engine"]]
    return Command(tuple(argv), env)


def template_name(case: Case) -> str:
    return f"Bench{case.definition.label}"


def private_templateflow(case: Case, home: Path) -> Path:
    """A TemplateFlow folder whose one template is the case's fixed image and brain mask."""
    name = template_name(case)
    folder = home / f"tpl-{name}"
    if not (folder / "template_description.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(case.fixed, folder / f"tpl-{name}_res-01_T1w.nii.gz")
        shutil.copyfile(case.fixed_mask, folder / f"tpl-{name}_res-01_desc-brain_mask.nii.gz")
        description = {
            "Identifier": name,
            "Name": f"mninorm benchmark case {case.name}: its fixed image",
            "TemplateFlowVersion": "benchmark",
        }
        (folder / "template_description.json").write_text(json.dumps(description))
    return home


def mninorm_transforms(case: Case, run_dir: Path) -> list[str]:
    """The forward transform mninorm wrote (template -> participant points)."""
    label = case.definition.label
    path = (
        run_dir / "out" / f"sub-{label}" / "anat"
        / f"sub-{label}_from-T1w_to-{template_name(case)}_mode-image_xfm.h5"
    )  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"mninorm wrote no {path.name} (see {run_dir / 'log.txt'})")
    return [str(path)]
