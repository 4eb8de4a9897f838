"""Run several recipes one after another in one launched process group (DDP or DeepSpeed), as `llmcl train`
does (evaluation hooks included).

    accelerate launch --config_file CFG tests/helpers/dist_driver.py RECIPE:RUN_DIR [RECIPE:RUN_DIR ...]

One launch per distributed configuration instead of one per (method, configuration): the launcher and the
DeepSpeed import are the slow part. Exit 0 only when every run finishes; a refusal (LlmclError) is printed as
"refused: <message>" and the next recipe runs.

With LLMCL_SIGTERM_AT=NAME:N[,NAME:N...] the run whose directory is named NAME gets a SIGTERM after its N-th
optimizer step (counted over its stages); the driver reports it and goes on with the next recipe.

With LLMCL_DUMP_RANKS=1 every rank writes, at the end of every stage (before it is saved), a digest of its
trainable parameters, its method state and its RNG state to RUN_DIR.rank<R>.stage<I>.json: ranks that drifted
apart differ.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _digest(value) -> object:
    import hashlib

    import torch

    if torch.is_tensor(value):
        t = value.detach().cpu().contiguous()
        return f"{t.dtype}{list(t.shape)}:" + hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    if isinstance(value, dict):
        return {str(k): _digest(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    return value


def _dump_ranks() -> None:
    import json

    import llmcl.train.loop as loop

    finish = loop.finish_stage

    def finish_stage(ctx):
        import torch

        params = {n: _digest(p) for n, p in ctx.named}
        state = _digest(ctx.method.state_dict())
        rank = ctx.run.accelerator.process_index
        Path(f"{ctx.run.run_dir}.rank{rank}.stage{ctx.index}.json").write_text(
            json.dumps({"params": params, "method_state": state, "rng": _digest(torch.get_rng_state())}, indent=1,
                       sort_keys=True, default=str))
        finish(ctx)

    loop.finish_stage = finish_stage


_SIGTERM = {"at": None, "n": 0}


def _install_sigterm() -> None:
    """Every method's after_step counts the run's optimizer steps and sends this process a SIGTERM at the
    _SIGTERM["at"]-th."""
    import signal

    from llmcl import methods

    for cls in methods.REGISTRY.values():
        original = cls.after_step

        def after_step(self, model, _original=original):
            _original(self, model)
            _SIGTERM["n"] += 1
            if _SIGTERM["n"] == _SIGTERM["at"]:
                os.kill(os.getpid(), signal.SIGTERM)

        cls.after_step = after_step


def main() -> None:
    from llmcl import recipe as recipe_mod
    from llmcl.eval.hooks import EvalHooks
    from llmcl.errors import LlmclError
    from llmcl.train.distributed import make_accelerator
    from llmcl.train.loop import run
    from llmcl.train.progress import Display
    from llmcl.train.signals import Stopped

    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("LLMCL_DUMP_RANKS"):
        _dump_ranks()
    targets = dict(t.split(":") for t in os.environ.get("LLMCL_SIGTERM_AT", "").split(",") if t)
    if targets:
        _install_sigterm()
    for pair in sys.argv[1:]:
        recipe_path, run_dir = pair.split(":", 1)
        at = targets.get(Path(run_dir).name)
        _SIGTERM.update(at=None if at is None else int(at), n=0)
        try:
            recipe, display = recipe_mod.load(Path(recipe_path), []), Display(enabled=False)
            run(recipe, Path(run_dir), display=display, hooks=EvalHooks(recipe, Path(run_dir), display),
                accelerator=make_accelerator(recipe, run_dir, fresh=True))
            print(f"done: {run_dir}", flush=True)
            Path(f"{run_dir}.rank{rank}.done").touch()  # each rank says it finished (stdout may be rank 0's only)
        except LlmclError as exc:
            print(f"refused: {run_dir}: {exc}", flush=True)
        except Stopped as exc:
            print(f"stopped: {run_dir}: {exc}", flush=True)


if __name__ == "__main__":
    main()
