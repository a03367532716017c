import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from ahiq.nn.backbones import CNNFeatures, ViTFeatures, create_timm_model
from ahiq.nn.official import OfficialAHIQ
from ahiq.nn.weights import WeightsError
from ahiq.nn.zoo import BACKBONES as ZOO_FILES
from ahiq.registry.variants import CNNS, VITS

VIT_TAGS = {patch: vit.tag for patch, vit in VITS.items()}
RESNET_TAG = CNNS["resnet50"].tag

TINY_VIT = dict(img_size=64, embed_dim=32, num_heads=2)
TINY_RESNET = dict(stem_width=8, channels=(8, 16, 32, 64))


def _hooked(vit, resnet):
    """The official hook-based extraction, on complete timm models (fusion and head unused)."""
    return OfficialAHIQ(vit, resnet, patch_size=8, fusion=None, head=None)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_vit_features_equal_hooked_first_five_blocks(tmp_path, patch_size):
    full = timm.create_model(VIT_TAGS[patch_size], pretrained=False, **TINY_VIT).eval()
    assert len(full.blocks) == 12
    torch.save(full.state_dict(), tmp_path / "vit.pth")
    ours = ViTFeatures(patch_size, tmp_path / "vit.pth", img_size=64, dim=32, heads=2).eval()
    assert len(ours.vit.blocks) == 5  # nothing after block 4 is built
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
        expected = _hooked(full, timm.create_model("resnet50", pretrained=False, **TINY_RESNET))._vit_feature(x)
    side = 64 // patch_size
    assert got.shape == (2, 5 * 32, side, side)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Block 0's channels come first, token (row, col) at [.., row, col]: check one value by hand.
    with torch.no_grad():
        tokens = full.norm_pre(full.patch_drop(full._pos_embed(full.patch_embed(x))))
        block0 = full.blocks[0](tokens)
    torch.testing.assert_close(got[1, 7, 2, 3], block0[1, 1 + 2 * side + 3, 7], rtol=0, atol=0)


def test_resnet_features_equal_hooked_layer1(tmp_path):
    full = timm.create_model(RESNET_TAG, pretrained=False, **TINY_RESNET).eval()
    torch.save({"state_dict": full.state_dict()}, tmp_path / "resnet.pth")
    ours = CNNFeatures("resnet50", tmp_path / "resnet.pth", width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = ours(x)
        expected = _hooked(timm.create_model(VIT_TAGS[8], pretrained=False, **TINY_VIT), full)._resnet_feature(x)
    assert got.shape == (2, 3 * 32, 16, 16)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module_prefix", "safetensors"])
def test_local_weight_file_layouts(tmp_path, layout):
    source = timm.create_model(VIT_TAGS[16], pretrained=False, **TINY_VIT)
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "model": {"model": state},
               "module_prefix": {f"module.{k}": v for k, v in state.items()}}[layout]
        torch.save(obj, path)
    model = create_timm_model(VIT_TAGS[16], path, **TINY_VIT)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_weight_file_of_another_architecture_names_keys(tmp_path):
    torch.save(timm.create_model(RESNET_TAG, pretrained=False, **TINY_RESNET).state_dict(), tmp_path / "r.pth")
    with pytest.raises(WeightsError) as err:
        create_timm_model(VIT_TAGS[8], tmp_path / "r.pth", **TINY_VIT)
    message = str(err.value)
    assert "r.pth" in message and VIT_TAGS[8] in message
    assert "missing keys: cls_token" in message and "unexpected keys: conv1.weight" in message


def test_weight_file_wrong_shape_and_missing_file(tmp_path):
    torch.save(timm.create_model(VIT_TAGS[8], pretrained=False, img_size=64, embed_dim=48, num_heads=2).state_dict(),
               tmp_path / "wide.pth")
    with pytest.raises(WeightsError, match=r"wrongly shaped keys: cls_token \(1, 1, 48\) \(expected \(1, 1, 32\)\)"):
        create_timm_model(VIT_TAGS[8], tmp_path / "wide.pth", **TINY_VIT)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_timm_model(VIT_TAGS[8], tmp_path / "nowhere.pth", **TINY_VIT)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pth is not a readable"):
        create_timm_model(VIT_TAGS[8], tmp_path / "junk.pth", **TINY_VIT)


def test_released_weights_use_the_timm_054_tags():
    # timm's untagged names now resolve to other weights (augreg2 for ViT): the tags must stay explicit.
    assert VIT_TAGS == {8: "vit_base_patch8_224.augreg_in21k_ft_in1k", 16: "vit_base_patch16_224.augreg_in21k_ft_in1k"}
    assert RESNET_TAG == "resnet50.a1_in1k"


def export_augreg_npz(vit: torch.nn.Module, path) -> None:
    """A timm ViT's weights in the layout of the original AugReg .npz files (JAX/Flax names and axes), written
    from the file format, independently of timm's reader: kernels [in, out] (convolution HWIO), attention
    kernels [dim, heads, head_dim], its output kernel [heads, head_dim, dim]."""
    state = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    heads = vit.blocks[0].attn.num_heads
    dim = state["cls_token"].shape[-1]
    out = {"embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": state["patch_embed.proj.bias"], "cls": state["cls_token"],
           "Transformer/posembed_input/pos_embedding": state["pos_embed"],
           "Transformer/encoder_norm/scale": state["norm.weight"], "Transformer/encoder_norm/bias": state["norm.bias"],
           "head/kernel": state["head.weight"].T, "head/bias": state["head.bias"]}
    for i in range(len(vit.blocks)):
        b, jax = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attention = jax + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            out[f"{attention}{name}/kernel"] = state[b + "attn.qkv.weight"][j * dim:(j + 1) * dim].T.reshape(dim, heads, -1)
            out[f"{attention}{name}/bias"] = state[b + "attn.qkv.bias"][j * dim:(j + 1) * dim].reshape(heads, -1)
        out[f"{attention}out/kernel"] = state[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        out[f"{attention}out/bias"] = state[b + "attn.proj.bias"]
        for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[f"{jax}{norm}/scale"], out[f"{jax}{norm}/bias"] = state[f"{b}{ours}.weight"], state[f"{b}{ours}.bias"]
        for r in range(2):
            out[f"{jax}MlpBlock_3/Dense_{r}/kernel"] = state[f"{b}mlp.fc{r + 1}.weight"].T
            out[f"{jax}MlpBlock_3/Dense_{r}/bias"] = state[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_augreg_npz_gives_the_features_of_the_same_weights_in_timms_format(tmp_path, patch_size):
    source = timm.create_model(VIT_TAGS[patch_size], pretrained=False, **TINY_VIT)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    export_augreg_npz(source, tmp_path / ZOO_FILES[VIT_TAGS[patch_size]].also_named[0])
    from_timm = ViTFeatures(patch_size, tmp_path / "vit.safetensors", img_size=64, dim=32, heads=2).eval()
    from_npz = ViTFeatures(patch_size, tmp_path / ZOO_FILES[VIT_TAGS[patch_size]].also_named[0], img_size=64, dim=32,
                           heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(from_npz(x), from_timm(x), rtol=0, atol=0)
        assert not torch.equal(from_npz(x), ViTFeatures(patch_size, False, img_size=64, dim=32, heads=2).eval()(x))


def test_an_npz_of_another_model_is_one_line_naming_the_file(tmp_path):
    np.savez(tmp_path / "other.npz", **{"embedding/kernel": np.zeros((8, 8, 3, 16), np.float32)})
    with pytest.raises(WeightsError, match="other.npz is not the AugReg .npz of timm 'vit_base_patch8_224"):
        create_timm_model(VIT_TAGS[8], tmp_path / "other.npz", **TINY_VIT)
    with pytest.raises(WeightsError, match="only a ViT reads"):
        create_timm_model(RESNET_TAG, tmp_path / "other.npz", **TINY_RESNET)


def test_the_original_release_names_are_those_timm_downloaded_them_from():
    """The names under which timm 0.5.4 (the official code's) left the backbones in torch's hub cache: the
    last part of the original URLs, where current timm still records them (not for HRNet-W18's and
    InceptionResNetV2's weights, which are found under their tags only)."""
    for tag, file in ZOO_FILES.items():
        url = timm.models.get_pretrained_cfg(tag).url
        assert file.also_named == ((url.rsplit("/", 1)[1],) if url else ())
        assert file.name == f"{tag}.safetensors" and file.hf_repo == timm.models.get_pretrained_cfg(tag).hf_hub_id


def test_reduced_configuration_has_no_hub_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        ViTFeatures(8, True, img_size=64, dim=32, heads=2)
