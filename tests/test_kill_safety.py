"""Kill safety of training: train.py killed (SIGKILL) while it writes a checkpoint, resumed and killed again in the
middle of an epoch, resumed again, ends as the uninterrupted run does; no checkpoint is ever half-written under
its name.

(tests/test_train.py kills a run once mid-epoch; here the kill lands inside a checkpoint write, through
tests/run_with_checkpoint_fault.py, which pauses the real script at that point until it is killed.)
"""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import tiny_dataset
from run_with_checkpoint_fault import PAUSED_MARKER

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "train.py")
FAULT_RUNNER = os.path.join(REPO, "tests", "run_with_checkpoint_fault.py")
DATASET = "tiny"
# 3 epochs of 2 cache refreshes each, full mining (its cache of negatives is part of the checkpoint)
FLAGS = ["--datasets_folder", "data", "--dataset_name", DATASET, "--pretrain", "none", "--backbone", "resnet18conv4",
         "--aggregation", "gem", "--resize", "32", "32", "--device", "cpu", "--num_workers", "0", "--epochs_num", "3",
         "--queries_per_epoch", "4", "--cache_refresh_rate", "2", "--train_batch_size", "2", "--negs_num_per_query",
         "2", "--neg_samples_num", "6", "--infer_batch_size", "8", "--mining", "full", "--lr", "0.001",
         "--patience", "10", "--brightness", "0.3", "--horizontal_flip"]
CHECKPOINT_NAMES = ("last_model.pth", "best_model.pth")


def environment():
    return dict(os.environ, OMP_NUM_THREADS="1")


def run_folder(cwd, save_dir):
    folder, = glob.glob(os.path.join(cwd, "logs", save_dir, "*"))
    return folder


def run_to_the_end(cwd, save_dir, *extra):
    completed = subprocess.run([sys.executable, TRAIN, *FLAGS, "--save_dir", save_dir, *extra], cwd=cwd,
                               capture_output=True, text=True, timeout=600, env=environment())
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return run_folder(cwd, save_dir)


def run_until_paused_then_kill(cwd, fault, save_dir, *extra):
    """Start train.py with `fault` (see run_with_checkpoint_fault.py), wait until it pauses there, check the
    checkpoints, SIGKILL it. Returns (run folder, the marker's note)."""
    marker = os.path.join(cwd, PAUSED_MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    stderr_path = os.path.join(cwd, f"{save_dir}.stderr")
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, FAULT_RUNNER, fault, TRAIN, *FLAGS, "--save_dir", save_dir,
                                    *extra], cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, env=environment())
    try:
        deadline = time.time() + 300
        while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        with open(stderr_path) as stderr:
            assert os.path.exists(marker), f"no pause at {fault} (exit status {process.poll()}): {stderr.read()}"
        folder = run_folder(cwd, save_dir)
        assert_only_complete_checkpoints(folder)  # while paused
        process.send_signal(signal.SIGKILL)
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    with open(marker) as file:
        note = file.read()
    assert_only_complete_checkpoints(folder)  # after the kill
    return folder, note


def assert_only_complete_checkpoints(folder):
    """Every file under a checkpoint's name loads whole; other checkpoint files are temporary (.partial) ones."""
    for name in os.listdir(folder):
        if name in CHECKPOINT_NAMES:
            state = checkpoint.load_checkpoint(os.path.join(folder, name))
            assert checkpoint.is_training_checkpoint(state) and "rng_states" in state, name
        else:
            assert ".pth" not in name or name.endswith(".partial"), name


def epochs_started(folder):
    with open(os.path.join(folder, "info.log")) as file:
        return [int(epoch) for epoch in re.findall(r"Start training epoch: (\d+)", file.read())]


def test_killed_while_writing_a_checkpoint_and_mid_epoch_then_resumed_ends_as_an_uninterrupted_run(tmp_path):
    cwd = str(tmp_path)
    tiny_dataset.write_dataset(os.path.join(cwd, "data"), DATASET, ("train", "val", "test"))
    reference = run_to_the_end(cwd, "reference")

    # 1. Killed while writing the checkpoint of epoch 1: half of last_model.pth's bytes are in its temporary file
    first, temporary = run_until_paused_then_kill(cwd, "pause:last_model.pth:2", "first")
    temporary = os.path.join(cwd, temporary)  # the path as the run wrote it, relative to its folder
    assert os.path.dirname(temporary) == first and os.path.basename(temporary).startswith("last_model.pth.")
    assert temporary.endswith(".partial") and os.path.getsize(temporary) > 0
    with pytest.raises(Exception):
        torch.load(temporary, map_location="cpu", weights_only=True)  # really half a file
    assert checkpoint.load_checkpoint(os.path.join(first, "last_model.pth"))["epoch_num"] == 0
    assert epochs_started(first) == [0, 1]

    # 2. Resumed from it (epoch 1 again), killed in the middle of epoch 2: after its first cache refresh and
    # training steps, while computing the second cache (the 4th of this run)
    second, _ = run_until_paused_then_kill(cwd, "pause_caching:4", "second", "--resume",
                                           os.path.join(first, "last_model.pth"))
    assert epochs_started(second) == [1, 2]
    assert checkpoint.load_checkpoint(os.path.join(second, "last_model.pth"))["epoch_num"] == 1
    assert not [name for name in os.listdir(second) if name.endswith(".partial")]

    # 3. Resumed again: trains epoch 2 only, and ends where the uninterrupted run ended
    third = run_to_the_end(cwd, "third", "--resume", os.path.join(second, "last_model.pth"))
    assert epochs_started(third) == [2]
    with open(os.path.join(third, "info.log")) as file:
        assert "Trained for 03 epochs" in file.read()
    assert_only_complete_checkpoints(third)
    resumed = checkpoint.load_checkpoint(os.path.join(third, "last_model.pth"))
    uninterrupted = checkpoint.load_checkpoint(os.path.join(reference, "last_model.pth"))
    assert resumed["epoch_num"] == uninterrupted["epoch_num"] == 2
    assert resumed["recalls"] == uninterrupted["recalls"]
    for name, value in uninterrupted["model_state_dict"].items():
        assert torch.equal(value, resumed["model_state_dict"][name]), name
    assert torch.equal(resumed["recipe_state"]["mining_state"]["neg_cache"],
                       uninterrupted["recipe_state"]["mining_state"]["neg_cache"])
