#!/usr/bin/env bash
# The paper's comparison with off-the-shelf models trained for landmark retrieval (ResNet-50 / 101 conv5 + GeM +
# FC 2048 from radenovic's and naver's repositories), evaluated without any training; one table and a plot of R@1
# against the FLOPs.
# Their weights are downloaded into data/off_the_shelf_nets/ (in the current folder) on first use; offline, put the
# files there by hand (the error message names each file and where it goes). The smoke mode needs them too.
#   scripts/off_the_shelf.sh --dataset_name pitts30k --eval_datasets "msls"
#   scripts/off_the_shelf.sh --smoke
# Loops: OFF_THE_SHELF (default: radenovic_sfm radenovic_gldv1 naver) and BACKBONES (default: resnet50conv5
# resnet101conv5).
set -euo pipefail
STUDY=off_the_shelf
source "$(dirname "$0")/common.sh"

sweep_values OFF_THE_SHELF "radenovic_sfm" "radenovic_sfm radenovic_gldv1 naver"
sweep_values BACKBONES "resnet50conv5" "resnet50conv5 resnet101conv5"

# Where each family normalises: radenovic's models after GeM, naver's not at all
l2_of() {
    case "$1" in
        radenovic_sfm | radenovic_gldv1) L2=after_pool ;;
        naver) L2=none ;;
        *) die "OFF_THE_SHELF: unknown model '$1'; valid names: radenovic_sfm radenovic_gldv1 naver" ;;
    esac
}

for model in "${OFF_THE_SHELF[@]}"; do  # every value checked before the first run
    l2_of "$model"
done
for model in "${OFF_THE_SHELF[@]}"; do
    l2_of "$model"
    for backbone in "${BACKBONES[@]}"; do
        eval_run "${model}_${backbone}" --off_the_shelf "$model" --backbone "$backbone" --aggregation gem \
            --fc_output_dim 2048 --l2 "$L2"
    done
done
gather_sweep --columns off_the_shelf l2 --plot_x GFLOPs
