#!/usr/bin/env python
"""XLA CPU's matrix products with and without YNNPACK fusions, by the number of rows.

The online loops switch YNNPACK's fusions off when every dense op of the step has at most
``YNN_MAX_ROWS`` rows (``brainscale.backends.online_driver.driver_compiler_options``). This
measures where that pays: a scan of ``T`` steps of ``h = 0.5 tanh(h W)[:, :I] + 0.5 x`` (the
forward's ``[B, I]·[I, O]`` product with a data dependence between steps, as in a recurrent
loop), compiled once with XLA's default options and once with
``xla_cpu_experimental_ynn_fusion_type=""``, each in a fresh process, alternating, for
``--rounds`` rounds. Prints µs per step (fastest round) and the ratio; saves JSON.

    python tools/bench_ynn_rows.py --B 1,8,16,32,64 --out benchmarks/results/cpu/ynn-rows
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHAPES = ((612, 512), (612, 1536), (1124, 1024), (1124, 3072))
FLAG = "xla_cpu_experimental_ynn_fusion_type"

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
B, I, O, T, off = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
rng = np.random.RandomState(0)
x = jnp.asarray(rng.rand(B, I), jnp.float32)
W = jnp.asarray(rng.randn(I, O) / np.sqrt(I), jnp.float32)

def f(x, W):
    def body(h, _):
        y = jnp.tanh(h @ W)
        y = jnp.pad(y, ((0, 0), (0, max(0, I - O))))[:, :I]
        return 0.5 * y + 0.5 * x, None
    return jax.lax.scan(body, x, None, length=T)[0]

opts = {"%s": ""} if off else None
g = jax.jit(f).lower(x, W).compile(opts)
g(x, W).block_until_ready()
ts = []
for _ in range(7):
    t0 = time.perf_counter(); g(x, W).block_until_ready(); ts.append(time.perf_counter() - t0)
print("RESULT" + json.dumps({"us_per_step": min(ts) / T * 1e6, "ynn_in_hlo": "ynn" in g.as_text()}))
""" % FLAG


def _run(B, I, O, T, off) -> dict:
    p = subprocess.run([sys.executable, "-c", _CHILD, str(B), str(I), str(O), str(T),
                        "1" if off else "0"], capture_output=True, text=True, timeout=600)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    if p.returncode or not line:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(line[0][6:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", default="1,8,16,32,64")
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    rows = []
    for B in [int(b) for b in a.B.split(",")]:
        for I, O in SHAPES:
            best = {}
            for r in range(a.rounds):
                for off in ((False, True) if r % 2 == 0 else (True, False)):
                    res = _run(B, I, O, a.T, off)
                    k = "xla" if off else "default"
                    best[k] = min(best.get(k, 1e30), res["us_per_step"])
                    if not off:
                        best["ynn_in_hlo"] = res["ynn_in_hlo"]
            row = {"B": B, "I": I, "O": O, "default_us": best["default"],
                   "xla_us": best["xla"], "ratio": best["xla"] / best["default"],
                   "default_uses_ynn": best["ynn_in_hlo"]}
            rows.append(row)
            print(f"B={B:3d} I={I:5d} O={O:5d}: default {row['default_us']:8.1f} µs "
                  f"(ynn {row['default_uses_ynn']}), without YNN {row['xla_us']:8.1f} µs, "
                  f"ratio {row['ratio']:.2f}", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"T": a.T, "rounds": a.rounds, "rows": rows},
                                                 indent=1))
    md = ["| B | I | O | default µs/step | without YNN µs/step | without / default |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['B']} | {r['I']} | {r['O']} | {r['default_us']:.1f} | {r['xla_us']:.1f} | "
           f"{r['ratio']:.2f} |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
