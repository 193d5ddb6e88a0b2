"""Train a geo-localization model with a training recipe (--recipe; the default, triplets, is the original
benchmark's hard-negative mining over a refreshed feature cache: recipes/triplets.py).

Each epoch: the recipe trains; then recalls on the val split, last_model.pth (and best_model.pth when R@5
improved) in the run folder; training stops after --patience epochs without improvement, then the best model is
tested on the test split.

One process:      python3 train.py --dataset_name pitts30k ...
Several (DDP):    torchrun --nproc_per_node=N train.py ...   (gloo on the CPU, nccl on GPUs)
With several processes, each one trains and evaluates its share; rank 0 alone logs and writes files.
"""
import logging
import os
import time
from datetime import datetime

import torch
from torch.nn.parallel import DistributedDataParallel

import checkpoint
import commons
import datasets_ws
import memory_allocator
import network
import optimization
import parser
import results
import test
import util
from commons import UserInputError
from recipes import RECIPES

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


def load_resume(args, model):
    """Load --resume's weights into `model`. Returns (checkpoint dict, path) when the file can continue a
    training run, else (None, path). An aggregation that starts from a subset of its layers (CRN from NetVLAD)
    gets the layers the file has."""
    path = util.resolve_resume(args.resume, network.WEIGHTS_FOLDER)
    state = checkpoint.load_checkpoint(path, trusted=args.trust_checkpoint)
    state_dict = checkpoint.extract_state_dict(state, path)
    mismatch = checkpoint.describe_state_dict_mismatch(model.state_dict(), state_dict)
    if network.starts_from_subset(model) and mismatch is not None:
        error = checkpoint.CheckpointError(f"{path} does not fit the {args.aggregation} model built from your "
                                           f"flags: {mismatch}")
        if any(key not in model.state_dict() for key in state_dict):
            raise error
        try:
            missing, _ = model.load_state_dict(state_dict, strict=False)
        except RuntimeError as cause:
            raise error from cause
        logging.info(f"{args.aggregation} starts from the model {path}: {len(state_dict)} layers loaded, "
                     f"{len(missing)} new ({', '.join(missing)})")
        return None, path
    network.load_checkpoint_weights(model, state_dict, path)
    if not checkpoint.is_training_checkpoint(state):
        logging.info(f"Loaded the weights of {path}; it holds no training state, so training starts at epoch 0")
        return None, path
    return state, path


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
    recipe_entry = RECIPES[args.recipe]
    message = recipe_entry.run_check(args, world) if recipe_entry.run_check else None
    if message:
        raise UserInputError(message)
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

    #### Datasets: the recipe's training data, the val and test splits
    logging.debug(f"Loading dataset {args.dataset_name} from folder {args.datasets_folder}")
    recipe = recipe_entry.make(args, world, device, amp_dtype)
    val_ds = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "val", args.val_positive_dist_threshold)
    logging.info(f"Val set: {val_ds}")
    test_ds = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "test", args.val_positive_dist_threshold)
    logging.info(f"Test set: {test_ds}")

    #### Model: weights from --resume, or the aggregation initialised on training images (NetVLAD's k-means)
    model = network.build_model(args).to(device)
    resume_state = None
    if args.resume:
        resume_state, resume_path = load_resume(args, model)
    elif is_main:  # other processes get rank 0's weights from DDP
        network.initialize_aggregation(model, recipe.images_dataset, device, args.infer_batch_size, args.num_workers)
    if is_main:
        flops, params = util.compute_flops_and_params(model, args.resize, device)
        logging.info(f"Output dimension of the model is {model.features_dim}, with {util.format_flops(flops)} and "
                     f"{params / 1e6:.2f} M parameters")
    if world.world_size > 1 and device.type == "cuda":
        # Batch statistics over the whole batch, as one process would compute them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module, _ in recipe.trained_modules():
        module.to(device)
    optimizer = optimization.make_optimizer(args, model, recipe.trained_modules())
    grad_scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = optimization.TrainingStep(args, optimizer, grad_scaler)

    #### Where to start: a training checkpoint continues from its next epoch, with the recipe's state
    best_r5, start_epoch_num, not_improved_num = 0.0, 0, 0
    if resume_state is not None:
        start_epoch_num, best_r5, not_improved_num = checkpoint.resume_point(resume_state)
        recipe.load_state_dict(checkpoint.recipe_state(resume_state, args.recipe))
        checkpoint.load_optimizer_state(optimizer, resume_state, args.optim, resume_path)
        step.load_state_dict(resume_state.get("training_step_state") or {})
        if resume_state.get("grad_scaler_state_dict") and grad_scaler.is_enabled():
            grad_scaler.load_state_dict(resume_state["grad_scaler_state_dict"])
        logging.info(f"Resuming from epoch {start_epoch_num} with best R@{BEST_MODEL_RECALL} {best_r5:.1f}")
        previous_best = os.path.join(os.path.dirname(resume_path), BEST_MODEL_FILENAME)
        if is_main and os.path.basename(resume_path) == LAST_MODEL_FILENAME and os.path.isfile(previous_best):
            checkpoint.copy_checkpoint(previous_best, os.path.join(output_folder, BEST_MODEL_FILENAME))
    if resume_state is not None and "rng_states" in resume_state:
        checkpoint.restore_rng_states(resume_state["rng_states"])
    elif world.world_size > 1:
        # Same generators everywhere (the aggregation's initialisation drew numbers on rank 0 only): e.g. every
        # process flips its share of a batch together
        checkpoint.restore_rng_states(commons.broadcast_object(checkpoint.capture_rng_states(), world))

    raw_model = model
    if world.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    #### Training loop
    best_val_recalls, epoch_num = None, start_epoch_num - 1
    epoch_details = []  # what the recipe reports of each epoch, for results.json
    training_start = time.perf_counter()
    for epoch_num in range(start_epoch_num, args.epochs_num):
        logging.info(f"Start training epoch: {epoch_num:02d}")
        epoch_start_time = datetime.now()
        step.epoch = epoch_num
        summary = recipe.train_epoch(model, raw_model, step, epoch_num)
        epoch_details += summary.details
        logging.info(f"Finished epoch {epoch_num:02d} in {str(datetime.now() - epoch_start_time)[:-7]}, "
                     f"average epoch {recipe.loss_name} loss = {summary.loss:.4f}")

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
                not_improved_num=not_improved_num, recalls=recalls, optim=args.optim, recipe=args.recipe,
                recipe_state=recipe.state_dict(), grad_scaler=grad_scaler if grad_scaler.is_enabled() else None,
                training_step_state=step.state_dict())
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
        checkpoint.load_model_weights(raw_model, checkpoint.load_state_dict_file(best_path), best_path)
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
            extra={"best_r5": best_r5, "epochs_num": epoch_num + 1, recipe.details_name: epoch_details},
            flops_and_params_measured=(flops, params))
        results.print_result_line(outcome)


if __name__ == "__main__":
    commons.exit_on_user_error(main)
    commons.exit_now()
