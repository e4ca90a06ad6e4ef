"""Backends: turn a compiled Graph into a runnable step."""
from .base import (Backend as Backend, CompiledStep as CompiledStep, BACKENDS as BACKENDS,
                   register_backend as register_backend, get_backend as get_backend)
from .jax_backend import JaxBackend as JaxBackend
from . import pallas as pallas  # noqa: E402  (registers backend 'pallas' and 'auto')
from . import native as native  # noqa: E402  (registers backend 'native')
