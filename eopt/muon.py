"""Muon: momentum orthogonalized by Newton–Schulz, with NorMuon / AdaMuon second moments."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import torch

from eopt.base import Optimizer, ParamGroups, check, params_with_grad
from eopt.distributed import copy_local_, gather, is_sharded, local, local_rows
from eopt.newton_schulz import Coefficients, check_coefficients, newton_schulz
from eopt.owner import MATRIX_UPDATES, OwnerPlans, Plan

SCALES = ("shape_scaling", "spectral", "unit_rms_norm", "match_rms_adamw")
SECOND_MOMENTS = (None, "normuon", "adamuon")
NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def scale_factor(mode: str, out_dim: int, in_dim: int) -> float:
    """Muon's update scale for an (out, in) matrix.

    ``shape_scaling`` ``max(1, out/in)^0.5`` (Keller Jordan), ``spectral`` ``max(out, in)^0.5`` (NVIDIA's
    default), ``unit_rms_norm`` ``(out/in)^0.5`` (Scion), ``match_rms_adamw`` ``0.2 max(out, in)^0.5``
    (Moonlight, arXiv 2502.16982: the update RMS of AdamW, so AdamW's lr and weight decay carry over).
    """
    if mode == "shape_scaling":
        return max(1.0, out_dim / in_dim) ** 0.5
    if mode == "spectral":
        return max(out_dim, in_dim) ** 0.5
    if mode == "unit_rms_norm":
        return (out_dim / in_dim) ** 0.5
    if mode == "match_rms_adamw":
        return 0.2 * max(out_dim, in_dim) ** 0.5
    raise ValueError(f"invalid scale: must be one of {', '.join(SCALES)}, got {mode!r}")


def resolve_ns_dtype(ns_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The Newton–Schulz compute dtype: ``None`` is float32 on CPU (bf16 matmul is ~300x slower there), bf16 else."""
    if ns_dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return NS_DTYPES[ns_dtype] if isinstance(ns_dtype, str) else ns_dtype


def piece_dims(shape: torch.Size | tuple[int, ...], group: dict) -> list[tuple[int, int]]:
    """The mathematical ``(out, in)`` of every matrix piece of a parameter of (global) ``shape``, in order.

    The parameter is viewed as ``(shape[0], prod(shape[1:]))``; ``split_qkv`` cuts its output dim (rows, or
    columns when the group stores (in, out)). Computed from the shape alone, so a DTensor parameter needs no
    communication to size its state.
    """
    rows, cols = shape[0], math.prod(shape[1:])
    in_out = bool(group.get("in_out"))
    sizes = list(group["split_qkv"]) if group.get("split_qkv") else [cols if in_out else rows]
    return [(n, rows) if in_out else (n, cols) for n in sizes]


def matrix_pieces(t: torch.Tensor, group: dict) -> list[tuple[torch.Tensor, int, int]]:
    """Views of ``t`` (a param-shaped plain tensor) as the matrices Muon orthogonalizes, in storage orientation.

    The param is flattened to ``(shape[0], -1)`` and, when the group has ``split_qkv``, split into Q, K, V
    along the output dim (rows, or columns when the group says it is stored (in, out)). Orthogonalization
    commutes with transposition (``NS(M^T) = NS(M)^T``), so pieces are never transposed; only the scale and
    NorMuon's axis need the mathematical (out, in) shape (:func:`piece_dims`). Returns ``(view, out, in)``
    triples; writing into a view writes into ``t``.
    """
    mat = t.reshape(t.shape[0], -1) if t.ndim != 2 else t
    out_dim = 1 if group.get("in_out") else 0
    parts = torch.split(mat, list(group["split_qkv"]), dim=out_dim) if group.get("split_qkv") else (mat,)
    return [(part, o, i) for part, (o, i) in zip(parts, piece_dims(t.shape, group), strict=True)]


def orthogonalize(group: dict, X: torch.Tensor) -> torch.Tensor:
    """Newton–Schulz on a stack ``X`` (k, rows, cols) with the group's steps, coefficients, dtype and method."""
    dtype = resolve_ns_dtype(group["ns_dtype"], X.device)
    return newton_schulz(X, group["ns_steps"], group["coefficients"], dtype=dtype, method=group["ns_method"])


def step_size(group: dict, out_dim: int, in_dim: int) -> float:
    """The signed multiplier of an (out, in) piece's orthogonalized update: ``-lr * extra * scale(out, in)``."""
    return -group["lr"] * group["extra_scale_factor"] * scale_factor(group["scale"], out_dim, in_dim)


def add_scaled_(group: dict, params: list, weights: list, rows: list) -> None:
    """``weights[j] += step_size(piece) * rows[j]`` for every matrix piece of ``params[j]`` in the rows this rank
    holds (``weights[j]`` and ``rows[j]`` are its local rows): one foreach add per step size, each element in one
    rounding, as one process adds its update. ``split_qkv`` pieces are columns of an ``in_out`` weight, else
    row ranges, which a shard's rows may cut."""
    by_alpha: dict[float, tuple[list, list]] = defaultdict(lambda: ([], []))
    for p, w, d in zip(params, weights, rows, strict=True):
        start, stop = local_rows(p)
        cols = math.prod(p.shape[1:])
        w2, d2 = w.view(w.shape[0], cols), d.reshape(d.shape[0], cols)  # a view: the add must reach the weights
        dims = piece_dims(p.shape, group)
        if not group.get("split_qkv"):
            views = [(w2, d2)]
        elif group.get("in_out"):
            sizes = list(group["split_qkv"])
            views = list(zip(w2.split(sizes, 1), d2.split(sizes, 1), strict=True))
        else:
            views, offset = [], 0
            for size in group["split_qkv"]:
                lo, hi = max(offset, start), min(offset + size, stop)
                views.append((w2[lo - start : max(lo, hi) - start], d2[lo - start : max(lo, hi) - start]))
                offset += size
        for (wv, dv), (o, i) in zip(views, dims, strict=True):
            if wv.numel():
                ws, ds = by_alpha[step_size(group, o, i)]
                ws.append(wv)
                ds.append(dv)
    for alpha, (ws, ds) in by_alpha.items():
        torch._foreach_add_(ws, ds, alpha=alpha)


def newton_schulz_flops(group: dict, shape: torch.Size | tuple[int, ...]) -> float:
    """FLOPs of one Newton–Schulz orthogonalization of every piece of a parameter of ``shape``: per step and
    piece ``4 m^2 n + 2 m^3`` (``X X^T``, its square, the product with ``X``) for an m x n piece, m <= n."""
    flops = 0.0
    for o, i in piece_dims(shape, group):
        m, n = min(o, i), max(o, i)
        flops += group["ns_steps"] * (4 * m * m * n + 2 * m**3)
    return flops


def normuon_axis(out_dim: int, in_dim: int, in_out: bool) -> int:
    """The storage axis NorMuon averages over: the shorter math dim (``in`` for a square matrix), as NVIDIA's."""
    math_axis = -1 if out_dim >= in_dim else -2
    return -3 - math_axis if in_out else math_axis


class Muon(OwnerPlans, Optimizer):
    """Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) with NVIDIA's options.

    For each matrix ``W`` (out x in) with gradient ``g``, momentum ``b`` and step size ``lr``::

        m = b m + (1 - b) g
        u = (1 - b) g + b m              if nesterov else m
        O = NS(u)                        (Newton–Schulz, `eopt.newton_schulz`)
        W = W (1 - lr wd)                (decoupled weight decay, un-scaled lr)
        W = W - lr * extra_scale_factor * scale(out, in) * O

    ``second_moment`` adds an adaptive step between ``NS`` and the scale (NVIDIA Emerging-Optimizers'
    ``AdaptiveMuon``; the scale factor is applied once, after it):

    - ``"normuon"`` (Li et al., arXiv 2510.05491): one second moment per row or column,
      ``v = beta2 v + (1 - beta2) mean(O^2)`` over the shorter dim (one value per index of the longer dim:
      for a tall/square matrix per row, for a wide one per column, as NVIDIA's code), ``O' = O / (sqrt(v) +
      eps)``, rescaled to ``||O||_F``. (NVIDIA divides by ``sqrt(max(v, eps))``; the two agree to ~1e-7.)
    - ``"adamuon"`` (Si et al., arXiv 2507.11005): elementwise ``v = beta2 v + (1 - beta2) O^2``,
      ``O' = O / (sqrt(v / (1 - beta2^t)) + eps)``, rescaled to ``||O'||_F = sqrt(min(out, in))`` (an exact
      orthogonal matrix's norm); the paper's update ``lr 0.2 sqrt(max(out, in)) O'`` is
      ``scale="match_rms_adamw"``. (NVIDIA 0.3.0's ``adamuon`` has neither the bias correction nor the
      rescaling; this follows the paper.)

    Parameters with more than two dims are flattened to ``(shape[0], -1)``. Per-group hints: ``in_out``
    (stored (in, out), like GPT-2's ``Conv1D``) and ``split_qkv`` (sizes of Q, K, V along the output dim:
    each part is orthogonalized and scaled as its own matrix, as Megatron does). Param groups with
    ``"algorithm": "adamw"`` get the backup AdamW.

    The step batches: within a group, every matrix piece of the same stored shape joins one stack and one
    batched Newton–Schulz (tall stacks iterate ``X^T X``, so nothing is transposed in memory); momentum,
    weight decay and the update are foreach ops over the whole group, the update one ``foreach_add_`` per
    stack straight into the weights.
    ``foreach=False`` selects the single-tensor reference path (one matrix at a time, same arithmetic).

    Under DDP, FSDP2 and HSDP, ``matrix_update="owner"`` (the default) computes each matrix's update once: a
    :class:`eopt.owner.Plan` per group gives every matrix an owner rank (balanced by Newton–Schulz FLOPs over
    all ranks); momentum, Nesterov and weight decay run on each rank's rows, ``u`` goes to its owner
    (``all_to_all_single`` of the rows under FSDP2/HSDP; already whole under DDP), the owner runs the pieces,
    stacks, Newton–Schulz and second moment exactly as one process would on its matrices, and each rank gets
    back its rows of the orthogonalized pieces and adds them with their step sizes (:func:`add_scaled_`,
    bitwise the one-process update). NorMuon's and AdaMuon's ``moment2`` live on the owner
    only; under DDP, where every rank holds whole matrices, so does the momentum (the owner alone advances it,
    and the other ranks keep an empty state entry). :meth:`plan` describes the assignment.

    With ``matrix_update="replicated"`` (the reference) on FSDP2/HSDP shards, momentum, Nesterov
    and weight decay run on each rank's rows (``momentum_buffer`` is sharded like its parameter); ``u`` is
    all-gathered to the full matrix (:func:`eopt.distributed.gather`), and every rank runs the same pieces,
    stacks (by global shape, in the one-process order), Newton–Schulz and second moment on the full
    matrices into full-shape copies of its rows and keeps those rows (:func:`eopt.distributed.copy_local_`), so
    each weight gets the one-process arithmetic bitwise. NorMuon's and AdaMuon's
    ``moment2`` are plain full-shape tensors, identical on every rank.

    Args:
        params: parameters or param groups.
        lr: learning rate (0.02, Keller Jordan's Muon).
        momentum: momentum ``b`` (0.95).
        nesterov: Nesterov momentum (on, as Keller's).
        weight_decay: decoupled weight decay, multiplied by ``lr`` (0).
        ns_steps: Newton–Schulz steps (5).
        coefficients: ``simple`` | ``quintic`` | ``polar_express`` | ``cans`` | ``aol`` | a list of (a, b, c).
        scale: ``shape_scaling`` | ``spectral`` | ``unit_rms_norm`` | ``match_rms_adamw``.
        extra_scale_factor: multiplies the scale (e.g. 0.2 with ``spectral`` matches AdamW's update RMS).
        second_moment: ``None`` | ``"normuon"`` | ``"adamuon"``.
        beta2: second-moment decay (0.95, NVIDIA's AdaptiveMuon).
        eps: second-moment epsilon (1e-8).
        ns_dtype: Newton–Schulz dtype, ``None`` (float32 on CPU, bfloat16 on CUDA), ``"float32"``,
            ``"bfloat16"`` or a ``torch.dtype``.
        ns_method: ``"gram"`` (default: for matrices at least twice as long as wide in fp32/fp64, the same
            polynomial evaluated on the Gram matrix with a restart every 3 steps, ~0.8x the NS FLOPs of an
            MLP matrix, fp32 rounding error within 6x of the direct iteration's and below 6e-5; elsewhere,
            and in bf16/fp16, the direct iteration; see :func:`eopt.newton_schulz.gram_newton_schulz`) or
            ``"direct"`` (the iteration as written everywhere).
        foreach: batched path (``None`` or ``True``) or the single-tensor reference path (``False``).
        matrix_update: ``"owner"`` (each matrix's Newton–Schulz on one rank) or ``"replicated"`` (on every
            rank, the reference); the same in one process.
    """

    algorithm = "muon"

    def __init__(
        self,
        params: ParamGroups,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        coefficients: Coefficients = "simple",
        scale: str = "shape_scaling",
        extra_scale_factor: float = 1.0,
        second_moment: str | None = None,
        beta2: float = 0.95,
        eps: float = 1e-8,
        ns_dtype: str | torch.dtype | None = None,
        ns_method: str = "gram",
        foreach: bool | None = None,
        matrix_update: str = "owner",
    ) -> None:
        self._init_plans()
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "coefficients": coefficients,
            "scale": scale,
            "extra_scale_factor": extra_scale_factor,
            "second_moment": second_moment,
            "beta2": beta2,
            "eps": eps,
            "ns_dtype": ns_dtype,
            "ns_method": ns_method,
            "foreach": foreach,
            "matrix_update": matrix_update,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict) -> None:
        check("lr", group["lr"] >= 0.0, f"must be >= 0, got {group['lr']}")
        check("momentum", 0.0 <= group["momentum"] < 1.0, f"must be in [0, 1), got {group['momentum']}")
        check("weight_decay", group["weight_decay"] >= 0.0, f"must be >= 0, got {group['weight_decay']}")
        steps = group["ns_steps"]
        check("ns_steps", isinstance(steps, int) and steps >= 1, f"must be an int >= 1, got {steps!r}")
        problem = check_coefficients(group["coefficients"])
        check("coefficients", problem is None, problem or "")
        check("scale", group["scale"] in SCALES, f"must be one of {', '.join(SCALES)}, got {group['scale']!r}")
        check(
            "extra_scale_factor", group["extra_scale_factor"] > 0.0, f"must be > 0, got {group['extra_scale_factor']}"
        )
        check(
            "second_moment",
            group["second_moment"] in SECOND_MOMENTS,
            f"must be null, 'normuon' or 'adamuon', got {group['second_moment']!r}",
        )
        check("beta2", 0.0 <= group["beta2"] < 1.0, f"must be in [0, 1), got {group['beta2']}")
        check("eps", group["eps"] > 0.0, f"must be > 0, got {group['eps']}")
        method = group["ns_method"]
        check("ns_method", method in ("direct", "gram"), f"must be 'direct' or 'gram', got {method!r}")
        dt = group["ns_dtype"]
        check(
            "ns_dtype",
            dt is None or dt in NS_DTYPES or dt in NS_DTYPES.values(),
            f"must be null or one of {', '.join(NS_DTYPES)}, got {dt!r}",
        )
        mode = group["matrix_update"]
        check("matrix_update", mode in MATRIX_UPDATES, f"must be one of {', '.join(MATRIX_UPDATES)}, got {mode!r}")
        split = group.get("split_qkv")
        for p in group["params"]:
            check("params", p.ndim >= 2, f"Muon takes matrices (2-D and up); route {tuple(p.shape)} to 'adamw'")
            if split:
                out_dim = p.shape[-1] if group.get("in_out") else p.shape[0]
                check("split_qkv", sum(split) == out_dim, f"sizes {tuple(split)} must sum to the output dim {out_dim}")

    def _moment2_numel(self, group: dict, shape: torch.Size) -> int:
        """Elements of a parameter's ``moment2``: AdaMuon's is param-shaped; NorMuon's holds one value per index of
        each piece's longer dim (rows if square), the pieces' vectors concatenated."""
        if group["second_moment"] == "adamuon":
            return math.prod(shape)
        if group["second_moment"] == "normuon":
            return sum(max(o, i) for o, i in piece_dims(shape, group))
        return 0

    def _owner_state_numel(self, group: dict, shape: torch.Size, whole: bool) -> int:
        """Elements of a parameter's state that only its owner holds: the second moment, and under DDP
        (``whole`` matrices on every rank) the momentum too."""
        return self._moment2_numel(group, shape) + (math.prod(shape) if whole else 0)

    def _init_state(self, group: dict) -> None:
        params = group["params"]
        # Under DDP (whole matrices on every rank) all of a matrix's state lives on its owner; under FSDP2/HSDP the
        # momentum is sharded like its parameter and only the second moment follows the full matrix to its owner.
        whole = bool(params) and not is_sharded(params[0])
        plan = self._make_plan(
            group,
            [newton_schulz_flops(group, p.shape) for p in params],
            [self._owner_state_numel(group, p.shape, whole) * p.element_size() for p in params],
        )
        for unit, p in enumerate(params):
            state = self.state[p]  # an empty entry on the other ranks under DDP: no keys for DCP to look for
            owned = plan is None or plan.owns(unit)
            if not owned and whole:
                continue
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if group["second_moment"] == "adamuon":
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if group["second_moment"] is not None and owned:
                shape = p.shape if group["second_moment"] == "adamuon" else (self._moment2_numel(group, p.shape),)
                state["moment2"] = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def _step_group(self, group: dict) -> Iterator[None] | None:
        params = params_with_grad(group)
        if not params:
            return None
        lr, wd = group["lr"], group["weight_decay"]
        sharded = is_sharded(params[0])
        plan = self._plan_of(group)
        active = [unit for unit, p in enumerate(group["params"]) if p.grad is not None]  # the units of ``params``
        # The matrices whose momentum this rank keeps: all (one process, replicated, or its rows under FSDP2/HSDP),
        # or under DDP with an owner plan the ones it owns.
        stepped = params
        if plan is not None and not sharded:
            stepped = [p for unit, p in zip(active, params, strict=True) if plan.owns(unit)]
        inputs = self._momentum(group, stepped) if stepped else []
        weights = [local(p) for p in params]
        if wd != 0.0:
            # Decoupled decay touches only the weights, so it can precede the update computed from u.
            torch._foreach_mul_(weights, 1.0 - lr * wd)
        if plan is not None:
            return self._owner_steps(group, plan, active, params, inputs, weights)
        targets = params
        if sharded:
            # Newton–Schulz needs whole matrices: every rank gathers each u and computes the same full update,
            # adding it into full-shape targets that hold this rank's rows of the weights, so that every weight
            # element gets the one-process operation on the same values (bitwise the same), then keeps its rows.
            inputs = [gather(u, p) for u, p in zip(inputs, params, strict=True)]
            targets = [torch.zeros_like(u) for u in inputs]
            copy_local_(targets, params, into_params=False)
        if group["foreach"] is False:
            self._update_single(group, params, inputs, targets)
        else:
            self._update_batched(group, params, inputs, targets)
        if sharded:
            copy_local_(targets, params, into_params=True)
        return None

    def _momentum(self, group: dict, params: list) -> list[torch.Tensor]:
        """Advance the momentum (and AdaMuon's step) of ``params``; returns the orthogonalization inputs ``u``.
        Elementwise: on FSDP2/HSDP shards each rank updates the rows it holds."""
        b = group["momentum"]
        grads = [local(p.grad) for p in params]
        bufs = [local(self.state[p]["momentum_buffer"]) for p in params]
        torch._foreach_lerp_(bufs, grads, 1.0 - b)
        if group["second_moment"] == "adamuon":
            torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
        return torch._foreach_lerp(grads, bufs, b) if group["nesterov"] else bufs

    def _owner_steps(
        self, group: dict, plan: Plan, active: list[int], params: list, inputs: list, weights: list
    ) -> Iterator[None]:
        """Owner-computes, as a generator step (:meth:`eopt.base.Optimizer.step`): this rank's ``inputs`` rows of
        the ``params`` (units ``active`` of the plan) go to their owners (under DDP ``inputs`` are already the whole
        inputs of the matrices this rank owns), which orthogonalize each piece (and apply the second moment);
        each rank gets back its rows and adds them, each piece scaled in the add as one process
        does (bitwise its arithmetic). Yields while an exchange is in flight."""
        full_inputs = inputs
        if is_sharded(params[0]):
            collect = plan.gather(active, inputs)
            yield
            full_inputs = collect()
        owned = [p for unit, p in zip(active, params, strict=True) if plan.owns(unit)]
        directions = [torch.empty_like(u) for u in full_inputs]
        if group["foreach"] is False:
            self._update_single(group, owned, full_inputs, directions, scaled=False)
        else:
            self._update_batched(group, owned, full_inputs, directions, scaled=False)
        collect = plan.scatter(active, directions)
        yield
        add_scaled_(group, params, weights, collect())

    def _update_single(self, group: dict, params: list, inputs: list, targets: list, scaled: bool = True) -> None:
        """Reference path: one matrix piece at a time; adds each piece's update of ``inputs[j]`` into
        ``targets[j]`` (the weights, or full-shape buffers on shards); with ``scaled=False`` writes the
        orthogonalized piece itself, for the owner to send (each rank scales its rows, :func:`add_scaled_`)."""
        for p, u, target in zip(params, inputs, targets, strict=True):
            for idx, ((src, o, i), (dst, _, _)) in enumerate(
                zip(matrix_pieces(u, group), matrix_pieces(target, group), strict=True)
            ):
                ortho = orthogonalize(group, src.unsqueeze(0))
                ortho = self._second_moment(group, [self._moment_view(p, group, idx)], [p], ortho, o, i)
                if scaled:
                    dst.add_(ortho[0], alpha=step_size(group, o, i))
                else:
                    dst.copy_(ortho[0])

    def _update_batched(self, group: dict, params: list, inputs: list, targets: list, scaled: bool = True) -> None:
        """Fast path: one batched Newton–Schulz per stack of same-shape pieces, foreach updates into ``targets``
        (``scaled=False``: the orthogonalized pieces themselves, as :meth:`_update_single`)."""
        stacks: dict[tuple, list] = defaultdict(list)
        for p, u, target in zip(params, inputs, targets, strict=True):
            for idx, ((src, o, i), (dst, _, _)) in enumerate(
                zip(matrix_pieces(u, group), matrix_pieces(target, group), strict=True)
            ):
                # Same storage shape within a group means the same (out, in), hence one scale per stack.
                stacks[(tuple(src.shape), src.dtype, src.device)].append((p, idx, src, dst, o, i))
        for pieces in stacks.values():
            _, _, _, _, o, i = pieces[0]
            X = torch.stack([src for _, _, src, _, _, _ in pieces]) if len(pieces) > 1 else pieces[0][2].unsqueeze(0)
            ortho = orthogonalize(group, X)
            moments = [self._moment_view(p, group, idx) for p, idx, *_ in pieces]
            ortho = self._second_moment(group, moments, [p for p, *_ in pieces], ortho, o, i)
            dsts = [dst for _, _, _, dst, _, _ in pieces]
            if scaled:
                torch._foreach_add_(dsts, list(ortho.unbind(0)), alpha=step_size(group, o, i))
            else:
                torch._foreach_copy_(dsts, list(ortho.unbind(0)))

    def _moment_view(self, p: torch.Tensor, group: dict, idx: int) -> torch.Tensor | None:
        """The second-moment state of piece ``idx`` of ``p``, shaped to broadcast against the piece."""
        kind = group["second_moment"]
        if kind is None:
            return None
        state = self.state[p]
        if kind == "adamuon":
            return matrix_pieces(state["moment2"], group)[idx][0]
        dims = piece_dims(p.shape, group)
        start = sum(max(o, i) for o, i in dims[:idx])
        o, i = dims[idx]
        flat = state["moment2"][start : start + max(o, i)]
        return flat.view(-1, 1) if normuon_axis(o, i, bool(group.get("in_out"))) == -1 else flat.view(1, -1)

    def _second_moment(
        self, group: dict, moments: list, params: list, ortho: torch.Tensor, out_dim: int, in_dim: int
    ) -> torch.Tensor:
        """NorMuon / AdaMuon on a stack ``ortho`` (k, rows, cols) of raw NS outputs; updates ``moments``."""
        kind = group["second_moment"]
        if kind is None:
            return ortho
        beta2, eps = group["beta2"], group["eps"]
        ortho = ortho.float()
        v = torch.stack(moments)
        if kind == "normuon":
            axis = normuon_axis(out_dim, in_dim, bool(group.get("in_out")))
            v.lerp_(ortho.square().mean(dim=axis, keepdim=True), 1.0 - beta2)
            target = torch.linalg.vector_norm(ortho, dim=(-2, -1), keepdim=True)
            adapted = ortho / (v.sqrt() + eps)
        else:
            steps = torch.stack([self.state[p]["step"] for p in params])
            bias_correction = (1.0 - torch.pow(beta2, steps)).view(-1, 1, 1)
            v.lerp_(ortho.square(), 1.0 - beta2)
            adapted = ortho / ((v / bias_correction).sqrt() + eps)
            target = torch.full_like(ortho[:, :1, :1], min(out_dim, in_dim) ** 0.5)
        torch._foreach_copy_(moments, list(v.unbind(0)))
        norm = torch.linalg.vector_norm(adapted, dim=(-2, -1), keepdim=True)
        return adapted * (target / norm.clamp_min(eps))
