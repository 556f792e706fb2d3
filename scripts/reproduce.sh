#!/usr/bin/env bash
# Reproduce the papers' tables from the shell: one sweep per table, then our numbers beside the papers'.
#
#   scripts/reproduce.sh TABLE [--quick] [extra hydra overrides...]
#
# TABLE: cfdp-resnet56 | approxconv-cifar | approxconv-imagenet | fgfp-resnet20 | scap-vgg16 | all
# Without --quick: each paper's recipe (a GPU job for most tables). --quick: a budget that fits about an
# hour per table on a 2-core CPU (each table's budget is written beside it below). Extra overrides go to
# every run, e.g. `dataset.root=/data/cifar10 device=cuda`.
# Results in multirun/<table>/: the runs, report.csv (every stage of every run), compare.md (one line per
# run beside its published row) and plot.png (top-1 against parameters and MACs, ours and the paper's).
set -euo pipefail
cd "$(dirname "$0")/.."
COMPRESS=${COMPRESS:-compress}
command -v "$COMPRESS" >/dev/null || COMPRESS=.venv/bin/compress

usage="usage: scripts/reproduce.sh TABLE [--quick] [overrides...]  (TABLE: cfdp-resnet56 | approxconv-cifar | approxconv-imagenet | fgfp-resnet20 | scap-vgg16 | all)"
table=${1:?$usage}
shift
quick=()
if [[ "${1:-}" == "--quick" ]]; then quick=(--quick); shift; fi
is_quick() { [[ ${#quick[@]} -gt 0 ]]; }

sweep() {  # sweep SUBDIR OVERRIDES...: one multirun below multirun/<table>/
  local sub=$1; shift
  "$COMPRESS" run -m "$@" "hydra.sweep.dir=multirun/$table/$sub"
}

case "$table" in
  cfdp-resnet56)        # CFDP Table 2: ResNet-56 at [0.]+[0.18]*29 (0.66M params), CFDP vs the baselines.
    # --quick: 1 fine-tuning epoch (the finetune schedule) per method, 5 runs of ~8 min here.
    budget=(schedule=cfdp_cifar); is_quick && budget=(schedule=finetune schedule.epochs=1 measure.latency=false)
    # The baselines run at CFDP's rate, which no paper row measures them at: no row linked (their tables are plotted).
    sweep baselines experiment=cfdp_resnet56 method=l1,random,hrank paper_row=null "${budget[@]}" "$@"
    sweep cfdp experiment=cfdp_resnet56 method.variant=reference,paper "${budget[@]}" "$@" ;;
  approxconv-cifar)     # ApproxConv Table 1: ResNet-20/32 x cos/cheb x harmonics, Pre and Post Top-1.
    # --quick: 1 of the recipe's 5 epochs per row, 20 rows of ~2-3 min here.
    budget=(); is_quick && budget=(schedule.epochs=1 measure.latency=false)
    sweep rows "experiment=glob(approxconv_resnet*,exclude=approxconv_resnet*_imagenet*)" "${budget[@]}" "$@" ;;
  approxconv-imagenet)  # ApproxConv ImageNet tables (ResNet-18, ConvNeXt-T, quantised rows): needs ImageNet.
    # --quick: 10,000 training and 5,000 test images, 1 epoch per row (still hours on a CPU: 46 rows).
    budget=(); is_quick && budget=(dataset.train_size=10000 dataset.test_size=5000 schedule.epochs=1 measure.latency=false)
    sweep rows "experiment=glob(approxconv_*_imagenet_*)" "${budget[@]}" "$@" ;;
  fgfp-resnet20)        # FGFP: ResNet-20 / CIFAR-10, -85.2 % params at -1.52 % top-1.
    # --quick: 20,000 training images, 19 rounds of 1 epoch (5 conversions, then 14 AUP rounds of 6 %: -85.6 %
    # parameters if none is rolled back), 5 final epochs, all distilled (~45 min here).
    budget=(); is_quick && budget=(dataset.train_size=20000 schedule.rounds=19 schedule.round_epochs=1
                                   schedule.epochs=5 measure.latency=false)
    sweep rows experiment=fgfp_resnet20 "${budget[@]}" "$@" ;;
  scap-vgg16)           # SCAP: VGG-16-BN / CIFAR-10, threshold 0.6 (the committed VGG-16-BN, weights/).
    # --quick: SCAP, then 1 fine-tuning epoch of the pruned network (SCAP's scoring of VGG-16-BN takes
    # ~4 min here, docs/scap.md; the unpruned evaluation ~3 min).
    budget=(); is_quick && budget=(schedule.epochs=1 measure.latency=false)
    sweep rows experiment=scap_vgg16 "${budget[@]}" "$@" ;;
  all)
    for t in cfdp-resnet56 approxconv-cifar fgfp-resnet20 scap-vgg16; do "$0" "$t" "${quick[@]}" "$@"; done
    exit 0 ;;
  *) echo "error: unknown table '$table'; $usage" >&2; exit 2 ;;
esac

"$COMPRESS" report "multirun/$table" -o "multirun/$table/report.csv"
"$COMPRESS" compare "multirun/$table" -o "multirun/$table/compare.md"
"$COMPRESS" plot "multirun/$table" -o "multirun/$table/plot.png"
echo "multirun/$table: report.csv, compare.md, plot.png"
