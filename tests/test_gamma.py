"""gamma: parsing, and `auto` choosing from measured acceptance and costs."""

import pytest

from pipeline.gamma import AUTO, GammaPolicy, parse_gamma


def test_parse_gamma():
    assert parse_gamma("auto") == AUTO and parse_gamma(" AUTO ") == AUTO
    assert parse_gamma("4") == 4 and parse_gamma(0) == 0
    for bad in ["-1", "x", None, 2.5j]:
        with pytest.raises(ValueError, match="gamma must be"):
            parse_gamma(bad)


def policy_after(acceptance, draft_s, verify_s):
    policy = GammaPolicy(gamma="auto", max_gamma=8)
    for k, drafted, accepted in [(0, 0, 0), (4, 4, round(4 * acceptance))]:
        policy.observe(k, drafted, accepted, draft_s * k, verify_s(k + 1))
    policy.acceptance = acceptance
    return policy


def test_auto_speculates_when_drafts_are_cheap_and_good():
    policy = policy_after(0.8, draft_s=0.01, verify_s=lambda q: 1.0)  # memory-bound target
    assert policy.best_gamma() >= 4
    assert policy.expected_rate(policy.best_gamma()) > 2 * policy.expected_rate(0)


def test_auto_falls_to_zero_when_verification_grows_with_width():
    policy = policy_after(0.5, draft_s=0.05, verify_s=lambda q: 1.0 * q)  # compute-bound (large batch)
    assert policy.best_gamma() == 0


def test_auto_falls_to_zero_with_a_useless_drafter():
    policy = policy_after(0.0, draft_s=0.01, verify_s=lambda q: 1.0)
    assert policy.best_gamma() == 0
    # Even when noise makes a wider verification look faster than a plain step.
    noisy = policy_after(0.0, draft_s=0.001, verify_s=lambda q: 1.0 if q == 1 else 0.9)
    assert noisy.best_gamma() == 0


def test_auto_starts_by_measuring_both_regimes_then_probes():
    policy = GammaPolicy(gamma="auto", probe_every=4)
    assert policy.choose() == 0
    policy.observe(0, 0, 0, 0.0, 1.0)
    assert policy.choose() == 4
    policy.observe(4, 4, 4, 0.04, 1.0)
    best = policy.best_gamma()
    assert best > 0
    policy.observe(best, best, best, 0.01 * best, 1.0)
    policy.observe(best, best, best, 0.01 * best, 1.0)
    assert policy.steps == 4 and policy.choose() == 0  # probe of plain decoding
    probes = []
    for _ in range(100):
        k = policy.choose()
        probes.append(k == 0)
        policy.observe(k, k, k, 0.01 * k, 1.0)
    gaps = [i for i, probe in enumerate(probes) if probe]
    assert [b - a for a, b in zip(gaps, gaps[1:])] == [8, 16, 32]  # intervals double while the choice holds


def test_engine_config_fails_at_once_on_bad_values():
    from pipeline.engine import EngineConfig

    assert EngineConfig(gamma="Auto").gamma == AUTO and EngineConfig(gamma="2").gamma == 2
    with pytest.raises(ValueError, match="gamma must be"):
        EngineConfig(gamma="three")
    with pytest.raises(ValueError, match="max_new_tokens"):
        EngineConfig(max_new_tokens=-1)


def test_fixed_gamma_is_fixed():
    assert GammaPolicy(gamma=3).choose() == 3
