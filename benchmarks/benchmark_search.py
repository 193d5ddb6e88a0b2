"""Benchmark of the search indexes (--faiss_index) on a large synthetic descriptor database and on real
descriptors of the synthetic image dataset.

For each index: build time (training on a sample + adding the database), memory (peak growth of the resident
set size while building, and while searching), index size on disk, queries per second, and recall of the true
nearest neighbours relative to the exact search: recall@N = the share of the exact top-N found in the index's
top-N, averaged over queries (for the real descriptors also the geographic Recall@1 / @5 of the dataset).

    python benchmarks/benchmark_search.py                              # 1 M vectors of 128 floats + real ones
    python benchmarks/benchmark_search.py --database_num 100000 --skip_real

The 1 M synthetic vectors (random, around 1,000 cluster centres, varying around them in 16 directions) have
128 dimensions, not NetVLAD's 32,768, so that the whole benchmark runs on a 2-core machine in minutes: index
costs scale with the dimension (flat, ivf, hnsw) or not at all (ivfpq's codes). Everything goes through the
project's own path: descriptors stored in shards on disk (descriptor_store.py), the exact search in blocks
within --max_ram_gb and the indexes of search.py. Prints a Markdown table and writes the figures as JSON.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import faiss
import numpy as np

REPO_FOLDER = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_FOLDER)

import descriptor_store  # noqa: E402
import extraction  # noqa: E402
import indexes  # noqa: E402
import metrics  # noqa: E402
import search  # noqa: E402
from commons import UserInputError  # noqa: E402
from measurement import MIB, PeakResidentSet, load_average, markdown_table  # noqa: E402

RECALL_NS = (1, 10)
SHARD_ROWS = 65536


# ----------------------------------------------------------------------------------------------------------
# Data

def clustered_store(folder, rows, dim, clusters, intrinsic_dim, spread, seed, sample_seed):
    """`rows` vectors around `clusters` random centres, written shard by shard (never all in memory). Around its
    centre a vector varies in `intrinsic_dim` random directions (the same for every cluster), as descriptors of
    images vary along few factors, plus a little noise in every direction (a tenth of `spread`). `seed` draws the
    centres and directions (the same for database and queries), `sample_seed` the vectors."""
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    directions = np.linalg.qr(rng.standard_normal((dim, intrinsic_dim)))[0].T.astype(np.float32)
    shards = descriptor_store.open_shards(
        folder, {"synthetic": [rows, dim, clusters, intrinsic_dim, spread, seed, sample_seed]}, rows, SHARD_ROWS,
        "float32")
    for shard in range(shards.shards_num):
        start, end = shards.shard_range(shard)
        rng = np.random.default_rng([sample_seed, 1, shard])
        vectors = centres[rng.integers(clusters, size=end - start)]
        vectors += rng.standard_normal((end - start, intrinsic_dim), dtype=np.float32) @ directions * spread
        vectors += rng.standard_normal(vectors.shape, dtype=np.float32) * (spread / 10)
        shards.write_shard(shard, vectors)
    return shards


def real_descriptors(work_folder, database_num, queries_num, image_size, seed):
    """The test split of a freshly generated synthetic dataset, described by a random-weight ResNet-18 (conv4) +
    GeM model through extraction.extract_descriptors. Returns (database shards, queries shards, dataset)."""
    import commons
    import datasets_ws
    import make_synthetic_dataset
    import network
    import parser as vg_parser
    datasets_folder = os.path.join(work_folder, "datasets")
    make_synthetic_dataset.generate_dataset(
        datasets_folder, "synthetic", seed=seed, train_database_num=1, train_queries_num=1, train_far_queries_num=0,
        val_database_num=1, val_queries_num=1, test_database_num=database_num, test_queries_num=queries_num,
        image_size=image_size, processes=os.cpu_count() or 1)
    args = vg_parser.parse_arguments([
        "--datasets_folder", datasets_folder, "--dataset_name", "synthetic", "--backbone", "resnet18conv4",
        "--aggregation", "gem", "--pretrain", "none", "--resize", str(image_size[0]), str(image_size[1]),
        "--device", "cpu", "--num_workers", str(min(2, os.cpu_count() or 1)), "--seed", str(seed)])
    dataset = datasets_ws.GeoDataset(datasets_folder, "synthetic", "test", args.val_positive_dist_threshold)
    commons.make_deterministic(args.seed)  # the same random weights in every run
    model = network.build_model(args).eval()
    database, queries = extraction.extract_descriptors(args, dataset.database_paths, dataset.queries_paths, model,
                                                       descriptors_folder=os.path.join(work_folder, "real"))
    return database, queries, dataset


# ----------------------------------------------------------------------------------------------------------
# Measures

def neighbour_recalls(predictions, exact_predictions):
    """{N: mean share of the exact top-N found in the top-N} for N in RECALL_NS."""
    recalls = {}
    for n in RECALL_NS:
        found = [len(np.intersect1d(got[:n], true[:n])) for got, true in zip(predictions, exact_predictions)]
        recalls[n] = float(np.mean(found)) / n
    return recalls


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def benchmark(data_name, database, queries, index_params, max_ram_gb, work_folder, k, dataset=None):
    """One row per index (flat first, the reference) on these descriptors."""
    queries_vectors = search.FlatVectors(queries)
    rows = []
    with PeakResidentSet() as memory:
        start = time.perf_counter()
        exact = search.search_descriptors(database, queries, k, search.SearchSettings("flat", max_ram_gb=max_ram_gb))
        exact_seconds = time.perf_counter() - start
    rows.append({"data": data_name, "index": "flat (exact)", "parameters": "", "build_seconds": 0.0,
                 "build_rss_mib": 0.0, "index_mib": database.rows * database.row_bytes_float32 / MIB,
                 "search_rss_mib": memory.growth_mib, "queries_per_second": len(queries_vectors) / exact_seconds,
                 **{f"recall@{n}": 1.0 for n in RECALL_NS}})
    if dataset is not None:
        rows[-1].update(geographic_recalls(exact.predictions, dataset))
    print(f"{data_name}: exact search of {len(queries_vectors)} queries in {exact_seconds:.1f} s", flush=True)

    for name, params in index_params.items():
        folder = os.path.join(work_folder, f"index_{data_name}_{name}")
        with PeakResidentSet() as build_memory:
            start = time.perf_counter()
            try:
                built = search.build_index(name, params, database, max_ram_gb, folder)
            except UserInputError as error:  # e.g. ivfpq on a database smaller than its codebooks
                print(f"{data_name}: {name} not built: {error}", flush=True)
                rows.append({"data": data_name, "index": name, "parameters": f"not built: {error}"})
                continue
            build_seconds = time.perf_counter() - start
        query_rows = search.index_query_rows(max_ram_gb, database.row_shape[-1], len(queries_vectors), k)
        with PeakResidentSet() as search_memory:
            start = time.perf_counter()
            _, predictions = search.search_built_index(built, params, queries_vectors, k, query_rows)
            search_seconds = time.perf_counter() - start
        shown = {key: value for key, value in built.resolved.items() if key not in ("index", "dim", "seed")}
        if name in ("ivf", "ivfpq"):
            shown["ivf_probes"] = params.ivf_probes
        if name == "hnsw":
            shown["hnsw_ef_search"] = params.hnsw_ef_search
        rows.append({"data": data_name, "index": name, "parameters": " ".join(f"{k}={v}" for k, v in shown.items()),
                     "build_seconds": build_seconds, "build_rss_mib": build_memory.growth_mib,
                     "index_mib": folder_bytes(built.folder) / MIB, "search_rss_mib": search_memory.growth_mib,
                     "queries_per_second": len(queries_vectors) / search_seconds,
                     **{f"recall@{n}": r for n, r in neighbour_recalls(predictions, exact.predictions).items()}})
        if dataset is not None:
            rows[-1].update(geographic_recalls(predictions, dataset))
        print(f"{data_name}: {name} built in {build_seconds:.1f} s, searched in {search_seconds:.2f} s", flush=True)
    return rows


def geographic_recalls(predictions, dataset):
    recalls = metrics.compute_recalls(predictions, dataset.soft_positives_per_query, [1, 5])
    return {"geo_R@1": float(recalls[0]), "geo_R@5": float(recalls[1])}


COLUMNS = [("data", "data", "{}"), ("index", "index", "{}"), ("parameters", "parameters", "{}"),
           ("build_seconds", "build s", "{:.1f}"), ("build_rss_mib", "build RSS +MiB", "{:.0f}"),
           ("index_mib", "index MiB", "{:.0f}"), ("search_rss_mib", "search RSS +MiB", "{:.0f}"),
           ("queries_per_second", "queries/s", "{:.0f}"), ("recall@1", "recall@1", "{:.3f}"),
           ("recall@10", "recall@10", "{:.3f}"), ("geo_R@1", "geo R@1", "{:.1f}"), ("geo_R@5", "geo R@5", "{:.1f}")]


# ----------------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--database_num", type=int, default=1_000_000, help="synthetic database vectors")
    parser.add_argument("--queries_num", type=int, default=1000, help="synthetic queries")
    parser.add_argument("--dim", type=int, default=128, help="synthetic vector size")
    parser.add_argument("--clusters", type=int, default=1000, help="cluster centres of the synthetic vectors")
    parser.add_argument("--intrinsic_dim", type=int, default=16,
                        help="directions in which synthetic vectors vary around their centre")
    parser.add_argument("--spread", type=float, default=0.5, help="standard deviation around the centres")
    parser.add_argument("--k", type=int, default=max(RECALL_NS), help="neighbours searched")
    parser.add_argument("--max_ram_gb", type=float, default=2.0, help="memory budget of the search")
    parser.add_argument("--indexes", nargs="+", default=[n for n in indexes.FAISS_INDEXES if n != "flat"],
                        choices=[n for n in indexes.FAISS_INDEXES if n != "flat"],
                        help="approximate indexes to compare with the exact search")
    parser.add_argument("--ivf_lists", type=int, default=1024, help="lists of ivf / ivfpq (synthetic data)")
    parser.add_argument("--ivf_probes", type=int, default=search.IndexParams.ivf_probes)
    parser.add_argument("--index_train_size", type=int, default=65536, help="training vectors (synthetic data)")
    parser.add_argument("--pq_bytes", type=int, default=32, help="bytes per vector of ivfpq (synthetic data)")
    parser.add_argument("--hnsw_m", type=int, default=search.IndexParams.hnsw_m)
    parser.add_argument("--hnsw_ef_construction", type=int, default=search.IndexParams.hnsw_ef_construction)
    parser.add_argument("--hnsw_ef_search", type=int, default=search.IndexParams.hnsw_ef_search)
    parser.add_argument("--skip_synthetic", action="store_true", help="skip the synthetic vectors")
    parser.add_argument("--skip_real", action="store_true", help="skip the real descriptors")
    parser.add_argument("--real_database_num", type=int, default=1000, help="database images of the real part")
    parser.add_argument("--real_queries_num", type=int, default=100, help="queries of the real part")
    parser.add_argument("--real_image_size", type=int, nargs=2, default=[120, 160], metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="faiss' OpenMP threads (default: faiss' own choice, one per core); on a machine whose "
                             "cores are busy with other work, 1 gives steadier figures")
    parser.add_argument("--work_folder", type=str, default=None,
                        help="where the temporary descriptors and indexes go (default: the system's temporary "
                             "folder); it needs about database_num x dim x 4 bytes x 2.5")
    parser.add_argument("--output", type=str, default="benchmark_search.json", help="JSON file of the figures")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    synthetic_params = search.IndexParams(
        ivf_lists=args.ivf_lists, ivf_probes=args.ivf_probes, pq_bytes=args.pq_bytes, hnsw_m=args.hnsw_m,
        hnsw_ef_construction=args.hnsw_ef_construction, hnsw_ef_search=args.hnsw_ef_search,
        index_train_size=args.index_train_size, seed=args.seed)
    # The real database is small: its lists, sample and PQ size are derived from it (the flags' defaults)
    real_params = search.IndexParams(ivf_probes=args.ivf_probes, hnsw_m=args.hnsw_m,
                                     hnsw_ef_construction=args.hnsw_ef_construction,
                                     hnsw_ef_search=args.hnsw_ef_search, seed=args.seed)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark_search_", dir=args.work_folder) as work:
        if not args.skip_synthetic:
            print(f"Writing {args.database_num} synthetic vectors of {args.dim} floats in {work}", flush=True)
            database = clustered_store(os.path.join(work, "database"), args.database_num, args.dim, args.clusters,
                                       args.intrinsic_dim, args.spread, args.seed, args.seed)
            queries = clustered_store(os.path.join(work, "queries"), args.queries_num, args.dim, args.clusters,
                                      args.intrinsic_dim, args.spread, args.seed, args.seed + 1)
            rows += benchmark(f"synthetic {args.database_num // 1000}k x {args.dim}", database, queries,
                              {name: synthetic_params for name in args.indexes}, args.max_ram_gb, work, args.k)
            print(markdown_table(rows, COLUMNS), flush=True)
        if not args.skip_real:
            database, queries, dataset = real_descriptors(work, args.real_database_num, args.real_queries_num,
                                                          args.real_image_size, args.seed)
            rows += benchmark(f"real {database.rows} x {database.row_shape[-1]}", database, queries,
                              {name: real_params for name in args.indexes}, args.max_ram_gb, work, args.k,
                              dataset)
    table = markdown_table(rows, COLUMNS)
    print(table)
    report = {"rows": rows, "arguments": vars(args), "table": table, "total_seconds": time.perf_counter() - start,
              "machine": {"cpus": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                          "load_average": load_average(), "python": platform.python_version(),
                          "faiss": faiss.__version__, "numpy": np.__version__}}
    with open(args.output, "w") as file:
        json.dump(report, file, indent=1)
    print(f"Figures written to {args.output}")


if __name__ == "__main__":
    main()
