"""Kronecker-factor kernels shared by :class:`eopt.SOAP` and :class:`eopt.Shampoo`.

Both optimizers keep, for each preconditioned dim ``i`` of a gradient ``G``, a factor
``F_i = sum_t w_t * G_(i) G_(i)^T`` where ``G_(i)`` is ``G`` unfolded with dim ``i`` as rows. Every kernel
here works on a *batch*: a leading dim ``B`` that stacks same-shape tensors, so one ``baddbmm`` / ``eigh``
/ ``qr`` call serves every same-shape matrix of a model. The pieces:

- :func:`merge_small_dims`, :func:`block_slices`, :func:`tensor_blocks`: how a tensor is reshaped or cut
  before it gets factors (SOAP's ``merge_dims``; Shampoo's ``max_preconditioner_dim`` blocks).
- :func:`update_factor_`: ``F = (1 - w) F + w G_(i) G_(i)^T`` with a blocked symmetric product (only the
  panels on and above the diagonal are multiplied), batched, the EMA fused in the GEMM.
- :func:`contract`: multiply a batched tensor by a (per-batch) matrix along one dim (the rotation into and
  out of an eigenbasis).
- :func:`eigh_descending`, :func:`sort_basis`, :func:`power_qr`, :func:`inverse_root`: eigenbases and root
  inverses, batched, with a float64 retry when fp32 LAPACK fails and, if that fails too (or returns
  non-finite numbers), the previous basis kept and the event counted in a device tensor (no host sync).
- :class:`StateBuckets`: per-parameter state tensors that are views into one batched buffer per shape, so
  the batched kernels run on the state in place (no stacking copy per step) while ``optimizer.state``
  keeps ordinary per-parameter entries for ``state_dict`` and distributed checkpointing.
- :class:`KroneckerOptimizer`: the optimizer base both build on (eager bucketed state, per-parameter CPU
  step counters, batched state buffers rebuilt after ``load_state_dict``).

Under DDP, FSDP2 and HSDP the matrix work runs once per parameter, on its owner rank (``matrix_update="owner"``,
the default), or on every rank on full, replicated state (``"replicated"``): see :class:`KroneckerOptimizer`.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from eopt.base import Optimizer, ParamGroups, check, group_by_shape
from eopt.distributed import full, local, local_slice
from eopt.owner import MATRIX_UPDATES, OwnerPlans, Plan
from eopt.symmetric import symmetric_matmul_, symmetric_panels

# --------------------------------------------------------------------------------------------- shapes


def merge_small_dims(shape: Sequence[int], max_dim: int) -> list[int]:
    """Merge adjacent dims while their product stays ``<= max_dim`` (SOAP's ``merge_dims``, authors' rule).

    A dim larger than ``max_dim`` stays on its own (it will get no factor). ``[4, 6, 8]`` with 30 gives
    ``[24, 8]``; ``[3, 3, 3, 3]`` with 9 gives ``[9, 9]``.
    """
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return merged


def block_slices(size: int, block: int) -> list[slice]:
    """Cut ``range(size)`` into consecutive slices of length ``block`` (the last one shorter)."""
    return [slice(start, min(start + block, size)) for start in range(0, size, block)]


def tensor_blocks(shape: Sequence[int], max_dim: int) -> list[tuple[slice, ...]]:
    """Blocks of a tensor whose every dim is at most ``max_dim`` (DistributedShampoo's blocking).

    Each dim is cut by :func:`block_slices`; the blocks are the Cartesian product, in row-major order.
    A 3000 x 100 matrix with ``max_dim=1024`` gives rows 0:1024, 1024:2048, 2048:3000, all columns.
    """
    blocks: list[tuple[slice, ...]] = [()]
    for size in shape:
        blocks = [(*b, s) for b in blocks for s in block_slices(size, max_dim)]
    return blocks


# ---------------------------------------------------------------------------------- factor products


def unfold(x: torch.Tensor, dim: int) -> torch.Tensor:
    """View batched ``x`` of shape ``(B, d_1, ..., d_k)`` as ``(B, d_dim, rest)``, or ``(B, rest, d_dim).mT``.

    The last dim is returned as a transposed view, so no copy is made for the common 2-D cases.
    """
    if dim == x.ndim - 1:
        return x.reshape(x.shape[0], -1, x.shape[-1]).mT
    return x.movedim(dim, 1).reshape(x.shape[0], x.shape[dim], -1)


def update_factor_(factor: torch.Tensor, x: torch.Tensor, dim: int, weight: float | None, plain: bool = False) -> None:
    """``factor = (1 - weight) * factor + weight * X X^T`` (``factor += X X^T`` when ``weight`` is None).

    ``X`` is the unfolding of batched ``x`` along ``dim``; ``factor`` has shape ``(B, d, d)``, ``x`` has shape
    ``(B, d_1, ..., d_k)``. The product is symmetric, so only its upper panels are multiplied
    (:func:`eopt.symmetric.symmetric_matmul_`), the EMA fused in the GEMM (``baddbmm`` alpha/beta).
    ``factor`` must be symmetric on entry (it is: it only ever receives these).

    Small factors (one panel) and ``plain=True`` take the full product and apply the EMA as ``lerp_``
    (``add_``): the authors' arithmetic bit for bit. SOAP's first basis is an eigh of a rank-deficient
    factor whose null-space vectors are arbitrary, so only identical arithmetic gives the authors' basis.
    """
    u = unfold(x, dim).to(factor.dtype)
    if plain or symmetric_panels(u.shape[1]) == 1:
        product = torch.bmm(u, u.mT)
        if weight is None:
            factor.add_(product)
        else:
            factor.lerp_(product, weight)
        return
    beta, alpha = (1.0, 1.0) if weight is None else (1.0 - weight, weight)
    symmetric_matmul_(factor, u, u, beta=beta, alpha=alpha)


def contract(x: torch.Tensor, q: torch.Tensor, dim: int, transpose: bool) -> torch.Tensor:
    """Multiply batched ``x`` along ``dim`` by ``q^T`` (``transpose=True``) or ``q``.

    ``x``: ``(B, d_1, ..., d_k)``; ``q``: ``(B, d_dim, d_dim)``. With ``transpose`` this is the rotation
    into the eigenbasis (``Q^T`` applied to every fiber along ``dim``), without it the rotation back.
    """
    if dim == x.ndim - 1:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        return torch.bmm(flat, q if transpose else q.mT).reshape(x.shape)
    moved = x.movedim(dim, 1)
    flat = moved.reshape(x.shape[0], x.shape[dim], -1)
    out = torch.bmm(q.mT if transpose else q, flat)
    return out.reshape(moved.shape).movedim(1, dim)


# ------------------------------------------------------------------------------------ eigenbases


def _keep_previous(evecs: torch.Tensor, previous: torch.Tensor | None, failures: torch.Tensor | None) -> torch.Tensor:
    """Replace non-finite bases by ``previous`` (identity if none) and count them, all on device."""
    bad = ~torch.isfinite(evecs).all(dim=-1).all(dim=-1)
    fallback = previous if previous is not None else torch.eye(evecs.shape[-1], dtype=evecs.dtype, device=evecs.device)
    if failures is not None:
        failures.add_(bad.to(failures.dtype))
    return torch.where(bad[:, None, None], fallback.to(evecs.dtype), evecs)


def _eigh_one_by_one(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 eigh matrix by matrix; a matrix whose eigh fails gets NaN (replaced by the caller)."""
    evals = torch.full(a.shape[:-1], float("nan"), dtype=torch.float64, device=a.device)
    evecs = torch.full(a.shape, float("nan"), dtype=torch.float64, device=a.device)
    for i in range(a.shape[0]):
        with contextlib.suppress(RuntimeError):
            evals[i], evecs[i] = torch.linalg.eigh(a[i].to(torch.float64))
    return evals, evecs


def _eigh_with_retry(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``; if fp32 LAPACK fails, the batch in float64; if that fails, matrix by matrix (NaN
    where one fails). After a retry the results are float64."""
    try:
        return torch.linalg.eigh(a)
    except RuntimeError:
        try:
            return torch.linalg.eigh(a.to(torch.float64))
        except RuntimeError:
            return _eigh_one_by_one(a)


def eigh_descending(
    a: torch.Tensor,
    previous: torch.Tensor | None = None,
    failures: torch.Tensor | None = None,
    jitter: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched symmetric eigendecomposition, eigenvalues (and vector columns) in descending order.

    ``a``: ``(B, n, n)``. ``jitter * I`` is added first (SOAP's authors add ``1e-30 * I``). If fp32 LAPACK
    fails the batch is retried in float64; a matrix that fails in float64 too, or whose vectors are not
    finite, keeps ``previous[i]`` (identity when ``previous`` is None) and ``failures[i]`` grows by one.
    Returned in ``a``'s dtype.
    """
    if jitter:
        a = a + jitter * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    evals, evecs = _eigh_with_retry(a)
    evals, evecs = evals.to(a.dtype), evecs.to(a.dtype)
    return evals.flip(-1), _keep_previous(evecs.flip(-1), previous, failures)


def sort_basis(factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each basis's columns by the Rayleigh quotients ``diag(Q^T F Q)``, descending.

    Returns ``(F Q sorted, Q sorted, order)``; ``order`` (``(B, n)``) is the permutation that the
    eigenbasis-indexed state (SOAP's second moment) must follow along the same dim.
    """
    fq = torch.bmm(factor, basis)
    rayleigh = (basis * fq).sum(dim=-2)
    order = torch.argsort(rayleigh, dim=-1, descending=True)
    index = order[:, None, :].expand_as(fq)
    return fq.gather(-1, index), basis.gather(-1, index), order


def power_qr(fq_sorted: torch.Tensor, factor: torch.Tensor, steps: int) -> torch.Tensor:
    """Orthogonal iteration: ``Q = qr(F Q)`` ``steps`` times, starting from the product ``F Q`` given.

    One step from the previous eigenbasis is SOAP's refresh (Vyas et al., Algorithm 4). QR runs in fp32 at
    least (the orthogonality of Q matters more than speed here).
    """
    q = torch.linalg.qr(fq_sorted.to(torch.promote_types(fq_sorted.dtype, torch.float32))).Q.to(factor.dtype)
    for _ in range(steps - 1):
        q = torch.linalg.qr(torch.bmm(factor, q)).Q
    return q


def inverse_root(
    factor: torch.Tensor,
    root: float,
    epsilon: float,
    previous: torch.Tensor | None = None,
    failures: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(F + epsilon * I)^(-1/root)`` for a batch of symmetric PSD ``F`` by eigendecomposition.

    Eigenvalues are clamped to ``>= epsilon`` first (round-off can make a PSD factor's smallest eigenvalues
    slightly negative, which a fractional power turns into NaN). A matrix whose eigh fails in fp32 and in
    float64 keeps ``previous[i]`` (the last good root inverse; identity if None) and counts in ``failures``.
    """
    n = factor.shape[-1]
    shifted = factor + epsilon * torch.eye(n, dtype=factor.dtype, device=factor.device)
    evals, evecs = _eigh_with_retry(shifted)
    evals = evals.clamp(min=epsilon) if epsilon > 0 else evals.clamp(min=torch.finfo(evals.dtype).tiny)
    # V diag(l^(-1/root)) V^T = W W^T with W = V diag(l^(-1/(2 root))): a symmetric product (upper panels only).
    half = (evecs * evals.pow(-0.5 / root).unsqueeze(-2)).to(factor.dtype)
    out = torch.zeros_like(half)
    update_factor_(out, half, 1, None)
    return _keep_previous(out, previous, failures)


# ---------------------------------------------------------------------------------- batched state


class StateBuckets:
    """Per-parameter state tensors backed by one batched buffer per (bucket, key).

    ``params`` are same-shape tensors; :meth:`allocate` creates ``buffers[key]`` of shape ``(B, *shape)``
    and puts ``buffers[key][i]`` into ``state[params[i]][key]``. The optimizer's batched kernels then update
    the buffers in place, and ``state_dict()`` sees ordinary per-parameter tensors. :meth:`adopt` rebuilds
    the buffers from whatever per-parameter tensors the state holds (after ``load_state_dict``), and
    :meth:`intact` tells whether the state still points into the buffers.
    """

    def __init__(self, params: list[torch.Tensor], state: dict) -> None:
        self.params = params
        self.state = state
        self.buffers: dict[str, torch.Tensor] = {}

    def allocate(self, key: str, shape: Sequence[int], dtype: torch.dtype, init: str = "zeros") -> None:
        device = self.params[0].device
        buf = torch.zeros((len(self.params), *shape), dtype=dtype, device=device)
        if init == "eye":
            buf.copy_(torch.eye(shape[-1], dtype=dtype, device=device).expand_as(buf))
        self._bind(key, buf)

    def adopt(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._bind(key, torch.stack([self.state[p][key] for p in self.params]))

    def _bind(self, key: str, buf: torch.Tensor) -> None:
        self.buffers[key] = buf
        for i, p in enumerate(self.params):
            self.state[p][key] = buf[i]

    def intact(self) -> bool:
        for key, buf in self.buffers.items():
            for i, p in enumerate(self.params):
                t = self.state[p].get(key)
                if t is None or t.data_ptr() != buf[i].data_ptr() or t.shape != buf.shape[1:]:
                    return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.buffers)


def step_counter() -> torch.Tensor:
    """A step counter as a 0-d CPU tensor, like ``torch.optim``'s non-capturable counters.

    Reading it (``int(t)``) is a host read, never a device sync; the schedule of basis refreshes and
    first-step work needs the value on the host.
    """
    return torch.zeros((), dtype=torch.float32)


def matmul_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Context that sets ``torch.set_float32_matmul_precision(precision)`` on CUDA; a no-op elsewhere.

    On CPU a lower precision can route fp32 matmuls to bf16 kernels, which are far slower there.
    """
    if device.type != "cuda" or precision == torch.get_float32_matmul_precision():
        return contextlib.nullcontext()
    return _precision(precision)


@contextlib.contextmanager
def _precision(precision: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------ optimizer plumbing


class KroneckerOptimizer(OwnerPlans, Optimizer):
    """Base of the Kronecker-factored optimizers: bucketed eager state, rebuilt after ``load_state_dict``.

    A subclass implements :meth:`_state_spec` (the batched state keys of one parameter shape),
    :meth:`_direction` (the batched update direction of same-shape parameters from their full gradients, updating
    their state) and :meth:`_apply` (the elementwise step that adds a direction to the weights, with weight
    decay), and :meth:`_cost` (a parameter's matrix-work FLOPs per step, for the owner plan). Same-shape
    parameters of a group form one :class:`StateBuckets`; the step counter of each parameter is a CPU tensor.

    ``matrix_update="replicated"`` (and one process): every rank gathers every full gradient
    (:func:`stacked_grads`), runs every bucket on full, replicated state, and adds its rows of each direction.
    ``matrix_update="owner"`` on several ranks: each parameter has an owner rank (:class:`eopt.owner.Plan`,
    balanced by :meth:`_cost`); the owner alone holds the parameter's factors, bases, roots and moments (plain
    tensors under the usual keys: ``torch.distributed.checkpoint`` saves the one copy and loads it into the new
    owner's placeholder after a change of world size), receives the full gradient (``all_to_all_single`` of the
    rows under FSDP2/HSDP; already whole under DDP), computes the direction in the same batched kernels (its
    buckets hold only the parameters it owns) and sends each rank its rows back; every rank then applies its rows
    with :meth:`_apply`. Every rank keeps every parameter's step counter.
    """

    def __init__(self, params: ParamGroups, defaults: dict) -> None:
        self._buckets: dict[int, list[StateBuckets]] = {}
        self._init_plans()
        super().__init__(params, defaults)

    @abc.abstractmethod
    def _state_spec(self, group: dict, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple, str]]:
        """``(key, shape, init)`` of every batched state tensor of a parameter of ``shape`` (init: zeros|eye)."""

    @abc.abstractmethod
    def _direction(
        self, group: dict, shape: tuple[int, ...], grads: torch.Tensor, state: dict, calls: int
    ) -> torch.Tensor | None:
        """The ``(B, *shape)`` directions of a batch of parameters of ``shape`` from their full ``grads``, with
        ``state`` (batched, updated in place) and ``calls`` steps taken before; ``None`` when this step only
        updates the state."""

    @abc.abstractmethod
    def _apply(self, group: dict, weights: list[torch.Tensor], directions: list[torch.Tensor], calls: int) -> None:
        """Add ``directions`` (this rank's rows, in the weights' dtype) to ``weights`` (local tensors), with decay."""

    @abc.abstractmethod
    def _cost(self, group: dict, shape: tuple[int, ...]) -> float:
        """A parameter's matrix-work FLOPs per step (refreshes amortized), what the owner plan balances."""

    def _check_group(self, group: dict) -> None:
        mode = group["matrix_update"]
        check("matrix_update", mode in MATRIX_UPDATES, f"must be one of {', '.join(MATRIX_UPDATES)}, got {mode!r}")

    @staticmethod
    def state_dtype(p: torch.Tensor) -> torch.dtype:
        """Factors and moments are kept in at least fp32 whatever the parameter's dtype."""
        return torch.promote_types(p.dtype, torch.float32)

    def _state_bytes(self, group: dict, p: torch.Tensor) -> int:
        itemsize = torch.empty((), dtype=self.state_dtype(p)).element_size()
        return sum(math.prod(shape) * itemsize for _, shape, _ in self._state_spec(group, tuple(p.shape), p.dtype))

    def _computed_here(self, group: dict) -> list[torch.Tensor]:
        """The parameters whose matrix work (and state) is on this rank: all, or the ones it owns."""
        plan = self._plan_of(group)
        return [p for unit, p in enumerate(group["params"]) if plan is None or plan.owns(unit)]

    def _make_buckets(self, group: dict, adopt: bool) -> list[StateBuckets]:
        buckets = []
        here = self._computed_here(group)
        for indices in group_by_shape(here).values():
            params = [here[i] for i in indices]
            bucket = StateBuckets(params, self.state)
            p = params[0]
            spec = self._state_spec(group, tuple(p.shape), self.state_dtype(p))
            if adopt:
                bucket.adopt([key for key, _, _ in spec])
            else:
                for key, shape, init in spec:
                    bucket.allocate(key, shape, self.state_dtype(p), init)
            buckets.append(bucket)
        self._buckets[id(group)] = buckets
        return buckets

    def _init_state(self, group: dict) -> None:
        params = group["params"]
        self._make_plan(
            group, [self._cost(group, tuple(p.shape)) for p in params], [self._state_bytes(group, p) for p in params]
        )
        self._make_buckets(group, adopt=False)
        for p in params:
            self.state[p]["step"] = step_counter()

    def _group_buckets(self, group: dict) -> list[StateBuckets]:
        buckets = self._buckets.get(id(group))
        if buckets is None or not all(b.intact() for b in buckets):
            buckets = self._make_buckets(group, adopt=True)
        return buckets

    def _step_group(self, group: dict) -> Iterator[None] | None:
        plan = self._plan_of(group)
        if plan is not None:
            return self._owner_steps(group, plan)
        for bucket in self._group_buckets(group):
            by_calls: dict[int, list[int]] = defaultdict(list)
            for i, p in enumerate(bucket.params):
                if p.grad is not None:
                    by_calls[int(self.state[p]["step"])].append(i)
            for calls, sel in by_calls.items():
                params = [bucket.params[i] for i in sel]
                directions = self._bucket_directions(group, bucket, sel, calls, stacked_grads(bucket, sel))
                if directions is not None:
                    views = [local_slice(d, p) for d, p in zip(directions, params, strict=True)]
                    self._apply(group, [local(p) for p in params], views, calls)
                for p in params:
                    self.state[p]["step"].add_(1)
        return None

    def _bucket_directions(
        self, group: dict, bucket: StateBuckets, sel: list[int], calls: int, grads: torch.Tensor
    ) -> list[torch.Tensor] | None:
        """:meth:`_direction` of the bucket entries ``sel`` (full ``grads`` stacked), in the weights' dtype."""
        p0 = bucket.params[0]
        with matmul_precision(p0.device, group["matmul_precision"]):
            state, whole = gather_bucket(bucket, sel)
            directions = self._direction(group, tuple(p0.shape), grads.to(self.state_dtype(p0)), state, calls)
            if not whole:
                scatter_bucket(bucket, sel, state)
        return None if directions is None else list(directions.to(p0.dtype).unbind(0))

    def _owner_steps(self, group: dict, plan: Plan) -> Iterator[None]:
        """Owner-computes, as a generator step (:meth:`eopt.base.Optimizer.step`): full gradients to their owners,
        directions computed there, rows back, applied everywhere. Yields while an exchange is in flight."""
        params = group["params"]
        active = [unit for unit, p in enumerate(params) if p.grad is not None]
        calls = {unit: int(self.state[params[unit]]["step"]) for unit in active}
        owned = [unit for unit in active if plan.owns(unit)]
        collect = plan.gather(active, [local(params[u].grad) for u in active])
        if plan.ranks.shards > 1:
            yield
        grad_of = dict(zip(owned, collect(), strict=True))
        unit_of = {id(p): unit for unit, p in enumerate(params)}
        direction_of: dict[int, torch.Tensor] = {}
        for bucket in self._group_buckets(group):
            by_calls: dict[int, list[int]] = defaultdict(list)
            for i, p in enumerate(bucket.params):
                if unit_of[id(p)] in grad_of:
                    by_calls[calls[unit_of[id(p)]]].append(i)
            for c, sel in by_calls.items():
                units = [unit_of[id(bucket.params[i])] for i in sel]
                directions = self._bucket_directions(group, bucket, sel, c, torch.stack([grad_of[u] for u in units]))
                if directions is not None:
                    direction_of.update(zip(units, directions, strict=True))
        # Whether a step moves the weights depends only on its count, which every rank knows for every unit.
        moving = [unit for unit in active if self._moves(group, calls[unit])]
        collect = plan.scatter(moving, [direction_of[u] for u in moving if plan.owns(u)])
        yield
        rows = collect()
        by_calls_rows: dict[int, list[int]] = defaultdict(list)
        for j, unit in enumerate(moving):
            by_calls_rows[calls[unit]].append(j)
        for c, js in by_calls_rows.items():
            self._apply(group, [local(params[moving[j]]) for j in js], [rows[j] for j in js], c)
        for unit in active:
            self.state[params[unit]]["step"].add_(1)

    def _moves(self, group: dict, calls: int) -> bool:
        """Whether the step after ``calls`` steps changes the weights (SOAP's first step only builds its basis)."""
        return True

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._buckets = {}

    def _state_total(self, key: str) -> torch.Tensor:
        """The sum of the 0-d state ``key`` over this algorithm's parameters that hold it (0 if none does), the same
        on every rank: replicated state sums alike everywhere; owner-only state is summed over the ranks."""
        values, device = [], None
        for group in self.param_groups:
            if group["algorithm"] != self.algorithm:
                continue
            for p in group["params"]:
                device = device or p.device
                if key in self.state[p]:
                    values.append(self.state[p][key])
        total = torch.stack(values).sum() if values else torch.zeros((), device=device)
        if any(self._plan_of(g) is not None for g in self.param_groups if g["algorithm"] == self.algorithm):
            dist.all_reduce(total)
        return total


def gather_bucket(bucket: StateBuckets, sel: list[int]) -> tuple[dict[str, torch.Tensor], bool]:
    """The bucket's buffers restricted to entries ``sel``: the buffers themselves when ``sel`` is all."""
    if len(sel) == len(bucket.params):
        return dict(bucket.buffers), True
    index = torch.tensor(sel, device=bucket.params[0].device)
    return {key: buf.index_select(0, index) for key, buf in bucket.buffers.items()}, False


def scatter_bucket(bucket: StateBuckets, sel: list[int], tensors: dict[str, torch.Tensor]) -> None:
    """Write entries ``sel`` back after :func:`gather_bucket` returned copies."""
    index = torch.tensor(sel, device=bucket.params[0].device)
    for key, buf in bucket.buffers.items():
        buf.index_copy_(0, index, tensors[key])


def stacked_grads(bucket: StateBuckets, sel: list[int]) -> torch.Tensor:
    """The gradients of entries ``sel`` as one ``(len(sel), *shape)`` tensor; the full gradients (all-gathered,
    bitwise the same on every rank) of DTensor parameters."""
    return torch.stack([full(bucket.params[i].grad) for i in sel])


__all__ = [
    "KroneckerOptimizer",
    "StateBuckets",
    "gather_bucket",
    "scatter_bucket",
    "stacked_grads",
    "block_slices",
    "contract",
    "eigh_descending",
    "inverse_root",
    "matmul_precision",
    "merge_small_dims",
    "power_qr",
    "sort_basis",
    "step_counter",
    "tensor_blocks",
    "unfold",
    "update_factor_",
]
