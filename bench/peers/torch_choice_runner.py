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


def build(data: common.Dense, spec: common.Spec):
    """ChoiceDataset (or JointDataset) and formula; observables named by torch-choice prefix."""
    from torch_choice.data import ChoiceDataset, JointDataset

    N, J = data.shape
    observables, terms = {}, []
    for var, variation in spec.terms:
        if var == "1":
            terms.append(f"(intercept|{variation})")
            continue
        if common.case_constant(data.x[var], data.avail):
            name = f"session_{var}"  # (N, 1): constant within case
            observables[name] = torch.tensor(common.per_case(data.x[var], data.avail)[:, None])
        else:
            name = f"itemsession_{var}"  # (N, J, 1)
            observables[name] = torch.tensor(data.x[var][:, :, None])
        terms.append(f"({name}|{variation})")
    dtype = torch.get_default_dtype()
    observables = {k: v.to(dtype) for k, v in observables.items()}
    extra = {"user_index": torch.tensor(data.user)} if spec.has_user_terms else {}
    items = ChoiceDataset(
        item_index=torch.tensor(data.chosen),
        session_index=torch.arange(N),
        item_availability=torch.tensor(data.avail),
        **extra,
        **observables,
    )
    for name, value in observables.items():
        setattr(items, name, value)  # ChoiceDataset casts observables to float32: undo that
    formula = " + ".join(terms)
    if not spec.nest:
        return items, formula
    nest_of_chosen = torch.tensor(data.nest_of_item[data.chosen])
    nests = ChoiceDataset(item_index=nest_of_chosen, session_index=torch.arange(N), **extra)
    return JointDataset(item=items, nest=nests), formula


def batch_of(dataset):
    """What negative_log_likelihood takes: the dataset, or a JointDataset's dict of datasets."""
    return dataset.datasets if hasattr(dataset, "datasets") else dataset


def make_model(data: common.Dense, spec: common.Spec, dataset, formula: str, mask: str):
    from torch_choice.model import ConditionalLogitModel, NestedLogitModel

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
        nest_formula="",
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
    dataset, formula = build(data, spec)
    twin = make_model(data, spec, dataset, formula, mask)
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
    dataset, formula = build(data, spec)
    model = make_model(data, spec, dataset, formula, args.nested_mask)

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
    common.emit(seconds, ll, iterations, own_ll=own, dtype=dtype, mode=args.mode)


if __name__ == "__main__":
    main()
