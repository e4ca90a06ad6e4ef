"""brainscale: online learning for brain dynamics models, built as a compiler.

A frontend lowers the jaxpr of one model step into a typed etrace IR, passes analyse and
transform it, and a backend emits a jitted step that advances hidden states and their
eligibility traces, with online gradients through its custom VJP.
"""
__version__ = "0.2.0"

from .concepts import (ETraceState as ETraceState, ETraceParam as ETraceParam,
                       ETraceParamOp as ETraceParamOp, ETraceOp as ETraceOp,
                       ETraceGrad as ETraceGrad, FunctionOp as FunctionOp)
from .ops import (MatMulOp as MatMulOp, ConvOp as ConvOp, SpMatMulOp as SpMatMulOp,
                  ElemWiseOp as ElemWiseOp, LoraOp as LoraOp)
from .errors import (BrainscaleError as BrainscaleError, IRVerificationError as IRVerificationError,
                     PassError as PassError, PipelineError as PipelineError,
                     UnsupportedModelError as UnsupportedModelError,
                     UnsupportedPrimitiveError as UnsupportedPrimitiveError,
                     BackendError as BackendError, NotCompiledError as NotCompiledError,
                     NoTemporalCreditWarning as NoTemporalCreditWarning,
                     JaxlibMiscompileWarning as JaxlibMiscompileWarning)
from .frontend import lower as lower
from .ir import Graph as Graph, print_graph as print_graph, PrintSettings as PrintSettings, verify as verify
from .passes import (Pass as Pass, PassManager as PassManager, PassContext as PassContext,
                     PassRecord as PassRecord,
                     register_pass as register_pass, function_pass as function_pass,
                     register_dependency_rule as register_dependency_rule,
                     DEFAULT_PIPELINE as DEFAULT_PIPELINE, DumpDir as DumpDir,
                     PrintAfterAll as PrintAfterAll, PrintAfter as PrintAfter, Timing as Timing)
from .algorithms import (ETraceAlgorithm as ETraceAlgorithm, DiagIODimAlgorithm as DiagIODimAlgorithm,
                         DiagParamDimAlgorithm as DiagParamDimAlgorithm,
                         DiagHybridDimAlgorithm as DiagHybridDimAlgorithm,
                         online_gradients as online_gradients, decay_from as decay_from,
                         EligibilityTrace as EligibilityTrace)
from ._stepdata import SingleStepData as SingleStepData, MultiStepData as MultiStepData
# brainscale 0.1's names (docs/compat.md)
from .legacy import (IODimVjpAlgorithm as IODimVjpAlgorithm, ES_D_RTRL as ES_D_RTRL,
                     ParamDimVjpAlgorithm as ParamDimVjpAlgorithm, D_RTRL as D_RTRL,
                     HybridDimVjpAlgorithm as HybridDimVjpAlgorithm,
                     ElemWiseParam as ElemWiseParam, NonTempParam as NonTempParam,
                     FakeETraceParam as FakeETraceParam, FakeElemWiseParam as FakeElemWiseParam)
# the rule zoo: points on the trace-rule axes (docs/rules.md), braintrace's names too
from .zoo import (RuleAlgorithm as RuleAlgorithm, RTRLAlgorithm as RTRLAlgorithm,
                  SnApAlgorithm as SnApAlgorithm, UOROAlgorithm as UOROAlgorithm,
                  EPropAlgorithm as EPropAlgorithm, OSTLAlgorithm as OSTLAlgorithm,
                  ThreeFactorAlgorithm as ThreeFactorAlgorithm, DNIAlgorithm as DNIAlgorithm,
                  SnAp as SnAp, UORO as UORO,
                  RandomProjectionVjpAlgorithm as RandomProjectionVjpAlgorithm, EProp as EProp,
                  OSTLRecurrent as OSTLRecurrent, OSTLFeedforward as OSTLFeedforward,
                  ThreeFactor as ThreeFactor, DNI as DNI)
from . import zoo as zoo
from .compiled import Compiled as Compiled
from .schedule import (train_online as train_online, update_schedule as update_schedule)
from .api import compile as compile

# brainscale 0.1's deprecated names for brainstate's grouped hidden states
_BRAINSTATE_ALIASES = {"ETraceGroupState": "HiddenGroupState", "ETraceTreeState": "HiddenTreeState"}


# brainscale.nn is imported lazily (it pulls in neuron models)
def __getattr__(name):
    if name == "nn":
        import importlib
        return importlib.import_module(".nn", __name__)
    if name in _BRAINSTATE_ALIASES:
        import warnings
        import brainstate
        new = _BRAINSTATE_ALIASES[name]
        warnings.warn(f"brainscale.{name} is brainscale 0.1's name of brainstate.{new}; use "
                      f"brainstate.{new}", DeprecationWarning, stacklevel=2)
        return getattr(brainstate, new)
    raise AttributeError(f"module 'brainscale' has no attribute {name!r}")
