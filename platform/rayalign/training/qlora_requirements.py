"""What a QLoRA stage requires of the run, checked on the driver before any worker starts.

A GPU trainer (bitsandbytes has no CPU 4-bit path), ZeRO-2 at most, and ``qlora`` without ``lora``.
It sits in the training layer, beside the stage options it reads, so the driver's checks
(``memory.check_training_memory``) need not import the worker that loads the 4-bit model
(``workers/quantization.py``).
"""

from __future__ import annotations

from rayalign.errors import ConfigError

NEEDS_GPU = "QLoRA needs a GPU (with bitsandbytes)"


def require_gpu_for_qlora(run, entries) -> None:
    """A stage with ``qlora`` on a CPU-only trainer, with ZeRO-3 or with ``lora`` too, is a config error."""
    for i, entry in enumerate(entries):
        if getattr(entry.config, "qlora", None) is None:
            continue
        where = f"stages[{i}].{entry.name}.qlora"
        if getattr(entry.config, "lora", None) is not None:
            raise ConfigError(where, "set either lora or qlora, not both")
        if run.resources.trainer.num_gpus <= 0:
            raise ConfigError(where, f"{NEEDS_GPU}; resources.trainer.num_gpus is 0 (use `lora` on CPU)")
        if entry.config.zero_stage == 3:
            raise ConfigError(where, "QLoRA trains with zero_stage 2: ZeRO-3 cannot shard 4-bit weights")
