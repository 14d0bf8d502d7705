# make demo | make test | make bench | make dreambooth — each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= torch,mindspore,eval,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_OUT ?= output/demo
BACKEND ?= mindspore

.PHONY: install demo test bench clean dreambooth

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

# make dreambooth: the DreamBooth example of docs/dreambooth.md on the embedded tiny model. Teaches it "sks circle", a
# cyan circle (a colour it never saw), by DreamBooth-LoRA without and with prior preservation (generated "blue circle"
# class images) and by pivotal tuning (a new token <sks>); samples each and prints how often each prompt shows the
# subject, and how far the class prompt's samples moved from the base model's.
DB_OUT ?= output/dreambooth
DB_TRAIN = $(PY) train_text_to_image.py --backend $(BACKEND) --class_data_dir $(DB_OUT)/class_images --overwrite True
DB_SAMPLE = $(PY) text_to_image.py --backend $(BACKEND) --n_samples 5 --n_iter 2 --scale 5 --grid_scale 4 --overwrite True

dreambooth: install
	$(DB_TRAIN) --train_config configs/train/dreambooth_tiny.yaml --output_path $(DB_OUT)/dreambooth
	$(DB_TRAIN) --train_config configs/train/dreambooth_tiny.yaml --output_path $(DB_OUT)/no_prior \
		--with_prior_preservation False
	$(DB_TRAIN) --train_config configs/train/pivotal_tiny.yaml --output_path $(DB_OUT)/pivotal
	$(DB_SAMPLE) --data_path configs/prompts/tiny_dreambooth.txt --output_path $(DB_OUT)/samples_base
	$(DB_SAMPLE) --data_path configs/prompts/tiny_dreambooth.txt --output_path $(DB_OUT)/samples_no_prior \
		--lora_ckpt_path $(DB_OUT)/no_prior/lora.safetensors
	$(DB_SAMPLE) --data_path configs/prompts/tiny_dreambooth.txt --output_path $(DB_OUT)/samples_dreambooth \
		--lora_ckpt_path $(DB_OUT)/dreambooth/lora.safetensors
	$(DB_SAMPLE) --data_path configs/prompts/tiny_pivotal.txt --output_path $(DB_OUT)/samples_pivotal \
		--lora_ckpt_path $(DB_OUT)/pivotal/lora.safetensors --embedding_path $(DB_OUT)/pivotal/embeddings/sks.safetensors
	$(PY) tools/subject_shown.py --base $(DB_OUT)/samples_base --samples $(DB_OUT)/samples_base \
		$(DB_OUT)/samples_no_prior $(DB_OUT)/samples_dreambooth $(DB_OUT)/samples_pivotal --grid $(DB_OUT)/grid.png

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
