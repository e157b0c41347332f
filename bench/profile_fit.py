"""Profiles of one `choice` fit, to show where the time goes (no Python loop over rows).

The fit runs twice on the same table: under cProfile (Python functions, with call counts) and
under torch.profiler (torch operators, with call counts). A loop over the 1M cases, or the 9M
rows, would show as a function or an operator called about that many times.

Usage: .venv/bin/python bench/profile_fit.py [SCENARIO_DATA] > bench/results/profile_cl_1m.txt
(default bench/data/cl_1m.parquet, the cl_1m scenario's file and formula; one thread).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from choicecli.data import Roles
from choicecli.fit import FitOptions, fit_model
from choicecli.io import read_table
from choicecli.problem import ModelSpec

FORMULA = "(1|item) + (x1|constant) + (x2|constant) + (x3|constant) + (x4|constant) + (income|item)"


def main() -> None:
    torch.set_num_threads(1)
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/data/cl_1m.parquet")
    frame, _ = read_table(str(path))
    spec = ModelSpec(formula=FORMULA, roles=Roles(case="case", item="item", choice="choice"))
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    result, _ = fit_model(frame.clone(), spec, FitOptions(), where=str(path))
    profiler.disable()
    seconds = time.perf_counter() - started
    fit = result.fit
    print(
        f"{path.name}: {fit['n_rows']:,} rows, {fit['n_cases']:,} cases; fit {seconds:.2f} s "
        f"under cProfile, {fit['iterations']} iterations ({fit['method']}), "
        f"LL {fit['log_likelihood']:.6f}"
    )
    stats = pstats.Stats(profiler)
    calls = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    most = max(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    print(f"Python: {calls:,} calls in all; the most-called function ran {most:,} times.\n")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        print(text.getvalue())

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as operators:
        fit_model(frame, spec, FitOptions(), where=str(path))
    seconds = time.perf_counter() - started
    events = operators.key_averages()
    print(
        f"torch.profiler, the same fit: {seconds:.2f} s; {sum(e.count for e in events):,} "
        f"operator calls in all; the most-called operator ran {max(e.count for e in events):,} "
        "times. Operators by their own CPU time:"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
