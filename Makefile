# One-command entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov in a venv of its own: its pins (boto3, packaging) conflict with the app's.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
STAGE ?= prod
PACKAGE_DIR ?= build/package

.PHONY: install browser run demo test check lint format package bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

$(CHECKOV_STAMP): requirements-checkov.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	touch $(CHECKOV_STAMP)

install: $(STAMP) $(CHECKOV_STAMP) browser

run: $(STAMP)
	$(BIN)/python -m devstack

demo: $(STAMP)
	$(BIN)/python -m devstack --demo

# Ruff on everything; mypy strict on the domain core and the storage package (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The fast loop: lint, types and the unit tier (pure: no emulator, no stack), in under a minute.
check: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) tests/unit

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The admin UI's browser test drives the system's Chromium, not Playwright's own download (a CDN
# that CI and offline machines may not reach). Installed with apt when missing; sudo unless root.
CHROMIUM_PATH ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# Without recommends (upower, udev, a print dialog...), but with fonts for readable screenshots.
BROWSER_PACKAGES := chromium fonts-liberation

browser:
	@if [ -x "$(CHROMIUM_PATH)" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "Chromium is not at $(CHROMIUM_PATH) and apt-get is not available to install it:" >&2; \
		echo "install Chromium yourself and run with CHROMIUM_PATH=/path/to/chromium." >&2; \
		exit 1; \
	fi; \
	echo "Installing Chromium with apt-get (for the admin UI's browser test)"; \
	$(APT_INSTALL) $(BROWSER_PACKAGES) \
		|| { $(SUDO) apt-get update && $(APT_INSTALL) $(BROWSER_PACKAGES); }; \
	if [ ! -x "$(CHROMIUM_PATH)" ]; then \
		echo "apt-get installed chromium, but not at $(CHROMIUM_PATH); set CHROMIUM_PATH." >&2; \
		exit 1; \
	fi

# Two workers: the end-to-end suites spend much of their time waiting on the stack they drive.
# Three were faster on this 2-core machine (7 min 57 s against 8 min 40 s - 9 min 35 s) but made
# timing-bound tests flaky.
TEST_WORKERS ?= 2

# The two venvs install side by side (about a minute saved on a fresh checkout), then the rest.
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(CHECKOV_STAMP)
	$(MAKE) --no-print-directory lint browser
	CHROMIUM_PATH=$(CHROMIUM_PATH) $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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
	$(BIN)/python -m bench.backpressure --json build/bench-backpressure.json
	$(BIN)/python -m bench.import_clients --rows 100000 --json build/bench-import.json

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) build .pytest_cache .ruff_cache
