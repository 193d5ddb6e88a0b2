#!/usr/bin/env bash
# The demo, on the CPU and offline: sets up .venv, generates the synthetic dataset (once, into
# data/datasets/synthetic), evaluates the untrained model (random weights), trains a model from random
# weights, then evaluates the trained model with eval.py. Extra arguments go to train.py (and to both
# evaluations, so that the model flags stay the same), e.g. `./demo.sh --epochs_num 2`.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh

DATASETS_FOLDER=data/datasets
DATASET=synthetic
COMMON=(--datasets_folder "$DATASETS_FOLDER" --dataset_name "$DATASET" --device cpu --num_workers 0)
MODEL=(--backbone resnet18conv4 --aggregation netvlad --netvlad_clusters 16 --pretrain none --resize 96 128)
TRAINING=(--mining partial --lr 0.001 --epochs_num 12 --patience 4 --queries_per_epoch 100 --cache_refresh_rate 100
          --neg_samples_num 200 --negs_num_per_query 4 --train_batch_size 4)

# The value of "key" in the RESULT {...} line of a command's output (on stdin)
result_value() {
    "$PY" -c 'import json, sys
lines = [l for l in sys.stdin if l.startswith("RESULT ")]
value = json.loads(lines[-1][len("RESULT "):])[sys.argv[1]]
print(f"{value:.1f}" if isinstance(value, float) else value)' "$1"
}

# run_and_keep FILE COMMAND...: run COMMAND, showing its output and keeping a copy in FILE
run_and_keep() {
    local file=$1
    shift
    "$@" | tee "$file"
}
OUTPUTS="$(mktemp -d)"
trap 'rm -rf "$OUTPUTS"' EXIT

echo "== 1/4 The synthetic dataset ($DATASETS_FOLDER/$DATASET, generated once)"
"$PY" make_synthetic_dataset.py --datasets_folder "$DATASETS_FOLDER" --dataset_name "$DATASET" --processes 2

echo "== 2/4 The untrained model (random weights) on the test split"
run_and_keep "$OUTPUTS/untrained" "$PY" eval.py "${COMMON[@]}" "${MODEL[@]}" --save_dir demo_untrained "$@"

echo "== 3/4 Training from random weights (the best model by validation R@5 is tested at the end)"
run_and_keep "$OUTPUTS/trained" "$PY" train.py "${COMMON[@]}" "${MODEL[@]}" "${TRAINING[@]}" --save_dir demo "$@"
run_folder="$(result_value run_folder < "$OUTPUTS/trained")"

echo "== 4/4 The trained model, $run_folder/best_model.pth, evaluated with eval.py"
run_and_keep "$OUTPUTS/evaluated" "$PY" eval.py "${COMMON[@]}" "${MODEL[@]}" --resume "$run_folder/best_model.pth" \
    --save_dir demo_eval "$@"

echo
echo "Test split of $DATASET       R@1    R@5"
echo "untrained model          $(result_value R@1 < "$OUTPUTS/untrained")   $(result_value R@5 < "$OUTPUTS/untrained")"
echo "trained model            $(result_value R@1 < "$OUTPUTS/evaluated")   $(result_value R@5 < "$OUTPUTS/evaluated")"
echo "Run folder: $run_folder"
