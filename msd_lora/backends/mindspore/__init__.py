"""MindSpore backend: mindone's Stable Diffusion networks, LoRA, train step and sampling.

Importing this package sets INFNAN overflow mode for Ascend (unless the user set another) before any of its
modules imports MindSpore: the mode must be in place before MindSpore initialises a device.
"""
import os

os.environ.setdefault("MS_ASCEND_CHECK_OVERFLOW_MODE", "INFNAN_MODE")
