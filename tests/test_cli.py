"""The CLI end to end: fit and coef through CliRunner and a real subprocess, on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
from typer.testing import CliRunner

from choicecli.cli import app
from choicecli.process import (
    ALLOCATOR_SETTINGS,
    ALLOCATOR_VARIABLE,
    EXIT_BROKEN_PIPE,
    POLARS_ALLOCATOR_DEFAULTS,
    allocator_settings,
)
from choicecli.results import COEFFICIENT_COLUMNS
from conftest import CHOICE_EXECUTABLE, SAMPLE_DATA, reference_file

TRANSPORT = [
    "--formula", "(time|constant) + (1|item) + (income|item) + (cost|user)",
    "--case", "case_id", "--item", "mode", "--choice", "chosen", "--user", "user_id",
    "--session", "session_id",
]  # fmt: skip
TUTORIAL_FORMULA = (
    "(1|constant) + (1|item) + (1|user) + (user_obs_*|item) + (item_obs_*|constant) "
    "+ (session_obs_*|user) + (itemsession_obs_*|item) + (itemsession_obs_*|user)"
)
CAR = ["--case", "record_id", "--item", "car", "--choice", "purchase"]


def invoke(*arguments: str, env: dict | None = None):
    return CliRunner().invoke(app, list(arguments), env=env)


@pytest.fixture(scope="module")
def transport_model(tmp_path_factory):
    model = tmp_path_factory.mktemp("transport") / "model"
    result = invoke("fit", str(SAMPLE_DATA / "transport.parquet"), *TRANSPORT, "-m", str(model))
    assert result.exit_code == 0, result.stderr
    return model, result


@pytest.mark.parametrize("command", ["fit", "coef", "predict", "plot"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example: choice" in result.stdout


def test_fit_writes_the_model_directory(transport_model):
    model, result = transport_model
    assert {p.name for p in model.iterdir()} == {
        "model.json", "params.safetensors", "coefficients.parquet"
    }  # fmt: skip
    table = pl.read_parquet(model / "coefficients.parquet")
    assert table.columns == list(COEFFICIENT_COLUMNS)
    document = json.loads((model / "model.json").read_text())
    fit = document["fit"]
    for key in ("log_likelihood", "null_log_likelihood", "n_cases", "n_parameters", "iterations",
                "converged", "seconds", "rho_squared", "aic", "bic"):  # fmt: skip
        assert key in fit
    assert fit["converged"] and fit["n_cases"] == 2000 and fit["n_users"] == 150
    assert document["schema_version"] == 1
    assert len(document["provenance"]["input_sha256"]) == 64
    base = table.filter(pl.col("fixed"))
    assert set(base.get_column("item")) == {"bike"}
    users = table.filter(pl.col("term") == "cost[user]")
    assert users.height == 150 and users.get_column("user").n_unique() == 150
    summary = result.stderr
    for fact in ("2,000 cases", "observed shares", "newton", "log-likelihood", "rho-squared"):
        assert fact in summary
    assert "***" in summary
    metadata = (
        __import__("pyarrow.parquet", fromlist=["x"])
        .read_schema(model / "coefficients.parquet")
        .metadata
    )
    assert b"choice.spec" in metadata


def test_coef_selects_a_term_and_writes_csv_when_piped(transport_model):
    model, _ = transport_model
    result = invoke("coef", "income[item]", "-m", str(model))
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("level,term,variable,variation,feature,item,user,estimate")
    assert [line.split(",")[5] for line in lines[1:]] == ["bike", "bus", "car", "train", "walk"]


def test_coef_formats_and_environment_variable(transport_model, tmp_path):
    model, _ = transport_model
    env = {"CHOICE_MODEL": str(model)}
    as_json = json.loads(invoke("coef", "time[constant]", "--format", "json", env=env).stdout)
    assert as_json["converged"] is True and isinstance(as_json["warnings"], list)
    rows = as_json["coefficients"]
    assert rows[0]["term"] == "time[constant]" and rows[0]["estimate"] < 0
    out = tmp_path / "users.parquet"
    assert invoke("coef", "cost[user]", "-o", str(out), env=env).exit_code == 0
    assert pl.read_parquet(out).height == 150
    table = invoke("coef", "time[constant]", "--format", "table", env=env)
    assert "time[constant]" in table.stdout


def test_coef_unknown_term_lists_the_terms(transport_model):
    model, _ = transport_model
    result = invoke("coef", "tme[constant]", "-m", str(model))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "unknown term 'tme[constant]'" in result.stderr
    assert "time[constant], intercept[item], income[item], cost[user]" in result.stderr


def test_coef_without_a_model_is_a_clear_error(tmp_path):
    result = invoke("coef", "-m", str(tmp_path / "nothing"))
    assert result.exit_code == 1
    assert "no model here" in result.stderr and "choice fit" in result.stderr


def test_car_choice_nulls_are_an_error_naming_column_count_and_case(tmp_path):
    data = str(reference_file("car_choice.csv"))
    formula = "(price|constant) + (1|item) + (income|item)"
    result = invoke("fit", data, "--formula", formula, *CAR, "-m", str(tmp_path / "m"))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "'income'" in result.stderr and "23 cases" in result.stderr
    assert "first: case 142" in result.stderr and "--missing drop" in result.stderr
    assert not (tmp_path / "m").exists()
    dropped = invoke("fit", data, "--formula", formula, *CAR, "--missing", "drop",
                     "-m", str(tmp_path / "m"))  # fmt: skip
    assert dropped.exit_code == 0
    assert "dropped 23 cases" in dropped.stderr
    fit = json.loads((tmp_path / "m" / "model.json").read_text())["fit"]
    assert fit["n_cases"] == 885 - 23 and fit["converged"]


def test_car_choice_speed_is_collinear_with_the_intercepts(tmp_path):
    data = str(reference_file("car_choice.csv"))
    result = invoke("fit", data, "--formula", "(speed|constant) + (1|item)", *CAR,
                    "-m", str(tmp_path / "m"))  # fmt: skip
    assert result.exit_code == 0
    warning = next(line for line in result.stderr.splitlines() if line.startswith("Warning"))
    assert "speed[constant]" in warning and "not estimated" in warning
    assert "constant within each alternative" in warning and "intercept[item]" in warning
    table = pl.read_parquet(tmp_path / "m" / "coefficients.parquet")
    speed = table.filter(pl.col("term") == "speed[constant]").row(0, named=True)
    assert speed["identified"] is False and speed["estimate"] is None
    strict = invoke("fit", data, "--formula", "(speed|constant) + (1|item)", *CAR, "--strict",
                    "-m", str(tmp_path / "strict"))  # fmt: skip
    assert strict.exit_code == 1 and "speed[constant]" in strict.stderr
    assert not (tmp_path / "strict").exists()


def test_car_choice_user_terms_are_not_identified_with_one_case_per_consumer(tmp_path):
    data = str(reference_file("car_choice.csv"))
    result = invoke("fit", data, "--formula", "(price|constant) + (1|item) + (price|user)", *CAR,
                    "--user", "consumer_id", "-m", str(tmp_path / "m"))  # fmt: skip
    assert result.exit_code == 0
    assert "price[user]" in result.stderr and "single case" in result.stderr


def test_tutorial_formula_runs_and_names_what_it_cannot_estimate(tmp_path):
    model = tmp_path / "m"
    result = invoke(
        "fit", str(SAMPLE_DATA / "tutorial.parquet"), "--formula", TUTORIAL_FORMULA,
        "--case", "case_id", "--item", "item_id", "--choice", "chosen", "--user", "user_id",
        "--session", "session_id", "-m", str(model),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    named = " ".join(warnings)
    for term in ("intercept[constant]", "intercept[user]", "item_obs_*[constant]",
                 "session_obs_*[user]"):  # fmt: skip
        assert term in named
    for term in ("user_obs_*[item]", "itemsession_obs_*[item]", "itemsession_obs_*[user]"):
        assert term not in named
    users = invoke("coef", "intercept[user]", "-m", str(model))
    rows = users.stdout.strip().splitlines()[1:]
    assert len(rows) == 100
    assert all(row.endswith("false,false") for row in rows)  # not fixed, not identified
    glob = pl.read_parquet(model / "coefficients.parquet").filter(
        pl.col("term") == "user_obs_*[item]"
    )
    assert set(glob.get_column("feature")) == {"user_obs_1", "user_obs_2"}


def test_not_converged_exits_3_and_still_writes(tmp_path):
    result = invoke("fit", str(SAMPLE_DATA / "transport.parquet"), *TRANSPORT, "--max-iter", "1",
                    "-m", str(tmp_path / "m"))  # fmt: skip
    assert result.exit_code == 3
    fit = json.loads((tmp_path / "m" / "model.json").read_text())["fit"]
    assert fit["converged"] is False
    assert "did not converge" in result.stderr


def test_subprocess_reads_csv_from_stdin_and_writes_the_model(tmp_path):
    csv = (SAMPLE_DATA / "transport.csv").read_bytes()
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "fit", "-", *TRANSPORT, "-m", str(tmp_path / "m"), "--quiet"],
        input=csv, capture_output=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == b""
    piped = subprocess.run(
        [str(CHOICE_EXECUTABLE), "coef", "time[constant]", "-m", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stdout.startswith("level,term")


def test_help_does_not_import_torch():
    code = "import sys; import choicecli.cli; print('torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["fit", "--bogus", "x.csv"], "Error: No such option: --bogus"),
        (["fitt"], "Error: No such command 'fitt'. Did you mean 'fit'?"),
        (["coef", "--format", "xml"], "Error: Invalid value for '--format'"),
        (["fit"], "Error: Missing argument 'data'."),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(arguments, expected):
    """Typer prints usage, a hint and a blank line before the error; the tool prints one line."""
    completed = subprocess.run(
        [CHOICE_EXECUTABLE, *arguments], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 2 and completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), completed.stderr
    command = "choice" if arguments[0] == "fitt" else f"choice {arguments[0]}"
    assert lines[0].endswith(f"(see '{command} -h')")


def test_bare_command_prints_its_help():
    completed = subprocess.run([CHOICE_EXECUTABLE], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("Usage: choice [OPTIONS]")
    assert "fit" in completed.stderr and "Error" not in completed.stderr


@pytest.mark.parametrize("entry", ["console-script", "python-m"])
@pytest.mark.parametrize(
    ("inherited", "own"),
    [
        (None, None),
        ("dirty_decay_ms:0", "dirty_decay_ms:0"),
        (POLARS_ALLOCATOR_DEFAULTS, None),  # left by a parent process that imported polars
        (f"{POLARS_ALLOCATOR_DEFAULTS},narenas:2", "narenas:2"),
        (f"{POLARS_ALLOCATOR_DEFAULTS},{POLARS_ALLOCATOR_DEFAULTS},narenas:2", "narenas:2"),
    ],
)
def test_entry_points_set_polars_allocator_before_it_loads_and_keep_a_users_setting(
    entry, inherited, own
):
    env = {k: v for k, v in os.environ.items() if k != ALLOCATOR_VARIABLE}
    if inherited is not None:
        env[ALLOCATOR_VARIABLE] = inherited
    completed = subprocess.run([sys.executable, "-c", _allocator_report(entry)],
                               capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    before, setting = completed.stdout.splitlines()[-1].split()  # after the help text
    assert before == "False"  # nothing had read the setting yet
    # polars puts its defaults first; ours follow and the user's own come last, so they win
    assert setting.endswith(allocator_settings(inherited))
    assert allocator_settings(inherited) == ALLOCATOR_SETTINGS + (f",{own}" if own else "")


def test_polars_defaults_left_by_parents_that_imported_polars_do_not_override_ours():
    """Two Python processes that imported polars, one inside the other, then `choice`: polars
    wrote its defaults into the environment in each, and the command still ends with ours."""
    child = _allocator_report("console-script")
    parent = f"import polars, subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    grandparent = (
        f"import polars, subprocess, sys; subprocess.run([sys.executable, '-c', {parent!r}])"
    )
    env = {k: v for k, v in os.environ.items() if k != ALLOCATOR_VARIABLE}
    completed = subprocess.run([sys.executable, "-c", grandparent], capture_output=True,
                               text=True, env=env, timeout=180)  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    before, setting = completed.stdout.splitlines()[-1].split()
    assert before == "False"
    assert setting == f"{POLARS_ALLOCATOR_DEFAULTS},{ALLOCATOR_SETTINGS}"  # polars' own, then ours


def _allocator_report(entry: str) -> str:
    """Python code that runs `choice --help` through an entry point, then prints whether
    polars was loaded before and the allocator setting polars read."""
    run = {
        "console-script": "from choicecli.cli import main; main()",
        "python-m": "import runpy; runpy.run_module('choicecli', run_name='__main__')",
    }[entry]
    return (  # the entry point ends the process: an atexit handler looks after the command
        "import atexit, os, sys\n"
        "sys.argv = ['choice', '--help']\n"
        "def report():\n"
        "    before = 'polars' in sys.modules\n"
        "    import polars\n"
        "    print(before, os.environ['_RJEM_MALLOC_CONF'])\n"
        "atexit.register(report)\n"
        f"{run}\n"
    )


@pytest.mark.parametrize(
    ("code", "status", "stderr"),
    [("None", 0, ""), ("0", 0, ""), ("3", 3, ""), ("'boom'", 1, "boom\n")],
)
def test_exit_now_ends_as_sys_exit_would_with_handlers_run_and_output_flushed(code, status, stderr):
    program = (
        "import atexit\n"
        "from choicecli.process import exit_now\n"
        "atexit.register(print, 'handler ran')\n"
        "print('buffered', end=' ')\n"
        f"exit_now({code})\n"
        "print('never reached')\n"
    )
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                               timeout=120)  # fmt: skip
    assert (completed.returncode, completed.stdout, completed.stderr) == (
        status,
        "buffered handler ran\n",
        stderr,
    )


def test_a_reader_that_goes_away_stops_the_command_quietly(transport_model):
    model, _ = transport_model
    reader, writer = os.pipe()
    os.close(reader)  # as `choice coef ... | head -0`: nobody reads stdout
    try:
        completed = subprocess.run(
            [str(CHOICE_EXECUTABLE), "coef", "-m", str(model), "--format", "csv"],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert completed.returncode == EXIT_BROKEN_PIPE
    assert completed.stderr == ""


def mode_canada_fit(data, model, *extra: str):
    from conftest import MODE_CANADA_FORMULA

    result = invoke("fit", str(data), "--formula", MODE_CANADA_FORMULA, "--case", "case",
                    "--item", "alt", "--choice", "choice", "-m", str(model), *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    table = pl.read_parquet(model / "coefficients.parquet")
    fit = json.loads((model / "model.json").read_text())["fit"]
    return table, fit


def estimates_of(table: pl.DataFrame, term: str) -> dict:
    rows = table.filter(pl.col("term") == term)
    return dict(zip(rows.get_column("item"), rows.get_column("estimate"), strict=True))


def test_fit_options_base_lbfgs_weights_threads_and_l2(mode_canada_parquet, tmp_path):
    table, fit = mode_canada_fit(mode_canada_parquet, tmp_path / "plain")
    # --base car: the same model, intercepts measured from car instead of air
    based, based_fit = mode_canada_fit(mode_canada_parquet, tmp_path / "base", "--base", "car")
    assert based_fit["log_likelihood"] == pytest.approx(fit["log_likelihood"], abs=1e-8)
    plain, moved = estimates_of(table, "intercept[item]"), estimates_of(based, "intercept[item]")
    assert moved["car"] == 0.0
    assert moved["train"] == pytest.approx(plain["train"] - plain["car"], abs=1e-6)
    # --method lbfgs (then Newton steps), one thread: the same optimum
    lbfgs, lbfgs_fit = mode_canada_fit(mode_canada_parquet, tmp_path / "lbfgs", "--method",
                                       "lbfgs", "--threads", "1")  # fmt: skip
    assert lbfgs_fit["log_likelihood"] == pytest.approx(fit["log_likelihood"], abs=1e-8)
    assert lbfgs.get_column("estimate").to_list() == pytest.approx(
        table.get_column("estimate").to_list(), rel=1e-6, abs=1e-9
    )
    # --weights with every weight 1: the unweighted fit
    weighted_data = tmp_path / "weighted.parquet"
    pl.read_parquet(mode_canada_parquet).with_columns(pl.lit(1.0).alias("w")).write_parquet(
        weighted_data
    )
    _, weighted_fit = mode_canada_fit(weighted_data, tmp_path / "w", "--weights", "w")
    assert weighted_fit["log_likelihood"] == pytest.approx(fit["log_likelihood"], abs=1e-8)
    # --l2: a lower likelihood and smaller coefficients
    penalised, penalised_fit = mode_canada_fit(mode_canada_parquet, tmp_path / "l2", "--l2", "10")
    assert penalised_fit["log_likelihood"] < fit["log_likelihood"]
    size = (table.get_column("estimate") ** 2).sum()
    assert (penalised.get_column("estimate") ** 2).sum() < size


def test_bad_fit_options_are_usage_errors(mode_canada_parquet, tmp_path):
    from conftest import MODE_CANADA_FORMULA

    common = ["fit", str(mode_canada_parquet), "--formula", MODE_CANADA_FORMULA, "--case",
              "case", "--item", "alt", "--choice", "choice", "-m", str(tmp_path / "m")]  # fmt: skip
    for extra, named in ((["--threads", "0"], "--threads"), (["--base", "plane"], "plane"),
                         (["--max-iter", "0"], "--max-iter")):  # fmt: skip
        result = invoke(*common, *extra)
        assert result.exit_code in (1, 2) and named in result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()
