"""The native D-RTRL rule: param-dim compact traces of matmul ops on the CPU kernel.

Registered for ``('param', 'compact', 'native')``. It is the Pallas rule
(:class:`~..pallas.rules.PallasDrtrlRule`: the same blocks, layout ``(B, I, O, k)`` with
the weight's states stacked, the bias on the op's fused JAX rules) with the launches on
the native kernel (:mod:`.kernel`). As a learner step (custom VJP) that is the update in
the forward and the contraction in the backward; ``one_pass``, which the step-owning loop
calls (``online_gradients`` / ``train_online`` take that loop whenever a rule has it),
reads ``ε^{t-1}`` once, writes ``ε^t`` in place and adds ``Σ δ ε^t`` into the gradient.
With ``chunk = K > 1`` its traces are summed per window instead (:mod:`..drtrl_window`,
the same math on the stacked layout), which is faster when a gradient sum is all that is
needed.

``('io', None, 'native')``: ES-D-RTRL traces of dense matmul ops. The traces and their
signals are the JAX io rule's; ``step_accumulate`` is the kernel's outer-accumulate, with
which the step-owning loop adds each step's ``ε_xᵀ s`` into the gradient sum in place, all
of a step's weights in one kernel call (``step_accumulate_multi``; a
window of ``chunk = K > 1`` steps keeps its one (K·B)-row XLA product). The learner's own
step (custom VJP) computes the same gradient with XLA.
"""
from __future__ import annotations

from ..drtrl_window import allow_window
from ..rules import IORule, register_trace_rule
from ..pallas._common import SUPPORTED_STORAGE
from ..pallas.rules import PallasDrtrlRule
from ..pallas.select import kernel_instances
from .build import why_unavailable
from .kernel import (native_decay_add, native_drtrl_multi, native_outer_acc,
                     native_outer_acc_multi)
from .select import io_native_error

__all__ = ["NativeDrtrlRule", "NativeIORule"]


@allow_window          # online_gradients(chunk=K): summed per window like the JAX rule's
@register_trace_rule("param", "compact", "native")
class NativeDrtrlRule(PallasDrtrlRule):
    """See the module docstring."""
    name = "param/compact/native"

    def check(self, graph, trace) -> str | None:
        why = why_unavailable()
        if why:
            return f"the native kernel cannot run here: {why}"
        for a in trace.arrays:
            if a.storage not in SUPPORTED_STORAGE:
                return (f"the native kernel keeps float32 or bfloat16 traces, {trace.id} "
                        f"stores {a.storage}: lay it out with storage='float32' or "
                        f"'bfloat16' (native-select does)")
        return super().check(graph, trace)

    def _launch(self, items, update: bool, grad: bool):
        return native_drtrl_multi(items, update=update, grad=grad)

    @staticmethod
    def advance_stacked(eps, phi, cur):
        """A window's advance of the stacked weight trace (``drtrl_window``), in place:
        ``Σ_j Φ[.., n, i, j] ε[.., a, n, j] + cur`` on the kernel."""
        return native_decay_add(eps, phi, cur)

    def notes(self, graph, traces) -> tuple:
        out = []
        for t in traces:
            inst, _ = kernel_instances(graph, t)
            shapes = "; ".join(f"{i.rid}/{i.gid} B={i.B} I={i.I} O={i.O} k={i.k}" for i in inst)
            out.append(f"{t.id} ({t.dim}): path={t.path}; {shapes} — "
                       f"{t.attr('path_reason', '')}")
        return tuple(out)


@register_trace_rule("io", None, "native")
class NativeIORule(IORule):
    """See the module docstring."""
    name = "io/native"
    step_accumulate = staticmethod(native_outer_acc)
    step_accumulate_multi = staticmethod(native_outer_acc_multi)

    def check(self, graph, trace) -> str | None:
        why = why_unavailable()
        if why:
            return f"the native kernel cannot run here: {why}"
        why = io_native_error(graph, trace)
        if why:
            return f"{trace.id} cannot take the native outer-accumulate: {why}"
        return None

    def notes(self, graph, traces) -> tuple:
        return tuple(f"{t.id} (io): path={t.path} — {t.attr('path_reason', '')}"
                     for t in traces)
