#!/usr/bin/env python
"""Gradient fidelity through a normalisation between an op and the neurons, against BPTT.

``absorb-normalization`` turns ``W·x → normalisation (no affine) → neurons`` into one
composite op (``class=MatMulOp+norm`` in the IR). ``norm_stats='exact'`` (default) keeps the
exact per-output-neuron trace (``layout=dense``); ``norm_stats='constant'`` treats the
statistics as constants (the common approximation; the op keeps its compact layout).

Models (``--models``), all with B = 8 and 20 inputs, a 2-state neuron ``(V, a)`` and output
``s = tanh(V)``:

* ``ln-ff``  — ``z = 1.5·LN(W_in·x) + 0.2``, layer statistics, no recurrent weights;
  ``LN(y) = (y − mean y) / sqrt(var y + 1e-5)`` written with jnp;
* ``ln-rec`` — ``z = 1.5·LN(W·[x, s_{t-1}]) + 0.2``: ``W_in x + W_rec s_{t-1}`` as one matmul
  on the concatenation (two separate ops summed before the norm are not absorbed, see the
  ``probes`` in the JSON);
* ``bn-ff`` / ``bn-rec`` — the same with batch statistics (mean and variance over the batch
  axis, written with jnp);
* ``lnbs-ff`` — ``ln-ff`` with ``brainstate.nn.LayerNorm(use_scale=False, use_bias=False)``,
  which computes ``(y − mean) · rsqrt(var + 1e-6)``. jaxlib 0.10.2 (now excluded by
  brainscale's pyproject) computed ``jax.jit(jax.jacrev(·))`` of that form wrong on the CPU
  for f32[8, N], N in 64..127 (jax-ml/jax#39103: ``a * sum(a * b)`` batched over two or more
  axes); rows marked with jax 0.10.2 in the table were measured on it, and the Jacobian probe
  in the JSON checks the installed jaxlib;
* ``plain-ff`` / ``plain-rec`` — reference without a normalisation (``z = 1.5·W·[x, s] + 0.2``,
  a plain ``MatMulOp``; stats ``none``): what each algorithm gives on the same neurons when
  nothing mixes them.

Neuron: ``V ← 0.9 V − 0.2 a + 0.1 z``, ``a ← 0.8 a + 0.1 tanh(V_old)``; loss
``Σ_t ‖s_t − target_t‖²``; inputs and targets Gaussian from ``--seed``; initial ``V`` uniform in
[0, 0.5) from a fixed seed, ``a = 0``.

For each model, N, algorithm (D-RTRL = ``DiagParamDimAlgorithm``, ES-D-RTRL =
``DiagIODimAlgorithm(decay_or_rank=--decay)``), statistics option and window W: the online
gradient summed over W steps (``brainscale.online_gradients``, which resets the states to
their initial values and zeroes the traces) against the BPTT gradient of the same summed loss
over the same W steps from the same initial state (``jax.grad`` through a
``brainstate.transform.for_loop``). Reported per parameter (``W`` whole and, for the
recurrent models, its ``W_in`` / ``W_rec`` row blocks): cosine, relative error
``‖g − g_bptt‖ / ‖g_bptt‖`` and norm ratio ``‖g‖ / ‖g_bptt‖``. Windows are prefixes of one
sequence of ``max(W)`` steps.

    python tools/bench_norm.py --N 64,256 --out benchmarks/results/cpu/norm-fidelity

``--merge`` keeps the rows of an existing ``norm_fidelity.json`` in ``--out`` that this run
does not recompute (to run the grid in pieces); the command of every piece is kept in the
metadata. ``--steps-per-run K`` runs the windows longer than K in pieces of K online steps
(``online_gradients(reset=False)`` goes on from the states of the previous piece; the sum is
the same as in one run). Once the process has run ``--budget-s`` seconds, the piece it just
finished is checkpointed (the learner's states and traces and the partial gradient sum, in
``--ckpt-dir``), the results so far are written and the script exits with status 3; rerunning
the same command (with ``--merge``) goes on where it stopped and skips finished windows.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import brainstate
import jax
import jax.numpy as jnp
import numpy as np

import brainscale

N_IN, B = 20, 8
MODELS = ("ln-ff", "ln-rec", "bn-ff", "bn-rec", "lnbs-ff", "plain-ff", "plain-rec")
ALGO_NAMES = {"param": "D-RTRL", "io": "ES-D-RTRL"}


def layer_norm(y, eps=1e-5):
    m = jnp.mean(y, -1, keepdims=True)
    return (y - m) / jnp.sqrt(jnp.mean((y - m) ** 2, -1, keepdims=True) + eps)


def batch_norm(y, eps=1e-5):
    m = jnp.mean(y, 0, keepdims=True)
    return (y - m) / jnp.sqrt(jnp.mean((y - m) ** 2, 0, keepdims=True) + eps)


class Net(brainstate.nn.Module):
    """``z = 1.5 · norm(W · [x, s_{t-1}]) + 0.2`` drives a 2-state neuron ``(V, a)``."""

    def __init__(self, model: str, n: int):
        super().__init__()
        self.norm_kind, rec = model.split("-")
        self.recurrent = rec == "rec"
        rng = np.random.RandomState(0)
        n_in = N_IN + (n if self.recurrent else 0)
        self.w = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n_in, n) / np.sqrt(n_in), jnp.float32)},
            brainscale.MatMulOp())
        self.ln = (brainstate.nn.LayerNorm((n,), use_scale=False, use_bias=False)
                   if self.norm_kind == "lnbs" else None)
        self.V = brainscale.ETraceState(jnp.asarray(rng.rand(B, n) * 0.5, jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros((B, n), jnp.float32))

    def update(self, x):
        inp = jnp.concatenate([x, jnp.tanh(self.V.value)], -1) if self.recurrent else x
        y = self.w.execute(inp)
        if self.norm_kind == "ln":
            y = layer_norm(y)
        elif self.norm_kind == "lnbs":
            y = self.ln(y)
        elif self.norm_kind == "bn":
            y = batch_norm(y)
        z = 1.5 * y + 0.2
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + 0.1 * z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


class TwoOps(brainstate.nn.Module):
    """``LN(W_in x + W_rec s_{t-1})`` with two separate ops (a probe: is it absorbed?)."""

    def __init__(self, n: int):
        super().__init__()
        rng = np.random.RandomState(0)
        self.wi = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(N_IN, n) / np.sqrt(N_IN), jnp.float32)},
            brainscale.MatMulOp())
        self.wr = brainscale.ETraceParam(
            {"weight": jnp.asarray(rng.randn(n, n) / np.sqrt(n), jnp.float32)},
            brainscale.MatMulOp())
        self.V = brainscale.ETraceState(jnp.zeros((B, n), jnp.float32))
        self.a = brainscale.ETraceState(jnp.zeros((B, n), jnp.float32))

    def update(self, x):
        z = 1.5 * layer_norm(self.wi.execute(x) + self.wr.execute(jnp.tanh(self.V.value))) + 0.2
        v, a = self.V.value, self.a.value
        self.V.value = 0.9 * v - 0.2 * a + 0.1 * z
        self.a.value = 0.8 * a + 0.1 * jnp.tanh(v)
        return jnp.tanh(self.V.value)


def loss(out, tg):
    return jnp.sum((out - tg) ** 2)


def _weight(g) -> np.ndarray:
    (w,) = [np.asarray(v["weight"] if isinstance(v, dict) else v, np.float64)
            for v in g.values()]
    return w


def _blocks(model: str, w: np.ndarray) -> dict:
    if model.endswith("-rec"):
        return {"W": w, "W_in": w[:N_IN], "W_rec": w[N_IN:]}
    return {"W": w}


def _metrics(g: np.ndarray, ref: np.ndarray) -> dict:
    g, ref = g.ravel(), ref.ravel()
    ng, nr = float(np.linalg.norm(g)), float(np.linalg.norm(ref))
    return {"cos": float(g @ ref / (ng * nr)) if ng > 0 and nr > 0 else float("nan"),
            "rel": float(np.linalg.norm(g - ref) / nr), "norm_ratio": ng / nr}


def bptt(model, n, xs, ys):
    net = Net(model, n)
    params = net.states(brainstate.ParamState)

    @brainstate.transform.jit
    def grads(xs, ys):
        def total():
            return brainstate.transform.for_loop(lambda x, y: loss(net(x), y), xs, ys).sum()
        return brainstate.transform.grad(total, params)()
    return _weight(grads(xs, ys))


def learner_of(model, n, algo, stats, decay, x0):
    net = Net(model, n)
    kw = {} if stats == "none" else {"norm_stats": stats}
    alg = (brainscale.DiagParamDimAlgorithm(net, **kw) if algo == "param" else
           brainscale.DiagIODimAlgorithm(net, decay_or_rank=decay, **kw))
    learner = alg.compile_graph(x0)
    ir = learner.ir()
    ops = learner.graph.ops
    info = {"op_class": ops[0].op_class if ops else None,
            "layout": ops[0].layout if ops else None,
            "stats_attr": dict(ops[0].attrs).get("stats") if ops else None}
    if stats == "none":   # the reference without a normalisation: a plain MatMulOp
        return learner, info, len(ops) == 1 and info["op_class"] == "MatMulOp", ir
    absorbed = (len(ops) == 1 and info["op_class"] == "MatMulOp+norm"
                and "class=MatMulOp+norm" in ir and f"stats={stats}" in ir)
    return learner, info, absorbed, ir


class Incomplete(Exception):
    """A window was checkpointed part-way (``--steps-per-run``)."""


T_START = time.perf_counter()


def online(learner, xs, ys, ckpt_dir, tag, k_max, budget_s):
    """The online gradient summed over ``len(xs)`` steps, in pieces of ``k_max`` steps
    (0: all at once); when this process has run ``budget_s`` seconds after a piece, the
    partial state is saved to ``ckpt_dir`` and :class:`Incomplete` raised."""
    W = len(xs)
    if not k_max or W <= k_max:
        g, _ = brainscale.online_gradients(learner, xs, ys, loss)
        return _weight(g)
    path = Path(ckpt_dir) / (hashlib.sha1(tag.encode()).hexdigest()[:16] + ".npz")
    states = list(learner.states().items())
    done, acc = 0, None
    if path.exists():
        ck = np.load(path, allow_pickle=False)
        assert str(ck["tag"]) == tag, (str(ck["tag"]), tag)
        done, acc = int(ck["done"]), ck["acc"]
        leaves = [ck[f"s{i}"] for i in range(int(ck["n_leaves"]))]
        i = 0
        for _, st in states:
            tree = jax.tree.structure(st.value)
            n_l = tree.num_leaves
            st.value = jax.tree.unflatten(tree, [jnp.asarray(v) for v in leaves[i:i + n_l]])
            i += n_l
    while True:
        stop = min(W, done + k_max)
        g, _ = brainscale.online_gradients(learner, xs[done:stop], ys[done:stop], loss,
                                           reset=done == 0)
        g = _weight(g)
        acc = g if acc is None else acc + g
        if stop == W:
            path.unlink(missing_ok=True)
            return acc
        if time.perf_counter() - T_START > budget_s:
            break
        done = stop
    leaves = [np.asarray(v) for _, st in states for v in jax.tree.leaves(st.value)]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tag=tag, done=stop, acc=acc, n_leaves=len(leaves),
             **{f"s{i}": v for i, v in enumerate(leaves)})
    raise Incomplete(f"{tag}: steps 0..{stop} of {W} done, checkpoint {path}")


def probes(n, x0) -> dict:
    out = {}
    for name, stats in (("two-ops-summed", "exact"), ("two-ops-summed", "constant")):
        key = f"{name} N={n} stats={stats}"
        try:
            lrn = brainscale.DiagParamDimAlgorithm(TwoOps(n), norm_stats=stats).compile_graph(x0)
            out[key] = {"compiled": True,
                        "op_classes": [op.op_class for op in lrn.graph.ops]}
        except Exception as e:  # noqa: BLE001 - reported as is
            out[key] = {"compiled": False, "error": f"{type(e).__name__}: {e}"}
    return out


def jacobian_probe(n) -> dict:
    """``jit(jacrev)`` against ``jacfwd`` of the two LayerNorm forms on f32[B, n] (the
    composite's exact D-RTRL update takes this Jacobian inside the jitted step)."""
    y = jnp.asarray(np.random.RandomState(0).randn(B, n), jnp.float32)
    ln_bs = brainstate.nn.LayerNorm((n,), use_scale=False, use_bias=False)
    out = {}
    for name, f in (("brainstate.nn.LayerNorm (rsqrt form)", ln_bs),
                    ("jnp division form", layer_norm)):
        a = np.asarray(jax.jit(jax.jacrev(f))(y))
        c = np.asarray(jax.jacfwd(f)(y))
        out[f"jit(jacrev) vs jacfwd, {name}, f32[{B},{n}]"] = {
            "max_rel_err": float(np.abs(a - c).max() / np.abs(c).max())}
    return out


def fmt_cell(m: dict) -> str:
    return f"**{m['cos']:.4f}** / {m['rel']:.3g} / {m['norm_ratio']:.3g}"


def markdown(rows, meta) -> str:
    out = [f"`{c}`" for c in meta["commands"]]
    out += ["", f"last run: jax {meta['jax']}, brainstate {meta['brainstate']}, B = {meta['B']}, "
                f"{meta['n_in']} inputs, {meta['date']}, {meta['platform']}", "",
            "Each cell: **cosine** / ‖g−g_BPTT‖/‖g_BPTT‖ / ‖g‖/‖g_BPTT‖ of the gradient summed "
            "over W steps.", ""]
    for model in MODELS:
        mr = [r for r in rows if r["model"] == model]
        if not mr:
            continue
        params = ["W", "W_in", "W_rec"] if model.endswith("-rec") else ["W"]
        out += [f"**{model}**", "",
                "| N | W | algorithm | stats | " + " | ".join(params) + " | op (IR) | jax |",
                "|---|---|---|---|" + "---|" * len(params) + "---|---|"]
        for r in mr:
            alg = ALGO_NAMES[r["algo"]] + (f" α={r['decay']}" if r["algo"] == "io" else "")
            head = f"| {r['N']} | {r['W']} | {alg} | {r['stats']} | "
            if "error" in r:
                out.append(head + "failed: " + r["error"].splitlines()[0][:100]
                           + " |" * len(params) + f" {r.get('jax', '?')} |")
                continue
            op = f"{r['ir']['op_class']}, {r['ir']['layout']}" + (
                f", stats={r['ir']['stats_attr']}" if r["ir"]["stats_attr"] else "")
            out.append(head + " | ".join(fmt_cell(r["metrics"][p]) for p in params)
                       + f" | {op} | {r.get('jax', '?')} |")
        out.append("")
    if meta.get("probes"):
        out += ["Probes:", ""]
        for k, v in meta["probes"].items():
            if "max_rel_err" in v:
                out.append(f"* {k}: max rel. error {v['max_rel_err']:.3g}")
                continue
            out.append(f"* `{k}`: " + (f"compiled, ops {v['op_classes']}" if v["compiled"]
                                       else "refused — " + v["error"].splitlines()[0]))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", default="64,256")
    p.add_argument("--W", default="10,100")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--algos", default="param,io")
    p.add_argument("--stats", default="exact,constant")
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/cpu/norm-fidelity")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing norm_fidelity.json not recomputed here")
    p.add_argument("--steps-per-run", type=int, default=0,
                   help="at most this many online steps of a window per process (0: all)")
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="with --steps-per-run: stop after the piece that passes this many "
                        "seconds of the process")
    p.add_argument("--ckpt-dir", default="outputs/bench_norm_ckpt")
    a = p.parse_args(argv)
    Ns = [int(v) for v in a.N.split(",")]
    Ws = sorted(int(v) for v in a.W.split(","))
    models = a.models.split(",")
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; one of {MODELS}")
    algos, statss = a.algos.split(","), a.stats.split(",")
    cmd = "python tools/bench_norm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    old_rows, old_meta = [], None
    if a.merge and (out / "norm_fidelity.json").exists():
        old = json.loads((out / "norm_fidelity.json").read_text())
        old_rows, old_meta = old["rows"], old["meta"]
        for r in old_rows:      # rows from before the per-row version: the old run's jax
            r.setdefault("jax", old_meta["jax"])

    def key(r):
        return (r["model"], r["N"], r["W"], r["algo"], r["stats"], r.get("decay"))
    # with --merge and --steps-per-run, windows already in the results are not recomputed
    # (so that rerunning the same command goes on where it stopped)
    have = ({key(r) for r in old_rows if "error" not in r} if a.steps_per_run else set())
    rows, probe, incomplete = [], {}, None
    for n in Ns:
        if incomplete:
            break
        rng = np.random.RandomState(a.seed)
        xs = jnp.asarray(rng.randn(max(Ws), B, N_IN), jnp.float32)
        ys = jnp.asarray(0.5 * rng.randn(max(Ws), B, n), jnp.float32)
        if any(m.endswith("-rec") for m in models):
            probe.update(probes(n, xs[0]))
        if any(m.startswith("ln") for m in models):
            probe.update(jacobian_probe(n))
        for model in models:
            if incomplete:
                break
            refs = {}
            for W in Ws:
                t0 = time.perf_counter()
                refs[W] = bptt(model, n, xs[:W], ys[:W])
                print(f"{model} N={n} W={W} BPTT {time.perf_counter() - t0:.1f}s", flush=True)
            for algo in algos:
                for stats in (["none"] if model.startswith("plain") else statss):
                    if incomplete:
                        break
                    base = {"model": model, "N": n, "algo": algo, "stats": stats,
                            "decay": a.decay if algo == "io" else None}
                    todo = [W for W in Ws if key(dict(base, W=W)) not in have]
                    if not todo:
                        continue
                    try:
                        t0 = time.perf_counter()
                        learner, info, absorbed, ir = learner_of(model, n, algo, stats,
                                                                 a.decay, xs[0])
                        if not absorbed:
                            raise RuntimeError("the op is not the expected one (normalisation "
                                               "not absorbed?); IR:\n" + ir)
                        t_compile = time.perf_counter() - t0
                    except Exception as e:  # noqa: BLE001 - reported, not hidden
                        msg = f"{type(e).__name__}: {e}"
                        print(f"{model} N={n} {algo} {stats}: FAILED {msg}", flush=True)
                        rows += [dict(base, W=W, error=msg, jax=jax.__version__) for W in todo]
                        continue
                    for W in todo:
                        if incomplete:
                            break
                        row = dict(base, W=W, ir=info, jax=jax.__version__)
                        try:
                            t0 = time.perf_counter()
                            tag = (f"{model} N={n} W={W} {algo} {stats} decay={a.decay} "
                                   f"seed={a.seed}")
                            g = online(learner, xs[:W], ys[:W], a.ckpt_dir, tag,
                                       a.steps_per_run, a.budget_s)
                            row["time_s"] = round(time.perf_counter() - t0, 2)
                            if a.steps_per_run and W > a.steps_per_run:
                                row["steps_per_run"] = a.steps_per_run   # time_s: last piece
                            row["compile_s"] = round(t_compile, 2)
                            gb, rb = _blocks(model, g), _blocks(model, refs[W])
                            row["metrics"] = {k: _metrics(gb[k], rb[k]) for k in gb}
                            m = row["metrics"]["W"]
                            print(f"{model} N={n} W={W} {algo} {stats}: cos={m['cos']:.4f} "
                                  f"rel={m['rel']:.3g} norm={m['norm_ratio']:.3g} "
                                  f"({row['time_s']}s)", flush=True)
                        except Incomplete as e:
                            incomplete = str(e)
                            print("INCOMPLETE " + incomplete, flush=True)
                            break
                        except Exception as e:  # noqa: BLE001
                            row["error"] = f"{type(e).__name__}: {e}"
                            print(f"{model} N={n} W={W} {algo} {stats}: FAILED {row['error']}",
                                  flush=True)
                            traceback.print_exc()
                        rows.append(row)

    new_keys = {key(r) for r in rows}
    rows = [r for r in old_rows if key(r) not in new_keys] + rows
    rows.sort(key=lambda r: (MODELS.index(r["model"]), r["N"], r["W"], r["algo"] != "param",
                             r["stats"] != "exact"))
    commands = list(old_meta["commands"]) if old_meta else []
    if cmd not in commands:
        commands.append(cmd)
    meta = {"commands": commands,
            "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "jax": jax.__version__, "brainstate": brainstate.__version__,
            "brainscale": getattr(brainscale, "__version__", "?"),
            "platform": f"{jax.default_backend()} ({platform.machine()})",
            "B": B, "n_in": N_IN, "seed": a.seed,
            "probes": {**(old_meta or {}).get("probes", {}), **probe}}
    md = markdown(rows, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "norm_fidelity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "norm_fidelity.md").write_text(md)
    print(md)
    if incomplete:
        print("incomplete (rerun the same command to continue): " + incomplete)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
