"""What every training recipe shares to optimise: the optimizer (--optim, --weight_decay), the learning-rate schedule
(--scheduler, --lr_milestones, --lr_gamma, --lr_end_factor, --lr_decay_steps, --warmup_steps) and the training step
that applies them; the step's count and the epoch are the schedule's whole state, so a resumed run continues with
the same learning rates."""
import logging

import torch

import network
from commons import UserInputError

# --optim: the constructor, and --weight_decay when not given (the original's SGD decays 0.001, its Adam none)
OPTIMIZERS = {
    "adam": (lambda groups, weight_decay: torch.optim.Adam(groups, weight_decay=weight_decay), 0.0),
    "adamw": (lambda groups, weight_decay: torch.optim.AdamW(groups, weight_decay=weight_decay), 0.01),
    "sgd": (lambda groups, weight_decay: torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay), 0.001),
}
SCHEDULERS = ("none", "multistep", "linear")


def trainable(module):
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def make_optimizer(args, model, trained_modules=()):
    """--optim over the trainable parameters of the model (in the aggregation's own groups if it has them: CRN)
    and of the recipe's `trained_modules`, (module, learning rate) pairs."""
    groups = network.optimizer_groups(model, args)
    if groups is None:
        groups = [{"params": trainable(model), "lr": args.lr}]
    elif args.optim != "sgd":
        logging.info(f"You're using {args.aggregation} with {args.optim}, it is advised to use SGD")
    groups += [{"params": trainable(module), "lr": lr} for module, lr in trained_modules]
    if args.optim not in OPTIMIZERS:
        raise UserInputError(f"Unknown --optim {args.optim}; valid names: {', '.join(OPTIMIZERS)}")
    constructor, default_weight_decay = OPTIMIZERS[args.optim]
    weight_decay = getattr(args, "weight_decay", None)
    return constructor(groups, default_weight_decay if weight_decay is None else weight_decay)


def schedule_factor(scheduler, step, epoch, warmup_steps=0, milestones=(), gamma=0.1, end_factor=1.0,
                    decay_steps=1):
    """The learning rate of `step` (counted from 0 over the whole run) in `epoch`, as a fraction of the base one:
    a linear warm-up to 1 over the first `warmup_steps` steps ((step + 1) / warmup_steps, as the authors of
    MixVPR and GSV-Cities do), times the schedule's factor: multistep, gamma to the number of `milestones` (epochs)
    reached; linear, from 1 to `end_factor` over `decay_steps` steps, then constant (SALAD's LinearLR)."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if scheduler == "multistep":
        factor *= gamma ** sum(epoch >= milestone for milestone in milestones)
    elif scheduler == "linear":
        factor *= 1.0 - (1.0 - end_factor) * min(step, decay_steps) / decay_steps
    return factor


class TrainingStep:
    """`step(loss)`: backward pass and optimizer step, with the loss scaling of float16 autocast when the
    GradScaler is enabled, every group's learning rate set first by the schedule. `epoch` is set by train.py."""

    def __init__(self, args, optimizer, grad_scaler):
        self.optimizer, self.grad_scaler = optimizer, grad_scaler
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.schedule = dict(scheduler=args.scheduler, warmup_steps=args.warmup_steps, milestones=args.lr_milestones,
                             gamma=args.lr_gamma, end_factor=args.lr_end_factor, decay_steps=args.lr_decay_steps)
        self.steps_done, self.epoch = 0, 0

    @property
    def lr_factor(self):
        return schedule_factor(step=self.steps_done, epoch=self.epoch, **self.schedule)

    def __call__(self, loss):
        factor = self.lr_factor
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        self.steps_done += 1

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = int(state.get("steps_done", 0))
