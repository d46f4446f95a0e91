"""One measurement in a fresh process: ``python bench/worker.py SPEC.json OUT.json``.

SPEC: {"side": "igpt" | "trl" | "generate" | "setup", "task": ..., "threads": N, ...}. Threads are pinned before
torch does any work. OUT gets the result, or {"error": ...} with the exception's text when the side
could not run the configuration (an API change, an error), so the driver records it instead of a number.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    threads = int(spec.get("threads", 1))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    os.environ.setdefault("WANDB_DISABLED", "true")
    from common import pin_threads, vm_hwm_mb, write_json

    pin_threads(threads)
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    try:
        if spec["side"] == "setup":
            import prepare

            result = prepare.calibrate(threads) if spec["task"] == "calibrate" else prepare.prepare(spec)
        elif spec["task"] == "sample":  # igpt's sampler or transformers' generate (sampling.py)
            import sampling

            result = sampling.sample(spec)
        elif spec["side"] == "igpt":
            import igpt_side

            result = igpt_side.TASKS[spec["task"]](spec)
        else:
            import trl_side

            result = trl_side.TASKS[spec["task"]](spec)
        result["threads_effective"] = torch.get_num_threads()
    except Exception as e:  # recorded in the results instead of a number
        tb = traceback.format_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-4000:]}
        print(tb, file=sys.stderr)
    result["process_peak_rss_mb"] = vm_hwm_mb()
    result["process_seconds"] = time.perf_counter() - started
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
