#!/usr/bin/env bash
# The README's "Six default runs side by side" table, from scratch: each method's default run
# (`python <method>.py`) for every seed, then one `eval_linear.py --report` per image size (kNN and
# the dense linear probe per stage, against the random-init network of that size; mean +- std over
# the seeds).
#
#   bash results.sh                 # seeds 0 1 2, two 1-thread runs at a time: 1 h 20 min to 2 h 15 min
#                                   # on a 2-core CPU (training 45-90 min, the four reports 30-45 min)
#   SEEDS="0" JOBS=1 bash results.sh runs/one_seed
#   METHODS="byol ladder_byol" bash results.sh     # only these methods, and only their report
#   PRECISION=fp32 bash results.sh                  # --precision of every run and report (auto)
#
# Writes into the output folder (default runs/results): <method>_s<seed>/ (checkpoints,
# metrics.jsonl), <method>_s<seed>.log, times.txt (wall seconds per run) and the reports
# results_32px.md, results_mcl.md, results_40px.md, results_64px.md (+ PNG charts with matplotlib).
# A run whose <method>_s<seed>/done exists is not trained again, so an interrupted call can simply
# be repeated. Extra arguments after the folder go to every training run.
set -euo pipefail
out=$(realpath -m "${1:-$(dirname "$0")/runs/results}")  # a relative folder: from where you are
shift || true
cd "$(dirname "$0")"
seeds=${SEEDS:-0 1 2}
methods=${METHODS:-byol ladder_byol dense_byol densesiam lewel mcl}
jobs=${JOBS:-2}
precision=${PRECISION:-auto}  # auto = bf16 on CPUs with native bf16, fp32 elsewhere (README)
python=${PYTHON:-python}
mkdir -p "$out"

train_one() {  # method seed extra-args...: one default run on one thread, timed
    local method=$1 seed=$2 run="$out/$1_s$2"
    shift 2
    [[ -e "$run/done" ]] && return 0
    local start=$SECONDS
    OMP_NUM_THREADS=1 "$python" "$method.py" --seed "$seed" --out "$run" \
        --precision "$precision" "$@" > "$run.log" 2>&1 \
        || { echo "$method seed $seed failed: see $run.log" >&2; return 1; }
    echo "$method s$seed $((SECONDS - start)) s" >> "$out/times.txt"
    touch "$run/done"
}
export -f train_one
export out python precision

for seed in $seeds; do
    for method in $methods; do
        printf '%s\0%s\0' "$method" "$seed"
    done
done | xargs -0 -n 2 -P "$jobs" bash -c 'train_one "$@" '"${*@Q}" _  # + the extra args, quoted

ckpts() {  # comma-separated last.pt of the given methods over every seed
    local method seed list=()
    for method in "$@"; do
        for seed in $seeds; do list+=("$out/${method}_s$seed/last.pt"); done
    done
    local IFS=,
    echo "${list[*]}"
}

report() {  # name stages methods...: their checkpoints, when every one of the methods was trained
    local name=$1 stages=$2 method start=$SECONDS
    shift 2
    for method in "$@"; do [[ " $methods " == *" $method "* ]] || return 0; done
    "$python" eval_linear.py --random-init --ckpt "$(ckpts "$@")" --dense --stage "$stages" \
        --protocol none --precision "$precision" --report "$out/$name.md" > "$out/$name.log" 2>&1
    echo "report $name $((SECONDS - start)) s" >> "$out/times.txt"
}

stages=res2,res3,res4,res5
report results_32px "$stages" byol ladder_byol
report results_mcl "$stages,p2,p3,p4,p5" mcl         # 32 px, + MCL's FPN levels
report results_40px "$stages" dense_byol lewel       # both train at 40 px
report results_64px "$stages" densesiam              # DenseSiam trains at 64 px
echo "reports: $out/results_{32px,mcl,40px,64px}.md; wall times: $out/times.txt"
