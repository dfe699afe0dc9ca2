"""Tiny checkpoints built from configs with real HF classes, for tests and benchmarks.

Each is saved with save_pretrained (config, safetensors, a real byte-level BPE
tokenizer, image processor and chat template), so the pipeline loads it through
the same code path as a downloaded checkpoint. Nothing is downloaded.
Families: "llava" (LlavaForConditionalGeneration: CLIP vision + Llama),
"gemma3" (Gemma3ForConditionalGeneration: SigLIP vision + Gemma3 text with
sliding-window layers and token_type_ids for image tokens), "qwen2_5_vl"
(Qwen2_5_VLForConditionalGeneration: windowed ViT with 2x2 patch merging, Qwen2 text
with M-RoPE) and "qwen3_vl" (Qwen3VLForConditionalGeneration: DeepStack, interleaved
M-RoPE, Qwen3 text). Qwen images keep their aspect ratio, so image sizes give grids and
token counts that differ per row. The Qwen checkpoints are saved as tokenizer + chat
template + PIL image processor files (transformers cannot build their processor class
without torchvision); a normal install's AutoProcessor reads the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)

try:  # the torchvision-free image processors (transformers >= 5.x names them *Pil)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    from transformers import Gemma3ImageProcessorPil as Gemma3ImageProcessor
except ImportError:  # pragma: no cover - older layouts
    from transformers import CLIPImageProcessor, Gemma3ImageProcessor

from drafters.massv import MassvDraftModel, MassvProjector

FAMILIES = ("llava", "gemma3", "qwen2_5_vl", "qwen3_vl")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
IMAGE_SIZE = 32
IMAGE_TOKENS = 16
NOISY_HEAD = 0.04  # LM-head noise of the "massv-noisy" drafter
SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<image>", "<start_of_image>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>",
]
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_PATCH = 8  # pixels per patch side; 2x2 patches merge into one image token
QWEN_ROPE_THETA = 1e6  # as the released Qwen2.5-VL checkpoints (Qwen3-VL: 5e6)
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 32 * 32, 64 * 64  # 4 to 16 image tokens per image
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star"]
CORPUS = [
    f"the image shows a {size} {colour} {shape} on the {side} of a {bg} background."
    for size in ("small", "large")
    for colour in COLOURS
    for shape in SHAPES
    for side, bg in (("left", "grey"), ("right", "white"), ("top", "dark"))
] + ["Describe the image.", "What colour is the shape?", "How many shapes are there? There are two shapes."]

# One template for both families; the image placeholder is what each processor expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE_PLACEHOLDER{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 384, extra_corpus: tuple[str, ...] = (), qwen: bool = False
                    ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic); qwen=True: Qwen's special tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS + list(extra_corpus), trainer)
    if qwen:
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )


def _llama_config(vocab_size: int, hidden: int, layers: int, init_range: float) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=init_range, tie_word_embeddings=False,
    )


def _gemma3_text_config(vocab_size: int, hidden: int, layers: int, init_range: float) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        sliding_window=8, sliding_window_pattern=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=init_range, tie_word_embeddings=False,
    )


def _qwen2_config(vocab_size: int, hidden: int, layers: int, init_range: float) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=2, pad_token_id=0, initializer_range=init_range, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA},
    )


def _qwen3_config(vocab_size: int, hidden: int, layers: int, init_range: float) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        eos_token_id=2, pad_token_id=0, initializer_range=init_range, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA},
    )


def _qwen_target(family: str, tokenizer, hidden: int, layers: int, init_range: float):
    """A tiny Qwen2.5-VL or Qwen3-VL with its text config matching _qwen2_config / _qwen3_config."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
              "patch_size": QWEN_PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "initializer_range": init_range}
    # head_dim / 2 frequencies split between the temporal, height and width axes in the released checkpoints'
    # proportions: Qwen2.5-VL 16:24:24, Qwen3-VL 24:20:20 (interleaved)
    bands = hidden // 4 // 2
    if family == "qwen2_5_vl":
        text = _qwen2_config(len(tokenizer), hidden, layers, init_range).to_dict()
        text["rope_parameters"]["mrope_section"] = [bands // 4, 3 * bands // 8, bands - bands // 4 - 3 * bands // 8]
        vision.update(window_size=4 * QWEN_PATCH, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        return Qwen2_5_VLForConditionalGeneration(config)
    text = _qwen3_config(len(tokenizer), hidden, layers, init_range).to_dict()
    text["rope_parameters"].update(mrope_section=[bands // 2, bands // 4, bands - bands // 2 - bands // 4],
                                   mrope_interleaved=True)
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


def build_target(family: str, directory: str | Path, seed: int = 0, hidden: int = 64, layers: int = 4,
                 init_range: float = 0.2, active_layers: int | None = None,
                 tokenizer: PreTrainedTokenizerFast | None = None) -> Path:
    """A tiny random VLM of the family with its processor, saved to `directory`.

    A large init range gives peaked next-token distributions, so greedy decoding
    is not dominated by numerical near-ties. With active_layers=n, decoder layers
    after the first n get zero output projections: they still cost compute but
    leave the residual stream unchanged, so a drafter made of the first n layers
    predicts exactly what the target does (a cheap oracle, for measuring speed).
    """
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = tokenizer or build_tokenizer(qwen=family in QWEN_FAMILIES)
    vocab = len(tokenizer)
    if family in QWEN_FAMILIES:
        model = _qwen_target(family, tokenizer, hidden, layers, init_range)
        processor = None  # saved as its parts below
    elif family == "llava":
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8, projection_dim=32,
            ),
            text_config=_llama_config(vocab, hidden, layers, init_range),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS,
        )
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
            ),
            tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>"),
        )
    elif family == "gemma3":
        config = Gemma3Config(
            text_config=_gemma3_text_config(vocab, hidden, layers, init_range),
            vision_config=SiglipVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=4,
            ),
            mm_tokens_per_image=IMAGE_TOKENS,
            boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            initializer_range=init_range, tie_word_embeddings=False,
        )
        model = Gemma3ForConditionalGeneration(config)
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
            tokenizer=tokenizer, image_seq_length=IMAGE_TOKENS,
            chat_template=CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<start_of_image>"),
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if active_layers is not None:
        with torch.no_grad():
            for layer in model.model.language_model.layers[active_layers:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    else:
        tokenizer.save_pretrained(directory)
        Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        ).save_pretrained(directory)
    return directory


def build_text_drafter(target_dir: str | Path, directory: str | Path, seed: int = 1, hidden: int = 32,
                       layers: int = 1, init_range: float = 0.2) -> Path:
    """A small random causal LM of the target's family sharing its tokenizer."""
    directory = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    _random_causal_lm(target_dir, len(tokenizer), seed, hidden, layers, init_range).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_massv_drafter(target_dir: str | Path, directory: str | Path, seed: int = 2, hidden: int = 32,
                        layers: int = 1, perfect: bool = False, oracle_layers: int | None = None,
                        head_noise: float = 0.0) -> Path:
    """A MASSV drafter: small causal LM + projector over the target's image features.

    perfect=True copies the target's own language model (its first oracle_layers
    decoder layers, or all) and makes the projector an exact identity
    (GELU(x) - GELU(-x) = x), so every draft matches the target. head_noise adds
    seeded Gaussian noise of that scale to its LM head: a good but imperfect drafter,
    whose drafts are often accepted and sometimes rejected (what fidelity tests need).
    """
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForImageTextToText.from_pretrained(target_dir)
    feature_dim = target.config.get_text_config().hidden_size
    if perfect:
        language_model = _target_language_model(target, oracle_layers)
        projector = MassvProjector(feature_dim, feature_dim, hidden_features=2 * feature_dim)
        with torch.no_grad():
            eye = torch.eye(feature_dim)
            projector.linear_1.weight.copy_(torch.cat([eye, -eye]))
            projector.linear_1.bias.zero_()
            projector.linear_2.weight.copy_(torch.cat([eye, -eye], dim=1))
            projector.linear_2.bias.zero_()
            head = language_model.lm_head.weight
            head.add_(head_noise * torch.randn(head.shape, generator=torch.Generator().manual_seed(seed)))
    else:
        language_model = _random_causal_lm(target_dir, len(tokenizer), seed, hidden, layers, init_range=0.2)
        projector = MassvProjector(feature_dim, language_model.config.hidden_size)
    MassvDraftModel(language_model, projector, image_token_id=None).save_pretrained(directory, tokenizer)
    return Path(directory)


def build_msd_drafter(target_dir: str | Path, directory: str | Path, seed: int = 3, oracle: bool = False) -> Path:
    """An MSD head for the target: one random decoder layer, or (oracle=True) the target's whole decoder stack
    and final norm with fc passing the token embedding through. The oracle then computes what the target
    does but for the first prompt token, which its pairs (h_t, x_{t+1}) never show it: its drafts are
    mostly accepted, and sometimes not (what fidelity tests need)."""
    from drafters.msd import MsdDraftModel
    from pipeline.engine.target import Target

    torch.manual_seed(seed)
    target = Target.load(str(target_dir), device=torch.device("cpu"), dtype=torch.float32)
    if not oracle:
        MsdDraftModel.new(target).save_pretrained(directory)
        return Path(directory)
    text_config = target.text_config
    head = MsdDraftModel.new(target, text_config.num_hidden_layers,
                             layer_types=getattr(text_config, "layer_types", None))
    language_model = target.model.model.language_model
    with torch.no_grad():
        hidden = text_config.hidden_size
        head.fc.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1))
        head.fc.bias.zero_()
        head.decoder.layers.load_state_dict(language_model.layers.state_dict())
        head.decoder.norm.load_state_dict(language_model.norm.state_dict())
    head.save_pretrained(directory)
    return Path(directory)


def _random_causal_lm(target_dir, vocab_size: int, seed: int, hidden: int, layers: int, init_range: float):
    """A seeded random causal LM of the target's family."""
    torch.manual_seed(seed)
    model_class, make_config = CAUSAL_LMS[_family_of(target_dir)]
    return model_class(make_config(vocab_size, hidden, layers, init_range))


def build_world(family: str, directory: str | Path, target_layers: int = 4,
                active_layers: int | None = None) -> dict[str, Path]:
    """A tiny target and its drafters: name -> checkpoint directory.

    "text-only" and "massv" are small random drafters (rarely accepted);
    "massv-oracle" is the target's own language model (every draft accepted);
    "massv-noisy" is that oracle with a noisy LM head (often accepted, sometimes not);
    "msd" is a random MSD head, "msd-oracle" one built from the target's own layers (often accepted).
    With active_layers, "massv-shallow-oracle" is the target's first active_layers
    layers: every draft accepted at a fraction of the target's cost.
    """
    directory = Path(directory)
    target = build_target(family, directory / "target", layers=target_layers, active_layers=active_layers)
    world = {
        "target": target,
        "text-only": build_text_drafter(target, directory / "text-only"),
        "massv": build_massv_drafter(target, directory / "massv"),
        "massv-oracle": build_massv_drafter(target, directory / "massv-oracle", perfect=True),
        "massv-noisy": build_massv_drafter(target, directory / "massv-noisy", perfect=True, head_noise=NOISY_HEAD),
        "msd": build_msd_drafter(target, directory / "msd"),
        "msd-oracle": build_msd_drafter(target, directory / "msd-oracle", oracle=True),
    }
    if active_layers is not None:
        world["massv-shallow-oracle"] = build_massv_drafter(
            target, directory / "massv-shallow-oracle", perfect=True, oracle_layers=active_layers
        )
    return world


# target family -> the causal LM class of its text model, and that model's config
CAUSAL_LMS = {
    "llava": (LlamaForCausalLM, _llama_config),
    "gemma3": (Gemma3ForCausalLM, _gemma3_text_config),
    "qwen2_5_vl": (Qwen2ForCausalLM, _qwen2_config),
    "qwen3_vl": (Qwen3ForCausalLM, _qwen3_config),
}


def _target_language_model(target, num_layers: int | None = None):
    """The target's decoder (its first num_layers layers, or all) + LM head as a standalone causal LM."""
    text_config = target.config.get_text_config()
    model_class, make_config = CAUSAL_LMS[target.config.model_type]
    lm = model_class(make_config(text_config.vocab_size, text_config.hidden_size,
                                 num_layers or text_config.num_hidden_layers, text_config.initializer_range))
    lm.model.load_state_dict(target.model.language_model.state_dict(), strict=num_layers is None)
    lm.lm_head.load_state_dict(target.lm_head.state_dict())
    return lm


def _family_of(target_dir: str | Path) -> str:
    return json.loads((Path(target_dir) / "config.json").read_text())["model_type"]


QUESTIONS = [
    "Describe the image.",
    "What colour is the shape on the left of the grey background?",
    "How many shapes are there?",
    "the image shows a small red circle. What else?",
    "Is there a star?",
    "Describe the image in one long sentence with every colour you can see and where each shape is.",
    "hi",
]


def sample_rows(n: int, text_only_every: int = 5) -> list[tuple[str, Image.Image | None]]:
    """n (prompt, image) rows of varied prompt lengths and image sizes; every text_only_every-th has no image."""
    rows = []
    for i in range(n):
        colour = [(220, 30, 30), (30, 160, 60), (40, 60, 220), (230, 200, 40)][i % 4]
        image = Image.new("RGB", (24 + 7 * (i % 16), 40 - i % 30), (100 + 5 * (i % 30), 100, 100))
        image.paste(colour, (2, 2, 12 + i % 16, 14))
        text_only = text_only_every and i % text_only_every == text_only_every - 1
        rows.append((QUESTIONS[i % len(QUESTIONS)], None if text_only else image))
    return rows
