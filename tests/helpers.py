"""Assertions shared by the parity and tokenizer tests."""

from __future__ import annotations

import numpy as np

TOL = 1e-4  # max |delta logit| against transformers on float32 tiny models


def random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 32000, size=(1, n))


def ref_logits(torch, hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def ref_generate(torch, hf_model, ids, n: int = 32) -> list:
    """transformers' greedy ``generate``, exactly ``n`` new tokens, no early stop."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def assert_logits_and_greedy_match(model, hf_model, torch, label: str = "") -> None:
    """Logits within TOL at lengths 1, 9 and 300, and 32 greedy tokens equal to ``generate``."""
    import mlx.core as mx

    from phi3mlx.generate import generate_step

    for n, seed in ((1, 1), (9, 2), (300, 3)):
        ids = random_ids(n, seed)
        ours = np.array(model(mx.array(ids)))
        assert ours.shape == (1, n, 32064)
        err = np.abs(ours - ref_logits(torch, hf_model, ids)).max()
        assert err <= TOL, f"{label} L={n}: max |dlogit| {err}"
    ids = random_ids(12, 4)
    ours = [t for t, _ in generate_step(ids[0].tolist(), model, max_tokens=32)]
    assert ours == ref_generate(torch, hf_model, ids)


def assert_streams_to_decode(tok, text: str) -> None:
    """The streaming detokenizer's pieces join to decode(all ids), never with a half character."""
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
