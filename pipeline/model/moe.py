"""Layer-wise mixture-of-experts aggregation.

One direction (e.g. vision -> text): every recorded state ``V_j`` of the other stream (detached) is read
by its own cross-attention with this stream's tokens as queries, giving ``A_j``. A per-token router
``softmax(Linear((J + 1) D -> J + 1)([t, A_0 .. A_{J-1}]))`` mixes expert 0 (``t`` itself) and experts
``j + 1 = t + act([t, A_j] W1_j) W2_j``. As in the original, the experts' weights are two 3-D tensors
``W1 [J, 2D, D]`` and ``W2 [J, D, D]`` without biases, ``act`` is the activation of the tower whose
tokens are the queries' *source* side (see :class:`LayerwiseMoE`), and the cross-attention drops
attention probabilities at that tower's attention dropout rate.

Everything here acts on each query token independently, so the model runs it only on the tokens its
head reads (entity markers, entity objects); the result equals running it on every token and
gathering.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CrossAttention", "LayerwiseMoE"]


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a state, then ``LayerNorm(W_o ...)``.

    A key bias would shift every score of a query by the same amount, so there is none. The key and
    value projections are folded into the (few) queries instead of applied to the (many) state tokens:
    ``q_h . (W_k^h s) = (W_k^h^T q_h) . s`` and ``sum_s p_s (W_v^h s + b_v^h) = W_v^h sum_s p_s s +
    (sum_s p_s) b_v^h``, which is the same attention (attention dropout included) at a fraction of
    the cost when queries are fewer than keys.
    """

    def __init__(self, hidden: int, num_heads: int, attention_dropout: float) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = nn.Dropout(attention_dropout)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(
        self, queries: torch.Tensor, state: torch.Tensor, state_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``queries`` ``[B, N, D]`` over ``state`` ``[B, M, D]`` (``state_mask`` ``[B, M]``, True on
        real tokens, or None) -> ``[B, N, D]``."""
        batch, count, hidden = queries.shape
        heads, head_dim = self.num_heads, hidden // self.num_heads
        q = self.query(queries).reshape(batch, count, heads, head_dim) * head_dim**-0.5
        key_weight = self.key.weight.reshape(heads, head_dim, hidden)
        folded = torch.einsum("bnhd,hdc->bhnc", q, key_weight).reshape(batch, heads * count, hidden)
        scores = torch.bmm(folded, state.transpose(1, 2))  # [B, H*N, M]
        if state_mask is not None:
            scores = scores.masked_fill(~state_mask[:, None, :], float("-inf"))
        probabilities = self.dropout(scores.softmax(dim=-1))
        mixed = torch.bmm(probabilities, state).reshape(batch, heads, count, hidden)
        value_weight = self.value.weight.reshape(heads, head_dim, hidden)
        context = torch.einsum("bhnc,hdc->bnhd", mixed, value_weight)
        # The value bias enters as sum_s p_s b_v: b_v itself in eval mode, but scaled by the kept
        # (rescaled) probability mass when attention dropout is on.
        mass = probabilities.sum(dim=-1).reshape(batch, heads, count)
        bias = torch.einsum("bhn,hd->bnhd", mass, self.value.bias.reshape(heads, head_dim))
        return self.norm(self.output((context + bias).reshape(batch, count, hidden)))


class LayerwiseMoE(nn.Module):
    """Aggregates the ``num_states`` recorded states of the other stream into this stream's tokens.

    ``activation`` and ``attention_dropout`` come from the tower that runs *this* stream's side of
    the original's module: the text tower's for vision -> text (GELU, 0.1 for BERT), the vision
    tower's for text -> vision (QuickGELU, 0.0 for CLIP).
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_states: int,
        activation: nn.Module,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            CrossAttention(hidden, num_heads, attention_dropout) for _ in range(num_states)
        )
        # Expert j's weights: up[j] [2D, D] and down[j] [D, D] (inputs times weights, no bias).
        self.up = nn.Parameter(torch.empty(num_states, 2 * hidden, hidden))
        self.down = nn.Parameter(torch.empty(num_states, hidden, hidden))
        self.activation = activation
        self.router = nn.Linear((num_states + 1) * hidden, num_states + 1)
        self.reset_experts()

    def reset_experts(self) -> None:
        """The original's init: Xavier-uniform over each 3-D tensor (PyTorch's fan rule for
        tensors of more than 2 dims: fan_in = size(1) * size(2), fan_out = size(0) * size(2))."""
        nn.init.xavier_uniform_(self.up)
        nn.init.xavier_uniform_(self.down)

    def forward(
        self,
        tokens: torch.Tensor,
        states: list[torch.Tensor],
        state_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tokens`` ``[B, N, D]``; ``states``: the other stream's ``J`` states ``[B, M_j, D]``
        (detached here); ``state_mask`` ``[B, M]`` for states that carry text padding."""
        if len(states) != self.up.shape[0]:
            raise ValueError(f"expected {self.up.shape[0]} states, got {len(states)}")
        attended = [
            attention(tokens, state.detach(), state_mask)
            for attention, state in zip(self.attentions, states, strict=True)
        ]
        weights = self.router(torch.cat([tokens, *attended], dim=-1)).softmax(dim=-1)
        stacked = torch.stack(attended, dim=2)  # [B, N, J, D]
        pairs = torch.cat([tokens[:, :, None].expand_as(stacked), stacked], dim=-1)
        inner = self.activation(torch.einsum("bnjc,jcd->bnjd", pairs, self.up))
        experts = tokens[:, :, None] + torch.einsum("bnjc,jcd->bnjd", inner, self.down)
        outputs = torch.cat([tokens[:, :, None], experts], dim=2)  # [B, N, J + 1, D]
        return torch.einsum("bne,bned->bnd", weights, outputs)
