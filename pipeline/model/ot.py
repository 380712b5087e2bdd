"""Multilevel optimal transport, solved by batched entropic Sinkhorn iterations: POT's, or
operators of our own that run the same iterations with a written-out backward pass.

At layer ``i >= 1`` of a stream, the layer's output ``Q`` attends, through an entropic transport plan,
to the states recorded before it (``S`` = states ``0 .. i-1`` along the sequence):
``C = cdist(LN(W_q Q), LN(W_k S))``, ``Pi = Sinkhorn(C, eps)`` with uniform marginals, and
``h <- h + w * Pi S``.

The original's kernel is ``exp(-C/eps) + floor``. Sinkhorn on that kernel is the log-domain Sinkhorn
on the cost ``C' = -eps * logaddexp(-C/eps, log floor)`` (``floor = 0``: ``C' = C``), so one solver
serves both regimes without under- or overflow: ``model.ot.solver: log_sinkhorn`` runs POT's
batched ``log_sinkhorn`` iterations as an operator with a written-out backward pass
(:func:`log_sinkhorn_plan`; plan and gradient tested against POT's autodiff).
``model.ot.solver: sinkhorn`` runs the same iterations in the plain domain (POT's batched
``sinkhorn``): no ``exp`` per iteration, several times faster, safe only while the floor keeps the
kernel away from 0.

``model.ot.solver: fused`` runs those plain-domain iterations itself, on the kernel
``exp(-C/eps) + floor`` as the original wrote it: each half-iteration is one batched
matrix-vector product, and the backward pass is written out (:func:`fused_sinkhorn_plan`), so it
keeps only the kernel and the ``2 x iterations`` scaling vectors instead of a ``[b, n, m]`` tensor
per iteration, and needs no recomputation. Same iterates as POT's ``sinkhorn`` (tested against it).

Padding gets zero mass (rows and columns) and a cost far above every real one on its columns, so
the first half-iteration ignores it as well: a padded problem gives the plan of the unpadded one,
bordered by zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import floor_problem
from pipeline.model.regime import RegimeStats, floor_threshold

__all__ = [
    "clamped_sinkhorn_plan",
    "floored_cost",
    "fused_sinkhorn_plan",
    "log_sinkhorn_plan",
    "sinkhorn_plan",
    "transport_plan",
    "MultilevelTransport",
    "UniformTransport",
    "token_sum",
]

# A padded column costs this many epsilons more than the dearest real one: its share of the first
# half-iteration (before its zero mass sends its potential to -inf) is below exp(-40), invisible in
# float32, while exp() stays off the slow underflow path that far larger costs would take.
MASKED_COST_MARGIN = 40.0
# Problems of more elements than this are solved in batch chunks: POT's iterations stream the
# whole [b, n, m] tensor several times each, and cache-sized chunks run faster (measured at
# [8, 256, 2816], one thread: 1.6x for the plain-domain solver, 1.15x for the log-domain one).
CHUNK_ELEMENTS = 1 << 19


def floored_cost(cost: torch.Tensor, epsilon: float, kernel_floor: float) -> torch.Tensor:
    """The cost whose Gibbs kernel is ``exp(-cost / epsilon) + kernel_floor``."""
    if kernel_floor <= 0:
        return cost
    log_floor = cost.new_tensor(math.log(kernel_floor))
    return -epsilon * torch.logaddexp(-cost / epsilon, log_floor)


# The fused solver's problems are solved in batch chunks of about this many kernel elements per
# thread: a chunk's kernel then stays in cache across its 100 half-iterations (measured on the 11
# text-OT problems [8, 99, 99 i] at 1 thread: 0.62 s per forward+backward with 2^17, 0.85 s unchunked).
FUSED_CHUNK_ELEMENTS = 1 << 17


# The fused solve is a custom operator (torch.library): eager code inside, one opaque node in a
# compiled graph. Traced, its 50 iterations would unroll into thousands of graph nodes per layer
# and make compile time grow with the iterations; as an operator, the graph stays the size of the
# model around it and has no break. Its backward pass is an operator too. On the CPU it solves in
# cache-sized batch chunks (a GPU would pay a kernel launch per chunk).


def _fused_solve(kernel, row_mass, column_mass, iterations: int, clamp: float):
    """One chunk of :func:`fused_sinkhorn_plan`: the plan and the stacked scaling vectors ``f_t``,
    ``g_t`` (``g_0`` first), ``r_t``, ``c_t`` that its backward pass needs."""
    g = (column_mass > 0).to(kernel.dtype)
    fs, gs, rs, cs = [], [g], [], []
    for _ in range(iterations):
        r = torch.bmm(kernel, g.unsqueeze(-1)).squeeze(-1)
        f = row_mass / (r.clamp(min=clamp) if clamp > 0 else r)
        c = torch.bmm(f.unsqueeze(1), kernel).squeeze(1)
        g = column_mass / (c.clamp(min=clamp) if clamp > 0 else c)
        fs.append(f)
        gs.append(g)
        rs.append(r)
        cs.append(c)
    plan = f.unsqueeze(-1) * kernel * g.unsqueeze(1)
    return plan, torch.stack(fs), torch.stack(gs), torch.stack(rs), torch.stack(cs)


def _fused_solve_backward(grad_plan, kernel, fs, gs, rs, cs, clamp: float):
    """One chunk of :func:`fused_sinkhorn_plan`'s backward pass: the kernel's gradient."""
    if clamp > 0:
        # d(a / max(r, k))/dr = -f / r where r >= k, else 0 (the clamp's own gradient).
        rs = torch.where(rs >= clamp, rs, torch.full_like(rs, math.inf))
        cs = torch.where(cs >= clamp, cs, torch.full_like(cs, math.inf))
    f, g = fs[-1], gs[-1]
    weighted = grad_plan * kernel
    grad_f = torch.bmm(weighted, g.unsqueeze(-1)).squeeze(-1)
    grad_g = torch.bmm(f.unsqueeze(1), weighted).squeeze(1)
    left, right = [], []
    for t in range(len(fs) - 1, -1, -1):
        grad_c = -grad_g * gs[t + 1] / cs[t]
        grad_f = grad_f + torch.bmm(kernel, grad_c.unsqueeze(-1)).squeeze(-1)
        grad_r = -grad_f * fs[t] / rs[t]
        grad_g = torch.bmm(grad_r.unsqueeze(1), kernel).squeeze(1)
        grad_f = torch.zeros_like(grad_f)
        left += [fs[t], grad_r]
        right += [grad_c, gs[t]]
    return torch.baddbmm(
        grad_plan * f.unsqueeze(-1) * g.unsqueeze(1),
        torch.stack(left, dim=-1),
        torch.stack(right, dim=1),
    )


def _fused_chunks(kernel: torch.Tensor) -> list[slice]:
    """Batch chunks of about ``FUSED_CHUNK_ELEMENTS`` kernel elements per thread on the CPU (each
    chunk's kernel stays in cache across its iterations); the whole batch elsewhere."""
    return _batch_chunks(kernel, FUSED_CHUNK_ELEMENTS * torch.get_num_threads())


@torch.library.custom_op("remote::fused_sinkhorn", mutates_args=())
def _fused_forward(
    kernel: torch.Tensor,
    row_mass: torch.Tensor,
    column_mass: torch.Tensor,
    iterations: int,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(kernel.device.type, enabled=False):
        parts = [
            _fused_solve(kernel[c], row_mass[c], column_mass[c], iterations, clamp)
            for c in _fused_chunks(kernel)
        ]
    return _merge_chunks(parts)


def _solve_outputs(problems: torch.Tensor, iterations: int):
    """What a Sinkhorn operator returns, as empty tensors (its fake, for compilation): the plan
    ``[b, n, m]``, then four stacks of vectors, ``[T, b, n]``, ``[T + 1, b, m]``, ``[T, b, n]``,
    ``[T, b, m]``."""
    batch, rows, columns = problems.shape
    return (
        problems.new_empty(batch, rows, columns),
        problems.new_empty(iterations, batch, rows),
        problems.new_empty(iterations + 1, batch, columns),
        problems.new_empty(iterations, batch, rows),
        problems.new_empty(iterations, batch, columns),
    )


def _merge_chunks(parts: list[tuple[torch.Tensor, ...]]):
    """Batch chunks' ``(plan, *vector stacks)`` as one: plans along dim 0, stacks along dim 1."""
    if len(parts) == 1:
        return parts[0]
    plan, *vectors = zip(*parts, strict=True)
    return torch.cat(plan), *(torch.cat(v, dim=1) for v in vectors)


@_fused_forward.register_fake
def _(kernel, row_mass, column_mass, iterations, clamp):
    return _solve_outputs(kernel, iterations)


@torch.library.custom_op("remote::fused_sinkhorn_backward", mutates_args=())
def _fused_backward(
    grad_plan: torch.Tensor,
    kernel: torch.Tensor,
    fs: torch.Tensor,
    gs: torch.Tensor,
    rs: torch.Tensor,
    cs: torch.Tensor,
    clamp: float,
) -> torch.Tensor:
    grad_plan = grad_plan.to(kernel.dtype)
    with torch.autocast(kernel.device.type, enabled=False):
        parts = [
            _fused_solve_backward(
                grad_plan[c], kernel[c], fs[:, c], gs[:, c], rs[:, c], cs[:, c], clamp
            )
            for c in _fused_chunks(kernel)
        ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@_fused_backward.register_fake
def _(grad_plan, kernel, fs, gs, rs, cs, clamp):
    return torch.empty_like(kernel)


def _fused_setup_context(ctx, inputs, output) -> None:
    kernel, _, _, _, clamp = inputs
    ctx.save_for_backward(kernel, *output[1:])
    ctx.clamp = clamp


def _fused_grad(ctx, grad_plan, *_):
    return _fused_backward(grad_plan, *ctx.saved_tensors, ctx.clamp), None, None, None, None


_fused_forward.register_autograd(_fused_grad, setup_context=_fused_setup_context)


def fused_sinkhorn_plan(
    kernel: torch.Tensor,
    row_mass: torch.Tensor,
    column_mass: torch.Tensor,
    iterations: int,
    clamp: float,
) -> torch.Tensor:
    """Plain-domain Sinkhorn plans ``diag(f) K diag(g)`` after ``iterations`` iterations, with an
    explicit backward pass; ``kernel`` ``[b, n, m]`` positive, in float32 at least (also under
    mixed precision).

    Forward, from ``g_0 = [b > 0]``: ``r_t = K g_{t-1}``, ``f_t = a / max(r_t, clamp)``,
    ``c_t = K^T f_t``, ``g_t = b / max(c_t, clamp)`` (``clamp`` 0: no clamp; the original clamps at
    1e-8). Backward runs the same recursion in reverse on vectors and collects the kernel's gradient
    as ``dP * f g^T + U V^T`` with ``U = [f_t, dr_t]``, ``V = [dc_t, g_{t-1}]``: one matrix product
    instead of one ``[b, n, m]`` tensor per iteration; a clamped denominator passes no gradient
    (as ``torch.clamp``). Zero-mass rows and columns (padding) get zero plan and zero gradient.
    The marginals are constants (no gradient).
    """
    kernel, row_mass, column_mass = _operator_inputs("fused", kernel, row_mass, column_mass)
    return _fused_forward(kernel, row_mass, column_mass, iterations, clamp)[0]


def _operator_inputs(solver: str, problems, row_mass, column_mass):
    """A Sinkhorn operator's ``(problems, row_mass, column_mass)`` in float32 at least (the
    iterations stay there under mixed precision); the marginals must be constants."""
    if row_mass.requires_grad or column_mass.requires_grad:
        raise ValueError(f"{solver} Sinkhorn: the marginals are constants (no gradient)")
    dtype = torch.promote_types(problems.dtype, torch.float32)
    return tuple(t.to(dtype) for t in (problems, row_mass, column_mass))


def _default_masses(problems, row_mass, column_mass, dtype: torch.dtype | None = None):
    """The masses, uniform (``1/n`` per row, ``1/m`` per column) where None, as POT's default, in
    ``dtype`` (default: the problems')."""
    batch, rows, columns = problems.shape
    dtype = dtype or problems.dtype
    if row_mass is None:
        row_mass = problems.new_full((batch, rows), 1.0 / rows, dtype=dtype)
    if column_mass is None:
        column_mass = problems.new_full((batch, columns), 1.0 / columns, dtype=dtype)
    return row_mass, column_mass


# The log-domain solver (model.ot.solver: log_sinkhorn, the paper preset's) as an operator too:
# POT's batched log_sinkhorn iterations (same start, same order, float32), with a written-out
# backward pass that keeps the 4 x iterations vectors instead of a [b, n, m] tensor per iteration.


def _log_solve(log_kernel, log_rows, log_columns, iterations: int, log_clamp: float | None):
    """One chunk of :func:`log_sinkhorn_plan`: the plan, the potentials ``u_t``, ``v_t`` (``v_0``
    first) and the row and column log-sums ``r_t``, ``c_t`` before their clamp."""
    v = log_kernel.new_zeros(log_kernel.shape[0], log_kernel.shape[2])
    us, vs, rs, cs = [], [v], [], []
    for _ in range(iterations):
        r = torch.logsumexp(log_kernel + v[:, None, :], dim=2)
        u = log_rows - (r if log_clamp is None else r.clamp(min=log_clamp))
        c = torch.logsumexp(log_kernel + u[:, :, None], dim=1)
        v = log_columns - (c if log_clamp is None else c.clamp(min=log_clamp))
        us.append(u)
        vs.append(v)
        rs.append(r)
        cs.append(c)
    plan = torch.exp(log_kernel + u[:, :, None] + v[:, None, :])
    return plan, torch.stack(us), torch.stack(vs), torch.stack(rs), torch.stack(cs)


def _log_solve_backward(grad_plan, log_kernel, plan, us, vs, rs, cs, log_clamp: float | None):
    """One chunk of :func:`log_sinkhorn_plan`'s backward pass: the log-kernel's gradient.

    ``u_t = log a - r_t`` with ``r_t = LSE_j(log K + v_{t-1})``: ``d r_t / d log K`` is the row
    softmax ``exp(log K + v_{t-1} - r_t)``, ``d r_t / d v_{t-1}`` its column sums; likewise
    ``c_t`` with the column softmax ``exp(log K + u_t - c_t)``. A clamped log-sum passes no
    gradient (as ``torch.clamp``)."""
    weighted = grad_plan * plan
    grad = weighted.clone()
    grad_u, grad_v = weighted.sum(dim=2), weighted.sum(dim=1)
    for t in range(len(us) - 1, -1, -1):
        grad_c = -grad_v if log_clamp is None else torch.where(cs[t] >= log_clamp, -grad_v, 0.0)
        share = torch.exp(log_kernel + us[t][:, :, None] - cs[t][:, None, :]) * grad_c[:, None, :]
        grad += share
        grad_u = grad_u + share.sum(dim=2)
        grad_r = -grad_u if log_clamp is None else torch.where(rs[t] >= log_clamp, -grad_u, 0.0)
        share = torch.exp(log_kernel + vs[t][:, None, :] - rs[t][:, :, None]) * grad_r[:, :, None]
        grad += share
        grad_v = share.sum(dim=1)
        grad_u = torch.zeros_like(grad_u)
    return grad


def _log_clamp(clamp: float) -> float | None:
    return math.log(clamp) if clamp > 0 else None


@torch.library.custom_op("remote::log_sinkhorn", mutates_args=())
def _log_forward(
    cost: torch.Tensor,
    row_mass: torch.Tensor,
    column_mass: torch.Tensor,
    epsilon: float,
    iterations: int,
    clamp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    log_rows, log_columns = row_mass.log(), column_mass.log()
    with torch.autocast(cost.device.type, enabled=False):
        parts = [
            _log_solve(
                cost[c] / -epsilon, log_rows[c], log_columns[c], iterations, _log_clamp(clamp)
            )
            for c in _batch_chunks(cost, CHUNK_ELEMENTS)
        ]
    return _merge_chunks(parts)


@_log_forward.register_fake
def _(cost, row_mass, column_mass, epsilon, iterations, clamp):
    return _solve_outputs(cost, iterations)


@torch.library.custom_op("remote::log_sinkhorn_backward", mutates_args=())
def _log_backward(
    grad_plan: torch.Tensor,
    cost: torch.Tensor,
    plan: torch.Tensor,
    us: torch.Tensor,
    vs: torch.Tensor,
    rs: torch.Tensor,
    cs: torch.Tensor,
    epsilon: float,
    clamp: float,
) -> torch.Tensor:
    grad_plan = grad_plan.to(cost.dtype)
    with torch.autocast(cost.device.type, enabled=False):
        parts = [
            _log_solve_backward(
                grad_plan[c], cost[c] / -epsilon, plan[c], us[:, c], vs[:, c], rs[:, c],
                cs[:, c], _log_clamp(clamp),
            ) / -epsilon
            for c in _batch_chunks(cost, CHUNK_ELEMENTS)
        ]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@_log_backward.register_fake
def _(grad_plan, cost, plan, us, vs, rs, cs, epsilon, clamp):
    return torch.empty_like(cost)


def _log_setup_context(ctx, inputs, output) -> None:
    cost, _, _, epsilon, _, clamp = inputs
    ctx.save_for_backward(cost, *output)
    ctx.epsilon, ctx.clamp = epsilon, clamp


def _log_grad(ctx, grad_plan, *_):
    grad = _log_backward(grad_plan, *ctx.saved_tensors, ctx.epsilon, ctx.clamp)
    return grad, None, None, None, None, None


_log_forward.register_autograd(_log_grad, setup_context=_log_setup_context)


def log_sinkhorn_plan(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    row_mass: torch.Tensor | None = None,
    column_mass: torch.Tensor | None = None,
    *,
    clamp: float = 0.0,
) -> torch.Tensor:
    """POT's batched ``log_sinkhorn`` plans ``exp(-C/eps + u + v)`` after exactly ``iterations``
    iterations (from ``v_0 = 0``: ``u_t = log a - LSE(-C/eps + v_{t-1})``, then ``v_t`` the same
    over columns), in float32 at least (also under mixed precision), masses uniform by default;
    ``clamp > 0`` clamps each log-sum from below at ``log clamp`` (:func:`clamped_sinkhorn_plan`).
    Its backward pass is written out: it runs the recursion in reverse, rebuilding each
    iteration's softmax from the kept potentials, so it keeps vectors instead of a ``[b, n, m]``
    tensor per iteration and needs no second solve. The marginals are constants (no gradient);
    zero-mass rows and columns (padding) get zero plan and zero gradient."""
    # Uniform masses in the iterations' precision: 1/5 in bfloat16 would be 0.2002.
    working = torch.promote_types(cost.dtype, torch.float32)
    row_mass, column_mass = _default_masses(cost, row_mass, column_mass, working)
    cost, row_mass, column_mass = _operator_inputs("log-domain", cost, row_mass, column_mass)
    return _log_forward(cost, row_mass, column_mass, epsilon, iterations, clamp)[0]


def _batch_chunks(problems: torch.Tensor, elements: int) -> list[slice]:
    """Slices of the batch of about ``elements`` plan elements each on the CPU; one slice (the
    whole batch) on other devices."""
    batch, rows, columns = problems.shape
    if problems.device.type != "cpu":
        return [slice(0, batch)]
    chunk = max(1, elements // max(1, rows * columns))
    return [slice(start, start + chunk) for start in range(0, batch, chunk)] or [slice(0, 0)]


def clamped_sinkhorn_plan(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    row_mass: torch.Tensor | None,
    column_mass: torch.Tensor | None,
    *,
    solver: str,
    clamp: float,
) -> torch.Tensor:
    """POT's batched ``sinkhorn`` / ``log_sinkhorn`` iterations (same start, same order), with every
    denominator clamped from below at ``clamp`` as the original does (``torch.clamp(min=1e-8)``;
    in the log domain ``max(logsumexp, log clamp)``), under plain autograd."""
    batch, _, columns = cost.shape
    row_mass, column_mass = _default_masses(cost, row_mass, column_mass)
    if solver == "log_sinkhorn":
        log_kernel = cost / -epsilon
        log_rows, log_columns = row_mass.log(), column_mass.log()
        log_clamp = math.log(clamp)
        v = cost.new_zeros(batch, columns)
        for _ in range(iterations):
            lse = torch.logsumexp(log_kernel + v[:, None, :], dim=2)
            u = log_rows - lse.clamp(min=log_clamp)
            lse = torch.logsumexp(log_kernel + u[:, :, None], dim=1)
            v = log_columns - lse.clamp(min=log_clamp)
        return torch.exp(log_kernel + u[:, :, None] + v[:, None, :])
    kernel = torch.exp(cost / -epsilon)
    g = cost.new_ones(batch, columns)
    for _ in range(iterations):
        f = row_mass / torch.bmm(kernel, g[:, :, None])[:, :, 0].clamp(min=clamp)
        g = column_mass / torch.bmm(f[:, None, :], kernel)[:, 0].clamp(min=clamp)
    return f[:, :, None] * kernel * g[:, None, :]


def sinkhorn_plan(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    row_mass: torch.Tensor | None = None,
    column_mass: torch.Tensor | None = None,
    *,
    solver: str,
    clamp: float,
) -> torch.Tensor:
    """Entropic plans ``[b, n, m]`` after exactly ``iterations`` Sinkhorn iterations of POT's
    batched ``solver``, differentiable through every iteration; masses default to uniform.
    ``clamp > 0`` runs the same iterations with clamped denominators
    (:func:`clamped_sinkhorn_plan`)."""
    if clamp > 0:
        return clamped_sinkhorn_plan(
            cost, epsilon, iterations, row_mass, column_mass, solver=solver, clamp=clamp
        )
    import ot

    # POT's plain-domain solver creates its scalings with the default device: make it the cost's.
    with torch.device(cost.device):
        result = ot.solve_batch(
            cost,
            epsilon,
            a=row_mass,
            b=column_mass,
            method=solver,
            max_iter=iterations,
            tol=-1,  # run every iteration, as the original does
            grad="autodiff",
        )
    return result.plan


# POT's solvers and their clamped form run eagerly, outside any compiled graph (one graph break per
# OT layer under train.compile): their backward recomputes the solve under autograd, which a
# custom operator's body cannot do (autograd is off there), and traced, the iterations would
# unroll into the graph. The model calls this for model.ot.solver: sinkhorn only (the fused and
# log-domain solvers are operators with written-out backward passes); the tests use it as the
# reference.
@torch.compiler.disable
def transport_plan(
    cost: torch.Tensor,
    epsilon: float,
    iterations: int,
    row_mass: torch.Tensor | None = None,
    column_mass: torch.Tensor | None = None,
    *,
    solver: str,
    clamp: float,
) -> torch.Tensor:
    """:func:`sinkhorn_plan` (POT's solvers, or their clamped form) on batch chunks (on the CPU),
    each recomputed in the backward pass under autograd.

    Unrolled autodiff through the iterations keeps ``[n, m]``-sized memory per iteration: the
    log-domain solver's ``logsumexp`` inputs; for the plain-domain one, heap fragments between its
    saved scaling vectors (measured for 11 layers of ``[32, 128, 128 i]`` plans: 16 GB peak RSS
    without recomputation, 2.5 GB with it). Recomputing costs one more forward solve.
    """
    recompute = torch.is_grad_enabled() and cost.requires_grad
    plans = []
    for c in _batch_chunks(cost, CHUNK_ELEMENTS):
        args = (cost[c], epsilon, iterations, _part(row_mass, c), _part(column_mass, c))
        if recompute:
            plan = checkpoint(sinkhorn_plan, *args, solver=solver, clamp=clamp, use_reentrant=False)
        else:
            plan = sinkhorn_plan(*args, solver=solver, clamp=clamp)
        plans.append(plan)
    return plans[0] if len(plans) == 1 else torch.cat(plans)


def _part(tensor: torch.Tensor | None, chunk: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[chunk]


def _uniform_mass(mask: torch.Tensor) -> torch.Tensor:
    mass = mask.to(torch.float32)
    return mass / mass.sum(dim=-1, keepdim=True)


# The solvers MultilevelTransport runs (tests/test_config.py: the same names params accept).
SOLVERS = ("fused", "sinkhorn", "log_sinkhorn")


class MultilevelTransport(nn.Module):
    """One layer's transport from its output to the earlier states of the same stream."""

    def __init__(
        self,
        hidden: int,
        epsilon: float,
        iterations: int,
        kernel_floor: float,
        barycentric: bool,
        clamp: float,
        solver: str,
    ) -> None:
        super().__init__()
        if clamp < 0:
            raise ValueError(f"model.ot.clamp must be >= 0, found {clamp}")
        if solver not in SOLVERS:  # a name params accept but no code here runs: refused
            raise ValueError(f"model.ot.solver {solver!r}: this code implements {SOLVERS}")
        problem = floor_problem(solver, kernel_floor)
        if problem:
            raise ValueError(problem)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.query_norm = nn.LayerNorm(hidden)
        self.key_norm = nn.LayerNorm(hidden)
        self.weight = nn.Parameter(torch.ones(()))
        self.epsilon = epsilon
        self.iterations = iterations
        self.kernel_floor = kernel_floor
        self.barycentric = barycentric
        self.clamp = clamp
        self.solver = solver
        self.regime: RegimeStats | None = None  # set by regime.record_regime

    def regime_threshold(self) -> float:
        """The cost above which a kernel entry is lost in the floor (:mod:`.regime`)."""
        return floor_threshold(self.epsilon, self.kernel_floor)

    def plan(
        self,
        hidden: torch.Tensor,
        source: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transport plan ``[B, n, m]`` (float32) from ``hidden`` ``[B, n, D]`` to ``source``
        ``[B, m, D]``; masks are ``True`` on real tokens."""
        return self._plan_and_cost(hidden, source, hidden_mask, source_mask)[0]

    def _plan_and_cost(self, hidden, source, hidden_mask, source_mask):
        queries = self.query_norm(self.query(hidden)).float()
        keys = self.key_norm(self.key(source)).float()
        distance = torch.cdist(queries, keys)
        if self.solver == "fused":
            plan = self._fused_plan(distance, hidden_mask, source_mask)
        else:
            plan = self._cost_plan(distance, hidden_mask, source_mask)
        if self.barycentric:
            # Rows sum to their mass (1/n); rescale them to 1. Padded rows have no mass: keep 0.
            total = plan.sum(dim=-1, keepdim=True)
            plan = plan / torch.where(total > 0, total, torch.ones_like(total))
        return plan, distance

    def _fused_plan(self, distance, hidden_mask, source_mask) -> torch.Tensor:
        batch, rows, columns = distance.shape
        if hidden_mask is None:
            hidden_mask = distance.new_ones(batch, rows, dtype=torch.bool)
        if source_mask is None:
            source_mask = distance.new_ones(batch, columns, dtype=torch.bool)
        row_mass, column_mass = _uniform_mass(hidden_mask), _uniform_mass(source_mask)
        # Padding needs no masked cost here: its zero mass zeroes its scalings from g_0 on.
        kernel = torch.exp(distance / -self.epsilon) + self.kernel_floor
        return fused_sinkhorn_plan(kernel, row_mass, column_mass, self.iterations, self.clamp)

    def _cost_plan(self, distance, hidden_mask, source_mask) -> torch.Tensor:
        """``log_sinkhorn`` and ``sinkhorn``: the plan from the floored cost, padded columns
        priced out."""
        cost = floored_cost(distance, self.epsilon, self.kernel_floor)
        row_mass = column_mass = None
        if hidden_mask is not None:
            row_mass = _uniform_mass(hidden_mask)
        if source_mask is not None:
            column_mass = _uniform_mass(source_mask)
            dearest = cost.detach().amax(dim=(1, 2), keepdim=True)
            cost = torch.where(
                source_mask[:, None, :], cost, dearest + MASKED_COST_MARGIN * self.epsilon
            )
        settings = (self.epsilon, self.iterations, row_mass, column_mass)
        if self.solver == "log_sinkhorn":
            return log_sinkhorn_plan(cost, *settings, clamp=self.clamp)
        return transport_plan(cost, *settings, solver=self.solver, clamp=self.clamp)

    def forward(
        self,
        hidden: torch.Tensor,
        source: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan, distance = self._plan_and_cost(hidden, source, hidden_mask, source_mask)
        update = self.weight * torch.bmm(plan, source.float()).to(hidden.dtype)
        if self.regime is not None:
            valid = None
            if hidden_mask is not None or source_mask is not None:
                batch, rows, columns = distance.shape
                real_rows = _or_all(hidden_mask, batch, rows, distance.device)
                real_columns = _or_all(source_mask, batch, columns, distance.device)
                valid = real_rows[:, :, None] & real_columns[:, None, :]
            self.regime.add_cost(distance, valid)
            self.regime.add_update(hidden, update, hidden_mask)
        return hidden + update


def _or_all(mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    if mask is not None:
        return mask
    return torch.ones(batch, length, dtype=torch.bool, device=device)


def token_sum(state: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over real tokens [B, 1, D], their number [B, 1, 1])`` of ``state`` ``[B, n, D]``
    (float32); ``mask`` ``[B, n]`` True on real tokens, None: all."""
    state = state.float()
    if mask is None:
        count = state.new_full((state.shape[0], 1, 1), float(state.shape[1]))
        return state.sum(dim=1, keepdim=True), count
    weights = mask.to(state.dtype).unsqueeze(1)  # [B, 1, n]
    return torch.bmm(weights, state), weights.sum(dim=-1, keepdim=True)


class UniformTransport(nn.Module):
    """``model.ot.mode: uniform``: what :class:`MultilevelTransport` computes when its whole kernel
    is on the floor (every cost above :func:`~pipeline.model.regime.floor_threshold`).

    A constant kernel makes the plan the product of the marginals, ``a b^T``, so ``Pi S`` is
    ``mean(S) / n`` on every real row (``barycentric``: ``mean(S)``) and 0 on padded rows, with the
    mean over the real source tokens and ``n`` the number of real query tokens. Then
    ``h <- h + w * Pi S``: no projections, LayerNorms or Sinkhorn, only the scalar ``w`` (init 1).
    """

    def __init__(self, barycentric: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.barycentric = barycentric
        self.regime: RegimeStats | None = None  # set by regime.record_regime

    def regime_threshold(self) -> None:
        return None  # no cost and no kernel: the monitor reports the update's size only

    def forward(
        self,
        hidden: torch.Tensor,
        source: torch.Tensor,
        hidden_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total, count = token_sum(source, source_mask)
        return self.add_mean(hidden, total / count, hidden_mask)

    def add_mean(
        self, hidden: torch.Tensor, mean: torch.Tensor, hidden_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`forward` given ``mean(S)`` ``[B, 1, D]`` (the encoder keeps running sums of its
        states instead of concatenating them)."""
        batch, rows, _ = hidden.shape
        # Each row's mass: 1/n on real rows (1 when barycentric), 0 on padding.
        row_mass = _uniform_mass(_or_all(hidden_mask, batch, rows, hidden.device))
        if self.barycentric:
            row_mass = (row_mass > 0).float()
        update = self.weight * (row_mass.unsqueeze(-1) * mean).to(hidden.dtype)
        if self.regime is not None:
            self.regime.add_update(hidden, update, hidden_mask)
        return hidden + update
