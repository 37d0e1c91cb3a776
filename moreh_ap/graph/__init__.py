# moreh_ap.graph: tracing a model into a ModelGraph of blocks (no real memory, no real compute).
from moreh_ap.graph.model_graph import ModelGraph, NodeInfo, TiedParam
from moreh_ap.graph.tracing import trace

__all__ = ["ModelGraph", "NodeInfo", "TiedParam", "trace"]
