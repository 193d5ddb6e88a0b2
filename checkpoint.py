"""Training checkpoints: written atomically, read safely, and what they hold to continue a run.

A checkpoint file is either complete or absent: it is written to a temporary file in the same folder,
flushed to disk, then renamed over the old one (a rename within a folder is atomic). A process killed while
writing, or a full disk, leaves the previous file untouched. Everything is stored as tensors, numbers,
strings and containers, so that `torch.load(weights_only=True)` reads it back.
"""
import errno
import logging
import os
import random
import shutil
import uuid

import numpy as np
import torch

import util
from commons import UserInputError

# Written in our checkpoints; the original benchmark's files have no "format" key
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# Atomic files

def _temporary_path(path):
    return f"{path}.{uuid.uuid4().hex}.partial"


def _fsync_folder(folder):
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_atomically(path, write):
    """Call write(file) on a temporary file next to `path`, fsync it, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserInputError(f"No space left on the disk while writing {path}; the previous file there (if "
                                 "any) is intact. Free some space and resume with --resume") from error
        raise
    _fsync_folder(folder)


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically."""
    _write_atomically(path, lambda file: torch.save(state, file))


def copy_checkpoint(source, path):
    """Copy a checkpoint file atomically."""
    with open(source, "rb") as source_file:
        _write_atomically(path, lambda file: shutil.copyfileobj(source_file, file))


def load_checkpoint(path, trusted=False):
    """The object saved in `path`, read with weights_only on the CPU (see util.read_checkpoint)."""
    return util.read_checkpoint(path, trusted=trusted)


# ----------------------------------------------------------------------------------------------------------
# Random generators

def capture_rng_states():
    """The states of Python's, NumPy's and torch's (CPU and CUDA) generators, as tensors and numbers."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss_next": python_gauss},
        "numpy": {"name": numpy_name, "keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                  "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states):
    """Set the generators to states from `capture_rng_states` (CUDA ones for the GPUs present)."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(x) for x in python["state"].tolist()), python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for device_index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device_index)


# ----------------------------------------------------------------------------------------------------------
# The training state

def training_state(*, model, optimizer, epoch_num, best_r5, not_improved_num, recalls, optim, mining,
                   mining_state, grad_scaler=None):
    """What last_model.pth and best_model.pth hold after epoch `epoch_num` (best R@5 and patience count
    already updated with its validation `recalls`). `model` is the bare model (no DDP wrapper), so the
    weights' names have no `module.` prefix."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch_num": int(epoch_num),
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "optim": optim,
        "recalls": {int(n): float(r) for n, r in recalls.items()},
        "best_r5": float(best_r5),
        "not_improved_num": int(not_improved_num),
        "rng_states": capture_rng_states(),
        "mining": mining,
        "mining_state": mining_state,
        "grad_scaler_state_dict": grad_scaler.state_dict() if grad_scaler is not None else None,
    }


def is_training_checkpoint(checkpoint):
    """Whether the file can continue a training run (ours, or the original's), not only give weights."""
    return isinstance(checkpoint, dict) and all(key in checkpoint for key in
                                                ("epoch_num", "optimizer_state_dict", "best_r5", "not_improved_num"))


def resume_point(checkpoint):
    """(first epoch to run, best R@5, epochs without improvement) to continue from a training checkpoint.

    Ours store the values after the epoch's validation. The original's store best R@5 and the patience count
    from before it, next to the epoch's recalls (R@5 second), so its update is replayed here.
    """
    best_r5 = float(checkpoint["best_r5"])
    not_improved_num = int(checkpoint["not_improved_num"])
    if checkpoint.get("format") is None and "recalls" in checkpoint:
        r5 = float(np.asarray(checkpoint["recalls"]).reshape(-1)[1])
        if r5 > best_r5:
            best_r5, not_improved_num = r5, 0
        else:
            not_improved_num += 1
    return int(checkpoint["epoch_num"]) + 1, best_r5, not_improved_num


def load_optimizer_state(optimizer, checkpoint, optim, source):
    """Load the checkpoint's optimizer state if it fits this optimizer; else keep a fresh one and say why."""
    saved_optim = checkpoint.get("optim")
    if saved_optim is not None and saved_optim != optim:
        logging.warning(f"{source} was trained with --optim {saved_optim}, this run uses --optim {optim}: "
                        "starting the optimizer afresh")
        return False
    try:
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    except (ValueError, KeyError) as error:
        logging.warning(f"The optimizer state of {source} does not fit this model's trainable parameters ({error}): "
                        "starting the optimizer afresh")
        return False
    return True
