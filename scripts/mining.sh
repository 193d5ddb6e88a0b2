#!/usr/bin/env bash
# Table 4 of the paper: negative mining methods (random, full database, partial database) for ResNet-18 and
# ResNet-50 (conv4) with GeM and NetVLAD. One training per (architecture, mining method), then one table and a
# plot of R@1 against the descriptor size.
#   scripts/mining.sh --dataset_name pitts30k --eval_datasets "msls"
#   MINING="random partial msls_weighted" scripts/mining.sh --dataset_name msls
#   scripts/mining.sh --smoke
# Loops: MINING (default: random full partial) and ARCHITECTURES (backbone:aggregation pairs, default:
# resnet18conv4:gem resnet18conv4:netvlad resnet50conv4:gem resnet50conv4:netvlad).
set -euo pipefail
STUDY=mining
source "$(dirname "$0")/common.sh"

sweep_values MINING "partial random" "random full partial"
sweep_values ARCHITECTURES "resnet18conv4:gem" \
    "resnet18conv4:gem resnet18conv4:netvlad resnet50conv4:gem resnet50conv4:netvlad"

for architecture in "${ARCHITECTURES[@]}"; do  # every value checked before the first run
    [[ "$architecture" =~ ^[a-z0-9]+:[a-z0-9]+$ ]] || die "ARCHITECTURES: $architecture is not backbone:aggregation"
done
for architecture in "${ARCHITECTURES[@]}"; do
    backbone="${architecture%%:*}"
    aggregation="${architecture#*:}"
    for mining in "${MINING[@]}"; do
        train_run "${backbone}_${aggregation}_${mining}" --backbone "$backbone" --aggregation "$aggregation" \
            --mining "$mining"
    done
done
gather_sweep --columns mining --plot_x descriptor_size
