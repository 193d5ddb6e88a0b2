"""Weights from elsewhere: downloads, the model zoo (--resume by name), off-the-shelf models; and FLOPs.
Reading checkpoint files and fitting them onto a model are checkpoint.py's.
"""
import copy
import functools
import logging
import os
import shutil
import warnings
import zipfile

import torch

import checkpoint
from checkpoint import CheckpointError
from commons import UserInputError, temporary_path, write_atomically
from model import zoo


# ----------------------------------------------------------------------------------------------------------
# Errors

class WeightsUnavailableError(UserInputError):
    """Weights that are neither on disk nor downloadable now; the message says what to fetch and where."""


# ----------------------------------------------------------------------------------------------------------
# Downloads: always to a temporary name in the destination folder, renamed only once complete, so that
# an interrupted download never looks like a present file.

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
    temporary = temporary_path(path)
    try:
        output = gdown.download(id=file_id, output=temporary, quiet=False)
        if output is None or not os.path.isfile(temporary):
            raise RuntimeError("gdown could not retrieve the file")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def url_hash_prefix(url):
    """The SHA-256 prefix that torch.hub-style file names carry ('name-<hex>.pth'), or None."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(url))
    return match.group(1) if match and match.group(1) else None


def download_google_drive_folder_file(folder_url, file_name, path):
    """Download a Google Drive folder with gdown into a temporary folder beside `path`, keep its `file_name` as
    `path` (renamed once complete)."""
    import gdown  # imported here: only the download paths need it
    temporary = temporary_path(path)
    try:
        gdown.download_folder(url=folder_url, output=temporary, quiet=False)
        found = [os.path.join(root, name) for root, _, names in os.walk(temporary) for name in names
                 if name == file_name]
        if not found:
            raise RuntimeError(f"the folder holds no {file_name}")
        os.replace(found[0], path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _fetch(path, what, where, download, to_fetch="it"):
    """Return `path`, calling download() to put it there first if it is not present yet. A present file is used as
    is, without any network; when the download fails, a WeightsUnavailableError names where the file comes from and
    the exact path where the user can put it."""
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    logging.info(f"Downloading {what} from {where} to {path}")
    try:
        download()
    except Exception as error:
        raise WeightsUnavailableError(
            f"Could not download {what} from {where} ({type(error).__name__}: {error}). "
            f"Download {to_fetch} yourself and put it at {os.path.abspath(path)}") from error
    return path


def fetch_url(url, path, what, check_hash=True):
    """`path`, downloaded from `url` if needed (with check_hash, the SHA-256 prefix of a torch.hub-style name is
    checked)."""
    hash_prefix = url_hash_prefix(url) if check_hash else None
    return _fetch(path, what, url, lambda: download_url(url, path, hash_prefix=hash_prefix))


def fetch_google_drive(file_id, path, what):
    """`path`, downloaded from a Google Drive file id if needed."""
    return _fetch(path, what, f"Google Drive ({zoo.google_drive_link(file_id)})",
                  lambda: download_google_drive(file_id, path))


def fetch_google_drive_folder_file(folder_url, file_name, path, what):
    """`path`, the file `file_name` of a Google Drive folder, downloaded if needed."""
    return _fetch(path, what, f"the Google Drive folder {folder_url}",
                  lambda: download_google_drive_folder_file(folder_url, file_name, path), f"its file {file_name}")


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights: torch.hub's cache, where ImageNet weights go (the parts declare their sources)

def hub_checkpoints_folder():
    """Where torch.hub caches downloaded weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


# ----------------------------------------------------------------------------------------------------------
# Model zoo: --resume by name

def named_model_path(name, weights_folder):
    """Where the file of a model-zoo name is kept: <weights_folder>/model_zoo/<name> with the file's extension."""
    file_name = getattr(zoo.named_model(name), "file_name", "model.pth")
    return os.path.join(weights_folder, zoo.MODEL_ZOO_SUBFOLDER, name + os.path.splitext(file_name)[1])


def resolve_resume(resume, weights_folder):
    """Path of the checkpoint that --resume names: an existing file as is, or a model-zoo name (the original's,
    e.g. 'resnet18-netvlad-partial-pitts30k', or a release of today's methods, e.g. 'salad-dinov2-8448', see
    model/zoo.py) downloaded once into <weights_folder>/model_zoo/.
    """
    if os.path.isfile(resume):
        return resume
    model = zoo.named_model(resume)
    if model is not None:
        path = named_model_path(resume, weights_folder)
        what = f"the model zoo checkpoint {resume}"
        if getattr(model, "url", None):
            return fetch_url(model.url, path, what=what, check_hash=False)
        if getattr(model, "google_drive_folder", None):
            return fetch_google_drive_folder_file(model.google_drive_folder, model.file_name, path, what)
        return fetch_google_drive(model.google_drive_id, path, what=what)
    if os.sep in resume or resume.endswith((".pth", ".pt", ".tar", ".ckpt", ".safetensors")):
        raise CheckpointError(f"--resume {resume}: no such file; check the path")
    raise CheckpointError(f"--resume {resume}: neither a file nor a model zoo name. Model zoo names: "
                          f"{', '.join(zoo.MODEL_ZOO)}; releases of today's methods: {', '.join(zoo.RELEASES)}")


# ----------------------------------------------------------------------------------------------------------
# Off-the-shelf landmark-retrieval models (--off_the_shelf), mapped onto our model in order

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
            with archive.open(members[0]) as source:
                write_atomically(path, lambda target: shutil.copyfileobj(source, target))
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
    source_state_dict = checkpoint.extract_state_dict(checkpoint.read_checkpoint_with_inert_objects(path), path)
    mapped = checkpoint.map_state_dict_in_order(model.state_dict(), source_state_dict, path)
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
