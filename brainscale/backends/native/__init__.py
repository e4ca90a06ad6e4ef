"""Native CPU backend: the one-pass D-RTRL kernel in C++ (XLA FFI), built on first use.

Importing this package registers the backend ``'native'``, the pass ``'native-select'`` and
the trace rules ``('param', 'compact', 'native')`` (D-RTRL, one pass per step) and
``('io', None, 'native')`` (ES-D-RTRL, the per-step gradient added in place); nothing is
compiled until a learner is compiled with ``backend='native'`` (or a kernel is called). See ``docs/native.md``.
"""
from .build import NativeUnavailable as NativeUnavailable, available as available, \
    why_unavailable as why_unavailable
from .kernel import native_drtrl_multi as native_drtrl_multi, native_drtrl_step as native_drtrl_step, \
    native_decay_add as native_decay_add, native_outer_acc as native_outer_acc, \
    native_outer_acc_multi as native_outer_acc_multi
from .select import NativeSelectPass as NativeSelectPass
from .backend import NativeBackend as NativeBackend, NativeZooBackend as NativeZooBackend

__all__ = ["NativeUnavailable", "available", "why_unavailable", "native_drtrl_multi",
           "native_drtrl_step", "native_decay_add", "native_outer_acc", "native_outer_acc_multi",
           "NativeSelectPass", "NativeBackend",
           "NativeZooBackend"]
