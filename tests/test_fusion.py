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
def test_sampling_uses_the_native_kernel_for_any_layout(device, monkeypatch):
    """torch.grid_sampler (what F.grid_sample calls) would hand these settings to cuDNN's sampler on CUDA;
    the native kernel is called directly, and channels_last features give the same numbers."""
    def refused(*args, **kwargs):
        raise AssertionError("torch.grid_sampler (which dispatches to cuDNN on CUDA) was called")

    monkeypatch.setattr(torch, "grid_sampler", refused)
    x, offset, weight, bias = _inputs(device=device)
    expected = deform_conv2d(x, offset, weight, bias, padding=(1, 1))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(deform_conv2d_bilinear(nhwc, offset, weight, bias, padding=1), expected,
                               rtol=1e-10, atol=1e-10)


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
    """Five offset maps shared by two groups of images, sampled one or two offsets at a time (the last
    chunk short): the same numbers as torchvision's kernel and as one pass (to rounding: a batched matmul
    may block a different batch size differently)."""
    x, offset, weight, bias = _inputs(b=5, device=device)
    x = torch.cat((x, torch.randn_like(x)))
    whole = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    per_offset = 2 * x.shape[1] * 9 * x.shape[2] * x.shape[3] * 8  # float64 columns of the two images
    monkeypatch.setattr("ahiq.nn.fusion.COLUMN_BYTES", per_chunk * per_offset)
    chunked = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)
    expected = deform_conv2d(x, offset.repeat(2, 1, 1, 1), weight, bias, padding=(1, 1))
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-10)


def test_bf16_columns_use_one_bf16_weight_and_keep_the_output_bf16(monkeypatch):
    """Under autocast the weight is cast once before it is broadcast (bmm sees bf16 operands and casts
    nothing), and the bias joins in bf16 (an fp32 bias would promote the output back to fp32)."""
    x, offset, weight, bias = (t.float() for t in _inputs())
    seen = []
    bmm = torch.bmm

    def watched(a, b):
        seen.append((a.dtype, a.stride(0), b.dtype))
        return bmm(a, b)

    monkeypatch.setattr(torch, "bmm", watched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d_bilinear(x.bfloat16(), offset, weight, bias, padding=1)
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, 0, torch.bfloat16)]  # stride 0: the weight broadcast, not copied
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


# CPU: groups of 1 image, and uneven groups (3 + 1) over 4 images; CUDA: one image a group
@pytest.mark.parametrize("device,threads", [("cpu", 1), ("cpu", 3), pytest.param("cuda", 1, marks=DEVICES[1].marks)])
def test_training_fusion_recomputes_the_columns_with_the_same_gradients(device, threads):
    torch.manual_seed(0)
    fusion = CNNFusion(vit_channels=20, cnn_channels=12, hidden=8).double().to(device)
    torch.nn.init.normal_(fusion.offset_conv.weight, std=0.5)
    vit = torch.randn(2, 20, 8, 8, dtype=torch.float64, device=device)
    cnn = torch.randn(4, 12, 16, 16, dtype=torch.float64, device=device, requires_grad=True)  # fine-tuned backbones
    saved_elements = []

    def run(recompute):
        offset = fusion.offsets(vit, (16, 16))
        if recompute:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_elements.append(t.numel()) or t,
                                                          lambda t: t):
                out = fusion._deform_recomputed(cnn, offset)
        else:
            out = fusion._deform(cnn, offset)
        params = [cnn, fusion.offset_conv.weight, fusion.deform.weight, fusion.deform.bias]
        return (out, *torch.autograd.grad((out * out.detach().cos()).sum(), params))

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        recomputed = run(True)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(recomputed, run(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # nothing as large as one image's sampled columns (C * 9 * H * W) was kept for the backward pass
    assert max(saved_elements) < 12 * 9 * 16 * 16


@pytest.mark.parametrize("device", DEVICES)
def test_training_offsets_keep_the_vit_features_not_their_upsampled_copy(device):
    fusion = CNNFusion(vit_channels=20, cnn_channels=12, hidden=8).double().to(device)
    vit = torch.randn(2, 20, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    saved_elements = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_elements.append(t.numel()) or t, lambda t: t):
        offset = fusion.offsets(vit, (16, 16))
    plain = fusion._offsets(vit, (16, 16))
    torch.testing.assert_close(offset, plain, rtol=0, atol=0)
    params = [vit, fusion.offset_conv.weight, fusion.offset_conv.bias]
    g = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(offset, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the upsampled features (2 x 20 x 16 x 16) are recomputed in the backward pass, not kept
    assert saved_elements and max(saved_elements) < 2 * 20 * 16 * 16


def test_one_image_is_sampled_as_groups_of_channels_on_every_thread(monkeypatch):
    """The CPU sampler parallelises over images: one image is sampled as groups of its channels (a view),
    with the same columns bit for bit."""
    from ahiq.nn import fusion

    torch.manual_seed(0)
    x, offset = torch.randn(1, 6, 9, 11), 2 * torch.randn(1, 18, 9, 11)
    weight, bias = torch.randn(5, 6, 3, 3), torch.randn(5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    shapes = []
    sampler = torch.grid_sampler_2d
    monkeypatch.setattr(torch, "grid_sampler_2d", lambda a, *rest: shapes.append(tuple(a.shape)) or sampler(a, *rest))
    split = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    monkeypatch.setattr(fusion, "_channel_groups", lambda x, n, c: 1)
    whole = deform_conv2d_bilinear(x, offset, weight, bias, padding=1)
    assert shapes == [(3, 2, 9, 11), (1, 6, 9, 11)] and torch.equal(split, whole)
