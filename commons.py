"""Logging, run folders, seeding, the error type for bad user input, atomic file writing, and the setup of several
processes."""
import atexit
import errno
import logging
import os
import random
import sys
import traceback
import uuid
from datetime import datetime, timedelta
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

RUN_FOLDER_TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
LOG_FORMAT = "%(asctime)s   %(message)s"
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
CONSOLE_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class UserInputError(Exception):
    """A problem with the user's flags, files or data. Its message says what is wrong and how to fix it.

    Scripts catch it (see `exit_on_user_error`) and print it as one line instead of a traceback.
    """


# ----------------------------------------------------------------------------------------------------------
# Files that are either complete or absent

TEMPORARY_SUFFIX = ".partial"


def temporary_path(path):
    """A unique name beside `path` for the file being written: `<path>.<hex>.partial`."""
    return f"{path}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"


def _fsync_folder(folder):
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(path, write):
    """Call write(file) on a temporary binary file beside `path`, flush it to disk, then rename it to `path` (a
    rename within a folder is atomic): readers, and a run killed meanwhile, see the previous file or the whole new
    one. A full disk is a UserInputError that says the previous file is intact."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserInputError(f"No space left on the disk while writing {path}; the previous file there (if "
                                 "any) is intact. Free some space and resume with --resume") from error
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


# ----------------------------------------------------------------------------------------------------------
# Run folders and logs

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


def describe_run_folder(output_folder):
    """The log line that says where a run is saved, and why the folder name has a `_N` suffix when it has one."""
    name = os.path.basename(os.path.normpath(output_folder))
    base, _, suffix = name.rpartition("_")
    if suffix.isdigit() and base:
        return (f"The outputs are being saved in {output_folder} ({os.path.join(os.path.dirname(output_folder), base)} "
                "already exists, from another run: runs never share a folder)")
    return f"The outputs are being saved in {output_folder}"


def setup_logging(output_folder, console="debug", info_filename="info.log", debug_filename="debug.log"):
    """Log to `info.log` (INFO and up), `debug.log` (everything) in `output_folder`, and the console.

    `console` is "debug", "info", "warning" or None (no console output). Uncaught exceptions are written to the
    logs too.
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
        add_handler(logging.StreamHandler(sys.stdout), CONSOLE_LEVELS[console])
    # Libraries that log at DEBUG (PIL, matplotlib) would flood debug.log
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def log_uncaught(exc_type, exc_value, exc_traceback):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc_value, exc_traceback)
            return
        logging.error("".join(traceback.format_exception(exc_type, exc_value, exc_traceback)))
    sys.excepthook = log_uncaught


# ----------------------------------------------------------------------------------------------------------
# Progress bars: on stderr (never in info.log / debug.log), with the rate and the time left

# True: always; False: never (--quiet); None: when stderr is a terminal (not when it is redirected to a file)
_progress_bars = None


def set_progress_bars(enabled):
    """Whether the loops show progress bars: True, False, or None (only on a terminal, the default)."""
    global _progress_bars
    _progress_bars = enabled


def progress_bar(iterable, description=None, total=None, unit="it"):
    """`iterable` wrapped in a tqdm bar on stderr; shown by the main process only, as set_progress_bars says."""
    disable = True if not is_main_process() or _progress_bars is False else (False if _progress_bars else None)
    return tqdm(iterable, desc=description, total=total, unit=unit, ncols=100, file=sys.stderr, disable=disable)


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
        # Into the run's log files (if any) for the record, the traceback into debug.log only; the console
        # (stdout and stderr) gets one line on stderr
        records = [(logging.DEBUG, "".join(traceback.format_exc())), (logging.ERROR, f"error: {error}")]
        for handler in logging.getLogger("").handlers:
            if isinstance(handler, logging.FileHandler):
                for level, message in records:
                    if level >= handler.level:
                        handler.handle(logging.makeLogRecord({"msg": message, "levelno": level,
                                                              "levelname": logging.getLevelName(level)}))
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def exit_now(status=0):
    """End a script that has finished its work: run the exit handlers (logging's flush and close, temporary
    folders, multiprocessing's clean-up of worker processes), flush the standard streams, then leave without
    the interpreter's teardown of every imported module, which takes a second or more once torch, torchvision,
    scikit-learn and faiss are loaded and does nothing a finished run needs. Only for `__main__`."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(status)


# ----------------------------------------------------------------------------------------------------------
# Several processes (torchrun): setup, the main process, sharding and gathering

class DistributedContext(NamedTuple):
    """This process's place among the training processes; world_size 1 when not started by torchrun."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup_distributed(device="cpu", timeout_minutes=60):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group: gloo on the CPU,
    nccl on CUDA (each process on the GPU of its LOCAL_RANK). Without torchrun: one process, no group.
    Returns a DistributedContext (rank, world_size, local_rank, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device)
    if world_size == 1:
        return DistributedContext(0, 1, 0, device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserInputError(f"torchrun started {world_size} processes but this machine has "
                                 f"{torch.cuda.device_count()} GPUs: lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=timeout_minutes),
                            **({"device_id": device} if backend == "nccl" else {}))
    return DistributedContext(rank, world_size, local_rank, device)


def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process():
    """True for rank 0, the one process that writes logs, checkpoints and results (and without torchrun)."""
    return not is_distributed() or dist.get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _communication_device(world):
    """Tensors exchanged through nccl live on the GPU, through gloo on the CPU."""
    return world.device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj, world, src=0):
    """`obj` of process `src`, on every process (picklable objects)."""
    if world.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_communication_device(world))
    return holder[0]


def shard_range(total, rank, world_size):
    """[start, end) of the contiguous share of `total` items that process `rank` handles."""
    return total * rank // world_size, total * (rank + 1) // world_size


def all_gather_rows(local, total, world):
    """Concatenate, in rank order, every process's rows `local` ([its shard_range share, ...] float32 NumPy),
    into the [total, ...] array, on every process."""
    if world.world_size == 1:
        return local
    shard_size = -(-total // world.world_size)
    device = _communication_device(world)
    padded = torch.zeros((shard_size,) + local.shape[1:], dtype=torch.float32, device=device)
    padded[:len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(gathered, padded)
    parts = []
    for rank, part in enumerate(gathered):
        start, end = shard_range(total, rank, world.world_size)
        parts.append(part[:end - start].cpu().numpy())
    return np.concatenate(parts)


def all_reduce_mean(value, world):
    """The mean of a float over the processes."""
    if world.world_size == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_communication_device(world))
    dist.all_reduce(tensor)
    return tensor.item() / world.world_size


def setup_worker_logging(rank):
    """Logging of the processes other than rank 0: warnings and errors only, on stderr, marked with the rank;
    they write no files."""
    root_logger = logging.getLogger("")
    for handler in list(root_logger.handlers):
        root_logger.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"%(asctime)s   [rank {rank}] %(message)s", LOG_TIME_FORMAT))
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.WARNING)
