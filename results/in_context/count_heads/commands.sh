#!/bin/bash
cd <worktree with patch.diff applied>
export PYTHONPATH=. OMP_NUM_THREADS=1
D=runs/count
for s in 0 1; do
  python results/diagnostics/anbn_errors_by_kind.py --seed $s --models HOPE \
     --eta_init 0.01 --alpha_init 0.99999 --out $D/all_count_seed$s.json > $D/all_count_seed$s.log 2>&1
done
for s in 0 1; do
  HOPE_HEAD_RATES="0.5:0.999,0.01:0.99999" python results/diagnostics/anbn_errors_by_kind.py --seed $s --models HOPE \
     --out $D/split_count_seed$s.json > $D/split_count_seed$s.log 2>&1
done
touch $D/done
# the per-head output norm removed (the second hunk of patch.diff)
for s in 0 1; do
  HOPE_NO_ONORM=1 python results/diagnostics/anbn_errors_by_kind.py --seed $s --models HOPE \
     --out $D/no_onorm_seed$s.json > $D/no_onorm_seed$s.log 2>&1
done
