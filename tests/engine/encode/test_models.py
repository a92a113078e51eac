import hashlib

import pytest

from clipengine.config import ModelConfig
from clipengine.errors import ClipengineError


def test_tiny_config_resolves_and_loads_through_the_real_path(tiny_clip):
    from clipengine.encode.models import load_model, resolve_model

    spec = resolve_model(tiny_clip.model_config)
    assert spec.source == "open_clip" and spec.name == "tiny-clip"
    assert spec.image_size == 32 and spec.weights_hash and len(spec.weights_hash) == 64
    assert spec.model_id == resolve_model(tiny_clip.model_config).model_id  # stable
    towers = load_model(spec)
    assert towers.embed_dim == 32 and towers.image_size == 32 and towers.key == spec.model_id
    record = spec.to_record()
    assert record["architecture"] == tiny_clip.architecture and record["weights_sha256"] == spec.weights_hash


def test_model_id_follows_the_weights(tiny_clip, tmp_path):
    from clipengine.encode.models import resolve_model

    from tests.fixtures_models import TINY_ARCHITECTURE, save_random_model

    other = save_random_model(TINY_ARCHITECTURE, tmp_path, "tiny-clip", seed=1)
    assert resolve_model(other.model_config).model_id != resolve_model(tiny_clip.model_config).model_id


def test_loading_fills_every_tensor_from_the_checkpoint_without_drawing_random_weights(tiny_clip):
    """The model is built with torch.nn.init switched off (its tensors then all come from the file), and
    torch.nn.init works again afterwards; the tokenizer is built at its first call."""
    import torch
    from safetensors.torch import load_file

    from clipengine.encode.models import build_open_clip_model, load_model, resolve_model

    drawn = []
    original_normal = torch.nn.init.normal_

    def counting_normal(tensor, *args, **kwargs):
        drawn.append(tuple(tensor.shape))
        return original_normal(tensor, *args, **kwargs)

    torch.nn.init.normal_ = counting_normal
    try:
        towers = load_model(resolve_model(tiny_clip.model_config))
        assert not towers.towers_built  # its image tower is read from the file; the modules come at first use
        towers.image_tower  # noqa: B018 — builds them
        assert towers.towers_built and drawn == []  # no random draw while loading
        build_open_clip_model(tiny_clip.architecture)
        assert drawn  # a random-init build still draws
    finally:
        torch.nn.init.normal_ = original_normal
    saved = load_file(str(tiny_clip.weights_path))
    loaded = {f"visual.{k}": v for k, v in towers.image_tower.state_dict().items()}
    assert loaded and all(torch.equal(v, saved[k]) for k, v in loaded.items())
    assert towers.tokenize._tokenizer is None
    tokens = towers.tokenize(["a photo of a cat"])
    assert tokens.shape == (1, tiny_clip.architecture["text_cfg"]["context_length"]) and towers.tokenize._tokenizer


def test_the_image_tower_read_from_the_checkpoint_encodes_as_the_built_model(tiny_clip, sample_photos):
    """bf16 on the CPU runs the fused forward from the checkpoint's tensors without building the model; its
    rows are those of the fused forward of the built tower; the logit scale is the model's; encoding text
    builds the model."""
    import numpy as np

    from clipengine.bindings.torch import TorchEncoder
    from clipengine.encode.decode import load_image
    from clipengine.encode.geometry import ImageSpec
    from clipengine.encode.models import load_model, resolve_model

    spec = resolve_model(tiny_clip.model_config)
    pixels = np.stack([load_image(path, None, ImageSpec(image_size=32)) for path in sample_photos])
    lazy = load_model(spec)
    assert lazy.vision is not None
    direct = TorchEncoder(lazy, precision="bf16")
    assert direct.image_forward == "fused CPU forward" and not lazy.towers_built
    rows = direct.encode_images(pixels)
    assert not lazy.towers_built
    built = load_model(spec)
    built.image_tower  # noqa: B018 — the modules now exist
    built.vision = None  # the encoder then fuses the built module's tower
    from_module = TorchEncoder(built, precision="bf16")
    assert from_module.image_forward == "fused CPU forward"
    np.testing.assert_array_equal(rows, from_module.encode_images(pixels))
    reference = tiny_clip.build_reference()
    assert lazy.logit_scale == float(reference.logit_scale.exp())
    texts = direct.encode_texts(["a photo of a cat"])  # the text tower is built now
    assert lazy.towers_built and texts.shape == (1, 32)


def test_packaged_architectures_are_read_as_open_clip_gives_them():
    import importlib.util
    from pathlib import Path

    import open_clip

    from clipengine.encode import models

    folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    names = sorted(path.stem for path in folder.glob("*.json"))
    assert "ViT-B-32" in names
    for name in names:
        assert models._packaged_architecture(name) == open_clip.get_model_config(name), name
    for name in ("NoSuchNet-7", "../ViT-B-32", "hf-hub:org/model", ""):
        assert models._packaged_architecture(name) is None


def _encode_in_a_fresh_process(model_config: str, env: dict) -> str:
    """stdout of a process that makes a bf16 CPU encoder of ``model_config`` (a ModelConfig's Python source)
    and encodes two images: the rows' shape, the image forward, the open_clip/transformers modules imported."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from clipengine.config import EncodeConfig, ModelConfig\n"
        "from clipengine.encode.encoders import create_encoder\n"
        f"encoder = create_encoder(EncodeConfig(model={model_config}, backend='torch', precision='bf16'))\n"
        "rows = encoder.encode_images(np.zeros((2, 224, 224, 3), np.uint8))\n"
        "print(rows.shape, encoder.image_forward, sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'transformers')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_encoding_from_a_local_checkpoint_never_imports_open_clip(vit_b32_checkpoint, tmp_path):
    """``--model ViT-B-32 --weights FILE`` in bf16 on the CPU: the architecture comes from open_clip's packaged
    JSON and the image tower from the file; open_clip (seconds of imports) stays out of the process."""
    import os

    env = {**os.environ, "CLIPENGINE_OFFLINE": "1", "CLIPENGINE_CACHE_DIR": str(tmp_path / "cache")}
    model = f"ModelConfig(model='ViT-B-32', weights={str(vit_b32_checkpoint.weights_path)!r})"
    assert _encode_in_a_fresh_process(model, env) == "(2, 512) fused CPU forward []"


def test_downloaded_pretrained_weights_need_open_clip_only_the_first_time(vit_b32_checkpoint, tmp_path):
    """``--model ViT-B-32 --pretrained TAG`` over weights already in the Hugging Face cache: the first run asks
    open_clip where the tag's file lives and remembers it; later runs never import open_clip."""
    import os

    from clipengine.encode.models import DEFAULT_PRETRAINED

    hub = tmp_path / "hub"
    snapshot = hub / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").symlink_to(vit_b32_checkpoint.weights_path)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "CLIPENGINE_OFFLINE": "1", "CLIPENGINE_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HUB_CACHE": str(hub)}
    model = f"ModelConfig(model='ViT-B-32', pretrained={DEFAULT_PRETRAINED['ViT-B-32']!r})"
    first = _encode_in_a_fresh_process(model, env)
    assert first.startswith("(2, 512) fused CPU forward [") and "'open_clip'" in first
    assert _encode_in_a_fresh_process(model, env) == "(2, 512) fused CPU forward []"


def test_a_weights_hash_is_remembered_across_processes_until_the_file_changes(tmp_path, monkeypatch):
    from clipengine.bindings import files

    weights = tmp_path / "w.bin"
    weights.write_bytes(b"first")
    memo = tmp_path / "memo"
    first = files.sha256_file(weights, memo_dir=memo)
    assert len(list(memo.iterdir())) == 1
    files._HASHES.clear()  # a new process: only the memo folder remembers
    read = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (read.append(str(p)), real_open(p, *a, **k))[1])
    assert files.sha256_file(weights, memo_dir=memo) == first and str(weights) not in read
    monkeypatch.undo()
    weights.write_bytes(b"other")  # rewritten in place: new content, mtime and ctime
    files._HASHES.clear()
    assert files.sha256_file(weights, memo_dir=memo) == hashlib.sha256(b"other").hexdigest()


def test_plain_torch_state_dict_loads_like_safetensors(tiny_clip, tmp_path):
    import torch

    from clipengine.encode.models import load_state_dict

    state = load_state_dict(tiny_clip.weights_path)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    again = load_state_dict(path)
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], state[k]) for k in state)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused(tiny_clip, tmp_path):
    import torch

    from clipengine.encode.models import load_state_dict

    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": _Payload(str(marker))}, evil)
    with pytest.raises(ClipengineError, match="refusing to load a checkpoint that executes pickled code"):
        load_state_dict(evil)
    assert not marker.exists()


def test_offline_without_weights_gives_one_error_listing_three_ways():
    from clipengine.encode.models import resolve_model

    with pytest.raises(ClipengineError) as error:
        resolve_model(ModelConfig(model="ViT-B-32"), offline=True)
    message = str(error.value)
    assert "\n" not in message
    assert "--pretrained laion2b_s34b_b79k" in message and "--weights PATH" in message
    assert "Hugging Face CLIP directory" in message


def test_an_unreachable_hub_fails_at_once_without_the_offline_flag(monkeypatch, tmp_path):
    import open_clip

    from clipengine.encode.models import resolve_model

    def no_download(*args, **kwargs):  # the hub client would retry with back-off for ~20 s
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip, "download_pretrained", no_download)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(ClipengineError, match="no network: hub.invalid unreachable") as error:
        resolve_model(ModelConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), offline=False)
    assert "\n" not in str(error.value)


def test_offline_error_from_the_cli_is_one_line(tmp_path, capsys):
    from clipengine.cli import main

    (tmp_path / "in").mkdir()
    with pytest.raises(SystemExit) as exit_code:
        main(["encode", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert exit_code.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipengine: error:") and "--weights PATH" in lines[0]


def test_bad_model_arguments_name_the_problem(tiny_clip, tmp_path):
    from clipengine.encode.models import resolve_model

    with pytest.raises(ClipengineError, match="no such file"):
        resolve_model(ModelConfig(model=str(tiny_clip.config_path), weights=tmp_path / "missing.safetensors"))
    with pytest.raises(ClipengineError, match="architecture without weights"):
        resolve_model(ModelConfig(model=str(tiny_clip.config_path)))
    with pytest.raises(ClipengineError, match="not an open_clip architecture"):
        resolve_model(ModelConfig(model="NoSuchNet-7", weights=tiny_clip.weights_path))
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 4}')
    with pytest.raises(ClipengineError, match="vision_cfg"):
        resolve_model(ModelConfig(model=str(bad), weights=tiny_clip.weights_path))
    with pytest.raises(ClipengineError, match="do not fit"):
        from clipengine.encode.models import load_model

        wrong = dict(tiny_clip.architecture, embed_dim=16)
        other = tmp_path / "wrong.json"
        import json

        other.write_text(json.dumps(wrong))
        load_model(resolve_model(ModelConfig(model=str(other), weights=tiny_clip.weights_path)))


def test_open_clip_local_dir_layout(tiny_clip, tmp_path):
    import json
    import shutil

    from clipengine.encode.models import load_model, resolve_model

    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip.architecture, "preprocess_cfg": {}}))
    shutil.copy(tiny_clip.weights_path, folder / "open_clip_model.safetensors")
    spec = resolve_model(ModelConfig(model=str(folder)))
    assert spec.weights_hash == resolve_model(tiny_clip.model_config).weights_hash
    assert load_model(spec).embed_dim == 32


def test_conse_is_a_registered_family():
    from clipengine.encode.models import MODEL_FAMILIES, resolve_model

    assert MODEL_FAMILIES["conse"] == "clipengine.bindings.conse:create_conse_encoder"
    assert resolve_model(ModelConfig(model="conse")).source == "conse"


def test_unmeasured_defaults_never_follow_a_cpu_flag(monkeypatch):
    """Without a measurement the CPU default is fp32 on torch, whatever the flags say (auto measures:
    tests/engine/encode/test_auto.py)."""
    from clipengine import bindings

    for flags in ({"avx2", "amx_bf16"}, {"avx512_bf16"}, {"avx2"}):
        monkeypatch.setattr(bindings, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert bindings.select_backend("cpu") == "torch" and bindings.default_precision("torch", "cpu") == "fp32"
    assert bindings.select_backend("cpu", "int8") == "onnxruntime"
    assert bindings.default_precision("onnxruntime", "cpu") == "fp32"
    assert bindings.check_backend("tensorrt", "cpu", "fp16")
    assert bindings.check_backend("torch", "cpu", "fp32") is None
    assert bindings.check_backend("onnxruntime", "cpu", "int8") is None
    assert bindings.check_backend("torch", "cpu", "int8") is None  # the fused forward's int8 matmuls
    assert "CPU only" in bindings.check_backend("torch", "cuda", "int8")
    assert bindings.default_precision("tensorrt", "cuda") == "fp16"


PAYLOAD = """
import torch


class Payload(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        # writes (creates or overwrites) a file of the attacker's choosing when the archive is loaded
        marker = torch.from_file(MARKER, True, 8, dtype=torch.uint8)
        marker.fill_(65)
        self.weight = state[0] + marker.sum().float() * 0.0
        self.training = state[1]
"""


@pytest.fixture
def hostile_torchscript(tmp_path):
    """A TorchScript archive whose __setstate__ writes a marker file when torch.jit.load runs it."""
    import importlib.util

    import torch

    marker = tmp_path / "marker.bin"
    source = tmp_path / "payload_module.py"
    source.write_text(PAYLOAD.replace("MARKER", repr(str(marker))))
    spec = importlib.util.spec_from_file_location("payload_module", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    archive = tmp_path / "ViT-B-32.pt"
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated, and still what such files are made with
        torch.jit.save(torch.jit.script(module.Payload()), str(archive))
    assert not marker.exists()
    return archive, marker


def test_the_hostile_archive_does_run_code_when_torchscript_loads_it(hostile_torchscript):
    """The fixture is what the refusal below protects against (so the refusal test can fail)."""
    import torch

    archive, marker = hostile_torchscript
    torch.jit.load(str(archive))
    assert marker.read_bytes() == b"A" * 8


def test_a_torchscript_archive_is_refused_before_loading(hostile_torchscript, tiny_clip):
    from clipengine.encode.models import load_model, load_state_dict, resolve_model

    archive, marker = hostile_torchscript
    with pytest.raises(ClipengineError, match=r"refusing a TorchScript archive \(it holds code, .*code/"):
        load_state_dict(archive)
    with pytest.raises(ClipengineError, match="refusing a TorchScript archive"):
        load_model(resolve_model(ModelConfig(model=str(tiny_clip.config_path), weights=archive)))
    assert not marker.exists()


def test_the_cli_refuses_a_torchscript_archive_in_one_line(hostile_torchscript, tmp_path, sample_photos):
    import subprocess
    import sys

    archive, marker = hostile_torchscript
    done = subprocess.run([sys.executable, "-m", "clipengine", "encode", str(sample_photos[0].parent), "--out",
                           str(tmp_path / "emb"), "--weights", str(archive), "--model", "ViT-B-32", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing a TorchScript archive" in lines[0], done.stderr
    assert not marker.exists()

def test_a_ceiling_set_for_onednn_says_whether_amx_is_in_use(monkeypatch):
    """ONEDNN_MAX_CPU_ISA below AMX (how a CPU without AMX is emulated) turns AMX off for every rate measured."""
    from clipengine import bindings

    monkeypatch.setattr(bindings, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for value, limit, in_use in (("", None, True), ("all", None, True), ("AVX512_CORE_BF16", "AVX512_CORE_BF16", False),
                                 ("avx512_core_amx", "AVX512_CORE_AMX", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", value)
        assert bindings.onednn_isa_limit() == limit and bindings.amx_in_use() is in_use, value
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert not bindings.amx_in_use()
    monkeypatch.setattr(bindings, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    assert not bindings.amx_in_use()
