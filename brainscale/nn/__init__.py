"""``brainscale.nn``: neural-network modules ready for online learning.

Built on ``brainstate``; ``brainpy`` is optional. When ``brainpy.state`` is installed the
neurons and synapses are ``brainpy.state`` dynamics (brainpy's and brainstate's projections
accept them) and ``DualExpon``, ``STP``, ``STD`` are forwarded to ``brainpy.state`` as in
brainscale 0.1; without it they keep the same interface (see ``docs/nn.md``):

* hidden states are :class:`brainscale.ETraceState` (created in ``init_state(batch_size)``);
* every learnable interaction between neurons is an :class:`brainscale.ETraceParam` applied
  through a trace op (``MatMulOp``, ``ConvOp``, ``SpMatMulOp``, ``LoraOp``, ``ElemWiseOp``);
* everything else in a step is element-wise over neurons,

so ``brainscale.DiagParamDimAlgorithm`` / ``DiagIODimAlgorithm`` compile them exactly.

Modules:

* base: :class:`Dynamics` (input accumulation), :class:`Neuron`, :class:`Synapse`
* neurons: :class:`IF`, :class:`LIF`, :class:`ALIF`, :class:`GIF`, :class:`Izhikevich`
* synapses / outputs / projections: :class:`Expon`, :class:`Alpha`, :class:`SynOut`,
  :class:`CUBA`, :class:`COBA`, :class:`DeltaProj`, :class:`CurrentProj`,
  :class:`AlignPostProj`
* layers: :class:`Linear`, :class:`SignedWLinear`, :class:`SparseLinear`, :class:`LoRA`,
  :class:`Conv1d`, :class:`Conv2d`, :class:`Conv3d`
* normalisation: :class:`ScaleShift` (traced, element-wise), :class:`LayerNorm`,
  :class:`RMSNorm`, :class:`GroupNorm`, :class:`BatchNorm0d` ... :class:`BatchNorm3d`
  (0.1's layout: the affine is one parameter applied by :class:`ScaleOp`)
* recurrent cells (0.1's equations, names and defaults): :class:`RNNCell`,
  :class:`ValinaRNNCell`, :class:`GRUCell`, :class:`MGUCell`, :class:`LSTMCell`,
  :class:`URLSTMCell`, :class:`MinimalRNNCell`, :class:`MiniGRU`, :class:`MiniLSTM`,
  :class:`LRUCell`
* readouts: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`
"""
from ._base import HAS_BRAINPY, Dynamics, Neuron, Synapse
from ._conv import Conv1d, Conv2d, Conv3d
from ._linear import LoRA, Linear, SignedWLinear, SparseLinear
from ._neurons import ALIF, GIF, IF, LIF, Izhikevich
from ._normalizations import (BatchNorm0d, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm,
                              LayerNorm, RMSNorm, ScaleOp, ScaleShift)
from ._readout import LeakyRateReadout, LeakySpikeReadout
from ._rnn import (GRUCell, LRUCell, LSTMCell, MGUCell, MiniGRU, MiniLSTM, MinimalRNNCell,
                   RNNCell, URLSTMCell, ValinaRNNCell)
from ._synapses import COBA, CUBA, AlignPostProj, Alpha, CurrentProj, DeltaProj, Expon, SynOut

__all__ = [
    "Dynamics", "Neuron", "Synapse",
    "IF", "LIF", "ALIF", "GIF", "Izhikevich",
    "Expon", "Alpha", "SynOut", "CUBA", "COBA", "DeltaProj", "CurrentProj", "AlignPostProj",
    "Linear", "SignedWLinear", "SparseLinear", "LoRA", "Conv1d", "Conv2d", "Conv3d",
    "ScaleShift", "ScaleOp", "LayerNorm", "RMSNorm", "GroupNorm",
    "BatchNorm0d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "RNNCell", "ValinaRNNCell", "GRUCell", "MGUCell", "LSTMCell", "URLSTMCell",
    "MinimalRNNCell", "MiniGRU", "MiniLSTM", "LRUCell",
    "LeakyRateReadout", "LeakySpikeReadout",
]

#: brainscale 0.1 forwarded these to ``brainpy.state`` (it had no own implementation)
_BRAINPY_FORWARDS = ("DualExpon", "STP", "STD")
#: brainscale 0.1 forwarded these to ``brainstate.nn`` (activations, dropout, pooling, ...)
_BRAINSTATE_FORWARDS = (
    "ReLU", "RReLU", "Hardtanh", "ReLU6", "Sigmoid", "Hardsigmoid", "Tanh", "SiLU", "Mish",
    "Hardswish", "ELU", "CELU", "SELU", "GLU", "GELU", "Hardshrink", "LeakyReLU", "LogSigmoid",
    "Softplus", "Softshrink", "PReLU", "Softsign", "Tanhshrink", "Softmin", "Softmax",
    "Softmax2d", "LogSoftmax", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity",
    "SpikeBitwise", "Flatten", "Unflatten", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
)


def __getattr__(name):
    """0.1's forwarded names, with a DeprecationWarning naming where they live."""
    import warnings
    if name in _BRAINPY_FORWARDS:
        try:
            import brainpy.state as bp
        except ImportError:
            raise AttributeError(
                f"brainscale.nn.{name} is brainpy.state.{name} (as in brainscale 0.1), and "
                f"brainpy is not installed: pip install brainpy") from None
        warnings.warn(f"brainscale.nn.{name} is brainpy.state.{name}; use brainpy.state.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(bp, name)
    if name in _BRAINSTATE_FORWARDS:
        import brainstate
        if hasattr(brainstate.nn, name):
            warnings.warn(f"brainscale.nn.{name} is brainstate.nn.{name}; use "
                          f"brainstate.nn.{name}", DeprecationWarning, stacklevel=2)
            return getattr(brainstate.nn, name)
    raise AttributeError(f"module 'brainscale.nn' has no attribute {name!r}")
