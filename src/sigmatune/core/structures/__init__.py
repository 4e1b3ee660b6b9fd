"""Adapter structures: what an adapter trains over its r selected directions S, each one object that owns
its math (base.py: the protocol; registry.py: the names a config takes).

    diagonal   g (r,)          W' = U diag(σ ⊙ (1 + g)) Vᵀ on S                       (diagonal.py)
    band b     M banded        W' = W (I + V_S M V_Sᵀ), |i − j| ≤ b, as 2b + 1 diagonals  (band.py)
    dense      M (r, r)        W' = W (I + V_S M V_Sᵀ), LoRA-XS's core                  (dense.py)
"""
