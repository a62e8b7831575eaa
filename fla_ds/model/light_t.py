"""Light-T: the lightweight translation transformer that trains the visual encoder in stage 1
(adapter -> 3-layer encoder -> 3-layer decoder -> text), with label-smoothed training loss and
batched beam search.

Decoding is incremental (``CachedDecoder``): each step runs the decoder on the newest token
only, reading the earlier tokens' self-attention keys and values, and the memory's
cross-attention keys and values, from a cache. Re-decoding the whole prefix at every step
(``PrefixDecoder``, kept as the reference the tests compare with) does about (L + 1) / 2 times
the decoder work over L steps; both give the same hypotheses."""
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

    def restrict(self, logits: torch.Tensor, last_step: bool) -> torch.Tensor:
        """(N, V) float32 log-probabilities of the next token from its (N, V) logits. BOS and
        PAD are never generated; on the last allowed step only EOS is, so every hypothesis
        ends."""
        logp = F.log_softmax(logits.float(), dim=-1)
        token = torch.arange(logp.shape[-1], device=logp.device)  # compared on the device: nothing copied from the host
        banned = token != self.eos_id if last_step else (token == self.pad_id) | (token == self.bos_id)
        return logp.masked_fill(banned, float("-inf"))

    def next_token_logprobs(self, input_ids: torch.Tensor, memory: torch.Tensor, feat_mask: torch.Tensor, last_step: bool) -> torch.Tensor:
        """(N, V) log-probabilities (``restrict``) of the token after ``input_ids`` (N, t),
        re-decoding the whole prefix (no cache: ``PrefixDecoder``)."""
        return self.restrict(self.decode(input_ids, memory, feat_mask)[:, -1], last_step)

    def step_decoder(self, memory: torch.Tensor, feat_mask: torch.Tensor, max_len: int, cache: bool = True) -> CachedDecoder | PrefixDecoder:
        """What decodes ``max_len`` steps of N rows over ``memory`` (N, S, d_model) and its
        (N, S) mask: incremental with a key/value cache, or (``cache=False``) the reference
        that re-decodes the prefix."""
        return CachedDecoder(self, memory, feat_mask, max_len) if cache else PrefixDecoder(self, memory, feat_mask)

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, feat_mask: torch.Tensor, max_len: int | None = None, cache: bool = True) -> list[list[int]]:
        """Argmax decoding: the reference that ``generate(beam_size=1)`` must equal."""
        max_len = max_len or self.max_len
        step_logprobs = self.step_decoder(self.encode(features, feat_mask), feat_mask, max_len, cache)
        ids = torch.full((features.shape[0], 1), self.bos_id, dtype=torch.long, device=features.device)
        done = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        for step in range(max_len):
            token = step_logprobs(ids, step == max_len - 1).argmax(-1)
            token = token.masked_fill(done, self.pad_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.eos_id
            if done.all():
                break
        return [[t for t in row[1:] if t not in (self.eos_id, self.pad_id)] for row in ids.tolist()]

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, feat_mask: torch.Tensor, beam_size: int = 5, max_len: int | None = None, length_penalty: float = 1.0,
        cache: bool = True,
    ) -> list[list[int]]:
        """Token ids without BOS/EOS/PAD per clip: ``beam_search``, or greedy decoding for
        ``beam_size=1`` (as in Hugging Face's generate; the length penalty then has no
        effect). Deterministic; call it in eval mode (dropout would make it random).
        ``cache=False``: the uncached reference decoding (same hypotheses, slower)."""
        if beam_size == 1:
            return self.greedy(features, feat_mask, max_len, cache)
        return self.beam_search(features, feat_mask, beam_size, max_len, length_penalty, cache)

    @torch.no_grad()
    def beam_search(
        self, features: torch.Tensor, feat_mask: torch.Tensor, beam_size: int = 5, max_len: int | None = None, length_penalty: float = 1.0,
        cache: bool = True,
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
        label-smoothed distribution over a small vocabulary. ``cache``: see ``generate``."""
        max_len = max_len or self.max_len
        batch, k, vocab = features.shape[0], beam_size, self.vocab_size
        device = features.device
        memory = self.encode(features, feat_mask).repeat_interleave(k, dim=0)
        step_logprobs = self.step_decoder(memory, feat_mask.repeat_interleave(k, dim=0), max_len, cache)
        ids = torch.full((batch * k, 1), self.bos_id, dtype=torch.long, device=device)
        # Only beam 0 is live at the start, or the K beams would be K copies of one.
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(max_len):
            logp = step_logprobs(ids, step == max_len - 1)
            candidates = (scores.unsqueeze(-1) + logp.view(batch, k, vocab)).view(batch, k * vocab)
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)
            beams = self.select_beams(top_scores.tolist(), top_index.tolist(), ids, finished, done, step, k, length_penalty)
            if all(done):
                break
            rows, tokens, beam_scores = zip(*beams)
            scores = torch.tensor(beam_scores, device=device).view(batch, k)
            rows = torch.tensor(rows, device=device)
            step_logprobs.reorder(rows)
            ids = torch.cat([ids[rows], torch.tensor(tokens, device=device)[:, None]], dim=1)
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


class PrefixDecoder:
    """The reference decoding: every step re-decodes the whole prefix (``LightT.decode``)."""

    def __init__(self, model: LightT, memory: torch.Tensor, feat_mask: torch.Tensor):
        self.model, self.memory, self.feat_mask = model, memory, feat_mask

    def __call__(self, ids: torch.Tensor, last_step: bool) -> torch.Tensor:
        """(N, V) log-probabilities (``LightT.restrict``) of the token after ``ids`` (N, t)."""
        return self.model.next_token_logprobs(ids, self.memory, self.feat_mask, last_step)

    def reorder(self, rows: torch.Tensor) -> None:
        """Nothing kept between steps."""


class CachedDecoder:
    """Light-T's decoder one token at a time for N rows (clips x beams), with a key/value cache:
    per layer the self-attention keys and values of the tokens decoded so far (N, heads, t,
    head_dim), and the memory's cross-attention keys and values, projected once (N, heads, S,
    head_dim). Each call decodes only the newest token of ``ids``. The same arithmetic as
    ``LightT.decode`` over the prefix (pre-norm layers, the layers' own weights), without
    dropout: for inference. ``max_len``: the steps it will be asked for (positions)."""

    def __init__(self, model: LightT, memory: torch.Tensor, feat_mask: torch.Tensor, max_len: int):
        layers = list(model.decoder.layers)
        if not all(layer.norm_first for layer in layers):
            raise ValueError("CachedDecoder follows pre-norm decoder layers (norm_first=True), as LightT builds them")
        self.model, self.layers = model, layers
        self.heads = layers[0].self_attn.num_heads
        self.positions = sinusoidal_positions(max_len + 1, model.d_model, memory.device).to(model.embed.weight.dtype)
        self.memory_mask = feat_mask.to(device=memory.device, dtype=torch.bool)[:, None, None, :]  # (N, 1, 1, S): True attends
        self.cross = [self.memory_keys_values(layer.multihead_attn, memory) for layer in layers]
        self.cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
        self.length = 0

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, d) -> (N, heads, L, d / heads)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def memory_keys_values(self, attention: nn.MultiheadAttention, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = memory.shape[-1]
        w, b = attention.in_proj_weight, attention.in_proj_bias
        return self.split_heads(F.linear(memory, w[d:2 * d], b[d:2 * d])), self.split_heads(F.linear(memory, w[2 * d:], b[2 * d:]))

    def attend(self, attention: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.split_heads(q), k, v, attn_mask=mask)
        return attention.out_proj(out.transpose(1, 2).flatten(2))

    def self_attention(self, i: int, attention: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(h, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        k, v = self.split_heads(k), self.split_heads(v)
        if self.cache[i] is not None:
            k, v = torch.cat([self.cache[i][0], k], dim=2), torch.cat([self.cache[i][1], v], dim=2)
        self.cache[i] = (k, v)
        return self.attend(attention, q, k, v)  # the newest token sees every earlier one: no mask

    def cross_attention(self, i: int, attention: nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
        d = h.shape[-1]
        q = F.linear(h, attention.in_proj_weight[:d], attention.in_proj_bias[:d])
        return self.attend(attention, q, *self.cross[i], mask=self.memory_mask)

    def __call__(self, ids: torch.Tensor, last_step: bool) -> torch.Tensor:
        """(N, V) log-probabilities (``LightT.restrict``) of the token after ``ids`` (N, t),
        whose first t - 1 tokens are already in the cache."""
        m = self.model
        x = m.embed(ids[:, -1:]) * math.sqrt(m.d_model) + self.positions[self.length]
        for i, layer in enumerate(self.layers):
            x = x + self.self_attention(i, layer.self_attn, layer.norm1(x))
            x = x + self.cross_attention(i, layer.multihead_attn, layer.norm2(x))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        self.length += 1
        return m.restrict(m.out_proj(m.decoder.norm(x))[:, -1], last_step)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i of the next step continues row ``rows[i]`` (beam search's choice)."""
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
