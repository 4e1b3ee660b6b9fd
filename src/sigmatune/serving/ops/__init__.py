"""The serving kernels: the mixed-batch transform (rows_kernel), the expansion after a folded GEMM
(fold_kernel) and the decode attention over the slots (decode_attention). Each can be turned off by name
(ops/switches.py).
"""
