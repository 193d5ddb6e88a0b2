#!/usr/bin/env bash
# The paper's PCA study: the descriptors of one trained model (NetVLAD by default) reduced to N dimensions at test
# time, PCA fit on the training images of the dataset; one table and a plot of R@1 against the descriptor size.
# The model is the --resume given (a checkpoint or a model zoo name, with its architecture flags), else one
# trained first.
#   scripts/pca.sh --dataset_name pitts30k --eval_datasets "msls"
#   scripts/pca.sh --resume resnet50-netvlad-partial-pitts30k --backbone resnet50conv4 --dataset_name pitts30k
#   scripts/pca.sh --smoke
# Loop: PCA_DIMS, "none" for no PCA (default: none 64 128 256 512 1024 2048 4096).
set -euo pipefail
STUDY=pca
source "$(dirname "$0")/common.sh"

sweep_values PCA_DIMS "none 8" "none 64 128 256 512 1024 2048 4096"
# PCA is fit on the training images of the dataset, also when testing on --eval_datasets
PCA_DATASET_FOLDER="$DATASET_NAME/images/train"

reference_model
for pca_dim in "${PCA_DIMS[@]}"; do
    if [ "$pca_dim" = none ]; then
        eval_run no_pca "${MODEL_FLAGS[@]}"
    else
        eval_run "pca_$pca_dim" "${MODEL_FLAGS[@]}" --pca_dim "$pca_dim" --pca_dataset_folder "$PCA_DATASET_FOLDER"
    fi
done
gather_sweep --plot_x descriptor_size
