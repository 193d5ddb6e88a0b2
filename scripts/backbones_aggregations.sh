#!/usr/bin/env bash
# Table 3 of the paper: backbones x aggregations. One training per (backbone, aggregation) pair, each tested on
# the test split of its dataset (and on --eval_datasets), then one table and a plot of R@1 against the descriptor
# size.
#   scripts/backbones_aggregations.sh --dataset_name pitts30k --eval_datasets "msls"
#   scripts/backbones_aggregations.sh --smoke
# Loops: BACKBONES (default: alexnet vgg16 resnet18conv4 resnet50conv4 resnet101conv4 cct384 vit) and
# AGGREGATIONS (default: gem netvlad; spoc mac rmac rrm cls seqpool are the other choices, crn needs --resume
# with a trained NetVLAD).
set -euo pipefail
STUDY=backbones_aggregations
source "$(dirname "$0")/common.sh"

sweep_values BACKBONES "resnet18conv4" "alexnet vgg16 resnet18conv4 resnet50conv4 resnet101conv4 cct384 vit"
sweep_values AGGREGATIONS "gem netvlad" "gem netvlad"

for backbone in "${BACKBONES[@]}"; do
    # The transformers take fixed square images (see model/backbones.py); these are the paper's sizes
    case "$backbone" in
        cct384) size=(--resize 384 384) ;;
        vit) size=(--resize 224 224) ;;
        *) size=() ;;
    esac
    for aggregation in "${AGGREGATIONS[@]}"; do
        train_run "${backbone}_${aggregation}" --backbone "$backbone" --aggregation "$aggregation" "${size[@]}"
    done
done
gather_sweep --plot_x descriptor_size
