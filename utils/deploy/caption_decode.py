"""Caption decoding outside the vision graph: numpy mirrors of ``CaptionHead.greedy`` / ``beam_search`` that
run an exported decoder-step graph (same start token, same ``<pad>``/``<bos>``/``<unk>`` masking, same stopping rule,
same ``max_len``), so a ``.pt`` and its ``.onnx`` caption alike."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from utils.tasks import BOS, EOS, NEVER_GENERATED, PAD

StepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (memory, tokens) -> next-token logits


def _next_logprobs(logits: np.ndarray) -> np.ndarray:
    """As ``CaptionHead._next_logprobs``: float32, never ``<pad>``, ``<bos>`` or ``<unk>``, log-softmax."""
    x = logits.astype(np.float32, copy=True)
    x[:, NEVER_GENERATED] = -np.inf
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def greedy_decode(step: StepFn, memory: np.ndarray, max_len: int) -> np.ndarray:
    """``(B, L)`` int64 ids, ``<bos>`` first, ``<pad>`` after ``<eos>``, ``L <= max_len``: ``CaptionHead.greedy``."""
    b = memory.shape[0]
    tokens = np.full((b, 1), BOS, np.int64)
    done = np.zeros(b, bool)
    for _ in range(max_len - 1):
        nxt = _next_logprobs(step(memory, tokens)).argmax(-1).astype(np.int64)
        nxt = np.where(done, PAD, nxt)
        tokens = np.concatenate((tokens, nxt[:, None]), 1)
        done |= nxt == EOS
        if done.all():
            break
    return tokens


def beam_search_decode(step: StepFn, memory: np.ndarray, beam: int, max_len: int,
                       length_penalty: float = 1.0) -> np.ndarray:
    """``CaptionHead.beam_search`` in numpy: ``(B, L)`` ids of the best beam per image (``beam=1`` = greedy)."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    b, k = memory.shape[0], beam
    mem = np.repeat(memory, k, axis=0)  # beams of an image adjacent
    tokens = np.full((b * k, 1), BOS, np.int64)
    score = np.full((b, k), -np.inf, np.float32)
    score[:, 0] = 0.0
    length = np.zeros((b, k), np.float32)
    done = np.zeros((b, k), bool)
    for _ in range(max_len - 1):
        logp = _next_logprobs(step(mem, tokens)).reshape(b, k, -1)
        v = logp.shape[-1]
        finished = np.full(v, -np.inf, np.float32)
        finished[PAD] = 0.0
        logp = np.where(done[..., None], finished, logp)
        raw = score[..., None] + logp
        new_len = np.broadcast_to((length + (~done).astype(np.float32))[..., None], (b, k, v))
        norm = raw / np.power(np.maximum(new_len, 1), np.float32(length_penalty))
        top = np.argsort(-norm.reshape(b, k * v), axis=1, kind="stable")[:, :k]
        src, tok = top // v, top % v
        score = np.take_along_axis(raw.reshape(b, k * v), top, 1)
        length = np.take_along_axis(new_len.reshape(b, k * v), top, 1)
        done = np.take_along_axis(done, src, 1) | (tok == EOS)
        rows = (src + np.arange(b)[:, None] * k).reshape(-1)
        tokens = np.concatenate((tokens[rows], tok.reshape(-1, 1)), 1)
        if done.all():
            break
    best = (score / np.power(np.maximum(length, 1), np.float32(length_penalty))).argmax(1)
    return tokens.reshape(b, k, -1)[np.arange(b), best]
