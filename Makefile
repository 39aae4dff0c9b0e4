# One-command entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STAGE ?= prod
PACKAGE_DIR ?= build/package

.PHONY: install run demo test lint format package bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m chalicelib.local

demo: $(STAMP)
	$(BIN)/python -m chalicelib.local --demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two workers: the end-to-end suites spend much of their time waiting on the stack they drive.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

package: $(STAMP)
	rm -rf $(PACKAGE_DIR)
	AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} $(BIN)/chalice package --stage $(STAGE) \
		--merge-template infra/resources.yaml $(PACKAGE_DIR)
	$(BIN)/cfn-lint $(PACKAGE_DIR)/sam.yaml

bench: $(STAMP)
	mkdir -p build
	$(BIN)/python -m bench.delivery --sizes 2000,10000 --json build/bench-delivery.json
	$(BIN)/python -m bench.fanout --clients 100000 --json build/bench-fanout.json
	$(BIN)/python -m bench.rate --json build/bench-rate.json

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
