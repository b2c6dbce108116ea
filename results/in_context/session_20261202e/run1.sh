#!/bin/bash
cd /work/main
export OMP_NUM_THREADS=1
for s in 0 1; do
.venv/bin/python scripts/synthetic.py mqar --kv-pairs 16 --steps 1200 --eval-every 100 --compile_chunks --models HOPE --seeds $s --lrs 1e-3 --out /work/runs/i12b/mqar16_1200_lr1e-3_s$s > /work/runs/i12b/mqar16_lr1e-3_s$s.log 2>&1
done
.venv/bin/python scripts/synthetic.py mqar --kv-pairs 16 --steps 1200 --eval-every 100 --models Llama --seeds 0 1 --lrs 1e-3 --out /work/runs/i12b/mqar16_1200_llama_lr1e-3 > /work/runs/i12b/mqar16_llama_lr1e-3.log 2>&1
