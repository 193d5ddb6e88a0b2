"""Hard-negative mining methods (--mining). The training dataset asks the chosen one for triplets."""

# --mining name -> one-line description; the mining functions are registered here by the training code.
MINING_METHODS = {
    "partial": "nearest negatives among --neg_samples_num sampled database images",
    "full": "nearest negatives over the database, plus each query's previous hardest negatives",
    "random": "random negatives, best positive by features",
    "msls_weighted": "partial mining with night and sideways MSLS queries sampled more often",
}
