"""MindSpore backend: mindone's Stable Diffusion networks, LoRA, train step and sampling."""
