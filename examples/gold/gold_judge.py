"""The gold judge of `make gold`: VADER's sentiment lexicon (Hutto & Gilbert 2014, the vaderSentiment package,
its lexicon shipped inside the wheel: nothing is downloaded at run time), a labeller nobody on igpt wrote.

igpt's python judge interface: ``score(prompt, responses) -> list[float]``, higher = better (README, Judges).
The score is VADER's ``pos - neg``: the shares of the response's text that carry positive and negative valence.
Both are shares of the whole text, so padding an answer with neutral words lowers them and a longer answer
earns nothing by length alone; VADER's ``compound`` would (it sums valences, then squashes), a target a policy
could reach by rambling. Empty responses score 0.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:
        raise ImportError("the gold judge needs vaderSentiment: pip install -e '.[gold]'") from e
    return SentimentIntensityAnalyzer()


def positivity(text: str) -> float:
    """VADER's positive minus negative share of ``text``, in [-1, 1]; 0 for an empty text."""
    if not text.strip():
        return 0.0
    s = analyzer().polarity_scores(text)
    return float(s["pos"] - s["neg"])


def score(prompt: str, responses: list[str]) -> list[float]:
    """The gold score of each response to ``prompt`` (the prompt itself does not matter to the lexicon)."""
    return [positivity(r) for r in responses]
