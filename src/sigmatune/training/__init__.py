"""Fine-tuning: tasks and their held-out split (data), examples as tokens (tokens), scores (evaluate), the
job's settings (settings), the optimisation loop (loop), the main job end to end (job), the HF Trainer
callback (callbacks) and data-parallel runs (distributed). Built on model; a peer of serving (neither
imports the other).
"""
