"""Does splitting one batched U-Net call into two halves on two Python threads (1 torch thread each) use
the second core? Large 16x16 member, traced, 80 rows (40 chains with CFG); interleaved, 5 rounds."""
import time, threading, torch
from concurrent.futures import ThreadPoolExecutor
from relaydiff.engine.family import load_family
torch.set_num_threads(1)
fam = load_family("reference", trace=True)
for rows in (80, 32, 16, 2):
    x = torch.randn(rows, 4, 16, 16); t = torch.full((rows,), 500, dtype=torch.int64)
    ctx = fam.encode_prompts(["a red circle"] * rows) if hasattr(fam, "encode_prompts") else None
    if ctx is None:
        from relaydiff.engine.family import Family
        ctx = torch.randn(rows, 77, fam.members["large"].config.cross_attention_dim)
    pool = ThreadPoolExecutor(2)
    h = rows // 2
    def one(): return fam.denoise("large", None, x, t, ctx)
    def two():
        if h == 0: return one()
        a = pool.submit(fam.denoise, "large", None, x[:h], t[:h], ctx[:h]); b = pool.submit(fam.denoise, "large", None, x[h:], t[h:], ctx[h:])
        return torch.cat([a.result(), b.result()])
    one(); two()  # traces
    diff = (one() - two()).abs().max().item()
    r1, r2 = [], []
    for _ in range(5):
        s = time.perf_counter(); one(); r1.append(time.perf_counter() - s)
        s = time.perf_counter(); two(); r2.append(time.perf_counter() - s)
    print(f"rows {rows}: one call {min(r1)*1e3:.1f} ms (max {max(r1)*1e3:.1f}), two threads {min(r2)*1e3:.1f} ms (max {max(r2)*1e3:.1f}); speedup {min(r1)/min(r2):.2f}x; max abs diff {diff:.1e}", flush=True)
