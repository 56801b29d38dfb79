"""Keep the CLIs' output readable: silence known-noisy warnings of torch/torchao/ExecuTorch."""

from __future__ import annotations

import logging
import warnings


def quiet_third_party() -> None:
    """Hide deprecation chatter from the libraries (not our own errors or progress lines)."""
    import torch  # noqa: F401  (its import configures the torch loggers: set levels after)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in (r"torch\..*", r"executorch\..*", r"torchao\..*"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
    for name in ("torch", "torchao", "executorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
