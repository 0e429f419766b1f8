# make demo: the paper's experiment in miniature on embedded synthetic data (CPU: ~20 min on 2 cores; GPU: ViT-S)
# make test: the whole test suite on CPU, Triton kernels through the interpreter
PY := .venv/bin/python
VENV := .venv/.installed
R := runs/demo

# CPU: vit_tiny (6 blocks) on 64 px frames with 8 px patches (an 8x8 grid, enough for maps); the time goes to
# steps (MAE 620, DINOv3 248, I-JEPA and US-JEPA 310 each on ultrasound) rather than to data. GPU: ViT-S/16 at 224 as
# the paper, still short runs. Override any of these: make demo EPOCHS_US=50. BENCHMARKS.md ("The demo") gives
# the reasons for each CPU setting with the runs that measured them.
ifeq ($(shell test -e /dev/nvidia0 && echo gpu),gpu)
  FRAMES ?= 2000
  FRAME_PX ?= 256
  SLIDES ?= 80
  SLIDE_SIZE ?= 4096 3072
  ARCH ?= --size vit_small --img-size 224 --patch-size 16 --num-workers 8
  BATCH ?= 64
  EPOCHS_MAE ?= 40
  EPOCHS_US ?= 20
  DINO_EPOCHS_US ?= 20
  EPOCHS_WSI ?= 20
  DINO_HEAD ?= --n-prototypes 65536
  MAE_DEC ?=
  IJEPA_CPU ?=
  PROBE_PX ?= 224
else
  FRAMES ?= 2000              # labelled benchmark frames (60/20/20: 400 test frames per task) and as many to pretrain on
  FRAME_PX ?= 128
  SLIDES ?= 90                # 50/10/40 patient-level split: ~36 test slides (>= 30)
  SLIDE_SIZE ?= 2048 1536     # ~6 tissue patches of 224 px at 20x each
  # --num-workers 0: on 2 cores a loader process fights the 2 intra-op threads (I-JEPA ran at 6-60 img/s with one
  # worker, a steady 55 without)
  ARCH ?= --size vit_tiny --depth 6 --img-size 64 --patch-size 8 --num-workers 0 --device cpu
  BATCH ?= 32
  EPOCHS_MAE ?= 10            # 620 steps: MAE's CLS first collapses (RankMe 9 -> 1.7 by step 100), then recovers
  EPOCHS_US ?= 5              # 310 steps of I-JEPA and US-JEPA
  DINO_EPOCHS_US ?= 4         # 248 steps: a DINOv3 step (2 global + 2 local crops, two networks) costs ~6 MAE steps
  EPOCHS_WSI ?= 2
  DINO_HEAD ?= --n-prototypes 2048 --head-hidden 256 --n-local 2
  MAE_DEC ?= --decoder-dim 128 --decoder-depth 2 --decoder-heads 4
  # the predictor keeps Table 4's depth ratio to the encoder (8 of 12 -> 4 of 6); blocks of > 4 patches on 8x8
  IJEPA_CPU ?= --min-keep 4 --pred-depth 4
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
pretrain = $(PY) $(1).py --data $(R)/$(2) --out $(R)/$(3) $(ARCH) --batch-size $(BATCH) --epochs $(4) --diag-every 50 $(5)
MAE := --warmup-epochs 1 --lr 1e-3 $(MAE_DEC)   # blr 1.5e-4 x 32/256 would barely move in 600 steps
DINO := --epoch-length 0 --warmup-epochs 1 --tau-t-warmup 2 --freeze-last-layer 1 $(DINO_HEAD)
# I-JEPA with the paper's settings collapses at this scale for its first ~300 steps, and US-JEPA's pooled
# embedding loses rank (BENCHMARKS.md, "The demo"): LeJEPA's SIGReg, the paper's 0.D.4 variant, keeps both spread
IJEPA := --warmup-epochs 1 --sigreg 0.05 $(IJEPA_CPU)

demo: $(VENV)
	@echo "== demo: every artefact goes to $(R)/ (cleared first)"; rm -rf $(R)
	@echo "== 1/8 data: a labelled benchmark, unlabelled frames to pretrain on, slides; a smoke test of every kernel op"
	$(PY) prep/synthetic.py --out $(R)/data --frames $(FRAMES) --size $(FRAME_PX) --slides $(SLIDES) \
		--slide-size $(SLIDE_SIZE)
	$(PY) prep/synthetic.py --out $(R)/pretrain --frames $(FRAMES) --size $(FRAME_PX) --slides 0 --seed 1
	$(PY) vit.py demo --data $(R)/data/clean --out $(R) --size vit_tiny
	@echo "== 2/8 prep: ultrasound frames (appendix 0.C, for pretraining AND the probes) and slides tiled at 20x"
	$(PY) prep/ultrasound.py $(R)/pretrain/raw --out $(R)/us --size $(PROBE_PX) --workers 2
	$(PY) prep/ultrasound.py $(R)/data/raw --out $(R)/us-tasks --size $(PROBE_PX) --workers 2
	sed 's#^raw/##' $(R)/data/labels.csv > $(R)/us-tasks/labels.csv     # the same labels, for the prepared frames
	$(PY) prep/wsi.py tile $(R)/data/slides --out $(R)/wsi --workers 2
	$(PY) prep/wsi.py split $(R)/data/slides/slides.csv --out $(R)/splits.csv --frac 0.5,0.1,0.4
	@# the pretraining scripts read every .npy under --data as a frame stack: link only the patch arrays
	mkdir -p $(R)/wsi-frames && for d in $(R)/wsi/*/; do s=$$(basename $$d); \
		ln -s ../wsi/$$s/patches.npy $(R)/wsi-frames/$$s.npy; done
	echo '{"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}' > $(R)/wsi-frames/stats.json  # ImageNet, 0.C
	@echo "== 3/8 pretraining on ultrasound: MAE, DINOv3, I-JEPA and US-JEPA (I-JEPA with the frozen MAE teacher), both + SIGReg"
	$(call pretrain,mae,us,us-mae,$(EPOCHS_MAE),--in-chans 1 $(MAE))
	$(call pretrain,dino,us,us-dino,$(DINO_EPOCHS_US),--in-chans 1 $(DINO))
	$(call pretrain,ijepa,us,us-ijepa,$(EPOCHS_US),--in-chans 1 $(IJEPA))
	$(call pretrain,ijepa,us,us-usjepa,$(EPOCHS_US),--in-chans 1 $(IJEPA) --teacher $(R)/us-mae/ckpt.safetensors)
	@echo "== 4/8 pretraining on slide patches (RGB, ImageNet normalisation), short runs"
	$(call pretrain,mae,wsi-frames,wsi-mae,$(EPOCHS_WSI),--in-chans 3 $(MAE))
	$(call pretrain,dino,wsi-frames,wsi-dino,$(EPOCHS_WSI),--in-chans 3 --lr 1e-5 $(DINO))
	$(call pretrain,ijepa,wsi-frames,wsi-ijepa,$(EPOCHS_WSI),--in-chans 3 $(IJEPA))
	$(call pretrain,ijepa,wsi-frames,wsi-usjepa,$(EPOCHS_WSI),--in-chans 3 $(IJEPA) --teacher $(R)/wsi-mae/ckpt.safetensors)
	@echo "== 5/8 training curves: loss, learning rate and the collapse diagnostic of every run"
	$(PY) viz.py curves $(R)/us-mae $(R)/us-dino $(R)/us-ijepa $(R)/us-usjepa --out $(R)/curves-us.png \
		--names MAE DINOv3 "I-JEPA + SIGReg" "US-JEPA + SIGReg" --title "ultrasound pretraining (make demo)"
	$(PY) viz.py curves $(R)/wsi-mae $(R)/wsi-dino $(R)/wsi-ijepa $(R)/wsi-usjepa --out $(R)/curves-wsi.png \
		--names MAE DINOv3 "I-JEPA + SIGReg" "US-JEPA + SIGReg" --title "slide-patch pretraining (make demo)"
	@echo "== 6/8 linear probes on the two ultrasound tasks (Table 2 protocol), with random twins and raw pixels"
	$(PY) probe.py $(R)/us-mae/ckpt.safetensors $(R)/us-dino/ckpt.safetensors $(R)/us-ijepa/ckpt.safetensors \
		$(R)/us-usjepa/ckpt.safetensors --data $(R)/us-tasks/labels.csv --out $(R)/probe --num-workers 0
	@echo "== 7/8 ABMIL on the slides (Table 3 protocol), with random twins and raw pixels"
	$(PY) abmil.py $(R)/wsi-mae/ckpt.safetensors $(R)/wsi-dino/ckpt.safetensors $(R)/wsi-ijepa/ckpt.safetensors \
		$(R)/wsi-usjepa/ckpt.safetensors --patches $(R)/wsi --splits $(R)/splits.csv --out $(R)/abmil \
		--img-size $(PROBE_PX)
	@echo "== 8/8 maps (section 4) and the organ-segmentation analysis (section 4.1, I-JEPA vs DINOv3)"
	$(PY) viz.py maps $(R)/us-mae/ckpt.safetensors $(R)/us-dino/ckpt.safetensors $(R)/us-ijepa/ckpt.safetensors \
		--names MAE DINOv3 "I-JEPA + SIGReg" --images $(R)/us-tasks/frame_00000.png $(R)/us-tasks/frame_00001.png \
		--out $(R)/maps
	@# the 400 test frames of the benchmark, as prepared for the encoders; masks at the generator's resolution
	mkdir -p $(R)/seg && awk -F, '$$4 ~ /^test/ {print $$1}' $(R)/us-tasks/labels.csv | \
		while read f; do ln -sf ../us-tasks/$$f $(R)/seg/$$f; done
	$(PY) viz.py segscore $(R)/us-ijepa/ckpt.safetensors $(R)/us-dino/ckpt.safetensors \
		--images $(R)/seg --masks $(R)/data/masks --out $(R)/segscore.csv
	@echo "== done: tables in $(R)/probe/table.md and $(R)/abmil/table.md, figures in $(R)/maps/ and $(R)/curves-*.png"

# make paper US=DIR WSI=DIR [OUT=runs/paper] [PAPER_ARGS=--tiny]: the paper's whole protocol on your own data
# (prep, Table 4 pretraining at ViT-S/16 224, probes, ABMIL, section 4.1); the input layout: python paper.py --help
.PHONY: paper
paper: $(VENV)
	$(PY) paper.py $(if $(US),--us $(US)) $(if $(WSI),--wsi $(WSI)) --out $(or $(OUT),runs/paper) $(PAPER_ARGS)

test: $(VENV)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# make gpu-check [OUT=runs/gpu-check]: what a new GPU machine must prove, in one command, <= 8 min on one H100/H200 (CUDA kernel
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
