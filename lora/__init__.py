"""LoRA adapters on a model: the in-memory record, the wrapper modules, and the transforms.

- :mod:`~edgelora.lora.record`: :class:`Adapter` (module FQN -> :class:`LoRAWeights`);
- :mod:`~edgelora.lora.modules`: the wrappers, one interface (``from_base``, ``delta``,
  ``unwrap``): :class:`LoRALinear` around an ``nn.Linear``, :class:`PackedLoRALinear` around a
  fused layer;
- :mod:`~edgelora.lora.attach`: attach, detach, merge, and the FQNs of what is attached;
- :mod:`~edgelora.lora.fusion`: fusing and unfusing projections with adapters kept on them;
- :mod:`~edgelora.lora.slots`: adapters as run-time inputs of one switchable program.
"""
