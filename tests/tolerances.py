"""Tolerances that depend on where the kernels run.

Interpreted (CPU, ``TRITON_INTERPRET=1``), fp32 dots are exact and exp/div are numpy's. On a GPU, fp32 dots run as
TF32 (``grouped_mlp._precision``: each operand rounded to a 10-bit mantissa, 2^-11 relative) and ``tl.exp`` / ``/``
compile to approximate instructions (``ex2.approx``, ``div.full``: about 2 ulp each).
"""

import torch

GPU = torch.cuda.is_available()

# Norm-relative error of an fp32 GEMM chain (grouped MLP forward and gradients): a few TF32 roundings on a GPU.
FP32_GEMM = 5e-3 if GPU else 1e-4
# Elementwise (rtol, atol) of fp32 results of one fp32 dot followed by exp (received attention, router logits).
FP32_DOT = (5e-3, 1e-4) if GPU else (1e-4, 1e-6)
# Elementwise (rtol, atol) of routing weights: exp, a sum of exps, one or two divisions, about 10 ulp on a GPU.
ROUTE = (1e-5, 1e-6) if GPU else (1e-6, 1e-7)
