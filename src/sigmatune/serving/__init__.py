"""Serving many adapters on one base model: per-layer tables of adapter scales (tables), the bank that
decides which adapter holds which row and serves mixed batches (bank), continuous batching over it
(engine), and the OpenAI-compatible HTTP server — its state (server), its endpoints (routes) and the
checks on what clients send (api_input). Built on model; a peer of training.
"""
