"""The synthetic street-world generator: layout, names, geometry of the splits, determinism, marker logic."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import make_synthetic_dataset as synthetic

SPLITS = ("train", "val", "test")
TINY = dict(train_database_num=40, train_queries_num=20, val_database_num=30, val_queries_num=12,
            test_database_num=30, test_queries_num=12, image_size=(120, 160), train_far_queries_num=3)
MICRO = dict(train_database_num=6, train_queries_num=4, val_database_num=4, val_queries_num=2,
             test_database_num=4, test_queries_num=2, image_size=(48, 64), train_far_queries_num=1)


def files(folder):
    return sorted(os.listdir(folder))


def utms(folder):
    """UTM east/north of every image in `folder`, read with a plain split on '@'."""
    return [(float(name.split("@")[1]), float(name.split("@")[2])) for name in files(folder)]


def distance(a, b):
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5


def digests(dataset_folder):
    """Relative path -> sha1 of every image file."""
    result = {}
    for root, _, names in os.walk(os.path.join(dataset_folder, "images")):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                result[os.path.relpath(os.path.join(root, name), dataset_folder)] = hashlib.sha1(file.read()).digest()
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.generate_dataset(str(tmp_path_factory.mktemp("datasets")), "tiny", seed=3, **TINY)


def test_layout_counts_and_names(tiny):
    assert tiny.endswith(os.path.join("", "tiny"))
    all_names = []
    for split in SPLITS:
        for subfolder in ("database", "queries"):
            names = files(os.path.join(tiny, "images", split, subfolder))
            assert len(names) == TINY[f"{split}_{subfolder}_num"]
            for name in names:
                fields = name.split("@")
                assert len(fields) == 16 and fields[0] == "" and fields[-1] == ".jpg"
                assert len(fields[1].split(".")[1]) == 2 and len(fields[2].split(".")[1]) == 2
                float(fields[1]), float(fields[2])
                assert 0 <= float(fields[9]) <= 360  # compass heading
                assert fields[14].startswith(f"{split}_{subfolder}_")
            all_names += names
    assert len(set(all_names)) == len(all_names)
    assert sorted(os.listdir(tiny)) == [".complete", "images"]


def test_images_open_at_the_requested_size(tiny):
    for split in SPLITS:
        for subfolder in ("database", "queries"):
            folder = os.path.join(tiny, "images", split, subfolder)
            for name in files(folder)[:5]:
                with Image.open(os.path.join(folder, name)) as image:
                    assert image.format == "JPEG" and image.mode == "RGB"
                    assert image.size == (TINY["image_size"][1], TINY["image_size"][0])  # PIL gives (W, H)
                    pixels = np.asarray(image)
                    assert pixels.std() > 20  # a street, not a flat colour


def test_splits_lie_far_apart(tiny):
    points = {split: utms(os.path.join(tiny, "images", split, "database"))
              + utms(os.path.join(tiny, "images", split, "queries")) for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            closest = min(distance(p, q) for p in points[a] for q in points[b])
            assert closest > 1000, (a, b, closest)


def test_queries_and_their_nearest_database_images(tiny):
    for split in SPLITS:
        database = utms(os.path.join(tiny, "images", split, "database"))
        queries = utms(os.path.join(tiny, "images", split, "queries"))
        nearest = [min(distance(query, image) for image in database) for query in queries]
        far = [d for d in nearest if d > 10]
        if split == "train":
            # the configured few have no database image within 10 m, but some within 25 m
            assert len(far) == TINY["train_far_queries_num"]
            assert all(d <= 25 for d in far)
        else:
            assert far == []


def test_the_content_is_learnable(tiny):
    """A query's nearest database image by a tiny-image descriptor is within 25 m far more often than chance."""
    def descriptors(folder):
        result = []
        for name in files(folder):
            with Image.open(os.path.join(folder, name)) as image:
                pixels = np.asarray(image.resize((16, 12), Image.BILINEAR), dtype=np.float64).ravel()
            pixels = (pixels - pixels.mean()) / pixels.std()
            result.append(pixels / np.linalg.norm(pixels))
        return np.array(result)

    found, chance, queries_num = 0, 0.0, 0
    for split in SPLITS:
        folder = os.path.join(tiny, "images", split)
        database, queries = utms(os.path.join(folder, "database")), utms(os.path.join(folder, "queries"))
        best = (descriptors(os.path.join(folder, "queries")) @ descriptors(os.path.join(folder, "database")).T
                ).argmax(axis=1)
        for query, index in zip(queries, best):
            found += distance(query, database[index]) <= 25
            chance += sum(distance(query, image) <= 25 for image in database) / len(database)
            queries_num += 1
    assert found / queries_num > 1.4 * chance / queries_num  # 75 % vs 41 % on this set


def test_same_seed_same_bytes_any_process_count_other_seed_differs(tmp_path):
    first = synthetic.generate_dataset(str(tmp_path / "a"), seed=5, **MICRO)
    second = synthetic.generate_dataset(str(tmp_path / "b"), seed=5, processes=2, **MICRO)
    other = synthetic.generate_dataset(str(tmp_path / "c"), seed=6, **MICRO)
    assert digests(first) == digests(second)
    with open(os.path.join(first, ".complete")) as a, open(os.path.join(second, ".complete")) as b:
        assert a.read() == b.read()
    other_digests = digests(other)
    assert set(other_digests.values()).isdisjoint(digests(first).values())


def test_complete_dataset_is_kept(tmp_path, monkeypatch):
    folder = synthetic.generate_dataset(str(tmp_path), seed=1, **MICRO)
    before = digests(folder)

    def no_rendering(task):
        raise AssertionError("a complete dataset was rendered again")

    monkeypatch.setattr(synthetic, "_render_task", no_rendering)
    assert synthetic.generate_dataset(str(tmp_path), seed=1, **MICRO) == folder
    assert digests(folder) == before
    with open(os.path.join(folder, ".complete")) as file:
        marker = json.load(file)
    assert marker["seed"] == 1 and marker["image_size"] == [48, 64] and marker["train_queries_num"] == 4


def test_interrupted_run_leaves_nothing_complete_and_is_regenerated(tmp_path, monkeypatch):
    render = synthetic._render_task
    calls = []

    def interrupted(task):
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt
        render(task)

    monkeypatch.setattr(synthetic, "_render_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_dataset(str(tmp_path), seed=2, **MICRO)
    assert os.listdir(tmp_path) == []  # neither the dataset nor the temporary folder

    # A temporary folder left by a killed run, and a dataset folder without its marker
    os.makedirs(tmp_path / ".synthetic.incomplete" / "images")
    os.makedirs(tmp_path / "synthetic" / "images" / "train")
    monkeypatch.setattr(synthetic, "_render_task", render)
    folder = synthetic.generate_dataset(str(tmp_path), seed=2, **MICRO)
    assert sorted(os.listdir(tmp_path)) == ["synthetic"]
    assert len(digests(folder)) == sum(value for key, value in MICRO.items() if key.endswith("_num")
                                       and key != "train_far_queries_num")


def test_other_parameters_are_an_error_unless_overwrite(tmp_path):
    folder = synthetic.generate_dataset(str(tmp_path), seed=1, **MICRO)
    with pytest.raises(ValueError) as error:
        synthetic.generate_dataset(str(tmp_path), seed=2, **MICRO)
    message = str(error.value)
    assert folder in message and "--overwrite" in message and "seed" in message
    assert json.load(open(os.path.join(folder, ".complete")))["seed"] == 1  # untouched

    synthetic.generate_dataset(str(tmp_path), seed=2, overwrite=True, **MICRO)
    assert json.load(open(os.path.join(folder, ".complete")))["seed"] == 2


def test_a_dataset_of_an_older_version_is_generated_again(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "FORMAT_VERSION", synthetic.FORMAT_VERSION - 1)
    folder = synthetic.generate_dataset(str(tmp_path), seed=1, **MICRO)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format_version, seed differ"):  # other parameters too: still an error
        synthetic.generate_dataset(str(tmp_path), seed=2, **MICRO)

    render = synthetic._render_task
    rendered = []
    monkeypatch.setattr(synthetic, "_render_task", lambda task: rendered.append(task) or render(task))
    assert synthetic.generate_dataset(str(tmp_path), seed=1, **MICRO) == folder
    assert len(rendered) == len(digests(folder)) == 22
    assert json.load(open(os.path.join(folder, ".complete")))["format_version"] == synthetic.FORMAT_VERSION


def test_queries_keep_the_light_and_colours_of_the_database():
    """A query is the rendered view with blur and noise: every channel keeps its mean (see the module's
    docstring for why queries get no other light or colour)."""
    plan = synthetic._plan_dataset(0, {split: (4, 2) for split in SPLITS}, 0)["test"]
    world = synthetic.World(np.random.default_rng(0), *plan.x_range)
    view = synthetic.render_view(world, plan.queries[0], (96, 128), np.random.default_rng(1))
    for seed in range(4):
        query = synthetic.degrade_query(view, np.random.default_rng(seed))
        assert np.abs(query.mean(axis=(0, 1)) - view.mean(axis=(0, 1))).max() < 0.01
        assert np.abs(query - view).mean() > 0.005  # but not the same pixels


def test_a_foreign_folder_is_not_replaced(tmp_path):
    os.makedirs(tmp_path / "synthetic")
    (tmp_path / "synthetic" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        synthetic.generate_dataset(str(tmp_path), **MICRO)
    assert (tmp_path / "synthetic" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change, flag", [
    (dict(val_queries_num=0), "--val_queries_num"),
    (dict(train_far_queries_num=5), "--train_far_queries_num"),
    (dict(image_size=(8, 64)), "--image_size"),
    (dict(train_database_num=2), "--train_database_num"),
])
def test_bad_sizes_name_their_flag(tmp_path, change, flag):
    with pytest.raises(ValueError, match=flag):
        synthetic.generate_dataset(str(tmp_path), **{**MICRO, **change})
    assert not os.path.exists(tmp_path / "synthetic")


def test_default_far_queries_are_three_percent_at_least_one(tmp_path):
    sizes = {key: value for key, value in MICRO.items() if key != "train_far_queries_num"}
    folder = synthetic.generate_dataset(str(tmp_path), **sizes)
    assert json.load(open(os.path.join(folder, ".complete")))["train_far_queries_num"] == 1
    database, queries, _ = synthetic.plan_split(np.random.default_rng(0), 600, 300, round(0.03 * 300))
    far = [q for q in queries if min(distance((q.x, q.y), (d.x, d.y)) for d in database) > 10]
    assert len(far) == 9


def test_command_line(tmp_path, capsys):
    argv = ["--datasets_folder", str(tmp_path), "--dataset_name", "cli", "--seed", "4", "--image_size", "48", "64",
            "--train_far_queries_num", "1"]
    for key, value in MICRO.items():
        if key.endswith("_num") and key != "train_far_queries_num":
            argv += [f"--{key}", str(value)]
    synthetic.main(argv)
    output = capsys.readouterr().out
    assert f"Wrote the dataset {tmp_path / 'cli'}" in output
    assert "images/train: 6 database, 4 queries" in output and "images/test: 4 database, 2 queries" in output
    synthetic.main(argv)
    assert "Kept the complete dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(argv[:5] + ["5"] + argv[6:])  # another seed
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
