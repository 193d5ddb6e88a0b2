"""The training dataset: hard positives, dropped queries, training transforms, triplet items and batches."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_ws
import recipes.triplets as triplets_recipe
from commons import UserInputError

RESIZE = (24, 32)


def _write_split(root, split, database_utms, queries_utms, size=(64, 48)):
    rng = np.random.default_rng(0)
    for kind, utms in (("database", database_utms), ("queries", queries_utms)):
        folder = os.path.join(root, "toy", "images", split, kind)
        os.makedirs(folder, exist_ok=True)
        for i, (east, north) in enumerate(utms):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"@{east:.2f}@{north:.2f}@@@@@@@@@@@@{kind}{i}@.jpg"))


@pytest.fixture
def toy(tmp_path):
    # Query 1 is 15 m from the nearest database image: a soft positive but no hard one, so it is dropped
    database = [(0, 0), (5, 0), (50, 0), (100, 0), (150, 0), (200, 0)]
    queries = [(1, 0), (35, 0), (149, 0), (201, 0)]
    _write_split(str(tmp_path), "train", database, queries)
    return str(tmp_path)


def test_queries_without_hard_positives_are_dropped_with_their_data(toy, caplog):
    with caplog.at_level(logging.INFO):
        dataset = triplets_recipe.TripletsDataset(toy, "toy", "train", resize=RESIZE)
    assert "There are 1 queries without any positives within 10 m" in caplog.text
    assert dataset.queries_num == 3 and len(dataset.queries_paths) == 3
    assert [os.path.basename(p).split("@")[1] for p in dataset.queries_paths] == ["1.00", "149.00", "201.00"]
    np.testing.assert_array_equal(dataset.queries_utms[:, 0], [1, 149, 201])
    # Database indexes follow the sorted paths: @0, @100, @150, @200, @5, @50
    assert [p.tolist() for p in dataset.hard_positives_per_query] == [[0, 4], [2], [3]]
    assert [p.tolist() for p in dataset.soft_positives_per_query] == [[0, 4], [2], [3]]
    assert dataset.images_paths == dataset.database_paths + dataset.queries_paths


def test_soft_positives_use_their_own_threshold(toy):
    dataset = triplets_recipe.TripletsDataset(toy, "toy", "train", resize=RESIZE, hard_positives_dist_threshold=10,
                                              soft_positives_dist_threshold=60)
    assert [p.tolist() for p in dataset.soft_positives_per_query] == [[0, 4, 5], [1, 2, 3], [2, 3]]


def test_no_query_with_a_hard_positive_is_a_clear_error(toy):
    with pytest.raises(UserInputError, match="--train_positives_dist_threshold"):
        triplets_recipe.TripletsDataset(toy, "toy", "train", resize=RESIZE, hard_positives_dist_threshold=0.5)


def test_item_is_query_positive_negatives_stacked(toy):
    dataset = triplets_recipe.TripletsDataset(toy, "toy", "train", resize=RESIZE)
    images, triplet = dataset[(2, 4, 0, 1, 2)]
    assert images.shape == (5, 3) + RESIZE
    assert triplet.tolist() == [2, 4, 0, 1, 2]
    # Database images: PIL resize, then ToTensor and normalisation
    pil_resized = Image.open(dataset.database_paths[1]).convert("RGB").resize(RESIZE[::-1], Image.BILINEAR)
    expected = datasets_ws.base_transform(pil_resized)
    torch.testing.assert_close(images[3], expected)


def test_query_transform_without_augmentation_resizes_four_by_three_images_like_the_database(toy):
    query = datasets_ws.query_training_transform(RESIZE)
    database = datasets_ws.database_training_transform(RESIZE)
    image = datasets_ws.open_image(os.path.join(toy, "toy", "images", "train", "queries", os.listdir(
        os.path.join(toy, "toy", "images", "train", "queries"))[0]))
    torch.testing.assert_close(query(image), database(image))
    assert [type(step).__name__ for step in query.transforms] == ["RandomResizedCrop", "Compose"]


def test_query_transform_order_and_flags():
    transform = datasets_ws.query_training_transform(RESIZE, brightness=0.5, contrast=0.1, saturation=0.2, hue=0.3,
                                                     rand_perspective=0.4, random_resized_crop=0.25,
                                                     random_rotation=10)
    names = [type(step).__name__ for step in transform.transforms]
    assert names == ["ColorJitter"] * 4 + ["RandomPerspective", "RandomResizedCrop", "RandomRotation", "Compose"]
    jitters = transform.transforms[:4]
    assert tuple(jitters[0].brightness) == (0.5, 1.5) and jitters[0].contrast is None
    assert tuple(jitters[3].hue) == (-0.3, 0.3)
    assert transform.transforms[4].distortion_scale == 0.4
    assert tuple(transform.transforms[5].scale) == (0.75, 1) and tuple(transform.transforms[5].size) == RESIZE
    assert tuple(transform.transforms[6].degrees) == (-10.0, 10.0)
    wide = Image.fromarray(np.zeros((30, 90, 3), dtype=np.uint8))
    assert transform(wide).shape == (3,) + RESIZE


def test_wide_queries_are_centre_cropped_to_four_by_three_as_the_original():
    # RandomResizedCrop with scale (1, 1) cannot keep a 3:1 image whole: it falls back to a central 4:3 crop
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :25] = 255  # a white band outside the central 40 columns
    query = datasets_ws.query_training_transform(RESIZE)(Image.fromarray(pixels))
    expected = datasets_ws.database_training_transform(RESIZE)(Image.fromarray(pixels[:, 25:65]))
    torch.testing.assert_close(query, expected)


def test_collate_and_split_features():
    batch = [(torch.full((4, 3, 2, 2), float(g)), torch.tensor([g, 10 + g, 20, 21])) for g in range(3)]
    images, triplets = triplets_recipe.triplets_collate_fn(batch)
    assert images.shape == (12, 3, 2, 2) and triplets.tolist() == [[0, 10, 20, 21], [1, 11, 20, 21], [2, 12, 20, 21]]
    features = torch.arange(12.0).repeat_interleave(2).view(12, 2)  # image i -> [i, i]
    queries, positives, negatives = triplets_recipe.split_triplets_features(features, 3)
    assert queries[:, 0].tolist() == [0, 4, 8] and positives[:, 0].tolist() == [1, 5, 9]
    assert negatives.shape == (3, 2, 2) and negatives[:, :, 0].tolist() == [[2, 3], [6, 7], [10, 11]]


def test_process_shares_cover_each_full_batch_once():
    triplets = np.arange(11 * 3).reshape(11, 3)
    shares = [triplets_recipe.process_share_of_batches(triplets, 4, rank, 2) for rank in range(2)]
    assert [row[0] for row in shares[0]] == [0, 3, 12, 15]
    assert [row[0] for row in shares[1]] == [6, 9, 18, 21]
    single = triplets_recipe.process_share_of_batches(triplets, 4, 0, 1)
    assert len(single) == 8 and single[0] == (0, 1, 2)  # the incomplete last batch (rows 8-10) is dropped


def test_loader_over_a_list_sampler_yields_batches_of_groups(toy):
    dataset = triplets_recipe.TripletsDataset(toy, "toy", "train", resize=RESIZE)
    sampler = datasets_ws.ListSampler([(0, 1, 3, 4), (1, 4, 0, 1), (2, 5, 0, 1)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, drop_last=True,
                                         collate_fn=triplets_recipe.triplets_collate_fn)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (8, 3) + RESIZE
    sampler.items = [(2, 5, 0, 1)] * 4
    assert [b[1][:, 0].tolist() for b in loader] == [[2, 2], [2, 2]]
