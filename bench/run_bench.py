"""Benchmark `choice fit` against torch-choice, xlogit and biogeme, and a float64 Newton reference.

Every tool runs in its own process on the same Parquet file and model, one thread each; the
harness measures whole-process wall time and peak RSS (os.wait4), and reads fit seconds,
log-likelihood and iterations from the tool (choice: DIR/model.json; peers: one JSON line).
Memory scenarios also fit the first cases alone (the process baseline) and read one copy of
the used data (rows x used columns x 8 bytes) from the Parquet metadata.
Results: a table on stdout, bench/results/latest.md and bench/results/latest.json.

Run through bench/run.sh, which builds the peers' environment (.bench-venv) first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# the environment the harness was started in, for the tools: importing polars (generate does)
# writes polars' allocator defaults into os.environ, and tools must not inherit them from us
CALLER_ENVIRONMENT = dict(os.environ)

import generate  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
PRODUCT_PYTHON = ROOT / ".venv" / "bin" / "python"
CHOICE = ROOT / ".venv" / "bin" / "choice"

CL22 = [
    ("1", "item"),
    ("x1", "constant"),
    ("x2", "constant"),
    ("x3", "constant"),
    ("x4", "constant"),
    ("income", "item"),
]
USERS = [("1", "item"), ("x1", "user"), ("x2", "constant")]
# torch-choice's post-estimation tutorial (issue 14): globs name a block of several columns
TUTORIAL_ITEM = [
    ("1", "constant"),
    ("1", "item"),
    ("1", "user"),
    ("user_obs_*", "item"),
    ("item_obs_*", "constant"),
    ("session_obs_*", "user"),
    ("itemsession_obs_*", "item"),
    ("itemsession_obs_*", "user"),
]
TUTORIAL_NEST = [("1", "user"), ("1", "item"), ("nest_obs_*", "user")]
LARGE_ITEM = [("1", "item"), ("x1", "constant"), ("x2", "constant"), ("x3", "user")]
LARGE_NEST = [("1", "item"), ("1", "user"), ("z", "user")]
FIT_TOOLS = ["choice", "newton", "xlogit", "biogeme", "tc_recipe", "tc_lbfgs"]
LOAD_TOOLS = ["choice_parquet", "polars_parquet", "choice_csv", "polars_csv"]
LL_TARGET = 1e-8


@dataclass
class Scenario:
    """One benchmark: a data set, a model, and which tools are skipped and why."""

    name: str
    dataset: str
    description: str
    terms: list[tuple[str, str]] = field(default_factory=lambda: CL22)
    nest: str | None = None
    nest_terms: list[tuple[str, str]] = field(default_factory=list)  # --nest-formula
    lambda_bounds: str | None = None  # --lambda-bounds LOW,HIGH (choice alone)
    session: bool = False  # pass --session session
    timeout: float | None = None  # seconds per tool run, below --timeout
    runaway: bool = False  # no optimum: choice should stop with exit 3, quickly
    reference_tool: str = "newton"  # whose log-likelihood the gaps are measured against
    kind: str = "fit"  # or "load"
    projected: dict[str, str] = field(default_factory=dict)  # skipped unless --all
    unsupported: dict[str, str] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)  # fit, whole (s), rss_gb, rss_ratio
    memory: bool = False  # also: baseline RSS, one copy of the used data, and their ratio

    @property
    def used_columns(self) -> list[str]:
        """Every column the choice command reads: roles, formula variables (globs as written),
        nests."""
        roles = ["case", "item", "choice"] + (["user"] if self.has_users else [])
        roles += ["session"] if self.session else []
        variables = [v for v, _ in self.terms + self.nest_terms if v != "1"]
        return list(dict.fromkeys(roles + variables + ([self.nest] if self.nest else [])))

    @property
    def formula(self) -> str:
        return " + ".join(f"({v}|{k})" for v, k in self.terms)

    @property
    def nest_formula(self) -> str:
        return " + ".join(f"({v}|{k})" for v, k in self.nest_terms)

    @property
    def has_users(self) -> bool:
        return any(k == "user" for _, k in self.terms + self.nest_terms)


NO_NESTED_USERS = "no nested logit or user-specific coefficients"
TOO_LARGE_FOR_PEERS = "90M rows: run for choice on a GPU alone"
CHOICE_ONLY = "memory scenario: choice alone, its peak RSS against one copy of the data"
NO_REFERENCE = (
    "unidentified and nest-level terms are beyond the numpy reference; gaps are against tc_lbfgs"
)
TUTORIAL_DATA = (
    "10k cases x 25 items (every one offered) in 5 nests of 5, 100 users, 500 sessions; "
    "observables N(0, 1): 8 user, 4 item, 3 session, 2 item-session, 4 nest"
)
TUTORIAL_PEERS = {
    "newton": NO_REFERENCE,
    "xlogit": NO_NESTED_USERS,
    "biogeme": "per-user coefficients need an indicator term per user; not run",
    "tc_recipe": "lr 0.01 without line search: 75-100 s and short of the optimum (PEERS.md)",
}
SCENARIOS = {
    s.name: s
    for s in [
        Scenario("cl_10k", "cl_10k", "10k cases x 10 alternatives (10% missing), 22 parameters"),
        Scenario(
            "cl_100k",
            "cl_100k",
            "100k cases x 10 alternatives (10% missing), 22 parameters",
            projected={"tc_recipe": "~270 s fit (PEERS.md, projected)"},
            targets={"fit": 1.0, "whole": 4.0},
        ),
        Scenario(
            "cl_1m",
            "cl_1m",
            "1M cases x 10 alternatives (10% missing), 22 parameters",
            projected={
                "tc_recipe": "~4,900 s fit (PEERS.md, projected)",
                "biogeme": "~900 s fit (PEERS.md, projected)",
                "xlogit": "~320-430 s fit (PEERS.md, projected)",
            },
            targets={"fit": 10.0, "whole": 15.0, "rss_gb": 3.0},
        ),
        Scenario(
            "alts_100",
            "cl_100alts",
            "100k cases x 100 alternatives (10% missing), 202 parameters",
            projected={
                "tc_recipe": "far beyond 300 s (PEERS.md: ~270 s at 10 alts)",
                "xlogit": "out of memory at 23.7 GB (PEERS.md)",
            },
            targets={"fit": 15.0, "rss_gb": 3.0},
        ),
        Scenario(
            "users_1k",
            "users_1k",
            "100k cases x 10 alternatives, 1,000 user-specific x1 slopes (1,010 parameters)",
            terms=USERS,
            projected={"tc_recipe": "~270 s fit at 100k (PEERS.md, projected)"},
            unsupported={
                "xlogit": NO_NESTED_USERS,
                "biogeme": "needs 1,000 user-indicator terms per utility; not run",
            },
            targets={"fit": 2.0},
        ),
        Scenario(
            "nested_3",
            "nested_3",
            "nested logit, 3 nests, 100k cases x 10 alternatives (10% missing), 22 + 3 lambdas",
            nest="nest",
            projected={
                "tc_recipe": "~270 s fit at 100k (PEERS.md, projected)",
                "biogeme": "~800 s (PEERS.md: 81 s at 10k cases)",
            },
            unsupported={"xlogit": NO_NESTED_USERS},
            targets={"fit": 3.0},
        ),
        Scenario(
            "tutorial_cl",
            "tutorial_random",
            "torch-choice tutorial, conditional logit: " + TUTORIAL_DATA + "; random choices; "
            "about 470 estimable coefficients (the rest reported unidentified)",
            terms=TUTORIAL_ITEM,
            session=True,
            unsupported=TUTORIAL_PEERS,
            reference_tool="tc_lbfgs",
            targets={"fit": 1.5, "whole": 4.0},
        ),
        Scenario(
            "tutorial_nested",
            "tutorial_random",
            "torch-choice tutorial, nested logit with --lambda-bounds 0.01,1: "
            + TUTORIAL_DATA
            + "; random choices; about 1,400 coefficients and 5 lambdas",
            terms=TUTORIAL_ITEM,
            nest="nest",
            nest_terms=TUTORIAL_NEST,
            lambda_bounds="0.01,1",
            session=True,
            unsupported=TUTORIAL_PEERS
            | {"tc_lbfgs": "no bounds on lambda (its unbounded fit is tutorial_runaway)"},
            targets={"fit": 5.0, "whole": 8.0},
        ),
        Scenario(
            "tutorial_runaway",
            "tutorial_random",
            "torch-choice tutorial, nested logit without bounds: no optimum (the likelihood "
            "rises as lambdas grow); choice should stop with exit 3 and say so; timeout 300 s",
            terms=TUTORIAL_ITEM,
            nest="nest",
            nest_terms=TUTORIAL_NEST,
            session=True,
            unsupported=TUTORIAL_PEERS,
            timeout=300.0,
            runaway=True,
            reference_tool="",
            targets={"whole": 30.0},
        ),
        Scenario(
            "tutorial_nested_sim",
            "tutorial_sim",
            "tutorial-shaped nested logit simulated from known coefficients (per-user terms at "
            "both levels, lambdas 0.5 to 0.8: an interior optimum): "
            + TUTORIAL_DATA
            + "; the tutorial's formulas, about 1,400 coefficients and 5 lambdas",
            terms=TUTORIAL_ITEM,
            nest="nest",
            nest_terms=TUTORIAL_NEST,
            session=True,
            unsupported=TUTORIAL_PEERS,
            reference_tool="tc_lbfgs",
            targets={"fit": 5.0, "whole": 8.0},
        ),
        Scenario(
            "nested_100k_users",
            "nested_100k",
            "nested logit simulated: 100k cases x 25 items (every one offered) in 5 nests of 5, "
            "1,000 users; about 3,000 coefficients (1,000 of them the nest-level (1|user), "
            "which cancels) and 5 lambdas; peak RSS checked",
            terms=LARGE_ITEM,
            nest="nest",
            nest_terms=LARGE_NEST,
            unsupported=TUTORIAL_PEERS | {"tc_recipe": "~270 s at 100k x 10 already (PEERS.md)"},
            reference_tool="tc_lbfgs",
            targets={"fit": 60.0, "rss_gb": 4.0},
        ),
        Scenario(
            "mem_10m",
            "cl_10m",
            "memory: 1.1M cases x 10 alternatives (10% missing, 10M rows), 22 parameters",
            unsupported={tool: CHOICE_ONLY for tool in FIT_TOOLS if tool != "choice"},
            targets={"rss_ratio": 1.5},
            memory=True,
        ),
        Scenario(
            "cl_10m_cases",
            "cl_10m_cases",
            "10M cases x 10 alternatives (10% missing, 90M rows), 22 parameters; with a GPU",
            projected={tool: TOO_LARGE_FOR_PEERS for tool in FIT_TOOLS if tool != "choice"},
        ),
        Scenario(
            "load_10k",
            "cl_10k",
            "loading alone: 10k cases (90k rows), Parquet and CSV",
            kind="load",
        ),
        Scenario(
            "load_1m", "cl_1m", "loading alone: 1M cases (9M rows), Parquet and CSV", kind="load"
        ),
    ]
}
DEFAULT = [
    "cl_10k",
    "cl_100k",
    "cl_1m",
    "alts_100",
    "users_1k",
    "nested_3",
    "mem_10m",
    "load_1m",
]
QUICK = ["cl_10k", "load_10k"]
TUTORIAL = [
    "tutorial_cl",
    "tutorial_nested",
    "tutorial_runaway",
    "tutorial_nested_sim",
    "nested_100k_users",
]
GPU_EXTRA = ["cl_10m_cases"]  # default scenarios added with --device cuda


@dataclass
class Row:
    """One tool on one scenario."""

    tool: str
    status: str  # ok, not-converged, error, timeout, projected, unsupported, skipped
    fit_seconds: float | None = None
    whole_seconds: float | None = None
    cpu_seconds: float | None = None  # user + system CPU time of the whole process
    peak_rss_mb: float | None = None
    log_likelihood: float | None = None
    iterations: int | None = None
    rel_ll_gap: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def thread_env(threads: int, device: str = "cpu") -> dict[str, str]:
    """The environment every tool runs in: the caller's, with pinned threads, no colour, and
    no GPU unless `device` names one."""
    env = dict(CALLER_ENVIRONMENT)
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "POLARS_MAX_THREADS",
        "RAYON_NUM_THREADS",
    ):
        env[var] = str(threads)
    env |= {"NO_COLOR": "1", "PYTHONWARNINGS": "ignore"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


SETTLE_SECONDS = 3.0
# a tool whose first run takes under this many seconds takes it as a warm-up and runs --repeat
# more times; rows give medians
REPEAT_UNDER_SECONDS = 60.0


def settle(data: Path) -> None:
    """Before each timed run, the same start for every tool: the data file in the page cache
    (a heavy earlier run may have pushed it out) and a pause for the memory the last run freed."""
    with data.open("rb") as handle:
        while handle.read(1 << 23):
            pass
    time.sleep(SETTLE_SECONDS)


def run_process(cmd: list[str], timeout: float, env: dict, cwd: Path) -> dict:
    """Run one command; wall time, peak RSS of its process tree, exit code, output tails."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True
        )
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "wall": wall,
            "rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
            "cpu": usage.ru_utime + usage.ru_stime,
            "code": proc.returncode,
            "timed_out": timed_out,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[-400:]


def peer_command(tool: str, scenario: Scenario, data: Path) -> list[str]:
    spec = {"terms": scenario.terms, "nest": scenario.nest, "nest_terms": scenario.nest_terms}
    script, extra = {
        "newton": ("newton_reference.py", []),
        "xlogit": ("xlogit_runner.py", []),
        "biogeme": ("biogeme_runner.py", []),
        "tc_recipe": ("torch_choice_runner.py", ["--mode", "recipe"]),
        "tc_lbfgs": ("torch_choice_runner.py", ["--mode", "lbfgs"]),
    }[tool]
    return [
        sys.executable,
        str(PEERS / script),
        "--data",
        str(data),
        "--spec",
        json.dumps(spec),
    ] + extra


def choice_command(
    scenario: Scenario, data: Path, model_dir: Path, device: str = "cpu"
) -> list[str]:
    cmd = [
        str(CHOICE),
        "fit",
        str(data),
        "--formula",
        scenario.formula,
        "--case",
        "case",
        "--item",
        "item",
        "--choice",
        "choice",
    ]
    if scenario.has_users:
        cmd += ["--user", "user"]
    if scenario.session:
        cmd += ["--session", "session"]
    if scenario.nest:
        cmd += ["--nests", f"col:{scenario.nest}", "--nest-formula", scenario.nest_formula]
    if scenario.lambda_bounds:
        cmd += ["--lambda-bounds", scenario.lambda_bounds]
    return cmd + ["--device", device, "--model", str(model_dir), "--quiet"]


def repeated(run_once, repeat: int) -> Row:
    """Run a tool once; when that run takes under REPEAT_UNDER_SECONDS and `repeat` >= 1, it
    was a warm-up (the tool's interpreter and libraries come into the page cache, as the data
    file does before every run) and `repeat` timed runs follow: the row holds each figure's
    median over them and the largest peak RSS of all, every run (the warm-up too) in extra."""
    first = run_once()
    if (
        repeat < 1
        or first.status not in ("ok", "not-converged")
        or (first.whole_seconds or math.inf) >= REPEAT_UNDER_SECONDS
    ):
        return first
    rows = [run_once() for _ in range(repeat)]
    row = rows[0]
    if any(r.status != row.status for r in rows):
        return row

    def median(values: list) -> float | None:
        present = sorted(v for v in values if v is not None)
        return present[len(present) // 2] if len(present) == len(values) else None

    def figures(run: Row) -> dict:
        return {"fit_seconds": run.fit_seconds, "whole_seconds": run.whole_seconds,
                "cpu_seconds": run.cpu_seconds, "rss_mb": run.peak_rss_mb}  # fmt: skip

    runs = [figures(r) for r in rows]  # before `row` (the first timed run) takes the medians
    row.fit_seconds = median([r.fit_seconds for r in rows])
    row.whole_seconds = median([r.whole_seconds for r in rows])
    row.cpu_seconds = median([r.cpu_seconds for r in rows])
    row.peak_rss_mb = max(r.peak_rss_mb for r in [first, *rows])
    row.extra["runs"] = runs
    row.extra["warm_up"] = figures(first)
    row.note = (row.note + "; " if row.note else "") + f"median of {len(rows)} runs after a warm-up"
    return row


def run_tool(tool: str, scenario: Scenario, data: Path, args, env: dict) -> Row:
    """Run one tool on one fit scenario in its own process (repeated: see `repeated`)."""
    return repeated(lambda: run_tool_once(tool, scenario, data, args, env), args.repeat)


def run_tool_once(tool: str, scenario: Scenario, data: Path, args, env: dict) -> Row:
    """Run one tool on one fit scenario in its own process, once."""
    if not CHOICE.exists() and tool == "choice":
        return Row(tool, "error", note=f"{CHOICE.relative_to(ROOT)} not found (not installed)")
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-") as scratch:
        model_dir = Path(scratch) / "model"
        cmd = (
            choice_command(scenario, data, model_dir, args.device)
            if tool == "choice"
            else peer_command(tool, scenario, data)
        )
        settle(data)
        timeout = min(args.timeout, scenario.timeout or math.inf)
        result = run_process(cmd, timeout, env, Path(scratch))
        row = Row(tool, "ok", whole_seconds=result["wall"], peak_rss_mb=result["rss_mb"])
        row.cpu_seconds = result["cpu"]
        if result["timed_out"]:
            row.status, row.note = "timeout", f"killed after {timeout:.0f} s"
            return row
        if tool == "choice":
            return read_choice(row, result, model_dir)
        record = last_json(result["stdout"])
        if result["code"] != 0 or record is None:
            row.status = "error"
            row.note = f"exit {result['code']}: " + tail(result["stderr"] or result["stdout"])
            return row
        row.fit_seconds = record.pop("fit_seconds")
        row.log_likelihood = record.pop("log_likelihood")
        row.iterations = record.pop("iterations")
        row.extra = record
        if not math.isfinite(row.log_likelihood):
            row.status, row.note = "error", f"log-likelihood is {row.log_likelihood}"
            row.log_likelihood = None
        return row


def read_choice(row: Row, result: dict, model_dir: Path) -> Row:
    """Fill a choice row from its exit code and DIR/model.json (key `fit`)."""
    if result["code"] not in (0, 3):
        row.status = "error"
        row.note = f"exit {result['code']}: " + tail(result["stderr"] or result["stdout"])
        return row
    try:
        fit = json.loads((model_dir / "model.json").read_text())["fit"]
        row.fit_seconds = float(fit["seconds"])
        row.log_likelihood = float(fit["log_likelihood"])
        row.iterations = fit.get("iterations")
        keys = ("converged", "n_parameters", "n_cases", "device", "method", "message")
        row.extra = {k: fit.get(k) for k in keys if k in fit}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        row.status, row.note = "error", f"model.json unreadable: {exc!r}"[:300]
        return row
    if result["code"] == 3 or fit.get("converged") is False:
        row.status = "not-converged"
        row.note = f"exit {result['code']}: {fit.get('message') or tail(result['stderr'])}"[:300]
    return row


def data_copy_mb(scenario: Scenario, data: Path) -> float:
    """One copy of the used data, from the Parquet metadata: rows x used columns x 8 bytes."""
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(data)
    columns = expand(scenario.used_columns, metadata.schema.names)
    missing = set(columns) - set(metadata.schema.names)
    if missing:
        raise ValueError(f"{data.name} lacks the columns {sorted(missing)}")
    return metadata.num_rows * len(columns) * 8 / 2**20


def expand(names: list[str], columns: list[str]) -> list[str]:
    """Names with each glob replaced by the columns it matches, in table order."""
    out: list[str] = []
    for name in names:
        matches = [c for c in columns if fnmatch.fnmatchcase(c, name)] if "*" in name else []
        out += matches or [name]
    return list(dict.fromkeys(out))


def baseline_rss_mb(scenario: Scenario, data: Path, args, env: dict) -> float | None:
    """Peak RSS of the same fit on the first cases alone: start-up, imports, a tiny fit."""
    import polars as pl

    head = pl.scan_parquet(data).head(3000).collect()
    head = head.filter(pl.col("case") != head.get_column("case")[-1])  # drop a cut-off case
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as scratch:
        tiny = Path(scratch) / "head.parquet"
        head.write_parquet(tiny)
        cmd = choice_command(scenario, tiny, Path(scratch) / "model", args.device)
        result = run_process(cmd, args.timeout, env, Path(scratch))
    return result["rss_mb"] if result["code"] in (0, 3) else None


def add_memory(row: Row, scenario: Scenario, data: Path, args, env: dict) -> None:
    """The choice row's baseline, data copy and (peak - baseline) / copy, into row.extra."""
    copy = data_copy_mb(scenario, data)
    baseline = baseline_rss_mb(scenario, data, args, env)
    ratio = None
    if baseline is not None and row.peak_rss_mb is not None:
        ratio = (row.peak_rss_mb - baseline) / copy
    row.extra |= {"baseline_rss_mb": baseline, "data_copy_mb": copy, "rss_ratio": ratio}
    print(
        f"  memory: baseline {fmt(baseline, '.0f')} MB, one copy of the used data "
        f"{copy:.0f} MB ({len(scenario.used_columns)} columns), (peak - baseline) / copy "
        f"{fmt(ratio, '.2f')}",
        flush=True,
    )


def run_load(tool: str, scenario: Scenario, files: dict, args, env: dict) -> Row:
    """Loading alone (repeated: see `repeated`)."""
    return repeated(lambda: run_load_once(tool, scenario, files, args, env), args.repeat)


def run_load_once(tool: str, scenario: Scenario, files: dict, args, env: dict) -> Row:
    """Loading alone, in the product environment: choice's reader vs a plain polars read."""
    who, fmt = tool.split("_")
    data = files[fmt]
    cmd = [str(PRODUCT_PYTHON), str(PEERS / "load_runner.py"), "--tool", who, "--data", str(data)]
    with tempfile.TemporaryDirectory(prefix=f"bench-{tool}-") as scratch:
        settle(data)
        result = run_process(cmd, args.timeout, env, Path(scratch))
    row = Row(tool, "ok", whole_seconds=result["wall"], peak_rss_mb=result["rss_mb"])
    row.cpu_seconds = result["cpu"]
    record = last_json(result["stdout"])
    if result["timed_out"]:
        row.status, row.note = "timeout", f"killed after {args.timeout:.0f} s"
    elif result["code"] != 0 or record is None:
        row.status = "error"
        row.note = f"exit {result['code']}: " + tail(result["stderr"] or result["stdout"])
    else:
        row.fit_seconds = record["seconds"]
        row.extra = {k: v for k, v in record.items() if k != "seconds"}
    return row


def run_scenario(scenario: Scenario, args, env: dict) -> dict:
    print(f"\n== {scenario.name}: {scenario.description}", flush=True)
    files = generate.ensure(scenario.dataset)
    rows: list[Row] = []
    tools = LOAD_TOOLS if scenario.kind == "load" else FIT_TOOLS
    if args.tools:
        keep = set(args.tools) | ({"newton"} if scenario.kind == "fit" else set())
        tools = [t for t in tools if t in keep]
    for tool in tools:
        if tool == "newton" and args.no_reference:
            rows.append(Row(tool, "skipped", note="--no-reference"))
        elif tool in scenario.unsupported:
            rows.append(Row(tool, "unsupported", note=scenario.unsupported[tool]))
        elif tool in scenario.projected and not args.all:
            rows.append(Row(tool, "projected", note=scenario.projected[tool]))
        elif scenario.kind == "load":
            rows.append(run_load(tool, scenario, files, args, env))
        else:
            rows.append(run_tool(tool, scenario, files["parquet"], args, env))
        print("  " + progress_line(rows[-1]), flush=True)
        if scenario.memory and tool == "choice" and rows[-1].status in ("ok", "not-converged"):
            add_memory(rows[-1], scenario, files["parquet"], args, env)
    reference = next(
        (
            r.log_likelihood
            for r in rows
            if r.tool == scenario.reference_tool
            and r.status == "ok"
            and r.log_likelihood is not None
        ),
        None,
    )
    if reference is not None:
        for row in rows:
            if row.log_likelihood is not None:
                row.rel_ll_gap = abs(row.log_likelihood - reference) / abs(reference)
    return {
        "name": scenario.name,
        "description": scenario.description,
        "kind": scenario.kind,
        "memory": scenario.memory,
        "used_columns": scenario.used_columns,
        "formula": scenario.formula,
        "nest_formula": scenario.nest_formula,
        "lambda_bounds": scenario.lambda_bounds,
        "nests": scenario.nest,
        "reference_tool": scenario.reference_tool,
        "dataset": scenario.dataset,
        "reference_ll": reference,
        "targets": scenario.targets,
        "target_check": check_targets(scenario, rows),
        "rows": [row.__dict__ for row in rows],
    }


def check_targets(scenario: Scenario, rows: list[Row]) -> list[str]:
    """The choice row against the scenario's targets, as 'PASS/FAIL what'."""
    row = next((r for r in rows if r.tool == "choice"), None)
    if scenario.kind != "fit" or row is None:
        return []
    if row.status not in ("ok", "not-converged"):
        return [f"FAIL choice did not run ({row.status}{': ' + row.note if row.note else ''})"]
    checks = [
        ("fit", row.fit_seconds, scenario.targets.get("fit"), "fit {:.2f} s <= {} s"),
        ("whole", row.whole_seconds, scenario.targets.get("whole"), "whole {:.2f} s <= {} s"),
        (
            "rss",
            (row.peak_rss_mb or 0) / 1024,
            scenario.targets.get("rss_gb"),
            "peak RSS {:.2f} GB <= {} GB",
        ),
        (
            "rss_ratio",
            row.extra.get("rss_ratio"),
            scenario.targets.get("rss_ratio"),
            "(peak RSS - baseline) / one data copy {:.2f} <= {}",
        ),
        ("ll", row.rel_ll_gap, LL_TARGET, "LL gap {:.1e} <= {:.0e}"),
    ]
    out = []
    for _, value, limit, text in checks:
        if limit is None or value is None:
            continue
        out.append(("PASS " if value <= limit else "FAIL ") + text.format(value, limit))
    if scenario.runaway:
        stopped = row.status == "not-converged"
        out.append(("PASS " if stopped else "FAIL ") + "stops with exit 3 (no optimum)")
    elif row.status == "not-converged":
        out.append("FAIL converged")
    return out


def fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def ratio(row: dict, base: dict | None, key: str) -> str:
    if base is None or row is base or not row.get(key) or not base.get(key):
        return "-"
    return f"{row[key] / base[key]:.1f}x"


def progress_line(row: Row) -> str:
    status = row.status if row.status != "ok" else ""
    return (
        f"{row.tool:15s} fit {fmt(row.fit_seconds, '8.2f'):>8s} s  whole "
        f"{fmt(row.whole_seconds, '7.2f'):>7s} s  cpu {fmt(row.cpu_seconds, '7.2f'):>7s} s  "
        f"rss {fmt(row.peak_rss_mb, '6.0f'):>6s} MB  "
        f"LL {fmt(row.log_likelihood, '.6f')}  {status} {row.note}"
    )


FIT_HEAD = [
    "tool",
    "status",
    "fit s",
    "whole s",
    "cpu s",
    "peak RSS MB",
    "log-likelihood",
    "rel LL gap",
    "iter",
    "fit / choice",
    "whole / choice",
    "note",
]
LOAD_HEAD = [
    "tool",
    "status",
    "load s",
    "whole s",
    "cpu s",
    "peak RSS MB",
    "rows",
    "load / polars",
    "note",
]
MEMORY_HEAD = ["baseline RSS MB", "data copy MB", "(peak - baseline) / copy"]


def table_head(scenario: dict) -> list[str]:
    if scenario["kind"] == "load":
        return LOAD_HEAD
    return FIT_HEAD + (MEMORY_HEAD if scenario.get("memory") else [])


def memory_cells(row: dict) -> list[str]:
    extra = row["extra"]
    return [
        fmt(extra.get("baseline_rss_mb"), ".0f"),
        fmt(extra.get("data_copy_mb"), ".0f"),
        fmt(extra.get("rss_ratio"), ".2f"),
    ]


def measured_cells(r: dict, seconds: str) -> list[str]:
    """The cells every row starts with: tool, status, fit and whole seconds, peak RSS."""
    return [
        r["tool"],
        r["status"],
        fmt(r["fit_seconds"], seconds),
        fmt(r["whole_seconds"], ".2f"),
        fmt(r.get("cpu_seconds"), ".2f"),
        fmt(r["peak_rss_mb"], ".0f"),
    ]


def table_rows(scenario: dict) -> list[list[str]]:
    """Cells of a scenario's table; ratios are peer / choice (loading: tool / polars)."""
    rows = scenario["rows"]
    if scenario["kind"] == "load":
        out = []
        for r in rows:
            polars = next(
                (p for p in rows if p["tool"] == "polars_" + r["tool"].split("_")[1]), None
            )
            out.append(
                measured_cells(r, ".3f")
                + [
                    fmt(r["extra"].get("rows"), ",d"),
                    ratio(r, polars, "fit_seconds") if r is not polars else "-",
                    r["note"],
                ]
            )
        return out
    base = next((r for r in rows if r["tool"] == "choice" and r["fit_seconds"] is not None), None)
    out = []
    for r in rows:
        iterations = r["iterations"] if isinstance(r["iterations"], int) else None
        out.append(
            measured_cells(r, ".2f")
            + [
                fmt(r["log_likelihood"], ".6f"),
                fmt(r["rel_ll_gap"], ".1e"),
                fmt(iterations, "d"),
                ratio(r, base, "fit_seconds"),
                ratio(r, base, "whole_seconds"),
                r["note"],
            ]
            + (memory_cells(r) if scenario.get("memory") else [])
        )
    return out


def plain_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["machine"]
    device = m.get("device", "cpu")
    gpu = f"; choice on {device} ({m.get('gpu') or 'GPU unnamed'})" if device != "cpu" else ""
    repeat = report.get("repeat", 1)
    repeats = (
        f"a tool whose first run takes under {REPEAT_UNDER_SECONDS:.0f} s takes that run as a "
        f"warm-up and runs {repeat} more times: its row gives the median fit and whole seconds "
        "of those and the largest peak RSS of all (every run in the JSON); "
        if repeat
        else "each tool runs once; "
    )
    lines = [
        "# choice benchmark",
        "",
        f"{report['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GiB), "
        f"{m['threads']} thread(s) per tool{gpu}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        "fit s: the tool's own fit time; whole s: the whole process (start-up, reading, "
        "fit, output) timed by the harness; cpu s: that process's user + system CPU time "
        f"(steadier than wall time on a shared machine); {repeats}"
        "rel LL gap: |LL - LL_newton| / |LL_newton| "
        "against the float64 Newton reference (or the tool a scenario names); ratios: peer / "
        "choice (higher is slower).",
        "",
    ]
    for s in report["scenarios"]:
        lines += [f"## {s['name']}: {s['description']}", ""]
        if s["kind"] == "fit":
            reference_tool = s.get("reference_tool", "newton") or "none"
            lines += [
                f"Formula `{s['formula']}`"
                + (f", nests `col:{s['nests']}`" if s["nests"] else "")
                + (f", nest formula `{s['nest_formula']}`" if s.get("nest_formula") else "")
                + (f", `--lambda-bounds {s['lambda_bounds']}`" if s.get("lambda_bounds") else "")
                + f"; reference LL ({reference_tool}) {fmt(s['reference_ll'], '.6f')}.",
                "",
            ]
        if s.get("memory"):
            lines += [
                "Memory: baseline RSS is the peak of the same fit on the first cases alone "
                "(start-up, imports); data copy is rows x the "
                f"{len(s['used_columns'])} used columns ({', '.join(s['used_columns'])}) x 8 "
                "bytes, from the Parquet metadata.",
                "",
            ]
        head = table_head(s)
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in table_rows(s):
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        if s["target_check"]:
            lines += ["", "Targets for choice: " + "; ".join(s["target_check"]) + "."]
        lines.append("")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """Versions of every tool: peers from this environment, choice from the product's."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torch-choice", "xlogit", "biogeme", "numpy", "polars", "pyarrow"):
        try:
            out[name + " (bench env)"] = version(name)
        except PackageNotFoundError:
            out[name + " (bench env)"] = "missing"
    probe = (
        "import importlib.metadata as m, json; v = {}\n"
        "for n in ('choicecli', 'torch', 'polars', 'pyarrow'):\n"
        "    try: v[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: v[n] = 'missing'\n"
        "print(json.dumps(v))"
    )
    try:
        text = subprocess.run(
            [str(PRODUCT_PYTHON), "-c", probe], capture_output=True, text=True, timeout=60
        ).stdout
        for name, value in json.loads(text).items():
            out[name + " (product env)"] = value
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        out["choicecli (product env)"] = "unavailable"
    return out


def machine(threads: int, device: str) -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "threads": threads,
        "device": device,
        "gpu": gpu_name() if device != "cpu" else None,
        "platform": platform.platform(),
        "versions": versions(),
    }


def gpu_name() -> str | None:
    """The GPU's name and memory, from nvidia-smi (None where it cannot say)."""
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return listed.stdout.strip().replace("\n", "; ") or None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", help="comma-separated: " + ",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ",".join(QUICK))
    parser.add_argument(
        "--tutorial",
        action="store_true",
        help="torch-choice's tutorial models (issue 14): " + ",".join(TUTORIAL),
    )
    parser.add_argument(
        "--tools",
        help="comma-separated subset of: "
        + ",".join(FIT_TOOLS + LOAD_TOOLS)
        + " (newton always runs, unless --no-reference)",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="also run tools marked as projected (far too slow at that size)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per tool run")
    parser.add_argument("--threads", type=int, default=1, help="threads per tool (default 1)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="choice's --device: cpu (default) or cuda[:N]; with a GPU the default scenarios "
        "add " + ",".join(GPU_EXTRA) + " (peers stay on the CPU)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the numpy Newton reference (no LL gaps; for short GPU runs)",
    )
    parser.add_argument("--output", default="latest", help="name of the results files")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help=f"timed runs per tool, after a warm-up run, when one takes under "
        f"{REPEAT_UNDER_SECONDS:.0f} s; the table gives medians (default 3; 0: one run, no "
        "warm-up)",
    )
    args = parser.parse_args()
    names = QUICK if args.quick else DEFAULT + (GPU_EXTRA if args.device != "cpu" else [])
    names = TUTORIAL if args.tutorial else names
    if args.scenarios:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    args.tools = [t.strip() for t in args.tools.split(",")] if args.tools else None

    args.repeat = max(0, args.repeat)
    env = thread_env(args.threads, args.device)
    started = time.perf_counter()
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(args.threads, args.device),
        "timeout_s": args.timeout,
        "repeat": args.repeat,
        "all": args.all,
        "scenarios": [],
    }
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        report["scenarios"].append(run_scenario(SCENARIOS[name], args, env))
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        (RESULTS / f"{args.output}.json").write_text(json.dumps(report, indent=1))
        (RESULTS / f"{args.output}.md").write_text(markdown(report))
    for s in report["scenarios"]:
        print(f"\n## {s['name']}: {s['description']}")
        if s["reference_ll"] is not None:
            print(f"reference LL ({s.get('reference_tool') or 'none'}): {s['reference_ll']:.6f}")
        print(plain_table(table_head(s), table_rows(s)))
        for check in s["target_check"]:
            print("  target:", check)
    print(f"\nwrote {RESULTS / args.output}.md and .json in {report['elapsed_s']:.0f} s")
    shutil.rmtree(BENCH / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
