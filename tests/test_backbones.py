import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from ahiq.backbones import (RESNET_TAG, VIT_TAGS, PretrainedWeightsError, ResNetLayer1Features, ViTFeatures,
                            create_timm_model)
from ahiq.reference import OfficialAHIQ
from ahiq.weights import WeightsError

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
    ours = ResNetLayer1Features(tmp_path / "resnet.pth", width=8).eval()
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


@pytest.mark.parametrize("tag", [VIT_TAGS[8], VIT_TAGS[16], RESNET_TAG])
def test_offline_hub_error_names_the_tag(tmp_path, monkeypatch, tag):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as err:
        create_timm_model(tag, True)
    message = str(err.value)
    assert f"'{tag}'" in message and "pass its path instead of True" in message


def test_reduced_configuration_has_no_hub_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        ViTFeatures(8, True, img_size=64, dim=32, heads=2)
