"""Descriptors on disk: one folder per kind of image (database, queries), the rows in shards of `shard_rows`
(`shard_00000.npy`, ...), read back through memory maps, and a `manifest.json` that says what made them.

A shard file appears only complete (written under a temporary name, then renamed), so after a crash the shards
present are exactly the finished ones and an extraction resumes with the missing ones. The manifest's
fingerprint (image paths, model, PCA, resize, test method, batch size, dtype) must match for a folder to be
reused: descriptors of another model or dataset are refused with a message, never mixed.

Also here: the fitted PCA saved beside the descriptors it produced (`save_pca`, `load_pca`).
"""
import glob
import hashlib
import json
import os

import numpy as np

from commons import TEMPORARY_SUFFIX, UserInputError, write_atomically

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard_{:05d}.npy"
FORMAT_VERSION = 1
# --descriptors_dtype: float16 halves the disk and page-cache footprint; search always computes in float32
DESCRIPTOR_DTYPES = {"float32": np.float32, "float16": np.float16}


def sha256_of_strings(strings):
    """One hash of a list of strings (e.g. image paths), order included."""
    digest = hashlib.sha256()
    for string in strings:
        digest.update(string.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def sha256_of_arrays(named_arrays, prefix=""):
    """One hash of (name, array) pairs: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256(prefix.encode("utf-8"))
    for name, array in named_arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode("utf-8"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def _write_json_atomically(path, content):
    write_atomically(path, lambda file: file.write(json.dumps(content, indent=1).encode("utf-8")))


def _read_manifest(folder):
    path = os.path.join(folder, MANIFEST_NAME)
    try:
        with open(path) as file:
            return json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} is unreadable ({error}): delete the folder {folder} to extract its "
                             "descriptors again") from error


class DescriptorShards:
    """The descriptors of one kind: `rows` rows of shape `row_shape`, stored as `dtype` in shards of
    `shard_rows` rows (the last one shorter). Read them with `blocks`, `read` or `take`, always as float32."""

    def __init__(self, folder, manifest):
        self.folder = folder
        self.fingerprint = manifest["fingerprint"]
        self.rows = manifest["rows"]
        self.shard_rows = manifest["shard_rows"]
        self.dtype = manifest["dtype"]
        self._row_shape = tuple(manifest["row_shape"]) if manifest.get("row_shape") else None

    @classmethod
    def open(cls, folder):
        manifest = _read_manifest(folder)
        if manifest is None:
            raise UserInputError(f"{folder} holds no {MANIFEST_NAME}: it is not a descriptors folder")
        return cls(folder, manifest)

    @property
    def shards_num(self):
        return -(-self.rows // self.shard_rows)

    def shard_range(self, shard):
        """[start, end) rows of `shard`."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def shard_path(self, shard):
        return os.path.join(self.folder, SHARD_PATTERN.format(shard))

    def missing_shards(self):
        return [s for s in range(self.shards_num) if not os.path.exists(self.shard_path(s))]

    @property
    def is_complete(self):
        return not self.missing_shards()

    def write_shard(self, shard, descriptors):
        """Save the rows of `shard` ([its rows, *row_shape]) as `dtype`: temporary file, fsync, rename."""
        start, end = self.shard_range(shard)
        if len(descriptors) != end - start:
            raise ValueError(f"Shard {shard} holds rows [{start}, {end}), got {len(descriptors)} rows")
        write_atomically(self.shard_path(shard),
                         lambda file: np.save(file, np.asarray(descriptors, dtype=DESCRIPTOR_DTYPES[self.dtype])))

    def shard(self, shard):
        """The rows of `shard` as a read-only memory map (stored dtype)."""
        return np.load(self.shard_path(shard), mmap_mode="r")

    @property
    def row_shape(self):
        if self._row_shape is None:
            self._row_shape = tuple(self.shard(0).shape[1:])
        return self._row_shape

    @property
    def row_bytes_float32(self):
        return int(np.prod(self.row_shape)) * 4

    def read(self, start, end):
        """Rows [start, end) as one float32 array (reading only the shards they lie in)."""
        out = np.empty((end - start,) + self.row_shape, dtype=np.float32)
        first, last = start // self.shard_rows, (max(end, start + 1) - 1) // self.shard_rows
        for shard in range(first, last + 1):
            shard_start, shard_end = self.shard_range(shard)
            a, b = max(start, shard_start), min(end, shard_end)
            if a < b:
                out[a - start:b - start] = self.shard(shard)[a - shard_start:b - shard_start]
        return out

    def blocks(self, block_rows, start=0, end=None):
        """Yield (start, float32 rows) of at most `block_rows` rows each, in order, over rows [start, end)."""
        end = self.rows if end is None else end
        for block_start in range(start, end, block_rows):
            yield block_start, self.read(block_start, min(block_start + block_rows, end))

    def take(self, indices):
        """Rows at sorted `indices`, as float32 (a sample for training an index)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices),) + self.row_shape, dtype=np.float32)
        shard_of = indices // self.shard_rows
        for shard in np.unique(shard_of):
            selected = shard_of == shard
            out[selected] = self.shard(int(shard))[indices[selected] - shard * self.shard_rows]
        return out

    def read_all(self):
        return self.read(0, self.rows)

    def mark_complete(self):
        """Record in the manifest that every shard is there, with their row shape (rank 0 does this once the
        processes that wrote the shards are done)."""
        missing = self.missing_shards()
        if missing:
            raise RuntimeError(f"{self.folder}: shards {missing[:5]} are missing, the extraction is not complete")
        manifest = _read_manifest(self.folder)
        manifest.update(row_shape=list(self.row_shape), complete=True)
        _write_json_atomically(os.path.join(self.folder, MANIFEST_NAME), manifest)


def describe_differences(found, expected):
    return ", ".join(sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key)))


def open_shards(folder, fingerprint, rows, shard_rows, dtype, owner=True):
    """The DescriptorShards in `folder`: the existing ones when their manifest has the same `fingerprint`
    (their shard layout then wins over `shard_rows`), else new ones (writing the manifest) when the folder has
    none. A folder made by another model, dataset or setting is a UserInputError that names what differs.

    fingerprint: dict of JSON values; rows: number of images; dtype: a key of DESCRIPTOR_DTYPES.
    owner: this process may create the folder and removes what a crash left; among several processes sharing
    the folder, one is the owner and opens it first, the others only open it (they might otherwise remove a
    shard another one is writing).
    """
    if dtype not in DESCRIPTOR_DTYPES:
        raise UserInputError(f"Unknown descriptors dtype '{dtype}'; valid: {', '.join(DESCRIPTOR_DTYPES)}")
    fingerprint = dict(fingerprint, rows=rows, dtype=dtype)
    manifest = _read_manifest(folder)
    if manifest is not None:
        found = manifest.get("fingerprint", {})
        if manifest.get("format_version") != FORMAT_VERSION or found != fingerprint:
            raise UserInputError(
                f"The descriptors folder {folder} was made by another model, dataset or setting "
                f"({describe_differences(found, fingerprint) or 'format version'} differ). Pass another "
                f"--descriptors_folder, or delete this one to extract again")
        if owner:  # pieces of shards left by a crash are never complete: remove them
            for leftover in glob.glob(os.path.join(folder, "*" + TEMPORARY_SUFFIX)):
                os.remove(leftover)
        return DescriptorShards(folder, manifest)
    if not owner:
        raise UserInputError(f"{folder} holds no {MANIFEST_NAME}: it is not a descriptors folder")
    os.makedirs(folder, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "rows": rows,
                "shard_rows": int(shard_rows), "dtype": dtype, "row_shape": None, "complete": False}
    _write_json_atomically(os.path.join(folder, MANIFEST_NAME), manifest)
    return DescriptorShards(folder, manifest)


# ----------------------------------------------------------------------------------------------------------
# PCA fitted once, saved beside the descriptors (no pickle: arrays in an .npz)

PCA_ARRAYS = ("components_", "mean_", "explained_variance_", "explained_variance_ratio_", "singular_values_")


def save_pca(path, pca, fingerprint):
    """Save a fitted scikit-learn PCA and the `fingerprint` (dict) of what it was fit with."""
    arrays = {name: getattr(pca, name) for name in PCA_ARRAYS}
    write_atomically(path, lambda file: np.savez(
        file, whiten=np.array(bool(pca.whiten)), noise_variance_=np.array(pca.noise_variance_),
        fingerprint=np.array(json.dumps(fingerprint, sort_keys=True)), **arrays))


def load_pca(path, fingerprint):
    """The PCA saved at `path` when it was fit with the same `fingerprint`, else a UserInputError."""
    from sklearn.decomposition import PCA  # imported here: the parser imports this module, most runs fit no PCA
    with np.load(path, allow_pickle=False) as saved:
        found = json.loads(str(saved["fingerprint"]))
        if found != json.loads(json.dumps(fingerprint, sort_keys=True)):
            raise UserInputError(f"{path} holds a PCA fit with another model or setting "
                                 f"({describe_differences(found, fingerprint)} differ). Pass another "
                                 "--descriptors_folder, or delete the file to fit PCA again")
        components = saved["components_"]
        pca = PCA(n_components=components.shape[0], whiten=bool(saved["whiten"]))
        for name in PCA_ARRAYS:
            setattr(pca, name, saved[name])
        pca.noise_variance_ = float(saved["noise_variance_"])
        pca.n_components_ = components.shape[0]
        pca.n_features_in_ = components.shape[1]
        pca.n_samples_ = None
    return pca


def pca_fingerprint(pca):
    """A hash of what a fitted PCA does to descriptors."""
    if pca is None:
        return None
    return sha256_of_arrays([(name, getattr(pca, name)) for name in ("components_", "mean_",
                                                                      "explained_variance_")],
                            prefix=f"whiten={bool(pca.whiten)}")
