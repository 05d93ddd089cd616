"""Plain-data declarations of features and labels, shared by the loader and the model builders.

Nothing here imports torch. A :class:`FeatureSpec` is the single source from which both the
Arrow -> ``Batch`` parsing and the TorchRec ``EmbeddingBagConfig`` s are derived.

Shard layout (written by ``mptrec data convert`` / ``mptrec data synth``)::

    DIR/schema.json                    fields, labels, vocabulary sizes, row counts, sources
    DIR/train/part-00000.parquet ...   one folder per split
    DIR/valid/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Column types in the shards: sparse single-valued fields are ``int64`` ids in
``[0, vocab_size)``; multi-valued fields are ``list<int64>``; dense fields are ``float32``; label
columns are ``int8`` / ``int64`` (0/1, or raw codes mapped through ``positive_values``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureKind = Literal["sparse", "dense"]
OovPolicy = Literal["error", "hash", "clip"]


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    Args:
        name: feature name; also the TorchRec feature key and the table name suffix.
        column: Parquet column it is read from (defaults to ``name``).
        kind: ``"sparse"`` (ids looked up in an embedding table) or ``"dense"`` (a float).
        num_embeddings: vocabulary size (rows of the table); sparse only.
        embedding_dim: embedding width; sparse only.
        multivalent: the column is ``list<int64>`` (pooled with ``pooling``).
        pooling: ``"sum"`` or ``"mean"`` for the EmbeddingBag.
    """

    name: str
    column: str = ""
    kind: FeatureKind = "sparse"
    num_embeddings: int = 0
    embedding_dim: int = 0
    multivalent: bool = False
    pooling: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.name)
        if self.kind == "sparse" and (self.num_embeddings <= 0 or self.embedding_dim <= 0):
            raise ValueError(
                f"feature {self.name!r}: sparse features need num_embeddings > 0 and "
                f"embedding_dim > 0, got {self.num_embeddings} and {self.embedding_dim}"
            )


@dataclass(frozen=True)
class LabelSpec:
    """One binary label, read from a column.

    Args:
        name: task name (the key of ``Batch.labels``).
        column: Parquet column.
        positive_values: when empty the column must already hold 0/1; otherwise the label is
            1 where the column's value is in this set and 0 elsewhere (e.g. Ali-CCP field 301).
    """

    name: str
    column: str
    positive_values: tuple[int, ...] = ()
