"""The ``mninorm`` command: the BIDS Apps command line. Errors become exit codes (see
``errors.ExitCode``) in ``console.run_command``, as for ``mninorm-transform``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from bids_app import __version__
from bids_app.console import open_console, run_command
from bids_app.errors import ExitCode, MninormError, UsageError
from bids_app.group.model import DEFAULT_PERMUTATIONS, DEFAULT_SMOOTHING_FWHM
from bids_app.logs import LIBRARY_LOGGERS, Verbosity, quiet_libraries
from bids_app.outputs.provenance import RunInfo, start_run
from bids_app.registration.registry import DEFAULT_ENGINE, ENGINES, EngineFactory, get_engine
from bids_app.settings import (
    DEFAULT_BRAIN_TEMPLATE,
    DEFAULT_SEED,
    PRESETS,
    SKULL_STRIP_MODES,
    Settings,
    check_folders,
    set_thread_environment,
)
from bids_app.spaces import DEFAULT_SPACE, parse_output_spaces

log = logging.getLogger("bids_app")

# What Ctrl-C or SIGTERM ends the participant level with (exit code 130)
INTERRUPTED = "interrupted: the participants not finished have no complete outputs; run again"


class UsageExitParser(argparse.ArgumentParser):
    """Usage errors exit with ExitCode.USAGE (64), as the BIDS execution spec proposes."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageExitParser(
        prog="mninorm",
        description="Normalise every T1w of a BIDS dataset to MNI templates (BIDS App).",
        epilog=(
            "Exit codes: 0 success; 1 a participant failed (others still ran); 16 invalid BIDS "
            "input; 17 unknown analysis level; 18 labels or filters matched nothing; 64 usage "
            "error; 65 --group-by gave no group comparison (the other group outputs are written); "
            "66 missing input (group level: no participant results in output_dir); 69 template "
            "unavailable offline; 130 interrupted (Ctrl-C or SIGTERM)."
        ),
    )
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level", help="'participant' (per participant) or 'group' (across participants)"
    )
    parser.add_argument("--version", action="version", version=f"mninorm {__version__}")

    select = parser.add_argument_group("what to process")
    select.add_argument(
        "--participant-label", "--participant_label", nargs="+", default=[], metavar="LABEL",
        help="participants to process, with or without 'sub-' (default: all)",
    )  # fmt: skip
    select.add_argument(
        "--session-label", "--session_label", nargs="+", default=[], metavar="LABEL",
        help="sessions to process, with or without 'ses-' (default: all)",
    )  # fmt: skip
    select.add_argument(
        "--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
        help='JSON of pybids entity filters for the T1w query, e.g. {"t1w": {"acquisition": '
        '"mprage", "reconstruction": null}} (null = entity absent)',
    )  # fmt: skip
    select.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", action="store_true",
        help="do not validate the input dataset with pybids",
    )  # fmt: skip
    select.add_argument(
        "--rerun", action="store_true",
        help="redo every selected T1w; by default a T1w whose outputs are complete and whose run "
        "record shows the same input file (content hash) and the same output settings is "
        "skipped",
    )  # fmt: skip
    select.add_argument(
        "--bids-database-dir", type=Path, metavar="DIR",
        help="save pybids' index of the selected participants in DIR and reuse it in later "
        "calls with the same selection (SLURM array tasks, re-runs); remove DIR when the "
        "dataset changes",
    )  # fmt: skip
    select.add_argument(
        "--reports-only", action="store_true",
        help="do not process: rebuild the QC tables, figures and HTML reports of the selected "
        "participants from what is already in output_dir",
    )  # fmt: skip

    method = parser.add_argument_group("normalisation")
    method.add_argument(
        "--output-spaces", nargs="+", default=[DEFAULT_SPACE], metavar="SPACE",
        help="TemplateFlow templates, each optionally with a cohort and a resolution index: "
        "MNI152NLin2009cAsym, MNI152NLin6Asym:res-2, MNI305, MNIPediatricAsym:cohort-2 (res-N is "
        "TemplateFlow's index, not mm; without it, the registration grid: res-1, or the "
        f"template's single grid, or the finest one available; default {DEFAULT_SPACE}), or a "
        "custom template's folder path/to/tpl-<Name> (TemplateFlow's layout: a T1w and a "
        "desc-brain_mask). T1w (fMRIPrep's name for the native space) is accepted and adds "
        "nothing: the native outputs are always written",
    )  # fmt: skip
    method.add_argument(
        "--preset", choices=PRESETS, default="precise",
        help="registration settings: 'precise' (default) or 'fast' (quick looks, tests)",
    )  # fmt: skip
    method.add_argument(
        "--engine", choices=ENGINES, default=DEFAULT_ENGINE,
        help="registration engine: 'greedy' (default; PICSL Greedy, diffeomorphic) or 'ants' "
        "(ANTsPy antsRegistration, SyN; several times slower for no better accuracy on the "
        "benchmark); both write the same transforms, Jacobians and file names",
    )  # fmt: skip
    method.add_argument(
        "--skull-strip", choices=SKULL_STRIP_MODES, default="auto",
        help="auto (default): skip brain extraction for images that are already skull-stripped; "
        "force: always extract; skip: never (the input is a brain image)",
    )  # fmt: skip
    method.add_argument(
        "--brain-template", metavar="TEMPLATE",
        help=f"TemplateFlow template whose head and brain mask brain extraction uses (default "
        f"{DEFAULT_BRAIN_TEMPLATE}, as sMRIPrep; when it is not installed, the first output "
        "template's head is used and the run record says so)",
    )  # fmt: skip
    method.add_argument(
        "--no-fallback", action="store_true",
        help="make one brain-extraction attempt only; by default a T1w whose mask fails the "
        "checks (implausible affine, volume, a missed lobe, skull included) gets further "
        "attempts: the next start, another template, another engine",
    )  # fmt: skip
    method.add_argument(
        "--random-seed", type=int, default=DEFAULT_SEED,
        help=f"seed for ANTs' sampling and the group level's permutations (default {DEFAULT_SEED}; "
        "recorded in every sidecar)",
    )  # fmt: skip

    run = parser.add_argument_group("resources")
    run.add_argument(
        "-w", "--work-dir", type=Path,
        help="keep intermediate files here (default: a temporary folder, removed at the end)",
    )  # fmt: skip
    run.add_argument(
        "--nthreads", "--n_cpus", type=int, default=len(os.sched_getaffinity(0)),
        help="threads for the whole run (default: the CPUs this process may use)",
    )  # fmt: skip
    run.add_argument(
        "--omp-nthreads", type=int,
        help="threads for one participant (default: --nthreads, up to 8); participants run in "
        "parallel when --nthreads allows more than one",
    )  # fmt: skip
    run.add_argument(
        "--mem-mb", "--mem_mb", type=int, metavar="MB",
        help="memory (MiB) the participants running at once may use together, as fMRIPrep's "
        "--mem: fewer run at once if their estimated peaks would exceed it, and a participant "
        "that alone would exceed it fails with that reason instead of being killed (default: "
        "no limit; the threads decide)",
    )  # fmt: skip

    group = parser.add_argument_group("group level")
    group.add_argument(
        "--group-by", metavar="COLUMN",
        help="group level: compare the log-Jacobian maps voxel-wise between the groups of this "
        "participants.tsv column (read from bids_dir): a t map for two groups, an F map for "
        "more, a slope for a numeric column; with the model options below (smoothing, "
        "covariates, permutations); participants with n/a are left out",
    )  # fmt: skip
    group.add_argument(
        "--covariates", nargs="+", metavar="COLUMN", default=[],
        help="group level: nuisance covariates of the model, participants.tsv columns (numbers "
        "as they are, text coded one indicator per level) or 'brain_volume' (the brain volume "
        "mninorm measured); participants with n/a in any are left out",
    )  # fmt: skip
    group.add_argument(
        "--smoothing-fwhm", type=float, default=DEFAULT_SMOOTHING_FWHM, metavar="MM",
        help="group level: Gaussian smoothing of the log-Jacobian maps inside the brain before "
        f"the model (default {DEFAULT_SMOOTHING_FWHM:g} mm; 0: none)",
    )  # fmt: skip
    group.add_argument(
        "--n-permutations", type=int, metavar="N",
        help="group level: permutations for family-wise error correction (default "
        f"{DEFAULT_PERMUTATIONS}, or 0 with a warning when joblib, the 'stats' extra, is not "
        "installed; seeded by --random-seed; 0: parametric maps only)",
    )  # fmt: skip
    group.add_argument(
        "--no-tfce", action="store_true",
        help="group level: voxel-wise FWE correction only, without threshold-free cluster "
        "enhancement (TFCE is on by default whenever there are permutations)",
    )  # fmt: skip
    group.add_argument(
        "--atlas", metavar="FILE[:LABELS] or atlas-NAME[_desc-LABEL]",
        help="group level: a template-space atlas image (and its labels, a TSV with index and "
        "name, or 'INDEX NAME' lines) naming the peaks of the results table; or a TemplateFlow "
        "atlas id in BIDS-entity form (e.g. atlas-Schaefer2018_desc-400Parcels7Networks), "
        "taken in each group space's template (its dseg image on the nearest grid, and its "
        "dseg.tsv)",
    )  # fmt: skip

    run.add_argument(
        "--dask-scheduler", metavar="ADDRESS",
        help="send the participants, one task each, to the running Dask cluster whose scheduler "
        "is at ADDRESS (e.g. tcp://10.0.0.5:8786); each runs in its own process on a worker. "
        "Needs the 'dask' extra: pip install 'mninorm[dask]'",
    )  # fmt: skip

    output = parser.add_argument_group("messages")
    output.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more messages: -v what each T1w's steps found; -vv debugging. Whatever the level, "
        "each T1w's messages (and Greedy's and ANTs' output) are in "
        "sub-<label>/log/*_desc-mninorm_log.txt",
    )  # fmt: skip
    output.add_argument(
        "-q", "--quiet", action="count", default=0,
        help="fewer messages: -q warnings and errors only (no progress), -qq errors only",
    )  # fmt: skip
    output.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    output.add_argument(
        "--in-process", action="store_true",
        help="run participants in this process instead of one process each (debugging)",
    )  # fmt: skip
    return parser


def settings_from_args(args: argparse.Namespace, engines: EngineFactory = get_engine) -> Settings:
    from bids_app.participant.discovery import load_filter_file

    if args.analysis_level not in ("participant", "group"):
        raise _UnknownLevel(args.analysis_level)
    if args.nthreads < 1 or (args.omp_nthreads is not None and args.omp_nthreads < 1):
        raise UsageError("--nthreads and --omp-nthreads must be at least 1")
    if args.mem_mb is not None and args.mem_mb < 1:
        raise UsageError(f"--mem-mb must be at least 1 (MiB), not {args.mem_mb}")
    if args.random_seed < 0:
        raise UsageError(f"--random-seed must be 0 or more, not {args.random_seed}")
    if args.smoothing_fwhm < 0 or (args.n_permutations or 0) < 0:
        raise UsageError("--smoothing-fwhm and --n-permutations must be 0 or more")
    if args.analysis_level != "group" or args.bids_dir.exists():
        # The group level reads output_dir (and participants.tsv only for --group-by): it may run
        # where the input dataset is not.
        check_folders(args.bids_dir, args.output_dir, args.work_dir)
    spaces = parse_output_spaces(args.output_spaces)
    omp = min(args.omp_nthreads or min(args.nthreads, 8), args.nthreads)
    group_level = args.analysis_level == "group"
    if args.group_by and not group_level:
        log.warning("--group-by is used only at the group level: ignored")
    return Settings(
        bids_dir=args.bids_dir.resolve(),
        output_dir=args.output_dir.resolve(),
        analysis_level=args.analysis_level,
        participant_labels=tuple(args.participant_label),
        session_labels=tuple(args.session_label),
        bids_filters=load_filter_file(args.bids_filter_file),
        skip_bids_validation=args.skip_bids_validation,
        output_spaces=spaces,
        work_dir=args.work_dir.resolve() if args.work_dir else None,
        nthreads=args.nthreads,
        omp_nthreads=omp,
        random_seed=args.random_seed,
        skull_strip=args.skull_strip,
        preset=args.preset,
        engine=args.engine,
        brain_template=args.brain_template or DEFAULT_BRAIN_TEMPLATE,
        brain_template_required=args.brain_template is not None,
        fallback=not args.no_fallback,
        in_process=args.in_process,
        mem_mb=args.mem_mb,
        reports_only=args.reports_only,
        group_by=args.group_by if group_level else None,
        rerun=args.rerun,
        bids_database_dir=args.bids_database_dir.resolve() if args.bids_database_dir else None,
        dask_scheduler=args.dask_scheduler,
        engines=engines,
    )


class _UnknownLevel(MninormError):
    exit_code = ExitCode.UNKNOWN_LEVEL

    def __init__(self, level: str):
        super().__init__(f"unknown analysis level {level!r}: use 'participant' or 'group'")


def main(argv: list[str] | None = None, *, engines: EngineFactory = get_engine) -> int:
    """The command; ``engines`` gives the registration engines by name (tests pass a fake's)."""
    # The invocation, once, here: its identifier and start are the same for every participant.
    run = start_run(sys.argv if argv is None else ["mninorm", *argv])
    parser = build_parser()
    args = parser.parse_args(argv)
    verbosity = Verbosity(args.verbose - args.quiet)
    with console_logging(verbosity), _sigterm_interrupts():
        return run_command(
            lambda: _run(args, run, verbosity, engines), debug=args.debug, interrupted=INTERRUPTED
        )


def _run(
    args: argparse.Namespace, run: RunInfo, verbosity: Verbosity, engines: EngineFactory
) -> int:
    settings = settings_from_args(args, engines)
    set_thread_environment(settings.omp_nthreads)
    if settings.analysis_level == "group":
        return run_group(settings, model_spec_from_args(args, settings))
    if settings.reports_only:
        return run_reports_only(settings)
    return run_participant_level(settings, run, verbosity)


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's or ``docker stop``'s) as Ctrl-C: the run stops its participants'
    processes and removes its temporary folder instead of dying on the spot. Only where a signal
    handler may be set (the main thread: tests call ``main`` from others)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_participant_level(settings: Settings, run: RunInfo, verbosity: Verbosity) -> int:
    from bids_app.outputs import derivatives
    from bids_app.participant.discovery import collect_t1w
    from bids_app.participant.pipeline import (
        SKIPPED,
        T1wOutcome,
        WorkFolder,
        resolve_templates,
        run_participants,
        write_report,
    )
    from bids_app.participant.resume import split_done

    selection = collect_t1w(
        settings.bids_dir,
        settings.participant_labels,
        settings.session_labels,
        settings.bids_filters,
        validate=not settings.skip_bids_validation,
        database_dir=settings.bids_database_dir,
    )
    for subject in selection.subjects_without_t1w:
        log.error("sub-%s: no T1w image found (anat/*_T1w.nii[.gz]); skipped", subject)
    templates = resolve_templates(settings)
    try:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        derivatives.write_dataset_files(settings.output_dir, settings.bids_dir)
    except OSError as err:  # not writable, not a folder, disk full: before any participant
        raise MninormError(
            f"cannot write in output_dir {settings.output_dir} ({err}); choose a folder you can "
            "write to, or fix its permissions or free space, then run again"
        ) from err
    count = sum(len(t1ws) for t1ws in selection.t1w_by_subject.values())
    log.info(
        "%d T1w image(s) of %d participant(s); spaces: %s; preset %s; %d thread(s) each",
        count, len(selection.t1w_by_subject), ", ".join(map(str, settings.output_spaces)),
        settings.preset, settings.omp_nthreads,
    )  # fmt: skip
    todo, skipped = split_done(selection.t1w_by_subject, settings)
    outcomes = [T1wOutcome(t1w.relpath, t1w.subject, True, SKIPPED) for t1w, _ in skipped]
    for subject in {t1w.subject for t1w, _ in skipped} - set(todo):
        if not derivatives.report_path(settings.output_dir, subject).is_file():
            write_report(subject, settings)  # nothing changed, but its report is missing
    if todo:
        with WorkFolder(settings.work_dir) as work_dir:
            outcomes += run_participants(
                todo, settings, templates, work_dir, run, verbosity, _remote_executor(settings)
            )
    failed = [o for o in outcomes if not o.ok]
    for outcome in outcomes:
        if outcome.ok:
            status = outcome.message or f"ok in {outcome.seconds:.0f} s"
        else:
            status = f"FAILED: {outcome.message}"
        log.info("%s: %s", outcome.source, status)
    if failed or selection.subjects_without_t1w:
        return int(ExitCode.PARTICIPANT_FAILED)
    return int(ExitCode.OK)


def _remote_executor(settings: Settings):
    """``--dask-scheduler``: the participants go to that cluster instead of local processes."""
    if not settings.dask_scheduler:
        return None
    from bids_app.participant.cluster import run_on_cluster

    return run_on_cluster


def run_reports_only(settings: Settings) -> int:
    from bids_app.reports.participant import rebuild_reports

    failed = rebuild_reports(settings.output_dir, settings.participant_labels)
    return int(ExitCode.PARTICIPANT_FAILED if failed else ExitCode.OK)


def model_spec_from_args(args: argparse.Namespace, settings: Settings):
    from bids_app.group.model import ModelSpec

    permutations = args.n_permutations
    if permutations is None:
        permutations = DEFAULT_PERMUTATIONS
        if args.group_by and importlib.util.find_spec("joblib") is None:
            log.warning("joblib (the 'stats' extra) is not installed: no permutations, the "
                        "group statistics are parametric and uncorrected; pip install "
                        "'mninorm[stats]' for FWE-corrected maps")  # fmt: skip
            permutations = 0
    return ModelSpec(
        covariates=tuple(args.covariates), smoothing_fwhm=args.smoothing_fwhm,
        n_permutations=permutations, tfce=not args.no_tfce and permutations > 0,
        seed=settings.random_seed,
        atlas=args.atlas, n_jobs=settings.nthreads,
    )  # fmt: skip


def run_group(settings: Settings, model=None) -> int:
    from bids_app.group import GroupSettings
    from bids_app.group import run_group as run

    outcome = run(
        GroupSettings(
            output_dir=settings.output_dir,
            bids_dir=settings.bids_dir,  # may be absent: only --group-by needs it
            group_by=settings.group_by,
            model=model,
            participant_labels=settings.participant_labels,
            session_labels=settings.session_labels,
            workers=settings.nthreads,
            dask_scheduler=settings.dask_scheduler,
        )
    )
    if len(outcome.spaces_without_maps) == len(outcome.spaces):
        return int(ExitCode.PARTICIPANT_FAILED)  # no map at all: every T1w failed or is unusable
    if outcome.design_problems:
        return int(ExitCode.GROUP_BY_UNUSABLE)
    return int(ExitCode.OK)


@contextmanager
def console_logging(verbosity: Verbosity):
    """While ``mninorm`` runs: the console (``console.ConsoleHandler``) is the root logger's one
    handler, other packages' loggers are quietened, warnings go through logging. The root logger's
    handlers and level come back afterwards (tests call ``main`` in their process)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    console = open_console(verbosity)
    root.handlers[:] = [console]
    root.setLevel(verbosity.record_level)
    quiet_libraries(verbosity)
    logging.captureWarnings(True)
    try:
        yield console
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        console.close()


def configure_logging(verbosity: int) -> None:
    """Plain lines on stderr (``mninorm-transform``)."""
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR
    )
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True
    )
    logging.captureWarnings(True)
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


if __name__ == "__main__":
    sys.exit(main())
