"""Run train.py or eval.py (the real script, as __main__) with a fault injected, for the tests of what a full disk
or a kill leaves behind.

    python tests/run_with_checkpoint_fault.py FAULT SCRIPT [FLAGS...]

FAULT is one of:
  disk_full:NAME:N   the N-th write of the checkpoint NAME (e.g. last_model.pth) fails as on a full disk (ENOSPC)
                     after a quarter of its bytes went into the file being written;
  pause:NAME:N       the N-th write of NAME puts half of its bytes into the file being written, then writes
                     PAUSED_MARKER (holding that file's path) in the working folder and waits to be killed;
  pause_caching:N    the N-th computation of the mining's feature cache (mid-epoch when an epoch refreshes the
                     cache more than once) writes PAUSED_MARKER and waits to be killed;
  read_only:FOLDER   FOLDER (relative to the working folder) answers as on a read-only file system, where even
                     root may not write: os.access(FOLDER, W_OK) is False.
"""
import errno
import io
import os
import runpy
import sys
import time

PAUSED_MARKER = "fault_paused.txt"


def writes_checkpoint(file, name):
    """Whether torch.save is writing the checkpoint `name` (e.g. last_model.pth) into `file`: the file itself
    or a temporary file named after it (checkpoint.py writes `last_model.pth.<hex>.partial`, then renames it)."""
    file_name = os.path.basename(str(getattr(file, "name", "")))
    return file_name == name or file_name.startswith(name + ".")


def wait_to_be_killed(note):
    with open(PAUSED_MARKER + ".tmp", "w") as marker:
        marker.write(note)
    os.replace(PAUSED_MARKER + ".tmp", PAUSED_MARKER)  # the test never reads half a marker
    while True:
        time.sleep(1)


def break_checkpoint_writes(kind, name, count):
    import torch
    real_save = torch.save
    writes = 0

    def save(obj, file, *args, **kwargs):
        nonlocal writes
        if not writes_checkpoint(file, name):
            return real_save(obj, file, *args, **kwargs)
        writes += 1
        if writes != count:
            return real_save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if kind == "disk_full":
            file.write(data[:len(data) // 4])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        file.write(data[:len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
        wait_to_be_killed(file.name)

    torch.save = save


def pause_caching(count):
    import mining
    real_call = mining.FeatureExtractor.__call__
    calls = 0

    def call(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == count:
            wait_to_be_killed(f"feature cache {count}")
        return real_call(self, *args, **kwargs)

    mining.FeatureExtractor.__call__ = call


def read_only(folder):
    read_only_folder = os.path.abspath(folder)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) == read_only_folder:
            return False
        return real_access(path, mode, *args, **kwargs)

    os.access = access


def main():
    fault, script, *flags = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` would have it
    kind, *values = fault.split(":")
    if kind in ("disk_full", "pause"):
        break_checkpoint_writes(kind, values[0], int(values[1]))
    elif kind == "pause_caching":
        pause_caching(int(values[0]))
    elif kind == "read_only":
        read_only(values[0])
    else:
        sys.exit(f"unknown fault {fault}")
    sys.argv = [script, *flags]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
