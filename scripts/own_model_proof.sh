#!/usr/bin/env bash
# Issue 24's proof on a model none of the papers used: torchvision's resnet18 trained here on CIFAR-10
# (one-cycle, PRETRAIN_EPOCHS epochs, one CPU thread), pruned to half its MACs by L1 and by CFDP (round_to=8),
# fine-tuned FINETUNE_EPOCHS epochs with distillation from the trained model, exported to ONNX, reported.
# Rerunning resumes where a kill left it (resume=true; the pretraining cache resumes from its last epoch).
#   bash scripts/own_model_proof.sh          # writes outputs/own_model/, then results/ rows and plot
set -euo pipefail
cd "$(dirname "$0")/.."
C=${COMPRESS:-.venv/bin/compress}
OUT=${PROOF_OUT:-outputs/own_model}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-8}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-3}
common=(arch=torchvision arch.name=resnet18 dataset=cifar10
        arch.mean=[0.4914,0.4822,0.4465] arch.std=[0.2470,0.2435,0.2616]
        arch.checkpoint=null schedule@pretrain=pretrain_fast pretrain.epochs=$PRETRAIN_EPOCHS
        threads=1 resume=true)
# 1. train it (method=none: the pretraining, then the dense model measured as a run of its own)
$C run "${common[@]}" method=none hydra.run.dir=$OUT/resnet18_none
# 2. the two prunes side by side, one thread each, from the cached pretrained weights
prune=(method.target_macs=0.5 method.round_to=8 schedule.epochs=$FINETUNE_EPOCHS schedule.distill=0.5)
$C run "${common[@]}" method=l1 "${prune[@]}" hydra.run.dir=$OUT/resnet18_l1 &
$C run "${common[@]}" method=cfdp "${prune[@]}" hydra.run.dir=$OUT/resnet18_cfdp &
wait
# 3. deploy: ONNX, checked against PyTorch in ONNX Runtime
for m in l1 cfdp; do $C export $OUT/resnet18_$m --format onnx; done
