# The course's commands. `make lab` and `make test` are the README's contract with users:
# both create or refresh .venv from pyproject.toml (only when it changed), then do their job.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-from-pyproject
LAB_ARGS ?=  # extra options for `jupyter lab`, e.g. LAB_ARGS=--allow-root in a container run as root
NOTEBOOKS ?= $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PYTEST := $(BIN)/python -m pytest
# Idle OpenMP threads sleep instead of spinning: with more busy processes than cores (pytest -n 2,
# each kernel on 2 threads) spinning threads made training ~20x slower on the 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
          --nbval-kernel-startup-timeout 180

# The classroom (issue 20): Otter Assign writes the student release and the autograders; grading runs
# each submission in this environment (`otter run`'s API, no container). See README, "Teaching with mvtk".
STUDENT    ?= student
AUTOGRADER ?= autograder
OTTER_BUILD ?= build/otter
OTTER_ASSIGN_ARGS ?=  # e.g. --no-run-tests: skip running the checks against the teacher's solutions
SUBMISSIONS ?=
GRADES     ?= grades.csv
TIMEOUT    ?= 600  # seconds each submission may run under make grade
# `make lab` and `make student-lab` read jupyter/ (no news, update or extension-manager look-ups).
LAB := JUPYTER_CONFIG_PATH=$(CURDIR)/jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH} $(BIN)/jupyter lab

.PHONY: lab student-lab test unit nbval e2e notebooks normalise student grade bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

lab: $(STAMP)  ## open JupyterLab on the course (the teacher's copy: solutions included)
	$(LAB) --notebook-dir=notebooks $(LAB_ARGS)

student-lab: $(STAMP)  ## open JupyterLab on the student release in student/ (made first if missing)
	@test -d $(STUDENT) || $(MAKE) --no-print-directory student
	$(LAB) --notebook-dir=$(STUDENT) $(LAB_ARGS)

test: $(STAMP)  ## unit tests, lint/recipe/student tests, every notebook under nbval, browser tests
	$(PYTEST) -n 2 --dist loadscope $(NBVAL) tests notebooks

unit: $(STAMP)  ## the unit tests only (fast), browser-free checks of tests/e2e included
	$(PYTEST) -n 2 --dist loadscope -m "not e2e" tests

nbval: $(STAMP)  ## the notebooks under nbval only; NOTEBOOKS=notebooks/03_save_load.ipynb for one
	$(PYTEST) -n 2 --dist loadscope $(NBVAL) $(NOTEBOOKS)

e2e: $(STAMP)  ## browser tests only: every notebook run in JupyterLab in headless Chromium, and `make lab`
	$(PYTEST) -m e2e tests/e2e

notebooks: $(STAMP)  ## re-execute notebooks in place, fresh kernel, on the CPU
	MVTK_DEVICE=cpu CUDA_VISIBLE_DEVICES= $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 $(NOTEBOOKS)
	$(BIN)/python -m mvtk.classroom normalise $(NOTEBOOKS)

normalise: $(STAMP)  ## give notebooks the kernel metadata JupyterLab writes, so they open unmodified
	$(BIN)/python -m mvtk.classroom normalise $(NOTEBOOKS)

student: $(STAMP)  ## the student release in student/ (Otter Assign: solutions out, checks kept), autograders in autograder/
	@set -e; rm -rf $(OTTER_BUILD); for nb in $(NOTEBOOKS); do \
	    if grep -q '"# ASSIGNMENT CONFIG' "$$nb"; then \
	        echo "otter assign $$nb"; \
	        $(BIN)/otter assign --no-pdfs $(OTTER_ASSIGN_ARGS) "$$nb" "$(OTTER_BUILD)/$$(basename "$$nb" .ipynb)"; \
	    else \
	        echo "skipped $$nb: its exercises are not in Otter's format yet (no # ASSIGNMENT CONFIG cell)"; \
	    fi; \
	done
	$(BIN)/python -m mvtk.classroom collect $(OTTER_BUILD) $(STUDENT) $(AUTOGRADER)

grade: $(STAMP)  ## grade SUBMISSIONS=folder (alice/00_setup.ipynb, …) into $(GRADES): one row per student and exercise
	$(BIN)/python -m mvtk.classroom grade "$(SUBMISSIONS)" $(AUTOGRADER) $(GRADES) --timeout $(TIMEOUT)

bench: $(STAMP)  ## run every benchmark and print its table
	set -e; for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf runs notebooks/runs $(STUDENT) $(AUTOGRADER) $(OTTER_BUILD) screenshots .pytest_cache

.PHONY: serve
SERVE_PORT ?= 8000
serve: $(STAMP)  ## serve digits@production from ./registry (or $MVTK_REGISTRY) on 127.0.0.1; trains one if empty
	$(BIN)/python -m mvtk.serve --bootstrap true --host 127.0.0.1 --port $(SERVE_PORT)
