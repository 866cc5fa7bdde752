"""Perplexity on local text with strided windows (each token scored once, with up to seq_len context)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.calibration import token_stream
from fair_moe.signals.layerwise import execution_device


@torch.no_grad()
def stream_nll(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None, progress: bool = False) -> tuple[float, int]:
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


def perplexity(model: nn.Module, tokenizer, texts: list[str], seq_len: int = 512, stride: int | None = None, progress: bool = False) -> float:
    """exp(mean NLL) of the texts joined with EOS."""
    nll, n = stream_nll(model, token_stream(tokenizer, texts), seq_len, stride, progress)
    return math.exp(nll / max(n, 1))
