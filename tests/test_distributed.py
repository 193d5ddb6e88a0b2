"""Two training processes with torchrun and gloo on the CPU: one writer, sharded caching and evaluation."""
import glob
import os
import re
import subprocess
import sys

import pytest

import commons
import make_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = "distributed_tests"
FLAGS = ["--dataset_name", DATASET, "--pretrain", "none", "--backbone", "resnet18conv4", "--aggregation", "gem",
         "--resize", "32", "48", "--device", "cpu", "--num_workers", "0", "--epochs_num", "2",
         "--queries_per_epoch", "16", "--cache_refresh_rate", "8", "--neg_samples_num", "40",
         "--negs_num_per_query", "2", "--train_batch_size", "4", "--infer_batch_size", "8", "--lr", "0.001",
         "--save_dir", "ddp", "--horizontal_flip"]


@pytest.fixture(scope="session")
def datasets_folder(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir("synthetic_datasets")) if cache is not None else str(tmp_path_factory.mktemp("data"))
    make_synthetic_dataset.generate_dataset(folder, DATASET, seed=3, train_database_num=60, train_queries_num=24,
                                            val_database_num=30, val_queries_num=11, test_database_num=30,
                                            test_queries_num=13, image_size=(48, 64))
    return folder


def test_shards_cover_everything_once():
    for total in (0, 1, 5, 13):
        for world_size in (1, 2, 3):
            ranges = [commons.shard_range(total, rank, world_size) for rank in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(world_size - 1))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


@pytest.mark.slow
def test_two_gloo_processes_train_with_one_writer(tmp_path, datasets_folder):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"), "--datasets_folder", datasets_folder, *FLAGS]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_folders = glob.glob(str(tmp_path / "logs" / "ddp" / "*"))
    assert len(run_folders) == 1, run_folders  # only rank 0 made a run folder
    files = set(os.listdir(run_folders[0]))
    assert {"info.log", "debug.log", "last_model.pth", "best_model.pth", "results.json"} <= files
    assert not [name for name in files if name.endswith(".partial")]
    with open(os.path.join(run_folders[0], "info.log")) as file:
        info = file.read()
    # Each line written once: one process logs
    assert info.count("Using 2 process(es) on cpu") == 1
    for epoch in ("00", "01"):
        assert info.count(f"Start training epoch: {epoch}") == 1
        assert info.count(f"Finished epoch {epoch}") == 1
    assert len(re.findall(r"Recalls on val set", info)) == 2
    assert len(re.findall(r"Recalls on < ", info)) == 1
    assert "[rank 1]" not in info
    assert result.stdout.count("RESULT {") == 1

    # The sharded test equals one process's test of the same weights
    import checkpoint, datasets_ws, network, parser, test  # noqa: E401 (the model side, after the run)
    args = parser.parse_arguments(["--datasets_folder", datasets_folder, *FLAGS])
    model = network.build_model(args)
    best = os.path.join(run_folders[0], "best_model.pth")
    checkpoint.load_model_weights(model, checkpoint.load_state_dict_file(best), best)
    test_ds = datasets_ws.GeoDataset(datasets_folder, DATASET, "test", args.val_positive_dist_threshold)
    _, expected = test.test(args, test_ds, model)
    logged = re.search(r"Recalls on < [^>]*>: (.*)", info).group(1)
    assert logged == expected
    assert checkpoint.load_checkpoint(os.path.join(run_folders[0], "last_model.pth"))["epoch_num"] == 1
