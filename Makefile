# ChatFLOW developer commands. Everything installs into .venv; dev keys and certificates go to var/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test certs lint bench migrate up clean fmt

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

certs: $(STAMP)
	@$(PY) -m tools.devcerts var/certs

migrate: certs
	@$(PY) -m tools.devstack migrate

run: certs
	@$(PY) -m tools.devstack run

test: certs
	@$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	@$(PY) -m ruff check .
	@$(PY) -m ruff format --check .
	@$(PY) -m mypy libs services tools bench

fmt: $(STAMP)
	@$(PY) -m ruff format .
	@$(PY) -m ruff check --fix .

bench: certs
	@$(PY) -m bench.run $(BENCH_ARGS)

up:
	@test -f deploy/compose/docker-compose.yml || { echo "deploy/compose/ is not written yet (its own issue); use make run"; exit 1; }
	docker compose -f deploy/compose/docker-compose.yml up --build

clean:
	rm -rf $(VENV) var
