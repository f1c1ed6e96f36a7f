"""allo_train: a thin training loop on DeepSpeed ZeRO for the ALLO pipeline (sft/correct, warmup, locate, forget,
improve) driven by one config.

Modules: ``config`` (YAML + overrides -> dataclasses), ``data`` (JSONL readers, tokenization, collators),
``checkpoint`` (atomic checkpoints), ``locate`` (neuron masks), ``metrics`` (JSONL logging, plots), ``tokenizer``
(a local character-level tokenizer for tests and demos). Import them directly; this package imports nothing heavy.
"""

__all__ = ["checkpoint", "config", "data", "locate", "metrics", "tokenizer"]
