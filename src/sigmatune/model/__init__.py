"""A whole model with spectral adapters: SigmaModel and get_sigma_model (sigma_model), the forward the
HF Trainer sees (forward), adapters in and out of it (exchange), an adapter with its recorded base model
by the adapter's folder alone (auto), adapters kept to their largest directions (compress), and the seed
package eigentune 0.1.0's API (eigentune_compat). Built on core, formats and hub; knows nothing of training
loops or serving.
"""
