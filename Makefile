# make demo: the paper's experiment in miniature on embedded synthetic data (CPU: ~15 min on 2 cores; GPU: ViT-S)
# make test: the whole test suite on CPU, Triton kernels through the interpreter
PY := .venv/bin/python
VENV := .venv/.installed
R := runs/demo

# CPU: vit_tiny (6 blocks) on 64 px frames with 8 px patches (an 8x8 grid, enough for maps), ~100 steps per method.
# GPU: ViT-S/16 at 224 as the paper, still short runs. Override any of these: make demo EPOCHS_US=50
# Runs are ~100 steps, so warmups are one or two epochs instead of the paper's 10-40.
ifeq ($(shell test -e /dev/nvidia0 && echo gpu),gpu)
  FRAMES ?= 2000
  FRAME_PX ?= 256
  SLIDES ?= 40
  ARCH ?= --size vit_small --img-size 224 --patch-size 16 --num-workers 8
  BATCH ?= 64
  EPOCHS_US ?= 20
  EPOCHS_WSI ?= 20
  DINO_EPOCHS_US ?= 20
  DINO_EPOCHS_WSI ?= 20
  DINO_HEAD ?= --n-prototypes 65536
  MAE_DEC ?=
  IJEPA_KEEP ?=
  PROBE_PX ?= 224
else
  FRAMES ?= 400
  FRAME_PX ?= 128
  SLIDES ?= 24
  ARCH ?= --size vit_tiny --depth 6 --img-size 64 --patch-size 8 --num-workers 1 --device cpu
  BATCH ?= 32
  EPOCHS_US ?= 8
  EPOCHS_WSI ?= 12
  DINO_EPOCHS_US ?= 4       # DINO's 2 global + 2 local crops cost ~4x an MAE step: half the passes on CPU
  DINO_EPOCHS_WSI ?= 6
  DINO_HEAD ?= --n-prototypes 2048 --head-hidden 256 --n-local 2
  MAE_DEC ?= --decoder-dim 128 --decoder-depth 2 --decoder-heads 4
  IJEPA_KEEP ?= --min-keep 4
  PROBE_PX ?= 64
endif

.PHONY: demo test clean

$(VENV): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# pretrain METHOD DATA OUT EPOCHS EXTRA: one pretraining run with the shared settings
pretrain = $(PY) $(1).py --data $(R)/$(2) --out $(R)/$(3) $(ARCH) --batch-size $(BATCH) --epochs $(4) $(5)
MAE := --warmup-epochs 1 --lr 1e-3 $(MAE_DEC)   # blr 1.5e-4 x 32/256 would barely move in 100 steps
DINO := --epoch-length 0 --warmup-epochs 1 --tau-t-warmup 2 --freeze-last-layer 1 $(DINO_HEAD)
IJEPA := --warmup-epochs 2 $(IJEPA_KEEP)

demo: $(VENV)
	@echo "== demo: every artefact goes to $(R)/ (cleared first)"; rm -rf $(R)
	@echo "== 1/7 smoke: a ViT forward/backward through every kernel op, checkpoint written and reloaded"
	$(PY) prep/synthetic.py --out $(R)/data --frames $(FRAMES) --size $(FRAME_PX) --slides $(SLIDES)
	$(PY) vit.py demo --data $(R)/data/clean --out $(R) --size vit_tiny
	@echo "== 2/7 prep: ultrasound frames (appendix 0.C) and slides tiled at 20x (patient-level split)"
	$(PY) prep/ultrasound.py $(R)/data/raw --out $(R)/us --size $(PROBE_PX) --workers 2
	$(PY) prep/wsi.py tile $(R)/data/slides --out $(R)/wsi --workers 2
	$(PY) prep/wsi.py split $(R)/data/slides/slides.csv --out $(R)/splits.csv
	@# the pretraining scripts read every .npy under --data as a frame stack: link only the patch arrays
	mkdir -p $(R)/wsi-frames && for d in $(R)/wsi/*/; do s=$$(basename $$d); \
		ln -s ../wsi/$$s/patches.npy $(R)/wsi-frames/$$s.npy; done
	echo '{"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}' > $(R)/wsi-frames/stats.json  # ImageNet, 0.C
	@echo "== 3/7 pretraining on ultrasound: MAE, DINOv3, I-JEPA, and US-JEPA (I-JEPA with the frozen MAE teacher)"
	$(call pretrain,mae,us,us-mae,$(EPOCHS_US),--in-chans 1 $(MAE))
	$(call pretrain,dino,us,us-dino,$(DINO_EPOCHS_US),--in-chans 1 $(DINO))
	$(call pretrain,ijepa,us,us-ijepa,$(EPOCHS_US),--in-chans 1 $(IJEPA))
	$(call pretrain,ijepa,us,us-usjepa,$(EPOCHS_US),--in-chans 1 $(IJEPA) --teacher $(R)/us-mae/ckpt.safetensors)
	@echo "== 4/7 pretraining on slide patches (RGB, ImageNet normalisation)"
	$(call pretrain,mae,wsi-frames,wsi-mae,$(EPOCHS_WSI),--in-chans 3 $(MAE))
	$(call pretrain,dino,wsi-frames,wsi-dino,$(DINO_EPOCHS_WSI),--in-chans 3 --lr 1e-5 $(DINO))
	$(call pretrain,ijepa,wsi-frames,wsi-ijepa,$(EPOCHS_WSI),--in-chans 3 $(IJEPA))
	$(call pretrain,ijepa,wsi-frames,wsi-usjepa,$(EPOCHS_WSI),--in-chans 3 $(IJEPA) --teacher $(R)/wsi-mae/ckpt.safetensors)
	@echo "== 5/7 linear probes on the two ultrasound tasks (Table 2 protocol)"
	$(PY) probe.py $(R)/us-mae/ckpt.safetensors $(R)/us-dino/ckpt.safetensors $(R)/us-ijepa/ckpt.safetensors \
		$(R)/us-usjepa/ckpt.safetensors --data $(R)/data/tasks/fatty $(R)/data/tasks/lesion --out $(R)/probe \
		--num-workers 2
	@echo "== 6/7 ABMIL on the slides (Table 3 protocol)"
	$(PY) abmil.py $(R)/wsi-mae/ckpt.safetensors $(R)/wsi-dino/ckpt.safetensors $(R)/wsi-ijepa/ckpt.safetensors \
		$(R)/wsi-usjepa/ckpt.safetensors --patches $(R)/wsi --splits $(R)/splits.csv --out $(R)/abmil \
		--img-size $(PROBE_PX)
	@echo "== 7/7 maps (section 4) and the organ-segmentation analysis (section 4.1, I-JEPA vs DINOv3)"
	$(PY) viz.py maps $(R)/us-mae/ckpt.safetensors $(R)/us-dino/ckpt.safetensors $(R)/us-ijepa/ckpt.safetensors \
		--names MAE DINOv3 I-JEPA --images $(R)/data/clean/frame_00000.png $(R)/data/clean/frame_00001.png \
		--out $(R)/maps
	$(PY) viz.py segscore $(R)/us-ijepa/ckpt.safetensors $(R)/us-dino/ckpt.safetensors \
		--images $(R)/data/clean --masks $(R)/data/masks --out $(R)/segscore.csv
	@echo "== done: tables in $(R)/probe/table.md and $(R)/abmil/table.md, figures in $(R)/maps/"

# make paper US=DIR WSI=DIR [OUT=runs/paper] [PAPER_ARGS=--tiny]: the paper's whole protocol on your own data
# (prep, Table 4 pretraining at ViT-S/16 224, probes, ABMIL, section 4.1); the input layout: python paper.py --help
.PHONY: paper
paper: $(VENV)
	$(PY) paper.py $(if $(US),--us $(US)) $(if $(WSI),--wsi $(WSI)) --out $(or $(OUT),runs/paper) $(PAPER_ARGS)

test: $(VENV)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# make gpu-check [OUT=runs/gpu-check]: the first GPU session in one command, <= 8 min on one H100/H200 (CUDA kernel
# tests, kernels vs every SDPA backend, training steps eager and compiled, a torchrun launch of ijepa.py), written
# to OUT/gpu-check.md and .json; BENCHMARKS.md says what it compares. Runs with the python that has CUDA torch:
# the .venv when there is one, else python3 (GPU_PY=... to choose); no install step, nothing downloaded.
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_PY) bench.py gpu-check --out $(or $(OUT),runs/gpu-check)

# make fix-copies: rewrite the plumbing copied from mae.py into dino.py, ijepa.py, prep/ultrasound.py
.PHONY: fix-copies
fix-copies:
	python3 tests/check_copies.py --fix

clean:
	rm -rf runs/demo .pytest_cache
