"""What a run leaves for people and tools: `results.json` in its run folder, and one `RESULT {...}` line on
stdout that a shell sweep can grep (`grep '^RESULT ' sweep.out | cut -c8- | jq ...`).

train.py and eval.py both end with:
    results = write_results(output_folder, args, model, recalls_by_split, timings, datasets)
    print_result_line(results)
tools/gather_results.py turns many results.json files into one table.
"""
import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime

RESULTS_FILENAME = "results.json"
RESULT_LINE_PREFIX = "RESULT "
SCHEMA_VERSION = 1
REPO_FOLDER = os.path.dirname(os.path.abspath(__file__))


def recall_key(n):
    return f"R@{n}"


def dataset_summary(dataset):
    """Name, split and sizes of a datasets_ws.GeoDataset (a dict is taken as already summarised)."""
    if isinstance(dataset, dict):
        return dict(dataset)
    return {"name": dataset.dataset_name, "split": dataset.split, "database_num": dataset.database_num,
            "queries_num": dataset.queries_num, "positive_dist_threshold": dataset.positive_dist_threshold}


def _package_version(module_name):
    try:
        return __import__(module_name).__version__
    except Exception:  # a missing or odd package must not break the end of a run
        return None


def _git_commit():
    try:
        output = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_FOLDER, capture_output=True, text=True,
                                timeout=10)
        return output.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment():
    """Versions and hardware, so that numbers from different machines are not compared blindly."""
    import torch  # imported here: reading results (tools/gather_results.py) needs no torch
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "faiss", "numpy", "sklearn"):
        versions[name] = _package_version(name)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions, "git_commit": _git_commit(), "hostname": platform.node(), "gpu": gpu,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def _jsonable(value):
    """Arguments as JSON values (tuples become lists, anything else unknown its str)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def build_results(args, recalls_by_split, timings, datasets, descriptor_size, flops=None, params=None,
                  output_folder=None, script=None, start_time=None, end_time=None, extra=None):
    """The content of results.json (a pure function of its inputs, plus the environment).

    recalls_by_split: {split: {N: recall in percent}}, e.g. {"test": {1: 47.8, 5: 55.8}};
    timings: {name: seconds}, e.g. {"extraction_seconds": .., "search_seconds": .., "total_seconds": ..};
    datasets: {split: GeoDataset or summary dict}; descriptor_size: the size searched with (pca_dim if any).
    """
    end_time = end_time or datetime.now()
    results = {
        "schema": SCHEMA_VERSION,
        "script": script or os.path.basename(sys.argv[0]),
        "run_folder": os.path.abspath(output_folder) if output_folder else None,
        "start_time": start_time.isoformat(timespec="seconds") if start_time else None,
        "end_time": end_time.isoformat(timespec="seconds"),
        "arguments": _jsonable(vars(args)),
        "datasets": {split: dataset_summary(dataset) for split, dataset in datasets.items()},
        "descriptor_size": descriptor_size,
        "flops": flops,
        "params": params,
        "recalls": {split: {recall_key(n): float(r) for n, r in recalls.items()}
                    for split, recalls in recalls_by_split.items()},
        "timings": {name: float(seconds) for name, seconds in timings.items()},
    }
    results.update(environment())
    if extra:
        results.update(_jsonable(extra))
    return results


def write_json_atomically(path, data):
    """Readers never see half a file (commons.write_atomically)."""
    from commons import write_atomically  # imported here: reading results (tools/gather_results.py) needs no torch
    write_atomically(path, lambda file: file.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def flops_and_params(model, resize, device):
    """(FLOPs, parameters) of `model` at `resize`, or (None, None) when they cannot be measured."""
    import util  # the model side: only imported when a run ends
    try:
        return util.compute_flops_and_params(model, resize, device)
    except Exception as error:  # a profiler failure must not lose the recalls of a finished run
        logging.warning(f"Could not measure FLOPs: {type(error).__name__}: {error}")
        return None, None


def write_results(output_folder, args, model, recalls_by_split, timings, datasets, descriptor_size=None,
                  script=None, start_time=None, extra=None, flops_and_params_measured=None):
    """Measure FLOPs and parameters of `model` at args.resize (unless the caller measured them already:
    `flops_and_params_measured`), write <output_folder>/results.json, return it.

    descriptor_size defaults to model.features_dim (pass args.pca_dim when PCA reduced the descriptors).
    See build_results for the other arguments.
    """
    flops, params = flops_and_params_measured or flops_and_params(model, args.resize, args.device)
    if descriptor_size is None:
        descriptor_size = getattr(model, "features_dim", None)
    results = build_results(args, recalls_by_split, timings, datasets, descriptor_size, flops, params,
                            output_folder, script, start_time, extra=extra)
    path = os.path.join(output_folder, RESULTS_FILENAME)
    write_json_atomically(path, results)
    logging.info(f"Results saved in {path}")
    return results


def main_split(results):
    """The split the one-line summary reports: test if there is one, else the last."""
    splits = list(results.get("recalls", {}))
    if not splits:
        return None
    return "test" if "test" in splits else splits[-1]


def summary(results):
    """The flat summary of a results dict: dataset, split, R@N..., descriptor size, FLOPs, timings, run folder."""
    split = main_split(results)
    datasets = results.get("datasets", {})
    # Without recalls (matching folders) the first dataset entry describes the run
    dataset = datasets.get(split) or next(iter(datasets.values()), {})
    line = {"script": results.get("script"), "dataset": dataset.get("name"), "split": split}
    line.update(results.get("recalls", {}).get(split, {}))
    line.update({"descriptor_size": results.get("descriptor_size"), "flops": results.get("flops")})
    line.update(results.get("timings", {}))
    line["run_folder"] = results.get("run_folder")
    return line


def result_line(results):
    """`RESULT {"dataset": ..., "R@1": ..., ...}` on one line."""
    return RESULT_LINE_PREFIX + json.dumps(summary(results))


def print_result_line(results):
    print(result_line(results), flush=True)


def parse_result_line(line):
    """The dict of a RESULT line (the inverse of result_line)."""
    if not line.startswith(RESULT_LINE_PREFIX):
        raise ValueError(f"Not a result line: {line[:40]!r}")
    return json.loads(line[len(RESULT_LINE_PREFIX):])


def read_results(path):
    with open(path) as file:
        return json.load(file)
