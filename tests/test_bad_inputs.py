"""Bad input through the real command line: each row of BAD_INPUTS runs train.py or eval.py in a subprocess, in a
folder of its own with a tiny dataset, and checks the exit status (2: a flag error, from argparse; 1: another
user error, one `error: ...` line on stderr; 0: input that must work, or be clamped with a warning), the message,
what the run leaves behind, and that no traceback is printed.

The rows run a few at a time (they are separate processes): the module's fixture starts every selected row, each
test checks one.
"""
import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import commons
import network
import results
import tiny_dataset

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_RUNNER = os.path.join(REPO, "tests", "run_with_checkpoint_fault.py")
DATASET = "tiny"
RESIZE = (32, 32)
# Every row runs in its own folder: the datasets in data/, the run folders in logs/
COMMON_FLAGS = ["--datasets_folder", "data", "--dataset_name", DATASET, "--pretrain", "none", "--backbone",
                "resnet18conv4", "--aggregation", "gem", "--resize", *map(str, RESIZE), "--device", "cpu",
                "--num_workers", "0", "--infer_batch_size", "8"]
TRAIN_FLAGS = ["--epochs_num", "1", "--queries_per_epoch", "4", "--cache_refresh_rate", "4", "--train_batch_size", "2",
               "--negs_num_per_query", "2", "--neg_samples_num", "8"]
ALL_SPLITS = ("train", "val", "test")
# No row may use the network: downloads go to a closed port and fail at once
OFFLINE = {name: "http://127.0.0.1:9" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
OFFLINE.update(no_proxy="", NO_PROXY="")
PARALLEL_ROWS = max(1, min(4, os.cpu_count() or 1))


class Row(NamedTuple):
    """One bad input. `prepare(folder)` writes what the run needs into its folder and returns its flags (after
    COMMON_FLAGS). `message`: a regular expression searched in stderr (errors) or stdout (runs that work).
    `check(folder, completed)`: what else the run must have left behind."""
    name: str
    script: str
    prepare: Callable
    status: int
    message: str
    check: Optional[Callable] = None
    fault: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------
# What the rows write

def dataset_path(folder, *parts):
    return os.path.join(folder, "data", DATASET, *parts)


def images_folder(folder, kind, split="test"):
    return dataset_path(folder, "images", split, kind)


def with_dataset(*flags, splits=("test",)):
    """prepare(): the tiny dataset, then `flags`."""
    def prepare(folder):
        tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET, splits)
        return list(flags)
    return prepare


def make_folder(folder, name):
    os.makedirs(os.path.join(folder, name))
    return name


def with_extra_file(kind, name, content, *flags, splits=("test",)):
    """prepare(): the tiny dataset plus one more file among its test images; content: bytes, or a function
    (path) that writes the file."""
    def prepare(folder):
        tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET, splits)
        path = os.path.join(images_folder(folder, kind), name)
        if callable(content):
            content(path)
        else:
            with open(path, "wb") as file:
                file.write(content)
        return list(flags)
    return prepare


def truncated_jpeg(path):
    Image.fromarray(tiny_dataset.noise_picture("truncated", 64)).save(path, format="JPEG")
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[:len(data) // 2])


def with_test_split_changed(change):
    """prepare(): the dataset (val and test splits), then change(test split folder)."""
    def prepare(folder):
        tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET, ("val", "test"))
        change(dataset_path(folder, "images", "test"))
        return []
    return prepare


def remove_queries_folder(split_folder):
    shutil.rmtree(os.path.join(split_folder, "queries"))


def empty_database_folder(split_folder):
    shutil.rmtree(os.path.join(split_folder, "database"))
    os.makedirs(os.path.join(split_folder, "database"))


def image_modes(folder):
    """Database images in other modes than RGB (greyscale, RGBA, 16-bit greyscale, palette), each with a query
    that is the same picture in RGB: read as RGB, each pair gives the same descriptor, so R@1 is 100."""
    data = os.path.join(folder, "data")
    tiny_dataset.write_split(data, DATASET, "test", database_eastings=(), queries_eastings=())
    pictures = {}
    grey = Image.fromarray(tiny_dataset.noise_picture("grey")).convert("L")  # values from 0 to 255
    pictures[0] = (grey, grey.convert("RGB"))
    rgb = Image.fromarray(tiny_dataset.noise_picture("rgba"))
    pictures[100] = (rgb.convert("RGBA"), rgb)
    other_grey = Image.fromarray(tiny_dataset.noise_picture("16-bit")).convert("L")
    sixteen_bit = Image.fromarray(np.asarray(other_grey).astype(np.uint16) * 257)  # values from 0 to 65535
    assert sixteen_bit.mode.startswith("I;16")
    pictures[200] = (sixteen_bit, other_grey.convert("RGB"))
    palette = Image.fromarray(tiny_dataset.noise_picture("palette")).quantize(16)
    pictures[300] = (palette, palette.convert("RGB"))
    for east, (database_picture, query_picture) in pictures.items():
        database_picture.save(os.path.join(images_folder(folder, "database"), tiny_dataset.image_name(east)))
        query_picture.save(os.path.join(images_folder(folder, "queries"), tiny_dataset.image_name(east + 2)))
    return []


def with_a_far_query(folder):
    """One more test query, far from every database image."""
    tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET)
    tiny_dataset.write_images(images_folder(folder, "queries"), [9000], "far")
    return []


def with_far_training_queries(folder):
    """Every training query far from the training database."""
    tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET, ("val", "test"))
    tiny_dataset.write_split(os.path.join(folder, "data"), DATASET, "train", tiny_dataset.TRAIN_DATABASE_EASTINGS,
                             (5000, 6000))
    return TRAIN_FLAGS


# Checkpoints

def model_state_dict(**model_flags):
    torch.manual_seed(1)
    options = {"backbone": "resnet18conv4", "aggregation": "gem", **model_flags}
    return network.make_model(options.pop("backbone"), options.pop("aggregation"), pretrain="none", resize=RESIZE,
                              **options).state_dict()


def with_checkpoint(write, *flags):
    """prepare(): the dataset and a checkpoint written by write(path); flags: --resume it, then `flags`."""
    def prepare(folder):
        tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET)
        path = os.path.join(folder, "model.pth")
        write(path)
        return ["--resume", "model.pth", *flags]
    return prepare


def empty_file(path):
    open(path, "wb").close()


def truncated_checkpoint(path):
    torch.save({"model_state_dict": model_state_dict()}, path)
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[:len(data) // 2])


def checkpoint_of(**model_flags):
    def write(path):
        torch.save({"model_state_dict": model_state_dict(**model_flags)}, path)
    return write


def original_zoo_checkpoint(path):
    """As the original benchmark saves them: DataParallel's `module.` prefix, NumPy recalls and best R@5."""
    torch.save({"epoch_num": 3, "model_state_dict": {f"module.{k}": v for k, v in model_state_dict().items()},
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "recalls": np.array([50.0, 70.0, 80.0]),
                "best_r5": np.float64(70.0), "not_improved_num": 0}, path)


def checkpoint_with_objects(path):
    """Weights plus an object only full unpickling can rebuild (the original stored its args so)."""
    torch.save({"model_state_dict": model_state_dict(), "args": argparse.Namespace(lr=1e-5)}, path)


# Run folders

def existing_run_folders(folder):
    """Run folders for each second of the next minutes, as left by other runs: this run's name is taken."""
    now = datetime.now()
    for second in range(-5, 300):
        name = (now + timedelta(seconds=second)).strftime(commons.RUN_FOLDER_TIME_FORMAT)
        run_folder = os.path.join(folder, "logs", "default", name)
        os.makedirs(run_folder)
        with open(os.path.join(run_folder, "info.log"), "w") as file:
            file.write("another run\n")
    return with_dataset()(folder)


def logs_folder_is_a_file(folder):
    with open(os.path.join(folder, "logs"), "w") as file:
        file.write("not a folder\n")
    return with_dataset()(folder)


def read_only_logs_folder(folder):
    os.makedirs(os.path.join(folder, "logs", "default"))
    os.chmod(os.path.join(folder, "logs", "default"), 0o555)
    return with_dataset()(folder)


# ----------------------------------------------------------------------------------------------------------
# What the rows leave behind

def run_folders(folder):
    root = os.path.join(folder, "logs", "default")
    return sorted(os.path.join(root, name) for name in os.listdir(root)) if os.path.isdir(root) else []


def result_of(completed):
    lines = [line for line in completed.stdout.splitlines() if line.startswith(results.RESULT_LINE_PREFIX)]
    assert len(lines) == 1, completed.stdout[-2000:]
    return results.parse_result_line(lines[0])


def recalls_are(**expected):
    def check(folder, completed):
        result = result_of(completed)
        assert {name: result[name.replace("R", "R@")] for name in expected} == expected
    return check


def no_run_folder(folder, completed):
    assert run_folders(folder) == []


def one_checkpoint_of_epoch(epoch_num):
    def check(folder, completed):
        run_folder, = run_folders(folder)
        files = os.listdir(run_folder)
        assert not [name for name in files if ".partial" in name], files
        last = checkpoint.load_checkpoint(os.path.join(run_folder, "last_model.pth"))
        assert last["epoch_num"] == epoch_num
    return check


def nothing_downloaded(folder, completed):
    """Not even a partial file."""
    assert os.listdir(os.path.join(folder, "data", "model_zoo")) == []


def new_folder_beside_the_existing_one(folder, completed):
    taken = [path for path in run_folders(folder) if re.search(r"_\d+$", os.path.basename(path))]
    assert len(taken) == 1, taken
    new_folder = taken[0]
    old_folder = new_folder.rsplit("_", 1)[0]
    assert os.listdir(old_folder) == ["info.log"]
    with open(os.path.join(old_folder, "info.log")) as file:
        assert file.read() == "another run\n"
    assert os.path.isfile(os.path.join(new_folder, "results.json"))
    with open(os.path.join(new_folder, "info.log")) as file:
        assert f"The outputs are being saved in {os.path.relpath(new_folder, folder)} " \
               f"({os.path.relpath(old_folder, folder)} already exists" in file.read()


# ----------------------------------------------------------------------------------------------------------
# The table

R = re.escape
UNREADABLE = r"\. The file is corrupt, truncated or not an image: replace it or remove it from the dataset\."
BAD_NAME = (r"Cannot read UTM coordinates from the file name of data/tiny/images/test/database/{}: it should look "
            r"like '@<utm_east>@<utm_north>@\.\.\.@\.jpg'")

BAD_INPUTS = [
    # Flags
    Row("unknown_flag", "eval.py", with_dataset("--not_a_flag", "3"), 2, r"unrecognized arguments: --not_a_flag 3"),
    Row("unknown_choice", "eval.py", with_dataset("--aggregation", "avg"), 2,
        r"argument --aggregation: invalid choice: 'avg' \(choose from .*'netvlad', 'gem'"),
    Row("incompatible_backbone_and_aggregation", "eval.py", with_dataset("--aggregation", "cls"), 2,
        R("--aggregation cls does not work with --backbone resnet18conv4; with this backbone use one of: ")),
    Row("pca_without_its_images", "eval.py", with_dataset("--pca_dim", "4"), 2,
        R("--pca_dim needs --pca_dataset_folder")),
    Row("queries_per_epoch_not_a_multiple", "train.py", with_dataset("--queries_per_epoch", "10"), 2,
        R("--queries_per_epoch (10) must be a multiple of --cache_refresh_rate (1000): change one of them")),
    Row("cache_refresh_smaller_than_batch", "train.py",
        with_dataset(*TRAIN_FLAGS, "--train_batch_size", "8", splits=ALL_SPLITS), 1,
        R("--cache_refresh_rate 4 is smaller than --train_batch_size 8: no full batch could be trained"),
        no_run_folder),
    # Dataset folders
    Row("dataset_not_found", "eval.py", with_dataset("--dataset_name", "nowhere"), 2,
        R("dataset 'nowhere' not found in data (from --datasets_folder). Pass --datasets_folder=")),
    Row("split_missing", "eval.py", with_test_split_changed(shutil.rmtree), 1,
        R("The test split is missing: data/tiny/images/test does not exist")),
    Row("queries_folder_missing", "eval.py", with_test_split_changed(remove_queries_folder), 1,
        R("Missing folder data/tiny/images/test/queries: a split needs both database/ and queries/ folders")),
    Row("database_folder_empty", "eval.py", with_test_split_changed(empty_database_folder), 1,
        R("No images in data/tiny/images/test/database (looked for .jpg, .jpeg, .png files, recursively)")),
    Row("query_folder_without_images", "eval.py",
        lambda folder: with_dataset()(folder) + ["--queries_folder", make_folder(folder, "photos"),
                                                 "--database_folder", "data/tiny/images/test/database"], 1,
        R("--queries_folder photos: no images there")),
    # Image names and files
    Row("name_without_coordinates", "eval.py", with_extra_file("database", "photo.png", b""), 1,
        BAD_NAME.format(R("photo.png"))),
    Row("non_numeric_coordinates", "eval.py", with_extra_file("queries", "@east@north@.png", b""), 1,
        BAD_NAME.replace("database", "queries").format(R("@east@north@.png"))),
    Row("corrupt_image", "eval.py", with_extra_file("database", "@600.00@0.00@.png", bytes(range(256)) * 4), 1,
        R("Cannot read the image data/tiny/images/test/database/@600.00@0.00@.png (") + ".*" + UNREADABLE),
    Row("truncated_image", "eval.py", with_extra_file("database", "@600.00@0.00@.jpg", truncated_jpeg), 1,
        R("Cannot read the image data/tiny/images/test/database/@600.00@0.00@.jpg (") + ".*" + UNREADABLE),
    Row("zero_byte_image", "eval.py", with_extra_file("queries", "@600.00@0.00@.jpg", b""), 1,
        R("Cannot read the image data/tiny/images/test/queries/@600.00@0.00@.jpg (") + ".*" + UNREADABLE),
    Row("text_file_named_as_an_image", "eval.py",
        with_extra_file("database", "@600.00@0.00@.png", b"GPS log, not a picture\n"), 1,
        R("Cannot read the image data/tiny/images/test/database/@600.00@0.00@.png (") + ".*" + UNREADABLE),
    Row("other_files_among_the_images_are_skipped", "eval.py",
        with_extra_file("database", "notes.txt", b"taken on a sunny day\n"), 0,
        R("Test set: < tiny - #database: 6; #queries: 3 >"), lambda folder, completed: result_of(completed)),
    Row("greyscale_rgba_16_bit_and_palette_images_work", "eval.py", image_modes, 0,
        R("Test set: < tiny - #database: 4; #queries: 4 >"), recalls_are(R1=100.0)),
    # Sizes: clamped with a warning
    Row("database_smaller_than_the_largest_recall", "eval.py", with_dataset(), 0,
        R("The database has 6 images, fewer than the 20 predictions per query asked for"),
        recalls_are(R10=100.0, R20=100.0)),
    Row("database_smaller_than_neg_samples_num", "train.py",
        with_dataset(*TRAIN_FLAGS, "--neg_samples_num", "1000", splits=ALL_SPLITS), 0,
        R("--neg_samples_num 1000 is larger than the training database (12 images): sampling all of it"),
        one_checkpoint_of_epoch(0)),
    Row("query_without_positives", "eval.py", with_a_far_query, 0,
        R("1 of 4 queries have no database image within 25 m"),
        recalls_are(R20=75.0)),
    Row("no_training_query_has_positives", "train.py", with_far_training_queries, 1,
        R("No training query of data/tiny/images/train has a database image within 10 m "
          "(--train_positives_dist_threshold): raise the threshold")),
    # Checkpoints
    Row("checkpoint_missing", "eval.py", with_dataset("--resume", "runs/model.pth"), 1,
        R("--resume runs/model.pth: no such file; check the path")),
    Row("checkpoint_empty", "eval.py", with_checkpoint(empty_file), 1,
        R("Checkpoint model.pth is empty (an interrupted download or copy?); fetch it again")),
    Row("checkpoint_truncated", "eval.py", with_checkpoint(truncated_checkpoint), 1,
        R("Cannot read model.pth as a PyTorch checkpoint: it is truncated, corrupted or not a checkpoint")),
    Row("checkpoint_of_another_shape", "eval.py", with_checkpoint(checkpoint_of(fc_output_dim=8), "--fc_output_dim",
                                                                  "16"), 1,
        R("model.pth does not fit the model built from your flags: first layer with a different shape: "
          "aggregation.1.weight is [8, 256] in the checkpoint, [16, 256] in the model")),
    Row("checkpoint_of_another_backbone", "eval.py", with_checkpoint(checkpoint_of(backbone="resnet18conv5")), 1,
        R("model.pth does not fit the model built from your flags: ") + ".*" +
        R("hint: the checkpoint has a conv5 (layer4) backbone: use a ...conv5 --backbone")),
    Row("checkpoint_of_the_original_zoo_loads", "eval.py", with_checkpoint(original_zoo_checkpoint), 0,
        R("Loaded the model weights from model.pth")),
    Row("model_zoo_name_offline", "eval.py", with_dataset("--resume", "resnet18-gem-pitts30k"), 1,
        R("Could not download the model zoo checkpoint resnet18-gem-pitts30k from Google Drive") + ".*" +
        R("Download it yourself and put it at ") + ".*" + R("data/model_zoo/resnet18-gem-pitts30k.pth"),
        nothing_downloaded),
    Row("checkpoint_that_runs_code_is_refused", "eval.py", with_checkpoint(checkpoint_with_objects), 1,
        R("model.pth holds Python objects that need arbitrary code to unpickle") + ".*" + R("argparse.Namespace")
        + ".*" + R("a malicious file could run code. If you trust where the file comes from, pass "
                   "--trust_checkpoint to load it anyway")),
    Row("checkpoint_that_runs_code_with_trust", "eval.py",
        with_checkpoint(checkpoint_with_objects, "--trust_checkpoint"), 0,
        R("Loading model.pth with full unpickling (--trust_checkpoint)")),
    # PCA
    Row("pca_dim_above_the_images", "eval.py",
        with_dataset("--pca_dim", "7", "--pca_dataset_folder", "tiny/images/test/database"), 1,
        R("--pca_dim 7 is larger than the number of images to fit PCA on (6): use --pca_dim <= 6")),
    Row("pca_dim_above_the_descriptor_size", "eval.py",
        with_dataset("--fc_output_dim", "4", "--pca_dim", "5", "--pca_dataset_folder", "tiny/images/test/database"),
        1, R("--pca_dim 5 is larger than the descriptor size (4): use --pca_dim <= 4")),
    # Run folders and the disk
    Row("run_folder_exists", "eval.py", existing_run_folders, 0, R("already exists, from another run"),
        new_folder_beside_the_existing_one),
    Row("logs_folder_is_a_file", "eval.py", logs_folder_is_a_file, 1,
        R("Cannot create the logs folder logs/default: ") + ".*" + R("Run from a writable folder or pass another "
                                                                      "--save_dir.")),
    Row("logs_folder_not_writable", "eval.py", read_only_logs_folder, 1,
        R("The logs folder logs/default is not writable. Fix its permissions"),
        # Root may write into any folder of its permissions: for it, the folder is on a read-only file system
        fault="read_only:logs/default" if os.geteuid() == 0 else None),
    Row("disk_full_while_saving_a_checkpoint", "train.py",
        with_dataset(*TRAIN_FLAGS, "--epochs_num", "2", splits=ALL_SPLITS), 1,
        R("No space left on the disk while writing ") + r"logs/default/[\d_-]+/last_model\.pth" +
        R("; the previous file there (if any) is intact. Free some space and resume with --resume"),
        one_checkpoint_of_epoch(0), fault="disk_full:last_model.pth:2"),
]


# ----------------------------------------------------------------------------------------------------------
# Running the rows

class Outcome(NamedTuple):
    folder: str
    completed: subprocess.CompletedProcess


def run_row(row, folder):
    os.makedirs(folder)
    flags = COMMON_FLAGS + row.prepare(folder)
    command = [sys.executable] + ([FAULT_RUNNER, row.fault] if row.fault else []) + [os.path.join(REPO, row.script)]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=os.path.join(folder, "torch_home"), **OFFLINE)
    completed = subprocess.run(command + flags, cwd=folder, capture_output=True, text=True, timeout=600,
                               env=environment)
    return Outcome(folder, completed)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected row run, PARALLEL_ROWS at a time: {row name: Outcome}."""
    selected = [item.callspec.params["row"] for item in request.session.items
                if item.module is request.module and "row" in getattr(getattr(item, "callspec", None), "params", {})]
    root = tmp_path_factory.mktemp("bad_inputs")
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_ROWS) as pool:
        futures = {row.name: pool.submit(run_row, row, str(root / row.name)) for row in selected}
        return {name: future.result() for name, future in futures.items()}


def test_the_table_has_at_least_25_rows_with_unique_names():
    names = [row.name for row in BAD_INPUTS]
    assert len(names) == len(set(names)) and len([row for row in BAD_INPUTS if row.status != 0]) >= 25


def _read(path):
    with open(path) as file:
        return file.read()


@pytest.mark.parametrize("row", BAD_INPUTS, ids=[row.name for row in BAD_INPUTS])
def test_bad_input(row, outcomes):
    folder, completed = outcomes[row.name]
    report = (f"exit status {completed.returncode}\nstdout:\n{completed.stdout[-3000:]}\n"
              f"stderr:\n{completed.stderr[-3000:]}")
    assert completed.returncode == row.status, report
    # What the user sees is stdout and stderr together: no traceback in either; it belongs in debug.log
    assert "Traceback" not in completed.stderr and "Traceback" not in completed.stdout, report
    if row.status == 1:
        for debug_log in glob.glob(os.path.join(folder, "logs", "*", "*", "debug.log")):
            assert "Traceback" in _read(debug_log), debug_log
    if row.status == 0:
        assert re.search(row.message, completed.stdout), report
    else:
        error_lines = [line for line in completed.stderr.splitlines() if re.match(r"^(\S+: )?error: ", line)]
        assert len(error_lines) == 1, report
        assert re.search(row.message, error_lines[0]), report
    if row.check is not None:
        row.check(folder, completed)
