"""The method on one layer: settings (config), the update rule (updates), singular directions (svd),
the one-sided math and its fused kernel (functional, kernels), the base layers it wraps (weights),
SpectralLinear (layer), which layers of a model an adapter targets (targets), and where it runs (device).

Nothing here reads or writes files, sees a model as a whole, trains or serves: the layers above do.
See docs/ARCHITECTURE.md for the map of the package.
"""
