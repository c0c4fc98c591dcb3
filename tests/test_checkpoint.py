from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitseg_export.checkpoint import CheckpointMeta, init_from_foreign, load_checkpoint, save_checkpoint
from vitseg_export.errors import CheckpointError
from vitseg_export.modeling import registry

transformers = pytest.importorskip("transformers", reason="transformers is a test extra (pip install -e .[test])")

HF_CONFIGS = [
    dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16,
         num_labels=5),
    dict(hidden_sizes=[16, 16, 32, 32], depths=[2, 1, 1, 2], num_attention_heads=[1, 1, 2, 2], sr_ratios=[4, 2, 2, 1],
         decoder_hidden_size=24, num_labels=3),
    dict(num_labels=4),  # the real B0 layout
]


def _hf_model(kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(**kw)).eval()
    bn = model.decode_head.batch_norm  # non-trivial statistics, or a BatchNorm mix-up would go unseen
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kw", HF_CONFIGS, ids=["tiny", "sr", "b0"])
def test_huggingface_segformer_directory_loads_with_identical_logits(tmp_path, kw):
    hf = _hf_model(kw)
    hf.save_pretrained(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.kind == "huggingface" and loaded.meta.config.num_classes == kw["num_labels"]
    for shape in [(2, 3, 71, 97), (1, 3, 130, 64)]:  # non-square, not multiples of 32
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = hf(pixel_values=x).logits
            ours = loaded.model(x)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("names", ["on-disk", "in-memory"])
def test_huggingface_pytorch_model_bin_loads_without_unpickling_code(tmp_path, names):
    """pytorch_model.bin with the hub's on-disk key names, or a torch.save of a transformers-5 model's
    state_dict (renamed keys); read with weights_only=True."""
    from safetensors.torch import load_file

    hf = _hf_model(HF_CONFIGS[0])
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors") if names == "on-disk" else hf.state_dict()
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_checkpoint(tmp_path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert (loaded.model(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-4


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="could not be read"):
        init_from_foreign(registry.get_architecture("vit-seg-tiny-test"), tmp_path / "evil.pth")


def test_encoder_only_mit_checkpoint_loads_the_encoder_and_warns(tmp_path):
    cfg = transformers.SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 2, 3, 4], num_labels=10)
    torch.manual_seed(0)
    mit = transformers.SegformerForImageClassification(cfg).eval()
    mit.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="encoder-only"):
        loaded = load_checkpoint(tmp_path)
    assert loaded.meta.config.num_classes == 3 and loaded.meta.class_names == ["pet", "background", "border"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = mit.segformer(pixel_values=x, output_hidden_states=True).hidden_states
        ours = loaded.model.encoder(x)
    for a, b in zip(ref, ours):
        assert (a - b).abs().max().item() <= 1e-5


def test_native_checkpoint_round_trip_and_safetensors_file(tmp_path):
    arch = registry.get_architecture("segformer-b0-test")
    torch.manual_seed(3)
    model = registry.build_model(arch.family, arch.config).eval()
    meta = CheckpointMeta.for_architecture(arch)
    meta.training = {"epochs": 1}
    save_checkpoint(model, meta, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    for spec in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_checkpoint(spec)
        assert loaded.kind == "vitseg" and loaded.meta.architecture == "segformer-b0-test"
        assert loaded.meta.training == {"epochs": 1} and len(loaded.sha256) == 64
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), model(x))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["normalization"]["mean"] == list(arch.mean)


def test_architecture_name_gives_random_weights_with_a_warning():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        loaded = load_checkpoint("vit-seg-tiny-test")
    assert loaded.kind == "random" and loaded.sha256 is None


def _save(tmp_path: Path, name: str, num_classes: int | None = None) -> Path:
    arch = registry.get_architecture(name)
    meta = CheckpointMeta.for_architecture(arch, num_classes)
    save_checkpoint(registry.build_model(arch.family, meta.config), meta, tmp_path / name)
    return tmp_path / name


def test_bad_checkpoints_raise_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist and is not an architecture"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist and is not an architecture"):
        load_checkpoint("segformer-b9")
    # weights of another architecture under a config that names b0-test
    other = _save(tmp_path, "segformer-b2-test")
    b0 = _save(tmp_path, "segformer-b0-test")
    (b0 / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="unexpected keys|missing keys|shape mismatch"):
        load_checkpoint(b0)
    # another class count
    five = _save(tmp_path / "five", "vit-seg-tiny-test", num_classes=5)
    three = _save(tmp_path, "vit-seg-tiny-test")
    (three / "model.safetensors").write_bytes((five / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*head.weight \(320, 16\) vs \(192, 16\)"):
        load_checkpoint(three)
    # truncated safetensors
    vit = _save(tmp_path / "t", "vit-seg-tiny-test")
    data = (vit / "model.safetensors").read_bytes()
    (vit / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(vit)
    # a Hugging Face checkpoint of another model type
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="Hugging Face 'bert' checkpoint, not SegFormer"):
        load_checkpoint(bert)
    # a directory that is no checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("args,message", [
    (["nope-dir/"], "does not exist"),
    (["bert"], "not SegFormer"),
    (["trunc"], "not a readable safetensors file"),
])
def test_cli_reports_bad_checkpoints_in_one_line_with_exit_code_2(tmp_path, cli, args, message):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    trunc = _save(tmp_path, "vit-seg-tiny-test")
    (trunc / "model.safetensors").write_bytes(b"\x08\x00\x00")
    target = {"bert": bert, "trunc": trunc}.get(args[0], tmp_path / args[0])
    result = cli("train", "--init", str(target), "--data", "synthetic[:4]", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


timm = pytest.importorskip("timm", reason="timm is a test extra, used only as the reference for the key mapping")


@pytest.mark.parametrize("timm_name,arch_name", [("vit_tiny_patch16_224", "vit-seg-tiny"),
                                                 ("vit_small_patch16_224", "vit-seg-small")])
def test_timm_vit_weights_load_faithfully(tmp_path, timm_name, arch_name):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model(timm_name, pretrained=False, img_size=128, num_classes=0, depth=2).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "timm.safetensors")
    loaded = init_from_foreign(registry.get_architecture(arch_name), tmp_path / "timm.safetensors")
    cfg = loaded.meta.config
    assert (cfg.layer_norm_eps, cfg.class_token, cfg.final_norm, cfg.input_batchnorm, cfg.depth) == (1e-6, True, True, False, 2)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 1:]  # drop the class token, as our segmentation head does
        ours = loaded.model.eval().forward_features(x)
    assert (ours - expected).abs().max().item() < 1e-4


def test_timm_position_embedding_is_resampled_to_our_grid(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=224, num_classes=0, depth=1).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "timm.safetensors")
    loaded = init_from_foreign(registry.get_architecture("vit-seg-tiny"), tmp_path / "timm.safetensors")
    assert loaded.model.pos_embed.shape == (1 + 64, 192)  # 14x14 grid -> 8x8 for 128 px
    expected = resample_abs_pos_embed(ref.pos_embed, new_size=(8, 8), num_prefix_tokens=1)[0]
    assert (loaded.model.pos_embed - expected).abs().max().item() < 1e-5


def test_seed_article_state_dict_loads(tmp_path):
    """A state dict in the layout of the article's own code (nn.Sequential `layers`, nn.MultiheadAttention)."""
    ours = registry.build_model("vit", registry.get_architecture("vit-seg-tiny-test").config).eval()
    sd = ours.state_dict()
    seed = {}
    for k, v in sd.items():
        k2 = (k.replace("input_norm.", "layers.0.").replace("patch_embed.", "layers.1.pe.embed_layer.")
              .replace("pos_embed", "layers.1.position_embed").replace("head.", "layers.3.projection."))
        if k2.startswith("blocks."):
            k2 = ("layers.2." + k2[len("blocks."):]).replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
            k2 = (k2.replace(".attn.in_proj.weight", ".mha.in_proj_weight").replace(".attn.in_proj.bias", ".mha.in_proj_bias")
                  .replace(".attn.out_proj.", ".mha.out_proj.").replace(".mlp.fc1.", ".mlp.layers.0.")
                  .replace(".mlp.fc2.", ".mlp.layers.2."))
        seed[k2] = v
    torch.save(seed, tmp_path / "seed.pth")
    loaded = init_from_foreign(registry.get_architecture("vit-seg-tiny-test"), tmp_path / "seed.pth")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(x), ours(x))
