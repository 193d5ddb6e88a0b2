"""Gather the results.json files of many runs into one table, as Markdown (printed, and saved with --output)
and CSV (saved with --output): one row per run with its key flags, recalls, descriptor size, FLOPs and times;
and, with --plot, a PNG of R@1 (--plot_y) against the descriptor size (--plot_x), one point per run.

    python tools/gather_results.py logs/sweep_lr logs/sweep_mining --output sweep --columns lr mining
    python tools/gather_results.py logs/sweeps/resize --plot resize.png --plot_x GFLOPs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules

import argparse
import csv
import json
import logging

from results import RESULTS_FILENAME, main_split, read_results

# Flags that tell runs apart in most sweeps; --columns adds more
KEY_FLAGS = ("backbone", "aggregation", "fc_output_dim", "pca_dim", "test_method", "resize")
# Numeric columns of the table that make sense on a plot's axes (besides the R@N)
PLOT_AXES = ("descriptor_size", "GFLOPs", "params_M", "extraction_s", "search_s", "total_s")


def find_results_files(folders):
    """Every results.json under the given folders (recursively) or given directly, sorted, without repeats."""
    found = set()
    for folder in folders:
        if os.path.isfile(folder):
            found.add(os.path.abspath(folder))
            continue
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is neither a folder nor a results file")
        for root, _, files in os.walk(folder):
            if RESULTS_FILENAME in files:
                found.add(os.path.abspath(os.path.join(root, RESULTS_FILENAME)))
    return sorted(found)


def load_all(paths):
    """(path, results) of every readable file; unreadable ones are reported and skipped."""
    loaded = []
    for path in paths:
        try:
            loaded.append((path, read_results(path)))
        except (OSError, json.JSONDecodeError) as error:
            logging.warning(f"Skipping {path}: {error}")
    return loaded


def _flag_value(value):
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return "" if value is None else value


def _number(value, digits):
    return "" if value is None else round(value, digits)


def table_rows(loaded, extra_flags=(), split=None):
    """One dict per run: run, script, dataset, split, key flags, R@N (the union of every run's N, in order),
    descriptor size, GFLOPs, parameters (millions), extraction / search / total seconds."""
    recall_keys = sorted({key for _, results in loaded for recalls in results.get("recalls", {}).values()
                          for key in recalls}, key=lambda key: int(key[2:]))
    rows = []
    for path, results in loaded:
        run_split = split or main_split(results)
        arguments = results.get("arguments", {})
        datasets = results.get("datasets", {})
        dataset = datasets.get(run_split) or next(iter(datasets.values()), {})
        row = {"run": os.path.relpath(os.path.dirname(path)), "script": results.get("script", ""),
               "dataset": dataset.get("name", ""), "split": run_split or ""}
        for flag in (*KEY_FLAGS, *extra_flags):
            row[flag] = _flag_value(arguments.get(flag))
        recalls = results.get("recalls", {}).get(run_split, {})
        for key in recall_keys:
            row[key] = _number(recalls.get(key), 2)
        flops, params = results.get("flops"), results.get("params")
        timings = results.get("timings", {})
        row.update({"descriptor_size": _flag_value(results.get("descriptor_size")),
                    "GFLOPs": _number(flops / 1e9 if flops is not None else None, 2),
                    "params_M": _number(params / 1e6 if params is not None else None, 2),
                    "extraction_s": _number(timings.get("extraction_seconds"), 1),
                    "search_s": _number(timings.get("search_seconds"), 2),
                    "total_s": _number(timings.get("total_seconds"), 1)})
        rows.append(row)
    return rows


def sort_rows(rows, column):
    """Rows by `column`, largest first for numbers (e.g. R@1), alphabetical for text; blanks last."""
    numbers = [row for row in rows if isinstance(row.get(column), (int, float))]
    others = [row for row in rows if not isinstance(row.get(column), (int, float))]
    return sorted(numbers, key=lambda row: -row[column]) + sorted(others, key=lambda row: str(row.get(column, "")))


def to_markdown(rows):
    if not rows:
        return "(no results)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def point_labels(rows, columns):
    """What tells each run apart. Runs saved in different folders (a sweep's runs, different --save_dir) are named
    by their folder's path below the folder they share ("resnet50conv4_gem", "partial/on_msls"); runs of one folder
    by their values of the columns that vary, names as they are and numbers with their column
    ("resnet50conv4 gem", "pca_dim=256"); else by the name of their folder."""
    parents = [os.path.dirname(os.path.abspath(row["run"])) for row in rows]
    if len(set(parents)) == len(parents) > 1:
        common = os.path.commonpath(parents)
        return [os.path.relpath(parent, common) for parent in parents]
    varying = [column for column in columns if len({str(row.get(column, "")) for row in rows}) > 1]
    labels = []
    for row, parent in zip(rows, parents):
        parts = [str(row[column]) if isinstance(row[column], str) else f"{column}={row[column]}"
                 for column in varying if row.get(column, "") != ""]
        labels.append(" ".join(parts) if parts else os.path.basename(parent))
    return labels


def plot_points(rows, x_column, y_column, extra_flags=()):
    """(label, x, y, dataset) of each row with numbers in both columns, and the runs of the rows without."""
    labels = point_labels(rows, ("dataset", *KEY_FLAGS, *extra_flags))
    points, skipped = [], []
    for row, label in zip(rows, labels):
        if _is_number(row.get(x_column)) and _is_number(row.get(y_column)):
            points.append((label, row[x_column], row[y_column], row["dataset"]))
        else:
            skipped.append(row["run"])
    return points, skipped


def annotations(points, log_x):
    """(text, x, y, on the left) per place of the plot: the labels of the runs there, one under the other, on the
    side towards the middle of the x axis (so that they stay inside the plot)."""
    import math
    scale = math.log if log_x else float
    xs = [point[1] for point in points]
    middle = (scale(min(xs)) + scale(max(xs))) / 2 if xs else 0
    places = {}
    for label, x, y, dataset in points:
        places.setdefault((dataset, x, y), []).append(label)
    return [("\n".join(labels), x, y, len(set(xs)) > 1 and scale(x) > middle)
            for (_, x, y), labels in places.items()]


def save_plot(path, points, x_column, y_column, title=None):
    """A scatter plot of the points, one colour per dataset, each point labelled (the labels of runs at the same
    place one under the other, on the side towards the middle); a log x axis when the x values span more than a
    factor 10 (descriptor sizes from 256 to 65536)."""
    import matplotlib  # imported here: only --plot needs it
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5.5), dpi=100)
    xs = [point[1] for point in points]
    log_x = bool(xs) and min(xs) > 0 and max(xs) > 10 * min(xs)
    if log_x:
        axes.set_xscale("log")
    for dataset in dict.fromkeys(point[3] for point in points):
        series = [point for point in points if point[3] == dataset]
        axes.scatter([point[1] for point in series], [point[2] for point in series], label=dataset or None)
    for text, x, y, on_the_left in annotations(points, log_x):
        axes.annotate(text, (x, y), textcoords="offset points", xytext=(-4 if on_the_left else 4, 4),
                      ha="right" if on_the_left else "left", va="bottom", fontsize=8)
    axes.set_xlabel(x_column)
    axes.set_ylabel(f"{y_column} (%)" if y_column.startswith("R@") else y_column)
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    if len({point[3] for point in points}) > 1:
        axes.legend(title="dataset")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("folders", nargs="*", default=["logs"],
                        help="Folders searched recursively for results.json (or results.json files themselves)")
    parser.add_argument("--output", default=None,
                        help="Also write the table as <output>.md and <output>.csv")
    parser.add_argument("--columns", nargs="+", default=[], metavar="FLAG",
                        help=f"Flags shown besides {', '.join(KEY_FLAGS)}")
    parser.add_argument("--split", default=None,
                        help="Recalls of this split (e.g. val); default: test when present, else the last")
    parser.add_argument("--sort", default=None, metavar="COLUMN", help="Sort by this column, e.g. R@1")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="Also save a plot of --plot_y against --plot_x, one labelled point per run, to this file")
    parser.add_argument("--plot_x", default="descriptor_size", metavar="COLUMN",
                        help=f"x axis of --plot: {', '.join(PLOT_AXES)}")
    parser.add_argument("--plot_y", default="R@1", metavar="COLUMN", help="y axis of --plot: an R@N or an x column")
    args = parser.parse_args(argv)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        parser.error(f"--plot {args.plot}: the plot is a PNG file, give a name ending in .png")
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    try:
        paths = find_results_files(args.folders)
    except FileNotFoundError as error:
        parser.error(str(error))
    rows = table_rows(load_all(paths), args.columns, args.split)
    if args.plot is not None:
        for flag, column in (("plot_x", args.plot_x), ("plot_y", args.plot_y)):
            if rows and column not in rows[0]:
                parser.error(f"--{flag} {column}: no such column; columns: {', '.join(rows[0])}")
    if args.sort:
        if rows and args.sort not in rows[0]:
            parser.error(f"--sort {args.sort}: no such column; columns: {', '.join(rows[0])}")
        rows = sort_rows(rows, args.sort)
    markdown = to_markdown(rows)
    print(markdown, end="")
    if args.output:
        with open(f"{args.output}.md", "w") as file:
            file.write(markdown)
        write_csv(f"{args.output}.csv", rows)
        logging.info(f"{len(rows)} runs written to {args.output}.md and {args.output}.csv")
    if args.plot is not None:
        points, skipped = plot_points(rows, args.plot_x, args.plot_y, args.columns)
        if skipped:
            logging.warning(f"Not on the plot (no {args.plot_x} or {args.plot_y}): {', '.join(skipped)}")
        save_plot(args.plot, points, args.plot_x, args.plot_y,
                  title=f"{args.plot_y} against {args.plot_x}, {len(points)} runs")
        logging.info(f"{len(points)} runs plotted in {args.plot}")
    return rows


if __name__ == "__main__":
    main()
