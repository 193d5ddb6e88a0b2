#!/usr/bin/env bash
# The paper's study of query pre/post-processing and predictions refinement (--test_method): one trained model,
# evaluated with each method, then one table and a plot of R@1 against the extraction time. The model is the
# --resume given (a checkpoint or a model zoo name, with its architecture flags), else one trained first.
#   scripts/test_methods.sh --dataset_name pitts30k --eval_datasets "tokyo247"
#   scripts/test_methods.sh --resume resnet18-netvlad-partial-pitts30k --dataset_name tokyo247
#   scripts/test_methods.sh --smoke
# Loop: TEST_METHODS (default: hard_resize single_query central_crop five_crops nearest_crop maj_voting).
set -euo pipefail
STUDY=test_methods
source "$(dirname "$0")/common.sh"

sweep_values TEST_METHODS "hard_resize nearest_crop" \
    "hard_resize single_query central_crop five_crops nearest_crop maj_voting"

reference_model
for test_method in "${TEST_METHODS[@]}"; do
    eval_run "$test_method" "${MODEL_FLAGS[@]}" --test_method "$test_method"
done
gather_sweep --plot_x extraction_s
