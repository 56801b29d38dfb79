"""edgelora: ship a Hugging Face model plus LoRA adapters as ExecuTorch programs for XNNPACK,
the quantized base stored once in ``foundation.ptd``.

The package is laid out by stage; a stage imports only earlier ones (``lint-imports``, contracts
in ``pyproject.toml``):

- ``edgelora.format``   the on-disk contract: file names, the manifest, checksums, adapter inputs,
  the program template, the ``.pte``/``.ptd`` reader, the chat template;
- ``edgelora.models``   ``ModelArgs`` and the modules (Llama, MLA, fused layers);
- ``edgelora.lora``     adapters on a model: the record, the wrappers and their dispatcher,
  attach/detach/merge, fusion, switchable slots;
- ``edgelora.weights``  checkpoints, the Hugging Face families (one class each: config reader,
  per-tensor mapping, projection names), PEFT configs, adapter files;
- ``edgelora.quant``    the recipes (presets defined once), quantization, calibration, GPTQ;
- ``edgelora.backends`` lowering to XNNPACK and the foundation/adapter split of constants;
- ``edgelora.export``   the pipeline, ``FoundationSpec`` (the foundation's settings, their only
  defaults) inside ``ExportConfig``, output staging, the ``export_llama``, ``edgelora-add`` and
  ``edgelora-remove`` commands;
- ``edgelora.runtime``  programs on the ExecuTorch runtime, switching sessions, text and chat
  (``edgelora-run``, ``edgelora-chat``, ``edgelora-inspect``);
- ``edgelora.quality``  ``edgelora-eval``: accuracy, perplexity and agreement for any scorer;
- ``edgelora.ci``       the output-match check of an export against its eager models.

``docs/layout.md`` has the table of every folder and module group.
"""

__version__ = "0.1.0"
