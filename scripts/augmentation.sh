#!/usr/bin/env bash
# The paper's data augmentation study: one training per augmentation of the training queries (or none), then one
# table and a plot of R@1 against the descriptor size.
#   scripts/augmentation.sh --dataset_name pitts30k --eval_datasets "msls"
#   AUGMENTATIONS="none brightness=0.5 brightness=1,contrast=1" scripts/augmentation.sh --dataset_name pitts30k
#   scripts/augmentation.sh --smoke
# Loop: AUGMENTATIONS, each "none" or flag[=value] entries joined by commas (default: none brightness=1
# contrast=1 saturation=2 hue=0.3 horizontal_flip rand_perspective=0.5 random_resized_crop=0.5
# random_rotation=30).
set -euo pipefail
STUDY=augmentation
source "$(dirname "$0")/common.sh"

sweep_values AUGMENTATIONS "none horizontal_flip" \
    "none brightness=1 contrast=1 saturation=2 hue=0.3 horizontal_flip rand_perspective=0.5 random_resized_crop=0.5
     random_rotation=30"
AUGMENTATION_FLAGS=(brightness contrast saturation hue horizontal_flip rand_perspective random_resized_crop
                    random_rotation)

for augmentation in "${AUGMENTATIONS[@]}"; do
    flags=()
    if [ "$augmentation" != none ]; then
        IFS=, read -ra entries <<< "$augmentation"
        for entry in "${entries[@]}"; do
            name="${entry%%=*}"
            [[ " ${AUGMENTATION_FLAGS[*]} " == *" $name "* ]] ||
                die "AUGMENTATIONS: unknown augmentation '$name'; valid names: ${AUGMENTATION_FLAGS[*]}"
            if [ "$entry" = "$name" ]; then flags+=("--$name"); else flags+=("--$name" "${entry#*=}"); fi
        done
    fi
    train_run "$augmentation" "${flags[@]}"
done
gather_sweep --columns "${AUGMENTATION_FLAGS[@]}" --plot_x descriptor_size
