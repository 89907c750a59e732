# Two commands do everything on a fresh machine (Python 3.11 with venv; any Python >= 3.10 with LOCK=):
#   make run    set up .venv and run the main job
#   make test   set up .venv and run the default test tier (make test-slow: the slow tier)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The exact versions installed (pip freeze of a clean `.[test]` install, Python 3.11): `make setup LOCK=`
# resolves freely from setup.cfg's ranges instead; `make lock` regenerates the file. Switching between the two
# on an existing venv needs `make clean` first.
LOCK ?= constraints.txt
# Tests run on 8 emulated CPU devices so mesh tests run anywhere (tests/conftest.py sets the same flag).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(if $(LOCK),,MOE_JAX_UNLOCKED=1)
# Both tiers run on TEST_WORKERS processes (pytest-xdist; 0 runs in this one). Whole files go to one worker
# (loadfile), so that a file's module-scoped fixtures and cached compiles are made once (default tier on 2 cores:
# loadfile 817 s and 969 s, worksteal 987 s at 1014 tests; runs vary too much to call the difference; loadfile 740 s
# at 1254 tests after the slow-tier moves of 2026-12-07; 656 s at 1345 tests later that day).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: run test test-slow setup lock clean

setup: $(VENV)/.installed

# The stamp depends on the lock, so a changed lock reinstalls. The lock holds versions that exist for one
# Python minor version (its header says which); another one fails with pip's resolver error, hence the check.
$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	@if [ -n "$(LOCK)" ]; then \
	  want=$$(sed -n 's/^# Python \([0-9]*\.[0-9]*\).*/\1/p' $(LOCK)); \
	  have=$$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	  if [ "$$want" != "$$have" ]; then \
	    echo "$(LOCK) pins versions for Python $$want, python3 is $$have: use Python $$want, or resolve freely" \
	         "with 'make setup LOCK=' (after 'make clean')"; exit 1; fi; fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK)) -e '.[test]'
	touch $@

# A clean install of `.[test]` into a throw-away venv, resolved freely, frozen without the project itself.
lock:
	tmp=$$(mktemp -d) && python3 -m venv $$tmp/venv && $$tmp/venv/bin/python -m pip install -q --upgrade pip && \
	$$tmp/venv/bin/python -m pip install -q '.[test]' && \
	{ echo "# Python $$($$tmp/venv/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')."; \
	  echo "# The versions \`make setup\` installs (pip install -c constraints.txt -e '.[test]'); \`make lock\` writes"; \
	  echo "# this file from a clean install into a fresh venv (pip freeze, moe_jax excluded)."; \
	  $$tmp/venv/bin/python -m pip freeze --exclude moe_jax; } > constraints.txt.new && \
	mv constraints.txt.new constraints.txt && rm -rf $$tmp

run: setup
	$(PY) experiments/main.py

test: setup
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test is marked slow: not a failure.
test-slow: setup
	$(TEST_ENV) $(PY) -m pytest -q $(XDIST) -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) .pytest_cache
