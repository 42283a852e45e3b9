"""EM at 4 and 8 steps with and without remasking, several bounds (tiny default checkpoint)."""
import sys, time, torch
torch.set_num_threads(1)
from diffllm.bench.sampler import load_rows
from diffllm.inference.loading import load_quietly
from diffllm.diffusion.sampler import generate
from diffllm.evaluation.metrics import exact_match
im = load_quietly(sys.argv[1], "cpu")
prompts, refs = load_rows(im, int(sys.argv[2]))
base = im.sampler_config
print(base)
tok = im.tokenizer
for steps in (4, 8):
    for remask, bound, extra in [(False, 0.1, 4), (True, 0.05, 4), (True, 0.1, 4), (True, 0.2, 4), (True, 0.3, 4), (True, 0.5, 4), (True, 0.1, 8)]:
        cfg = base.with_overrides(dict(steps=steps, threshold=None, remask=remask, remask_bound=bound, remask_steps=extra))
        texts, nfe, t0, nrem = [], 0, time.perf_counter(), 0
        for i in range(0, len(prompts), 16):
            out = generate(im.dlm, prompts[i:i+16], cfg, eos_id=im.eos_id, pad_id=tok.pad_token_id, seed=0, record_trajectory=True)
            texts += [tok.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
            nfe += out.nfe
            nrem += sum(len(s.remasked) for tr in out.trajectories for s in tr.steps)
        print(f"steps {steps} remask {remask!s:5} bound {bound} extra {extra}: EM {100*exact_match(texts, refs):.1f} % nfe {nfe} remasked {nrem} ({time.perf_counter()-t0:.1f} s)", flush=True)
