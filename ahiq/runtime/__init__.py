"""How a run uses the machine: the device, bf16, TF32 and crops per pass (``device``; its main names are
offered here too: ``ahiq.runtime.Runtime``), CPU threads (``threads``), SIGTERM/SIGINT (``signals``),
torchrun's processes (``distributed``, ``launch``). Importing this package loads no torch."""
from ahiq.lazy import exports

__getattr__, __dir__ = exports(__name__, {name: "ahiq.runtime.device" for name in (
    "Runtime", "auto_bf16", "cpu_bf16", "native_bf16", "select_device", "set_tf32")})
