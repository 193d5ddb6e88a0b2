"""Checkpoint files: written atomically, read safely, fitted onto a model (our layout, the original's, released
ones), and what our training checkpoints hold to continue a run.

A checkpoint file is either complete or absent (commons.write_atomically): a process killed while writing, or a
full disk, leaves the previous file untouched. Everything is stored as tensors, numbers, strings and containers,
so that `torch.load(weights_only=True)` reads it back; reading never runs code from a file unless the user says
it is trusted (--trust_checkpoint).
"""
import collections
import functools
import logging
import os
import pickle
import random
import shutil
import types
import warnings

import numpy as np
import torch

from commons import UserInputError, write_atomically

# Written in our checkpoints; the original benchmark's files have no "format" key
CHECKPOINT_FORMAT = 1


class CheckpointError(UserInputError):
    """A checkpoint file that is missing, unreadable, unsafe to unpickle, or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Writing

def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically."""
    write_atomically(path, lambda file: torch.save(state, file))


def copy_checkpoint(source, path):
    """Copy a checkpoint file atomically."""
    with open(source, "rb") as source_file:
        write_atomically(path, lambda file: shutil.copyfileobj(source_file, file))


# ----------------------------------------------------------------------------------------------------------
# Reading

def _numpy_safe_globals():
    """NumPy arrays, scalars and dtypes, which the original's checkpoints hold (recalls, best R@5).
    Rebuilding them runs no code of the file's choosing, so they are allowed in weights_only loading.
    Both module paths are listed: files written with NumPy 1.x name `numpy.core`, NumPy 2 `numpy._core`.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    safe = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        safe += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    # Each dtype has its own class (numpy.dtypes.Float64DType...), named when a dtype is pickled
    for type_code in np.typecodes["All"]:
        dtype_class = type(np.dtype(type_code))
        if dtype_class is not np.dtype:
            safe.append(dtype_class)
    return safe


# What torch's weights_only unpickler says when a file names classes or functions it does not allow
# (as opposed to bytes that are not a pickle at all: "Unsupported operand", EOF...)
_NEEDS_CODE_MARKERS = ("Unsupported global", "Trying to load unsupported GLOBAL", "Can only create new object",
                       "Trying to call reduce", "Can only build")


def _is_weights_only_refusal(error):
    """True when weights_only loading failed because the file needs code to unpickle."""
    message = str(error)
    return isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in message and \
        any(marker in message for marker in _NEEDS_CODE_MARKERS)


def _refusal_reason(error):
    """One line about a loading error; for torch's weights_only refusal, the 'Unsupported global: ...' part
    without its advice."""
    message = str(error).split("WeightsUnpickler error:", 1)[-1].strip() or str(error)
    return f"{type(error).__name__}: " + message.split(". Please use")[0].splitlines()[0].strip()


def _load_weights_only(path):
    with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
        # torch warns about pickle protocols it may not read; a failure is handled by the callers
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path, trusted=False):
    """torch.load a file safely (weights_only, on the CPU) with clear errors; a .safetensors file is read as one.

    A file that needs arbitrary code to unpickle (objects other than tensors, containers, numbers,
    strings and NumPy arrays) is refused, unless `trusted` (the --trust_checkpoint flag).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (an interrupted download or copy?); fetch it again")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        return _load_weights_only(path)
    except Exception as error:
        if trusted:  # full unpickling below also reads pickle features weights_only does not support
            first_error = error
        elif _is_weights_only_refusal(error):
            raise CheckpointError(
                f"{path} holds Python objects that need arbitrary code to unpickle "
                f"({_refusal_reason(error)}), so it is not loaded: a malicious file could run code. "
                "If you trust where the file comes from, pass --trust_checkpoint to load it anyway") from error
        else:
            raise CheckpointError(f"Cannot read {path} as a PyTorch checkpoint: it is truncated, corrupted or "
                                  f"not a checkpoint ({_refusal_reason(error)}); if it was downloaded, delete it "
                                  "to download it again") from error
    logging.warning(f"Loading {path} with full unpickling (--trust_checkpoint): {_refusal_reason(first_error)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"Cannot read {path} as a PyTorch checkpoint: it is truncated, corrupted or not a "
                              f"checkpoint ({_refusal_reason(error)})") from error


def extract_state_dict(checkpoint, source):
    """The model weights of a loaded checkpoint: the object itself, or under `model_state_dict` or
    `state_dict`; a `module.` prefix (DataParallel / DistributedDataParallel) is removed.
    """
    if isinstance(checkpoint, dict):
        for key in ("model_state_dict", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint or \
            not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointError(f"{source} does not hold a model state dict (a dict of tensors, possibly under "
                              "'model_state_dict' or 'state_dict')")
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = collections.OrderedDict((key[len("module."):], value) for key, value in checkpoint.items())
    return checkpoint


def load_safetensors(path):
    """The tensors of a safetensors file (a flat name -> tensor map: no pickle, nothing to trust)."""
    from safetensors.torch import load_file  # imported here: only MegaLoc's file needs it
    try:
        return collections.OrderedDict(load_file(path, device="cpu"))
    except Exception as error:
        raise CheckpointError(f"Cannot read {path} as a safetensors file: it is truncated, corrupted or not one "
                              f"({type(error).__name__}: {error}); if it was downloaded, delete it to download it "
                              "again") from error


def load_state_dict_file(path, trusted=False):
    """Read a checkpoint file and return the model's state dict from it
    (see load_checkpoint and extract_state_dict)."""
    return extract_state_dict(load_checkpoint(path, trusted=trusted), path)


# ----------------------------------------------------------------------------------------------------------
# Loading weights into a model

def registered_hints(missing, unexpected):
    """Flag fixes guessed from which keys differ, by every registered part's hints."""
    from model.aggregations import AGGREGATIONS
    from model.backbones import BACKBONES
    entries = list(BACKBONES.values()) + list(AGGREGATIONS.values())
    hint_functions = {entry.hints for entry in entries if entry.hints is not None}
    return [hint for hints in sorted(hint_functions, key=lambda f: f.__qualname__)
            for hint in hints(missing, unexpected)]


def describe_state_dict_mismatch(model_state_dict, state_dict, hints=None, file_names=None):
    """None if `state_dict` fits `model_state_dict` exactly (same keys and shapes), else a message; `hints`
    (missing, unexpected) -> flag fixes (default: every registered part's); `file_names` {key: its name in the
    file} for a state dict mapped from another layout, so that the message names the file's keys."""
    missing = [key for key in model_state_dict if key not in state_dict]
    unexpected = [key for key in state_dict if key not in model_state_dict]
    wrong_shapes = [key for key in model_state_dict
                    if key in state_dict and tuple(state_dict[key].shape) != tuple(model_state_dict[key].shape)]
    if not (missing or unexpected or wrong_shapes):
        return None
    parts = []
    if wrong_shapes:
        key = wrong_shapes[0]
        parts.append(f"first layer with a different shape: {key} is {list(state_dict[key].shape)} in the "
                     f"checkpoint, {list(model_state_dict[key].shape)} in the model "
                     f"({len(wrong_shapes)} layers differ in shape)")
    if missing:
        parts.append(f"{len(missing)} keys of the model are missing from the checkpoint, the first: "
                     f"{', '.join(missing[:5])}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the checkpoint are not in the model, the first: "
                     f"{', '.join((file_names or {}).get(key, key) for key in unexpected[:5])}")
    fixes = (hints or registered_hints)(missing, unexpected)
    if fixes:
        parts.append("hint: " + "; ".join(fixes))
    return "; ".join(parts)


def renamed_key(key, layout):
    """A file's key under a model.parts.KeyLayout: the first rename whose prefix starts it applies; None when the
    layout drops it."""
    if any(key.startswith(prefix) for prefix in layout.dropped):
        return None
    prefix = next((old for old, _ in layout.renames if key.startswith(old)), None)
    return key if prefix is None else dict(layout.renames)[prefix] + key[len(prefix):]


def apply_key_layout(state_dict, layout, model_state_dict):
    """`state_dict` renamed by a model.parts.KeyLayout (renamed_key), and our optional keys the file lacks with
    the model's values."""
    mapped = collections.OrderedDict((renamed_key(key, layout), value) for key, value in state_dict.items()
                                     if renamed_key(key, layout) is not None)
    for key, value in model_state_dict.items():
        if key not in mapped and any(key.startswith(prefix) for prefix in layout.optional):
            mapped[key] = value
    return mapped


def combine_key_layouts(*layouts):
    """One KeyLayout from those of a model's parts (None for a part in our own layout); BatchNorm's
    num_batches_tracked counters are always optional (files written without them load)."""
    from model.parts import KeyLayout
    layouts = [layout for layout in layouts if layout is not None]
    return KeyLayout(" + ".join(layout.name for layout in layouts) or "ours",
                     tuple(rename for layout in layouts for rename in layout.renames),
                     tuple(prefix for layout in layouts for prefix in layout.dropped),
                     tuple(prefix for layout in layouts for prefix in layout.optional))


def _counters_filled(state_dict, model_state_dict):
    filled = collections.OrderedDict(state_dict)
    for key, value in model_state_dict.items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = value
    return filled


def fit_key_layouts(model_state_dict, state_dict, layouts, source, hints=None):
    """`state_dict` mapped by the first of `layouts` under which it fits the model exactly (same keys and shapes);
    if none does, a CheckpointError naming what did not fit under the closest layout (fewest keys astray)."""
    best = None
    for layout in layouts:
        mapped = _counters_filled(apply_key_layout(state_dict, layout, model_state_dict), model_state_dict)
        file_names = {renamed_key(key, layout): key for key in state_dict}
        mismatch = describe_state_dict_mismatch(model_state_dict, mapped, hints, file_names)
        if mismatch is None:
            if layout.renames or layout.dropped or layout.optional:
                logging.info(f"{source} is in the {layout.name} layout: mapped onto the model")
            return mapped
        astray = len(set(mapped) ^ set(model_state_dict))
        if best is None or astray < best[0]:
            best = (astray, layout, mismatch)
    _, layout, mismatch = best
    in_layout = f" (read in the {layout.name} layout)" if layout.name != "ours" else ""
    raise CheckpointError(f"{source} does not fit the model built from your flags{in_layout}: {mismatch}")


def load_model_weights(model, state_dict, source="the checkpoint"):
    """Load `state_dict` into `model` strictly; on any mismatch raise CheckpointError naming the first
    mismatching layer with both shapes and the missing / unexpected keys, and suggesting flags.
    """
    mismatch = describe_state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch is not None:
        raise CheckpointError(f"{source} does not fit the model built from your flags: {mismatch}")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Off-the-shelf files: extra objects read inertly, tensors mapped in order

class _InertObject:
    """Stands in for any class or function a pickle names that is not a tensor or a container:
    it accepts any arguments and state, and does nothing (so no code of the file's choosing runs)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


@functools.lru_cache(maxsize=None)
def _inert_allowed_globals():
    allowed = {"collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[f"torch.{name}"] = getattr(torch, name)
    return allowed


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _inert_allowed_globals().get(f"{module}.{name}", _InertObject)


# A pickle "module" for torch.load(pickle_module=...): torch resolves tensor storages itself and asks us
# for every other global; we hand out only tensor-rebuilding functions and OrderedDict.
_inert_pickle = types.SimpleNamespace(__name__="inert_pickle", Unpickler=_InertUnpickler,
                                      load=lambda file, **kwargs: _InertUnpickler(file, **kwargs).load())


def read_checkpoint_with_inert_objects(path):
    """Read a checkpoint whose extra objects we do not need, without running code from it.

    Naver's checkpoints also pickle a scikit-learn PCA under its old module path
    (sklearn.decomposition.pca), which weights_only loading refuses and current scikit-learn cannot
    import (the original patched sys.modules and unpickled everything). Here every such object becomes
    an inert placeholder and the tensors load normally; only the state dict is used.
    """
    try:
        return _load_weights_only(path)
    except Exception:
        pass  # objects (or pickle instructions) that weights_only loading does not accept: read below
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle)
    except Exception as error:
        raise CheckpointError(f"Cannot read {path}: it is truncated, corrupted or not a checkpoint "
                              f"({_refusal_reason(error)}); delete it to download it again") from error


def map_state_dict_in_order(model_state_dict, source_state_dict, source):
    """Rename the source's tensors to our keys, pairing them in order (the original's mapping), and check
    every pair's shape. Files written before BatchNorm had `num_batches_tracked` may lack those entries:
    then our other keys are paired in order and our counters are kept.
    """
    our_keys = list(model_state_dict)
    source_values = list(source_state_dict.values())
    source_keys = list(source_state_dict)
    if len(source_values) != len(our_keys):
        without_counters = [key for key in our_keys if not key.endswith("num_batches_tracked")]
        if len(source_values) != len(without_counters):
            raise CheckpointError(f"{source} has {len(source_values)} tensors, the model {len(our_keys)}: "
                                  "it does not match the architecture built from your flags")
        our_keys = without_counters
    mapped = collections.OrderedDict(model_state_dict)
    for our_key, source_key, value in zip(our_keys, source_keys, source_values):
        if tuple(value.shape) != tuple(model_state_dict[our_key].shape):
            raise CheckpointError(f"{source}: its tensor {source_key} {list(value.shape)} would map onto our "
                                  f"{our_key} {list(model_state_dict[our_key].shape)}; the shapes differ, "
                                  "so it does not match the architecture built from your flags")
        mapped[our_key] = value
    return mapped


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

def training_state(*, model, optimizer, epoch_num, best_r5, not_improved_num, recalls, optim, recipe,
                   recipe_state, grad_scaler=None, training_step_state=None):
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
        "recipe": recipe,
        "recipe_state": recipe_state,
        "training_step_state": training_step_state,
        "grad_scaler_state_dict": grad_scaler.state_dict() if grad_scaler is not None else None,
    }


def recipe_state(checkpoint, recipe):
    """The state the checkpoint keeps for `recipe`; {} for another recipe's checkpoint. Checkpoints written
    before recipes existed are the triplets recipe's, with the mining state at the top level."""
    if "recipe_state" not in checkpoint:
        checkpoint = {"recipe": "triplets", "recipe_state": {key: checkpoint[key] for key in ("mining", "mining_state")
                                                             if key in checkpoint}}
    if checkpoint.get("recipe") != recipe:
        logging.warning(f"The checkpoint was trained with --recipe {checkpoint.get('recipe')}, this run uses "
                        f"--recipe {recipe}: the recipe starts afresh")
        return {}
    return checkpoint["recipe_state"] or {}


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
