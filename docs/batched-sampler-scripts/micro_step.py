"""The sampler's own work for one step (strategy, commit choice, commit, EOS fill), per-row loop vs
batched, on synthetic logits; every row active (the worst case for the loop). min over repeats."""
import timeit, torch
torch.set_num_threads(1)
from diffllm.diffusion.sampler import SamplerConfig, propose, commit, plan_block, _fill_after_eos
from tests import sampler_oracle as old
V, EOS, MASK = 496, 2, 495
def setup(B, b, G):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, b, V, generator=g) * 3
    x = torch.full((B, G), MASK)
    return logits, x
for cfg_kw, label in [(dict(threshold=0.9, steps=None), "threshold 0.9"), (dict(steps=None), "schedule")]:
    for B in (1, 16):
        b, G = 16, 64
        config = SamplerConfig(gen_length=G, block_length=b, fill_after_eos=True, **cfg_kw)
        logits, x0 = setup(B, b, G)
        gens = [torch.Generator().manual_seed(0) for _ in range(B)]
        strat = old.STRATEGIES[config.strategy]
        def per_row():
            x = x0.clone(); masked = x[:, :b] == MASK
            for row in range(B):
                cols = masked[row].nonzero().squeeze(-1)
                conf, tok = strat(logits[row, cols], config.sampling, gens[row])
                conf = conf - config.eos_penalty * (tok == EOS).double()
                if config.threshold is not None:
                    chosen = old.choose_positions(conf, None, config.threshold)
                else:
                    chosen = old.choose_positions(conf, 1, None)  # k_0 = 16 // 16
                x[row, cols[chosen]] = tok[chosen]
                old._fill_after_eos(x[row], EOS, MASK)
        def batched():
            x = x0.clone(); masked = x[:, :b] == MASK
            active = masked.any(-1)
            plan = plan_block(masked, config)
            p = propose(logits, masked, config, gens, EOS)
            commit(x[:, :b], p, masked, plan, 0, config.threshold)
            _fill_after_eos(x, EOS, MASK, active)
        res = {}
        for _ in range(5):
            for name, fn in (("per-row", per_row), ("batched", batched)):
                t = min(timeit.repeat(fn, number=50, repeat=3)) / 50
                res[name] = min(res.get(name, 1e9), t)
        print(f"| {label} | {B} | {1e3*res['per-row']:.3f} | {1e3*res['batched']:.3f} | {res['per-row']/res['batched']:.1f}× |", flush=True)
