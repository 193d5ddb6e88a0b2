"""Evaluate a model: Recall@N on the test split of a dataset, or, without coordinates, each query's top-K
matches in a folder of database images ("where was this photo taken").

    python eval.py --datasets_folder DIR --dataset_name pitts30k --backbone resnet18conv4 --aggregation netvlad \
        --resume resnet18-netvlad-partial-pitts30k
    python eval.py --resume model.pth --queries_folder photos/ --database_folder reference/ --save_predictions 5

Every run writes logs/<save_dir>/<date_time>/{info.log, debug.log, results.json} and ends with one
`RESULT {...}` line on stdout.

City-sized databases: --descriptors_folder, --max_ram_gb, --descriptors_dtype and --faiss_index keep the
descriptors on disk in shards (resumable, reusable) and search them within a memory budget; under torchrun,
several processes extract disjoint shards and rank 0 searches:
    torchrun --nproc_per_node 2 eval.py ... --descriptors_folder descriptors/ --max_ram_gb 8 --faiss_index hnsw
"""
import logging
import os
from datetime import datetime, timedelta

import checkpoint
import commons
import datasets_ws
import descriptor_store
import extraction
import memory_allocator
import metrics
import network
import parser
import pca as vg_pca
import predictions
import results
import search
import test
import util
from commons import UserInputError

LOGS_FOLDER = "logs"
# Inside the run folder: the descriptors of the large-scale path when --descriptors_folder is not given
RUN_DESCRIPTORS_FOLDER = "descriptors"
PCA_FILENAME = "pca.npz"


def load_resume(args, model):
    """--resume: our checkpoints, the original's files, released files of today's methods and model-zoo names
    (downloaded once)."""
    path = util.resolve_resume(args.resume, network.WEIGHTS_FOLDER)
    network.load_checkpoint_weights(model, checkpoint.load_state_dict_file(path, trusted=args.trust_checkpoint), path)
    logging.info(f"Loaded the model weights from {path}")


def folder_images(folder, flag):
    paths = datasets_ws.find_images(folder)
    if not paths:
        raise UserInputError(f"--{flag} {folder}: no images there (looked for "
                             f"{', '.join(datasets_ws.IMAGE_EXTENSIONS)} files, recursively)")
    return paths


def on_rank_0(world, function):
    """`function()` run by rank 0 only, its result given to every process; its UserInputError raised on every
    process (the others would otherwise wait for rank 0 forever)."""
    result, error = None, None
    if world.rank == 0:
        try:
            result = function()
        except UserInputError as caught:
            error = str(caught)
    result, error = commons.broadcast_object((result, error), world)
    if error is not None:
        raise UserInputError(error)
    return result


def descriptors_folder_of(args, output_folder, world):
    """Where descriptors go: --descriptors_folder; else, when a large-scale flag asks for the on-disk store or
    several processes share the extraction, the run folder; else nowhere (in-memory search, the default)."""
    if args.descriptors_folder is not None:
        return args.descriptors_folder
    if search.search_settings(args).uses_store or world.world_size > 1:
        return os.path.join(output_folder, RUN_DESCRIPTORS_FOLDER)
    return None


def load_or_fit_pca(args, model, descriptors_folder, world):
    """--pca_dim (and --pca_whiten): fit PCA. With a descriptors folder it is fit once, saved there and reused by
    later runs and by every process of a torchrun."""
    def fit():
        pca = vg_pca.compute_pca(args, model)
        # Whitening changes only the transform, not the fit: the same fitted components, scaled per component
        return pca.set_params(whiten=args.pca_whiten)
    if descriptors_folder is None:
        return fit()
    path = os.path.join(descriptors_folder, PCA_FILENAME)
    fingerprint = {"model_sha256": extraction.model_fingerprint(model), "pca_dim": args.pca_dim,
                   "whiten": args.pca_whiten,
                   "pca_dataset_folder": os.path.abspath(os.path.join(args.datasets_folder,
                                                                      args.pca_dataset_folder)),
                   "seed": args.seed}

    def fit_and_save():
        if os.path.exists(path):
            descriptor_store.load_pca(path, fingerprint)  # refuses a PCA of another model or setting
            logging.info(f"Reusing the PCA saved in {path}")
            return
        pca = fit()
        os.makedirs(descriptors_folder, exist_ok=True)
        descriptor_store.save_pca(path, pca, fingerprint)
        logging.info(f"PCA saved in {path}")
    on_rank_0(world, fit_and_save)
    return descriptor_store.load_pca(path, fingerprint)


def elapsed(start_time):
    return timedelta(seconds=round((datetime.now() - start_time).total_seconds()))


def main(argv=None):
    # Setup
    start_time = datetime.now()
    args = parser.parse_arguments(argv)
    # Under torchrun every process extracts its share of the descriptors; rank 0 alone writes the run folder
    world = commons.setup_distributed(args.device)
    output_folder = on_rank_0(world, lambda: commons.make_run_folder(LOGS_FOLDER, args.save_dir, start_time))
    commons.set_progress_bars(False if args.quiet else None)
    if world.rank == 0:
        commons.setup_logging(output_folder, console="warning" if args.quiet else "debug")
        commons.log_command_and_arguments(args)
    else:
        commons.setup_worker_logging(world.rank)
    commons.make_deterministic(args.seed)
    memory_allocator.keep_freed_memory()
    logging.info(commons.describe_run_folder(output_folder))
    descriptors_folder = descriptors_folder_of(args, output_folder, world)

    # Model
    model = network.build_model(args)
    if args.resume is not None:
        load_resume(args, model)
    model = model.to(world.device)
    pca = load_or_fit_pca(args, model, descriptors_folder, world) if args.pca_dim is not None else None
    descriptor_size = args.pca_dim if pca is not None else model.features_dim

    # Data
    if args.queries_folder is not None:
        database_paths = folder_images(args.database_folder, "database_folder")
        queries_paths = folder_images(args.queries_folder, "queries_folder")
        test_ds = None
        datasets = {"folders": {"database_folder": os.path.abspath(args.database_folder),
                                "queries_folder": os.path.abspath(args.queries_folder),
                                "database_num": len(database_paths), "queries_num": len(queries_paths)}}
        logging.info(f"Matching {len(queries_paths)} queries of {args.queries_folder} against "
                     f"{len(database_paths)} database images of {args.database_folder}")
    else:
        test_ds = datasets_ws.GeoDataset(args.datasets_folder, args.dataset_name, "test",
                                         args.val_positive_dist_threshold)
        database_paths, queries_paths = test_ds.database_paths, test_ds.queries_paths
        datasets = {"test": test_ds}
        logging.info(f"Test set: {test_ds}")

    if world.world_size > 1:
        logging.info(f"{world.world_size} processes extract the descriptors into {descriptors_folder}")
        extraction.extract_descriptors(args, database_paths, queries_paths, model, args.test_method, pca,
                                       descriptors_folder, world)
        if world.rank != 0:  # rank 0 searches what every process extracted
            commons.cleanup_distributed()
            return

    # Test
    writer = (predictions.DescriptorWriter(output_folder, database_paths, queries_paths)
              if args.save_descriptors else None)
    recalls_by_split = {}
    if test_ds is None:
        top_k = args.save_predictions or max(args.recall_values)
        retrieval = test.retrieve(args, database_paths, queries_paths, model, args.test_method, pca, top_k,
                                  on_descriptors=writer, descriptors_folder=descriptors_folder)
        extraction_seconds, search_seconds = retrieval.extraction_seconds, retrieval.search_seconds
        top_predictions, top_distances = retrieval.top(top_k)
        predictions.log_matches(queries_paths, database_paths, top_predictions, top_distances)
        predictions.save_predictions(output_folder, queries_paths, database_paths, top_predictions, top_distances,
                                     args.seed)
    else:
        evaluation = test.evaluate(args, test_ds, model, args.test_method, pca, k=args.save_predictions,
                                   on_descriptors=writer, descriptors_folder=descriptors_folder)
        extraction_seconds, search_seconds = evaluation.extraction_seconds, evaluation.search_seconds
        recalls_by_split["test"] = evaluation.recalls
        logging.info(f"Recalls on {test_ds}: {evaluation.recalls_str}")
        if args.save_predictions is not None:
            top_predictions, top_distances = evaluation.retrieval.top(args.save_predictions)
            predictions.save_predictions(
                output_folder, queries_paths, database_paths, top_predictions, top_distances, args.seed,
                test_ds.soft_positives_per_query,
                metrics.positives_mask(top_predictions, test_ds.soft_positives_per_query),
                test_ds.queries_utms, test_ds.database_utms)
    if writer is not None:
        writer.close()

    # Results
    timings = {"extraction_seconds": extraction_seconds, "search_seconds": search_seconds,
               "total_seconds": (datetime.now() - start_time).total_seconds()}
    run_results = results.write_results(output_folder, args, model, recalls_by_split, timings, datasets,
                                        descriptor_size, script="eval.py", start_time=start_time)
    logging.info(f"Finished in {elapsed(start_time)}")
    results.print_result_line(run_results)
    commons.cleanup_distributed()


if __name__ == "__main__":
    commons.exit_on_user_error(main)
    commons.exit_now()
