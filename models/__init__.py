"""mptrec.models: single-device multi-task rankers (MPT-Rec and baselines) on a TorchRec EBC.

Public API (see notes/CONTRACTS.md "Model API"): :data:`MODELS`, :func:`register_model`,
:func:`build_model`, :class:`MultiTaskModel`, :class:`ModelOutput`, :class:`NewTaskHead`,
:class:`NewTaskModel`, :func:`em_assign`, :func:`grl_alpha`, :func:`count_parameters`,
:func:`forward_flops_per_sample`.
"""

from mptrec.models.accounting import count_parameters, forward_flops_per_sample
from mptrec.models.base import ModelOutput, MultiTaskModel, NewTaskHead, em_assign
from mptrec.models.baselines import MMoE, MMoEHead, SharedBottom, SingleTask, SingleTaskHead, TowerHead
from mptrec.models.config import ModelConfig
from mptrec.models.layers import StackedMLP, grad_reverse, grl_alpha
from mptrec.models.mptrec import MPTRec, MPTRecNewTaskHead
from mptrec.models.new_task import NewTaskModel, freeze
from mptrec.models.ple import PLE, PLEHead
from mptrec.models.registry import MODELS, ModelBuilder, build_model, register_model

__all__ = [
    "MODELS",
    "PLE",
    "MMoE",
    "MMoEHead",
    "MPTRec",
    "MPTRecNewTaskHead",
    "ModelBuilder",
    "ModelConfig",
    "ModelOutput",
    "MultiTaskModel",
    "NewTaskHead",
    "PLEHead",
    "NewTaskModel",
    "SharedBottom",
    "SingleTask",
    "SingleTaskHead",
    "StackedMLP",
    "TowerHead",
    "build_model",
    "count_parameters",
    "em_assign",
    "forward_flops_per_sample",
    "freeze",
    "grad_reverse",
    "grl_alpha",
    "register_model",
]
