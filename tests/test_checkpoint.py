"""Checkpoints: atomic writes, weights_only round trips, generator states, resuming the original's files."""
import errno
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
from commons import UserInputError


def _trained_model_and_optimizer(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen layers are left out of the optimizer, as in training
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=0.01)
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _state(model, optimizer, epoch_num=4):
    return checkpoint.training_state(model=model, optimizer=optimizer, epoch_num=epoch_num, best_r5=55.5,
                                     not_improved_num=1, recalls={1: 40.0, 5: 55.5}, optim="adam",
                                     recipe="triplets",
                                     recipe_state={"mining": "full",
                                                   "mining_state": {"neg_cache": torch.arange(6).view(2, 3)}})


def test_round_trip_with_weights_only(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    path = str(tmp_path / "last_model.pth")
    checkpoint.save_checkpoint(_state(model, optimizer), path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["epoch_num"] == 4 and loaded["best_r5"] == 55.5 and loaded["not_improved_num"] == 1
    assert loaded["recalls"] == {1: 40.0, 5: 55.5} and loaded["optim"] == "adam"
    assert loaded["recipe_state"]["mining_state"]["neg_cache"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not any(key.startswith("module.") for key in loaded["model_state_dict"])

    fresh_model, fresh_optimizer = _trained_model_and_optimizer(steps=0)
    fresh_model.load_state_dict(loaded["model_state_dict"])
    assert checkpoint.load_optimizer_state(fresh_optimizer, loaded, "adam", path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh_model.state_dict()[name])
    saved, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for key in saved["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved["state"][key][name], restored["state"][key][name])


def test_generators_continue_identically_after_restore():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.random(), np.random.standard_normal(), torch.rand(1)  # a cached Gaussian in NumPy's state too
    states = checkpoint.capture_rng_states()
    expected = (random.random(), np.random.standard_normal(), np.random.choice(100, 5, replace=False).tolist(),
                torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    checkpoint.restore_rng_states(states)
    got = (random.random(), np.random.standard_normal(), np.random.choice(100, 5, replace=False).tolist(),
           torch.rand(3).tolist())
    assert got == expected


def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "last_model.pth")
    checkpoint.save_checkpoint({"epoch_num": 1}, path)
    real_save = torch.save

    def save_then_crash(obj, file):
        real_save(obj, file)
        file.write(b"half")
        raise KeyboardInterrupt  # as a kill between the write and the rename

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint({"epoch_num": 2}, path)
    assert os.listdir(tmp_path) == ["last_model.pth"]
    assert torch.load(path, weights_only=True)["epoch_num"] == 1


def test_disk_full_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "best_model.pth")
    checkpoint.save_checkpoint({"epoch_num": 1}, path)

    def disk_full(obj, file):
        file.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserInputError, match="No space left.*best_model.pth.*intact"):
        checkpoint.save_checkpoint({"epoch_num": 2}, path)
    assert os.listdir(tmp_path) == ["best_model.pth"]
    assert torch.load(path, weights_only=True)["epoch_num"] == 1


def test_copy_checkpoint(tmp_path):
    source, target = str(tmp_path / "a.pth"), str(tmp_path / "b.pth")
    checkpoint.save_checkpoint({"epoch_num": 7}, source)
    checkpoint.copy_checkpoint(source, target)
    assert torch.load(target, weights_only=True)["epoch_num"] == 7
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "b.pth"]


def test_resume_point_of_our_files_continues_at_the_next_epoch():
    model, optimizer = _trained_model_and_optimizer(steps=1)
    assert checkpoint.resume_point(_state(model, optimizer, epoch_num=4)) == (5, 55.5, 1)


@pytest.mark.parametrize("r5, expected", [(60.0, (3, 60.0, 0)), (50.0, (3, 55.0, 3))])
def test_resume_point_of_the_original_files_replays_their_update(r5, expected):
    # The original saves best R@5 and the patience count before updating them with the epoch's recalls
    original = {"epoch_num": 2, "best_r5": 55.0, "not_improved_num": 2, "recalls": np.array([40.0, r5, 70.0]),
                "optimizer_state_dict": {}, "model_state_dict": {}}
    assert checkpoint.is_training_checkpoint(original)
    assert checkpoint.resume_point(original) == expected


def test_optimizer_of_another_kind_is_not_loaded(caplog):
    model, optimizer = _trained_model_and_optimizer(steps=1)
    state = _state(model, optimizer)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not checkpoint.load_optimizer_state(sgd, state, "sgd", "x.pth")
    assert "trained with --optim adam" in caplog.text
    fewer = torch.optim.Adam(list(model.parameters())[-1:], lr=0.1)
    assert not checkpoint.load_optimizer_state(fewer, state, "adam", "x.pth")
    assert "does not fit" in caplog.text


def test_load_checkpoint_reads_our_files_with_weights_only(tmp_path):
    model, optimizer = _trained_model_and_optimizer(steps=1)
    path = str(tmp_path / "last_model.pth")
    checkpoint.save_checkpoint(_state(model, optimizer), path)
    loaded = checkpoint.load_checkpoint(path)
    assert checkpoint.is_training_checkpoint(loaded)
    assert isinstance(loaded["rng_states"]["numpy"]["keys"], torch.Tensor)
