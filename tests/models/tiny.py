"""Tiny CPU EBC, batches and configs for the model tests (no data files)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from mptrec.models import ModelConfig, MultiTaskModel, build_model

# name -> (vocab, multivalent)
FEATURES: dict[str, tuple[int, bool]] = {"a": (11, False), "b": (7, False), "c": (5, True)}
SPARSE = list(FEATURES)
DENSE_DIM = 3
DIM = 4
TASKS = ["ctr", "cvr"]

# every model config the suite exercises: id -> (ModelConfig.name, overrides)
MODEL_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mptrec": ("mptrec", {}),
    "mptrec_share": ("mptrec", {"variant": "share"}),
    "mptrec_specific": ("mptrec", {"variant": "specific"}),
    "mptrec_no_gan": ("mptrec", {"variant": "no_gan"}),
    "mptrec_cross": ("mptrec", {"interaction": "cross"}),
    "single_task": ("single_task", {}),
    "shared_bottom": ("shared_bottom", {}),
    "mmoe": ("mmoe", {}),
    "ple": ("ple", {}),
    "ple_wide": ("ple", {"ple_levels": 3, "ple_shared_experts": 2, "ple_specific_experts": 2,
                         "ple_expert_hidden": (12, 8), "ple_expert_dropout": (0.1, 0.0)}),
}

# the new-task methods of each base model
METHODS: dict[str, tuple[str, ...]] = {
    "mptrec": ("mptrec", "fw", "tes"),
    "single_task": ("single_task",),
    "shared_bottom": ("shared_bottom*",),
    "mmoe": ("mmoe*",),
    "ple": ("ple*",),
}


def tiny_ebc(device: str = "cpu", order: list[str] | None = None) -> EmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=DIM, num_embeddings=FEATURES[f][0],
                                 feature_names=[f]) for f in (order or SPARSE)]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def tiny_config(name: str, **overrides: Any) -> ModelConfig:
    base = ModelConfig(name=name, expert_hidden=(32, 16), tower_hidden=(8,), ple_expert_hidden=(16,))
    return dataclasses.replace(base, **overrides)


def tiny_model(case: str = "mptrec", *, ebc_order: list[str] | None = None, tasks: list[str] | None = None,
               **overrides: Any) -> MultiTaskModel:
    name, case_overrides = MODEL_CASES[case]
    cfg = tiny_config(name, **{**case_overrides, **overrides})
    return build_model(cfg, tiny_ebc(order=ebc_order), sparse_features=SPARSE, dense_dim=DENSE_DIM,
                       task_names=tasks or TASKS)


def tiny_batch(n: int, seed: int = 0, tasks: list[str] | None = None
               ) -> tuple[torch.Tensor, KeyedJaggedTensor, dict[str, torch.Tensor]]:
    """n rows: dense (n, 3), KJT over a, b, c (c multivalent, lengths 0..2), random 0/1 labels."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, DENSE_DIM, generator=g)
    lengths, values = [], []
    for vocab, multi in FEATURES.values():
        ln = torch.randint(0, 3, (n,), generator=g) if multi else torch.ones(n, dtype=torch.long)
        lengths.append(ln)
        values.append(torch.randint(0, vocab, (int(ln.sum()),), generator=g))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=SPARSE, values=torch.cat(values),
                                              lengths=torch.cat(lengths).to(torch.int32))
    labels = {t: torch.randint(0, 2, (n,), generator=g).float() for t in (tasks or TASKS)}
    return dense, kjt, labels


def state_bytes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
