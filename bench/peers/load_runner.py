"""Loading alone, run with the product's python: choice's reader vs a plain polars read.

--tool choice: choicecli.io.read_table + choicecli.data.load_choice_data (validation, sorting,
codes, float64 tensors of the used columns). --tool polars: pl.read_parquet / pl.read_csv and
torch tensors of the same columns, nothing else. Prints one JSON line with seconds and rows.
"""

from __future__ import annotations

import argparse
import json
import time

import polars as pl
import torch

USED = ["x1", "x2", "x3", "x4", "income"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tool", choices=["choice", "polars"], required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.tool == "choice":
        from choicecli.data import Roles, load_choice_data
        from choicecli.io import read_table

        start = time.perf_counter()
        frame = read_table(args.data)[0]
        data = load_choice_data(
            frame, Roles(case="case", item="item", choice="choice"), USED, where=args.data
        )
        seconds = time.perf_counter() - start
        rows = data.n_rows
    else:
        start = time.perf_counter()
        reader = pl.read_parquet if args.data.endswith(".parquet") else pl.read_csv
        frame = reader(args.data)
        tensors = {c: torch.from_numpy(frame.get_column(c).to_numpy()) for c in USED}
        seconds = time.perf_counter() - start
        rows = len(tensors["x1"])
    print(json.dumps({"seconds": seconds, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
