"""The training batch (TorchRec ``Pipelineable``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """A batch of rows.

    Notation: B batch size, D number of dense features.

    Args:
        dense_features: float tensor of shape (B, D) (D may be 0).
        sparse_features: KeyedJaggedTensor of the sparse features, keys in declared order.
        labels: task name -> float tensor of shape (B,) with values in {0, 1}.
        sample_ids: int64 tensor of shape (B,): the global row index of each row in its split
            (shard row offset + row), so per-sample state (the EM task labels) stays aligned
            when the loader shuffles.
    """

    dense_features: torch.Tensor
    sparse_features: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]
    sample_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels={
                k: v.to(device=device, non_blocking=non_blocking) for k, v in self.labels.items()
            },
            sample_ids=self.sample_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        """Record every tensor on a CUDA stream (TrainPipelineSparseDist)."""
        self.dense_features.record_stream(stream)  # type: ignore[arg-type]
        self.sparse_features.record_stream(stream)  # type: ignore[arg-type]
        for v in self.labels.values():
            v.record_stream(stream)  # type: ignore[arg-type]
        self.sample_ids.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> Batch:
        """Pin every tensor's memory."""
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            sample_ids=self.sample_ids.pin_memory(),
        )

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return int(self.dense_features.shape[0])
