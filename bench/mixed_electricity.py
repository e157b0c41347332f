"""The electricity panel (Train; as xlogit ships it) as a mixed logit with six normal
coefficients, panel by respondent, Halton draws, one thread: time, iterations, log-likelihood and
the estimates beside xlogit's published ones (tests/data/README.md).

Usage: .venv/bin/python bench/mixed_electricity.py [--draws 600] [--kind halton] [--plain]
[--xlogit-signs] (--plain: unscrambled Halton, first 100 points dropped, as xlogit draws them;
--xlogit-signs: start the spreads with the signs xlogit's ended with).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl
import torch

from choicecli.models import mixed

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "electricity_long.csv"
VARIABLES = ["pf", "cl", "loc", "wk", "tod", "seas"]
# xlogit's README: mean, its std. error, sd, its std. error (600 Halton draws, LL -3888.4134)
XLOGIT = {
    "pf": (-0.9996286, 0.0331488, 0.2357813, 0.0181892),
    "cl": (-0.2355334, 0.0220401, 0.4025377, 0.0220183),
    "loc": (2.2307891, 0.1164263, 1.9262893, 0.1187850),
    "wk": (1.6251657, 0.0918755, -1.2192931, 0.0944581),
    "tod": (-9.6067367, 0.3112721, 2.3354462, 0.1741859),
    "seas": (-9.7892800, 0.2913063, -1.4200913, 0.2095869),
}


def electricity(device: str = "cpu") -> mixed.MixedData:
    """The panel as MixedData: no fixed coefficients, six random ones, users by `id`."""
    frame = pl.read_csv(DATA)
    case = frame["chid"].rank("dense").cast(pl.Int64).to_torch() - 1  # (S,)
    user_of_row = frame["id"].rank("dense").cast(pl.Int64).to_torch() - 1  # (S,)
    n_cases = int(case.max()) + 1
    user_of_case = torch.zeros(n_cases, dtype=torch.int64).scatter(0, case, user_of_row)
    random_design = frame.select(VARIABLES).to_torch(dtype=pl.Float64)  # (S, 6)
    fixed_design = torch.zeros((random_design.shape[0], 0), dtype=torch.float64)
    chosen = frame["choice"].to_torch().to(torch.float64)
    return mixed.mixed_data(
        fixed_design.to(device), random_design.to(device), case, chosen, user_of_case
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=600)
    parser.add_argument("--kind", default="halton")
    parser.add_argument("--plain", action="store_true", help="unscrambled Halton")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draw-batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--xlogit-signs",
        action="store_true",
        help="start the spreads at 0.1 with the signs xlogit's ended with (default: all 0.1)",
    )
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    start = time.perf_counter()
    data = electricity(arguments.device)
    spec = mixed.MixedSpec(n_fixed=0, distributions=("normal",) * len(VARIABLES))
    draws = mixed.make_draws(
        spec, data.n_units, arguments.draws, arguments.kind, seed=arguments.seed,
        scramble=not arguments.plain, device=arguments.device,
    )  # fmt: skip
    prepared, prepared_cpu = time.perf_counter(), time.process_time()
    initial = spec.initial()
    if arguments.xlogit_signs:
        signs = torch.tensor([XLOGIT[name][2] for name in VARIABLES], dtype=torch.float64).sign()
        initial[len(VARIABLES) :] *= signs
    fit = mixed.fit_mixed(spec, data, draws, initial=initial, draw_batch=arguments.draw_batch)
    if arguments.device.startswith("cuda"):
        torch.cuda.synchronize()
    done, done_cpu = time.perf_counter(), time.process_time()

    errors = fit.standard_errors
    print(
        f"electricity: {data.n_units} users, {data.n_cases} cases, {arguments.draws} "
        f"{'plain' if arguments.plain else 'scrambled'} {arguments.kind} draws, "
        f"start {'0.1 with xlogit signs' if arguments.xlogit_signs else '0.1'}, "
        f"{torch.get_num_threads()} thread(s), device {arguments.device}"
    )
    print(
        f"data+draws {prepared - start:.2f} s, fit {done - prepared:.2f} s wall, "
        f"{done_cpu - prepared_cpu:.2f} s CPU "
        f"(L-BFGS {fit.iterations} iterations, {fit.evaluations} evaluations, "
        f"{fit.newton_steps} Newton steps, Hessian included); converged {fit.converged}, "
        f"max |gradient| {fit.gradient.abs().max().item():.2e}"
    )
    print(f"log-likelihood {fit.log_likelihood:.4f} (xlogit at 600 draws: -3888.4134)")
    print(f"signed spreads: {[round(v, 4) for v in fit.theta[len(VARIABLES) :].tolist()]}")
    print(f"{'':6} {'mean':>10} {'se':>8} {'xlogit':>10} {'diff/se':>8} "
          f"{'|sd|':>9} {'se':>8} {'xlogit':>9} {'diff/se':>8}")  # fmt: skip
    n = len(VARIABLES)
    worst = 0.0
    for k, name in enumerate(VARIABLES):
        mean, mean_se, sd, sd_se = XLOGIT[name]
        our_mean, our_sd = fit.theta[k].item(), abs(fit.theta[n + k].item())
        mean_gap = (our_mean - mean) / mean_se
        sd_gap = (our_sd - abs(sd)) / sd_se
        worst = max(worst, abs(mean_gap), abs(sd_gap))
        print(
            f"{name:6} {our_mean:10.4f} {errors[k].item():8.4f} {mean:10.4f} {mean_gap:8.2f} "
            f"{our_sd:9.4f} {errors[n + k].item():8.4f} {abs(sd):9.4f} {sd_gap:8.2f}"
        )
    print(f"largest |difference| / xlogit's standard error: {worst:.2f}")


if __name__ == "__main__":
    main()
