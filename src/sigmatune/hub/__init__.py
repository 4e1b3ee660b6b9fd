"""Base models and registry files, offline: a model by name or path with the default model's alias
(loading), the default model converted once from its GGUF (gguf_models), and files of a package registry
downloaded once and checked by sha256 (registry). Built on core and formats; knows no adapters.
"""
