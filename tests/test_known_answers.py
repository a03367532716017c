"""Against numbers produced by running the official AHIQ code itself (tests/data/official_known_answers.json:
the official scores of generated weights and images, and three official training steps; the generation is
tests/known_answers.py). The other faithfulness tests compare with ahiq/official.py, this project's reading
of the official code; these compare with the official code's own output."""
import json

import pytest
import timm
import torch

import known_answers
from ahiq import AHIQ
from ahiq.engine.training import make_optimizer, train_step
from ahiq.nn.official import OfficialFusion, OfficialHead
from ahiq.options import DEFAULTS
from conftest import ROOT, resolved

EXPECTED = ROOT / "tests" / "data" / "official_known_answers.json"
SHARED = ROOT.parent / "shared" / "official-known-answers"


@pytest.fixture(scope="module")
def known():
    return known_answers, json.loads(EXPECTED.read_text())


def test_the_shipped_answers_and_generator_are_the_shared_originals():
    """The copy in tests/ and this generator against the originals in ../shared (skipped in a user's clone)."""
    if not (SHARED / "expected.json").is_file():
        pytest.skip(f"{SHARED} not available")
    import importlib.util

    assert json.loads(EXPECTED.read_text()) == json.loads((SHARED / "expected.json").read_text())
    spec = importlib.util.spec_from_file_location("shared_known_answers", SHARED / "known_answers.py")
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)
    state = {**OfficialHead(64, 8, 16).state_dict(), **timm.create_model(
        "resnet50", pretrained=False, stem_width=8, channels=(8, 16, 32, 64)).state_dict()}
    ours, theirs = known_answers.fill_state_dict(state, 5), original.fill_state_dict(state, 5)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for (a, b), (c, d) in zip(known_answers.make_images(3, 64, 19), original.make_images(3, 64, 19)):
        assert (a == c).all() and (b == d).all()


def generated_model(known, patch_size, folder):
    """AHIQ with the generated weights, loaded through the public paths: the backbones as local timm
    weight files, the fusion and head as an official released checkpoint."""
    answers, expected = known
    seeds = expected["seeds"][f"patch{patch_size}"]
    for name, tag in (("vit", f"vit_base_patch{patch_size}_224"), ("resnet50", "resnet50")):
        state = timm.create_model(tag, pretrained=False).state_dict()
        torch.save(answers.fill_state_dict(state, seeds[name]), folder / f"{name}.pth")
    sections = {"deform_net_model_state_dict": OfficialFusion(patch_size).state_dict(),
                "regressor_model_state_dict": OfficialHead().state_dict()}
    checkpoint = folder / f"AHIQ_vit_p{patch_size}_generated.pth"
    torch.save({name: answers.fill_state_dict(state, seeds[name]) for name, state in sections.items()}, checkpoint)
    return AHIQ.from_pretrained(checkpoint, patch_size=patch_size, vit_pretrained=folder / "vit.pth",
                                cnn_pretrained=folder / "resnet50.pth")


def as_batch(images):
    """uint8 RGB [H, W, 3] images -> [N, 3, H, W] in [0, 1], the model's input."""
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images])


@pytest.mark.slow
@pytest.mark.parametrize("patch_size", [8, 16])
def test_full_size_scores_equal_the_official_code(known, patch_size, tmp_path):
    answers, expected = known
    images = expected["images"]
    pairs = answers.make_images(images["n"], images["size"], images["seed"])  # (reference, distorted)
    model = generated_model(known, patch_size, tmp_path)
    with torch.no_grad():
        scores = model(as_batch([d for _, d in pairs]), as_batch([r for r, _ in pairs]))
    official = torch.tensor(expected["scores"][f"patch{patch_size}"])
    # fp32 rounding on two machines' kernels: measured up to 3.5e-7 across attention paths, instruction sets
    # and threads (scripts/fidelity.py); a wrong layer or weight moves scores by 1e-3 and more.
    torch.testing.assert_close(scores, official, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_three_training_steps_equal_the_official_losses(known, tmp_path):
    answers, expected = known
    recipe = expected["train"]
    assert recipe["batch"].startswith("pairs (2i, 2i+1) of make_images(6, seed=19)")
    pairs = answers.make_images(6, seed=19)
    model = generated_model(known, recipe["patch_size"], tmp_path).train()
    optimizer, scheduler = make_optimizer(model, DEFAULTS["train"])  # the official recipe's defaults
    losses = []
    for i in range(recipe["steps"]):
        batch = pairs[2 * i:2 * i + 2]
        target = torch.tensor([0.3 + 0.2 * i, 0.8 - 0.1 * i])
        losses.append(train_step(model, optimizer, scheduler, as_batch([d for _, d in batch]),
                                 as_batch([r for r, _ in batch]), target, resolved()))
    # The official numbers carry the official machine's fp32 rounding, ours this machine's, and their kernels
    # differ (attention path, instruction set, threads): |ours - official| <= |ours - exact| + |official -
    # exact|, with exact the float64 value. Measured (scripts/fidelity.py; docs/performance.md): the official
    # losses are 1.8e-7, 6.9e-6 and 3.0e-4 relative from float64 ahiq. Ours from float64 on an AVX2 CPU
    # (TIMM_FUSED_ATTN 0 and 1, ATEN_CPU_CAPABILITY default and avx2, 1 and 2 threads): up to 8.1e-7, 2.5e-6
    # and 1.7e-4; on an AVX-512 AMD Zen 4 (TIMM_FUSED_ATTN 0 and 1, avx512) up to 1.8e-7, 7.1e-6 and 3.0e-4;
    # on an AVX-512 Xeon ours was 1.14e-5 from the official second loss (4.5e-6 from exact), and the official
    # pattern in fp32 3.9e-4 from the official third.
    # Later losses grow so because Adam's first step moves every weight by +-lr whatever the size of its
    # gradient: a gradient whose sign rounding decides moves a weight by 2 lr. Each tolerance is about twice
    # the sum of the two bounds; a wrong recipe (learning rate, loss, schedule) is off by far more.
    relative = [abs(ours - official) / official for ours, official in zip(losses, recipe["losses"])]
    assert relative[0] < 3e-6 and relative[1] < 3e-5 and relative[2] < 1.5e-3, relative
