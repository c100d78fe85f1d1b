"""The registration benchmark of mninorm: known-answer and labelled cases, every setting run in a
child process measured from outside, scored with this package's own code (see docs/benchmark.md).

Run it from the repository root: ``python -m benchmarks run --quick --out bench_results/``.
"""
