"""metrics: known answers for every metric: hand-computed cases, a uniform model, a memorising model, and
exact KS p-values checked against brute-force enumeration of all interleavings, and the KS test and AUC
against scipy (TOFU calls ks_2samp)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sisaflow.evaluation.metrics import (
    AttackResult,
    RougeL,
    TokenStats,
    _rouge_scorer,
    auc,
    auc_with_ci,
    forget_quality,
    ks_two_sample,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    perplexity,
    priv_leak,
    rouge_l_scores,
    rouge_l_text,
    run_attacks,
    sequence_log_likelihood,
    token_stats,
    truth_ratio,
    zlib_score,
)

LN2 = math.log(2)


def _stats(token_log_probs) -> TokenStats:
    lp = np.asarray(token_log_probs, dtype=np.float64)
    return TokenStats(lp, np.zeros_like(lp), np.ones_like(lp))


# ----------------------------------------------------------------------------------------------- token_stats


def test_token_stats_known_distribution():
    # p = (1/2, 1/4, 1/4): log p is -ln2 or -2 ln2 with weight 1/2 each, so mu = -1.5 ln2 and sigma = 0.5 ln2
    lp = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log().repeat(2, 1)
    s = token_stats(lp, torch.tensor([0, 1]))
    np.testing.assert_allclose(s.token_log_probs, [-LN2, -2 * LN2], rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.mu, [-1.5 * LN2] * 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.sigma, [0.5 * LN2] * 2, rtol=0, atol=1e-15)
    # z-scores are +1 and -1: the lowest half averages -1, both average 0
    assert min_k_plus_plus_score(s, k=0.5) == pytest.approx(-1.0, abs=1e-12)
    assert min_k_plus_plus_score(s, k=1.0) == pytest.approx(0.0, abs=1e-12)


def test_token_stats_matches_a_direct_computation_and_accepts_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 13, generator=g) * 3  # float32 logits, not normalised
    ids = torch.randint(0, 13, (7,), generator=g)
    s = token_stats(logits, ids)
    lp = torch.log_softmax(logits.double(), -1).numpy()
    p = np.exp(lp)
    mu = (p * lp).sum(-1)
    np.testing.assert_allclose(s.token_log_probs, lp[np.arange(7), ids.numpy()], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.mu, mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.sigma, np.sqrt((p * (lp - mu[:, None]) ** 2).sum(-1)), rtol=0, atol=1e-12)
    assert s.token_log_probs.dtype == s.mu.dtype == s.sigma.dtype == np.float64
    # already-normalised log-probabilities give the same statistics
    again = token_stats(torch.log_softmax(logits.double(), -1), ids)
    np.testing.assert_allclose(again.sigma, s.sigma, rtol=0, atol=1e-12)


def test_min_k_plus_plus_of_a_uniform_model_is_zero_not_nan():
    s = token_stats(torch.zeros(6, 50), torch.arange(6))
    assert (s.sigma <= 1e-12).all()
    for k in (0.2, 0.5, 1.0):
        assert min_k_plus_plus_score(s, k) == 0.0


def test_point_mass_token_inside_support_scores_zero_outside_minus_inf():
    logits = torch.tensor([[0.0, -math.inf, -math.inf]] * 2)
    inside = token_stats(logits, torch.tensor([0, 0]))
    assert inside.sigma.tolist() == [0.0, 0.0] and not np.isnan(inside.mu).any()
    assert min_k_plus_plus_score(inside) == 0.0
    outside = token_stats(logits, torch.tensor([0, 1]))
    assert min_k_plus_plus_score(outside, k=0.5) == -math.inf
    assert loss_score(outside) == -math.inf


@pytest.mark.parametrize(
    ("shape", "ids", "match"),
    [((4, 5), [0, 1, 2], "shape"), ((3, 5), [0, 1, 5], r"\[0, 5\)"), ((0, 5), [], "T >= 1")],
)
def test_token_stats_rejects_bad_input(shape, ids, match):
    with pytest.raises(ValueError, match=match):
        token_stats(torch.zeros(shape), torch.tensor(ids, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    vocab, tokens = 37, 13
    log_probs = torch.full((tokens, vocab), math.log(1 / vocab), dtype=torch.float64)
    ll = sequence_log_likelihood(log_probs, torch.arange(tokens))
    assert ll == pytest.approx(-tokens * math.log(vocab), abs=1e-12)
    assert abs(perplexity(ll, tokens) - vocab) < 1e-9


def test_perplexity_known_answer_and_no_tokens():
    assert perplexity(-2 * math.log(4), 2) == pytest.approx(4.0, abs=1e-12)
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError, match="at least one token"):
        perplexity(-1.0, 0)


# ------------------------------------------------------------------------------------------ membership scores


def test_loss_and_min_k_known_answers():
    s = _stats([-1, -2, -3, -4, -5])
    assert loss_score(s) == -3.0
    assert min_k_score(s, 0.2) == -5.0
    assert min_k_score(s, 0.4) == -4.5
    assert min_k_score(s, 0.01) == -5.0  # at least one token
    assert min_k_score(s, 1.0) == -3.0
    # 0.29 * 100 is 28.999... in floating point; still 29 tokens: -100..-72, mean -86
    assert min_k_score(_stats(-np.arange(1, 101)), 0.29) == -86.0
    for k in (0.0, 1.5):
        with pytest.raises(ValueError, match="k is the fraction"):
            min_k_score(s, k)


def test_zlib_score_known_answer_and_sign():
    # zlib.compress(b"abc") is 11 bytes: 2 header, 5 deflate, 4 checksum
    assert zlib_score(_stats([-1, -1, -1]), "abc") == pytest.approx(-1 / 11, abs=1e-15)
    # higher = member: a better-predicted record scores higher for the same text
    assert zlib_score(_stats([-0.1]), "some text") > zlib_score(_stats([-3.0]), "some text")


# ------------------------------------------------------------------------------------------------------- AUC


def test_auc_extremes_and_ties():
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert auc([1, 1, 1], [1, 1]) == 0.5
    # pairs: (1,2) 0, (1,0) 1, (2,2) 1/2, (2,0) 1, (3,2) 1, (3,0) 1 -> 4.5 / 6
    assert auc([1, 2, 3], [2, 0]) == 0.75
    assert auc([-math.inf, 0.0], [-math.inf]) == 0.75


def test_auc_equals_the_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(3)
    m, n = rng.integers(0, 6, 40), rng.integers(0, 6, 55)
    pairwise = ((m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :])).mean()
    assert auc(m, n) == pytest.approx(pairwise, abs=1e-12)


@pytest.mark.parametrize(("n", "m", "levels"), [(7, 3, 3), (40, 55, 6), (12_000, 9_000, 50), (15_000, 20, 0)])
def test_auc_is_scipy_s_mann_whitney_u_over_n_m(n, m, levels):
    """Issue 25, point 16: the hand-written AUC (vectorised, for the bootstrap) is scipy's Mann-Whitney U of the
    members over n * m, ties counted one half, at sizes with many ties and none. Mutant: ranks without averaging
    ties (`np.argsort` ranks): the tied cases differ."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(n)
    draw = (lambda k: rng.integers(0, levels, k).astype(float)) if levels else (lambda k: rng.normal(size=k))
    a, b = draw(n), draw(m) + (0.3 if not levels else 0)
    u = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").statistic
    assert auc(a, b) == pytest.approx(u / (n * m), rel=4 * (n + m) * np.finfo(float).eps)


def test_auc_rejects_empty_or_nan_groups():
    with pytest.raises(ValueError, match="member scores are empty"):
        auc([], [1.0])
    with pytest.raises(ValueError, match="non-member scores are empty"):
        auc_with_ci([1.0], [])
    with pytest.raises(ValueError, match="NaN"):
        auc([1.0, math.nan], [0.0])


def test_auc_of_one_distribution_is_half_and_its_interval_covers_half():
    rng = np.random.default_rng(0)
    value, low, high = auc_with_ci(rng.normal(size=1000), rng.normal(size=1000), seed=0)
    assert abs(value - 0.5) < 0.05
    assert low < 0.5 < high and high - low < 0.1


def test_auc_of_shifted_distributions_has_an_interval_above_half():
    rng = np.random.default_rng(1)
    value, low, high = auc_with_ci(rng.normal(1.0, size=200), rng.normal(size=200), seed=0)
    assert 0.5 < low <= value <= high
    # the population AUC of a unit shift is Phi(1 / sqrt 2) = 0.760
    assert low < 0.760 < high


def test_auc_with_ci_is_deterministic_per_seed_and_validates():
    rng = np.random.default_rng(2)
    m, n = rng.normal(0.3, size=50), rng.normal(size=60)
    assert auc_with_ci(m, n, n_boot=200, seed=5) == auc_with_ci(m, n, n_boot=200, seed=5)
    assert auc_with_ci(m, n, n_boot=200, seed=5)[1:] != auc_with_ci(m, n, n_boot=200, seed=6)[1:]
    with pytest.raises(ValueError, match="n_boot"):
        auc_with_ci(m, n, n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        auc_with_ci(m, n, alpha=1.0)


def test_priv_leak():
    assert priv_leak(0.6, 0.5) == pytest.approx(0.2, abs=1e-15)
    assert priv_leak(0.5, 0.5) == 0.0
    assert priv_leak(0.4, 0.5) == pytest.approx(-0.2, abs=1e-15)
    with pytest.raises(ValueError, match="undefined"):
        priv_leak(0.5, 0.0)
    with pytest.raises(ValueError, match="auc_unlearned"):
        priv_leak(1.2, 0.5)


# -------------------------------------------------------------------------------------------------- attacks


def _records(n: int, memorised: bool, seed: int, vocab: int = 64) -> tuple[list[TokenStats], list[str]]:
    """Token statistics of n random records under a model that has them by heart (memorised) or does not."""
    g = torch.Generator().manual_seed(seed)
    stats, texts = [], []
    for _ in range(n):
        t = int(torch.randint(8, 25, (1,), generator=g))
        ids = torch.randint(0, vocab, (t,), generator=g)
        logits = torch.randn(t, vocab, generator=g, dtype=torch.float64) * 0.5
        if memorised:
            logits[torch.arange(t), ids] += 12.0  # p(actual token) ~ 0.99
        stats.append(token_stats(logits, ids))
        texts.append(" ".join(f"w{int(i)}" for i in ids))
    return stats, texts


def test_every_attack_separates_a_memorising_model():
    members, member_texts = _records(40, memorised=True, seed=0)
    others, other_texts = _records(40, memorised=False, seed=1)
    results = run_attacks(members, member_texts, others, other_texts, seed=0, n_boot=300)
    assert [r.name for r in results] == ["loss", "zlib", "min_k", "min_k_plus_plus"]
    for r in results:
        assert r.auc > 0.99 and r.low > 0.95, r
        assert (r.n_members, r.n_nonmembers) == (40, 40)


def test_no_attack_separates_records_the_model_treats_alike():
    members, member_texts = _records(150, memorised=False, seed=2)
    others, other_texts = _records(150, memorised=False, seed=3)
    for r in run_attacks(members, member_texts, others, other_texts, seed=0, n_boot=300):
        assert abs(r.auc - 0.5) < 0.1 and r.low < 0.5 < r.high, r


def test_attack_results_hold_no_text_and_check_their_inputs():
    members, member_texts = _records(5, memorised=True, seed=4)
    others, other_texts = _records(5, memorised=False, seed=5)
    result = run_attacks(members, member_texts, others, other_texts, n_boot=20)[0]
    d = result.to_dict()
    assert set(d) == {"name", "auc", "low", "high", "n_members", "n_nonmembers"}
    assert AttackResult(**d) == result
    assert not {v for v in d.values() if isinstance(v, str)} & set(member_texts + other_texts)
    with pytest.raises(ValueError, match="4 member token statistics but 5 member texts"):
        run_attacks(members[:4], member_texts, others, other_texts)
    with pytest.raises(ValueError, match="non-member scores are empty"):
        run_attacks(members, member_texts, [], [])


# -------------------------------------------------------------------------------------------------- ROUGE-L


def _rouge_score_reference(reference: str, candidate: str):
    """Google's rouge-score as TOFU calls it, a scorer of its own."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, candidate)["rougeL"]


def test_rouge_l_is_rouge_score_as_tofu_runs_it():
    ref, cand = "The author's name is Hsiao Yun-Hwa.", "the author is named Hsiao Yun Hwa"
    # rouge-score's words: the author s name is hsiao yun hwa / the author is name hsiao yun hwa ("named" stems
    # to "name"); LCS 6 of 8 and 7 words. Lowercased whitespace tokens (the former rouge_l_text) gave F1 6/13.
    p, r = 6 / 7, 6 / 8
    got = rouge_l_scores(ref, cand)
    assert got == RougeL(p, r, 2 * p * r / (p + r))  # exactly, as rouge-score computes the F-measure
    assert got.f1 == 0.7999999999999999 and rouge_l_text(ref, cand) == got.f1
    want = _rouge_score_reference(ref, cand)
    assert got == (want.precision, want.recall, want.fmeasure)
    # LCS "the cat on mat" = 4: P = 4/4, R = 4/6, F1 = 2 * (2/3) / (5/3) = 0.8
    assert rouge_l_scores("the cat sat on the mat", "the cat on mat") == RougeL(1.0, 2 / 3, 0.8)
    assert rouge_l_scores("a b c d", "a b") == RougeL(1.0, 0.5, 2 / 3)
    # the textbook LCS: ABCBDAB vs BDCABA has length 4; P = 4/6, R = 4/7, F1 = 8/13
    assert rouge_l_text("A B C B D A B", "B D C A B A") == pytest.approx(8 / 13, abs=1e-15)
    assert rouge_l_text("1 2 3 4", "4 3 2 1") == pytest.approx(0.25, abs=1e-15)  # numbers are words too


def test_rouge_l_stems_words():
    from rouge_score import rouge_scorer

    # Porter stems: writes, writing -> write; novels -> novel
    assert rouge_l_scores("writes novels", "writing novel") == RougeL(1.0, 1.0, 1.0)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(
        "writes novels", "writing novel"
    )
    assert unstemmed["rougeL"].fmeasure == 0.0  # without the stemmer no word matches


def test_rouge_l_identical_disjoint_case_punctuation_and_empty_inputs():
    assert rouge_l_scores("the cat sat", "the cat sat") == RougeL(1.0, 1.0, 1.0)
    assert rouge_l_scores("the cat sat", "dogs run fast") == RougeL(0.0, 0.0, 0.0)
    assert rouge_l_text("The Cat  SAT!", "the cat sat") == 1.0  # case and punctuation do not count
    for ref, cand in (("", ""), ("the cat", ""), ("", "the cat"), ("?!", "the cat")):
        assert rouge_l_scores(ref, cand) == RougeL(0.0, 0.0, 0.0)
        assert all(type(x) is float for x in rouge_l_scores(ref, cand))
    assert _rouge_scorer() is _rouge_scorer()  # built once


# ----------------------------------------------------------------------------------------------------- TOFU


def test_truth_ratio_known_answer():
    # exp(mean(-2, -3) - (-1)) = exp(-1.5): the geometric mean of e^-2, e^-3 over e^-1
    assert truth_ratio(-1.0, [-2.0, -3.0]) == pytest.approx(math.exp(-1.5), abs=1e-15)
    assert truth_ratio(-1.0, [-2.0, -3.0]) == pytest.approx(
        math.sqrt(math.exp(-2) * math.exp(-3)) / math.exp(-1), abs=1e-15
    )
    assert truth_ratio(-0.5, [-0.5]) == 1.0
    with pytest.raises(ValueError, match="at least one perturbed"):
        truth_ratio(-1.0, [])


def test_forget_quality_of_identical_ratios_is_one_and_ignores_reciprocals():
    ratios = [0.3, 0.5, 0.8, 1.1, 0.7]
    assert forget_quality(ratios, ratios) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 0.3, 40), rng.lognormal(0.2, 0.3, 40)
    # TOFU's code stores 1 / ratio; the p-value must not depend on that
    assert forget_quality(a, b) == pytest.approx(forget_quality(1 / a, 1 / b), abs=1e-15)
    assert forget_quality(a, b * 3) < 1e-6
    with pytest.raises(ValueError, match="unlearned model's truth ratios are empty"):
        forget_quality([], ratios)


# ------------------------------------------------------------------------------------------------------- KS


def test_ks_identical_and_disjoint_samples():
    assert ks_two_sample([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    # disjoint samples: only the two paths along the edges reach D = 1, out of C(n+m, n)
    d, p = ks_two_sample([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert d == 1.0 and p == pytest.approx(2 / math.comb(10, 5), rel=1e-12)  # 0.00794
    assert ks_two_sample([1, 2, 3], [4, 5, 6])[1] == pytest.approx(0.1, rel=1e-12)
    assert ks_two_sample([1, 2, 3], [4, 5, 6, 7, 8, 9, 10])[1] == pytest.approx(2 / 120, rel=1e-12)


def test_ks_statistic_with_ties():
    # F_a(1) = 2/3, F_b(1) = 1/3; both reach 1 at 2
    assert ks_two_sample([1, 1, 2], [1, 2, 2])[0] == pytest.approx(1 / 3, abs=1e-15)


@pytest.mark.parametrize(("n", "m", "seed"), [(6, 4, 0), (5, 7, 1), (3, 9, 2), (8, 8, 3)])
def test_ks_exact_p_value_equals_brute_force_enumeration(n, m, seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(size=n), rng.normal(0.7, size=m)])
    d, p = ks_two_sample(values[:n], values[n:])
    # under the null every choice of which n of the sorted values are the first sample is equally likely
    first = np.zeros((math.comb(n + m, n), n + m), dtype=bool)
    for row, idx in enumerate(itertools.combinations(range(n + m), n)):
        first[row, list(idx)] = True
    seen_first = first.cumsum(axis=1)
    seen_second = np.arange(1, n + m + 1) - seen_first
    d_all = np.abs(seen_first / n - seen_second / m).max(axis=1)
    assert p == pytest.approx((d_all >= d - 1e-12).mean(), rel=1e-12)


def test_ks_large_samples():
    rng = np.random.default_rng(0)
    assert ks_two_sample(rng.normal(size=500), rng.normal(2.0, size=500))[1] < 1e-6
    assert ks_two_sample(rng.normal(size=500), rng.normal(size=500))[1] > 0.05
    # the asymptotic approximation is close to the exact value at this size
    a, b = rng.normal(size=1000), rng.normal(0.1, size=1000)
    exact, asymptotic = ks_two_sample(a, b, "exact"), ks_two_sample(a, b, "asymptotic")
    # D is a count over n * m, which scipy's two methods round differently by an ulp or two
    assert exact[0] == pytest.approx(asymptotic[0], rel=4 * np.finfo(float).eps)
    assert abs(exact[1] - asymptotic[1]) < 0.02


@pytest.mark.parametrize(("n", "m"), [(40, 55), (10_000, 10_000), (10_001, 12_000), (20_000, 3)])
def test_forget_quality_is_scipy_s_ks_2samp_as_tofu_calls_it(n, m):
    """Issue 25, point 16: TOFU's forget quality is scipy.stats.ks_2samp(...).pvalue, exact up to 10,000 values
    per sample and asymptotic above, where a hand-written approximation differed. Mutant: method "asymptotic"
    (or "exact") for "auto": the p-values differ on one side of 10,000."""
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(n + m)
    a, b = rng.normal(size=n), rng.normal(0.05, size=m)
    assert forget_quality(a, b) == ks_2samp(a, b).pvalue
    assert ks_two_sample(a, b) == (ks_2samp(a, b).statistic, ks_2samp(a, b).pvalue)


def test_ks_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        ks_two_sample([1.0], [2.0], "fast")  # type: ignore[arg-type]
