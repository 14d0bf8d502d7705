"""Checkpoint containers and base-model layouts without a framework: safetensors, MindSpore protobuf, torch
pickles (refusing code), LDM / mindone single files of the tiny model, version detection, offline tokenizers."""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import yaml

from msd_lora.errors import SafetensorsError, StateDictError, TensorFileError, UnsupportedArchitectureError
from msd_lora.files import mindspore_ckpt
from msd_lora.files.safetensors_file import read_safetensors, write_safetensors
from msd_lora.files.tensor_file import read_tensor_file
from msd_lora.models.layout import unet_names
from msd_lora.models.mindone import text_pairs, unet_name
from msd_lora.models.pretrained import load_model
from msd_lora.models.single_file import write_single_file
from msd_lora.models.versions import detect_version, shipped_config


def test_safetensors_writer_and_reader_agree_with_the_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "c": rng.standard_normal((2, 1, 3, 3)).astype(np.float16), "scalar": np.array(2.5, np.float32)}
    write_safetensors(tmp_path / "ours.safetensors", tensors, {"k": "v"})
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(theirs[k], v) and theirs[k].dtype == v.dtype for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    ours, meta = read_safetensors(tmp_path / "lib.safetensors")
    assert meta == {"k": "v"} and all(np.array_equal(ours[k], v) for k, v in tensors.items())
    write_safetensors(tmp_path / "half.safetensors", tensors, dtype="float16")
    assert load_file(str(tmp_path / "half.safetensors"))["a"].dtype == np.float16
    assert load_file(str(tmp_path / "half.safetensors"))["b"].dtype == np.int64


def test_bfloat16_safetensors_widen_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 65280.0], np.float32)  # exactly representable in bfloat16
    raw = (values.view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
    tensors, _ = read_safetensors(tmp_path / "bf16.safetensors")
    assert tensors["w"].dtype == np.float32 and np.array_equal(tensors["w"], values)


def test_truncated_and_garbled_safetensors_are_named(tmp_path):
    write_safetensors(tmp_path / "ok.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(SafetensorsError, match=r"cut\.safetensors is truncated: tensor 'w' ends at byte"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "garbled.safetensors").write_bytes(data[:8] + b"#" + data[9:])
    with pytest.raises(TensorFileError, match=r"garbled\.safetensors"):
        read_tensor_file(tmp_path / "garbled.safetensors")


def raw_safetensors(path, header, data=b""):
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header,message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "data_offsets \\[-8, 0\\]"),
    ({"w": {"dtype": "F32", "shape": [], "data_offsets": [8, 4]}}, "data_offsets \\[8, 4\\]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, "data_offsets \\[0, '8'\\]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, "data_offsets \\[0.0, 8.0\\]"),
    ({"w": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}, "shape \\[-1, -2\\]"),
    ({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, "shape \\[2.5\\]"),
    ({"w": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, "has 0 bytes for shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "tensors 'w' and 'v' overlap"),
    ({"__metadata__": {"a": 1}}, "__metadata__ is not an object of strings"),
    ({"__metadata__": ["a"]}, "__metadata__ is not an object of strings"),
    ({"w": [0, 8]}, "malformed header entry for 'w'"),
])
def test_bad_safetensors_headers_are_errors_naming_the_file(tmp_path, header, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, bytes(16))
    with pytest.raises(SafetensorsError, match=rf"bad\.safetensors: .*{message}"):
        read_safetensors(path)


def test_mindspore_checkpoint_round_trip_slices_and_trailer(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    tensors = {"net.w": rng.standard_normal((40, 3)).astype(np.float32), "net.h": np.arange(6, dtype=np.float16),
               "lora_rank": np.array(8, np.int64), "flag": np.array([True, False])}
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 100)  # split net.w into several values, as MindSpore does
    path = mindspore_ckpt.write_mindspore_ckpt(tmp_path / "m.ckpt", tensors)
    assert path.read_bytes().count(b"net.w") > 1
    back = mindspore_ckpt.read_mindspore_ckpt(path)
    assert sorted(back) == sorted(tensors)
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    (tmp_path / "crc.ckpt").write_bytes(path.read_bytes() + b"crc_num" + (123).to_bytes(10, "big"))
    assert np.array_equal(mindspore_ckpt.read_mindspore_ckpt(tmp_path / "crc.ckpt")["net.w"], tensors["net.w"])
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:-7])
    with pytest.raises(TensorFileError, match=r"cut\.ckpt is not a readable MindSpore checkpoint"):
        read_tensor_file(tmp_path / "cut.ckpt")


def test_mindspore_checkpoint_cut_inside_a_tensor_is_named(tmp_path):
    path = mindspore_ckpt.write_mindspore_ckpt(tmp_path / "one.ckpt", {"w": np.ones(1000, np.float32)})
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:-100])  # the tensor's bytes run past the end
    with pytest.raises(mindspore_ckpt.MindSporeCkptError, match=r"cut\.ckpt is not a readable .*runs past the end"):
        mindspore_ckpt.read_mindspore_ckpt(tmp_path / "cut.ckpt")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickles_with_code_are_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"state_dict": {"w": Payload(marker)}}, protocol=2))
        archive.writestr("evil/version", "3\n")
    with pytest.raises(TensorFileError, match=r"(?s)evil\.ckpt: the pickle asks for '(posix|os)\.system'.*refused"):
        read_tensor_file(tmp_path / "evil.ckpt")
    (tmp_path / "bare.pt").write_bytes(pickle.dumps({"w": Payload(marker)}))
    with pytest.raises(TensorFileError, match=r"bare\.pt is a bare pickle"):
        read_tensor_file(tmp_path / "bare.pt")
    assert not marker.exists()


@pytest.mark.parametrize("offset,size,stride", [(0, (4, 4), (4, 1)), (10, (2, 4), (4, 1)), (0, (3,), (-1,)),
                                                (-2, (2,), (1,)), (0, (10**6, 10**6), (0, 0)), (0, (3, 4), (0, 1)),
                                                (0, (-1, 4), (4, 1)), (13, (), ())])
def test_tensor_views_outside_their_storage_are_refused(offset, size, stride):
    """A crafted checkpoint could ask for a view past its bytes (as_strided does not check): refused, not read."""
    from msd_lora.errors import TorchFileError
    from msd_lora.files.torch_pickle import _rebuild_tensor, _Storage

    storage = _Storage(np.arange(12, dtype=np.float32))
    with pytest.raises(TorchFileError, match="does not fit its storage"):
        _rebuild_tensor(storage, offset, size, stride)
    assert np.array_equal(_rebuild_tensor(storage, 2, (2, 5), (5, 1)), np.arange(2, 12).reshape(2, 5))
    assert _rebuild_tensor(storage, 0, (0, 4), (4, 1)).shape == (0, 4) and _rebuild_tensor(storage, 11, (), ()) == 11


def _str(text):
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def _global(module, name):
    return f"c{module}\n{name}\n".encode()


def _int(n):
    return b"J" + int(n).to_bytes(4, "little", signed=True)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(numel=4, size=(4,), pid=None, value=None):
    """The protocol-2 data.pkl torch.save writes for {'w': tensor}, by hand (checked against torch.load)."""
    pid = pid if pid is not None else (_str("0"), _str("cpu"), _int(numel))
    storage = _tuple(_str("storage"), _global("torch", "FloatStorage"), *pid) + b"Q"
    value = value or _global("torch._utils", "_rebuild_tensor_v2") + _tuple(
        storage, _int(0), _tuple(*map(_int, size)), _tuple(*(_int(1) for _ in size)), b"\x89",
        _global("collections", "OrderedDict") + b")R") + b"R"
    return b"\x80\x02}" + _str("w") + value + b"s."


def torch_zip(path, data_pkl, storage=np.arange(4, dtype=np.float32).tobytes(), deflate=()):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in (("data.pkl", data_pkl), ("data/0", storage), ("version", b"3\n")):
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            archive.writestr(f"archive/{name}", data, compress_type=method)
    return path


@pytest.mark.parametrize("deflate", [("data.pkl",), ("data/0",)])
def test_compressed_torch_entries_are_refused(tmp_path, deflate):
    """torch.save stores every entry: a deflated one is repacked or a zip bomb, and is not inflated."""
    ok = torch_zip(tmp_path / "ok.pt", tensor_pickle())
    assert np.array_equal(read_tensor_file(ok).tensors["w"], np.arange(4))
    bomb = torch_zip(tmp_path / "bomb.pt", tensor_pickle(), deflate=deflate)
    with pytest.raises(TensorFileError, match=rf"bomb\.pt: entry archive/{deflate[0]} is compressed"):
        read_tensor_file(bomb)


def _lying_sizes(path, numel):
    """Make the zip's directory claim storage 0 holds `numel` floats, more than the file has."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02", data.index(b"archive/data/0") + 1)  # central directory entry
    entry = data.rindex(b"PK\x01\x02", 0, data.index(b"archive/data/0", entry))
    data[entry + 20:entry + 28] = (numel * 4).to_bytes(4, "little") * 2
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case,message", [
    ("short persistent id", "unexpected persistent id"),
    ("negative numel", "storage 0 claims -4 elements"),
    ("negative size", "does not fit its storage"),
    ("storage past the end", "storage 0 runs past the end of the file"),
    ("calls a storage type", "corrupt or crafted \\(TypeError"),
    ("bad dtype", "corrupt or crafted \\(TypeError"),
    ("state on a set", "corrupt or crafted \\(AttributeError"),
])
def test_crafted_torch_pickles_are_errors_naming_the_file(tmp_path, case, message):
    data_pkl = {
        "short persistent id": tensor_pickle(pid=()),
        "negative numel": tensor_pickle(numel=-4),
        "negative size": tensor_pickle(size=(-1,)),
        "storage past the end": tensor_pickle(numel=1000, size=(1000,)),
        "calls a storage type": tensor_pickle(value=_global("torch", "FloatStorage") + b")R"),
        "bad dtype": tensor_pickle(value=_global("numpy", "dtype") + _tuple(_global("builtins", "set") + b")R") + b"R"),
        "state on a set": tensor_pickle(value=_global("builtins", "set") + b")R}" + _str("a") + _int(1) + b"sb"),
    }[case]
    path = torch_zip(tmp_path / "crafted.pt", data_pkl)
    if case == "storage past the end":
        _lying_sizes(path, 1000)
    with pytest.raises(TensorFileError, match=rf"crafted\.pt: .*{message}"):
        read_tensor_file(path)


def fake(shape, dtype=np.float16):
    """An array of the right shape that costs no memory (the detector only reads shapes)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def sd_signature_keys(context, text, in_channels=4):
    keys = {"model.diffusion_model.input_blocks.0.0.weight": fake((320, in_channels, 3, 3)),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": fake((320, context))}
    if text == "clip":
        keys["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = fake((49408, 768))
        keys.update({f"cond_stage_model.transformer.text_model.encoder.layers.{i}.mlp.fc1.bias": fake((3072,))
                     for i in range(12)})
    else:
        keys["cond_stage_model.model.token_embedding.weight"] = fake((49408, 1024))
        keys.update({f"cond_stage_model.model.transformer.resblocks.{i}.ln_1.bias": fake((1024,)) for i in range(24)})
    return keys


def test_version_detection_from_weights():
    assert detect_version(sd_signature_keys(768, "clip"), {}, "a")[0] == "v1"
    version, _, note = detect_version(sd_signature_keys(1024, "open_clip"), {}, "b")
    assert version == "v2-v" and "v2-inference.yaml" in note
    assert detect_version(sd_signature_keys(1024, "open_clip"), {"global_step": "875000"}, "c")[0] == "v2-base"
    assert detect_version(sd_signature_keys(1024, "open_clip"), {}, "/m/v2-1_512-ema-pruned.ckpt")[0] == "v2-base"
    assert detect_version(sd_signature_keys(1024, "open_clip"), {}, "/m/sd_v2_base-57526ee4.ckpt")[0] == "v2-base"
    assert detect_version(sd_signature_keys(1024, "open_clip"), {}, "/m/v2-1_768-ema-pruned.ckpt")[0] == "v2-v"


@pytest.mark.parametrize("tensors,message", [
    (sd_signature_keys(768, "clip", in_channels=9), "inpainting model"),
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": fake((49408, 768)),
      "model.diffusion_model.input_blocks.0.0.weight": fake((320, 4, 3, 3))}, "SDXL checkpoint"),
    ({"control_model.input_blocks.0.0.weight": fake((320, 4, 3, 3))}, "ControlNet"),
    ({"down_blocks.0.resnets.0.conv1.weight": fake((320, 320, 3, 3))}, "diffusers component"),
])
def test_unsupported_checkpoints_say_what_they_are(tensors, message):
    with pytest.raises(UnsupportedArchitectureError, match=message):
        detect_version(tensors, {}, "model.safetensors")


def test_shipped_yamls_describe_sd_exactly():
    v1, base, v = shipped_config("v1"), shipped_config("v2-base"), shipped_config("v2-v")
    assert (v1.prediction_type, base.prediction_type, v.prediction_type) == ("epsilon", "epsilon", "v_prediction")
    assert (v1.image_size, base.image_size, v.image_size) == (512, 512, 768)
    assert v.architecture["unet"]["upcast_attention"] and not base.architecture["unet"]["upcast_attention"]
    assert base.architecture["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert base.architecture["unet"]["use_linear_projection"] and not v1.architecture["unet"]["use_linear_projection"]
    assert base.architecture["text_encoder"]["num_hidden_layers"] == 23
    assert base.architecture["text_encoder"]["hidden_act"] == "gelu"
    assert (v1.text_encoder_layout, v.text_encoder_layout) == ("clip", "open_clip")


def test_mindone_names_match_mindones_published_parameter_list():
    """Names copied from mindone's examples/stable_diffusion_v2/tools/model_conversion/ms_names_v2.txt."""
    names = {unet_name(ldm) for _, ldm in unet_names(shipped_config("v2-base").architecture["unet"])}
    for expected in ("input_blocks.0.0.conv.weight", "input_blocks.1.0.in_layers_norm.gamma",
                     "input_blocks.1.0.in_layers_conv.conv.weight", "input_blocks.1.0.out_layers_norm.beta",
                     "input_blocks.1.0.out_layers_conv.conv.bias", "input_blocks.1.1.norm.gamma",
                     "input_blocks.3.0.op.conv.weight", "input_blocks.4.0.skip_connection.conv.weight",
                     "input_blocks.1.1.transformer_blocks.0.norm3.beta", "output_blocks.8.2.conv.conv.weight",
                     "time_embed.2.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias"):
        assert expected in names, expected
    text = {name for _, name in text_pairs(23)}
    for expected in ("embedding_table", "positional_embedding", "ln_final.gamma",
                     "transformer_layer.resblocks.22.attn.attn.in_proj.weight", "transformer_layer.resblocks.0.c_fc.bias",
                     "transformer_layer.resblocks.3.ln_2.gamma"):
        assert "cond_stage_model.transformer." + expected in text, expected


@pytest.fixture(scope="module")
def tiny_yaml(tiny_model, tmp_path_factory):
    """A model yaml describing the tiny model fully (a custom SD variant, as a user would write it)."""
    model, cfg = load_model(tiny_model)
    raw = {"name": "tiny-single-file", "version": "tiny", "image_size": 32, "prediction_type": "epsilon",
           "text_encoder_layout": "clip", "schedule": cfg.schedule,
           **{n: model.configs[n] for n in ("unet", "vae", "text_encoder")},
           "tokenizer": {"folder": str(tiny_model / "tokenizer")}}
    path = tmp_path_factory.mktemp("yaml") / "tiny-full.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("layout,name", [("ldm", "tiny.safetensors"), ("mindone", "tiny.ckpt")])
def test_single_files_of_the_tiny_model_round_trip_exactly(tiny_model, tiny_yaml, tmp_path, layout, name):
    model, _ = load_model(tiny_model)
    write_single_file(model, tmp_path / name, layout, "clip")
    back, cfg = load_model(tmp_path / name, tiny_yaml)
    assert back.metadata["format"] == layout and cfg.name == "tiny-single-file"
    for network in ("unet", "vae", "text_encoder"):
        assert sorted(back.state[network]) == sorted(model.state[network])
        for key, value in model.state[network].items():
            assert np.array_equal(back.state[network][key], value), key
    assert (back.tokenizer_dir / "vocab.json").is_file()


def test_ldm_file_of_another_architecture_is_refused(tiny_model, tiny_yaml, tmp_path):
    model, _ = load_model(tiny_model)
    path = write_single_file(model, tmp_path / "tiny.safetensors", "ldm", "clip")
    with pytest.raises(UnsupportedArchitectureError, match=r"(?s)v1-inference\.yaml does not describe.*"
                                                           r"cross-attention width: config 768, file 64"):
        load_model(path, shipped_config("v1").path)
    from msd_lora.files.tensor_file import read_tensor_file as read

    tensors = dict(read(path).tensors)
    tensors["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((4, 4), np.float32)  # a class-conditional UNet
    write_safetensors(tmp_path / "extra.safetensors", tensors)
    with pytest.raises(StateDictError, match=r"(?s)1 weights the architecture does not have.*label_emb"):
        load_model(tmp_path / "extra.safetensors", tiny_yaml)


def test_truncated_diffusers_component_is_named(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(TensorFileError, match=r"diffusion_pytorch_model\.safetensors is truncated"):
        load_model(folder)


@pytest.mark.parametrize("pad,pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_offline_clip_tokenizers_give_clip_ids(tmp_path, monkeypatch, pad, pad_id):
    from msd_lora.tokenizer import PromptTokenizer, tokenizer_folder

    monkeypatch.setenv("MSD_LORA_CACHE", str(tmp_path))
    folder = tokenizer_folder(pad, 77)
    assert folder.parent == tmp_path and len(json.loads((folder / "vocab.json").read_text())) == 49408
    ids = PromptTokenizer(folder)(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[0, 7] == pad_id
    assert tokenizer_folder(pad, 77) == folder  # built once


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_diffusers_folder_is_replaced_whole_and_atomically(tiny_model, tmp_path, monkeypatch):
    from msd_lora.models import diffusers_writer

    model, cfg = load_model(tiny_model)
    out = tmp_path / "out"
    diffusers_writer.write_diffusers_folder(model, cfg, out)
    stale = [out / "unet" / "diffusion_pytorch_model.fp16.safetensors", out / "vae" / "model.safetensors.index.json"]
    for path in stale:
        path.write_bytes(b"stale")
    diffusers_writer.write_diffusers_folder(model, cfg, out, "float16")
    assert not any(path.exists() for path in stale)
    assert load_model(out)[0].state["unet"]["conv_in.weight"].dtype == np.float16
    before = _snapshot(out)

    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError("disk full")
        return write_safetensors(*args, **kwargs)

    monkeypatch.setattr(diffusers_writer, "write_safetensors", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        diffusers_writer.write_diffusers_folder(model, cfg, out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copies left beside it


def test_a_folder_that_is_not_a_diffusers_model_is_not_overwritten(tiny_model, tmp_path):
    from msd_lora.errors import OutputFolderError
    from msd_lora.models.diffusers_writer import write_diffusers_folder

    model, cfg = load_model(tiny_model)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"meow")
    with pytest.raises(OutputFolderError, match=r"photos is not empty and holds no diffusers model"):
        write_diffusers_folder(model, cfg, tmp_path / "photos")
    assert (tmp_path / "photos" / "cat.png").read_bytes() == b"meow"
    (tmp_path / "empty").mkdir()
    assert load_model(write_diffusers_folder(model, cfg, tmp_path / "empty"))[0].configs == model.configs
