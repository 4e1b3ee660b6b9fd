"""Serving many adapters on one base model: per-layer tables of adapter scales (bank), continuous
batching over them (engine), and the OpenAI-compatible HTTP server — its state (server), its endpoints
(routes) and the checks on what clients send (api_input). Built on model; a peer of training.
"""
