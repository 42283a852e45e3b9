"""Per-row (oracle, the sampler before this change) vs batched sampler, interleaved in one process:
same checkpoint, same prompts, same denoisers; best of N alternating calls; the sampler's own time
per step (wall minus the model calls)."""
import sys, time, torch
torch.set_num_threads(1)
from diffllm.bench.sampler import load_rows, sampler_settings, _ModelClock, CACHED, THRESHOLD, BLOCK_CACHED
from diffllm.inference.loading import load_quietly
from diffllm.diffusion.sampler import SamplerConfig, generate
from tests.sampler_oracle import generate as per_row
ckpt, rows, reps = sys.argv[1], 32, int(sys.argv[2]) if len(sys.argv) > 2 else 3
block_ckpt = sys.argv[3] if len(sys.argv) > 3 else None
im = load_quietly(ckpt, "cpu")
prompts, refs = load_rows(im, rows)
tok = im.tokenizer
cases = [(im.dlm.merged_copy().eval(), m, 16) for m in (THRESHOLD, CACHED)]
if block_ckpt:
    bm = load_quietly(block_ckpt, "cpu")
    cases.append((bm.dlm.merged_copy().eval(), BLOCK_CACHED, bm.dlm.block_size))
print("| method | G | batch | per-row: ms/step | sampler's own ms/step | batched: ms/step | sampler's own ms/step | speed-up of the call |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
with torch.inference_mode():
    for dlm, method, block in cases:
        for g in (64, 256):
            config = SamplerConfig(**sampler_settings(method, g, block, "hidden"))
            for bs in (1, 16):
                batches = [prompts[i:i + bs] for i in range(0, rows, bs)]
                def run(fn):
                    clock_s, steps, t0 = 0.0, 0, time.perf_counter()
                    outs = []
                    with _ModelClock(dlm) as clock:
                        for b in batches:
                            out = fn(dlm, b, config, eos_id=im.eos_id, pad_id=tok.pad_token_id, seed=0)
                            steps += out.steps
                            outs.append(out.canvas)
                    return time.perf_counter() - t0, clock.seconds, steps, outs
                best = {}
                for _ in range(reps):
                    for name, fn in (("per-row", per_row), ("batched", generate)):
                        wall, model_s, steps, outs = run(fn)
                        if name not in best or wall < best[name][0]:
                            best[name] = (wall, model_s, steps, outs)
                a, b = best["per-row"], best["batched"]
                assert all(torch.equal(x, y) for x, y in zip(a[3], b[3])) and a[2] == b[2]
                cell = lambda r: f"{1e3 * r[0] / r[2]:.2f} | {1e3 * (r[0] - r[1]) / r[2]:.2f} ({100 * (r[0] - r[1]) / r[0]:.0f} %)"
                print(f"| {method} | {g} | {bs} | {cell(a)} | {cell(b)} | {a[0] / b[0]:.2f}× |", flush=True)
