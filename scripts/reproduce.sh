#!/usr/bin/env bash
# Reproduce the papers' tables from the shell: one sweep per table, then one Markdown/CSV table.
#
#   scripts/reproduce.sh TABLE [extra hydra overrides...]
#
# TABLE: cfdp-resnet56 | approxconv-cifar | approxconv-imagenet | fgfp-resnet20 | scap-vgg16 | all
# Extra overrides go to every run, e.g. `schedule.epochs=1 dataset.root=/data/cifar10 device=cuda`.
# Results: multirun/<table>/ and multirun/<table>/report.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPRESS=${COMPRESS:-compress}
command -v "$COMPRESS" >/dev/null || COMPRESS=.venv/bin/compress

table=${1:?usage: scripts/reproduce.sh TABLE [overrides...]}
shift

sweep() {  # sweep NAME OVERRIDES...
  local name=$1; shift
  "$COMPRESS" run -m "$@" "hydra.sweep.dir=multirun/$name"
  "$COMPRESS" report "multirun/$name" -o "multirun/$name/report.csv"
}

case "$table" in
  cfdp-resnet56)        # CFDP Table 2: ResNet-56 at [0.]+[0.18]*29 (0.66M params), CFDP vs the baselines
    sweep cfdp-resnet56 arch=resnet56 method=l1,random,hrank schedule=cfdp_cifar "$@"
    sweep cfdp-resnet56-cfdp arch=resnet56 method=cfdp method.variant=reference,paper schedule=cfdp_cifar "$@" ;;
  approxconv-cifar)     # ApproxConv Table 1: ResNet-20/32 x cos/cheb x harmonics, Pre and Post Top-1
    sweep approxconv-cifar "experiment=glob(approxconv_resnet*,exclude=approxconv_resnet*_imagenet*)" "$@" ;;
  approxconv-imagenet)  # ApproxConv ImageNet tables (ResNet-18, ConvNeXt-T, quantised rows): needs ImageNet
    sweep approxconv-imagenet "experiment=glob(approxconv_*_imagenet_*)" "$@" ;;
  fgfp-resnet20)        # FGFP: ResNet-20 / CIFAR-10, -85.2 % params at -1.52 % top-1
    sweep fgfp-resnet20 experiment=fgfp_resnet20 "$@" ;;
  scap-vgg16)           # SCAP: VGG-16-BN / CIFAR-10, threshold 0.6 (pretrains VGG first: a GPU job)
    sweep scap-vgg16 experiment=scap_vgg16 "$@" ;;
  all)
    for t in cfdp-resnet56 approxconv-cifar fgfp-resnet20 scap-vgg16; do "$0" "$t" "$@"; done ;;
  *) echo "error: unknown table '$table' (cfdp-resnet56 | approxconv-cifar | approxconv-imagenet | fgfp-resnet20 | scap-vgg16 | all)" >&2; exit 2 ;;
esac
