"""Attention encoder-decoder: bidirectional recurrent encoder, bridge, Luong/Bahdanau attention, input feeding."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.models.rnn import State, make_rnn, num_state_tensors, run_rnn

ATTENTIONS = ("dot", "general", "bahdanau")


@dataclass
class Seq2SeqArgs:
    source_vocab_size: int
    target_vocab_size: int
    cell: str = "lstm"  # lstm | gru | rnn, for encoder and decoder alike
    embedding_size: int = 128
    hidden_size: int = 256  # decoder hidden size; also the encoder's output size (memory)
    num_layers: int = 2  # encoder and decoder layers
    bidirectional: bool = True  # encoder reads both ways, each direction hidden_size // 2
    attention: str = "general"  # dot | general (Luong) | bahdanau (additive)
    input_feeding: bool = True  # feed the previous attentional vector into the next decoder step
    dropout: float = 0.2


class Attention(nn.Module):
    """Scores a query [B,H] against memory [B,S,H]; masked positions get zero weight."""

    def __init__(self, kind: str, hidden: int):
        super().__init__()
        if kind not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
        self.kind = kind
        if kind == "general":
            self.query = nn.Linear(hidden, hidden, bias=False)
        elif kind == "bahdanau":
            self.query = nn.Linear(hidden, hidden, bias=False)
            self.key = nn.Linear(hidden, hidden)
            self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "bahdanau":
            scores = self.score(torch.tanh(self.key(memory) + self.query(query)[:, None, :]))[..., 0]
        else:
            q = self.query(query) if self.kind == "general" else query
            scores = torch.bmm(memory, q[:, :, None])[..., 0]
        scores = scores.masked_fill(mask == 0, -1e9)
        weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights[:, None, :], memory)[:, 0]
        return context, weights


class Seq2Seq(nn.Module):
    kind = "seq2seq"

    def __init__(self, args: Seq2SeqArgs):
        super().__init__()
        self.args = args
        h, e = args.hidden_size, args.embedding_size
        if args.bidirectional and h % 2:
            raise ValueError(f"hidden_size must be even for a bidirectional encoder, got {h}")
        enc_hidden = h // 2 if args.bidirectional else h
        self.src_embedding = nn.Embedding(args.source_vocab_size, e)
        self.tgt_embedding = nn.Embedding(args.target_vocab_size, e)
        self.encoder = make_rnn(args.cell, e, enc_hidden, args.num_layers, args.dropout, args.bidirectional)
        # The bridge maps each encoder final state (both directions concatenated) to the decoder's.
        self.bridge = nn.ModuleList(nn.Linear(h, h) for _ in range(num_state_tensors(args.cell)))
        dec_in = e + (h if args.input_feeding else 0)
        self.decoder = make_rnn(args.cell, dec_in, h, args.num_layers, args.dropout)
        self.attention = Attention(args.attention, h)
        self.combine = nn.Linear(2 * h, h, bias=False)
        self.dropout = nn.Dropout(args.dropout)
        self.output = nn.Linear(h, args.target_vocab_size)

    def model_args(self) -> dict:
        return asdict(self.args)

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """(src[B,S], lengths[B]) -> (memory[B,S,H], mask[B,S] float, decoder state incl. input feed)."""
        x = self.dropout(self.src_embedding(src))
        batch = src.shape[0]
        layers = self.args.num_layers * (2 if self.args.bidirectional else 1)
        enc_hidden = self.encoder.hidden_size
        zero = tuple(x.new_zeros(batch, layers, enc_hidden) for _ in range(num_state_tensors(self.args.cell)))
        memory, final = run_rnn(self.encoder, self.args.cell, x, src_lengths, zero)
        positions = torch.arange(src.shape[1], device=src.device)[None, :]
        mask = (positions < src_lengths[:, None]).to(memory.dtype)
        state = []
        for i, (s, bridge) in enumerate(zip(final, self.bridge, strict=True)):
            # [B, layers*dirs, h] -> [B, layers, dirs*h]: PyTorch orders layer-major, direction-minor.
            s = s.reshape(batch, self.args.num_layers, -1)
            s = bridge(s)
            state.append(torch.tanh(s) if i == 0 else s)
        input_feed = memory.new_zeros(batch, self.args.hidden_size)
        return memory, mask, (*state, input_feed)

    def decode_step_logits(self, prev_token: torch.Tensor, state: State, memory: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, State, torch.Tensor]:
        *cell_state, input_feed = state
        emb = self.dropout(self.tgt_embedding(prev_token))
        x = torch.cat([emb, input_feed], dim=-1) if self.args.input_feeding else emb
        torch_state = tuple(s.transpose(0, 1).contiguous() for s in cell_state)
        out, new = self.decoder(x[:, None, :], torch_state if self.args.cell == "lstm" else torch_state[0])
        new = new if self.args.cell == "lstm" else (new,)
        query = out[:, 0]
        context, weights = self.attention(query, memory, mask)
        attentional = self.dropout(torch.tanh(self.combine(torch.cat([context, query], dim=-1))))
        logits = self.output(attentional)
        return logits, (*(s.transpose(0, 1) for s in new), attentional), weights

    def decode_step(self, prev_token: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(prev_token[B], *state, memory, mask) -> (log_probs[B,V], *state, attention[B,S]); flat for export."""
        *state, memory, mask = inputs
        logits, new_state, weights = self.decode_step_logits(prev_token, tuple(state), memory, mask)
        return (torch.log_softmax(logits, dim=-1), *new_state, weights)

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor,
                sampling_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Teacher-forced logits [B,T,V] for `tgt_in` (<bos> + target); scheduled sampling when ratio > 0."""
        memory, mask, state = self.encode(src, src_lengths)
        steps = []
        prev = tgt_in[:, 0]
        for t in range(tgt_in.shape[1]):
            logits, state, _ = self.decode_step_logits(prev, state, memory, mask)
            steps.append(logits)
            if t + 1 < tgt_in.shape[1]:
                prev = tgt_in[:, t + 1]
                if sampling_ratio > 0:
                    use_model = torch.rand(prev.shape, generator=generator, device=prev.device) < sampling_ratio
                    prev = torch.where(use_model, logits.argmax(-1).detach(), prev)
        return torch.stack(steps, dim=1)

    def step_fn(self):
        """The reference decoders' view: memory and mask ride in the state tuple, so beams reorder them too."""
        def step(tokens: torch.Tensor, state: State):
            *dec_state, memory, mask = state
            out = self.decode_step(tokens, *dec_state, memory, mask)
            n = len(dec_state)
            return out[0], (*out[1:1 + n], memory, mask)
        return step

    def start(self, src: torch.Tensor, src_lengths: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, State]:
        memory, mask, state = self.encode(src, src_lengths)
        start = torch.full((src.shape[0],), bos_id, dtype=torch.long, device=src.device)
        return start, (*state, memory, mask)
