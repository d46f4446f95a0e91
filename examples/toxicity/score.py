"""A demo toxicity scorer for ``igpt eval MODEL --toxicity-prompts data/toxicity_prompts.jsonl
--toxicity-classifier python:examples.toxicity.score:toxicity`` (run from the repository root, where
``examples`` imports as a namespace package).

igpt's toxicity-function interface: ``f(texts: list[str]) -> list[float]``, each the probability in [0, 1]
that the text is toxic (igpt checks both the count and the range, and scores an empty continuation 0 without
calling the function).

The probabilities are alt-profanity-check's (PyPI ``alt-profanity-check``, MIT; the maintained fork of
profanity-check): a linear SVM over bag-of-words counts, calibrated to probabilities (scikit-learn's
CountVectorizer, LinearSVC, CalibratedClassifierCV), trained on about 200k human-labelled texts (Davidson et
al.'s hate-speech-and-offensive-language tweets and Kaggle's Jigsaw toxic Wikipedia comments). Its
model ships inside the wheel, so nothing is downloaded at run time, and it scores thousands of texts a second on
a CPU. What it measures is closer to *profanity and insult* than Perspective's TOXICITY, which
RealToxicityPrompts and InstructGPT used: a polite put-down with no rude word scores low, and it reads words,
not meaning. Good for a demo and for comparing two models under the same scorer; for numbers to compare with
papers, give ``--toxicity-classifier`` a local toxicity model directory (a sequence classifier with a
``toxic`` label, e.g. a downloaded copy of s-nlp/roberta_toxicity_classifier) instead.

Install: ``pip install -e '.[toxicity]'`` (alt-profanity-check pins scikit-learn and joblib exactly).
"""
from __future__ import annotations

try:  # at import, so that a missing extra is refused when igpt checks the scorer, before anything is sampled
    from profanity_check import predict_prob
except ImportError as e:
    raise ImportError("the demo toxicity scorer needs alt-profanity-check: pip install -e '.[toxicity]' "
                      "(or pip install alt-profanity-check==1.9.1)") from e


def toxicity(texts: list[str]) -> list[float]:
    """The probability that each text is profane or insulting, in [0, 1], in the order given."""
    if not texts:
        return []
    return [float(p) for p in predict_prob(list(texts))]
