"""This process's place in a torchrun job: no torch, so that scoring to a file (ahiq.scoring.output) needs none."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Job:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0
