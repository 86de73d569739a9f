"""Cross-checks against independent implementations (docs/interop.md).

- ``export``: a time-indexed model as named float64 arrays in an ``.npz`` (the format Julia reads)
- ``reference``: the same model in float64 NumPy, with fixed-step loops and ``solve_ivp``
- ``crosscheck``: the comparisons against diffrax and the table they print
- ``julia``: the juliacall bridge to ``julia/`` (juliacall is imported only when used)
- ``settings``, ``command``: the ``ode-lm crosscheck`` knobs and command

This package imports nothing on its own, so finding Julia never pays for importing JAX.
"""
