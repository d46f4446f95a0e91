"""What a training stage tells its log at the end: igpt dpo's summary, as train-rm's (issue 31 item 11)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import TINY_CONFIG, igpt, marker_rankings, write_jsonl
from instructgpt_cli.rundir import read_metrics


def test_dpo_ends_with_its_held_out_accuracy_and_interval(tmp_path: Path):
    """The summary names the held-out pair accuracy with its 95% interval clustered by ranking, the same
    numbers as the last metrics line and the manifest, and where the model was saved."""
    ranks = write_jsonl(tmp_path / "ranks.jsonl", marker_rankings(24))
    run_dir = tmp_path / "run"
    result = igpt("dpo", "--config", TINY_CONFIG, "--model", "tiny", "--rankings", ranks, "--run-dir", run_dir,
                  "--max-steps", "2", "--val-fraction", "0.25")
    assert result.exit_code == 0, result.output
    last = read_metrics(run_dir / "dpo" / "metrics.jsonl")[-1]
    outputs = json.loads((run_dir / "manifest.json").read_text())["stages"]["dpo"]["outputs"]
    acc, low, high = (outputs[f"eval/rewards/accuracies{k}"] for k in ("", "_ci_low", "_ci_high"))
    assert (acc, low, high) == tuple(last[f"eval/rewards/accuracies{k}"] for k in ("", "_ci_low", "_ci_high"))
    assert low <= acc <= high and outputs["eval/rankings"] == 6
    said = re.search(r"held-out pair accuracy ([\d.]+)% \(95% CI ([\d.]+)% - ([\d.]+)%, clustered by ranking: "
                     r"6 held-out rankings, (\d+) pairs\)", result.stderr)
    assert said, result.stderr
    assert [float(x) for x in said.groups()[:3]] == [round(100 * x, 1) for x in (acc, low, high)]
    assert int(said.group(4)) == outputs["eval/pairs"]
    assert re.search(rf"saved\s+{re.escape(str(run_dir / 'dpo' / 'final'))}", result.stderr)
