"""How a model runs on its device: the ``runtime`` options (``Runtime``: fp32 or bf16, TF32, the channels_last
layout, torch.compile, crops per pass), decided once at the start of a run for its device (``ResolvedRuntime``:
what every forward pass reads); native bf16, the measured choice of ``precision: auto``, the device. Shared by
train.py, test.py, the scorers, the metric and the benchmark. Nothing here knows the model: what a crop costs
and how to time one are given."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ahiq.files import hub_dir, json_bytes, write_atomically
from ahiq.options import DEFAULTS, check_option
from ahiq.runtime.memory import CropCost, cpu_crops, crops_in_budget
from ahiq.runtime.threads import describe as describe_threads


@dataclass(frozen=True)
class Runtime:
    """The ``runtime`` options, as given (train.py and test.py take them from the option files; ``Scorer`` and
    the metric as ``runtime=``): ``precision`` (ahiq.registry.settings.PRECISIONS: "fp32", "bf16", or "auto":
    bf16 where the device computes it natively and, on a CPU, faster than fp32), ``tf32`` (let fp32 matmuls and
    convolutions use TF32 on GPUs that have it), ``channels_last`` (NHWC weights and inputs, what tensor cores
    want), ``compile`` (torch.compile: True for inductor, a backend's name or function), ``crop_chunk`` (the most
    crops in one forward pass; None: sized from the memory the device has free), ``threads`` (the CPU threads
    the command lines set, ahiq.runtime.threads.applied). ``resolve`` decides them, once, for one device."""

    precision: str = DEFAULTS["runtime"]["precision"]
    tf32: bool = DEFAULTS["runtime"]["tf32"]
    channels_last: bool = DEFAULTS["runtime"]["channels_last"]
    compile: bool | str | Callable = DEFAULTS["runtime"]["compile"]
    crop_chunk: int | None = DEFAULTS["runtime"]["crop_chunk"]
    threads: int | None = DEFAULTS["runtime"]["threads"]

    def __post_init__(self):
        for key in ("precision", "tf32", "channels_last", "crop_chunk", "threads", "compile"):
            if not (key == "compile" and callable(self.compile)):
                check_option(f"runtime.{key}", getattr(self, key), f"runtime.{key}")

    def resolve(self, device: torch.device, cost: CropCost, measure: Callable[[], dict] | None = None) -> ResolvedRuntime:
        """These options decided for ``device`` at the start of a run: the precision (``auto`` measured where it
        must be: ``measure`` times one full-size crop pair in fp32 and in bf16, auto_cpu_bf16), the crops per
        forward pass for a model whose crops cost ``cost``, TF32 set. A bf16 the device only emulates is refused
        on a GPU and warned of on a CPU, here, before anything is loaded onto it."""
        if self.precision == "auto":
            bf16, why = auto_bf16(device, measure)
            precision = f"{'bf16' if bf16 else 'fp32'} (auto: {why})"
        else:
            bf16, precision = self.precision == "bf16", self.precision
        if self.precision == "bf16" and device.type == "cuda" and not native_bf16(device):
            raise ValueError(f"runtime.precision=bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                             f"(it would be emulated, slower than fp32); use runtime.precision=fp32")
        if self.precision == "bf16" and device.type == "cpu" and not native_bf16(device):
            warnings.warn("runtime.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): emulated, "
                          "it runs far slower than fp32; use runtime.precision=fp32 or auto", stacklevel=2)
        if device.type == "cuda":
            set_tf32(self.tf32)
        # Crops per pass: what half a GPU's free memory holds; on a CPU, cpu_crops
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0] / 2
            chunks = [self.crop_chunk or crops_in_budget(bytes_per_crop, free) for bytes_per_crop in cost]
        else:
            chunks = [self.crop_chunk or cpu_crops(bytes_per_crop, "bf16" if bf16 else "fp32")
                      for bytes_per_crop in cost]
        return ResolvedRuntime(device, bf16, precision, self.channels_last,
                               "inductor" if self.compile is True else self.compile or None, *chunks)


@dataclass(frozen=True)
class ResolvedRuntime:
    """A Runtime decided for one device at the start of a run (Runtime.resolve): what every forward pass reads.
    ``precision`` says how the run computes, as its first line shows it; ``compile``: the torch.compile backend
    (None: eager); the crops of one forward pass evaluating, and under autograd (the metric as a loss)."""

    device: torch.device
    bf16: bool
    precision: str
    channels_last: bool = False
    compile: str | Callable | None = None
    crops_per_pass: int = 1
    crops_per_pass_with_grad: int = 1

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolutions and matmuls compute in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        """How a run computes, for its first line: the device, the precision (for ``auto``, why), the CPU
        threads."""
        return f"device {self.device}, {self.precision}; {describe_threads()}"

    def crops(self) -> int:
        """The crops of one forward pass now: under autograd a crop keeps its activations for the backward
        pass."""
        return self.crops_per_pass_with_grad if torch.is_grad_enabled() else self.crops_per_pass

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device in this runtime's memory layout; its state_dict keys are unchanged. In bf16,
        every matmul and convolution weight that does not train (``requires_grad`` off, at least 2-D) is stored in
        bf16, with its module's bias: the cast autocast would make of it at every forward pass (for such weights
        it keeps no cache) made once, so that autocast casts only the activations and every matmul and
        convolution gets the inputs it gets under autocast. A module with ``keeps_precision`` set keeps its
        weights as they are (one that computes with autocast off). Nothing compiled is stored on the model (see
        ``entry`` and ``compiled``), so copies and torch.save behave."""
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.bf16:
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if (isinstance(weight, torch.nn.Parameter) and weight.dim() >= 2 and not weight.requires_grad
                        and not getattr(module, "keeps_precision", False)):
                    for name, parameter in list(module.named_parameters(recurse=False)):
                        setattr(module, name, torch.nn.Parameter(parameter.to(torch.bfloat16), requires_grad=False))
        return model

    def entry(self, model: torch.nn.Module, name: str) -> Callable:
        """``model.<name>`` (an entry point such as ``reference_features``), compiled when this runtime
        compiles: the class's function is compiled and given the model as its first argument, so the
        compiled code always runs the weights of the model it is called with."""
        if not self.compile:
            return getattr(model, name)
        return functools.partial(torch.compile(getattr(type(model), name), backend=self.compile), model)

    def compiled(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (the model, or the DistributedDataParallel wrapping it) compiled as a whole when this
        runtime compiles: for DDP, dynamo then splits the graph at DDP's gradient buckets, so the all-reduce
        of each bucket overlaps the rest of the backward pass."""
        return torch.compile(module, backend=self.compile) if self.compile else module

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images [N, 3, H, W] on the device in this runtime's memory layout."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (not emulated in fp32, which is slower than fp32)."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # the device asked for, not the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_bf16() != "emulated"


def auto_bf16(device: torch.device, measure: Callable[[], dict] | None = None) -> tuple[bool, str]:
    """``precision: auto`` on ``device``: (bf16 or not, why). A GPU: bf16 where it is native. A CPU: where
    it is native and measured faster than fp32 here (``auto_cpu_bf16``)."""
    if device.type == "cpu":
        return auto_cpu_bf16(measure)
    native = native_bf16(device)
    return native, f"{'native' if native else 'no native'} bf16 on this GPU"


def auto_cpu_bf16(measure: Callable[[], dict] | None = None) -> tuple[bool, str]:
    """``precision: auto`` on this CPU: bf16 where it is native and measured faster than fp32. Native bf16 is not
    always faster: on an Intel Xeon with AVX512-BF16 and no AMX, oneDNN's bf16 matmuls and convolutions measured
    slower than its fp32 ones (docs/performance.md). ``measure`` times one full-size crop pair in each (a few
    seconds; ahiq.scoring supplies it); the times are measured once per CPU, torch version, thread count and
    instruction-set setting, and remembered in the cache folder (``measured_seconds``)."""
    if cpu_bf16() == "emulated":
        return False, "bf16 is emulated on this CPU"
    seconds = measured_seconds(measure)
    faster = seconds["bf16"] < 0.95 * seconds["fp32"]
    return faster, (f"{cpu_bf16()}, and {seconds['measured']} takes {seconds['bf16']:.3g} s in bf16, "
                    f"{seconds['fp32']:.3g} s in fp32 on this CPU")


def cpu_key() -> str:
    """What a CPU measurement holds for: the CPU, torch's version, the threads, the instruction-set settings."""
    settings = [f"{name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if name in os.environ]
    return "; ".join([cpu_name(), f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", *settings])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precision_cache() -> Path:
    return hub_dir() / "ahiq" / "precision.json"


def measured_seconds(measure: Callable[[], dict] | None) -> dict:
    """The seconds ``measure()`` gives ({"fp32": s, "bf16": s}, a full-size crop pair after an untimed pass
    each) on this CPU, with what was measured ("measured"); read from precision_cache when measured before with
    the same ``measure.path`` (what it runs: a changed path is measured again).
    Where bf16 is converted rather than computed (a ViT-sized matmul more than twice as slow in bf16), or no
    ``measure`` is given, the matmul's times."""
    path, key = precision_cache(), "; ".join([cpu_key(), *([measure.path] if measure is not None else [])])
    if key in _MEASURED:
        return _MEASURED[key]
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and {"fp32", "bf16", "measured"} <= set(known[key]):
        return known[key]
    seconds = {}
    with torch.no_grad():
        # A first look at one ViT-sized matmul: a bf16 far slower than fp32 (converted, not computed natively)
        # is decided without the minutes the whole network would take.
        x, w = torch.randn(1568, 768), torch.randn(3072, 768)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a, b = x.to(dtype), w.to(dtype)
            torch.nn.functional.linear(a, b)
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            seconds[precision] = time.perf_counter() - start
    if seconds["bf16"] > 2 * seconds["fp32"] or measure is None:
        return _remember_seconds(path, known, key, {**seconds, "measured": "a ViT-sized matmul"})
    return _remember_seconds(path, known, key, {**measure(), "measured": "a full-size crop pair"})


_MEASURED: dict[str, dict] = {}  # this process's measurements (a cache folder that cannot be written included)


def _remember_seconds(path: Path, known: dict, key: str, seconds: dict) -> dict:
    known[key] = _MEASURED[key] = seconds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json_bytes(known))
    except OSError:
        pass  # an unwritable cache means measuring again next time
    return seconds


BF16_LEVELS = ("emulated", "AVX512-BF16", "AMX")  # how a CPU computes bf16, slowest first (x86)


@functools.cache
def cpu_bf16() -> str:
    """How this CPU computes bf16: "AMX" or "AVX512-BF16" (native instructions, which oneDNN uses for bf16
    convolutions and matmuls), "Arm BF16", or "emulated" (converted to fp32 and back: slower than fp32); on x86
    no more than ``ONEDNN_MAX_CPU_ISA`` lets oneDNN use (onednn_bf16_cap)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        # oneDNN's query is the instruction set's on Arm (on x86 it accepts emulation)
        return "Arm BF16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    amx, avx512_bf16 = (getattr(torch.cpu, name, lambda: False)()
                        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    hardware = "AMX" if amx else "AVX512-BF16" if avx512_bf16 else "emulated"
    return min(hardware, onednn_bf16_cap(), key=BF16_LEVELS.index)


def onednn_bf16_cap() -> str:
    """The most of BF16_LEVELS that ``ONEDNN_MAX_CPU_ISA`` lets oneDNN use: AMX under its AMX names (and ALL or
    DEFAULT, no cap), AVX512-BF16 under AVX512_CORE_BF16, AVX512_CORE_FP16 and AVX10, emulated under the names
    below them (AVX2, AVX512_CORE, ...)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper()
    if isa in ("", "ALL", "DEFAULT") or "AMX" in isa:
        return "AMX"
    if isa in ("AVX512_CORE_BF16", "AVX512_CORE_FP16") or isa.startswith("AVX10"):
        return "AVX512-BF16"
    return "emulated"


def select_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` (CUDA where there is a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; ``option`` is how
    the caller's user gave it (the option or flag named in an error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} '{name}' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} is '{name}' but no CUDA device is available; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{option} is '{name}' but this machine has {count} CUDA device(s), cuda:0 to "
                         f"cuda:{count - 1}")
    return device


def set_tf32(enabled: bool) -> None:
    """Whether fp32 matmuls and convolutions may use TF32 on GPUs that have it (process-wide; off: strict
    fp32, where cuDNN's own default would allow TF32 convolutions).

    Through the allow_tf32 switches: on torch 2.14 they set the fp32_precision switches too, and every
    getter (allow_tf32, fp32_precision, torch.get_float32_matmul_precision, which inductor and
    torch.utils.benchmark read) stays readable. Setting the fp32_precision switches alone leaves the
    legacy getters raising "mix of legacy and new APIs"."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
