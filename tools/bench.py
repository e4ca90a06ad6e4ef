#!/usr/bin/env python
"""Benchmark brainscale's online algorithms against BPTT.

Subcommands (every measured configuration runs in a fresh process,
``tools/bench_ext/worker.py``):

* ``sweep``    -- for the recurrent LIF, adaptive LIF and GRU nets of
  ``tools/bench_models.py``, sweep hidden size N, sequence length T and batch B, and measure
  ES-D-RTRL (``io``), D-RTRL (``param``), ``hybrid`` and ``bptt``: time per step (median of
  repeats after a warm-up call, divided by T), XLA memory analysis at several T, process
  peak RSS (and device peak on GPU), compile times (``compile_graph`` before XLA, tracing,
  XLA), the eligibility-trace size, and the machine's copy bandwidth (D-RTRL's bound).
  Prints the online/BPTT ratios; writes ``results.json`` and ``results.md``.
* ``compile``  -- ``compile_graph`` time (cold and warm) of 3-layer networks.
* ``fidelity`` -- per parameter, cosine similarity / relative error / norm ratio of the
  online gradients against BPTT over finite windows, for several N and decays.
* ``zoo``      -- every rule of ``brainscale.zoo`` (exact RTRL, SnAp-1/2, UORO, e-prop with
  symmetric / random feedback / κ filter, OSTL with and without the recurrent term,
  three-factor, DNI) next to BPTT, ES-D-RTRL and D-RTRL on small nets: time per step, XLA
  temp memory by T, trace bytes, and gradient cosine vs BPTT over finite windows; writes
  ``zoo.json``, ``zoo_fidelity.json`` and ``zoo.md``.
* ``report``   -- rebuild ``results.md`` from the ``results.json`` files of a directory.
* ``all``      -- sweep + compile + fidelity into one directory.

The side-by-side comparison with the published ``brainscale`` 0.1.0 and ``braintrace`` 0.2.x
packages is ``tools/bench_external.py``.

Examples::

    python tools/bench.py all --out benchmarks/results/cpu           # the committed CPU tables
    python tools/bench.py sweep --quick --out outputs/bench-quick               # seconds
    python tools/bench.py sweep --models lif --N 256,1024 --T 1000 --mem-T 100,1000
    python tools/bench.py all --out benchmarks/results/gpu-h100        # on a GPU machine
    python tools/bench.py zoo --out benchmarks/results/cpu             # the rule zoo, small N
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "bench_ext" / "worker.py"
sys.path.insert(0, str(HERE))

import bench_models as bm  # noqa: E402

ALGO_NAMES = {"bptt": "BPTT", "io": "ES-D-RTRL", "param": "D-RTRL", "hybrid": "hybrid",
              "rtrl": "RTRL (exact)", "snap1": "SnAp-1", "snap2": "SnAp-2", "uoro": "UORO",
              "eprop": "e-prop", "eprop_rf": "e-prop (random B)", "eprop_k": "e-prop (κ=0.9)",
              "ostl": "OSTL", "ostl_ff": "OSTL (no rec. term)", "three_factor": "three-factor",
              "dni": "DNI"}
ZOO_DEFAULT = ["bptt", "io", "param", "rtrl", "snap1", "snap2", "uoro", "eprop", "eprop_rf",
               "eprop_k", "ostl", "ostl_ff", "three_factor", "dni"]
DEFAULT_N = {"cpu": [128, 512, 1024, 2048], "gpu": [128, 512, 1024, 2048, 4096, 8192]}
NICE_T = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


# ---------------------------------------------------------------------------------------
# machine / processes
# ---------------------------------------------------------------------------------------

def detect_device(python: str = sys.executable, env=None) -> dict:
    """Platform and device kind JAX sees, asked in a fresh process."""
    code = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'platform': d.platform, "
            "'kind': getattr(d, 'device_kind', ''), 'count': jax.device_count()}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300,
                             env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        return {"platform": "cpu", "kind": "?", "count": 0, "error": repr(e)}


def machine_info() -> dict:
    info = {"host_python": platform.python_version(), "machine": platform.machine(),
            "system": f"{platform.system()} {platform.release()}", "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def git_rev() -> str:
    """``<short commit>`` of the checkout, ``+dirty`` when brainscale/ has local changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "brainscale"],
                               capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
        return (rev or "?") + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def worker_env(platform_: str | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # device peak = what is used
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if platform_:
        env["JAX_PLATFORMS"] = platform_
    return env


def run_worker(cfg: dict, python: str = sys.executable, timeout: float = 900, env=None,
               workdir: str | None = None) -> dict:
    """Run one configuration in a fresh process; return its result dict (never raises)."""
    d = workdir or tempfile.mkdtemp(prefix="bench_")
    os.makedirs(d, exist_ok=True)
    tag = f"{cfg.get('lib','ours')}_{cfg.get('model','-')}_{cfg.get('algo','-')}_" \
          f"N{cfg.get('N','-')}_T{cfg.get('T','-')}_{time.time_ns()}"
    cfg = dict(cfg)
    cfg.setdefault("out", os.path.join(d, tag + ".result.json"))
    cpath = os.path.join(d, tag + ".config.json")
    with open(cpath, "w") as f:
        json.dump(cfg, f)
    t0 = time.perf_counter()
    try:
        # cwd = the scratch dir, so that no checkout's packages shadow the environment's
        p = subprocess.run([python, str(WORKER), cpath], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=d)
        rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", f"killed after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    try:
        with open(cfg["out"]) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"config": cfg, "ok": False, "error": f"worker exited {rc}", "log": tail}
    res["wall_s"] = wall
    if not res.get("ok") and "log" not in res:
        res["log"] = tail
    return res


# ---------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------

def est_param_trace_elems(model: str, N: int, B: int, layers: int = 1) -> int:
    """Elements of D-RTRL's per-example trace (what it reads and writes every step)."""
    n_in = bm.N_IN
    e = 0
    for l in range(layers):
        ni = n_in if l == 0 else N
        if model == "lif":
            e += (ni + N) * N + N
        elif model == "alif":
            e += 2 * ((ni + N) * N + N)
        else:
            e += 2 * ((ni + N) * N + N) + (ni * N + N) + N * N
    e += N * bm.N_OUT + bm.N_OUT
    return B * e


def scratch_dir(a, kind: str) -> str:
    """Per-run scratch files (configs, raw results, .npz): ``--work`` or a temp dir."""
    base = getattr(a, "work", None) or os.path.join(tempfile.gettempdir(), "brainscale-bench")
    d = os.path.join(base, f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    return d


def time_left(t0: float, budget_s: float) -> float:
    return budget_s - (time.perf_counter() - t0)


def nice_T(t: float, lo: int, hi: int) -> int:
    cands = [x for x in NICE_T if lo <= x <= hi and x <= t]
    return max(cands) if cands else lo


def plan_sweep(a, dev: dict) -> list:
    """The list of worker configs, in priority order (LIF first)."""
    gpu = dev.get("platform") not in (None, "cpu")
    ns = a.N or DEFAULT_N["gpu" if gpu else "cpu"]
    ns_per_elem = 0.05 if gpu else 2.0     # rough D-RTRL cost, only to pick T
    jobs = []
    for prio, model in enumerate(a.models):
        for N in ns:
            for B in a.B:
                for algo in a.algos:
                    T = a.T
                    repeats = a.repeats
                    skip = None
                    if algo == "param":
                        elems = est_param_trace_elems(model, N, B)
                        mb = elems * 4 / 2 ** 20
                        if mb > a.param_max_mb:
                            skip = (f"D-RTRL trace {mb:.0f} MB > --param-max-mb {a.param_max_mb:.0f}"
                                    f" (B·|θ| = {elems:,} elements)")
                        T = nice_T(a.call_s / (elems * ns_per_elem * 1e-9), min(a.T, 20), a.T)
                    if N >= 1024 and not gpu:
                        repeats = min(repeats, 3)
                    jobs.append({
                        "lib": "ours", "model": model, "algo": algo, "N": N, "B": B, "T": T,
                        "layers": 1, "seed": a.seed, "decay": a.decay, "repeats": repeats,
                        "run": True, "mem_T": sorted(set(a.mem_T) | {T}),
                        "bandwidth": algo == "param", "skip": skip,
                        # LIF first (the targets), the largest N of the others last; the
                        # algorithms of one (model, N) run back to back, so that load from
                        # other users of a shared machine hits them alike
                        "_prio": (0 if model == "lif" else 1 if N <= 1024 else 2, prio, N)})
    jobs.sort(key=lambda j: j["_prio"])
    return jobs


# ---------------------------------------------------------------------------------------
# helpers for tables
# ---------------------------------------------------------------------------------------

def _mb(x):
    return None if x is None else x / 2 ** 20


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.{nd}g}"


def _get(results, **kw):
    for r in results:
        c = r.get("config", {})
        if all(c.get(k) == v for k, v in kw.items()):
            return r
    return None


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def temp_mb(r, T):
    if not r:
        return None
    m = (r.get("memory_by_T") or {}).get(str(T)) or {}
    return _mb(m.get("temp"))


def bw_of(r, fallback=None):
    b = (r or {}).get("bandwidth") or fallback
    return b


def drtrl_row(r, bw_fallback=None):
    """(elems, ms/step, ns/elem/step, bound ms, ratio) of a D-RTRL result."""
    if not r or not r.get("ok") or r.get("ms_per_step") is None:
        return None
    e = r.get("trace_elems") or 0
    b = bw_of(r, bw_fallback)
    ms = r["ms_per_step"]
    ns = ms * 1e6 / e if e else None
    bound = e * b["ns_per_elem_rw"] * 1e-6 if (b and e) else None
    return e, ms, ns, bound, (ms / bound if bound else None), b


# ---------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------

def sweep_markdown(results, meta) -> str:
    ok = [r for r in results if r.get("ok")]
    lines = []
    models = sorted({r["config"]["model"] for r in results},
                    key=lambda m: bm.MODELS.index(m) if m in bm.MODELS else 9)
    Bs = sorted({r["config"]["B"] for r in results})
    algos = [a for a in ("bptt", "io", "param", "hybrid")
             if any(r["config"]["algo"] == a for r in results)]
    bw0 = meta.get("bandwidth")
    # time per step
    lines.append("### Time per step (ms), median of repeats after warm-up\n")
    lines.append("T = the sequence length of the timed run (D-RTRL uses a shorter T at large N: "
                 "its cost per step does not depend on T). Ratios are online / BPTT.\n")
    hdr = ["model", "N", "B"] + [f"{ALGO_NAMES[a]}" for a in algos] + \
          [f"{ALGO_NAMES[a]}/BPTT" for a in algos if a != "bptt"]
    rows = []
    for model in models:
        Ns = sorted({r["config"]["N"] for r in results if r["config"]["model"] == model})
        for N in Ns:
            for B in Bs:
                rr = {a: _get(results, model=model, N=N, B=B, algo=a) for a in algos}
                if not any(rr.values()):
                    continue
                cells, base = [], None
                for a in algos:
                    r = rr[a]
                    if r is None:
                        cells.append("–")
                    elif r.get("ok") and r.get("ms_per_step") is not None:
                        cells.append(f"{_fmt(r['ms_per_step'])} (T={r['config']['T']})")
                        if a == "bptt":
                            base = r["ms_per_step"]
                    else:
                        cells.append("skipped" if r.get("skipped") else "failed")
                for a in algos:
                    if a == "bptt":
                        continue
                    r = rr[a]
                    v = (r["ms_per_step"] / base) if (r and r.get("ok") and base
                                                      and r.get("ms_per_step")) else None
                    cells.append(_fmt(v, 2) if v is not None else "–")
                rows.append([model, N, B] + cells)
    lines.append(md_table(hdr, rows))
    # memory
    # the T of the memory analysis (those every BPTT row has), not D-RTRL's shorter timed T
    Ts = sorted({int(t) for r in ok if r["config"]["algo"] == "bptt"
                 for t in (r.get("memory_by_T") or {})}) or \
        sorted({int(t) for r in ok for t in (r.get("memory_by_T") or {})})
    lines.append("\n### XLA temp memory (MB) by sequence length T, and process peak RSS\n")
    lines.append("`compiled.memory_analysis().temp_size_in_bytes` of the whole T-step gradient "
                 "function (compile only for the T that were not run); RSS = `ru_maxrss` of the "
                 "fresh process that ran it (imports + XLA + buffers).\n")
    gpu = any(r.get("device_peak_mb") for r in ok)
    hdr = ["model", "N", "B", "algorithm"] + [f"temp T={T}" for T in Ts] + \
          ["args+out (MB)", "peak RSS (MB)"] + (["device peak (MB)"] if gpu else [])
    rows = []
    for model in models:
        for N in sorted({r["config"]["N"] for r in results if r["config"]["model"] == model}):
            for B in Bs:
                for a in algos:
                    r = _get(results, model=model, N=N, B=B, algo=a)
                    if not r or not r.get("ok"):
                        continue
                    m = r.get("memory") or {}
                    ao = _mb((m.get("argument") or 0) + (m.get("output") or 0))
                    row = [model, N, B, ALGO_NAMES[a]] + [_fmt(temp_mb(r, T)) for T in Ts] + \
                          [_fmt(ao), _fmt(r.get("rss_peak_mb"))]
                    if gpu:
                        row.append(_fmt(r.get("device_peak_mb")))
                    rows.append(row)
    lines.append(md_table(hdr, rows))
    # compile times
    lines.append("\n### Compile times (s)\n")
    lines.append("`compile_graph` = brainscale's analysis and code generation before XLA; "
                 "trace = tracing the T-step gradient function; XLA = `lower().compile()`.\n")
    hdr = ["model", "N", "algorithm", "compile_graph", "trace", "XLA"]
    rows = []
    for model in models:
        for N in sorted({r["config"]["N"] for r in ok if r["config"]["model"] == model}):
            for a in algos:
                r = _get(ok, model=model, N=N, B=Bs[0], algo=a)
                if r:
                    rows.append([model, N, ALGO_NAMES[a], _fmt(r.get("build_s")),
                                 _fmt(r.get("trace_s")), _fmt(r.get("xla_s"))])
    lines.append(md_table(hdr, rows))
    # D-RTRL vs bandwidth
    if "param" in algos:
        lines.append("\n### D-RTRL against the copy bandwidth\n")
        lines.append("bound = time to read and write the whole trace once at the copy bandwidth "
                     "measured in the same process (`fori_loop` of `x = x * s` on 256 MB, buffers "
                     "reused); ratio = time per step / bound (target ≤ 2). ns/elem = time per "
                     "step / trace elements.\n")
        hdr = ["model", "N", "B", "trace elems (MB)", "ms/step", "ns/elem/step",
               "copy GB/s (r+w)", "bound ms", "ratio"]
        rows = []
        for model in models:
            for N in sorted({r["config"]["N"] for r in results if r["config"]["model"] == model}):
                for B in Bs:
                    d = drtrl_row(_get(results, model=model, N=N, B=B, algo="param"), bw0)
                    if d is None:
                        continue
                    e, ms, ns, bound, ratio, b = d
                    rows.append([model, N, B, f"{e:,} ({e * 4 / 2 ** 20:.0f})", _fmt(ms),
                                 _fmt(ns), _fmt(b["rw_GBps"] if b else None), _fmt(bound),
                                 _fmt(ratio, 2)])
        lines.append(md_table(hdr, rows))
    bad = [r for r in results if not r.get("ok")]
    if bad:
        lines.append("\n### Skipped or failed configurations\n")
        for r in bad:
            c = r["config"]
            why = r.get("skipped") or r.get("error") or "?"
            lines.append(f"- {c['model']} N={c['N']} B={c['B']} {ALGO_NAMES[c['algo']]} T={c['T']}: {why}")
    return "\n".join(lines)


def print_ratios(results, out=sys.stdout):
    for r in results:
        c = r["config"]
        if c["algo"] == "bptt" or not r.get("ok") or r.get("ms_per_step") is None:
            continue
        b = _get(results, model=c["model"], N=c["N"], B=c["B"], algo="bptt")
        if not b or not b.get("ok") or not b.get("ms_per_step"):
            continue
        common = set(r.get("memory_by_T") or {}) & set(b.get("memory_by_T") or {})
        Tm = "1000" if "1000" in common else (str(c["T"]) if str(c["T"]) in common else None)
        mr = None
        if Tm:
            mo, mb_ = temp_mb(r, Tm), temp_mb(b, Tm)
            mr = mo / mb_ if (mo is not None and mb_) else None
        print(f"  {c['model']:4s} N={c['N']:<5d} B={c['B']:<3d} {ALGO_NAMES[c['algo']]:9s}/BPTT: "
              f"time {r['ms_per_step'] / b['ms_per_step']:.2f}x"
              + (f", XLA temp {mr:.3f}x (T={Tm})" if mr is not None else ""), file=out)


def cmd_sweep(a, out_dir: Path, dev: dict, meta: dict) -> list:
    jobs = plan_sweep(a, dev)
    env = worker_env(a.platform)
    wd = scratch_dir(a, "sweep")
    t_start = time.perf_counter()
    print(f"[sweep] {len(jobs)} configurations on {dev.get('platform')} "
          f"({dev.get('kind')}); budget {a.budget_s:.0f} s", flush=True)
    if a.dry_run:
        for j in jobs:
            print("  ", {k: j[k] for k in ("model", "algo", "N", "B", "T", "repeats", "skip")})
        return []
    bw = run_worker({"bandwidth_only": True, "bytes": (1024 if dev.get("platform") != "cpu"
                                                       else 256) * 2 ** 20},
                    env=env, workdir=str(wd), timeout=300)
    meta["bandwidth"] = bw.get("bandwidth")
    if meta["bandwidth"]:
        print(f"[sweep] copy bandwidth: {meta['bandwidth']['rw_GBps']:.1f} GB/s read+write "
              f"(steady state), {meta['bandwidth']['oneshot']['rw_GBps']:.1f} GB/s one-shot",
              flush=True)
    results = []
    for j in jobs:
        cfg = {k: v for k, v in j.items() if not k.startswith("_") and k != "skip"}
        el = time.perf_counter() - t_start
        if j["skip"] or el > a.budget_s:
            why = j["skip"] or f"time budget ({a.budget_s:.0f} s) spent"
            results.append({"config": cfg, "ok": False, "skipped": why})
            print(f"[skip] {cfg['model']} N={cfg['N']} {cfg['algo']}: {why}", flush=True)
            continue
        r = run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
        results.append(r)
        msg = ((f"{r['ms_per_step']:.3f} ms/step" if r.get("ms_per_step") else "done")
               if r.get("ok") else f"FAILED {str(r.get('error', ''))[:200]}")
        print(f"[{time.perf_counter() - t_start:6.0f}s] {cfg['model']:4s} N={cfg['N']:<5d} "
              f"B={cfg['B']:<3d} T={cfg['T']:<5d} {ALGO_NAMES[cfg['algo']]:9s} {msg} "
              f"(wall {r['wall_s']:.0f} s)", flush=True)
        _save(out_dir, "sweep", results, meta)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["sweep_wall_s"] = time.perf_counter() - t_start
    _save(out_dir, "sweep", results, meta)
    print("[sweep] online / BPTT ratios:")
    print_ratios(results)
    return results


# ---------------------------------------------------------------------------------------
# compile-time table (3-layer networks)
# ---------------------------------------------------------------------------------------

def cmd_compile(a, out_dir: Path, dev: dict, meta: dict) -> list:
    env = worker_env(a.platform)
    wd = scratch_dir(a, "compile")
    results = []
    for model in a.models:
        for algo in [x for x in a.algos if x != "bptt"]:
            cfg = {"lib": "ours", "model": model, "algo": algo, "N": a.compile_N, "B": a.B[0],
                   "T": 10, "layers": a.layers, "seed": a.seed, "decay": a.decay,
                   "run": False, "build_warm": True, "repeats": 0}
            r = run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
            results.append(r)
            print(f"[compile] {model} x{a.layers} layers N={a.compile_N} {ALGO_NAMES[algo]}: "
                  + (f"compile_graph {r.get('build_cold_s', 0):.2f} s cold, "
                     f"{r.get('build_s', 0):.2f} s warm" if r.get("ok")
                     else f"FAILED {r.get('error')}"), flush=True)
    _save(out_dir, "compile", results, meta)
    return results


def compile_markdown(results, target=1.0) -> str:
    hdr = ["model", "layers", "N", "B", "algorithm", "compile_graph cold (s)",
           "compile_graph warm (s)", f"< {target:g} s", "XLA (s, T-step gradient)"]
    rows = []
    for r in results:
        c = r["config"]
        if not r.get("ok"):
            rows.append([c["model"], c["layers"], c["N"], c["B"], ALGO_NAMES[c["algo"]],
                         "failed", "", "", ""])
            continue
        cold, warm = r.get("build_cold_s"), r.get("build_s")
        rows.append([c["model"], c["layers"], c["N"], c["B"], ALGO_NAMES[c["algo"]],
                     _fmt(cold), _fmt(warm), "yes" if (cold or 9) < target else
                     ("warm only" if (warm or 9) < target else "NO"), _fmt(r.get("xla_s"))])
    return ("`compile_graph` in a fresh process: *cold* is the first call (it pays the "
            "process's first JAX tracing), *warm* a second call on an identical new network.\n\n"
            + md_table(hdr, rows))


# ---------------------------------------------------------------------------------------
# gradient fidelity
# ---------------------------------------------------------------------------------------

def grad_metrics(g, ref) -> dict:
    """Per parameter: cosine, relative error ||g-ref||/||ref||, norm ratio ||g||/||ref||."""
    import numpy as np
    out = {}
    for k in ref:
        x = np.asarray(g[k], np.float64).ravel()
        y = np.asarray(ref[k], np.float64).ravel()
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        cos = float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
        rel = float(np.linalg.norm(x - y) / ny) if ny > 0 else float(nx)
        out[k] = {"cos": cos, "rel": rel, "norm_ratio": float(nx / ny) if ny > 0 else None}
    return out


def cmd_fidelity(a, out_dir: Path, dev: dict, meta: dict) -> list:
    """One fresh process per (model, N): BPTT and every algorithm/decay over each window."""
    env = worker_env(a.platform)
    wd = scratch_dir(a, "fidelity")
    rows = []
    algos = [x for x in a.algos if x != "bptt"]
    for model in a.models:
        for N in a.fid_N:
            cfg = {"fidelity": True, "lib": "ours", "model": model, "N": N, "B": a.fid_B,
                   "seed": a.seed, "windows": a.windows, "algos": algos,
                   "decays": a.fid_decays}
            r = run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
            if not r.get("ok"):
                print(f"[fidelity] {model} N={N} failed: {r.get('error')}", flush=True)
                rows.append({"model": model, "N": N, "W": "–", "algo": "bptt", "decay": None,
                             "error": str(r.get("error"))})
                continue
            for row in r["rows"]:
                rows.append(row)
                if "metrics" in row:
                    worst = min(v["cos"] for v in row["metrics"].values())
                    print(f"[fidelity] {model} N={N} W={row['W']} {ALGO_NAMES[row['algo']]}"
                          f"{'' if row['decay'] is None else ' α=' + str(row['decay'])}: "
                          f"min cos {worst:.3f}", flush=True)
    _save(out_dir, "fidelity", rows, meta)
    return rows


def fidelity_markdown(rows) -> str:
    out = ["Online gradient (the sum over a window of W steps of the per-step online gradients, "
           "from the same initial state) against BPTT of the same summed loss "
           "`Σ_{t<W} L^t`. Each cell: **cosine similarity** / relative error "
           "‖g−g_BPTT‖/‖g_BPTT‖ / norm ratio ‖g‖/‖g_BPTT‖. (A scalar factor that the optimiser's "
           "learning rate absorbs shows as a norm ratio ≠ 1 at cosine ≈ 1.)\n"]
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])
    for model in models:
        mr = [r for r in rows if r["model"] == model]
        params = []
        for r in mr:
            for k in (r.get("metrics") or {}):
                if k not in params:
                    params.append(k)
        out.append(f"\n**{model}**\n")
        tab = []
        for r in mr:
            dec = "–" if r["decay"] is None else r["decay"]
            head = [r["N"], r["B"] if "B" in r else "", r["W"], ALGO_NAMES[r["algo"]], dec]
            if "error" in r:
                tab.append(head + [("failed: " + r["error"][:60]) if i == 0 else ""
                                   for i in range(len(params))])
                continue
            m = r["metrics"]
            tab.append(head + [f"**{m[k]['cos']:.3f}** / {m[k]['rel']:.2g} / "
                               f"{_fmt(m[k]['norm_ratio'], 2)}" for k in params])
        out.append(md_table(["N", "B", "W", "algorithm", "α"] + params, tab))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# the rule zoo
# ---------------------------------------------------------------------------------------

def cmd_zoo(a, out_dir: Path, dev: dict, meta: dict) -> tuple:
    """Every rule on small nets (one fresh process per configuration), then the gradient
    fidelity of each over finite windows (one process per (model, N))."""
    env = worker_env(a.platform)
    wd = scratch_dir(a, "zoo")
    t_start = time.perf_counter()
    results = []
    for model in a.models:
        for N in a.zoo_N:
            for algo in a.zoo_algos:
                cfg = {"lib": "ours", "model": model, "algo": algo, "N": N, "B": a.zoo_B,
                       "T": a.zoo_T, "layers": 1, "seed": a.seed, "decay": a.decay,
                       "repeats": a.zoo_repeats, "run": True,
                       "mem_T": sorted(set(a.zoo_mem_T) | {a.zoo_T})}
                if time_left(t_start, a.budget_s) < 0:
                    results.append({"config": cfg, "ok": False, "skipped": "time budget spent"})
                    continue
                if algo in ("rtrl", "snap1", "snap2", "ostl") and N > a.zoo_exact_max_N:
                    results.append({"config": cfg, "ok": False, "skipped":
                                    f"influence matrix: N > --zoo-exact-max-N "
                                    f"{a.zoo_exact_max_N}"})
                    continue
                r = run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
                results.append(r)
                msg = (f"{r['ms_per_step']:.3f} ms/step" if r.get("ok") and r.get("ms_per_step")
                       else f"FAILED {str(r.get('error', ''))[:200]}")
                print(f"[zoo {time.perf_counter() - t_start:5.0f}s] {model:4s} N={N:<4d} "
                      f"{ALGO_NAMES.get(algo, algo):20s} {msg}", flush=True)
                _save(out_dir, "zoo", results, meta)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(out_dir, "zoo", results, meta)
    rows = []
    fid_algos = [x for x in a.zoo_algos if x not in ("bptt", "three_factor")]
    for model in a.models:
        for N in a.zoo_N:
            algos = [x for x in fid_algos if N <= a.zoo_exact_max_N
                     or x not in ("rtrl", "snap1", "snap2", "ostl")]
            cfg = {"fidelity": True, "lib": "ours", "model": model, "N": N, "B": a.zoo_B,
                   "seed": a.seed, "windows": a.zoo_windows, "algos": algos,
                   "decays": [a.decay]}
            r = run_worker(cfg, env=env, workdir=str(wd), timeout=a.timeout)
            if not r.get("ok"):
                print(f"[zoo fidelity] {model} N={N} failed: {r.get('error')}", flush=True)
                continue
            rows.extend(r["rows"])
            for row in r["rows"]:
                if "metrics" in row:
                    print(f"[zoo fidelity] {model} N={N} W={row['W']} "
                          f"{ALGO_NAMES.get(row['algo'], row['algo'])}: min cos "
                          f"{min(v['cos'] for v in row['metrics'].values()):.3f}", flush=True)
    _save(out_dir, "zoo_fidelity", rows, meta)
    return results, rows


def zoo_markdown(results, rows, meta) -> str:
    """Time, memory and fidelity of every rule (one table each)."""
    out = [f"Command: `{meta.get('command')}` ({meta.get('date')}; load average "
           f"{meta.get('machine', {}).get('loadavg_start')} → {meta.get('loadavg_end')}). "
           "A short run on a shared, loaded 2-core machine: times are indicative, compare "
           "within a row.\n"]
    Ts = sorted({int(t) for r in results for t in (r.get("memory_by_T") or {})})
    hdr = ["model", "N", "rule", "ms / step", "× BPTT", "trace elements"] + \
          [f"XLA temp MB, T={t}" for t in Ts]
    tab = []
    for r in results:
        c = r["config"]
        b = _get(results, model=c["model"], N=c["N"], algo="bptt")
        name = ALGO_NAMES.get(c["algo"], c["algo"])
        if not r.get("ok"):
            tab.append([c["model"], c["N"], name, r.get("skipped") or "failed: " +
                        str(r.get("error", ""))[:60]] + [""] * (len(hdr) - 4))
            continue
        ms = r.get("ms_per_step")
        ratio = ms / b["ms_per_step"] if (b and b.get("ok") and b.get("ms_per_step")
                                          and ms) else None
        tab.append([c["model"], c["N"], name, _fmt(ms), _fmt(ratio, 2),
                    r.get("trace_elems", "–") if c["algo"] != "bptt" else "–"]
                   + [_fmt(temp_mb(r, t)) for t in Ts])
    out.append(f"### Time per step and memory (B = {results[0]['config']['B'] if results else '?'}"
               f", T = {results[0]['config']['T'] if results else '?'} timed steps)\n")
    out.append(md_table(hdr, tab))
    if rows:
        out.append("\n### Gradient cosine against BPTT over a window of W steps\n")
        out.append("Sum of the per-step online gradients over W steps from the same initial "
                   "state vs BPTT of the summed loss; the smallest cosine over the parameters "
                   "(UORO: one random draw, it is unbiased but noisy; DNI with its synthetic "
                   "module at initialisation, zero, is D-RTRL; e-prop with random feedback "
                   "follows fixed random weights, not the gradient).\n")
        Ws = sorted({r["W"] for r in rows})
        t2 = []
        for model in a_models(rows):
            for N in sorted({r["N"] for r in rows if r["model"] == model}):
                for algo in [x for x in ALGO_NAMES if any(r["algo"] == x and r["model"] == model
                                                          for r in rows)]:
                    cells = []
                    for W in Ws:
                        rr = [r for r in rows if (r["model"], r["N"], r["algo"], r["W"]) ==
                              (model, N, algo, W) and "metrics" in r]
                        cells.append(f"{min(v['cos'] for v in rr[0]['metrics'].values()):.4f}"
                                     if rr else "–")
                    if any(c != "–" for c in cells):
                        t2.append([model, N, ALGO_NAMES[algo]] + cells)
        out.append(md_table(["model", "N", "rule"] + [f"W={w}" for w in Ws], t2))
    return "\n".join(out)


def a_models(rows) -> list:
    out = []
    for r in rows:
        if r["model"] not in out:
            out.append(r["model"])
    return out


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------

def sanitize(text: str) -> str:
    """No machine paths in committed results: the checkout becomes ``<repo>``, the temp dir
    ``<tmp>``, the home directory ``~``."""
    for path, tag in ((str(ROOT), "<repo>"), (tempfile.gettempdir(), "<tmp>"),
                      (os.path.expanduser("~"), "~")):
        if path and path not in ("/", "."):
            text = text.replace(path, tag)
    return text


def dump_json(path: Path, obj):
    with open(path, "w") as f:
        f.write(sanitize(json.dumps(obj, indent=1, default=str)))


def _save(out_dir: Path, kind: str, results, meta):
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_json(out_dir / f"{kind}.json", {"meta": meta, "results": results})


def _load(out_dir: Path, kind: str):
    p = out_dir / f"{kind}.json"
    if not p.exists():
        return None, None
    with open(p) as f:
        d = json.load(f)
    return d["results"], d["meta"]


def meta_markdown(meta) -> str:
    dev = meta.get("device", {})
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    s = [f"- command: `{meta.get('command')}`",
         f"- date: {meta.get('date')}" + (f"; brainscale at commit {meta['git']}"
                                           if meta.get("git") else ""),
         f"- device: **{dev.get('platform', '?')}** ({dev.get('kind', '')}); "
         f"{m.get('cpu', '?')}, {m.get('cpus')} cores, {m.get('mem_gb')} GiB; {m.get('system')}",
         f"- load average at start / end: {m.get('loadavg_start')} / {meta.get('loadavg_end')}"]
    if v:
        s.append("- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    b = meta.get("bandwidth")
    if b:
        s.append(f"- copy bandwidth (separate process, 256 MB float32): {b['rw_GBps']:.1f} GB/s "
                 f"read+write steady state ({b['ns_per_elem_rw']:.2f} ns per element), "
                 f"{b['oneshot']['rw_GBps']:.1f} GB/s one-shot `x*1.0` with a fresh output")
    if meta.get("sweep_wall_s"):
        s.append(f"- sweep wall time: {meta['sweep_wall_s'] / 60:.1f} min")
    return "\n".join(s)


def write_report(out_dir: Path) -> str:
    parts = []
    sw, meta = _load(out_dir, "sweep")
    co, meta_c = _load(out_dir, "compile")
    fi, meta_f = _load(out_dir, "fidelity")
    for kind, (res_, meta_) in (("sweep", (sw, meta)), ("compile", (co, meta_c)),
                                ("fidelity", (fi, meta_f))):
        if res_ is not None:        # (re)write sanitized: no machine paths in the JSON
            dump_json(out_dir / f"{kind}.json", {"meta": meta_, "results": res_})
    meta0 = meta or meta_c or meta_f or {}
    parts.append(f"# brainscale benchmark results ({meta0.get('device', {}).get('platform', '?')})\n")
    parts.append(meta_markdown(meta0) + "\n")
    if sw is not None:
        parts.append("## Sweep: online algorithms vs BPTT\n")
        parts.append(f"Command: `{meta.get('command')}` ({meta.get('date')}; load average "
                     f"{meta.get('machine', {}).get('loadavg_start')} → {meta.get('loadavg_end')})\n")
        parts.append(sweep_markdown(sw, meta) + "\n")
    if co is not None:
        parts.append("## compile_graph of 3-layer networks (target < 1 s)\n")
        parts.append(f"Command: `{meta_c.get('command')}` ({meta_c.get('date')})\n")
        parts.append(compile_markdown(co) + "\n")
    if fi is not None:
        parts.append("## Gradient fidelity against BPTT\n")
        parts.append(f"Command: `{meta_f.get('command')}` ({meta_f.get('date')})\n")
        parts.append(fidelity_markdown(fi) + "\n")
    zo, meta_z = _load(out_dir, "zoo")
    if zo is not None:
        zf, _ = _load(out_dir, "zoo_fidelity")
        dump_json(out_dir / "zoo.json", {"meta": meta_z, "results": zo})
        ztext = sanitize("# The rule zoo against BPTT\n\n" + meta_markdown(meta_z) + "\n\n"
                         + zoo_markdown(zo, zf or [], meta_z) + "\n")
        with open(out_dir / "zoo.md", "w") as f:
            f.write(ztext)
        parts.append("## The rule zoo\n\nSee `zoo.md` (`tools/bench.py zoo`).\n")
    text = sanitize("\n".join(parts))
    with open(out_dir / "results.md", "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def _ints(s):
    return [int(x) for x in str(s).split(",") if x]


def _floats(s):
    return [float(x) for x in str(s).split(",") if x]


def _strs(s):
    return [x for x in str(s).split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples::")[1])
    p.add_argument("command", nargs="?", default="all",
                   choices=["sweep", "compile", "fidelity", "zoo", "report", "all"],
                   help="what to run (default: all)")
    p.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results/cpu, or gpu-<device kind>)")
    p.add_argument("--models", type=_strs, default=list(bm.MODELS))
    p.add_argument("--algos", type=_strs, default=["bptt", "io", "param", "hybrid"])
    p.add_argument("--N", type=_ints, default=None,
                   help="hidden sizes (default 128,512,1024,2048 on CPU, up to 8192 on GPU)")
    p.add_argument("--B", type=_ints, default=[16], help="batch sizes")
    p.add_argument("--T", type=int, default=1000, help="sequence length of the timed run")
    p.add_argument("--mem-T", type=_ints, default=[100, 1000, 10000],
                   help="sequence lengths of the XLA memory analysis")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decay", type=float, default=0.99, help="ES-D-RTRL / hybrid decay α")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param-max-mb", type=float, default=None,
                   help="skip D-RTRL whose trace exceeds this (default 1024 on CPU, 16384 on GPU)")
    p.add_argument("--call-s", type=float, default=3.0,
                   help="target seconds of one D-RTRL call (picks its T at large N)")
    p.add_argument("--budget-s", type=float, default=1800,
                   help="stop launching sweep configurations after this many seconds")
    p.add_argument("--timeout", type=float, default=900, help="per-configuration timeout (s)")
    p.add_argument("--platform", default=None, help="JAX_PLATFORMS for the workers (cpu, cuda)")
    p.add_argument("--layers", type=int, default=3, help="layers of the compile-time networks")
    p.add_argument("--compile-N", type=int, default=128)
    p.add_argument("--fid-N", type=_ints, default=[32, 128, 512])
    p.add_argument("--fid-B", type=int, default=4)
    p.add_argument("--windows", type=_ints, default=[10, 100])
    p.add_argument("--fid-decays", type=_floats, default=[0.9, 0.99])
    p.add_argument("--zoo-algos", type=_strs, default=ZOO_DEFAULT, help="zoo: the rules")
    p.add_argument("--zoo-N", type=_ints, default=[32], help="zoo: hidden sizes")
    p.add_argument("--zoo-exact-max-N", type=int, default=64,
                   help="zoo: largest N for the influence-matrix rules (RTRL, SnAp, OSTL)")
    p.add_argument("--zoo-B", type=int, default=8)
    p.add_argument("--zoo-T", type=int, default=100)
    p.add_argument("--zoo-mem-T", type=_ints, default=[10, 100, 1000])
    p.add_argument("--zoo-repeats", type=int, default=3)
    p.add_argument("--zoo-windows", type=_ints, default=[10, 50])
    p.add_argument("--work", default=None,
                   help="scratch directory for per-configuration files (default: a temp dir)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration (N=32, T=20, B=4, 1 repeat)")
    p.add_argument("--dry-run", action="store_true", help="print the sweep plan only")
    a = p.parse_args(argv)
    if a.quick:
        a.N = a.N or [32]
        a.B, a.T, a.mem_T, a.repeats = [4], 20, [20, 40], 1
        a.compile_N, a.layers, a.fid_N, a.windows, a.fid_decays = 32, 2, [16], [10], [0.9]
        a.fid_B = 2
        a.zoo_N, a.zoo_B, a.zoo_T, a.zoo_mem_T, a.zoo_repeats = [16], 2, 10, [10, 20], 1
        a.zoo_windows = [5]
    return a


def main(argv=None):
    a = parse_args(argv)
    dev = detect_device(env=worker_env(a.platform))
    gpu = dev.get("platform") != "cpu"
    if a.param_max_mb is None:
        a.param_max_mb = 16384 if gpu else 1024
    if a.out:
        out_dir = Path(a.out)
    elif gpu:
        slug = "".join(c if c.isalnum() else "-" for c in str(dev.get("kind", "")).lower())
        out_dir = ROOT / "benchmarks" / "results" / ("gpu-" + "-".join(x for x in slug.split("-") if x))
    else:
        out_dir = ROOT / "benchmarks" / "results" / "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.command == "report":
        print(write_report(out_dir))
        return 0
    import importlib.metadata as md
    versions = {}
    for pkg in ("brainscale", "jax", "jaxlib", "brainstate", "braintools", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001
            pass
    rel = os.path.relpath(sys.argv[0], ROOT) if argv is None else "tools/bench.py"
    meta = {"command": "python " + " ".join([rel] + (sys.argv[1:] if argv is None else list(argv))),
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "device": dev, "machine": machine_info(), "versions": versions, "git": git_rev()}
    if a.command in ("sweep", "all"):
        cmd_sweep(a, out_dir, dev, meta)
    if a.dry_run:
        return 0
    if a.command in ("compile", "all"):
        cmd_compile(a, out_dir, dev, dict(meta))
    if a.command in ("fidelity", "all"):
        cmd_fidelity(a, out_dir, dev, dict(meta))
    if a.command == "zoo":
        cmd_zoo(a, out_dir, dev, meta)
    text = write_report(out_dir)
    print(f"\nwrote {out_dir / 'results.md'} ({len(text)} chars) and the JSON files beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
