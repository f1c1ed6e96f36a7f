"""allo_train: a thin training loop on DeepSpeed ZeRO for the ALLO pipeline (sft/correct, warmup, locate, forget,
improve) driven by one config.

Modules: ``stages`` (the stage table: one ``StageSpec`` per stage), ``config`` (YAML + overrides -> dataclasses),
``trainer`` (the training loop and the pipeline), ``data`` (JSONL readers, tokenization, collators), ``locate``
(neuron masks), ``engine`` (DeepSpeed), ``checkpoint`` (atomic checkpoints), ``generation`` (text from a trained
model), ``metrics`` (JSONL logging, plots), ``tokenizer`` (a local character-level tokenizer for tests and demos).
Import them directly; this package imports nothing heavy.
"""

__all__ = ["checkpoint", "config", "data", "generation", "locate", "metrics", "stages", "tokenizer", "trainer"]
