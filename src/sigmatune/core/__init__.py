"""The method on one layer, in plain torch (no Triton): settings (config), the update rules (updates),
the structures (structures), singular directions (svd), the one op and its torch backend (transform,
backends, linear), the base layers it wraps (weights), SpectralLinear (layer), which layers of a model an
adapter targets (targets), where it runs (device) and progress of long phases (progress).

Nothing here reads or writes files, sees a model as a whole, trains or serves: the layers above do. The
fast paths of the op are ops/'s, registered as backends. See docs/ARCHITECTURE.md for the map.
"""
