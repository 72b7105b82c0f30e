# Everything a fresh machine with Python 3.11 and make needs: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SAMPLE := build/sample

.PHONY: venv demo test bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(STAMP)

$(SAMPLE)/.done: $(STAMP)
	$(PY) -m beam_tarimg.sample --out $(SAMPLE) --tars 4 --images_per_tar 64 --seed 0
	touch $@

demo: $(SAMPLE)/.done
	rm -rf build/demo
	$(PY) -m pipelines.tar_to_parquet --input $(SAMPLE) --output build/demo/images \
		--failures build/demo/failures.jsonl --include_metadata \
		--runner DirectRunner --direct_running_mode multi_processing --direct_num_workers 2 \
		--default_sdk_harness_log_level WARNING

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m bench --chart bench/chart.png

fuzz: $(STAMP)
	$(PY) -m bench.fuzz --seed 0 --json build/fuzz.json

clean:
	rm -rf build $(VENV)
