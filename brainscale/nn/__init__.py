"""``brainscale.nn``: neural-network modules ready for online learning.

Every module is built on ``brainstate`` alone (``brainpy`` is *not* a dependency; models
written with ``brainpy.state`` neurons interoperate, see ``docs/nn.md``):

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
  :class:`RMSNorm` (inputs/readouts only)
* recurrent cells: :class:`RNNCell`, :class:`ValinaRNNCell`, :class:`GRUCell`,
  :class:`MGUCell`, :class:`LSTMCell`, :class:`URLSTMCell`, :class:`MinimalRNNCell`,
  :class:`LRUCell`
* readouts: :class:`LeakyRateReadout`, :class:`LeakySpikeReadout`
"""
from ._base import Dynamics, Neuron, Synapse
from ._conv import Conv1d, Conv2d, Conv3d
from ._linear import LoRA, Linear, SignedWLinear, SparseLinear
from ._neurons import ALIF, GIF, IF, LIF, Izhikevich
from ._normalizations import LayerNorm, RMSNorm, ScaleShift
from ._readout import LeakyRateReadout, LeakySpikeReadout
from ._rnn import (GRUCell, LRUCell, LSTMCell, MGUCell, MinimalRNNCell, RNNCell, URLSTMCell,
                   ValinaRNNCell)
from ._synapses import COBA, CUBA, AlignPostProj, Alpha, CurrentProj, DeltaProj, Expon, SynOut

__all__ = [
    "Dynamics", "Neuron", "Synapse",
    "IF", "LIF", "ALIF", "GIF", "Izhikevich",
    "Expon", "Alpha", "SynOut", "CUBA", "COBA", "DeltaProj", "CurrentProj", "AlignPostProj",
    "Linear", "SignedWLinear", "SparseLinear", "LoRA", "Conv1d", "Conv2d", "Conv3d",
    "ScaleShift", "LayerNorm", "RMSNorm",
    "RNNCell", "ValinaRNNCell", "GRUCell", "MGUCell", "LSTMCell", "URLSTMCell",
    "MinimalRNNCell", "LRUCell",
    "LeakyRateReadout", "LeakySpikeReadout",
]
