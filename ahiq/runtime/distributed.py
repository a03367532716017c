"""torchrun: this process's place in the job, its share of every global batch, and gathering results."""
from __future__ import annotations

import os

import torch

from ahiq.runtime.device import select_device
from ahiq.runtime.job import Job




def init_distributed(device_name: str, option: str = "train.device") -> tuple[Job, torch.device]:
    """Join the torchrun job described by the environment, if any, on the device ``device_name`` asks for
    (``auto``, ``cpu``, ``cuda``...; ``option`` names where it came from, for errors): returns this process's
    place and its device.

    The device decides the backend, not what the machine has: on CUDA each process takes the GPU of its
    LOCAL_RANK and nccl; on the CPU gloo, and no GPU is touched, so ``train.device=cpu`` runs under
    torchrun on a GPU machine too."""
    device = select_device(device_name, option)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Job(), device
    import torch.distributed as tdist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"process {local_rank} of this node has no GPU: the node has {torch.cuda.device_count()}; "
                             f"start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        if device.type == "cuda":
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
    return Job(tdist.get_rank(), world, local_rank), device


def rank_batches(n: int, batch_size: int, job: Job, generator: torch.Generator,
                 drop_last: bool = False) -> list[list[tuple[int, float]]]:
    """This process's share of every global batch of one epoch, as (index, weight) lists.

    The global order comes from ``generator`` alone; each global batch is cut into equal shares, a short
    share padded with weight-0 copies, so that the training does not depend on the number of processes.
    ``drop_last`` leaves out a last global batch smaller than ``batch_size`` (the official loader does).
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = []
    for start in range(0, n - batch_size + 1 if drop_last else n, batch_size):
        chunk = order[start:start + batch_size]
        share = -(-len(chunk) // job.world)
        mine = chunk[job.rank * share:(job.rank + 1) * share]
        batches.append([(i, 1.0) for i in mine] + [(chunk[0], 0.0)] * (share - len(mine)))
    return batches


class Weighted(torch.utils.data.Dataset):
    """Items (index, weight) -> the dataset's sample and the weight."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, weight = item
        return (*self.dataset[index], torch.tensor(weight))


def gather_object(value, job: Job) -> list:
    """``value`` of every process, in rank order (on every process)."""
    if job.world == 1:
        return [value]
    import torch.distributed as tdist

    gathered: list = [None] * job.world
    tdist.all_gather_object(gathered, value)
    return gathered


def destroy(job: Job) -> None:
    if job.world > 1:
        import torch.distributed as tdist

        tdist.destroy_process_group()
