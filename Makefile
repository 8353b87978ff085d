# weightrelay: one venv with both frameworks (each worker still runs in its own process).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ROUNDS ?= 20
# The extras installed: EXTRAS=dev leaves out Ray (the Ray sweep test is then skipped).
EXTRAS ?= dev,ray

.PHONY: install demo test test-fast test-containers kubectl proto constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[$(EXTRAS)]' -c constraints.txt
	touch $@

install: $(VENV)/.installed

## The experiment: 20 rounds on MNIST with both workers started locally (downloads MNIST if missing).
demo: install
	$(BIN)/coordinator run --local --rounds $(ROUNDS)

## The whole test suite: unit, integration (real worker processes) and end to end (real MNIST).
test: install
	$(BIN)/python -m pytest

## Unit tests only (no workers started).
test-fast: install
	$(BIN)/python -m pytest tests/unit

## The container tier: builds the images, runs the compose stack, talks to it (needs a Docker engine).
test-containers: install
	$(BIN)/python -m pytest -m containers tests/containers

## A kubectl (kustomize v5) in .tools/bin, for the manifest-validation tests.
kubectl:
	docker/get-kubectl.sh

## Regenerate the committed gRPC stubs after editing proto/.
proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. proto/weightrelay/v1/worker.proto

constraints: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^weightrelay'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
