"""biogeme 3.2.13: the long table pivoted to wide format, utilities written as expressions.

Conditional logit via models.loglogit, nested logit via models.lognested (biogeme's nest
parameter mu is 1 / lambda, bounded below by 1). Runs in a scratch working directory (biogeme
writes report files there) with a small hand-written TOML file: writing its default file
crashes with tomlkit 0.15. One thread, no HTML or pickle output, its default tolerance unless
--tolerance is given.
"""

from __future__ import annotations

import os
import tempfile
import time

import common
import numpy as np

TOML = """[Output]
generate_html = "False"
generate_pickle = "False"

[MultiThreading]
number_of_threads = 1

[Estimation]
save_iterations = "False"
optimization_algorithm = "simple_bounds"

[SimpleBounds]
max_iterations = 1000
{tolerance}
"""


def wide(data: common.Dense, spec: common.Spec):
    """Wide pandas table (x_j, av_j, case-constant columns, CHOICE) and case-constant names."""
    import pandas as pd

    N, J = data.shape
    columns = {"CHOICE": data.chosen.astype(np.float64)}
    constant = set()
    for var in spec.columns:
        if common.case_constant(data.x[var], data.avail):
            columns[var] = common.per_case(data.x[var], data.avail)
            constant.add(var)
        else:
            for j in range(J):
                columns[f"{var}_{j}"] = data.x[var][:, j]
    for j in range(J):
        columns[f"av_{j}"] = data.avail[:, j].astype(np.float64)
    return pd.DataFrame(columns), constant


def utilities(data: common.Dense, spec: common.Spec, constant: set) -> dict:
    from biogeme.expressions import Beta, Variable

    J = data.shape[1]
    V = {j: 0 for j in range(J)}
    for var, variation in spec.terms:
        if variation == "user":
            raise SystemExit("biogeme runner: user-specific coefficients are not supported")
        for j in range(J):
            x = 1 if var == "1" else Variable(var if var in constant else f"{var}_{j}")
            name = "asc" if var == "1" else var
            if variation == "item":
                if j == 0:
                    continue  # base alternative
                V[j] = V[j] + Beta(f"{name}_{j}", 0, None, None, 0) * x
            else:
                V[j] = V[j] + Beta(f"b_{name}", 0, None, None, 0) * x
    return V


def main() -> None:
    args = common.parse_args(__doc__, [("--tolerance", {"type": float, "default": None})])
    import biogeme.biogeme as bio
    from biogeme import models
    from biogeme.database import Database
    from biogeme.expressions import Beta, Variable
    from biogeme.nests import NestsForNestedLogit, OneNestForNestedLogit

    spec = args.spec
    data = common.to_dense(common.read_long(args.data, spec), spec)
    frame, constant = wide(data, spec)
    scratch = tempfile.mkdtemp(prefix="bench-biogeme-")
    os.chdir(scratch)
    toml = os.path.join(scratch, "biogeme.toml")
    tolerance = "" if args.tolerance is None else f"tolerance = {args.tolerance!r}"
    with open(toml, "w") as handle:
        handle.write(TOML.format(tolerance=tolerance))

    start = time.perf_counter()
    database = Database("bench", frame)
    V = utilities(data, spec, constant)
    av = {j: Variable(f"av_{j}") for j in V}
    choice = Variable("CHOICE")
    if spec.nest:
        nests = tuple(
            OneNestForNestedLogit(
                Beta(f"mu_{k}", 1, 1, None, 0),
                np.flatnonzero(data.nest_of_item == k).tolist(),
                name,
            )
            for k, name in enumerate(data.nests)
        )
        logprob = models.lognested(V, av, NestsForNestedLogit(list(V), nests), choice)
    else:
        logprob = models.loglogit(V, av, choice)
    model = bio.BIOGEME(database, logprob, parameter_file=toml)
    model.modelName = "bench"
    model.generate_html = False
    model.generate_pickle = False
    results = model.estimate()
    seconds = time.perf_counter() - start
    messages = results.data.optimizationMessages or {}
    iterations = messages.get("Number of iterations")
    common.emit(
        seconds,
        float(results.data.logLike),
        iterations,
        message=str(messages.get("Cause of termination", "")),
    )


if __name__ == "__main__":
    main()
