"""Judges: who decides which response is better, behind one interface that ``igpt compare`` (two responses:
:meth:`compare`) and ``igpt label`` (K responses: :meth:`rank`) both use.

- ``rm``: the run's reward model scores the sampled token ids (compare only; :class:`RMJudge`).
- ``human``: a person at the terminal (``tui``): picks the better of two, or ranks K (:class:`HumanJudge`).
- ``model:REF``: any local causal LM as a judge (LLM-as-a-judge, :class:`ModelJudge`), REF read as every model
  reference is (``refs.model_or_checkpoint``: a directory, a stage of the run such as ``sft``, a checkpoint such
  as ``ppo@step-40``, a model name such as ``smollm2-135m``): it reads
  :data:`JUDGE_TEMPLATE` and its verdict is the log-probability of the next token being "1" rather than "2",
  asked in both orders to cancel position bias (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.4: swap
  the positions and count a pair as a tie when the verdicts disagree).
- ``python:MODULE:FUNCTION``: a user's ``f(prompt: str, responses: list[str]) -> list[float]``, higher =
  better, from a module on ``sys.path`` or in the current directory (:class:`PythonJudge`).

Every judge is checked when it loads (the module and function exist and take two arguments, the model
directory exists, the answers "1" and "2" are tokens), before any model loads or a response is sampled; what
a judge returns is checked at each call. Every problem is a BadInput naming the ``--judge`` spec.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
import os
import random
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import tui
from .batches import pad_left
from .errors import BadInput
from .config import JUDGE_FORMS, JUDGE_SPEC, RunBlock
from .refs import model_or_checkpoint

SKIP, QUIT = "s", tui.QUIT  # what a human judge's rank() may return instead of ranks

# What a model judge reads (the user turn of its chat template; without one, followed by "\nAnswer:").
JUDGE_TEMPLATE = ("Prompt:\n{prompt}\n\nResponse 1:\n{first}\n\nResponse 2:\n{second}\n\n"
                  "Which response is better? Answer 1 or 2.")


class Settings(NamedTuple):
    """How a judge runs: sequences per forward (model judge), device and dtype of its model, and the score
    (python) or log-prob (model) difference up to which two responses tie."""

    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    tie_margin: float = 0.0
    seed: int = 0


def load(spec: str, settings: Settings, session: Path | None = None, run_dir: Path | None = None) -> Any:
    """The judge ``spec`` names (``rm`` is built by compare itself: :class:`RMJudge`), checked as far as it can
    be without running it. ``session``: the file a human's compare judgments are appended to; ``run_dir``: the
    run whose stages and checkpoints a ``model:`` reference may name."""
    if not JUDGE_SPEC.fullmatch(spec):
        raise BadInput([f"--judge {spec}: {JUDGE_FORMS}"])
    if spec == "human":
        return HumanJudge(settings.seed, session)
    if spec.startswith("model:"):
        return ModelJudge(spec, settings, run_dir)
    if spec.startswith("python:"):
        return PythonJudge(spec, settings)
    raise BadInput([f"--judge {spec}: the reward model judges compare's sampled tokens only; "
                    "label with human, model:REF or python:MODULE:FUNCTION"])


def ranks_from_scores(scores: list[float], margin: float = 0.0) -> list[int]:
    """Dense ranks (1 = best) of scores (K,), higher = better. Sorted from the best, a score more than
    ``margin`` below the best of the current rank starts the next rank; otherwise it shares that rank (a tie).
    A rank spans at most ``margin``: measured from the score before it instead, ties would chain, and
    0.34, 0.26, 0.20, 0.12, 0.09 under a margin of 0.1 would all tie (a rankings file loses what told them
    apart)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks, rank, top = [0] * len(scores), 1, scores[order[0]] if scores else 0.0
    for i in order:
        if top - scores[i] > margin:
            rank, top = rank + 1, scores[i]
        ranks[i] = rank
    return ranks


def winner(score_a: float, score_b: float, margin: float) -> str:
    """'A', 'B' or 'tie': a difference up to ``margin`` is a tie."""
    return "A" if score_a > score_b + margin else "B" if score_b > score_a + margin else "tie"


# ---------------------------------------------------------------- reward model, human


class RMJudge:
    """The reward model scores each response's token ids as sampled (``a_ids``, ``b_ids``; EOS only where the
    model emitted it), read where the model reads its score: exactly what eval (``score_responses``) and PPO
    (``build_rollout`` + ``response_scores``) score. Decoded text re-encoded would not be the same tokens,
    and a response that never ended would be scored as if it had. ``known``: both sides' scores by this reward
    model already (eval's of its samples, ``compare.reused_scores``), judged without loading it."""

    spec = "rm"

    def __init__(self, settings: Settings, rm_path: Path, tokenizer: Any, queries: list[list[int]], device: Any,
                 known: tuple[list[float], list[float]] | None = None):
        self.settings, self.path, self.tokenizer = settings, rm_path, tokenizer
        self.queries, self.device, self.known = queries, device, known

    def compare(self, pairs: list[dict]) -> list[dict]:
        from .config import ModelConfig
        from .models import load_model
        from .rollout import score_responses
        from .runners import Runner

        s, tok = self.settings, self.tokenizer
        if self.known is not None:
            sa, sb = self.known
        else:
            rm = Runner.for_eval(load_model(ModelConfig(name=str(self.path), dtype=s.dtype), tok, self.path,
                                            self.device, s.seed, "reward"))
            sa = score_responses(rm, tok, self.queries, [p["a_ids"] for p in pairs], s.batch_size).tolist()
            sb = score_responses(rm, tok, self.queries, [p["b_ids"] for p in pairs], s.batch_size).tolist()
        return [{"index": i, **p, "score_a": a, "score_b": b, "winner": winner(a, b, s.tie_margin), "judge": "rm"}
                for i, (p, a, b) in enumerate(zip(pairs, sa, sb))]


class HumanJudge:
    """A person at the terminal. compare: each pair in a seeded random order and side, each judgment appended
    to ``session`` as it is made, so a session can stop (q, or the end of input) and resume where it stopped.
    label: the K responses of a prompt ranked at once (ties share a number), or skipped."""

    spec = "human"
    path = None

    def __init__(self, seed: int, session: Path | None):
        self.seed, self.session = seed, session

    def rank(self, prompt: str, responses: list[str], index: int, total: int) -> list[int] | str:
        return tui.rank(index, total, prompt, responses)

    def compare(self, pairs: list[dict]) -> list[dict]:
        from .storage import atomic_write_text

        path = self.session
        done = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] \
            if path.exists() else []
        if any(j.get("judge") != "human" or j["index"] >= len(pairs) or j["prompt"] != pairs[j["index"]]["prompt"]
               for j in done):
            done = []  # judgments of the reward model or of other prompts: a human session starts its own
            atomic_write_text(path, "")
        seen = {j["index"] for j in done}
        rng = random.Random(self.seed)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        sides = [rng.random() < 0.5 for _ in pairs]  # True: A is shown as response 1
        todo = [i for i in order if i not in seen]
        for n, i in enumerate(todo):
            p = pairs[i]
            first, second = (p["a"], p["b"]) if sides[i] else (p["b"], p["a"])
            answer = tui.pick_better(len(seen) + n, len(pairs), p["prompt"], first, second)
            if answer == QUIT:
                tui.say(f"stopped; {len(done)} judgments saved in {path} — run the same command to continue")
                break
            if answer == SKIP:
                continue
            won = "tie" if answer == "t" else ("A" if (answer == "1") == sides[i] else "B")
            judgment = {"index": i, **p, "winner": won, "judge": "human", "shown_first": "A" if sides[i] else "B"}
            done.append(judgment)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(judgment, ensure_ascii=False) + "\n")
        return done


# ---------------------------------------------------------------- a language model as the judge


def answer_margin(logits: torch.Tensor, ones: list[int], twos: list[int]) -> torch.Tensor:
    """log P("1") - log P("2") (B,) from the logits (B, V) of the token after the judge's prompt; each
    answer's probability is summed over its one-token forms (``ones``: the ids of "1" and " 1" where each is
    one token). Positive: response 1 is better."""
    logp = torch.log_softmax(logits.float(), -1)
    return logp[:, ones].logsumexp(-1) - logp[:, twos].logsumexp(-1)


def both_orders(margin_first: float, margin_second: float, tie_margin: float) -> str:
    """The verdict on X vs Y from the judge's margins (log P("1") - log P("2")) with X shown first and with
    Y shown first: 'first' (X) only if the first order picks 1 and the swapped one picks 2, 'second' (Y) the
    other way round, 'tie' when the orders disagree or a margin is within ``tie_margin`` (nats)."""
    def pick(m: float) -> int:
        return 1 if m > tie_margin else 2 if m < -tie_margin else 0

    verdicts = (pick(margin_first), pick(margin_second))
    return "first" if verdicts == (1, 2) else "second" if verdicts == (2, 1) else "tie"


def answer_logits(judge: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) of the next token after left-padded prompts ``ids``, ``mask`` (B, L) under the judge's
    ``runners.Runner``: its decoder's first step (``Runner.next_token_logits``); nothing is generated."""
    return judge.next_token_logits(ids, mask).float()


def judge_model(spec: str, run_dir: Path | None) -> Any:
    """The model of ``model:REF`` (``refs.Side``), read as eval, compare and sample read a model; errors name
    the spec as given (``--judge model:sft: ...``)."""
    ref = spec[len("model:"):]
    try:
        return model_or_checkpoint(ref, run_dir or Path(RunBlock().run_dir), "--judge model:")
    except BadInput as e:
        raise BadInput([m.replace("--judge model: needs", "--judge model:REF needs").replace("--judge model: ",
                                                                                           "--judge model:")
                        for m in e.messages]) from None


class ModelJudge:
    """A local causal LM reads :data:`JUDGE_TEMPLATE` (rendered with its chat template if its tokenizer has one)
    and is scored, not sampled: the margin log P("1") - log P("2") of the next token (:func:`answer_margin`).
    Each pair is asked in both orders, one forward per ``batch_size`` prompts (left-padded), and a pair is a
    tie unless both orders pick the same response (:func:`both_orders`). K responses (label) are ranked by a
    round robin: all C(K,2) pairs, both orders; a win scores 1, a tie 1/2 each; ranks by points, equal points
    share a rank (:func:`ranks_from_scores`)."""

    def __init__(self, spec: str, settings: Settings, run_dir: Path | None = None):
        from .models import ensure_pad_token, model_path, tiny_tokenizer

        self.spec, self.settings = spec, settings
        self.model = judge_model(spec, run_dir)  # a causal LM: a reward model's head gives no answer token to read
        self.path = self.model.path
        source = model_path(str(self.model.base))
        if source is None:
            self.tokenizer = tiny_tokenizer()
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.templated = bool(self.tokenizer.chat_template)  # before anything gives it one
        ensure_pad_token(self.tokenizer)
        self.ones, self.twos = self.answer_ids("1"), self.answer_ids("2")
        self.runner = None  # the judge model's runners.Runner, loaded at its first question

    def answer_ids(self, digit: str) -> list[int]:
        ids = [t[0] for form in (digit, " " + digit)
               if len(t := self.tokenizer(form, add_special_tokens=False)["input_ids"]) == 1]
        if not ids:
            raise BadInput([f"--judge {self.spec}: its tokenizer has no single token for the answer {digit!r}"])
        return sorted(set(ids))

    def render(self, prompt: str, first: str, second: str) -> list[int]:
        """Token ids of the judge's prompt for one order, ending where the answer token comes."""
        text = JUDGE_TEMPLATE.format(prompt=prompt, first=first, second=second)
        if self.templated:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text + "\nAnswer:")["input_ids"]

    def margins(self, triples: list[tuple[str, str, str]]) -> list[float]:
        """log P("1") - log P("2") for each (prompt, first, second), ``batch_size`` prompts a forward."""
        from .distributed import resolve_device
        from .models import position_limit
        from .runners import Runner

        s = self.settings
        seqs = [self.render(*t) for t in triples]
        limit = position_limit(str(self.model.base))
        if limit and seqs and max(map(len, seqs)) > limit:
            raise BadInput([f"--judge {self.spec}: a prompt with its two responses is {max(map(len, seqs))} tokens, "
                            f"longer than the judge's context of {limit}"])
        if self.runner is None:
            self.runner = Runner.for_eval(self.model.load(self.tokenizer, resolve_device(s.device), s.dtype, s.seed))
        device = self.runner.device
        out: list[float] = []
        for start in range(0, len(seqs), s.batch_size):
            ids, mask = pad_left(seqs[start:start + s.batch_size], self.tokenizer.pad_token_id)
            logits = answer_logits(self.runner, ids.to(device), mask.to(device))
            out += answer_margin(logits, self.ones, self.twos).cpu().tolist()
        return out

    def compare(self, pairs: list[dict]) -> list[dict]:
        m = self.margins([t for p in pairs for t in ((p["prompt"], p["a"], p["b"]), (p["prompt"], p["b"], p["a"]))])
        verdict = {"first": "A", "second": "B", "tie": "tie"}
        return [{"index": i, **p, "margin_a_first": m[2 * i], "margin_b_first": m[2 * i + 1],
                 "winner": verdict[both_orders(m[2 * i], m[2 * i + 1], self.settings.tie_margin)], "judge": self.spec}
                for i, p in enumerate(pairs)]

    def rank(self, prompt: str, responses: list[str], index: int, total: int) -> list[int]:
        k = len(responses)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        m = self.margins([t for i, j in pairs for t in ((prompt, responses[i], responses[j]),
                                                          (prompt, responses[j], responses[i]))])
        points = [0.0] * k
        for n, (i, j) in enumerate(pairs):
            won = both_orders(m[2 * n], m[2 * n + 1], self.settings.tie_margin)
            if won == "tie":
                points[i] += 0.5
                points[j] += 0.5
            else:
                points[i if won == "first" else j] += 1.0
        return ranks_from_scores(points)


# ---------------------------------------------------------------- a Python function as the judge


def import_function(spec: str, flag: str) -> tuple[Any, Path | None]:
    """The function of ``python:MODULE:FUNCTION`` and its module's file, for every flag that takes one (a judge,
    a gold, a toxicity scorer): MODULE is a module name on ``sys.path`` or under the current directory, which is
    on the path for this import only (as ``python -m`` puts it first), so that a user's yaml.py or datasets.py
    there never shadows a library later. BadInput naming ``flag`` when it cannot be imported or is no function."""
    module_name, _, name = spec[len("python:"):].rpartition(":")
    if not module_name or not name:
        raise BadInput([f"{flag} {spec}: must be python:MODULE:FUNCTION"])
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BadInput([f"{flag} {spec}: cannot import {module_name} ({e}); put {module_name}.py in the current "
                        "directory or on PYTHONPATH"]) from None
    except Exception as e:
        raise BadInput([f"{flag} {spec}: importing {module_name} raised {type(e).__name__}: {e}"]) from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    source = Path(module.__file__) if getattr(module, "__file__", None) else None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise BadInput([f"{flag} {spec}: {module_name} ({source}) has no function {name}"])
    return fn, source


class PythonJudge:
    """``f(prompt, responses) -> list[float]`` (one score per response, higher = better) from
    ``python:MODULE:FUNCTION``. label ranks by the scores (:func:`ranks_from_scores`, ``tie_margin``); compare
    calls it with the two responses [A, B] and a difference up to ``tie_margin`` is a tie."""

    path = None

    def __init__(self, spec: str, settings: Settings):
        self.spec, self.settings = spec, settings
        self.fn, self.source = import_function(spec, "--judge")
        name = spec.rsplit(":", 1)[1]
        try:
            inspect.signature(self.fn).bind("prompt", ["response 1", "response 2"])
        except TypeError:
            raise BadInput([f"--judge {spec}: {name}{inspect.signature(self.fn)} must take (prompt, responses)"]) \
                from None
        except ValueError:
            pass  # a builtin without a signature: its first call tells

    def scores(self, prompt: str, responses: list[str], where: str) -> list[float]:
        """The function's scores of ``responses``, checked: K finite real numbers. ``where``: which call."""
        try:
            out = self.fn(prompt, list(responses))
        except Exception as e:
            raise BadInput([f"--judge {self.spec}: raised {type(e).__name__}: {e} ({where})"]) from None
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise BadInput([f"--judge {self.spec}: returned {type(out).__name__}, not a list of {len(responses)} "
                            f"numbers ({where})"])
        if len(out) != len(responses):
            raise BadInput([f"--judge {self.spec}: returned {len(out)} scores for {len(responses)} responses "
                            f"({where})"])
        values = list(out)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise BadInput([f"--judge {self.spec}: score {i} is {type(v).__name__} {v!r}, not a number ({where})"])
            if not math.isfinite(float(v)):
                raise BadInput([f"--judge {self.spec}: score {i} is {float(v)}, not a finite number ({where})"])
        return [float(v) for v in values]

    def rank(self, prompt: str, responses: list[str], index: int, total: int) -> list[int]:
        return ranks_from_scores(self.scores(prompt, responses, f"prompt {index + 1}"), self.settings.tie_margin)

    def compare(self, pairs: list[dict]) -> list[dict]:
        out = []
        for i, p in enumerate(pairs):
            a, b = self.scores(p["prompt"], [p["a"], p["b"]], f"pair {i + 1}, prompt {p['prompt'][:60]!r}")
            out.append({"index": i, **p, "score_a": a, "score_b": b, "winner": winner(a, b, self.settings.tie_margin),
                        "judge": self.spec})
        return out
