# Every target sets itself up on a fresh machine: .venv, then torch==2.13.0 (CPU wheel) FIRST, then the package.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: setup test demo proto lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 --durations=25 tests

demo: $(STAMP)
	$(BIN)/python -m moe_runtime.demo --config cluster/local.yaml

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=moe_runtime/dispatch/proto \
	  --grpc_python_out=moe_runtime/dispatch/proto protos/expert.proto
	sed -i 's/^import expert_pb2 as/from . import expert_pb2 as/' moe_runtime/dispatch/proto/expert_pb2_grpc.py

lint: $(STAMP)
	$(BIN)/ruff check moe_runtime tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/_suite.py --quick --json

clean:
	rm -rf $(VENV) .pytest_cache runs/*.png
