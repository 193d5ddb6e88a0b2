"""eval.py under torchrun (2 processes, gloo on the CPU): the processes write disjoint shards, rank 0 completes
the manifest and searches, and everything equals a single-process run bit for bit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REALDATA = os.path.join(REPO, "tests", "data", "realdata")
FLAGS = ["--pretrain", "none", "--resize", "64", "80", "--backbone", "resnet18conv4", "--aggregation", "gem",
         "--num_workers", "0", "--device", "cpu", "--infer_batch_size", "2", "--datasets_folder", REALDATA,
         "--dataset_name", "opensfm_lund", "--test_method", "single_query"]
# eval.py with one batch per shard (so that 15 database images make 8 shards to share out), recording which
# process wrote which shard
DRIVER = f"""
import os, sys
sys.path.insert(0, {REPO!r})
import descriptor_store, extraction
extraction.MAX_SHARD_BYTES = 1
write_shard = descriptor_store.DescriptorShards.write_shard
def recorded(self, shard, descriptors):
    write_shard(self, shard, descriptors)
    with open(os.path.join(os.environ["WRITES_FOLDER"], os.environ.get("RANK", "0")), "a") as file:
        file.write(os.path.basename(self.folder) + " " + str(shard) + "\\n")
descriptor_store.DescriptorShards.write_shard = recorded
import commons, eval
commons.exit_on_user_error(eval.main)
"""


def run(tmp_path, name, processes):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    writes = tmp_path / f"writes_{name}"
    writes.mkdir()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    environment = dict(os.environ, WRITES_FOLDER=str(writes), OMP_NUM_THREADS="1")
    completed = subprocess.run(launcher + [str(driver), *FLAGS, "--descriptors_folder", str(tmp_path / name)],
                               cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result_lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result_lines) == 1  # rank 0 alone reports
    written = {}
    for rank in os.listdir(writes):
        with open(writes / rank) as file:
            written[int(rank)] = sorted(tuple(line.split()) for line in file)
    return json.loads(result_lines[0][len("RESULT "):]), written


def shard_files(folder):
    return {os.path.relpath(os.path.join(root, name), folder)
            for root, _, names in os.walk(folder) for name in names if name.endswith(".npy")}


def test_two_processes_write_disjoint_shards_equal_to_one_process(tmp_path):
    alone, written_alone = run(tmp_path, "one", 1)
    together, written_together = run(tmp_path, "two", 2)

    # Shard s of each kind is written by process s % 2, once
    database_shards = {rank: sorted(int(s) for kind, s in writes if kind == "database")
                       for rank, writes in written_together.items()}
    assert database_shards == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}
    query_shards = {rank: sorted(int(s) for kind, s in writes if kind == "queries_single_query")
                    for rank, writes in written_together.items()}
    assert query_shards == {0: [0, 2, 4, 6, 8, 10, 12], 1: [1, 3, 5, 7, 9, 11, 13]}  # one query per batch
    assert list(written_alone) == [0]

    files = shard_files(tmp_path / "one")
    assert files == shard_files(tmp_path / "two") and len(files) == 8 + 14
    for name in files:
        np.testing.assert_array_equal(np.load(tmp_path / "two" / name), np.load(tmp_path / "one" / name))
    for kind in ("database", "queries_single_query"):
        with open(tmp_path / "two" / kind / "manifest.json") as file:
            manifest = json.load(file)
        with open(tmp_path / "one" / kind / "manifest.json") as file:
            assert manifest == json.load(file)
        assert manifest["complete"] is True and manifest["row_shape"] == [256]
    for key in ("R@1", "R@5", "R@10", "R@20"):
        assert together[key] == alone[key]
