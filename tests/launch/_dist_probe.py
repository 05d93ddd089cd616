"""Run under torchrun by tests/launch: init_distributed, one all_reduce, report, teardown.

argv: DEVICE [fail-rank N [init|barrier]]. With ``fail-rank N`` rank N raises, either before
creating the process group (``init``: the others wait for it in the rendezvous store) or after it
(``barrier``, the default: the others wait in a barrier). The failure-behaviour check: the job
must end with rank N's error, not hang.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from mptrec.launch.dist import init_distributed, teardown


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    fail_rank = int(argv[2]) if len(argv) >= 3 and argv[1] == "fail-rank" else -1
    stage = argv[3] if len(argv) == 4 else "barrier"
    if stage == "init" and int(os.environ["RANK"]) == fail_rank:
        raise RuntimeError(f"probe failure on rank {fail_rank} before init")
    device, rank, world_size = init_distributed(argv[0])
    try:
        if fail_rank >= 0:
            if rank == fail_rank:
                raise RuntimeError(f"probe failure on rank {rank}")
            dist.barrier()  # would wait for the dead rank without torchrun's monitor
        t = torch.tensor([rank + 1.0], device=device)
        dist.all_reduce(t)
        print("PROBE " + json.dumps({
            "rank": rank, "world_size": world_size, "device": str(device),
            "backend": dist.get_backend(), "sum": t.item(),
        }), flush=True)
    finally:
        teardown()
    print(f"PROBE_TORN_DOWN {rank} {dist.is_initialized()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
