# make demo: the paper's pipeline in miniature on embedded synthetic data (CPU or GPU)
# make test: the whole test suite on CPU, Triton kernels through the interpreter
PY := .venv/bin/python
VENV := .venv/.installed

.PHONY: demo test clean

$(VENV): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: $(VENV)
	$(PY) prep/synthetic.py --out runs/demo/data --frames 240 --size 224 --slides 4
	$(PY) vit.py demo --data runs/demo/data --out runs/demo

test: $(VENV)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

clean:
	rm -rf runs/demo .pytest_cache
