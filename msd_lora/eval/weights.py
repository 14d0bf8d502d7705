"""The FID InceptionV3 weight file: where it is looked for, fetching it (only when allowed), and reading it.

The standard weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (TensorFlow's 2015-12-05 Inception
graph converted to torch). Looked for, in order: the path given (`--inception_weights`), then
`$MSD_LORA_CACHE` (default ~/.cache/msd_lora), then torch hub's cache (`$TORCH_HOME/hub/checkpoints`, where
pytorch-fid keeps it). When none holds it and downloading is allowed (not with MSD_LORA_OFFLINE=1 or
HF_HUB_OFFLINE=1), it is fetched from pytorch-fid's release with a message. A downloaded or cached file's sha256
must start with 6726825d (the hash prefix in its name, torch hub's convention): a download that does not is
deleted, a cached file that does not (empty, partial, another file) is an error saying to delete it. A file given
by path is not hash-checked (other weights are allowed) but is noted as not the standard weights.

A `.pth` is read with torch (`torch.load(weights_only=True)`); a `.safetensors` file with numpy only, so a
MindSpore-only machine uses a safetensors copy (tools/eval/convert_inception_weights.py writes one, recording the
.pth's sha256 as `source_sha256`). The weights' identity is that original sha256, so statistics saved with the
.pth are accepted with its safetensors copy. A file that cannot be read is an error naming it.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from msd_lora.errors import WeightsError
from msd_lora.eval import inception_arch as arch
from msd_lora.files.plain import sha256_of
from msd_lora.files.safetensors_file import read_safetensors, write_safetensors

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
RANDOM_INIT_KEY = "msd_lora_random_init"  # safetensors metadata of generated random weights
SOURCE_SHA256_KEY = "source_sha256"  # safetensors metadata of a converted copy: the original file's sha256
GET_STANDARD = f"the standard file is {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}"


def downloads_allowed() -> bool:
    return not any(os.environ.get(v, "") not in ("", "0") for v in ("MSD_LORA_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    return Path(os.environ.get("MSD_LORA_CACHE", Path.home() / ".cache" / "msd_lora"))


def candidate_paths() -> list[Path]:
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [cache_dir() / FID_WEIGHTS_NAME, torch_home / "hub" / "checkpoints" / FID_WEIGHTS_NAME]


def download_fid_weights(target: Path) -> Path:
    """Fetch pytorch-fid's weight file to `target`, checking its sha256 prefix; a bad file is removed."""
    import urllib.request

    print(f"downloading the FID InceptionV3 weights (91 MB) from {FID_WEIGHTS_URL}\n  to {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(FID_WEIGHTS_URL, partial)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"could not download {FID_WEIGHTS_URL} ({err}); download it by hand and pass "
                           f"--inception_weights PATH, or put it at {target}") from err
    digest = sha256_of(partial)
    if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
        partial.unlink()
        raise WeightsError(f"{FID_WEIGHTS_URL} downloaded with sha256 {digest}, which does not start with "
                           f"{FID_WEIGHTS_SHA256_PREFIX}: the file was deleted")
    partial.replace(target)
    print(f"  sha256 {digest} (prefix {FID_WEIGHTS_SHA256_PREFIX} verified)", file=sys.stderr)
    return target


def check_cached_weights(path: Path) -> Path:
    """A weight file found in a cache must be pytorch-fid's (sha256 prefix); an empty or other file is an error."""
    size = path.stat().st_size
    digest = sha256_of(path) if size else ""
    if digest.startswith(FID_WEIGHTS_SHA256_PREFIX) and size:
        return path
    found = "is empty" if not size else f"has sha256 {digest} ({size} bytes), not {FID_WEIGHTS_SHA256_PREFIX}..."
    raise WeightsError(f"the cached FID Inception weights {path} {found}: the file is incomplete, corrupt or another "
                       f"file. Delete it and run again (it is downloaded again where downloads are allowed), or pass "
                       f"--inception_weights PATH; {GET_STANDARD}")


def resolve_inception_weights(path: str | Path | None, download: bool | None = None) -> Path:
    """The weight file to use: `path` when given (it must exist), else the standard file from a cache (its hash
    checked) or, when allowed, a download."""
    if path:
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"Inception weights file {path} not found (--inception_weights); {GET_STANDARD}")
        return path
    for candidate in candidate_paths():
        if candidate.is_file():
            return check_cached_weights(candidate)
    allowed = downloads_allowed() if download is None else download
    if not allowed:
        looked = "\n  ".join(str(p) for p in candidate_paths())
        raise WeightsError(f"the FID Inception weights {FID_WEIGHTS_NAME} are missing; looked in\n  {looked}\n"
                           f"Downloads are off (MSD_LORA_OFFLINE / HF_HUB_OFFLINE). Fetch {FID_WEIGHTS_URL} on a "
                           f"machine with network access and pass --inception_weights PATH or copy it to the first "
                           f"path above.")
    return download_fid_weights(candidate_paths()[0])


def read_safetensors_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return read_safetensors(path)  # a TensorFileError (a ValueError) becomes a WeightsError below


def read_pth(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        from msd_lora.backends.torch.inception import read_pth_state
    except ImportError as err:
        raise WeightsError(f"{path} is a torch file and torch is not installed here: convert it once to "
                           f"safetensors with tools/eval/convert_inception_weights.py on a machine with torch, "
                           f"then pass the .safetensors file") from err
    return read_pth_state(str(path)), {}


def read_inception_weights(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state in the weight file's names, safetensors metadata) from a .safetensors or torch .pth file; a file that
    cannot be read (truncated, corrupt, not a state dict) is a WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Inception weights file {path} not found")
    try:
        state, metadata = (read_safetensors_weights if path.suffix == ".safetensors" else read_pth)(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]  # one line
        raise WeightsError(f"Inception weights file {path} cannot be read ({type(err).__name__}: {reason}): it is "
                           f"truncated, corrupt or not a weight file. Copy it again or pass another file; "
                           f"{GET_STANDARD}, and tools/eval/convert_inception_weights.py makes a .safetensors copy "
                           f"of it") from err
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state, metadata


def is_random_init(metadata: dict[str, str]) -> bool:
    return RANDOM_INIT_KEY in metadata


def weights_identity(path: str | Path, metadata: dict[str, str]) -> str:
    """The sha256 naming these weights: for a converted copy the original file's (metadata `source_sha256`), else
    the file's own. So a .pth and its safetensors copy are the same weights."""
    recorded = metadata.get(SOURCE_SHA256_KEY, "")
    return recorded if re.fullmatch(r"[0-9a-f]{64}", recorded) else sha256_of(Path(path))


def is_standard_fid(sha256: str) -> bool:
    """Whether `sha256` (a weights identity) is pytorch-fid's standard file (the prefix its name carries)."""
    return sha256.startswith(FID_WEIGHTS_SHA256_PREFIX)


def describe_weights(path: str | Path, metadata: dict[str, str]) -> dict:
    """{'file', 'sha256' (the identity), 'random_init', 'standard'} for reports and saved statistics."""
    identity = weights_identity(path, metadata)
    return {"file": str(path), "sha256": identity, "random_init": is_random_init(metadata),
            "standard": is_standard_fid(identity)}


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised weight file in pytorch-fid's layout (safetensors, marked random in its metadata)."""
    return write_safetensors(path, arch.random_state(seed), {RANDOM_INIT_KEY: f"seed={seed}"})
