"""Build a dataset in the datasets_vg layout from geotagged photos: their EXIF GPS, or a CSV of file,latitude,longitude.

Each photo is copied (or linked, --link) to
    <output_folder>/<dataset_name>/images/<split>/{database,queries}/<name>
where <name> is the VPR-datasets-downloader file name
    @utm_east@utm_north@zone_number@zone_letter@latitude@longitude@@@@@@@@<note>@.jpg
(east/north in metres with 2 decimals and 7 integer digits, latitude/longitude with 5 decimals and 3 integer digits,
the note is the photo's file name without extension, after an optional --note_prefix).

Which photos become queries: `--queries_every N` makes every N-th photo (in name or EXIF-time order) a query and the
others the database (an interleaved split of one traversal); `--subfolder database|queries` puts all of them in one
of the two (run twice, with two sets of photos, for a database and queries taken at different times).

Usage:
    python tools/build_dataset.py --photos_folder DIR --output_folder data/datasets --dataset_name mine \
        --queries_every 2
    python tools/build_dataset.py --csv photos.csv --output_folder data/datasets --dataset_name mine \
        --subfolder database
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root's modules

import argparse
import collections
import csv
import math
import shutil
from typing import NamedTuple, Optional

import utm
from PIL import Image, UnidentifiedImageError

from commons import UserInputError, exit_on_user_error, progress_bar
from datasets_ws import IMAGE_EXTENSIONS, SPLITS, find_images, split_folder

GPS_IFD = 0x8825
EXIF_IFD = 0x8769
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
DATE_TIME_ORIGINAL, SUBSEC_TIME_ORIGINAL = 36867, 37521
UTM_LATITUDE_RANGE = (-80.0, 84.0)  # where `utm` (and UTM itself) is defined
SUBFOLDERS = ("database", "queries")
ORDERS = ("name", "time")
NAME_FIELDS_NUM = 14  # fields between the first and the last '@' of a datasets_vg name; the note is the last one
CSV_COLUMN_NAMES = {"file": ("file", "filename", "file_name", "path", "image"),
                    "latitude": ("latitude", "lat"),
                    "longitude": ("longitude", "lon", "lng", "long")}


class Photo(NamedTuple):
    path: str
    lat: float
    lon: float
    timestamp: Optional[str]  # EXIF DateTimeOriginal "YYYY:MM:DD HH:MM:SS[.sub]", sortable as text; None if absent


class Located(NamedTuple):
    """Photos with a location, and those skipped (paths without GPS; (path, reason) of unreadable files)."""
    photos: list
    without_gps: list
    unreadable: list


class BuildSummary(NamedTuple):
    written: list  # (source path, destination path)
    zone_number: int
    zone_message: Optional[str]  # set when the zone was forced (several zones, or --utm_zone)
    without_gps: list
    unreadable: list


# ----------------------------------------------------------------------------------------------------------
# EXIF

def _rational_to_float(value):
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value!r}")
    return number


def _dms_to_degrees(dms):
    """Degrees from EXIF's (degrees, minutes, seconds) rationals; some writers store only degrees (or d, m)."""
    values = dms if isinstance(dms, (tuple, list)) else (dms,)
    if not 1 <= len(values) <= 3:
        raise ValueError(f"expected 1 to 3 rationals, got {dms!r}")
    return sum(_rational_to_float(v) / 60 ** i for i, v in enumerate(values))


def _open_for_metadata(path):
    """The image opened lazily (header only); an unreadable file raises UserInputError naming it."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UserInputError(f"Photo not found: {path}.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"Cannot read the photo {path} ({error}): it is corrupt or not an image.") from None


def gps_from_exif(exif):
    """(lat, lon) in decimal degrees from a PIL Exif object, or None when its GPS IFD lacks a usable position."""
    try:
        gps = exif.get_ifd(GPS_IFD)
    except (KeyError, OSError, SyntaxError, ValueError, TypeError):
        return None
    if not all(tag in gps for tag in (GPS_LATITUDE, GPS_LONGITUDE)):
        return None
    try:
        lat = _dms_to_degrees(gps[GPS_LATITUDE])
        lon = _dms_to_degrees(gps[GPS_LONGITUDE])
    except (ValueError, TypeError, ZeroDivisionError):
        return None
    lat_ref = str(gps.get(GPS_LATITUDE_REF, "N")).strip("\x00 ").upper()
    lon_ref = str(gps.get(GPS_LONGITUDE_REF, "E")).strip("\x00 ").upper()
    lat = -lat if lat_ref == "S" else lat
    lon = -lon if lon_ref == "W" else lon
    if lat == 0 and lon == 0:
        return None  # cameras without a fix write zeros
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def timestamp_from_exif(exif):
    """EXIF DateTimeOriginal (with its sub-seconds), else DateTime, as sortable text; None when absent."""
    try:
        details = exif.get_ifd(EXIF_IFD)
    except (KeyError, OSError, SyntaxError, ValueError, TypeError):
        details = {}
    stamp = details.get(DATE_TIME_ORIGINAL) or exif.get(306)  # 306: DateTime (of the file)
    if not stamp or not str(stamp).strip("\x00 "):
        return None
    stamp = str(stamp).strip("\x00 ")
    subsec = str(details.get(SUBSEC_TIME_ORIGINAL, "")).strip("\x00 ")
    return f"{stamp}.{subsec}" if subsec.isdigit() else stamp


def read_exif_gps(path):
    """(lat, lon) in decimal degrees from the photo's EXIF GPS, or None when it has none."""
    with _open_for_metadata(path) as image:
        return gps_from_exif(image.getexif())


def read_exif_timestamp(path):
    with _open_for_metadata(path) as image:
        return timestamp_from_exif(image.getexif())


# ----------------------------------------------------------------------------------------------------------
# Names

def _signed(value, int_digits, decimals):
    """Zero-padded to `int_digits` integer digits, the sign in front: 55.7 -> 055.70000, -80.0 -> -080.00000."""
    sign = "-" if value < 0 else ""
    return sign + f"{abs(value):0{int_digits + decimals + 1}.{decimals}f}"


def vg_name(east, north, zone_number, zone_letter, lat, lon, note, extension=".jpg"):
    """The datasets_vg / VPR-datasets-downloader file name; fields we do not know (pano id, heading...) stay empty."""
    if "@" in note or os.sep in note:
        raise ValueError(f"A note cannot contain '@' or '{os.sep}': {note!r}")
    fields = [f"{east:010.2f}", f"{north:010.2f}", f"{zone_number:02d}", zone_letter or "",
              _signed(lat, 3, 5), _signed(lon, 3, 5)] + [""] * (NAME_FIELDS_NUM - 7) + [note]
    return "@" + "@".join(fields) + "@" + extension


def latlon_to_utm(lat, lon, force_zone_number=None, force_northern=None):
    """(east, north, zone_number, zone_letter) with `utm`; the zone letter is always the latitude's own band."""
    if not UTM_LATITUDE_RANGE[0] <= lat <= UTM_LATITUDE_RANGE[1]:
        raise UserInputError(f"Latitude {lat} is outside the UTM range {UTM_LATITUDE_RANGE}: polar photos cannot "
                             "be given UTM coordinates.")
    east, north, zone_number, _ = utm.from_latlon(lat, lon, force_zone_number=force_zone_number,
                                                  force_northern=force_northern)
    return east, north, zone_number, utm.latitude_to_zone_letter(lat)


def latlon_to_vg_name(lat, lon, note, force_zone_number=None, force_northern=None, extension=".jpg"):
    east, north, zone_number, zone_letter = latlon_to_utm(lat, lon, force_zone_number, force_northern)
    return vg_name(east, north, zone_number, zone_letter, lat, lon, note, extension)


def note_of(path, note_prefix=""):
    """The note of a photo: its file name without extension ('@' would break the name, so it becomes '_')."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return (note_prefix + stem).replace("@", "_")


def extension_of(path):
    extension = os.path.splitext(path)[1].lower()
    return ".jpg" if extension == ".jpeg" else extension


def choose_zone(latlons, utm_zone=None):
    """(zone_number, northern or None, message or None): one UTM zone for all photos, because distances between
    coordinates of different zones (or hemispheres) are meaningless. The zone of the majority wins, unless
    `utm_zone` is given."""
    zones = collections.Counter(utm.latlon_to_zone_number(lat, lon) for lat, lon in latlons)
    northern = collections.Counter(lat >= 0 for lat, _ in latlons)
    messages = []
    if utm_zone is not None:
        zone_number = utm_zone
        if set(zones) != {utm_zone}:
            messages.append(f"all photos are put in UTM zone {utm_zone} as asked (their own zones: "
                            f"{_counts_text(zones)})")
    else:
        zone_number = zones.most_common(1)[0][0]
        if len(zones) > 1:
            messages.append(f"the photos span several UTM zones ({_counts_text(zones)}): all are put in zone "
                            f"{zone_number}, the zone of the majority, so that distances stay meaningful "
                            "(pass --utm_zone to choose another)")
    force_northern = None
    if len(northern) > 1:
        force_northern = northern.most_common(1)[0][0]
        messages.append("the photos span both hemispheres: all northings are computed in the "
                        f"{'northern' if force_northern else 'southern'} one, the hemisphere of the majority")
    return zone_number, force_northern, "; ".join(messages) or None


def _counts_text(counter):
    return ", ".join(f"zone {zone}: {count} photos" for zone, count in sorted(counter.items()))


# ----------------------------------------------------------------------------------------------------------
# Finding the photos and their positions

def _locate(paths, position_of):
    """Photos with a position; `position_of(path, exif)` gives (lat, lon) or None."""
    photos, without_gps, unreadable = [], [], []
    for path in progress_bar(paths, "Reading photos", unit="photos"):
        try:
            with _open_for_metadata(path) as image:
                exif = image.getexif()
        except UserInputError as error:
            unreadable.append((path, str(error)))
            continue
        position = position_of(path, exif)
        if position is None:
            without_gps.append(path)
        else:
            photos.append(Photo(path, position[0], position[1], timestamp_from_exif(exif)))
    return Located(photos, without_gps, unreadable)


def locate_photos_from_exif(photos_folder):
    """The photos under `photos_folder` (recursively) with their EXIF GPS positions."""
    if not os.path.isdir(photos_folder):
        raise UserInputError(f"--photos_folder {photos_folder} is not a folder.")
    paths = find_images(photos_folder)
    if not paths:
        raise UserInputError(f"No photos in {photos_folder} (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                             "recursively).")
    return _locate(paths, lambda path, exif: gps_from_exif(exif))


def read_locations_csv(csv_path):
    """{absolute path: (lat, lon) or None} from a CSV of file,latitude,longitude (header optional; with a header
    the columns are found by name and others are ignored). Paths are relative to the CSV's folder, or absolute.
    Empty latitude and longitude mean "no position" (the photo is skipped)."""
    if not os.path.isfile(csv_path):
        raise UserInputError(f"--csv {csv_path} is not a file.")
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        rows = [(number, row) for number, row in enumerate(csv.reader(file), start=1)
                if row and any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")]
    if not rows:
        raise UserInputError(f"{csv_path} has no rows; it should have lines 'file,latitude,longitude'.")
    columns = (0, 1, 2)
    first_number, first_row = rows[0]
    if len(first_row) >= 3 and not _is_number(first_row[1]):  # a header
        header = [cell.strip().lower() for cell in first_row]
        found = [[i for i, cell in enumerate(header) if cell in CSV_COLUMN_NAMES[column]]
                 for column in ("file", "latitude", "longitude")]
        if not all(found):
            raise UserInputError(
                f"The header of {csv_path} ({', '.join(first_row)}) lacks a file, latitude or longitude column: "
                f"name them {', '.join(names[0] for names in CSV_COLUMN_NAMES.values())} "
                "(or remove the header and put them in that order).")
        columns = tuple(indices[0] for indices in found)
        rows = rows[1:]
    folder = os.path.dirname(os.path.abspath(csv_path))
    locations = {}
    for number, row in rows:
        where = f"{csv_path}, line {number}"
        if len(row) <= max(columns):
            raise UserInputError(f"{where}: expected file,latitude,longitude, got {','.join(row)!r}.")
        file_name, lat_text, lon_text = (row[c].strip() for c in columns)
        path = os.path.normpath(os.path.join(folder, os.path.expanduser(file_name)))
        if path in locations:
            raise UserInputError(f"{where}: {file_name} is listed twice.")
        if not os.path.isfile(path):
            raise UserInputError(f"{where}: the photo {path} does not exist (relative paths are relative to the "
                                 "CSV's folder).")
        if not lat_text and not lon_text:
            locations[path] = None
            continue
        if not (_is_number(lat_text) and _is_number(lon_text)):
            raise UserInputError(f"{where}: latitude and longitude must be decimal degrees, got "
                                 f"{lat_text!r}, {lon_text!r}.")
        lat, lon = float(lat_text), float(lon_text)
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise UserInputError(f"{where}: latitude {lat} / longitude {lon} out of range (latitude -90..90, "
                                 "longitude -180..180); are the two columns swapped?")
        locations[path] = (lat, lon)
    if not locations:
        raise UserInputError(f"{csv_path} lists no photos.")
    return locations


def _is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def locate_photos_from_csv(csv_path):
    """The photos listed in a CSV of file,latitude,longitude, in the CSV's order."""
    locations = read_locations_csv(csv_path)
    return _locate(list(locations), lambda path, exif: locations[path])


# ----------------------------------------------------------------------------------------------------------
# Writing the dataset

def order_photos(photos, order):
    """Photos in file-name order (path, for ties) or in EXIF-time order (then name)."""
    by_name = sorted(photos, key=lambda p: (os.path.basename(p.path), p.path))
    if order == "name":
        return by_name
    if order == "time":
        untimed = [p.path for p in by_name if p.timestamp is None]
        if untimed:
            raise UserInputError(f"{len(untimed)} photos have no EXIF date (DateTimeOriginal), e.g. "
                                 f"{', '.join(untimed[:3])}: use --order name.")
        return sorted(by_name, key=lambda p: p.timestamp)
    raise ValueError(f"Unknown order {order!r}; valid orders: {', '.join(ORDERS)}")


def assign_subfolders(count, queries_every=None, subfolder=None):
    """'database' or 'queries' for each of `count` ordered photos: every `queries_every`-th one (the 2nd, 4th...
    for 2) is a query, or all go to `subfolder`."""
    if (queries_every is None) == (subfolder is None):
        raise ValueError("Give exactly one of queries_every and subfolder")
    if subfolder is not None:
        if subfolder not in SUBFOLDERS:
            raise ValueError(f"Unknown subfolder {subfolder!r}; valid: {', '.join(SUBFOLDERS)}")
        return [subfolder] * count
    if queries_every < 2:
        raise ValueError("queries_every must be at least 2 (every photo a query leaves no database)")
    return ["queries" if (i + 1) % queries_every == 0 else "database" for i in range(count)]


def plan_dataset(photos, output_folder, dataset_name, split="test", queries_every=None, subfolder=None,
                 order="name", note_prefix="", utm_zone=None):
    """[(source, destination)] for the photos, the zone number and the zone message; nothing is written.
    Raises UserInputError when a destination exists or two photos would get the same name."""
    if not photos:
        raise UserInputError("No photo has a position: nothing to build.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid: {', '.join(SPLITS)}")
    ordered = order_photos(photos, order)
    zone_number, force_northern, zone_message = choose_zone([(p.lat, p.lon) for p in ordered], utm_zone)
    folder = split_folder(output_folder, dataset_name, split)
    plan, sources_of = [], collections.defaultdict(list)
    for photo, kind in zip(ordered, assign_subfolders(len(ordered), queries_every, subfolder)):
        name = latlon_to_vg_name(photo.lat, photo.lon, note_of(photo.path, note_prefix), zone_number,
                                 force_northern, extension_of(photo.path))
        plan.append((photo.path, os.path.join(folder, kind, name)))
        sources_of[name].append(photo.path)
    clashes = {name: sources for name, sources in sources_of.items() if len(sources) > 1}
    if clashes:
        name, sources = next(iter(clashes.items()))
        raise UserInputError(f"{len(clashes)} names would be used by several photos, e.g. {name} by "
                             f"{' and '.join(sources)} (same file name and position). Rename or remove "
                             "the duplicates.")
    existing = [destination for _, destination in plan if os.path.lexists(destination)]
    if existing:
        raise UserInputError(f"{len(existing)} of the images already exist, e.g. {existing[0]}: refusing to "
                             "overwrite them. Choose another --dataset_name or --output_folder, or delete them.")
    return plan, zone_number, zone_message


def write_dataset(plan, link=False):
    """Copy (byte for byte, EXIF kept) or symlink (absolute target) each source to its destination."""
    for source, destination in progress_bar(plan, "Writing the dataset", unit="photos"):
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if link:
            os.symlink(os.path.abspath(source), destination)
        else:
            shutil.copy2(source, destination)


def build_dataset(located, output_folder, dataset_name, split="test", queries_every=None, subfolder=None,
                  order="name", note_prefix="", utm_zone=None, link=False):
    """Write the located photos in the datasets_vg layout; returns a BuildSummary."""
    plan, zone_number, zone_message = plan_dataset(located.photos, output_folder, dataset_name, split,
                                                   queries_every, subfolder, order, note_prefix, utm_zone)
    write_dataset(plan, link)
    return BuildSummary(plan, zone_number, zone_message, located.without_gps, located.unreadable)


def format_summary(summary, dataset_folder, max_listed=10):
    lines = []
    for path, reason in summary.unreadable[:max_listed]:
        lines.append(f"warning: skipped an unreadable file: {reason}")
    if summary.without_gps:
        lines.append(f"warning: skipped {len(summary.without_gps)} photos without a position: "
                     + ", ".join(summary.without_gps[:max_listed])
                     + (", ..." if len(summary.without_gps) > max_listed else ""))
    if summary.zone_message:
        lines.append(f"warning: {summary.zone_message}")
    counts = collections.Counter(os.path.basename(os.path.dirname(d)) for _, d in summary.written)
    easts = [float(os.path.basename(d).split("@")[1]) for _, d in summary.written]
    norths = [float(os.path.basename(d).split("@")[2]) for _, d in summary.written]
    lines.append(f"Wrote {len(summary.written)} images to {dataset_folder}: "
                 + ", ".join(f"{counts[kind]} {kind}" for kind in SUBFOLDERS if counts[kind])
                 + f"; UTM zone {summary.zone_number}; east {min(easts):.2f} .. {max(easts):.2f} "
                 f"({max(easts) - min(easts):.1f} m), north {min(norths):.2f} .. {max(norths):.2f} "
                 f"({max(norths) - min(norths):.1f} m).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line

def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--photos_folder", type=str, help="Folder of photos with GPS in their EXIF (recursive)")
    source.add_argument("--csv", type=str, help="CSV of file,latitude,longitude (header optional; paths relative "
                                                "to the CSV's folder or absolute)")
    parser.add_argument("--output_folder", type=str, required=True, help="The datasets folder to write into")
    parser.add_argument("--dataset_name", type=str, required=True)
    parser.add_argument("--split", type=str, default="test", choices=SPLITS)
    roles = parser.add_mutually_exclusive_group(required=True)
    roles.add_argument("--queries_every", type=int,
                       help="Every N-th photo (in --order) becomes a query, the others the database")
    roles.add_argument("--subfolder", type=str, choices=SUBFOLDERS, help="Put all the photos in this subfolder")
    parser.add_argument("--order", type=str, default="name", choices=ORDERS,
                        help="Order of the photos for --queries_every: file name or EXIF DateTimeOriginal")
    parser.add_argument("--note_prefix", type=str, default="", help="Prefix of the note (last name field)")
    parser.add_argument("--utm_zone", type=int, default=None,
                        help="Force this UTM zone number (default: the zone of the majority of the photos)")
    parser.add_argument("--link", action="store_true", help="Symlink the photos instead of copying them")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.queries_every is not None and args.queries_every < 2:
        parser.error(f"--queries_every must be at least 2 (got {args.queries_every}): with 1 every photo would be "
                     "a query. Use --subfolder queries for that.")
    if args.utm_zone is not None and not 1 <= args.utm_zone <= 60:
        parser.error(f"--utm_zone must be between 1 and 60, got {args.utm_zone}.")
    if "@" in args.note_prefix or os.sep in args.note_prefix:
        parser.error(f"--note_prefix cannot contain '@' or '{os.sep}'.")
    if args.photos_folder is not None:
        located = locate_photos_from_exif(args.photos_folder)
        source_text = f"{args.photos_folder} (no GPS in their EXIF)"
    else:
        located = locate_photos_from_csv(args.csv)
        source_text = f"{args.csv} (no latitude/longitude)"
    if not located.photos:
        listed = located.without_gps[:5] + [path for path, _ in located.unreadable[:5]]
        raise UserInputError(f"None of the {len(located.without_gps) + len(located.unreadable)} photos of "
                             f"{source_text} has a position: {', '.join(listed)}"
                             f"{', ...' if len(listed) >= 5 else ''}.")
    summary = build_dataset(located, args.output_folder, args.dataset_name, args.split, args.queries_every,
                            args.subfolder, args.order, args.note_prefix, args.utm_zone, args.link)
    print(format_summary(summary, split_folder(args.output_folder, args.dataset_name, args.split)))
    return summary


if __name__ == "__main__":
    exit_on_user_error(main)
