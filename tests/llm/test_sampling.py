"""Exactness of speculative sampling: speculative samples follow the target's own distribution.

Two levels: the acceptance rule alone on synthetic distributions (many samples, tight
bounds), and whole generations of a tiny model with an 8-token vocabulary, whose exact
distribution over the first three tokens is computed by enumeration.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.llm.drafters import PromptLookupDrafter
from voice.llm.sampling import Sampling, distribution
from voice.llm.speculative import SpeculativeDecoder, _accept_sampled

NO_EOS: set[int] = set()


def chi_square_critical(degrees: int, tail: float = 1e-4) -> float:
    """Upper ``tail`` quantile of the chi-square distribution (Wilson-Hilferty approximation)."""
    z = {1e-3: 3.090, 1e-4: 3.719}[tail]
    h = 2 / (9 * degrees)
    return degrees * (1 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: Counter, expected: dict, samples: int) -> tuple[float, int]:
    """Pearson's statistic with cells of expected count below 5 pooled into one; return it and its degrees of freedom."""
    statistic, pooled_observed, pooled_expected, cells = 0.0, 0, 0.0, 0
    for key, probability in expected.items():
        mean = probability * samples
        if mean < 5:
            pooled_observed += counts.get(key, 0)
            pooled_expected += mean
            continue
        statistic += (counts.get(key, 0) - mean) ** 2 / mean
        cells += 1
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / max(pooled_expected, 1e-9)
        cells += 1
    assert sum(counts.values()) == samples
    assert set(counts) <= set(expected), f"samples outside the support: {set(counts) - set(expected)}"
    return statistic, cells - 1


def total_variation(counts: Counter, expected: dict, samples: int) -> float:
    keys = set(counts) | set(expected)
    return 0.5 * sum(abs(counts.get(key, 0) / samples - expected.get(key, 0.0)) for key in keys)


SETTINGS = [
    Sampling(temperature=1.0),
    Sampling(temperature=0.7, top_k=4),
    Sampling(temperature=1.3, top_p=0.8),
    Sampling(temperature=1.0, top_k=5, top_p=0.9),
]


def setting_id(sampling: Sampling) -> str:
    return f"t{sampling.temperature}-k{sampling.top_k}-p{sampling.top_p}"


@pytest.mark.parametrize("sampling", SETTINGS, ids=setting_id)
@pytest.mark.parametrize("deterministic_draft", [False, True], ids=["sampled-draft", "one-hot-draft"])
def test_acceptance_rule_reproduces_target_distribution(sampling, deterministic_draft):
    """The first emitted token of a step follows the target's first row, whatever the draft."""
    generator = torch.Generator().manual_seed(1)
    vocab = 7
    target_logits = torch.randn(3, vocab, generator=generator) * 2
    draft_logits = torch.randn(2, vocab, generator=generator) * 2
    target_rows = distribution(target_logits, sampling)
    draft_rows = distribution(draft_logits, sampling)
    samples = 8000
    first_tokens: Counter = Counter()
    for _ in range(samples):
        drafts = [int(torch.multinomial(row, 1, generator=generator)) for row in draft_rows]
        probabilities = None if deterministic_draft else draft_rows
        accepted, next_token = _accept_sampled(drafts, probabilities, target_logits, sampling, generator)
        emitted = drafts[:accepted] + [next_token]
        first_tokens[emitted[0]] += 1
    expected = {token: float(p) for token, p in enumerate(target_rows[0]) if p > 0}
    statistic, degrees = chi_square(first_tokens, expected, samples)
    assert statistic < chi_square_critical(degrees), f"chi-square {statistic:.1f} with {degrees} degrees of freedom"
    assert total_variation(first_tokens, expected, samples) < 0.03


def test_acceptance_rule_accepts_everything_when_draft_equals_target():
    sampling = Sampling(temperature=1.0)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, generator=generator)
    rows = distribution(logits, sampling)
    for _ in range(200):
        drafts = [int(torch.multinomial(row, 1, generator=generator)) for row in rows[:3]]
        accepted, _ = _accept_sampled(drafts, rows[:3], logits, sampling, generator)
        assert accepted == 3


def test_acceptance_rule_rejects_token_outside_target_top_k():
    sampling = Sampling(temperature=1.0, top_k=1)
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        accepted, token = _accept_sampled([1], None, logits, sampling, generator)
        assert (accepted, token) == (0, 0)


def exact_sequence_distribution(model, prompt: list[int], length: int, sampling: Sampling) -> dict[tuple[int, ...], float]:
    """Enumerate every sequence of ``length`` tokens with its probability under ``model``."""
    vocab = model.config.vocab_size
    result: dict[tuple[int, ...], float] = {}
    with torch.inference_mode():
        frontier = {(): 1.0}
        for _ in range(length):
            following = {}
            for prefix, probability in frontier.items():
                logits = model(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1:].float()
                row = distribution(logits, sampling)[0]
                for token in range(vocab):
                    if row[token] > 0:
                        following[prefix + (token,)] = probability * float(row[token])
            frontier = following
        result = frontier
    return result


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=3), Sampling(temperature=1.2, top_p=0.85)],
    ids=setting_id,
)
def test_speculative_sequences_follow_target_distribution(sampling):
    """Whole generations: three tokens, the last two from a drafting step with rejections."""
    target = tiny_qwen2(seed=30, vocab_size=8)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)  # undo most of tiny_qwen2's sharpening: spread the distributions
    draft = perturbed_copy(target, 1.0, seed=31)
    prompt = [1, 5, 2]
    expected = exact_sequence_distribution(target, prompt, 3, sampling)
    decoder = SpeculativeDecoder(target, draft, NO_EOS, draft_tokens=2)
    samples = 1500
    sequences: Counter = Counter()
    drafted = accepted = 0
    generator_seed = 1000
    for index in range(samples):
        seeded = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, seed=generator_seed + index)
        tokens = [token for step in decoder.generate(prompt, 3, sampling=seeded) for token in step]
        sequences[tuple(tokens)] += 1
        drafted += decoder.stats.drafted
        accepted += decoder.stats.accepted
    # Both branches of the rule ran many times: acceptance and rejection with resampling.
    assert 0.1 * drafted < accepted < 0.9 * drafted
    # Marginals of each position and the joint distribution of the last two tokens.
    for position in range(3):
        observed = Counter(sequence[position] for sequence in sequences.elements())
        marginal: dict = {}
        for sequence, probability in expected.items():
            marginal[sequence[position]] = marginal.get(sequence[position], 0.0) + probability
        statistic, degrees = chi_square(observed, marginal, samples)
        assert statistic < chi_square_critical(max(degrees, 1)), f"position {position}: chi-square {statistic:.1f}, df {degrees}"
    statistic, degrees = chi_square(sequences, expected, samples)
    assert statistic < chi_square_critical(max(degrees, 1)), f"joint: chi-square {statistic:.1f}, df {degrees}"


def test_seeded_sampling_is_reproducible():
    target = tiny_qwen2(seed=32)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.5, seed=33), NO_EOS, draft_tokens=3)
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=1234)
    runs = [[token for step in decoder.generate([3, 1, 4], 30, sampling=sampling) for token in step] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    other = Sampling(temperature=1.0, top_p=0.95, seed=4321)
    assert [token for step in decoder.generate([3, 1, 4], 30, sampling=other) for token in step] != runs[0]


def test_sampling_with_prompt_lookup_keeps_target_support():
    """One-hot lookup drafts never emit a token the target's top-k excludes."""
    target = tiny_qwen2(seed=34, vocab_size=8)
    decoder = SpeculativeDecoder(target, PromptLookupDrafter(max_ngram=2), NO_EOS, draft_tokens=3)
    sampling = Sampling(temperature=1.0, top_k=1, seed=5)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    output = [token for step in decoder.generate(prompt, 12, sampling=sampling) for token in step]
    # top_k=1 makes sampling greedy: the output must equal plain greedy decoding.
    plain = SpeculativeDecoder(target, None, NO_EOS)
    assert output == [token for step in plain.generate(prompt, 12, speculative=False) for token in step]
    assert decoder.stats.drafted > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_invalid_sampling_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**arguments)


def test_top_p_keeps_token_that_crosses_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    row = distribution(logits, Sampling(temperature=1.0, top_p=0.7))[0]
    assert row[0] > 0
    assert row[1] > 0
    assert row[2] == 0
    assert row[3] == 0
    torch.testing.assert_close(row[:2], torch.tensor([0.625, 0.375]))


def test_top_k_keeps_ties():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    row = distribution(logits, Sampling(temperature=1.0, top_k=2))[0]
    assert (row > 0).tolist() == [True, True, True, False]


def test_all_sequences_enumerated_sum_to_one():
    target = tiny_qwen2(seed=35, vocab_size=8)
    expected = exact_sequence_distribution(target, [1, 2], 2, Sampling(temperature=1.0, top_k=3))
    assert math.isclose(sum(expected.values()), 1.0, rel_tol=1e-5)
    assert all(len(key) == 2 for key in expected)
    assert len(expected) <= 9
    assert set(itertools.chain.from_iterable(expected)) <= set(range(8))
