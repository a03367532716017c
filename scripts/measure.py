"""How the benchmarks measure: the machine they ran on, wall time with the device synchronised, peak memory
above a baseline, the operations a call performs (torch.utils.flop_counter, with the kernels it lacks added), the
machine's own matmul at ViT-B/8's shapes, and the rows they print (a speed and its agreement with the official
pattern)."""
from __future__ import annotations

import ctypes
import gc
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ahiq.runtime.device import cpu_bf16, native_bf16


def environment(device: torch.device) -> dict:
    """The device and library versions a measurement is worth only beside."""
    import timm
    import torchvision

    found = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "timm": timm.__version__, "device": str(device), "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "threads": torch.get_num_threads()}
    if device.type == "cuda":
        found.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                     memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1))
    else:
        found.update(cpu=platform.processor() or platform.machine())
    native = native_bf16(device)
    found["bf16"] = ("native" if native else "emulated") + (f" ({cpu_bf16()})" if device.type == "cpu" and native else "")
    return found


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as Linux lists them (/proc/cpuinfo); empty elsewhere."""
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def write_noisy_pairs(folder: Path, prefix: str, height: int, width: int, references: int, per_reference: int,
                      rng) -> list[tuple[Path, Path, float]]:
    """Smooth random references (compression and decoding behave as for photos) and ``per_reference``
    noisier copies of each (noise sd 4 + 3 d), written as PNG files ``<prefix>R<r>.png`` and
    ``<prefix>R<r>_<d>.png`` in ``folder``: (reference, distorted, PSNR) per pair, references in order."""
    import cv2
    import numpy as np

    pairs = []
    for r in range(references):
        ref = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3)).astype(np.uint8), (0, 0), 2)
        ref_path = Path(folder) / f"{prefix}R{r}.png"
        cv2.imwrite(str(ref_path), ref)
        for d in range(per_reference):
            noisy = np.clip(ref + rng.normal(0, 4 + 3 * d, ref.shape), 0, 255).astype(np.uint8)
            dist_path = Path(folder) / f"{prefix}R{r}_{d}.png"
            cv2.imwrite(str(dist_path), noisy)
            pairs.append((ref_path, dist_path, cv2.PSNR(ref, noisy)))
    return pairs


def machine() -> str:
    """The CPU by name, the CPUs this process may use and the instructions the precisions depend on, and
    torch's version: what a CPU measurement is worth only beside."""
    from ahiq.runtime.device import cpu_name
    from ahiq.runtime.threads import usable_cpus

    model, flags = cpu_name(), cpu_flags()
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if name in flags]
    cpus, why = usable_cpus()
    return (f"{model}, {cpus} CPUs ({why}); {' '.join(isa) or 'no AVX2'}{'' if 'amx_bf16' in flags else ', no AMX'}; "
            f"torch {torch.__version__}, bf16 {cpu_bf16()}")


def timed(fn, device: torch.device):
    """``fn()`` and the seconds it took, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    return min(timed(fn, device)[1] for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in /proc/self/status")


class PeakMemory:
    """Peak memory of a block above what was allocated before it, in MiB (NaN where it cannot be measured)."""

    def __init__(self, device: torch.device):
        self.device, self.mib, self.base = device, float("nan"), None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:  # hand freed heap memory back first, so that reuse does not hide growth; then reset VmHWM
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        else:
            self.mib = (_status_kib("VmHWM") - self.base) / 2 ** 10


def _deform_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _deform_backward_flop(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _deform_flop(x_shape, w_shape, out_shape=grad_shape)  # input and weight gradients


def _as_gpu_attention(name: str):
    """torch's table lacks the CPU's attention kernels, which compute what the GPU's flash kernels do."""
    from torch.utils.flop_counter import flop_registry

    def count(*args, **kwargs):
        return flop_registry[getattr(torch.ops.aten, name)](*args, **kwargs)
    count._get_raw = True  # the table's entries take tensors, not shapes
    return count


def count_gflop(fn) -> float:
    """GFLOP of ``fn()`` as torch.utils.flop_counter counts them (matmuls, convolutions, attention and their
    gradients), with torchvision's deformable convolution counted as the 3x3 convolution it computes and
    the CPU's attention kernels as the GPU's. Not counted: bilinear sampling and elementwise work."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.torchvision.deform_conv2d: _deform_flop,
        torch.ops.torchvision._deform_conv2d_backward: _deform_backward_flop,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            _as_gpu_attention("_scaled_dot_product_flash_attention"),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            _as_gpu_attention("_scaled_dot_product_flash_attention_backward"),
    })
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def crop_gflop(model) -> tuple[float, float]:
    """GFLOP ahiq performs for one reference crop's features and for one distorted crop scored against them
    (count_gflop; the same on any device)."""
    size = model.config["img_size"]
    dist, ref = torch.rand(2, 1, 3, size, size)
    with torch.no_grad():
        features = model.reference_features(ref)
        return (count_gflop(lambda: model.reference_features(ref)),
                count_gflop(lambda: model.score_with_reference(dist, features)))


# The machine's own matmul at ViT-B/8's shapes: the tokens of ten crops (10 x 785) through its qkv and its first
# MLP layer, the two largest matmuls of the network.
MATMUL_SHAPES = ((7850, 768, 2304), (7850, 768, 3072))


def matmul_gflops(dtype: torch.dtype, device: torch.device, fresh_output: bool = False, repeats: int = 5) -> float:
    """GFLOP/s of torch's own matmul at MATMUL_SHAPES in ``dtype``: the two shapes' operations over their fastest
    times (of ``repeats`` after a warm-up), into a preallocated output (the kernel's throughput), or with
    ``fresh_output`` into a new one each call, as ``a @ b`` does: glibc maps an output of this size (36 and 48 MB
    in bf16) afresh each time, and its page faults are paid inside the call."""
    flops, seconds = 0, 0.0
    generator = torch.Generator().manual_seed(0)
    for m, k, n in MATMUL_SHAPES:
        a = torch.randn(m, k, generator=generator).to(device, dtype)
        b = torch.randn(k, n, generator=generator).to(device, dtype)
        out = torch.empty(m, n, dtype=dtype, device=device)
        seconds += best_time((lambda: a @ b) if fresh_output else (lambda: torch.mm(a, b, out=out)), repeats, device)
        flops += 2 * m * k * n
    return flops / seconds / 1e9


class MatmulReference:
    """The machine's matmul (matmul_gflops) sampled during a run, in fp32 and bf16 (where native), before,
    between and after what it measures: a drifting machine is compared with itself at the same times. The
    kernel's throughput is the reference; each sample also prints torch's ``a @ b`` with its fresh output."""

    def __init__(self, device: torch.device, bf16: bool):
        self.device, self.dtypes = device, {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16 else {})}
        self.samples: dict[str, list[float]] = {name: [] for name in self.dtypes}

    def sample(self, when: str) -> None:
        found = {name: (matmul_gflops(dtype, self.device), matmul_gflops(dtype, self.device, fresh_output=True))
                 for name, dtype in self.dtypes.items()}
        for name, (kernel, _) in found.items():
            self.samples[name].append(kernel)
        print(f"# matmul at ViT-B/8's shapes, {when}: " + ", ".join(
            f"{k} {kernel:.0f} GFLOP/s ({fresh:.0f} as a @ b with a fresh output)" for k, (kernel, fresh) in found.items()),
            flush=True)

    def rate(self, precision: str) -> float:
        """The mean of the kernel's samples of ``precision`` ("fp32" or "bf16")."""
        return sum(self.samples[precision]) / len(self.samples[precision])


def report(case: str, n_ref: float, t_ref: float, n_ours: float, t_ours: float, diff: dict,
           mem_ref: PeakMemory, mem_ours: PeakMemory, extra: str = "", what: str = "max |diff|") -> dict:
    """One result: n pairs in t seconds for each path, the agreement (agreement()), the peak memory of each;
    printed as one line and returned as a row."""
    row = {"case": case, "reference_pairs_per_s": n_ref / t_ref, "ahiq_pairs_per_s": n_ours / t_ours,
           "speedup": (n_ours / t_ours) / (n_ref / t_ref), **diff, "peak_reference_mib": mem_ref.mib,
           "peak_ahiq_mib": mem_ours.mib}
    print(f"{case}: reference {row['reference_pairs_per_s']:.3f} pairs/s, ahiq {row['ahiq_pairs_per_s']:.3f} pairs/s, "
          f"speedup {row['speedup']:.2f}x, {agreement_text(diff, what)}, peak memory reference {mem_ref.mib:.0f} MiB, "
          f"ahiq {mem_ours.mib:.0f} MiB{extra}", flush=True)
    return row


def agreement(scores: dict, official, name: str) -> dict:
    """The agreement of the row ``name`` of ``scores`` (numpy arrays by row name): its largest difference from
    the official pattern's scores, and for a row other than fp32 also from ahiq's fp32 row."""
    found = {"max_diff": float(np.abs(scores[name] - official).max())}
    if name != "fp32" and "fp32" in scores:
        found["max_diff_vs_fp32"] = float(np.abs(scores[name] - scores["fp32"]).max())
    return found


def agreement_text(diff: dict, what: str = "max |diff|") -> str:
    if "max_diff" not in diff:
        return f"{what} not compared"
    text = f"{what} {diff['max_diff']:.2e}"
    return text + (f" (against ahiq fp32 {diff['max_diff_vs_fp32']:.2e})" if "max_diff_vs_fp32" in diff else "")
