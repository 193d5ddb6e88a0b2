"""memory_allocator.keep_freed_memory: freed blocks are reused instead of being faulted in again, and the model
computes the same numbers. Each case runs in a fresh process (the setting lasts for the process)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import hashlib, json, resource, sys
import torch
import memory_allocator, network
tuned = memory_allocator.keep_freed_memory() if sys.argv[1] == "kept" else None
torch.manual_seed(0)
model = network.make_model("resnet18conv4", "gem", pretrain="none", resize=(64, 96)).eval()
images = torch.rand(4, 3, 64, 96)
with torch.no_grad():
    output = model(images)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = torch.ones(16 * 1024 ** 2)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
        del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"tuned": tuned, "faults": faults, "output": hashlib.sha256(output.numpy().tobytes()).hexdigest()}))
"""


def _probe(mode):
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="the setting is glibc's")
def test_freed_blocks_are_reused_and_the_numbers_stay_the_same():
    default, kept = _probe("default"), _probe("kept")
    assert kept["tuned"] is True
    # 10 blocks of 64 MiB: 16,384 pages each, faulted in again every time by default, once when kept
    assert default["faults"] >= 10 * 16384
    assert kept["faults"] < 2 * 16384
    assert kept["output"] == default["output"]
