"""Triton kernels of flux-engine, installed as ``flux_engine.triton_kernels``.

Each module holds the kernels of one op and a launcher with the same arguments as the op's reference
implementation in ``flux_engine.ops``. Importing this package imports triton; ``flux_engine.ops`` does so
only when the triton tier is selected, so ``TRITON_INTERPRET`` can still be set before the first use.
"""
