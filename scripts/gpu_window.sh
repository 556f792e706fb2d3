#!/usr/bin/env bash
# Spend a lent GPU window (one H200, about 10 minutes of it) on the rows that need a GPU, in priority order:
#   1. the CIFAR GoogLeNet pretraining (pretrain_fast), its checkpoint written as weights/ holds VGG-16-BN's
#      (half precision, named <arch>-cifar10-<sha256[:8]>.pt);
#   2. CFDP's GoogLeNet row (experiment=cfdp_googlenet, the paper's headline 95.25) from that checkpoint;
#   3. SCAP's VGG-16 recipe at the paper's shape (experiment=scap_vgg16);
#   4. CFDP VGG-16-BN on its recipe (experiment=cfdp_vgg16).
# A row that runs out of its time leaves its metrics.csv as far as it got (every run resumes with resume=true).
#
# The device tool copies this checkout (at most 64 MiB a call, the tree itself about 32 MiB) and brings back
# at most 8 files from $OUT, so the window takes three kinds of call:
#
#   here, once:              scripts/gpu_window.sh pack
#       -> .gpu/wheels/ (hydra-core, omegaconf, antlr4, torch-pruning and compress itself, for the device's
#          Python 3.12, which already has torch, torchvision, pandas, matplotlib, tqdm, tabulate, onnx) and
#          .gpu/part-<i>/cifar10.tar (CIFAR-10 as lossless WebP, split so that each part travels beside the tree)
#   device, once per part:   bash scripts/gpu_window.sh receive         (carry: [".gpu/part-<i>"])
#       -> the part unpacked under .gpu/win/webp; make these calls back to back (a machine idle 30 s goes back)
#   device, last:            bash scripts/gpu_window.sh run [SECONDS]   (carry: [".gpu/wheels"]; timeout_s 600)
#       -> rebuilds the PNG tree (pixels bit-exact), runs the rows within SECONDS (default 540), and leaves in
#          $OUT: runs.tar.gz (every run's metrics.csv, log and .hydra config), the GoogLeNet checkpoint, summary.txt
#
# Back here: tar xzf <files_at>/runs.tar.gz -C outputs/gpu_window; compress report outputs/gpu_window -o results/...
# Epochs per row: GOOGLENET_EPOCHS (pretrain, 30), CFDP_GOOGLENET_EPOCHS (40), SCAP_EPOCHS (40), CFDP_VGG_EPOCHS (40).
# GPU_WINDOW_SMOKE=1 runs the same sequence on this CPU in smoke mode (synthetic data), to check the script.
set -euo pipefail
cd "$(dirname "$0")/.."
export W=${GPU_WINDOW_DIR:-$PWD/.gpu/win}  # the device-side work folder (data, cache, runs); ignored, so kept between calls

PY=python3  # the device's Python (it holds torch); here, the project's venv
[[ -x .venv/bin/python && "${1:-}" != run ]] && PY=.venv/bin/python
[[ -x .venv/bin/python && -n "${GPU_WINDOW_SMOKE:-}" ]] && PY=.venv/bin/python
py() { "$PY" "$@"; }

pack() {
  mkdir -p .gpu/wheels
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
              --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  py -m pip download -q --no-deps "${plat[@]}" -d .gpu/wheels "hydra-core==1.3.2" "omegaconf==2.3.0" "torch-pruning==1.6.1"
  py -m pip wheel -q --no-deps -w .gpu/wheels "antlr4-python3-runtime==4.9.3" .   # pure Python: built here
  local tree_mb; tree_mb=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  local room=$(( (60 * 1024 * 1024 - tree_mb) ))
  echo "tree: $((tree_mb / 1048576)) MiB; each data part may hold $((room / 1048576)) MiB"
  py - "$room" <<'EOF'
import io, sys, tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

room, root = int(sys.argv[1]), Path("../shared/cifar10")
files = sorted(p for s in ("train", "test") for p in (root / s).rglob("*.png"))

def webp(path):
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, "WEBP", lossless=True, quality=100, method=4)
    return path.relative_to(root).with_suffix(".webp").as_posix(), out.getvalue()

part, size, tar = 0, 0, None
with ProcessPoolExecutor() as pool:
    for name, blob in pool.map(webp, files, chunksize=256):
        if tar is None or size + len(blob) + 512 > room:
            if tar is not None:
                tar.close()
            part, size = part + 1, 0
            Path(f".gpu/part-{part}").mkdir(parents=True, exist_ok=True)
            tar = tarfile.open(f".gpu/part-{part}/cifar10.tar", "w")
        info = tarfile.TarInfo(name)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        size += len(blob) + 512
tar.close()
print(f"{len(files)} images in {part} part(s) under .gpu/")
EOF
}

receive() {
  mkdir -p $W/webp
  for t in .gpu/part-*/cifar10.tar; do tar xf "$t" -C $W/webp; done
  echo "received: $(find $W/webp -name '*.webp' | wc -l) images so far"
}

rebuild_pngs() {  # WebP -> PNG tree (lossless both ways: the pixels are CIFAR-10's)
  python3 - <<'EOF'
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

src, dst = Path(os.environ["W"]) / "webp", Path(os.environ["W"]) / "cifar10"
files = sorted(src.rglob("*.webp"))

def convert(p):
    out = dst / p.relative_to(src).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(p).convert("RGB").save(out)

with ProcessPoolExecutor(16) as pool:
    list(pool.map(convert, files, chunksize=512))
print(f"{len(files)} PNGs under {dst}")
EOF
}

run_rows() {
  local budget=${1:-540} start=$SECONDS out=${OUT:-$W/out} runs=$W/runs
  mkdir -p "$out" "$runs"
  local common=(measure.latency=false threads=null)
  if [[ -n "${GPU_WINDOW_SMOKE:-}" ]]; then
    common+=(debug=smoke device=cpu "paths.cache=$W/cache")
    compress=("$PY" -m compress)
  else
    python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site .gpu/wheels/*.whl
    export PYTHONPATH=$W/site
    [[ -d $W/cifar10/train ]] || rebuild_pngs
    common+=(device=cuda dataset.root=$W/cifar10 "paths.cache=$W/cache")
    compress=(python3 -m compress)
  fi
  left() { echo $(( budget - (SECONDS - start) )); }
  row() {  # row NAME SHARE_OF_WHAT_IS_LEFT(%) OVERRIDES...: one run, cut at its share of the time left
    local name=$1 share=$2; shift 2
    local secs=$(( $(left) * share / 100 ))
    if (( secs < 30 )); then echo "$name: skipped ($(left) s left)" | tee -a "$out/summary.txt"; return 0; fi
    local t0=$SECONDS rc=0
    timeout --signal=TERM --kill-after=20 "$secs" "${compress[@]}" run "$@" "${common[@]}" "hydra.run.dir=$runs/$name" \
      > "$runs/$name.stdout" 2>&1 || rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (of $secs)" | tee -a "$out/summary.txt"
  }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$out/summary.txt" || true

  row googlenet_pretrain 60 arch=googlenet arch.checkpoint=null "schedule@pretrain=pretrain_fast" "pretrain.epochs=${GOOGLENET_EPOCHS:-30}" \
      method=none schedule.epochs=0
  local cached; cached=$(ls -t $W/cache/pretrained/googlenet-*.pt 2>/dev/null | grep -v partial | head -1 || true)
  if [[ -n "$cached" ]]; then
    local half; half=$(py - "$cached" "$out" <<'EOF'
import hashlib, sys, torch
from pathlib import Path
packed = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
packed["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in packed["state_dict"].items()}
tmp = Path(sys.argv[2]) / "googlenet.tmp"
torch.save(packed, tmp)
name = f"googlenet-cifar10-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pt"
tmp.rename(Path(sys.argv[2]) / name)
print(Path(sys.argv[2]) / name)
EOF
)
    echo "googlenet checkpoint: $(basename "$half") (commit it under weights/)" | tee -a "$out/summary.txt"
    row cfdp_googlenet 45 experiment=cfdp_googlenet "arch.checkpoint=$cached" "schedule.epochs=${CFDP_GOOGLENET_EPOCHS:-40}"
  else
    echo "cfdp_googlenet: skipped (the pretraining did not finish)" | tee -a "$out/summary.txt"
  fi
  row scap_vgg16 60 experiment=scap_vgg16 "schedule.epochs=${SCAP_EPOCHS:-40}"
  row cfdp_vgg16 95 experiment=cfdp_vgg16 "schedule.epochs=${CFDP_VGG_EPOCHS:-40}"
  (cd "$runs" && tar czf "$out/runs.tar.gz" --exclude='*.pt' .)
  echo "done in $((SECONDS - start)) s; files in $out:" && ls -la "$out"
}

case "${1:-}" in
  pack) pack ;;
  receive) receive ;;
  run) shift; run_rows "${1:-540}" ;;
  *) echo "usage: scripts/gpu_window.sh pack | receive | run [SECONDS]   (see the header)" >&2; exit 2 ;;
esac
