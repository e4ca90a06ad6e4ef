"""Passes over the etrace IR, their registry and the default pipeline."""
from .base import (Pass as Pass, FunctionPass as FunctionPass, PassContext as PassContext,
                   PassRecord as PassRecord, PassManager as PassManager,
                   register_pass as register_pass, function_pass as function_pass,
                   PASS_REGISTRY as PASS_REGISTRY, parse_pipeline as parse_pipeline,
                   Instrument as Instrument, PrintAfterAll as PrintAfterAll,
                   PrintAfter as PrintAfter, DumpDir as DumpDir, Timing as Timing,
                   Recorder as Recorder)
from .rules import (register_dependency_rule as register_dependency_rule, DEP_RULES as DEP_RULES,
                    elementwise_rule as elementwise_rule, mixing_rule as mixing_rule,
                    analyze as analyze)
from .absorb import AbsorbNormalizationPass as AbsorbNormalizationPass
from .hidden_groups import HiddenGroupsPass as HiddenGroupsPass
from .relations import RelationsPass as RelationsPass
from .select_dims import SelectDimsPass as SelectDimsPass, relation_costs as relation_costs
from . import outputs as outputs  # noqa: E402  (registers the verifier's proof of group outputs)
from .fuse_traces import FuseTracesPass as FuseTracesPass
from .shard import ShardPass as ShardPass
from .layout import (LayoutTracesPass as LayoutTracesPass, trace_arrays as trace_arrays,
                     layout_trace as layout_trace, retrace as retrace,
                     renumber_traces as renumber_traces)

#: the built-in pipeline after `lower`
DEFAULT_PIPELINE = ("absorb-normalization", "hidden-groups", "relations", "select-dims",
                    "fuse-traces", "layout-traces")

from . import examples as examples  # noqa: E402  (registers the shipped example passes)
