# Everything a fresh machine with Python 3.11 and make needs: `make demo`, `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SAMPLE := build/sample

.PHONY: venv engines demo test bench bench-engines fuzz clean

# The engines (tests/test_engines.py): Flink and Spark job servers and Prism at one Beam version, with a venv whose
# Python SDK is that same version (never pair an SDK with a job server of another version). 2.62.0 is the newest
# Beam whose Flink and Spark runners Maven Central serves with all their dependencies (BENCHMARKS.md, Engines).
BEAM_ENGINE_VERSION ?= 2.62.0
ENGINES := build/engines
EVENV := $(ENGINES)/venv-beam-$(BEAM_ENGINE_VERSION)
EPY := $(EVENV)/bin/python
ESTAMP := $(EVENV)/.installed-stamp
FLINK_JAR := $(ENGINES)/flink/beam-runners-flink-1.19-job-server-$(BEAM_ENGINE_VERSION).jar
SPARK_JAR := $(ENGINES)/spark/beam-runners-spark-3-job-server-$(BEAM_ENGINE_VERSION).jar
PRISM := $(ENGINES)/prism-$(BEAM_ENGINE_VERSION)/prism
# Java, Maven and Go build the engines; without them the engine tests skip and say why.
HAVE_ENGINE_TOOLS := $(and $(shell command -v java),$(shell command -v mvn),$(shell command -v go))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

venv: $(STAMP)

$(ESTAMP): pyproject.toml
	test -x $(EPY) || $(PYTHON) -m venv $(EVENV)
	$(EPY) -m pip install --quiet --upgrade pip
	$(EPY) -m pip install --quiet -e '.[engines,bench]' 'apache-beam==$(BEAM_ENGINE_VERSION)'
	touch $@

# Beam's job-server jars, shaded from the runners' artifacts on Maven Central (engines/*.pom.xml).
$(FLINK_JAR): engines/flink-job-server.pom.xml
	mvn --batch-mode --quiet -f $< package -Dbeam.version=$(BEAM_ENGINE_VERSION)

$(SPARK_JAR): engines/spark-job-server.pom.xml
	mvn --batch-mode --quiet -f $< package -Dbeam.version=$(BEAM_ENGINE_VERSION)

# Prism from the Go module proxy. The proxy serves the module but not the checksum database's entry for it:
# GONOSUMDB skips that lookup for Beam alone (its dependencies are still checked against Beam's go.sum).
$(PRISM):
	GOBIN=$(abspath $(dir $@)) GONOSUMDB=github.com/apache/beam \
		go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_ENGINE_VERSION)

ifneq ($(HAVE_ENGINE_TOOLS),)
engines: $(ESTAMP) $(FLINK_JAR) $(SPARK_JAR) $(PRISM)
else
engines: $(ESTAMP)
	@echo "engines: java, mvn and go are needed to build the Flink/Spark job servers and Prism; the engine tests will skip"
endif

$(SAMPLE)/.done: $(STAMP)
	$(PY) -m beam_tarimg.sample --out $(SAMPLE) --tars 4 --images_per_tar 64 --seed 0
	touch $@

demo: $(SAMPLE)/.done
	rm -rf build/demo
	$(PY) -m pipelines.tar_to_parquet --input $(SAMPLE) --output build/demo/images \
		--failures build/demo/failures.jsonl --include_metadata \
		--runner DirectRunner --direct_running_mode multi_processing --direct_num_workers 2 \
		--default_sdk_harness_log_level WARNING

# Under the engines' Beam (the oldest supported): the engine tests and the suite's core, which needs nothing of
# the `test` extra (object stores, pandas, datasets) that an old Beam's pins keep out of that venv.
ENGINE_SUITE := tests/test_engines.py tests/test_reader.py tests/test_pipelines.py tests/test_sinks.py \
	tests/test_coders.py tests/test_decode.py tests/test_tario.py tests/test_jpeg.py

# The suite on the newest Beam, then the engine tests (real Flink, Spark, Prism) and the core under the engines' Beam.
test: $(STAMP) engines
	$(PY) -m pytest
	BEAM_TARIMG_ENGINES=$(ENGINES) $(EPY) -m pytest $(ENGINE_SUITE)

bench: $(STAMP)
	$(PY) -m bench --chart bench/chart.png

# The reader on Flink, Spark and Prism against the FnApiRunner and the limit (BENCHMARKS.md, Engines).
bench-engines: engines
	BEAM_TARIMG_ENGINES=$(ENGINES) $(EPY) -m bench.engines

fuzz: $(STAMP)
	$(PY) -m bench.fuzz --seed 0 --json build/fuzz.json
	$(PY) -m bench.fuzz --seed 0 --resize --jpeg-mutants 3000 --tar-mutants 0 --skip-inputs --json build/fuzz-resize.json

clean:
	rm -rf build $(VENV)
