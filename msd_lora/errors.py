"""Every error msd-lora raises for bad input, in one family.

A subclass of `MsdLoraError` means "the user can fix this": a config key or value, a file, a dataset, a
command-line argument. Its message names the file, key or value at fault and what to do. Command-line tools
print it as one line and exit with status 2 (`msd_lora.cli.errors`); anything else is a bug and keeps its
traceback. Classes are grouped by what the user gave; catch the group (`LoraError`) or the base.
"""
from __future__ import annotations


class MsdLoraError(ValueError):
    """Bad input: the message says which file, key or value and how to fix it."""


# --- paths the user named --------------------------------------------------------------------------------------
class MissingPathError(MsdLoraError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnwritablePathError(MsdLoraError, PermissionError):
    """An output path cannot be written (permissions, a file in the way, a link)."""


class RunFolderError(MsdLoraError):
    """An output folder holds another run's files or is in use by a running job."""


# --- settings --------------------------------------------------------------------------------------------------
class ConfigError(MsdLoraError):
    """A config key, value or file, or a command-line argument, is wrong."""


# --- data ------------------------------------------------------------------------------------------------------
class DatasetError(MsdLoraError):
    """The dataset folder, its index or one of its images cannot be used as given."""


# --- weight files and base models ------------------------------------------------------------------------------
class TensorFileError(MsdLoraError):
    """A weights file is missing, unreadable, truncated, unsafe, or in an unknown container."""


class SafetensorsError(TensorFileError):
    """A file is not a complete, readable safetensors file."""


class TorchFileError(TensorFileError):
    """A file is not a readable torch zip checkpoint."""


class UnsafePickleError(TensorFileError):
    """A pickle asks for a global outside the allow-list: loading it could run arbitrary code."""


class MindSporeCkptError(TensorFileError):
    """A file is not a readable MindSpore checkpoint."""


class ModelError(MsdLoraError):
    """A base model (folder, single file, model yaml) is missing, malformed or not Stable Diffusion 1.x / 2.x."""


class UnsupportedArchitectureError(ModelError):
    """The network is not a Stable Diffusion 1.x / 2.x one."""


class StateDictError(ModelError):
    """A state dict does not fit the network: names or shapes differ."""


class OutputFolderError(ModelError):
    """A model output folder holds something other than a diffusers model: it is not overwritten."""


# --- LoRA ------------------------------------------------------------------------------------------------------
class LoraError(MsdLoraError):
    """A LoRA file or LoRA setting is wrong."""


class LoraFormatError(LoraError):
    """A LoRA file is unreadable, not a LoRA, or its keys are not in the format they appear to be."""


class LoraMismatchError(LoraError):
    """A LoRA names layers the model lacks, or its shapes or alphas don't fit the model's."""


class LoraSpecError(LoraError):
    """The LoRA settings don't fit the model (no matching layer, rank too large, ...)."""


# --- training state --------------------------------------------------------------------------------------------
class ResumeError(MsdLoraError):
    """A resume file is missing, unreadable or from another run layout."""


# --- evaluation ------------------------------------------------------------------------------------------------
class EvalError(MsdLoraError):
    """An evaluation input (images, prompts, statistics, feature-network weights) is wrong."""


class WeightsError(EvalError):
    """A feature-network weight file is missing or unreadable."""


class StatisticsError(EvalError):
    """A saved FID statistics file is unreadable or does not match this run."""


class PairingError(EvalError):
    """Images and prompts cannot be paired for CLIP score."""


class ImageInputError(EvalError):
    """An image folder or image file for evaluation cannot be used."""


class EmbeddingError(MsdLoraError):
    """A textual-inversion embedding (file, token or placeholder setting) that cannot be used as asked."""
