#!/usr/bin/env bash
# The same architecture trained under each training recipe (the original's triplets, the GSV-Cities methods'
# places, CosPlace's classification groups) on the same data, each best model tested on the test split; one table
# and a plot of R@1 against the time of each whole run (training and test).
#   scripts/recipes.sh --dataset_name pitts30k --backbone resnet50conv4 --aggregation mixvpr --resize 320 320
#   RECIPES="triplets places" scripts/recipes.sh --dataset_name msls --eval_datasets "pitts30k"
#   scripts/recipes.sh --smoke
# Loop: RECIPES (default: triplets places cosplace). Each recipe keeps its own defaults (see the README's "Training
# recipes"); its flags given here go to its runs, e.g. --places_per_batch 60 --cosplace_cell_m 10.
set -euo pipefail
STUDY=recipes
source "$(dirname "$0")/common.sh"

sweep_values RECIPES "triplets places cosplace" "triplets places cosplace"

# Each recipe's flags in the smoke mode: the smoke dataset's 56 training images in a few places and classes
recipe_flags_of() {
    case "$1" in
        triplets) FLAGS=() ;;
        places) FLAGS=(--places_per_batch 2 --images_per_place 2) ;;
        cosplace) FLAGS=(--cosplace_cell_m 20 --cosplace_min_images 2 --cosplace_batch_size 4
                         --cosplace_iterations_per_epoch 2 --cosplace_groups_num 1) ;;
        *) die "RECIPES: unknown recipe '$1'; valid names: triplets places cosplace" ;;
    esac
    [ "$SMOKE" = 1 ] || FLAGS=()
}

for recipe in "${RECIPES[@]}"; do  # every value checked before the first run
    recipe_flags_of "$recipe"
done
for recipe in "${RECIPES[@]}"; do
    recipe_flags_of "$recipe"
    train_run "$recipe" --recipe "$recipe" "${FLAGS[@]}"
done
gather_sweep --columns recipe --plot_x total_s
