"""edgelora: ship a Llama-family model plus LoRA adapters as ExecuTorch programs.

The package is laid out by stage, and earlier stages never import later ones:

- ``edgelora.models``   builds modules (Llama, LoRALinear) and loads weights and adapters;
- ``edgelora.quant``    rewrites a model (torchao 8da4w / 8da8w, embedding quantization);
- ``edgelora.backends`` lowers to XNNPACK, tags foundation constants, reads ``.pte``/``.ptd``;
- ``edgelora.export``   strings the stages together for the ``export_llama`` CLI;
- ``edgelora.runtime``  loads and runs programs on the ExecuTorch runtime (``edgelora-run``).
"""

__version__ = "0.1.0"
