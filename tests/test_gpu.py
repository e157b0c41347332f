"""The CUDA path: same estimates on the GPU as on the CPU. Skipped without a CUDA device."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from choicecli.data import Roles
from choicecli.fit import FitOptions, fit_model
from choicecli.problem import ModelSpec
from conftest import MODE_CANADA_FORMULA, SAMPLE_DATA

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_mode_canada_on_cuda_matches_cpu(mode_canada_parquet):
    frame = pl.read_parquet(mode_canada_parquet)
    spec = ModelSpec(MODE_CANADA_FORMULA, Roles(case="case", item="alt", choice="choice"))
    cpu, _ = fit_model(frame, spec, FitOptions(device="cpu"), where="mc")
    gpu, _ = fit_model(frame, spec, FitOptions(device="cuda"), where="mc")
    assert gpu.fit["device"].startswith("cuda")
    assert torch.allclose(gpu.estimate, cpu.estimate, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert torch.allclose(gpu.std_error, cpu.std_error, rtol=1e-7, equal_nan=True)


def test_nested_and_user_terms_on_cuda_match_cpu():
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    roles = Roles(case="case_id", item="mode", choice="chosen", user="user_id")
    spec = ModelSpec("(time|constant) + (1|item) + (cost|user)", roles,
                     nests="slow=walk,bike;motor=bus,car,train", shared_lambda=True)  # fmt: skip
    cpu, _ = fit_model(frame, spec, FitOptions(device="cpu"), where="t")
    gpu, _ = fit_model(frame, spec, FitOptions(device="cuda"), where="t")
    assert gpu.fit["log_likelihood"] == pytest.approx(cpu.fit["log_likelihood"], abs=1e-8)
