"""Speed benchmark: how close evaluation and training come to the backbone's own compute.

On a CPU the convolutions of the backbone set the floor; everything else (start-up, reading the dataset, image
decoding and resizing, the aggregation, caching, mining, search, recall, logging) is overhead. On a synthetic
dataset of 480x640 JPEGs that it generates (kept in --work_folder, so that a second run skips it), this script
measures, and prints as a Markdown table and writes as JSON:

  floor       the backbone (ResNet-18 cut at conv4) on ready tensors: forward (eval mode, batches of
              --infer_batch_size) at 480x640 and 240x320, forward+backward (train mode, batches of
              train_batch_size x (2 + negs_num_per_query) images) at the training resize; images/s;
  evaluation  wall time of whole eval.py processes (start-up, dataset scan, extraction, search, recall, results)
              with resnet18conv4 + netvlad and + gem, at 480x640 and with --resize 240 320, and with
              dinov2_vitb14 + salad at 322x322 (on --dinov2_images images: a ViT-B is 20 to 30 times slower),
              as a ratio to the floor's time (its own backbone's) for the same images (the floor measured just
              before and after each run); also the fixed cost (the same command on a test split of 2 images) and
              the ratio without it;
  training    seconds per --cache_refresh_rate queries (caching, mining, triplet steps) of train.py with partial
              and full mining, from its results.json, as a ratio to the floor for the images each refresh
              cached (forward) and trained on (forward+backward);
  layers      NetVLAD forward on a ResNet-18 conv4 map of a 480x640 batch: the one-pass layer against the loop
              over clusters (the original's formulation, kept in tests/test_models.py);
  mining      partial and full mining of NetVLAD-sized descriptors: batched (mining.py) against the per-query
              searches of the original (kept in tests/test_mining.py), checked to give the same triplets;
  memory      the peak resident set size of each (of the eval.py / train.py process, or of this process while it
              measures).

    python benchmarks/benchmark_speed.py --work_folder data/benchmark_speed   # the README's table
    python benchmarks/benchmark_speed.py --quick               # small images and counts: checks the plumbing

It takes about 5 minutes on a quiet 2-core machine (longer when other work shares its cores). The device is
chosen automatically (CUDA when available); on a GPU the ratios say how far the data pipeline and the start-up
are from the GPU's own speed, and the images/s column gives the throughput. On a shared machine the figures move
with the load (printed with them): the floor is measured right before and after each run for that reason, and
the CPU-time ratio (user + system seconds of the whole process tree against the floor's) moves less than the
wall-time one.

Image counts: evaluation at 480x640 uses --eval_images images (default 200: 160 database + 40 queries, 20 to
40 s of backbone compute on 2 cores, so that the process start-up, 4 to 6 s, weighs as it does on a small
dataset rather than vanishing or dominating, and the whole benchmark stays well under 15 minutes); at 240x320,
four times faster, the test split is repeated --small_resize_repeats times (default 4, the same JPEGs linked
under other names, each decoded and resized on its own) to keep the run as long. The "images for target"
column says from how many images the whole process would meet the target, given its fixed cost and its ratio
without it.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_FOLDER)

import commons  # noqa: E402
import make_synthetic_dataset  # noqa: E402
import memory_allocator  # noqa: E402
import mining  # noqa: E402
import network  # noqa: E402
import parser as vg_parser  # noqa: E402
from measurement import PeakResidentSet, load_average, markdown_table  # noqa: E402

BACKBONE = "resnet18conv4"
EVAL_AGGREGATIONS = ("netvlad", "gem")
DINOV2_CASE = ("dinov2_vitb14", "salad", (322, 322))
TRAIN_AGGREGATION = "netvlad"
TRAIN_MININGS = ("partial", "full")
EVAL_DATASET, TRAIN_DATASET = "speed_eval", "speed_train"
# Each other split of a generated dataset gets this many database images and queries (the smallest useful)
OTHER_SPLITS_IMAGES = 2
NETVLAD_CLUSTERS = 64
# The eval floor is measured just before each eval.py run on this many batches
FLOOR_BATCHES = 3
TRAIN_FLOOR_BATCHES = 2
TARGETS = {"evaluation": 1.05, "training": 1.10, "layers": 10.0, "mining": 10.0}


# ----------------------------------------------------------------------------------------------------------
# Memory and machine

def machine_description(device):
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        cpu_name = names[0] if names else cpu_name
    except OSError:
        pass
    description = {"cpus": os.cpu_count(), "cpu": cpu_name, "torch_threads": torch.get_num_threads(),
                   "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
                   "num_workers": vg_parser.default_num_workers(device.type)}
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def run_process(command, cwd, log_path):
    """Run `command`; returns (wall seconds, peak RSS of the process in MiB, CPU seconds of the process and of
    the processes it waited for, its loading workers). Its output goes to `log_path`."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed (exit status {process.returncode}):\n{tail}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is in KiB on Linux


def read_results(run_root):
    """results.json of the only run folder under `run_root` (a --save_dir of its own)."""
    folders = [os.path.join(run_root, name) for name in sorted(os.listdir(run_root))]
    with open(os.path.join(folders[-1], "results.json")) as file:
        return json.load(file)


# ----------------------------------------------------------------------------------------------------------
# Data

def make_datasets(work_folder, image_size, eval_images, train_database_num, train_queries_num, repeats, seed,
                  dinov2_images):
    """The evaluation and training datasets (generated once, then reused), plus three views of the evaluation
    test split made of links: repeated `repeats` times, reduced to one database image and one query, and to
    `dinov2_images` images (half database, half queries)."""
    datasets_folder = os.path.join(work_folder, "datasets")
    queries_num = max(1, eval_images // 5)
    small = OTHER_SPLITS_IMAGES
    processes = os.cpu_count() or 1
    for name, sizes in ((EVAL_DATASET, dict(train_database_num=small, train_queries_num=small,
                                            test_database_num=eval_images - queries_num,
                                            test_queries_num=queries_num)),
                        (TRAIN_DATASET, dict(train_database_num=train_database_num,
                                             train_queries_num=train_queries_num, test_database_num=small,
                                             test_queries_num=small))):
        start = time.perf_counter()
        make_synthetic_dataset.generate_dataset(
            datasets_folder, name, seed=seed, val_database_num=small, val_queries_num=small,
            train_far_queries_num=0, image_size=tuple(image_size), processes=processes, overwrite=True, **sizes)
        print(f"Dataset {name} ready in {time.perf_counter() - start:.0f} s", flush=True)
    test_folder = os.path.join(datasets_folder, EVAL_DATASET, "images", "test")
    linked_split(test_folder, os.path.join(datasets_folder, f"{EVAL_DATASET}_x{repeats}", "images", "test"),
                 repeats=repeats)
    linked_split(test_folder, os.path.join(datasets_folder, f"{EVAL_DATASET}_2", "images", "test"), limit=1)
    linked_split(test_folder, os.path.join(datasets_folder, f"{EVAL_DATASET}_dinov2", "images", "test"),
                 limit=max(1, dinov2_images // 2))
    return datasets_folder


def linked_split(source, target, repeats=1, limit=None):
    """A test split of symbolic links to the images of `source`: each image `repeats` times (its copies named
    with a suffix in the note field, so that every name is unique), or only the first `limit` of each folder."""
    if os.path.isdir(target):
        shutil.rmtree(target)
    for kind in ("database", "queries"):
        names = sorted(os.listdir(os.path.join(source, kind)))[:limit]
        os.makedirs(os.path.join(target, kind))
        for name in names:
            for copy in range(repeats):
                fields = name.split("@")
                fields[-2] = f"{fields[-2]}_copy{copy}" if repeats > 1 else fields[-2]
                os.symlink(os.path.abspath(os.path.join(source, kind, name)),
                           os.path.join(target, kind, "@".join(fields)))


def split_images_num(datasets_folder, dataset_name):
    folder = os.path.join(datasets_folder, dataset_name, "images", "test")
    return sum(len(os.listdir(os.path.join(folder, kind))) for kind in ("database", "queries"))


# ----------------------------------------------------------------------------------------------------------
# The floor: the backbone on ready tensors

def build_model(aggregation, resize, device, datasets_folder, seed, backbone=BACKBONE):
    args = vg_parser.parse_arguments([
        "--datasets_folder", datasets_folder, "--dataset_name", EVAL_DATASET, "--backbone", backbone,
        "--aggregation", aggregation, "--pretrain", "none", "--resize", str(resize[0]), str(resize[1]),
        "--device", device.type])
    commons.make_deterministic(seed)
    return network.build_model(args).to(device)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backbone_rate(backbone, resize, batch_size, batches, device, train=False):
    """Images/s of the backbone on a random batch [batch_size, 3, H, W]: forward in eval mode without gradients,
    or (train) forward and backward in train mode, as training runs it (frozen layers stay frozen).
    Returns (images/s, CPU seconds of this process per image)."""
    images = torch.randn(batch_size, 3, resize[0], resize[1], device=device)

    def step():
        if train:
            backbone.zero_grad(set_to_none=True)
            backbone(images).sum().backward()
        else:
            backbone(images)
    backbone.train(train)
    with torch.set_grad_enabled(train):
        step()  # warm-up: allocations, kernel choices
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            step()
        synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    backbone.eval()
    return batch_size * batches / seconds, cpu_seconds / (batch_size * batches)


def import_seconds(repeats=3):
    """Median wall time of a Python process that only imports torch and torchvision (every run pays it)."""
    command = [sys.executable, "-c", "import torch, torchvision"]
    return median_seconds(lambda: subprocess.run(command, check=True), repeats)


def floor_row(name, rate, images, seconds, peak_mib):
    return {"part": "floor", "what": name, "images": images, "seconds": seconds, "images_per_second": rate,
            "peak_rss_mib": peak_mib}


# ----------------------------------------------------------------------------------------------------------
# Evaluation: whole eval.py processes

def eval_command(datasets_folder, dataset_name, backbone, aggregation, resize, device, save_dir):
    return [sys.executable, os.path.join(REPO_FOLDER, "eval.py"), "--datasets_folder", datasets_folder,
            "--dataset_name", dataset_name, "--backbone", backbone, "--aggregation", aggregation,
            "--pretrain", "none", "--resize", str(resize[0]), str(resize[1]), "--device", device.type,
            "--save_dir", save_dir, "--quiet"]


def evaluation_cases(resizes, repeats):
    """(backbone, aggregation, resize, dataset) of each eval.py run."""
    cases = [(BACKBONE, aggregation, resize, dataset_name)
             for resize, dataset_name in ((resizes[0], EVAL_DATASET), (resizes[1], f"{EVAL_DATASET}_x{repeats}"))
             for aggregation in EVAL_AGGREGATIONS]
    return cases + [(*DINOV2_CASE, f"{EVAL_DATASET}_dinov2")]


def benchmark_evaluation(work_folder, datasets_folder, resizes, repeats, device, infer_batch_size, seed):
    rows = []
    for backbone, aggregation, resize, dataset_name in evaluation_cases(resizes, repeats):
        images = split_images_num(datasets_folder, dataset_name)
        label = f"{backbone} + {aggregation}, {resize[0]}x{resize[1]}"
        model = build_model(aggregation, resize, device, datasets_folder, seed, backbone)
        # The floor right before and right after the run, so that both see the machine's load
        rate_before, cpu_before = backbone_rate(model.backbone, resize, infer_batch_size, FLOOR_BATCHES, device)
        fixed_seconds, _, fixed_cpu = run_process(
            eval_command(datasets_folder, f"{EVAL_DATASET}_2", backbone, aggregation, resize, device, "startup"),
            work_folder, os.path.join(work_folder, "eval_startup.log"))
        save_dir = f"eval_{backbone}_{aggregation}_{resize[0]}x{resize[1]}"
        if os.path.isdir(os.path.join(work_folder, "logs", save_dir)):
            shutil.rmtree(os.path.join(work_folder, "logs", save_dir))
        load_before = load_average()
        seconds, peak_mib, cpu_seconds = run_process(
            eval_command(datasets_folder, dataset_name, backbone, aggregation, resize, device, save_dir),
            work_folder, os.path.join(work_folder, f"{save_dir}.log"))
        rate_after, cpu_after = backbone_rate(model.backbone, resize, infer_batch_size, FLOOR_BATCHES, device)
        del model
        results = read_results(os.path.join(work_folder, "logs", save_dir))
        floor_per_image = (1 / rate_before + 1 / rate_after) / 2
        floor_cpu_per_image = (cpu_before + cpu_after) / 2
        rate = 1 / floor_per_image
        floor_seconds = images * floor_per_image
        fixed_seconds = max(0.0, fixed_seconds - 2 * floor_per_image)  # without the compute of its 2 images
        fixed_cpu = max(0.0, fixed_cpu - 2 * floor_cpu_per_image)
        ratio_without_fixed = max(seconds - fixed_seconds, 0.0) / floor_seconds
        # From how many images on the whole process would meet the target, at this steady-state ratio
        images_for_target = (math.ceil(fixed_seconds * rate / (TARGETS["evaluation"] - ratio_without_fixed))
                             if ratio_without_fixed < TARGETS["evaluation"] else None)
        rows.append({
            "part": "evaluation", "what": f"eval.py, {label}", "images": images, "seconds": seconds,
            "images_per_second": images / seconds, "floor_images_per_second": [rate_before, rate_after],
            "floor_seconds": floor_seconds, "ratio": seconds / floor_seconds,
            "fixed_seconds": fixed_seconds,
            "ratio_without_fixed": ratio_without_fixed, "images_for_target": images_for_target,
            "cpu_seconds": cpu_seconds, "floor_cpu_seconds": images * floor_cpu_per_image,
            "cpu_ratio": cpu_seconds / (images * floor_cpu_per_image), "fixed_cpu_seconds": fixed_cpu,
            "target": TARGETS["evaluation"], "peak_rss_mib": peak_mib,
            "extraction_seconds": results["timings"]["extraction_seconds"],
            "search_seconds": results["timings"]["search_seconds"],
            "load_average": [load_before, load_average()]})
        print(f"{rows[-1]['what']}: {seconds:.1f} s for {images} images, floor {floor_seconds:.1f} s, "
              f"ratio {rows[-1]['ratio']:.3f} (fixed cost {fixed_seconds:.1f} s)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Training: seconds per refresh of train.py

def benchmark_training(work_folder, datasets_folder, train_resize, device, options, seed):
    train_batch_size, negs_num = 4, options.negs_num_per_query
    group_images = train_batch_size * (2 + negs_num)
    model = build_model(TRAIN_AGGREGATION, train_resize, device, datasets_folder, seed)

    def floor_rates():
        """(forward, forward+backward) images/s of the backbone at the training resize."""
        return (backbone_rate(model.backbone, train_resize, options.infer_batch_size, FLOOR_BATCHES, device)[0],
                backbone_rate(model.backbone, train_resize, group_images, TRAIN_FLOOR_BATCHES, device,
                              train=True)[0])
    # The floor before the first run, between the runs and after the last: each run is compared with the mean
    # of the floors around it
    with PeakResidentSet() as memory:
        rates = [floor_rates()]
    size = f"{train_resize[0]}x{train_resize[1]}"
    rows = []
    for mining_name in TRAIN_MININGS:
        save_dir = f"train_{mining_name}"
        if os.path.isdir(os.path.join(work_folder, "logs", save_dir)):
            shutil.rmtree(os.path.join(work_folder, "logs", save_dir))
        command = [sys.executable, os.path.join(REPO_FOLDER, "train.py"), "--datasets_folder", datasets_folder,
                   "--dataset_name", TRAIN_DATASET, "--backbone", BACKBONE, "--aggregation", TRAIN_AGGREGATION,
                   "--pretrain", "none", "--resize", str(train_resize[0]), str(train_resize[1]),
                   "--device", device.type, "--mining", mining_name,
                   "--cache_refresh_rate", str(options.cache_refresh_rate),
                   "--queries_per_epoch", str(options.cache_refresh_rate * options.refreshes),
                   "--epochs_num", "1", "--neg_samples_num", str(options.neg_samples_num),
                   "--negs_num_per_query", str(negs_num), "--train_batch_size", str(train_batch_size),
                   "--save_dir", save_dir, "--quiet", "--seed", str(seed)]
        load_before = load_average()
        _, peak_mib, _ = run_process(command, work_folder, os.path.join(work_folder, f"{save_dir}.log"))
        rates.append(floor_rates())
        forward_seconds = (1 / rates[-2][0] + 1 / rates[-1][0]) / 2  # per image
        train_seconds = (1 / rates[-2][1] + 1 / rates[-1][1]) / 2
        refreshes = read_results(os.path.join(work_folder, "logs", save_dir))["refresh_timings"]
        seconds = sum(r["cache_seconds"] + r["mining_seconds"] + r["training_seconds"] for r in refreshes)
        cached = sum(r["cached_images"] for r in refreshes)
        trained = sum(r["trained_images"] for r in refreshes)
        floor_seconds = cached * forward_seconds + trained * train_seconds
        rows.append({
            "part": "training",
            "what": f"train.py, {mining_name} mining, {BACKBONE} + {TRAIN_AGGREGATION}, {size}, per refresh of "
                    f"{options.cache_refresh_rate} queries",
            "images": (cached + trained) / len(refreshes), "seconds": seconds / len(refreshes),
            "images_per_second": (cached + trained) / seconds, "floor_seconds": floor_seconds / len(refreshes),
            "ratio": seconds / floor_seconds, "target": TARGETS["training"], "peak_rss_mib": peak_mib,
            "cached_images": cached / len(refreshes), "trained_images": trained / len(refreshes),
            "cache_seconds": sum(r["cache_seconds"] for r in refreshes) / len(refreshes),
            "mining_seconds": sum(r["mining_seconds"] for r in refreshes) / len(refreshes),
            "training_seconds": sum(r["training_seconds"] for r in refreshes) / len(refreshes),
            "refreshes": len(refreshes), "load_average": [load_before, load_average()]})
        print(f"{rows[-1]['what']}: {rows[-1]['seconds']:.1f} s, floor {rows[-1]['floor_seconds']:.1f} s, "
              f"ratio {rows[-1]['ratio']:.3f}", flush=True)
    del model
    forward_rate = statistics.median(rate[0] for rate in rates)
    train_rate = statistics.median(rate[1] for rate in rates)
    return [floor_row(f"backbone forward, {size}, batches of {options.infer_batch_size} (median of "
                      f"{len(rates)})", forward_rate, None, None, memory.peak_mib),
            floor_row(f"backbone forward+backward, {size}, batches of {group_images} (median of {len(rates)})",
                      train_rate, None, None, memory.peak_mib)] + rows


# ----------------------------------------------------------------------------------------------------------
# Layers and mining against the original's formulations (kept in the tests)

def import_test_module(name):
    tests_folder = os.path.join(REPO_FOLDER, "tests")
    if tests_folder not in sys.path:
        sys.path.insert(0, tests_folder)
    return __import__(name)


def median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_netvlad(resize, batch_size, repeats):
    """On the CPU whatever the device: the loop of the tests builds its tensors there."""
    from model.aggregations.netvlad import NetVLAD
    reference = import_test_module("test_models").reference_netvlad_forward
    torch.manual_seed(0)
    dim = 256  # channels of ResNet-18 conv4, whose map is 1/16 of the image
    layer = NetVLAD(clusters_num=NETVLAD_CLUSTERS, dim=dim).eval()
    torch.nn.init.normal_(layer.conv.weight, std=5)  # sharp assignments, as after the k-means initialisation
    x = torch.rand(batch_size, dim, math.ceil(resize[0] / 16), math.ceil(resize[1] / 16))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=0, atol=1e-5)
        with PeakResidentSet() as one_pass_memory:
            one_pass_seconds = median_seconds(lambda: layer(x), repeats)
        with PeakResidentSet() as loop_memory:
            loop_seconds = median_seconds(lambda: reference(layer, x), repeats)
    what = (f"NetVLAD forward (CPU), {NETVLAD_CLUSTERS} clusters, map [{batch_size}, {dim}, {x.shape[2]}, "
            f"{x.shape[3]}]")
    return [{"part": "layers", "what": f"{what}: one pass", "images": batch_size, "seconds": one_pass_seconds,
             "images_per_second": batch_size / one_pass_seconds, "peak_rss_mib": one_pass_memory.peak_mib},
            {"part": "layers", "what": f"{what}: loop over clusters", "images": batch_size, "seconds": loop_seconds,
             "images_per_second": batch_size / loop_seconds, "peak_rss_mib": loop_memory.peak_mib,
             "speedup": loop_seconds / one_pass_seconds, "target": TARGETS["layers"]}]


def benchmark_mining(options):
    reference = import_test_module("test_mining")
    dim = options.mining_dim
    reference.DIM = dim  # the reference builds its faiss indexes of this size
    dataset, _ = reference.make_world(seed=0, database_num=options.mining_database_num,
                                      queries_num=options.mining_queries_num * 2)
    features = np.random.default_rng(0).standard_normal((dataset.database_num + dataset.queries_num, dim),
                                                        dtype=np.float32)
    count = min(options.mining_queries_num, dataset.queries_num)
    negs_num, neg_samples_num = options.negs_num_per_query, options.mining_neg_samples_num
    rows = []
    for name in ("partial", "full"):
        miner = mining.make_miner(name, dataset, negs_num, neg_samples_num)
        with PeakResidentSet() as batched_memory:
            np.random.seed(1)
            start = time.perf_counter()
            plan = miner.plan(count)  # the sampling, as the reference's timing holds its own
            plan_seconds = time.perf_counter() - start
            # What the extraction hands to the mining (in train.py the cached features come in this order)
            cache = mining.FeatureCache(plan.cache_indexes, features[plan.cache_indexes], len(features))
            start = time.perf_counter()
            batched = miner.mine(plan, cache)
            batched_seconds = plan_seconds + time.perf_counter() - start
        with PeakResidentSet() as reference_memory:
            np.random.seed(1)
            start = time.perf_counter()
            if name == "partial":
                expected = reference.ref_partial(dataset, features, count, negs_num, neg_samples_num)
            else:
                expected = reference.ref_full(dataset, features, count, negs_num, neg_samples_num,
                                              [np.empty((0,), dtype=np.int64) for _ in range(dataset.queries_num)])
            reference_seconds = time.perf_counter() - start
        if not np.array_equal(batched, expected):
            raise RuntimeError(f"Batched {name} mining gave other triplets than the per-query reference")
        what = (f"{name} mining, {count} queries, {neg_samples_num} sampled database images, {dim}-d features, "
                f"{negs_num} negatives")
        rows.append({"part": "mining", "what": f"{what}: batched", "seconds": batched_seconds,
                     "peak_rss_mib": batched_memory.peak_mib})
        rows.append({"part": "mining", "what": f"{what}: per query (same triplets)", "seconds": reference_seconds,
                     "peak_rss_mib": reference_memory.peak_mib, "speedup": reference_seconds / batched_seconds,
                     "target": TARGETS["mining"]})
        print(f"{name} mining: batched {batched_seconds:.2f} s, per query {reference_seconds:.2f} s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Report

COLUMNS = [("part", "part", "{}"), ("what", "what", "{}"), ("images", "images", "{:.0f}"),
           ("seconds", "seconds", "{:.2f}"), ("images_per_second", "images/s", "{:.2f}"),
           ("floor_seconds", "floor s", "{:.1f}"), ("ratio", "ratio to floor", "{:.3f}"),
           ("fixed_seconds", "fixed s", "{:.1f}"), ("ratio_without_fixed", "ratio without fixed", "{:.3f}"),
           ("images_for_target", "images for target", "{}"), ("cpu_ratio", "CPU-time ratio", "{:.3f}"),
           ("speedup", "speed-up", "{:.1f}x"), ("target", "target", "{}"), ("met", "met", "{}"),
           ("peak_rss_mib", "peak RSS MiB", "{:.0f}")]


def judge(row):
    """Whether a row with a target meets it: ratios at most the target, speed-ups at least."""
    if "target" not in row:
        return row
    value = row.get("speedup", row.get("ratio"))
    met = value >= row["target"] if "speedup" in row else value <= row["target"]
    target = f">= {row['target']:g}x" if "speedup" in row else f"<= {row['target']:.2f}"
    return dict(row, met="yes" if met else "no", target=target)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--image_size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                        help="size of the generated JPEGs, and the first evaluation resize (the second is half)")
    parser.add_argument("--eval_images", type=int, default=200,
                        help="images of the evaluation test split (4/5 database, 1/5 queries)")
    parser.add_argument("--small_resize_repeats", type=int, default=4,
                        help="times the test split is repeated for the evaluation at half the resolution")
    parser.add_argument("--dinov2_images", type=int, default=24,
                        help="images of the test split evaluated with dinov2_vitb14 + salad (half database)")
    parser.add_argument("--infer_batch_size", type=int, default=16, help="as eval.py's default")
    parser.add_argument("--train_resize", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--train_database_num", type=int, default=100)
    parser.add_argument("--train_queries_num", type=int, default=30)
    parser.add_argument("--cache_refresh_rate", type=int, default=8, help="queries per refresh of the training")
    parser.add_argument("--refreshes", type=int, default=2, help="refreshes timed per mining method")
    parser.add_argument("--neg_samples_num", type=int, default=40, help="training's --neg_samples_num")
    parser.add_argument("--negs_num_per_query", type=int, default=10)
    parser.add_argument("--mining_queries_num", type=int, default=200)
    parser.add_argument("--mining_database_num", type=int, default=2000)
    parser.add_argument("--mining_neg_samples_num", type=int, default=1000)
    parser.add_argument("--mining_dim", type=int, default=NETVLAD_CLUSTERS * 256,
                        help="descriptor size in the mining part (NetVLAD on ResNet-18 conv4)")
    parser.add_argument("--layer_repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="small images and counts (a minute or two): checks that everything runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=["evaluation", "training", "layers", "mining"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_folder", type=str, default=None,
                        help="where the datasets and the runs' logs go (kept: a second run reuses the datasets); "
                             "default: a temporary folder, removed at the end")
    parser.add_argument("--output", type=str, default="benchmark_speed.json", help="JSON file of the figures")
    return parser


QUICK = dict(image_size=[96, 128], eval_images=10, small_resize_repeats=2, dinov2_images=4, train_resize=[48, 64],
             train_database_num=40, train_queries_num=8, cache_refresh_rate=4, refreshes=1, neg_samples_num=30,
             negs_num_per_query=2, mining_queries_num=20, mining_database_num=200, mining_neg_samples_num=50,
             mining_dim=256, layer_repeats=1)


@contextlib.contextmanager
def folder_or_temporary(folder):
    """The given folder (created, kept), or a temporary one removed at the end."""
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        yield os.path.abspath(folder)
        return
    with tempfile.TemporaryDirectory(prefix="benchmark_speed_") as temporary:
        yield temporary


def main(argv=None):
    options = build_parser().parse_args(argv)
    if options.quick:
        vars(options).update(QUICK)
    # The floor at its best: with the allocator setting that eval.py and train.py use
    memory_allocator.keep_freed_memory()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto"
                          else options.device)
    resizes = [list(options.image_size), [options.image_size[0] // 2, options.image_size[1] // 2]]
    start = time.perf_counter()
    load_at_start = load_average()
    rows = []
    with folder_or_temporary(options.work_folder) as work_folder:
        datasets_folder = make_datasets(work_folder, options.image_size, options.eval_images,
                                        options.train_database_num, options.train_queries_num,
                                        options.small_resize_repeats, options.seed, options.dinov2_images)
        for size in resizes:
            model = build_model("gem", size, device, datasets_folder, options.seed)
            with PeakResidentSet() as memory:
                rate, _ = backbone_rate(model.backbone, size, options.infer_batch_size, FLOOR_BATCHES, device)
            rows.append(floor_row(f"backbone forward, {size[0]}x{size[1]}, batches of {options.infer_batch_size}",
                                  rate, FLOOR_BATCHES * options.infer_batch_size,
                                  FLOOR_BATCHES * options.infer_batch_size / rate, memory.peak_mib))
            print(f"Floor at {size[0]}x{size[1]}: {rate:.2f} images/s", flush=True)
            del model
        rows.append({"part": "floor", "what": "python -c 'import torch, torchvision' (every process pays it)",
                     "seconds": import_seconds()})
        if "evaluation" not in options.skip:
            rows += benchmark_evaluation(work_folder, datasets_folder, resizes, options.small_resize_repeats, device,
                                         options.infer_batch_size, options.seed)
        if "training" not in options.skip:
            rows += benchmark_training(work_folder, datasets_folder, options.train_resize, device, options,
                                       options.seed)
        if "layers" not in options.skip:
            rows += benchmark_netvlad(resizes[0], options.infer_batch_size, options.layer_repeats)
        if "mining" not in options.skip:
            rows += benchmark_mining(options)
    rows = [judge(row) for row in rows]
    table = markdown_table(rows, COLUMNS)
    print(table)
    report = {"rows": rows, "table": table, "arguments": vars(options), "total_seconds": time.perf_counter() - start,
              "machine": machine_description(device), "load_average": {"start": load_at_start,
                                                                       "end": load_average()}}
    with open(options.output, "w") as file:
        json.dump(report, file, indent=1)
    print(f"Machine: {report['machine']}; load average at the start {load_at_start}, at the end "
          f"{report['load_average']['end']}; {report['total_seconds'] / 60:.1f} minutes in all")
    print(f"Figures written to {options.output}")


if __name__ == "__main__":
    main()
