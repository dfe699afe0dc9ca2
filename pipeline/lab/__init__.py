"""What proves and shows the engine and the job: benchmark, demo world, synthetic scenes, tiny models.

Imports the engine and the job; nothing there imports the lab.
"""
