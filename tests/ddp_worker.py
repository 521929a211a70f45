"""The worker of tests/test_autograd.py's DistributedDataParallel test, in a module of its own
so that the spawned processes import only this (not the test module's spec matrix)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cellspec.driver import compile_file
from cellspec.runtime.loader import load_package

DT = torch.float64
SPECS = Path(__file__).resolve().parent.parent / "specs"


def run(rank: int, world: int, init_method: str, backend: str, x, state: dict, result: str) -> None:
    """Process ``rank`` of ``world``: one SGD step of DDP(LSTM) on its part of the batch;
    rank 0 saves the resulting state_dict to ``result``. ``init_method``: the rendezvous (a
    ``file://`` path: no port to race other processes for)."""
    (cc,) = compile_file(str(SPECS / "lstm.cell"))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        model = load_package(cc.module_name, cc.files).torch_cell.LSTM(
            3, 2, backend=backend, dtype=DT
        )
        model.load_state_dict(state)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        part = x.chunk(world, dim=1)[rank]
        out, _ = ddp(part)
        out.square().mean().backward()
        opt.step()
        if rank == 0:
            torch.save(model.state_dict(), result)
    finally:
        dist.destroy_process_group()
