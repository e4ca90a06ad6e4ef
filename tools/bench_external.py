#!/usr/bin/env python
"""Side by side with the published ``brainscale`` 0.1.0 and ``braintrace`` 0.2.x packages.

The tool creates a virtual environment for each published package itself (under
``.bench_venvs/``, which git ignores), never imports them into this project's environment, and
runs the same worker (``tools/bench_ext/worker.py``) in each one as a subprocess. All three
build the same model (``tools/bench_models.py``, each library's own spelling of a trace
parameter) from the same weights, initial state and inputs, exchanged through an ``.npz``
file; gradients come back as ``.npz`` files. Compared, for each hidden size N:

* time per step (median of repeats after a warm-up call; the same T in every library),
* XLA temp memory at several T and the process peak RSS,
* D-RTRL's time per trace element and per step, against the copy bandwidth,
* ``compile_graph`` time (cold and warm) of 3-layer networks,
* gradients: per parameter, cosine similarity and relative error against ours (same
  algorithm) and against BPTT (same window).

Environments:

* ``brainscale010``: Python 3.11, ``brainscale==0.1.0``. Its gradient code calls
  ``jax.core.get_aval`` and ``jax.tree_leaves``, removed from current jax; the worker maps
  those two names onto ``jax.typeof`` / ``jax.tree.leaves`` before importing it (nothing
  else is changed).
* ``braintrace``: Python 3.12 (the package requires it), ``braintrace>=0.2,<0.3``.

``--ext-jax same`` (default) pins both environments to this project's jax/jaxlib version
so every library runs on the same XLA; ``--ext-jax native`` lets pip choose (braintrace then
gets jax 0.12). Interpreters are found with ``$BENCH_PYTHON311`` / ``$BENCH_PYTHON312``,
``--python311`` / ``--python312``, ``python3.X`` on PATH, or pyenv.

``--zoo`` compares the rules of ``brainscale.zoo`` that braintrace also ships (e-prop with
and without the κ filter, SnAp-2, OSTL with the recurrent term) in ours and braintrace, with
BPTT: time per step, and the gradient of one window against BPTT and against ours
(``external_zoo.json`` / ``external_zoo.md``). ``--zoo-algos`` also takes ``ostl_ff``,
``uoro``, ``three_factor`` and ``dni`` (braintrace's ``DNI`` with a zero synthesiser, fed one
step per call: a one-step window), and ours-only rows: ``ostl_ffc`` (``OSTLFeedforward``
summed with ``online_gradients(chunk=16)``), ``ostl_ffd`` (``keep_dynamics=True``),
``dni_tr`` (``DNIAlgorithm(readout='trace')``), ``eprop_kz``, ``ostl``.

Example::

    python tools/bench_external.py --out benchmarks/results/cpu       # N = 128, 512, 1024
    python tools/bench_external.py --setup-only                       # just build the venvs
    python tools/bench_external.py --zoo --libs braintrace --N 32 --T 100
    python tools/bench_external.py --model alif --N 512,1024 --algos io --native   # + ES on backend=native
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import bench_models as bm  # noqa: E402

LIBS = {
    "brainscale010": {"python": "3.11", "spec": ["brainscale==0.1.0"], "pkg": "brainscale",
                      "label": "brainscale 0.1.0", "algos": {"io": "ES-D-RTRL (IODimVjp)",
                                                             "param": "D-RTRL (ParamDimVjp)"}},
    "braintrace": {"python": "3.12", "spec": ["braintrace>=0.2,<0.3"], "pkg": "braintrace",
                   "label": "braintrace", "algos": {"io": "pp_prop", "param": "D_RTRL"}},
}
OURS_LABEL = {"io": "ES-D-RTRL", "param": "D-RTRL", "bptt": "BPTT", "hybrid": "hybrid",
              "io_chunk": "ES-D-RTRL chunk", "param_chunk": "D-RTRL chunk", "fwd": "forward",
              "floor": "floor", "io_native": "ES-D-RTRL native"}
#: ours with ``online_gradients(chunk=K)``, per algorithm
CHUNKED = {"io": "io_chunk", "param": "param_chunk"}
BASE = {v: k for k, v in CHUNKED.items()}
#: ours on another backend, per algorithm (``--native``): ES-D-RTRL with ``backend='native'``
#: (the per-step gradient added in place by the kernel's outer-accumulate)
NATIVE = {"io": "io_native"}
NATIVE_BASE = {v: k for k, v in NATIVE.items()}


# ---------------------------------------------------------------------------------------
# interpreters and virtual environments
# ---------------------------------------------------------------------------------------

def _py_version(exe: str):
    try:
        out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def find_python(ver: str, explicit: str | None = None) -> str:
    """An interpreter of version ``ver`` ('3.11'): option, env var, PATH, then pyenv."""
    cands = []
    if explicit:
        cands.append(explicit)
    env = os.environ.get("BENCH_PYTHON" + ver.replace(".", ""))
    if env:
        cands.append(env)
    if "%d.%d" % sys.version_info[:2] == ver:
        cands.append(getattr(sys, "_base_executable", None) or sys.executable)
    w = shutil.which(f"python{ver}")
    if w:
        cands.append(w)
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            root = subprocess.run([pyenv, "root"], capture_output=True, text=True,
                                  timeout=60).stdout.strip()
            found = sorted(glob.glob(os.path.join(root, "versions", f"{ver}*", "bin",
                                                  f"python{ver}")), reverse=True)
            cands.extend(found)
        except (OSError, subprocess.TimeoutExpired):
            pass
    for c in cands:
        if c and _py_version(c) == ver:
            return c
    raise SystemExit(f"no Python {ver} found: pass --python{ver.replace('.', '')} or set "
                     f"BENCH_PYTHON{ver.replace('.', '')}")


def our_jax_version() -> str:
    import importlib.metadata as md
    return md.version("jax")


def ensure_venv(lib: str, venv_root: Path, ext_jax: str, python: str | None = None,
                log=print) -> str:
    """Create (once) the venv of ``lib``; return its python executable."""
    spec = list(LIBS[lib]["spec"])
    tag = "jaxnative"
    if ext_jax == "same":
        jv = our_jax_version()
        spec += [f"jax=={jv}", f"jaxlib=={jv}"]
        tag = f"jax{jv}"
    vdir = venv_root / f"{lib}-{tag}"
    exe = vdir / "bin" / "python"
    stamp = vdir / ".bench-installed"
    want = " ".join(spec)
    if stamp.exists() and stamp.read_text().splitlines()[0] == want and exe.exists():
        return str(exe)
    base = find_python(LIBS[lib]["python"], python)
    log(f"[venv] creating {vdir.relative_to(ROOT) if vdir.is_relative_to(ROOT) else vdir} "
        f"with Python {LIBS[lib]['python']}: pip install {want}")
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(vdir)], check=True)
    t0 = time.perf_counter()
    p = subprocess.run([str(exe), "-m", "pip", "install", "-q", *spec], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise SystemExit(f"pip install {want} failed in {vdir}:\n{p.stderr[-3000:]}")
    freeze = subprocess.run([str(exe), "-m", "pip", "freeze"], capture_output=True,
                            text=True).stdout
    stamp.write_text(want + "\n" + freeze)
    log(f"[venv] {lib}: installed in {time.perf_counter() - t0:.0f} s")
    return str(exe)


# ---------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------

def write_data(path: Path, model: str, N: int, B: int, T: int, seed: int):
    import numpy as np
    w = bm.make_weights(model, N, seed)
    h = bm.make_hidden(model, N, B, seed)
    xs, ys = bm.make_inputs(model, T, B, seed)
    np.savez(path, xs=xs, ys=ys, **{f"w:{k}": v for k, v in w.items()},
             **{f"h:{k}": v for k, v in h.items()})


def t_for(algo, model, N, B, a):
    if algo != "param":
        return a.T
    elems = bench.est_param_trace_elems(model, N, B)
    # the slowest library sets the pace: ~50 ns per trace element per step (brainscale 0.1.0)
    return bench.nice_T(a.call_s / (elems * 50e-9), min(a.T, 20), a.T)


def run_compare(a, pythons: dict, out_dir: Path, meta: dict) -> dict:
    import numpy as np
    env = bench.worker_env("cpu")
    wd = Path(bench.scratch_dir(a, "external"))
    results, grads = [], []
    model, B = a.model, a.B
    t0 = time.perf_counter()
    for N in a.N:
        algos = [al for al in ("io", "param") if al in a.algos]
        Ts = {algo: t_for(algo, model, N, B, a) for algo in algos}
        if a.chunk > 1:
            if "param" in Ts:   # a few windows, so that the windowed D-RTRL is measured
                Ts["param"] = max(Ts["param"], -(-4 * a.chunk // 10) * 10)
            for al in algos:
                Ts[CHUNKED[al]] = Ts[al]
        if a.native:
            for al in algos:
                if al in NATIVE:
                    Ts[NATIVE[al]] = Ts[al]
        data = {}
        for T in sorted(set(Ts.values()) | {a.T}):
            p = wd / f"data_{model}_N{N}_B{B}_T{T}.npz"
            write_data(p, model, N, B, T, a.seed)
            data[T] = str(p)
        jobs = []
        for T in sorted(set(Ts.values()) | {a.T}):
            jobs.append(("ours", "bptt", T))
        if a.floor:   # what any online rule pays per step: the forward, + one VJP (no traces)
            jobs += [("ours", "fwd", a.T), ("ours", "floor", a.T)]
        for lib in ["ours"] + a.libs:
            for algo in algos + ([CHUNKED[al] for al in algos if CHUNKED[al] in Ts]
                                 + [NATIVE[al] for al in algos if NATIVE.get(al) in Ts]
                                 if lib == "ours" else []):
                jobs.append((lib, algo, Ts[algo]))
        if N == min(a.N):
            for lib in a.libs:   # identity check: BPTT must agree across libraries
                jobs.append((lib, "bptt", a.T))
        gpaths = {}
        timed_jobs = [(lib, algo, T) for lib, algo, T in jobs if not (algo == "bptt" and T != a.T)]
        # round 0 measures everything; later rounds only re-time (interleaved across
        # libraries, so that a burst of load on a shared machine hits all of them)
        jobs = [(0, *j) for j in jobs] + [(k, *j) for k in range(1, a.rounds)
                                          for j in timed_jobs if not (j[1] == "bptt" and j[0] != "ours")]
        for rnd, lib, algo, T in jobs:
            if bench.time_left(t0, a.budget_s) <= 0:
                results.append({"config": {"lib": lib, "algo": algo, "N": N, "B": B, "T": T,
                                           "model": model}, "ok": False,
                                "skipped": "time budget spent"})
                continue
            gp = str(wd / f"grads_{lib}_{algo}_{model}_N{N}_T{T}.npz")
            timed = not (algo == "bptt" and T != a.T)
            cfg = {"lib": lib, "model": model, "algo": algo, "N": N, "B": B, "T": T,
                   "seed": a.seed, "decay": a.decay, "repeats": a.repeats if timed else 0,
                   "run": True, "data": data[T], "grads_out": gp if rnd == 0 else None,
                   "mem_T": sorted(set(a.mem_T) | {T}) if (timed and rnd == 0) else [],
                   "chunk": a.chunk,
                   "bandwidth": algo in ("param", "param_chunk")}
            r = bench.run_worker(cfg, python=pythons[lib], env=env, workdir=str(wd),
                                 timeout=a.timeout)
            r["timed"] = timed
            r["round"] = rnd
            results.append(r)
            if r.get("ok") and rnd == 0:
                gpaths[(lib, algo, T)] = gp
            label = "ours" if lib == "ours" else LIBS[lib]["label"]
            msg = ((f"{r['ms_per_step']:.3f} ms/step" if r.get("ms_per_step") else "gradients")
                   if r.get("ok") else f"FAILED {str(r.get('error'))[:300]}")
            print(f"[{time.perf_counter() - t0:6.0f}s] N={N:<5d} T={T:<5d} {label:17s} "
                  f"{OURS_LABEL[algo]:9s} {msg} (wall {r['wall_s']:.0f} s)", flush=True)
            _save(out_dir, results, grads, meta)
        # gradients
        for (lib, algo, T), gp in gpaths.items():
            if (algo == "bptt" and lib == "ours") or algo == "fwd":
                continue
            g = dict(np.load(gp))
            row = {"N": N, "lib": lib, "algo": algo, "T": T}
            ref_b = gpaths.get(("ours", "bptt", T))
            ref_o = gpaths.get(("ours", BASE.get(algo, NATIVE_BASE.get(algo, algo)), T))
            if ref_b:
                row["vs_bptt"] = bench.grad_metrics(g, dict(np.load(ref_b)))
            if ref_o and (lib != "ours" or algo in BASE or algo in NATIVE_BASE):
                row["vs_ours"] = bench.grad_metrics(g, dict(np.load(ref_o)))
            grads.append(row)
        _save(out_dir, results, grads, meta)
    # compile_graph of 3-layer networks, every library
    comp = []
    if a.compile_layers:
        for lib in ["ours"] + a.libs:
            for cm in a.compile_models:
                for algo in [al for al in ("io", "param") if al in a.algos]:
                    cfg = {"lib": lib, "model": cm, "algo": algo, "N": a.compile_N, "B": B,
                           "T": 10, "layers": a.compile_layers, "seed": a.seed,
                           "decay": a.decay, "run": False, "build_warm": True, "repeats": 0}
                    r = bench.run_worker(cfg, python=pythons[lib], env=env, workdir=str(wd),
                                         timeout=a.timeout)
                    comp.append(r)
                    print(f"[compile] {lib} {cm} x{a.compile_layers} {OURS_LABEL[algo]}: "
                          + (f"{r.get('build_cold_s', 0):.2f} s cold, {r.get('build_s', 0):.2f} s warm"
                             if r.get("ok") else f"FAILED {str(r.get('error'))[:200]}"),
                          flush=True)
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(out_dir, results, grads, meta, comp)
    return {"results": results, "grads": grads, "compile": comp, "meta": meta}


ZOO_COMPARE = ("eprop", "eprop_k", "snap2", "ostl_bt", "ostl")
ZOO_LABEL = {"eprop": "e-prop", "eprop_k": "e-prop κ=0.9 (per state)",
             "eprop_kz": "e-prop κ=0.9 (at the output, the paper's)", "snap2": "SnAp-2",
             "ostl_bt": "OSTLRecurrent(recurrence_scope='diagonal')",
             "ostl_cpl": "OSTLRecurrent (recurrence_scope='coupled')", "ostl": "OSTL, full recurrent term",
             "ostl_ff": "OSTLFeedforward", "ostl_ffc": "OSTLFeedforward, online_gradients(chunk=16)", "ostl_ffd": "OSTLFeedforward(keep_dynamics=True)", "uoro": "UORO", "three_factor": "three-factor (m = 1)",
             "dni": "DNI", "dni_tr": "DNI(readout='trace')", "bptt": "BPTT"}
#: braintrace's same rule (``ostl``, the paper's full recurrent term, has none: braintrace's
#: OSTLRecurrent is its D-RTRL trace, compared with our alias ``ostl_bt``)
BT_LABEL = {"eprop": "EProp", "eprop_k": "EProp(kappa_filter_decay=0.9)", "snap2": "SnAp(n=2)",
            "ostl_bt": "OSTLRecurrent", "ostl_cpl": "OSTLRecurrent", "ostl_ff": "OSTLFeedforward",
            "uoro": "UORO(vjp_method='single-step')", "three_factor": "ThreeFactor(modulator=1.0)",
            "dni": "DNI + zero SyntheticGradient, 1-step windows"}


def run_zoo(a, pythons: dict, out_dir: Path, meta: dict) -> dict:
    """Ours and braintrace on the same rule, the same model, weights and inputs."""
    import numpy as np
    env = bench.worker_env("cpu")
    wd = Path(bench.scratch_dir(a, "external-zoo"))
    results, grads = [], []
    t0 = time.perf_counter()
    for model in a.zoo_models:
        for N in a.N:
            data = wd / f"data_{model}_N{N}_B{a.B}_T{a.T}.npz"
            write_data(data, model, N, a.B, a.T, a.seed)
            gp = {}
            jobs = [("ours", "bptt")] + [(lib, al) for al in a.zoo_algos
                                         for lib in ["ours"] + a.libs
                                         if lib == "ours" or al in BT_LABEL]
            for lib, algo in jobs:
                cfg = {"lib": lib, "model": model, "algo": algo, "N": N, "B": a.B, "T": a.T,
                       "seed": a.seed, "decay": a.decay, "repeats": a.repeats, "run": True,
                       "data": str(data), "grads_out": str(wd / f"g_{lib}_{algo}_{model}_{N}.npz"),
                       "mem_T": []}
                if bench.time_left(t0, a.budget_s) <= 0:
                    results.append({"config": cfg, "ok": False, "skipped": "time budget spent"})
                    continue
                r = bench.run_worker(cfg, python=pythons[lib], env=env, workdir=str(wd),
                                     timeout=a.timeout)
                results.append(r)
                if r.get("ok"):
                    gp[(lib, algo)] = cfg["grads_out"]
                msg = (f"{r['ms_per_step']:.3f} ms/step" if r.get("ok") and r.get("ms_per_step")
                       else f"FAILED {str(r.get('error'))[:300]}")
                print(f"[zoo {time.perf_counter() - t0:5.0f}s] {model} N={N} {lib:10s} "
                      f"{ZOO_LABEL[algo]:12s} {msg}", flush=True)
            ref = gp.get(("ours", "bptt"))
            for (lib, algo), path in gp.items():
                if algo == "bptt":
                    continue
                g = dict(np.load(path))
                row = {"model": model, "N": N, "lib": lib, "algo": algo, "T": a.T}
                if ref:
                    row["vs_bptt"] = bench.grad_metrics(g, dict(np.load(ref)))
                if lib != "ours" and ("ours", algo) in gp:
                    row["vs_ours"] = bench.grad_metrics(g, dict(np.load(gp[("ours", algo)])))
                grads.append(row)
            bench.dump_json(out_dir / "external_zoo.json",
                            {"meta": meta, "results": results, "grads": grads})
    meta["wall_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    d = {"meta": meta, "results": results, "grads": grads}
    bench.dump_json(out_dir / "external_zoo.json", d)
    return d


def zoo_markdown(d) -> str:
    res, grads, meta = d["results"], d["grads"], d["meta"]
    f = bench._fmt
    out = ["# The rule zoo side by side: brainscale (this repo) vs braintrace\n",
           bench.meta_markdown(meta)]
    for lib in meta.get("libs", []):
        v = meta.get("ext_versions", {}).get(lib)
        if v:
            out.append(f"- {LIBS[lib]['label']} environment: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    out.append(f"- models from tools/bench_models.py, B = {meta.get('B')}, T = {meta.get('T')} "
               f"steps per timed call, identical weights/inputs in both libraries; a short run "
               f"on a shared, loaded 2-core machine (times indicative)\n")
    out.append("## Time per step (ms) and gradient against BPTT over the T steps\n")
    out.append("cos = cosine similarity of the summed online gradient with BPTT's, smallest "
               "over the parameters; ‖Δ‖ = relative error. The last column compares braintrace's "
               "gradient with ours for the same rule.\n")
    rows = []
    for r in res:
        c = r["config"]
        if c["algo"] == "bptt":
            continue
        b = next((x for x in res if x["config"]["algo"] == "bptt" and x["config"]["N"] == c["N"]
                  and x["config"]["model"] == c["model"]), None)
        g = next((x for x in grads if (x["model"], x["N"], x["lib"], x["algo"]) ==
                  (c["model"], c["N"], c["lib"], c["algo"])), None)
        name = "ours " + ZOO_LABEL[c["algo"]] if c["lib"] == "ours" else \
            f"{LIBS[c['lib']]['label']} {BT_LABEL[c['algo']]}"
        if not r.get("ok"):
            rows.append([c["model"], c["N"], name, r.get("skipped") or "failed: "
                         + str(r.get("error"))[:80], "", "", "", ""])
            continue
        vb = (g or {}).get("vs_bptt") or {}
        vo = (g or {}).get("vs_ours") or {}
        rows.append([c["model"], c["N"], name, f(r.get("ms_per_step")),
                     f(b["ms_per_step"]) if b and b.get("ok") else "–",
                     f"{min(m['cos'] for m in vb.values()):.4f}" if vb else "–",
                     f"{max(m['rel'] for m in vb.values()):.3g}" if vb else "–",
                     f"{min(m['cos'] for m in vo.values()):.4f}" if vo else "–"])
    out.append(bench.md_table(["model", "N", "library / rule", "ms / step", "BPTT ms / step",
                               "cos vs BPTT", "‖Δ‖ vs BPTT", "cos vs ours"], rows))
    return "\n".join(out) + "\n"


def _save(out_dir, results, grads, meta, comp=None):
    p = out_dir / "external.json"
    old = {}
    if comp is None and p.exists():
        try:
            old = json.load(open(p))
        except ValueError:
            old = {}
    bench.dump_json(p, {"meta": meta, "results": results, "grads": grads,
                        "compile": comp if comp is not None else old.get("compile", [])})


# ---------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------

def _r(results, lib, algo, N, timed=True, fastest=False):
    """The round-0 result (memory, gradients) or, with ``fastest``, the round with the
    smallest median time per step (time tables)."""
    got = [r for r in results
           if r.get("config", {}).get("lib") == lib and r["config"].get("algo") == algo
           and r["config"].get("N") == N and (r.get("timed", True) or not timed)]
    if not got:
        return None
    if fastest:
        ok = [r for r in got if r.get("ok") and r.get("ms_per_step")]
        if ok:
            return min(ok, key=lambda r: r["ms_per_step"])
    return got[0]


def _ms(r):
    return r["ms_per_step"] if (r and r.get("ok") and r.get("ms_per_step")) else None


def _col(lib, algo, chunk=None):
    if lib == "ours" and algo in BASE and chunk:
        return f"ours {OURS_LABEL[BASE[algo]]} chunk={chunk}"
    return f"ours {OURS_LABEL[algo]}" if lib == "ours" else \
        f"{LIBS[lib]['label']} {LIBS[lib]['algos'][algo]}"


def floor_markdown(res, Ns, libs, algos, chunked, chunk, natives=()) -> str:
    """Every online column as a multiple of the floor (forward + one instantaneous VJP per
    step, no traces), and the trace work alone (online - floor)."""
    f = bench._fmt
    online = [("ours", al) for al in algos] + [("ours", al) for al in chunked] + \
             [(lib, al) for lib in libs for al in algos]
    online[len(algos):len(algos)] = [("ours", al) for al in natives]
    out = ["\n## Against the floor\n",
           "`forward`: the model's step alone (`for_loop` of the loss). `floor`: the forward "
           "step plus one instantaneous VJP per step (the gradient of this step's loss w.r.t. "
           "the weights with the hidden states held constant, accumulated; no traces): what "
           "every online rule must do. Each online column: time / floor, and in brackets the "
           "trace work alone, time − floor (ms per step).\n"]
    rows = []
    for N in Ns:
        fw = _ms(_r(res, "ours", "fwd", N, fastest=True))
        fl = _ms(_r(res, "ours", "floor", N, fastest=True))
        row = [N, f(fw), f(fl)]
        for lib, al in online:
            o = _ms(_r(res, lib, al, N, fastest=True))
            row.append(f"{f(o / fl, 2)} ({f(o - fl)})" if (o and fl) else "–")
        rows.append(row)
    out.append(bench.md_table(["N", "forward ms", "floor ms"] +
                              [_col(lib, al, chunk) + " / floor" for lib, al in online], rows))
    return "\n".join(out)


def markdown(d) -> str:
    res, grads, comp, meta = d["results"], d["grads"], d.get("compile", []), d["meta"]
    libs = meta.get("libs", list(LIBS))
    Ns = sorted({r["config"]["N"] for r in res})
    f = bench._fmt
    out = [f"# Side by side: brainscale (this repo) vs published brainscale 0.1.0 and braintrace\n",
           bench.meta_markdown(meta)]
    for lib in libs:
        v = meta.get("ext_versions", {}).get(lib)
        if v:
            out.append(f"- {LIBS[lib]['label']} environment: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    out.append(f"- model: {meta.get('model')} (tools/bench_models.py), B = {meta.get('B')}, "
               f"{bm.N_IN} inputs, {bm.N_OUT} outputs, float32, identical weights/inputs in every "
               f"library (exchanged as .npz)\n")
    # time
    algos = [al for al in ("io", "param")
             if any(r["config"]["algo"] == al for r in res)]
    chunked = [CHUNKED[al] for al in algos
               if any(r["config"]["algo"] == CHUNKED[al] for r in res)]
    chunk = next((r["config"].get("chunk") for r in res if r["config"]["algo"] in BASE), None)
    floor = [al for al in ("fwd", "floor") if any(r["config"]["algo"] == al for r in res)]
    natives = [NATIVE[al] for al in algos if al in NATIVE
               and any(r["config"]["algo"] == NATIVE[al] for r in res)]
    cols = [("ours", "bptt")] + [("ours", al) for al in floor + algos + natives] + \
           [("ours", al) for al in chunked] + \
           [(lib, algo) for lib in libs for algo in algos]
    out.append("## Time per step (ms)\n")
    out.append("Median of repeats after a warm-up call, divided by T; with several rounds "
               f"({meta.get('rounds', 1)} here, each a fresh process, interleaved across "
               "libraries) the fastest round's median. T (in brackets) is the same for every "
               "library at a given N and algorithm; D-RTRL runs fewer steps at large N (its cost "
               "per step does not depend on T).\n")
    rows = []
    for N in Ns:
        row = [N]
        for lib, algo in cols:
            r = _r(res, lib, algo, N, fastest=True)
            ms = _ms(r)
            row.append(f"{f(ms)} ({r['config']['T']})" if ms else
                       ("skipped" if r and r.get("skipped") else "failed" if r else "–"))
        rows.append(row)
    out.append(bench.md_table(["N"] + ["BPTT" if a == "bptt" else _col(l, a, chunk)
                                       for l, a in cols], rows))
    if "io_chunk" in chunked:
        out.append(f"\n`ES-D-RTRL chunk={chunk}`: the same ES-D-RTRL gradients summed with "
                   f"`online_gradients(..., chunk={chunk})` (one (K·B)-row product per window "
                   f"instead of a rank-B update of the gradient every step; same sum up to "
                   f"float rounding, see the gradients table). The per-step column is what an "
                   f"update applied every step costs.\n")
    if "param_chunk" in chunked:
        out.append(f"\n`D-RTRL chunk={chunk}`: the same D-RTRL gradients summed with "
                   f"`online_gradients(..., chunk={chunk})`: the traces are advanced and read "
                   f"once per window of {chunk} steps (the window's J, df, δ and x enter through "
                   f"(K·B)-row products), the same sum up to float rounding.\n")
    # speedups
    out.append("\n**Speed-ups of ours** (other library's time / ours; > 1 means ours is faster), "
               "and ours / BPTT:\n")
    ours_cols = [("io", "io")] + [("io_native", "io")] * ("io_native" in natives) + \
        [("io_chunk", "io")] * ("io_chunk" in chunked) + \
        [("param", "param")] + [("param_chunk", "param")] * ("param_chunk" in chunked)
    ours_cols = [(o, e) for o, e in ours_cols if e in algos]
    hdr = ["N"]
    for o, e in ours_cols:
        name = _col("ours", o, chunk)[5:]
        hdr += [f"{name} / BPTT"] + [f"{name} vs {_col(l, e)}" for l in libs]
    rows = []
    for N in Ns:
        b = _ms(_r(res, "ours", "bptt", N, fastest=True))
        row = [N]
        for o_algo, e_algo in ours_cols:
            o = _ms(_r(res, "ours", o_algo, N, fastest=True))
            row.append(f(o / b, 2) if (o and b) else "–")
            for lib in libs:
                e = _ms(_r(res, lib, e_algo, N, fastest=True))
                row.append(f(e / o, 2) if (o and e) else "–")
        rows.append(row)
    out.append(bench.md_table(hdr, rows))
    if "floor" in floor:
        out.append(floor_markdown(res, Ns, libs, algos, chunked, chunk, natives))
    # memory
    Ts = sorted({int(t) for r in res if r.get("ok") and r["config"]["algo"] == "bptt"
                 and r.get("timed", True) for t in (r.get("memory_by_T") or {})})
    out.append("\n## Memory\n")
    out.append("XLA temp memory (MB, `memory_analysis().temp_size_in_bytes` of the whole T-step "
               "gradient function) by T, and the peak RSS of the process that ran it (MB).\n")
    rows = []
    for N in Ns:
        for lib, algo in cols:
            r = _r(res, lib, algo, N)
            if not r or not r.get("ok"):
                continue
            rows.append([N, "BPTT" if algo == "bptt" else _col(lib, algo, chunk)] +
                        [f(bench.temp_mb(r, T)) for T in Ts] + [f(r.get("rss_peak_mb"))])
    out.append(bench.md_table(["N", "algorithm"] + [f"temp T={T}" for T in Ts] + ["peak RSS"],
                              rows))
    # D-RTRL vs bandwidth
    out.append("\n## D-RTRL against the copy bandwidth\n")
    out.append("ns/elem = time per step / trace elements; bound = reading and writing the trace "
               "once at the copy bandwidth measured in the same process; ratio = time / bound.\n")
    rows = []
    for N in Ns:
        for lib, al in [("ours", "param")] + [("ours", "param_chunk")] * (
                "param_chunk" in chunked) + [(lib, "param") for lib in libs]:
            dr = bench.drtrl_row(_r(res, lib, al, N, fastest=True))
            if dr:
                e, ms, ns, bound, ratio, bw = dr
                rows.append([N, _col(lib, al, chunk), f"{e:,}", f(ms), f(ns), f(bound),
                             f(ratio, 2)])
    out.append(bench.md_table(["N", "library", "trace elements", "ms/step", "ns/elem/step",
                               "bound ms", "ratio"], rows))
    # gradients
    out.append("\n## Gradients\n")
    out.append("Per parameter: **cosine** / relative error against BPTT of the same window (T "
               "steps from the same state) and against ours with the same algorithm. "
               "Rows `BPTT` check that every library builds the same model.\n")
    rows = []
    for g in grads:
        name = "BPTT (" + (LIBS[g["lib"]]["label"] if g["lib"] != "ours" else "ours") + ")" \
            if g["algo"] == "bptt" else _col(g["lib"], g["algo"], chunk)
        for k in sorted((g.get("vs_bptt") or g.get("vs_ours") or {})):
            vb = (g.get("vs_bptt") or {}).get(k)
            vo = (g.get("vs_ours") or {}).get(k)
            rows.append([g["N"], g["T"], name, k,
                         f"**{vb['cos']:.4f}** / {vb['rel']:.3g} / {f(vb['norm_ratio'], 3)}" if vb else "–",
                         f"**{vo['cos']:.5f}** / {vo['rel']:.3g}" if vo else "–"])
    out.append(bench.md_table(["N", "T", "algorithm", "parameter",
                               "vs BPTT: cos / rel / norm ratio", "vs ours: cos / rel"], rows))
    # compile
    if comp:
        out.append("\n## compile_graph of 3-layer networks (s)\n")
        out.append("Cold = first call in a fresh process; warm = a second call on an identical "
                   "new network.\n")
        rows = []
        for r in comp:
            c = r["config"]
            rows.append([c["model"], c["layers"], c["N"], _col(c["lib"], c["algo"]),
                         f(r.get("build_cold_s")) if r.get("ok") else "failed",
                         f(r.get("build_s")) if r.get("ok") else str(r.get("error"))[:80]])
        out.append(bench.md_table(["model", "layers", "N", "library / algorithm", "cold",
                                   "warm"], rows))
    # all rounds
    if meta.get("rounds", 1) > 1:
        out.append("\n## Every round (ms per step, median of each round's repeats)\n")
        rows = []
        for N in Ns:
            for lib, algo in cols:
                rs = [r for r in res if r["config"]["lib"] == lib and r["config"]["algo"] == algo
                      and r["config"]["N"] == N and r.get("timed", True)]
                if rs:
                    rows.append([N, "BPTT" if algo == "bptt" else _col(lib, algo, chunk)] +
                                [", ".join(f(_ms(r)) for r in rs)])
        out.append(bench.md_table(["N", "algorithm", "rounds"], rows))
    bad = [r for r in res if not r.get("ok")]
    if bad:
        out.append("\n## Skipped or failed\n")
        for r in bad:
            c = r["config"]
            out.append(f"- {c['lib']} {c['algo']} N={c['N']} T={c['T']}: "
                       f"{r.get('skipped') or r.get('error')}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    p.add_argument("--venvs", default=os.environ.get("BENCH_VENVS", str(ROOT / ".bench_venvs")),
                   help="where the external virtual environments live (git-ignored)")
    p.add_argument("--libs", type=bench._strs, default=list(LIBS))
    p.add_argument("--ext-jax", choices=["same", "native"], default="same")
    p.add_argument("--python311", default=None)
    p.add_argument("--python312", default=None)
    p.add_argument("--model", default="lif", choices=bm.MODELS)
    p.add_argument("--algos", type=bench._strs, default=["io", "param"],
                   help="online algorithms to compare (io = ES-D-RTRL, param = D-RTRL)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the forward and floor rows (forward + one VJP per step)")
    p.add_argument("--native", action="store_true",
                   help="also time ours ES-D-RTRL with backend='native' (the per-step gradient "
                        "on the kernel's outer-accumulate)")
    p.add_argument("--chunk", type=int, default=16,
                   help="also time ours ES-D-RTRL with online_gradients(chunk=K); 1 = no")
    p.add_argument("--N", type=bench._ints, default=[128, 512, 1024])
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--mem-T", type=bench._ints, default=[100, 1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="time every configuration this many times (fresh processes, "
                        "interleaved); tables use the fastest round")
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--call-s", type=float, default=25.0,
                   help="target seconds of one D-RTRL call of the slowest library (picks T)")
    p.add_argument("--compile-layers", type=int, default=3, help="0 skips the compile table")
    p.add_argument("--compile-models", type=bench._strs, default=list(bm.MODELS))
    p.add_argument("--compile-N", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=3600)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--setup-only", action="store_true")
    p.add_argument("--report", action="store_true", help="only rebuild external.md")
    p.add_argument("--zoo", action="store_true",
                   help="compare the zoo rules braintrace also has (see the module docstring)")
    p.add_argument("--zoo-algos", type=bench._strs, default=list(ZOO_COMPARE))
    p.add_argument("--zoo-models", type=bench._strs, default=list(bm.MODELS))
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.report:
        d = json.load(open(out_dir / "external.json"))
        (out_dir / "external.md").write_text(bench.sanitize(markdown(d)))
        print((out_dir / "external.md").read_text())
        return 0
    venv_root = Path(a.venvs)
    pythons = {"ours": sys.executable}
    ext_versions = {}
    for lib in a.libs:
        pythons[lib] = ensure_venv(lib, venv_root, a.ext_jax,
                                   a.python311 if LIBS[lib]["python"] == "3.11" else a.python312)
        code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                f"['{LIBS[lib]['pkg']}', 'jax', 'jaxlib', 'brainstate', 'braintools', 'brainunit']}}))")
        o = subprocess.run([pythons[lib], "-c", code], capture_output=True, text=True,
                           cwd=tempfile.gettempdir())
        try:
            ext_versions[lib] = json.loads(o.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            ext_versions[lib] = {"error": o.stderr[-300:]}
        ext_versions[lib]["python"] = LIBS[lib]["python"]
        print(f"[venv] {lib}: {ext_versions[lib]}", flush=True)
    if a.setup_only:
        return 0
    import importlib.metadata as md
    rel = os.path.relpath(sys.argv[0], ROOT) if argv is None else "tools/bench_external.py"
    meta = {"command": "python " + " ".join([rel] + (sys.argv[1:] if argv is None else list(argv))),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": bench.detect_device(env=bench.worker_env("cpu")),
            "machine": bench.machine_info(), "libs": a.libs, "model": a.model, "B": a.B,
            "ext_jax": a.ext_jax, "ext_versions": ext_versions, "rounds": a.rounds,
            "git": bench.git_rev(),
            "versions": {p: md.version(p) for p in ("brainscale", "jax", "brainstate")}}
    if a.zoo:
        meta["T"] = a.T
        d = run_zoo(a, pythons, out_dir, meta)
        (out_dir / "external_zoo.md").write_text(bench.sanitize(zoo_markdown(d)))
        print(f"\nwrote {out_dir / 'external_zoo.md'} and external_zoo.json")
        return 0
    d = run_compare(a, pythons, out_dir, meta)
    text = bench.sanitize(markdown(d))
    (out_dir / "external.md").write_text(text)
    print(f"\nwrote {out_dir / 'external.md'} and external.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
