"""Placement planner: a latency model, a discrete-event simulator of a deployment that drives the
engines' own scheduler, and the DistServe placement search (no Triton, no GPU)."""
