"""A dense, obviously-correct reference of the online learning algorithms.

This module is a test oracle. It is deliberately independent of the compiler in
``brainscale/`` (frontend, passes, backends): it only uses ``brainscale.concepts`` to
recognise trace-op marker equations and ``brainscale._compat`` to walk a jaxpr.

Everything is dense: all hidden-state leaves (every batch element included) are flattened
into one vector ``h`` of length ``N``, and the one-step Jacobians are computed with
``jax.jacfwd``. The equations (see ``docs/algorithms.md``, sections 3-4) are then applied
literally in a Python loop.

Definitions used at each step ``t`` (``(h^{t-1}, u^t, θ) -> (h^t, out^t)``):

* ``F_inj(h_prev, ys)``: the step with every marker output ``y_q`` replaced by ``ys[q]``.
  ``J = ∂F_inj/∂h_prev`` (N×N), ``D_q = ∂F_inj/∂ys[q]`` (N×|y_q|).
* ``G_q = ∂y_q/∂θ_q`` at ``(x_q, θ_q)`` (|y_q|×|θ_q|, θ flattened over all its leaves).
* ``Ω(η, ζ, θ_plain, u)``: a dual evaluation of the jaxpr (environments ``m`` and ``s``)
  in which the new value of hidden state ``i`` carries ``η_i`` and the "spatial" gradient
  path of env ``s``, and marker ``q`` carries ``ζ_q`` in env ``m`` only. With
  ``L = loss_fn(out)``: ``δ = ∂L/∂η``, ``c_q = ∂L/∂ζ_q`` (direct signal),
  ``g_plain = ∂L/∂θ_plain``.
* D-RTRL: ``E_q = J E_q + D_q G_q``; ``∇θ_q = δᵀE_q + xy_to_dw(x_q, c_q)``.
* ES-D-RTRL: ``ε_x = α ε_x + x_q``; ``ε_f = α J ε_f + (1-α) D_q``;
  ``∇θ_q = vjp_w(op(ε_x, ·))(δᵀε_f) + xy_to_dw(x_q, c_q)``. Ops without input use D-RTRL.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import brainstate
import brainunit as u
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from brainscale._compat import (JIT_NAMES, closed_consts, inline_calls, is_literal, literal_value,
                                open_jaxpr)
from brainscale.concepts import MARKER_PREFIX, ETraceParam, is_hidden_state, lookup_op

__all__ = ["DenseOracle", "bptt_grads", "alpha_of"]

sg = jax.lax.stop_gradient


def alpha_of(decay_or_rank) -> float:
    """``decay_or_rank``: a float is ``α``; an int ``r > 0`` means ``α = (r-1)/(r+1)``."""
    if isinstance(decay_or_rank, (bool, np.bool_)):
        raise TypeError("decay_or_rank must be a float or an int")
    if isinstance(decay_or_rank, (int, np.integer)):
        r = int(decay_or_rank)
        if r <= 0:
            raise ValueError(f"rank must be > 0, got {r}")
        return (r - 1) / (r + 1)
    a = float(decay_or_rank)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {a}")
    return a


def _mantissa(x):
    return u.get_mantissa(x) if isinstance(x, u.Quantity) else x


def _is_float(aval_or_x) -> bool:
    return jnp.issubdtype(jnp.result_type(getattr(aval_or_x, "dtype", aval_or_x)), jnp.inexact)


def eval_eqn(eqn, invals) -> list:
    """Evaluate one equation (the body of ``jax.core.eval_jaxpr``), on any jax version.

    ``get_bind_params`` returns ``params`` on jax >= 0.5 and ``(subfuns, params)`` before;
    ``brainscale._compat.eval_eqn`` assumes the old form, so the oracle uses its own.
    """
    bp = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bp, tuple) and len(bp) == 2 and isinstance(bp[1], dict):
        subfuns, params = bp
    else:
        subfuns, params = (), bp
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is not None:
        with ctx:
            ans = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        ans = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(ans) if eqn.primitive.multiple_results else [ans]


def _read(env, v):
    return literal_value(v) if is_literal(v) else env[v]


def _is_marker(eqn) -> bool:
    return (eqn.primitive.name in JIT_NAMES
            and str(eqn.params.get("name", "")).startswith(MARKER_PREFIX)
            and lookup_op(eqn.params["name"]) is not None)


def _state_paths(model) -> dict:
    """id(state) -> path tuple in ``model.states()``."""
    out = {}
    if model is None:
        return out
    for path, st in model.states().items():
        out.setdefault(id(st), tuple(path))
    return out


def _call_loss(loss_fn, out, target, has_target):
    val = loss_fn(out, target) if has_target else loss_fn(out)
    return jnp.asarray(_mantissa(val)).astype(jnp.float32).sum()


class _Op:
    """One recognised trace-op application (marker equation) in the inlined jaxpr."""

    def __init__(self, index, eqn_pos, eqn, op, param_idx, n_x):
        self.index = index          # op_index: order among recognised marker eqns
        self.eqn_pos = eqn_pos      # position in jaxpr.eqns
        self.eqn = eqn
        self.op = op
        self.param_idx = param_idx  # index into DenseOracle._states
        self.x_vars = list(eqn.invars[:n_x])
        self.w_vars = list(eqn.invars[n_x:])
        if len(eqn.outvars) != 1:
            raise ValueError(f"marker equation {eqn.params['name']} has {len(eqn.outvars)} "
                             f"outputs; the oracle supports ops with a single output array")
        self.y_var = eqn.outvars[0]
        self.y_shape = tuple(self.y_var.aval.shape)
        self.y_size = int(np.prod(self.y_shape, dtype=int))

    def apply(self, x_leaves, w_leaves):
        x_leaves = list(x_leaves)
        if x_leaves and not jnp.issubdtype(self.x_vars[0].aval.dtype, jnp.inexact) and \
                jnp.issubdtype(jnp.result_type(x_leaves[0]), jnp.inexact):
            # a float ε_x for an op traced on boolean/integer input: the op's own math
            w = jax.tree.unflatten(self.w_treedef, list(w_leaves))
            return self.op.xw_to_y(x_leaves[0], w).astype(self.y_var.aval.dtype)
        return eval_eqn(self.eqn, x_leaves + list(w_leaves))[0]

    @property
    def x_key(self):
        if not self.x_vars:
            return None
        if any(is_literal(v) for v in self.x_vars):
            return ("op", self.index)
        return tuple(self.x_vars)


class DenseOracle:
    """Dense reference of D-RTRL (``algorithm='param'``) and ES-D-RTRL (``algorithm='io'``).

    Args:
        model: a ``brainstate.nn.Module`` (states are read from / written back to it; paths
            come from ``model.states()``).
        *example_args: example arguments of one step, used to trace the step.
        algorithm: ``'param'`` (D-RTRL) or ``'io'`` (ES-D-RTRL).
        decay_or_rank: for ``'io'``: a float ``α`` or an int rank ``r`` (α=(r-1)/(r+1)).
        loss_fn: ``loss_fn(out) -> scalar`` (the loss at one step, on the step's output).
            It may be overridden per step with ``step(..., loss_fn=..., target=...)``; with a
            target it is called as ``loss_fn(out, target)``.
        step_fn: callable taking ``*args`` (defaults to ``model.update``).
        jacobian: ``'cut'`` (D-RTRL's J: the paths through op outputs injected, i.e. cut) or
            ``'block'`` (the full step Jacobian, every path, masked to its per-neuron blocks:
            entries between the same element of the hidden states; all hidden states must
            have one shape, i.e. one neuron group).
        readout: ``'trace'`` (the gradient is ``δ^t · E^t``, or ``ε_x^t ⊗ (δ^t · ε_f^t)``) or
            ``'step'`` (the last step exact: ``∂L^t/∂θ`` with ``h^{t-1}`` fixed, every path,
            plus ``∂L^t/∂h^{t-1}`` (autodiff of the whole step) times the previous trace).
    """

    def __init__(self, model, *example_args, algorithm: str = "param", decay_or_rank=None,
                 loss_fn: Callable | None = None, step_fn: Callable | None = None,
                 jacobian: str = "cut", readout: str = "trace"):
        if algorithm not in ("param", "io"):
            raise ValueError(f"algorithm must be 'param' or 'io', got {algorithm!r}")
        if jacobian not in ("cut", "block"):
            raise ValueError(f"jacobian must be 'cut' or 'block', got {jacobian!r}")
        if readout not in ("trace", "step"):
            raise ValueError(f"readout must be 'trace' or 'step', got {readout!r}")
        self.jacobian, self.readout = jacobian, readout
        self.model = model
        self.algorithm = algorithm
        self.alpha = alpha_of(decay_or_rank) if algorithm == "io" else None
        if algorithm == "io" and decay_or_rank is None:
            raise ValueError("algorithm='io' needs decay_or_rank")
        self.loss_fn = loss_fn
        self.step_fn = step_fn if step_fn is not None else model.update
        self._trace(example_args)
        self.reset_traces()

    # ------------------------------------------------------------------ tracing / analysis
    def _trace(self, args):
        sf = brainstate.transform.StatefulFunction(self.step_fn, return_only_write=False)
        sf.make_jaxpr(*args)
        closed = inline_calls(sf.get_jaxpr(*args))
        states = list(sf.get_states(*args))
        self._sf = sf
        self._closed = closed
        self._jaxpr = jaxpr = open_jaxpr(closed)
        self._consts = closed_consts(closed)
        self._states = states
        self._out_treedef = sf.get_out_treedef(*args).children()[0]

        paths = _state_paths(self.model)
        self._paths = [paths.get(id(st), ("<external>", i)) for i, st in enumerate(states)]
        self._state_treedefs = [jax.tree.structure(st.value) for st in states]
        n_state_leaves = [len(jax.tree.leaves(st.value)) for st in states]
        self._n_arg = len(jax.tree.leaves(args))
        self._arg_treedef = jax.tree.structure(args)

        invars, outvars = list(jaxpr.invars), list(jaxpr.outvars)
        if len(invars) != self._n_arg + sum(n_state_leaves):
            raise RuntimeError("jaxpr invars do not match the leaves of (args, states)")
        self._n_out = len(outvars) - sum(n_state_leaves)
        if self._n_out < 0:
            raise RuntimeError("jaxpr outvars do not match the leaves of (out, states)")

        # per state: positions of its leaves among invars / outvars
        self._st_in, self._st_out = [], []
        pi, po = self._n_arg, self._n_out
        for n in n_state_leaves:
            self._st_in.append(list(range(pi, pi + n)))
            self._st_out.append(list(range(po, po + n)))
            pi += n
            po += n

        # written states
        self._written = [any(outvars[o] is not invars[i] for i, o in zip(ins, outs))
                         for ins, outs in zip(self._st_in, self._st_out)]

        # hidden leaves: (state idx, in pos, out pos, shape)
        self._hidden = []
        for si, st in enumerate(states):
            if is_hidden_state(st) and self._written[si]:
                if not all(_is_float(invars[i].aval) for i in self._st_in[si]):
                    # an integer / boolean state has no derivative: it enters J as a constant
                    continue
                for i, o in zip(self._st_in[si], self._st_out[si]):
                    self._hidden.append((si, i, o, tuple(invars[i].aval.shape)))
        self.hidden_names = [(self._paths[si], shape) for si, _, _, shape in self._hidden]
        self._h_sizes = [int(np.prod(s, dtype=int)) for *_, s in self._hidden]
        self.N = int(sum(self._h_sizes))
        hidden_in_pos = {i for _, i, _, _ in self._hidden}
        self._hidden_in_pos = hidden_in_pos

        # marker equations and the ETraceParam whose leaves they read as w
        cand = []
        for si, st in enumerate(states):
            if isinstance(st, ETraceParam) and st.is_etrace and self._st_in[si]:
                cand.append((si, [invars[i] for i in self._st_in[si]]))
        self._ops: list[_Op] = []
        for pos, eqn in enumerate(jaxpr.eqns):
            if not _is_marker(eqn):
                continue
            match = None
            for si, pvars in cand:
                k = len(pvars)
                tail = eqn.invars[-k:] if len(eqn.invars) >= k else []
                if len(tail) == k and all(a is b for a, b in zip(tail, pvars)):
                    match = (si, len(eqn.invars) - k)
                    break
            if match is None:
                continue  # not applied to a trace param: evaluated as an ordinary equation
            self._ops.append(_Op(len(self._ops), pos, eqn, lookup_op(eqn.params["name"]),
                                 match[0], match[1]))
            mant = jax.tree.map(lambda l: getattr(l, "mantissa", l), states[match[0]].value,
                                is_leaf=lambda l: hasattr(l, "mantissa"))
            self._ops[-1].w_treedef = jax.tree.structure(mant)
        self._op_at = {op.eqn_pos: op for op in self._ops}
        self.trace_param_idx = sorted({op.param_idx for op in self._ops})
        self.plain_param_idx = [si for si, st in enumerate(states)
                                if isinstance(st, brainstate.ParamState)
                                and si not in self.trace_param_idx]
        self._trace_in_pos = {i for si in self.trace_param_idx for i in self._st_in[si]}
        self._plain_in_pos = [i for si in self.plain_param_idx for i in self._st_in[si]
                              if _is_float(invars[i].aval)]
        self._float_arg_pos = [i for i in range(self._n_arg) if _is_float(invars[i].aval)]
        self._float_out_pos = [o for o in range(self._n_out) if _is_float(outvars[o].aval)]
        # hidden new-value vars -> list of hidden indices
        self._hnew = {}
        for k, (_, _, o, _) in enumerate(self._hidden):
            v = outvars[o]
            if not is_literal(v):
                self._hnew.setdefault(v, []).append(k)

        self.op_params = [(op.index, self._paths[op.param_idx]) for op in self._ops]
        self.trace_param_paths = [self._paths[si] for si in self.trace_param_idx]
        self.plain_param_paths = [self._paths[si] for si in self.plain_param_idx]
        self._x_keys = []
        for op in self._ops:
            if op.x_key is not None and op.x_key not in self._x_keys:
                self._x_keys.append(op.x_key)
        self._core1 = jax.jit(self._forward_and_jacobians)
        self._core2 = jax.jit(self._omega_vjp)

    def reset_traces(self):
        """Set every trace to zero (as at t=0)."""
        th = {op.index: sum(int(np.prod(v.aval.shape, dtype=int)) for v in op.w_vars)
              for op in self._ops}
        self._E = {op.index: jnp.zeros((self.N, th[op.index]), jnp.float32) for op in self._ops}
        self._eps_f = {op.index: jnp.zeros((self.N, op.y_size), jnp.float32) for op in self._ops}
        self._eps_x = {}  # x_key -> list of leaves (lazily zero)

    # ------------------------------------------------------------------ evaluators
    def _env0(self, invals):
        env = {}
        for v, c in zip(self._jaxpr.constvars, self._consts):
            env[v] = c
        for v, x in zip(self._jaxpr.invars, invals):
            env[v] = x
        return env

    def _forward(self, invals, ys=None):
        """Evaluate the jaxpr; with ``ys`` the marker outputs are replaced (F_inj).

        Returns (env, xs, ws) with xs/ws the marker input leaves per op.
        """
        env = self._env0(invals)
        xs, ws = {}, {}
        for pos, eqn in enumerate(self._jaxpr.eqns):
            op = self._op_at.get(pos)
            ins = [_read(env, v) for v in eqn.invars]
            if op is not None:
                n_x = len(op.x_vars)
                xs[op.index], ws[op.index] = ins[:n_x], ins[n_x:]
                if ys is not None:
                    env[op.y_var] = jnp.reshape(ys[op.index], op.y_shape).astype(op.y_var.aval.dtype)
                    continue
            outs = eval_eqn(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                env[v] = o
        return env, xs, ws

    def _flat_h(self, leaves):
        if not leaves:
            return jnp.zeros((0,), jnp.float32)
        return jnp.concatenate([jnp.ravel(jnp.asarray(l)).astype(jnp.float32) for l in leaves])

    def _unflat_h(self, flat):
        out, p = [], 0
        for (_, i, _, shape), n in zip(self._hidden, self._h_sizes):
            dt = self._jaxpr.invars[i].aval.dtype
            out.append(jnp.reshape(flat[p:p + n], shape).astype(dt))
            p += n
        return out

    def _forward_and_jacobians(self, invals):
        invals = list(invals)
        outvars = self._jaxpr.outvars
        env, xs, ws = self._forward(invals)
        outs = [_read(env, v) for v in outvars]
        ys = {op.index: jnp.ravel(env[op.y_var]).astype(jnp.float32) for op in self._ops}

        def f_inj(h_flat, ys_list):
            vals = list(invals)
            for (_, i, _, _), leaf in zip(self._hidden, self._unflat_h(h_flat)):
                vals[i] = leaf
            e, _, _ = self._forward(vals, ys=dict(zip([op.index for op in self._ops], ys_list)))
            return self._flat_h([_read(e, outvars[o]) for _, _, o, _ in self._hidden])

        h_prev = self._flat_h([invals[i] for _, i, _, _ in self._hidden])
        ys_list = [ys[op.index] for op in self._ops]
        J, Ds = jax.jacfwd(f_inj, argnums=(0, 1))(h_prev, ys_list)
        if self.jacobian == "block":
            def f_full(h_flat):
                vals = list(invals)
                for (_, i, _, _), leaf in zip(self._hidden, self._unflat_h(h_flat)):
                    vals[i] = leaf
                e, _, _ = self._forward(vals)
                return self._flat_h([_read(e, outvars[o]) for _, _, o, _ in self._hidden])
            if len(set(self._h_sizes)) != 1:
                raise ValueError("jacobian='block' needs hidden states of one shape")
            elem = np.concatenate([np.arange(n) for n in self._h_sizes])
            J = jax.jacfwd(f_full)(h_prev) * jnp.asarray(elem[:, None] == elem[None, :])

        Gs = []
        for op in self._ops:
            wflat, unravel = ravel_pytree(list(ws[op.index]))

            def y_of_w(wf, op=op, unravel=unravel):
                return jnp.ravel(op.apply(xs[op.index], unravel(wf))).astype(jnp.float32)

            Gs.append(jax.jacfwd(y_of_w)(wflat))
        return outs, xs, ws, J, list(Ds), Gs

    def _omega(self, diff, invals):
        """Ω: the dual (m, s) evaluation; returns the float function-output leaves of env m."""
        invals = list(invals)
        jaxpr = self._jaxpr
        env_m, env_s = {}, {}
        for v, c in zip(jaxpr.constvars, self._consts):
            env_m[v] = env_s[v] = c
        plain = dict(zip(self._plain_in_pos, diff["plain"]))
        args = dict(zip(self._float_arg_pos, diff["args"]))
        for i, v in enumerate(jaxpr.invars):
            x = invals[i]
            if i in self._hidden_in_pos or i in self._trace_in_pos:
                x = sg(x)
            elif i in plain:
                x = plain[i]
            elif i in args:
                x = args[i]
            env_m[v] = env_s[v] = x

        eta = diff["eta"]

        def mark_hidden(var):
            ks = self._hnew.get(var)
            if not ks:
                return
            add = sum(jnp.reshape(eta[k], self._hidden[k][3]) for k in ks)
            vm, vs = env_m[var], env_s[var]
            env_m[var] = sg(vm) + add.astype(jnp.result_type(vm)) + (vs - sg(vs))

        for v in jaxpr.invars:
            mark_hidden(v)
        for pos, eqn in enumerate(jaxpr.eqns):
            op = self._op_at.get(pos)
            if op is not None:
                x_m = [_read(env_m, v) for v in op.x_vars]
                w = [sg(_read(env_m, v)) for v in op.w_vars]
                y_s = op.apply(x_m, w)
                env_s[op.y_var] = y_s
                env_m[op.y_var] = y_s + jnp.reshape(diff["zeta"][op.index], op.y_shape).astype(y_s.dtype)
            else:
                outs_m = eval_eqn(eqn, [_read(env_m, v) for v in eqn.invars])
                outs_s = eval_eqn(eqn, [_read(env_s, v) for v in eqn.invars])
                for v, a, b in zip(eqn.outvars, outs_m, outs_s):
                    env_m[v] = a
                    env_s[v] = b
            for v in eqn.outvars:
                mark_hidden(v)
        return [_read(env_m, jaxpr.outvars[o]) for o in self._float_out_pos]

    def _omega_vjp(self, invals, cot):
        invals = list(invals)
        diff = {
            "eta": [jnp.zeros((n,), jnp.float32) for n in self._h_sizes],
            "zeta": [jnp.zeros((op.y_size,), jnp.float32) for op in self._ops],
            "plain": [invals[i] for i in self._plain_in_pos],
            "args": [invals[i] for i in self._float_arg_pos],
        }
        outs, vjp = jax.vjp(lambda d: self._omega(d, invals), diff)
        cot = [jnp.asarray(c).astype(o.dtype) for c, o in zip(cot, outs)]
        return vjp(cot)[0]

    # ------------------------------------------------------------------ one step
    def _current_invals(self, args):
        arg_leaves = jax.tree.leaves(args)
        if len(arg_leaves) != self._n_arg:
            raise ValueError("step arguments do not have the structure of the example arguments")
        vals = [jnp.asarray(_mantissa(a)) for a in arg_leaves]
        for st in self._states:
            vals.extend(jnp.asarray(l) for l in jax.tree.leaves(st.value))
        return vals

    def step(self, *args, loss_fn: Callable | None = None, target: Any = None) -> dict:
        """Advance the model one step, update the traces, and return the gradients at t.

        Returns a dict with keys
          * ``'grads'``: ``{param_path: grad_tree}`` for trace params and plain params
            (same tree as the param value; Quantity params get the param's unit back);
          * ``'delta'``: flat δ^t (np.ndarray, length N, in ``hidden_names`` order);
          * ``'J'``: dense J^t (N×N np.ndarray); ``'D'``: ``{op_index: D_q (N×|y_q|)}``;
          * ``'direct'``: ``{op_index: c_q}`` (direct signal, shaped like y_q);
          * ``'x'``: ``{op_index: x_q leaves}``;
          * ``'out'``: the step output (with units if any); ``'loss'``: L^t;
          * ``'traces'``: for ``'param'`` ``{(op_index, param_path): E_q (N×|θ|)}``; for
            ``'io'`` ``{'x': {op_index: ε_x}, 'f': {(op_index, param_path): ε_f (N×|y|)},
            'param': {(op_index, param_path): E_q}}`` (the last for ops without an input);
          * ``'hidden_names'``: list of (state path, shape) in flattening order;
          * ``'arg_grads'``: gradients of L^t w.r.t. the float argument leaves (list).
        """
        loss_fn = loss_fn if loss_fn is not None else self.loss_fn
        if loss_fn is None:
            raise ValueError("no loss_fn given")
        has_target = target is not None
        invals = self._current_invals(args)
        outs, xs, ws, J, Ds, Gs = self._core1(invals)

        # loss gradient w.r.t. the (float) output leaves
        out_leaves = outs[:self._n_out]
        out_tree = jax.tree.unflatten(self._out_treedef, out_leaves)
        fpos = self._float_out_pos

        def L_of(float_leaves):
            leaves = list(out_leaves)
            for p, l in zip(fpos, float_leaves):
                leaves[p] = l
            return _call_loss(loss_fn, jax.tree.unflatten(self._out_treedef, leaves),
                              target, has_target)

        float_outs = [out_leaves[p] for p in fpos]
        loss, cot = jax.value_and_grad(L_of)(float_outs)
        g = self._core2(invals, cot)
        delta = self._flat_h(list(g["eta"]))
        cs = {op.index: jnp.reshape(g["zeta"][op.index], op.y_shape) for op in self._ops}

        # per-op gradient pieces
        grads_leaves = {}  # state idx -> list of leaves (mantissa)

        def acc(si, leaves):
            if si in grads_leaves:
                grads_leaves[si] = [a + b for a, b in zip(grads_leaves[si], leaves)]
            else:
                grads_leaves[si] = list(leaves)

        step_read = self.readout == "step"
        if step_read:
            # the whole step differentiated in (h^{t-1}, θ): ∂L^t/∂h^{t-1} and ∂L^t/∂θ|h
            tp_pos = [i for si in self.trace_param_idx for i in self._st_in[si]]

            def L_full(h_flat, tp_leaves):
                vals = list(invals)
                for (_, i, _, _), leaf in zip(self._hidden, self._unflat_h(h_flat)):
                    vals[i] = leaf
                for i, leaf in zip(tp_pos, tp_leaves):
                    vals[i] = leaf
                e, _, _ = self._forward(vals)
                return L_of([_read(e, self._jaxpr.outvars[p]) for p in fpos])
            h_prev = self._flat_h([invals[i] for _, i, _, _ in self._hidden])
            dh_prev, dtp = jax.grad(L_full, argnums=(0, 1))(h_prev, [invals[i] for i in tp_pos])
            k = 0
            for si in self.trace_param_idx:
                n = len(self._st_in[si])
                acc(si, dtp[k:k + n])
                k += n
            E_old, eps_f_old, eps_x_old = dict(self._E), dict(self._eps_f), dict(self._eps_x)

        alpha = self.alpha
        new_eps_x = {}
        if self.algorithm == "io":
            for op in self._ops:
                if op.x_key is None or op.x_key in new_eps_x:
                    continue
                prev = self._eps_x.get(op.x_key)
                cur = [jnp.asarray(x, dtype=jnp.result_type(float)) if not
                       jnp.issubdtype(jnp.result_type(x), jnp.inexact) else jnp.asarray(x)
                       for x in xs[op.index]]
                new_eps_x[op.x_key] = cur if prev is None else [alpha * p + c for p, c in zip(prev, cur)]

        traces = {}
        traces_io = {"x": {}, "f": {}, "param": {}}
        for op, D, G in zip(self._ops, Ds, Gs):
            path = self._paths[op.param_idx]
            w = list(ws[op.index])
            x = list(xs[op.index])
            # direct gradient: VJP of w -> op(x_q, w) with the direct signal c_q
            _, vjp_w = jax.vjp(lambda ww, x=x, op=op: op.apply(x, ww), w)
            direct = vjp_w(cs[op.index].astype(op.y_var.aval.dtype))[0]
            if not step_read:
                acc(op.param_idx, direct)
            _, unravel = ravel_pytree(w)
            if self.algorithm == "param" or op.x_key is None:
                E = J @ self._E[op.index] + D @ G
                self._E[op.index] = E
                acc(op.param_idx, unravel(dh_prev @ E_old[op.index] if step_read
                                          else delta @ E))
                if self.algorithm == "param":
                    traces[(op.index, path)] = np.asarray(E)
                else:
                    traces_io["param"][(op.index, path)] = np.asarray(E)
            else:
                eps_f = alpha * (J @ self._eps_f[op.index]) + (1.0 - alpha) * D
                self._eps_f[op.index] = eps_f
                ex = new_eps_x[op.x_key]
                if step_read:           # the previous factors (zero before the first step)
                    ex_r = eps_x_old.get(op.x_key, [jnp.zeros_like(e) for e in ex])
                    c = dh_prev @ eps_f_old[op.index]
                else:
                    ex_r, c = ex, delta @ eps_f
                c = jnp.reshape(c, op.y_shape).astype(op.y_var.aval.dtype)
                _, vjp_e = jax.vjp(lambda ww, ex=ex_r, op=op: op.apply(ex, ww), w)
                acc(op.param_idx, vjp_e(c)[0])
                traces_io["x"][op.index] = (np.asarray(ex[0]) if len(ex) == 1
                                            else [np.asarray(e) for e in ex])
                traces_io["f"][(op.index, path)] = np.asarray(eps_f)
        self._eps_x.update(new_eps_x)

        # plain params
        plain_g = dict(zip(self._plain_in_pos, g["plain"]))
        for si in self.plain_param_idx:
            leaves = []
            for i in self._st_in[si]:
                leaves.append(plain_g[i] if i in plain_g else jnp.zeros_like(invals[i]))
            acc(si, leaves)

        grads = {}
        for si in self.trace_param_idx + self.plain_param_idx:
            grads[self._paths[si]] = jax.tree.unflatten(self._state_treedefs[si],
                                                        [jnp.asarray(l) for l in grads_leaves[si]])

        # write new state values back
        for si, st in enumerate(self._states):
            if self._written[si]:
                leaves = [outs[o] for o in self._st_out[si]]
                st.value = jax.tree.unflatten(self._state_treedefs[si], leaves)

        return {
            "grads": grads,
            "delta": np.asarray(delta),
            "J": np.asarray(J),
            "D": {op.index: np.asarray(D) for op, D in zip(self._ops, Ds)},
            "direct": {k: np.asarray(v) for k, v in cs.items()},
            "x": {op.index: [np.asarray(a) for a in xs[op.index]] for op in self._ops},
            "out": out_tree,
            "loss": float(loss),
            "traces": traces if self.algorithm == "param" else traces_io,
            "hidden_names": list(self.hidden_names),
            "arg_grads": [np.asarray(a) for a in g["args"]],
        }


# ---------------------------------------------------------------------------- BPTT
def _as_args(x):
    return tuple(x) if isinstance(x, tuple) else (x,)


def bptt_grads(model, xs: Sequence[Any], loss_fn: Callable, params=None, targets=None,
               step_fn: Callable | None = None) -> dict:
    """Exact BPTT gradient of ``Σ_t loss_fn(out^t)`` (or ``loss_fn(out^t, targets[t])``).

    Args:
        model: the brainstate module.
        xs: per-step arguments; ``xs[t]`` is a tuple of arguments or a single argument
            (an array with a leading time axis works: it is indexed along axis 0).
        loss_fn: per-step loss.
        params: ``{path: ParamState}`` (default: every ParamState of ``model``).
        targets: optional per-step targets, passed as the second argument of ``loss_fn``.
        step_fn: defaults to ``model.update``.

    The model's states are restored to their values before the call. Returns
    ``{path: grad}`` (same keys as ``params``).
    """
    step_fn = step_fn if step_fn is not None else model.update
    if params is None:
        params = {tuple(k): v for k, v in model.states(brainstate.ParamState).items()}
    params = dict(params)
    all_states = list(model.states().values())
    saved = [st.value for st in all_states]
    T = len(xs)

    def total():
        L = 0.0
        for t in range(T):
            out = step_fn(*_as_args(xs[t]))
            if targets is None:
                L = L + _call_loss(loss_fn, out, None, False)
            else:
                L = L + _call_loss(loss_fn, out, targets[t], True)
        return L

    try:
        grads = brainstate.transform.grad(total, grad_states=params)()
    finally:
        for st, v in zip(all_states, saved):
            st.value = v
    return dict(grads)
