"""The flatten write-up's experiments (docs/flatten.md): ``python -m
benchmarks.flatten_experiments`` runs the suite (``suite.py``).

``runs`` trains the variants, ``measures`` measures each seed as it finishes,
``sweeps`` (with ``deformations``), ``equivariance`` and ``receptive`` are the
measurements, ``stats`` the intervals and tests, ``figures`` the plots.
"""
