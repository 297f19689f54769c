"""Adam-mini: use fewer learning rates to gain more (Zhang et al. 2024, arXiv 2406.16793).

Adam with one second-moment scalar per *block* of parameters instead of one per element::

    p   *= 1 - lr * weight_decay
    m    = beta1 * m + (1 - beta1) * g                          (per element)
    v_B  = beta2 * v_B + (1 - beta2) * mean_{i in B} g_i^2     (per block B)
    p   -= lr / (1 - beta1^t) * m / (sqrt(v_B) / sqrt(1 - beta2^t) + eps)

The blocks follow the Hessian's block structure, from the parameter's role (the group hint ``role``):

- ``bias``: one block per element (plain AdamW);
- ``q``, ``k``: one block per attention head (``n_heads`` heads for Q; ``n_kv_heads`` for K under GQA,
  else ``n_heads``: the number of heads the tensor holds);
- ``qkv`` (fused, with ``split_qkv``): per head for its Q and K parts, per output neuron for its V part
  (the authors' name rules give all of GPT-2's ``c_attn`` a single block);
- ``embedding``, ``head``: one block per token (row); ``v``, ``attn_out``, ``mlp``: one per output neuron;
- anything else (``norm``, ``pos_embedding``, ``matrix``, ``vector``): one block for the whole tensor.

Rows are taken in the mathematical (out, in) orientation: a group with ``in_out=True`` (GPT-2 ``Conv1D``)
has its blocks along the stored tensor's columns. State: ``m`` per element, ``v`` per block, so about half
of AdamW's.

On FSDP2/HSDP shards (``DTensor`` parameters cut along dim 0, see :mod:`eopt.distributed`) ``m`` and the
per-element ``v`` of biases are sharded like the parameter and updated on the local rows. A block can span
shards: a stored column of an ``in_out`` weight spans all of them, a head of ``q``/``k`` rows may straddle a
shard boundary, a whole-tensor block is cut by every one. So each rank sums ``g^2`` of its rows into the
blocks they belong to (zeros for the blocks it holds nothing of), the partial sums of all of a group's
tensors go into one flat buffer, and one all-reduce over the shard groups makes them the global
``sum_{i in B} g_i^2`` on every rank. The block ``v`` is then the full block vector, a plain tensor updated
identically on every rank (so ``torch.distributed.checkpoint`` may keep any rank's copy, and it loads at any
world size), and each rank scales the rows or columns it holds by their blocks' values.

Standalone use mirrors the authors' ``adam_mini.Adam_mini`` (1.1.1): ``AdamMini(model.named_parameters(),
dim=..., n_heads=..., n_kv_heads=...)`` assigns roles by their name substrings and reproduces their update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from eopt.base import Optimizer, ParamGroups, check, params_with_grad, use_foreach
from eopt.distributed import all_reduce_sum_, is_sharded, local, local_rows


class Blocks(NamedTuple):
    """Segments ``(start row, stop row, number of blocks)`` over the rows of a tensor's (out, in) view; a block
    is a run of ``(stop - start) / blocks`` consecutive rows. ``in_out``: the tensor is stored (in, out)."""

    segments: tuple[tuple[int, int, int], ...]
    in_out: bool


Layout = Blocks | None  # None: one block per element (AdamW)

PER_ROW_ROLES = ("embedding", "head", "v", "attn_out", "mlp")

# The authors' name rules (adam_mini 1.1.1), matched as substrings of the lower-cased parameter name.
_AUTHOR_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bias", ("bias",)),
    ("qk", ("k_proj", "q_proj", "wq", "wk", "query", "key")),
    ("embedding", ("embed", "embd", "wte")),
    ("head", ("lm_head", "output", "final_layer")),
    ("v", ("v_proj", "wv", "value")),
    ("attn_out", ("o_proj", "wo", "attn.proj")),
    ("mlp", ("feed_forward", "linear", "mlp")),
)
_AUTHOR_NO_DECAY = ("norm", "ln", "bias")


def _rows(p: Tensor, in_out: bool) -> int:
    """Rows (output features) of ``p`` in the (out, in) orientation; a vector is one row."""
    if p.ndim < 2:
        return 1
    return p.shape[1] if in_out else p.shape[0]


def _heads(group: dict, key: str) -> int:
    heads = group.get(key) or group.get("n_heads")
    check("n_heads", isinstance(heads, int) and heads > 0, f"role {group['role']!r} needs n_heads, got {heads!r}")
    return heads


def block_layout(group: dict, p: Tensor) -> Layout:
    """The blocks of ``p`` in a group with hints ``role``, ``n_heads``, ``n_kv_heads``, ``split_qkv``, ``in_out``."""
    role = group.get("role") or ("matrix" if p.ndim >= 2 else "vector")
    in_out = bool(group.get("in_out")) and p.ndim == 2
    rows = _rows(p, in_out)
    if role == "bias":
        return None
    if role in PER_ROW_ROLES:
        return Blocks(((0, rows, rows),), in_out)
    if role in ("q", "k"):
        heads = _heads(group, "n_heads" if role == "q" else "n_kv_heads")
        check("n_heads", rows % heads == 0, f"{heads} heads do not divide the {rows} rows of a {role!r} weight")
        return Blocks(((0, rows, heads),), in_out)
    if role == "qkv":
        split = group.get("split_qkv")
        check(
            "split_qkv",
            split is not None and len(split) == 3 and sum(split) == rows,
            f"a 'qkv' weight with {rows} rows needs split_qkv=(q, k, v) summing to {rows}, got {split!r}",
        )
        q, k, v = split
        q_heads, k_heads = _heads(group, "n_heads"), _heads(group, "n_kv_heads")
        check(
            "n_heads",
            q % q_heads == 0 and k % k_heads == 0,
            f"heads ({q_heads}, {k_heads}) do not divide the Q and K sizes ({q}, {k}) of a fused QKV weight",
        )
        return Blocks(((0, q, q_heads), (q, q + k, k_heads), (q + k, rows, v)), in_out)
    return Blocks(((0, rows, 1),), in_out)


def n_blocks(layout: Layout, p: Tensor) -> int:
    """Second-moment values ``p`` keeps under ``layout``."""
    return p.numel() if layout is None else sum(blocks for _, _, blocks in layout.segments)


class LocalBlocks(NamedTuple):
    """Where the squared gradients of a sharded parameter's local part go among its blocks.

    ``ids[i]`` is the block of the ``i``-th local row (dim 0 of the stored tensor; every element of a vector
    is in block 0) or, stored (in, out), of the ``i``-th stored column (each rank holds all of them);
    ``counts`` is the global number of elements of every block, in block order."""

    ids: Tensor
    counts: Tensor
    in_out: bool


def local_blocks(layout: Blocks, p: Tensor) -> LocalBlocks:
    """The :class:`LocalBlocks` of ``p``'s shard on this rank (from the global shape: no communication)."""
    if layout.in_out:
        index = torch.arange(p.shape[1], device=p.device)
    elif p.ndim >= 2:
        index = torch.arange(*local_rows(p), device=p.device)
    else:
        index = torch.zeros(local(p).shape[0], dtype=torch.long, device=p.device)
    ids = torch.empty_like(index)
    columns = p.numel() // _rows(p, layout.in_out)
    counts: list[int] = []
    for start, stop, blocks in layout.segments:
        size = (stop - start) // blocks
        inside = (index >= start) & (index < stop)
        ids[inside] = (index[inside] - start).div_(size, rounding_mode="floor").add_(len(counts))
        counts += [size * columns] * blocks
    return LocalBlocks(ids, torch.tensor(counts, dtype=torch.float32, device=p.device), layout.in_out)


def _add_local_sq_sums_(sums: Tensor, g: Tensor, blocks: LocalBlocks) -> None:
    """``sums[B] += sum of g_i^2`` over the elements ``i`` of block ``B`` in ``g`` (a local gradient shard)."""
    if blocks.in_out:
        sq = torch.linalg.vecdot(g, g, dim=0)  # per stored column: the local rows' share of each block
    else:
        rows = g.flatten(1) if g.ndim > 1 else g.unsqueeze(1)
        sq = torch.linalg.vecdot(rows, rows, dim=1)
    sums.index_add_(0, blocks.ids, sq)


def _apply_local_scale(p: Tensor, m: Tensor, scale: Tensor, blocks: LocalBlocks) -> None:
    """``p += m * scale[block]`` on a local shard, with the full per-block ``scale``."""
    s = scale[blocks.ids]
    p.addcmul_(m, s.view(1, -1) if blocks.in_out else s.view(-1, *(1,) * (p.ndim - 1)))


def _block_view(t: Tensor, start: int, stop: int, blocks: int, in_out: bool) -> Tensor:
    """Rows ``start:stop`` of ``t`` with the blocks on dim 0, or on dim 1 when stored (in, out)."""
    if in_out:
        if stop - start == t.shape[1]:
            return t.view(t.shape[0], blocks, -1)  # (in, blocks, rows per block)
        return t[:, start:stop].unflatten(1, (blocks, -1))
    if stop - start == (t.shape[0] if t.ndim >= 2 else 1):
        return t.view(blocks, -1)  # (blocks, rows per block * in): a whole tensor needs no slicing
    return t.view(t.shape[0], -1)[start:stop].reshape(blocks, -1)


def _segment_norms(g: Tensor, start: int, stop: int, blocks: int, in_out: bool) -> Tensor:
    """sqrt(sum of g^2) of each block of one segment, without materializing g^2."""
    x = _block_view(g, start, stop, blocks, in_out)
    if in_out:  # a norm over dim 0 is slow on CPU: a dot product over it, then the small sum
        return torch.linalg.vecdot(x, x, dim=0).sum(dim=-1).sqrt_()
    return torch.linalg.vector_norm(x, dim=1)


def block_mean_sq(g: Tensor, layout: Layout) -> Tensor:
    """``mean(g^2)`` of every block (flat, in block order), or ``g^2`` for a one-element-per-block layout."""
    if layout is None:
        return g * g
    columns = g.numel() // _rows(g, layout.in_out)
    means = [
        _segment_norms(g, start, stop, blocks, layout.in_out).square_().div_((stop - start) * columns // blocks)
        for start, stop, blocks in layout.segments
    ]
    return means[0] if len(means) == 1 else torch.cat(means)


def apply_block_scale(p: Tensor, m: Tensor, scale: Tensor, layout: Layout) -> None:
    """``p += m * scale`` with one ``scale`` value per block broadcast over the block's elements."""
    if layout is None:
        p.addcmul_(m, scale)
        return
    offset = 0
    for start, stop, blocks in layout.segments:
        s = scale[offset : offset + blocks] if len(layout.segments) > 1 else scale
        offset += blocks
        s = s.view(1, blocks, 1) if layout.in_out else s.view(blocks, 1)
        _block_view(p, start, stop, blocks, layout.in_out).addcmul_(
            _block_view(m, start, stop, blocks, layout.in_out), s
        )


def _step_scales(
    steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Advance every step counter; per tensor ``(-lr sqrt(1 - beta2^t) / (1 - beta1^t), eps sqrt(1 - beta2^t))``.

    With them the step size of a block is ``numerator / (sqrt(v) + eps')`` (= ``-lr / (1 - beta1^t) /
    (sqrt(v) / sqrt(1 - beta2^t) + eps)``): three small ops per tensor, the bias corrections of all at once.
    """
    torch._foreach_add_(steps, 1)
    t = torch.stack(steps)
    bias_correction2_sqrt = torch.pow(beta2, t).neg_().add_(1).sqrt_()
    numerators = bias_correction2_sqrt.mul(lr).div_(torch.pow(beta1, t).sub_(1))
    return numerators.unbind(), bias_correction2_sqrt.mul_(eps).unbind()


def update_block_second_moment(v: Tensor, g: Tensor, layout: Layout, beta2: float) -> None:
    """``v = beta2 * v + (1 - beta2) * mean_B(g^2)`` for every block ``B`` of ``layout``."""
    if layout is not None and len(layout.segments) == 1:
        start, stop, blocks = layout.segments[0]
        norms = _segment_norms(g, start, stop, blocks, layout.in_out)
        v.mul_(beta2).addcmul_(norms, norms, value=(1 - beta2) * blocks / g.numel())
    else:
        v.lerp_(block_mean_sq(g, layout), 1 - beta2)


def _single_tensor_adam_mini(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    layouts: list[Layout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Adam-mini step, tensor by tensor (the reference path; on CPU the fast one: a tensor stays in cache)."""
    numerators, epsilons = _step_scales(steps, lr, beta1, beta2, eps)
    for p, g, m, v, numerator, eps_t, layout in zip(
        params, grads, exp_avgs, exp_avg_sqs, numerators, epsilons, layouts, strict=True
    ):
        m.lerp_(g, 1 - beta1)
        update_block_second_moment(v, g, layout, beta2)
        scale = torch.div(numerator, v.sqrt().add_(eps_t))  # one value per block
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        apply_block_scale(p, m, scale, layout)


def _multi_tensor_adam_mini(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    layouts: list[Layout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The same step with ``torch._foreach_*`` kernels over the group (one launch per op: the GPU path)."""
    numerators, epsilons = _step_scales(steps, lr, beta1, beta2, eps)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    for v, g, layout in zip(exp_avg_sqs, grads, layouts, strict=True):
        update_block_second_moment(v, g, layout, beta2)
    scales = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(scales, epsilons)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, numerators)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for p, m, scale, layout in zip(params, exp_avgs, scales, layouts, strict=True):
        apply_block_scale(p, m, scale, layout)


def _sharded_adam_mini(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    blocks: list[LocalBlocks | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The same step on ``DTensor`` shards (``blocks[i]`` is None for a per-element layout): ``m`` on the local
    rows, the blocks' partial ``sum(g^2)`` of every tensor in one flat buffer and one all-reduce, then the block
    ``v`` (a full, plain vector, identical on every rank) and the scaling of the local rows."""
    numerators, epsilons = _step_scales(steps, lr, beta1, beta2, eps)
    ps, gs, ms = [local(p) for p in params], [local(g) for g in grads], [local(m) for m in exp_avgs]
    vs = [local(v) for v in exp_avg_sqs]
    blocked = [i for i, b in enumerate(blocks) if b is not None]
    sums = torch.zeros(sum(vs[i].numel() for i in blocked), dtype=vs[0].dtype, device=vs[0].device)
    partials = dict(zip(blocked, sums.split([vs[i].numel() for i in blocked]), strict=True))
    for i, (g, m, v) in enumerate(zip(gs, ms, vs, strict=True)):
        m.lerp_(g, 1 - beta1)
        if blocks[i] is None:
            update_block_second_moment(v, g, None, beta2)
        else:
            _add_local_sq_sums_(partials[i], g, blocks[i])
    if blocked:
        all_reduce_sum_(sums, params[blocked[0]])
        means = [partials[i] for i in blocked]
        torch._foreach_div_(means, [blocks[i].counts for i in blocked])
        torch._foreach_lerp_([vs[i] for i in blocked], means, 1 - beta2)
    scales = torch._foreach_sqrt(vs)
    torch._foreach_add_(scales, epsilons)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, numerators)
    if weight_decay != 0:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    for p, m, scale, b in zip(ps, ms, scales, blocks, strict=True):
        if b is None:
            apply_block_scale(p, m, scale, None)
        else:
            _apply_local_scale(p, m, scale, b)


def _author_groups(
    named_parameters: Iterable[tuple[str, Tensor]], weight_decay: float, dim: int | None, n_heads: int | None
) -> list[dict]:
    """Param groups with role hints from the authors' name rules (``adam_mini.Adam_mini`` 1.1.1)."""
    groups: dict[tuple, dict] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        lname = name.lower()
        rule = next((r for r, keys in _AUTHOR_RULES if any(k in lname for k in keys)), None)
        hint: dict = {"role": rule or ("matrix" if p.ndim >= 2 else "vector")}
        if rule == "qk":
            check(
                "dim",
                dim is not None and n_heads is not None,
                f"parameter {name!r} is a query/key projection: pass dim= and n_heads= (the model's)",
            )
            head_numel = dim * dim // n_heads
            check(
                "dim",
                p.numel() % head_numel == 0,
                f"{name!r} ({p.numel()} elements) is not a whole number of heads of dim*dim/n_heads={head_numel}",
            )
            # The authors cut the flat tensor into chunks of head_numel: under GQA, K has n_kv_heads of them.
            hint = {"role": "q", "n_heads": p.numel() // head_numel}
        decay = 0.0 if any(k in lname for k in _AUTHOR_NO_DECAY) else weight_decay
        key = (decay, *sorted(hint.items()))
        group = groups.setdefault(key, {"params": [], "param_names": [], "weight_decay": decay, **hint})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


class AdamMini(Optimizer):
    """Adam-mini (Zhang et al. 2024, arXiv 2406.16793): Adam with one second moment per parameter block.

    For each parameter with gradient ``g`` at step ``t`` and each of its blocks ``B`` (see :func:`block_layout`)::

        p   *= 1 - lr * weight_decay
        m    = beta1 * m + (1 - beta1) * g
        v_B  = beta2 * v_B + (1 - beta2) * mean_{i in B}(g_i^2)
        p   -= lr / (1 - beta1^t) * m / (sqrt(v_B) / sqrt(1 - beta2^t) + eps)

    Args:
        params: ``model.named_parameters()`` (standalone: roles from the authors' name rules, as in
            ``adam_mini.Adam_mini``, no decay on names containing norm/ln/bias), or param groups carrying the
            hints ``role``, ``n_heads``, ``n_kv_heads``, ``split_qkv``, ``in_out`` (what :func:`eopt.build`
            makes from the model's structure; groups with ``"algorithm": "adamw"`` use the backup AdamW).
            Plain tensors get one block per tensor.
        lr, betas, eps, weight_decay: as in AdamW (the authors reuse AdamW's values).
        dim, n_heads: model width and attention heads; standalone mode only (the authors' query/key blocks
            are ``dim * dim / n_heads`` elements).
        n_kv_heads: key/value heads under GQA; standalone mode only (validated as in the authors' code).
        foreach: use ``torch._foreach`` kernels (default: on CUDA only; on CPU the tensor-by-tensor path is
            faster because each tensor stays in cache across its ops).
    """

    algorithm = "adam_mini"

    def __init__(
        self,
        params: ParamGroups | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        dim: int | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        foreach: bool | None = None,
    ) -> None:
        if n_kv_heads is not None:
            check(
                "n_kv_heads",
                n_heads is not None and n_kv_heads > 0 and n_heads % n_kv_heads == 0,
                f"must divide n_heads={n_heads}, got {n_kv_heads}",
            )
        params = list(params)
        if params and isinstance(params[0], tuple):
            params = _author_groups(params, weight_decay, dim, n_heads)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "foreach": foreach}
        self._layouts: dict[Tensor, Layout] = {}  # per parameter, from its group's hints (fixed at add time)
        self._local_blocks: dict[Tensor, LocalBlocks] = {}  # sharded parameters with blocks: their shard's map
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        betas = group["betas"]
        check("betas", len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), f"each must be in [0, 1), got {betas}")
        check("eps", group["eps"] >= 0.0, f"must be >= 0, got {group['eps']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")
        for p in group["params"]:
            block_layout(group, p)

    def _init_state(self, group: dict) -> None:
        for p in group["params"]:
            layout = self._layouts[p] = block_layout(group, p)
            sharded = is_sharded(p)
            if sharded and layout is not None:
                self._local_blocks[p] = local_blocks(layout, p)
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if layout is None:
                    state["exp_avg_sq"] = torch.zeros_like(p) if sharded else p.new_zeros(p.shape)
                else:  # plain on shards too: the full block vector, the same on every rank
                    state["exp_avg_sq"] = torch.zeros(n_blocks(layout, p), dtype=p.dtype, device=p.device)

    def _step_group(self, group: dict) -> None:
        params = params_with_grad(group)
        if not params:
            return
        beta1, beta2 = group["betas"]
        hparams = {
            "lr": group["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        }
        plain = [p for p in params if not is_sharded(p)]
        if plain:
            states = [self.state[p] for p in plain]
            fn = _multi_tensor_adam_mini if use_foreach(group, plain) else _single_tensor_adam_mini
            fn(
                plain,
                [p.grad for p in plain],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                [self._layouts[p] for p in plain],
                **hparams,
            )
        if len(plain) < len(params):
            # Plain tensors are whole on every rank: only the shards' partial sums may be reduced.
            sharded = [p for p in params if is_sharded(p)]
            states = [self.state[p] for p in sharded]
            _sharded_adam_mini(
                sharded,
                [p.grad for p in sharded],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                [self._local_blocks.get(p) for p in sharded],
                **hparams,
            )
