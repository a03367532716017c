import torch

from ahiq.nn.head import QualityHead, weighted_mean
from ahiq.nn.official import OfficialHead


def test_weighted_mean_by_hand():
    score = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[5.0, 5.0], [1.0, 1.0]]]])
    weight = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.25, 0.25], [0.25, 0.75]]]])
    # image 0: (1*1 + 2*0 + 3*0.5 + 4*0.5) / 2 = 2.25; image 1: (1.25 + 1.25 + 0.25 + 0.75) / 1.5 = 7/3
    torch.testing.assert_close(weighted_mean(score, weight), torch.tensor([2.25, 7 / 3]))


def test_weighted_mean_is_fp32_for_bf16_maps():
    score = torch.rand(2, 1, 7, 7).bfloat16()
    weight = torch.rand(2, 1, 7, 7).bfloat16()
    out = weighted_mean(score, weight)
    assert out.dtype == torch.float32
    s, w = score.float(), weight.float()
    torch.testing.assert_close(out, (s * w).sum((1, 2, 3)) / w.sum((1, 2, 3)))


def test_head_matches_official_layout():
    official = OfficialHead(in_channels=40, dim=8, hidden=24)
    ours = QualityHead(40, dim=8, hidden=24)
    names = {"down_channel": "reduce", "feat_smoothing": "smooth", "conv1": "hidden",
             "conv_attent.0": "attention", "conv.0": "score"}
    state = {}
    for key, value in official.state_dict().items():
        for old, new in names.items():
            if key.startswith(old + "."):
                key = new + key[len(old):]
                break
        state[key] = value
    ours.load_state_dict(state)
    vit_d, vit_r = torch.randn(3, 32, 5, 5), torch.randn(3, 32, 5, 5)
    cnn_d, cnn_r = torch.randn(3, 8, 5, 5), torch.randn(3, 8, 5, 5)
    expected = official(vit_d, vit_r, cnn_d, cnn_r).squeeze(1)
    got = ours(torch.cat((vit_d, cnn_d), 1), torch.cat((vit_r, cnn_r), 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
