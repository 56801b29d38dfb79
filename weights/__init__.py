"""Weights I/O: checkpoints and adapters in the layouts users have, read into this model's names.

- :mod:`~edgelora.weights.architectures`: Hugging Face ``config.json`` per family -> ``ModelArgs``;
- :mod:`~edgelora.weights.hf_names`: HF projection and norm names per family -> ours;
- :mod:`~edgelora.weights.hf_keys`: HF and torchtune tensor names -> ours (rotary rows included);
- :mod:`~edgelora.weights.tensor_files`: ``.safetensors`` / ``.pth`` files;
- :mod:`~edgelora.weights.checkpoint`: a checkpoint file or directory, loaded into a model;
- :mod:`~edgelora.weights.layout`: tensors converted between split and fused projections;
- :mod:`~edgelora.weights.peft_config`: PEFT's LoRA config semantics;
- :mod:`~edgelora.weights.adapter_files`: PEFT and torchtune adapter directories;
- :mod:`~edgelora.weights.synthetic`: deterministic random adapters (demos, tests, benchmarks).
"""
