"""Measurements on a model: where its inputs go, its mean loss on token windows, perplexity on a token stream."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the first parameter not offloaded to the meta device (accelerate), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@torch.no_grad()
def mean_loss(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``input_ids [n, seq]``."""
    device = execution_device(model)
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def stream_nll(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
               progress: bool = False) -> tuple[float, int]:
    """Summed next-token NLL and the number of scored tokens over ``ids [n]``.

    Windows of ``seq_len`` tokens advance by ``stride`` (default seq_len // 2); in each window only the
    tokens not scored by an earlier window count, so every token after the first is scored exactly once.
    """
    stride = stride or max(1, seq_len // 2)
    device = execution_device(model)
    total, scored, prev_end = 0.0, 0, 1
    starts = list(range(0, max(1, len(ids) - 1), stride))
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(start + seq_len, len(ids))
        window = ids[start:end].to(device)[None]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        targets = window[0, 1:]
        nll = nn.functional.cross_entropy(logits, targets, reduction="none")
        new_from = max(prev_end, start + 1) - (start + 1)  # first target position not yet scored
        total += nll[new_from:].double().sum().item()
        scored += len(nll) - new_from
        prev_end = end
        if end == len(ids):
            break
    return total, scored


def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
               progress: bool = False) -> float:
    """exp(mean NLL) over the token stream ``ids [n]``."""
    nll, n = stream_nll(model, ids, seq_len, stride, progress)
    return math.exp(nll / max(n, 1))
