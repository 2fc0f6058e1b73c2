"""Captioning: vocabulary, head (teacher forcing, greedy, beam, fuse), loss and metrics. Tiny dims, CPU, fast."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from models.heads.caption import CaptionHead, CaptionOutput, sine_position_2d
from models.implicit import Implicit
from utils.data.vocab import BOS, EOS, PAD, UNK, UNK_WORD, Vocabulary, tokenize
from utils.deploy.caption_decode import greedy_decode
from utils.eval.metrics.caption import caption_scores
from utils.loss.caption import CaptionLoss

CAPS = [["a red circle on the left side"], ["two blue squares near the bottom"]]
CH, STRIDES = [16, 32], [8.0, 16.0]
MAX_LEN = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: intra-op threads only add contention (10-100x slower on a busy 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_head(vocab_size: int, form: str = "vector", seed: int = 0) -> CaptionHead:
    torch.manual_seed(seed)
    # the row's args positional in cfg order (d_model, layers, heads), the data's sizes by name, as the parser passes them
    return CaptionHead(80, CH, STRIDES, 32, 1, 4, vocab_size=vocab_size, max_len=MAX_LEN, dropout=0.0, form=form)


def feats(b: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 16, 8, 8, generator=g), torch.randn(b, 32, 4, 4, generator=g)]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.build([c for refs in CAPS for c in refs], min_count=1)


@pytest.fixture(scope="module")
def overfit(vocab):
    """A head trained 60 Adam steps on 2 images' captions: (head, feats, tokens, losses)."""
    head = tiny_head(len(vocab))
    xs = feats()
    crit = CaptionLoss(vocab, {"cap_max_len": MAX_LEN})
    tokens = crit.targets(CAPS, 0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    present = torch.tensor([True, True])
    losses = []
    for _ in range(60):
        loss, parts = crit(head(xs, tokens).logits, tokens, present)
        assert math.isfinite(parts["ce"])
        losses.append(parts["ce"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval(), xs, tokens, losses


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------
def test_tokenize_strips_punctuation_and_lowercases():
    assert tokenize("A Dog's toy, on the MAT!") == ["a", "dog", "'s", "toy", "on", "the", "mat"]
    assert tokenize("  ...  ") == []


# Hand-checked against Stanford PTBTokenizer 3.4.1 (-lowerCase -preserveLines) + pycocoevalcap's PUNCTUATIONS
PTB_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A MAN'S DOG DOESN'T BARK": "a man 's dog does n't bark",
    "I don't know, won't you? I'm here; they're there: we've he'll she'd.":
        "i do n't know wo n't you i 'm here they 're there we 've he 'll she 'd",
    "A black-and-white photo of a man's bicycle (old) near the U.S. Capitol building.":
        "a black-and-white photo of a man 's bicycle -lrb- old -rrb- near the u.s. capitol building",
    "A plate of food: rice, broccoli & chicken -- delicious!": "a plate of food rice broccoli & chicken delicious",
    "Mr. Smith at 2:30 with 1,000 people; 4.5 $5 50% cannot gonna": "mr. smith at 2:30 with 1,000 people 4.5 $ 5 50 % can not gon na",
    "The cat's toy is on the dogs' bed; it\u2019s \"cute\"... Wow!!": "the cat 's toy is on the dogs bed it 's cute wow !!",
}


def test_tokenize_follows_coco_ptb_tokenizer():
    for text, expect in PTB_CASES.items():
        assert " ".join(tokenize(text)) == expect, text


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="the reference PTBTokenizer needs java")
def test_tokenize_agrees_with_pycocoevalcap_ptb_tokenizer(capfd):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = list(PTB_CASES) + [r for refs in REFS.values() for r in refs] + ["Two giraffes, eating leaves."]
    ref = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, t in enumerate(texts):
        assert " ".join(tokenize(t)) == ref[i][0], t


def test_predicted_unk_is_a_wrong_word():
    v = Vocabulary.build(["a cat sleeps on a sofa"], min_count=1)
    ids = [BOS] + [v.stoi[w] for w in "a cat sleeps on a".split()] + [UNK, v.stoi["sofa"], EOS]
    pred = v.decode(ids)
    assert pred == f"a cat sleeps on a {UNK_WORD} sofa"
    refs = {1: ["A cat sleeps on a sofa."]}
    s = caption_scores({1: pred}, refs)
    # 7 words, 6 match (the reference has 6: no brevity penalty); bigrams: 4 of 6 match
    assert s["bleu1"] == pytest.approx(6 / 7, abs=1e-6)
    assert s["bleu2"] == pytest.approx(math.sqrt(6 / 7 * 4 / 6), abs=1e-6)
    dropped = caption_scores({1: "a cat sleeps on a sofa"}, refs)  # the same caption without the <unk>
    assert dropped["bleu4"] == pytest.approx(1.0) and s["bleu4"] < 0.9 * dropped["bleu4"]
    # a reference that literally says "<unk>" is the 4 tokens "a < unk >": only "a" of the 2 matches
    assert caption_scores({1: f"a {UNK_WORD}"}, {1: ["a <unk>"]})["bleu1"] == pytest.approx(0.5 * math.exp(1 - 4 / 2))


def test_vocab_round_trip_and_specials(vocab):
    assert vocab.to_list()[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    ids = vocab.encode("A red circle, on the LEFT side.", MAX_LEN)
    assert ids[0] == BOS and ids[-1] == EOS
    assert vocab.decode(ids) == "a red circle on the left side"
    assert vocab.decode(ids + [vocab.stoi["red"]]) == "a red circle on the left side"  # stops at eos
    assert len(vocab) == 4 + len({w for refs in CAPS for c in refs for w in tokenize(c)})


def test_vocab_min_count_and_unk():
    v = Vocabulary.build(["a dog runs", "a dog sits", "a cat"], min_count=2)
    assert v.to_list()[4:] == ["a", "dog"]  # by count then alphabetically
    assert v.encode("a cat runs", 10) == [BOS, v.stoi["a"], UNK, UNK, EOS]
    assert v.decode(v.encode("a cat runs", 10)) == "a <unk> <unk>"  # <unk> is a word; <bos>/<eos> are not


def test_vocab_lowers_the_min_count_until_unk_is_rare():
    """max_unk: the threshold drops from min_count until <unk> stands for at most that share of the words."""
    caps = ["a dog runs", "a dog sits", "a cat", "a dog"]  # 10 words: a x4, dog x3, runs / sits / cat x1
    assert Vocabulary.build(caps, min_count=3).to_list()[4:] == ["a", "dog"]  # 3 of 10 words <unk>
    v = Vocabulary.build(caps, min_count=3, max_unk=0.3)
    assert (v.min_count, v.unk_share, len(v)) == (3, 0.3, 6)
    v = Vocabulary.build(caps, min_count=3, max_unk=0.2)  # 3 -> 2 keeps 30% <unk>, so down to 1
    assert (v.min_count, v.unk_share, len(v)) == (1, 0.0, 9)
    assert UNK not in v.encode("a cat runs", 10)


def test_generation_never_emits_unk_or_specials(vocab):
    """Greedy, beam search, sampling and the onnxruntime mirror never write <unk> (nor <pad>/<bos>), even where
    the decoder puts all its mass on it; greedy and the numpy mirror still agree."""
    head = tiny_head(len(vocab), seed=3).eval()
    with torch.no_grad():
        head.out.bias[UNK] = 1e4  # <unk> would win every step
    with torch.no_grad():
        memory = head.encode(feats(3, seed=5))
    outs = [head.greedy(memory), head.beam_search(memory, beam=3), head.sample(memory, k=4)]
    for tokens in outs:
        assert not bool(torch.isin(tokens[:, 1:], torch.tensor([UNK, BOS])).any())
    step = lambda m, t: head.decode_step(torch.from_numpy(m), torch.from_numpy(t)).detach().numpy()
    assert np.array_equal(greedy_decode(step, memory.numpy(), head.max_len), outs[0].numpy())


def test_encode_truncates_but_keeps_eos_and_batch_pads(vocab):
    ids = vocab.encode("a red circle on the left side", 5)
    assert len(ids) == 5 and ids[-1] == EOS
    batch = vocab.encode_batch(["a red circle", "two blue squares near the bottom"], MAX_LEN)
    assert batch.dtype == torch.long and batch.shape == (2, 8)
    assert batch[0].tolist() == vocab.encode("a red circle", MAX_LEN) + [PAD] * 3
    assert vocab.decode_batch(batch) == ["a red circle", "two blue squares near the bottom"]


def test_vocab_checkpoint_compatible(vocab):
    assert Vocabulary.from_list(vocab.to_list()) == vocab
    buf = io.BytesIO()
    torch.save({"vocab": vocab.to_list()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert Vocabulary.from_list(loaded["vocab"]) == vocab
    with pytest.raises(ValueError):
        Vocabulary.from_list(["a", "b"])


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------
def test_head_shapes(vocab):
    head = tiny_head(len(vocab))
    tokens = vocab.encode_batch([c[0] for c in CAPS], MAX_LEN)
    out = head(feats(), tokens)
    assert isinstance(out, CaptionOutput)
    assert out.logits.shape == (2, tokens.shape[1] - 1, len(vocab))
    assert out.memory.shape == (2, 8 * 8 + 4 * 4, 32)
    assert out.tokens is None
    assert head(feats()).tokens is None  # training mode without ids: memory only
    head.eval()
    out = head(feats())
    assert out.logits is None and out.tokens.shape[0] == 2 and out.tokens.shape[1] <= MAX_LEN
    assert (out.tokens[:, 0] == BOS).all()
    step = head.decode_step(out.memory, tokens[:, :3])
    assert torch.allclose(step, head(feats(), tokens[:, :4]).logits[:, -1], atol=1e-5)


def test_overfit_loss_drops_and_greedy_reproduces(overfit, vocab):
    head, xs, tokens, losses = overfit
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    out = head(xs)
    assert torch.equal(out.tokens, tokens)
    assert vocab.decode_batch(out.tokens) == [c[0] for c in CAPS]


def test_beam_one_equals_greedy(overfit, vocab):
    head, xs, _, _ = overfit
    memory = head.encode(xs)
    assert torch.equal(head.beam_search(memory, beam=1), head.greedy(memory))
    untrained = tiny_head(len(vocab), seed=3).eval()  # long, eos-less sequences too
    memory = untrained.encode(feats(3, seed=5))
    assert torch.equal(untrained.beam_search(memory, beam=1), untrained.greedy(memory))


def test_greedy_continues_a_prompt(overfit, vocab):
    """A prompt of the first words greedy says anyway changes nothing; another prompt starts every caption and the
    decoder goes on from it (the overfit decoder completes its reference from a prefix of it)."""
    head, xs, tokens, _ = overfit
    memory = head.encode(xs)[:1]

    def caption(ids: torch.Tensor) -> list[int]:
        row = ids[0].tolist()
        return row[:row.index(EOS) + 1] if EOS in row else row

    free = head.greedy(memory)
    assert caption(head.greedy(memory, prompt=free[0, 1:3].tolist())) == caption(free)
    ref = caption(tokens[:1])
    assert caption(head.greedy(memory, prompt=ref[1:3])) == ref
    other = head.greedy(memory, prompt=tokens[1, 1:3])  # image 0 made to start with image 1's words
    assert other[0, 1:3].tolist() == tokens[1, 1:3].tolist() and caption(other) != caption(free)


def test_beam_search_ends_at_eos_and_is_batched(overfit, vocab):
    head, xs, tokens, _ = overfit
    memory = head.encode(xs)
    seqs = head.beam_search(memory, beam=3)
    for row, ref in zip(seqs.tolist(), tokens.tolist()):
        assert row[0] == BOS and EOS in row
        end = row.index(EOS)
        assert all(t == PAD for t in row[end + 1:])
        assert row[: end + 1] == ref[: ref.index(EOS) + 1]
    # batching does not change any image's result
    for i in range(2):
        one = head.beam_search(memory[i:i + 1], beam=3)
        assert one[0].tolist() == seqs[i, : one.shape[1]].tolist()
        assert all(t == PAD for t in seqs[i, one.shape[1]:].tolist())
    # untrained model: every row either ends at eos (then only pads) or runs to max_len
    untrained = tiny_head(len(vocab), seed=4).eval()
    seqs = untrained.beam_search(untrained.encode(feats(3, seed=6)), beam=4, max_len=MAX_LEN)
    assert seqs.shape[1] <= MAX_LEN
    for row in seqs.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])
        else:
            assert len(row) == MAX_LEN
        assert BOS not in row[1:]


def test_every_beam_is_the_beams_best_first(vocab):
    """``every_beam`` returns each image's ``beam`` finished captions, adjacent, ranked by the search's own score
    (sum of log-probabilities / length ** length_penalty, recomputed here with a teacher-forced pass); the first is
    the caption beam search returns, and the candidates differ."""
    head = tiny_head(len(vocab), seed=4).eval()
    memory = head.encode(feats(3, seed=6))
    for penalty in (1.0, 0.0):
        best = head.beam_search(memory, beam=4, max_len=MAX_LEN, length_penalty=penalty)
        every = head.beam_search(memory, beam=4, max_len=MAX_LEN, length_penalty=penalty, every_beam=True)
        assert every.shape[0] == 12
        with torch.no_grad():
            logp = head.sequence_logprobs(memory.repeat_interleave(4, 0), every).sum(1)
        n = (every[:, 1:] != PAD).sum(1).float()
        score = (logp / n.pow(penalty)).view(3, 4)
        assert (score[:, :-1] >= score[:, 1:] - 1e-5).all(), score
        for i in range(3):
            rows = every.view(3, 4, -1)[i]
            assert rows[0, :best.shape[1]].tolist() == best[i].tolist()
            assert len({tuple(r) for r in rows.tolist()}) == 4


@pytest.mark.parametrize("form", ["vector", "nn", "mf"])
def test_fuse_parity(vocab, form):
    head = tiny_head(len(vocab), form=form).eval()
    torch.manual_seed(7)
    with torch.no_grad():  # move the implicit multipliers far from 1 so the fold is really exercised
        for m in head.modules():
            if isinstance(m, Implicit):
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
    xs = feats()
    tokens = vocab.encode_batch([c[0] for c in CAPS], MAX_LEN)
    before = head(xs, tokens)
    head.fuse()
    assert not any(isinstance(m, Implicit) for m in head.modules())
    after = head(xs, tokens)
    assert torch.allclose(before.memory, after.memory, atol=1e-4)
    assert torch.allclose(before.logits, after.logits, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------
def test_loss_none_present_is_zero_with_grad(vocab):
    head = tiny_head(len(vocab))
    crit = CaptionLoss(vocab, {})
    tokens = crit.targets(CAPS, 0)
    logits = head(feats(), tokens).logits
    loss, parts = crit(logits, tokens, torch.tensor([False, False]))
    assert loss.requires_grad and math.isfinite(loss.item()) and loss.item() == 0.0 and parts["ce"] == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_loss_masks_absent_images(vocab):
    head = tiny_head(len(vocab))
    crit = CaptionLoss(vocab, {"label_smoothing": 0.0})
    tokens = crit.targets(CAPS, 0)
    logits = head(feats(), tokens).logits
    both, _ = crit(logits, tokens, torch.tensor([True, True]))
    first, _ = crit(logits, tokens, torch.tensor([True, False]))
    second, _ = crit(logits, tokens, torch.tensor([False, True]))
    assert torch.allclose(both, (first + second) / 2)
    assert math.isclose(first.item(), math.log(len(vocab)), rel_tol=0.1)  # near-uniform at init


def test_targets_pick_one_reference_deterministically(vocab):
    crit = CaptionLoss(vocab, {"cap_max_len": MAX_LEN})
    caps = [["a red circle", "two blue squares"], ["near the bottom", "on the left", "a red side"]]
    t0, t1 = crit.targets(caps, 0), crit.targets(caps, 1)
    assert vocab.decode_batch(t0) == ["a red circle", "on the left"]  # (seed + position) % n_refs
    assert vocab.decode_batch(t1) == ["two blue squares", "a red side"]
    assert torch.equal(t0, crit.targets(caps, 0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(crit.targets(caps, g1), crit.targets(caps, g2))
    empty = crit.targets([[], ["a red circle"]], 0)
    assert empty[0].tolist()[:2] == [BOS, EOS]


def test_several_references_per_step_are_the_mean_of_single_reference_losses(vocab):
    caps = [["a red circle", "two blue squares"], ["near the bottom", "on the left", "a red side"], []]
    multi = CaptionLoss(vocab, {"cap_max_len": MAX_LEN, "label_smoothing": 0.0, "cap_refs": 3})
    tokens = multi.targets(caps, 1)
    assert tokens.shape[:2] == (3, 3)
    assert [vocab.decode_batch(t) for t in tokens] == [["two blue squares", "a red circle", ""],
                                                      ["a red side", "near the bottom", "on the left"], ["", "", ""]]
    head = tiny_head(len(vocab))
    xs = [torch.cat([f, f[:1]]) for f in feats()]  # a third image, with no captions
    out = head(xs, tokens)
    assert out.logits.shape == (3, 3, tokens.shape[2] - 1, len(vocab))
    present = torch.tensor([True, True, False])
    loss, _ = multi(out.logits, tokens, present)
    # the same from one reference at a time: image 0 has two references (its third slot is empty), image 1 three
    single = CaptionLoss(vocab, {"cap_max_len": MAX_LEN, "label_smoothing": 0.0})
    per_ref = []
    for r in range(3):
        ids = tokens[:, r]
        per_image = [single(head(xs, ids).logits[i:i + 1], ids[i:i + 1], torch.tensor([True]))[0] for i in range(2)]
        per_ref.append(per_image)
    expected = ((per_ref[0][0] + per_ref[1][0]) / 2 + (per_ref[0][1] + per_ref[1][1] + per_ref[2][1]) / 3) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    none, _ = multi(out.logits, tokens, torch.tensor([False, False, False]))
    assert none.item() == 0.0 and none.requires_grad


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
REFS = {
    1: ["a man riding a horse on the beach", "a person rides a brown horse along the sand"],
    2: ["two dogs playing with a frisbee in the park", "a pair of dogs chase a frisbee on grass"],
    3: ["a plate of food with broccoli and rice", "rice and vegetables served on a white plate"],
}


def test_metrics_perfect_vs_wrong():
    perfect = caption_scores({i: r[0] for i, r in REFS.items()}, REFS)
    assert set(perfect) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider"}
    assert abs(perfect["bleu4"] - 1.0) < 1e-6 and abs(perfect["rougel"] - 1.0) < 1e-6
    assert perfect["cider"] > 0
    wrong = caption_scores({1: "a cat sleeping on a sofa", 2: "a red bus on the street", 3: "an airplane in the sky"},
                           REFS)
    assert wrong["bleu4"] < 0.1 and wrong["cider"] < 0.2 * perfect["cider"] and wrong["bleu1"] < perfect["bleu1"]
    # punctuation and case do not matter
    assert caption_scores({i: r[0].upper() + "." for i, r in REFS.items()}, REFS) == perfect


def test_bleu1_by_hand():
    # 2 of 4 unigrams match; hypothesis 4 words vs reference 6 -> brevity penalty exp(1 - 6/4)
    s = caption_scores({7: "a cat eats fish"}, {7: ["a cat sleeps on the sofa"]})
    assert abs(s["bleu1"] - 0.5 * math.exp(-0.5)) < 1e-6
    # bigrams: "a cat" matches, "cat eats" and "eats fish" do not -> sqrt(1/2 * 1/3) * BP
    assert abs(s["bleu2"] - math.sqrt(0.5 / 3) * math.exp(-0.5)) < 1e-6


def test_metrics_empty():
    zeros = {k: 0.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougel", "cider")}
    assert caption_scores({}, {}) == zeros
    assert caption_scores({1: "a cat"}, {2: ["a cat"]}) == zeros  # no overlapping image
    s = caption_scores({1: ""}, {1: ["a cat on a mat"]})
    assert all(math.isfinite(v) for v in s.values()) and s["bleu1"] == 0.0


# --------------------------------------------------------------------------------------------------
# Self-critical training
# --------------------------------------------------------------------------------------------------
def test_corpus_cider_equals_pycocoevalcap_when_the_corpus_is_the_scored_set():
    from pycocoevalcap.cider.cider import Cider

    from utils.eval.metrics.caption import CorpusCiderD, _tok, _tok_prediction

    refs = {1: ["a red circle on the left", "one circle on grass"], 2: ["two blue squares at the bottom"],
            3: ["a white ring above a red disk", "two shapes on sand", "a ring and a disk"]}
    preds = {1: "a red circle on grass", 2: "a blue square on the left", 3: "a white ring and a red disk"}
    scorer = CorpusCiderD(list(refs.values()))
    mine = [scorer.score(preds[i], refs[i], key=i) for i in refs]
    _, ref_scores = Cider().compute_score({i: [_tok(r) for r in refs[i]] for i in refs},
                                          {i: [_tok_prediction(preds[i])] for i in refs})
    assert mine == pytest.approx(list(ref_scores), abs=1e-9)
    assert len(set(mine)) == 3 and max(mine) > 0
    # a cached image scores the same; a bigger corpus changes the weights (so the corpus is really used)
    assert scorer.score(preds[1], refs[1], key=1) == pytest.approx(mine[0])
    bigger = CorpusCiderD([*refs.values(), ["a red circle"], ["a red circle on the left"]])
    assert bigger.score(preds[1], refs[1]) != pytest.approx(mine[0])


def test_sequence_logprobs_match_stepwise_decoding(overfit, vocab):
    head, xs, _, _ = overfit
    memory = head.encode(xs)
    tokens = head.sample(memory, k=3, generator=torch.Generator().manual_seed(0))
    assert tokens.shape[0] == 6 and (tokens[:, 0] == BOS).all()
    mem = memory.repeat_interleave(3, 0)
    logp = head.sequence_logprobs(memory, tokens)  # each image's memory projected once for its 3 samples
    for t in range(1, tokens.shape[1]):
        step = head._next_logprobs(mem, tokens[:, :t]).gather(1, tokens[:, t:t + 1])[:, 0]
        live = tokens[:, t] != PAD
        torch.testing.assert_close(logp[live, t - 1], step[live], atol=1e-5, rtol=0)
        assert (logp[~live, t - 1] == 0).all()


def test_self_critical_steps_raise_the_reward(vocab):
    """A few SCST steps on an untrained decoder raise the mean CIDEr-D of its samples, and an image without
    captions contributes nothing."""
    from utils.loss.caption import SelfCriticalLoss

    torch.manual_seed(0)
    head = tiny_head(len(vocab), seed=2)
    xs = feats()
    refs = [CAPS[0] * 2, CAPS[1] * 2]
    scst = SelfCriticalLoss(vocab, refs, {"cap_max_len": MAX_LEN, "scst_samples": 8})
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    rewards = []
    for _ in range(60):
        loss, parts = scst(head, head.encode(xs), refs, torch.tensor([True, True]), [0, 1])
        rewards.append(parts["reward"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > 1.3 * first, rewards[::5]  # about 0.6 -> 1.0 here; samples of an untrained decoder are noise
    loss, parts = scst(head, head.encode(xs), [[], []], torch.tensor([True, False]), [0, 1])
    assert parts == {} and float(loss.detach()) == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="scst_samples"):
        SelfCriticalLoss(vocab, refs, {"scst_samples": 1})
    with pytest.raises(ValueError, match="scst_sampler"):
        SelfCriticalLoss(vocab, refs, {"scst_sampler": "top-k"})


def test_beam_self_critical_scores_the_beams(vocab, monkeypatch):
    """``scst_sampler: beam``: the candidates are the image's beams (nothing is sampled), rewarded as sampled ones
    are, and a step raises the advantage-weighted (mean-token) log-probability of those beams: the beams scoring
    above the others' mean become likelier against those below."""
    from utils.loss.caption import SelfCriticalLoss

    head = tiny_head(len(vocab), seed=4)
    for m in head.modules():  # the test compares log-probabilities before and after one step: no dropout noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    xs, refs = feats(), [CAPS[0] * 2, CAPS[1] * 2]
    scst = SelfCriticalLoss(vocab, refs, {"cap_max_len": MAX_LEN, "scst_samples": 4, "scst_sampler": "beam"})
    monkeypatch.setattr(head, "sample", lambda *a, **k: pytest.fail("beam SCST sampled"))
    with torch.no_grad():
        beams = head.eval().beam_search(head.encode(xs), 4, MAX_LEN, every_beam=True)
    own, _ = scst.rewards(vocab.decode_batch(beams), refs, [0, 1])
    advantage = (own - (own.sum(1, keepdim=True) - own) / 3).view(-1)
    assert advantage.abs().max() > 0.05, own  # the beams score differently
    n_tok = (beams[:, 1:] != PAD).sum(1)

    def objective() -> float:
        with torch.no_grad():
            logp = head.sequence_logprobs(head.encode(xs).repeat_interleave(4, 0), beams).sum(1)
        return float((advantage * logp / n_tok).sum())

    before = objective()
    opt = torch.optim.SGD(head.train().parameters(), lr=1e-2)
    loss, parts = scst(head, head.encode(xs), refs, torch.tensor([True, True]), [0, 1])
    assert parts["reward"] == pytest.approx(float(own.mean()), abs=1e-6)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert objective() > before + 1e-4, (before, objective())


def test_self_critical_samples_without_dropout_and_restores_the_mode(vocab, monkeypatch):
    """SCST draws its samples from the decoder in eval mode (no dropout), computes the samples' log-probabilities
    in the head's own (training) mode, and leaves the head in that mode, also when sampling fails."""
    from utils.loss.caption import SelfCriticalLoss

    torch.manual_seed(0)
    head = tiny_head(len(vocab), seed=2).train()
    refs = [CAPS[0] * 2, CAPS[1] * 2]
    scst = SelfCriticalLoss(vocab, refs, {"cap_max_len": MAX_LEN, "scst_samples": 3})
    modes: dict[str, list[bool]] = {"sample": [], "logprobs": []}
    sample, logprobs = head.sample, head.sequence_logprobs
    monkeypatch.setattr(head, "sample", lambda *a, **k: modes["sample"].append(head.training) or sample(*a, **k))
    monkeypatch.setattr(head, "sequence_logprobs",
                        lambda *a, **k: modes["logprobs"].append(head.training) or logprobs(*a, **k))
    scst(head, head.encode(feats()), refs, torch.tensor([True, True]), [0, 1])
    assert modes == {"sample": [False], "logprobs": [True]} and head.training

    def fail(*_a, **_k):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(head, "sample", fail)
    with pytest.raises(RuntimeError, match="sampling failed"):
        scst(head, head.encode(feats()), refs, torch.tensor([True, True]), [0, 1])
    assert head.training


def test_cached_decoding_equals_whole_prefix_decoding(vocab, monkeypatch):
    """Generation runs the decoder on the newest token with the keys / values cached (DecoderCache): each step's
    log-probabilities equal those of the whole prefix, and greedy, beam search (whose beams reorder the cache)
    and sampling give the same ids as decoding the whole prefix every step."""
    from models.heads.caption import DecoderCache
    head = tiny_head(len(vocab), seed=3).eval()
    memory = head.encode(feats(b=3, seed=4))
    tokens = torch.randint(3, len(vocab), (3, MAX_LEN))
    tokens[:, 0] = BOS
    cache = DecoderCache(head.decoder, memory)
    for t in range(1, MAX_LEN + 1):
        cached, whole = head._cached_logprobs(cache, tokens[:, :t]), head._next_logprobs(memory, tokens[:, :t])
        torch.testing.assert_close(cached[:, EOS:], whole[:, EOS:], atol=1e-5, rtol=0)
    assert torch.isinf(cached[:, [PAD, BOS]]).all()

    def run():
        return (head.greedy(memory), head.beam_search(memory, beam=3),
                head.sample(memory, k=2, generator=torch.Generator().manual_seed(0)))

    fast = run()
    # the reference decodes the whole prefix over the memory the cache was built on (beam search reorders
    # beams within an image only, so those rows' memory stays the same)
    real_init = DecoderCache.__init__

    def keep_memory(self, decoder, mem):
        real_init(self, decoder, mem)
        self.memory = mem

    monkeypatch.setattr(DecoderCache, "__init__", keep_memory)
    monkeypatch.setattr(CaptionHead, "_cached_logprobs", lambda self, cache, ids: self._next_logprobs(
        cache.memory, ids))
    slow = run()
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_references_share_one_projection_of_the_memory(vocab):
    """R references per image (cap_refs) are teacher-forced over the image's memory projected once
    (DecoderCache.decode_shared): the logits and the memory's gradient equal those of the memory repeated R times
    through the plain decoder."""
    head = no_dropout(tiny_head(len(vocab), seed=5))
    caps = torch.randint(3, len(vocab), (2, 3, MAX_LEN))
    caps[..., 0] = BOS
    xs = [f.requires_grad_() for f in feats()]
    shared = head(xs, captions=caps).logits
    grad_shared = torch.autograd.grad(shared.square().sum(), xs)
    memory = head.encode(xs)
    plain = head.out(head._decode(memory.repeat_interleave(3, 0), caps.reshape(6, MAX_LEN)[:, :-1])).view_as(shared)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    for a, b in zip(grad_shared, torch.autograd.grad(plain.square().sum(), xs)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def no_dropout(head: CaptionHead) -> CaptionHead:
    """Dropout off (so two paths draw nothing at random), train mode otherwise."""
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return head


def test_only_captioned_images_are_teacher_forced(vocab):
    """``caption_index`` decodes only the images that have captions: the loss and every gradient equal those of
    decoding the whole batch with the caption-less images masked out; an empty index decodes nothing."""
    caps = [["a red circle", "two blue squares"], [], ["near the bottom", "on the left"], []]
    crit = CaptionLoss(vocab, {"cap_max_len": MAX_LEN, "cap_refs": 2})
    tokens = crit.targets(caps, 0)
    present = torch.tensor([True, False, True, False])
    head = no_dropout(tiny_head(len(vocab), seed=6))
    xs = [torch.cat([f, f.flip(0)]) for f in feats()]

    def loss_and_grads(index):
        head.zero_grad()
        out = head(xs, captions=tokens, caption_index=index)
        rows = slice(None) if out.index is None else out.index
        loss, _ = crit(out.logits, tokens[rows], present[rows])
        loss.backward()
        return out, loss, [p.grad.clone() for p in head.parameters()]

    whole, loss_whole, grads_whole = loss_and_grads(None)
    sub, loss_sub, grads_sub = loss_and_grads(present.nonzero().view(-1))
    assert whole.logits.shape[0] == 4 and sub.logits.shape[0] == 2 and sub.index.tolist() == [0, 2]
    torch.testing.assert_close(loss_sub, loss_whole, atol=1e-6, rtol=0)
    for a, b in zip(grads_sub, grads_whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    none = head(xs, captions=tokens, caption_index=present.nonzero().view(-1)[:0])
    assert none.logits is None and none.memory.shape[0] == 4


def test_multitask_head_inputs_name_the_captioned_images(vocab):
    """The trainer's head inputs: every image's references (pictures draw them), the captioned images' rows to
    decode, one masked row when none has captions, and none under self-critical training without
    cross-entropy (its teacher-forced logits would go unused)."""
    from types import SimpleNamespace

    from utils.loss.multitask import MultiTaskLoss

    loss = MultiTaskLoss(SimpleNamespace(tasks=["cap"], head=lambda t: None), {"cap_refs": 2, "scst_epochs": 1},
                         vocab, "fixed", caption_corpus=[c for c in CAPS])

    def batch(present):
        caps = [CAPS[i % 2] if p else [] for i, p in enumerate(present)]
        return SimpleNamespace(captions=caps, image_ids=list(range(len(present))),
                               task_present=lambda t: torch.tensor(present))

    inputs = loss.head_inputs(batch([False, True, True]), 0)
    assert inputs["captions"].shape[:2] == (3, 2) and inputs["caption_index"].tolist() == [1, 2]
    assert loss.head_inputs(batch([False, False]), 0)["caption_index"].tolist() == [0]
    loss.scst = True
    assert loss.head_inputs(batch([True, True]), 0)["caption_index"].tolist() == []
    loss.scst_xe = 0.5
    assert loss.head_inputs(batch([True, True]), 0)["caption_index"].tolist() == [0, 1]


def test_object_tokens_are_the_detectors_class_map_peaks():
    """``objects``: the memory ends with that many tokens, one per peak of the detector's class maps of at least
    OBJECT_MIN_SCORE (its best class probability the maximum of its 3x3 neighbourhood), in the order of their cells:
    the finest level's token at the peak's centre plus its class and score embeddings; the places no peak fills
    carry the object embedding alone. Without class maps the memory is the grid."""
    from models.heads.caption import OBJECT_MIN_SCORE

    torch.manual_seed(0)
    head = CaptionHead(3, CH, STRIDES, 32, 1, 4, False, 4, vocab_size=20, max_len=MAX_LEN).eval()
    xs = feats()
    fine, coarse = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)
    fine[0, 1, 2, 3] = 0.9    # a peak, class 1
    fine[0, 0, 2, 4] = 0.5    # its neighbour: no peak
    fine[0, 2, 6, 6] = OBJECT_MIN_SCORE / 2  # a peak, but background
    coarse[0, 2, 1, 1] = 0.95  # a peak at stride 16, the stronger: its centre is the fine cell (3, 3)
    fine[1, 0, 0, 0] = 0.3    # image 1: one peak
    with torch.no_grad():
        grid = head.encode(xs)
        memory = head.encode(xs, [fine, coarse])
        assert grid.shape == (2, 64 + 16, 32) and memory.shape == (2, 64 + 16 + 4, 32)
        tokens = head.proj[0](head.task_in[0](xs[0])).flatten(2).transpose(1, 2)
        tokens = tokens + sine_position_2d(8, 8, 32) + head.level_embed[0]

        def obj(image, cell, prob):
            p = torch.tensor(prob)
            return tokens[image, cell] + head.class_embed(p) + p.max() * head.score_embed + head.object_embed

        expected = torch.stack([
            torch.stack([obj(0, 2 * 8 + 3, [0, 0.9, 0]), obj(0, 3 * 8 + 3, [0, 0, 0.95]), head.object_embed,
                         head.object_embed]),
            torch.stack([obj(1, 0, [0.3, 0, 0])] + [head.object_embed] * 3)])
        torch.testing.assert_close(memory[:, 80:], head.memory_norm(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(memory[:, :80], grid)
