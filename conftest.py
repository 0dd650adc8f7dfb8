"""Settings every pytest run and every nbval kernel inherits (kernels get this process's environment).

OpenMP's passive wait policy must be set before torch is first imported: with the default (spinning) policy,
two torch threads on a 2-core machine that is also running something else stall each other (measured 6x
slower steps). `shared/__init__.py` sets it too, for notebooks opened in Jupyter.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
