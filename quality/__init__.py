"""Quality of an export, measured on the ExecuTorch runtime: task accuracy, perplexity, and
agreement with the eager transformers (+ peft) model (``edgelora-eval``)."""
