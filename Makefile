# `make demo` and `make test` work on a fresh machine: each creates .venv when missing and
# (re)installs the project only when pyproject.toml or constraints.txt changed, at the
# versions constraints.txt pins (the ones cluster.yaml installs on every node).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo_out

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	test -f $(DEMO)/data/train_v2.csv || $(BIN)/planet-batch demo-data $(DEMO)/data
	$(BIN)/planet-batch import-weights
	$(BIN)/planet-batch show-batch --data $(DEMO)/data --out $(DEMO)/run/batch.png  # (the run's MLflow artifacts take it)
	$(BIN)/python jobs/train.py --config jobs/configs/demo.yaml --data $(DEMO)/data --out $(DEMO)/run
	$(BIN)/python jobs/score.py --model $(DEMO)/run/export --data $(DEMO)/data --out $(DEMO)/submission.csv \
		--probs-out $(DEMO)/probs.parquet --overwrite
	$(BIN)/planet-batch check-submission $(DEMO)/submission.csv --sample $(DEMO)/data/sample_submission_v2.csv
	@echo "demo outputs in $(DEMO)/: run/ (batch.png, metrics.csv, losses.png, export/), submission.csv"

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO)
