"""Logging, run folders, seeding and the error type for bad user input."""
import logging
import os
import random
import sys
import traceback
from datetime import datetime

import numpy as np
import torch

RUN_FOLDER_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
LOG_FORMAT = "%(asctime)s   %(message)s"
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class UserInputError(Exception):
    """A problem with the user's flags, files or data. Its message says what is wrong and how to fix it.

    Scripts catch it (see `exit_on_user_error`) and print it as one line instead of a traceback.
    """


def make_run_folder(logs_folder, save_dir, start_time=None):
    """Create and return `<logs_folder>/<save_dir>/<YYYY-MM-DD_HH-mm-ss>`, never reusing an existing folder.

    Two runs started in the same second (a parallel sweep) get `_1`, `_2`... suffixes instead of
    writing into each other's folder.
    """
    start_time = start_time or datetime.now()
    base = os.path.join(logs_folder, save_dir, start_time.strftime(RUN_FOLDER_TIME_FORMAT))
    parent = os.path.dirname(base)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"Cannot create the logs folder {parent}: {error.strerror}. "
                             "Run from a writable folder or pass another --save_dir.") from error
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"The logs folder {parent} is not writable. "
                             "Fix its permissions, run from a writable folder, or pass another --save_dir.")
    candidate, suffix = base, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = f"{base}_{suffix}"


def setup_logging(output_folder, console="debug", info_filename="info.log", debug_filename="debug.log"):
    """Log to `info.log` (INFO and up), `debug.log` (everything) in `output_folder`, and the console.

    `console` is "debug", "info" or None (no console output). Uncaught exceptions are written to the logs too.
    """
    root_logger = logging.getLogger("")
    for handler in list(root_logger.handlers):
        root_logger.removeHandler(handler)
        handler.close()
    root_logger.setLevel(logging.DEBUG)
    formatter = logging.Formatter(LOG_FORMAT, LOG_TIME_FORMAT)

    def add_handler(handler, level):
        handler.setLevel(level)
        handler.setFormatter(formatter)
        root_logger.addHandler(handler)

    if output_folder is not None:
        if info_filename is not None:
            add_handler(logging.FileHandler(os.path.join(output_folder, info_filename)), logging.INFO)
        if debug_filename is not None:
            add_handler(logging.FileHandler(os.path.join(output_folder, debug_filename)), logging.DEBUG)
    if console is not None:
        add_handler(logging.StreamHandler(sys.stdout), logging.DEBUG if console == "debug" else logging.INFO)
    # Libraries that log at DEBUG (PIL, matplotlib) would flood debug.log
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def log_uncaught(exc_type, exc_value, exc_traceback):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc_value, exc_traceback)
            return
        logging.error("".join(traceback.format_exception(exc_type, exc_value, exc_traceback)))
    sys.excepthook = log_uncaught


def log_command_and_arguments(args):
    """The first lines of every run: how it was started and with which arguments."""
    logging.info("Command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    logging.info(f"Arguments: {args}")


def make_deterministic(seed=0):
    """Seed every generator we use; cuDNN picks deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def exit_on_user_error(main):
    """Run `main()`; a UserInputError ends the process with its message on one line and exit status 1."""
    try:
        return main()
    except UserInputError as error:
        logging.getLogger("").debug("".join(traceback.format_exc()))
        # Into the run's log files (if any) for the record; the console gets one line on stderr
        for handler in logging.getLogger("").handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(logging.makeLogRecord({"msg": f"error: {error}", "levelno": logging.ERROR,
                                                      "levelname": "ERROR"}))
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
