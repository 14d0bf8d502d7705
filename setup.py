"""msd-lora: LoRA fine-tuning and sampling for Stable Diffusion 1.x/2.x on MindSpore and PyTorch."""
from setuptools import find_packages, setup

# Versions that resolve together (see constraints.txt for the full pinned set):
# mindone 0.5.0 pins transformers 4.57.1 and numpy<2; diffusers > 0.39 needs a huggingface-hub that
# transformers 4.57.1 refuses.
CORE = [
    "numpy==1.26.4",
    "omegaconf>=2.3",
    "pyyaml>=6.0",
    "pillow>=10.0",
    "tqdm>=4.66",
    "safetensors>=0.4.3",
    "transformers==4.57.1",  # CLIP tokenizer (backend-neutral) and the torch text encoder
    "huggingface-hub==0.36.2",
]
EXTRAS = {
    "torch": ["torch==2.13.0", "diffusers==0.39.0", "peft==0.21.2", "prodigyopt==1.1.2"],
    "mindspore": ["mindspore==2.10.0", "mindone==0.5.0"],
    "eval": ["scipy>=1.11"],
    "dev": ["pytest>=8.0", "ruff==0.17.6"],
}

setup(
    name="msd_lora",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["msd_lora", "msd_lora.*"]),
    package_data={"msd_lora": ["assets/tiny_sd/**/*", "assets/tiny_lora_data/*", "assets/tiny_dreambooth/*",
                               "assets/clip_bpe/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["msd-lora-train=msd_lora.cli.train:main",
                                      "msd-lora-sample=msd_lora.cli.sample:main"]},
)
