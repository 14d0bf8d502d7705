# make demo | make test | make bench — each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= torch,mindspore,eval,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_OUT ?= output/demo
BACKEND ?= torch

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.py constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(PY) train_text_to_image.py --train_config configs/train/lora_tiny.yaml --backend $(BACKEND) \
		--output_path $(DEMO_OUT)
	$(PY) text_to_image.py --data_path configs/prompts/tiny_sks.txt --n_samples 4 --n_iter 2 \
		--grid_scale 4 --output_path $(DEMO_OUT)/samples_base
	$(PY) text_to_image.py --data_path configs/prompts/tiny_sks.txt --n_samples 4 --n_iter 2 \
		--use_lora True --lora_ckpt_path $(DEMO_OUT)/lora.safetensors --grid_scale 4 --output_path $(DEMO_OUT)/samples_lora
	$(PY) tools/compare_samples.py --reference msd_lora/assets/tiny_lora_data \
		--samples $(DEMO_OUT)/samples_base $(DEMO_OUT)/samples_lora

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/train_step.py --backend torch

clean:
	rm -rf $(VENV) output .pytest_cache
