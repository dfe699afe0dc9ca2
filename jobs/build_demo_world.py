"""Rebuild the demo world from scratch, seeded: a small LLaVA trained on synthetic scenes and its drafters.

    python jobs/build_demo_world.py [--out demo_world] [--target-steps 3000]
    python jobs/build_demo_world.py --only msd    # the MSD heads again, for the target already under --out

Every step uses the project's own machinery on a local Ray:
  1. scenes (pipeline/lab/scenes.py): captions, questions and counting instructions whose answers need the image;
  2. the target: a from-scratch LLaVA (CLIP + Llama, real HF classes, tokenizer covering the scenes' words,
     image processor and chat template saved with save_pretrained), trained with jobs/train_drafter.py's
     Ray Train loop (--phase target); exact match on held-out scenes is reported;
  3. drafters about 1/16 of the target's parameters: text-only (--phase text), MASSV after phase 1 (adapt),
     MASSV after phase 2 (distill, on a corpus the caption job writes with the target's own answers);
  4. an MSD head (--phase msd, one decoder layer over the target's hidden states) on the same corpus, and the
     two ablations of MSD's claims: image tokens fused like text (a plain EAGLE head), and images from the
     first step instead of text-first;
  5. tau and acceptance rate of each drafter on held-out instructions at gamma 5, temperature 0 and 1.
Only the final checkpoints, held-out demo and benchmark prompts and world.json stay under --out (committed;
25 MB at most).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from drafters import load_drafter  # noqa: E402
from drafters.training import TrainConfig, run_training  # noqa: E402
from pipeline.engine import EngineConfig, SamplingConfig, SpecDecodeCounts, SpecDecodeEngine, Target  # noqa: E402
from pipeline.engine.prompts import prepare_prompt  # noqa: E402
from pipeline.job.caption import run_caption  # noqa: E402
from pipeline.job.cli import flag, parse_config  # noqa: E402
from pipeline.job.config import CaptionConfig  # noqa: E402
from pipeline.job.ray_cluster import connect as connect_ray  # noqa: E402
from pipeline.lab import scenes, tiny_models  # noqa: E402
from pipeline.lab.demo import BENCH_PROMPTS  # noqa: E402

DRAFTERS = {"text-only": "text-only", "MASSV phase 1": "massv-adapt", "MASSV phase 1+2": "massv", "MSD": "msd",
            "MSD, image tokens fused (plain EAGLE)": "msd-fused", "MSD, images from the start": "msd-mixed"}
# the MSD heads: directory -> TrainConfig settings of its run
MSD_HEADS = {"msd": {}, "msd-fused": {"decoupled": False}, "msd-mixed": {"curriculum": False}}


@dataclass
class WorldConfig:
    out: str = field(default="demo_world", metadata=flag("where the world goes (committed)"))
    work: str = field(default="out/demo_world_build", metadata=flag("intermediate data, runs and corpora"))
    target_steps: int = field(default=3000, metadata=flag("training steps of the target"))
    drafter_steps: int = field(default=600, metadata=flag("training steps of each drafter phase"))
    scenes: int = field(default=6000, metadata=flag("scenes per training set"))
    seed: int = field(default=0, metadata=flag("seed of every generator and training run"))
    only: str = field(default="all", metadata=flag(
        "all: the whole world; msd: only the MSD heads, for the target under --out", choices=("all", "msd")))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def held_out_prompts(target: Target, rows: list[dict]):
    return [prepare_prompt(target.processor, r["prompt"], Image.open(io.BytesIO(r["image"])), target.context_length)
            for r in rows]


def exact_match(target: Target, rows: list[dict]) -> float:
    engine = SpecDecodeEngine(target, None, EngineConfig(max_new_tokens=48))
    results = engine.generate(held_out_prompts(target, rows))
    return sum(r.text.strip() == row["answer"] for r, row in zip(results, rows)) / len(rows)


def acceptance_table(target: Target, out: Path, rows: list[dict]) -> list[dict]:
    prompts = held_out_prompts(target, rows)
    table = []
    for label, name in DRAFTERS.items():
        drafter = load_drafter(out / name, target)
        for temperature in (0.0, 1.0):
            sampling = SamplingConfig(temperature=temperature, seed=0)
            engine = SpecDecodeEngine(target, drafter, EngineConfig(gamma=5, max_new_tokens=48, sampling=sampling))
            counts = SpecDecodeCounts()
            for result in engine.generate(prompts):
                counts.observe(result.counts)
            table.append({"drafter": label, "temperature": temperature, "tau": counts.mean_accepted_length,
                          "acceptance_rate": counts.acceptance_rate,
                          "acceptance_per_position": counts.acceptance_per_position})
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_config(WorldConfig, argv, __doc__.split("\n\n")[0])
    print(f"config: {asdict(args)}", flush=True)
    started = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    if args.only == "all":
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    seed = args.seed
    n = args.scenes
    instruct = scenes.write_parquet(scenes.records(n // 4, seed + 5, "instruct"), data / "instruct" / "i.parquet")
    held_out = scenes.records(128, seed + 1000, "instruct")
    connect_ray()
    common = dict(storage_path=str(work / "runs"), batch_size=32, log_every=50, seed=seed)
    drafter_common = dict(target=str(out / "target"), steps=args.drafter_steps, lr=2e-3, checkpoint_every=200,
                          **common)
    if args.only == "all":
        accuracy = build_target_and_massv(args, out, work, instruct, held_out, common, drafter_common)
    else:
        accuracy = json.loads((out / "world.json").read_text())["target_exact_match"]
        run_caption(corpus_config(out, work, instruct, drafter=out / "massv-adapt"))
    for name, settings in MSD_HEADS.items():
        run_training(TrainConfig(phase="msd", data=str(work / "corpus" / "parts"), output=str(out / name),
                                 name=name, answer_column="text", **{**drafter_common, "lr": 1e-3}, **settings))

    target = Target.load(str(out / "target"))
    table = acceptance_table(target, out, held_out)
    drafter_params = parameters(load_drafter(out / "massv", target).model.language_model)
    msd_params = parameters(load_drafter(out / "msd", target).model)
    world = {"target_exact_match": accuracy, "held_out_rows": len(held_out),
             "target_parameters": parameters(target.model), "drafter_parameters": drafter_params,
             "msd_parameters": msd_params, "acceptance": table, "build_seconds": time.perf_counter() - started,
             "config": asdict(args)}
    (out / "world.json").write_text(json.dumps(world, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"\ntarget {world['target_parameters']:,} parameters, drafter {drafter_params:,}, MSD head {msd_params:,}; "
          f"target exact match {accuracy:.1%}; {size / 1e6:.1f} MB under {out}\n")
    print("| drafter | temperature | tau | acceptance rate |\n| --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['drafter']} | {row['temperature']:g} | {row['tau']:.2f} | {row['acceptance_rate']:.1%} |")


def corpus_config(out: Path, work: Path, instruct: Path, drafter: Path) -> CaptionConfig:
    """The self-distillation corpus: the target's own answers to the instruct rows, images kept."""
    return CaptionConfig(input=str(instruct.parent), output=str(work / "corpus"), target=str(out / "target"),
                         drafter=str(drafter), gamma=5, max_new_tokens=48, keep_images=True, batch_size=64)


def build_target_and_massv(args: WorldConfig, out: Path, work: Path, instruct: Path, held_out: list[dict],
                           common: dict, drafter_common: dict) -> float:
    """Data, the trained target, the text-only and MASSV drafters and the corpus; returns the target's exact match."""
    data, seed, n = work / "data", args.seed, args.scenes
    target_rows = scenes.records(n, seed + 1, "caption") + scenes.records(n, seed + 2, "instruct")
    files = {
        "target": scenes.write_parquet(target_rows, data / "target.parquet"),
        "text": scenes.write_parquet(scenes.text_records(n, seed + 3), data / "text.parquet"),
        "adapt": scenes.write_parquet(scenes.records(n // 2, seed + 4, "caption"), data / "adapt.parquet"),
    }
    scenes.write_parquet(held_out, out / "prompts" / "held_out.parquet")
    scenes.write_parquet(scenes.records(64, seed + 1001, "caption"), out / BENCH_PROMPTS)  # jobs/bench.py's

    tokenizer = tiny_models.build_tokenizer(vocab_size=512, extra_corpus=tuple(scenes.vocabulary_corpus()) * 4)
    tiny_models.build_target("llava", work / "target-init", seed=seed, hidden=128, layers=4, init_range=0.02,
                             tokenizer=tokenizer)
    run_training(TrainConfig(phase="target", data=str(files["target"]), target=str(work / "target-init"), drafter="",
                             output=str(out / "target"), name="target", steps=args.target_steps, lr=6e-4,
                             checkpoint_every=500, **common))
    accuracy = exact_match(Target.load(str(out / "target")), held_out)
    print(f"target exact match on {len(held_out)} held-out instructions: {accuracy:.1%}", flush=True)

    tiny_models.build_text_drafter(out / "target", work / "text-init", seed=seed, hidden=40, layers=1,
                                   init_range=0.02)
    run_training(TrainConfig(phase="text", data=str(files["text"]), drafter=str(work / "text-init"),
                             output=str(out / "text-only"), name="text", **drafter_common))
    run_training(TrainConfig(phase="adapt", data=str(files["adapt"]), drafter=str(out / "text-only"),
                             output=str(out / "massv-adapt"), name="adapt", **drafter_common))
    run_caption(corpus_config(out, work, instruct, drafter=out / "massv-adapt"))
    run_training(TrainConfig(phase="distill", data=str(work / "corpus" / "parts"), drafter=str(out / "massv-adapt"),
                             output=str(out / "massv"), name="distill", answer_column="text", **drafter_common))
    return accuracy


if __name__ == "__main__":
    main()
