import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A reduced AHIQ for fast tests: same structure as the paper's, far fewer channels and a 64-pixel input.
TINY = dict(img_size=64, vit_dim=32, vit_heads=2, cnn_width=8, fusion_hidden=16, head_dim=16, head_hidden=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
