"""Check a dataset in the datasets_vg layout and print a report; the exit status says whether problems were found.

For each split present (train, val, test): database/queries counts, coordinate ranges, positives per query and the
queries without any database image within the split's threshold (--train_positives_dist_threshold for train,
--val_positive_dist_threshold for val and test), names that do not parse, unreadable images and image sizes.
Across the dataset: the same file name in two places, several UTM zones, and splits that overlap in space (an
image of one split within --val_positive_dist_threshold metres of an image of another: test places seen in
training).

Exit status: 0 no problem (warnings allowed), 1 problems found (listed), 2 bad flags or no dataset there.

Usage:
    python tools/check_dataset.py --datasets_folder data/datasets --dataset_name pitts30k [--json report.json]
    python tools/check_dataset.py --dataset_folder data/datasets/pitts30k --skip_images
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules

import argparse
import collections
import json
import re

import numpy as np
from sklearn.neighbors import NearestNeighbors

from commons import UserInputError, progress_bar
from datasets_ws import IMAGE_EXTENSIONS, SPLITS, find_images, find_positives, open_image, parse_utm

SUBFOLDERS = ("database", "queries")
DATASETS_FOLDER_ENV = "DATASETS_FOLDER"
# UTM eastings lie within ~166 km..834 km of a zone's false origin; far outside, the numbers are probably not UTM
PLAUSIBLE_EAST = (100_000.0, 900_000.0)
PLAUSIBLE_NORTH = (0.0, 10_000_000.0)
ZONE_FIELD = re.compile(r"^\d{1,2}$")


def _relative(path, root):
    return os.path.relpath(path, root)


def _problem(kind, message, examples=()):
    return {"kind": kind, "message": message, "examples": list(examples)}


def _ranges(utms):
    if len(utms) == 0:
        return None
    low, high = utms.min(axis=0), utms.max(axis=0)
    return {"east_min": float(low[0]), "east_max": float(high[0]), "north_min": float(low[1]),
            "north_max": float(high[1]), "east_extent_m": float(high[0] - low[0]),
            "north_extent_m": float(high[1] - low[1])}


def _read_images(paths, check_images):
    """Sizes of the readable images ('WxH' -> count) and the unreadable ones [(path, error)]."""
    sizes, unreadable = collections.Counter(), []
    if not check_images:
        return None, []
    for path in progress_bar(paths, "Reading images", unit="images"):
        try:
            image = open_image(path)
        except UserInputError as error:
            unreadable.append((path, str(error)))
            continue
        sizes[f"{image.width}x{image.height}"] += 1
    return dict(sorted(sizes.items(), key=lambda item: -item[1])), unreadable


def _non_images(folder):
    """Files that find_images ignores (other extensions: .heic, .tif, .txt...)."""
    ignored = []
    for root, _, files in os.walk(folder, followlinks=True):
        ignored.extend(os.path.join(root, name) for name in files
                       if not name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
    return sorted(ignored)


def check_split(dataset_folder, split, positive_dist_threshold, check_images=True, max_listed=5):
    """The report of one split (a dict), with its problems and warnings; also returns {path: (east, north)}."""
    split_path = os.path.join(dataset_folder, "images", split)
    report = {"positive_dist_threshold": positive_dist_threshold}
    problems, warnings, coordinates, zones = [], [], {}, collections.Counter()
    utms_of, parsed_paths_of = {}, {}
    for kind in SUBFOLDERS:
        folder = os.path.join(split_path, kind)
        entry = {"count": 0}
        report[kind] = entry
        if not os.path.isdir(folder):
            problems.append(_problem("missing_folder", f"{split}: the folder {_relative(folder, dataset_folder)} "
                                                       "is missing; a split needs database/ and queries/."))
            utms_of[kind], parsed_paths_of[kind] = np.zeros((0, 2)), []
            continue
        paths = find_images(folder)
        entry["count"] = len(paths)
        if not paths:
            problems.append(_problem("empty_folder", f"{split}: no images in {_relative(folder, dataset_folder)}."))
        ignored = _non_images(folder)
        if ignored:
            warnings.append(_problem(
                "ignored_files", f"{split}/{kind}: {len(ignored)} files without an image extension "
                f"({', '.join(IMAGE_EXTENSIONS)}) are ignored.", [_relative(p, dataset_folder) for p in
                                                                 ignored[:max_listed]]))
        parsed, parsed_paths, bad_names = [], [], []
        for path in paths:
            try:
                utm = parse_utm(path)
            except UserInputError as error:
                bad_names.append(f"{_relative(path, dataset_folder)}: {error}")
                continue
            if not all(np.isfinite(utm)):
                bad_names.append(f"{_relative(path, dataset_folder)}: coordinates are not finite numbers")
                continue
            parsed.append(utm)
            parsed_paths.append(path)
            coordinates[path] = utm
            zone = os.path.basename(path).split("@")[3:5]
            if len(zone) == 2 and ZONE_FIELD.match(zone[0]):
                zones[zone[0].lstrip("0") + zone[1]] += 1
        if bad_names:
            problems.append(_problem("unparsable_names", f"{split}/{kind}: {len(bad_names)} file names do not "
                                                         "parse as @utm_east@utm_north@...@.jpg.",
                                     bad_names[:max_listed]))
        utms = np.array(parsed, dtype=np.float64).reshape(-1, 2)
        utms_of[kind], parsed_paths_of[kind] = utms, parsed_paths
        entry["coordinates"] = _ranges(utms)
        if len(utms) and not (np.all((utms[:, 0] >= PLAUSIBLE_EAST[0]) & (utms[:, 0] <= PLAUSIBLE_EAST[1]))
                              and np.all((utms[:, 1] >= PLAUSIBLE_NORTH[0]) & (utms[:, 1] <= PLAUSIBLE_NORTH[1]))):
            warnings.append(_problem(
                "implausible_utm", f"{split}/{kind}: some coordinates are outside the usual UTM ranges (east "
                f"{PLAUSIBLE_EAST[0]:.0f}..{PLAUSIBLE_EAST[1]:.0f}, north {PLAUSIBLE_NORTH[0]:.0f}.."
                f"{PLAUSIBLE_NORTH[1]:.0f}): are they metres? (latitude/longitude in the first two fields would "
                "make every distance wrong)"))
        entry["image_sizes"], unreadable = _read_images(paths, check_images)
        if unreadable:
            problems.append(_problem("unreadable_images", f"{split}/{kind}: {len(unreadable)} images cannot be "
                                                          "read.", [message for _, message in unreadable[:max_listed]]))
        entry["unreadable"] = len(unreadable) if check_images else None
    report["utm_zones"] = dict(zones)
    # Positives, on the images whose names parse
    positives = find_positives(utms_of["database"], utms_of["queries"], positive_dist_threshold)
    counts = [len(p) for p in positives]
    without = [path for path, count in zip(parsed_paths_of["queries"], counts) if count == 0]
    report["positives_per_query"] = ({"min": int(min(counts)), "mean": float(np.mean(counts)),
                                      "max": int(max(counts))} if counts else None)
    report["queries_without_positives"] = {"count": len(without),
                                           "first": [_relative(p, dataset_folder) for p in without[:max_listed]]}
    if without and len(utms_of["database"]):
        message = (f"{split}: {len(without)} of {len(counts)} queries have no database image within "
                   f"{positive_dist_threshold} m")
        if split == "train":
            # As the original, training drops these queries; the split still works
            warnings.append(_problem("queries_without_positives", message + "; training ignores them.",
                                     report["queries_without_positives"]["first"]))
        else:
            problems.append(_problem("queries_without_positives", message + "; they count as misses in every "
                                     "recall.", report["queries_without_positives"]["first"]))
    return report, problems, warnings, coordinates


def _duplicate_names(paths, dataset_folder, max_listed):
    places = collections.defaultdict(list)
    for path in paths:
        places[os.path.basename(path)].append(_relative(path, dataset_folder))
    duplicates = {name: where for name, where in places.items() if len(where) > 1}
    if not duplicates:
        return []
    examples = [" and ".join(where) for _, where in sorted(duplicates.items())[:max_listed]]
    return [_problem("duplicate_names", f"{len(duplicates)} file names appear in more than one place (the same "
                                        "photo twice: a query matching itself, or test images seen in training).",
                     examples)]


def _overlap_between_splits(coordinates_of, threshold, dataset_folder):
    """Per pair of splits: the smallest distance between their images and how many images of the second lie
    within `threshold` of the first."""
    report, problems = [], []
    splits = [s for s in SPLITS if coordinates_of.get(s)]
    for i, first in enumerate(splits):
        for second in splits[i + 1:]:
            first_paths, first_utms = zip(*coordinates_of[first].items())
            second_paths, second_utms = zip(*coordinates_of[second].items())
            knn = NearestNeighbors(n_neighbors=1, n_jobs=1).fit(np.array(first_utms))
            distances, indices = knn.kneighbors(np.array(second_utms))
            distances, indices = distances[:, 0], indices[:, 0]
            closest = int(np.argmin(distances))
            within = int(np.sum(distances <= threshold))
            entry = {"splits": [first, second], "min_distance_m": float(distances[closest]),
                     "closest_pair": [_relative(first_paths[indices[closest]], dataset_folder),
                                      _relative(second_paths[closest], dataset_folder)],
                     f"{second}_images_within_threshold": within}
            report.append(entry)
            if within:
                problems.append(_problem(
                    "splits_overlap", f"{within} images of {second} lie within {threshold} m of images of {first} "
                    f"(closest {distances[closest]:.1f} m): the same places in both splits.", [" and ".join(
                        entry["closest_pair"])]))
    return report, problems


def check_dataset(dataset_folder, val_positive_dist_threshold=25, train_positives_dist_threshold=10,
                  check_images=True, max_listed=5):
    """The report (a JSON-ready dict) of the dataset at `dataset_folder` (<datasets_folder>/<dataset_name>).
    `report["problems"]` is empty when nothing is wrong; `report["warnings"]` are worth a look only."""
    images_folder = os.path.join(dataset_folder, "images")
    if not os.path.isdir(images_folder):
        raise UserInputError(f"{dataset_folder} has no images/ folder; the layout is <datasets_folder>/"
                             "<dataset_name>/images/{train,val,test}/{database,queries}.")
    present = [split for split in SPLITS if os.path.isdir(os.path.join(images_folder, split))]
    report = {"dataset_folder": os.path.abspath(dataset_folder), "images_checked": check_images,
              "splits": {}, "between_splits": [], "problems": [], "warnings": []}
    if not present:
        report["problems"].append(_problem("no_splits", f"{images_folder} has none of the split folders "
                                                        f"{', '.join(SPLITS)}."))
        return report
    coordinates_of, all_paths, zones = {}, [], collections.Counter()
    for split in present:
        threshold = train_positives_dist_threshold if split == "train" else val_positive_dist_threshold
        split_report, problems, warnings, coordinates = check_split(dataset_folder, split, threshold, check_images,
                                                                    max_listed)
        report["splits"][split] = split_report
        report["problems"].extend(problems)
        report["warnings"].extend(warnings)
        coordinates_of[split] = coordinates
        zones.update(split_report["utm_zones"])
        for kind in SUBFOLDERS:
            folder = os.path.join(images_folder, split, kind)
            all_paths.extend(find_images(folder) if os.path.isdir(folder) else [])
    report["problems"].extend(_duplicate_names(all_paths, dataset_folder, max_listed))
    if len({zone.rstrip("ABCDEFGHJKLMNPQRSTUVWXYZ") for zone in zones}) > 1:
        report["problems"].append(_problem(
            "several_utm_zones", f"the images are in several UTM zones ({', '.join(sorted(zones))}): distances "
            "between zones are meaningless. Rebuild with one zone (tools/build_dataset.py --utm_zone)."))
    between, problems = _overlap_between_splits(coordinates_of, val_positive_dist_threshold, dataset_folder)
    report["between_splits"] = between
    report["problems"].extend(problems)
    return report


# ----------------------------------------------------------------------------------------------------------
# Report

def _format_coordinates(ranges):
    if ranges is None:
        return "no coordinates"
    return (f"east {ranges['east_min']:.2f} .. {ranges['east_max']:.2f} ({ranges['east_extent_m']:.1f} m), "
            f"north {ranges['north_min']:.2f} .. {ranges['north_max']:.2f} ({ranges['north_extent_m']:.1f} m)")


def format_report(report):
    lines = [f"Dataset {report['dataset_folder']}"]
    for split, entry in report["splits"].items():
        lines.append(f"{split} (positives within {entry['positive_dist_threshold']} m"
                     + (f"; UTM zones {', '.join(entry['utm_zones'])})" if entry["utm_zones"] else ")"))
        for kind in SUBFOLDERS:
            info = entry[kind]
            line = f"  {kind:<9} {info['count']:>6} images"
            if "coordinates" in info:
                line += "  " + _format_coordinates(info["coordinates"])
            lines.append(line)
            if info.get("image_sizes"):
                sizes = list(info["image_sizes"].items())
                lines.append("            sizes: " + ", ".join(f"{size} ({count})" for size, count in sizes[:5])
                             + (f" and {len(sizes) - 5} more" if len(sizes) > 5 else ""))
        positives = entry["positives_per_query"]
        if positives is not None:
            lines.append(f"  positives per query: min {positives['min']}, mean {positives['mean']:.1f}, "
                         f"max {positives['max']}; queries without positives: "
                         f"{entry['queries_without_positives']['count']}")
    if not report["images_checked"]:
        lines.append("Images not opened (--skip_images): unreadable files and sizes unchecked.")
    for entry in report["between_splits"]:
        first, second = entry["splits"]
        lines.append(f"{first} <-> {second}: closest images {entry['min_distance_m']:.1f} m apart")
    for title, items in (("Warnings", report["warnings"]), ("Problems", report["problems"])):
        if items:
            lines.append(f"{title} ({len(items)}):")
            for item in items:
                lines.append(f"  - {item['message']}")
                lines.extend(f"      {example}" for example in item["examples"])
    lines.append("No problems found." if not report["problems"] else f"{len(report['problems'])} problems found.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line

def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets_folder", type=str, default=None,
                        help=f"Folder with the datasets (default ${DATASETS_FOLDER_ENV})")
    parser.add_argument("--dataset_name", type=str, default=None)
    parser.add_argument("--dataset_folder", type=str, default=None,
                        help="The dataset's own folder, instead of --datasets_folder and --dataset_name")
    parser.add_argument("--val_positive_dist_threshold", type=int, default=25)
    parser.add_argument("--train_positives_dist_threshold", type=int, default=10)
    parser.add_argument("--skip_images", action="store_true", help="Do not open the images (faster)")
    parser.add_argument("--max_listed", type=int, default=5, help="Examples listed per problem")
    parser.add_argument("--json", type=str, default=None, help="Also write the report to this JSON file")
    return parser


def dataset_folder_from_args(parser, args):
    if args.dataset_folder is not None:
        if args.dataset_name is not None or args.datasets_folder is not None:
            parser.error("Give either --dataset_folder, or --datasets_folder and --dataset_name, not both.")
        folder = args.dataset_folder
    else:
        if args.dataset_name is None:
            parser.error("Give --dataset_name (with --datasets_folder) or --dataset_folder.")
        datasets_folder = args.datasets_folder or os.environ.get(DATASETS_FOLDER_ENV)
        if datasets_folder is None:
            parser.error(f"Give --datasets_folder (or set ${DATASETS_FOLDER_ENV}).")
        folder = os.path.join(datasets_folder, args.dataset_name)
    if not os.path.isdir(os.path.join(folder, "images")):
        parser.error(f"{folder} is not a dataset: it has no images/ folder (layout <datasets_folder>/<dataset_name>/"
                     "images/{train,val,test}/{database,queries}).")
    return folder


def main(argv=None):
    """Returns the exit status: 0 no problem, 1 problems (bad flags exit with 2 through argparse)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    for flag in ("val_positive_dist_threshold", "train_positives_dist_threshold"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}.")
    if args.max_listed < 0:
        parser.error("--max_listed cannot be negative.")
    folder = dataset_folder_from_args(parser, args)
    report = check_dataset(folder, args.val_positive_dist_threshold, args.train_positives_dist_threshold,
                           not args.skip_images, args.max_listed)
    print(format_report(report))
    if args.json is not None:
        try:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=1)
        except OSError as error:
            print(f"error: cannot write --json {args.json}: {error.strerror}", file=sys.stderr)
            return 2
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
