import os, sys, torch
sys.path.insert(0, os.getcwd())
from benchmarks.tune_decode import decode_batch
from benchmarks.decode_layout import hnd
import batchllm.kernels.triton_attention as ta
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
b, _ = decode_batch(32, 8, 64, [672] * 512, 32)
for name, dt in (("bf16", None), ("fp8", torch.float8_e4m3fn)):
    bb = b if dt is None else (b[0], b[1].to(dt), b[2].to(dt), *b[3:])
    bb = (bb[0], hnd(bb[1]), hnd(bb[2]), *bb[3:])
    for bn in (32, 64):
        ta.paged_attention_splits(*bb, num_splits=1, tiles=(16, bn, 4, 2))
        torch.cuda.synchronize()
        caches = ta._paged_attention_kernel.device_caches
        dev = list(caches.values())[0][0]
        ks = list(dev.values())
        k = ks[-1]
        for ext in ("ttgir", "ptx"):
            open(f"{out}/{name}_bn{bn}.{ext}", "w").write(k.asm[ext])
        print(name, bn, "regs", getattr(k, "n_regs", None), "spills", getattr(k, "n_spills", None), "smem", k.metadata.shared)
