"""Weights I/O: checkpoints and adapters in the layouts users have, read into this model's names.

- :mod:`~edgelora.weights.families`: one class per Hugging Face family, registered by its
  ``architectures`` name: its ``config.json`` reader, per-tensor mapping (rotary rows
  included), projection and norm names;
- :mod:`~edgelora.weights.architectures`: which family reads a ``config.json`` -> ``ModelArgs``;
- :mod:`~edgelora.weights.hf_keys`: which layout a state dict has; torchtune's names -> ours;
- :mod:`~edgelora.weights.tensor_files`: ``.safetensors`` / ``.pth`` files;
- :mod:`~edgelora.weights.checkpoint`: a checkpoint file or directory, loaded into a model;
- :mod:`~edgelora.weights.layout`: tensors converted between split and fused projections;
- :mod:`~edgelora.weights.peft_config`: PEFT's LoRA config semantics;
- :mod:`~edgelora.weights.adapter_files`: PEFT and torchtune adapter directories;
- :mod:`~edgelora.weights.synthetic`: deterministic random adapters (demos, tests, benchmarks).
"""
