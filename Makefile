# make demo | make test | make bench — each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= torch,mindspore,eval,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_OUT ?= output/demo
BACKEND ?= mindspore

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
		--output_path $(DEMO_OUT) --overwrite True
	$(PY) text_to_image.py --backend $(BACKEND) --data_path configs/prompts/tiny_sks.txt --n_samples 4 --n_iter 2 \
		--scale 4 --grid_scale 4 --output_path $(DEMO_OUT)/samples_base --overwrite True
	$(PY) text_to_image.py --backend $(BACKEND) --data_path configs/prompts/tiny_sks.txt --n_samples 4 --n_iter 2 \
		--scale 4 --use_lora True --lora_ckpt_path $(DEMO_OUT)/lora.safetensors --grid_scale 4 --output_path $(DEMO_OUT)/samples_lora \
		--overwrite True
	$(PY) tools/compare_samples.py --reference msd_lora/assets/tiny_lora_data \
		--samples $(DEMO_OUT)/samples_base $(DEMO_OUT)/samples_lora

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/train_step.py --backend mindspore

clean:
	rm -rf $(VENV) output .pytest_cache

# --- evaluation (docs/evaluation.md) -------------------------------------------------------------------------------
# make eval: train a LoRA on the embedded tiny model, sample with and without it, FID + CLIP score, a results table.
# The feature networks are randomly initialised: the numbers exercise the pipeline, they are not comparable to
# published FID / CLIP scores.
EVAL_OUT ?= output/eval
EVAL_BACKEND ?= $(BACKEND)

.PHONY: eval xcheck-env xcheck

eval: install
	$(PY) train_text_to_image.py --train_config configs/train/lora_tiny.yaml --backend $(EVAL_BACKEND) \
		--output_path $(EVAL_OUT)/train --overwrite True
	$(PY) tools/eval/make_random_feature_networks.py --output_path $(EVAL_OUT)/random_networks
	$(PY) tools/eval/run_eval.py --config configs/train/lora_tiny.yaml --backend $(EVAL_BACKEND) \
		--lora_ckpt_path $(EVAL_OUT)/train/lora.safetensors --prompts configs/prompts/tiny_sks.txt \
		--real_dir msd_lora/assets/tiny_lora_data --n_samples 4 --n_iter 2 \
		--inception_weights $(EVAL_OUT)/random_networks/inception_random.safetensors \
		--clip_ckpt_path $(EVAL_OUT)/random_networks/clip_random --output_path $(EVAL_OUT) --overwrite True

# make xcheck-env: a separate venv with pytorch-fid, clean-fid, torchmetrics and torch-fidelity (they need
# torchvision, which must never enter .venv). tests/eval drive it by subprocess when it exists, skip otherwise.
XCHECK_VENV ?= .venv-xcheck
XCHECK_PY := $(XCHECK_VENV)/bin/python
XCHECK_STAMP := $(XCHECK_VENV)/.installed

$(XCHECK_STAMP):
	$(PYTHON) -m venv $(XCHECK_VENV)
	$(XCHECK_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 clean-fid==0.1.35 \
		torchmetrics==1.9.0 torch-fidelity==0.4.0 transformers==4.57.1 huggingface-hub==0.36.2 "numpy<2" scipy \
		safetensors pillow
	touch $@

xcheck-env: $(XCHECK_STAMP)

xcheck: install xcheck-env
	$(PY) -m pytest -q tests/eval -k xcheck
