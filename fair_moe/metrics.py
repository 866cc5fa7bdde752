"""Measurements on a model: where its inputs go, its mean loss on token windows, perplexity on a token stream."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the first parameter not offloaded to the meta device (accelerate), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype most of the model's parameters are in: what it was loaded in, also where it keeps a few
    modules in float32 (ergo's embedding and routers), which makes its first parameter and ``model.dtype`` float32."""
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


@torch.no_grad()
def stream_nll(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
               progress: bool = False) -> tuple[float, int]:
    """Summed next-token NLL and the number of scored tokens over ``ids [n]``.

    Windows of ``seq_len`` tokens advance by ``stride`` (default seq_len // 2); in each window only the
    tokens not scored by an earlier window count, so with ``stride < seq_len`` every token after the first is
    scored exactly once. With ``stride == seq_len`` (non-overlapping windows) the first token of each window has
    no context and is not scored.
    """
    stride = stride or max(1, seq_len // 2)
    device = execution_device(model)
    total, scored, prev_end = 0.0, 0, 1
    starts = []  # every window start up to the first window that reaches the end (so the bar ends at 100 %)
    for start in range(0, max(1, len(ids) - 1), stride):
        starts.append(start)
        if start + seq_len >= len(ids):
            break
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
    return total, scored


def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 512, stride: int | None = None,
               progress: bool = False) -> float:
    """exp(mean NLL) over the token stream ``ids [n]``."""
    nll, n = stream_nll(model, ids, seq_len, stride, progress)
    return math.exp(nll / max(n, 1))


class DenseReference:
    """The dense model's next-token distributions on judging windows, kept as the ``top_k`` most likely tokens and
    the mass of the rest, so that any variant of the model can be scored by its KL divergence from them.

    KL(dense ‖ variant) carries none of the text's own entropy (which the cross-entropy adds, the same for every
    variant), so its per-window values vary far less between windows and variants can be told apart on fewer
    tokens. The coarsened KL (top-k tokens and one "rest" bucket) is a lower bound of the full KL that keeps the
    cache small: windows × tokens × ``top_k`` entries instead of the vocabulary.
    """

    def __init__(self, model: nn.Module | None, input_ids: torch.Tensor, batch_size: int = 4, top_k: int = 32):
        self.input_ids = input_ids
        self.batch_size = batch_size
        if model is None:  # filled by ``split``
            return
        ids, logp, rest, nll = [], [], [], []
        for batch in self._batches():
            full = _log_probs(model, batch)
            nll.append(-full.gather(-1, batch[:, 1:, None].to(full.device)).squeeze(-1).double().cpu().mean(-1))
            top, index, tail = _top_and_rest(full, top_k)
            ids.append(index)
            logp.append(top)
            rest.append(tail)
        self.top_ids = torch.cat(ids)  # [n, S-1, k]
        self.top_logp = torch.cat(logp)  # [n, S-1, k]
        self.rest_logp = torch.cat(rest)  # [n, S-1]
        self.dense_nll = torch.cat(nll)  # [n] the dense model's mean next-token cross-entropy per window

    def split(self, n: int) -> tuple[DenseReference, DenseReference]:
        """The first ``n`` windows and the rest, as two references (nothing is recomputed)."""
        parts = []
        for rows in (slice(0, n), slice(n, None)):
            part = DenseReference(None, self.input_ids[rows], self.batch_size)
            part.top_ids, part.top_logp, part.rest_logp = self.top_ids[rows], self.top_logp[rows], self.rest_logp[rows]
            part.dense_nll = self.dense_nll[rows]
            parts.append(part)
        return parts[0], parts[1]

    def __len__(self) -> int:
        return len(self.input_ids)

    def _batches(self):
        for i in range(0, len(self.input_ids), self.batch_size):
            yield self.input_ids[i : i + self.batch_size]

    @torch.no_grad()
    def window_kl(self, model: nn.Module) -> torch.Tensor:
        """Mean KL(dense ‖ model) over each window's positions, float64 [n]."""
        result = []
        for i, batch in enumerate(self._batches()):
            rows = slice(i * self.batch_size, i * self.batch_size + len(batch))
            q = _log_probs(model, batch)  # [B, S-1, V]
            q_top = q.gather(-1, self.top_ids[rows].to(q.device).long()).double().cpu()
            q_rest = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-12))
            p_top, p_rest = self.top_logp[rows].double(), self.rest_logp[rows].double()
            kl = (p_top.exp() * (p_top - q_top)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
            result.append(kl.clamp_min(0).mean(-1))
        return torch.cat(result)

    @property
    def tokens(self) -> int:
        return int(self.top_logp.shape[0] * self.top_logp.shape[1])


@torch.no_grad()
def _log_probs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities [B, S-1, V] (float32) of ``input_ids [B, S]``."""
    logits = model(input_ids=input_ids.to(execution_device(model)), use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _top_and_rest(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest log-probabilities [.., k], their token ids [.., k] (int32) and the log-mass of the rest."""
    top, index = logp.topk(k, dim=-1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12))
    return top.cpu(), index.to(torch.int32).cpu(), rest.cpu()


def paired_difference(baseline: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of ``baseline − other`` over paired windows [n] (positive: ``other`` is lower)."""
    diff = (baseline - other).double()
    se = diff.std(unbiased=True).item() / len(diff) ** 0.5 if len(diff) > 1 else float("inf")
    return diff.mean().item(), se
