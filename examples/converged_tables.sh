#!/usr/bin/env bash
# The paper's comparison at a budget where training converges, for one data set:
# tune every method (10 epochs on a 12,000-example subset, 20% held out), then train the
# selections for 30 epochs on the whole training set with 3 seeds. One thread; resumable:
# rerun the same command after an interruption and only the missing runs are trained.
#
#   bash examples/converged_tables.sh mnist mlp
#   bash examples/converged_tables.sh fashion_mnist lenet5
set -euo pipefail
dataset=${1:?data set (mnist or fashion_mnist)}
model=${2:?model (mlp or lenet5)}
out=${OUT:-results/${dataset}_${model}}
py=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$py" -m bsam_fast.experiments tune --dataset "$dataset" --model "$model" --out "$out" \
    --epochs 10 --warmup-epochs 1 --batch 200 --train-subset 12000 --val-fraction 0.2 --samples 8
"$py" -m bsam_fast.experiments table --dataset "$dataset" --model "$model" --out "$out" \
    --tuned "$out/tuned.json" --epochs 30 --warmup-epochs 3 --seeds 0 1 2 --samples 32
