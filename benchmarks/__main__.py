"""Run every benchmark; write benchmarks/RESULTS.md and benchmarks/results.json.

`python -m benchmarks SUITE...` re-runs only those suites and keeps the other suites' rows
from the previous results.json, in suite order.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import (
    bench_decompose,
    bench_defaults,
    bench_inference,
    bench_memory,
    bench_mpoe,
    bench_precision,
    bench_process,
    bench_pruning,
    bench_scale,
    bench_scaling,
    bench_squeeze,
    bench_train,
    bench_truncation,
)

HERE = Path(__file__).resolve().parent
SUITES = {
    "decompose": bench_decompose.run,
    "process": bench_process.run,
    "scaling": bench_scaling.run,
    "memory": bench_memory.run,
    "truncation": bench_truncation.run,
    "train": bench_train.run,
    "precision": bench_precision.run,
    "scale": bench_scale.run,
}
#: Suites run only when named (`python -m benchmarks defaults`: about an hour on 2 cores);
#: their rows are kept from the previous results.json otherwise.
OPTIONAL_SUITES = {
    "defaults": bench_defaults.run,
    "pruning": bench_pruning.run,
    "mpoe": bench_mpoe.run,
    "squeeze": bench_squeeze.run,
    "inference": bench_inference.run,
}


def main(argv: list[str]) -> None:
    every = SUITES | OPTIONAL_SUITES
    unknown = [name for name in argv if name not in every]
    if unknown:
        sys.exit(f"unknown suite {unknown[0]!r}; suites: {', '.join(every)}")
    chosen = argv or list(SUITES)
    previous = _previous_rows()
    by_suite = previous if argv else {k: v for k, v in previous.items() if k in OPTIONAL_SUITES}
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr)
        by_suite[name] = [row | {"suite": name} for row in every[name]()]
    rows = [row for name in every for row in by_suite.get(name, [])]
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    (HERE / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (HERE / "RESULTS.md").write_text(markdown(rows, env))
    print(markdown(rows, env))


def _previous_rows() -> dict[str, list[dict[str, Any]]]:
    """The rows of the last results.json, by suite (rows without a suite are dropped)."""
    try:
        rows = json.loads((HERE / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return {}
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("suite") in SUITES or row.get("suite") in OPTIONAL_SUITES:
            by_suite.setdefault(row["suite"], []).append(row)
    return by_suite


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make bench` (python -m benchmarks); env: {env}.",
        "Ratios compare against a baseline measured in the same run. Rows of the optional",
        f"suites ({', '.join(OPTIONAL_SUITES)}) come from `python -m benchmarks SUITE`; the",
        "man-sections rows (the learning-rate sweep behind each method's default) from",
        "`python -m benchmarks defaults`.",
        "",
        "| benchmark | threads | measured | baseline | ratio | goal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        goal = f"<= {r['goal']}x" if r.get("goal") else "-"
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        lines.append(
            f"| {r['benchmark']} | {r.get('threads') or '-'} | {r['value']} | {r['baseline']}"
            f" | {ratio} | {goal} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
