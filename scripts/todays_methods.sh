#!/usr/bin/env bash
# Today's methods as their authors release them (CosPlace, EigenPlaces, MixVPR, Conv-AP, BoQ, SALAD, MegaLoc),
# each evaluated on the dataset with no training, at its authors' image size (the release name sets it; a --resize
# given here wins); one table and a plot of R@1 against the descriptor size.
# Their files are downloaded into data/model_zoo/ (in the current folder) on first use; offline, put them there by
# hand (the error message names each file, its URL and where it goes).
#   scripts/todays_methods.sh --dataset_name pitts30k
#   RELEASES="salad-dinov2-8448 megaloc-dinov2-8448" scripts/todays_methods.sh --dataset_name msls --resize 322 322
#   scripts/todays_methods.sh --smoke
# Loop: RELEASES (default: every released model, see the README's "Today's methods"). The smoke mode evaluates
# each method's architecture at toy sizes with random weights instead (METHODS, default: cosplace mixvpr convap boq
# salad megaloc): the released files weigh up to 350 MB each.
set -euo pipefail
STUDY=todays_methods
source "$(dirname "$0")/common.sh"

# Each method's architecture at toy sizes (the smoke mode's --resize 32 48 gives DINOv2 a 2x3 patch map once
# rounded: SALAD needs more patches than clusters, so it gets 56x56)
smoke_flags_of() {
    case "$1" in
        cosplace) FLAGS=(--backbone resnet18conv5 --aggregation gem --fc_output_dim 32) ;;
        mixvpr) FLAGS=(--backbone resnet18conv4 --aggregation mixvpr --mixvpr_out_channels 16 --mixvpr_out_rows 2) ;;
        convap) FLAGS=(--backbone resnet18conv5 --aggregation convap --convap_out_channels 16) ;;
        boq) FLAGS=(--backbone resnet18conv4 --aggregation boq --boq_proj_channels 64 --boq_queries 4 --boq_layers 1
                    --boq_row_dim 4) ;;
        salad) FLAGS=(--backbone dinov2_vits14 --trunc_te 1 --aggregation salad --salad_clusters 4
                      --salad_cluster_dim 8 --salad_token_dim 8 --resize 56 56) ;;
        megaloc) FLAGS=(--backbone dinov2_vits14 --trunc_te 1 --aggregation megaloc --salad_clusters 4
                        --salad_cluster_dim 8 --salad_token_dim 8 --fc_output_dim 16) ;;
        *) die "METHODS: unknown method '$1'; valid names: cosplace mixvpr convap boq salad megaloc" ;;
    esac
}

if [ "$SMOKE" = 1 ]; then
    sweep_values METHODS "cosplace mixvpr convap boq salad megaloc" ""
    for method in "${METHODS[@]}"; do  # every value checked before the first run
        smoke_flags_of "$method"
    done
    for method in "${METHODS[@]}"; do
        smoke_flags_of "$method"
        eval_run "$method" "${FLAGS[@]}"
    done
else
    sweep_values RELEASES "" "$(cd "$REPO" && "$PY" -c 'from model import zoo; print(" ".join(zoo.RELEASES))')"
    known="$(cd "$REPO" && "$PY" -c 'from model import zoo; print(" ".join(zoo.RELEASES))')"
    for name in "${RELEASES[@]}"; do
        [[ " $known " == *" $name "* ]] || die "RELEASES: unknown release '$name'; valid names: $known"
    done
    for name in "${RELEASES[@]}"; do
        eval_run "$name" --resume "$name"
    done
fi
gather_sweep --columns resume --plot_x descriptor_size
