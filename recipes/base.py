"""What every training recipe provides to train.py, and the pieces recipes share.

A recipe is made once per run with make(args, world, device, amp_dtype) and then gives:
  images_dataset          training images (items (tensor, index)) for the aggregation's initialisation
  trained_modules()       (module, learning rate) pairs it trains beside the model (e.g. classifiers)
  train_epoch(model, raw_model, step, epoch_num) -> EpochSummary
                          `model` may be wrapped by DistributedDataParallel, `raw_model` never is; `step(loss)`
                          is the optimisation step (optimization.TrainingStep: backward, schedule, optimizer)
  state_dict() / load_state_dict(state)
                          what a checkpoint keeps to continue the run exactly (sampler position, classifiers)
train.py owns everything else: the model, the optimizer and schedule, validation, checkpoints, patience and the
final test.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from model.parts import Option


@dataclass(frozen=True)
class RecipeEntry:
    """One --recipe: how to make it, its own options (argparse flags), a check of the flags (by the parser) and
    one of the flags with the processes (by train.py, before it writes anything)."""
    make: Callable
    options: Tuple[Option, ...] = ()
    check: Optional[Callable] = None  # args -> error message or None
    run_check: Optional[Callable] = None  # (args, world) -> error message or None


def shared_batch_error(flag, value, world):
    """The message when a batch of --`flag` `value` does not split evenly among the processes, else None."""
    if value % world.world_size:
        return (f"--{flag} {value} must be a multiple of the number of processes ({world.world_size}), which share "
                "each batch")
    return None


@dataclass
class EpochSummary:
    """The mean loss of an epoch's batches, their number, and what results.json keeps of the epoch."""
    loss: float
    batches_num: int
    details: list = field(default_factory=list)


class LossMeter:
    """Sum of batch losses kept on the device (no .item() per batch: it would wait for the GPU every time)."""

    def __init__(self, device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.batches_num = 0
        self.last = torch.zeros(())

    def add(self, loss):
        self.sum += loss.detach()
        self.batches_num += 1
        self.last = loss.detach()

    @property
    def mean(self):
        return self.sum.item() / max(self.batches_num, 1)
