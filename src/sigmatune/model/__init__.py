"""A whole model with spectral adapters: SigmaModel and get_sigma_model (sigma_model), the forward the
HF Trainer sees (forward), adapters in and out of it (exchange), and the seed package's API (seed).
Built on core and formats; knows nothing of training loops or serving.
"""
