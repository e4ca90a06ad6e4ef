"""The typed etrace IR: types, nodes, graph, verifier, printer and DOT dumper."""
from .types import TensorType as TensorType, TreeType as TreeType, Loc as Loc, attrs as attrs
from .nodes import (Input as Input, HiddenState as HiddenState, Param as Param, Value as Value,
                    TraceArray as TraceArray,
                    Op as Op, HiddenGroup as HiddenGroup, Relation as Relation, Trace as Trace,
                    replace as replace)
from .graph import Graph as Graph, StepInfo as StepInfo
from .verify import verify as verify
from .printer import print_graph as print_graph, PrintSettings as PrintSettings
