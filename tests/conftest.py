"""Fixtures the test files share: no network, and train.py / eval.py run in the test's own process."""
import logging

import pytest

import util


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty caches (TORCH_HOME and ./data, in the test's folder) and no network: every download attempt fails and
    is recorded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    attempts = []

    def fail(*args, **kwargs):
        attempts.append(args)
        raise ConnectionError("network unreachable")
    for name in ("download_url", "download_google_drive", "download_google_drive_folder_file"):
        monkeypatch.setattr(util, name, fail)
    return attempts


@pytest.fixture
def in_process_runs(tmp_path, monkeypatch):
    """The test's folder as the working folder of train.main / eval.main called in the test's process (their run
    folders go to its logs/), and the root logger's handlers given back afterwards (the scripts set up theirs)."""
    monkeypatch.chdir(tmp_path)
    handlers = list(logging.getLogger("").handlers)
    yield tmp_path
    root = logging.getLogger("")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
