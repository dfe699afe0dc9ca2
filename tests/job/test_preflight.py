"""A bad caption job fails at once, before any cluster work, with one sentence saying what to fix."""

from __future__ import annotations

import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from transformers import LlamaConfig, LlamaForCausalLM

from jobs.caption import main
from pipeline.job.caption import run_caption
from pipeline.job.config import CaptionConfig, JobConfigError
from pipeline.job.preflight import preflight
from pipeline.lab import tiny_models


@pytest.fixture
def data(tmp_path):
    from conftest import write_caption_dataset

    write_caption_dataset(tmp_path / "data", num_good=3, parts=1)
    return tmp_path / "data"


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


def wrong_vocabulary_drafter(directory):
    other = tiny_models.build_tokenizer(vocab_size=300, extra_corpus=("zebra zebra quokka",) * 50)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(other), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(directory)
    other.save_pretrained(directory)
    return directory


def unreadable_weights(directory):
    for weights in directory.rglob("*.safetensors"):
        weights.write_bytes(b"\xff" * 16)
    return directory


def pickled_only(directory):
    for weights in directory.rglob("*.safetensors"):
        weights.with_suffix(".bin").write_bytes(weights.read_bytes())
        weights.unlink()
    return directory


# (what is wrong, how to make the job so, the sentence that must say so)
CASES = [
    ("missing input", lambda w, d, t: {"input": str(t / "nowhere")}, "input .*nowhere does not exist"),
    ("unknown column", lambda w, d, t: {"prompt_column": "question"},
     "--prompt-column 'question' is not in the columns of .* pass one of those"),
    ("nonexistent target", lambda w, d, t: {"target": str(t / "no-model")}, "target .* is not a checkpoint directory"),
    ("pickled target", lambda w, d, t: {"target": str(pickled_only(copy_checkpoint(w["target"], t / "m")))},
     "has no .safetensors weights \\(pickled checkpoints are never loaded\\)"),
    ("unreadable target", lambda w, d, t: {"target": str(unreadable_weights(copy_checkpoint(w["target"], t / "m")))},
     "target weights .* are unreadable"),
    ("text model as target", lambda w, d, t: {"target": str(w["text-only"])},
     "is a 'llama' model, which is not an image-text-to-text architecture"),
    ("nonexistent drafter", lambda w, d, t: {"drafter": str(t / "no-drafter")},
     "drafter .* is not a checkpoint directory"),
    ("vocabulary mismatch", lambda w, d, t: {"drafter": str(wrong_vocabulary_drafter(t / "d"))},
     "does not share the target's vocabulary: token .* use a drafter with the target's tokenizer"),
    ("output not writable", lambda w, d, t: {"output": str(d / "part-0.parquet" / "out")},
     "output .* is not writable"),
    ("object store too small", lambda w, d, t: {"object_store_mb": 10},
     "--object-store-mb must be at least 75 \\(Ray's smallest store\\), got 10"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_job_fails_before_cluster_work(case, world, data, tmp_path):
    _, make, message = case
    settings = dict(input=str(data), output=str(tmp_path / "out"), target=str(world["llava"]["target"]),
                    drafter=str(world["llava"]["massv"]), model_cache=str(tmp_path / "cache"))
    settings.update(make(world["llava"], data, tmp_path))
    with pytest.raises(JobConfigError, match=message) as failure:
        run_caption(CaptionConfig(**settings))
    assert "\n" not in str(failure.value)
    assert not ray.is_initialized(), "the job must fail before starting or joining a cluster"


def test_output_with_results_needs_resume(world, data, tmp_path):
    output = tmp_path / "out"
    (output / "parts").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["row-0"]}), output / "parts" / "earlier.parquet")
    config = CaptionConfig(input=str(data), output=str(output), target=str(world["llava"]["target"]))
    with pytest.raises(JobConfigError, match="already holds results \\(1 rows\\): pass --resume"):
        run_caption(config)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-actors", "3,1"], "--num-actors needs 1 <= MIN <= MAX"),
        (["--num-actors", "two"], "--num-actors must be N or MIN,MAX"),
        (["--gamma", "-2"], "--gamma must be a non-negative integer or 'auto'"),
        (["--top-p", "0"], "--top-p must be in \\(0, 1\\]"),
    ],
)
def test_command_line_errors_are_one_line(flags, message, capsys, tmp_path):
    code = main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--target", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert re.search(message, err)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_targets_and_their_drafters_pass_preflight(family, world, data, tmp_path):
    settings = dict(input=str(data), output=str(tmp_path / "out"), target=str(world[family]["target"]),
                    model_cache=str(tmp_path / "cache"))
    for drafter in ("massv", "text-only"):
        plan = preflight(CaptionConfig(**settings, drafter=str(world[family][drafter])))
        assert plan.context_length == 512
    with pytest.raises(JobConfigError, match="does not share the target's vocabulary"):
        run_caption(CaptionConfig(**settings, drafter=str(world["llava"]["massv"])))
    assert not ray.is_initialized()
