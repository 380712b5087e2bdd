"""Multilevel OT: the log-domain operator, POT's solvers and the fused plain-domain solver against
plain-domain references and each other, the floor quirk, padding, barycentric rows,
recompute-in-backward and chunking."""

from __future__ import annotations

import ot as pot
import pytest
import torch

from pipeline.model import ot as model_ot
from pipeline.model.ot import (
    MultilevelTransport,
    floored_cost,
    fused_sinkhorn_plan,
    log_sinkhorn_plan,
    sinkhorn_plan,
    transport_plan,
)

EPS = 0.5


def plain_sinkhorn(cost, epsilon, iterations, floor, row_mass, column_mass):
    """Plain-domain Sinkhorn on the kernel exp(-C/eps) + floor (float64), u first, from v = 1."""
    kernel = torch.exp(-cost / epsilon) + floor
    v = torch.ones_like(column_mass)
    for _ in range(iterations):
        u = row_mass / (kernel @ v)
        v = column_mass / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def module(
    hidden: int,
    floor: float,
    iterations: int = 50,
    barycentric: bool = False,
    solver: str = "log_sinkhorn",
    clamp: float = 0.0,
):
    torch.manual_seed(0)
    layer = MultilevelTransport(hidden, EPS, iterations, floor, barycentric, clamp, solver)
    with torch.no_grad():
        layer.weight.fill_(0.7)
    return layer


def reference_costs(layer, hidden, source):
    """cdist(LN(W_q Q), LN(W_k S)) in float64, from the module's parameters."""
    layer = layer.double()
    q = layer.query_norm(layer.query(hidden.double()))
    k = layer.key_norm(layer.key(source.double()))
    layer.float()
    return torch.cdist(q, k)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SOLVER_FLOORS = [
    ("log_sinkhorn", 0.0),
    ("log_sinkhorn", 1e-12),
    ("log_sinkhorn", 1e-3),
    ("sinkhorn", 1e-12),
    ("sinkhorn", 1e-3),
    ("fused", 1e-12),
    ("fused", 1e-3),
]


@pytest.mark.parametrize(("solver", "floor"), SOLVER_FLOORS)
def test_layer_plan_and_output_match_plain_domain_reference(solver, floor):
    # Hidden size 8: costs ~2-8, so exp(-C/eps) is well inside float64 and the floor matters at 1e-3.
    layer = module(8, floor, solver=solver, clamp=0.0)
    torch.manual_seed(1)
    hidden, source = torch.randn(3, 5, 8), torch.randn(3, 9, 8)
    with torch.no_grad():
        plan = layer.plan(hidden, source)
        out = layer(hidden, source)
    costs = reference_costs(layer, hidden, source)
    for b in range(3):
        rows, cols = torch.full((5,), 1 / 5, dtype=torch.float64), torch.full((9,), 1 / 9).double()
        ref = plain_sinkhorn(costs[b], EPS, 50, floor, rows, cols)
        assert rel_err(plan[b], ref) <= 1e-4
        ref_out = hidden[b].double() + 0.7 * ref @ source[b].double()
        assert rel_err(out[b], ref_out) <= 1e-4
    # The floor changes the plan measurably at 1e-3, so the reference is not trivially the same.
    if floor == 1e-3:
        pure = plain_sinkhorn(costs[0], EPS, 50, 0.0, rows, cols)
        assert rel_err(plan[0], pure) > 1e-3


def test_matches_pot_single_problem_sinkhorn_with_floor_zero():
    torch.manual_seed(2)
    cost = torch.rand(2, 6, 10, dtype=torch.float64)  # well conditioned: converged in 50 iterations
    plan = sinkhorn_plan(
        floored_cost(cost.float(), EPS, 0.0), EPS, 50, solver="log_sinkhorn", clamp=0.0
    )
    for b in range(2):
        ref = pot.sinkhorn(
            torch.full((6,), 1 / 6).double(),
            torch.full((10,), 1 / 10).double(),
            cost[b],
            EPS,
            numItermax=1000,
            stopThr=1e-8,
        )
        assert rel_err(plan[b], ref) <= 1e-4


@pytest.mark.parametrize("solver", ["log_sinkhorn", "sinkhorn", "fused"])
def test_floor_quirk_large_costs_give_exactly_uniform_plan(solver):
    # Costs 37-41 (LayerNormed 768-d vectors): exp(-C/eps) < 1e-32, every entry sits on the floor.
    torch.manual_seed(3)
    cost = 37 + 4 * torch.rand(2, 7, 13)
    if solver == "fused":
        kernel = torch.exp(-cost / EPS) + 1e-12
        plan = fused_sinkhorn_plan(
            kernel, torch.full((2, 7), 1 / 7), torch.full((2, 13), 1 / 13), 50, 0.0
        )
    else:
        plan = transport_plan(floored_cost(cost, EPS, 1e-12), EPS, 50, solver=solver, clamp=0.0)
    assert rel_err(plan, torch.full_like(plan, 1 / (7 * 13))) <= 1e-6
    # Without the floor the same costs give a far-from-uniform plan.
    pure = transport_plan(cost, EPS, 50, solver="log_sinkhorn", clamp=0.0)
    assert rel_err(pure, torch.full_like(pure, 1 / (7 * 13))) > 0.5


def test_paper_sized_layer_is_uniform_at_initialization():
    # The quirk as the model meets it: a fresh 768-d layer's plan is 1/(n_q * n_s) everywhere.
    layer = module(768, 1e-12)
    torch.manual_seed(4)
    hidden, source = torch.randn(2, 4, 768), torch.randn(2, 12, 768)
    with torch.no_grad():
        plan = layer.plan(hidden, source)
    assert rel_err(plan, torch.full_like(plan, 1 / 48)) <= 1e-6


@pytest.mark.parametrize(
    ("solver", "floor"),
    [("log_sinkhorn", 0.0), ("log_sinkhorn", 1e-12), ("sinkhorn", 1e-12), ("fused", 1e-12)],
)
def test_padding_has_zero_mass_and_does_not_change_the_real_plan(solver, floor):
    layer = module(8, floor, solver=solver, clamp=0.0)
    torch.manual_seed(5)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    source = torch.randn(2, 12, 8, requires_grad=True)
    hidden_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    source_mask = torch.tensor([[1] * 12, [1] * 4 + [0] * 2 + [1] * 4 + [0] * 2]).bool()
    plan = layer.plan(hidden, source, hidden_mask, source_mask)
    alone = layer.plan(hidden[1:, :4], source[1:, source_mask[1]])[0]
    assert rel_err(plan[1, :4][:, source_mask[1]], alone) <= 1e-5
    assert plan[1, 4:].abs().max() == 0 and plan[1][:, ~source_mask[1]].abs().max() == 0
    assert abs(plan[1].sum().item() - 1) < 1e-5
    # Values and gradients stay finite with zero-mass rows and columns.
    out = layer(hidden, source, hidden_mask, source_mask)
    (out * torch.randn_like(out)).sum().backward()
    grads = [hidden.grad, source.grad] + [p.grad for p in layer.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out).all()
    # Padded query rows are left unchanged (no mass, nothing transported).
    assert torch.equal(out[1, 4:], hidden[1, 4:])


@pytest.mark.parametrize(
    ("solver", "floor"), [("log_sinkhorn", 0.0), ("sinkhorn", 1e-12), ("fused", 1e-12)]
)
def test_padding_gives_the_unpadded_iterates_before_convergence(solver, floor):
    # Two iterations are far from converged, so how the first half-iteration treats padded
    # columns (priced out, or zeroed from g_0) shows: the real block must be exactly the
    # two-iteration plan of the unpadded problem, written out in the plain domain.
    layer = module(8, floor, iterations=2, solver=solver)
    torch.manual_seed(12)
    hidden, source = torch.randn(1, 5, 8), torch.randn(1, 11, 8)
    # Padded columns whose cost is close to the real ones: they would take a visible share of a
    # half-iteration that counted them.
    with torch.no_grad():
        source[0, 6:] = source[0, :5] + 0.05 * torch.randn(5, 8)
    hidden_mask = torch.tensor([[True] * 4 + [False]])
    source_mask = torch.tensor([[True] * 6 + [False] * 5])
    with torch.no_grad():
        plan = layer.plan(hidden, source, hidden_mask, source_mask)[0]
    costs = reference_costs(layer, hidden[:, :4], source[:, :6])[0]
    rows, cols = torch.full((4,), 1 / 4).double(), torch.full((6,), 1 / 6).double()
    reference = plain_sinkhorn(costs, EPS, 2, floor, rows, cols)
    assert rel_err(plan[:4, :6], reference) <= 1e-5
    assert plan[4:].abs().max() == 0 and plan[:, 6:].abs().max() == 0
    # Not converged: a 50-iteration plan is measurably different.
    assert rel_err(plain_sinkhorn(costs, EPS, 50, floor, rows, cols), reference) > 1e-3


def test_barycentric_rows_sum_to_one_and_padded_rows_stay_zero():
    layer = module(8, 1e-12, barycentric=True)
    torch.manual_seed(6)
    hidden, source = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    hidden_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2]).bool()
    with torch.no_grad():
        plan = layer.plan(hidden, source, hidden_mask, None)
    rows = plan.sum(-1)
    assert torch.allclose(rows[0], torch.ones(5), atol=1e-5)
    assert torch.allclose(rows[1, :3], torch.ones(3), atol=1e-5) and rows[1, 3:].abs().max() == 0


def test_recomputed_and_chunked_solve_matches_plain_autodiff(monkeypatch):
    torch.manual_seed(7)
    cost = (3 * torch.rand(5, 6, 9)).requires_grad_()
    weights = torch.randn(5, 6, 9)
    direct = sinkhorn_plan(cost, EPS, 30, solver="log_sinkhorn", clamp=0.0)
    (grad_direct,) = torch.autograd.grad((direct * weights).sum(), cost)
    monkeypatch.setattr(model_ot, "CHUNK_ELEMENTS", 2 * 6 * 9)  # chunks of 2 problems
    chunked = transport_plan(cost, EPS, 30, solver="log_sinkhorn", clamp=0.0)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), cost)
    assert rel_err(chunked, direct) <= 1e-6
    assert rel_err(grad_chunked, grad_direct) <= 1e-5
    assert grad_direct.abs().max() > 0


def test_plain_domain_solver_agrees_with_log_domain_and_refuses_floor_zero():
    torch.manual_seed(8)
    cost = (6 * torch.rand(4, 9, 15)).requires_grad_()
    weights = torch.randn(4, 9, 15)
    plans, grads = [], []
    for solver in ("log_sinkhorn", "sinkhorn"):
        plan = transport_plan(floored_cost(cost, EPS, 1e-6), EPS, 50, solver=solver, clamp=0.0)
        plans.append(plan)
        grads.append(torch.autograd.grad((plan * weights).sum(), cost)[0])
    assert rel_err(plans[1], plans[0]) <= 1e-4
    assert rel_err(grads[1], grads[0]) <= 1e-3
    with pytest.raises(ValueError, match="kernel_floor > 0"):
        MultilevelTransport(8, EPS, 50, 0.0, False, 0.0, "sinkhorn")


def _masses(batch, rows, columns, dtype=torch.float32):
    """Uniform masses with some zero-mass (padded) rows and columns in the last problem."""
    row_mask, column_mask = torch.ones(batch, rows), torch.ones(batch, columns)
    row_mask[-1, rows - 2 :] = 0
    column_mask[-1, 1] = column_mask[-1, columns - 3 :] = 0
    return (
        (row_mask / row_mask.sum(-1, keepdim=True)).to(dtype),
        (column_mask / column_mask.sum(-1, keepdim=True)).to(dtype),
    )


def test_fused_backward_passes_gradcheck_with_padding():
    torch.manual_seed(9)
    kernel = (torch.rand(3, 5, 7, dtype=torch.float64) + 0.05).requires_grad_()
    rows, columns = _masses(3, 5, 7, torch.float64)
    assert torch.autograd.gradcheck(
        lambda k: fused_sinkhorn_plan(k, rows, columns, 12, 0.0), (kernel,)
    )


@pytest.mark.parametrize("floor", [1e-12, 1e-3])
def test_fused_solver_equals_pot_plain_domain_solver_in_plan_and_gradient(floor):
    # Same iterates as POT's batched `sinkhorn`, from the same costs, padding included.
    torch.manual_seed(10)
    distance = (4 * torch.rand(4, 9, 15)).requires_grad_()
    weights = torch.randn(4, 9, 15)
    rows, columns = _masses(4, 9, 15)
    fused = fused_sinkhorn_plan(torch.exp(-distance / EPS) + floor, rows, columns, 50, 0.0)
    (grad_fused,) = torch.autograd.grad((fused * weights).sum(), distance)
    reference = sinkhorn_plan(
        floored_cost(distance, EPS, floor), EPS, 50, rows, columns, solver="sinkhorn", clamp=0.0
    )
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), distance)
    assert rel_err(fused, reference) <= 1e-5
    assert rel_err(grad_fused, grad_reference) <= 1e-4
    assert grad_reference.abs().max() > 0
    # Padding: zero plan and zero gradient on zero-mass rows and columns.
    assert fused[-1, 7:].abs().max() == 0 and fused[-1][:, 12:].abs().max() == 0
    assert grad_fused[-1, 7:].abs().max() == 0 and grad_fused[-1][:, 12:].abs().max() == 0


def test_fused_chunks_match_one_problem_at_once(monkeypatch):
    torch.manual_seed(11)
    kernel = (torch.rand(5, 6, 9) + 0.1).requires_grad_()
    weights = torch.randn(5, 6, 9)
    rows, columns = _masses(5, 6, 9)
    whole = fused_sinkhorn_plan(kernel, rows, columns, 30, 0.0)
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), kernel)
    # 6 * 9 elements per thread x 2 threads: chunks of 2 problems.
    monkeypatch.setattr(model_ot, "FUSED_CHUNK_ELEMENTS", 6 * 9)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    chunked = fused_sinkhorn_plan(kernel, rows, columns, 30, 0.0)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), kernel)
    assert rel_err(chunked, whole) <= 1e-6 and rel_err(grad_chunked, grad_whole) <= 1e-6


def test_fused_solver_refuses_floor_zero_and_learned_marginals():
    with pytest.raises(ValueError, match="kernel_floor > 0"):
        MultilevelTransport(8, EPS, 50, 0.0, False, 0.0, "fused")
    rows = torch.full((1, 3), 1 / 3, requires_grad=True)
    with pytest.raises(ValueError, match="constants"):
        fused_sinkhorn_plan(torch.rand(1, 3, 4), rows, torch.full((1, 4), 0.25), 5, 0.0)


def test_fused_solver_stays_float32_under_mixed_precision():
    torch.manual_seed(12)
    distance = (4 * torch.rand(2, 5, 8)).requires_grad_()
    rows, columns = _masses(2, 5, 8)
    weights = torch.randn(2, 5, 8)
    plans, grads = [], []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            plan = fused_sinkhorn_plan(torch.exp(-distance / EPS) + 1e-3, rows, columns, 50, 0.0)
        plans.append(plan)
        grads.append(torch.autograd.grad((plan * weights).sum(), distance)[0])
    assert plans[1].dtype == torch.float32
    assert rel_err(plans[1], plans[0]) <= 1e-6 and rel_err(grads[1], grads[0]) <= 1e-6


def clamped_reference(cost, epsilon, iterations, floor, clamp, row_mass, column_mass):
    """The original's iterations (float64): u = a / clamp(K v, min), v = b / clamp(K^T u, min)."""
    kernel = torch.exp(-cost / epsilon) + floor
    v = torch.ones_like(column_mass)
    for _ in range(iterations):
        u = row_mass / torch.clamp(kernel @ v, min=clamp)
        v = column_mass / torch.clamp(kernel.T @ u, min=clamp)
    return u[:, None] * kernel * v[None, :]


def small_costs(seed):
    """Costs 8-15: exp(-C/eps) between 1e-7 and 1e-13, so the first K v sums fall near 1e-8."""
    torch.manual_seed(seed)
    return (8 + 7 * torch.rand(2, 5, 7, dtype=torch.float64)).requires_grad_(True)


def far_column_costs(seed):
    """Costs 0-2 but for one column at 20-22: each row's K v is near 1 (no row is clamped), but the
    far column's kernel entries sit on the floor 1e-12, so its K^T u falls below 1e-8."""
    torch.manual_seed(seed)
    cost = 2 * torch.rand(2, 5, 7, dtype=torch.float64)
    cost[:, :, 3] += 20
    return cost.requires_grad_(True)


@pytest.mark.parametrize("costs", [small_costs, far_column_costs], ids=["rows", "columns"])
@pytest.mark.parametrize("solver", ["fused", "sinkhorn", "log_sinkhorn", "log_sinkhorn-operator"])
def test_clamped_denominators_match_the_original_loop_in_plan_and_gradient(solver, costs):
    floor, clamp = 1e-12, 1e-8
    cost = costs(5)
    weights = torch.randn(2, 5, 7, dtype=torch.float64)
    rows, columns = torch.full((2, 5), 1 / 5), torch.full((2, 7), 1 / 7)
    cost32 = cost.float()
    if solver == "fused":
        kernel = torch.exp(-cost32 / EPS) + floor
        plan = fused_sinkhorn_plan(kernel, rows, columns, 50, clamp)
    elif solver == "log_sinkhorn-operator":  # what the model runs for model.ot.solver: log_sinkhorn
        plan = log_sinkhorn_plan(
            floored_cost(cost32, EPS, floor), EPS, 50, rows, columns, clamp=clamp
        )
    else:
        plan = sinkhorn_plan(
            floored_cost(cost32, EPS, floor), EPS, 50, rows, columns, solver=solver, clamp=clamp
        )
    (grad,) = torch.autograd.grad((plan.double() * weights).sum(), cost)
    refs = [
        clamped_reference(cost[b], EPS, 50, floor, clamp, rows[b].double(), columns[b].double())
        for b in range(2)
    ]
    ref = torch.stack(refs)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), cost)
    assert rel_err(plan, ref) <= 1e-4
    assert rel_err(grad, ref_grad) <= 1e-3
    # The clamp is not a no-op here: without it the plan differs.
    unclamped = torch.stack(
        [
            clamped_reference(cost[b], EPS, 50, floor, 0.0, rows[b].double(), columns[b].double())
            for b in range(2)
        ]
    )
    assert rel_err(ref, unclamped) > 1e-3


SOLVERS = ["fused", "sinkhorn", "log_sinkhorn"]


def test_clamp_changes_nothing_on_the_kernel_floor_and_the_layer_takes_it():
    # Costs 37-41: the plan stays exactly uniform with the clamp, as without it.
    torch.manual_seed(6)
    cost = 37 + 4 * torch.rand(2, 7, 13)
    rows, columns = torch.full((2, 7), 1 / 7), torch.full((2, 13), 1 / 13)
    plan = fused_sinkhorn_plan(torch.exp(-cost / EPS) + 1e-12, rows, columns, 50, 1e-8)
    assert rel_err(plan, torch.full_like(plan, 1 / (7 * 13))) <= 1e-6
    # A layer with model.ot.clamp hands it to its solver: fused and POT-path solvers agree.
    hidden, source = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    plans = [module(8, 1e-12, solver=s, clamp=1e-8).plan(hidden, source) for s in SOLVERS]
    for other in plans[1:]:
        assert rel_err(other, plans[0]) <= 1e-4
    with pytest.raises(ValueError, match="clamp"):
        module(8, 1e-12, clamp=-1.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_layer_clamps_its_denominators_as_the_original_loop(solver):
    # LayerNorm gains of 3 put the costs at 6-15, where K v falls below 1e-8 in the first
    # iterations: the layer's plan is the clamped loop's on its own costs, not the unclamped one's.
    layer = module(8, 1e-12, iterations=3, solver=solver, clamp=1e-8)
    with torch.no_grad():
        layer.query_norm.weight.fill_(3.0)
        layer.key_norm.weight.fill_(3.0)
    torch.manual_seed(16)
    hidden, source = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    with torch.no_grad():
        plan = layer.plan(hidden, source)
    costs = reference_costs(layer, hidden, source)
    rows, columns = torch.full((4,), 1 / 4).double(), torch.full((6,), 1 / 6).double()
    for b in range(2):
        reference = clamped_reference(costs[b], EPS, 3, 1e-12, 1e-8, rows, columns)
        assert rel_err(plan[b], reference) <= 1e-4
        unclamped = clamped_reference(costs[b], EPS, 3, 1e-12, 0.0, rows, columns)
        assert rel_err(unclamped, reference) > 1e-2


@pytest.mark.parametrize("clamp", [0.0, 1e-8])
def test_log_domain_operator_equals_pot_autodiff_in_plan_and_gradient(clamp, monkeypatch):
    # The model's log_sinkhorn (an operator with a written-out backward) against the same
    # iterations under autograd: POT's batched log_sinkhorn, or its clamped form. Costs 8-15 make
    # the clamp bite (see small_costs).
    torch.manual_seed(13)
    cost = ((8 + 7 * torch.rand(4, 9, 15)) if clamp else 6 * torch.rand(4, 9, 15)).requires_grad_()
    weights = torch.randn(4, 9, 15)
    rows, columns = _masses(4, 9, 15)
    plan = log_sinkhorn_plan(cost, EPS, 50, rows, columns, clamp=clamp)
    (grad,) = torch.autograd.grad((plan * weights).sum(), cost)
    reference = sinkhorn_plan(cost, EPS, 50, rows, columns, solver="log_sinkhorn", clamp=clamp)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), cost)
    assert torch.equal(plan, reference)  # the same float32 operations in the same order
    assert rel_err(grad, grad_reference) <= 1e-6 and grad_reference.abs().max() > 0
    # Padded rows: zero plan and zero gradient; padded columns: zero plan.
    assert plan[-1, 7:].abs().max() == 0 and plan[-1][:, 12:].abs().max() == 0
    assert grad[-1, 7:].abs().max() == 0
    # Solved in batch chunks on the CPU: the same plan and gradient.
    monkeypatch.setattr(model_ot, "CHUNK_ELEMENTS", 9 * 15)
    chunked = log_sinkhorn_plan(cost, EPS, 50, rows, columns, clamp=clamp)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), cost)
    assert torch.equal(chunked, plan) and rel_err(grad_chunked, grad) <= 1e-6


@pytest.mark.parametrize("clamp", [0.0, 1e-8])
def test_log_domain_backward_passes_gradcheck(clamp):
    torch.manual_seed(14)
    if clamp:
        cost = 8 + 7 * torch.rand(2, 5, 7, dtype=torch.float64)
        rows, columns = torch.full((2, 5), 0.2).double(), torch.full((2, 7), 1 / 7).double()
    else:
        cost = 3 * torch.rand(3, 5, 7, dtype=torch.float64)
        rows, columns = _masses(3, 5, 7, torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: log_sinkhorn_plan(c, EPS, 12, rows, columns, clamp=clamp),
        (cost.requires_grad_(),),
    )


def test_log_domain_operator_stays_float32_and_refuses_learned_marginals():
    torch.manual_seed(15)
    cost = (4 * torch.rand(2, 5, 8)).requires_grad_()
    weights = torch.randn(2, 5, 8)
    plans, grads = [], []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            plan = log_sinkhorn_plan(cost, EPS, 50)
        plans.append(plan)
        grads.append(torch.autograd.grad((plan * weights).sum(), cost)[0])
    assert plans[1].dtype == torch.float32
    assert torch.equal(plans[1], plans[0]) and torch.equal(grads[1], grads[0])
    # A half-precision cost is solved in float32: the plan of its float32 copy.
    half, masses = cost.detach().bfloat16(), (torch.full((2, 5), 0.2), torch.full((2, 8), 0.125))
    plan = log_sinkhorn_plan(half, EPS, 50, *masses)
    assert plan.dtype == torch.float32
    assert torch.equal(plan, log_sinkhorn_plan(half.float(), EPS, 50, *masses))
    # without masses too: the uniform ones are built in float32 (1/5, not bfloat16's 0.2002)
    assert torch.equal(log_sinkhorn_plan(half, EPS, 50), log_sinkhorn_plan(half.float(), EPS, 50))
    rows = torch.full((2, 5), 0.2, requires_grad=True)
    with pytest.raises(ValueError, match="constants"):
        log_sinkhorn_plan(cost, EPS, 5, rows)
