"""Write the sample data sets of `choice`, simulated from known models.

Run from the repository root:

    .venv/bin/python sample_data/make_sample_data.py

Writes into this script's folder:

* transport.parquet / transport.csv: travel-mode choices from a conditional logit.
* tutorial.parquet: a torch-choice-tutorial-shaped data set from a nested logit.
* true_coefficients.json: the true parameters and formulas of both simulations.

Every random draw comes from one seeded torch.Generator, in a fixed order, so the
output is the same on every run. All code is vectorised (no loops over rows or cases).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

HERE = Path(__file__).resolve().parent
SEED = 20240917
DTYPE = torch.float64

# --------------------------------------------------------------------------- transport
MODES = ["bike", "bus", "car", "train", "walk"]  # sorted: "bike" is the base alternative
N_USERS_T = 150
N_CASES_T = 2000
MIN_CASES_PER_USER = 5
P_UNAVAILABLE = 0.15
SESSION_OFFSET = 100_000  # session_id = case_id + SESSION_OFFSET (one session per case)

TRANSPORT_FORMULA = "(time|constant) + (1|item) + (income|item) + (cost|user)"
TIME_COEF = -0.05  # per minute
INTERCEPT = {"bike": 0.0, "bus": 2.3, "car": 1.2, "train": 2.0, "walk": 1.5}
INCOME_COEF = {"bike": 0.0, "bus": -0.15, "car": 0.3, "train": 0.1, "walk": -0.1}
COST_SLOPE_MEAN, COST_SLOPE_SD = -0.8, 0.25
BASE_TIME = [20.0, 30.0, 15.0, 25.0, 45.0]  # minutes at distance factor 1
BASE_COST = [0.4, 2.0, 4.0, 3.5, 0.0]  # currency units at distance factor 1

# --------------------------------------------------------------------------- tutorial
N_ITEMS, N_NESTS, N_USERS_N, N_CASES_N = 25, 5, 100, 2000
LAMBDAS = [0.5, 0.6, 0.7, 0.8, 0.9]
TUTORIAL_ITEM_FORMULA = (
    "(1|item) + (user_obs_1|item) + (user_obs_2|item)"
    " + (itemsession_obs_1|constant) + (itemsession_obs_2|constant)"
)
TUTORIAL_NEST_FORMULA = "(nest_obs_1|constant)"
ITEMSESSION_COEF = [0.8, -0.5]
NEST_OBS_COEF = 0.6
INTERCEPT_SD, USER_OBS_SD = 0.3, 0.25


def rounded(tensor: torch.Tensor, decimals: int) -> torch.Tensor:
    return torch.round(tensor, decimals=decimals)


def gumbel(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=DTYPE).clamp(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def labels(prefix: str, index: torch.Tensor, width: int, start: int = 0) -> pl.Series:
    """Zero-padded string labels prefix+NNN for an integer tensor."""
    numbers = pl.Series(values=(index + start).numpy())
    return pl.select(pl.lit(prefix) + numbers.cast(pl.String).str.zfill(width)).to_series()


def make_transport(gen: torch.Generator) -> tuple[pl.DataFrame, dict]:
    C, J, U = N_CASES_T, len(MODES), N_USERS_T

    # Users: every user gets MIN_CASES_PER_USER cases, the rest at random; cases shuffled.
    extra = torch.randint(0, U, (C - U * MIN_CASES_PER_USER,), generator=gen)
    user_of_case = torch.cat([torch.arange(U).repeat(MIN_CASES_PER_USER), extra])
    user_of_case = user_of_case[torch.randperm(C, generator=gen)]

    # User level: income (10k currency units) and the user's own cost slope.
    income = rounded(torch.exp(1.4 + 0.4 * torch.randn(U, generator=gen, dtype=DTYPE)), 2)
    cost_slope = rounded(
        COST_SLOPE_MEAN + COST_SLOPE_SD * torch.randn(U, generator=gen, dtype=DTYPE), 4
    )

    # Case level: trip-distance factor (drives time and cost) and rain (mm, session level).
    distance = torch.exp(0.5 * torch.randn(C, 1, generator=gen, dtype=DTYPE))
    wet = torch.rand(C, generator=gen, dtype=DTYPE) < 0.35
    rain_mm = -4.0 * torch.log(torch.rand(C, generator=gen, dtype=DTYPE).clamp_min(1e-12))
    rain = rounded(torch.where(wet, rain_mm, torch.zeros_like(rain_mm)), 1)

    # Case x alternative: time (minutes) and cost.
    base_time = torch.tensor(BASE_TIME, dtype=DTYPE)
    base_cost = torch.tensor(BASE_COST, dtype=DTYPE)
    time_noise = torch.exp(0.2 * torch.randn(C, J, generator=gen, dtype=DTYPE))
    cost_noise = torch.exp(0.25 * torch.randn(C, J, generator=gen, dtype=DTYPE))
    time = rounded(base_time * distance * time_noise, 1)
    cost = rounded(base_cost * distance**0.7 * cost_noise, 2)

    # Availability: each alternative absent in ~15% of cases; at least 2 per case.
    available = torch.rand(C, J, generator=gen) >= P_UNAVAILABLE
    rescue_rank = torch.rand(C, J, generator=gen).argsort(dim=1).argsort(dim=1)
    short = (available.sum(dim=1) < 2).unsqueeze(1)
    available = available | (short & (rescue_rank < 2))

    # Utility and choice (Gumbel-max over the available alternatives).
    intercept = torch.tensor([INTERCEPT[m] for m in MODES], dtype=DTYPE)
    income_coef = torch.tensor([INCOME_COEF[m] for m in MODES], dtype=DTYPE)
    utility = (
        TIME_COEF * time
        + intercept
        + income[user_of_case].unsqueeze(1) * income_coef
        + cost_slope[user_of_case].unsqueeze(1) * cost
    )
    utility = utility.masked_fill(~available, float("-inf"))
    choice = (utility + gumbel((C, J), gen)).argmax(dim=1)
    loglik = torch.log_softmax(utility, dim=1).gather(1, choice.unsqueeze(1)).sum().item()
    chosen = torch.zeros(C, J, dtype=torch.int64)
    chosen[torch.arange(C), choice] = 1

    # Long table: one row per available (case, alternative), sorted by case then mode.
    case_idx, alt_idx = available.nonzero(as_tuple=True)
    user_idx = user_of_case[case_idx]
    frame = pl.DataFrame(
        {
            "case_id": (case_idx + 1).numpy(),
            "user_id": labels("u", user_idx, 3, start=1),
            "session_id": (case_idx + 1 + SESSION_OFFSET).numpy(),
            "mode": pl.Series(MODES).gather(alt_idx.numpy()),
            "chosen": chosen[case_idx, alt_idx].numpy(),
            "cost": cost[case_idx, alt_idx].numpy(),
            "time": time[case_idx, alt_idx].numpy(),
            "income": income[user_idx].numpy(),
            "rain": rain[case_idx].numpy(),
        }
    )

    user_labels = labels("u", torch.arange(U), 3, start=1).to_list()
    truth = {
        "formula": TRANSPORT_FORMULA,
        "item_column": "mode",
        "choice_column": "chosen",
        "case_column": "case_id",
        "user_column": "user_id",
        "session_column": "session_id",
        "base_item": MODES[0],
        "time[constant]": TIME_COEF,
        "intercept[item]": {m: INTERCEPT[m] for m in MODES[1:]},
        "income[item]": {m: INCOME_COEF[m] for m in MODES[1:]},
        "cost[user]": dict(zip(user_labels, cost_slope.tolist(), strict=True)),
        "cost[user]_distribution": {"mean": COST_SLOPE_MEAN, "sd": COST_SLOPE_SD},
        "loglik_at_truth": round(loglik, 4),
        "notes": (
            "rain is a distractor: it is not in the true model. cost has no [constant] "
            "term because (cost|constant) is collinear with (cost|user)."
        ),
    }
    return frame, truth


def make_tutorial(gen: torch.Generator) -> tuple[pl.DataFrame, dict]:
    C, J, K, U = N_CASES_N, N_ITEMS, N_NESTS, N_USERS_N
    nest_of_item = torch.arange(J) % K  # interleaved: item_00, item_05, ... in nest_0

    def normal(*shape: int) -> torch.Tensor:
        return rounded(torch.randn(*shape, generator=gen, dtype=DTYPE), 4)

    # Observables.
    user_obs = normal(U, 2)
    item_obs = normal(J, 2)
    extra = torch.randint(0, U, (C - U,), generator=gen)
    user_of_case = torch.cat([torch.arange(U), extra])[torch.randperm(C, generator=gen)]
    session_obs = normal(C)
    itemsession_obs = normal(C, J, 2)
    nest_obs = normal(C, K)

    # True coefficients; item_00 is the base item of the (.|item) terms.
    intercept = rounded(INTERCEPT_SD * torch.randn(J, generator=gen, dtype=DTYPE), 3)
    user_coef = rounded(USER_OBS_SD * torch.randn(J, 2, generator=gen, dtype=DTYPE), 3)
    intercept[0] = 0.0
    user_coef[0] = 0.0
    lambdas = torch.tensor(LAMBDAS, dtype=DTYPE)
    itemsession_coef = torch.tensor(ITEMSESSION_COEF, dtype=DTYPE)

    # Nested logit: Y item utility, W nest utility, I inclusive value.
    Y = intercept + user_obs[user_of_case] @ user_coef.T + itemsession_obs @ itemsession_coef
    W = NEST_OBS_COEF * nest_obs
    lam_item = lambdas[nest_of_item]
    scaled = Y / lam_item  # (C, J)
    member = nest_of_item.unsqueeze(0) == torch.arange(K).unsqueeze(1)  # (K, J)
    masked = scaled.unsqueeze(1).masked_fill(~member, float("-inf"))  # (C, K, J)
    inclusive = torch.logsumexp(masked, dim=2)  # (C, K)
    log_p_nest = torch.log_softmax(W + lambdas * inclusive, dim=1)
    log_p_within = scaled - inclusive[:, nest_of_item]
    log_p = log_p_within + log_p_nest[:, nest_of_item]  # (C, J), rows sum to 1 in prob
    choice = (log_p + gumbel((C, J), gen)).argmax(dim=1)
    loglik = log_p.gather(1, choice.unsqueeze(1)).sum().item()
    chosen = torch.zeros(C, J, dtype=torch.int64)
    chosen[torch.arange(C), choice] = 1

    # Long table, full choice sets, sorted by case then item.
    case_idx = torch.arange(C).repeat_interleave(J)
    item_idx = torch.arange(J).repeat(C)
    user_idx = user_of_case[case_idx]
    nest_idx = nest_of_item[item_idx]
    frame = pl.DataFrame(
        {
            "case_id": case_idx.numpy(),
            "session_id": case_idx.numpy(),
            "user_id": labels("user_", user_idx, 2),
            "item_id": labels("item_", item_idx, 2),
            "nest": labels("nest_", nest_idx, 1),
            "chosen": chosen[case_idx, item_idx].numpy(),
            "user_obs_1": user_obs[user_idx, 0].numpy(),
            "user_obs_2": user_obs[user_idx, 1].numpy(),
            "item_obs_1": item_obs[item_idx, 0].numpy(),
            "item_obs_2": item_obs[item_idx, 1].numpy(),
            "session_obs_1": session_obs[case_idx].numpy(),
            "itemsession_obs_1": itemsession_obs[case_idx, item_idx, 0].numpy(),
            "itemsession_obs_2": itemsession_obs[case_idx, item_idx, 1].numpy(),
            "nest_obs_1": nest_obs[case_idx, nest_idx].numpy(),
        }
    )

    item_labels = labels("item_", torch.arange(J), 2).to_list()
    nest_labels = labels("nest_", torch.arange(K), 1).to_list()

    def by_item(values: torch.Tensor) -> dict[str, float]:
        return dict(zip(item_labels[1:], values[1:].tolist(), strict=True))

    truth = {
        "item_formula": TUTORIAL_ITEM_FORMULA,
        "nest_formula": TUTORIAL_NEST_FORMULA,
        "item_column": "item_id",
        "nest_column": "nest",
        "choice_column": "chosen",
        "case_column": "case_id",
        "user_column": "user_id",
        "session_column": "session_id",
        "base_item": item_labels[0],
        "nest_of_item": dict(
            zip(item_labels, [nest_labels[k] for k in nest_of_item.tolist()], strict=True)
        ),
        "intercept[item]": by_item(intercept),
        "user_obs_1[item]": by_item(user_coef[:, 0]),
        "user_obs_2[item]": by_item(user_coef[:, 1]),
        "itemsession_obs_1[constant]": ITEMSESSION_COEF[0],
        "itemsession_obs_2[constant]": ITEMSESSION_COEF[1],
        "nest_obs_1[constant]": NEST_OBS_COEF,
        "lambda[nest]": dict(zip(nest_labels, LAMBDAS, strict=True)),
        "loglik_at_truth": round(loglik, 4),
        "notes": (
            "P(i) = P(i|k) P(k); P(i|k) = exp(Y_i/l_k) / sum_{j in k} exp(Y_j/l_k); "
            "I_k = log sum_{j in k} exp(Y_j/l_k); "
            "P(k) = exp(W_k + l_k I_k) / sum_m exp(W_m + l_m I_m). "
            "Y from item_formula, W from nest_formula. No nest intercept: in a nested logit "
            "a (1|nest) term is collinear with (1|item) (shifting every Y_j in nest k by c "
            "shifts l_k I_k by c). user_obs_*[item] and intercept[item] are 0 for the base "
            "item. item_obs_* and session_obs_1 are distractors, not in the true model."
        ),
    }
    return frame, truth


def check(frame: pl.DataFrame, item: str, case_constant: list[str], user_constant: list[str]):
    per_case = frame.group_by("case_id").agg(
        pl.col("chosen").sum().alias("n_chosen"),
        pl.len().alias("n_items"),
        *[pl.col(c).n_unique().alias(f"nu_{c}") for c in case_constant],
    )
    assert (per_case["n_chosen"] == 1).all(), "exactly one chosen row per case"
    assert (per_case["n_items"] >= 2).all(), "at least two alternatives per case"
    for c in case_constant:
        assert (per_case[f"nu_{c}"] == 1).all(), f"{c} constant within case"
    assert frame.select(["case_id", item]).is_duplicated().sum() == 0, "duplicate (case, item)"
    per_user = frame.group_by("user_id").agg(
        pl.col("case_id").n_unique().alias("n_cases"),
        *[pl.col(c).n_unique().alias(f"nu_{c}") for c in user_constant],
    )
    for c in user_constant:
        assert (per_user[f"nu_{c}"] == 1).all(), f"{c} constant within user"
    assert frame.null_count().sum_horizontal().item() == 0, "no nulls"
    return per_case, per_user


def shares(frame: pl.DataFrame, item: str) -> pl.DataFrame:
    n_cases = frame["case_id"].n_unique()
    return (
        frame.group_by(item)
        .agg(
            (pl.col("chosen").sum() / n_cases).round(3).alias("share"),
            (pl.len() / n_cases).round(3).alias("available"),
        )
        .sort(item)
    )


def main() -> None:
    gen = torch.Generator().manual_seed(SEED)
    transport, transport_truth = make_transport(gen)
    tutorial, tutorial_truth = make_tutorial(gen)

    per_case, per_user = check(transport, "mode", ["user_id", "session_id", "rain"], ["income"])
    assert per_user.height == N_USERS_T and per_user["n_cases"].min() >= MIN_CASES_PER_USER
    t_shares = shares(transport, "mode")
    assert t_shares["share"].min() >= 0.05, "every mode chosen at least ~5% of the time"

    check(tutorial, "item_id", ["user_id", "session_id", "session_obs_1"], ["user_obs_1"])
    assert tutorial.height == N_CASES_N * N_ITEMS
    assert (tutorial["case_id"] == tutorial["session_id"]).all()
    for cols in (["item_id", "nest"], ["item_id", "item_obs_1", "item_obs_2"]):
        assert tutorial.select(cols).unique().height == N_ITEMS, f"{cols[1:]} constant in item"
    assert (
        tutorial.select(["case_id", "nest", "nest_obs_1"]).unique().height == N_CASES_N * N_NESTS
    ), "nest_obs_1 constant within (case, nest)"
    n_shares = shares(tutorial, "item_id")
    nest_shares = shares(tutorial, "nest")

    transport.write_parquet(HERE / "transport.parquet", compression="zstd")
    transport.write_csv(HERE / "transport.csv")
    tutorial.write_parquet(HERE / "tutorial.parquet", compression="zstd")
    truth = {"seed": SEED, "transport": transport_truth, "tutorial": tutorial_truth}
    (HERE / "true_coefficients.json").write_text(json.dumps(truth, indent=2) + "\n")

    # Round trip: the CSV and parquet copies hold the same data.
    assert pl.read_csv(HERE / "transport.csv").equals(pl.read_parquet(HERE / "transport.parquet"))

    files = ["transport.parquet", "transport.csv", "tutorial.parquet", "true_coefficients.json"]
    sizes = {name: (HERE / name).stat().st_size for name in files}
    assert sum(sizes.values()) < 5_000_000, "sample data must stay under 5 MB"

    print(
        f"transport: {transport.height} rows, {per_case.height} cases, {per_user.height} users "
        f"(cases per user {per_user['n_cases'].min()}-{per_user['n_cases'].max()}), "
        f"alternatives per case {per_case['n_items'].min()}-{per_case['n_items'].max()}, "
        f"loglik at truth {transport_truth['loglik_at_truth']}"
    )
    print(
        "  shares: "
        + ", ".join(
            f"{m} {s:.3f} (avail {a:.3f})"
            for m, s, a in t_shares.select("mode", "share", "available").iter_rows()
        )
    )
    print(
        f"tutorial: {tutorial.height} rows, {N_CASES_N} cases, "
        f"{tutorial['user_id'].n_unique()} users, {N_ITEMS} items in {N_NESTS} nests, "
        f"loglik at truth {tutorial_truth['loglik_at_truth']}"
    )
    print(
        "  nest shares: "
        + ", ".join(f"{k} {s:.3f}" for k, s in nest_shares.select("nest", "share").iter_rows())
    )
    print(f"  item shares: min {n_shares['share'].min():.3f}, max {n_shares['share'].max():.3f}")
    print("  files: " + ", ".join(f"{n} {s / 1024:.0f} KiB" for n, s in sizes.items()))
    print(f"  total: {sum(sizes.values()) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
