# The two commands of the README: `make demo` (the main job on an embedded default) and `make test`.
# Each first installs geodiag and what it needs into the project's own virtual environment, .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.geodiag-installed
# Two cores, no GPU: keep OpenMP from spinning and nnU-Net's workers in process.
export OMP_WAIT_POLICY := PASSIVE
export nnUNet_compile := f
export nnUNet_n_proc_DA := 0
export nnUNet_def_n_proc := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml diagnostics/instruments/_cpu_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/geodiag demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/geodiag check-bounds --junit .check-bounds.xml

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis .check-bounds.xml
