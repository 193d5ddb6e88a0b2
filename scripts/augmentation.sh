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

# The flags of one AUGMENTATIONS value, in the array FLAGS
augmentation_flags() {
    local entry name entries
    FLAGS=()
    if [ "$1" = none ]; then
        return
    fi
    IFS=, read -ra entries <<< "$1"
    for entry in "${entries[@]}"; do
        name="${entry%%=*}"
        [[ " ${AUGMENTATION_FLAGS[*]} " == *" $name "* ]] ||
            die "AUGMENTATIONS: unknown augmentation '$name'; valid names: ${AUGMENTATION_FLAGS[*]}"
        if [ "$entry" = "$name" ]; then FLAGS+=("--$name"); else FLAGS+=("--$name" "${entry#*=}"); fi
    done
}

for augmentation in "${AUGMENTATIONS[@]}"; do  # every value checked before the first run
    augmentation_flags "$augmentation"
done
for augmentation in "${AUGMENTATIONS[@]}"; do
    augmentation_flags "$augmentation"
    train_run "$augmentation" "${FLAGS[@]}"
done
gather_sweep --columns "${AUGMENTATION_FLAGS[@]}" --plot_x descriptor_size
