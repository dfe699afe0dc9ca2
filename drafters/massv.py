"""MASSV drafter: a small causal LM that sees the image through a projector over the target's image features.

The prompt keeps its image placeholder tokens; their embeddings are the target's
image features (computed once by the target) mapped into the drafter's embedding
space by a 2-layer MLP projector (LLaVA style). A checkpoint is a directory:
    drafter_config.json        {"kind": "massv", "projector": {...}}
    projector.safetensors      the projector
    language_model/            the small causal LM (HF save_pretrained, safetensors)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from drafters.causal_lm import CausalLMDraftModel, load_language_model
from pipeline.engine.families import embed_with_image_features

DRAFTER_CONFIG = "drafter_config.json"
PROJECTOR_WEIGHTS = "projector.safetensors"
LANGUAGE_MODEL_DIR = "language_model"


class MassvProjector(nn.Module):
    """Maps target image features [N, in_features] to drafter embeddings [N, out_features]."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None):
        super().__init__()
        hidden_features = hidden_features or out_features
        self.config = {"in_features": in_features, "hidden_features": hidden_features, "out_features": out_features}
        self.linear_1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class MassvDraftModel(CausalLMDraftModel):
    kind = "massv"

    def __init__(self, language_model: nn.Module, projector: MassvProjector, image_token_id: int | None):
        super().__init__(language_model, image_token_id)
        self.projector = projector

    def embed(self, input_ids, image_features):
        features = self.projector(image_features) if image_features is not None else None
        return embed_with_image_features(self.language_model.get_input_embeddings(), input_ids, self.image_token_id,
                                         features)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "projector": self.projector.config}

    @classmethod
    def language_model_dir(cls, path: Path) -> Path:
        return path / LANGUAGE_MODEL_DIR

    @classmethod
    def check_config(cls, config: dict, target_hidden: int, drafter_hidden: int, name: str) -> None:
        projector = config["projector"]
        if projector["in_features"] != target_hidden or projector["out_features"] != drafter_hidden:
            raise ValueError(
                f"MASSV drafter {name} maps {projector['in_features']}-d image features to "
                f"{projector['out_features']}-d embeddings, but the target's features are {target_hidden}-d "
                f"and the drafter's embeddings {drafter_hidden}-d: train the projector for this target."
            )

    @classmethod
    def from_pretrained(cls, path: Path, config: dict, image_token_id: int | None, dtype: torch.dtype,
                        trust_remote_code: bool = False) -> MassvDraftModel:
        language_model = load_language_model(cls.language_model_dir(path), dtype, trust_remote_code)
        projector = MassvProjector(**config["projector"])
        projector.load_state_dict(load_file(path / PROJECTOR_WEIGHTS))
        return cls(language_model, projector.to(dtype), image_token_id)

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.language_model.save_pretrained(directory / LANGUAGE_MODEL_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / LANGUAGE_MODEL_DIR)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, directory / PROJECTOR_WEIGHTS)
        (directory / DRAFTER_CONFIG).write_text(json.dumps(self.config, indent=2))
