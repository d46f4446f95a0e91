"""The gold judge of `make gold`: VADER's sentiment lexicon (Hutto & Gilbert 2014, the vaderSentiment package,
its lexicon shipped inside the wheel: nothing is downloaded at run time), a labeller nobody on igpt wrote.

igpt's python judge interface: ``score(prompt, responses) -> list[float]``, higher = better (README, Judges).
The score is VADER's ``compound``: the valences of the response's sentiment words (with VADER's rules for
negation, intensifiers, "but", capitals and exclamation marks) summed and squashed into [-1, 1]. Empty
responses score 0.

Why ``compound`` and not the positive-minus-negative *share* this judge used before (issue 29): a share is
divided by the length of the whole text, so every neutral word lowers it ("Congratulations!" scored 1.0, the
same reply with five more words 0.51) and the judge paid for brevity; PPO's replies got shorter and won. A
neutral word carries no valence, so it changes ``compound`` not at all: a reply is neither paid for being
short nor for being padded. What length can still buy is room for more sentiment words (``compound`` rises,
with diminishing returns, as they add up); the prompts ask for one sentence and responses stop at 32 tokens,
and run.py reports the length-controlled win rate and both sides' mean length beside the raw one, so that
share is measured rather than assumed away.
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
    """VADER's compound valence of ``text``, in [-1, 1]; 0 for an empty text or one with no sentiment words."""
    if not text.strip():
        return 0.0
    return float(analyzer().polarity_scores(text)["compound"])


def score(prompt: str, responses: list[str]) -> list[float]:
    """The gold score of each response to ``prompt`` (the prompt itself does not matter to the lexicon)."""
    return [positivity(r) for r in responses]
