# Entry points on a fresh machine: `make demo`, `make test` (the whole suite, what CI runs) and `make test-fast`
# (unit tests only: no Ray, no S3 server, no job processes). All set up .venv first.
VENV ?= .venv
PYTHON ?= python3
# torch first, so that no dependency pulls another build of it. On a machine without an NVIDIA GPU (no
# `nvidia-smi`) it comes from PyTorch's CPU wheel index, where that index answers within 5 s: the default index
# (PyPI) serves Linux the CUDA build, several GB of it. Elsewhere, and where only the default index is reachable
# (as on this project's machines), from the default index. TORCH_INDEX=URL forces an index, TORCH_INDEX=default
# the default one; `make torch-index` prints the choice.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_INDEX_SH = case "$(TORCH_INDEX)" in \
	  default) ;; \
	  ?*) echo "$(TORCH_INDEX)" ;; \
	  *) command -v nvidia-smi >/dev/null 2>&1 || \
	     ! $(PYTHON) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
	       "$(TORCH_CPU_INDEX)/" >/dev/null 2>&1 || echo "$(TORCH_CPU_INDEX)" ;; \
	esac
PY := $(VENV)/bin/python
STAMP := $(VENV)/.embedrank-installed

.PHONY: setup demo test test-fast clean chromium reader-envs torch-index

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@index="$$($(TORCH_INDEX_SH))"; \
	  echo "installing $(TORCH_SPEC) from $${index:-the default index}"; \
	  $(PY) -m pip install --quiet "$(TORCH_SPEC)" $${index:+--index-url "$$index"}
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

# The index torch comes from (empty: the default index); see TORCH_INDEX above.
torch-index:
	@$(TORCH_INDEX_SH)

demo: $(STAMP)
	$(VENV)/bin/embedrank demo

# Headless Chromium renders the run report in one test; installed from Debian where we may (root + apt).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: Chromium is not installed; the report rendering test will be skipped"

# Readers whose pins clash with ours (Daft) get venvs of their own under .reader-envs/, built here so that the suite
# does not pay for the install (the test builds it too when missing, and skips where no registry answers).
reader-envs: $(STAMP)
	@$(PY) tests/support/reader_envs.py || echo "note: the Daft reader environment could not be built; its test will be skipped"

# Two pytest workers (pytest-xdist), each with its own session Ray and S3 server; a test file stays on one worker
# (its module fixtures are built once). Many tests wait on job processes, Ray starts and timeouts: on 2 cores
# two workers finish the suite in far less time than one. --no-loadscope-reorder keeps tests/conftest.py's order
# (the files of long tests first; xdist otherwise hands out the files with the most tests first). No wall-time gain
# was measurable (961 s without it, 1,011 s with it, one run each on 2026-12-08: run-to-run noise is larger).
TEST_WORKERS ?= 2
test: $(STAMP) chromium reader-envs
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Markers in pyproject.toml; tests/conftest.py marks every test using ray_local, s3_server or s3_bucket `integration`.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not integration and not slow and not gpu"

clean:
	rm -rf $(VENV) .demo .pytest_cache
