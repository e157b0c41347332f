"""torch-choice 1.0.7: its tutorial recipe, or its model under a line-search L-BFGS loop.

--mode recipe: `model.fit(dataset, model_optimizer="LBFGS", learning_rate=0.01, num_epochs=500,
batch_size=-1)` as the README/tutorial does (no line search), in the default float32.
--mode lbfgs: the same model driven by `torch.optim.LBFGS(line_search_fn="strong_wolfe", lr=1)` on
the mean negative log-likelihood, in float64 (torch.set_default_dtype around dataset and model).

ChoiceDataset casts every observable to float32 (`.float()`) even under a float64 default dtype;
the runner sets them back to the default dtype after construction, so float64 really is float64.
The reported log_likelihood is re-evaluated in float64 at the fitted coefficients (own_ll is the
value in the fitting dtype). Nested logit: one lambda per nest, driven by hand (fit() breaks with
shared_lambda=False); --nested-mask fixed applies the mask after the division by lambda, because
torch-choice fills unavailable utilities with finfo.min / 2 and then divides by lambda < 0.5,
which overflows to -inf and turns the lambda gradient into NaN.
"""

from __future__ import annotations

import time
import warnings

import common
import numpy as np
import torch

warnings.filterwarnings("ignore")


def short_name(variable: str) -> str:
    """A Python-identifier form of a term's variable ('user_obs_*' -> 'user_obs')."""
    base = "".join(c if c.isalnum() else "_" for c in variable.replace("*", "")).strip("_")
    return base or "x"


def item_observable(data: common.Dense, spec: common.Spec, variable: str):
    """(name, tensor) of an item-level term's columns, named by torch-choice's prefix for how
    they vary, as its tutorial passes them: item_ (J, C) when constant within item, user_
    (U, C) when constant within user, session_ (N, C) when constant within case (each case is
    its own session), else itemsession_ (N, J, C)."""
    columns = [data.x[c] for c in spec.columns_of(variable)]  # C arrays of (N, J)
    base = short_name(variable)
    if all(common.item_constant(x, data.avail) for x in columns):
        return f"item_{base}", np.stack([common.per_item(x, data.avail) for x in columns], 1)
    if all(common.case_constant(x, data.avail) for x in columns):
        per_case = np.stack([common.per_case(x, data.avail) for x in columns], 1)  # (N, C)
        if spec.has_user_terms and all(
            common.constant_within(x, data.avail, data.user) for x in columns
        ):
            per_user = np.zeros((data.n_users, len(columns)))
            per_user[data.user[::-1]] = per_case[::-1]  # each user's first case
            return f"user_{base}", per_user
        return f"session_{base}", per_case
    return f"itemsession_{base}", np.stack(columns, axis=2)


def nest_observable(data: common.Dense, spec: common.Spec, variable: str):
    """(name, tensor) of a nest-level term's columns: itemsession_ (N, K, C) in the nest
    dataset (the columns are constant within case x nest; each case is its own session)."""
    columns = [
        common.per_nest(data.x[c], data.avail, data.nest_of_item) for c in spec.columns_of(variable)
    ]
    return f"itemsession_{short_name(variable)}", np.stack(columns, axis=2)


def formula_and_observables(terms, observable) -> tuple[str, dict]:
    """torch-choice's formula for a list of terms, and the observables it names."""
    observables, parts = {}, []
    for variable, variation in terms:
        if variable == "1":
            parts.append(f"(intercept|{variation})")
            continue
        name, value = observable(variable)
        observables[name] = torch.tensor(value)
        parts.append(f"({name}|{variation})")
    dtype = torch.get_default_dtype()
    return " + ".join(parts), {k: v.to(dtype) for k, v in observables.items()}


def build(data: common.Dense, spec: common.Spec):
    """ChoiceDataset (or JointDataset) and formulas (item level, nest level); observables
    named by torch-choice prefix."""
    from torch_choice.data import ChoiceDataset, JointDataset

    N, J = data.shape
    formula, observables = formula_and_observables(
        spec.terms, lambda v: item_observable(data, spec, v)
    )
    extra = {"user_index": torch.tensor(data.user)} if spec.has_user_terms else {}
    extra |= {"num_users": data.n_users} if spec.has_user_terms else {}
    extra["num_sessions"] = N  # given, so torch-choice does not count them on every forward
    items = ChoiceDataset(
        item_index=torch.tensor(data.chosen),
        num_items=J,
        session_index=torch.arange(N),
        item_availability=torch.tensor(data.avail),
        **extra,
        **observables,
    )
    for name, value in observables.items():
        setattr(items, name, value)  # ChoiceDataset casts observables to float32: undo that
    if not spec.nest:
        return items, (formula, "")
    nest_formula, nest_observables = formula_and_observables(
        spec.nest_terms, lambda v: nest_observable(data, spec, v)
    )
    nest_of_chosen = torch.tensor(data.nest_of_item[data.chosen])
    nests = ChoiceDataset(
        item_index=nest_of_chosen,
        num_items=len(data.nests),
        session_index=torch.arange(N),
        **extra,
        **nest_observables,
    )
    for name, value in nest_observables.items():
        setattr(nests, name, value)
    return JointDataset(item=items, nest=nests), (formula, nest_formula)


def batch_of(dataset):
    """What negative_log_likelihood takes: the dataset, or a JointDataset's dict of datasets."""
    return dataset.datasets if hasattr(dataset, "datasets") else dataset


def make_model(
    data: common.Dense, spec: common.Spec, dataset, formulas: tuple[str, str], mask: str
):
    from torch_choice.model import ConditionalLogitModel, NestedLogitModel

    formula, nest_formula = formulas
    users = data.n_users if spec.has_user_terms else None
    if not spec.nest:
        return ConditionalLogitModel(
            formula=formula, dataset=dataset, num_items=data.shape[1], num_users=users
        )
    nest_to_item = {
        k: np.flatnonzero(data.nest_of_item == k).tolist() for k in range(len(data.nests))
    }
    cls = FixedMaskNested() if mask == "fixed" else NestedLogitModel
    return cls(
        nest_to_item=nest_to_item,
        item_formula=formula,
        nest_formula=nest_formula,
        dataset=dataset,
        num_users=users,
        shared_lambda=False,
    )


def FixedMaskNested():  # noqa: N802 - returns a class
    """NestedLogitModel whose forward masks unavailable alternatives after dividing by lambda."""
    from torch_choice.model import NestedLogitModel

    class Fixed(NestedLogitModel):
        def _forward(self, nest_x_dict, item_x_dict, user_index=None, item_availability=None):
            lam = (
                self.lambda_weight.expand(self.num_nests)
                if self.shared_lambda
                else self.lambda_weight
            )
            self.lambdas = lam
            T = next(iter(item_x_dict.values())).shape[0]
            W = torch.zeros(T, self.num_nests)
            Y = torch.zeros(T, self.num_items)
            if any(self.is_intercept_term(v) for v in self.item_coef_variation_dict):
                item_x_dict["intercept"] = torch.ones((T, self.num_items, 1))
            if any(self.is_intercept_term(v) for v in self.nest_coef_variation_dict):
                nest_x_dict["intercept"] = torch.ones((T, self.num_nests, 1))
            for var_type, coef in self.item_coef_dict.items():
                Y = Y + coef(item_x_dict[var_type.split("[")[0]], user_index)
            for var_type, coef in self.nest_coef_dict.items():
                W = W + coef(nest_x_dict[var_type.split("[")[0]], user_index)
            logP = torch.empty(T, self.num_items)
            logits = []
            for k, Bk in self.nest_to_item.items():
                avail = item_availability[:, Bk]
                any_avail = avail.any(dim=1)
                scaled = (Y[:, Bk] / lam[k]).masked_fill(~avail, -torch.inf)
                safe = torch.where(any_avail[:, None], scaled, torch.zeros_like(scaled))
                inclusive = torch.logsumexp(safe, dim=1)
                logP[:, Bk] = scaled - inclusive[:, None]
                logits.append(torch.where(any_avail, W[:, k] + lam[k] * inclusive, -torch.inf))
            logits = torch.stack(logits, dim=1)
            log_nest = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            for k, Bk in self.nest_to_item.items():
                logP[:, Bk] = logP[:, Bk] + log_nest[:, k : k + 1]
            return logP

    return Fixed


def labels(dataset) -> torch.Tensor:
    return (
        batch_of(dataset)["item"].item_index if hasattr(dataset, "datasets") else dataset.item_index
    )


def lbfgs(model, dataset, max_iter: int) -> int:
    """Full-batch L-BFGS with a strong Wolfe line search on the mean NLL; returns iterations."""
    y = labels(dataset)
    n = len(y)
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure():
        optimizer.zero_grad()
        loss = model.negative_log_likelihood(batch_of(dataset), y) / n
        loss.backward()
        return loss

    optimizer.step(closure)
    return int(optimizer.state[optimizer._params[0]]["n_iter"])


def float64_ll(model, data: common.Dense, spec: common.Spec, mask: str) -> float:
    """The log-likelihood at the fitted coefficients, evaluated in float64."""
    torch.set_default_dtype(torch.float64)
    dataset, formulas = build(data, spec)
    twin = make_model(data, spec, dataset, formulas, mask)
    state = {k: v.double() for k, v in model.state_dict().items() if k != "lambdas"}
    twin.load_state_dict(state)  # "lambdas" is an alias of lambda_weight set in forward
    with torch.no_grad():
        return -float(
            twin.negative_log_likelihood(batch_of(dataset), labels(dataset), is_train=False)
        )


def main() -> None:
    args = common.parse_args(
        __doc__,
        [
            ("--mode", {"choices": ["recipe", "lbfgs"], "default": "lbfgs"}),
            ("--dtype", {"choices": ["float32", "float64"], "default": None}),
            ("--epochs", {"type": int, "default": 500}),
            ("--max-iter", {"type": int, "default": 5000}),
            ("--nested-mask", {"choices": ["asis", "fixed"], "default": "fixed"}),
        ],
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = args.dtype or ("float32" if args.mode == "recipe" else "float64")
    torch.set_default_dtype(getattr(torch, dtype))
    spec = args.spec
    data = common.to_dense(common.read_long(args.data, spec), spec)
    dataset, formulas = build(data, spec)
    model = make_model(data, spec, dataset, formulas, args.nested_mask)

    start = time.perf_counter()
    if args.mode == "recipe" and not spec.nest:
        output = model.fit(
            dataset,
            batch_size=-1,
            learning_rate=0.01,
            num_epochs=args.epochs,
            model_optimizer="LBFGS",
            print_summary=False,
        )
        model, iterations = output.model, args.epochs
    elif args.mode == "recipe":  # fit() breaks with one lambda per nest: same settings by hand
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.01, max_iter=20, history_size=10)
        y = labels(dataset)
        for _ in range(args.epochs):

            def closure():
                optimizer.zero_grad()
                loss = model.negative_log_likelihood(batch_of(dataset), y)
                loss.backward()
                return loss

            optimizer.step(closure)
        iterations = args.epochs
    else:
        iterations = lbfgs(model, dataset, args.max_iter)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        own = -float(
            model.negative_log_likelihood(batch_of(dataset), labels(dataset), is_train=False)
        )
    ll = float64_ll(model, data, spec, args.nested_mask)
    fitted = {"lambdas": model.lambda_weight.tolist()} if spec.nest else {}
    common.emit(seconds, ll, iterations, own_ll=own, dtype=dtype, mode=args.mode, **fitted)


if __name__ == "__main__":
    main()
