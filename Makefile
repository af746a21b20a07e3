# imgsim: `make demo` sets everything up and runs the chain on the sample images; `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FAISS ?= cpu   # `make FAISS=gpu install` for faiss-gpu (CUDA 12)
RAY ?=         # `make RAY=1 install` adds Ray (image_embeddings on a Ray cluster; its tests)
comma := ,
EXTRAS := $(strip $(FAISS)),k8s,dev$(if $(strip $(RAY)),$(comma)ray)
STAMP := $(VENV)/.installed$(if $(strip $(RAY)),-ray)

export IMGSIM_DATA_DIR ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(IMGSIM_DATA_DIR)/dagster_home

.PHONY: install demo test test-avx2 ui serve bench bench-index bench-scale clean-data

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

$(DAGSTER_HOME)/dagster.yaml: | $(STAMP)
	$(BIN)/python -m imgsim_assets.instance $(DAGSTER_HOME)

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/imgsim sample-data
	$(BIN)/imgsim ingest --fallback-random
	$(BIN)/imgsim search $(IMGSIM_DATA_DIR)/queries/chelsea_reencoded.jpg -k 5

test: install
	$(BIN)/python -m pytest -q

# The suite with Faiss, OpenBLAS and oneDNN held to AVX2 kernels, as on a CPU without AVX-512: on
# x86-64 with AVX-512 it checks that no result depends on the SIMD level. (ATen is left to the CPU:
# ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU makes torch.compile's kernels return NaN.)
test-avx2: install
	FAISS_SIMD_LEVEL=AVX2 OPENBLAS_CORETYPE=Haswell ONEDNN_MAX_CPU_ISA=AVX2 \
		$(BIN)/python -m pytest -q

# Side-by-side benchmarks (minutes on 2 cores); each prints both sides and the ratio.
bench: install
	$(BIN)/python -m bench.preprocess
	$(BIN)/python -m bench.embedding
	$(BIN)/python -m bench.backends
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.throughput --models dinov2_vits14 --decode workers --images 256 --batch-size 64
	$(BIN)/python -m bench.hostile --variants 50000 2>/dev/null
	$(BIN)/python -m bench.hostile --service 2>/dev/null
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.review
	if $(BIN)/python -c "import ray" 2>/dev/null; then $(BIN)/python -m bench.ray; \
	else echo "bench.ray: Ray is not installed (make RAY=1 bench)"; fi

# 1M vectors against autofaiss in its own venv (about half an hour on 2 cores, 3 GB of disk);
# `make bench-index INDEX=--reuse-autofaiss` judges the autofaiss index an earlier run built.
bench-index: install
	$(BIN)/python -m bench.index $(INDEX)

# The whole chain on 100,000 generated images in 100 batches, tiny model (about 10 minutes on 2 cores);
# `make bench-scale SCALE="--images 1000000 --batches 1000"` for the full run.
bench-scale: install
	$(BIN)/python -m bench.scale $(SCALE)

# The search service and web page on http://127.0.0.1:8000 over the materialized faiss_index.
serve: install
	$(BIN)/imgsim serve --host 127.0.0.1 --port 8000

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

clean-data:
	rm -rf $(IMGSIM_DATA_DIR)/images $(IMGSIM_DATA_DIR)/queries $(IMGSIM_DATA_DIR)/assets $(IMGSIM_DATA_DIR)/dagster_home
