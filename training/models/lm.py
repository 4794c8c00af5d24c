"""Recurrent language model: embedding -> stacked LSTM/GRU/RNN with dropout -> projection to the vocabulary."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.models.rnn import State, make_rnn, run_rnn, zero_state


@dataclass
class LMArgs:
    vocab_size: int
    cell: str = "lstm"  # lstm | gru | rnn
    embedding_size: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    tie_weights: bool = False  # share the embedding with the output layer (adds a projection if sizes differ)


class LanguageModel(nn.Module):
    kind = "lm"

    def __init__(self, args: LMArgs):
        super().__init__()
        self.args = args
        self.embedding = nn.Embedding(args.vocab_size, args.embedding_size)
        self.rnn = make_rnn(args.cell, args.embedding_size, args.hidden_size, args.num_layers, args.dropout)
        self.dropout = nn.Dropout(args.dropout)
        out_in = args.hidden_size
        self.bottleneck = None
        if args.tie_weights and args.hidden_size != args.embedding_size:
            self.bottleneck = nn.Linear(args.hidden_size, args.embedding_size)
            out_in = args.embedding_size
        self.output = nn.Linear(out_in, args.vocab_size)
        if args.tie_weights:
            self.output.weight = self.embedding.weight

    def model_args(self) -> dict:
        return asdict(self.args)

    def initial_state(self, batch: int, device=None) -> State:
        return zero_state(self.args.cell, batch, self.args.num_layers, self.args.hidden_size, device)

    def recur(self, tokens: torch.Tensor, lengths: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Embedding -> recurrent layers: (top-layer outputs [B,T,H], state). The prefill graph is this, then
        the log-probs of each row's last position only."""
        x = self.dropout(self.embedding(tokens))
        return run_rnn(self.rnn, self.args.cell, x, lengths, state)

    def logits(self, tokens: torch.Tensor, lengths: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self.recur(tokens, lengths, state)
        return self.project(out), state

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """Top-layer outputs [..., H] -> logits [..., V]."""
        out = self.dropout(out)
        if self.bottleneck is not None:
            out = self.bottleneck(out)
        return self.output(out)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, *state: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """(tokens[B,T], lengths[B], *state) -> (log_probs[B,T,V], *state); flat so it exports as is."""
        logits, new_state = self.logits(tokens, lengths, tuple(state))
        return (torch.log_softmax(logits, dim=-1), *new_state)

    def step_fn(self):
        """The reference decoders' view of this model: one token per row, state in and out."""
        def step(tokens: torch.Tensor, state: State):
            out = self(tokens[:, None], torch.ones_like(tokens), *state)
            return out[0][:, 0], tuple(out[1:])
        return step

    def prefill(self, prompts: list[list[int]], device=None) -> tuple[torch.Tensor, State]:
        """Feed all but the last token of each prompt; return (last tokens[B], state) to start decoding.

        A prompt of one token starts from the zero state, as the server's engine does.
        """
        batch = len(prompts)
        state = self.initial_state(batch, device)
        last = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
        heads = [p[:-1] for p in prompts]
        if any(heads):
            lengths = torch.tensor([max(len(h), 1) for h in heads], dtype=torch.long)
            tokens = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=device)
            for i, h in enumerate(heads):
                tokens[i, : len(h)] = torch.tensor(h, dtype=torch.long)
            _, fed = self.logits(tokens, lengths.to(device), state)
            # Rows with an empty head were fed a padding token: keep their zero state.
            has_head = torch.tensor([bool(h) for h in heads], device=device)
            state = tuple(torch.where(has_head[:, None, None], f, s) for f, s in zip(fed, state, strict=True))
        return last, state
