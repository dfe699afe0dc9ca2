"""Drafter checkpoints: load a text-only or MASSV drafter for a target, and save MASSV drafters.

A text-only drafter is any HF causal-LM directory. A MASSV drafter is a directory:
    drafter_config.json        {"kind": "massv", "projector": {...}}
    projector.safetensors      the 2-layer MLP projector
    language_model/            the small causal LM (HF save_pretrained, safetensors)
Weights load from safetensors only, never pickles.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from drafters.causal_lm import CausalLMDrafter, MassvProjector
from pipeline.target import Target

DRAFTER_CONFIG = "drafter_config.json"
PROJECTOR_WEIGHTS = "projector.safetensors"
LANGUAGE_MODEL_DIR = "language_model"


def save_massv(directory: str | Path, language_model, projector: MassvProjector, tokenizer=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    language_model.save_pretrained(directory / LANGUAGE_MODEL_DIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / LANGUAGE_MODEL_DIR)
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, directory / PROJECTOR_WEIGHTS)
    (directory / DRAFTER_CONFIG).write_text(json.dumps({"kind": "massv", "projector": projector.config}, indent=2))


def load_drafter(path: str | Path | None, target: Target, trust_remote_code: bool = False) -> CausalLMDrafter | None:
    """Load the drafter at `path` (None or 'none' means no drafter) onto the target's device and dtype.

    Raises ValueError, before any decoding, when its vocabulary does not match the target's.
    """
    if path is None or str(path).lower() == "none":
        return None
    path = Path(path)
    config = read_drafter_config(path)
    lm_path = language_model_dir(path, config)
    language_model = AutoModelForCausalLM.from_pretrained(
        lm_path,
        dtype=target.model.dtype,
        use_safetensors=True,
        attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
    ).to(target.device)
    drafter_vocab_size = language_model.get_output_embeddings().weight.shape[0]
    check_vocabulary(target.tokenizer, target.vocab_size, drafter_vocab_size, _tokenizer_or_none(lm_path), str(path))

    projector = None
    if config["kind"] == "massv":
        drafter_dim = language_model.get_input_embeddings().weight.shape[1]
        check_projector(config["projector"], target.text_config.hidden_size, drafter_dim, str(path))
        projector = MassvProjector(**config["projector"])
        projector.load_state_dict(load_file(path / PROJECTOR_WEIGHTS))
        projector.to(target.device, target.model.dtype)
    return CausalLMDrafter(
        language_model,
        target_vocab_size=target.vocab_size,
        image_token_id=target.image_token_id,
        projector=projector,
        pad_token_id=target.pad_token_id,
        name=str(path),
    )


def check_drafter(path: str | Path, target_tokenizer, target_text_config, name: str,
                  trust_remote_code: bool = False) -> None:
    """Every check load_drafter makes, from config and tokenizer files only (no weights): for the job's preflight."""
    path = Path(path)
    config = read_drafter_config(path)
    lm_config = AutoConfig.from_pretrained(language_model_dir(path, config), trust_remote_code=trust_remote_code)
    lm_config = lm_config.get_text_config()
    check_vocabulary(target_tokenizer, target_text_config.vocab_size, lm_config.vocab_size,
                     _tokenizer_or_none(language_model_dir(path, config)), name)
    if config["kind"] == "massv":
        check_projector(config["projector"], target_text_config.hidden_size, lm_config.hidden_size, name)


def read_drafter_config(path: Path) -> dict:
    config_file = path / DRAFTER_CONFIG
    config = json.loads(config_file.read_text()) if config_file.exists() else {"kind": "text-only"}
    if config.get("kind") not in ("text-only", "massv"):
        raise ValueError(f"{config_file} names an unknown drafter kind {config.get('kind')!r}: use text-only or massv.")
    return config


def language_model_dir(path: Path, config: dict) -> Path:
    return path / LANGUAGE_MODEL_DIR if config["kind"] == "massv" else path


def check_vocabulary(target_tokenizer, target_vocab_size: int, drafter_vocab_size: int, drafter_tokenizer,
                     drafter_name: str) -> None:
    """Every token the drafter knows must have the same id in the target's tokenizer."""
    if drafter_tokenizer is None:
        if drafter_vocab_size != target_vocab_size:
            raise ValueError(
                f"drafter {drafter_name} has a vocabulary of {drafter_vocab_size} tokens but the target has "
                f"{target_vocab_size}: use a drafter with the target's tokenizer."
            )
        return
    target_vocab = target_tokenizer.get_vocab()
    for token, token_id in sorted(drafter_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if target_vocab.get(token) != token_id:
            where = f"id {target_vocab[token]}" if token in target_vocab else "absent"
            raise ValueError(
                f"drafter {drafter_name} does not share the target's vocabulary: token {token!r} is id {token_id} "
                f"in the drafter but {where} in the target; use a drafter with the target's tokenizer."
            )


def check_projector(projector_config: dict, feature_dim: int, drafter_dim: int, drafter_name: str) -> None:
    if projector_config["in_features"] != feature_dim or projector_config["out_features"] != drafter_dim:
        raise ValueError(
            f"MASSV drafter {drafter_name} maps {projector_config['in_features']}-d image features to "
            f"{projector_config['out_features']}-d embeddings, but the target's features are {feature_dim}-d "
            f"and the drafter's embeddings {drafter_dim}-d: train the projector for this target."
        )


def _tokenizer_or_none(path: Path):
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)
