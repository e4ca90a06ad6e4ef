#!/usr/bin/env python
"""Train a recurrent spiking network ONLINE with ES-D-RTRL on handwritten digits.

What it does
------------
* Data: scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``, 1797
  images shipped inside scikit-learn, nothing is downloaded), split 1437 train / 360 test.
  Each of the 64 pixels becomes a Bernoulli (Poisson-like) spike train over ``--steps``
  time steps whose firing probability is proportional to the pixel intensity. The encoding
  uses a fixed seed, so every run sees the same spikes.
* Model: 64 inputs -> recurrent LIF layer (``--hidden`` neurons; membrane potential ``V``
  is a ``brainscale.ETraceState``, its input ``concat(x_t, spikes_{t-1})`` goes through one
  ``brainscale.ETraceParam`` with a ``MatMulOp``) -> leaky (non-spiking) readout of 10
  units (its own ``ETraceState`` and ``ETraceParam``).
* Learning: ``brainscale.DiagIODimAlgorithm`` (ES-D-RTRL) compiles one model step into a
  step that also advances the eligibility traces. At every time step the gradient of that
  step's cross-entropy loss is read off the traces (no backpropagation through time: memory
  does not grow with the sequence length); the per-step gradients are summed over the
  sequence inside a jitted ``scan`` and applied with Adam once per batch.
* Outputs (``--out``): ``metrics.json``, ``training.png`` (loss/accuracy curves), the
  compiled graph as text IR (``graph.ir.txt``) and, when ``brainscale.ir.dot`` is
  available, as Graphviz DOT (``graph.dot``, ``graph.svg``) plus ``compile_report.txt``.

Run::

    python tools/demo.py --out outputs/demo            # full run (a few minutes on 2 cores)
    python tools/demo.py --out outputs/demo-quick --quick       # smoke test (seconds)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 10; 1 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 with --quick)")
    p.add_argument("--hidden", type=int, default=None, help="recurrent LIF neurons (default 100; 32 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="time steps per sample (default 25; 8 with --quick)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--decay", type=float, default=0.98, help="ES-D-RTRL trace decay alpha in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the spike encoding and the weights")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run for CI: 128 train / 64 test samples, 1 epoch, small net")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bar")
    a = p.parse_args(argv)
    defaults = dict(epochs=(1, 10), batch=(16, 64), hidden=(32, 100), steps=(8, 25))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    return a


# parse before the heavy imports so that `--help` and argument errors are instant
_T0 = time.perf_counter()
ARGS = parse_args() if __name__ == "__main__" else None
os.environ.setdefault("MPLBACKEND", "Agg")  # headless plotting

import brainstate  # noqa: E402
import braintools  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import brainscale  # noqa: E402


# =======================================================================================
# Data: handwritten digits as spike trains
# =======================================================================================

def load_spike_digits(n_steps: int, seed: int = 0, max_rate: float = 0.6,
                      n_train: int | None = None, n_test: int | None = None):
    """Digits as Bernoulli spike trains: ``(x_train, y_train, x_test, y_test)``.

    ``x_*`` are float32 arrays of shape ``(n_samples, n_steps, 64)`` with 0/1 entries: pixel
    ``i`` spikes at step ``t`` with probability ``max_rate * intensity_i`` (intensity in
    [0, 1]). Deterministic in ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.data.astype(np.float32) / 16.0          # (1797, 64) in [0, 1]
    labels = digits.target.astype(np.int32)
    i_tr, i_te = train_test_split(np.arange(len(labels)), test_size=360, random_state=seed,
                                  stratify=labels)
    if n_train is not None:
        i_tr = i_tr[:n_train]
    if n_test is not None:
        i_te = i_te[:n_test]
    rng = np.random.default_rng(seed)
    rates = max_rate * images                                  # (N, 64)
    spikes = (rng.random((len(labels), n_steps, images.shape[1])) < rates[:, None, :])
    spikes = spikes.astype(np.float32)
    return spikes[i_tr], labels[i_tr], spikes[i_te], labels[i_te]


# =======================================================================================
# Model: recurrent LIF layer + leaky readout, written with brainscale's trace concepts
# =======================================================================================

class RecurrentLIF(brainstate.nn.Module):
    """Leaky integrate-and-fire neurons with all-to-all recurrence.

    ``V_t = a V_{t-1} + W [x_t, s_{t-1}] + b - v_th s_{t-1}`` (soft reset), ``s = H(V - v_th)``
    with a surrogate gradient for the Heaviside ``H``. ``V`` is the only hidden state; the
    spikes are a function of it, so the compiler sees one hidden group per layer.
    """

    def __init__(self, n_in: int, n_rec: int, tau: float = 10.0, v_th: float = 1.0,
                 rng: np.random.Generator | None = None):
        super().__init__()
        rng = rng or np.random.default_rng(0)
        self.n_rec, self.decay, self.v_th = n_rec, math.exp(-1.0 / tau), v_th
        w_in = rng.normal(0.0, 1.0 / math.sqrt(n_in), (n_in, n_rec)) * 2.0
        w_rec = rng.normal(0.0, 1.0 / math.sqrt(n_rec), (n_rec, n_rec)) * 0.5
        weight = jnp.asarray(np.concatenate([w_in, w_rec], axis=0), jnp.float32)
        self.W = brainscale.ETraceParam({"weight": weight, "bias": jnp.zeros(n_rec)},
                                        brainscale.MatMulOp())
        self.spike_fn = braintools.surrogate.ReluGrad(alpha=0.3, width=1.0)

    def init_state(self, batch_size=None, **kwargs):
        shape = (self.n_rec,) if batch_size is None else (batch_size, self.n_rec)
        self.V = brainscale.ETraceState(jnp.zeros(shape))

    def reset_state(self, batch_size=None, **kwargs):
        shape = (self.n_rec,) if batch_size is None else (batch_size, self.n_rec)
        self.V.value = jnp.zeros(shape)

    def spikes(self, v):
        return self.spike_fn(v - self.v_th)

    def update(self, x):
        v_prev = self.V.value
        s_prev = self.spikes(v_prev)
        current = self.W.execute(jnp.concatenate([x, s_prev], axis=-1))
        v = self.decay * v_prev + current - self.v_th * jax.lax.stop_gradient(s_prev)
        self.V.value = v
        return self.spikes(v)


class LeakyReadout(brainstate.nn.Module):
    """Non-spiking leaky integrator ``y_t = a y_{t-1} + W s_t + b`` (the class scores)."""

    def __init__(self, n_in: int, n_out: int, tau: float = 5.0,
                 rng: np.random.Generator | None = None):
        super().__init__()
        rng = rng or np.random.default_rng(1)
        self.n_out, self.decay = n_out, math.exp(-1.0 / tau)
        weight = jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(n_in), (n_in, n_out)), jnp.float32)
        self.W = brainscale.ETraceParam({"weight": weight, "bias": jnp.zeros(n_out)},
                                        brainscale.MatMulOp())

    def init_state(self, batch_size=None, **kwargs):
        shape = (self.n_out,) if batch_size is None else (batch_size, self.n_out)
        self.y = brainscale.ETraceState(jnp.zeros(shape))

    def reset_state(self, batch_size=None, **kwargs):
        shape = (self.n_out,) if batch_size is None else (batch_size, self.n_out)
        self.y.value = jnp.zeros(shape)

    def update(self, s):
        y = self.decay * self.y.value + self.W.execute(s)
        self.y.value = y
        return y


class SpikingNet(brainstate.nn.Module):
    """64 -> recurrent LIF -> leaky readout; ``update(x_t)`` is one time step."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.lif = RecurrentLIF(n_in, n_hidden, rng=rng)
        self.out = LeakyReadout(n_hidden, n_out, rng=rng)

    def update(self, x):
        return self.out(self.lif(x))


def predict(logits, loss_weights) -> np.ndarray:
    """Class = argmax of the readout summed over the scored steps; logits: (T, B, 10)."""
    return np.argmax(np.einsum("t,tbk->bk", np.asarray(loss_weights), np.asarray(logits)), -1)


def step_loss(logits, label, weight):
    """Cross-entropy of one time step, weighted (0 during the warm-up steps)."""
    ce = braintools.metric.softmax_cross_entropy_with_integer_labels(logits, label).mean()
    return weight * ce


# =======================================================================================
# Training
# =======================================================================================

def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss: KiB on Linux, B on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def trace_memory(learner, batch_size: int) -> dict:
    """Bytes of the eligibility traces: as planned by the compiler and as allocated.

    ``param_dim_bytes_estimate`` is, for comparison, the size of one parameter-shaped
    (D-RTRL) trace per example: batch x |theta| x itemsize.
    """
    nbytes = lambda a: int(np.prod(np.shape(a))) * jnp.result_type(a).itemsize  # noqa: E731
    planned = sum(t.nbytes for t in learner.graph.traces)
    allocated = sum(nbytes(t.value) for t in learner._traces)
    theta = sum(nbytes(leaf) for p in learner.model.states(brainscale.ETraceParam).values()
                for leaf in jax.tree.leaves(p.value))
    return {"planned_bytes": planned, "allocated_bytes": allocated,
            "param_dim_bytes_estimate": batch_size * theta,
            "n_traces": len(learner.graph.traces), "n_arrays": len(learner._traces),
            "dims": sorted({t.dim for t in learner.graph.traces})}


def gradient_alignment(learner, net, params, xs, labels, loss_weights) -> dict:
    """Compare the online (ES-D-RTRL) gradient of one batch with the exact BPTT gradient.

    Returns ``{param leaf: {"cosine": .., "norm_ratio": online/BPTT}}``. ES-D-RTRL keeps
    only the diagonal of the recurrent Jacobian and smooths the output-side trace with
    ``(1 - alpha)``, so the norms differ by about that factor while the directions should
    agree closely (Adam is insensitive to the overall scale).
    """
    B = xs.shape[1]
    names = list(params)

    @brainstate.transform.jit
    def online():
        learner.reset_state(batch_size=B)
        zeros = jax.tree.map(jnp.zeros_like, {k: params[k].value for k in names})

        def body(acc, inputs):
            x_t, w_t = inputs
            g = brainstate.transform.grad(
                lambda: step_loss(learner(x_t), labels, w_t), params)()
            return jax.tree.map(jnp.add, acc, g), None

        return brainstate.transform.scan(body, zeros, (xs, loss_weights))[0]

    @brainstate.transform.jit
    def bptt():
        def loss():
            brainstate.nn.reset_all_states(net, batch_size=B)
            per_step = brainstate.transform.for_loop(
                lambda x_t, w_t: step_loss(net(x_t), labels, w_t), xs, loss_weights)
            return per_step.sum()
        return brainstate.transform.grad(loss, params)()

    g_on, g_bp = online(), bptt()
    out = {}
    for k in names:
        flat_on = jax.tree_util.tree_leaves_with_path(g_on[k])
        flat_bp = jax.tree.leaves(g_bp[k])
        for (path, a), b in zip(flat_on, flat_bp):
            a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            name = ".".join(str(x) for x in (k if isinstance(k, tuple) else (k,))) + \
                jax.tree_util.keystr(path)
            out[name] = {"cosine": float(a @ b / (na * nb)) if na * nb > 0 else float("nan"),
                         "norm_ratio": float(na / nb) if nb > 0 else float("nan")}
    return out


def train(args) -> dict:
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    brainstate.random.seed(args.seed)

    n_train, n_test = (128, 64) if args.quick else (None, None)
    x_tr, y_tr, x_te, y_te = load_spike_digits(args.steps, seed=args.seed,
                                               n_train=n_train, n_test=n_test)
    B, T = args.batch, args.steps
    n_batches = len(x_tr) // B
    if n_batches == 0:
        raise SystemExit(f"--batch {B} is larger than the training set ({len(x_tr)} samples)")
    warmup = T // 5
    print(f"data: {len(x_tr)} train / {len(x_te)} test digits as {T}-step spike trains; "
          f"batch {B}, {n_batches} batches/epoch, {args.epochs} epoch(s)")

    # --- README example start ---
    # per-step loss weights: the first T/5 steps carry little evidence and are not scored
    loss_weights = jnp.asarray((np.arange(T) >= warmup).astype(np.float32) / (T - warmup))

    net = SpikingNet(n_in=64, n_hidden=args.hidden, n_out=10, seed=args.seed)
    brainstate.nn.init_all_states(net, batch_size=B)        # hidden states with a batch axis

    # ES-D-RTRL: compile one step (frontend -> passes -> backend) on an example input
    learner = brainscale.DiagIODimAlgorithm(net, decay_or_rank=args.decay)
    learner.compile_graph(jnp.zeros((B, 64)))

    params = net.states(brainstate.ParamState)
    opt = braintools.optim.Adam(lr=args.lr)
    opt.register_trainable_weights(params)

    @brainstate.transform.jit
    def train_batch(xs, labels):
        """xs: (T, B, 64) spikes. Online gradients summed over time, then one Adam update."""
        learner.reset_state(batch_size=B)                    # fresh V, y and zero traces
        zeros = jax.tree.map(jnp.zeros_like, {k: p.value for k, p in params.items()})

        def one_step(grad_sum, inputs):
            x_t, w_t = inputs

            def loss_t():
                logits = learner(x_t)                        # advances states AND traces
                return step_loss(logits, labels, w_t), logits

            # the gradient of this step's loss, read off the eligibility traces
            g, loss, logits = brainstate.transform.grad(
                loss_t, params, has_aux=True, return_value=True)()
            return jax.tree.map(jnp.add, grad_sum, g), (loss, logits)

        grads, (losses, logits) = brainstate.transform.scan(one_step, zeros, (xs, loss_weights))
        opt.update(grads)
        return losses.sum(), logits
    # --- README example end ---

    @brainstate.transform.jit
    def evaluate(xs):
        """Forward pass of the plain model (no traces) over a whole batch; xs: (T, N, 64)."""
        brainstate.nn.reset_all_states(net, batch_size=xs.shape[1])
        return brainstate.transform.for_loop(net, xs)

    # the compiled graph
    compile_s = learner.compile_seconds
    mem = trace_memory(learner, B)
    print(f"compiled in {compile_s:.2f} s: {mem['n_traces']} trace(s) ({', '.join(mem['dims'])}), "
          f"{mem['allocated_bytes'] / 1024:.1f} KiB of trace state "
          f"(planned {mem['planned_bytes'] / 1024:.1f} KiB; a param-dim D-RTRL trace would "
          f"take ~{mem['param_dim_bytes_estimate'] / 2**20:.1f} MiB)")
    files = write_graph(learner, out_dir)

    # sanity check of the compiled learner: online vs BPTT gradient on one batch
    align = gradient_alignment(learner, net, params, jnp.asarray(np.swapaxes(x_tr[:B], 0, 1)),
                               jnp.asarray(y_tr[:B]), loss_weights)
    print("gradient vs BPTT (cosine) at init: " +
          ", ".join(f"{k} {v['cosine']:.3f}" for k, v in align.items()))

    history = {"epoch": [], "train_loss": [], "train_acc": [], "test_acc": [], "epoch_s": []}
    rng = np.random.default_rng(args.seed + 1)
    x_te_t = jnp.asarray(np.swapaxes(x_te, 0, 1))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        tqdm = None

    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_tr))[: n_batches * B].reshape(n_batches, B)
        it = order
        if tqdm is not None and not args.no_progress:
            # disable=None: no bar when stderr is not a terminal (CI logs stay readable)
            it = tqdm(order, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False,
                      disable=None)
        losses, correct = [], 0
        for idx in it:
            xs = jnp.asarray(np.swapaxes(x_tr[idx], 0, 1))  # (T, B, 64)
            loss, logits = train_batch(xs, jnp.asarray(y_tr[idx]))
            losses.append(float(loss))
            correct += int(np.sum(predict(logits, loss_weights) == y_tr[idx]))
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{losses[-1]:.3f}")
        train_acc = correct / (n_batches * B)
        test_acc = float(np.mean(predict(evaluate(x_te_t), loss_weights) == y_te))
        # back to the training batch size outside jit, so train_batch is not traced again
        learner.reset_state(batch_size=B)
        dt = time.perf_counter() - t0
        history["epoch"].append(epoch)
        history["train_loss"].append(float(np.mean(losses)))
        history["train_acc"].append(train_acc)
        history["test_acc"].append(test_acc)
        history["epoch_s"].append(dt)
        print(f"epoch {epoch:2d}/{args.epochs}: loss {np.mean(losses):.4f}  "
              f"train acc {train_acc:6.2%}  test acc {test_acc:6.2%}  ({dt:.1f} s)")

    wall = time.perf_counter() - t_start
    rss = peak_rss_mb()
    print(f"final test accuracy {history['test_acc'][-1]:.2%} (chance 10%); "
          f"trace memory {mem['allocated_bytes'] / 1024:.1f} KiB; peak RSS {rss:.0f} MiB; "
          f"wall {wall:.1f} s")
    files.append(plot_history(history, out_dir))
    metrics = {
        "task": "sklearn digits as spike trains, online ES-D-RTRL",
        "config": {k: v for k, v in vars(args).items()},
        "data": {"n_train": int(len(x_tr)), "n_test": int(len(x_te)), "steps": T,
                 "loss_from_step": warmup},
        "model": {"n_in": 64, "n_hidden": args.hidden, "n_out": 10,
                  "n_params": int(sum(np.size(l) for l in jax.tree.leaves(
                      {k: p.value for k, p in params.items()})))},
        "final": {"train_loss": history["train_loss"][-1], "train_acc": history["train_acc"][-1],
                  "test_acc": history["test_acc"][-1]},
        "history": history,
        "trace_memory": mem,
        "grad_alignment_vs_bptt": align,
        "compile_seconds": compile_s,
        "peak_rss_mb": rss,
        "wall_seconds": wall,
        "wall_seconds_with_imports": time.perf_counter() - _T0,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "brainstate": brainstate.__version__, "brainscale": brainscale.__version__},
        "files": sorted(str(Path(f).name) for f in files if f),
    }
    metrics_path = out_dir / "metrics.json"
    metrics["files"].append(metrics_path.name)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"wrote {', '.join(metrics['files'])} to {out_dir}")
    return metrics


# =======================================================================================
# Outputs
# =======================================================================================

def write_graph(learner, out_dir: Path) -> list:
    """Text IR always; DOT, SVG and the compile report when the modules exist."""
    files = []
    p = out_dir / "graph.ir.txt"
    p.write_text(learner.ir() + "\n")
    files.append(p)
    compiled = learner.compiled()
    try:
        dot = compiled.to_dot()
    except ImportError:
        print("note: brainscale.ir.dot is not available; wrote the text IR only")
    else:
        p = out_dir / "graph.dot"
        p.write_text(dot if dot.endswith("\n") else dot + "\n")
        files.append(p)
        try:
            res = compiled.render(out_dir / "graph.svg")
            svg = Path(res) if isinstance(res, (str, os.PathLike)) else out_dir / "graph.svg"
            if svg.exists():
                files.append(svg)
        except Exception as e:  # rendering needs graphviz (or graphviz-pure); optional
            print(f"note: could not render the graph to SVG: {type(e).__name__}: {e}")
    try:
        report = compiled.report()
    except ImportError:
        pass
    else:
        p = out_dir / "compile_report.txt"
        p.write_text(report if report.endswith("\n") else report + "\n")
        files.append(p)
    return files


def plot_history(history: dict, out_dir: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = history["epoch"]
    ax1.plot(ep, history["train_loss"], "o-")
    ax1.set(xlabel="epoch", ylabel="summed per-step cross-entropy", title="training loss")
    ax2.plot(ep, [100 * a for a in history["train_acc"]], "o-", label="train (online)")
    ax2.plot(ep, [100 * a for a in history["test_acc"]], "s-", label="test")
    ax2.axhline(10, color="gray", ls=":", label="chance")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title="accuracy")
    ax2.legend(loc="lower right")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("Recurrent SNN on digits, trained online with ES-D-RTRL (brainscale)")
    fig.tight_layout()
    path = out_dir / "training.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = ARGS if argv is None and ARGS is not None else parse_args(argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
