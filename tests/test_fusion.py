import pytest
import torch
from torchvision.ops import deform_conv2d

from ahiq.nn.fusion import CNNFusion, deform_conv2d_bilinear
from conftest import DEVICES


def _inputs(b=2, c=6, h=9, w=11, c_out=5, scale=3.0, whole_pixels=True, device="cpu"):
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    # Offsets of several pixels send taps outside the map; whole-pixel offsets hit the bilinear edge cases.
    offset = torch.randn(b, 18, h, w, dtype=torch.float64) * scale
    if whole_pixels:
        offset[:, :, ::3] = offset[:, :, ::3].round()
    weight = torch.randn(c_out, c, 3, 3, dtype=torch.float64)
    bias = torch.randn(c_out, dtype=torch.float64)
    return tuple(t.to(device) for t in (x, offset, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_bilinear_deform_conv_equals_torchvision(device):
    x, offset, weight, bias = _inputs(device=device)
    expected = deform_conv2d(x, offset, weight, bias, padding=(1, 1))
    torch.testing.assert_close(deform_conv2d_bilinear(x, offset, weight, bias, padding=1), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_either_layout_gives_the_same_numbers_in_its_own_layout(device):
    """channels_last features are read as rows without a copy, and the output keeps the input's layout."""
    x, offset, weight, bias = _inputs(device=device)
    expected = deform_conv2d(x, offset, weight, bias, padding=(1, 1))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    out = deform_conv2d_bilinear(nhwc, offset, weight, bias, padding=1)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert deform_conv2d_bilinear(x, offset, weight, bias, padding=1).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_bilinear_deform_conv_equals_torchvision_fp32_and_gradients(device):
    # Fractional offsets only: at a whole pixel the bilinear weight has a kink, and either one-sided
    # derivative is a valid gradient (the two implementations pick different sides).
    x, offset, weight, bias = (t.float().requires_grad_() for t in _inputs(whole_pixels=False, device=device))
    ours = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    theirs = deform_conv2d(x, offset, weight, bias, padding=(1, 1))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, (x, offset, weight, bias), g)
    grads_theirs = torch.autograd.grad(theirs, (x, offset, weight, bias), g)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bilinear_deform_conv_images_share_offsets():
    x, offset, weight, bias = _inputs()
    x2 = torch.randn_like(x)
    both = deform_conv2d_bilinear(torch.cat((x, x2)), offset, weight, bias, padding=1)
    torch.testing.assert_close(both[:2], deform_conv2d(x, offset, weight, bias, padding=(1, 1)))
    torch.testing.assert_close(both[2:], deform_conv2d(x2, offset, weight, bias, padding=(1, 1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_columns_sampled_in_chunks_give_the_same_numbers(per_chunk, device, monkeypatch):
    """Five offset maps shared by two groups of images, the columns made two or four images at a time (the last
    chunk short): the same numbers as torchvision's kernel and as one pass (to rounding: a matmul may block a
    different number of rows differently)."""
    x, offset, weight, bias = _inputs(b=5, device=device)
    x = torch.cat((x, torch.randn_like(x)))
    whole = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    per_offset = 2 * x.shape[1] * 9 * x.shape[2] * x.shape[3] * 8  # float64 columns of the two images
    monkeypatch.setattr("ahiq.nn.fusion.COLUMN_BYTES", per_chunk * per_offset)
    chunked = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    expected = deform_conv2d(x, offset.repeat(2, 1, 1, 1), weight, bias, padding=(1, 1))
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-10)


def test_bf16_features_give_bf16_columns_and_output(monkeypatch):
    """bf16 features are sampled into bf16 columns (the positions in fp32) and multiplied by the bf16 weight, the
    bias joining in bf16 (an fp32 bias would promote the output back to fp32): one matmul, nothing cast back."""
    x, offset, weight, bias = (t.float() for t in _inputs())
    seen = []
    addmm = torch.addmm

    def watched(b, m1, m2):
        seen.append((b.dtype, m1.dtype, m2.dtype))
        return addmm(b, m1, m2)

    monkeypatch.setattr(torch, "addmm", watched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d_bilinear(x.bfloat16(), offset, weight, bias, padding=1)
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16,) * 3]
    expected = deform_conv2d(x.bfloat16().float(), offset, weight, bias, padding=(1, 1))
    # bf16 keeps 8 significant bits (2^-8 = 0.0039); measured over 50 seeds of these inputs, the largest error
    # is at most 0.0064 of the largest output. Twice that:
    assert (out.float() - expected).abs().max() <= 0.013 * expected.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("final_stride", [1, 2])
def test_fusion_implementations_agree(final_stride, device):
    fusion = CNNFusion(vit_channels=20, cnn_channels=12, hidden=8, final_stride=final_stride).to(device)
    torch.nn.init.normal_(fusion.offset_conv.weight, std=0.5)  # offsets of a few pixels, not near zero
    cnn = torch.randn(4, 12, 16, 16, device=device)  # two distorted images, then their two references
    offset = fusion.offsets(torch.randn(2, 20, 8, 8, device=device), (16, 16))
    assert offset.shape == (2, 18, 16, 16) and offset.abs().mean() > 0.5
    fast = fusion(cnn, offset)
    fusion.deform_impl = "torchvision"
    slow = fusion(cnn, offset)
    assert fast.shape == (4, 12, 8 // final_stride, 8 // final_stride)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    # image i uses offset i mod 2: the reference half alone gives the same as within the batch
    torch.testing.assert_close(fusion(cnn[2:], offset), slow[2:], rtol=1e-5, atol=1e-5)


def test_fusion_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="deform_impl"):
        CNNFusion(4, 4, deform_impl="cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_columns_products_gradients_are_autograds(device, with_bias):
    """The deformable matmul's own backward (the weight gradient from the output's gradient made contiguous)
    against autograd's for the same product, in float64; and through the whole fusion, training's gradients
    (fine-tuned features, offset convolution, deformable weight and bias) against torchvision's kernel."""
    from ahiq.nn.fusion import _ColumnsTimesWeight

    columns, weight = torch.randn(30, 12, dtype=torch.float64, device=device), torch.randn(12, 5, dtype=torch.float64,
                                                                                          device=device)
    bias = torch.randn(5, dtype=torch.float64, device=device) if with_bias else None
    inputs = [t.requires_grad_() for t in (columns, weight, bias) if t is not None]
    grad = torch.randn(30, 5, dtype=torch.float64, device=device)
    ours = torch.autograd.grad(_ColumnsTimesWeight.apply(columns, weight, bias), inputs, grad)
    plain = columns @ weight if bias is None else torch.addmm(bias, columns, weight)
    for a, b in zip(ours, torch.autograd.grad(plain, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    torch.manual_seed(0)
    fusion = CNNFusion(vit_channels=20, cnn_channels=12, hidden=8).double().to(device)
    torch.nn.init.normal_(fusion.offset_conv.weight, std=0.5)
    vit = torch.randn(2, 20, 8, 8, dtype=torch.float64, device=device)
    cnn = torch.randn(4, 12, 16, 16, dtype=torch.float64, device=device, requires_grad=True)  # fine-tuned backbones
    params = [cnn, fusion.offset_conv.weight, fusion.deform.weight, fusion.deform.bias]
    results = []
    for impl in ("bilinear", "torchvision"):
        fusion.deform_impl = impl
        out = fusion(cnn, fusion.offsets(vit, (16, 16)))
        results.append((out, *torch.autograd.grad((out * out.detach().cos()).sum(), params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grid, size", [(8, (16, 16)), (4, (16, 16)), (7, (28, 28)), (5, (11, 13))])
def test_offsets_equal_the_official_upsample_then_convolve_and_keep_no_upsampled_copy(device, grid, size):
    """The per-tap order (1x1 convolution on the ViT grid, upsampled, summed shifted) against the official one
    (nearest upsampling to the CNN grid, then the 3x3 convolution), in float64: values and gradients to 1e-12,
    for the ViT-B/8 (2x) and ViT-B/16 (4x) ratios and sizes that do not divide; and training keeps nothing as
    large as the upsampled features."""
    import torch.nn.functional as F

    fusion = CNNFusion(vit_channels=20, cnn_channels=12, hidden=8).double().to(device)
    torch.nn.init.normal_(fusion.offset_conv.bias)
    vit = torch.randn(2, 20, grid, grid, dtype=torch.float64, device=device, requires_grad=True)
    saved_elements = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_elements.append(t.numel()) or t, lambda t: t):
        offset = fusion.offsets(vit, size)
    official = fusion.offset_conv(F.interpolate(vit, size=size, mode="nearest"))
    torch.testing.assert_close(offset, official, rtol=1e-12, atol=1e-12)
    params = [vit, fusion.offset_conv.weight, fusion.offset_conv.bias]
    g = torch.randn_like(official)
    for a, b in zip(torch.autograd.grad(offset, params, g), torch.autograd.grad(official, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert saved_elements and max(saved_elements) < 2 * 20 * size[0] * size[1]


def test_the_sampling_reads_only_rows_of_the_map_and_weighs_outside_taps_zero():
    """Every neighbour a tap reads is a row of its own image (none past the map, none of another image, even for
    taps far outside), the four weights of a tap inside the map add up to 1, and a neighbour outside weighs 0."""
    from ahiq.nn.fusion import _bilinear_rows

    offset = 6 * torch.randn(2, 18, 5, 7, dtype=torch.float64)
    rows, weights = _bilinear_rows(offset, 3, 3, 1, torch.float64)
    assert rows.shape == weights.shape == (2, 5 * 7 * 9, 4)
    assert rows.min() >= 0 and rows.max() < 5 * 7 and (weights >= 0).all()
    totals = weights.sum(-1)
    assert ((totals - 1).abs() < 1e-12).sum() > 0 and (totals <= 1 + 1e-12).all()
    far = _bilinear_rows(torch.full((1, 18, 5, 7), 100.0), 3, 3, 1, torch.float32)[1]
    assert (far == 0).all()
