"""Padding-free ("packed") re-scoring forwards for causal LMs: a micro-batch's rows as one sequence of attended tokens.

Each row keeps its own position ids (restarting at 0, as the padded forward's `position_ids_from_mask` gives them)
and no attention mask is passed: transformers (>= 5, `masking_utils.find_packed_sequence_indices`) then builds the
block-diagonal causal mask from the position ids, and flash-attention's varlen path reads them too. Only the
positions that predict a response token are sent to the LM head. Used by `CausalLMPolicy(packed=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[N, W] position ids that skip padding (cumsum - 1, 0 on pads), as HF `generate` builds them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


@dataclass
class PackedLayout:
    """n rows of a micro-batch as one padding-free sequence of S attended tokens (`packed_layout`).

    Attributes:
        tokens: [S] the attended tokens, row after row.
        positions: [S] position ids restarting at 0 for each row (the padded forward's `position_ids_from_mask`).
        targets: [K] packed indices of the attended response tokens, in row-major order.
        response: [n, T] bool, where those K tokens sit in the rows' last T columns.
    """

    tokens: Tensor
    positions: Tensor
    targets: Tensor
    response: Tensor

    def unpack(self, values: Tensor) -> Tensor:
        """[n, T] from per-target values [K] (0 where no attended response token is)."""
        out = values.new_zeros(self.response.shape)
        return out.masked_scatter(self.response, values)


def packed_layout(input_ids: Tensor, attention_mask: Tensor, num_steps: int) -> PackedLayout:
    """Concatenate the attended tokens of rows [n, W] (the last `num_steps` columns: the response) into one sequence.

    Raises:
        ValueError: a row whose response has no attended token before it (its first target has no predicting
            position of its own).
    """
    attention = attention_mask.bool()
    if bool((~attention[:, :-num_steps].any(dim=1)).any()):
        raise ValueError("packed forwards need at least one attended prompt token before each response")
    index = attention.flatten().long().cumsum(0).reshape(attention.shape) - 1  # packed index of every token
    response = attention.clone()
    response[:, :-num_steps] = False
    return PackedLayout(
        tokens=input_ids[attention],
        positions=position_ids_from_mask(attention)[attention],
        targets=index[response],
        response=response[:, -num_steps:],
    )


def check_packing_support() -> None:
    """ValueError unless transformers builds packed-sequence masks from position ids (attention_mask=None)."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "packed=True needs a transformers whose masks separate packed sequences by their position ids "
            "(transformers.masking_utils.find_packed_sequence_indices); upgrade transformers or keep packed=False"
        ) from error
