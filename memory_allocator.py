"""Keep freed memory in the process: a CPU speed-up of the model's forward and backward passes.

PyTorch on the CPU allocates each layer's output anew for every batch. glibc's malloc serves blocks of more than
32 MB with fresh pages from the kernel and returns them when they are freed, so every batch pays the kernel again
to map, fault in and zero the same memory; kept for reuse, it is faulted in once (the README's Performance section
has the figures). The numbers the model computes are the same: only where the memory comes from changes.

The cost: memory that the process freed stays reserved by it (up to 2 GiB above what is in use) instead of going
back to the system; it was in use at the process's peak anyway.
"""
import ctypes
import logging

# mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Free memory at the top of the heap is given back to the system only above this size (mallopt takes an int)
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1


def keep_freed_memory():
    """Serve every allocation from the heap (no per-block mmap) and keep freed memory for reuse.

    Returns True when the C library took both settings (glibc), False where it has no mallopt (macOS, Windows)
    or refused them; the process then runs as before. Child processes started by fork (data loading workers)
    inherit the settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError, TypeError):
        logging.debug("Freed memory is given back to the system: the C library has no mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    kept = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    logging.debug(f"Freed memory kept for reuse by the process (memory_allocator.py): {kept}")
    return kept
