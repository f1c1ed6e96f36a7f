"""Adapters to training frameworks: the only code in allo_kernels that knows a framework's internals.

``deepspeed``  SparseAdamW under ZeRO 0-3 and offload (masks -> flat fp32 partitions, gradient hooks, export/import
               of the compact state by parameter name), ``initialize`` (an engine with SparseAdamW over masks by
               parameter name, as allo_train uses it), and ``ZeRO3Gather`` (the fused-linear ops' gather of ZeRO-3
               partitioned lm_head weights). Imports deepspeed only inside the functions that talk to an engine.
``gather``     ``ParamGather``: the gather context the fused-linear ops take instead of knowing any framework.

``DEFAULT_GATHER`` is the context the ops use when none is given: it gathers DeepSpeed ZeRO-3 partitions and uses every
other tensor as it is, so a ZeRO-3 lm_head works without the caller saying so.
"""

from .deepspeed import ZeRO3Gather
from .gather import ParamGather

DEFAULT_GATHER: ParamGather = ZeRO3Gather()

__all__ = ["DEFAULT_GATHER", "ParamGather", "ZeRO3Gather"]
