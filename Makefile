# Entry points for people and CI. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-gpu bytecode clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]" "$(TORCH)"
	$(MAKE) --no-print-directory bytecode
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/choice fit sample_data/transport.parquet \
		--formula '(time|constant) + (1|item) + (income|item) + (cost|user)' \
		--case case_id --item mode --choice chosen --user user_id --session session_id \
		--model demo_output/model
	$(BIN)/choice coef 'time[constant]' --model demo_output/model --format csv
	$(BIN)/choice coef --model demo_output/model -o demo_output/coefficients.parquet
	$(BIN)/choice plot 'cost[user]' --model demo_output/model -o demo_output/cost_by_user.png
	@echo "demo: model in demo_output/model, chart in demo_output/cost_by_user.png"

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP) bytecode
	bash bench/run.sh

# With an NVIDIA GPU and a CUDA build of torch in .venv: choice alone on the GPU, one timed run
# per scenario after its warm-up, the 90M-row scenario added (see bench/README.md)
bench-gpu: $(STAMP) bytecode
	bash bench/run.sh --device cuda --tools choice --no-reference --repeat 1 --output gpu-latest

# An editable install leaves choicecli/ uncompiled, and where PYTHONDONTWRITEBYTECODE is set
# every run compiled it again (0.1-0.3 s of each command here); a stale file is ignored.
bytecode:
	$(BIN)/python -m compileall -q choicecli

clean:
	rm -rf $(VENV) demo_output choice_model .pytest_cache .ruff_cache
