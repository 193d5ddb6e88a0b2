"""Run folders, logging files, seeding, and how a user error ends a script."""
import logging
import os
import random
from datetime import datetime

import numpy as np
import pytest
import torch

import commons


def test_run_folder_layout_and_no_reuse(tmp_path):
    start = datetime(2026, 1, 2, 3, 4, 5)
    first = commons.make_run_folder(str(tmp_path), "default", start)
    second = commons.make_run_folder(str(tmp_path), "default", start)
    assert first == os.path.join(str(tmp_path), "default", "2026-01-02_03-04-05")
    assert second == first + "_1"
    assert os.path.isdir(first) and os.path.isdir(second)


def test_unwritable_logs_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; a file where the folder should be fails the same way for everyone
        (tmp_path / "logs").write_text("")
        with pytest.raises(commons.UserInputError, match="Cannot create the logs folder"):
            commons.make_run_folder(str(tmp_path / "logs"), "default")
    else:
        os.chmod(tmp_path, 0o500)
        with pytest.raises(commons.UserInputError, match="logs folder"):
            commons.make_run_folder(str(tmp_path / "logs"), "default")


def test_setup_logging_splits_info_and_debug(tmp_path, capsys):
    commons.setup_logging(str(tmp_path), console="info")
    logging.info("an info line")
    logging.debug("a debug line")
    for handler in logging.getLogger("").handlers:
        handler.flush()
    info = (tmp_path / "info.log").read_text()
    debug = (tmp_path / "debug.log").read_text()
    assert "an info line" in info and "a debug line" not in info
    assert "an info line" in debug and "a debug line" in debug
    console = capsys.readouterr().out
    assert "an info line" in console and "a debug line" not in console
    commons.setup_logging(None, console=None)


def test_make_deterministic_repeats_every_generator():
    def draw():
        commons.make_deterministic(7)
        return random.random(), np.random.rand(), torch.rand(1).item()
    assert draw() == draw()


def test_exit_on_user_error_prints_one_line_and_exits_1(tmp_path, capsys):
    commons.setup_logging(str(tmp_path), console=None)

    def main():
        raise commons.UserInputError("the file x is broken: fix it")
    with pytest.raises(SystemExit) as exit_info:
        commons.exit_on_user_error(main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: the file x is broken: fix it\n"
    for handler in logging.getLogger("").handlers:
        handler.flush()
    assert "error: the file x is broken: fix it" in (tmp_path / "info.log").read_text()
    commons.setup_logging(None, console=None)
