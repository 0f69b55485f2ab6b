# carbond: `make run` starts the daemon on embedded defaults; `make test` runs lint, types and the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint typecheck pytest bench clean image-check

$(VENV)/.stamp-run: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "carbond needs Python >= 3.11 (PYTHON=$(PYTHON))"; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian run 'sudo apt-get install python3-venv'"; exit 2; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-run
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

run: $(VENV)/.stamp-run
	$(VENV)/bin/carbond run $(ARGS)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check carbond tests bench
	$(VENV)/bin/ruff format --check carbond tests bench

typecheck: $(VENV)/.stamp-test
	$(VENV)/bin/mypy

pytest: $(VENV)/.stamp-test
	$(PY) -m pytest -q

test: lint typecheck pytest

# Build the image with podman and run it as built, on a moved port and hardened (root, podman, runc, debootstrap)
image-check:
	bash tests/deploy/image-check.sh .

# CodeCarbon, for the side-by-side figures only, in a virtualenv of its own (it is not a carbond dependency).
CODECARBON_VERSION ?= 3.3.2
.venv-codecarbon/.stamp:
	$(PYTHON) -m venv .venv-codecarbon
	.venv-codecarbon/bin/pip install -q codecarbon==$(CODECARBON_VERSION)
	@touch $@

bench: $(VENV)/.stamp-test .venv-codecarbon/.stamp
	$(PY) -m bench

clean:
	rm -rf $(VENV) .venv-codecarbon .pytest_cache .mypy_cache .ruff_cache build *.egg-info
