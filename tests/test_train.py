"""train.py end to end on small synthetic datasets: it learns, it writes its run folder, it resumes after a crash."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import make_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
TINY = "train_tests_tiny"
TINY_FLAGS = ["--dataset_name", TINY, "--pretrain", "none", "--backbone", "resnet18conv4", "--aggregation", "gem",
              "--resize", "32", "48", "--device", "cpu", "--num_workers", "0", "--queries_per_epoch", "16",
              "--cache_refresh_rate", "8", "--neg_samples_num", "30", "--negs_num_per_query", "2",
              "--train_batch_size", "4", "--infer_batch_size", "8", "--lr", "0.001", "--patience", "10",
              "--mining", "full", "--brightness", "0.3", "--horizontal_flip"]


@pytest.fixture(scope="session")
def datasets_folder(request, tmp_path_factory):
    """Synthetic datasets, generated once and kept in pytest's cache folder between runs."""
    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir("synthetic_datasets")) if cache is not None else str(tmp_path_factory.mktemp("data"))
    make_synthetic_dataset.generate_dataset(folder, TINY, seed=5, train_database_num=50, train_queries_num=20,
                                            val_database_num=30, val_queries_num=10, test_database_num=30,
                                            test_queries_num=10, image_size=(48, 64))
    return folder


STREET = "train_tests_street"
STREET_FLAGS = ["--dataset_name", STREET, "--pretrain", "none", "--backbone", "resnet18conv4", "--aggregation", "gem",
                "--resize", "48", "64", "--device", "cpu", "--num_workers", "0", "--epochs_num", "6",
                "--queries_per_epoch", "32", "--cache_refresh_rate", "32", "--neg_samples_num", "40",
                "--negs_num_per_query", "2", "--train_batch_size", "4", "--lr", "0.001", "--patience", "30",
                "--save_dir", "learns"]


@pytest.fixture(scope="session")
def street_folder(datasets_folder):
    """One synthetic street whose training split is also the val and test splits.

    From random weights, a few seconds of training do not transfer to another street (the synthetic splits
    are different streets): this checks that the loop optimises retrieval, on the place it trained on.
    """
    street = os.path.join(datasets_folder, STREET)
    if not os.path.isdir(street):
        source = make_synthetic_dataset.generate_dataset(
            os.path.join(datasets_folder, "sources"), STREET, seed=7, train_database_num=60, train_queries_num=40,
            val_database_num=10, val_queries_num=5, test_database_num=10, test_queries_num=5, image_size=(48, 64))
        temporary = street + ".partial"
        shutil.rmtree(temporary, ignore_errors=True)
        for split in ("train", "val", "test"):
            shutil.copytree(os.path.join(source, "images", "train"), os.path.join(temporary, "images", split))
        os.replace(temporary, street)
    return datasets_folder


def _command(datasets_folder, flags, *extra):
    return [sys.executable, TRAIN, "--datasets_folder", datasets_folder, *flags, *extra]


def _environment():
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _run(cwd, command):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _run_folders(cwd, save_dir):
    return sorted(glob.glob(os.path.join(str(cwd), "logs", save_dir, "*")))


def _read(path):
    with open(path) as file:
        return file.read()


def _assert_same_training_state(first, second):
    for name, value in first["model_state_dict"].items():
        assert torch.equal(value, second["model_state_dict"][name]), name
    first_optimizer, second_optimizer = first["optimizer_state_dict"], second["optimizer_state_dict"]
    assert first_optimizer["param_groups"] == second_optimizer["param_groups"]
    for key, state in first_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(value, second_optimizer["state"][key][name]), (key, name)
    assert torch.equal(first["recipe_state"]["mining_state"]["neg_cache"],
                       second["recipe_state"]["mining_state"]["neg_cache"])


@pytest.mark.slow
def test_killed_run_resumes_at_the_next_epoch_and_matches_an_uninterrupted_one(tmp_path, datasets_folder):
    epochs = ["--epochs_num", "3"]
    # The reference: three epochs in one go
    _run(tmp_path, _command(datasets_folder, TINY_FLAGS, *epochs, "--save_dir", "reference"))
    reference_folder, = _run_folders(tmp_path, "reference")

    # The same run, killed (SIGKILL) once the third epoch has started
    process = subprocess.Popen(_command(datasets_folder, TINY_FLAGS, *epochs, "--save_dir", "killed"), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_environment())
    deadline = time.time() + 300
    killed_folder = None
    while time.time() < deadline and process.poll() is None:
        folders = _run_folders(tmp_path, "killed")
        if folders and "Start training epoch: 02" in _read(os.path.join(folders[0], "debug.log")):
            killed_folder = folders[0]
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert killed_folder is not None, "the run ended before it could be killed in its third epoch"
    files = set(os.listdir(killed_folder))
    assert {"last_model.pth", "best_model.pth"} <= files and not [f for f in files if f.endswith(".partial")]
    killed_last = checkpoint.load_checkpoint(os.path.join(killed_folder, "last_model.pth"))
    assert killed_last["epoch_num"] == 1  # the epoch in progress is lost, the finished ones are kept

    # Resume: a new run folder, starting at epoch 2, ending where the uninterrupted run ended
    result = _run(tmp_path, _command(datasets_folder, TINY_FLAGS, *epochs, "--save_dir", "resumed", "--resume",
                                     os.path.join(killed_folder, "last_model.pth")))
    resumed_folder, = _run_folders(tmp_path, "resumed")
    info = _read(os.path.join(resumed_folder, "info.log"))
    assert "Resuming from epoch 2 with best R@5" in info
    assert re.findall(r"Start training epoch: (\d+)", info) == ["02"]
    assert "RESULT {" in result.stdout
    resumed_last = checkpoint.load_checkpoint(os.path.join(resumed_folder, "last_model.pth"))
    reference_last = checkpoint.load_checkpoint(os.path.join(reference_folder, "last_model.pth"))
    assert resumed_last["epoch_num"] == reference_last["epoch_num"] == 2
    _assert_same_training_state(reference_last, resumed_last)
    assert resumed_last["recalls"] == reference_last["recalls"]
    # The best model of the killed run came along, so the final test has one even without improvement
    assert os.path.isfile(os.path.join(resumed_folder, "best_model.pth"))


@pytest.mark.slow
def test_training_from_random_weights_beats_the_untrained_model_on_the_street_it_trained_on(tmp_path, street_folder):
    import commons
    import datasets_ws
    import network
    import parser
    import test
    args = parser.parse_arguments(["--datasets_folder", street_folder, *STREET_FLAGS])
    commons.make_deterministic(args.seed)  # the same initial weights as train.py's
    test_ds = datasets_ws.GeoDataset(street_folder, STREET, "test", args.val_positive_dist_threshold)
    untrained_recalls, _ = test.test(args, test_ds, network.build_model(args))

    result = _run(tmp_path, _command(street_folder, STREET_FLAGS))
    run_folder, = _run_folders(tmp_path, "learns")
    assert {"info.log", "debug.log", "last_model.pth", "best_model.pth", "results.json"} <= set(os.listdir(run_folder))
    info = _read(os.path.join(run_folder, "info.log"))
    assert re.findall(r"Start training epoch: (\d+)", info) == [f"{e:02d}" for e in range(6)]
    assert "average epoch triplet loss" in info and "Cache: 0 / 1" in _read(os.path.join(run_folder, "debug.log"))
    trained_r1 = float(re.search(r"Recalls on < [^>]*>: R@1: ([\d.]+)", info).group(1))
    assert trained_r1 >= untrained_recalls[1] + 25, (untrained_recalls[1], trained_r1)  # 35.0 -> 87.5 here
    assert '"split": "test"' in result.stdout
    with open(os.path.join(run_folder, "results.json")) as file:
        timings = json.load(file)["timings"]
    assert 0 < timings["search_seconds"] < timings["extraction_seconds"] < timings["test_seconds"]
    last = checkpoint.load_checkpoint(os.path.join(run_folder, "last_model.pth"))
    assert last["epoch_num"] == 5


# ---------------------------------------------------------------------------------------------- pieces of train.py

def _args(*flags):
    import parser
    return parser.parse_arguments(["--device", "cpu", *flags], require_dataset=False)


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_optimizer_takes_the_trainable_parameters(optim):
    import network
    import optimization
    args = _args("--optim", optim, "--lr", "0.01")
    model = network.make_model("resnet18conv4", "gem", pretrain="none", resize=(32, 48))
    optimizer = optimization.make_optimizer(args, model)
    params = optimizer.param_groups[0]["params"]
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 0.01
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(params) < len(list(model.parameters()))  # the frozen stem and layers 1-2 are left out
    if optim == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 0.001


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_crn_has_its_own_learning_rate(optim):
    import network
    import optimization
    args = _args("--aggregation", "crn", "--resume", "x.pth", "--optim", optim, "--lr_crn_layer", "0.5",
                 "--lr_crn_net", "0.05")
    model = network.make_model("resnet18conv4", "crn", netvlad_clusters=8, pretrain="none", resize=(32, 48))
    crn_group, net_group = optimization.make_optimizer(args, model).param_groups
    crn_ids = {id(p) for p in model.aggregation.crn.parameters() if p.requires_grad}
    assert {id(p) for p in crn_group["params"]} == crn_ids and crn_group["lr"] == 0.5
    assert net_group["lr"] == 0.05 and not crn_ids & {id(p) for p in net_group["params"]}
    assert len(crn_group["params"]) + len(net_group["params"]) == \
        len([p for p in model.parameters() if p.requires_grad])


def test_autocast_dtype():
    import train
    assert train.autocast_dtype(False, torch.device("cpu")) is None
    assert train.autocast_dtype(True, torch.device("cpu")) == torch.bfloat16


def test_training_needs_r5_among_the_recall_values(tmp_path, datasets_folder):
    result = subprocess.run(_command(datasets_folder, TINY_FLAGS, "--recall_values", "1", "10"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=_environment())
    assert result.returncode == 1
    assert "error: Training keeps the model with the best R@5: add 5 to --recall_values (now 1 10)" in result.stderr
