"""Captioning head: a small Transformer decoder cross-attending to the pyramid features.

Every input level is gated by this head's own implicit representation (``TaskInput``), projected by a
1x1 conv to ``d_model`` and flattened into one memory sequence. Each memory token gets a 2-D sinusoidal
encoding of its position in *normalized* image coordinates, so a place in the image has the same code on
every level, plus a learned level embedding that tells the levels apart. With ``objects`` the memory also ends
with that many object tokens, read off the detection head's class maps (GRIT's object features, from our own
detector). A pre-norm decoder then reads word embeddings + learned positions under a causal mask.

Token layout (shared with ``utils/data/vocab.py`` and ``utils/loss/caption.py``): ``<pad>`` = 0, ``<bos>`` = 1,
``<eos>`` = 2. Training ids are ``[<bos>, w1, ..., wn, <eos>, <pad>...]``; the decoder is fed ``ids[:, :-1]``
and predicts ``ids[:, 1:]``. Decoded sequences come back in the same layout (starting with ``<bos>``).

Typical use::

    tokens = caption_loss.targets(batch.captions, seed)          # (B, T)
    out = model(images, captions=tokens)                          # out.cap.logits: (B, T-1, V)
    loss, parts = caption_loss(out.cap.logits, tokens, batch.task_present("cap"))
    model.eval(); words = vocab.decode_batch(model(images).cap.tokens)
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.heads.base import TaskInput
from utils.tasks import BOS, EOS, NEVER_GENERATED, PAD

OBJECT_MIN_SCORE = 0.1  # a class-map peak under this is background, not an object token (see CaptionHead.objects)


@dataclass
class CaptionOutput:
    """What the caption head returns.

    Attributes:
        memory: ``(B, S, d_model)`` the flattened, position-encoded features the decoder attends to.
        logits: ``(B, T-1, V)`` (``(B, R, T-1, V)`` for R references per image) next-token logits under teacher
            forcing when token ids were given, else ``None``.
        tokens: ``(B, L)`` greedy-decoded ids (``<bos>`` first, ``<pad>`` after ``<eos>``) in eval mode when no
            ids were given, else ``None``.
        index: ``(n,)`` the batch rows ``logits`` are of, when teacher forcing was asked for only some images
            (``caption_index``); ``None``: every row (``logits`` then has ``B`` rows).
    """

    memory: torch.Tensor
    logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    index: torch.Tensor | None = None


def fp32_on_cpu(generate):
    """Token-by-token generation (``generate(self, memory, ...)``) on the CPU runs in fp32, its memory cast to
    fp32, even under training's bf16 autocast (self-critical sampling): a step's tensors are a few dozen rows, so
    the casts autocast adds around every matmul cost more than bf16 saves (sampling 5 captions for each of 8
    images measured 191 ms under autocast, 78 ms without). CUDA's autocast is left as it is."""
    @functools.wraps(generate)
    def wrapper(self, memory: torch.Tensor, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return generate(self, memory.float() if memory.device.type == "cpu" else memory, *args, **kwargs)
    return wrapper


class DecoderCache:
    """Keys and values of a pre-norm ``nn.TransformerDecoder`` kept between generation steps, so each step
    runs the decoder on the newest token only: self-attention keys / values of the tokens so far, and the
    cross-attention keys / values of the memory, projected once.

    Exact: step ``t``'s logits equal those of the whole prefix through the decoder (tested), at a cost linear
    in the length instead of quadratic, with the memory's projections done once instead of every step.
    """

    def __init__(self, decoder: nn.TransformerDecoder, memory: torch.Tensor):
        self.layers = list(decoder.layers)
        self.final_norm = decoder.norm
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.cross_kv = [self._project(layer.multihead_attn, memory, 1, 2) for layer in self.layers]

    @staticmethod
    def _project(mha: nn.MultiheadAttention, x: torch.Tensor, *which: int) -> list[torch.Tensor]:
        """``x`` ``(N, L, d)`` through the query (0), key (1) or value (2) projections of ``mha``, each split into
        heads ``(N, h, L, d / h)``."""
        d, h = mha.embed_dim, mha.num_heads
        out = []
        for w in which:
            bias = mha.in_proj_bias[w * d:(w + 1) * d] if mha.in_proj_bias is not None else None
            y = F.linear(x, mha.in_proj_weight[w * d:(w + 1) * d], bias)
            out.append(y.view(x.shape[0], x.shape[1], h, d // h).transpose(1, 2))
        return out

    @staticmethod
    def _attend(mha: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool = False) -> torch.Tensor:
        """Heads ``(N, h, L, d / h)`` -> ``(N, L, d)`` through ``mha``'s attention and output projection."""
        p = mha.dropout if mha.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return mha.out_proj(y.transpose(1, 2).reshape(q.shape[0], q.shape[2], mha.embed_dim))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The newest token's input ``(N, 1, d)`` (embedding + position) -> its decoder state ``(N, 1, d)``."""
        for i, layer in enumerate(self.layers):
            sa, ca = layer.self_attn, layer.multihead_attn
            q, k, v = self._project(sa, layer.norm1(x), 0, 1, 2)
            if self.self_kv[i] is not None:
                k, v = (torch.cat((old, new), 2) for old, new in zip(self.self_kv[i], (k, v)))
            self.self_kv[i] = (k, v)
            x = x + layer.dropout1(self._attend(sa, q, k, v))
            (q,) = self._project(ca, layer.norm2(x), 0)
            x = x + layer.dropout2(self._attend(ca, q, *self.cross_kv[i]))
            x = x + layer._ff_block(layer.norm3(x))
        return self.final_norm(x) if self.final_norm is not None else x

    @classmethod
    def decode_shared(cls, decoder: nn.TransformerDecoder, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Teacher forcing of ``R`` sequences per image, ``x`` ``(B * R, T, d)`` (an image's rows adjacent), over
        ``memory`` ``(B, S, d)`` projected once per image rather than once per sequence: an image's ``R * T``
        queries attend to its memory together (cross-attention has no mask, so each query is unaffected).
        Equals ``decoder(x, memory.repeat_interleave(R, 0), causal)`` (tested)."""
        b, (n, t, d) = memory.shape[0], x.shape
        for layer in decoder.layers:
            sa, ca = layer.self_attn, layer.multihead_attn
            x = x + layer.dropout1(cls._attend(sa, *cls._project(sa, layer.norm1(x), 0, 1, 2), causal=True))
            (q,) = cls._project(ca, layer.norm2(x).reshape(b, n // b * t, d), 0)
            x = x + layer.dropout2(cls._attend(ca, q, *cls._project(ca, memory, 1, 2)).reshape(n, t, d))
            x = x + layer._ff_block(layer.norm3(x))
        return decoder.norm(x) if decoder.norm is not None else x

    def reorder(self, rows: torch.Tensor) -> None:
        """Keeps rows ``rows`` of every cached tensor (beam search's surviving beams, in their new order)."""
        self.self_kv = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.self_kv]
        self.cross_kv = [[k[rows], v[rows]] for k, v in self.cross_kv]


class LevelProjection(nn.Module):
    """1x1 conv ``c -> d_model`` exposing ``.conv``, so ``TaskInput.fold_into`` can fold into it."""

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def sine_position_2d(h: int, w: int, dim: int, device: torch.device | None = None,
                     dtype: torch.dtype = torch.float32, temperature: float = 10000.0) -> torch.Tensor:
    """``(h * w, dim)`` 2-D sinusoidal encoding (DETR style), row-major like ``x.flatten(2)``.

    Half the channels encode y, half x, each as interleaved-free ``[sin..., cos...]`` blocks. Coordinates are
    cell centres normalized to ``[0, 2*pi]`` so that every pyramid level encodes the same image place alike.
    """
    if dim % 4:
        raise ValueError(f"d_model must be a multiple of 4 for a 2-D sine encoding, got {dim}")
    q = dim // 4
    freq = temperature ** (-torch.arange(q, device=device, dtype=torch.float32) / q)
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * (2 * math.pi)
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * (2 * math.pi)
    y = y[:, None] * freq[None]  # (h, q)
    x = x[:, None] * freq[None]  # (w, q)
    ey = torch.cat((y.sin(), y.cos()), 1)[:, None, :].expand(h, w, 2 * q)
    ex = torch.cat((x.sin(), x.cos()), 1)[None, :, :].expand(h, w, 2 * q)
    return torch.cat((ey, ex), 2).reshape(h * w, dim).to(dtype)


class CaptionHead(nn.Module):
    """Transformer caption decoder over all input pyramid levels.

    Args:
        nc: number of object classes (unused; every head takes it).
        ch, strides: channels and strides of the input levels.
        d_model, layers, heads: decoder width, depth and attention heads (``d_model % 4 == 0`` and
            ``d_model % heads == 0``).
        tie: the output projection's weight is the word embedding (Press & Wolf 2017, as the Transformer): half the
            ``2 * vocab_size * d_model`` parameters the two cost untied, most of a small decoder at COCO's 10k words.
        objects: how many object tokens the memory gets besides the grid (0: none), GRIT's object features made
            from this network's own detector: the ``objects`` strongest peaks of the detection head's class maps
            (``det_classes``; a cell whose best class probability is the maximum of its 3x3 neighbourhood), each the
            finest level's token at the peak's place plus embeddings of its class probabilities and its score. The
            decoder then finds an object's kind, colour and the objects' number in a few tokens instead of
            attending its way to them over the whole grid. No gradient reaches the detector through them. A model
            built without a detection head (captions alone) has the grid only.
        vocab_size: output classes; must equal ``len(vocab)`` of the ``Vocabulary`` used for training.
        max_len: longest id sequence, ``<bos>`` and ``<eos>`` included (as in ``Vocabulary.encode``).
        dropout: decoder dropout.
        form: implicit knowledge form of the per-level ``TaskInput``.
    """

    task = "cap"
    extra_inputs = ("captions", "caption_index", "det_classes")

    def __init__(self, nc: int, ch: list[int], strides: list[float], d_model: int = 128, layers: int = 2,
                 heads: int = 4, tie: bool = False, objects: int = 0, vocab_size: int = 1000,
                 max_len: int = 24, dropout: float = 0.1, form: str = "vector"):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        self.nl, self.d_model, self.vocab_size, self.max_len = len(ch), d_model, vocab_size, max_len
        self.strides = [float(s) for s in strides]
        self.task_in = nn.ModuleList(TaskInput(c, form) for c in ch)
        self.proj = nn.ModuleList(LevelProjection(c, d_model) for c in ch)
        self.level_embed = nn.Parameter(torch.zeros(len(ch), d_model))
        # The decoder's pre-norm only normalizes its own stream; memory enters cross-attention as is, so
        # it is normalized here (neck activations have arbitrary scale).
        self.memory_norm = nn.LayerNorm(d_model)
        self.objects = int(objects)
        if self.objects:
            self.class_embed = nn.Linear(nc, d_model, bias=False)
            self.score_embed = nn.Parameter(torch.zeros(d_model))
            self.object_embed = nn.Parameter(torch.zeros(d_model))
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerDecoderLayer(d_model, heads, 4 * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(d_model))
        self.out = nn.Linear(d_model, vocab_size)
        self.tie = bool(tie)
        if self.tie:
            self.out.weight = self.embed.weight  # one (V, d) parameter: the bias stays the output layer's own
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.level_embed, std=0.02)
        if self.objects:
            nn.init.normal_(self.score_embed, std=0.02)
            nn.init.normal_(self.object_embed, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        nn.init.normal_(self.out.weight, std=0.02)  # tied: this redraws the one shared tensor (the same std)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()  # after out's draw, so a tied <pad> row is zero too
        nn.init.zeros_(self.out.bias)

    # ------------------------------------------------------------------------------------------------
    def encode(self, xs: list[torch.Tensor], det_classes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Input feature maps -> ``(B, S, d_model)`` memory, ``S = sum(H_i * W_i)``, plus ``objects`` object
        tokens when the detector's ``(B, nc, H, W)`` class maps ``det_classes`` are given (see the class doc)."""
        if len(xs) != self.nl:
            raise ValueError(f"CaptionHead expects {self.nl} input levels, got {len(xs)}")
        grids = []
        for i, x in enumerate(xs):
            y = self.proj[i](self.task_in[i](x))  # (B, d, H, W)
            b, d, h, w = y.shape
            pos = sine_position_2d(h, w, d, y.device, y.dtype)
            grids.append(y.flatten(2).transpose(1, 2) + pos + self.level_embed[i].to(y.dtype))
        if self.objects and det_classes:
            finest = min(range(self.nl), key=lambda i: self.strides[i])
            grids.append(self.object_tokens(grids[finest], xs[finest].shape[2:], det_classes))
        return self.memory_norm(torch.cat(grids, 1))

    def object_tokens(self, grid: torch.Tensor, size: tuple[int, int], det_classes: list[torch.Tensor]) -> torch.Tensor:
        """``(B, objects, d)`` tokens of the strongest class-map peaks: ``grid`` ``(B, H * W, d)`` (the finest level's
        tokens, ``size`` its ``(H, W)``) at each peak's centre, plus its class and score embeddings and the object
        embedding, in the order of their cells. A peak scores its best class probability; a place with no peak of
        at least ``OBJECT_MIN_SCORE`` left carries the object embedding alone, so which candidates fill it does not
        change the memory."""
        (h0, w0), dev = size, grid.device
        scores, cells, probs = [], [], []
        for p in det_classes:
            b, nc, h, w = p.shape
            best = p.amax(1, keepdim=True)
            peak = (best == F.max_pool2d(best, 3, 1, 1)) & (best >= OBJECT_MIN_SCORE)
            best = torch.where(peak, best, torch.zeros_like(best))
            row = ((torch.arange(h, device=dev) + 0.5) * (h0 / h)).long().clamp(max=h0 - 1)  # the finest level's
            col = ((torch.arange(w, device=dev) + 0.5) * (w0 / w)).long().clamp(max=w0 - 1)  # cell at its centre
            scores.append(best.flatten(1))
            cells.append((row[:, None] * w0 + col[None]).flatten().expand(b, -1))
            probs.append(p.flatten(2).transpose(1, 2))
        n = sum(s.shape[1] for s in scores)
        score, top = torch.cat(scores, 1).topk(min(self.objects, n), 1)
        # the peaks in the order of their cells, not of their scores: a rounding-size change of two scores (a
        # fused or exported model) then leaves the memory as it was
        order = torch.where(score > 0, top, torch.full_like(top, n)).argsort(1)
        score, top = score.gather(1, order), top.gather(1, order)
        cell = torch.cat(cells, 1).gather(1, top)
        prob = torch.cat(probs, 1).gather(1, top[..., None].expand(-1, -1, probs[0].shape[-1])).to(grid.dtype)
        found = grid.gather(1, cell[..., None].expand(-1, -1, grid.shape[-1])) + self.class_embed(prob)
        score = score.to(grid.dtype)[..., None]
        return (score > 0) * (found + score * self.score_embed) + self.object_embed.to(grid.dtype)

    def _embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``(N, T)`` ids at positions ``start ..`` -> ``(N, T, d_model)`` scaled word embeddings + learned positions."""
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise ValueError(f"{end} input tokens exceed max_len={self.max_len}")
        return self.embed(tokens) * math.sqrt(self.d_model) + self.pos(torch.arange(start, end, device=tokens.device))

    def _decode(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, d_model)`` decoder states (causal: position t sees ids ``<= t``)."""
        t = tokens.shape[1]
        x = self._embed(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device, dtype=x.dtype)
        # No key-padding mask: pads only follow <eos>, so under the causal mask no scored position sees one.
        return self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)

    def decode_step(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, V)`` of the token following ``tokens`` ``(B, t)``."""
        return self.out(self._decode(memory, tokens)[:, -1])

    @staticmethod
    def _generation_logprobs(logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the last dim with ``<pad>``, ``<bos>`` and ``<unk>`` excluded: generation never
        emits them (a placeholder is never a better caption word than the likeliest real one; ImageCaptioning.pytorch
        suppresses ``<unk>`` alike). Greedy, beam search, sampling and the samples' scored log-probabilities all
        use this, so beam=1 equals greedy and a sample's log-probability is that of the distribution it was drawn
        from."""
        logits = logits.float()
        logits[..., NEVER_GENERATED] = float("-inf")
        return logits.log_softmax(-1)

    def _next_logprobs(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self._generation_logprobs(self.decode_step(memory, tokens))

    def _cached_logprobs(self, cache: DecoderCache, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`_next_logprobs` of ``tokens`` ``(N, t)`` whose first ``t - 1`` tokens ``cache`` has seen."""
        x = self._embed(tokens[:, -1:], start=tokens.shape[1] - 1)
        return self._generation_logprobs(self.out(cache.step(x)[:, -1]))

    @torch.no_grad()
    def greedy(self, memory: torch.Tensor, max_len: int | None = None,
               prompt: Sequence[int] | None = None) -> torch.Tensor:
        """Greedy decoding: ``(B, L)`` ids, ``<bos>`` first, ``<pad>`` after ``<eos>``, ``L <= max_len``. ``prompt``:
        word ids every caption starts with (BLIP's "a picture of"), the decoder continuing them."""
        return self._generate(memory, lambda logp: logp.argmax(-1), max_len, prompt)

    @fp32_on_cpu
    def _generate(self, memory: torch.Tensor, pick, max_len: int | None,
                  prompt: Sequence[int] | None = None) -> torch.Tensor:
        """Token-by-token decoding of ``memory`` ``(B, S, d)``: ``pick`` maps the next token's log-probabilities
        ``(B, V)`` to ids ``(B,)`` (the first ``len(prompt)`` ids are the prompt's); ``<pad>`` after ``<eos>``,
        stops once every row has ended."""
        max_len = min(max_len or self.max_len, self.max_len)
        b = memory.shape[0]
        tokens = torch.full((b, 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        cache = DecoderCache(self.decoder, memory)
        forced = [] if prompt is None else [int(t) for t in prompt]
        for step in range(max_len - 1):
            logp = self._cached_logprobs(cache, tokens)
            nxt = torch.full_like(tokens[:, 0], forced[step]) if step < len(forced) else pick(logp)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            tokens = torch.cat((tokens, nxt[:, None]), 1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return tokens

    @torch.no_grad()
    def sample(self, memory: torch.Tensor, k: int = 1, max_len: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``k`` captions per image drawn token by token from the decoder's distribution (self-critical
        training's samples): ``(B * k, L)`` ids in the layout of :meth:`greedy`, an image's ``k`` rows adjacent."""
        return self._generate(memory.repeat_interleave(k, 0),
                              lambda logp: torch.multinomial(logp.exp(), 1, generator=generator)[:, 0], max_len)

    def sequence_logprobs(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L-1)`` log-probability of each generated token of ``tokens`` ``(N, L)`` (``<bos>`` first) given
        ``memory`` ``(B, S, d)``, ``N = B * k`` (an image's ``k`` samples adjacent, as :meth:`sample` returns
        them), with gradient; 0 after ``<eos>``. One teacher-forced pass over the memory projected once per image."""
        x = self._embed(tokens[:, :-1])
        logp = self._generation_logprobs(self.out(DecoderCache.decode_shared(self.decoder, memory, x)))
        target = tokens[:, 1:]
        picked = logp.gather(-1, target[..., None])[..., 0]
        return torch.where(target == PAD, torch.zeros_like(picked), picked)

    @torch.no_grad()
    @fp32_on_cpu
    def beam_search(self, memory: torch.Tensor, beam: int = 3, max_len: int | None = None,
                    length_penalty: float = 1.0, every_beam: bool = False) -> torch.Tensor:
        """Beam search: ``(B, L)`` ids in the layout of :meth:`greedy`, the best beam per image; with
        ``every_beam``, all ``(B * beam, L)`` of them, an image's adjacent and best first (the candidates that
        self-critical training scores, as M2 Transformer and GRIT draw them).

        Beams are ranked by ``sum(log p) / n ** length_penalty`` with ``n`` the number of generated tokens
        (``<eos>`` included), so short captions are not favoured just for having fewer factors. A finished
        beam keeps its score and only extends with ``<pad>``; search stops once every beam has finished.
        ``beam=1`` is exactly :meth:`greedy`.
        """
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        max_len = min(max_len or self.max_len, self.max_len)
        b, s, d = memory.shape
        k, dev = beam, memory.device
        mem = memory.repeat_interleave(k, 0)  # (B*K, S, d), beams of an image adjacent
        tokens = torch.full((b * k, 1), BOS, dtype=torch.long, device=dev)
        score = torch.full((b, k), float("-inf"), device=dev)
        score[:, 0] = 0.0  # all beams start identical: expand only the first one at step 1
        length = torch.zeros((b, k), device=dev)
        done = torch.zeros((b, k), dtype=torch.bool, device=dev)
        cache = DecoderCache(self.decoder, mem)
        for _ in range(max_len - 1):
            logp = self._cached_logprobs(cache, tokens).view(b, k, -1)
            v = logp.shape[-1]
            # a finished beam has exactly one continuation, <pad>, at no cost
            finished = torch.full_like(logp[0, 0], float("-inf"))
            finished[PAD] = 0.0
            logp = torch.where(done[..., None], finished, logp)
            raw = score[..., None] + logp  # (B, K, V)
            new_len = (length + (~done).float())[..., None].expand(b, k, v)
            norm = raw / new_len.clamp(min=1).pow(length_penalty)
            top = norm.view(b, k * v).topk(k, dim=1).indices  # (B, K)
            src, tok = top // v, top % v
            score = raw.view(b, k * v).gather(1, top)
            length = new_len.reshape(b, k * v).gather(1, top)
            done = done.gather(1, src) | (tok == EOS)
            rows = (src + torch.arange(b, device=dev)[:, None] * k).view(-1)
            tokens = torch.cat((tokens[rows], tok.view(-1, 1)), 1)
            cache.reorder(rows)
            if bool(done.all()):
                break
        final = score / length.clamp(min=1).pow(length_penalty)  # (B, K)
        if every_beam:
            order = final.argsort(1, descending=True)
            return tokens.view(b, k, -1).gather(1, order[..., None].expand(b, k, tokens.shape[1])).view(b * k, -1)
        return tokens.view(b, k, -1)[torch.arange(b, device=dev), final.argmax(1)]

    def forward(self, xs: list[torch.Tensor], captions: torch.Tensor | None = None,
                caption_index: torch.Tensor | None = None,
                det_classes: list[torch.Tensor] | None = None) -> CaptionOutput:
        """``captions``: ``(B, T)`` token ids for teacher forcing (``logits`` ``(B, T-1, V)`` for ids ``1..T-1``),
        or ``(B, R, T)`` for R references per image (``logits`` ``(B, R, T-1, V)``); without them an eval-mode
        head greedy-decodes ``tokens``. ``caption_index`` ``(n,)``: teacher-force only these rows (the images
        that have captions: in training most of the others are strong views whose captions were dropped), so
        ``logits`` has ``n`` rows, ``index`` says which; none when it is empty. ``det_classes``: see
        :meth:`encode`."""
        memory = self.encode(xs, det_classes)
        if captions is not None:
            captions = captions.to(memory.device)
            mem = memory
            if caption_index is not None:
                caption_index = caption_index.to(memory.device)
                if not len(caption_index):  # nothing to teacher-force (self-critical epochs)
                    return CaptionOutput(memory, index=caption_index)
                mem, captions = memory[caption_index], captions[caption_index]
            if captions.dim() == 3:  # (B, R, T): R references per image read the same memory
                b, r, t = captions.shape
                x = self._embed(captions.reshape(b * r, t)[:, :-1])
                logits = self.out(DecoderCache.decode_shared(self.decoder, mem, x)).view(b, r, t - 1, -1)
            else:
                logits = self.out(self._decode(mem, captions[:, :-1]))
            return CaptionOutput(memory, logits=logits, index=caption_index)
        if self.training:
            return CaptionOutput(memory)
        return CaptionOutput(memory, tokens=self.greedy(memory, self.max_len))

    def fuse(self) -> None:
        """Folds each level's implicit multiplier into its 1x1 projection conv (exact: it is a per-channel scale)."""
        for t, p in zip(self.task_in, self.proj):
            t.fold_into([p])
