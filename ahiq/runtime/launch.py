"""``python -m ahiq launch``: torchrun (the same arguments, torch's own elastic agent), with two changes for
schedulers that stop jobs by a signal:

* A signal stop ends in one line per process, not in tracebacks. torchrun's agent answers SIGTERM by
  raising SignalException (a traceback) and reports its workers' exit 143 as a failure (another); here the
  agent still passes the signal to its workers and waits for them (``--shutdown-timeout``), and then each
  worker has said where its work is kept and the agent says that its node stopped.
* A node whose partner ended first (a failed worker there closes the rendezvous store) ends in one line too,
  not in the store client's C++ warnings and a RendezvousConnectionError traceback: the agent's own C++ log
  level is ERROR unless TORCH_CPP_LOG_LEVEL is set (its workers still get the user's environment).
* The workers' CPU threads: torchrun gives each of several workers one thread (``OMP_NUM_THREADS=1``);
  here, unless OMP_NUM_THREADS is set, the CPUs this agent may use are shared out among them (ahiq.runtime.threads).

The exit status is 128 + the signal's number after a signal stop, 1 after a failure, 0 otherwise.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import sys

from ahiq.runtime.threads import prepare_environment, usable_cpus

STOP_STATUSES = {128 + signal.SIGTERM, 128 + signal.SIGINT}


class _QuietStops(logging.Filter):
    """torch's own log lines about a signal and the failures it causes: this launcher says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("death signal" in text or "Got termination signal" in text or "failed (exitcode" in text
                    or "Closing process" in text or "Sending process" in text)


def main(argv: list[str]) -> int:
    quiet_cpp_log = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if quiet_cpp_log:  # read once, when torch loads
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run
    if quiet_cpp_log:
        del os.environ["TORCH_CPP_LOG_LEVEL"]

    args = get_args_parser().parse_args(argv)
    prepare_environment()
    if "OMP_NUM_THREADS" not in os.environ:
        cpus, _ = usable_cpus()
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // determine_local_world_size(args.nproc_per_node)))
    quiet = _QuietStops()
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.agent.server.local_elastic_agent"):
        logging.getLogger(name).addFilter(quiet)
    node = os.environ.get("SLURMD_NODENAME") or platform.node()
    try:
        run(args)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"ahiq launch on {node}: stopped by {name}; its workers kept their work and stopped", file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        if set(codes) <= STOP_STATUSES:
            print(f"ahiq launch on {node}: its workers stopped by a signal (exit {codes[0]}) and kept their work",
                  file=sys.stderr)
            return codes[0]
        print(f"ahiq launch on {node}: {len(exc.failures)} worker(s) failed (exit status {', '.join(map(str, codes))}); "
              f"their errors are printed above", file=sys.stderr)
        return 1
    except RendezvousError as exc:
        print(f"ahiq launch on {node}: lost the other nodes ({type(exc).__name__}): a node whose workers failed "
              f"ended first; its lines above say why", file=sys.stderr)
        return 1
    return 0
