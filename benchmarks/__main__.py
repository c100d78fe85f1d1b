"""``python -m benchmarks {run,report,list}``: the benchmark's command line (see docs/benchmark.md).

python -m benchmarks run --quick --out bench_results/      # < 15 min on 2 cores
python -m benchmarks run --out bench_results/               # the full run (hours)
python -m benchmarks run --cases ds01-2mm --settings greedy,mninorm-fast --force
python -m benchmarks report --out bench_results/            # rebuild results.md from the CSV
python -m benchmarks heads --out bench_heads/               # whole-head brain extraction (~1 h)
python -m benchmarks lesion --out bench_lesion/             # lesions, with and without mask
python -m benchmarks stats --out bench_stats/               # group statistics (synthetic cohorts)
python -m benchmarks scale --out bench_scale/               # indexing and resume at scale (~5 min)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from benchmarks.settings import THREAD_VARIABLES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run cases x settings (resumable), then write the report")
    run.add_argument("--out", type=Path, default=Path("bench_results"), help="results folder")
    run.add_argument(
        "--quick", action="store_true",
        help="the quick subset (one synthetic 2 mm case, every setting; under 15 min)",
    )  # fmt: skip
    run.add_argument("--cases", type=_names, help="comma-separated case names (see `list`)")
    run.add_argument("--settings", type=_names, help="comma-separated setting names")
    run.add_argument("--force", action="store_true", help="re-run rows already in the CSV")
    run.add_argument("--threads", type=int, default=2, help="threads of every setting (2)")
    run.add_argument("--seed", type=int, default=None, help="random seed of every setting")
    run.add_argument(
        "--timeout-scale", type=float, default=1.0,
        help="multiply every setting's time limit (slow or busy machines)",
    )  # fmt: skip
    run.add_argument("-v", "--verbose", action="store_true")
    rebuild = commands.add_parser("report", help="rebuild results.md from results.csv")
    rebuild.add_argument("--out", type=Path, default=Path("bench_results"))
    commands.add_parser("list", help="the cases and settings, with their groups and estimates")
    heads = commands.add_parser(
        "heads", help="whole-head robustness of brain extraction (benchmarks/heads.py)"
    )
    heads.add_argument("--out", type=Path, default=Path("bench_heads"), help="results folder")
    heads.add_argument("--cases", type=_names, help="comma-separated case names (all by default)")
    heads.add_argument(
        "--settings", type=_names, default=["default"],
        help="comma-separated: default, no-fallback, mni-head (default: default)",
    )  # fmt: skip
    heads.add_argument("--threads", type=int, default=2, help="threads of every run (2)")
    heads.add_argument("--force", action="store_true", help="re-run rows already in the CSV")
    heads.add_argument(
        "--report-only", action="store_true", help="rebuild heads.md from heads.csv, run nothing"
    )
    heads.add_argument("-v", "--verbose", action="store_true")
    lesion = commands.add_parser(
        "lesion", help="synthetic lesions registered with and without their mask (lesion.py)"
    )
    lesion.add_argument("--out", type=Path, default=Path("bench_lesion"), help="results folder")
    lesion.add_argument("--cases", type=_names, help="comma-separated lesion cases (all but tiny)")
    lesion.add_argument("--preset", default="precise", help="mninorm --preset (default: precise)")
    lesion.add_argument("--threads", type=int, default=2, help="threads of every run (2)")
    lesion.add_argument("--seed", type=int, default=None, help="random seed of every run")
    lesion.add_argument("--force", action="store_true", help="re-run rows already in the CSV")
    lesion.add_argument("-v", "--verbose", action="store_true")
    stats = commands.add_parser(
        "stats", help="group statistics on synthetic cohorts (benchmarks/group_stats.py)"
    )
    stats.add_argument("--out", type=Path, default=Path("bench_stats"), help="results folder")
    stats.add_argument(
        "--studies", type=_names, default=["sensitivity", "target", "null", "timing"],
        help="comma-separated: sensitivity, target, null, timing (default: all)",
    )  # fmt: skip
    stats.add_argument("--participants", type=int, default=20, help="per cohort (20)")
    stats.add_argument("--null-cohorts", type=int, default=100, help="null cohorts (100)")
    stats.add_argument(
        "--null-permutations", type=int, default=100, help="permutations per null cohort (100)"
    )
    stats.add_argument(
        "--null-step", type=int, default=3, help="null grid: every Nth 2 mm voxel (3: 6 mm)"
    )
    stats.add_argument(
        "--null-shard", default="0/1", metavar="K/N",
        help="run the null cohorts i with i %% N == K only (parallel shards; the summary merges "
        "every shard in --out)",
    )  # fmt: skip
    stats.add_argument("--n-permutations", type=int, default=1000, help="timing study (1000)")
    stats.add_argument(
        "--tfce-permutations", type=int, default=100,
        help="TFCE permutations of the sensitivity and target studies (100)",
    )  # fmt: skip
    stats.add_argument(
        "--tfce-timing-permutations", type=int, default=1000,
        help="timing study: TFCE permutations timed, scaled to --n-permutations (1000)",
    )  # fmt: skip
    stats.add_argument("--jobs", type=int, default=2, help="permutation processes (2)")
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("-v", "--verbose", action="store_true")
    scale = commands.add_parser(
        "scale", help="indexing a large dataset, resuming a finished run (benchmarks/scale.py)"
    )
    scale.add_argument("--out", type=Path, default=Path("bench_scale"), help="results folder")
    scale.add_argument(
        "--parts",
        type=_names,
        default=["index", "resume"],
        help="index,resume,dask,group (index,resume)",
    )
    scale.add_argument("--participants", type=int, default=1000, help="dataset size (1000)")
    scale.add_argument("--requested", type=int, default=10, help="participants asked for (10)")
    scale.add_argument(
        "--whole", action="store_true", help="also time pybids indexing the whole dataset"
    )
    scale.add_argument(
        "--resume-participants", type=int, default=20, help="participants of the resume part (20)"
    )
    scale.add_argument(
        "--group-participants", type=int, default=1000, help="participants of the group part"
    )
    scale.add_argument(
        "--group-resolution", type=int, default=2, choices=(1, 2), help="grid of the group part, mm"
    )
    scale.add_argument(
        "--group-workers", type=lambda text: tuple(int(n) for n in _names(text)), default=(1, 2),
        help="--nthreads of the group level's runs (1,2)",
    )
    scale.add_argument(
        "--group-compare", action="store_true",
        help="group part: --group-by group --n-permutations 0 (t maps and the model stage)",
    )
    scale.add_argument(
        "--group-distinct", type=int, default=100,
        help="group part: distinct synthetic participants written, the rest hard links (100)",
    )
    scale.add_argument(
        "--dask-dataset", type=Path,
        help="dask part: this BIDS dataset and the real engine (default: synthetic, fake engine)",
    )
    scale.add_argument(
        "--dask-participants", type=int,
        help="dask part: participants run (default: --resume-participants)",
    )
    scale.add_argument("--dask-preset", default="fast", help="dask part: --preset (fast)")
    scale.add_argument(
        "--dask-kill-after", type=float, metavar="SECONDS",
        help="dask part: also run on a LocalCluster one of whose workers is killed SECONDS in",
    )
    scale.add_argument(
        "--dask-defaults", action="store_true",
        help="dask part: also run on a LocalCluster with Dask's default settings (non-daemonic)",
    )
    scale.add_argument(
        "--dask-repeats", type=int, default=1,
        help="dask part: runs of the local executor and of the cluster each, alternating (1)",
    )
    scale.add_argument(
        "--dask-side-by-side", action="store_true",
        help="dask part: also the local executor and a 1-worker cluster at the same time",
    )
    return parser


def _shard(text: str) -> tuple[int, int]:
    shard, _, shards = text.partition("/")
    return int(shard), int(shards or 1)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
    )  # fmt: skip
    if args.command == "list":
        return list_all()
    if args.command == "heads":
        from benchmarks.heads import run as run_heads

        return run_heads(
            args.out, args.cases, args.settings, args.threads, args.force, args.report_only
        )
    if args.command == "lesion":
        for name in THREAD_VARIABLES:  # scoring reads transforms with ANTs in this process
            os.environ[name] = str(args.threads)
        from benchmarks.lesion import run as run_lesion
        from benchmarks.runner import DEFAULT_SEED

        seed = DEFAULT_SEED if args.seed is None else args.seed
        return run_lesion(args.out, args.cases, args.preset, args.threads, seed, args.force)
    if args.command == "stats":
        from benchmarks.group_stats import StatsSettings
        from benchmarks.group_stats import run as run_stats

        settings = StatsSettings(
            args.out, tuple(args.studies), participants=args.participants,
            null_cohorts=args.null_cohorts, null_permutations=args.null_permutations,
            null_step=args.null_step, null_shard=_shard(args.null_shard),
            n_permutations=args.n_permutations,
            tfce_timing_permutations=args.tfce_timing_permutations,
            sensitivity_tfce_permutations=args.tfce_permutations, jobs=args.jobs, seed=args.seed,
        )  # fmt: skip
        return run_stats(settings, ["python", "-m", "benchmarks", *(argv or sys.argv[1:])])
    if args.command == "scale":
        from benchmarks.scale import DaskRuns
        from benchmarks.scale import run as run_scale

        dask = DaskRuns(
            args.dask_participants or args.resume_participants, args.dask_dataset,
            args.dask_preset, args.dask_kill_after, args.dask_defaults, args.dask_repeats,
            args.dask_side_by_side,
        )  # fmt: skip
        return run_scale(
            args.out, args.parts, args.participants, args.requested, args.whole,
            args.resume_participants, args.group_participants, args.group_resolution,
            args.group_workers, args.group_compare, args.group_distinct, dask,
        )  # fmt: skip
    if args.command == "report":
        from benchmarks.report import read_rows
        from benchmarks.runner import write_report

        print(write_report(args.out, read_rows(args.out)))
        return 0
    return run(args, argv if argv is not None else sys.argv[1:])


def run(args, argv: list[str]) -> int:
    # Scoring reads transforms with ANTs in this process: threads settled before `import ants`.
    for name in THREAD_VARIABLES:
        os.environ[name] = str(args.threads)
    from benchmarks.cases import select_cases
    from benchmarks.runner import DEFAULT_SEED, run_benchmark, write_report
    from benchmarks.settings import select_settings

    group = "quick" if args.quick else "full"
    try:
        cases = select_cases(group, args.cases)
        settings = select_settings(group, args.settings)
    except ValueError as err:
        logging.getLogger(__name__).error("%s", err)
        return 2
    started = time.time()
    rows = run_benchmark(
        cases, settings, args.out, force=args.force, threads=args.threads,
        seed=DEFAULT_SEED if args.seed is None else args.seed, timeout_scale=args.timeout_scale,
        argv=["python", "-m", "benchmarks", *argv],
    )  # fmt: skip
    path = write_report(args.out, rows)
    print(path.read_text())
    logging.getLogger(__name__).info("%s (%.0f s)", path, time.time() - started)
    wanted = {(c.name, s.name) for c in cases for s in settings}
    bad = [r for r in rows.values() if r.key in wanted and r.status in ("failed", "timeout")]
    return 1 if bad else 0


def list_all() -> int:
    from benchmarks.cases import CASES
    from benchmarks.settings import SETTINGS

    print("cases (name, kind, source, grid, groups):")
    for case in CASES.values():
        print(f"  {case.name:14s} {case.kind:10s} {case.source:32s} {case.grid_mm:g} mm  "
              f"{','.join(case.groups)}")  # fmt: skip
    print("settings (name, groups, ~wall on a 2 mm case with 2 threads, what):")
    for s in SETTINGS.values():
        print(f"  {s.name:24s} {','.join(s.groups):11s} {s.estimate_2mm:7s} {s.what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
