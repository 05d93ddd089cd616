"""TorchRec's fused EBC runs forward and backward under 2 gloo processes, table-wise."""

from __future__ import annotations

import pytest

from tests.dist import run_multiprocess


def _fused_ebc_step(rank: int, world_size: int) -> list[float]:
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50,
                                 feature_names=[f"f{i}"]) for i in range(4)]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": 0.1})
    constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device="cpu"), constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    model = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                     device=torch.device("cpu"), plan=plan, sharders=sharders)
    g = torch.Generator().manual_seed(rank)
    losses = []
    lengths = torch.ones(4 * 8, dtype=torch.int32)
    values = torch.randint(0, 50, (32,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f{i}" for i in range(4)],
                                              values=values, lengths=lengths)
    for _ in range(3):
        kt = model(kjt)
        d = kt.to_dict()
        assert sorted(d) == [f"f{i}" for i in range(4)]
        out = torch.cat([d[f"f{i}"] for i in range(4)], dim=1)
        assert out.shape == (8, 32)
        loss = out.pow(2).sum()
        loss.backward()
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_fused_ebc_table_wise_two_gloo_processes() -> None:
    results = run_multiprocess(_fused_ebc_step, 2)
    for losses in results:
        # the fused Adagrad update happens inside backward: the same batch's loss must fall
        assert losses[0] > losses[1] > losses[2], losses
