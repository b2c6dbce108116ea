#!/bin/bash
while pgrep -f "class_incremental.py" > /dev/null; do sleep 30; done
cd /work/main
export OMP_NUM_THREADS=1
.venv/bin/python scripts/synthetic.py formal --languages parity aa_star --steps 300 --seeds 2 3 --eval-every 50 --models HOPE --compile_chunks --lrs 3e-3 --out /work/runs/i12b/formal_seeds23_hope > /work/runs/i12b/formal_seeds23_hope.log 2>&1
.venv/bin/python scripts/synthetic.py formal --languages parity aa_star --steps 300 --seeds 2 3 --eval-every 50 --models Llama --lrs 1e-3 3e-3 1e-2 --out /work/runs/i12b/formal_seeds23_llama > /work/runs/i12b/formal_seeds23_llama.log 2>&1
.venv/bin/python scripts/synthetic.py mqar --kv-pairs 8 --steps 1200 --eval-every 100 --models Llama --seeds 2 --lrs 1e-3 3e-3 1e-2 --out /work/runs/i12b/mqar8_1200_llama_s2 > /work/runs/i12b/mqar8_llama_s2.log 2>&1
.venv/bin/python scripts/synthetic.py mqar --kv-pairs 8 --steps 1200 --eval-every 100 --compile_chunks --models HOPE --seeds 2 --lrs 1e-3 --out /work/runs/i12b/mqar8_1200_lr1e-3_s2 > /work/runs/i12b/mqar8_lr1e-3_s2.log 2>&1
