# dinoreg — set-up, demo, tests and benchmarks. Everything installs into .venv.
# torch is pinned and installed first so pip never pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
SHARED ?= ../shared
DATA   := $(SHARED)/data
OUT    ?= outputs

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Register the example inter-subject brain pair with the MIND preset and score it.
demo: setup
	$(BIN)/dinoreg register \
	  $(DATA)/learn2reg_tutorial2019_brain_t1/subject_1_vol.nii.gz \
	  $(DATA)/voxelmorph_brain_t1/test_scan_vol.nii.gz \
	  -o $(OUT)/demo \
	  --fixed-labels $(DATA)/learn2reg_tutorial2019_brain_t1/subject_1_seg.nii.gz \
	  --moving-labels $(DATA)/voxelmorph_brain_t1/test_scan_seg.nii.gz \
	  --labels $(DATA)/voxelmorph_brain_t1/labels.npz
	@echo "demo outputs are in $(OUT)/demo"

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Speed / memory / accuracy against the convexadam package (installed without touching torch).
bench: setup
	$(BIN)/pip install -q "convexadam==0.2.0"
	$(BIN)/python benchmarks/bench.py --shared $(SHARED) --out $(OUT)/bench

clean:
	rm -rf $(OUT) .pytest_cache
