"""xlogit 0.2.7: MultinomialLogit on the long table padded to every alternative, with avail.

Intercepts via fit_intercept, case-constant columns (income) as isvars (alternative-specific
coefficients), the others generic. Default BFGS and its default standard errors (numerical
Hessian), as a user would run it. No nested logit, no user-specific coefficients.
"""

from __future__ import annotations

import time

import common
import numpy as np


def main() -> None:
    args = common.parse_args(__doc__)
    from xlogit import MultinomialLogit

    spec = args.spec
    if spec.nest or spec.has_user_terms:
        raise SystemExit("xlogit runner: no nested logit or user-specific coefficients")
    data = common.to_dense(common.read_long(args.data, spec), spec)
    N, J = data.shape
    names, isvars, columns = [], [], []
    for var, variation in spec.terms:
        if var == "1":
            continue
        is_constant = common.case_constant(data.x[var], data.avail)
        if variation == "item" and not is_constant:
            raise SystemExit(f"xlogit runner: item-specific slope on varying column {var}")
        names.append(var)
        columns.append(data.x[var].ravel())
        if variation == "item":
            isvars.append(var)
            columns[-1] = np.repeat(common.per_case(data.x[var], data.avail), J)
    X = np.column_stack(columns)
    y = np.zeros((N, J))
    y[np.arange(N), data.chosen] = 1
    alts = np.tile(np.arange(J), N)
    ids = np.repeat(np.arange(N), J)
    intercept = ("1", "item") in spec.terms

    start = time.perf_counter()
    model = MultinomialLogit()
    model.fit(
        X,
        y.ravel(),
        varnames=names,
        alts=alts,
        ids=ids,
        isvars=isvars,
        avail=data.avail.ravel().astype(int),
        base_alt=0,
        fit_intercept=intercept,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    common.emit(
        seconds,
        float(model.loglikelihood),
        int(model.total_iter),
        converged=bool(model.convergence),
    )


if __name__ == "__main__":
    main()
