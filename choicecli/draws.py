"""Simulation draws for the mixed logit: standard-uniform points, then mixing distributions.

Notation: U units that get their own draws (users for a panel, cases otherwise), R draws per unit,
K dimensions (random coefficients). Uniform draws have shape (U, R, K) and lie in (0, 1).

Kinds (all reproducible by seed; all generated on the CPU, then moved to the device asked for, so
the same seed gives the same draws on any device):
- 'halton': one Halton sequence per dimension (the k-th prime as base), its first `drop` points
  dropped, points drop + u * R + r given to unit u, draw r (Train's layout; xlogit's too).
  Scrambled by default: every digit position of every dimension gets its own random permutation of
  the nonzero digits (0 stays 0, so expansions stay finite), which breaks the correlation between
  the sequences of larger primes. With scramble=False the points are the plain Halton sequence.
- 'sobol': torch.quasirandom.SobolEngine, scrambled by it by default (seeded), points u * R + r.
- 'mlhs': modified Latin hypercube sampling (Hess, Train and Polak 2006): for each unit and each
  dimension, the R points (r + shift) / R with one uniform shift, shuffled along r independently
  per dimension.
- 'pseudo': independent uniforms from a seeded torch.Generator.

Distributions turn a uniform u into a coefficient from a mean m and a spread s; the standard draw
t(u) of each (the value at m = 0, s = 1; for the truncated normal, u itself) is what the model
keeps:
- 'normal': m + s * z, z = Phi^-1(u).
- 'lognormal': exp(m + s * z): positive; m and s are the mean and sd of its logarithm.
- 'uniform': m + s * (2u - 1): uniform on [m - |s|, m + |s|].
- 'triangular': m + s * t, t symmetric triangular on [-1, 1]: on [m - |s|, m + |s|], peak at m.
- 'truncated_normal': N(m, s^2) truncated below at 0 (support (0, inf); a coefficient that must
  be positive), by the inverse CDF: m + |s| * z with z = -Phi^-1((1 - u) * Phi(m / |s|)). Not
  xlogit's 'tn', which is censored (max(0, m + s * z), a point mass at 0). For a coefficient that
  must be negative, negate its variable.
"""

from __future__ import annotations

import math

import torch

from choicecli.errors import ModelError

DRAW_KINDS = ("halton", "sobol", "mlhs", "pseudo")
DISTRIBUTIONS = ("normal", "lognormal", "uniform", "triangular", "truncated_normal")
# draws per unit unless --draws says: with 500 scrambled Halton points every estimate of the
# electricity panel (6 normal coefficients) lies within 1.8 of xlogit's standard errors of its
# published ones (at 200, 2.4: simulated maximum likelihood's bias at few draws); README
DEFAULT_DRAWS = 500
HALTON_DROP = 100  # Halton points dropped at the start (xlogit drops 100, Train 10 or more)
# truncated normal: m / |s| is clamped to this, so that a zero spread gives finite draws
TRUNCATION_RATIO_LIMIT = 30.0


def first_primes(count: int) -> list[int]:
    """The first `count` primes (Halton bases)."""
    primes: list[int] = []
    candidate = 2
    while len(primes) < count:
        if all(candidate % prime for prime in primes if prime * prime <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def halton_points(
    n_points: int,
    n_dimensions: int,
    drop: int = HALTON_DROP,
    scramble: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Points drop .. drop + n_points - 1 of the K-dimensional Halton sequence. (n_points, K)"""
    generator = torch.Generator().manual_seed(seed)
    index = torch.arange(drop, drop + n_points, dtype=torch.int64)  # (n,)
    largest = max(drop + n_points - 1, 1)
    columns = []
    for base in first_primes(n_dimensions):
        n_digits = int(math.floor(math.log(largest, base))) + 2  # one spare against rounding
        value = torch.zeros(n_points, dtype=torch.float64)  # (n,)
        remaining = index.clone()  # (n,)
        scale = 1.0 / base
        for _ in range(n_digits):
            digit = remaining % base  # (n,)
            if scramble:
                nonzero = torch.randperm(base - 1, generator=generator) + 1  # (base - 1,)
                permutation = torch.cat([torch.zeros(1, dtype=torch.int64), nonzero])  # (base,)
                digit = permutation[digit]
            value += digit.to(torch.float64) * scale
            remaining = remaining // base
            scale /= base
        columns.append(value)
    return torch.stack(columns, dim=1)  # (n, K)


def uniform_draws(
    n_units: int,
    n_draws: int,
    n_dimensions: int,
    kind: str = "halton",
    seed: int = 0,
    scramble: bool = True,
    drop: int = HALTON_DROP,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard-uniform draws in (0, 1), float64. (U, R, K)

    scramble and drop apply to Halton (drop: points skipped at the start), scramble to Sobol.
    """
    if kind not in DRAW_KINDS:
        raise ModelError(f"unknown draw kind '{kind}'; use one of {', '.join(DRAW_KINDS)}")
    if n_units < 1 or n_draws < 1 or n_dimensions < 0:
        raise ModelError(
            f"draws need at least one unit and one draw (got {n_units} units, {n_draws} draws)"
        )
    n_points = n_units * n_draws
    if n_dimensions == 0:
        points = torch.empty((n_points, 0), dtype=torch.float64)
    elif kind == "halton":
        points = halton_points(n_points, n_dimensions, drop=drop, scramble=scramble, seed=seed)
    elif kind == "sobol":
        if n_dimensions > torch.quasirandom.SobolEngine.MAXDIM:
            raise ModelError(
                f"Sobol draws support at most {torch.quasirandom.SobolEngine.MAXDIM} dimensions"
            )
        engine = torch.quasirandom.SobolEngine(n_dimensions, scramble=scramble, seed=seed)
        points = engine.draw(n_points, dtype=torch.float64)  # (n, K)
        if not scramble:
            points = points.clamp(min=0.5 / n_points)  # the unscrambled first point is 0
    elif kind == "mlhs":
        generator = torch.Generator().manual_seed(seed)
        shift = torch.rand((n_units, 1, n_dimensions), generator=generator, dtype=torch.float64)
        grid = torch.arange(n_draws, dtype=torch.float64).view(1, n_draws, 1)  # (1, R, 1)
        ordered = (grid + shift) / n_draws  # (U, R, K)
        keys = torch.rand((n_units, n_draws, n_dimensions), generator=generator)  # (U, R, K)
        return torch.gather(ordered, 1, keys.argsort(dim=1)).to(device)  # (U, R, K)
    else:
        generator = torch.Generator().manual_seed(seed)
        shape = (n_units, n_draws, n_dimensions)
        points = torch.rand(shape, generator=generator, dtype=torch.float64)
        points = points.clamp(min=torch.finfo(torch.float64).tiny)  # never exactly 0
        return points.to(device)  # (U, R, K)
    return points.view(n_units, n_draws, n_dimensions).to(device)  # (U, R, K)


def _triangular(uniform: torch.Tensor) -> torch.Tensor:
    """Symmetric triangular on [-1, 1] by the inverse CDF."""
    lower = torch.sqrt(2.0 * uniform) - 1.0
    upper = 1.0 - torch.sqrt(2.0 * (1.0 - uniform))
    return torch.where(uniform <= 0.5, lower, upper)


def standard_draws(uniform: torch.Tensor, distribution: str) -> torch.Tensor:
    """The distribution's standard draw t(u): Phi^-1(u) for normal and lognormal, 2u - 1 for
    uniform, triangular on [-1, 1], and u itself for the truncated normal (its shape depends on
    m / s, so the coefficient is formed from u)."""
    if distribution in ("normal", "lognormal"):
        return torch.special.ndtri(uniform)
    if distribution == "uniform":
        return 2.0 * uniform - 1.0
    if distribution == "triangular":
        return _triangular(uniform)
    if distribution == "truncated_normal":
        return uniform.clone()
    raise ModelError(
        f"unknown distribution '{distribution}'; use one of {', '.join(DISTRIBUTIONS)}"
    )


def _normal_density(value: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * value * value) / math.sqrt(2.0 * math.pi)


def coefficients_and_derivatives(
    distribution: str, mean: torch.Tensor, spread: torch.Tensor, draw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """beta(m, s, t) and its derivatives d beta / d m and d beta / d s, elementwise.

    mean and spread broadcast against the standard draws `draw` (from standard_draws).
    """
    if distribution in ("normal", "uniform", "triangular"):
        coefficient = mean + spread * draw
        return coefficient, torch.ones_like(coefficient), draw.expand_as(coefficient)
    if distribution == "lognormal":
        coefficient = torch.exp(mean + spread * draw)
        return coefficient, coefficient, coefficient * draw
    if distribution == "truncated_normal":
        return _truncated_normal(mean, spread, draw)
    raise ModelError(
        f"unknown distribution '{distribution}'; use one of {', '.join(DISTRIBUTIONS)}"
    )


def _truncated_normal(
    mean: torch.Tensor, spread: torch.Tensor, uniform: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N(m, s^2) truncated below at 0, as m + |s| z, z = -Phi^-1((1 - u) Phi(m / |s|)).

    d beta / d m = 1 - (1 - u) phi(c) / phi(z) and d beta / d|s| = z + (1 - u) phi(c) c / phi(z),
    with c = m / |s| (clamped to +-TRUNCATION_RATIO_LIMIT, so a zero spread gives beta = m when
    m > 0).
    """
    scale = spread.abs()
    tiny = torch.finfo(torch.float64).tiny
    ratio = (mean / scale.clamp(min=tiny)).clamp(-TRUNCATION_RATIO_LIMIT, TRUNCATION_RATIO_LIMIT)
    tail = (1.0 - uniform) * torch.special.ndtr(ratio)  # (.., ) in (0, Phi(c))
    draw = -torch.special.ndtri(tail)
    coefficient = mean + scale * draw
    ratio_density = _normal_density(ratio)
    factor = (1.0 - uniform) * ratio_density / _normal_density(draw)
    d_mean = 1.0 - factor
    d_scale = draw + factor * ratio
    return coefficient, d_mean, d_scale * torch.sign(spread)
