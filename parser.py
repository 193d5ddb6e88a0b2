"""Every command-line flag of train.py and eval.py: parsing, validation, derived values.

Flag names, types and defaults follow the original benchmark, so its commands work unchanged; the choices of the
pluggable axes come from their registries. Every bad flag or bad combination ends as an argparse error (exit
status 2) with one line that says what is wrong and how to fix it.
"""
import argparse
import os
import sys

import torch

from descriptor_store import DESCRIPTOR_DTYPES
from indexes import DEFAULT_MAX_RAM_GB, FAISS_INDEXES, IndexParams
from model.aggregations import AGGREGATIONS
from model.backbones import BACKBONES
from model.parts import option_values
from network import compatibility_error, off_the_shelf_error, options_error, pretrain_error, resize_error
from recipes import RECIPES
from test_methods import TEST_METHODS
from model.zoo import PRETRAININGS, named_model
from optimization import OPTIMIZERS, SCHEDULERS
from util import OFF_THE_SHELF_MODELS

REPO_FOLDER = os.path.dirname(os.path.abspath(__file__))
# Where the demo generates its synthetic dataset; the last fallback of --datasets_folder
DEFAULT_DATASETS_FOLDER = os.path.join(REPO_FOLDER, "data", "datasets")
DATASETS_FOLDER_ENV = "DATASETS_FOLDER"

# Older spellings used in the original README and code, accepted as aliases of the current names
BACKBONE_ALIASES = {"r18l3": "resnet18conv4", "r18l4": "resnet18conv5", "r50l3": "resnet50conv4",
                    "r50l4": "resnet50conv5", "r101l3": "resnet101conv4", "r101l4": "resnet101conv5"}
TEST_METHOD_ALIASES = {"five_crops_mean": "five_crops", "majority_voting": "maj_voting"}


def _with_aliases(aliases):
    """argparse `type` that maps an old spelling to its current name before `choices` is checked."""
    def convert(value):
        return aliases.get(value, value)
    return convert


def _default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_num_workers(device, cpu_count=None):
    """Loading workers for --device: with a GPU the original's 8 (at most one per core); on the CPU, where the
    model itself uses every core and decoding and resizing an image costs a few percent of its forward pass, one
    worker per 4 cores (at most 8). Below 4 cores none: images load in the main process, between batches. A
    worker could only run on a core the model is using, and each batch it hands over goes through new shared
    memory that both processes fault in (the README's Performance section has the measurement)."""
    cpu_count = cpu_count or os.cpu_count() or 1
    if device == "cuda":
        return min(8, cpu_count)
    return min(8, cpu_count // 4)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Deep visual geo-localization benchmark: train and evaluate place-recognition models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    group = parser.add_argument_group("training")
    group.add_argument("--recipe", type=str, default="triplets", choices=list(RECIPES),
                       help="How to train: triplets is the original's (hard negatives mined over a feature cache)")
    group.add_argument("--train_batch_size", type=int, default=4,
                       help="Number of triplet groups (query, positive, negatives) in a batch; each group holds "
                            "2 + negs_num_per_query images")
    group.add_argument("--infer_batch_size", type=int, default=16,
                       help="Batch size for inference (caching and testing)")
    group.add_argument("--epochs_num", type=int, default=1000, help="Maximum number of epochs to train for")
    group.add_argument("--patience", type=int, default=3,
                       help="Stop after this many epochs without improvement of the validation R@5")
    group.add_argument("--lr", type=float, default=0.00001, help="Learning rate")
    group.add_argument("--optim", type=str, default="adam", choices=list(OPTIMIZERS), help="Optimizer")
    group.add_argument("--weight_decay", type=float, default=None,
                       help="Weight decay (default: the original's, 0.001 with sgd and none with adam; 0.01 with "
                            "adamw)")
    group.add_argument("--scheduler", type=str, default="none", choices=list(SCHEDULERS),
                       help="Learning-rate schedule: multistep multiplies it by --lr_gamma at each of --lr_milestones "
                            "(epochs); linear goes from 1 to --lr_end_factor times --lr over --lr_decay_steps steps")
    group.add_argument("--lr_milestones", type=int, nargs="*", default=[5, 10, 15, 25, 45], metavar="EPOCH",
                       help="Epochs where multistep lowers the learning rate (MixVPR's)")
    group.add_argument("--lr_gamma", type=float, default=0.3, help="Factor of multistep at each milestone (MixVPR's)")
    group.add_argument("--lr_end_factor", type=float, default=0.2, help="Final factor of linear (SALAD's)")
    group.add_argument("--lr_decay_steps", type=int, default=4000, help="Steps of the linear decay (SALAD's)")
    group.add_argument("--warmup_steps", type=int, default=0,
                       help="Optimizer steps of a linear warm-up of the learning rate, with any --scheduler")
    group.add_argument("--train_resize", type=int, default=None, nargs=2, metavar=("H", "W"),
                       help="Size of the training images (default: --resize)")
    group.add_argument("--rand_augment", type=int, default=None, nargs=2, metavar=("N", "M"),
                       help="RandAugment of the training images (queries for triplets): N operations of magnitude M, "
                            "after the resize (the GSV-Cities methods use 3 9)")
    group.add_argument("--queries_per_epoch", type=int, default=5000,
                       help="Number of queries per epoch; must be a multiple of cache_refresh_rate")

    group = parser.add_argument_group("model")
    group.add_argument("--backbone", type=_with_aliases(BACKBONE_ALIASES), default="resnet18conv4",
                       choices=list(BACKBONES),
                       help="Backbone; ResNets are cut after conv4 (layer3) or conv5 (layer4). Old spellings "
                            "r18l3 ... r101l4 are accepted")
    group.add_argument("--l2", type=str, default="before_pool", choices=["before_pool", "after_pool", "none"],
                       help="Where to L2-normalise with the shallow poolings (gem, spoc, mac, rmac)")
    group.add_argument("--aggregation", type=str, default="netvlad", choices=list(AGGREGATIONS),
                       help="Aggregation (pooling) layer")
    group.add_argument("--pca_dim", type=int, default=None,
                       help="PCA dimension applied to descriptors at test time (needs --pca_dataset_folder)")
    group.add_argument("--fc_output_dim", type=int, default=None,
                       help="Output dimension of a fully connected layer added after the aggregation")
    group.add_argument("--pretrain", "--pretrained", type=str, default="imagenet", choices=list(PRETRAININGS),
                       help="Initial weights of the backbone; 'none' gives random weights (works offline)")
    group.add_argument("--off_the_shelf", type=str, default="imagenet", choices=list(OFF_THE_SHELF_MODELS),
                       help="Off-the-shelf landmark-retrieval weights to evaluate (needs ResNet-50/101 conv5 + "
                            "GeM + --fc_output_dim 2048); 'imagenet' means none")

    group = parser.add_argument_group("initialization")
    group.add_argument("--seed", type=int, default=0, help="Seed of every random generator")
    group.add_argument("--resume", type=str, default=None,
                       help="Checkpoint to load: a path (ours or the original's model-zoo files) or a model-zoo "
                            "name; a last_model.pth continues training from its next epoch")
    group.add_argument("--trust_checkpoint", action="store_true",
                       help="Allow loading checkpoints that need arbitrary code to unpickle; only for trusted files")

    group = parser.add_argument_group("other")
    group.add_argument("--device", type=str, default=_default_device(),
                       choices=["cuda", "cpu"], help="Device (cuda when available)")
    group.add_argument("--num_workers", type=int, default=default_num_workers(_default_device()),
                       help="Number of data-loading worker processes (by default from the core count: 8 at most "
                            "with a GPU; on the CPU, whose cores the model itself uses, one per 4 cores, so none "
                            "below 4)")
    group.add_argument("--quiet", action="store_true",
                       help="No progress bars, and only warnings and errors on the console (info.log and debug.log "
                            "still get everything); without it, bars are shown when stderr is a terminal")
    group.add_argument("--resize", type=int, default=[480, 640], nargs=2, metavar=("H", "W"),
                       help="Resizing shape for images (HxW)")
    group.add_argument("--test_method", type=_with_aliases(TEST_METHOD_ALIASES), default="hard_resize",
                       choices=list(TEST_METHODS),
                       help="How queries are processed at test time (old spellings five_crops_mean and "
                            "majority_voting are accepted)")
    group.add_argument("--majority_weight", type=float, default=0.01,
                       help="Weight of the votes in maj_voting")
    group.add_argument("--efficient_ram_testing", action="store_true",
                       help="Test with memory that does not grow with queries x database (streamed search)")
    group.add_argument("--val_positive_dist_threshold", type=int, default=25,
                       help="Distance (metres) within which a database image is a positive at test time")
    group.add_argument("--train_positives_dist_threshold", type=int, default=10,
                       help="Distance (metres) within which a database image is a positive for training")
    group.add_argument("--recall_values", type=int, default=[1, 5, 10, 20], nargs="+",
                       help="Values of N for the Recall@N")

    group = parser.add_argument_group("data augmentation (queries)")
    group.add_argument("--brightness", type=float, default=0, help="Colour jitter: brightness")
    group.add_argument("--contrast", type=float, default=0, help="Colour jitter: contrast")
    group.add_argument("--saturation", type=float, default=0, help="Colour jitter: saturation")
    group.add_argument("--hue", type=float, default=0, help="Colour jitter: hue, in [0, 0.5]")
    group.add_argument("--rand_perspective", type=float, default=0, help="Random perspective distortion, in [0, 1]")
    group.add_argument("--horizontal_flip", "--horizontal_flipping", action="store_true",
                       help="Flip whole triplet batches horizontally at random")
    group.add_argument("--random_resized_crop", type=float, default=0,
                       help="Random resized crop: the smallest kept fraction of the image is 1 - this, in [0, 1)")
    group.add_argument("--random_rotation", type=float, default=0, help="Random rotation, in degrees")

    group = parser.add_argument_group("training speed")
    group.add_argument("--use_amp", action="store_true",
                       help="Mixed precision for training and feature caching: bfloat16 autocast (float16 with "
                            "loss scaling on GPUs without bfloat16)")

    group = parser.add_argument_group("paths")
    group.add_argument("--datasets_folder", type=str, default=None,
                       help=f"Folder with the datasets; else ${DATASETS_FOLDER_ENV}, else the demo's "
                            f"{os.path.relpath(DEFAULT_DATASETS_FOLDER, REPO_FOLDER)}")
    group.add_argument("--dataset_name", type=str, default="pitts30k", help="Name of the dataset (its folder)")
    group.add_argument("--pca_dataset_folder", type=str, default=None,
                       help="Folder (relative to --datasets_folder) of the images used to fit PCA, e.g. "
                            "pitts30k/images/train")
    group.add_argument("--save_dir", type=str, default="default",
                       help="Runs are saved in logs/<save_dir>/<date_time>/")

    group = parser.add_argument_group("evaluation outputs")
    group.add_argument("--save_predictions", type=int, default=None, metavar="K",
                       help="Save each query's top-K predictions as predictions/predictions.csv in the run folder, "
                            "and pictures of a sample of queries with their top-K")
    group.add_argument("--save_descriptors", action="store_true",
                       help="Save database and query descriptors (.npy) and their image paths (.txt) in the run "
                            "folder")
    group.add_argument("--queries_folder", type=str, default=None,
                       help="eval.py without coordinates: a folder of query images (any names) to match against "
                            "--database_folder; prints and saves each query's top-K, no recalls")
    group.add_argument("--database_folder", type=str, default=None,
                       help="eval.py without coordinates: the folder of database images (see --queries_folder)")

    group = parser.add_argument_group("large-scale search")
    index_defaults = IndexParams()
    group.add_argument("--faiss_index", type=str, default="flat", choices=list(FAISS_INDEXES),
                       help="Index searched: flat is exact (the reference); ivf, ivfpq and hnsw are approximate, "
                            "built from a sample of the database and saved with the descriptors")
    group.add_argument("--ivf_lists", type=int, default=index_defaults.ivf_lists,
                       help="Inverted lists of ivf / ivfpq (None: 4 x sqrt(database size))")
    group.add_argument("--ivf_probes", type=int, default=index_defaults.ivf_probes,
                       help="Lists visited per query by ivf / ivfpq")
    group.add_argument("--pq_bytes", type=int, default=index_defaults.pq_bytes,
                       help="Bytes per vector of ivfpq (sub-quantizers of 8 bits); must divide the descriptor size "
                            "(None: its largest divisor up to 64)")
    group.add_argument("--hnsw_m", type=int, default=index_defaults.hnsw_m, help="Neighbours per node of hnsw")
    group.add_argument("--hnsw_ef_construction", type=int, default=index_defaults.hnsw_ef_construction,
                       help="Candidate list size of hnsw while building")
    group.add_argument("--hnsw_ef_search", type=int, default=index_defaults.hnsw_ef_search,
                       help="Candidate list size of hnsw while searching (higher: slower and closer to exact)")
    group.add_argument("--index_train_size", type=int, default=index_defaults.index_train_size,
                       help="Database vectors sampled to train ivf / ivfpq (None: 64 per list, or per entry of "
                            "the 256-entry PQ codebooks if more)")
    group.add_argument("--descriptors_folder", type=str, default=None,
                       help="eval.py: keep descriptors (in shards), the PCA and the indexes here, to resume an "
                            "interrupted extraction or reuse them in later runs (default with a large-scale flag: "
                            "the run folder)")
    group.add_argument("--descriptors_dtype", type=str, default="float32", choices=list(DESCRIPTOR_DTYPES),
                       help="Type of the stored descriptors (float16 halves the disk space; search is in float32)")
    group.add_argument("--max_ram_gb", type=float, default=None,
                       help="Memory budget of descriptors, search blocks and index parts: they go to disk and are "
                            f"searched in chunks (default with another large-scale flag: {DEFAULT_MAX_RAM_GB})")
    group.add_argument("--pca_whiten", action="store_true",
                       help="Whiten the PCA-reduced descriptors (divide each component by its standard deviation)")

    for axis, registry in (("recipe", RECIPES), ("backbone", BACKBONES), ("aggregation", AGGREGATIONS)):
        add_part_options(parser, axis, registry)
    return parser


def _declarations(registry):
    """{flag name: [(entry name, Option), ...]} over a registry's entries, in order."""
    declared = {}
    for name, entry in registry.items():
        for option in entry.options:
            declared.setdefault(option.name, []).append((name, option))
    return declared


def add_part_options(parser, axis, registry):
    """Each option the parts of a registry declare, once, in a group titled by the parts that use it (so --help
    shows it under their names). Shared flags whose defaults differ default to None: the chosen part's default
    is filled in after parsing (`fill_part_defaults`)."""
    groups = {}
    for flag, declarations in _declarations(registry).items():
        names = tuple(name for name, _ in declarations)
        title = f"--{axis} {', '.join(names)}"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        option = declarations[0][1]
        defaults = {repr(declared.default) for _, declared in declarations}
        help_text = option.help
        if len(defaults) > 1:  # (%(default).0s prints nothing: it stops argparse from adding "default: None")
            help_text += " (default: " + ", ".join(f"{declared.default} with {name}"
                                                   for name, declared in declarations) + ")%(default).0s"
        groups[title].add_argument(f"--{flag}", type=option.type, help=help_text, choices=option.choices,
                                   default=option.default if len(defaults) == 1 else None, nargs=option.nargs,
                                   metavar=option.metavar)


def _chosen_parts(args):
    return ((RECIPES, args.recipe), (BACKBONES, args.backbone), (AGGREGATIONS, args.aggregation))


def given_flags(argv):
    """The destinations of the flags given on the command line `argv` (not left at their defaults)."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(_split_multi_value_equals(quiet, argv))))


def apply_named_model(parser, args, argv):
    """--resume <model-zoo name> fixes the architecture: its flags left out are filled in, a given flag that
    contradicts it is an error naming the flag; its evaluation size applies unless --resize is given."""
    model = named_model(args.resume) if args.resume else None
    if model is None:
        return
    given = given_flags(argv)
    for name, value in model.flags().items():
        if name not in given:
            setattr(args, name, value)
        elif name != "resize" and getattr(args, name) != value:
            parser.error(f"--resume {args.resume} is a model with --{name} {value}: remove --{name} "
                         f"{getattr(args, name)} (the model's architecture flags are filled in from its name)")


def fill_part_defaults(args):
    """Flags left at None take the default that the chosen recipe, backbone or aggregation declares (and
    --fc_output_dim the aggregation's own final layer, if it has one)."""
    for registry, name in _chosen_parts(args):
        for flag, value in option_values(registry[name].options, args).items():
            if getattr(args, flag, None) is None:
                setattr(args, flag, value)
    if args.fc_output_dim is None:
        args.fc_output_dim = AGGREGATIONS[args.aggregation].default_fc_output_dim


def _check_part_options(parser, args):
    """Every declared option's minimum; the chosen parts' own checks."""
    for registry in (RECIPES, BACKBONES, AGGREGATIONS):
        for flag, declarations in _declarations(registry).items():
            minimum = declarations[0][1].minimum
            value = getattr(args, flag)
            values = value if isinstance(value, (list, tuple)) else [value]
            if minimum is not None and any(v is not None and v < minimum for v in values):
                kind = "a positive integer" if minimum == 1 else f"at least {minimum}"
                parser.error(f"--{flag} must be {kind}, got {' '.join(map(str, values))}")
    recipe = RECIPES[args.recipe]
    for error in (recipe.check(args) if recipe.check else None, options_error(args)):
        if error:
            parser.error(error)


POSITIVE_INT_FLAGS = ("train_batch_size", "infer_batch_size", "epochs_num", "patience", "queries_per_epoch",
                      "val_positive_dist_threshold", "train_positives_dist_threshold", "lr_decay_steps")
OPTIONAL_POSITIVE_INT_FLAGS = ("pca_dim", "fc_output_dim")
NON_NEGATIVE_FLAGS = ("num_workers", "brightness", "contrast", "saturation", "random_rotation", "warmup_steps",
                      "lr_gamma", "lr_end_factor")


def _check_values(parser, args):
    """Range checks of single flags."""
    for name in POSITIVE_INT_FLAGS:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in OPTIONAL_POSITIVE_INT_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    for name in NON_NEGATIVE_FLAGS:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    for name in ("resize", "train_resize"):
        size = getattr(args, name)
        if size is not None and min(size) < 1:
            parser.error(f"--{name} needs two positive integers H W, got {size[0]} {size[1]}")
    if args.weight_decay is not None and args.weight_decay < 0:
        parser.error(f"--weight_decay must not be negative, got {args.weight_decay}")
    if args.rand_augment is not None and (args.rand_augment[0] < 1 or not 0 <= args.rand_augment[1] <= 30):
        parser.error(f"--rand_augment N M needs N >= 1 operations and a magnitude M in 0..30, got "
                     f"{' '.join(map(str, args.rand_augment))}")
    if min(args.recall_values) < 1:
        parser.error(f"--recall_values must be positive integers, got {' '.join(map(str, args.recall_values))}")
    if not 0 <= args.hue <= 0.5:
        parser.error(f"--hue must be in [0, 0.5], got {args.hue}")
    if not 0 <= args.rand_perspective <= 1:
        parser.error(f"--rand_perspective must be in [0, 1], got {args.rand_perspective}")
    if not 0 <= args.random_resized_crop < 1:
        parser.error(f"--random_resized_crop must be in [0, 1), got {args.random_resized_crop}")


def _check_combinations(parser, args):
    """The original's cross-flag checks, as errors that say how to fix the command."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    if args.pca_dim is not None and args.pca_dataset_folder is None:
        parser.error("--pca_dim needs --pca_dataset_folder, the images to fit PCA on (e.g. pitts30k/images/train)")
    for error in (compatibility_error(args.backbone, args.aggregation),
                  off_the_shelf_error(args.off_the_shelf, args.backbone, args.aggregation, args.fc_output_dim),
                  resize_error(args.backbone, args.resize, args.aggregation),
                  pretrain_error(args.backbone, args.pretrain)):
        if error:
            parser.error(error)


def _check_evaluation_outputs(parser, args):
    if args.save_predictions is not None and args.save_predictions < 1:
        parser.error(f"--save_predictions must be a positive integer (the K of top-K), got {args.save_predictions}")
    if (args.queries_folder is None) != (args.database_folder is None):
        parser.error("--queries_folder and --database_folder go together: pass both folders to match the queries "
                     "against the database")
    for name in ("queries_folder", "database_folder"):
        folder = getattr(args, name)
        if folder is not None and not os.path.isdir(folder):
            parser.error(f"--{name} {folder} is not a folder")


LARGE_SCALE_POSITIVE_INT_FLAGS = ("ivf_lists", "ivf_probes", "pq_bytes", "hnsw_m", "hnsw_ef_construction",
                                  "hnsw_ef_search", "index_train_size")


def _check_large_scale(parser, args):
    for name in LARGE_SCALE_POSITIVE_INT_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.max_ram_gb is not None and args.max_ram_gb <= 0:
        parser.error(f"--max_ram_gb must be positive (gigabytes), got {args.max_ram_gb}")
    if args.pca_whiten and args.pca_dim is None:
        parser.error("--pca_whiten whitens the PCA components: it needs --pca_dim (and --pca_dataset_folder)")


def resolve_datasets_folder(parser, args, require_dataset):
    """--datasets_folder, else $DATASETS_FOLDER, else the demo's folder; with a clear error when the chosen
    folder does not hold --dataset_name."""
    if args.datasets_folder is not None:
        folder, source = args.datasets_folder, "--datasets_folder"
    elif os.environ.get(DATASETS_FOLDER_ENV):
        folder, source = os.environ[DATASETS_FOLDER_ENV], f"${DATASETS_FOLDER_ENV}"
    else:
        folder, source = DEFAULT_DATASETS_FOLDER, "the default folder"
    if require_dataset and not os.path.isdir(os.path.join(folder, args.dataset_name)):
        parser.error(f"dataset '{args.dataset_name}' not found in {folder} (from {source}). Pass "
                     f"--datasets_folder=<folder holding {args.dataset_name}/images> or export "
                     f"{DATASETS_FOLDER_ENV}=<that folder>; the demo's synthetic dataset is made by "
                     "make_synthetic_dataset.py")
    return folder


def _split_multi_value_equals(parser, argv):
    """`--resize=384 512` (as the original README writes it) means `--resize 384 512`: argparse alone would give
    --resize a single value and reject the command."""
    multi_value = {option for action in parser._actions if action.nargs not in (None, 0, "?")
                   for option in action.option_strings}
    split = []
    for arg in argv:
        name, equals, value = arg.partition("=")
        split.extend([name, value] if equals and name in multi_value else [arg])
    return split


def parse_arguments(argv=None, require_dataset=True):
    """Parse, validate and derive. The returned namespace is read-only for the rest of the script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(_split_multi_value_equals(parser, argv))
    apply_named_model(parser, args, argv)
    fill_part_defaults(args)
    _check_values(parser, args)
    _check_part_options(parser, args)
    _check_combinations(parser, args)
    _check_evaluation_outputs(parser, args)
    _check_large_scale(parser, args)
    # Derived values
    # Matching two image folders needs no dataset
    args.datasets_folder = resolve_datasets_folder(parser, args, require_dataset and args.queries_folder is None)
    args.recall_values = sorted(set(args.recall_values))
    args.train_resize = args.train_resize or list(args.resize)
    return args
