"""The benchmarks: each module is a script (``python bench/NAME.py --help``) writing its results to
``bench/results/`` (``bench/results/README.md`` has every figure). They import each other as
``edgelora.bench.*``; the model shapes live in ``spine.py`` and ``scale.py``, ExecuTorch's own
example as the baseline in ``et_baseline.py``, the measuring loop in ``device.py`` and the tables
and plots in ``report.py``."""
