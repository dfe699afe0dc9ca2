"""The decoding engine: target, drafter protocol, ragged KV cache, acceptance rule, gamma policy, counts.

Knows nothing about Ray, files or datasets. The public API:

    target = Target.load(path)
    engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma="auto", sampling=SamplingConfig()))
    results = engine.generate([prepare_prompt(target.processor, prompt, image, target.context_length), ...])
"""

from pipeline.engine.acceptance import SamplingConfig
from pipeline.engine.drafter import Drafter
from pipeline.engine.engine import EngineConfig, GenerationResult, SpecDecodeEngine
from pipeline.engine.prompts import PreparedPrompt, PromptError, prepare_prompt
from pipeline.engine.stats import EngineTimes, SpecDecodeCounts
from pipeline.engine.target import Target

__all__ = [
    "Drafter", "EngineConfig", "EngineTimes", "GenerationResult", "PreparedPrompt", "PromptError", "SamplingConfig",
    "SpecDecodeCounts", "SpecDecodeEngine", "Target", "prepare_prompt",
]
