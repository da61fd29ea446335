# The project's commands. `make demo` and `make test` work on a fresh clone.
PY := .venv/bin/python
MODEL_DIR ?= models/release
DIST ?= dist/model
# mutants per module `make mutation` draws (seeded; the last run's time is in bench/mutation.json); 0 tests every mutant (over an hour)
MUTATION_SAMPLE ?= 100

.PHONY: setup train archive serve serve-kserve demo demo-feedback test test-fast fuzz mutation bench soak bench-gpu k8s clean

setup:  ## create .venv with pinned dependencies (and Java 17, Fashion-MNIST via apt where missing)
	@bash scripts/setup.sh

train: setup  ## train, calibrate and evaluate the release model into models/release
	$(PY) -m training.train --output $(MODEL_DIR)

archive: setup  ## package models/release as dist/model/{config,model-store,artifact_manifest.json}
	$(PY) -m training.archive --model-dir $(MODEL_DIR) --output $(DIST)

serve: archive  ## run TorchServe in the foreground on the archive
	$(PY) -m scripts.localserve --model-root $(DIST)

serve-kserve: archive  ## run the KServe predictor in the foreground on the archive: http://127.0.0.1:8080, gRPC 127.0.0.1:8081 (KServe 0.21 binds all interfaces)
	.venv/bin/returns-kserve --model_dir $(DIST) --http_port 8080 --grpc_port 8081

demo: archive  ## the nightly job end to end on this machine
	$(PY) -m scripts.demo --model-root $(DIST)

demo-feedback: setup  ## the feedback loop: nights with a shifted setup, reviewers' decisions, retrain, compare, promote (build/feedback)
	$(PY) -m scripts.demo_feedback --release $(MODEL_DIR) --workdir build/feedback

test: setup  ## the whole suite (a budget of about 15 minutes on 2 cores, docs/testing.md)
	$(PY) -m pytest

test-fast: setup  ## unit tests only
	$(PY) -m pytest -m "not slow and not integration"

FUZZ_SECONDS ?= 600
fuzz: setup  ## fuzz photo decoding and request parsing for FUZZ_SECONDS (default 10 minutes)
	$(PY) -m tests.fuzz --seconds $(FUZZ_SECONDS)

mutation: setup  ## mutmut over the modules that carry promises; kill rate per module (not in `make test`)
	$(PY) -m scripts.mutation --sample $(MUTATION_SAMPLE) --record bench/mutation.json $(MUTATE)

bench: archive  ## served vs raw vs naive throughput, latency and memory -> bench/results.json
	$(PY) -m scripts.bench --model-root $(DIST)

soak: setup  ## a bounded TorchServe soak (45 s at concurrency 32) -> bench/soak.json (docs/reliability.md's figures)
	RETURNS_SOAK_RECORD=bench/soak.json $(PY) -m pytest -p no:cacheprovider -q tests/reliability/test_load_soak.py

bench-gpu: setup  ## on a machine with a GPU: served vs raw with fp16 autocast, GPU vs CPU answers -> bench/gpu.json
	$(PY) -m scripts.bench_gpu --model-dir $(MODEL_DIR)

k8s: setup  ## regenerate the plain manifests in k8s/ from the Helm chart
	$(PY) -m scripts.render_k8s

clean:
	rm -rf dist bench/results.json .pytest_cache mutants .hypothesis
