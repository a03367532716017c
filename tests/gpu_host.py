"""train.py on a simulated GPU host, for tests/test_distributed.py: CUDA is reported available with two
GPUs, and anything that would create a CUDA context (torch.cuda._lazy_init and CUDA's initialisation, which
every use of a GPU goes through) fails naming where it was called from.

    python tests/gpu_host.py --opt options/demo.yaml train.device=cpu [key.path=value ...]   (also under torchrun)
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def touched(*args, **kwargs):
    raise RuntimeError("a CPU run touched CUDA:\n" + "".join(traceback.format_stack(limit=12)[:-1]))


# torch.cuda's submodules hold their own references to these (torch.cuda.random: from . import device_count,
# _lazy_init): every one is replaced, and CUDA's initialisation itself, which any path ends in.
for name, module in list(sys.modules.items()):
    if name == "torch.cuda" or name.startswith("torch.cuda."):
        for attribute, stand_in in (("is_available", lambda: True), ("device_count", lambda: 2), ("_lazy_init", touched)):
            if hasattr(module, attribute):
                setattr(module, attribute, stand_in)
torch._C._cuda_init = touched

from ahiq.cli import run  # noqa: E402
from ahiq.engine.training import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("train.py on a simulated GPU host", train, sys.argv[1:] + ["--debug"]))
