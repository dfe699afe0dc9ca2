"""The acceptance rule as a pure function: greedy prefix matching and lossless speculative sampling."""

import pytest
import torch

from pipeline.engine.acceptance import (
    PLACEHOLDER_TOKEN,
    SamplingConfig,
    accept_greedy,
    accept_sampled,
    logits_to_probs,
)


def one_hot_logits(tokens, vocab):
    return torch.nn.functional.one_hot(torch.tensor(tokens), vocab).float() * 10


def test_greedy_accepts_the_matching_prefix_then_recovers():
    draft = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 6, 7]])
    target = torch.stack(
        [one_hot_logits([5, 6, 7, 9], 10), one_hot_logits([5, 2, 7, 9], 10), one_hot_logits([5, 6, 7, 9], 10)]
    )
    num_accepted, out = accept_greedy(draft, target)
    assert num_accepted.tolist() == [3, 1, 0]
    assert out.tolist() == [
        [5, 6, 7, 9],  # all accepted + bonus
        [5, 2, PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN],  # recovered at the first mismatch
        [5, PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN],  # a later match does not count
    ]


def test_greedy_with_no_drafts_is_plain_decoding():
    num_accepted, out = accept_greedy(torch.empty(2, 0, dtype=torch.long), one_hot_logits([[3], [4]], 8))
    assert num_accepted.tolist() == [0, 0]
    assert out.tolist() == [[3], [4]]


def l1(a, b):
    return float((a - b).abs().sum())


def emitted_histograms(draft_probs, target_probs, rows, seed):
    """Empirical distribution of the token emitted at each position, over rows that reach it."""
    k, vocab = draft_probs.shape
    generator = torch.Generator().manual_seed(seed)
    q = draft_probs.expand(rows, k, vocab)
    p = target_probs.expand(rows, k + 1, vocab)
    drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=generator).reshape(rows, k)
    num_accepted, out = accept_sampled(drafts, q, p, generator)
    histograms = []
    for j in range(k + 1):
        reached = out[:, j][num_accepted >= j]
        assert (reached != PLACEHOLDER_TOKEN).all()
        histograms.append(torch.bincount(reached, minlength=vocab).float() / len(reached))
    return histograms, num_accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_output_follows_the_target_distribution(seed):
    """The emitted token at every position (recovered, accepted or bonus) is distributed as p."""
    torch.manual_seed(seed)
    vocab, k = 6, 3
    target = torch.rand(k + 1, vocab).pow(3).softmax(-1) if seed == 2 else torch.rand(k + 1, vocab) ** 2
    target = target / target.sum(-1, keepdim=True)
    # Drafts close to the target give many bonus tokens; seed 1 uses an unrelated drafter.
    draft = torch.rand(k, vocab) if seed == 1 else target[:k] + 0.3 * torch.rand(k, vocab)
    draft = draft / draft.sum(-1, keepdim=True)
    unrelated = torch.rand(k + 1, vocab)
    unrelated = unrelated / unrelated.sum(-1, keepdim=True)

    few, _ = emitted_histograms(draft, target, 2_000, seed)
    many, num_accepted = emitted_histograms(draft, target, 400_000, seed)
    assert (num_accepted == k).sum() > 10_000, "the bonus path must be exercised"
    for j in range(k + 1):
        to_target = l1(many[j], target[j])
        to_unrelated = l1(many[j], unrelated[j])
        separation = l1(target[j], unrelated[j])
        # Converges to the target: far closer than to an unrelated distribution, and still shrinking.
        assert to_target < 0.1 * separation, (j, to_target, separation)
        assert to_unrelated > 0.8 * separation
        assert to_target < l1(few[j], target[j])
        if j < k:  # the drafter's own distribution is not what comes out
            assert to_target < 0.25 * l1(draft[j], target[j]) or l1(draft[j], target[j]) < 0.05


def test_sampled_accepts_everything_when_drafter_equals_target():
    p = torch.rand(1, 4, 7).softmax(-1).expand(500, 4, 7)
    drafts = torch.multinomial(p[:, :3].reshape(-1, 7), 1).reshape(500, 3)
    num_accepted, out = accept_sampled(drafts, p[:, :3], p, torch.Generator().manual_seed(0))
    assert (num_accepted == 3).all()
    assert (out[:, :3] == drafts).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.01))
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_sampled_with_no_drafts_samples_the_target():
    p = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    num_accepted, out = accept_sampled(torch.empty(2, 0, dtype=torch.long), p[:, :0], p, None)
    assert num_accepted.tolist() == [0, 0] and out.tolist() == [[1], [2]]
