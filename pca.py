"""PCA of the descriptors (--pca_dim), fit as the original: on the descriptors of up to 2^14 images found
under <datasets_folder>/<pca_dataset_folder>, each at its own size (not resized)."""
import logging
import os
from collections import defaultdict

import numpy as np
from PIL import Image

import datasets_ws
import extraction
from commons import UserInputError

PCA_MAX_IMAGES = 2 ** 14


def pca_images_paths(datasets_folder, pca_dataset_folder):
    """All images under <datasets_folder>/<pca_dataset_folder>, recursively, sorted."""
    folder = os.path.join(datasets_folder, pca_dataset_folder)
    if not os.path.isdir(folder):
        raise UserInputError(f"--pca_dataset_folder: {folder} does not exist. The folder is relative to "
                             "--datasets_folder, e.g. --pca_dataset_folder pitts30k/images/train")
    paths = datasets_ws.find_images(folder)
    if not paths:
        raise UserInputError(f"--pca_dataset_folder: no images under {folder} (looked for "
                             f"{', '.join(datasets_ws.IMAGE_EXTENSIONS)} files, recursively)")
    return paths


def sample_paths(paths, max_images=None):
    """Up to `max_images` (default PCA_MAX_IMAGES) of `paths`, drawn as the original with np.random.choice
    (without replacement)."""
    max_images = max_images or PCA_MAX_IMAGES
    if len(paths) <= max_images:
        return list(paths)
    return [paths[i] for i in np.random.choice(len(paths), max_images, replace=False)]


def check_pca_dim(pca_dim, images_num, descriptor_size):
    if pca_dim > images_num:
        raise UserInputError(f"--pca_dim {pca_dim} is larger than the number of images to fit PCA on "
                             f"({images_num}): use --pca_dim <= {images_num} or a larger --pca_dataset_folder")
    if pca_dim > descriptor_size:
        raise UserInputError(f"--pca_dim {pca_dim} is larger than the descriptor size ({descriptor_size}): "
                             f"use --pca_dim <= {descriptor_size}")


def batches_of_equal_size(paths, batch_size):
    """Index batches in which every image has the same size, so that images need no resizing to be stacked."""
    groups = defaultdict(list)
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                size = image.size
        except Exception:
            datasets_ws.open_image(path)  # raises the error that names the file
            raise
        groups[size].append(index)
    return [group[start:start + batch_size] for group in groups.values()
            for start in range(0, len(group), batch_size)]


def fit_pca(descriptors, pca_dim):
    """scikit-learn PCA(n_components=pca_dim) fit on descriptors [images_num, dim] (as float64, as the original)."""
    descriptors = np.asarray(descriptors, dtype=np.float64)
    check_pca_dim(pca_dim, len(descriptors), descriptors.shape[1])
    from sklearn.decomposition import PCA  # imported here: seconds of start-up that runs without PCA skip
    return PCA(n_components=pca_dim).fit(descriptors)


def compute_pca(args, model, pca_dataset_folder=None):
    """Fit PCA with `model` (in eval mode) on the images of --pca_dataset_folder. Reads datasets_folder,
    pca_dataset_folder, pca_dim, infer_batch_size, num_workers, device."""
    paths = sample_paths(pca_images_paths(args.datasets_folder, pca_dataset_folder or args.pca_dataset_folder))
    descriptor_size = getattr(model, "features_dim", None)
    check_pca_dim(args.pca_dim, len(paths), descriptor_size if descriptor_size is not None else args.pca_dim)
    logging.info(f"Fitting PCA ({args.pca_dim} components) on the descriptors of {len(paths)} images")
    # batch_size 1: each batch is one of batches_of_equal_size's
    loader = datasets_ws.make_loader(datasets_ws.ImagesDataset(paths), 1, args.num_workers, args.device,
                                     batch_sampler=batches_of_equal_size(paths, args.infer_batch_size))
    model = model.eval()
    descriptors = extraction.collect_descriptors(
        extraction.descriptor_batches(model, loader, args.device, description="PCA"), len(paths))
    return fit_pca(descriptors, args.pca_dim)
