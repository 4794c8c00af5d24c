"""One code path for LSTM, GRU and tanh-RNN stacks with batch-first, explicit state.

The state convention (docs/architecture.md): a tuple of tensors shaped [B, layers, hidden] -
(h, c) for an LSTM, (h,) for a GRU or RNN. PyTorch's cells want [layers, B, hidden], so the
transposes live here and nowhere else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

CELLS = ("lstm", "gru", "rnn")

State = tuple[torch.Tensor, ...]


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    """`getattr(nn, cell.upper())` keeps the three cells one code path; LSTM forget gates start at 1."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    rnn = getattr(nn, cell.upper())(
        input_size, hidden_size, num_layers, batch_first=True,
        dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional,
    )
    if cell == "lstm":
        # Gate order is (input, forget, cell, output); a forget bias of 1 keeps early gradients alive
        # (Jozefowicz et al. 2015). Both bias vectors are summed, so set one and zero the other.
        for name, param in rnn.named_parameters():
            if name.startswith("bias_ih"):
                with torch.no_grad():
                    param.zero_()
                    param[hidden_size:2 * hidden_size].fill_(1.0)
            elif name.startswith("bias_hh"):
                with torch.no_grad():
                    param.zero_()
    return rnn


def num_state_tensors(cell: str) -> int:
    return 2 if cell == "lstm" else 1


def zero_state(cell: str, batch: int, layers: int, hidden: int, device=None) -> State:
    return tuple(torch.zeros(batch, layers, hidden, device=device) for _ in range(num_state_tensors(cell)))


def run_rnn(rnn: nn.RNNBase, cell: str, x: torch.Tensor, lengths: torch.Tensor, state: State
            ) -> tuple[torch.Tensor, State]:
    """Run `rnn` over padded `x` [B, T, E]; row b's output state is its state after lengths[b] steps.

    Packing makes padding invisible to every row (and exports as the ONNX RNN ops' `sequence_lens`).
    """
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    torch_state = tuple(s.transpose(0, 1).contiguous() for s in state)
    out, new_state = rnn(packed, torch_state if cell == "lstm" else torch_state[0])
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    if cell != "lstm":
        new_state = (new_state,)
    return out, tuple(s.transpose(0, 1) for s in new_state)


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while carrying the values forward (`repackage_hidden`)."""
    return tuple(s.detach() for s in state)
