"""compare/A-vs-B/report.html: the page a researcher keeps of one comparison. One self-contained file
(charts embedded as PNG data URIs, inline CSS, no script, nothing fetched) with: where the numbers come
from (both models' weights digests, decoding settings, seed, judge, the prompts file's digest, igpt
version, date, host), the win rate with its interval per category, ``igpt eval``'s table of both models
(noting an eval sampled at another temperature than the comparison),
the run's training curves (SFT and RM loss and accuracy; PPO's score, its missing-EOS penalty and KL
term, KL, reward vs KL, beta, entropy, clip fraction, response length and EOS rate against episodes; DPO's
loss, pair accuracy and margins instead where DPO is compared and PPO is not), the reward-vs-KL frontier of
``igpt eval ppo --checkpoints`` where it has run, and samples drawn at random per category,
with the responses that never ended (no EOS) marked. A section without data says so; none crashes the page.
"""
from __future__ import annotations

import html
import json
import platform
import random
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .presets import saved_config
from .report_plots import frontier_chart, line_chart, reward_vs_kl, series, win_chart
from .rundir import atomic_write_text, read_metrics
from .stages import STAGES
from .storage import now, sha256_file, weights_sha256

# code points HTML5 forbids in a document (a parse error): C0 controls but tab, LF, FF, CR; DEL and the C1
# controls; noncharacters. A sampled response may hold any of them (a byte-level tokenizer decodes any byte).
FORBIDDEN = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufdd0-\ufdef"
                       + "".join(chr(p + 0xFFFE) + chr(p + 0xFFFF) for p in range(0, 0x110000, 0x10000)) + "]")


def e(text: str) -> str:
    """``text`` escaped for HTML, each forbidden code point shown as its escape (``\\x07``, ``\\ufffe``)."""
    def shown(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}"

    return html.escape(FORBIDDEN.sub(shown, text))


def na(why: str = "") -> str:
    """What a section without data says instead."""
    return f"<p class='na'>not available{f' ({why})' if why else ''}</p>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
       "td{white-space:nowrap}td:first-child,th:first-child{text-align:left}"
       "table.prov td{text-align:left;white-space:normal}"
       "code{font-size:90%;word-break:break-all}.charts{display:flex;flex-wrap:wrap;gap:.5em}"
       ".pair{display:flex;gap:1em}.pair div{flex:1;white-space:pre-wrap;border:1px solid #ddd;padding:.6em;"
       "border-radius:4px}.win{background:#eef7ee}.na{color:#888;font-style:italic}"
       ".noeos{display:inline-block;margin-top:.4em;padding:0 .4em;border-radius:3px;background:#fde2e1;"
       "color:#a4000f;font-size:85%;font-weight:bold}")


def number(x: float | None, spec: str) -> str:
    """``x`` formatted, or '-' where a report has no number (None: undefined, e.g. the sd of one score)."""
    return "-" if x is None else format(x, spec)


def score_text(r: dict) -> str:
    """'mean ± sd' of an eval report's scores ('-' without a reward model; no sd for a single score)."""
    if r.get("score_mean") is None:
        return "-"
    return f"{r['score_mean']:.3f}" + (f" ± {r['score_sd']:.3f}" if r.get("score_sd") is not None else "")


def temperatures_text(report: dict) -> str:
    """One line naming both temperatures of an eval or frontier report: of the samples that are scored, and of
    the samples and log-probs of the KL to SFT (``kl_separate_samples``: a second set; a report written before
    it, where both were eval's samples, reads as one set)."""
    t, kl_t, seed = report["settings"]["temperature"], report["kl_temperature"], report["settings"]["seed"]
    logprobs = f"log-probs at T={kl_t:g} from {report.get('kl_temperature_from', '?')}"
    if not report.get("kl_separate_samples"):
        return f"samples at T={t:g}, seed {seed}: scores, length, EOS rate and the KL to SFT ({logprobs})"
    return (f"scores, length, EOS rate: samples at T={t:g}{' (greedy)' if t == 0 else ''}, seed {seed}; KL to SFT: a "
            f"second set of samples drawn at T={kl_t:g}, same seed ({logprobs})")


def drop_text(drop: dict | None) -> str:
    """One line on the gold's fall from its best point to the proxy's pick, a later one (a frontier report's
    ``gold_drop``, ``frontier.gold_drop``), and whether it counts as over-optimisation; '' without one."""
    if not drop:
        return ""
    fell = f"the gold fell by {drop['drop']:.3f} from {drop['from']} to the proxy's pick {drop['to']}"
    if not drop["ci"]:
        return f"{fell}: too few prompts for an interval, not called over-optimisation"
    over = (f"over {drop['clusters']} prompt groups, {drop['n']} prompts" if drop.get("clusters")
            else f"over {drop['n']} prompts")
    fell += f" (95% CI {drop['ci'][0]:+.3f} to {drop['ci'][1]:+.3f} {over})"
    if drop["significant"]:
        return f"{fell}: over-optimisation, the proxy kept rising after the gold peaked"
    return f"{fell}: within noise (the interval includes 0), not called over-optimisation"


@dataclass
class RunRecords:
    """What the page shows beside the comparison, read from the run directory; each empty when absent
    (a compare of two paths outside a run, a run without an RM stage or PPO)."""

    sft: list[dict] = field(default_factory=list)  # sft/metrics.jsonl records
    rm: list[dict] = field(default_factory=list)  # rm/metrics.jsonl
    ppo: list[dict] = field(default_factory=list)  # ppo/metrics.jsonl, each with "episode"
    dpo: list[dict] = field(default_factory=list)  # dpo/metrics.jsonl
    evals: dict[str, dict] = field(default_factory=dict)  # model name -> eval/NAME/report.json
    ppo_config: Any = None  # the PPOConfig the run's PPO ran with (ppo/config.yaml), None without one


def read_run(run_dir: Path, names: list[str]) -> RunRecords:
    """The run's training metrics and the eval reports of ``names``. PPO records from before ``episode``
    was logged get it from the run's rollout batch size (ppo/config.yaml): episodes = iteration x batch."""
    stages = {s: read_metrics(run_dir / s / "metrics.jsonl") for s in ("sft", "rm", "ppo", "dpo")}
    ppo_cfg = saved_config(run_dir / "ppo")
    if any("episode" not in r for r in stages["ppo"]):
        batch = ppo_cfg.rollout_batch_size if ppo_cfg is not None else None
        stages["ppo"] = [r if "episode" in r or not batch else {**r, "episode": r["step"] * batch}
                         for r in stages["ppo"] if "episode" in r or batch]
    evals = {n: json.loads(p.read_text(encoding="utf-8")) for n in names
             if (p := run_dir / "eval" / n / "report.json").is_file()}
    return RunRecords(stages["sft"], stages["rm"], stages["ppo"], stages["dpo"], evals, ppo_cfg)


def ended(ids: list[int] | None, eos_id: int | None) -> bool | None:
    """Whether a response as sampled ended with EOS (EOS is kept only where the model emitted it; a response
    cut at max_new_tokens has none). None where that is unknown (no token ids, no EOS id)."""
    if ids is None or eos_id is None:
        return None
    return bool(ids) and ids[-1] == eos_id


def pick_samples(judgments: list[dict], seed: int, per_category: int = 3, total: int = 12) -> dict[str, list[dict]]:
    """Judgments drawn at random with ``seed`` (the same page from the same compare), ``per_category`` of
    each category in sorted order, or ``total`` when prompts have no category ('' then); each group in prompt
    order. Random rather than the first few: the first prompts of a file are rarely typical."""
    groups: dict[str, list[dict]] = {}
    for j in judgments:
        groups.setdefault(j.get("category") or "", []).append(j)
    k = total if list(groups) in ([""], []) else per_category
    rng = random.Random(seed)
    out = {}
    for c in sorted(groups):
        picked = rng.sample(range(len(groups[c])), min(k, len(groups[c])))
        out[c] = [groups[c][i] for i in sorted(picked)]
    return out


def provenance(report: dict, rm_path: Path | None, device: str, run_dir: Path) -> list[tuple[str, str]]:
    """(label, HTML) rows saying exactly what was compared, how, by whom and where. ``rm_path``: the judge's
    model directory (the reward model, or a ``model:REF`` judge's), None for other judges."""
    def digest(path) -> str:
        d = weights_sha256(path) if path and Path(path).is_dir() else None
        return f"<code>{d}</code>" if d else "<span class='na'>not available (no safetensors)</span>"

    s = report.get("settings", {})
    prompts = Path(report["prompts"])
    judge = e(report["judge"]) + (f": <code>{e(str(rm_path))}</code><br>weights sha256 {digest(rm_path)}"
                                  if rm_path else "")
    if report.get("judge_source"):  # a python judge: the file its function came from
        src = report["judge_source"]
        judge += f": <code>{e(src['file'])}</code><br>sha256 <code>{e(src['sha256'])}</code>"
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "-"
    rows = [(f"{side.upper()}: {e(report[side])}", f"<code>{e(report[side + '_path'])}</code><br>weights sha256 "
             f"{digest(report[side + '_path'])}") for side in ("a", "b")]
    return rows + [
        ("judge", judge),
        ("prompts", f"<code>{e(str(prompts))}</code> ({report['n_prompts']} prompts)<br>sha256 "
                    + (f"<code>{sha256_file(prompts)}</code>" if prompts.is_file() else "<span class='na'>"
                       "not available (file gone)</span>")),
        ("decoding", f"temperature {s.get('temperature', '-')}, max_new_tokens {s.get('max_new_tokens', '-')}"),
        ("seed", e(str(s.get("seed", "-")))),
        ("responses from", "<br>".join(f"{side}: {e(str(src))}" for side, src in
                                       report.get("responses_from", {}).items()) or "-"),
        ("run directory", f"<code>{e(str(run_dir))}</code>"),
        ("igpt", f"{__version__} (torch {torch_version}, Python {platform.python_version()})"),
        ("date", now()),
        ("host", e(f"{platform.node()}, {platform.platform()}, {platform.processor() or platform.machine()}; "
                   f"device {device or '-'}"))]


def eval_table(report: dict, evals: dict[str, dict]) -> str:
    """``igpt eval``'s measurements of A and B (the terminal's table after the win rate, and more), with
    whether eval saw the weights compared now (its report records their digest)."""
    if not evals:
        return na("run igpt eval on the models")
    paths = {report["a"]: report["a_path"], report["b"]: report["b_path"]}
    temps = sorted({r["kl_temperature"] for r in evals.values() if "kl_temperature" in r})
    cols = ["model", "n", "RM score", "KL to SFT" + (f" (T={temps[0]:g})" if len(temps) == 1 else ""),
            "pretraining loss", "perplexity", "alignment tax", "length", "EOS rate", "RM preference accuracy",
            "same weights"]
    rows = ["<table class='eval'><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    for name, r in evals.items():
        same = r.get("model_sha256")
        same = "-" if not same else "yes" if same == weights_sha256(paths[name]) else "no (evaluated other weights)"
        acc = number(r.get("rm_accuracy"), ".1%") + (f" of {r['rm_pairs']} pairs" if r.get("rm_pairs") else "")
        cells = [name, str(r.get("n", "-")), score_text(r), number(r.get("kl_to_sft"), ".3f"),
                 number(r.get("ptx_loss"), ".4f"), number(r.get("ptx_perplexity"), ".2f"),
                 number(r.get("alignment_tax"), "+.4f"), number(r.get("response_length"), ".1f"),
                 number(r.get("eos_rate"), ".0%"), acc, same]
        rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    notes = temperature_lines(evals) + other_temperature_lines(report, evals)
    return "".join(rows) + "</table>" + "".join(f"<p>{e(line)}</p>" for line in notes)


def other_temperature_lines(report: dict, evals: dict[str, dict]) -> list[str]:
    """A warning for each eval report sampled at another temperature than the comparison: its EOS rate, length
    and score describe other samples than those judged above (a hotter sample ends less often)."""
    t = report.get("settings", {}).get("temperature")
    return [f"{name}: eval sampled at T={r['settings']['temperature']:g}; the comparison at T={t:g}, so this "
            "row's EOS rate, length and score are not those of the responses judged above"
            for name, r in evals.items()
            if t is not None and r.get("settings", {}).get("temperature") not in (None, t)]


def temperature_lines(evals: dict[str, dict]) -> list[str]:
    """What eval's samples and its KL to SFT were drawn at (:func:`temperatures_text`), one line if all ``evals``
    (name: report.json) agree, else one a model; none from reports without the settings."""
    said = {n: temperatures_text(r) for n, r in evals.items() if "settings" in r and "kl_temperature" in r}
    if len(set(said.values())) <= 1:
        return list(set(said.values()))
    return [f"{n}: {t}" for n, t in said.items()]


def length_html(report: dict) -> str:
    """The length-controlled win rate beside the raw one, and each side's mean length ('' for a report of an
    igpt before them)."""
    lc, m = report.get("length_controlled"), report.get("mean_length")
    if not lc or not m:
        return ""
    if lc["win_rate"] is None:
        rate = f"<p>Length-controlled win rate: <span class='na'>not available ({e(lc['method'])})</span>"
    else:
        slope = f"; length slope {lc['slope']:+.3f}" if lc.get("slope") is not None else ""
        rate = (f"<p><b>Length-controlled win rate of {e(report['a'])}: {lc['win_rate']:.1%}</b> (95% CI "
                f"{lc['ci_low']:.1%} – {lc['ci_high']:.1%}{slope}): the rate at equal length, AlpacaEval 2's "
                f"length control ({e(lc['method'])}, length in {e(lc.get('length_unit', 'tokens'))})")
    lengths = ", ".join(f"{e(report[s])} {number(m[s]['tokens'], '.1f')} tokens ({number(m[s]['words'], '.1f')} "
                        "words)" for s in "ab")
    return f"{rate}. Mean response length: {lengths}.</p>"


def stage_of(model: str) -> str | None:
    """The stage whose model ``model`` names (``ppo``, ``ppo_ema``, ``dpo@step-40``: as ``igpt compare`` takes
    them), None for a path."""
    base = model.split("@")[0]
    return next((s.name for s in STAGES.values() if base in s.models), None)


def training_charts(run: RunRecords, compared: tuple[str, ...] = ()) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(section, [(title, PNG URI or None)]) of the run's training curves. PPO's x-axis is episodes (prompts
    answered), which compares runs with different rollout batch sizes; SFT's, RM's and DPO's is optimizer
    steps. ``compared``: the models of the comparison; DPO's curves are shown where one is DPO's, and PPO's
    then only where the other is PPO's (a run may hold both, and PPO's curves say nothing of a DPO model)."""
    sft, rm, ppo = run.sft, run.rm, run.ppo
    stages = {stage_of(m) for m in compared}

    def ep(key: str):
        return series(ppo, key, "episode")

    # EOS rate: logged since the report showed it; derived from the EOS count before (episodes / iterations
    # is the rollout batch size)
    eos = ep("val/eos_rate") or [(r["episode"], r["val/num_eos_tokens"] / (r["episode"] / r["step"]))
                                 for r in ppo if "val/num_eos_tokens" in r and r.get("step")]
    # the KL controller as configured (adaptive with a target KL, Ziegler et al. 2019), else as beta moved
    if run.ppo_config is not None:
        target = run.ppo_config.target_kl
        how = f"adaptive, target KL {target:g}" if target > 0 else "fixed"
    else:  # a run without its config.yaml
        how = "adaptive" if len({b for _, b in ep("objective/beta")}) > 1 else "fixed"
    beta_title = f"β, KL coefficient ({how})"
    sections = [
        ("SFT", [("SFT loss (nats/token)", line_chart("SFT loss (nats/token)", "optimizer step", [
            ("train", series(sft, "train/loss")), ("held-out", series(sft, "eval/loss"))]))]),
        ("Reward model", [
            ("RM loss", line_chart("RM ranking loss", "optimizer step", [
                ("train", series(rm, "train/loss")), ("held-out", series(rm, "eval/loss"))])),
            ("RM accuracy", line_chart("RM pairwise accuracy", "optimizer step", [
                ("train", series(rm, "train/accuracy")), ("held-out", series(rm, "eval/accuracy"))], (0, 1)))]),
        ("PPO", [
            ("reward vs KL", reward_vs_kl(ep("objective/kl"), ep("objective/scores"))),
            ("PPO reward and its terms", line_chart("PPO reward and its terms", "episodes", reward_terms(run, eos))),
            ("KL to SFT (nats)", line_chart("KL to SFT (nats)", "episodes", [("", ep("objective/kl"))])),
            ("pretraining loss (ptx)", line_chart("pretraining loss (ptx)", "episodes", [("", ep("loss/ptx"))])),
            (beta_title, line_chart(beta_title, "episodes", [("", ep("objective/beta"))])),
            ("policy entropy (nats/token)", line_chart("policy entropy (nats/token)", "episodes",
                                                       [("", ep("objective/entropy"))])),
            ("clip fraction", line_chart("clip fraction", "episodes", [
                ("policy", ep("policy/clipfrac")), ("value", ep("val/clipfrac"))])),
            ("response length (tokens)", line_chart("response length (tokens)", "episodes",
                                                    [("", ep("val/response_length"))])),
            ("EOS rate", line_chart("EOS rate (responses that ended)", "episodes", [("", eos)], (0, 1.05)))]),
        ("DPO", [
            ("DPO loss", line_chart("DPO loss", "optimizer step", [
                ("train", series(run.dpo, "train/loss")), ("held-out", series(run.dpo, "eval/loss"))])),
            ("DPO pair accuracy", line_chart("DPO pair accuracy (chosen's implicit reward higher)", "optimizer step", [
                ("train", series(run.dpo, "rewards/accuracies")),
                ("held-out", series(run.dpo, "eval/rewards/accuracies"))], (0, 1))),
            ("DPO margins", line_chart("DPO implicit reward margin (chosen − rejected)", "optimizer step", [
                ("train", series(run.dpo, "rewards/margins")),
                ("held-out", series(run.dpo, "eval/rewards/margins"))]))]),
    ]
    shown = {"DPO": "dpo" in stages, "PPO": "dpo" not in stages or "ppo" in stages}
    return [(name, charts) for name, charts in sections if shown.get(name, True)]


def reward_terms(run: RunRecords, eos: list[tuple[float, float]]) -> list[tuple[str, list]]:
    """The lines of PPO's reward chart: the RM score, the missing-EOS penalty and the KL term each apart, and
    their sum, the reward PPO maximises (``objective/rlhf_reward``: score, clipped to ±reward_clip, less the
    penalty of a response without EOS, less β·KL). The mean penalty is the configured one times the share of
    responses that did not end; without the run's config it is not known, and the sum's label says it is in."""
    def ep(key: str):
        return series(run.ppo, key, "episode")

    cfg = run.ppo_config
    clip = f" (score clipped to ±{cfg.reward_clip:g})" if cfg is not None and cfg.reward_clip > 0 else ""
    penalty = ([(x, -cfg.missing_eos_penalty * (1 - rate)) for x, rate in eos]
               if cfg is not None and cfg.missing_eos_penalty else [])
    return [("RM score", ep("objective/scores")), ("− missing-EOS penalty", penalty),
            ("− β·KL", ep("objective/non_score_reward")),
            ("reward = score − penalty − β·KL" + clip, ep("objective/rlhf_reward"))]


def frontier_html(run_dir: Path) -> str:
    """``igpt eval ppo --checkpoints``'s frontier (eval/ppo-frontier/report.json): the chart and one row per
    point, the best gold marked * and the proxy's pick ^ (Gao et al. 2022: the proxy keeps rising as the gold
    falls). '' without one."""
    path = run_dir / "eval" / "ppo-frontier" / "report.json"
    if not path.is_file():
        return ""
    r = json.loads(path.read_text(encoding="utf-8"))
    chart = frontier_chart(r)
    gold = r.get("gold")
    kl_t = r.get("kl_temperature")
    cols = ["model", "episodes", "KL to SFT" + (f" (T={kl_t:g})" if kl_t else ""), "proxy RM score"]
    cols += ([f"gold ({gold})"] if gold else []) + [""]
    rows = ["<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>"]
    for p in r.get("points", []):
        mark = ("*" if p["label"] == r.get("best_gold") else "") + ("^" if p["label"] == r.get("best_proxy") else "")
        cells = [p["label"], str(p["episodes"]), number(p.get("kl_to_sft"), ".3f"), number(p.get("score_mean"), ".3f")]
        rows.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells + ([number(p.get("gold_mean"), ".3f")]
                                                                          if gold else []) + [mark]) + "</tr>")
    note = (f"<p>* best gold: {e(str(r.get('best_gold')))}; ^ the proxy would pick: {e(str(r.get('best_proxy')))}"
            + (f". {e(drop_text(r['gold_drop']))}" if r.get("gold_drop") else "")
            + "</p>") if gold else "<p>No gold judge: the proxy's score alone (--gold or --gold-rm adds one).</p>"
    temps = f"<p>{e(temperatures_text(r))}</p>" if "settings" in r and kl_t else ""
    return (f"<img alt='frontier' src='{chart}'>" if chart else "") + "".join(rows) + "</table>" + temps + note


def sample_html(report: dict, judgments: list[dict], eos_id: int | None) -> str:
    """The EOS counts of both sides, then the drawn samples side by side, the winner shaded, a response
    that never ended marked."""
    if not judgments:
        return na("no judgments")
    parts = []
    for side in ("a", "b"):
        known = [x for x in (ended(j.get(f"{side}_ids"), eos_id) for j in judgments) if x is not None]
        if known:
            parts.append(f"<li>{e(report[side])}: {sum(known)} of {len(known)} responses ended with EOS "
                         f"({sum(known) / len(known):.0%}); the rest were cut at max_new_tokens</li>")
    parts = ["<ul>" + "".join(parts) + "</ul>"] if parts else []
    seed = report.get("settings", {}).get("seed", 0)
    parts.append(f"<p>Drawn at random (seed {e(str(seed))}) from the {len(judgments)} judged prompts.</p>")
    for category, picked in pick_samples(judgments, seed).items():
        if category:
            parts.append(f"<h3>{e(category)}</h3>")
        for j in picked:
            scores = f" (A {j['score_a']:.3f}, B {j['score_b']:.3f})" if "score_a" in j else ""
            parts.append(f"<h4>{e(j['prompt'][:200])}</h4><p>winner: {e(j['winner'])}{scores}</p><div class='pair'>")
            for side in ("a", "b"):
                win = " class='win'" if j["winner"] == side.upper() else ""
                mark = ("\n<span class='noeos' title='the model never emitted EOS: cut at max_new_tokens'>"
                        "no EOS (cut off)</span>") if ended(j.get(f"{side}_ids"), eos_id) is False else ""
                parts.append(f"<div{win}><b>{e(report[side])}</b>\n{e(j[side])}{mark}</div>")
            parts.append("</div>")
    return "\n".join(parts)


def write_html(path: Path, report: dict, judgments: list[dict], run_dir: Path, eos_id: int | None = None,
               rm_path: Path | None = None, device: str = "") -> None:
    """report.html of one compare: ``report`` and ``judgments`` as compare publishes them (``a_ids`` /
    ``b_ids`` as sampled, EOS ``eos_id`` only where emitted), the run's records from ``run_dir``."""
    run = read_run(Path(run_dir), [report["a"], report["b"]])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>igpt: {e(report['a'])} vs {e(report['b'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(report['a'])} vs {e(report['b'])}</h1>",
             "<h2 id='provenance'>Provenance</h2><table class='prov'>"
             + "".join(f"<tr><th>{label}</th><td>{value}</td></tr>"
                       for label, value in provenance(report, rm_path, device, Path(run_dir))) + "</table>",
             f"<h2 id='win-rate'>Win rate</h2><p>Judge: <b>{e(report['judge'])}</b>. {report['judged']} of "
             f"{report['n_prompts']} prompts judged. {e(report['ci_method'])}.</p>"]
    if report["n"]:
        parts.append(f"<p><b>Win rate of {e(report['a'])}: {report['win_rate']:.1%}</b> "
                     f"(95% CI {report['ci_low']:.1%} – {report['ci_high']:.1%}; {report['wins']} wins, "
                     f"{report['ties']} ties, {report['losses']} losses)</p>")
        parts.append(length_html(report))
        parts.append(f"<img alt='win rate chart' src='{win_chart(report)}'>")
        parts.append("<table><tr><th>category</th><th>n</th><th>wins</th><th>ties</th><th>losses</th>"
                     "<th>win rate</th><th>95% CI</th></tr>")
        for c, r in [("all", report), *report["categories"].items()]:
            parts.append(f"<tr><td>{e(c)}</td><td>{r['n']}</td><td>{r['wins']}</td><td>{r['ties']}</td>"
                         f"<td>{r['losses']}</td><td>{r['win_rate']:.1%}</td>"
                         f"<td>{r['ci_low']:.1%} – {r['ci_high']:.1%}</td></tr>")
        parts.append("</table>")
    else:
        parts.append(na("no judgments yet"))
    parts.append("<h2 id='eval'>igpt eval of the same models</h2>" + eval_table(report, run.evals))
    if (Path(run_dir) / "eval" / "summary" / "report.html").is_file():  # igpt eval of several models has run
        parts.append("<p>Every model evaluated side by side (benchmarks with their alignment tax, toxicity): "
                     "<a href='../../eval/summary/report.html'>eval/summary/report.html</a></p>")
    parts.append("<h2 id='training'>Training</h2>")
    for section, charts in training_charts(run, (report["a"], report["b"])):
        drawn = [(title, src) for title, src in charts if src]
        parts.append(f"<h3>{e(section)}</h3>" + ("<div class='charts'>" + "".join(
            f"<img alt='{e(title)}' src='{src}'>" for title, src in drawn) + "</div>" if drawn else na()))
    if (frontier := frontier_html(Path(run_dir))):  # only where igpt eval ppo --checkpoints has run
        parts.append("<h2 id='frontier'>Reward vs KL frontier</h2>" + frontier)
    parts.append("<h2 id='samples'>Samples</h2>" + sample_html(report, judgments, eos_id))
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
