#!/usr/bin/env bash
# The paper's image resizing study: train and test at fractions of Pitts30k's 480x640 (100%, 80%, 60%, 40%, 20%),
# then one table and a plot of R@1 against the FLOPs.
#   scripts/resize.sh --dataset_name pitts30k --eval_datasets "msls"
#   scripts/resize.sh --smoke
# Loop: RESIZES, HxW (default: 480x640 384x512 288x384 192x256 96x128).
set -euo pipefail
STUDY=resize
source "$(dirname "$0")/common.sh"

sweep_values RESIZES "32x48 24x32" "480x640 384x512 288x384 192x256 96x128"

for resize in "${RESIZES[@]}"; do  # every value checked before the first run
    [[ "$resize" =~ ^[0-9]+x[0-9]+$ ]] || die "RESIZES: $resize is not HxW (e.g. 384x512)"
done
for resize in "${RESIZES[@]}"; do
    train_run "resize_$resize" --resize "${resize%x*}" "${resize#*x}"
done
gather_sweep --plot_x GFLOPs
