"""`bigssl plan`: per-engine collectives, per-rank memory and a step-time lower bound for a recipe
at 8–1,024 GPUs, without GPUs (see bigssl/plan/trace.py and bigssl/plan/model.py)."""
