"""Pallas backend: D-RTRL trace kernels (one pass, in place, f32 or bf16 storage), chunked
ES-D-RTRL gradients, per-trace selection recorded in the IR. See ``docs/pallas.md``.

Importing this package registers the backends ``'pallas'`` and ``'auto'`` and the pass
``'pallas-select'``. On a machine without a (cc >= 8.0 CUDA) GPU every kernel runs in
interpret mode, for tests.

Kernels (each with a pure-JAX ``*_reference`` beside it):

* :func:`drtrl_step` / :func:`drtrl_update` / :func:`drtrl_grad` / :func:`drtrl_multi`
  (module :mod:`.drtrl`);
* :func:`es_chunked_grad` (module :mod:`.es_chunked`).
"""
from ._common import Tiles as Tiles, platform as platform
from .drtrl import (DrtrlItem as DrtrlItem, drtrl_kernel as drtrl_kernel, drtrl_multi as drtrl_multi,
                    drtrl_step as drtrl_step, drtrl_update as drtrl_update, drtrl_grad as drtrl_grad,
                    drtrl_reference as drtrl_reference, drtrl_tiles as drtrl_tiles)
from .es_chunked import (EsTiles as EsTiles, es_chunked_grad as es_chunked_grad,
                         es_chunked_grad_kernel as es_chunked_grad_kernel,
                         es_chunked_grad_reference as es_chunked_grad_reference,
                         es_perstep_grad_reference as es_perstep_grad_reference,
                         es_accumulate as es_accumulate)
from .cost_model import CostModel as CostModel, BUILTIN as BUILTIN, load_cost_model as load_cost_model
from .select import PallasSelectPass as PallasSelectPass, unsupported_traces as unsupported_traces
from .backend import PallasBackend as PallasBackend, AutoBackend as AutoBackend
from .driver import fused_online_gradients as fused_online_gradients

__all__ = ["Tiles", "platform", "DrtrlItem", "drtrl_kernel", "drtrl_multi", "drtrl_step",
           "drtrl_update", "drtrl_grad", "drtrl_reference", "drtrl_tiles", "EsTiles",
           "es_chunked_grad", "es_chunked_grad_kernel", "es_chunked_grad_reference",
           "es_perstep_grad_reference", "es_accumulate", "CostModel", "BUILTIN",
           "load_cost_model", "PallasSelectPass", "unsupported_traces", "PallasBackend",
           "AutoBackend", "fused_online_gradients"]
