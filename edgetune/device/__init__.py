"""What a device runs: execution providers, the training step on ONNX Runtime, the trainer loop,
the optimizer, data, tokenization, generation and task metrics.

Needs onnxruntime, numpy, tokenizers and jinja2 only: never torch, transformers, peft or onnx
(an import-linter contract in pyproject.toml holds this)."""
