"""The caption job on Ray Data: config, sources, CPU preprocessing, the engine actor, output, summary, preflight.

Knows the engine only through its public API (pipeline.engine); never imports the lab.
"""
