"""Reference fit: float64 Newton's method in numpy, run to round-off.

Conditional logit: analytic gradient and Hessian, assembled block by block from the term
structure (item, constant and user variations), so 1,000 user slopes cost a 1,010 x 1,010 solve
and no (N, J, P) design array is ever built. Nested logit (one lambda per nest, no nest-level
terms): analytic gradient, Hessian by forward differences of it, started from the conditional
logit optimum with every lambda at 1. Both use a backtracking line search.
"""

from __future__ import annotations

import time

import common
import numpy as np

Block = tuple[str, str, int, int]  # (variable, variation, offset, size)


class Model:
    """Utilities, log-likelihood and derivatives of the (nested) logit on dense data."""

    def __init__(self, data: common.Dense, spec: common.Spec) -> None:
        self.d = data
        N, J = data.shape
        self.blocks: list[Block] = []
        offset = 0
        for var, variation in spec.terms:
            size = {"item": J, "constant": 1, "user": data.n_users}[variation]
            self.blocks.append((var, variation, offset, size))
            offset += size
        self.n_beta = offset
        free = np.ones(offset, dtype=bool)
        for _, variation, off, _ in self.blocks:
            if variation == "item":
                free[off] = False  # base alternative fixed at 0
        self.K = len(data.nests) if data.nests else 0
        self.free = np.concatenate([free, np.ones(self.K, dtype=bool)])
        self.onehot = np.zeros((N, J))
        self.onehot[np.arange(N), data.chosen] = 1.0
        self.columns = {
            var: (np.ones((N, J)) if var == "1" else data.x[var]) for var, _, _, _ in self.blocks
        }

    # -- conditional logit pieces ------------------------------------------------------------
    def index(self, variation: str) -> np.ndarray:
        """(N, J) parameter index within a block for each (case, alternative)."""
        N, J = self.d.shape
        if variation == "item":
            return np.broadcast_to(np.arange(J), (N, J))
        if variation == "user":
            return np.broadcast_to(self.d.user[:, None], (N, J))
        return np.zeros((N, J), dtype=np.int64)

    def utility(self, beta: np.ndarray) -> np.ndarray:
        V = np.zeros(self.d.shape)
        for var, variation, off, size in self.blocks:
            b = beta[off : off + size]
            if variation == "item":
                V += self.columns[var] * b
            elif variation == "user":
                V += self.columns[var] * b[self.d.user][:, None]
            else:
                V += self.columns[var] * b[0]
        return V

    def block_sums(self, G: np.ndarray) -> np.ndarray:
        """Contract a per-(case, alternative) array with the design: sum z_nj G_nj."""
        out = np.zeros(self.n_beta)
        for var, variation, off, size in self.blocks:
            W = self.columns[var] * G
            if variation == "item":
                out[off : off + size] = W.sum(axis=0)
            elif variation == "user":
                out[off : off + size] = np.bincount(self.d.user, W.sum(axis=1), size)
            else:
                out[off] = W.sum()
        return out

    def probabilities(self, V: np.ndarray) -> tuple[np.ndarray, float]:
        V = np.where(self.d.avail, V, -np.inf)
        shift = V.max(axis=1, keepdims=True)
        E = np.exp(V - shift)
        total = E.sum(axis=1, keepdims=True)
        P = E / total
        ll = float((V[np.arange(len(V)), self.d.chosen] - shift[:, 0] - np.log(total[:, 0])).sum())
        return P, ll

    def information(self, P: np.ndarray) -> np.ndarray:
        """Observed information of the conditional logit: sum_n Z_n'(diag P_n - P_n P_n')Z_n."""
        H = np.zeros((self.n_beta, self.n_beta))
        user, U = self.d.user, self.d.n_users
        zbar = {}  # per-case sum_j P z: dense (N, size), or (N,) values at index `user`
        for var, variation, _, _ in self.blocks:
            PZ = P * self.columns[var]
            zbar[var, variation] = PZ.sum(axis=1) if variation in ("constant", "user") else PZ
        for b, (vb, kb, ob, sb) in enumerate(self.blocks):
            for vc, kc, oc, sc in self.blocks[b:]:
                W = P * self.columns[vb] * self.columns[vc]
                if kb == kc == "constant":
                    A = np.array([[W.sum()]])
                else:
                    pair = (self.index(kb) * sc + self.index(kc)).ravel()
                    A = np.bincount(pair, W.ravel(), sb * sc).reshape(sb, sc)
                zb, zc = zbar[vb, kb], zbar[vc, kc]
                if kb != "user" and kc != "user":
                    B = _dense(zb).T @ _dense(zc)
                elif kb == kc == "user":
                    B = np.diag(np.bincount(user, zb * zc, U))
                elif kc == "user":
                    B = _with_user(_dense(zb), zc, user, U)
                else:
                    B = _with_user(_dense(zc), zb, user, U).T
                H[ob : ob + sb, oc : oc + sc] = A - B
                H[oc : oc + sc, ob : ob + sb] = (A - B).T
        return H

    # -- nested logit --------------------------------------------------------------------------
    def nested(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Log-likelihood and gradient; theta = (betas, lambdas)."""
        beta, lam = theta[: self.n_beta], theta[self.n_beta :]
        d, N = self.d, self.d.shape[0]
        rows = np.arange(N)
        nest = d.nest_of_item
        Y = self.utility(beta)
        S = np.where(d.avail, Y / lam[nest], -np.inf)
        inclusive = np.full((N, self.K), -np.inf)
        for k in range(self.K):
            s_k = S[:, nest == k]
            m = s_k.max(axis=1)
            ok = np.isfinite(m)
            inclusive[ok, k] = m[ok] + np.log(np.exp(s_k[ok] - m[ok, None]).sum(axis=1))
        present = np.isfinite(inclusive)
        A = np.where(present, lam * np.where(present, inclusive, 0.0), -np.inf)
        a_max = A.max(axis=1, keepdims=True)
        Q = np.exp(A - a_max)
        lse = a_max[:, 0] + np.log(Q.sum(axis=1))
        Q /= Q.sum(axis=1, keepdims=True)  # P(nest)
        c, kc = d.chosen, nest[d.chosen]
        I_c = inclusive[rows, kc]
        ll = float((S[rows, c] - I_c + A[rows, kc] - lse).sum())

        q = np.where(d.avail, np.exp(S - np.where(present, inclusive, 0.0)[:, nest]), 0.0)
        Sq = np.where(d.avail, S, 0.0) * q
        sbar = np.stack([Sq[:, nest == k].sum(axis=1) for k in range(self.K)], axis=1)
        in_chosen = nest[None, :] == kc[:, None]  # (N, J)
        lam_j = lam[nest]
        dY = self.onehot / lam_j + in_chosen * (lam_j - 1) * q / lam_j - Q[:, nest] * q
        gap = np.where(present, np.where(present, inclusive, 0.0) - sbar, 0.0)  # I_k - sbar_k
        dlam = -(Q * gap).sum(axis=0)
        s_c = S[rows, c]
        own = (sbar[rows, kc] - s_c) / lam[kc] + gap[rows, kc]
        dlam += np.bincount(kc, own, self.K)
        return ll, np.concatenate([self.block_sums(dY), dlam])


def _dense(z: np.ndarray) -> np.ndarray:
    return z[:, None] if z.ndim == 1 else z


def _with_user(Z: np.ndarray, s: np.ndarray, user: np.ndarray, U: int) -> np.ndarray:
    """sum_n Z[n, :] outer (s_n e_user(n)) as a (size, U) array."""
    size = Z.shape[1]
    pair = (np.arange(size)[None, :] * U + user[:, None]).ravel()
    return np.bincount(pair, (Z * s[:, None]).ravel(), size * U).reshape(size, U)


def newton(
    value,
    information,
    theta: np.ndarray,
    free: np.ndarray,
    lazy: bool = False,
    lower: np.ndarray | None = None,
    max_iter: int = 100,
) -> tuple[np.ndarray, float, int]:
    """Maximise with Newton steps on the free parameters and a backtracking line search.

    value(theta) -> (ll, grad); information(theta, grad) -> minus the Hessian. With lazy=True
    the Hessian is kept while each step's Newton decrement falls at least tenfold (a chord
    method, for Hessians that cost many gradient evaluations).
    """
    ll, grad = value(theta)
    H, last_decrement = None, np.inf
    for iteration in range(1, max_iter + 1):
        g = grad[free]
        if H is None or not lazy:
            H = information(theta, grad)[np.ix_(free, free)]
        try:
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, g, rcond=None)[0]
        if g @ step <= 0:  # not an ascent direction: fall back to the gradient
            step = g / max(1.0, np.abs(g).max())
        decrement = float(g @ step)
        if decrement < 1e-11:
            return theta, ll, iteration - 1
        if decrement > last_decrement / 10:
            H = None  # slow progress: refresh the Hessian next time
        last_decrement = decrement
        t = 1.0
        while True:
            trial = theta.copy()
            trial[free] += t * step
            if lower is None or np.all(trial >= lower):
                ll_new, grad_new = value(trial)
                if ll_new >= ll - 1e-13 * abs(ll):
                    break
            t /= 2
            if t < 1e-10:
                return theta, ll, iteration
        ll_old, theta, ll, grad = ll, trial, ll_new, grad_new
        if abs(ll - ll_old) < 1e-15 * abs(ll):
            return theta, ll, iteration
    return theta, ll, max_iter


def fit(data: common.Dense, spec: common.Spec) -> tuple[np.ndarray, float, int]:
    """Newton on the conditional logit, then (nested data) on the nested logit from there."""
    model = Model(data, spec)
    cache: dict = {}

    def value(beta: np.ndarray) -> tuple[float, np.ndarray]:
        P, ll = model.probabilities(model.utility(beta))
        cache["P"] = P
        return ll, model.block_sums(model.onehot - P)

    def information(beta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        return model.information(cache["P"])  # P of the last accepted point

    beta, ll, iterations = newton(
        value, information, np.zeros(model.n_beta), model.free[: model.n_beta]
    )
    if not model.K:
        return beta, ll, iterations

    def nested_information(theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        info = np.zeros((theta.size, theta.size))
        for i in np.flatnonzero(model.free):  # forward differences of the analytic gradient
            h = 1e-6 * max(1.0, abs(theta[i]))
            shifted = theta.copy()
            shifted[i] += h
            info[:, i] = -(model.nested(shifted)[1] - grad) / h
        return (info + info.T) / 2

    theta0 = np.concatenate([beta, np.ones(model.K)])
    lower = np.concatenate([np.full(model.n_beta, -np.inf), np.full(model.K, 0.01)])
    theta, ll, more = newton(
        model.nested, nested_information, theta0, model.free, lazy=True, lower=lower
    )
    return theta, ll, iterations + more


def main() -> None:
    args = common.parse_args(__doc__)
    data = common.to_dense(common.read_long(args.data, args.spec), args.spec)
    start = time.perf_counter()
    theta, ll, iterations = fit(data, args.spec)
    seconds = time.perf_counter() - start
    free = Model(data, args.spec).free[: theta.size]
    common.emit(seconds, ll, iterations, parameters=int(free.sum()))


if __name__ == "__main__":
    main()
