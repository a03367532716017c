"""The fast paths of ahiq.runtime against the plain fp32 model: bf16 autocast, channels_last, torch.compile
and crop chunking. bf16 runs on the CPU here (emulated, slow: the tiny model only)."""
import copy
import io
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ahiq.data import CropPlan, load_parts
from ahiq.engine.training import make_optimizer, make_stepper, train_step
from ahiq.nn.official import random_official_setup
from ahiq.options import DEFAULTS
from ahiq.runtime.device import Runtime, cpu_bf16, native_bf16, set_tf32
from ahiq.runtime.distributed import Job
from ahiq.runtime.memory import CropCost
from ahiq.scoring.cost import crop_cost
from ahiq.scoring.ensemble import Ensemble, resolve
from ahiq.scoring.inference import predict
from conftest import ROOT, TINY, resolved, layouts_on_the_way, tiny_options

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_pairs(tmp_path_factory):
    """A tiny AHIQ whose random scores spread like a trained model's (std about 0.05), and 16 pairs."""
    torch.manual_seed(0)
    _, model, _ = random_official_setup(8, tmp_path_factory.mktemp("weights"), **TINY)
    return model, torch.rand(16, 3, 64, 64), torch.rand(16, 3, 64, 64)


def scores(model, dist, ref, runtime=Runtime()):
    run = resolved(**{f: getattr(runtime, f) for f in runtime.__dataclass_fields__})
    model = run.prepare(copy.deepcopy(model))
    with torch.no_grad(), run.autocast():
        features = run.entry(model, "reference_features")(run.inputs(ref))
        return run.entry(model, "score_with_reference")(run.inputs(dist), features)


def test_bf16_scores_within_a_hundredth_of_fp32(model_and_pairs):
    model, dist, ref = model_and_pairs
    dtypes = {}
    hook = model.head.smooth[0].register_forward_hook(lambda m, i, o: dtypes.update(head=o.dtype))
    offsets = model.fusion.offsets  # recorded through the model's copies too: they call this bound method
    model.fusion.offsets = lambda *a: (lambda out: dtypes.update(offsets=out.dtype) or out)(offsets(*a))
    fp32 = scores(model, dist, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on CPUs without AVX512-BF16 or AMX (tested below)
        bf16 = scores(model, dist, ref, Runtime(precision="bf16"))
    hook.remove()
    del model.fusion.offsets
    # bf16 really ran, except where positions are computed; the weighted mean comes out in fp32
    assert dtypes == {"head": torch.bfloat16, "offsets": torch.float32} and bf16.dtype == torch.float32
    diff = (fp32 - bf16).abs().max().item()
    assert 0 < diff < 0.01, diff  # the target for bf16 on the normalised scale (measured 0.0068)
    assert fp32.std() > 0.04  # the scores differ enough between pairs for the comparison to mean something


def test_bf16_weights_cast_once_give_autocasts_scores(model_and_pairs):
    """In bf16, prepare stores every weight that does not train in bf16 (autocast's cast, made once), except the
    offset convolution's (positions: fp32) and the normalisations'; the scores are those of autocast casting the
    fp32 weights at every pass. A weight that trains stays fp32."""
    model, dist, ref = model_and_pairs
    runtime = resolved(precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on CPUs without it
        cast = runtime.prepare(copy.deepcopy(model).requires_grad_(False))
        each_pass = runtime.prepare(copy.deepcopy(model))  # weights that train: autocast casts them every pass
        assert cast.vit.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 == cast.head.score.bias.dtype
        assert cast.fusion.deform.weight.dtype == torch.bfloat16 == cast.cnn.stem[0].weight.dtype
        assert cast.fusion.offset_conv.weight.dtype == torch.float32 == cast.vit.vit.blocks[0].norm1.weight.dtype
        assert each_pass.head.score.weight.dtype == torch.float32 and cast.dtype == torch.float32
        with torch.no_grad(), runtime.autocast():
            got = [net.score_with_reference(runtime.inputs(dist), net.reference_features(runtime.inputs(ref)))
                   for net in (cast, each_pass)]
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-6)
    assert got[0].std() > 0.04


def test_deformable_sampling_positions_stay_fp32_under_bf16():
    from ahiq.nn.fusion import deform_conv2d_bilinear

    torch.manual_seed(1)
    x, offset, weight = torch.randn(2, 4, 56, 56), 3 * torch.randn(2, 18, 56, 56), torch.randn(4, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = deform_conv2d_bilinear(x.bfloat16(), offset, weight, None, padding=1)
    # The same bf16 inputs sampled in fp32: only the final matmul's rounding should separate the two (mean
    # error 0.007 on values up to 19); sampling positions rounded to bf16 give 0.16.
    rounded = deform_conv2d_bilinear(x.bfloat16().float(), offset, weight.bfloat16().float(), None, padding=1)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - rounded).abs().mean() < 0.02


def test_channels_last_equals_contiguous(model_and_pairs):
    model, dist, ref = model_and_pairs
    runtime = Runtime(channels_last=True)
    prepared = resolved(channels_last=True).prepare(copy.deepcopy(model))
    assert prepared.head.smooth[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scores(model, dist, ref, runtime), scores(model, dist, ref), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_equals_eager_and_keeps_checkpoint_keys(model_and_pairs):
    model, dist, ref = model_and_pairs
    graphs = []

    def counting_backend(graph_module, example_inputs):  # the graphs dynamo captured, run as they are
        graphs.append(graph_module)
        return graph_module.forward

    compiled = scores(model, dist, ref, Runtime(compile=counting_backend))
    assert graphs  # the model really went through torch.compile
    torch.testing.assert_close(compiled, scores(model, dist, ref), rtol=0, atol=1e-6)
    runtime = resolved(compile=counting_backend)
    prepared = runtime.prepare(copy.deepcopy(model))
    assert prepared.state_dict().keys() == model.state_dict().keys()
    # Nothing compiled lives on the model: a copy computes with its own weights, and the model pickles.
    twin = copy.deepcopy(prepared)
    torch.nn.init.zeros_(twin.head.score.weight)
    torch.nn.init.constant_(twin.head.score.bias, 0.25)
    with torch.no_grad():
        features = runtime.entry(twin, "reference_features")(ref)
        torch.testing.assert_close(runtime.entry(twin, "score_with_reference")(dist, features), torch.full((16,), 0.25))
    torch.save(prepared, io.BytesIO())


@pytest.mark.parametrize("chunk", [3, 7, 12])
def test_crop_chunks_give_the_same_scores(chunk, tmp_path):
    """5 crops a pair: chunk 3 splits each pair's crops in windows (3 + 2), 7 scores one pair a pass, 12 two."""
    opt = tiny_options(tmp_path)
    pairs = load_parts(opt["data"])["test"].pairs
    model = random_official_setup(8, tmp_path / "w", **TINY)[1]
    whole = predict(Ensemble([model], CropPlan(64, "five"), resolved()), pairs, batch_size=4)
    chunked = predict(Ensemble([model], CropPlan(64, "five"), resolved(crop_chunk=chunk)), pairs, batch_size=4)
    assert whole.std() > 0.01
    assert abs(chunked - whole).max() < 1e-5


def test_bf16_training_step_keeps_fp32_weights(model_and_pairs):
    model, dist, ref = model_and_pairs
    model = copy.deepcopy(model).train()
    optimizer, scheduler = make_optimizer(model, DEFAULTS["train"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32_loss = torch.nn.functional.mse_loss(model(dist[:4], ref[:4]), torch.full((4,), 0.5)).item()
    loss = train_step(model, optimizer, scheduler, dist[:4], ref[:4], torch.full((4,), 0.5),
                      resolved(precision="bf16"))
    # measured over 10 seeds of the tiny model: at most 0.0092 relative; twice that
    assert loss == pytest.approx(fp32_loss, rel=0.02)
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert not torch.equal(after["head.score.weight"], before["head.score.weight"])
    assert torch.equal(after["vit.vit.blocks.0.attn.qkv.weight"], before["vit.vit.blocks.0.attn.qkv.weight"])  # frozen


@pytest.mark.slow
def test_compiled_training_steps_equal_eager(model_and_pairs):
    """aot_eager: dynamo and AOT autograd, the forward and backward graphs inductor would get (with the
    fusion's activation checkpoints inside), run without code generation."""
    model, dist, ref = model_and_pairs
    target = torch.linspace(0.2, 0.8, 4)
    losses, weights, graphs = {}, {}, []

    def aot_eager(graph_module, example_inputs):  # records what dynamo captured
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    for name, runtime in (("eager", resolved()), ("compiled", resolved(compile=aot_eager))):
        net = runtime.prepare(copy.deepcopy(model)).train()
        optimizer, scheduler = make_optimizer(net, DEFAULTS["train"])
        stepper = make_stepper(net, Job(), runtime)
        losses[name] = [train_step(stepper, optimizer, scheduler, dist[:4], ref[:4], target, runtime)
                        for _ in range(2)]
        weights[name] = net.state_dict()
    assert graphs  # the training forward really went through torch.compile
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["eager"][1] != losses["eager"][0]  # the first step changed the weights
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-5, atol=1e-6)


def test_tf32_switches_keep_every_getter_readable():
    """Inductor's max-autotune, torch.utils.benchmark and other code read the legacy getters; setting only
    the new fp32_precision switches makes them raise "mix of legacy and new APIs" on torch 2.14."""
    for enabled in (True, False):
        set_tf32(enabled)
        assert torch.backends.cudnn.allow_tf32 is enabled and torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
        assert (torch.backends.cuda.matmul.fp32_precision == "tf32") is enabled
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is enabled


def test_bf16_refused_on_a_gpu_that_emulates_it(monkeypatch):
    """A V100 or T4 (simulated): torch.cuda.is_bf16_supported() says yes by default, counting emulation;
    the check must ask without it, and about the GPU the run uses, not the current one."""
    asked = []

    class DeviceContext:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            asked.append(("device", self.device))

        def __exit__(self, *exc):
            return False

    def is_bf16_supported(including_emulation=True):
        asked.append(("emulation", including_emulation))
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 1)
    assert not native_bf16(gpu)
    assert asked == [("device", gpu), ("emulation", False)]
    with pytest.raises(ValueError, match="V100.* no native bf16 .*runtime.precision=fp32"):
        Runtime(precision="bf16").resolve(gpu, CropCost(1.0, 1.0))


def test_channels_last_stays_nhwc_from_the_vit_map_into_the_head(model_and_pairs):
    """Under channels_last the ViT map is a free NHWC view of the tokens (no NCHW copy), the deformable
    convolution hands its output on NHWC, and the head's concatenation (the reference broadcast over the
    distorted images) stays NHWC: no fallback to NCHW on the way. The CUDA twin hooks the same layers."""
    model, dist, ref = model_and_pairs
    runtime = resolved(channels_last=True)
    prepared = runtime.prepare(copy.deepcopy(model))
    inputs = runtime.inputs(dist[:4]), runtime.inputs(ref[:2])
    with torch.no_grad():
        layouts = layouts_on_the_way(prepared, lambda: prepared.predict_with_reference(
            inputs[0], prepared.reference_features(inputs[1])))
    assert set(layouts) == {"vit", "deformed", "reduce", "smooth"}
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in layouts.values()), \
        {k: t.stride() for k, t in layouts.items()}
    with torch.no_grad():
        plain = prepared.vit((dist[:4] - 0.5) / 0.5)  # NCHW input: the plain layout, as before; same values
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, layouts["vit"], rtol=0, atol=1e-6)  # the last ViT call was on dist


@pytest.fixture
def uncapped(monkeypatch):
    """No ONEDNN_MAX_CPU_ISA (CI runs these tests again under AVX2), cpu_bf16 asked afresh, before and after."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu_bf16.cache_clear()
    yield monkeypatch
    cpu_bf16.cache_clear()


def test_cpu_bf16_agrees_with_the_cpu_flags(uncapped):
    """The instruction sets torch reports are those /proc/cpuinfo lists (x86 Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("x86 Linux only")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = "AMX" if "amx_tile" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "emulated"
    assert cpu_bf16() == expected
    assert native_bf16(CPU) is (expected != "emulated")


@pytest.mark.parametrize("isa, amx_cpu, avx512_bf16_cpu", [
    # oneDNN's names (its dnnl_cpu_isa_t): AMX's and the uncapped keep everything; AVX512_CORE_BF16 and FP16 keep
    # AVX512-BF16; the sets below them have no bf16 instructions
    ("ALL", "AMX", "AVX512-BF16"), ("avx512_core_amx", "AMX", "AVX512-BF16"),
    ("AVX512_CORE_BF16", "AVX512-BF16", "AVX512-BF16"), ("AVX512_CORE_FP16", "AVX512-BF16", "AVX512-BF16"),
    ("AVX512_CORE_VNNI", "emulated", "emulated"), ("AVX512_CORE", "emulated", "emulated"),
    ("AVX2", "emulated", "emulated"), ("SSE41", "emulated", "emulated")])
def test_cpu_bf16_is_what_onednn_may_use(isa, amx_cpu, avx512_bf16_cpu, uncapped):
    """ONEDNN_MAX_CPU_ISA caps what a CPU computes bf16 with (so AVX512_CORE_BF16 on an AMX CPU stands in for one
    without AMX, and auto measures it as such); it never adds what the CPU lacks."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("x86's instruction sets")
    uncapped.setenv("ONEDNN_MAX_CPU_ISA", isa)
    for amx, avx512_bf16, expected in ((True, True, amx_cpu), (False, True, avx512_bf16_cpu), (False, False, "emulated")):
        uncapped.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        uncapped.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512_bf16=avx512_bf16: avx512_bf16)
        cpu_bf16.cache_clear()
        assert cpu_bf16() == expected, (isa, amx, avx512_bf16)


@pytest.mark.parametrize("native, seconds, chosen", [(True, {"fp32": 2.0, "bf16": 1.0}, True),
                                                     (True, {"fp32": 1.0, "bf16": 1.5}, False),
                                                     (False, None, False)])
def test_auto_precision_is_bf16_only_where_it_is_native_and_faster(native, seconds, chosen, uncapped):
    """A CPU with and without AVX512-BF16 (simulated), bf16 measured faster or slower there (the measurement
    given): auto picks bf16 only where it is native and faster, and says why; an explicit bf16 warns only
    where it is not native."""
    uncapped.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    uncapped.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    measured = []
    uncapped.setattr("ahiq.runtime.device.measured_seconds",
                     lambda measure: measured.append(measure) or {**seconds, "measured": "a full-size crop pair"})
    assert cpu_bf16() == ("AVX512-BF16" if native else "emulated")
    auto = resolved(precision="auto")  # resolved once: measured once
    assert auto.bf16 is chosen and len(measured) == (1 if native else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated where not native: asserted below
        assert resolved(precision="fp32").bf16 is False and resolved(precision="bf16").bf16 is True
    assert auto.dtype == (torch.bfloat16 if chosen else torch.float32)
    with auto.autocast():
        assert torch.is_autocast_enabled("cpu") is chosen
    assert auto.describe().split(";")[0] == ("device cpu, " + ("bf16" if chosen else "fp32") + " (auto: " + (
        f"AVX512-BF16, and a full-size crop pair takes {seconds['bf16']:.3g} s in bf16, {seconds['fp32']:.3g} s "
        f"in fp32 on this CPU)" if native else "bf16 is emulated on this CPU)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved(precision="bf16")
        resolved(precision="auto")
    assert [str(w.message)[:51] for w in caught] == ([] if native else
                                                      ["runtime.precision=bf16 on a CPU without native bf16"])


@pytest.mark.slow
def test_auto_precision_on_this_cpu_is_the_faster_of_the_two_and_is_remembered(tmp_path):
    """The real measurement on this machine, in a process of its own with an empty cache folder: auto takes
    bf16 exactly where it measured faster; a second process reads the remembered times, measuring nothing."""
    code = ("import json, time, torch; from ahiq import runtime; from ahiq.scoring.ensemble import crop_pair_seconds; "
            "start = time.perf_counter(); chosen, why = runtime.auto_bf16(torch.device('cpu'), crop_pair_seconds); "
            "seconds = time.perf_counter() - start; "
            "print(json.dumps([chosen, why, seconds, runtime.native_bf16(torch.device('cpu'))]))")
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (chosen, why, _, native), (again, why_again, seconds, _) = runs
    if not native:
        assert chosen is False and why.startswith("bf16 is ")
        return
    remembered = json.loads((tmp_path / "hub" / "ahiq" / "precision.json").read_text())
    times, = remembered.values()
    assert chosen is (times["bf16"] < 0.95 * times["fp32"]) and f"{times['bf16']:.3g} s in bf16" in why
    assert (again, why_again) == (chosen, why) and seconds < 1.0  # read back: no network built, nothing timed


def test_auto_precision_on_a_gpu_follows_its_native_bf16(monkeypatch):
    """An A100 (bf16 in hardware) gets bf16; a V100 (emulated, simulated) fp32, without the error that an
    explicit bf16 gets there."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * 2 ** 30, 8 * 2 ** 30))  # simulated GPU
    for native in (True, False):
        monkeypatch.setattr("ahiq.runtime.device.native_bf16", lambda device, native=native: native)
        assert Runtime(precision="auto").resolve(torch.device("cuda", 0), CropCost(1.0, 1.0)).bf16 is native


def test_crops_per_pass_fit_the_free_memory(monkeypatch):
    """Unless runtime.crop_chunk is set, evaluation (no autograd) takes what a quarter of the CPU's available
    memory holds, at most 1 crop in fp32 and 4 in bf16 (what pays off there), or what half a GPU's free memory
    holds, between 1 and 64 crops; under autograd (the metric as a loss) a crop counts three times. Decided when
    the runtime is resolved."""
    from ahiq.runtime import memory as rt

    full = crop_cost(dict(img_size=224, vit_dim=768, cnn_width=64))
    half = crop_cost(dict(img_size=112, vit_dim=768, cnn_width=64))  # 32 MiB
    tiny = crop_cost(dict(img_size=64, vit_dim=32, cnn_width=8))
    assert full.evaluating == 128 * 2 ** 20 and full.with_grad == 3 * full.evaluating
    cpu = torch.device("cpu")

    def crops(cost, device=cpu, grad=False, **settings):
        with torch.set_grad_enabled(grad):
            return Runtime(**settings).resolve(device, cost).crops()

    monkeypatch.setattr(rt, "available_memory", lambda: 64 * 2 ** 30)
    assert crops(full) == crops(half) == crops(tiny) == 1  # fp32: one crop pays off on a CPU
    assert crops(full, crop_chunk=20) == 20 and crops(full, grad=True, crop_chunk=20) == 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on CPUs without it
        assert crops(full, precision="bf16") == 4 and crops(tiny, precision="bf16", grad=True) == 4
        monkeypatch.setattr(rt, "available_memory", lambda: 1024 * 2 ** 20)  # a quarter: 256 MiB
        assert crops(full, precision="bf16") == 2 and crops(half, precision="bf16") == 4
        assert crops(full, precision="bf16", grad=True) == 1
        monkeypatch.setattr(rt, "available_memory", lambda: 100 * 2 ** 20)
        assert crops(full, precision="bf16") == 1  # never none
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * 2 ** 30, 8 * 2 ** 30))  # simulated GPU
    assert crops(full, torch.device("cuda", 0)) == 24  # 3 GiB / 128 MiB
    assert crops(full, torch.device("cuda", 0), grad=True) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * 2 ** 30, 80 * 2 ** 30))
    assert crops(full, torch.device("cuda", 0)) == 64


def test_an_ensemble_is_resolved_for_its_costliest_model(monkeypatch):
    """resolve: crops per pass from the largest crop of the ensemble's models."""
    from ahiq.runtime import memory as rt

    small = type("Model", (), {"config": dict(img_size=64, vit_dim=32, cnn_width=8)})()
    full = type("Model", (), {"config": dict(img_size=224, vit_dim=768, cnn_width=64)})()
    monkeypatch.setattr(rt, "available_memory", lambda: 1024 * 2 ** 20)  # a quarter: 256 MiB, two full crops
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 emulated on CPUs without it
        assert resolve(Runtime(precision="bf16"), CPU, [small]).crops() == 4
        assert resolve(Runtime(precision="bf16"), CPU, [small, full]).crops() == 2
