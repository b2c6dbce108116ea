import sys, time, torch
sys.path.insert(0, sys.argv[1] + "/scripts"); sys.path.insert(0, sys.argv[1])
from bench_speed import build_model
torch.set_num_threads(1)
size = dict(d=256, layers=4, heads=4, vocab=8192)
models = {"compiled": build_model("hope", size, compile=True).eval()}
ids = torch.randint(0, 8192, (1, 512))
state = {}
with torch.no_grad():
    for k, m in models.items():
        out = m(ids, use_cache=True); state[k] = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.time(); 
    for k, m in models.items():
        for _ in range(3):
            out = m(tok, past_key_values=state[k], use_cache=True)
    print("warmup s", time.time() - t0, flush=True)
    ts = {k: [] for k in models}
    for r in range(80):
        for k, m in models.items():
            t = time.perf_counter(); out = m(tok, past_key_values=state[k], use_cache=True); ts[k].append(time.perf_counter() - t)
    for k, v in ts.items():
        v.sort(); print(k, "min %.2f med %.2f ms" % (v[0]*1e3, v[len(v)//2]*1e3))
