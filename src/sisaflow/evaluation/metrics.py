"""Evaluation metrics for unlearning: membership-inference attacks and their AUC, MUSE's PrivLeak, TOFU's
truth ratio and forget quality, ROUGE-L and perplexity.

Sign convention: every membership score is oriented so that HIGHER means "more likely a member" (a record the
model was trained on), and `auc(members, nonmembers)` is the probability that a random member outscores a
random non-member. All arithmetic is float64; every random choice takes a seed. The functions are pure: the
caller runs the model and passes log-probabilities of shape (T, V) already aligned with the T tokens they
predict, for example `Ensemble(...)(x).logits[0, :-1]` with `x[0, 1:]`. No text is stored or returned.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike

# Below this spread a next-token distribution is flat over its support (uniform, or a point mass): every token
# in the support has log p = mu up to rounding, so Min-K%++ gives it 0 instead of dividing rounding noise.
_SIGMA_FLOOR = 1e-12


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one record under a model: three float64 arrays of shape (T,), T >= 1."""

    token_log_probs: np.ndarray
    """log p(x_t), the log-probability of the actual token."""
    mu: np.ndarray
    """sum_z p(z) log p(z): the mean of log p under the model's own next-token distribution."""
    sigma: np.ndarray
    """The standard deviation of log p(z) under that distribution."""

    def __post_init__(self) -> None:
        shape = self.token_log_probs.shape
        if len(shape) != 1 or shape[0] == 0:
            raise ValueError(f"TokenStats needs a non-empty 1-d array of token log-probs, got shape {shape}")
        if self.mu.shape != shape or self.sigma.shape != shape:
            raise ValueError(
                f"TokenStats arrays differ in shape: token_log_probs {shape}, mu {self.mu.shape}, "
                f"sigma {self.sigma.shape}"
            )


def _normalised(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if log_probs.dim() != 2 or ids.dim() != 1 or log_probs.shape[0] != ids.shape[0] or ids.numel() == 0:
        raise ValueError(
            f"expected log_probs of shape (T, V) and ids of shape (T,) with T >= 1, got "
            f"{tuple(log_probs.shape)} and {tuple(ids.shape)}"
        )
    if int(ids.min()) < 0 or int(ids.max()) >= log_probs.shape[1]:
        raise ValueError(f"token ids must lie in [0, {log_probs.shape[1]}), the vocabulary of log_probs")
    lp = log_probs.detach().to(torch.float64)
    if torch.isnan(lp).any():
        raise ValueError("log_probs contain NaN")
    # log_softmax is the identity on log-probabilities and normalises logits, so mu and sigma are always those
    # of a proper distribution
    return torch.log_softmax(lp, dim=-1)


def token_stats(log_probs: torch.Tensor, ids: torch.Tensor) -> TokenStats:
    """Per-token log p(x_t), and the mean and standard deviation of log p under the model (for Min-K%++).

    `log_probs` (T, V) may be logits or log-probabilities (it is normalised); row t must predict `ids[t]`.
    """
    lp = _normalised(log_probs, ids)
    p = lp.exp()
    # p log p -> 0 as p -> 0, but torch gives 0 * -inf = nan
    mu = torch.where(p > 0, p * lp, 0.0).sum(-1)
    # two-pass variance: E[(lp - mu)^2] does not cancel the way E[lp^2] - mu^2 does
    var = torch.where(p > 0, p * (lp - mu[:, None]) ** 2, 0.0).sum(-1)
    token = lp.gather(-1, ids.long()[:, None]).squeeze(-1)
    return TokenStats(token.cpu().numpy(), mu.cpu().numpy(), var.sqrt().cpu().numpy())


def sequence_log_likelihood(log_probs: torch.Tensor, ids: torch.Tensor) -> float:
    """Total log-likelihood in nats of `ids` (T,) under `log_probs` (T, V), logits or log-probabilities."""
    return float(_normalised(log_probs, ids).gather(-1, ids.long()[:, None]).sum())


def perplexity(total_log_likelihood_nats: float, tokens: int) -> float:
    """exp(-log-likelihood / tokens): a uniform model over V tokens has perplexity V."""
    if tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got tokens={tokens}")
    return math.exp(-total_log_likelihood_nats / tokens)


# ----------------------------------------------------------------------- membership scores (higher = member)


def loss_score(stats: TokenStats) -> float:
    """LOSS attack (Yeom et al. 2018): the mean token log-likelihood, i.e. minus the loss."""
    return float(stats.token_log_probs.mean())


def zlib_score(stats: TokenStats, text: str) -> float:
    """zlib attack (Carlini et al. 2021): mean token log-likelihood / zlib-compressed length of `text`.

    Carlini et al. divide the log-perplexity (the loss) by the zlib entropy, a member being lower; this is
    its negative, -loss / zlib, so that higher = member, as the Min-K% reference code computes it. The
    numerator is the per-token mean, not the total; the length is in bytes of `text` as UTF-8, compressed by
    zlib at level 6. `text` is only measured, never kept.
    """
    return loss_score(stats) / len(zlib.compress(text.encode("utf-8")))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    if not 0 < k <= 1:
        raise ValueError(f"k is the fraction of tokens to average and must lie in (0, 1], got {k}")
    # floor(k*T) as the reference code's int(); the epsilon keeps 0.29 * 100 at 29; at least one token
    n = max(1, math.floor(k * values.size + 1e-9))
    return float(np.sort(values)[:n].mean())


def min_k_score(stats: TokenStats, k: float = 0.2) -> float:
    """Min-K% (Shi et al. 2024): the mean of the lowest fraction k of token log-probs.

    The lowest max(1, floor(k*T)) tokens are averaged. MUSE's PrivLeak uses k = 0.4.
    """
    return _lowest_mean(stats.token_log_probs, k)


def min_k_plus_plus_score(stats: TokenStats, k: float = 0.2) -> float:
    """Min-K%++ (Zhang et al. 2024): per token z_t = (log p(x_t) - mu_t) / sigma_t; the mean of the lowest k.

    Where sigma_t <= 1e-12 the distribution is flat over its support (uniform or a point mass): the token's
    value is then 0 if it is in the support (its log p equals mu) and -inf if the model gave it probability 0.
    A uniform model therefore scores exactly 0.
    """
    diff = stats.token_log_probs - stats.mu
    flat = stats.sigma <= _SIGMA_FLOOR
    z = np.divide(diff, stats.sigma, out=np.zeros_like(diff), where=~flat)
    z[flat & np.isneginf(stats.token_log_probs)] = -np.inf
    return _lowest_mean(z, k)


# ------------------------------------------------------------------------------------------------------ AUC


def _values(values: ArrayLike, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{what} are empty: the comparison needs at least one value in each group")
    if np.isnan(a).any():
        raise ValueError(f"{what} contain NaN")
    return a


def _mann_whitney_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    _, inverse, counts = np.unique(
        np.concatenate([members, nonmembers]), return_inverse=True, return_counts=True
    )
    # 1-based rank of each distinct value averaged over its ties, so a tied member/non-member pair counts 1/2
    mid_rank = np.cumsum(counts) - (counts - 1) / 2
    u = mid_rank[inverse[: members.size]].sum() - members.size * (members.size + 1) / 2
    return float(u / (members.size * nonmembers.size))


def auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC: P(member score > non-member score) + P(tie) / 2, exactly (Mann-Whitney U / (n*m)).

    Higher scores must mean "member"; 0.5 is chance, 1.0 perfect separation, 0.0 perfectly reversed.
    Raises ValueError if a group is empty or holds NaN; -inf and +inf are ordinary values.
    """
    return _mann_whitney_auc(
        _values(member_scores, "the member scores"), _values(nonmember_scores, "the non-member scores")
    )


def auc_with_ci(
    members: ArrayLike, nonmembers: ArrayLike, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(AUC, low, high): the AUC and its (1 - alpha) percentile-bootstrap interval.

    Each of the `n_boot` replicates resamples both groups independently, with replacement, at their own sizes.
    The same seed gives the same interval.
    """
    m, n = _values(members, "the member scores"), _values(nonmembers, "the non-member scores")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    boots = np.array(
        [
            _mann_whitney_auc(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
            for _ in range(n_boot)
        ]
    )
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return _mann_whitney_auc(m, n), float(low), float(high)


def priv_leak(auc_unlearned: float, auc_retrained: float) -> float:
    """MUSE's PrivLeak (Shi et al. 2024): (AUC_unlearn - AUC_retrain) / AUC_retrain as a fraction; 0 is good.

    Each AUC is a membership attack's separation of the forget set from a holdout set the model never saw
    (MUSE uses Min-K% with k = 0.4). With this module's orientation, `auc(forget, holdout)`, a model that
    still remembers the forget set reads positive. MUSE's code takes the forget set as the NON-member class,
    i.e. its AUC is 1 - ours, so its under-unlearned models read strongly negative: pass 1 - AUC for both
    arguments to reproduce MUSE's published numbers (which it prints x100).
    """
    for name, value in (("auc_unlearned", auc_unlearned), ("auc_retrained", auc_retrained)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value}")
    if auc_retrained == 0:
        raise ValueError("PrivLeak is undefined when the retrained model's AUC is 0")
    return (auc_unlearned - auc_retrained) / auc_retrained


# ------------------------------------------------------------------------------------------------- ROUGE-L


class RougeL(NamedTuple):
    """ROUGE-L of a candidate against a reference: LCS / candidate words, LCS / reference words, their F1."""

    precision: float
    recall: float
    f1: float


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """One RougeScorer for the process: building it (its tokenizer, the Porter stemmer) is not free."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_scores(reference: str, candidate: str) -> RougeL:
    """ROUGE-L of `candidate` against `reference` as TOFU computes it: Google's rouge-score package,
    `RougeScorer(["rougeL"], use_stemmer=True)`. Its tokenizer lowercases, replaces every character other than
    a-z and 0-9 by a space (punctuation separates words and is dropped, and so are non-ASCII letters) and applies
    the Porter stemmer to words of more than three letters; the score comes from the longest common subsequence
    of the two word lists. An empty text (after tokenizing) on either side gives 0.0 for all three. TOFU reports
    the recall, MUSE the F1."""
    score = _rouge_scorer().score(reference, candidate)["rougeL"]
    return RougeL(float(score.precision), float(score.recall), float(score.fmeasure))


def rouge_l_text(reference: str, candidate: str) -> float:
    """ROUGE-L F1 of `candidate` against `reference` (rouge-score, stemmed: see `rouge_l_scores`)."""
    return rouge_l_scores(reference, candidate).f1


# ---------------------------------------------------------------------------------------------------- TOFU


def truth_ratio(paraphrased_ll_per_token: float, perturbed_ll_per_token: Sequence[float]) -> float:
    """TOFU's truth ratio (Maini et al. 2024): exp(mean(perturbed) - paraphrased), per-token log-likelihoods.

    That is the geometric mean over perturbed answers of P(a_pert)^(1/|a_pert|), divided by
    P(a_para)^(1/|a_para|): below 1 the model prefers the correct (paraphrased) answer. TOFU's code averages
    the perturbed losses before exponentiating, hence the geometric mean; its aggregate script stores the
    reciprocal (exp(perturbed loss - paraphrased loss)), which leaves `forget_quality` unchanged (a KS test is
    invariant under a strictly monotone map).
    """
    if len(perturbed_ll_per_token) == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return math.exp(float(np.mean(perturbed_ll_per_token)) - paraphrased_ll_per_token)


def ks_two_sample(
    a: ArrayLike, b: ArrayLike, method: Literal["auto", "exact", "asymptotic"] = "auto"
) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test: (D, p-value), D = sup |F_a - F_b|: scipy's `ks_2samp`,
    which TOFU's forget quality calls ("auto": exact when both samples have at most 10,000 values, else the
    asymptotic distribution). NaN and empty samples are refused here, naming the sample."""
    from scipy.stats import ks_2samp

    if method not in ("auto", "exact", "asymptotic"):
        raise ValueError(f"unknown method {method!r}; choose auto, exact or asymptotic")
    x, y = _values(a, "the first sample's values"), _values(b, "the second sample's values")
    result = ks_2samp(x, y, alternative="two-sided", method="asymp" if method == "asymptotic" else method)
    return float(result.statistic), float(result.pvalue)


def forget_quality(unlearned_truth_ratios: ArrayLike, retrained_truth_ratios: ArrayLike) -> float:
    """TOFU's forget quality: the KS-test p-value between the two models' truth ratios on the forget set.

    High (near 1) means the unlearned model is indistinguishable from one retrained without the forget set;
    TOFU reads p < 0.05 as failed unlearning. Method as `ks_two_sample(..., "auto")`.
    """
    unlearned = _values(unlearned_truth_ratios, "the unlearned model's truth ratios")
    retrained = _values(retrained_truth_ratios, "the retrained model's truth ratios")
    return ks_two_sample(unlearned, retrained)[1]


# ------------------------------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class AttackResult:
    """One membership attack's AUC, members vs non-members, and its bootstrap interval."""

    name: str
    auc: float
    low: float
    high: float
    n_members: int
    n_nonmembers: int

    def to_dict(self) -> dict[str, str | float | int]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _attack_scores(stats: Sequence[TokenStats], texts: Sequence[str], k: float, group: str) -> dict:
    if len(stats) != len(texts):
        raise ValueError(f"{len(stats)} {group} token statistics but {len(texts)} {group} texts")
    return {
        "loss": [loss_score(s) for s in stats],
        "zlib": [zlib_score(s, t) for s, t in zip(stats, texts)],
        "min_k": [min_k_score(s, k) for s in stats],
        "min_k_plus_plus": [min_k_plus_plus_score(s, k) for s in stats],
    }


def run_attacks(
    member_stats: list[TokenStats],
    member_texts: Sequence[str],
    nonmember_stats: list[TokenStats],
    nonmember_texts: Sequence[str],
    seed: int = 0,
    k: float = 0.2,
    n_boot: int = 1000,
) -> list[AttackResult]:
    """LOSS, zlib, Min-K% and Min-K%++ (in that order, named loss, zlib, min_k, min_k_plus_plus) with 95% CIs.

    texts[i] must be the text of stats[i]; it serves only for the zlib length. Every attack resamples with the
    same seed, so their intervals are paired. Raises ValueError for an empty group or mismatched lengths.
    """
    members = _attack_scores(member_stats, member_texts, k, "member")
    nonmembers = _attack_scores(nonmember_stats, nonmember_texts, k, "non-member")
    results = []
    for name, scores in members.items():
        value, low, high = auc_with_ci(scores, nonmembers[name], n_boot=n_boot, seed=seed)
        results.append(AttackResult(name, value, low, high, len(member_stats), len(nonmember_stats)))
    return results
