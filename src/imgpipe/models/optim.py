"""What training updates and how: the optimizer and the learning-rate schedule, by name.

Plain ``torch.optim`` classes only, so their ``state_dict`` is the whole state and resume
is bit-exact (timm's schedulers step and save differently). The schedule steps once per
epoch, after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("adadelta", "sgd", "adamw")
SCHEDULERS = ("step", "cosine", "none")


@dataclass(frozen=True)
class Trainable:
    """What training updates: the model, its optimizer and the learning-rate schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def make_optimizer(
    name: str,
    params,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """``adadelta`` (the seed's), ``sgd`` (``momentum``, ``nesterov``) or ``adamw``; every
    one with ``weight_decay`` (AdamW's decoupled, the others' L2)."""
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (one of {', '.join(OPTIMIZERS)})")


def cosine_factor(epoch: int, epochs: int, warmup_epochs: int) -> float:
    """The lr multiplier for the epoch after ``epoch`` completed ones: linear warm-up over
    ``warmup_epochs`` (1/(w+1), 2/(w+1), ...), then half a cosine from 1 down to 0 at
    ``epochs``."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, epochs - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    gamma: float = 0.7,
    epochs: int = 1,
    warmup_epochs: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``step`` (the seed's: times ``gamma`` every epoch), ``cosine`` (after
    ``warmup_epochs`` of linear warm-up, down to 0 at ``epochs``) or ``none``."""
    lr_scheduler = torch.optim.lr_scheduler
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    if name == "cosine":
        # A plain function: LambdaLR saves its step count, and the factor follows from it.
        return lr_scheduler.LambdaLR(
            optimizer, lambda epoch: cosine_factor(epoch, epochs, warmup_epochs)
        )
    if name == "none":
        return lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise ValueError(f"unknown scheduler {name!r} (one of {', '.join(SCHEDULERS)})")
