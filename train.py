"""Train a geo-localization model with hard-negative mining, as the original benchmark does.

Each epoch: --queries_per_epoch queries in loops of --cache_refresh_rate; each loop recomputes the feature
cache with the current model, mines (query, best positive, negatives) groups and trains on them. After each
epoch: recalls on the val split, last_model.pth (and best_model.pth when R@5 improved) in the run folder;
training stops after --patience epochs without improvement, then the best model is tested on the test split.

One process:      python3 train.py --dataset_name pitts30k ...
Several (DDP):    torchrun --nproc_per_node=N train.py ...   (gloo on the CPU, nccl on GPUs)
With several processes, each one caches features, trains and evaluates its share; rank 0 alone mines,
logs and writes files.
"""
import logging
import math
import os
import sys
import time
from datetime import datetime

import torch
import torchvision.transforms as T
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import checkpoint
import commons
import datasets_ws
import memory_allocator
import mining
import network
import parser
import results
import test
import util
from commons import UserInputError
from model.losses import LOSSES

# The best model is the one with the highest validation R@BEST_MODEL_RECALL
BEST_MODEL_RECALL = 5
LAST_MODEL_FILENAME, BEST_MODEL_FILENAME = "last_model.pth", "best_model.pth"


# ----------------------------------------------------------------------------------------------------------
# Pieces of the script

def autocast_dtype(use_amp, device):
    """The reduced precision of --use_amp on this device (None: full precision)."""
    if not use_amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast supports bfloat16


def make_optimizer(args, model):
    """Adam or SGD over the trainable parameters; CRN gets its layer's and the rest's learning rates."""
    if args.aggregation == "crn":
        crn_params = [p for n, p in model.aggregation.named_parameters() if ".crn." in f".{n}" and p.requires_grad]
        crn_ids = {id(p) for p in crn_params}
        net_params = [p for p in model.parameters() if p.requires_grad and id(p) not in crn_ids]
        groups = [{"params": crn_params, "lr": args.lr_crn_layer}, {"params": net_params, "lr": args.lr_crn_net}]
        if args.optim == "adam":
            logging.info("You're using CRN with Adam, it is advised to use SGD")
            return torch.optim.Adam(groups)
        return torch.optim.SGD([dict(g, momentum=0.9, weight_decay=0.001) for g in groups])
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=0.001)
    raise UserInputError(f"Unknown --optim {args.optim}; valid names: adam, sgd")


def load_resume(args, model):
    """Load --resume's weights into `model`. Returns (checkpoint dict, path) when the file can continue a
    training run, else (None, path). A NetVLAD checkpoint starting a CRN model fills the shared layers only."""
    path = util.resolve_resume(args.resume, network.WEIGHTS_FOLDER)
    state = checkpoint.load_checkpoint(path, trusted=args.trust_checkpoint)
    state_dict = util.extract_state_dict(state, path)
    mismatch = util.describe_state_dict_mismatch(model.state_dict(), state_dict)
    if args.aggregation == "crn" and mismatch is not None:
        unexpected = [key for key in state_dict if key not in model.state_dict()]
        if unexpected:
            raise util.CheckpointError(f"{path} does not fit the CRN model built from your flags: {mismatch}")
        try:
            missing, _ = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as error:
            raise util.CheckpointError(f"{path} does not fit the CRN model built from your flags: {mismatch}") \
                from error
        logging.info(f"CRN starts from the NetVLAD model {path}: {len(state_dict)} layers loaded, "
                     f"{len(missing)} new ({', '.join(missing)})")
        return None, path
    util.load_model_weights(model, state_dict, path)
    if not checkpoint.is_training_checkpoint(state):
        logging.info(f"Loaded the weights of {path}; it holds no training state, so training starts at epoch 0")
        return None, path
    return state, path


def refresh_triplets(miner, extractor, model, queries_count, images_num, world, timings=None):
    """Sample queries, cache the features the mining needs (shared among the processes) and mine.
    Rank 0 samples and mines; the triplets [queries_count, 2 + negs] reach every process.
    `timings` (a dict), when given, receives cache_seconds, mining_seconds and cached_images."""
    plan = commons.broadcast_object(miner.plan(queries_count) if world.rank == 0 else None, world)
    cache_start = time.perf_counter()
    features = extractor(model, plan.cache_indexes, model.features_dim)
    mining_start = time.perf_counter()
    triplets = None
    if world.rank == 0:
        cache = mining.FeatureCache(plan.cache_indexes, features, images_num)
        triplets = miner.mine(plan, cache)
    triplets = commons.broadcast_object(triplets, world)
    if timings is not None:
        timings.update(cache_seconds=mining_start - cache_start, mining_seconds=time.perf_counter() - mining_start,
                       cached_images=len(plan.cache_indexes))
    return triplets


def train_on_triplets(model, loader, optimizer, grad_scaler, loss_function, margin, horizontal_flip, device,
                      amp_dtype):
    """One pass over the mined groups. Returns (sum of the batch losses, number of batches, last batch loss)."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches_num, loss = 0, torch.zeros(())
    for images, triplets in commons.progress_bar(loader, "Training"):
        if horizontal_flip:
            images = T.RandomHorizontalFlip()(images)  # all the groups of the batch, or none
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            features = model(images.to(device, non_blocking=True))
        queries, positives, negatives = datasets_ws.split_triplets_features(features.float(), len(triplets))
        loss = loss_function(queries, positives, negatives, margin)
        optimizer.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()
        loss_sum += loss.detach()  # no .item() here: it would wait for the GPU at every batch
        batches_num += 1
    return loss_sum.item(), batches_num, loss.item()


# ----------------------------------------------------------------------------------------------------------
# The script

def main(argv=None):
    args = parser.parse_arguments(argv)
    world = commons.setup_distributed(args.device)
    try:
        run(args, world)
    finally:
        commons.cleanup_distributed()


def run(args, world):
    #### Setup: run folder and logs (rank 0), seeds
    start_time = datetime.now()
    if BEST_MODEL_RECALL not in args.recall_values:
        raise UserInputError(f"Training keeps the model with the best R@{BEST_MODEL_RECALL}: add {BEST_MODEL_RECALL} "
                             f"to --recall_values (now {' '.join(map(str, args.recall_values))})")
    if args.train_batch_size % world.world_size != 0:
        raise UserInputError(f"--train_batch_size {args.train_batch_size} must be a multiple of the number of "
                             f"processes ({world.world_size}), which share each batch")
    if args.cache_refresh_rate < args.train_batch_size:
        raise UserInputError(f"--cache_refresh_rate {args.cache_refresh_rate} is smaller than --train_batch_size "
                             f"{args.train_batch_size}: no full batch could be trained. Raise the first or lower "
                             "the second")
    is_main = world.rank == 0
    output_folder = commons.make_run_folder("logs", args.save_dir, start_time) if is_main else None
    output_folder = commons.broadcast_object(output_folder, world)
    commons.set_progress_bars(False if args.quiet else None)
    if is_main:
        commons.setup_logging(output_folder, console="warning" if args.quiet else "debug")
    else:
        commons.setup_worker_logging(world.rank)
    commons.log_command_and_arguments(args)
    logging.info(commons.describe_run_folder(output_folder))
    logging.info(f"Using {world.world_size} process(es) on {world.device.type}, {os.cpu_count()} CPUs")
    commons.make_deterministic(args.seed)
    memory_allocator.keep_freed_memory()
    device = world.device
    amp_dtype = autocast_dtype(args.use_amp, device)
    if amp_dtype is not None:
        logging.info(f"Mixed precision: autocast to {amp_dtype}")

    #### Datasets
    logging.debug(f"Loading dataset {args.dataset_name} from folder {args.datasets_folder}")
    query_transform = datasets_ws.query_training_transform(
        args.resize, args.brightness, args.contrast, args.saturation, args.hue, args.rand_perspective,
        args.random_resized_crop, args.random_rotation)
    triplets_ds = datasets_ws.TripletsDataset(
        args.datasets_folder, args.dataset_name, "train", resize=args.resize,
        hard_positives_dist_threshold=args.train_positives_dist_threshold,
        soft_positives_dist_threshold=args.val_positive_dist_threshold, query_transform=query_transform)
    logging.info(f"Train query set: {triplets_ds}")
    val_ds = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "val", args.val_positive_dist_threshold)
    logging.info(f"Val set: {val_ds}")
    test_ds = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "test", args.val_positive_dist_threshold)
    logging.info(f"Test set: {test_ds}")
    cache_ds = datasets_ws.ImagesDataset(triplets_ds.images_paths, datasets_ws.hard_resize, args.resize)

    #### Model: weights from --resume, or NetVLAD initialised by k-means on training images
    model = network.build_model(args).to(device)
    resume_state = None
    if args.resume:
        resume_state, resume_path = load_resume(args, model)
    elif args.aggregation in ("netvlad", "crn") and is_main:  # other processes get rank 0's weights from DDP
        network.initialize_netvlad(model.netvlad_layer(), model.backbone, cache_ds, device, args.infer_batch_size,
                                   args.num_workers)
    if is_main:
        flops, params = util.compute_flops_and_params(model, args.resize, device)
        logging.info(f"Output dimension of the model is {model.features_dim}, with {util.format_flops(flops)} and "
                     f"{params / 1e6:.2f} M parameters")
    if world.world_size > 1 and device.type == "cuda":
        # Batch statistics over the whole batch, as one process would compute them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(args, model)
    grad_scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_function = LOSSES[args.criterion]

    #### Where to start: a training checkpoint continues from its next epoch
    best_r5, start_epoch_num, not_improved_num = 0.0, 0, 0
    miner = mining.make_miner(args.mining, triplets_ds, args.negs_num_per_query, args.neg_samples_num)
    if resume_state is not None:
        start_epoch_num, best_r5, not_improved_num = checkpoint.resume_point(resume_state)
        checkpoint.load_optimizer_state(optimizer, resume_state, args.optim, resume_path)
        if resume_state.get("grad_scaler_state_dict") and grad_scaler.is_enabled():
            grad_scaler.load_state_dict(resume_state["grad_scaler_state_dict"])
        if resume_state.get("mining") == args.mining and resume_state.get("mining_state"):
            miner.load_state_dict(resume_state["mining_state"])
        logging.info(f"Resuming from epoch {start_epoch_num} with best R@{BEST_MODEL_RECALL} {best_r5:.1f}")
        previous_best = os.path.join(os.path.dirname(resume_path), BEST_MODEL_FILENAME)
        if is_main and os.path.basename(resume_path) == LAST_MODEL_FILENAME and os.path.isfile(previous_best):
            checkpoint.copy_checkpoint(previous_best, os.path.join(output_folder, BEST_MODEL_FILENAME))
    if resume_state is not None and "rng_states" in resume_state:
        checkpoint.restore_rng_states(resume_state["rng_states"])
    elif world.world_size > 1:
        # Same generators everywhere (the NetVLAD initialisation drew numbers on rank 0 only): e.g. every
        # process flips its share of a batch together
        checkpoint.restore_rng_states(commons.broadcast_object(checkpoint.capture_rng_states(), world))

    raw_model = model
    if world.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    #### Loaders: one for the cache (kept for the whole run), one per epoch for the triplets
    queries_per_refresh = args.cache_refresh_rate
    if queries_per_refresh > triplets_ds.queries_num:
        logging.warning(f"--cache_refresh_rate {args.cache_refresh_rate} is larger than the {triplets_ds.queries_num} "
                        "training queries: each refresh uses all of them")
        queries_per_refresh = triplets_ds.queries_num
    extractor = mining.FeatureExtractor(cache_ds, args.infer_batch_size, args.num_workers, device, world, amp_dtype)
    triplets_sampler = datasets_ws.ListSampler()

    def triplets_loader(epoch_num):
        # Its own seeded generator: worker seeds depend on the seed and the epoch only, so a resumed run
        # draws the same augmentations as an uninterrupted one
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch_num)
        return DataLoader(triplets_ds, batch_size=args.train_batch_size // world.world_size, sampler=triplets_sampler,
                          collate_fn=datasets_ws.triplets_collate_fn, drop_last=True,
                          persistent_workers=args.num_workers > 0, generator=generator,
                          **datasets_ws.loader_options(args.num_workers, device))

    #### Training loop
    loops_num = math.ceil(args.queries_per_epoch / args.cache_refresh_rate)
    best_val_recalls, epoch_num = None, start_epoch_num - 1
    refresh_timings = []  # seconds of caching, mining and training of each refresh, for results.json
    training_start = time.perf_counter()
    for epoch_num in range(start_epoch_num, args.epochs_num):
        logging.info(f"Start training epoch: {epoch_num:02d}")
        epoch_start_time = datetime.now()
        epoch_loss_sum, epoch_batches_num = 0.0, 0
        loader = triplets_loader(epoch_num)
        for loop_num in range(loops_num):
            logging.debug(f"Cache: {loop_num} / {loops_num}")
            refresh = {"epoch": epoch_num, "loop": loop_num}
            triplets = refresh_triplets(miner, extractor, raw_model, queries_per_refresh,
                                        len(triplets_ds.images_paths), world, refresh)
            triplets_sampler.items = datasets_ws.process_share_of_batches(triplets, args.train_batch_size,
                                                                         world.rank, world.world_size)
            training_step_start = time.perf_counter()
            loss_sum, batches_num, batch_loss = train_on_triplets(
                model, loader, optimizer, grad_scaler, loss_function, args.margin, args.horizontal_flip, device,
                amp_dtype)
            # Images of every process (each trained on its share of the same batches)
            refresh.update(training_seconds=time.perf_counter() - training_step_start,
                           trained_images=batches_num * args.train_batch_size * triplets.shape[1])
            refresh_timings.append(refresh)
            logging.debug(f"Refresh {loop_num}: {refresh['cached_images']} images cached in "
                          f"{refresh['cache_seconds']:.1f} s, mined in {refresh['mining_seconds']:.2f} s, "
                          f"{refresh['trained_images']} images trained in {refresh['training_seconds']:.1f} s")
            # Every process trained on its share of the same batches: their mean is the batches' loss
            epoch_loss_sum += commons.all_reduce_mean(loss_sum, world)
            epoch_batches_num += batches_num
            batch_loss = commons.all_reduce_mean(batch_loss, world)
            logging.debug(f"Epoch[{epoch_num:02d}]({loop_num}/{loops_num}): current batch triplet loss = "
                          f"{batch_loss:.4f}, average epoch triplet loss = "
                          f"{epoch_loss_sum / max(epoch_batches_num, 1):.4f}")
        del loader  # ends its worker processes
        logging.info(f"Finished epoch {epoch_num:02d} in {str(datetime.now() - epoch_start_time)[:-7]}, "
                     f"average epoch triplet loss = {epoch_loss_sum / max(epoch_batches_num, 1):.4f}")

        # Validation, best model, checkpoints (best first: a run killed in between resumes from the previous
        # last_model.pth, which never claims a best model that was not written)
        recalls, recalls_str = test.test(args, val_ds, raw_model, "hard_resize", world=world)
        logging.info(f"Recalls on val set {val_ds}: {recalls_str}")
        r5 = recalls[BEST_MODEL_RECALL]
        is_best = r5 > best_r5
        if is_best:
            logging.info(f"Improved: previous best R@5 = {best_r5:.1f}, current R@5 = {r5:.1f}")
            best_r5, not_improved_num, best_val_recalls = r5, 0, recalls
        else:
            not_improved_num += 1
            logging.info(f"Not improved: {not_improved_num} / {args.patience}: best R@5 = {best_r5:.1f}, "
                         f"current R@5 = {r5:.1f}")
        if is_main:
            state = checkpoint.training_state(
                model=raw_model, optimizer=optimizer, epoch_num=epoch_num, best_r5=best_r5,
                not_improved_num=not_improved_num, recalls=recalls, optim=args.optim, mining=args.mining,
                mining_state=miner.state_dict(), grad_scaler=grad_scaler if grad_scaler.is_enabled() else None)
            if is_best:
                checkpoint.save_checkpoint(state, os.path.join(output_folder, BEST_MODEL_FILENAME))
            checkpoint.save_checkpoint(state, os.path.join(output_folder, LAST_MODEL_FILENAME))
        commons.barrier()
        if not_improved_num >= args.patience:
            logging.info(f"Performance did not improve for {not_improved_num} epochs. Stop training.")
            break
    training_seconds = time.perf_counter() - training_start

    logging.info(f"Best R@5: {best_r5:.1f}")
    logging.info(f"Trained for {epoch_num + 1:02d} epochs, in total in {str(datetime.now() - start_time)[:-7]}")

    #### Test of the best model on the test split
    best_path = os.path.join(output_folder, BEST_MODEL_FILENAME)
    if os.path.isfile(best_path):
        util.load_model_weights(raw_model, util.load_state_dict_file(best_path), best_path)
    else:
        logging.warning(f"No {BEST_MODEL_FILENAME} was written (R@5 never rose above {best_r5:.1f}): testing the "
                        "model as it is")
    test_start = time.perf_counter()
    test_evaluation = test.evaluate(args, test_ds, raw_model, args.test_method, world=world)
    recalls = test_evaluation.recalls
    logging.info(f"Recalls on {test_ds}: {test_evaluation.recalls_str}")
    if is_main:
        recalls_by_split = {"test": recalls} if best_val_recalls is None else {"val": best_val_recalls, "test": recalls}
        outcome = results.write_results(
            output_folder, args, raw_model, recalls_by_split,
            {"training_seconds": training_seconds, "test_seconds": time.perf_counter() - test_start,
             "extraction_seconds": test_evaluation.extraction_seconds, "search_seconds": test_evaluation.search_seconds,
             "total_seconds": (datetime.now() - start_time).total_seconds()},
            {"val": val_ds, "test": test_ds}, script="train.py", start_time=start_time,
            extra={"best_r5": best_r5, "epochs_num": epoch_num + 1, "refresh_timings": refresh_timings})
        results.print_result_line(outcome)


if __name__ == "__main__":
    commons.exit_on_user_error(main)
    commons.exit_now()
