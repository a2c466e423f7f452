"""A step's metrics read from the device in one transfer.

Losses leave their metrics on the device (0-d tensors); reading each with ``.item()`` would make
the host wait for the GPU after every micro-batch, so the next one's kernels start only once the
queue has drained. The trainer collects a whole step's and reads them here, once.
"""

from __future__ import annotations

from typing import Any


def metrics_to_host(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics`` with every tensor value replaced by its float, all read in one ``tolist()``;
    other values (floats an objective already read) are kept as they are."""
    import torch

    slots = [(i, key) for i, m in enumerate(metrics) for key, v in m.items() if isinstance(v, torch.Tensor)]
    out = [dict(m) for m in metrics]
    if not slots:
        return out
    first = metrics[slots[0][0]][slots[0][1]]
    values = torch.stack([metrics[i][key].detach().reshape(()).to(first.device, torch.float64)
                          for i, key in slots]).tolist()
    for (i, key), value in zip(slots, values):
        out[i][key] = value
    return out
