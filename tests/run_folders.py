"""What a run of train.py / eval.py left in the working folder: its run folder, results.json, last_model.pth."""
import json
import os

import torch


def run_folder(save_dir):
    """The one run folder under logs/<save_dir>/."""
    (name,) = os.listdir(os.path.join("logs", save_dir))
    return os.path.join("logs", save_dir, name)


def results(folder):
    with open(os.path.join(folder, "results.json")) as file:
        return json.load(file)


def last_checkpoint(folder):
    return torch.load(os.path.join(folder, "last_model.pth"), weights_only=True)
