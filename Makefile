# Two commands do everything on a fresh machine (Python >= 3.10 with venv):
#   make run    set up .venv and run the main job
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Tests run on 8 emulated CPU devices so mesh tests run anywhere (tests/conftest.py sets the same flag).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: run test test-slow setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(PY) experiments/main.py

test: setup
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test is marked slow: not a failure.
test-slow: setup
	$(TEST_ENV) $(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) .pytest_cache
