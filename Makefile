# Everything runs in a local virtual environment that `make install` creates from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-serving bench bench-peers bench-scale ablation train-gpt2-small demo lint docs clean

install: $(STAMP)

# torch is installed first, at the exact version of constraints.txt (2.13.0 resolves to the local
# CPU build; an unpinned torch would download GBs of CUDA wheels), and the constraints hold it
# while the package (which only asks for a range) and its dependencies install.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks

# llama.cpp itself loads base + an export-gguf adapter (tests/serving): llama-cpp-python built from
# source (its wheel needs a compiler: ~10 minutes on 2 cores, once) and sentencepiece go into
# build/serving/site, outside the package's dependencies; llama.cpp's own convert_hf_to_gguf.py comes
# from the same release's source archive. Not part of CI (the build alone is half of CI's budget).
LLAMA_CPP_PYTHON := 0.3.36
SERVING := build/serving
$(SERVING)/.installed: constraints.txt | install
	mkdir -p $(SERVING)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q --no-deps --target $(SERVING)/site \
		llama-cpp-python==$(LLAMA_CPP_PYTHON) diskcache==5.6.3 sentencepiece==0.2.3
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps -d $(SERVING) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(SERVING)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(SERVING) --strip-components 2 \
		--wildcards 'llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py' \
		'llama_cpp_python-*/vendor/llama.cpp/conversion/*' 'llama_cpp_python-*/vendor/llama.cpp/gguf-py/*'
	touch $(SERVING)/.installed

# vLLM's own adapter loader (tests/serving/test_vllm_loader.py): its wheel without its dependencies
# (CUDA torch and the rest; the loader runs on this CPU torch) plus the pure-Python and small packages
# its import asks for, into build/serving/vllm (~600 MB, a 240 MB download, once).
VLLM := 0.34.0
VLLM_IMPORTS := aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 apache-tvm-ffi==0.1.15.post2 attrs==26.1.0 \
	cachetools==8.0.3 cbor2==6.3.0 cloudpickle==3.1.3 einops==0.8.2 frozenlist==1.8.0 llguidance==1.9.1 \
	msgspec==0.23.0 multidict==7.2.1 prometheus_client==0.26.0 propcache==0.5.4 py-cpuinfo==9.0.0 pybase64==1.5.1 \
	pyzmq==27.3.0 uvloop==0.23.0 xgrammar==0.2.9 yarl==1.25.1
$(SERVING)/.vllm: | install
	mkdir -p $(SERVING)
	$(BIN)/python -m pip install -q --no-deps --target $(SERVING)/vllm vllm==$(VLLM) $(VLLM_IMPORTS)
	touch $(SERVING)/.vllm

test-serving: $(SERVING)/.installed $(SERVING)/.vllm
	PYTHONPATH=$(SERVING)/site:$(SERVING)/vllm INRANK_LLAMA_CPP=$(SERVING)/llama.cpp $(BIN)/python -m pytest -q tests/serving

# The peers the fine-tune benchmark runs beside this tool (docs/benchmarks.md#fine-tune-delta):
# mergekit's extract-lora in its own environment (~1.6 GB, once), the same CPU torch held by the
# constraints. bench-peers runs that benchmark with it; without it the peer's row is skipped.
MERGEKIT := 0.1.5
PEERS := build/peers
$(PEERS)/.installed: constraints.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q -c constraints.txt torch
	$(PEERS)/bin/python -m pip install -q -c constraints.txt mergekit==$(MERGEKIT)
	touch $(PEERS)/.installed

bench-peers: install $(PEERS)/.installed
	INRANK_MERGEKIT=$(PEERS)/bin/mergekit-extract-lora $(BIN)/python -m benchmarks finetune

# A LLaMA-7B-shaped bfloat16 pair written and compressed (docs/benchmarks.md#scale-a-7b-shaped-pair):
# ~30 GB of free disk and ~7 minutes on 2 cores; not part of bench or CI.
bench-scale: install
	$(BIN)/python -m benchmarks scale

# The low-rank training ablation (docs/training.md#recipes): every row is a 1,000-step run, hours on
# 2 CPU cores; ROWS="dense warm100" runs some. Rows already in benchmarks/out/train-ablation are kept.
ablation: install
	$(BIN)/python -m benchmarks.train_ablation $(ROWS)

# Dense against InRank-Efficient at GPT-2 small's shape (12x768) on a CUDA GPU (docs/training.md#recipes):
# minutes a row on one GPU; STEPS=1000 by default, ROWS="dense efficient" runs some.
train-gpt2-small: install
	$(BIN)/python -m benchmarks.train_gpt2_small --steps $(or $(STEPS),1000) $(ROWS)

# Train a small GPT-2 dense and with InRank from one init on real text (../shared/data, or a
# fallback corpus), compress both, resume InRank, continue dense, report and compare: about 7 minutes on 2 CPU cores.
demo: install
	$(BIN)/inrank-convert demo --out demo-out

# lint-imports checks the import layers declared in pyproject.toml [tool.importlinter] (docs/design.md §2).
lint: install
	$(BIN)/ruff check inrank_convert tests benchmarks
	$(BIN)/lint-imports --no-cache

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning (a missing page,
# a broken link between pages) into an error.
docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache benchmarks/out demo-out site
