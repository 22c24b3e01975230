#!/bin/sh
# The regime pilots of the rank experiment (validation split, seeds from 100, not the final seeds).
# Run from the repository root: sh runs/04_autoformer_entangle/pilot/run_pilots.sh DATA_DIR NAME
# NAME picks one regime below; each writes runs/04_autoformer_entangle/pilot/NAME.log
set -e
D=${1:?data dir}
WIDE="--embed-dims 32,48,64 --depths 1,2,3,4 --num-heads 1,2,4 --mlp-ratios 1,2,4"
TABLE="--table-embed-dims 32 --table-depths 1 --table-num-heads 1 --table-mlp-ratios 1"
COMMON="--quick --data $D --experiment rank --seed 100 --workers 2 --threads 1"
OUT=runs/04_autoformer_entangle/pilot
case ${2:?name} in
  p24-wide-10ep) ARGS="--seeds 2 --image-size 24 --patch-size 4 $WIDE $TABLE --epochs 10" ;;
  p32-wide-10ep) ARGS="--seeds 2 --image-size 32 --patch-size 4 $WIDE $TABLE --epochs 10" ;;
  p32-quick-10ep) ARGS="--seeds 2 --image-size 32 --patch-size 8 $TABLE --table-embed-dims 48 --table-depths 3 --table-num-heads 2 --table-mlp-ratios 2 --epochs 10" ;;
  # the quick regime (24 px, 4x4 patches), 5 supernet seeds: subnets spaced in log(parameters)
  # (most of them where stand-alone accuracy still rises with size) or in parameters
  p24-log-5seeds) ARGS="--seeds 5 --rank-spacing log" ;;
  p24-linear-5seeds) ARGS="--seeds 5 --rank-spacing linear" ;;
  *) echo "unknown pilot $2"; exit 2 ;;
esac
echo "python 04_autoformer_entangle.py $COMMON $ARGS --out $OUT/$2" > $OUT/$2.log
/usr/bin/time -f "wall %e s" python 04_autoformer_entangle.py $COMMON $ARGS --out $OUT/$2 >> $OUT/$2.log 2>&1
