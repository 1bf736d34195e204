"""Benchmarks and the analyses behind the docs' figures and tables, run from the repository root as modules:
`python -m bench.scale ...`, `python -m bench.screening ...` (each module's docstring has its commands; the figures
are in docs/benchmarks.md and docs/results.md). Tests import the analyses from here (`from bench import screening`)."""
