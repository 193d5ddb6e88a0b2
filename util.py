"""Weights and checkpoints: downloads, safe loading, the model zoo, off-the-shelf models, FLOPs.

Sections: errors; downloads; reading checkpoint files; loading weights into a model; pretrained
weights; model zoo (--resume by name); off-the-shelf models; FLOPs and parameters.
"""
import collections
import copy
import functools
import logging
import os
import pickle
import shutil
import types
import uuid
import warnings
import zipfile

import numpy as np
import torch

from commons import UserInputError
from model import zoo
from model.zoo import PRETRAININGS  # noqa: F401  (the --pretrain choices, with OFF_THE_SHELF_MODELS below)


# ----------------------------------------------------------------------------------------------------------
# Errors

class WeightsUnavailableError(UserInputError):
    """Weights that are neither on disk nor downloadable now; the message says what to fetch and where."""


class CheckpointError(UserInputError):
    """A checkpoint file that is missing, unreadable, unsafe to unpickle, or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Downloads: always to a temporary name in the destination folder, renamed only once complete, so that
# an interrupted download never looks like a present file.

def _temporary_path(path):
    return f"{path}.{uuid.uuid4().hex}.partial"


def download_url(url, path, hash_prefix=None):
    """Download `url` to `path` (torch.hub's downloader: temporary file, then move). With `hash_prefix`
    the file's SHA-256 must start with it, as torch.hub's check_hash does; otherwise nothing is kept.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=True)


def download_google_drive(file_id, path):
    """Download a Google Drive file with gdown to `path` (temporary file, then rename)."""
    import gdown  # imported here: only the download paths need it
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary_path = _temporary_path(path)
    try:
        output = gdown.download(id=file_id, output=temporary_path, quiet=False)
        if output is None or not os.path.isfile(temporary_path):
            raise RuntimeError("gdown could not retrieve the file")
        os.replace(temporary_path, path)
    finally:
        if os.path.exists(temporary_path):
            os.remove(temporary_path)


def url_hash_prefix(url):
    """The SHA-256 prefix that torch.hub-style file names carry ('name-<hex>.pth'), or None."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    return match.group(1) if match and match.group(1) else None


def fetch_url(url, path, what, check_hash=True):
    """Return `path`, downloading `url` there first if it is not present yet.

    A present file is used as is, without any network. When the download fails, raise
    WeightsUnavailableError naming the URL and the exact path where the user can put the file.
    """
    if os.path.isfile(path):
        return path
    hash_prefix = url_hash_prefix(url) if check_hash else None
    logging.info(f"Downloading {what} from {url} to {path}")
    try:
        download_url(url, path, hash_prefix=hash_prefix)
    except Exception as error:
        raise WeightsUnavailableError(
            f"Could not download {what} from {url} ({type(error).__name__}: {error}). "
            f"Download it yourself and put it at {os.path.abspath(path)}") from error
    return path


def fetch_google_drive(file_id, path, what):
    """Like fetch_url, for a Google Drive file id."""
    if os.path.isfile(path):
        return path
    link = zoo.google_drive_link(file_id)
    logging.info(f"Downloading {what} from {link} to {path}")
    try:
        download_google_drive(file_id, path)
    except Exception as error:
        raise WeightsUnavailableError(
            f"Could not download {what} from Google Drive ({link}; {type(error).__name__}: {error}). "
            f"Download it yourself and put it at {os.path.abspath(path)}") from error
    return path


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoint files

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


def read_checkpoint(path, trusted=False):
    """torch.load a file safely (weights_only, on the CPU) with clear errors.

    A file that needs arbitrary code to unpickle (objects other than tensors, containers, numbers,
    strings and NumPy arrays) is refused, unless `trusted` (the --trust_checkpoint flag).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (an interrupted download or copy?); fetch it again")
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


def load_state_dict_file(path, trusted=False):
    """Read a checkpoint file and return the model's state dict from it (see read_checkpoint and
    extract_state_dict)."""
    return extract_state_dict(read_checkpoint(path, trusted=trusted), path)


# ----------------------------------------------------------------------------------------------------------
# Loading weights into a model

def _mismatch_hints(missing, unexpected):
    """Likely flag fixes, guessed from which keys differ."""
    hints = []
    if any(key.startswith("backbone.7.") for key in unexpected):
        hints.append("the checkpoint has a conv5 (layer4) backbone: use a ...conv5 --backbone")
    if any(key.startswith("backbone.7.") for key in missing):
        hints.append("the checkpoint has a conv4 backbone: use a ...conv4 --backbone")
    if any(key.startswith("aggregation.crn.") for key in unexpected):
        hints.append("the checkpoint is a CRN model: use --aggregation crn")
    checkpoint_blocks = {int(key.split(".")[3]) for key in unexpected if key.startswith("backbone.classifier.blocks.")}
    model_blocks = {int(key.split(".")[3]) for key in missing if key.startswith("backbone.classifier.blocks.")}
    if model_blocks and not checkpoint_blocks:
        hints.append(f"the checkpoint has {min(model_blocks)} transformer encoders: use --trunc_te {min(model_blocks)}")
    elif checkpoint_blocks and not model_blocks:
        hints.append(f"the checkpoint has {max(checkpoint_blocks) + 1} transformer encoders: "
                     "use a larger --trunc_te (or none)")
    return hints


def describe_state_dict_mismatch(model_state_dict, state_dict):
    """None if `state_dict` fits `model_state_dict` exactly (same keys and shapes), else a message."""
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
                     f"{', '.join(unexpected[:5])}")
    hints = _mismatch_hints(missing, unexpected)
    if hints:
        parts.append("hint: " + "; ".join(hints))
    return "; ".join(parts)


def load_model_weights(model, state_dict, source="the checkpoint"):
    """Load `state_dict` into `model` strictly; on any mismatch raise CheckpointError naming the first
    mismatching layer with both shapes and the missing / unexpected keys, and suggesting flags.
    """
    mismatch = describe_state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch is not None:
        raise CheckpointError(f"{source} does not fit the model built from your flags: {mismatch}")
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights (ImageNet through torchvision and torch.hub under TORCH_HOME; places / gldv2 from
# Google Drive under the weights folder)

def hub_checkpoints_folder():
    """Where torch.hub caches downloaded weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def torchvision_state_dict(weights, trusted=False):
    """The state dict of a torchvision weights enum (e.g. ResNet18_Weights.IMAGENET1K_V1), from torch.hub's
    cache, downloaded there if needed (the SHA-256 prefix in the file name is checked)."""
    path = os.path.join(hub_checkpoints_folder(), os.path.basename(weights.url))
    fetch_url(weights.url, path, what=f"torchvision's {weights} weights")
    return load_state_dict_file(path, trusted)


def cct384_imagenet_state_dict(trusted=False):
    """SHI-Labs' CCT-14/7x2-384 ImageNet weights (torch.hub cache), without the classification head."""
    path = os.path.join(hub_checkpoints_folder(), os.path.basename(zoo.CCT384_IMAGENET_URL))
    fetch_url(zoo.CCT384_IMAGENET_URL, path, what="the CCT-14/7x2-384 ImageNet weights")
    state_dict = load_state_dict_file(path, trusted)
    return collections.OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith("classifier.fc."))


def pretrained_net_state_dict(model_name, weights_folder, trusted=False):
    """Places / GLDv2 pretrainings, e.g. model_name 'resnet50_places' ->
    <weights_folder>/pretrained_nets/resnet50_places.pth (downloaded from Google Drive once)."""
    if model_name not in zoo.PRETRAINED_NETS_GOOGLE_DRIVE_IDS:
        raise UserInputError(f"No pretrained network named {model_name}; available: "
                             f"{', '.join(zoo.PRETRAINED_NETS_GOOGLE_DRIVE_IDS)}")
    path = os.path.join(weights_folder, zoo.PRETRAINED_NETS_SUBFOLDER, f"{model_name}.pth")
    fetch_google_drive(zoo.PRETRAINED_NETS_GOOGLE_DRIVE_IDS[model_name], path, what=f"the {model_name} weights")
    return load_state_dict_file(path, trusted)


# ----------------------------------------------------------------------------------------------------------
# Model zoo: --resume by name

def resolve_resume(resume, weights_folder):
    """Path of the checkpoint that --resume names: an existing file as is, or a model zoo name
    (see model/zoo.py, e.g. 'resnet18-netvlad-partial-pitts30k') downloaded once into
    <weights_folder>/model_zoo/.
    """
    if os.path.isfile(resume):
        return resume
    if resume in zoo.MODEL_ZOO:
        entry = zoo.MODEL_ZOO[resume]
        path = os.path.join(weights_folder, zoo.MODEL_ZOO_SUBFOLDER, f"{resume}.pth")
        return fetch_google_drive(entry.google_drive_id, path, what=f"the model zoo checkpoint {resume}")
    if os.sep in resume or resume.endswith((".pth", ".pt", ".tar")):
        raise CheckpointError(f"--resume {resume}: no such file; check the path")
    raise CheckpointError(f"--resume {resume}: neither a file nor a model zoo name. Model zoo names: "
                          f"{', '.join(zoo.MODEL_ZOO)}")


# ----------------------------------------------------------------------------------------------------------
# Off-the-shelf landmark-retrieval models (--off_the_shelf), mapped onto our model in order

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


def _radenovic_path(backbone, weights_folder, dataset):
    key = (backbone, dataset)
    if key not in zoo.OFF_THE_SHELF_RADENOVIC_URLS:
        raise UserInputError(f"No radenovic_{dataset} model for --backbone {backbone}; available backbones: "
                             f"{', '.join(b for b, d in zoo.OFF_THE_SHELF_RADENOVIC_URLS if d == dataset)}")
    url = zoo.OFF_THE_SHELF_RADENOVIC_URLS[key]
    path = os.path.join(weights_folder, zoo.OFF_THE_SHELF_SUBFOLDER, os.path.basename(url))
    return fetch_url(url, path, what=f"the radenovic_{dataset} {backbone} model")


def _naver_path(backbone, weights_folder):
    if backbone not in zoo.OFF_THE_SHELF_NAVER:
        raise UserInputError(f"No naver model for --backbone {backbone}; available backbones: "
                             f"{', '.join(zoo.OFF_THE_SHELF_NAVER)}")
    entry = zoo.OFF_THE_SHELF_NAVER[backbone]
    folder = os.path.join(weights_folder, zoo.OFF_THE_SHELF_SUBFOLDER)
    path = os.path.join(folder, entry.file_name)
    if os.path.isfile(path):
        return path
    zip_path = os.path.join(folder, f"{backbone}_naver.zip")
    fetch_google_drive(entry.google_drive_id, zip_path, what=f"the naver {backbone} model (a zip holding "
                       f"{entry.file_name}, to unpack into {os.path.abspath(folder)})")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [name for name in archive.namelist() if os.path.basename(name) == entry.file_name]
            if not members:
                raise CheckpointError(f"{zip_path} does not contain {entry.file_name}; delete it to download "
                                      "it again")
            temporary_path = _temporary_path(path)
            with archive.open(members[0]) as source, open(temporary_path, "wb") as target:
                shutil.copyfileobj(source, target)
            os.replace(temporary_path, path)
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{zip_path} is not a valid zip file; delete it to download it again") from error
    return path


# --off_the_shelf name -> function(backbone, weights_folder) giving the model's file; "imagenet" means no
# off-the-shelf model (the backbone keeps its --pretrain weights)
OFF_THE_SHELF_MODELS = {
    "imagenet": None,
    "radenovic_sfm": functools.partial(_radenovic_path, dataset="sfm"),
    "radenovic_gldv1": functools.partial(_radenovic_path, dataset="gldv1"),
    "naver": _naver_path,
}


def off_the_shelf_path(name, backbone, weights_folder):
    """The file of an off-the-shelf model (downloaded into <weights_folder>/off_the_shelf_nets/ once)."""
    if OFF_THE_SHELF_MODELS.get(name) is None:
        raise UserInputError(f"Unknown off-the-shelf model {name}; valid names: "
                             f"{', '.join(key for key, value in OFF_THE_SHELF_MODELS.items() if value)}")
    return OFF_THE_SHELF_MODELS[name](backbone, weights_folder)


def load_off_the_shelf(model, name, backbone, weights_folder):
    """Put an off-the-shelf model's weights into `model` (ResNet conv5 + GeM + FC 2048), in order."""
    path = off_the_shelf_path(name, backbone, weights_folder)
    source_state_dict = extract_state_dict(read_checkpoint_with_inert_objects(path), path)
    mapped = map_state_dict_in_order(model.state_dict(), source_state_dict, path)
    model.load_state_dict(mapped, strict=True)
    logging.info(f"Loaded the off-the-shelf model {name} from {path}")


# ----------------------------------------------------------------------------------------------------------
# FLOPs and parameters

def compute_flops_and_params(model, resize, device):
    """FLOPs of one forward pass at `resize` (H, W) and the parameter count, measured by thop on a copy
    of the model (thop adds counter buffers to the modules it profiles; our model stays untouched).

    thop counts multiply-accumulates of the layers it knows (convolutions, linear, norms...); FLOPs are
    reported as 2 x MACs. Matrix products written as plain tensor operations (attention) are not counted.
    """
    with warnings.catch_warnings():  # thop imports deprecated setuptools helpers
        warnings.simplefilter("ignore", DeprecationWarning)
        import thop  # imported here: only this function needs it
    model_copy = copy.deepcopy(model).to(device).eval()
    image = torch.zeros(1, 3, resize[0], resize[1], device=device)
    with torch.no_grad():
        macs, _ = thop.profile(model_copy, inputs=(image,), verbose=False)
    params = sum(parameter.numel() for parameter in model.parameters())
    return 2 * int(macs), params


def format_flops(flops):
    return f"{flops / 1e9:.2f} GFLOPs"
