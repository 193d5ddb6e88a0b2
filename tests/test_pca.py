"""PCA: fit on the images of --pca_dataset_folder at their own size, sampled as the original, applied to
database and queries; clear errors for impossible dimensions."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

import datasets_ws
import pca as vg_pca
import test as vg_test
from commons import UserInputError


class MeanColourAndContrast(torch.nn.Module):
    """4-dim descriptor: mean colour and standard deviation of the image (any size)."""
    features_dim = 4

    def forward(self, images):
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(1, 2, 3))[:, None]], dim=1)


def reference_descriptor(path):
    image = datasets_ws.load_image_tensor(path)
    return torch.cat([image.mean(dim=(1, 2)), image.std()[None]]).numpy()


def make_args(datasets_folder, **overrides):
    args = dict(datasets_folder=datasets_folder, pca_dataset_folder="pca_images", pca_dim=2, infer_batch_size=2,
                num_workers=0, device="cpu", resize=[8, 8], recall_values=[1, 5], majority_weight=0.01,
                efficient_ram_testing=False)
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.fixture
def pca_folder(tmp_path):
    """7 images of 3 sizes, in nested folders, with random colours (different statistics)."""
    rng = np.random.default_rng(0)
    sizes = [(12, 9), (20, 6), (12, 9), (7, 7), (20, 6), (12, 9), (7, 7)]
    for i, size in enumerate(sizes):
        path = tmp_path / "pca_images" / f"sub{i % 2}" / f"image{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
    (tmp_path / "pca_images" / "notes.txt").write_text("not an image")
    return str(tmp_path)


def test_pca_is_fit_on_every_image_at_its_own_size(pca_folder):
    args = make_args(pca_folder)
    paths = datasets_ws.find_images(os.path.join(pca_folder, "pca_images"))
    assert len(paths) == 7
    pca = vg_pca.compute_pca(args, MeanColourAndContrast())
    expected = PCA(n_components=2).fit(np.stack([reference_descriptor(p) for p in paths]).astype(np.float64))
    np.testing.assert_allclose(pca.mean_, expected.mean_, atol=1e-5)
    np.testing.assert_allclose(np.abs(pca.components_), np.abs(expected.components_), atol=1e-4)
    assert pca.n_components_ == 2


def test_pca_samples_at_most_the_limit_as_the_original(pca_folder, monkeypatch):
    monkeypatch.setattr(vg_pca, "PCA_MAX_IMAGES", 4)
    paths = datasets_ws.find_images(os.path.join(pca_folder, "pca_images"))
    np.random.seed(3)
    chosen = np.random.choice(len(paths), 4, replace=False)
    np.random.seed(3)
    pca = vg_pca.compute_pca(make_args(pca_folder), MeanColourAndContrast())
    expected_mean = np.mean([reference_descriptor(paths[i]) for i in chosen], axis=0)
    np.testing.assert_allclose(pca.mean_, expected_mean, atol=1e-5)


def test_batches_hold_images_of_one_size(pca_folder):
    paths = datasets_ws.find_images(os.path.join(pca_folder, "pca_images"))
    batches = vg_pca.batches_of_equal_size(paths, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    for batch in batches:
        assert 1 <= len(batch) <= 2
        assert len({Image.open(paths[i]).size for i in batch}) == 1


@pytest.mark.parametrize("pca_dim,message", [(8, r"--pca_dim 8 is larger than the number of images to fit PCA on "
                                                   r"\(7\): use --pca_dim <= 7"),
                                             (5, r"--pca_dim 5 is larger than the descriptor size \(4\): "
                                                 r"use --pca_dim <= 4")])
def test_impossible_pca_dim_is_a_clear_error(pca_folder, pca_dim, message):
    with pytest.raises(UserInputError, match=message):
        vg_pca.compute_pca(make_args(pca_folder, pca_dim=pca_dim), MeanColourAndContrast())


def test_missing_or_empty_pca_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match=r"--pca_dataset_folder: .*nowhere does not exist.*relative to "
                                             r"--datasets_folder"):
        vg_pca.compute_pca(make_args(str(tmp_path), pca_dataset_folder="nowhere"), MeanColourAndContrast())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no images under"):
        vg_pca.compute_pca(make_args(str(tmp_path), pca_dataset_folder="empty"), MeanColourAndContrast())


def test_fit_pca_checks_the_descriptors_too():
    with pytest.raises(UserInputError, match="larger than the descriptor size"):
        vg_pca.fit_pca(np.zeros((10, 3), dtype=np.float32), 4)


@pytest.mark.parametrize("test_method", ["hard_resize", "five_crops", "nearest_crop"])
def test_pca_is_applied_to_database_and_queries(pca_folder, test_method):
    args = make_args(pca_folder)
    model = MeanColourAndContrast()
    pca = vg_pca.compute_pca(args, model)
    paths = datasets_ws.find_images(os.path.join(pca_folder, "pca_images"))
    raw, reduced = {}, {}
    vg_test.retrieve(args, paths[:4], paths[4:], model, test_method,
                     on_descriptors=lambda kind, i, d: raw.setdefault(kind, {}).update(zip(i, d)))
    retrieval = vg_test.retrieve(args, paths[:4], paths[4:], model, test_method, pca=pca,
                                 on_descriptors=lambda kind, i, d: reduced.setdefault(kind, {}).update(zip(i, d)))
    for kind in ("database", "queries"):
        for index, descriptor in reduced[kind].items():
            assert descriptor.shape[-1] == 2 and descriptor.dtype == np.float32
            np.testing.assert_allclose(descriptor, pca.transform(raw[kind][index].reshape(-1, 4)).reshape(
                descriptor.shape), atol=1e-5)
    assert retrieval.top()[0].shape == (3, 4)
