"""Progress bars: every long loop of train.py and eval.py shows one on a terminal, with its rate and the time left;
none in info.log / debug.log, none when stderr is not a terminal, none with --quiet."""
import fcntl
import glob
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading

import pytest

import commons
import tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "tiny"
COMMON_FLAGS = ["--datasets_folder", "data", "--dataset_name", DATASET, "--pretrain", "none", "--backbone",
                "resnet18conv4", "--resize", "32", "32", "--device", "cpu", "--num_workers", "0", "--infer_batch_size",
                "4"]
TRAIN_FLAGS = ["--aggregation", "netvlad", "--netvlad_clusters", "4", "--mining", "full", "--epochs_num", "1",
               "--queries_per_epoch", "4", "--cache_refresh_rate", "4", "--train_batch_size", "2",
               "--negs_num_per_query", "2", "--neg_samples_num", "8"]
EVAL_FLAGS = ["--aggregation", "gem", "--pca_dim", "4", "--pca_dataset_folder", f"{DATASET}/images/train/database",
              "--faiss_index", "hnsw", "--save_predictions", "3"]
# What a finished bar ends with: "| 3/3 [00:01<00:00,  2.51it/s]" (count, time spent < time left, rate)
FINISHED_BAR = (r"[^\r\n]*100%\|[^\r\n]*\| (\d+)/\1 \[\d\d:\d\d<00:00, "
                r"+[\d.]+(it|s|vectors|queries)/(s|it|vectors|queries)\]")


def test_a_bar_shows_the_rate_and_the_time_left(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    commons.set_progress_bars(True)
    try:
        assert sum(commons.progress_bar(range(5), "Counting", unit="images")) == 10
    finally:
        commons.set_progress_bars(None)
    assert re.search(r"Counting: 100%\|[^\r\n]*\| 5/5 \[00:00<00:00, +[\d.]+images/s\]", sys.stderr.getvalue())


@pytest.mark.parametrize("setting", [False, None])  # --quiet; the default, here with stderr not a terminal
def test_no_bar_when_quiet_or_off_a_terminal(monkeypatch, setting):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    commons.set_progress_bars(setting)
    try:
        bar = commons.progress_bar(None, "Counting", total=3)
        bar.update(3)  # manual updates work on a disabled bar too
        bar.close()
        assert list(commons.progress_bar(range(3), "Counting")) == [0, 1, 2]
    finally:
        commons.set_progress_bars(None)
    assert sys.stderr.getvalue() == ""


def run_on_a_terminal(command, cwd):
    """Run `command` with stderr on a pseudo-terminal of 100 columns, as in an interactive shell.
    Returns (exit status, stdout, what the terminal received)."""
    main_end, terminal_end = pty.openpty()
    fcntl.ioctl(terminal_end, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=terminal_end, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(terminal_end)
    received = []

    def read():
        while True:
            try:
                data = os.read(main_end, 65536)
            except OSError:  # the process closed the terminal
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    stdout, _ = process.communicate(timeout=600)
    reader.join(60)
    os.close(main_end)
    return process.returncode, stdout, b"".join(received).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("progress"))
    tiny_dataset.write_dataset(os.path.join(folder, "data"), DATASET, ("train", "val", "test"))
    return folder


def log_files(folder, save_dir):
    return glob.glob(os.path.join(folder, "logs", save_dir, "*", "*.log"))


@pytest.mark.slow
@pytest.mark.parametrize("script, flags, bars", [
    ("train.py", TRAIN_FLAGS, ["NetVLAD initialisation", "Caching", "Mining", "Training", "Database", "Queries"]),
    ("eval.py", EVAL_FLAGS, ["PCA", "Database 1/1", "Queries 1/1", "Building the hnsw index", "Searching",
                             "Prediction pictures"]),
])
def test_every_long_loop_has_a_bar_on_the_terminal_and_none_in_the_logs(folder, script, flags, bars):
    save_dir = os.path.splitext(script)[0]
    status, stdout, terminal = run_on_a_terminal(
        [sys.executable, os.path.join(REPO, script), *COMMON_FLAGS, *flags, "--save_dir", save_dir], folder)
    assert status == 0, stdout[-3000:] + terminal[-3000:]
    for description in bars:
        assert re.search(re.escape(description) + r":" + FINISHED_BAR, terminal), (description, terminal[-3000:])
    logs = log_files(folder, save_dir)
    assert len(logs) == 2
    for path in logs:
        with open(path) as file:
            text = file.read()
        assert "%|" not in text and "it/s]" not in text, path
    assert "%|" not in stdout


@pytest.mark.slow
def test_quiet_shows_no_bar_and_only_warnings_on_the_console(folder):
    status, stdout, terminal = run_on_a_terminal(
        [sys.executable, os.path.join(REPO, "eval.py"), *COMMON_FLAGS, "--aggregation", "gem", "--quiet",
         "--save_dir", "quiet"], folder)
    assert status == 0, stdout[-3000:] + terminal[-3000:]
    assert "%|" not in terminal
    # The console: the warning that the database is smaller than R@20 asks, and the result line
    lines = stdout.splitlines()
    assert len(lines) == 2 and "The database has 6 images, fewer than the 20 predictions" in lines[0]
    assert lines[1].startswith("RESULT {")
    info_log, = [path for path in log_files(folder, "quiet") if path.endswith("info.log")]
    with open(info_log) as file:
        assert "Recalls on < tiny" in file.read()  # the log files keep everything
