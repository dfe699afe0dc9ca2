"""Every check of a caption job, each failing with one sentence saying what to fix.

`preflight`, before any cluster work. Input: exists, one known format, requested
columns present. Target and drafter: checkpoint directories with safetensors
weights whose headers parse, configs and tokenizers that load, a family the engine
runs, a shared vocabulary, a projector built for this target. Only configs,
tokenizers and weight headers are read (never the weights), so this stays cheap
on a CPU head node. Output: writable, and empty unless --resume.

`plan_resources`, once connected to the cluster and before any work is submitted:
GPUs per engine actor, and CPU-only actors must leave a CPU for the CPU stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from drafters import check_drafter
from pipeline.engine.families import context_length, family_for
from pipeline.engine.processors import load_processor
from pipeline.job.config import CaptionConfig, JobConfigError
from pipeline.job.output import existing_ids, remove_parts
from pipeline.job.preprocess import prepared_row_bytes
from pipeline.job.resume import FinishedIds
from pipeline.job.sources import SourcePlan, plan_source
from pipeline.job.storage import check_writable, is_hub_id, join, localize, model_files, safetensors_header


@dataclass
class JobPlan:
    source: SourcePlan
    processor: object  # the target's processor, shipped to the CPU preprocessing tasks
    context_length: int | None
    skip_ids: FinishedIds  # ids already in the output (--resume)
    prepared_row_bytes: int | None = None  # about one prepared row's size (None: not known)


def preflight(config: CaptionConfig) -> JobPlan:
    source = plan_source(config)
    processor, text_config = check_models(config)
    try:
        check_writable(config.output)
    except Exception as exc:
        raise JobConfigError(f"output {config.output} is not writable ({_first_line(exc)}): choose another.") from None
    skip_ids, incomplete = existing_ids(config.output)
    if (skip_ids or incomplete) and not config.resume:
        raise JobConfigError(
            f"output {config.output} already holds results ({len(skip_ids)} rows): pass --resume to continue "
            "that run, or choose an empty output."
        )
    remove_parts(config.output, incomplete)
    context = context_length(text_config)
    return JobPlan(source, processor, context, skip_ids, prepared_row_bytes(processor, context))


def plan_resources(config: CaptionConfig, cluster_resources: dict[str, float]) -> float:
    """GPUs per engine actor; raises JobConfigError when CPU-only actors would starve the CPU stages."""
    gpus = config.gpus_per_actor
    if gpus is None:
        gpus = 1 if cluster_resources.get("GPU", 0) > 0 else 0
    held = config.num_actors[0] * config.cpus_per_actor
    if gpus == 0 and cluster_resources.get("CPU", 0) - held < 1:
        raise JobConfigError(
            f"{config.num_actors[0]} engine actors x {config.cpus_per_actor:g} CPU take all "
            f"{cluster_resources.get('CPU', 0):g} CPUs of the cluster, leaving none to read and prepare rows: "
            "lower --num-actors or --cpus-per-actor."
        )
    return gpus


def check_models(config: CaptionConfig):
    """(processor, text config) of the target, with the drafter checked against it; raises JobConfigError."""
    processor, text_config = check_target(config)
    if config.drafter_name:
        light = _light_checkpoint("drafter", config.drafter_name, config.model_cache)
        try:
            check_drafter(light, processor.tokenizer, text_config, config.drafter_name, config.trust_remote_code)
        except ValueError as exc:
            raise JobConfigError(str(exc)) from None
        except Exception as exc:
            raise JobConfigError(f"drafter {config.drafter_name} cannot be loaded ({_first_line(exc)}).") from None
    return processor, text_config


def check_target(config: CaptionConfig):
    """(processor, text config) of the target; raises JobConfigError when it cannot serve as one."""
    light = _light_checkpoint("target", config.target, config.model_cache)
    try:
        model_config = AutoConfig.from_pretrained(light, trust_remote_code=config.trust_remote_code)
    except Exception as exc:
        raise JobConfigError(f"target {config.target} has no loadable config.json ({_first_line(exc)}).") from None
    class_name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_config.model_type)
    if class_name is None and not config.trust_remote_code:
        raise JobConfigError(
            f"target {config.target} is a {model_config.model_type!r} model, which is not an image-text-to-text "
            "architecture transformers knows: use a VLM checkpoint such as LLaVA or Gemma3."
        )
    try:
        processor = load_processor(light, trust_remote_code=config.trust_remote_code)
    except Exception as exc:
        raise JobConfigError(f"target {config.target} has no loadable processor ({_first_line(exc)}).") from None
    try:
        family_for(model_config)
    except ValueError as exc:
        raise JobConfigError(f"target {config.target}: {exc}") from None
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "chat_template", None) is None:
        raise JobConfigError(f"target {config.target} has no processor with a tokenizer and a chat template.")
    return processor, model_config.get_text_config()


def _light_checkpoint(role: str, url: str, cache: str) -> str:
    """Check a checkpoint's weights (safetensors headers only) and return a local copy of its configs and
    tokenizers; a Hub repo id is resolved once, through the HF cache."""
    if not is_hub_id(url):
        _check_weights(role, url)
        return localize(url, cache, weights=False)
    try:  # the snapshot in the HF cache (configs and tokenizers only, if it must be downloaded)
        light = localize(url, weights=False)
    except Exception as exc:
        raise JobConfigError(f"{role} {url} is neither a local directory nor a Hugging Face repo found in the "
                             f"cache or on the Hub ({_first_line(exc)}).") from None
    if any(name.endswith(".safetensors") for name in model_files(light)):
        _check_weights(role, light)
    else:  # fetched light: ask the Hub which weights it holds
        from huggingface_hub import HfApi

        if not any(name.endswith(".safetensors") for name in HfApi().list_repo_files(url)):
            raise JobConfigError(f"{role} {url} has no .safetensors weights on the Hub (pickled checkpoints "
                                 "are never loaded).")
    return light


def _check_weights(role: str, url: str) -> None:
    try:
        files = model_files(url)
    except FileNotFoundError:
        raise JobConfigError(f"{role} {url} is not a checkpoint directory: check the path or URL.") from None
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise JobConfigError(
            f"{role} {url} has no .safetensors weights (pickled checkpoints are never loaded): "
            "save it with save_pretrained()."
        )
    for name in weights:
        try:
            safetensors_header(join(url, name))
        except Exception as exc:
            raise JobConfigError(f"{role} weights {join(url, name)} are unreadable ({_first_line(exc)}).") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
