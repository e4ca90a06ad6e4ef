"""The update-schedule rule axis, acted on: online training that applies each parameter's
gradient when its traces' ``schedule`` says.

Every trace in the IR carries ``schedule`` (``step``, ``window`` with ``window=K``, ``end``;
docs/rules.md). The traces and the per-step online gradients are computed every step
whatever the schedule; the schedule is *when the accumulated gradient is applied*:

* ``step``: after every step (the weights change during the sequence; the traces go on);
* ``window``: after steps ``K-1, 2K-1, ...`` with the sum of the window's per-step
  gradients, and after the last step with what is left of the last window;
* ``end``: once, after the last step, with the sum over the sequence
  (:func:`brainscale.online_gradients` followed by one update).

With one ``window=K`` schedule for every parameter, :func:`train_online` runs each window
through the step-owning loop of ``online_gradients(chunk=K)`` (D-RTRL traces of plain
matmuls advanced once per window, ES-D-RTRL gradients summed with one product) and updates
after it: the same updates, since the weights do not change inside a window.

:func:`train_online` runs a sequence and applies the updates with the caller's optimizer
(``braintools.optim``, or any object with ``update(grads)``). A parameter's schedule is the
one of the traces of its relations (:func:`update_schedule` lists them); a parameter with
no trace (a plain ``ParamState``, ``dim=none``) follows the schedule every trace shares, or
``step`` when they differ. When parameters have different schedules, pass one optimizer per
schedule (``{'step': opt_a, 'end': opt_b}``, each registered on its parameters): an
optimizer's state advances on every ``update``, so one optimizer cannot serve two schedules.
"""
from __future__ import annotations

from typing import Callable

import brainstate
import jax
import jax.numpy as jnp

from .algorithms import start_sequence, step_gradient
from .errors import BrainscaleError

__all__ = ["update_schedule", "schedule_key", "train_online"]


def schedule_key(schedule: str, window: int | None) -> str:
    """``'step'``, ``'end'`` or ``'window=K'``: how :func:`train_online` names a schedule."""
    return f"window={int(window)}" if schedule == "window" else schedule


def _path(key) -> str:
    return ".".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


def update_schedule(learner, params: dict | None = None) -> dict:
    """The schedule of every parameter: ``{key: 'step' | 'end' | 'window=K'}``.

    Args:
        learner: a compiled algorithm.
        params: dict of ParamStates (default: the model's, keyed as ``model.states``).

    Raises:
        NotCompiledError: before ``compile_graph``.
        BrainscaleError: a parameter whose traces have different schedules (a pass set
            them per trace): one parameter is updated at one schedule.
    """
    learner._require()
    g = learner.graph
    states = learner._bound_states()
    if params is None:
        params = learner.model.states(brainstate.ParamState)
    by_state: dict = {}
    for t in g.traces:
        for rid in t.relations:
            st = states[g.param_by_name[g.relation_by_id[rid].param].state_index]
            by_state.setdefault(id(st), []).append((schedule_key(t.schedule, t.window), t.id))
    kinds = {k for v in by_state.values() for k, _ in v}
    default = next(iter(kinds)) if len(kinds) == 1 else "step"
    out = {}
    for key, st in params.items():
        found = by_state.get(id(st))
        if not found:
            out[key] = default
            continue
        ks = sorted({k for k, _ in found})
        if len(ks) > 1:
            what = ", ".join(f"{tid}: schedule {k}" for k, tid in found)
            raise BrainscaleError(
                f"parameter {_path(key)} has traces with different update schedules ({what}); "
                f"one parameter is updated at one schedule: give its traces the same "
                f"schedule (select-dims{{schedule=...}} or your pass)")
        out[key] = ks[0]
    return out


def _due(key: str, t, T: int):
    """Whether the schedule ``key`` applies its accumulated gradient after step ``t``."""
    last = t == T - 1
    if key == "end":
        return last
    K = int(key.split("=", 1)[1])
    return jnp.logical_or(last, (t + 1) % K == 0)


def _registered(opt) -> dict | None:
    """``{key: state}`` an optimizer is registered on (``braintools.optim``), or None."""
    ps = getattr(opt, "param_states", None)
    to_pytree = getattr(ps, "to_pytree", None)
    if to_pytree is None:
        return None
    try:
        return dict(to_pytree())
    except Exception:  # noqa: BLE001 - an optimizer that keeps other things there
        return None


def _optimizer_for(optimizer, groups: dict, params: dict) -> dict:
    """``{schedule key: (optimizer, {optimizer's key: our key})}``, checked."""
    if hasattr(optimizer, "update") and not isinstance(optimizer, dict):
        if len(groups) > 1:
            listing = "; ".join(f"{k}: {', '.join(_path(p) for p in ps)}"
                                for k, ps in groups.items())
            raise BrainscaleError(
                f"the parameters have different update schedules ({listing}); one optimizer "
                f"cannot serve two schedules (its state advances on every update): pass "
                f"optimizer={{{', '.join(repr(k) for k in groups)}: ...}}, one optimizer per "
                f"schedule, each registered on its parameters")
        opts = {next(iter(groups)): optimizer} if groups else {}
    elif isinstance(optimizer, dict):
        missing = [k for k in groups if k not in optimizer]
        extra = [k for k in optimizer if k not in groups]
        if missing or extra:
            raise BrainscaleError(
                f"optimizer has schedules {sorted(optimizer)}, the parameters have "
                f"{sorted(groups)}: give one optimizer per schedule of "
                f"brainscale.update_schedule(learner)")
        opts = optimizer
    else:
        raise BrainscaleError(f"optimizer must have an update(grads) method (e.g. "
                              f"braintools.optim.Adam) or be a dict of them by schedule, got "
                              f"{type(optimizer).__name__}")
    out = {}
    for key, names in groups.items():
        opt = opts[key]
        if not hasattr(opt, "update"):
            raise BrainscaleError(f"optimizer for schedule {key!r} has no update(grads) method")
        reg = _registered(opt)
        if reg is None:                       # a plain object with update(grads): our keys
            out[key] = (opt, {n: n for n in names})
            continue
        ours = {id(params[n]): n for n in names}
        theirs = {id(st): k for k, st in reg.items()}
        stray = [k for k, st in reg.items() if id(st) not in ours]
        absent = [_path(n) for n in names if id(params[n]) not in theirs]
        if stray or absent:
            raise BrainscaleError(
                f"the optimizer for schedule {key!r} must be registered on exactly that "
                f"schedule's parameters ({', '.join(_path(n) for n in names)})"
                + (f"; it also holds {', '.join(map(_path, stray))}" if stray else "")
                + (f"; it lacks {', '.join(absent)}" if absent else "")
                + " (register_trainable_weights with the parameters of that schedule)")
        out[key] = (opt, {k: ours[id(st)] for k, st in reg.items()})
    return out


def _windowed_training(learner, opts, params, loss_fn, K: int, T: int, chunk: int | None = None):
    """For one ``window=K`` schedule (``step``: K = 1; ``end``: K = T with ``chunk=1``, the
    loop's steps one by one inside the one window): a jitted ``(xs, ys) -> losses`` that
    runs each window through the step-owning loop (``online_gradients(chunk=K)``'s windows:
    windowed D-RTRL and ES-D-RTRL sums; ``backend='native'``'s one-pass D-RTRL kernel and
    ES-D-RTRL outer-accumulate, every step) and applies the window's gradient after it, or
    None when that loop gains nothing (no windowed sum, no rule that needs the loop: the
    per-step loop is then as fast) or cannot run the learner's traces
    (:func:`~.backends.online_driver.driver_error`). The same updates as the per-step loop:
    within a window the parameters do not change."""
    from .backends.online_driver import (_others_out, build_loop, callable_key,
                                         driver_compiler_options, driver_error, grads_by_key,
                                         needs_step_loop, options_key, scan_windows)
    prog = learner._step.program
    if driver_error(prog) is not None:   # what only the learner's own step computes
        return None
    own_loop = needs_step_loop(prog)
    chunk = K if chunk is None else chunk
    if chunk < 2 and not own_loop:
        return None
    states = learner._bound_states()
    ((opt, names),) = opts.values()
    copts = driver_compiler_options(learner.graph)
    ckey = ("train-window", callable_key(loss_fn), K, chunk, T,
            tuple((k, id(v)) for k, v in params.items()), tuple(map(id, states)), id(opt),
            options_key(copts))
    if ckey in learner._drivers:         # compiled by an earlier call
        return learner._cached_driver(ckey, None)
    loop = build_loop(prog, loss_fn, chunk)
    if not (loop.windowed or own_loop):
        return None
    b = prog.b

    def one_window(_, xy):
        th_t, th_p, hidden, others = b.gather(states)
        traces = tuple(t.value for t in learner._traces)
        carry = (tuple(hidden), tuple(others), traces, loop.zero_acc(th_t, th_p))
        (hidden, others, traces, (acc_t, acc_p)), losses = loop.window(carry, xy, th_t, th_p)
        b.scatter(hidden, _others_out(b, others), states)
        for t, v in zip(learner._traces, traces):
            t.value = v
        acc = grads_by_key(prog, acc_t, acc_p, params, states)
        opt.update({ok: acc[n] for ok, n in names.items()})
        return None, losses

    def run(xs, ys):
        return scan_windows(brainstate.transform.scan, one_window, None, xs, ys, K)[1]

    return learner._cached_driver(ckey, lambda: brainstate.transform.jit(
        run, compiler_options=copts))


def train_online(learner, optimizer, inputs, targets, loss_fn: Callable, params=None,
                 reset: bool = True, jit: bool = True):
    """Train online over one sequence, applying every parameter's update at its schedule.

    Args:
        learner: a compiled algorithm (any rule, any backend).
        optimizer: an optimizer with ``update(grads)`` registered on the parameters
            (``braintools.optim``), or, when the parameters have different schedules, a dict
            ``{schedule key: optimizer}`` (keys as :func:`update_schedule` gives them).
        inputs / targets: leading time axis ``(T, ...)``; ``loss_fn(out_t, target_t)`` is the
            per-step scalar loss.
        params: dict of ParamStates to train (default: all of the model's).
        reset: start from reset model states and zero traces (``learner.reset_state()``).
        jit: run the sequence as one jitted loop (memory flat in ``T``).

    Returns:
        the per-step losses ``(T,)``. The parameters and the optimizer's state are updated
        in place; the model's hidden states and the traces are at the end of the sequence.
    """
    learner._require()
    if params is None:
        params = learner.model.states(brainstate.ParamState)
    sched = update_schedule(learner, params)
    groups: dict = {}
    for key, k in sched.items():
        groups.setdefault(k, []).append(key)
    opts = _optimizer_for(optimizer, groups, params)
    leaves = jax.tree.leaves(inputs)
    if not leaves or jnp.ndim(leaves[0]) < 1:
        raise BrainscaleError("inputs need a leading time axis (T, ...)")
    T = int(jnp.shape(leaves[0])[0])
    inputs, targets = start_sequence(learner, inputs, targets, reset)
    only = next(iter(groups)) if len(groups) == 1 else None
    if jit and only is not None:
        if only == "end":     # one window of the whole sequence, its steps one by one
            fast = _windowed_training(learner, opts, params, loss_fn, T, T, chunk=1)
        else:
            K = 1 if only == "step" else int(only.split("=", 1)[1])
            fast = _windowed_training(learner, opts, params, loss_fn, K, T)
        if fast is not None:
            return fast(inputs, targets)
    one = step_gradient(learner, params, loss_fn)

    def zeros():
        return {k: jax.tree.map(jnp.zeros_like, p.value) for k, p in params.items()}

    def apply(key, acc):
        opt, names = opts[key]
        opt.update({ok: acc[n] for ok, n in names.items()})

    def body(acc, txy):
        t, x, y = txy
        g, l = one(x, y)
        acc = {k: jax.tree.map(jnp.add, acc[k], g[k]) if k in g else acc[k] for k in acc}
        for key, names in groups.items():
            sub = {n: acc[n] for n in names}
            zero = {n: jax.tree.map(jnp.zeros_like, v) for n, v in sub.items()}
            if key == "step":
                apply(key, sub)
                new = zero
            else:
                def yes(sub=sub, zero=zero, key=key):
                    apply(key, sub)
                    return zero
                new = brainstate.transform.cond(_due(key, t, T), yes, lambda sub=sub: sub)
            acc.update(new)
        return acc, l

    def run(xs, ys):
        _, losses = brainstate.transform.scan(body, zeros(), (jnp.arange(T), xs, ys))
        return losses

    if jit:
        from .backends.online_driver import (callable_key, driver_compiler_options,
                                             options_key)
        copts = driver_compiler_options(learner.graph)
        key = ("train", callable_key(loss_fn), tuple((k, id(v)) for k, v in params.items()),
               tuple(map(id, learner._bound_states())),
               tuple((k, id(o)) for k, (o, _) in sorted(opts.items())), T, options_key(copts))
        run = learner._cached_driver(key, lambda: brainstate.transform.jit(
            run, compiler_options=copts))
    return run(inputs, targets)
