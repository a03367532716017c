"""The CUDA paths on a machine without a GPU (tests/fake_cuda.py): the model, the scoring core, the metric,
a training step and the quality maps traced on fake CUDA tensors, up to the tensors where the code reads
values back; and the decisions ahiq takes from the driver's answers (device, precision, bf16, crops per
pass, TF32, torchrun's GPU per process), given the answers of named GPUs."""
import pytest
import torch

from ahiq import AHIQ, create_metric
from ahiq.data import CropPlan
from ahiq.engine.training import make_optimizer, make_stepper, step_loss
from ahiq.nn import fusion, head
from ahiq.nn.model import build_model
from ahiq.options import DEFAULTS
from ahiq.runtime import device as device_module
from ahiq.runtime.device import Runtime, auto_bf16, select_device, set_tf32
from ahiq.runtime.distributed import Job, init_distributed
from ahiq.runtime.memory import MAX_CHUNK
from ahiq.scoring.cost import GRAD_FACTOR, crop_cost
from ahiq.scoring.ensemble import Ensemble, resolve
from conftest import TINY, layouts_on_the_way, tiny_options
from fake_cuda import GPUS, fake_cuda, on_fake_cuda, simulated
from test_variants import VARIANTS

CUDA = torch.device("cuda")
RUNTIMES = {"fp32": Runtime(), "bf16": Runtime(precision="bf16"), "tf32": Runtime(tf32=True),
            "fp32_channels_last": Runtime(channels_last=True), "bf16_channels_last": Runtime(precision="bf16", channels_last=True)}


def on_cuda(runtime: Runtime, model: AHIQ):
    """``runtime`` resolved for the (simulated) GPU and ``model``."""
    return resolve(runtime, CUDA, [model])


@pytest.fixture(autouse=True)
def strict_fp32_after():
    yield
    set_tf32(False)  # the TF32 switches are process-wide


def conv_dtypes(net, run) -> set:
    """The dtypes of the convolutions' outputs in the head while ``run()`` runs."""
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for m in net.head.modules()
             if isinstance(m, torch.nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("deform_impl", ["bilinear", "torchvision"])
@pytest.mark.parametrize("runtime", RUNTIMES, ids=str)
def test_the_model_runs_on_cuda_in_every_setting(patch_size, deform_impl, runtime):
    settings = RUNTIMES[runtime]
    model = AHIQ(patch_size, False, False, **TINY, deform_impl=deform_impl)
    with fake_cuda():
        runtime = on_cuda(settings, model)
        net = runtime.prepare(model)
        assert all(on_fake_cuda(p) for p in net.parameters())
        assert torch.backends.cuda.matmul.allow_tf32 == settings.tf32
        dist = runtime.inputs(torch.rand(4, 3, 64, 64))
        ref = runtime.inputs(torch.rand(2, 3, 64, 64))  # two references shared by two groups of crops
        found = {}
        with torch.no_grad(), runtime.autocast():
            def run():
                features = net.reference_features(ref)
                found.update(features=features, pooled=net.predict_with_reference(dist, features))
            dtypes = conv_dtypes(net, run)
            layouts = layouts_on_the_way(net, run) if runtime.channels_last else None
    pooled, features = found["pooled"], found["features"]
    assert on_fake_cuda(pooled.score) and pooled.score.shape == (4,) and pooled.score.dtype == torch.float32
    assert on_fake_cuda(pooled.score_map) and pooled.score_map.shape == (4, 1, 64 // patch_size, 64 // patch_size)
    assert on_fake_cuda(features.offset) and features.offset.dtype == torch.float32  # positions stay fp32
    assert dtypes == ({torch.bfloat16} if settings.precision == "bf16" else {torch.float32})
    # NHWC from the ViT map into the head. In bf16 the convolution's layout is cuDNN's choice, which torch
    # makes from the real GPU's properties (none here: it picks its slow kernel, NCHW): tests/test_cuda.py.
    if layouts is not None and settings.precision == "fp32":
        assert set(layouts) == {"vit", "deformed", "reduce", "smooth"}
        assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                   for t in layouts.values()), {k: t.stride() for k, t in layouts.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_of_the_ablations_runs_on_cuda_in_bf16(variant):
    model = AHIQ(8, False, False, **{**TINY, **VARIANTS[variant][0]})
    with fake_cuda(), torch.no_grad():
        runtime = on_cuda(RUNTIMES["bf16_channels_last"], model)
        net = runtime.prepare(model)
        with runtime.autocast():
            scores = net(runtime.inputs(torch.rand(2, 3, 64, 64)), runtime.inputs(torch.rand(2, 3, 64, 64)))
    assert on_fake_cuda(scores) and scores.shape == (2,) and scores.dtype == torch.float32


@pytest.mark.parametrize("runtime", ["fp32", "bf16"])
def test_the_scoring_core_shares_the_reference_and_keeps_the_maps_on_cuda(runtime):
    """From decoded images on the CPU to the scores and maps on the GPU: five crops in windows of three per
    pass, the reference's features computed once and passed on to the next distorted images."""
    model = AHIQ(8, False, False, **TINY)
    plan = CropPlan(64, "five")
    ref, dists = torch.rand(3, 72, 80), [torch.rand(3, 72, 80) for _ in range(3)]
    with fake_cuda(), torch.no_grad():
        resolved = on_cuda(Runtime(precision=RUNTIMES[runtime].precision, crop_chunk=3), model)
        ensemble = Ensemble([resolved.prepare(model).eval()], plan, resolved)
        first = ensemble.score_group(ref, dists[:2], "r.png", maps=True)
        calls = []
        ensemble.models[0].reference_features = lambda *a: calls.append(a)  # must not be needed again
        second = ensemble.score_group(None, dists[2:], "r.png", maps=True, features=first.features)
    assert calls == []
    for scored, pairs in ((first, 2), (second, 1)):
        assert on_fake_cuda(scored.scores) and scored.scores.shape == (pairs,) and scored.scores.dtype == torch.float32
        assert on_fake_cuda(scored.crop_maps) and scored.crop_maps.shape == (2, pairs, 5, 8, 8)
        assert scored.crop_maps.dtype == torch.float32
    assert on_fake_cuda(first.features[0].reduced) and first.features[0].reduced.shape[0] == 5


def test_the_metric_and_the_loss_run_on_cuda(tiny_checkpoint):
    """The metric's forward, and as a loss up to the backward pass (which needs a real GPU: fake_cuda.py):
    the graph reaches the distorted input."""
    metric = create_metric(str(tiny_checkpoint), crops="five", device="cpu", vit_pretrained=False,
                           cnn_pretrained=False, check_input_range=False)
    loss_metric = create_metric(str(tiny_checkpoint), crops="five", device="cpu", vit_pretrained=False,
                                cnn_pretrained=False, as_loss=True)
    with fake_cuda():
        metric.to(CUDA)
        loss_metric.to(CUDA)
        assert metric.device == torch.device("cuda", 0)
        dist, ref = torch.rand(1, 3, 72, 72, device="cuda"), torch.rand(1, 3, 72, 72, device="cuda")
        scores = metric(dist, ref)
        dist.requires_grad_(True)
        loss = loss_metric.loss(dist, ref)
        weighted = loss_metric(dist, ref)
    assert on_fake_cuda(scores) and scores.shape == (1,) and not scores.requires_grad
    assert on_fake_cuda(loss) and loss.shape == () and loss.requires_grad and loss.grad_fn is not None
    assert on_fake_cuda(weighted) and weighted.requires_grad


@pytest.mark.parametrize("world", [1, 2])
def test_a_training_step_on_cuda_as_train_py_builds_it(tmp_path, world):
    """build_model, Runtime.prepare (bf16, channels_last), make_stepper, the inputs moved as Trainer._step
    moves them, the loss (with torchrun's weights under two processes), then the optimizer and the schedule
    as make_optimizer builds them for CUDA weights, stepped on gradients of the weights' shapes (the
    backward pass itself needs a real GPU)."""
    opt = tiny_options(tmp_path, "runtime.precision=bf16", "runtime.channels_last=true", "model.freeze_backbones=false")
    model = build_model(opt["model"])
    dist, ref, target = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64), torch.rand(4)
    with fake_cuda():
        runtime = on_cuda(Runtime(**opt["runtime"]), model)
        net = runtime.prepare(model).train()
        optimizer, scheduler = make_optimizer(net, opt["train"])
        stepper = make_stepper(net, Job(), runtime)
        images = runtime.inputs(dist), runtime.inputs(ref)
        if world == 1:
            loss = step_loss(stepper, *images, target.to(CUDA), runtime)
        else:
            loss = step_loss(stepper, *images, target.to(CUDA), runtime, torch.ones(4).to(CUDA), 4 / 2)
        assert on_fake_cuda(loss) and loss.dtype == torch.float32 and loss.requires_grad
        lr = optimizer.param_groups[0]["lr"]
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
        state = optimizer.state[net.head.reduce.weight]
    assert on_fake_cuda(state["exp_avg"]) and on_fake_cuda(state["exp_avg_sq"])
    assert all(on_fake_cuda(p) for p in net.parameters()) and optimizer.param_groups[0]["lr"] < lr


class DropsDevice:
    """torch, except that ``name`` forgets the device it is asked for: a tensor created on the CPU."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        function = getattr(torch, attribute)
        if attribute != self.name:
            return function
        return lambda *args, device=None, **kwargs: function(*args, **kwargs)


@pytest.mark.parametrize("module,name", [(fusion, "arange"), (head, "empty")], ids=["fusion", "head"])
def test_a_tensor_created_without_its_device_fails_on_fake_cuda(module, name, monkeypatch):
    """The deformable convolution's sampling grid and the head's cat(d - r, d, r) without their device=: the
    traces above would fail, as a first GPU run would."""
    model = AHIQ(8, False, False, **TINY)
    with fake_cuda(), torch.no_grad():
        net = model.to(CUDA)
        x = torch.rand(2, 3, 64, 64, device="cuda")
        net(x, x)  # as it is: fine
        monkeypatch.setattr(module, "torch", DropsDevice(name))
        with pytest.raises(RuntimeError, match="cpu"):
            net(x, x)


# ---- the driver's answers: the decisions ahiq takes from them ------------------------------------------------

@pytest.mark.parametrize("gpu,native", [("V100", False), ("A100", True), ("H100", True)])
def test_precision_follows_the_gpus_bf16(gpu, native):
    model = AHIQ(8, False, False, **TINY)
    with simulated(gpu):
        cuda = select_device("auto")
        assert cuda == CUDA
        assert auto_bf16(cuda) == (native, f"{'native' if native else 'no native'} bf16 on this GPU")
        assert on_cuda(Runtime(precision="auto"), model).bf16 is native
        if native:
            assert "bf16 (auto: native bf16 on this GPU)" in on_cuda(Runtime(precision="auto"), model).describe()
        else:
            with pytest.raises(ValueError, match=f"{GPUS[gpu].name} has no native bf16 .* use runtime.precision=fp32"):
                on_cuda(Runtime(precision="bf16"), model)


@pytest.mark.parametrize("free,grad,expected", [(70 * 2 ** 30, False, MAX_CHUNK), (2 * 2 ** 30, False, 8),
                                                (2 * 2 ** 30, True, int(8 / GRAD_FACTOR)), (100 * 2 ** 20, False, 1)])
def test_crops_per_pass_are_half_the_gpus_free_memory(free, grad, expected):
    """docs/performance.md: half a GPU's free memory, 128 MiB a full-size crop, three times that under
    autograd, between 1 and 64 crops."""
    model = AHIQ(8, False, False, **TINY)
    model.config = dict(model.config, img_size=224, vit_dim=768, cnn_width=64)  # full size
    assert crop_cost(model.config).evaluating == 128 * 2 ** 20
    with simulated("A100", free=free), torch.set_grad_enabled(grad):
        assert on_cuda(Runtime(), model).crops() == expected
        assert on_cuda(Runtime(crop_chunk=5), model).crops() == 5


def test_tf32_switches_only_when_asked_on_the_gpu():
    model = AHIQ(8, False, False, **TINY)
    with fake_cuda("A100"):
        on_cuda(Runtime(tf32=True), model)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        on_cuda(Runtime(), model)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        resolve(Runtime(tf32=True), torch.device("cpu"), [model])  # the CPU leaves them as they are
        assert not torch.backends.cuda.matmul.allow_tf32


def test_cuda_n_is_placed_on_gpu_n_and_a_missing_gpu_is_one_line():
    with simulated("A100", count=2):
        assert select_device("cuda:1", "--device") == torch.device("cuda", 1)
        with pytest.raises(ValueError, match=r"--device is 'cuda:2' but this machine has 2 CUDA device\(s\), "
                                             r"cuda:0 to cuda:1"):
            select_device("cuda:2", "--device")
        assert device_module.native_bf16(torch.device("cuda", 1))
    assert select_device("auto") == torch.device("cpu")  # no simulated driver: the CPU


def test_torchrun_gives_each_process_the_gpu_of_its_local_rank(monkeypatch):
    import torch.distributed as tdist

    joined = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(tdist, "get_rank", lambda: 3)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with simulated("H100", count=2) as state:
        job, device = init_distributed("auto")
        assert device == torch.device("cuda", 1) and state.current == 1
        assert job == Job(3, 4, 1) and joined == [("nccl", {"device_id": torch.device("cuda", 1)})]
        monkeypatch.setenv("LOCAL_RANK", "2")
        with pytest.raises(ValueError, match="process 2 of this node has no GPU: the node has 2"):
            init_distributed("cuda")
    assert DEFAULTS["train"]["device"] == "auto"
