"""The on-disk contract of an export: what edgelora writes and what every reader checks.

- :mod:`~edgelora.format.layout`: file names of an export directory and ``sha256_file``;
- :mod:`~edgelora.format.checksums`: the constant methods a program carries (ExecuTorch's
  runner metadata, the foundation's and the program's own sha256), their placeholders, the
  stamp written after lowering and the verification done before loading;
- :mod:`~edgelora.format.manifest`: ``manifest.json`` as typed dataclasses (one writer, one
  reader, a format version);
- :mod:`~edgelora.format.adapter_inputs`: a switchable program's slots and the
  ``NAME.lora.safetensors`` files holding each adapter's run-time inputs;
- :mod:`~edgelora.format.pte`: what ``.pte`` programs and ``.ptd`` data files hold, by key.

Export and runtime both import this package; it imports neither (nor any model code).
"""
