"""The benchmarks: each module is a script (``python bench/NAME.py --help``) writing its results to
``bench/results/`` (``bench/results/README.md`` has every figure). What they share is in
``common.py``: the model configs and real-model shapes, the prompt and speed measurement, and an
export run as a user runs it. ExecuTorch's own example as the baseline is ``et_baseline.py``,
the tables and plots of ``run.py`` are ``report.py``."""
