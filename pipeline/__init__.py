"""Three places: pipeline.engine (the decoding core), pipeline.job (the Ray Data caption job), pipeline.lab (benchmark,
demo world, scenes, tiny models). The engine imports neither of the others; the job imports the engine; the lab both."""
