# Sourced by every sweep script of scripts/ (after it sets STUDY): the sweep's command line, the smoke settings and
# the functions that run one training or evaluation of a sweep and gather the sweep's table and plot.
#
#   scripts/<study>.sh [--smoke] [--sweep_name NAME] [--eval_datasets "NAME ..."] [train.py / eval.py flags...]
#
#   --smoke          check the sweep in a minute on a CPU, offline: a tiny synthetic dataset ("smoke", generated once
#                    into --datasets_folder, default data/datasets), 32x48 images, random initial weights, one short
#                    epoch, one or two values per loop
#   --sweep_name     the runs go to logs/sweeps/<study>/<NAME>/<value>/<date_time>/ (default NAME: the start time),
#                    the table and the plot to logs/sweeps/<study>/<NAME>/table.{md,csv} and plot.png
#   --eval_datasets  also evaluate each trained model on these datasets (the paper's other test sets)
#   any other flag   goes to every train.py / eval.py call, e.g. --dataset_name msls --infer_batch_size 32
#                    (the values of the sweep's loops come after it and win)
#
# The values of a loop come from the environment variable named after it when it is set, e.g.
#   BACKBONES="resnet18conv4 vgg16" scripts/backbones_aggregations.sh --dataset_name pitts30k
# Like train.py, the sweeps write logs/ (and read downloaded weights from data/) in the current folder.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PY:-}" ]; then
    source "$REPO/tools/setup_env.sh"  # creates .venv and sets $PY
fi

# The comment block at the top of a file, without the "# "
header_of() {
    awk 'NR == 1 && /^#!/ {next} !/^#/ {exit} {sub(/^# ?/, ""); print}' "$1"
}

usage() {
    # The sweep script's own header, then the options every sweep shares (this file's header without its first
    # paragraph)
    header_of "$0"
    echo
    header_of "${BASH_SOURCE[0]}" | sed '1,/^$/d'
}

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

# ----------------------------------------------------------------------------------------------------------
# Command line

SMOKE=0
SWEEP_NAME=""
EVAL_DATASETS=()
EXTRA=()  # flags for train.py / eval.py
BASE=()   # the settings of the mode (smoke or paper), before EXTRA
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --sweep_name | --eval_datasets)
            [ $# -ge 2 ] || die "$1 needs a value"
            if [ "$1" = --sweep_name ]; then SWEEP_NAME="$2"; else read -ra EVAL_DATASETS <<< "$2"; fi
            shift ;;
        --sweep_name=*) SWEEP_NAME="${1#*=}" ;;
        --eval_datasets=*) read -ra EVAL_DATASETS <<< "${1#*=}" ;;
        -h | --help) usage; exit 0 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done
case "$SWEEP_NAME" in
    */* | . | ..) die "--sweep_name $SWEEP_NAME: give a plain folder name, without /" ;;
esac

# The last value of a flag among the base and extra flags ("--name value" or "--name=value"), else $2
flag_value() {
    local name=$1 value=$2 i
    local args=("${BASE[@]}" "${EXTRA[@]}")
    for ((i = 0; i < ${#args[@]}; i++)); do
        case "${args[i]}" in
            "$name") value="${args[i + 1]:-}" ;;
            "$name="*) value="${args[i]#*=}" ;;
        esac
    done
    echo "$value"
}

has_flag() {
    local arg
    for arg in "${BASE[@]}" "${EXTRA[@]}"; do
        case "$arg" in "$1" | "$1="*) return 0 ;; esac
    done
    return 1
}

# ----------------------------------------------------------------------------------------------------------
# Mode: smoke (tiny synthetic data) or the paper's settings

SMOKE_DATASET=smoke
# (database, queries) per split and image size of the smoke dataset: a few seconds to render
SMOKE_DATASET_SIZES=(--train_database_num 40 --train_queries_num 16 --val_database_num 20 --val_queries_num 8
                     --test_database_num 20 --test_queries_num 8 --image_size 48 64)
SMOKE_FLAGS=(--pretrain none --resize 32 48 --device cpu --num_workers 0 --epochs_num 1 --queries_per_epoch 8
             --cache_refresh_rate 8 --neg_samples_num 20 --negs_num_per_query 2 --train_batch_size 4
             --infer_batch_size 8 --netvlad_clusters 8)

if [ "$SMOKE" = 1 ]; then
    smoke_datasets_folder="$(flag_value --datasets_folder data/datasets)"
    "$PY" "$REPO/make_synthetic_dataset.py" --datasets_folder "$smoke_datasets_folder" \
        --dataset_name "$SMOKE_DATASET" "${SMOKE_DATASET_SIZES[@]}" --processes 1 >&2
    BASE=(--datasets_folder "$smoke_datasets_folder" --dataset_name "$SMOKE_DATASET" "${SMOKE_FLAGS[@]}")
elif [ "$(flag_value --dataset_name pitts30k)" = pitts30k ]; then
    # The paper's mining: full database mining on pitts30k, partial (the default) on msls and others
    BASE=(--mining full)
fi
DATASET_NAME="$(flag_value --dataset_name pitts30k)"

SWEEP_NAME="${SWEEP_NAME:-$(date +%Y-%m-%d_%H-%M-%S)}"
SWEEP_SAVE_DIR="sweeps/$STUDY/$SWEEP_NAME"  # train.py / eval.py --save_dir, under logs/
SWEEP_FOLDER="logs/$SWEEP_SAVE_DIR"

# sweep_values NAME "smoke values" "paper values": the array NAME, from $NAME when it is set, else the values of
# the mode
sweep_values() {
    local name=$1 chosen
    if [ -n "${!name:-}" ]; then
        chosen="${!name}"
    elif [ "$SMOKE" = 1 ]; then
        chosen=$2
    else
        chosen=$3
    fi
    read -ra "$name" -d "" <<< "$chosen" || true  # all the lines (read's status is 1 at the end of its input)
    local -n values="$name"
    [ "${#values[@]}" -gt 0 ] || die "\$$name is empty: give at least one value"
}

# ----------------------------------------------------------------------------------------------------------
# Runs

# The value of "key" in the last RESULT {...} line of a run's output (on stdin)
result_value() {
    "$PY" -c 'import json, sys
lines = [line for line in sys.stdin if line.startswith("RESULT ")]
if not lines:
    sys.exit("no RESULT line in the output of the run")
print(json.loads(lines[-1][len("RESULT "):])[sys.argv[1]])' "$1"
}

SWEEP_RUNS=()  # the run folders of the sweep's table

# run_script train.py|eval.py LABEL FLAGS...: one run of the sweep, in logs/<sweep>/<LABEL>/<date_time>/, with the
# mode's flags, then the extra flags, then FLAGS. Its output goes to stderr (the sweep's stdout is its table).
# Sets RUN_FOLDER and adds it to SWEEP_RUNS.
run_script() {
    local script=$1 label=$2 output
    shift 2
    echo "== $STUDY / $label: $script $*" >&2
    output="$(mktemp)"
    "$PY" "$REPO/$script" "${BASE[@]}" "${EXTRA[@]}" "$@" --save_dir "$SWEEP_SAVE_DIR/$label" | tee "$output" >&2
    RUN_FOLDER="$(result_value run_folder < "$output")"
    rm -f "$output"
    SWEEP_RUNS+=("$RUN_FOLDER")
}

# The checkpoint a training run leaves for evaluation: its best model, else (R@5 never rose) its last one
model_of_run() {
    if [ -f "$1/best_model.pth" ]; then echo "$1/best_model.pth"; else echo "$1/last_model.pth"; fi
}

# eval_run LABEL FLAGS...: evaluate on the test split of the dataset, then on each of --eval_datasets
eval_run() {
    local label=$1 dataset
    shift
    run_script eval.py "$label" "$@"
    for dataset in "${EVAL_DATASETS[@]}"; do
        run_script eval.py "$label/on_$dataset" "$@" --dataset_name "$dataset"
    done
}

# train_run LABEL FLAGS...: train (train.py tests the best model on the test split), then evaluate the best model
# on each of --eval_datasets.
train_run() {
    local label=$1 dataset training_folder
    shift
    run_script train.py "$label" "$@"
    training_folder="$RUN_FOLDER"
    for dataset in "${EVAL_DATASETS[@]}"; do
        run_script eval.py "$label/on_$dataset" "$@" --resume "$(model_of_run "$training_folder")" \
            --dataset_name "$dataset"
    done
}

# For the studies that evaluate one trained model in several ways (test methods, PCA): MODEL_FLAGS holds the
# --resume of that model. It is the --resume among the extra flags (a checkpoint or a model zoo name, with its
# architecture flags), else a model trained now with the mode's and the extra flags.
# The training is not a row of the sweep's table.
reference_model() {
    MODEL_FLAGS=()
    if has_flag --resume; then
        return
    fi
    run_script train.py reference  # train.py alone: evaluations of the reference on --eval_datasets are no rows
    MODEL_FLAGS=(--resume "$(model_of_run "$RUN_FOLDER")")
    unset "SWEEP_RUNS[-1]"
}

# gather_sweep [tools/gather_results.py flags]: the sweep's table (Markdown and CSV) and plot, in the sweep folder
gather_sweep() {
    echo "== $STUDY: table and plot of $SWEEP_FOLDER" >&2
    "$PY" "$REPO/tools/gather_results.py" "${SWEEP_RUNS[@]}" --output "$SWEEP_FOLDER/table" \
        --plot "$SWEEP_FOLDER/plot.png" "$@"
    echo "Table: $SWEEP_FOLDER/table.md (and .csv), plot: $SWEEP_FOLDER/plot.png" >&2
}
