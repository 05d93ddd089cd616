"""Plain-data hyper-parameters of the model architectures (no torch objects).

Loaded from the ``[model]`` table of a run config by ``mptrec.pipeline.config``; turned into
modules only by the ``build_*`` functions in :mod:`mptrec.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelName = str  # a key of mptrec.models.MODELS
Variant = Literal["full", "share", "specific", "no_gan"]
GrlSchedule = Literal["dann", "official", "constant"]
Adversarial = Literal["grl", "confusion"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (spec sections 1 and 7).

    Args:
        name: registered model name (``mptrec``, ``single_task``, ``shared_bottom``, ``mmoe``,
            ``ple``).
        expert_hidden: expert MLP sizes; the last one is the representation width H.
        expert_dropout: dropout after each expert layer (empty: none; Ali-CCP uses (0.1, 0.3)).
        tower_hidden: tower MLP hidden sizes; the tower ends in one logit.
        variant: MPT-Rec ablation: ``full``, ``share`` (shared expert only), ``specific`` (no
            shared path in the fusion), ``no_gan`` (no task classifier loss).
        gan_weight: lambda, weight of the task-classifier (GAN) loss.
        aux_weight: beta, weight of the shared-expert auxiliary loss.
        grl_schedule: ``dann`` (monotone 2/(1+exp(-10p))-1), ``official`` (the authors'
            saw-tooth, p computed with the batch size in place of steps per epoch), ``constant``.
        grl_alpha: alpha for the ``constant`` schedule.
        adversarial: how the shared expert plays against the task classifier (Eq. 4).
            ``grl`` (the paper's code): gradient reversal, the shared expert *maximises* the
            classifier's NLL, which is unbounded (it can grow without limit by scaling ``h^s``).
            ``confusion`` (a bounded deviation from the paper): the classifier minimises its NLL
            on ``h^s`` (detached), and the shared expert minimises the cross-entropy of the
            (frozen) classifier's output against the uniform distribution over tasks, whose
            minimum (``log K``) is reached when ``h^s`` carries no task information (domain
            confusion, Tzeng et al. 2015); weight ``gan_weight * alpha``.
        tau: temperature of the new-task transfer weights (Eq. 11).
        clustering_interval: epochs between EM task re-assignments (Eq. 5); 0 disables EM.
        r_emb: L2 weight on embedding tables (see the README for the fused-kernel deviation).
        r_emb_rows: 0: ``r_emb`` as given. N > 0: ``r_emb`` is the weight at N training rows and a
            run on n rows uses ``r_emb * N / n``, so the term keeps the same strength against the
            summed log-likelihood at any data size (a fixed Gaussian prior; the loss is a mean).
        r_dnn: L2 weight on expert and tower weight matrices.
        num_experts: MMoE experts.
        ple_levels: PLE extraction levels.
        ple_shared_experts: PLE shared experts per level.
        ple_specific_experts: PLE task-specific experts per task and level.
        ple_expert_hidden: PLE expert MLP sizes.
        ple_expert_dropout: dropout after each PLE expert layer (empty: none; else one entry per
            ``ple_expert_hidden`` layer).
        interaction: ``none`` (the paper). ``cross`` (MPT-Rec only, beyond the paper): the experts
            read ``x = e * (W e + b) + e``, one DCN-v2 cross layer (Wang et al. 2021) that gives
            them every pairwise product of the input's entries; ``W``, ``b`` start at zero (the
            layer starts as the identity) and ``W`` is in the dense L2. The gates and new-task
            heads still read ``e``.
    """

    name: ModelName = "mptrec"
    expert_hidden: tuple[int, ...] = (256, 128)
    expert_dropout: tuple[float, ...] = ()
    tower_hidden: tuple[int, ...] = (64, 32)
    variant: Variant = "full"
    gan_weight: float = 0.1
    aux_weight: float = 0.9
    grl_schedule: GrlSchedule = "dann"
    grl_alpha: float = 1.0
    adversarial: Adversarial = "grl"
    tau: float = 150.0
    clustering_interval: int = 2
    r_emb: float = 0.0
    r_emb_rows: int = 0
    r_dnn: float = 0.0
    num_experts: int = 3
    ple_levels: int = 2
    ple_shared_experts: int = 1
    ple_specific_experts: int = 1
    ple_expert_hidden: tuple[int, ...] = (256,)
    ple_expert_dropout: tuple[float, ...] = ()
    interaction: str = "none"

    def effective_r_emb(self, train_rows: int) -> float:
        """The whole-table L2 weight for a run on ``train_rows`` rows (see ``r_emb_rows``).

        >>> ModelConfig(r_emb=3e-5, r_emb_rows=800_000).effective_r_emb(3_200_000)
        7.5e-06
        >>> ModelConfig(r_emb=3e-5).effective_r_emb(3_200_000)
        3e-05
        """
        if self.r_emb_rows == 0 or self.r_emb == 0:
            return self.r_emb
        if train_rows < 1:
            raise ValueError(f"model.r_emb_rows = {self.r_emb_rows} needs the training row count, "
                             f"got {train_rows}")
        return self.r_emb * self.r_emb_rows / train_rows

    def __post_init__(self) -> None:
        if not self.expert_hidden or any(h <= 0 for h in self.expert_hidden):
            raise ValueError(f"expert_hidden must be non-empty positive sizes, got {self.expert_hidden}")
        if self.expert_dropout and len(self.expert_dropout) != len(self.expert_hidden):
            raise ValueError(
                f"expert_dropout {self.expert_dropout} must have one entry per expert layer "
                f"{self.expert_hidden} (or be empty)"
            )
        if any(not 0.0 <= p < 1.0 for p in self.expert_dropout):
            raise ValueError(f"expert_dropout values must be in [0, 1), got {self.expert_dropout}")
        if any(h <= 0 for h in self.tower_hidden):
            raise ValueError(f"tower_hidden must be positive sizes, got {self.tower_hidden}")
        if not self.ple_expert_hidden or any(h <= 0 for h in self.ple_expert_hidden):
            raise ValueError(
                f"ple_expert_hidden must be non-empty positive sizes, got {self.ple_expert_hidden}"
            )
        if self.ple_expert_dropout and len(self.ple_expert_dropout) != len(self.ple_expert_hidden):
            raise ValueError(
                f"ple_expert_dropout {self.ple_expert_dropout} must have one entry per PLE expert "
                f"layer {self.ple_expert_hidden} (or be empty)"
            )
        if any(not 0.0 <= p < 1.0 for p in self.ple_expert_dropout):
            raise ValueError(f"ple_expert_dropout values must be in [0, 1), got {self.ple_expert_dropout}")
        if self.interaction not in ("none", "cross"):
            raise ValueError(f"interaction must be 'none' or 'cross', got {self.interaction!r}")
        if self.interaction != "none" and self.name != "mptrec":
            raise ValueError(f"interaction = {self.interaction!r} is implemented for the mptrec model only, "
                             f"not {self.name!r}")
        if self.grl_alpha < 0:
            raise ValueError(f"grl_alpha must be >= 0, got {self.grl_alpha}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.clustering_interval < 0:
            raise ValueError(f"clustering_interval must be >= 0, got {self.clustering_interval}")
        for key in ("gan_weight", "aux_weight", "r_emb", "r_dnn", "r_emb_rows"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for key in ("num_experts", "ple_levels", "ple_shared_experts", "ple_specific_experts"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    @property
    def hidden_dim(self) -> int:
        """H, the representation width (last expert size)."""
        return self.expert_hidden[-1]
