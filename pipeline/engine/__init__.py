"""The decoding engine: target, drafter protocol, ragged KV cache, acceptance rule, gamma policy, counts.

Knows nothing about Ray, files or datasets. The public API:

    target = Target.load(path)
    engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma="auto", sampling=SamplingConfig()))
    results = engine.generate([prepare_prompt(target.processor, prompt, image, target.context_length), ...])
"""

from importlib import import_module

# name -> module; imported on first use, so a process that needs one module (a CPU task preparing prompts) does
# not pay for the models' code (transformers' model classes: about a second of import)
_EXPORTS = {
    "SamplingConfig": "acceptance", "Drafter": "drafter", "EngineConfig": "engine", "GenerationResult": "engine",
    "SpecDecodeEngine": "engine", "PreparedPrompt": "prompts", "PromptError": "prompts", "prepare_prompt": "prompts",
    "prepare_prompts": "prompts", "EngineTimes": "stats", "SpecDecodeCounts": "stats", "Target": "target",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
