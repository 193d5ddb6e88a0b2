"""Descriptors of images: the model run over a list of image paths (the one loop, model.inference), in memory, or
into the on-disk store in shards (resumable; several processes under torchrun write disjoint shards)."""
import hashlib
import logging
import os

import numpy as np
import torch

import commons
import datasets_ws
import descriptor_store
import search
from commons import UserInputError
from model.inference import forward_batches
from test_methods import get_test_method

# Shards of stored descriptors hold at most this (what a crash can lose: extraction resumes at a shard)
MAX_SHARD_BYTES = 256 * 1024 ** 2
# Row size assumed for planning shards when the model does not report its features_dim
FALLBACK_ROW_BYTES = 4 * 4096
DATABASE_FOLDER = "database"


def images_loader(paths, transform, resize, batch_size, num_workers, device):
    """Batches of (images, indices) of `paths`, each image `transform`ed to `resize`."""
    return datasets_ws.make_loader(datasets_ws.ImagesDataset(paths, transform, resize), batch_size, num_workers,
                                   device)


def descriptor_batches(model, loader, device, mean_of_crops=False, pca=None, description=None):
    """Yield (indices, descriptors float32) per batch of `loader`, which yields (images, indices).

    Images [b, crops, 3, H, W] (crop test methods) give descriptors [b, crops, dim], averaged per image when
    `mean_of_crops`. PCA, when given, is applied after the averaging.
    """
    for features, indices in forward_batches(model, loader, device, description=description):
        crops_num = features.shape[1] if features.dim() == 3 else None
        if crops_num is not None and mean_of_crops:
            features, crops_num = features.mean(1), None
        features = features.reshape(-1, features.shape[-1]).cpu().numpy()
        if pca is not None:
            features = pca.transform(features)
        features = np.asarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            # faiss would rank NaN descriptors silently, and every recall would read as a plain miss
            raise UserInputError(
                "The model gives non-finite descriptors (NaN or inf) for some images: its weights are broken "
                "(a diverged training or a damaged checkpoint). Check --resume, or retrain with a lower --lr.")
        if crops_num is not None:
            features = features.reshape(len(indices), crops_num, -1)
        yield indices.numpy(), features


def collect_descriptors(batches, total):
    """Fill one array [total, ...] from the (indices, descriptors) batches."""
    descriptors = None
    for indices, features in batches:
        if descriptors is None:
            descriptors = np.empty((total,) + features.shape[1:], dtype=np.float32)
        descriptors[indices] = features
    return descriptors


def model_fingerprint(model):
    """A hash of what the model computes: its structure (repr: layers, poolings, where it normalises) and
    every weight and buffer."""
    digest = hashlib.sha256(repr(model).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{array.dtype}|{tuple(array.shape)}".encode("utf-8"))
        # As bytes (any dtype, bfloat16 included)
        digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def vectors_per_image(transform, resize, mean_of_crops):
    """How many descriptors an image gives: its crops' count for crop methods that search with every crop."""
    shape = transform(torch.zeros(3, *resize), resize).shape
    return 1 if len(shape) == 3 or mean_of_crops else shape[0]


def store_descriptors(model, paths, folder, fingerprint, transform, resize, batch_size, num_workers, device,
                      mean_of_crops=False, pca=None, dtype="float32", max_ram_gb=None, shard_rows=None,
                      world=None, on_descriptors=None, description=None):
    """Describe `paths` with `model` into shards in `folder` (descriptor_store), skipping the shards already
    there (a resumed extraction) and returning the complete descriptor_store.DescriptorShards.

    Shards hold whole batches, so every image goes through the model in the same batch as in the one-shot
    extraction: the stored float32 descriptors equal `collect_descriptors`' bit for bit. Peak memory holds
    one shard (`shard_rows`, default from max_ram_gb and MAX_SHARD_BYTES), whatever the number of images.
    With `world` (commons.DistributedContext, several processes) process r extracts the shards s with
    s % world_size == r; rank 0 writes the manifest first and completes it once every process is done.
    `on_descriptors(indices, descriptors float32)` sees every row, extracted or read back from disk.
    """
    world = world or commons.DistributedContext(0, 1, 0, torch.device(device))
    if shard_rows is None:
        vector_size = pca.n_components_ if pca is not None else getattr(model, "features_dim", None)
        row_bytes = (4 * vector_size * vectors_per_image(transform, resize, mean_of_crops)
                     if vector_size else FALLBACK_ROW_BYTES)
        shard_rows = search.plan_shard_rows(max_ram_gb, row_bytes, batch_size, MAX_SHARD_BYTES)
    description = description or "Descriptors"
    error = None
    if world.rank == 0:  # one process writes the manifest; the others open it, or fail with the same message
        try:
            descriptor_store.open_shards(folder, fingerprint, len(paths), shard_rows, dtype)
        except UserInputError as caught:
            error = str(caught)
    error = commons.broadcast_object(error, world)
    if error is not None:
        raise UserInputError(error)
    shards = descriptor_store.open_shards(folder, fingerprint, len(paths), shard_rows, dtype, owner=False)
    missing = set(shards.missing_shards())
    if world.rank == 0:
        logging.info(f"{description}: extracting {len(missing)} of {shards.shards_num} shards of "
                     f"{shards.shard_rows} images into {folder}"
                     + (f" (the other {shards.shards_num - len(missing)} are there already)"
                        if len(missing) < shards.shards_num else ""))
    model = model.eval()
    for shard in range(shards.shards_num):
        start, end = shards.shard_range(shard)
        if shard not in missing:
            if on_descriptors is not None:
                on_descriptors(np.arange(start, end), shards.read(start, end))
            continue
        if shard % world.world_size != world.rank:
            continue
        loader = images_loader(paths[start:end], transform, resize, batch_size, num_workers, world.device)
        buffer = None
        for indices, features in descriptor_batches(model, loader, world.device, mean_of_crops, pca,
                                                    description=f"{description} {shard + 1}/{shards.shards_num}"):
            if buffer is None:
                buffer = np.empty((end - start,) + features.shape[1:], dtype=np.float32)
            buffer[indices] = features
            if on_descriptors is not None:
                on_descriptors(indices + start, features)
        shards.write_shard(shard, buffer)
        del buffer
    if world.world_size > 1:  # (a single process may still belong to a process group: no barrier then)
        commons.barrier()
    if world.rank == 0:
        shards.mark_complete()
    if world.world_size > 1:
        commons.barrier()
    return shards


def extract_descriptors(args, database_paths, queries_paths, model, test_method="hard_resize", pca=None,
                        descriptors_folder=None, world=None, on_descriptors=None):
    """Database and query descriptors into the store in `descriptors_folder` (`database/` and
    `queries_<test_method>/`, so that other test methods reuse the database), resuming what is there.
    Returns (database DescriptorShards, queries DescriptorShards). `on_descriptors(kind, indices, descriptors)`
    as in `retrieve`. Reads from args: device, infer_batch_size, num_workers, resize, descriptors_dtype,
    max_ram_gb (see search.search_settings).
    """
    if descriptors_folder is None:
        raise ValueError("extract_descriptors needs the folder to store the descriptors in")
    method = get_test_method(test_method)
    settings = search.search_settings(args)
    device = world.device if world is not None else args.device
    model_hash = model_fingerprint(model)
    common = {"model_sha256": model_hash, "pca_sha256": descriptor_store.pca_fingerprint(pca),
              "resize": list(args.resize)}
    stored = []
    for kind, paths, transform, batch_size, mean_of_crops, subfolder in (
            ("database", database_paths, datasets_ws.hard_resize, args.infer_batch_size, False, DATABASE_FOLDER),
            ("queries", queries_paths, method.query_transform,
             1 if method.one_query_per_batch else args.infer_batch_size, method.mean_of_crops,
             f"queries_{test_method}")):
        fingerprint = dict(common, paths_sha256=descriptor_store.sha256_of_strings(paths), batch_size=batch_size,
                           test_method=test_method if kind == "queries" else "hard_resize")

        def observe(indices, descriptors, kind=kind):
            if on_descriptors is not None:
                on_descriptors(kind, indices, descriptors)
        stored.append(store_descriptors(
            model, list(paths), os.path.join(descriptors_folder, subfolder), fingerprint, transform, args.resize,
            batch_size, args.num_workers, device, mean_of_crops, pca, settings.descriptors_dtype,
            settings.max_ram_gb, world=world, on_descriptors=observe, description=kind.capitalize()))
    return tuple(stored)


def gather_descriptors(model, paths, transform, resize, batch_size, num_workers, world, mean_of_crops=False,
                       pca=None, description=None):
    """Descriptors [len(paths), ...] of `paths` on every process of `world`: process r describes its contiguous
    share (commons.shard_range) in memory and the shares are gathered in order."""
    start, end = commons.shard_range(len(paths), world.rank, world.world_size)
    loader = images_loader(paths[start:end], transform, resize, batch_size, num_workers, world.device)
    local = collect_descriptors(descriptor_batches(model, loader, world.device, mean_of_crops, pca, description),
                                end - start)
    if world.world_size == 1:
        return local
    # A process without images has no descriptor shape: it takes the others'
    shapes = [None] * world.world_size
    torch.distributed.all_gather_object(shapes, None if local is None else local.shape[1:])
    row_shape = next(shape for shape in shapes if shape is not None)
    local = np.empty((0,) + tuple(row_shape), np.float32) if local is None else local
    return commons.all_gather_rows(local, len(paths), world)
