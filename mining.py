"""Hard-negative mining (--mining): which images to cache, then the best positive and the negatives of each query.

One refresh of the cache, as the original benchmark does it:
  1. `plan = miner.plan(queries_count)`: sample the queries (np.random.choice without replacement) and choose
     the database images whose features the mining needs;
  2. the caller computes the features of `plan.cache_indexes` with the current model (`FeatureExtractor`);
  3. `triplets = miner.mine(plan, cache)`: [queries_count, 2 + negs_num_per_query] global indexes per row
     (query index, best positive database index, negative database indexes).

Indexes: database images are 0..database_num-1, query q is database_num + q in the cache (the order of
`TripletsDataset.images_paths`); `plan.queries_indexes` and the first column of the triplets count queries
from 0. The searches of all the sampled queries are batched: one faiss distance computation over every
(query, candidate) pair, then a stable sort per query. They compute the same distances as the original's
one-index-per-query searches (faiss' exact L2 of each pair) and so pick the same images.
"""
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import commons
from commons import UserInputError
from datasets_ws import ListSampler, make_loader
from model.inference import forward_batches

# Candidate columns whose distances are computed together for all the queries (see pairwise_distances)
CANDIDATES_PER_BLOCK = 64
# MSLS file names carry a note "<day|night>_<forward|sideways|...>" in the second-to-last '@' field
MSLS_NIGHT, MSLS_SIDEWAYS = "night", "sideways"


# ----------------------------------------------------------------------------------------------------------
# Features of the cached images

class FeatureCache:
    """Features of some of the training images (database and queries), looked up by global index."""

    def __init__(self, indexes, features, images_num):
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self._rows = np.full(images_num, -1, dtype=np.int64)
        self._rows[np.asarray(indexes, dtype=np.int64)] = np.arange(len(indexes))

    def rows(self, indexes):
        """Rows of `features` for global `indexes` (any shape); -1 stays -1 (padding)."""
        indexes = np.asarray(indexes, dtype=np.int64)
        rows = np.where(indexes >= 0, self._rows[np.maximum(indexes, 0)], -1)
        if np.any(rows[indexes >= 0] < 0):
            missing = indexes[(indexes >= 0) & (rows < 0)][:5].tolist()
            raise RuntimeError(f"Features of images {missing} were not cached; the mining plan is inconsistent")
        return rows


def pairwise_distances(features, query_rows, candidate_rows):
    """Squared L2 distances [Q, C] between features[query_rows[i]] and features[candidate_rows[i, j]], as faiss
    computes each pair in an exact search; candidates -1 (padding) get +inf. One call for all the queries."""
    import faiss  # imported here: parsing the flags (which lists the mining methods) needs no faiss
    query_rows = np.asarray(query_rows, dtype=np.int64)
    candidate_rows = np.ascontiguousarray(candidate_rows, dtype=np.int64)
    queries = np.ascontiguousarray(features[query_rows], dtype=np.float32)
    distances = np.empty(candidate_rows.shape, dtype=np.float32)
    # A few candidate columns at a time for every query: the queries mostly share their candidates (sorted, so
    # column j of each is in the same part of the database), which then stay in the processor's cache instead
    # of being read from memory once per query (twice as fast on NetVLAD-sized features; the same numbers)
    for start in range(0, candidate_rows.shape[1], CANDIDATES_PER_BLOCK):
        block = np.ascontiguousarray(candidate_rows[:, start:start + CANDIDATES_PER_BLOCK])
        block_distances = np.empty(block.shape, dtype=np.float32)
        if block_distances.size:
            faiss.fvec_L2sqr_by_idx(faiss.swig_ptr(block_distances), faiss.swig_ptr(queries),
                                    faiss.swig_ptr(features), faiss.swig_ptr(block), features.shape[1],
                                    len(queries), block.shape[1])
        distances[:, start:start + CANDIDATES_PER_BLOCK] = block_distances
    return distances


def pad_rows(arrays, fill=-1):
    """A list of 1-D integer arrays as one [len(arrays), max length] array padded with `fill`."""
    width = max((len(a) for a in arrays), default=0)
    padded = np.full((len(arrays), width), fill, dtype=np.int64)
    for i, array in enumerate(arrays):
        padded[i, :len(array)] = array
    return padded


def nearest_candidates(cache, queries_indexes, candidates, k, database_num):
    """For each sampled query, its `k` candidate database images nearest in feature space, nearest first.

    candidates: [Q, C] database indexes padded with -1. Returns [Q, k] database indexes. Equal distances keep
    the candidates' order. A query with fewer than `k` candidates is an error (the caller checks sizes first).
    """
    query_rows = cache.rows(np.asarray(queries_indexes) + database_num)
    distances = pairwise_distances(cache.features, query_rows, cache.rows(candidates))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    nearest = np.take_along_axis(candidates, order, axis=1)
    if nearest.shape[1] < k or np.any(nearest < 0):
        raise RuntimeError(f"Fewer than {k} candidates for some queries")
    return nearest


def best_positives(cache, queries_indexes, hard_positives_per_query, database_num):
    """The hard positive nearest (in feature space) to each query: [Q] database indexes."""
    candidates = pad_rows([hard_positives_per_query[q] for q in queries_indexes])
    return nearest_candidates(cache, queries_indexes, candidates, 1, database_num)[:, 0]


# ----------------------------------------------------------------------------------------------------------
# Mining methods

@dataclass
class CachePlan:
    """What one refresh needs: the sampled queries, the database images to cache, and (partial mining) the
    database images sampled for the negatives."""
    queries_indexes: np.ndarray
    database_indexes: np.ndarray
    database_num: int
    sampled_database_indexes: Optional[np.ndarray] = None

    @property
    def cache_indexes(self):
        """Global indexes (database first, then queries) of every image whose features are needed."""
        return np.concatenate([self.database_indexes, self.queries_indexes + self.database_num]).astype(np.int64)


class Mining:
    """Shared by every method: query sampling, the best positive, checks of the dataset's sizes.

    `dataset` gives database_num, queries_num, hard_positives_per_query, soft_positives_per_query (and for
    msls_weighted queries_paths). Random draws use NumPy's global generator, as the original.
    """

    def __init__(self, dataset, negs_num_per_query, neg_samples_num):
        self.database_num = dataset.database_num
        self.queries_num = dataset.queries_num
        self.hard_positives_per_query = dataset.hard_positives_per_query
        self.soft_positives_per_query = dataset.soft_positives_per_query
        self.negs_num_per_query = negs_num_per_query
        if neg_samples_num > self.database_num:
            logging.warning(f"--neg_samples_num {neg_samples_num} is larger than the training database "
                            f"({self.database_num} images): sampling all of it")
        self.neg_samples_num = min(neg_samples_num, self.database_num)
        most_soft = max((len(p) for p in self.soft_positives_per_query), default=0)
        if self.database_num - most_soft < negs_num_per_query:
            raise UserInputError(
                f"The training database has {self.database_num} images and a query has {most_soft} of them within "
                f"the positives' distance, so it cannot get --negs_num_per_query {negs_num_per_query} negatives: "
                "lower --negs_num_per_query or use a larger dataset")

    def sample_queries(self, count):
        return np.random.choice(self.queries_num, count, replace=False)

    def plan(self, queries_count):
        raise NotImplementedError

    def negatives(self, plan, cache):
        raise NotImplementedError

    def mine(self, plan, cache):
        """[Q, 2 + negs_num_per_query] int64 rows (query, best positive, negatives...)."""
        positives = best_positives(cache, plan.queries_indexes, self.hard_positives_per_query, self.database_num)
        negatives = self.negatives(plan, cache)
        return np.concatenate([plan.queries_indexes[:, None], positives[:, None], negatives], axis=1).astype(np.int64)

    def _positives_of(self, queries_indexes):
        return np.unique(np.concatenate([self.hard_positives_per_query[q] for q in queries_indexes]))

    def state_dict(self):
        """What must survive a restart (checkpoints); only full mining keeps something."""
        return {}

    def load_state_dict(self, state):
        pass


class RandomMining(Mining):
    """Random negatives (not soft positives); the best positive by features, so only the sampled queries and
    their hard positives are cached."""

    def plan(self, queries_count):
        queries_indexes = self.sample_queries(queries_count)
        return CachePlan(queries_indexes, self._positives_of(queries_indexes), self.database_num)

    def negatives(self, plan, cache):
        rows = []
        for query_index in commons.progress_bar(plan.queries_indexes, "Mining", unit="queries"):
            soft_positives = self.soft_positives_per_query[query_index]
            neg_indexes = np.random.choice(self.database_num, self.negs_num_per_query + len(soft_positives),
                                           replace=False)
            rows.append(np.setdiff1d(neg_indexes, soft_positives, assume_unique=True)[:self.negs_num_per_query])
        return np.array(rows, dtype=np.int64).reshape(len(rows), self.negs_num_per_query)


class PartialMining(Mining):
    """The nearest negatives among --neg_samples_num database images sampled once per refresh."""

    def _query_weights(self):
        return None

    def plan(self, queries_count):
        queries_indexes = np.random.choice(self.queries_num, queries_count, replace=False, p=self._query_weights())
        sampled_database_indexes = np.random.choice(self.database_num, self.neg_samples_num, replace=False)
        database_indexes = np.unique(np.concatenate([sampled_database_indexes,
                                                     self._positives_of(queries_indexes)]))
        return CachePlan(queries_indexes, database_indexes, self.database_num, sampled_database_indexes)

    def negatives(self, plan, cache):
        candidates = [np.setdiff1d(plan.sampled_database_indexes, self.soft_positives_per_query[q], assume_unique=True)
                      for q in plan.queries_indexes]
        self._check_candidates(plan.queries_indexes, candidates)
        return nearest_candidates(cache, plan.queries_indexes, pad_rows(candidates), self.negs_num_per_query,
                                  self.database_num)

    def _check_candidates(self, queries_indexes, candidates):
        for query_index, query_candidates in zip(queries_indexes, candidates):
            if len(query_candidates) < self.negs_num_per_query:
                raise UserInputError(
                    f"Training query {query_index} has only {len(query_candidates)} negatives among the "
                    f"{self.neg_samples_num} sampled database images (the others are within the positives' "
                    f"distance): raise --neg_samples_num or lower --negs_num_per_query")


class MslsWeightedMining(PartialMining):
    """Partial mining with night and sideways queries (MSLS file-name notes) sampled more often, as in the
    MSLS paper's supplementary material."""

    def __init__(self, dataset, negs_num_per_query, neg_samples_num):
        super().__init__(dataset, negs_num_per_query, neg_samples_num)
        self.weights = msls_query_weights(dataset.queries_paths)

    def _query_weights(self):
        return self.weights


class FullMining(PartialMining):
    """The whole database is cached; each query's negatives are the nearest among --neg_samples_num random
    database images plus its previous hardest negatives (kept across refreshes in `neg_cache`)."""

    def __init__(self, dataset, negs_num_per_query, neg_samples_num):
        super().__init__(dataset, negs_num_per_query, neg_samples_num)
        # Row q: the last negatives of query q, -1 where it has none yet
        self.neg_cache = np.full((self.queries_num, negs_num_per_query), -1, dtype=np.int64)

    def plan(self, queries_count):
        queries_indexes = self.sample_queries(queries_count)
        return CachePlan(queries_indexes, np.arange(self.database_num), self.database_num)

    def negatives(self, plan, cache):
        candidates = []
        # One draw over the whole database per query: seconds for large databases
        for query_index in commons.progress_bar(plan.queries_indexes, "Mining", unit="queries"):
            neg_indexes = np.random.choice(self.database_num, self.neg_samples_num, replace=False)
            neg_indexes = np.setdiff1d(neg_indexes, self.soft_positives_per_query[query_index], assume_unique=True)
            previous = self.neg_cache[query_index]
            candidates.append(np.unique(np.concatenate([previous[previous >= 0], neg_indexes])))
        self._check_candidates(plan.queries_indexes, candidates)
        negatives = nearest_candidates(cache, plan.queries_indexes, pad_rows(candidates), self.negs_num_per_query,
                                       self.database_num)
        self.neg_cache[plan.queries_indexes] = negatives
        return negatives

    def state_dict(self):
        return {"neg_cache": torch.from_numpy(self.neg_cache.copy())}

    def load_state_dict(self, state):
        neg_cache = state.get("neg_cache")
        if neg_cache is None:
            return
        neg_cache = np.asarray(neg_cache, dtype=np.int64)
        if neg_cache.shape != self.neg_cache.shape:
            logging.warning(f"The checkpoint's full-mining cache has shape {list(neg_cache.shape)}, this run needs "
                            f"{list(self.neg_cache.shape)} (another dataset or --negs_num_per_query): starting "
                            "with an empty cache")
            return
        self.neg_cache = neg_cache.copy()


def msls_query_weights(queries_paths):
    """Sampling probabilities of the queries: 1, plus queries_num / night_num for night queries, plus
    queries_num / sideways_num for sideways ones, normalised (the original's msls_weighted)."""
    notes = [path.split("@")[-2] for path in queries_paths]
    try:
        night = np.array([note.split("_")[0] == MSLS_NIGHT for note in notes], dtype=bool)
        sideways = np.array([note.split("_")[1] == MSLS_SIDEWAYS for note in notes], dtype=bool)
    except IndexError:
        raise UserInputError("--mining msls_weighted reads '<day|night>_<direction>' notes from the query file "
                             "names (second-to-last '@' field), but this dataset's names have none: use the "
                             "msls dataset or another --mining") from None
    if not night.any() or not sideways.any():
        raise UserInputError(f"--mining msls_weighted needs night and sideways training queries, but there are "
                             f"{night.sum()} night and {sideways.sum()} sideways ones: use another --mining")
    queries_num = len(queries_paths)
    weights = np.ones(queries_num)
    weights[night] += queries_num / night.sum()
    weights[sideways] += queries_num / sideways.sum()
    logging.info(f"msls_weighted mining: {sideways.sum()} of {queries_num} queries are sideways, "
                 f"{night.sum()} are night")
    return weights / weights.sum()


# --mining name -> class built with (dataset, negs_num_per_query, neg_samples_num)
MINING_METHODS = {
    "partial": PartialMining,
    "full": FullMining,
    "random": RandomMining,
    "msls_weighted": MslsWeightedMining,
}


def make_miner(name, dataset, negs_num_per_query, neg_samples_num):
    if name not in MINING_METHODS:
        raise UserInputError(f"Unknown --mining {name}; valid names: {', '.join(MINING_METHODS)}")
    return MINING_METHODS[name](dataset, negs_num_per_query, neg_samples_num)


# ----------------------------------------------------------------------------------------------------------
# Computing the cache

class FeatureExtractor:
    """Features of chosen images of a dataset (items (image, index)), in eval mode without gradients; with
    several processes each one computes a contiguous share and the shares are gathered on every process.

    The DataLoader is made once and kept (persistent workers), its sampler re-filled at each call.
    """

    def __init__(self, dataset, batch_size, num_workers, device, world=None, autocast_dtype=None):
        self.sampler = ListSampler()
        self.device = torch.device(device)
        self.world = world
        self.autocast_dtype = autocast_dtype
        self.loader = make_loader(dataset, batch_size, num_workers, self.device, sampler=self.sampler,
                                  persistent_workers=num_workers > 0)

    def __call__(self, model, indexes, features_dim, description="Caching"):
        indexes = np.asarray(indexes, dtype=np.int64)
        rank, world_size = (self.world.rank, self.world.world_size) if self.world else (0, 1)
        start, end = commons.shard_range(len(indexes), rank, world_size)
        self.sampler.items = indexes[start:end].tolist()
        local = np.empty((end - start, features_dim), dtype=np.float32)
        was_training = model.training
        model.eval()
        done = 0
        for outputs, batch_indexes in forward_batches(model, self.loader, self.device, self.autocast_dtype,
                                                      description):
            # The sampler yields in order, so each batch fills the next rows
            local[done:done + len(batch_indexes)] = outputs.float().cpu()
            done += len(batch_indexes)
        model.train(was_training)
        if world_size == 1:
            return local
        return commons.all_gather_rows(local, len(indexes), self.world)
