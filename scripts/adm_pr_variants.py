"""Usage: python scripts/adm_pr_variants.py n=N seeds=SEEDS  (`--help`; docs/paper_scale.md: n=5000 seeds=2;
≈ 5 min on 2 cores).

How much the parts of ADM's float16 distance block that the port cannot know move precision/recall counts.
port: adm_eval.adm_sqdist (float16 norms in TF's GPU order, u·v exact then rounded to float16);
f32acc: u·v accumulated in float32 (torch's CPU order, as cuBLAS does in its own order) then rounded;
wide: norms summed exactly and rounded once; f32: the old float32 port. Synthetic pool_3-like features."""
import sys, time
import numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.evaluation import adm as adm_eval
from benchmarks.evaluation.adm import _add16, _tf_row_sum16, _to_half, _sqdist
from benchmarks.config.cli import Key, Spec, command, parse

SPEC = Spec(
    prog="python scripts/adm_pr_variants.py",
    purpose="How much the parts of ADM's float16 distance block that the port cannot know move the precision/recall "
            "counts, on synthetic pool_3-like features (docs/paper_scale.md).",
    keys=(Key("n", "features per set (reference and samples)", type="int", low=2, required=True),
          Key("seeds", "how many seeds (0, 1, ...)", type="int", low=1, default="1"),
          Key("threads", "torch CPU threads", type="int", low=1, default="2")),
    examples=("python scripts/adm_pr_variants.py n=5000 seeds=2", "python scripts/adm_pr_variants.py n=500"),
)

def variant(norm, dot):
    def f(u, v):
        u16, v16 = u.float().half(), v.float().half()
        nu, nv = norm(u16.float().square().half()), norm(v16.float().square().half())
        two_uv = (2 * dot(u16, v16).float()).half()
        d = _add16(_add16(nu[:, None], -two_uv), nv[None, :]).float()
        return d.clamp_min_(0) if torch.isfinite(d).all() else _sqdist(u.float(), v.float())
    return f

wide_norm = lambda x: _to_half(x.double().sum(1))
exact_dot = lambda u, v: _to_half(u.double() @ v.double().T)
f32_dot = lambda u, v: (u.float() @ v.float().T).half()
VARIANTS = {"port": adm_eval.adm_sqdist, "f32acc": variant(_tf_row_sum16, f32_dot),
            "wide": variant(wide_norm, exact_dot), "f32": _sqdist}

def pool_like(rng, n, d=2048, shift=1.0):
    return (np.abs(rng.normal(size=(n, d))) * rng.uniform(0.4, 0.7, size=(n, 1)) * shift).astype(np.float32)

@command(spec=SPEC)
def main(argv):
    args = parse(SPEC, argv)
    n, seeds = args.int("n"), args.int("seeds", 1)
    torch.set_num_threads(args.int("threads", 2))
    orig = adm_eval.adm_sqdist
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        ref, samples = pool_like(rng, n), pool_like(rng, n, shift=1.02)
        for name, fn in VARIANTS.items():
            adm_eval.adm_sqdist = fn
            t = time.time()
            p, r = adm_eval.precision_recall(ref, samples)
            print(f"n={n} seed={seed} {name:7s} precision {round(p * n)}/{n} recall {round(r * n)}/{n}  {time.time() - t:.0f}s", flush=True)
        adm_eval.adm_sqdist = orig
    # fraction of u·v entries where float32 accumulation rounds to another float16 than the exact sum
    u = torch.from_numpy(pool_like(np.random.default_rng(9), 2000)).half()
    print("u·v entries differing (f32 accumulation vs exact):", float((exact_dot(u, u) != f32_dot(u, u)).float().mean()))
    print("norms differing (TF order vs exact):", float((_tf_row_sum16(u.float().square().half()) != wide_norm(u.float().square().half())).float().mean()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
