"""Light-T: the lightweight translation transformer that trains the visual encoder in stage 1
(adapter -> 3-layer encoder -> 3-layer decoder -> text), with label-smoothed training loss and
batched beam search."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """(length, dim) fixed sin/cos positions (Vaswani et al.), computed for any length: clip
    lengths are not bounded by the text's ``max_len``."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True where attention is forbidden (the future)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class LightT(nn.Module):
    """Adapter (Linear in_dim->adapter_hidden, GELU, Linear ->d_model) over the visual
    features, then an encoder-decoder transformer.

    Pre-norm layers (LayerNorm before attention/FFN, a final LayerNorm on each stack): the
    paper trains with plain SGD at LR 1e-2, where post-norm transformers are prone to
    diverge without warm-up. GELU feed-forward, batch_first. The output projection is tied
    to the decoder's token embeddings by default (``tie_embeddings``); embeddings are scaled
    by sqrt(d_model)."""

    def __init__(
        self,
        in_dim: int,
        vocab_size: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        d_model: int = 512,
        heads: int = 8,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        ffn: int = 2048,
        dropout: float = 0.1,
        adapter_hidden: int = 1024,
        max_len: int = 128,
        label_smoothing: float = 0.2,
        tie_embeddings: bool = True,
    ):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even for sinusoidal positions, got {d_model}")
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id = vocab_size, pad_id, bos_id, eos_id
        self.d_model, self.max_len, self.label_smoothing = d_model, max_len, label_smoothing
        self.adapter = nn.Sequential(nn.Linear(in_dim, adapter_hidden), nn.GELU(), nn.Linear(adapter_hidden, d_model))
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # unit variance after the sqrt(d) scale
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.dropout = nn.Dropout(dropout)
        layer = dict(d_model=d_model, nhead=heads, dim_feedforward=ffn, dropout=dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), encoder_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), decoder_layers, norm=nn.LayerNorm(d_model))
        self.out_proj = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.out_proj.weight = self.embed.weight

    # ---------------------------------------------------------------- building blocks

    def encode(self, features: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim), (B, T) True on real frames -> memory (B, T, d_model)."""
        x = self.adapter(features)
        x = self.dropout(x + sinusoidal_positions(x.shape[1], self.d_model, x.device).to(x.dtype))
        return self.encoder(x, src_key_padding_mask=~feat_mask.bool())

    def decode(self, input_ids: torch.Tensor, memory: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder: (B, L) ids -> logits (B, L, vocab)."""
        length = input_ids.shape[1]
        x = self.embed(input_ids) * math.sqrt(self.d_model)
        x = self.dropout(x + sinusoidal_positions(length, self.d_model, x.device).to(x.dtype))
        h = self.decoder(
            x,
            memory,
            tgt_mask=causal_mask(length, x.device),
            tgt_is_causal=True,
            tgt_key_padding_mask=input_ids == self.pad_id,
            memory_key_padding_mask=~feat_mask.bool(),
        )
        return self.out_proj(h)

    def logits(self, features: torch.Tensor, feat_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(input_ids, self.encode(features, feat_mask), feat_mask)

    # ---------------------------------------------------------------- training

    def forward(self, features: torch.Tensor, feat_mask: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``target_ids`` (B, L) = BOS w1 .. wn EOS PAD ..: teacher forcing on
        ``target_ids[:, :-1]`` predicting ``target_ids[:, 1:]``.

        Returns ``(loss_sum, n_tokens)``: the label-smoothed cross-entropy SUMMED over the
        non-pad target tokens, and how many there are. It is deliberately not averaged here:
        the training loop all-reduces ``n_tokens`` across ranks (and accumulation steps) and
        divides by that global count, so every token weighs the same whatever batch or rank
        it landed on."""
        logits = self.logits(features, feat_mask, target_ids[:, :-1])
        return self.token_loss(logits, target_ids[:, 1:])

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed label-smoothed cross-entropy over non-pad targets (torch's definition:
        (1 - eps) * NLL + eps * mean over the vocabulary of -log p); pad targets contribute
        nothing, to either term."""
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        return loss, (targets != self.pad_id).sum()

    # ---------------------------------------------------------------- inference

    def next_token_logprobs(self, input_ids: torch.Tensor, memory: torch.Tensor, feat_mask: torch.Tensor, last_step: bool) -> torch.Tensor:
        """(N, V) log-probabilities of the next token. BOS and PAD are never generated; on the
        last allowed step only EOS is, so every hypothesis ends."""
        # The whole prefix is re-decoded each step (no key/value cache): texts are short
        # (<= max_len) and Light-T small, so this costs little and keeps the code plain.
        logp = F.log_softmax(self.decode(input_ids, memory, feat_mask)[:, -1].float(), dim=-1)
        banned = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
        banned[[self.pad_id, self.bos_id]] = True
        if last_step:
            banned[:] = True
            banned[self.eos_id] = False
        return logp.masked_fill(banned, float("-inf"))

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, feat_mask: torch.Tensor, max_len: int | None = None) -> list[list[int]]:
        """Argmax decoding: the reference that ``generate(beam_size=1)`` must equal."""
        max_len = max_len or self.max_len
        memory = self.encode(features, feat_mask)
        ids = torch.full((features.shape[0], 1), self.bos_id, dtype=torch.long, device=features.device)
        done = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        for step in range(max_len):
            token = self.next_token_logprobs(ids, memory, feat_mask, step == max_len - 1).argmax(-1)
            token = token.masked_fill(done, self.pad_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.eos_id
            if done.all():
                break
        return [[t for t in row[1:] if t not in (self.eos_id, self.pad_id)] for row in ids.tolist()]

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, feat_mask: torch.Tensor, beam_size: int = 5, max_len: int | None = None, length_penalty: float = 1.0
    ) -> list[list[int]]:
        """Token ids without BOS/EOS/PAD per clip: ``beam_search``, or greedy decoding for
        ``beam_size=1`` (as in Hugging Face's generate; the length penalty then has no
        effect). Deterministic; call it in eval mode (dropout would make it random)."""
        if beam_size == 1:
            return self.greedy(features, feat_mask, max_len)
        return self.beam_search(features, feat_mask, beam_size, max_len, length_penalty)

    @torch.no_grad()
    def beam_search(
        self, features: torch.Tensor, feat_mask: torch.Tensor, beam_size: int = 5, max_len: int | None = None, length_penalty: float = 1.0
    ) -> list[list[int]]:
        """Batched beam search with Hugging Face's bookkeeping (the mBART of the paper's
        stage 2 decodes this way).

        Each step, every clip's K beams propose their 2K best continuations. An EOS among the
        K best ends a hypothesis, scored ``logprob_sum / len**length_penalty`` (len counts the
        EOS); a clip keeps its K best ended hypotheses. The K best non-EOS continuations are
        the next beams. A clip is done once it holds K hypotheses and its best live beam,
        ended at the next step, could not beat the worst of them (exact for
        length_penalty <= 0, Hugging Face's heuristic above). Decoding stops when every clip
        is done, or at ``max_len`` tokens, where EOS is forced. Stopping at the first K ended
        hypotheses instead (fairseq) lets early junk EOS fill the K slots of a flat,
        label-smoothed distribution over a small vocabulary."""
        max_len = max_len or self.max_len
        batch, k, vocab = features.shape[0], beam_size, self.vocab_size
        device = features.device
        memory = self.encode(features, feat_mask).repeat_interleave(k, dim=0)
        mem_mask = feat_mask.repeat_interleave(k, dim=0)
        ids = torch.full((batch * k, 1), self.bos_id, dtype=torch.long, device=device)
        # Only beam 0 is live at the start, or the K beams would be K copies of one.
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(max_len):
            logp = self.next_token_logprobs(ids, memory, mem_mask, step == max_len - 1)
            candidates = (scores.unsqueeze(-1) + logp.view(batch, k, vocab)).view(batch, k * vocab)
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)
            beams = self.select_beams(top_scores.tolist(), top_index.tolist(), ids, finished, done, step, k, length_penalty)
            if all(done):
                break
            rows, tokens, beam_scores = zip(*beams)
            scores = torch.tensor(beam_scores, device=device).view(batch, k)
            ids = torch.cat([ids[list(rows)], torch.tensor(tokens, device=device)[:, None]], dim=1)
        return [f[0][1] if f else [] for f in finished]

    def select_beams(
        self, top_scores: list[list[float]], top_index: list[list[int]], ids: torch.Tensor,
        finished: list[list[tuple[float, list[int]]]], done: list[bool], step: int, k: int, length_penalty: float,
    ) -> list[tuple[int, int, float]]:
        """One step's bookkeeping over the clips: end EOS candidates, keep the K best others,
        mark clips done. Returns (source row, token, score) for the batch x K next beams."""
        beams = []
        for b, (row_scores, row_index) in enumerate(zip(top_scores, top_index)):
            kept: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(row_scores, row_index)):
                    if score == float("-inf") or len(kept) == k:
                        break
                    row, token = b * k + index // self.vocab_size, index % self.vocab_size
                    if token != self.eos_id:
                        kept.append((row, token, score))
                    elif rank < k:
                        keep_best(finished[b], (score / (step + 1) ** length_penalty, ids[row, 1:].tolist()), k)
                done[b] = not kept or (len(finished[b]) == k and kept[0][2] / (step + 2) ** length_penalty <= finished[b][-1][0])
            # Empty slots repeat a harmless row with score -inf: they never win a topk.
            beams += kept + [(b * k, self.pad_id, float("-inf"))] * (k - len(kept))
        return beams


def keep_best(hypotheses: list[tuple[float, list[int]]], hypothesis: tuple[float, list[int]], k: int) -> None:
    """Insert into a list kept sorted best first and at most k long (stable on ties)."""
    hypotheses.append(hypothesis)
    hypotheses.sort(key=lambda h: -h[0])
    del hypotheses[k:]
