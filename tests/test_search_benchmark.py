"""benchmarks/benchmark_search.py on a tiny database: one row per index, the exact search as the reference, an
IVF that probes every list as exact, the table and the JSON file."""
import json
import os
import sys

import faiss
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import benchmark_search  # noqa: E402


@pytest.fixture
def restored_faiss_threads():
    """The benchmark runs with --threads 1 (training goes ten times slower when faiss' threads wait for cores
    busy with other tests); the other tests get faiss' threads back."""
    threads = faiss.omp_get_max_threads()
    yield
    faiss.omp_set_num_threads(threads)


def test_the_benchmark_reports_every_index(tmp_path, capsys, restored_faiss_threads):
    output = tmp_path / "figures.json"
    benchmark_search.main(["--database_num", "3000", "--queries_num", "30", "--dim", "16", "--clusters", "10",
                           "--intrinsic_dim", "4", "--ivf_lists", "8", "--ivf_probes", "8", "--index_train_size",
                           "1024", "--pq_bytes", "4", "--hnsw_m", "8", "--skip_real", "--threads", "1",
                           "--work_folder", str(tmp_path), "--output", str(output)])
    with open(output) as file:
        report = json.load(file)
    rows = {row["index"]: row for row in report["rows"]}
    assert list(rows) == ["flat (exact)", "ivf", "ivfpq", "hnsw"]
    assert rows["flat (exact)"]["recall@1"] == 1.0
    assert rows["ivf"]["recall@1"] == rows["ivf"]["recall@10"] == 1.0  # every list probed
    assert rows["hnsw"]["recall@10"] >= 0.9  # efSearch 128 on 3,000 vectors: nearly exact
    for row in rows.values():
        assert row["data"] == "synthetic 3k x 16"
    assert rows["ivfpq"]["index_mib"] < rows["ivf"]["index_mib"]  # 4-byte codes instead of 64-byte vectors
    assert rows["ivfpq"]["parameters"] == "ivf_lists=8 train_rows=1024 pq_bytes=4 ivf_probes=8"
    printed = capsys.readouterr().out
    assert printed.endswith(f"{report['table']}\nFigures written to {output}\n")
    assert report["table"].count("| synthetic 3k x 16 |") == 4
    assert os.listdir(tmp_path) == ["figures.json"]  # the temporary descriptors and indexes are gone
