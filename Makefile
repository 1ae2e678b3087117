# Two commands on a fresh machine: `make run` and `make test`. Only python3.11, pip and make needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench install system-test-deps clean fuzz chaos

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/weft serve --embedded --demo-agent

# Debian packages some tests need, installed only as root with apt (as CI runs); elsewhere those
# tests skip and name the package. SSH tests run a real asyncssh server (no package needed);
# nginx and haproxy: tests/integration/test_load_balancer.py runs ops/nginx and ops/haproxy;
# prometheus: tests/integration/test_dashboards_live.py evaluates every dashboard panel's query.
SYSTEM_PACKAGES ?= nginx haproxy prometheus
system-test-deps:
	@if [ -n "$(SYSTEM_PACKAGES)" ] && [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
		missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
			|| echo "warning: could not install$$missing; dependent tests will skip"; fi; \
	fi

lint: install
	$(BIN)/ruff check weft projections tests bench

typecheck: install
	$(BIN)/mypy weft projections bench

test: install system-test-deps lint typecheck
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .weft-data .pytest_cache .mypy_cache .ruff_cache

# Schemathesis against the served OpenAPI document: no tokens, API_TOKENS, scoped tokens (tests/fuzz): >= 5,000 cases.
fuzz: install
	$(BIN)/python -m tests.fuzz --max-examples $${FUZZ_EXAMPLES:-40} --min-cases 5000 $${FUZZ_SEED:+--seed $$FUZZ_SEED}

# Chaos (tests/chaos): nginx + 3 replicas + a 3-node NATS cluster + agents under >= 50 fault rounds
# (kill -9 of replicas, the leader, NATS nodes, agents; connection cuts), then the invariant table.
# The reduced run is tests/integration/test_chaos.py, inside `make test`. Needs nginx.
chaos: install
	$(BIN)/python -m tests.chaos --rounds $${CHAOS_ROUNDS:-50} $${CHAOS_SEED:+--seed $$CHAOS_SEED}
