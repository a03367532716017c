"""The GPU paths on the paper's full-size network against the official compute pattern: fp32, bf16,
channels_last, torch.compile and a bf16 training step, and the demo trained, resumed and tested on CUDA.
Skipped without a CUDA device (CI has none). Parametrised over the devices present (conftest.DEVICES), so
also run on CUDA there: the fusion tests (test_fusion.py) and grouped prediction against per-pair scoring
(test_evaluation.py). Bit-exact resume is tested on the CPU only: CUDA's atomic adds in grid_sample's
backward pass are not deterministic. Without a GPU, test_fake_cuda.py traces the same paths on fake CUDA
tensors (devices, dtypes, layouts), which cannot show what is checked here: numbers, the backward pass,
bf16 layouts, NCCL, compiled kernels."""
import copy
import math

import pytest
import torch

from ahiq.engine.testing import run_test
from ahiq.engine.training import make_optimizer, make_stepper, train, train_step
from ahiq.nn.official import random_official_setup
from ahiq.options import DEFAULTS
from ahiq.runtime.device import Runtime
from ahiq.runtime.distributed import Job
from ahiq.runtime.memory import CropCost
from conftest import ROOT, TINY, layouts_on_the_way, tiny_options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """ViT-B/8 AHIQ with random weights, the official-pattern model holding the same weights, and 8 pairs
    from clean to heavily distorted (random weights spread their scores like a trained model's)."""
    torch.manual_seed(0)
    reference, model, _ = random_official_setup(8, tmp_path_factory.mktemp("weights"))
    ref = torch.rand(8, 3, 224, 224)
    dist = (ref + torch.linspace(0.0, 0.4, 8).view(8, 1, 1, 1) * torch.randn_like(ref)).clamp(0, 1)
    # Strict fp32 for the reference scores: this module-scoped fixture runs before the per-test setup,
    # and cuDNN allows TF32 convolutions by default.
    reference = on_cuda(Runtime()).prepare(reference)
    assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.conv.fp32_precision != "tf32"
    with torch.no_grad():
        expected = reference(dist.to(CUDA), ref.to(CUDA)).cpu()
    return model, dist, ref, expected


def on_cuda(runtime: Runtime):
    """``runtime`` resolved for the GPU (crops per pass: all of those given)."""
    return runtime.resolve(CUDA, CropCost(1.0, 1.0))


def scores(model, dist, ref, runtime):
    runtime = on_cuda(runtime)
    model = runtime.prepare(copy.deepcopy(model))
    with torch.no_grad(), runtime.autocast():
        out = model(runtime.inputs(dist), runtime.inputs(ref))
    assert out.dtype == torch.float32  # the weighted mean is taken in fp32 under bf16 too
    return out.cpu()


@pytest.mark.parametrize("runtime,tolerance", [
    (Runtime(), 1e-4),  # the fp32 target on a GPU
    (Runtime(channels_last=True), 1e-4),
    (Runtime(precision="bf16"), 1e-2),  # the bf16 target, on the normalised scale
    (Runtime(precision="bf16", channels_last=True), 1e-2),
], ids=["fp32", "fp32_channels_last", "bf16", "bf16_channels_last"])
def test_full_size_scores_match_the_official_pattern(full_size, runtime, tolerance):
    model, dist, ref, expected = full_size
    got = scores(model, dist, ref, runtime)
    assert expected.std() > 0.01  # the scores differ between pairs: agreement means something
    assert (got - expected).abs().max().item() <= tolerance


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="TF32 needs an Ampere or newer GPU")
def test_tf32_is_used_only_when_asked(full_size):
    model, dist, ref, expected = full_size
    strict = scores(model, dist, ref, Runtime())
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    loose = scores(model, dist, ref, Runtime(tf32=True))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cuda.matmul.fp32_precision == "tf32"
    # TF32 rounds the operands to 10 bits: visibly different from strict fp32, still close to it
    assert 0 < (loose - strict).abs().max().item() < 1e-2


def through_the_scoring_core(model, dist, ref, runtime):
    """Scores as the scorer, test.py and the metric compute them: ahiq.scoring.ensemble.score_group, whose forward
    passes go through runtime.entry (compiled when the runtime compiles); one 64-pixel image per pair."""
    from ahiq.data import CropPlan
    from ahiq.scoring.ensemble import Ensemble

    runtime = on_cuda(runtime)
    ensemble = Ensemble([runtime.prepare(copy.deepcopy(model))], CropPlan(64, "whole"), runtime)
    with torch.no_grad():
        return torch.cat([ensemble.score_group(r, [d], "").scores for d, r in zip(dist, ref)]).cpu()


def test_compiled_model_on_cuda_equals_eager(tmp_path):
    torch.manual_seed(0)
    _, model, _ = random_official_setup(8, tmp_path, **TINY)
    dist, ref = torch.rand(2, 6, 3, 64, 64)
    captured = []

    def inductor(graph_module, example_inputs):  # inductor itself (Triton kernels), recording what it gets
        captured.append(graph_module)
        return torch._dynamo.lookup_backend("inductor")(graph_module, example_inputs)

    eager = through_the_scoring_core(model, dist, ref, Runtime())
    torch._dynamo.reset()
    compiled = through_the_scoring_core(model, dist, ref, Runtime(compile=inductor))
    assert captured  # the scoring core's forward passes really went through torch.compile
    assert (compiled - eager).abs().max().item() < 1e-4  # fused kernels sum in another order
    compiled_bf16 = through_the_scoring_core(model, dist, ref, Runtime(precision="bf16", compile=inductor))
    assert (compiled_bf16 - eager).abs().max().item() < 1e-2


def test_bf16_training_step_on_cuda_matches_fp32_and_keeps_fp32_weights(full_size):
    model, dist, ref, _ = full_size
    target = torch.linspace(0.2, 0.8, 4, device=CUDA)
    losses, weights = {}, {}
    for precision in ("fp32", "bf16"):
        runtime = on_cuda(Runtime(precision=precision))
        net = runtime.prepare(copy.deepcopy(model)).train()
        optimizer, scheduler = make_optimizer(net, DEFAULTS["train"])
        losses[precision] = train_step(net, optimizer, scheduler, runtime.inputs(dist[:4]), runtime.inputs(ref[:4]),
                                       target, runtime)
        weights[precision] = net.state_dict()
        assert all(v.dtype == model.state_dict()[k].dtype for k, v in weights[precision].items())
        # the backbones are frozen: no gradient was computed for them
        assert all(p.grad is None for p in net.backbone_parameters())
    # the same step of the full-size model on the CPU: bf16 within 0.0071 relative of fp32; the GPU's bf16
    # kernels accumulate differently, so three times that
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    before = model.state_dict()["head.score.weight"].to(CUDA)
    assert not torch.equal(weights["bf16"]["head.score.weight"], before)


def test_training_resuming_and_testing_on_cuda(tmp_path):
    on_gpu = ("train.device=cuda", "runtime.precision=bf16", "runtime.channels_last=true")
    train(tiny_options(tmp_path, *on_gpu), tmp_path / "ckpt")  # 2 epochs
    three = tiny_options(tmp_path, *on_gpu, "train.epochs=3", "train.resume=auto")
    train(three, tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "demo" / "latest.pth", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and "cuda" in saved["rng"]  # resumed, the GPU's random state saved with it
    metrics = run_test(three, tmp_path / "ckpt")
    assert metrics["n"] == 25 and math.isfinite(metrics["srocc"])


# ---- the first GPU run (issue 17): python -m pytest -q tests/test_cuda.py tests/test_fusion.py -------------

def test_channels_last_stays_nhwc_into_the_head_on_cuda(full_size):
    """No NCHW fallback between the ViT map, its concatenation with the fused CNN features and the head."""
    model, dist, ref, expected = full_size
    runtime = on_cuda(Runtime(channels_last=True))
    net = runtime.prepare(copy.deepcopy(model))
    found = {}
    with torch.no_grad():
        layouts = layouts_on_the_way(net, lambda: found.update(
            got=net(runtime.inputs(dist), runtime.inputs(ref)).cpu()))
    got = found["got"]
    assert set(layouts) == {"vit", "deformed", "reduce", "smooth"}
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in layouts.values()), \
        {k: t.stride() for k, t in layouts.items()}
    assert (got - expected).abs().max().item() <= 1e-4


def test_ddp_wrapped_module_compiled_on_cuda_equals_eager(tmp_path):
    """One nccl process: the compiled DDP wrapper (dynamo's DDP graph splitting) steps like eager."""
    import torch.distributed as tdist

    torch.manual_seed(0)
    _, model, _ = random_official_setup(8, tmp_path, **TINY)
    dist, ref = torch.rand(2, 4, 3, 64, 64, device=CUDA)
    target = torch.linspace(0.2, 0.8, 4, device=CUDA)
    tdist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                             device_id=torch.device("cuda", 0))  # device_id needs an index
    try:
        losses = {}
        for name, settings in (("eager", Runtime()), ("compiled", Runtime(compile=True))):
            runtime = settings.resolve(torch.device("cuda", 0), CropCost(1.0, 1.0))
            net = runtime.prepare(copy.deepcopy(model)).train()
            optimizer, scheduler = make_optimizer(net, DEFAULTS["train"])
            stepper = make_stepper(net, Job(0, 2, 0), runtime)
            losses[name] = [train_step(stepper, optimizer, scheduler, dist, ref, target, runtime,
                                       torch.ones(4, device=CUDA), 4.0, 1) for _ in range(2)]
        assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    finally:
        tdist.destroy_process_group()


def test_benchmark_suites_run_in_strict_fp32(monkeypatch, capsys):
    """The benchmark sets strict fp32 for every suite (the model suite uses no Runtime, and cuDNN's
    default allows TF32) and warms both evaluation paths up before timing them."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark

    torch.backends.cudnn.allow_tf32 = True  # cuDNN's own default
    for suite in (["--suite", "model", "--repeats", "1"], ["--suite", "eval", "--crops", "1", "--distortions", "2"]):
        monkeypatch.setattr(sys, "argv", ["benchmark.py", "--device", "cuda", *suite])
        benchmark.main()
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    lines = [line for line in capsys.readouterr().out.splitlines() if "speedup" in line]
    assert any(line.startswith("pair224_p8:") for line in lines) and any("_bf16:" in line for line in lines)
