"""Top-k accuracy (and mean cross-entropy) of an image classifier on a labelled loader."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["topk_accuracy"]


@torch.no_grad()
def topk_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    topk: tuple[int, ...] = (1, 5),
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, float]:
    """``{"top1": %, "top5": %, "loss": mean cross-entropy in nats, "images": n}``; a k above the number of
    classes is left out. The loss separates models whose accuracies tie on a small evaluation set."""
    device = next(model.parameters()).device
    correct = {k: 0 for k in topk}
    seen, classes, loss = 0, None, 0.0
    for images, labels in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        logits = forward(model, images.to(device)).float()  # (batch, classes)
        classes = logits.shape[-1]
        ranked = logits.topk(min(max(topk), classes), dim=-1).indices.cpu()  # (batch, k)
        hits = ranked == labels.view(-1, 1)
        loss += torch.nn.functional.cross_entropy(logits.cpu(), labels, reduction="sum").item()
        for k in topk:
            correct[k] += int(hits[:, :k].any(dim=-1).sum())
        seen += labels.shape[0]
    out = {f"top{k}": 100.0 * correct[k] / max(seen, 1) for k in topk if classes is None or k <= classes}
    out["loss"] = loss / max(seen, 1)
    out["images"] = seen
    return out
