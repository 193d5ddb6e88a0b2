"""Pure functions of search results: merging the results of a query's crops (nearest_crop, maj_voting), positives
masks and Recall@N."""
import numpy as np

# Majority voting looks for database images repeated among the first n predictions of the crops, for these n
VOTING_TOP_N = (1, 5, 10)


def merge_nearest_crop(predictions, distances, top_k):
    """Per query: pool the crops' (prediction, distance) lists, sort by distance, keep each database index once
    (at its smallest distance), return the first `top_k`.

    predictions, distances: [queries_num, crops_num, k]. Returns [queries_num, top_k].
    """
    queries_num = predictions.shape[0]
    predictions = predictions.reshape(queries_num, -1)
    distances = distances.reshape(queries_num, -1)
    merged = np.empty((queries_num, top_k), dtype=predictions.dtype)
    for q in range(queries_num):
        sorted_predictions = predictions[q, np.argsort(distances[q])]
        _, unique_index = np.unique(sorted_predictions, return_index=True)
        merged[q] = sorted_predictions[np.sort(unique_index)][:top_k]
    return merged


def _vote(predictions, distances, top_n, majority_weight):
    """Lower, in place, the distance of each database index repeated among the first `top_n` columns of the
    crops' predictions [crops_num, k] by majority_weight * count / top_n."""
    selected = predictions[:, :top_n]
    values, counts = np.unique(selected, return_counts=True)
    for value, count in zip(values[counts > 1], counts[counts > 1]):
        distances[:, :top_n][selected == value] -= majority_weight * count / top_n


def merge_majority_voting(predictions, distances, top_k, majority_weight):
    """Majority voting over the crops (for n in VOTING_TOP_N), then as nearest_crop."""
    distances = distances.copy()
    for q in range(predictions.shape[0]):
        for top_n in VOTING_TOP_N:
            _vote(predictions[q], distances[q], top_n, majority_weight)
    return merge_nearest_crop(predictions, distances, top_k)


def nearest_crop_distances(predictions, distances, merged):
    """For each merged prediction [queries_num, top_k], its smallest distance over the query's crops
    (predictions, distances: [queries_num, crops_num, k]); what a person reads as "how far" for crop methods."""
    result = np.empty(merged.shape, dtype=distances.dtype)
    for q in range(merged.shape[0]):
        smallest = {}
        for prediction, distance in zip(predictions[q].ravel(), distances[q].ravel()):
            if prediction not in smallest or distance < smallest[prediction]:
                smallest[prediction] = distance
        result[q] = [smallest[prediction] for prediction in merged[q]]
    return result


def positives_mask(predictions, positives_per_query):
    """[queries_num, k] booleans: whether prediction j of query q is one of its positives.

    predictions: [queries_num, k] database indices (negative values, faiss' "no result", are never positives);
    positives_per_query: one array of database indices per query.
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    queries_num = len(predictions)
    if len(positives_per_query) != queries_num:
        raise ValueError(f"{queries_num} rows of predictions but positives for {len(positives_per_query)} queries")
    lengths = np.array([len(p) for p in positives_per_query], dtype=np.int64)
    if predictions.size == 0 or lengths.sum() == 0:
        return np.zeros(predictions.shape, dtype=bool)
    positives = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives_per_query])
    # One integer key per (query, database index) pair, so that a single isin answers every query at once
    width = max(int(predictions.max()), int(positives.max())) + 1
    positive_keys = np.repeat(np.arange(queries_num, dtype=np.int64), lengths) * width + positives
    prediction_keys = np.arange(queries_num, dtype=np.int64)[:, None] * width + predictions
    return np.isin(prediction_keys, positive_keys) & (predictions >= 0)


def compute_recalls(predictions, positives_per_query, recall_values):
    """Recall@N in percent for each N of `recall_values`: the share of queries with at least one positive among
    their first N predictions. Queries without positives count as misses."""
    mask = positives_mask(predictions, positives_per_query)
    queries_num = len(mask)
    if queries_num == 0:
        raise ValueError("Cannot compute recalls without queries")
    first_hit = np.where(mask.any(axis=1), mask.argmax(axis=1), np.iinfo(np.int64).max)
    return np.array([np.count_nonzero(first_hit < n) / queries_num * 100 for n in recall_values])


def recalls_to_str(recall_values, recalls):
    """The original's format, parsed by sweeps: 'R@1: 47.8, R@5: 55.8, R@10: 60.2, R@20: 67.1'."""
    return ", ".join(f"R@{n}: {recall:.1f}" for n, recall in zip(recall_values, recalls))
