"""What the loop needs to know about the launcher: DDP/DeepSpeed settings, per-stage DeepSpeed config, refusals.

`accelerate launch` (flags or --config_file) decides the distribution: processes, DDP or DeepSpeed, the ZeRO
stage and offload (a recipe's `distributed.accelerate_config` only chooses the launch when nothing launched
llmcl; see llmcl.launch). llmcl fills the DeepSpeed config's "auto" values from the stage's train settings
before every stage, because stages may differ in batch size or gradient accumulation.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any, Callable

from llmcl.errors import LlmclError


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed_precision for the recipe's train.precision (auto = bf16 where the GPU supports it)."""
    import torch

    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX, as oneDNN reports it); without it PyTorch
    emulates bf16 matrix products, 6-9x slower than fp32 on an AVX2 CPU (docs/benchmarks.md)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: no note


def cpu_bf16_note(recipe: Any, device_type: str) -> str | None:
    """A one-line note when a run on a CPU without native bfloat16 trains or scores in bf16 (the benchmark
    recipes pin train.precision: bf16 to match a GPU's numerics), or None."""
    if device_type != "cpu" or mixed_precision(recipe.train.precision) != "bf16" or native_cpu_bf16():
        return None
    import torch

    return (f"note: train.precision: bf16 on a CPU without native bfloat16 ({torch.backends.cpu.get_cpu_capability()}):"
            " bf16 matrix products are emulated here, several times slower than fp32; train.precision: fp32 is "
            "faster on this machine (the numbers then differ by rounding)")


def make_accelerator(recipe: Any, run_dir: Any, *, fresh: bool = False) -> Any:
    """The Accelerator a run trains with, from the recipe's precision, trackers and timeout and the launcher's
    environment. `fresh` first forgets Accelerate's process-wide state, so that one process can train several
    recipes one after another (tests, benchmarks)."""
    from accelerate import Accelerator

    if fresh:
        import torch.distributed as dist

        reset_accelerate(keep_processes=dist.is_available() and dist.is_initialized())
    _deepspeed_cpu_processes()
    return Accelerator(
        mixed_precision=mixed_precision(recipe.train.precision),
        log_with=list(recipe.logging.trackers) or None,
        project_dir=str(run_dir),
        kwargs_handlers=accelerator_kwargs(recipe.distributed.timeout_minutes),
        cpu=cpu_processes(),
    )


def reset_accelerate(*, keep_processes: bool = False) -> None:
    """Forget Accelerate's process-wide singletons (the launch settings stay in the environment);
    `keep_processes` keeps the process group of a launched job."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=not keep_processes)
    GradientState._reset_state()
    if not keep_processes:
        PartialState._reset_state()


def accelerator_kwargs(timeout_minutes: float) -> list[Any]:
    """Process-group settings: a collective timeout long enough for rank 0 to evaluate between stages."""
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=dt.timedelta(minutes=timeout_minutes))]


def cpu_processes() -> bool:
    """Several processes on a machine without CUDA (torchrun/accelerate launch --multi_gpu there): DDP over gloo
    on CPU. Accelerate needs cpu=True for that; DeepSpeed brings its own CPU accelerator."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return world > 1 and not deepspeed and not torch.cuda.is_available()


def _deepspeed_cpu_processes() -> None:
    """DeepSpeed launched with several processes on a machine without CUDA (the CPU tests of sharded training):
    Accelerate finds no backend there and would make every process a world of one, while DeepSpeed's own process
    group (gloo) spans them all; Accelerate's process state is set from that group."""
    import os

    import torch

    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available()
            or int(os.environ.get("WORLD_SIZE", "1")) < 2):
        return
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()  # initialises DeepSpeed's process group
    if state.num_processes == 1 and dist.is_initialized() and dist.get_world_size() > 1:
        state.backend, state.distributed_type = dist.get_backend(), DistributedType.DEEPSPEED
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def deepspeed_plugin(accelerator: Any) -> Any | None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin


def zero_stage(accelerator: Any) -> int | None:
    plugin = deepspeed_plugin(accelerator)
    return None if plugin is None else int(plugin.zero_stage)


def offloads(accelerator: Any) -> bool:
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return False
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    return any(zero.get(k, {}).get("device", "none") not in ("none", None)
               for k in ("offload_optimizer", "offload_param"))


def collectives(accelerator: Any) -> dict[str, Any]:
    """The cross-rank operations a method may use (StageInfo.reduce_sum and gather); the identity on one process."""
    if accelerator.num_processes == 1:
        return {}
    from accelerate.utils import gather_object

    return {"reduce_sum": lambda t: accelerator.reduce(t, "sum"), "gather": lambda obj: gather_object([obj])}


def gather_rng(accelerator: Any, own: dict[str, Any]) -> dict[str, Any]:
    """Every rank's RNG state (llmcl.rundir.steps.rng_state, keyed by rank) merged, on every rank (all call it)."""
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import gather_object

    return {k: v for state in gather_object([own]) for k, v in state.items()}


def describe(accelerator: Any) -> str:
    """How this run is distributed, for the ledger: no, multi_cpu, multi_gpu, deepspeed-zero2, ..."""
    stage = zero_stage(accelerator)
    return str(accelerator.distributed_type).split(".")[-1].lower() + (f"-zero{stage}" if stage else "")


def backward(accelerator: Any, loss: Any) -> None:
    """accelerator.backward, except that a DeepSpeed engine does not step inside it (Accelerate's wrapper steps
    at the end of the last micro-batch's backward): the loop calls method.after_backward between the backward
    and the step on every backend, then `step`."""
    if deepspeed_plugin(accelerator) is None:
        accelerator.backward(loss)
        return
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.set_gradient_accumulation_boundary(is_boundary=accelerator.sync_gradients)
    engine.backward(loss)


def step(accelerator: Any, optimizer: Any, params: list[Any], max_grad_norm: float,
         take: Callable[[Any], bool]) -> tuple[Any, bool]:
    """Clip (max_grad_norm > 0) and take the optimizer step if `take(grad_norm)` says so; returns the gradient
    norm before clipping and whether the step was taken. Under DeepSpeed the engine clips and steps
    (gradient_clipping in its config, filled by configure_stage) and `take` sees the norm only afterwards (it can
    stop the run, not skip the step)."""
    if deepspeed_plugin(accelerator) is not None:
        accelerator.deepspeed_engine_wrapped.engine.step()
        grad_norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        take(grad_norm)
        return grad_norm, True
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:  # the same norm, unclipped (an infinite bound clips nothing; grads are all-reduced: every rank agrees)
        grad_norm = accelerator.clip_grad_norm_(params, float("inf"))
    taken = take(grad_norm)
    if taken:
        optimizer.step()
    return grad_norm, taken


def shard_saver(engine: Any):
    """Under DeepSpeed: writes this rank's shard of the parameters and optimizer (DeepSpeed's own checkpoint)."""
    return lambda directory: engine.save_checkpoint(str(directory), tag="step", save_latest=False)


def load_shards(engine: Any, directory: Any) -> None:
    """Restore this rank's shard of a step checkpoint into the DeepSpeed engine (after accelerator.prepare)."""
    path, _ = engine.load_checkpoint(str(directory), tag="step", load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise LlmclError(f"the DeepSpeed step checkpoint in {directory} could not be loaded; delete it to restart "
                         "the stage")


def check_method(accelerator: Any, method: Any) -> None:
    """Refuse a DeepSpeed ZeRO stage the method cannot work under, before any training."""
    stage = zero_stage(accelerator)
    if stage == 0:
        raise LlmclError("DeepSpeed ZeRO-0 shards nothing and is not supported: use DDP (accelerate launch without "
                         "DeepSpeed) or ZeRO-2/3")
    if stage in method.zero_refused:
        raise LlmclError(f"method {method.name!r} does not support DeepSpeed ZeRO-{stage}: {method.zero_refused[stage]}")


def check_stage(accelerator: Any, cfg: Any, key: str) -> None:
    """Train settings that DeepSpeed runs do not support yet, refused before the stage trains."""
    if deepspeed_plugin(accelerator) is None:
        return
    if cfg.optimizer_state == "keep":
        raise LlmclError(f"{key}.optimizer_state=keep is not supported under DeepSpeed (its optimizer state is "
                         "sharded); use reset")
    if cfg.on_nonfinite == "skip":
        raise LlmclError(f"{key}.on_nonfinite=skip is not supported under DeepSpeed (the engine steps before the "
                         "gradient norm is known); use stop")


def configure_stage(accelerator: Any, cfg: Any) -> None:
    """Fill the DeepSpeed config's "auto" values for this stage, starting from the config as launched."""
    plugin = deepspeed_plugin(accelerator)
    if plugin is None:
        return
    if not hasattr(plugin, "_llmcl_launched_config"):
        plugin._llmcl_launched_config = copy.deepcopy(plugin.deepspeed_config)
    original = plugin._llmcl_launched_config
    config = copy.deepcopy(original)
    world = accelerator.num_processes
    values = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise LlmclError(f"the DeepSpeed config sets {key}={config[key]} but the recipe's stage needs {value} "
                             "(from train.batch_size, grad_accum, max_grad_norm); set it to \"auto\" in the DeepSpeed JSON")
    plugin.hf_ds_config.config = config
    plugin.deepspeed_config = config
    accelerator.gradient_accumulation_steps = cfg.grad_accum


def frozen_weights(accelerator: Any, model: Any) -> dict[str, tuple[Any, Any]]:
    """Under DeepSpeed with bf16/fp16, taken before accelerator.prepare: {parameter name: (dtype, value)} of every
    frozen floating-point parameter, `value` a CPU copy where the half precision would round the weight, else
    None; on the main process only, {} elsewhere. DeepSpeed casts the whole module to half precision and keeps
    fp32 master copies of the trained parameters only: full_state_dict puts these back, so that a frozen weight
    leaves the stage exactly as it came in (HFT's frozen half, OSFT's embeddings and norms); one whose
    half-precision value changed in the stage is saved as the module holds it."""
    import torch

    if deepspeed_plugin(accelerator) is None or accelerator.mixed_precision not in ("bf16", "fp16") \
            or not accelerator.is_main_process:
        return {}
    half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    frozen = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != half:
            w = p.detach()
            frozen[name] = (w.dtype, None if torch.equal(w.to(half).to(w.dtype), w) else w.cpu().clone())
    return frozen


def full_state_dict(accelerator: Any, model: Any, named: list,
                    frozen: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any] | None:
    """Under DeepSpeed, the state dict to save (all ranks take part); None = save the module as it is.

    ZeRO-3 shards every parameter across ranks, so it is gathered into one full state dict. With bf16/fp16
    DeepSpeed keeps the module itself in half precision: the trained parameters are taken from the fp32 master
    weights instead, and the frozen ones from `frozen` (frozen_weights, taken before the stage), so a stage
    checkpoint is what a DDP run would save; tied names (embeddings and LM head) share one tensor again, which
    save_pretrained writes once."""
    if deepspeed_plugin(accelerator) is None:
        return None
    half = accelerator.mixed_precision in ("bf16", "fp16")
    if zero_stage(accelerator) != 3 and not half:
        return None
    state = accelerator.get_state_dict(model)
    if not half:
        return state
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for pname, p in named:
        full = safe_get_full_fp32_param(p)  # collective under ZeRO-3
        if full is not None:
            masters[pname] = full.detach().cpu()
    if state is None:
        return None
    frozen = frozen or {}
    tied: dict[int, list[str]] = {}
    for name, q in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        tied.setdefault(id(q), []).append(name)
    for names in tied.values():
        name = names[0]  # named_parameters' name (remove_duplicate keeps the first)
        if name not in state:
            continue
        value = masters.get(name)
        if value is None and name in frozen:
            dtype, kept = frozen[name]
            now = state[name]  # a frozen weight a method changed in the stage (I-LoRA's slow learner) keeps its value
            same = kept is not None and torch.equal(kept.to(now.dtype), now.to(kept.device))
            value = kept if same else now.to(dtype)
        if value is not None:
            for alias in names:
                if alias in state:
                    state[alias] = value
    return state
