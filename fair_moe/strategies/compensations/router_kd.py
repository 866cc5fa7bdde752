"""``router-kd``: router-only knowledge distillation [ours, after arXiv 2603.02217, "Is Retraining-Free Enough?
The Necessity of Router Calibration"].

Only the kept experts' router rows are trained (the rows of the router weight, and of the router bias where
the router has one), so that the pruned model follows the dense one. Every other weight stays as it is: the
checkpoint keeps the stock architecture and differs from the masked original only in those rows. Objectives
(``--compensate-option objective=…``):

- ``kl`` (default), end to end: KL(dense ‖ pruned) of the next-token distributions on calibration windows. The
  teacher is the same weights without the mask, so no second copy of the model is held, and its logits are made
  once per training piece from the kept input of its output embedding (``TeacherLogits``), not by a forward per
  step;
- ``local``, one MoE layer at a time: ‖y_dense − y_pruned‖² of the layer's routed-experts output on its own
  inputs (captured once from the pruned model, at most ``max_tokens`` tokens per layer), so only one layer
  trains at a time and offloaded weights are brought in per layer.

A few training pieces (``held_out``, spread over the fit windows) are held out for early stopping: the rows with
the lowest held-out loss are kept, and training stops after ``patience`` evaluations without improvement. Adam's
step is ``lr`` × the RMS of the layer's router weight, so one setting suits routers of any scale. The plan records
the objective, steps, learning rate and initial / final losses; the rows are saved in
``fair_moe_compensation.safetensors``. With ``steps=0`` the rows are the original ones and the checkpoint equals
``--compensate none``.
"""

from __future__ import annotations

import contextlib

from fair_moe.core.lazy import lazy_module
from fair_moe.core.plan import CompensationRecord
from fair_moe.strategies.compensations.base import COMPENSATIONS, Compensation

torch = lazy_module("torch")


@COMPENSATIONS.register
class RouterKD(Compensation):
    name = "router-kd"
    description = "train the kept experts' router rows so the pruned model follows the dense one (router KD)"
    changes = ("each MoE layer's router rows for the kept experts (weight, and bias where the router has one) were "
               "replaced by rows trained so that the pruned model follows the dense model (router knowledge "
               "distillation); every other weight is the base model's")
    auto_candidate = True
    options = {
        "objective": (str, "kl", "kl: end-to-end next-token KL; local: per-layer routed-output error"),
        "steps": (int, 30, "optimiser steps at most"),
        "lr": (float, 0.04, "Adam step relative to the RMS of the layer's router weight"),
        "eval_every": (int, 10, "steps between held-out evaluations"),
        "patience": (int, 2, "held-out evaluations without improvement before stopping"),
        "held_out": (int, 8, "training pieces held out for early stopping"),
        "max_tokens": (int, 16384, "tokens per layer kept for the local objective"),
        "seq_len": (int, 256, "tokens per training window (calibration windows are cut into pieces this long)"),
        "pieces": (int, 4, "training pieces per optimiser step for objective=kl (run --batch-size at a time)"),
    }

    def fit(self, model, kept, data):
        options = {**self.parse_options(()), **data.options}
        if options["objective"] not in ("kl", "local"):
            from fair_moe.core.errors import FairMoeError

            raise FairMoeError(f"--compensate-option objective={options['objective']}: use kl or local")
        rows = RouterRows(model, kept)
        windows = _pieces(data.windows, options["seq_len"])
        step = max(2, len(windows) // max(1, options["held_out"]))  # the held-out pieces spread over every window
        held = windows[::step][: options["held_out"]] if len(windows) > 1 else windows
        train = windows[[i for i in range(len(windows)) if i % step or i // step >= options["held_out"]]] \
            if len(windows) > 1 else windows
        train_fn = _train_kl if options["objective"] == "kl" else _train_local
        history = train_fn(model, rows, train, held, data.batch_size, data.seed, {**options,
                                                                                "progress": data.progress})
        fit = {"options": {name: options[name] for name in self.options},  # every option in force, defaults included
               "train_windows": len(train), "held_out_windows": len(held), **history}
        return CompensationRecord(self.name, rows.record(), fit)

    @contextlib.contextmanager
    def reference(self, model, record):
        with _substituted(model, record):
            yield

    def as_written(self, record, dtype):
        """The learned rows rounded to ``dtype`` (the checkpoint's), kept in their own dtype."""
        per_layer = {layer: {name: value if name == "kept" else value.to(dtype).to(value.dtype)
                             for name, value in entry.items()} for layer, entry in record.per_layer.items()}
        return CompensationRecord(record.kind, per_layer, record.fit)

    def fold(self, model, record):
        with torch.no_grad():
            for tensor, ids, value in _targets(model, record):
                tensor[ids] = value.to(tensor.device, tensor.dtype)

    def transform(self, model, record):
        from fair_moe.adapters import get_adapter

        adapter = get_adapter(model.config)
        table = {int(k): v for k, v in record.per_layer.items()}

        router_prefix = adapter.structure(model.config).router_path + "."

        def transform(ref, tensor):
            entry = table.get(ref.layer)
            if ref.part != "router" or entry is None or not adapter.is_logit_tensor(model.config, ref.name):
                return tensor
            name = ref.name.removeprefix(router_prefix)
            if name not in entry:
                return tensor
            out = tensor.clone()
            out[torch.tensor(entry["kept"])] = entry[name].to(out.dtype)
            return out

        return transform

    def summary(self, record):
        fit = record.fit
        objective = fit.get("options", fit).get("objective")  # plans before 2026-12 kept it at the top level
        return (f"router KD ({objective}): {fit.get('steps')} steps, held-out loss "
                f"{fit.get('held_out_initial', float('nan')):.4g} → {fit.get('held_out_final', float('nan')):.4g}; "
                f"router rows of layers {', '.join(str(k) for k in sorted(record.per_layer))} trained")


def _pieces(windows, seq_len: int):
    """Calibration windows [n, S] cut into pieces of ``seq_len`` tokens [n·S/seq_len, seq_len] (whole windows when
    shorter): short pieces give more, cheaper optimiser steps over the same text."""
    if seq_len <= 0 or windows.shape[1] <= seq_len:
        return windows
    usable = windows.shape[1] // seq_len * seq_len
    return windows[:, :usable].reshape(-1, seq_len)


class RouterRows:
    """The trainable rows: per MoE layer that lost experts, its kept experts' rows of every logit-making router
    parameter (float32 masters), and a way to build the full router tensors from them."""

    def __init__(self, model, kept: dict[int, list[int]]):
        from fair_moe.adapters import get_adapter

        self.adapter = get_adapter(model.config)
        self.layers = [layer for layer in self.adapter.moe_layers(model)
                       if layer.index in kept and len(kept[layer.index]) < layer.num_experts]
        self.kept = {layer.index: sorted(kept[layer.index]) for layer in self.layers}
        self.params: dict[int, dict[str, torch.nn.Parameter]] = {}
        self.scale: dict[int, float] = {}
        for layer in self.layers:
            ids = torch.tensor(self.kept[layer.index])
            prefix = layer.structure.router_path + "."
            names = [p.removeprefix(prefix) for p in layer.logit_tensors()]  # router-relative
            self.params[layer.index] = {
                n: torch.nn.Parameter(layer.router.get_parameter(n).detach()[ids].float().clone()) for n in names}
            self.scale[layer.index] = layer.logits_weight().detach().float().pow(2).mean().sqrt().item()

    def full(self, layer, name: str):
        """The router's full tensor ``name`` [E, …] with the kept rows taken from the trainable masters."""
        base = layer.router.get_parameter(name).detach()
        ids = torch.tensor(self.kept[layer.index], device=base.device)
        return base.index_put((ids,), self.params[layer.index][name].to(base.dtype))

    def substitutions(self, model) -> dict:
        """{parameter path: full tensor} for torch.func.functional_call over the whole model."""
        paths = {id(m): n for n, m in model.named_modules()}
        return {f"{paths[id(layer.router)]}.{name}": self.full(layer, name)
                for layer in self.layers for name in self.params[layer.index]}

    def snapshot(self) -> dict:
        return {i: {n: p.detach().clone() for n, p in ps.items()} for i, ps in self.params.items()}

    def restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for i, ps in self.params.items():
                for n, p in ps.items():
                    p.copy_(snapshot[i][n])

    def record(self) -> dict:
        return {i: {"kept": self.kept[i], **{n: p.detach().clone() for n, p in ps.items()}}
                for i, ps in self.params.items()}

    def optimiser(self, lr: float, layers=None):
        groups = [{"params": list(self.params[layer.index].values()), "lr": lr * self.scale[layer.index]}
                  for layer in (layers or self.layers)]
        return torch.optim.Adam(groups)


@contextlib.contextmanager
def _frozen(model):
    """Model parameters frozen (no gradients stored for them); restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _kl(student_logits, teacher_logits) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) of next-token distributions; logits [B, S, V]."""
    s = torch.log_softmax(student_logits.float().flatten(0, 1), dim=-1)
    t = torch.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


class TeacherLogits:
    """The dense model's next-token logits for fixed training pieces ``[n, S]``, computed once.

    One no-grad pass keeps each piece's output-embedding input ``hidden [n, S, H]``; the teacher logits of a
    batch are then ``lm_head(hidden[index])`` ``[B, S, V]``, so a step costs one head product instead of a whole
    forward, and no ``[n, S, V]`` logits are held. The cache is used only where, on every piece, the model's
    logits are exactly its output embedding's output (no logit scale or soft cap after it, every position kept);
    otherwise each call runs the dense forward, as without the cache.
    """

    def __init__(self, model, pieces, batch_size: int):
        from fair_moe.metrics import execution_device

        self.model, self.pieces, self.device = model, pieces, execution_device(model)
        self.head = model.get_output_embeddings()
        self.hidden = self._capture(batch_size) if self.head is not None else None

    @property
    def cached(self) -> bool:
        return self.hidden is not None

    def _capture(self, batch_size: int):
        """``hidden [n, S, H]`` from one pass, or None when the logits are not the head's output."""
        seen: list = []
        handle = self.head.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out)))
        parts = []
        try:
            with torch.no_grad():
                for i in range(0, len(self.pieces), batch_size):
                    seen.clear()
                    logits = self.model(input_ids=self.pieces[i : i + batch_size].to(self.device),
                                        use_cache=False).logits
                    if len(seen) != 1 or not torch.equal(seen[0][1], logits):
                        return None
                    parts.append(seen[0][0])
        finally:
            handle.remove()
        return torch.cat(parts)

    def __call__(self, index) -> torch.Tensor:
        """Teacher logits ``[len(index), S, V]`` of the pieces ``index``."""
        with torch.no_grad():
            if self.hidden is not None:
                return self.head(self.hidden[index])
            return self.model(input_ids=self.pieces[index].to(self.device), use_cache=False).logits


def _train_kl(model, rows: RouterRows, train, held, batch_size, seed, options) -> dict:
    from tqdm.auto import tqdm

    from fair_moe.units.experts.routing import masked_experts

    teachers = {"train": TeacherLogits(model, train, batch_size), "held": TeacherLogits(model, held, batch_size)}

    def loss_on(part: str, index, grad: bool) -> torch.Tensor:
        teacher = teachers[part]
        ids = teacher.pieces[index].to(teacher.device)
        with torch.set_grad_enabled(grad), masked_experts(model, rows.kept):
            student = torch.func.functional_call(model, rows.substitutions(model), (),
                                                 {"input_ids": ids, "use_cache": False}, strict=False).logits
        return _kl(student, teacher(index))

    def held_loss() -> float:
        with torch.no_grad():
            spans = torch.arange(len(held)).split(batch_size)
            return sum(loss_on("held", span, False).item() * len(span) for span in spans) / len(held)

    batches = _shuffled(len(train), max(1, options["pieces"]), torch.Generator().manual_seed(seed))

    def backward_on(index) -> float:
        """Gradients of the mean KL over the step's pieces, ``batch_size`` pieces per pass; returns the loss."""
        total = 0.0
        for chunk in index.split(batch_size):
            loss = loss_on("train", chunk, True) * (len(chunk) / len(index))
            loss.backward()
            total += loss.item()
        return total

    with _frozen(model):
        history = _optimise(rows, rows.optimiser(options["lr"]), batches, backward_on, held_loss, options, tqdm)
    return {**history, "teacher_cached": teachers["train"].cached}


def _train_local(model, rows: RouterRows, train, held, batch_size, seed, options) -> dict:
    """One layer at a time on captured (input, dense routed output) pairs; losses summed over layers."""
    from tqdm.auto import tqdm

    captured_train = _capture(model, rows, train, batch_size, options["max_tokens"], seed)
    captured_held = _capture(model, rows, held, batch_size, options["max_tokens"], seed + 1)
    totals: dict = {}
    with _frozen(model):
        for layer in rows.layers:
            train_part, held_part = captured_train[layer.index], captured_held[layer.index]
            removed = torch.ones(layer.num_experts, dtype=torch.bool)
            removed[rows.kept[layer.index]] = False
            tokens = len(train_part.x)
            batches = _shuffled(tokens, max(256, min(2048, tokens)), torch.Generator().manual_seed(seed + layer.index))

            def backward_on(batch, layer=layer, removed=removed, part=train_part) -> float:
                loss = _layer_error(rows, layer, removed, part, batch)
                loss.backward()
                return loss.item()

            def held_loss(layer=layer, removed=removed, part=held_part):
                with torch.no_grad():
                    return _layer_error(rows, layer, removed, part, torch.arange(len(part.x))).item()

            history = _optimise(rows, rows.optimiser(options["lr"], [layer]), batches, backward_on, held_loss,
                                options, tqdm, f"router KD, layer {layer.index}")
            for key, value in history.items():
                totals[key] = totals.get(key, 0) + value
    return totals


def _layer_error(rows: RouterRows, layer, removed, captured, batch) -> torch.Tensor:
    """Mean squared error of the layer's routed output under the trained rows against the dense output, on the
    captured rows ``batch`` (indices)."""
    from fair_moe.units.experts.routing import route, run_experts

    x, y = captured.x[batch], captured.y[batch]
    router_in = x if captured.router_x is None else captured.router_x[batch]
    if captured.router_dims == 3:
        router_in = router_in.unsqueeze(0)
    subs = {name: rows.full(layer, name) for name in rows.params[layer.index]}
    weights, ids = route(layer, (router_in, *captured.extra_args), captured.extra_kwargs, removed, parameters=subs)
    y_hat = run_experts(layer)(x, ids, weights.to(x.dtype))
    return (y_hat.float() - y.float()).pow(2).mean()


class Captured:
    """One layer's captured tokens: experts input ``x [N, H]``, dense routed output ``y [N, H]``, the router's own
    input rows when they differ from ``x`` (``router_x``, with the rank it was called with), and the router's other
    arguments (constant tensors such as a selection bias the block passes in)."""

    def __init__(self):
        self.xs, self.ys, self.router_xs = [], [], []
        self.router_dims, self.extra_args, self.extra_kwargs = 2, (), {}
        self.x = self.y = self.router_x = None

    def add(self, call) -> None:
        hidden = call.hidden_states.detach()
        router_in = call.router.args[0].detach() if call.router.args else hidden
        self.router_dims = router_in.dim()
        self.extra_args, self.extra_kwargs = tuple(call.router.args[1:]), dict(call.router.kwargs)
        router_rows = router_in.reshape(-1, router_in.shape[-1])
        self.xs.append(hidden.float().cpu())
        self.ys.append(call.unmasked_output().detach().float().cpu())
        self.router_xs.append(None if torch.equal(router_rows, hidden) else router_rows.float().cpu())

    def finish(self, max_tokens: int, gen, device) -> Captured:
        x, y = torch.cat(self.xs), torch.cat(self.ys)
        router_x = None if all(r is None for r in self.router_xs) else \
            torch.cat([r if r is not None else h for r, h in zip(self.router_xs, self.xs, strict=True)])
        pick = torch.randperm(len(x), generator=gen)[:max_tokens] if len(x) > max_tokens else None
        if pick is not None:
            x, y = x[pick], y[pick]
            router_x = router_x[pick] if router_x is not None else None
        self.x, self.y = x.to(device), y.to(device)
        self.router_x = router_x.to(device) if router_x is not None else None
        self.xs = self.ys = self.router_xs = []
        return self


def _capture(model, rows: RouterRows, windows, batch_size, max_tokens, seed) -> dict:
    """Per trained layer, its ``Captured`` tokens from one pass of the pruned model."""
    from fair_moe.strategies.compensations.base import forward_all
    from fair_moe.units.experts.routing import masked_experts

    store: dict = {layer.index: Captured() for layer in rows.layers}

    def tap(call):
        if call.layer.index in store:
            store[call.layer.index].add(call)
        return None

    with torch.no_grad(), masked_experts(model, rows.kept, tap):
        forward_all(model, windows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    return {layer.index: store[layer.index].finish(max_tokens, gen, next(layer.experts.parameters()).device)
            for layer in rows.layers}


def _shuffled(count: int, size: int, gen):
    """Endless index batches ``[≤ size]`` over ``range(count)``: each pass a new permutation drawn from ``gen``."""
    while True:
        yield from torch.randperm(count, generator=gen).split(size)


def _optimise(rows: RouterRows, optimiser, batches, backward_on, held_loss, options, tqdm, desc="router KD") -> dict:
    """Adam steps with held-out early stopping; the best rows are left in ``rows``. Returns the loss history.
    ``backward_on(batch)`` leaves the batch's loss gradients in the rows and returns the loss."""
    initial = best = held_loss()
    best_rows, best_step, stale, step, train_loss = rows.snapshot(), 0, 0, 0, float("nan")
    bar = tqdm(range(options["steps"]), desc=desc, unit="step", leave=False, disable=not options["progress"])
    for step in bar:
        optimiser.zero_grad(set_to_none=True)
        train_loss = backward_on(next(batches))  # the step's gradients are in the rows' .grad
        optimiser.step()
        if (step + 1) % options["eval_every"] == 0 or step + 1 == options["steps"]:
            current = held_loss()
            bar.set_postfix(held_out=f"{current:.4g}")
            if current < best:
                best, best_rows, best_step, stale = current, rows.snapshot(), step + 1, 0
            else:
                stale += 1
                if stale >= options["patience"]:
                    break
    rows.restore(best_rows)
    return {"steps": (step + 1) if options["steps"] else 0, "best_step": best_step, "held_out_initial": initial,
            "held_out_final": best, "train_loss_last": train_loss}


def _targets(model, record):
    """(router tensor, kept ids, learned rows) for every trained tensor of the record."""
    from fair_moe.adapters import get_adapter

    layers = {layer.index: layer for layer in get_adapter(model.config).moe_layers(model)}
    for index, entry in record.per_layer.items():
        router = layers[int(index)].router
        ids = torch.tensor(entry["kept"])
        for name, value in entry.items():
            if name != "kept":
                yield router.get_parameter(name), ids, value


@contextlib.contextmanager
def _substituted(model, record):
    """Inside the block the routers carry the learned rows; their own values come back on exit."""
    saved = [(tensor, tensor.detach().clone()) for tensor, _, _ in _targets(model, record)]
    try:
        with torch.no_grad():
            for tensor, ids, value in _targets(model, record):
                tensor[ids] = value.to(tensor.device, tensor.dtype)
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
